"""Bounds on the sm_90 machine code of every CUDA kernel (issue #16), from
``benchmarks/cuda_static.py``: deterministic compiler output (ptxas / nvdisasm of the pinned
CUDA 13 wheels), no timings.

* no spills, no stack, no local memory (every kernel, float32 and float64);
* no 64-bit integer division inside a hot loop (per element);
* at least 4 independent loads, or 16 bytes, in flight per thread per hot-loop iteration;
* float32 row loops (the kernels that walk rows of logits) at most 20 SASS instructions per
  element;
* float32 occupancy at least 50 % at the launched block size.

Needs the ``cuda-ptx`` extra (numba-cuda and the nvidia wheels with NVVM, ptxas, nvdisasm);
skips, saying so, only when those are not installed.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(ROOT, "benchmarks", "cuda_static.py")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import cuda_static  # noqa: E402

ROW_KERNELS = ("stats_kernel", "softmax_kernel", "softmax_kernel_strided", "index_kernel",
               "index_kernel_weighted", "prob_kernel", "prob_kernel_weighted")
# The row kernels built with logit soft-capping (cuda_static.SOFTCAP): bounds alike.
ROW_KERNELS += tuple(k + cuda_static.SOFTCAP_SUFFIX for k in cuda_static.SOFTCAP_KERNELS)
MAX_SASS_PER_ELEMENT_F32 = 20
MIN_LOADS_IN_FLIGHT, MIN_BYTES_IN_FLIGHT = 4, 16
MIN_OCCUPANCY_F32 = 0.5

# Open misses of issue #16's bounds (docs/gpu.md says why), held at today's figures so that
# they cannot grow unnoticed; a kernel that meets the bound must leave this table (see
# test_known_misses_are_still_misses).  Not exemptions: the issue stays open while any remain.
# The softmax and class-index kernels meet the bound since session 6 (their confident-row
# pass, 16 elements a step with an ordered Fast2Sum, is their worst loop at 19.6-19.7).
# With class weights the class-index gradient loop reads two arrays and writes one an element
# (three byte cursors); prob_kernel reads two (three with weights) and writes one.  A soft-cap
# adds a tanh per element.
KNOWN_SLOW_F32 = {"index_kernel_weighted": 23.2,  # SASS per element, worst loop
                  "prob_kernel": 24.9, "prob_kernel_weighted": 30.0,
                  "stats_kernel_softcap": 32.9, "index_kernel_softcap": 42.0,
                  "index_kernel_weighted_softcap": 48.5, "prob_kernel_softcap": 49.8,
                  "prob_kernel_weighted_softcap": 55.5}
KNOWN_SPILLS = {}  # "dtype/kernel": (spill, stack, local) bytes; none spills
KNOWN_SHORT_IN_FLIGHT = set()  # "dtype/kernel"; none today


@pytest.fixture(scope="module")
def report():
    if importlib.util.find_spec("numba_cuda") is None:
        pytest.skip("numba-cuda is not installed: pip install fastce[cuda-ptx]")
    home = cuda_static.cuda_home()
    if home is None or not all(os.path.isfile(os.path.join(home, "bin", t))
                               for t in ("ptxas", "nvdisasm")):
        pytest.skip("ptxas/nvdisasm wheels are not installed: pip install fastce[cuda-ptx]")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="0")
    proc = subprocess.run([sys.executable, SCRIPT, "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-8000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


KERNELS = [f"{dt}/{k}" for dt in ("float32", "float64") for k in (
    "stats_kernel", "softmax_kernel", "softmax_kernel_strided", "prepare_kernel",
    "prepare_kernel_int32", "index_kernel", "index_kernel_weighted", "prob_kernel",
    "prob_kernel_weighted", "bce_kernel", "bce_logits_kernel",
    "bce_grad_kernel", "bce_logits_grad_kernel", "sum_kernel", "rowsum_kernel", "bad_value_kernel",
    "bce_sum_kernel", "bce_logits_sum_kernel", "bce_grad_sum_kernel",
    "bce_logits_grad_sum_kernel")] + [
    f"{dt}/{k}{cuda_static.SOFTCAP_SUFFIX}" for dt in ("float32", "float64")
    for k in cuda_static.SOFTCAP_KERNELS] + [
    f"copy/copy_{k}" for k in ("f16_to_f32", "f32_to_f16", "f32_to_f32")]


def test_every_kernel_is_measured(report):
    assert sorted(report) == sorted(KERNELS)
    # Every kernel has a hot loop that loads memory (the analysis is not vacuous).
    assert all(r["loops"] for r in report.values())


@pytest.mark.parametrize("key", KERNELS)
def test_no_spills_or_local_memory(report, key):
    r = report[key]
    found = (r["spill"], r["stack"], r["local"])
    if key in KNOWN_SPILLS:
        # open miss: held at today's bytes, and still a miss (else it must leave the table)
        assert found != (0, 0, 0) and all(f <= k for f, k in zip(found, KNOWN_SPILLS[key])), r
        return
    assert found == (0, 0, 0), r


@pytest.mark.parametrize("key", KERNELS)
def test_no_64bit_division_per_element(report, key):
    assert report[key]["div64_hot"] == 0, report[key]["loops"]


def _short_loops(r):
    return [lp for lp in r["loops"]
            if lp["in_flight_loads"] < MIN_LOADS_IN_FLIGHT and
            lp["in_flight_bytes"] < MIN_BYTES_IN_FLIGHT]


@pytest.mark.parametrize("key", KERNELS)
def test_loads_in_flight(report, key):
    short = _short_loops(report[key])
    if key in KNOWN_SHORT_IN_FLIGHT:
        # open miss: one position per step; at least one load is still in flight
        assert all(lp["in_flight_loads"] >= 1 for lp in short), short
        return
    assert not short, short


@pytest.mark.parametrize("name", ROW_KERNELS)
def test_float32_row_loops_instructions_per_element(report, name):
    loops = report[f"float32/{name}"]["loops"]
    bound = KNOWN_SLOW_F32.get(name, MAX_SASS_PER_ELEMENT_F32)
    slow = [lp for lp in loops if lp["per_element"] > bound]
    assert not slow, slow


def test_known_misses_are_still_misses(report):
    """A kernel listed as an open miss that now meets the bound must leave the list."""
    for name in KNOWN_SLOW_F32:
        worst = max(lp["per_element"] for lp in report[f"float32/{name}"]["loops"])
        assert worst > MAX_SASS_PER_ELEMENT_F32, f"{name} now meets the bound: drop it"
    for key in KNOWN_SHORT_IN_FLIGHT:
        assert _short_loops(report[key]), f"{key} now meets the bound: drop it"


@pytest.mark.parametrize("key", [k for k in KERNELS if not k.startswith("float64/")])
def test_float32_occupancy(report, key):
    assert report[key]["occupancy"] >= MIN_OCCUPANCY_F32, report[key]
