"""Shared pieces of the fastce asv suite.

* the parameter grid (``IMPLS``, ``BATCHES``, ``CLASSES``, ``DTYPES``,
  ``KDIM_SHAPES``) and its size cap;
* seeded data makers;
* the implementation registry as asv sees it (:func:`make_call`), including
  the GPU implementations, which are skipped where no GPU is present;
* per-process memoization (:func:`memoize`), because asv_runner >= 0.3 re-runs
  ``setup`` before every timed call;
* the roof references (:func:`roof_read`, :func:`roof_read_write`) and memory
  probes.

Environment variables read here (all optional):

``FASTCE_BENCH_MAX_ELEMENTS``
    Largest ``batch * classes`` benchmarked (default ``2**27``: 4096 x 32000
    runs, 4096 x 128000 is skipped).  ``benchmarks/run.sh`` lowers it for
    quick runs.
``NUMBA_NUM_THREADS``
    Thread count for Numba; the same count is given to PyTorch so both use
    the same cores.  ``asv.conf.json`` fixes it in the matrix.

Nothing here launches Numba's thread pool at import time: under asv's
``forkserver`` launch method the suite is imported once and every benchmark
runs in a fork, and GNU OpenMP aborts a fork taken after its pool started.
"""

import ctypes
import ctypes.util
import importlib
import importlib.util
import os
import time

import numba
import numpy as np

from fastce import reference
from fastce._config import FASTMATH, PARALLEL_MIN_ELEMENTS
from fastce.report import NONFINITE_ERROR  # noqa: F401  (one definition, shared)

