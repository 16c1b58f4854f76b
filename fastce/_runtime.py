"""Runtime policy: which numba threading layer the parallel kernels run on, whether a call
runs the serial or the parallel kernel (and into how many chunks a row is cut), and how the
CPU kernels are imported (the stale on-disk cache purge, the fallback when no cache location
is writable).

Imports only ``_config`` and ``_arrays`` at module level; the kernels are imported by
:func:`_import_kernels`, which the front ends call once, and ``fastce.cuda`` by :func:`_cuda`
when a device array arrives.
"""
import hashlib
import os
import threading
import types
from pathlib import Path

import numba
import numpy as np

from . import _config
from ._arrays import EMPTY

# ---------------------------------------------------------------------------------------------
# importing the kernels

_PACKAGE = Path(__file__).resolve().parent
_CPU = _PACKAGE / "_cpu"


def kernel_sources():
    """Every source file the CPU kernels compile from: ``_cpu/*.py`` and the modules they
    import from the package (``_config``, ``_modes``)."""
    return sorted(_CPU.glob("*.py")) + [_PACKAGE / "_config.py", _PACKAGE / "_modes.py"]


def _drop_stale_kernel_cache():
    """Delete numba's on-disk cache of the CPU kernels when any kernel source changed.

    numba keys a cached kernel on its own file only: an edit to a shared helper in
    ``primitives.py`` or a constant in ``_config.py`` would otherwise keep serving the old
    machine code (numba PR #8396 is unmerged).  A digest of all kernel sources, stored next to
    the cache, detects that; checking it costs well under a millisecond per import.
    """
    try:
        digest = hashlib.sha1(b"".join(p.read_bytes() for p in kernel_sources())).hexdigest()
        dirs = [_CPU / "__pycache__"]
        if os.environ.get("NUMBA_CACHE_DIR"):
            dirs.append(Path(os.environ["NUMBA_CACHE_DIR"]))
        for d in dirs:
            stamp = d / "fastce-kernel-sources.sha1"
            if stamp.is_file() and stamp.read_text() == digest:
                continue
            if d.is_dir():
                for f in list(d.rglob("*.nbi")) + list(d.rglob("*.nbc")):
                    if d == _CPU / "__pycache__" or "fastce" in str(f):
                        f.unlink(missing_ok=True)
            d.mkdir(parents=True, exist_ok=True)
            stamp.write_text(digest)
    except OSError:
        # A read-only install: numba then caches elsewhere or not at all; nothing to guard.
        pass


_KERNELS = None


def _import_kernels():
    """The CPU kernel modules, as a namespace (``bce``, ``checks``, ``cross_entropy``, ``nll``,
    ``partials``, ``softmax``, ``stats``, ``tiles``, ``tiny``); imported on the first call,
    after the stale-cache purge.

    Their ``cache=True`` dispatchers make numba raise RuntimeError ("cannot cache function
    ...: no locator available") at import when it finds no writable cache location: the
    package's ``__pycache__`` read-only AND no usable ``NUMBA_CACHE_DIR`` / user cache dir.
    Then the kernels cache into a private temporary directory (removed at exit) instead: the
    import works, only the compile-once-per-machine saving is lost.
    """
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    _drop_stale_kernel_cache()
    try:
        from ._cpu import (bce, checks, cross_entropy, nll, partials, softmax, stats,
                           tiles, tiny)
    except RuntimeError as exc:
        if "cannot cache function" not in str(exc):
            raise
        import atexit
        import shutil
        import tempfile
        cache_dir = tempfile.mkdtemp(prefix="fastce-numba-cache-")
        atexit.register(shutil.rmtree, cache_dir, True)
        numba.config.CACHE_DIR = cache_dir
        from ._cpu import (bce, checks, cross_entropy, nll, partials, softmax, stats,
                           tiles, tiny)
    _KERNELS = types.SimpleNamespace(bce=bce, checks=checks, cross_entropy=cross_entropy,
                                     nll=nll, partials=partials, softmax=softmax, stats=stats,
                                     tiles=tiles, tiny=tiny)
    from ._cachelock import guard
    from ._quickload import install
    for kernel in _cached_kernels(vars(_KERNELS).values()):
        guard(kernel)    # several processes may fill the cache at once (xdist, precompile)
        install(kernel)  # a cached signature's first call skips numba's target start-up
    return _KERNELS


