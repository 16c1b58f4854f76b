"""fastce.cuda without a GPU.

* The CUDA kernels run in Numba's CUDA simulator against the CPU kernels and torch:
  ``tests/cuda_sim_cases.py``, in a subprocess, because ``NUMBA_ENABLE_CUDASIM=1`` must be set
  before numba is first imported and this process has imported it already.  A failure shows
  the subprocess' pytest report.  The cases are split over four subprocesses (shards) that
  pytest-xdist's workers share.  ``FASTCE_SIM_PYTEST_ARGS`` adds arguments to that run
  (e.g. ``-k softmax``) and makes it one.
* Importing works without CUDA, and a CUDA array on a machine without a GPU, or without
  numba-cuda, gives an error naming the missing piece.
"""
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

import fastce
import fastce.cuda

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HAS_NUMBA_CUDA = importlib.util.find_spec("numba_cuda") is not None
# The simulator cases run in this many subprocesses (each takes every SHARDS-th case), so that
# pytest-xdist's workers share them; one when FASTCE_SIM_PYTEST_ARGS selects cases.
SHARDS = 1 if os.environ.get("FASTCE_SIM_PYTEST_ARGS") else 4


def _gpu_present():
    if not HAS_NUMBA_CUDA:
        return False
    from numba import config, cuda
    return not config.ENABLE_CUDASIM and cuda.is_available()


def _simulator_on():
    if not HAS_NUMBA_CUDA:
        return False
    from numba import config
    return bool(config.ENABLE_CUDASIM)


class FakeCudaArray:
    """Claims to be a CUDA array (the interface is all the dispatch looks at)."""

    __cuda_array_interface__ = {"shape": (2, 3), "typestr": "<f4", "data": (0, False),
                                "version": 3, "strides": None}
    shape = (2, 3)


@pytest.mark.skipif(not HAS_NUMBA_CUDA, reason="numba-cuda is not installed: "
                                               "pip install fastce[cuda]")
@pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                    reason="the simulator cases compare with torch")
@pytest.mark.parametrize("shard", range(SHARDS))
def test_cuda_kernels_in_simulator(shard):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", FASTCE_SIM_SHARD=f"{shard}/{SHARDS}")
    cmd = [sys.executable, "-m", "pytest", os.path.join("tests", "cuda_sim_cases.py"), "-q",
           "-p", "no:cacheprovider", "-rfE", "--durations=5"]
    cmd += shlex.split(os.environ.get("FASTCE_SIM_PYTEST_ARGS", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    report = f"{' '.join(cmd)} (NUMBA_ENABLE_CUDASIM=1) exited {proc.returncode}:\n{out[-12000:]}"
    assert proc.returncode == 0, report
    passed = re.search(r"(\d+) passed", out)
    # Guard against a run that skipped or deselected everything.
    assert passed and int(passed.group(1)) >= (1 if "FASTCE_SIM_PYTEST_ARGS" in os.environ
                                               else 150 // SHARDS), report
    print(out[-3000:])


def test_import_needs_no_cuda():
    # fastce and fastce.cuda are imported above; availability is decided at call time.
    code = "import sys, fastce, fastce.cuda; print('numba.cuda' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"  # importing does not even load numba.cuda
    assert fastce.cuda.is_available() == (_gpu_present() or _simulator_on())


@pytest.mark.skipif(not HAS_NUMBA_CUDA or _gpu_present() or _simulator_on(),
                    reason="needs numba-cuda, no GPU and the simulator off")
def test_cuda_array_without_gpu_says_so(monkeypatch):
    monkeypatch.setattr(fastce.cuda, "_IMPL", None)
    assert fastce.cuda.is_available() is False
    for call in (lambda: fastce.softmax(FakeCudaArray()),
                 lambda: fastce.cross_entropy(FakeCudaArray(), np.zeros(2, np.int64)),
                 lambda: fastce.binary_cross_entropy_with_logits(FakeCudaArray(),
                                                                np.zeros((2, 3))),
                 lambda: fastce.nll_loss(FakeCudaArray(), np.zeros(2, np.int64)),
                 lambda: fastce.nll_loss_with_grad(FakeCudaArray(), np.zeros(2, np.int64))):
        with pytest.raises(RuntimeError, match="no usable GPU"):
            call()


def test_cuda_array_without_numba_cuda_says_pip_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(fastce.cuda, "_IMPL", None)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "numba_cuda" else real(name, *a))
    with pytest.raises(ImportError, match=re.escape("pip install 'fastce[cuda]' (from a clone "
                                                    "of fastce: pip install -e '.[cuda]')")):
        fastce.log_softmax(FakeCudaArray())
    assert fastce.cuda.is_available() is False