_SUITE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compiled_peers_environment():
    """Thread count and on-disk compile caches of the compiled peers, set before jax or
    torch's inductor first runs (so in the forkserver parent, at import)."""
    n = str(int(numba.config.NUMBA_NUM_THREADS))
    # XLA's CPU client sizes its thread pool from PJRT_NPROC (else the core count);
    # XLA_FLAGS' --xla_cpu_multi_thread_eigen=false does not hold it (docs/benchmarks.md)
    os.environ.setdefault("PJRT_NPROC", n)
    # inductor: compile in this process (a pool of compile workers per benchmark process
    # costs more than it saves) and keep its FX-graph and C++ caches across processes
    cache = os.path.join(_SUITE_ROOT, ".asv", "compile-cache")
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache, "torchinductor"))
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(cache, "jax"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


_compiled_peers_environment()

try:  # imported once in the forkserver parent, so forks do not import it again
    import torch  # noqa: F401
except ImportError:  # torch is optional: its benchmarks are skipped
    torch = None
else:
    try:  # torch.compile's machinery, imported once in the parent too
        import torch._dynamo  # noqa: F401
        import torch._inductor.compile_fx  # noqa: F401
    except ImportError:  # pragma: no cover - a torch without inductor
        pass

try:  # importing starts no XLA thread: the CPU client starts in the benchmark's fork
    import jax  # noqa: F401
    import jax.numpy  # noqa: F401
except ImportError:  # jax is optional: its benchmarks are skipped
    pass

try:
    import scipy.special  # noqa: F401
except ImportError:
    pass

# ---------------------------------------------------------------------------
# grid
# ---------------------------------------------------------------------------

# compiled peers: torch.compile and jax.jit compile per shape in every benchmark process
COMPILED_IMPLS = ["torch-compile", "jax"]
CPU_IMPLS = ["fastce", "numpy-naive", "numpy-stable", "scipy", "torch"] + COMPILED_IMPLS
GPU_IMPLS = ["fastce-cuda", "torch-cuda"]
IMPLS = CPU_IMPLS + GPU_IMPLS
# implementations that are references, not peers: a summary's "fastest" ignores them
# (numpy-naive overflows on purpose)
NOT_PEERS = ["numpy-naive"]
# memory and accuracy benchmarks: not the compiled peers (peak RSS would count the
# compiler's; their results are checked against torch in tests/test_reference.py)
EAGER_IMPLS = [i for i in IMPLS if i not in COMPILED_IMPLS]
BATCHES = [1, 32, 512, 4096]
CLASSES = [2, 10, 100, 1000, 32000, 128000]
DTYPES = ["float32", "float64"]
# (N, C, H, W): Pascal VOC (21 classes), ADE20K (150), binary masks
KDIM_SHAPES = [(8, 21, 128, 128), (2, 150, 128, 128), (16, 2, 256, 256)]

SEED = 20240607


def max_elements():
    """Largest number of logits benchmarked, from ``FASTCE_BENCH_MAX_ELEMENTS``."""
    return int(float(os.environ.get("FASTCE_BENCH_MAX_ELEMENTS", 2**27)))


# The compiled peers' grid in quick runs: every (params x round) is a fresh asv process
# that compiles again (docs/benchmarks.md has the cost), so quick runs time them on this
# subset; FASTCE_BENCH_COMPILED_GRID=full (run.sh --full) times them everywhere.
COMPILED_GRID = {"batch": [1, 512, 4096], "classes": [10, 100, 1000, 32000],
                 "dtype": ["float32"]}


def compiled_grid():
    """The compiled peers' grid: ``COMPILED_GRID``, or None (every cell) when
    ``FASTCE_BENCH_COMPILED_GRID=full``."""
    return None if os.environ.get("FASTCE_BENCH_COMPILED_GRID") == "full" else COMPILED_GRID


def skip_outside_compiled_grid(impl, **params):
    """Raise NotImplementedError (asv: skipped) for a compiled peer outside its grid."""
    grid = compiled_grid()
    if impl not in COMPILED_IMPLS or grid is None:
        return
    for name, value in params.items():
        if name in grid and value not in grid[name]:
            raise NotImplementedError(
                f"{impl} runs on the compiled peers' grid {grid} only "
                "(FASTCE_BENCH_COMPILED_GRID=full for every cell)")


def skip_if_too_large(n_elements):
    """Raise NotImplementedError (asv: skipped) above the size cap."""
    if n_elements > max_elements():
        raise NotImplementedError(
            f"{n_elements} elements > FASTCE_BENCH_MAX_ELEMENTS={max_elements()}"
        )


# ---------------------------------------------------------------------------
# threads and memory
# ---------------------------------------------------------------------------

_configured = False


def n_threads():
    """Thread count used by every implementation (``NUMBA_NUM_THREADS``)."""
    return int(numba.config.NUMBA_NUM_THREADS)


def configure_threads():
    """Give Numba and PyTorch the same fixed thread count (once per process)."""
    global _configured
    if _configured:
        return
    n = n_threads()
    numba.set_num_threads(n)  # starts Numba's pool: call only inside a benchmark process
    if torch is not None:
        torch.set_num_threads(n)
    _configured = True


def _fix_malloc_threshold():
    # glibc raises its mmap threshold after a large free, so a second
    # N x C temporary would come from already-resident heap and not show in
    # RSS.  A fixed threshold keeps large blocks mmap'd and freed back to the
    # OS, so the memory probes see every large allocation.
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(ctypes.c_int(-3), ctypes.c_int(1 << 16))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _proc_status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(field)


def reset_peak_rss():
    """Reset the process's peak RSS (VmHWM / ru_maxrss) to the current RSS.

    Returns the current RSS in bytes, or None where Linux's ``clear_refs``
    is not available.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status("VmRSS")
    except OSError:
        return None


def peak_rss():
    """Peak RSS in bytes since the last :func:`reset_peak_rss`."""
    return _proc_status("VmHWM")


# ---------------------------------------------------------------------------
# memoization
# ---------------------------------------------------------------------------

_CACHE = {}


def memoize(key, build):
    """Return ``build()``, computed once per process for ``key``.

    asv_runner >= 0.3 calls ``setup`` before every timed call, so data
    creation, JIT compilation and warm-up must happen once, not each time.
    """
    try:
        return _CACHE[key]
    except KeyError:
        # one entry at a time: a process runs one parameter set, and holding
        # several 1 GB inputs would distort peakmem
        _CACHE.clear()
        value = _CACHE[key] = build()
        return value


# ---------------------------------------------------------------------------
# data makers
# ---------------------------------------------------------------------------


_BLOCK = 1 << 22


def make_logits(shape, dtype, scale=3.0, seed=0):
    """Seeded standard-normal logits times ``scale``.

    Above 4M elements a 4M block is tiled: drawing 131M normals costs
    seconds per benchmark process, and the values don't change the timing.
    """
    g = np.random.default_rng([SEED, seed, *shape])
    t = np.dtype(dtype).type
    size = int(np.prod(shape))
    if size <= _BLOCK:
        x = g.standard_normal(shape, dtype=t)
    else:
        x = np.resize(g.standard_normal(_BLOCK, dtype=t), shape)
    if scale != 1.0:
        x *= t(scale)
    return x


def make_targets(shape, n_classes, seed=1):
    """Class indices in ``[0, n_classes)`` (int64, what torch needs)."""
    g = np.random.default_rng([SEED, seed, n_classes, *shape])
    return g.integers(0, n_classes, size=shape, dtype=np.int64)


def make_probabilities(shape, dtype, seed=2):
    """Probabilities in ``(0, 1)`` for binary cross-entropy inputs."""
    g = np.random.default_rng([SEED, seed, *shape])
    p = g.random(shape, dtype=np.dtype(dtype).type)
    np.clip(p, 1e-6, 1 - 1e-6, out=p)
    return p


def make_binary_targets(shape, dtype, seed=3):
    """Targets in {0, 1} in ``dtype``."""
    g = np.random.default_rng([SEED, seed, *shape])
    return (g.random(shape, dtype=np.float32) < 0.5).astype(dtype)


# ---------------------------------------------------------------------------
# implementations as asv sees them
# ---------------------------------------------------------------------------


def _cuda_available():
    try:
        from numba import cuda

        return bool(cuda.is_available())
    except Exception:  # no driver, no toolkit: not available
        return False


def get_impl(name):
    """Return the implementation for ``name`` or raise NotImplementedError (skip).

    CPU implementations come from :mod:`fastce.reference`; a missing optional
    library (torch, scipy) skips the benchmark instead of failing it.
    """
    if name in GPU_IMPLS:
        raise AssertionError("use make_call for GPU implementations")
    try:
        return reference.get_implementation(name)
    except ImportError as exc:
        raise NotImplementedError(str(exc)) from None


def _torch_cuda_ops():
    import torch.nn.functional as F

    def ce_grad(x, y, **kw):
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(x, y, **kw)
        loss.backward(torch.ones_like(loss))
        return loss, x.grad

    return {
        "logsumexp": lambda x, axis=-1: torch.logsumexp(x, dim=axis),
        "log_softmax": lambda x, axis=-1: F.log_softmax(x, dim=axis),
        "softmax": lambda x, axis=-1: F.softmax(x, dim=axis),
        "cross_entropy": F.cross_entropy,
        "cross_entropy_with_grad": ce_grad,
        "binary_cross_entropy": F.binary_cross_entropy,
        "binary_cross_entropy_with_logits": F.binary_cross_entropy_with_logits,
    }


def make_call(impl, func, *arrays, **kwargs):
    """Bind implementation ``impl``'s ``func`` to data; return a no-arg callable.

    For GPU implementations the arrays are copied to the device here, outside
    any timing, and the callable synchronizes before returning so the timing
    covers the kernel.  Raises NotImplementedError (asv: skipped) where the
    implementation cannot run on this machine.
    """
    if impl == "torch-cuda":
        if torch is None or not torch.cuda.is_available():
            raise NotImplementedError("torch-cuda needs torch with a CUDA device")
        f = _torch_cuda_ops()[func]
        dev = [torch.from_numpy(np.ascontiguousarray(a)).cuda() for a in arrays]
        sync = torch.cuda.synchronize

        def call():
            out = f(*dev, **kwargs)
            sync()
            return out

        return call
    if impl == "fastce-cuda":
        if importlib.util.find_spec("fastce.cuda") is None or not _cuda_available():
            raise NotImplementedError("fastce-cuda needs fastce.cuda and a CUDA device")
        from numba import cuda

        fc = importlib.import_module("fastce.cuda")
        if not hasattr(fc, func):
            raise NotImplementedError(f"fastce.cuda has no {func}")
        f = getattr(fc, func)
        dev = [cuda.to_device(np.ascontiguousarray(a)) for a in arrays]

        def call():
            out = f(*dev, **kwargs)
            cuda.synchronize()
            return out

        return call
    return get_impl(impl).bind(func, *arrays, **kwargs)


# Inputs of at least this many bytes get a warm-up of at least STEADY_WARMUP_SECONDS: an
# N x C output of that size is a fresh huge-page allocation each call (NumPy asks for huge
# pages from 4 MiB), and on a VM that hands freed memory back to its host (virtio-balloon
# free page reporting) the first 0.2-0.4 s of such calls in a process pay for cold host
# pages, several times a steady call (docs/performance.md, "cold huge pages").  Every
# implementation gets the same warm-up.
STEADY_WARMUP_BYTES = 4 * 2**20
STEADY_WARMUP_SECONDS = 0.6


def steady_seconds(*arrays):
    """The extra warm-up for inputs ``arrays``: ``STEADY_WARMUP_SECONDS`` from
    ``STEADY_WARMUP_BYTES`` in all, else 0."""
    large = sum(getattr(a, "nbytes", 0) for a in arrays) >= STEADY_WARMUP_BYTES
    return STEADY_WARMUP_SECONDS if large else 0.0


def warm_up(call, times=1, min_seconds=0.0):
    """Run ``call`` so JIT compilation, cache loading and torch's lazy
    initialization happen before asv's timer starts: ``times`` calls, then
    more for ``min_seconds``."""
    configure_threads()
    out = None
    for _ in range(times):
        out = call()
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        out = call()
    return out


# ---------------------------------------------------------------------------
# roofs: what the hardware allows for one pass over the logits
# ---------------------------------------------------------------------------

# Below fastce's own serial/parallel threshold the pool's wake-up dominates, so the roof
# uses the serial kernel there, as fastce does.
_PARALLEL_MIN = PARALLEL_MIN_ELEMENTS

# The roof benchmarks, by asv name: a timing class names its roof next to itself
# (``roof``, ``roof_arrays``) and fastce-report reads that through declarations().
ROOF_READ = "bench_roof.Roof.time_read"
ROOF_READ_WRITE = "bench_roof.Roof.time_read_write"
ROOF_KDIM_READ = "bench_roof.RoofKDim.time_read"
ROOF_KDIM_READ_WRITE = "bench_roof.RoofKDim.time_read_write"


@numba.njit(cache=True, fastmath=FASTMATH)
def _read_serial(x):
    s = x.dtype.type(0)
    for i in range(x.size):
        s += x[i]
    return s


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _read_parallel(x, n_chunks):
    # contiguous chunks, one partial sum each: a pure streaming read
    part = np.zeros(n_chunks, dtype=x.dtype)
    step = (x.size + n_chunks - 1) // n_chunks
    for k in numba.prange(n_chunks):
        s = x.dtype.type(0)
        for i in range(k * step, min((k + 1) * step, x.size)):
            s += x[i]
        part[k] = s
    return part.sum()


@numba.njit(cache=True, fastmath=FASTMATH)
def _read_write_serial(x, out, a):
    for i in range(x.size):
        out[i] = x[i] * a


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _read_write_parallel(x, out, a, n_chunks):
    step = (x.size + n_chunks - 1) // n_chunks
    for k in numba.prange(n_chunks):
        for i in range(k * step, min((k + 1) * step, x.size)):
            out[i] = x[i] * a


def roof_read(x):
    """One parallel streaming read of ``x`` (the memory-bandwidth roof)."""
    flat = x.reshape(-1)
    if flat.size < _PARALLEL_MIN:
        return _read_serial(flat)
    return _read_parallel(flat, 8 * numba.get_num_threads())


def roof_read_write(x, out):
    """One parallel pass reading ``x`` and writing ``out`` of the same size."""
    flat, o = x.reshape(-1), out.reshape(-1)
    a = x.dtype.type(1)
    if flat.size < _PARALLEL_MIN:
        _read_write_serial(flat, o, a)
    else:
        _read_write_parallel(flat, o, a, 8 * numba.get_num_threads())


# ---------------------------------------------------------------------------
# benchmark base class
# ---------------------------------------------------------------------------


class OpBenchmark:
    """Base for one operation timed across implementations.

    Subclasses set ``op`` (a fastce function name) and implement
    ``make_inputs(*shape_params, dtype) -> (arrays, kwargs)``.  ``setup`` is
    memoized per process: data, JIT compilation and warm-up happen once.
    Each subclass warms only its own operation, because asv runs every
    benchmark method in a process of its own.

    Timing classes also declare their roof: ``roof`` (the asv name of the roof
    benchmark bounding them, one of the ``ROOF_*`` names) and ``roof_arrays`` (how
    many logits-sized arrays the operation must stream).  fastce-report reads these
    through :func:`declarations`.
    """

    op = None
    roof = None
    roof_arrays = 1
    params = [IMPLS, BATCHES, CLASSES, DTYPES]
    param_names = ["impl", "batch", "classes", "dtype"]
    timeout = 300
    # Sampling for plain `asv run` / `asv continuous` as well as run.sh: one process per
    # parameter set, a short warm-up (setup has compiled and warmed up already), then 3-7
    # samples within about a second -- stable medians without asv's 2 rounds x 10 samples.
    rounds = 1
    repeat = (3, 7, 1.0)
    warmup_time = 0.05

    def n_elements(self, *shape_params):
        batch, classes = shape_params
        return batch * classes

    def make_inputs(self, batch, classes, dtype):
        raise NotImplementedError

    def setup(self, impl, *rest):
        *shape_params, dtype = rest
        skip_if_too_large(self.n_elements(*shape_params))
        skip_outside_compiled_grid(impl, **dict(zip(self.param_names[1:], rest)))

        def build():
            arrays, kwargs = self.make_inputs(*shape_params, dtype)
            call = make_call(impl, self.op, *arrays, **kwargs)
            # compiled peers: the first call compiles, the second runs what was built
            warm_up(call, times=2 if impl in COMPILED_IMPLS else 1,
                    min_seconds=steady_seconds(*arrays))
            return arrays, call

        self.arrays, self.call = memoize((type(self).__name__, impl, *rest), build)


class OpMemoryBenchmark(OpBenchmark):
    """Memory of one operation, on inputs large enough for RSS to resolve.

    ``peakmem_*`` (asv's measure) is the process's peak RSS: the imported
    libraries and the inputs plus what the call allocates.  The
    ``track_*_extra_memory`` methods isolate the last part, as a multiple of
    the logits' size: about 0 for a fused forward, about 1 per N x C
    temporary an implementation materializes.
    """

    params = [EAGER_IMPLS, [512, 4096], [1000, 32000, 128000], DTYPES]

    def setup(self, *params):
        _fix_malloc_threshold()  # here only: it would slow the timings
        super().setup(*params)
        # peakmem_ counts from here: imports + inputs + what the call adds,
        # not data generation's temporaries
        reset_peak_rss()

    def extra_memory(self):
        base = reset_peak_rss()
        if base is None:
            raise NotImplementedError("needs Linux /proc/self/clear_refs")
        self.call()
        return (peak_rss() - base) / self.arrays[0].nbytes


def _to_numpy(y):
    if hasattr(y, "detach"):  # torch tensor (torch-cuda)
        y = y.detach().cpu().numpy()
    elif hasattr(y, "copy_to_host"):  # numba device array (fastce-cuda)
        y = y.copy_to_host()
    return np.asarray(y)


def max_rel_error(y, ref):
    """``max |y - ref| / max(|ref|, 1)``; ``NONFINITE_ERROR`` where y is not
    finite but ref is.

    The floor of 1 keeps losses near 0 (a confident correct prediction)
    from turning a tiny absolute error into a huge relative one.
    """
    y = _to_numpy(y).astype(np.longdouble)
    ref = np.asarray(ref, dtype=np.longdouble)
    bad = ~np.isfinite(y) & np.isfinite(ref)
    if np.any(bad):
        return NONFINITE_ERROR
    err = np.abs(y - ref) / np.maximum(np.abs(ref), 1)
    return float(np.max(err))


# ---------------------------------------------------------------------------
# what the suite declares, for fastce-report
# ---------------------------------------------------------------------------


def declarations():
    """What the suite's classes declare, by asv benchmark name.

    Returns
    -------
    dict
        ``{"benchmarks": {name: {"op", "roof", "roof_arrays"}}, "gpu_impls",
        "compiled_impls", "not_peers", "compiled_grid"}`` for every ``time_`` method
        of a class with an ``op``; ``name`` is asv's (``module.Class.method``).
    """
    import inspect
    import pkgutil

    package = importlib.import_module(__name__.rsplit(".", 1)[0])
    out = {}
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("bench_"):
            continue
        mod = importlib.import_module(f"{package.__name__}.{info.name}")
        for cls_name, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ != mod.__name__ or cls_name.startswith("_"):
                continue
            if getattr(cls, "op", None) is None:
                continue
            for method in dir(cls):
                if method.startswith("time_"):
                    out[f"{info.name}.{cls_name}.{method}"] = {
                        "op": cls.op, "roof": cls.roof, "roof_arrays": cls.roof_arrays}
    return {"benchmarks": out, "gpu_impls": list(GPU_IMPLS),
            "compiled_impls": list(COMPILED_IMPLS), "not_peers": list(NOT_PEERS),
            "compiled_grid": compiled_grid()}
