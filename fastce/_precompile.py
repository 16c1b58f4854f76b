"""Filling numba's on-disk cache ahead of time: the calls that compile the common kernel
signatures, run in parallel worker processes (``python -m fastce precompile``).

The CPU kernels are compiled on their first call in a process (seconds; README "First
use") and cached on disk (``cache=True``: the package's ``_cpu/__pycache__``, or
``NUMBA_CACHE_DIR``).  The common signatures are every public CPU function on float32 and
float64 with class-index targets: the small-call entry and the serial and parallel kernels.
``EXTRA`` adds the K-dim (N, C, d1, ...) layouts and probability targets.
"""
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

DTYPES = ("float32", "float64")

# A group of public calls per task: each compiles a few kernels for one dtype.  Shapes are
# picked by the front ends' rules: (4, 10) with int64 targets takes the tiny-call kernel, (8, 100)
# the vectorized small-call entry; int32 targets the general path's serial kernel; 2**17 elements the parallel kernel; two
# rows of 2**16 classes the split-row statistics; (64, 100) and (1024, 100) the row tiles
# (small-call entry, serial, parallel).
COMMON = ("cross_entropy_small", "cross_entropy_rows", "softmax_rows", "row_tiles", "bce")
EXTRA = ("cross_entropy_spatial", "cross_entropy_probs", "softmax_spatial")


def _calls(group, dtype):
    import numpy as np

    import fastce

    rng = np.random.default_rng(0)

    def logits(*shape):
        return rng.standard_normal(shape).astype(dtype)

    def classes(n, c, dt=np.int32):
        return (np.arange(n) % c).astype(dt)

    ce, ceg = fastce.cross_entropy, fastce.cross_entropy_with_grad
    if group == "cross_entropy_small":
        tiny, small = logits(4, 10), logits(8, 100)
        return [lambda: ce(tiny, classes(4, 10, np.int64)),
                lambda: ceg(tiny, classes(4, 10, np.int64)),
                lambda: ce(small, classes(8, 100, np.int64)),
                lambda: ceg(small, classes(8, 100, np.int64))]
    if group == "cross_entropy_rows":
        small, big, long = logits(8, 100), logits(128, 1024), logits(2, 1 << 16)
        return [lambda: ce(small, classes(8, 100)), lambda: ceg(small, classes(8, 100)),
                lambda: ce(big, classes(128, 1024)), lambda: ceg(big, classes(128, 1024)),
                lambda: ce(long, classes(2, 1 << 16))]
    if group == "softmax_rows":
        small, big, long = logits(8, 100), logits(128, 1024), logits(2, 1 << 16)
        ops = (fastce.logsumexp, fastce.log_softmax, fastce.softmax)
        return [lambda f=f, a=a: f(a) for f in ops for a in (small, big, long)]
    if group == "row_tiles":
        small, big = logits(64, 100), logits(1024, 100)
        ops = (fastce.logsumexp, fastce.log_softmax, fastce.softmax)
        # int64 targets on (64, 100): the small-call entry; int32: the serial kernel.
        return ([lambda f=f, a=a: f(a) for f in ops for a in (small, big)]
                + [lambda f=f, a=a, dt=dt: f(a, classes(len(a), 100, dt)) for f in (ce, ceg)
                   for a, dt in ((small, np.int64), (small, np.int32), (big, np.int32))])
    if group == "bce":
        p_small, p_big = rng.random((32, 10)).astype(dtype), rng.random(1 << 17).astype(dtype)
        fs = (fastce.binary_cross_entropy, fastce.binary_cross_entropy_with_logits,
              fastce.binary_cross_entropy_with_grad,
              fastce.binary_cross_entropy_with_logits_with_grad)
        return [lambda f=f, p=p: f(p, (p > 0.5).astype(dtype)) for f in fs
                for p in (p_small, p_big)]
    if group == "cross_entropy_spatial":
        small, big = logits(2, 3, 4, 5), logits(2, 4, 128, 128)
        return [lambda f=f, x=x: f(x, classes(x.shape[0] * x[0, 0].size, x.shape[1]).reshape(
                    (x.shape[0],) + x.shape[2:])) for f in (ce, ceg) for x in (small, big)]
    if group == "cross_entropy_probs":
        shapes = [(8, 100), (128, 1024), (2, 3, 4, 5), (2, 4, 128, 128)]
        xs = [logits(*s) for s in shapes]
        return [lambda f=f, x=x: f(x, fastce.softmax(x, axis=1)) for f in (ce, ceg) for x in xs]
    if group == "softmax_spatial":
        small, big = logits(2, 3, 4, 5), logits(2, 4, 128, 128)
        return [lambda f=f, a=a: f(a, axis=1) for f in (fastce.logsumexp, fastce.softmax)
                for a in (small, big)]
    raise ValueError(f"unknown group {group!r}")


def _run_group(group, dtype):
    """Worker: make the group's calls (each compiles or loads its kernels); seconds taken."""
    t0 = time.perf_counter()
    for call in _calls(group, dtype):
        call()
    return group, dtype, time.perf_counter() - t0


def precompile(groups=COMMON, dtypes=DTYPES, jobs=None, quiet=False):
    """Compile the kernels the given call groups use into numba's on-disk cache, one worker
    process per (group, dtype) at most ``jobs`` at a time.  Returns the seconds taken."""
    from . import _runtime

    t0 = time.perf_counter()
    _runtime._import_kernels()   # the stale-cache purge runs once, here, not in every worker
    tasks = [(g, d) for g in groups for d in dtypes]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_run_group, g, d) for g, d in tasks]
        for fut in as_completed(futures):
            group, dtype, secs = fut.result()
            if not quiet:
                print(f"  {group:<22} {dtype:<8} {secs:6.2f} s", flush=True)
    total = time.perf_counter() - t0
    if not quiet:
        where = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(
            os.path.dirname(_runtime.__file__), "_cpu", "__pycache__")
        print(f"fastce precompile: {len(tasks)} groups in {total:.1f} s with {jobs} "
              f"processes; numba's cache: {where}")
    return total
