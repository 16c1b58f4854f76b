"""Loading a kernel's cached machine code without numba's compiler start-up.

A numba dispatcher's first call of a signature, even with the kernel in the on-disk cache,
runs the CPU target's ``refresh`` (in ``Dispatcher.compile`` -> ``Cache.load_overload``): it
imports and registers every typing and lowering registry numba has (``numba.np.arraymath``,
``numba.np.linalg`` -- which imports SciPy's linalg when SciPy is installed --, typed
containers, random, ...).  Once per process that is most of a filled cache's first call
(docs/performance.md, "First call"), and only compiling needs it: loading cached machine code
needs the target context (its code generator and C helpers), the runtime's symbols
(``rtsys.initialize``) and the cache file.  :func:`install` makes a dispatcher take exactly
the steps ``Dispatcher.compile`` takes on a cache hit, minus the refresh; on a cache miss the
call goes on to numba's own path, which refreshes and compiles as usual.

The hook sits where the C dispatcher goes when no compiled specialization matches the
arguments (its ``_compile_for_args``): calls that find one never reach it, so the steady state
is untouched.  It uses numba internals (``Dispatcher._cache``, ``_load_overload``): any
failure leaves the dispatcher as it was and falls back to numba's path.
"""
from numba.core.compiler_lock import global_compiler_lock


def _load_cached(dispatcher, args):
    """The entry point of ``dispatcher``'s specialization for ``args`` loaded from numba's
    on-disk cache without the target refresh, or None (a miss or any failure)."""
    try:
        from numba.core.runtime.nrt import rtsys
        with global_compiler_lock:
            sig = tuple(dispatcher.typeof_pyval(a) for a in args)
            existing = dispatcher.overloads.get(sig)
            if existing is not None:
                return existing.entry_point
            ctx = dispatcher.targetctx
            rtsys.initialize(ctx)
            cres = dispatcher._cache._load_overload(sig, ctx)
            if cres is None or cres.objectmode:
                return None
            ctx.insert_user_function(cres.entry_point, cres.fndesc, [cres.library])
            dispatcher.add_overload(cres)
            dispatcher._cache_hits[sig] += 1
            return cres.entry_point
    except Exception:   # a numba without these internals, an unreadable cache: numba's path
        return None


def install(dispatcher):
    """Make ``dispatcher`` (a ``cache=True`` CPU dispatcher) load a cached specialization
    without the target refresh on its first call of a signature."""
    normal = dispatcher._compile_for_args

    def compile_for_args(*args, **kws):
        entry = None if kws else _load_cached(dispatcher, args)
        return entry if entry is not None else normal(*args, **kws)

    dispatcher._compile_for_args = compile_for_args
