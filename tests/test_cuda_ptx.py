"""The real (warp-shuffle) CUDA kernels compile to PTX for sm_90 without a GPU, and the
float32 kernels hold no float64 arithmetic.

Needs NVVM from the pip wheels ``nvidia-cuda-nvrtc nvidia-nvvm nvidia-cuda-runtime`` (CUDA 13,
about 320 MB: the ``cuda-ptx`` extra) and numba-cuda; skips, saying so, only when those are
not installed.  The compile runs in a subprocess (``tests/cuda_ptx_compile.py``) with the
simulator switched off and ``CUDA_HOME`` set to the wheels' folder, whatever this process's
environment says.
"""
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
PIP_HINT = "pip install nvidia-cuda-nvrtc nvidia-nvvm nvidia-cuda-runtime (or fastce[cuda-ptx])"


def _wheel_cuda_home():
    """The folder of the nvidia-* wheels that holds ``nvvm/`` and ``lib/libnvvm.so*``
    (``nvidia/cu13`` for CUDA 13), or None."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for home in sorted(glob.glob(os.path.join(root, "*"))):
            nvvm = glob.glob(os.path.join(home, "lib*", "libnvvm.so*")) + \
                glob.glob(os.path.join(home, "nvvm", "lib*", "libnvvm.so*"))
            if nvvm and os.path.isdir(os.path.join(home, "nvvm", "libdevice")):
                return home
    return None


@pytest.fixture(scope="module")
def ptx_report():
    if importlib.util.find_spec("numba_cuda") is None:
        pytest.skip("numba-cuda is not installed: pip install fastce[cuda]")
    home = _wheel_cuda_home()
    if home is None:
        pytest.skip(f"NVVM wheels are not installed: {PIP_HINT}")
    env = dict(os.environ, CUDA_HOME=home, NUMBA_ENABLE_CUDASIM="0")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "cuda_ptx_compile.py")],
                          cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        pytest.fail(f"PTX compile failed (CUDA_HOME={home}):\n{proc.stdout[-4000:]}\n"
                    f"{proc.stderr[-8000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_compiles_for_sm90(ptx_report):
    kinds = {k.split("/", 2)[2] for k in ptx_report if "/shuffle/" in k}
    assert {"softmax_kernel", "stats_kernel", "prepare_kernel", "index_kernel", "prob_kernel",
            "index_kernel_weighted", "prob_kernel_weighted",
            "bce_kernel", "bce_logits_kernel", "sum_kernel", "bad_value_kernel",
            "nll_loss_kernel", "nll_grad_kernel"} <= kinds
    for dt in ("float32", "float64"):
        assert all(f"{dt}/shuffle/{k}" in ptx_report for k in kinds)
    # The shuffle twin really shuffles, the simulator's twin does not.
    assert ptx_report["float32/shuffle/softmax_kernel"]["shfl"] > 0
    assert ptx_report["float32/shared/softmax_kernel"]["shfl"] == 0


def test_float32_kernels_have_no_float64(ptx_report):
    leaks = {k: v["f64"][:5] for k, v in ptx_report.items()
             if k.startswith("float32/") and v["f64"]}
    assert not leaks, f"float64 in float32 kernels: {leaks}"
    # ... and they do compute in float32 (the check above is not vacuous).
    assert all(v["f32"] > 0 for k, v in ptx_report.items() if k.startswith("float32/"))


def test_float64_kernels_compute_in_float64(ptx_report):
    assert all(v["f64"] for k, v in ptx_report.items() if k.startswith("float64/"))