def _cached_kernels(modules):
    """Every ``cache=True`` CPU dispatcher that ``modules`` hold, once each (some are bound
    in a module other than the one defining their Python function)."""
    from numba.core.dispatcher import Dispatcher
    seen = set()
    for mod in modules:
        for obj in vars(mod).values():
            if (isinstance(obj, Dispatcher) and hasattr(obj._cache, "_load_overload")
                    and id(obj) not in seen):
                seen.add(id(obj))
                yield obj


def _cuda():
    """``fastce.cuda``: imported when the first device array arrives (importing it loads
    nothing of numba.cuda; its functions check for numba-cuda and a GPU)."""
    from . import cuda
    return cuda


# ---------------------------------------------------------------------------------------------
# threading layer
#
# The parallel kernels run on numba's threading layer, launched by the first parallel call in
# the process.  numba's default choice here is "omp" (tbb when installed), but where neither
# loads it falls back to "workqueue", which ABORTS the process when two Python threads run
# parallel kernels at once.  So, unless the user chose a layer (NUMBA_THREADING_LAYER or
# numba.config.THREADING_LAYER), the first parallel call asks for "threadsafe" (tbb, else
# omp).  If the layer in use is "workqueue" anyway (the user's choice, nothing else loads, or
# another library launched it first), parallel kernels run only from the main thread and calls
# from other threads take the serial kernels: correct results, no abort.  GNU OpenMP is not
# fork-safe (a forked child of a process that has used it is killed on its first parallel
# region), so after os.fork() in such a process the child runs the serial kernels.
#
# Why tbb first: with the other core busy, omp makes the calling thread wait at the region's
# barrier for a worker the OS has descheduled (single calls 20-60x slower than one thread);
# tbb's calling thread takes the work nobody has picked up (docs/performance.md, "A busy
# neighbour core").  pip's ``tbb`` wheel puts libtbb.so.12 in the environment's lib/, which
# numba's tbbpool (no RPATH) does not search: :func:`_make_tbb_loadable` loads it first.

_TBB_SONAME = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib", "win32": "tbb12.dll"}


def _tbb_candidates(name):
    """Paths where pip or conda put libtbb, most likely first: the environment's lib/
    (Library/bin on Windows), the user base's, then whatever the installed ``tbb``
    distribution lists (read only if the others are missing)."""
    import sys
    sub = ("Library", "bin") if sys.platform == "win32" else ("lib",)
    bases = [sys.prefix, getattr(sys, "base_prefix", sys.prefix)]
    try:
        import site
        bases.append(site.getuserbase())
    except Exception:  # site may be stripped in embedded interpreters
        pass
    for b in bases:
        yield os.path.join(b, *sub, name)
    try:
        from importlib import metadata
        files = metadata.files("tbb") or ()
    except Exception:  # no tbb distribution, or unreadable metadata
        files = ()
    for f in files:
        if f.name == name:
            yield str(f.locate())


def _make_tbb_loadable():
    """Load libtbb into the process (by soname, else from the places pip/conda install it)
    so that numba's tbbpool, which asks for it by soname, finds it.  Returns whether it is
    loaded.  Never raises."""
    import ctypes
    import sys
    name = _TBB_SONAME.get(sys.platform, "libtbb.so.12")
    mode = getattr(ctypes, "RTLD_GLOBAL", 0)
    try:
        ctypes.CDLL(name, mode=mode)
        return True
    except OSError:
        pass
    for path in _tbb_candidates(name):
        if os.path.isfile(path):
            try:
                ctypes.CDLL(path, mode=mode)
                return True
            except OSError:
                continue
    return False


def _preload_tbb_at_import():
    """At fastce's import, unless numba's layer already runs: then whatever launches it
    first (fastce, or the user's own parallel code) finds tbb."""
    from numba.np.ufunc import parallel as _npar
    if _config.PREFER_TBB and not _npar._is_initialized:
        _make_tbb_loadable()


_preload_tbb_at_import()

_PAR_UNSET, _PAR_ANY, _PAR_MAIN_ONLY, _PAR_NEVER = range(4)
_par_mode = _PAR_UNSET
_par_lock = threading.Lock()


def _setup_threading_layer():
    """Launch numba's threading layer (pinned to a thread-safe one unless the user chose) and
    set how parallel kernels may be called from here on.  Runs once per process."""
    global _par_mode, _thread_count
    with _par_lock:
        if _par_mode != _PAR_UNSET:
            return
        from numba.np.ufunc import parallel as _npar
        chosen = (os.environ.get("NUMBA_THREADING_LAYER")
                  or str(numba.config.THREADING_LAYER).lower() != "default")
        if not _npar._is_initialized and not chosen:
            numba.config.THREADING_LAYER = "threadsafe"
            try:
                numba.get_num_threads()            # launches the layer
            except ValueError:                     # neither tbb nor omp loads here
                numba.config.THREADING_LAYER = "default"
        numba.get_num_threads()
        layer = numba.threading_layer()
        _thread_count = getattr(_npar, "_get_num_threads", None) or numba.get_num_threads
        _par_mode = _PAR_MAIN_ONLY if layer == "workqueue" else _PAR_ANY


def _after_fork_in_child():
    global _par_mode, _par_lock
    _par_lock = threading.Lock()
    try:
        layer = numba.threading_layer()
    except ValueError:                             # the parent never launched a layer
        return
    if layer == "omp":
        _par_mode = _PAR_NEVER


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def threading_layer():
    """The numba threading layer fastce's parallel kernels run on (launching it if needed)."""
    if _par_mode == _PAR_UNSET:
        _setup_threading_layer()
    return numba.threading_layer()


# ---------------------------------------------------------------------------------------------
# serial or parallel


def _thread_count():
    """This thread's numba thread count (``numba.set_num_threads`` is per thread); the raw
    ctypes getter once the layer is up: about 0.3 us against 2.7 us for the public one."""
    return numba.get_num_threads()


def _parallel(n_elements, min_elements=None):
    """Whether a call over ``n_elements`` values runs the parallel kernel: large enough (at
    least ``min_elements``, by default ``PARALLEL_MIN_ELEMENTS``), a layer that may run it
    from this thread, and more than one thread set for this thread
    (``numba.set_num_threads(1)`` takes the serial kernels: no thread-pool round trip)."""
    if n_elements < (_config.PARALLEL_MIN_ELEMENTS if min_elements is None else min_elements):
        return False
    mode = _par_mode
    if mode == _PAR_UNSET:
        _setup_threading_layer()
        mode = _par_mode
    if mode == _PAR_ANY or (mode == _PAR_MAIN_ONLY
                            and threading.current_thread() is threading.main_thread()):
        return _thread_count() > 1
    return False


_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)


def _small_call(a):
    """Whether ``a`` qualifies for an op's small path (one jitted entry, none of the general
    path's Python glue): an ndarray (no subclass) of native float32/float64, C-contiguous,
    with 0 < size < ``PARALLEL_MIN_ELEMENTS`` (the serial kernels).  Cheap on purpose:
    dtypes are compared by identity (NumPy's builtin descriptors are singletons; a false
    "no" only means the general path)."""
    if type(a) is not np.ndarray:
        return False
    dt = a.dtype
    return ((dt is _F32 or dt is _F64) and 0 < a.size < _config.PARALLEL_MIN_ELEMENTS
            and a.flags.c_contiguous)


def _row_tiles(N, C, dtype):
    """Whether C-contiguous (N, C) rows of ``dtype`` (float32/float64) run as row tiles
    (``_cpu.tiles``): many rows of a few tens to a few hundred classes (a partial tile only
    while its empty lanes cost little: ``ROW_TILE_PARTIAL_MAX_WASTE``)."""
    return (N >= _config.ROW_TILE_MIN_ROWS and C >= _config.ROW_TILE_MIN_CLASSES
            and C <= _config.ROW_TILE_MAX_CLASSES[dtype.itemsize == 8]
            and (N >= _config.TILE_ROWS
                 or (_config.TILE_ROWS - N) * C <= _config.ROW_TILE_PARTIAL_MAX_WASTE))


def _row_chunks(N, C):
    """How many chunks to cut each row into so that few, long rows still use every thread."""
    if C < 2 * _config.SPLIT_MIN_CHUNK:
        return 1
    threads = numba.get_num_threads()
    if threads < 2 or N >= threads * _config.SPLIT_ROWS_PER_THREAD:
        return 1
    want = -(-threads * _config.SPLIT_ROWS_PER_THREAD // max(N, 1))
    return max(1, min(want, C // _config.SPLIT_MIN_CHUNK))


def _split_stats(x2, n_chunks, exact_max=False):
    """Row statistics precomputed for the split-row kernels (``stats.split_row_stats``):
    each row's (max, sum-exp), merged from its ``n_chunks`` chunks (the shift at the row's
    exact max with ``exact_max``); unused (empty) when rows are not split."""
    if n_chunks == 1:
        empty = EMPTY[x2.dtype]
        return empty, empty
    m = np.empty(x2.shape[0], x2.dtype)
    s = np.empty(x2.shape[0], x2.dtype)
    _import_kernels().stats.split_row_stats(x2, n_chunks, m, s, exact_max)
    return m, s
