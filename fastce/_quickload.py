"""Loading a kernel's cached machine code without numba's compiler start-up.

A numba dispatcher's first call in a process, even with the kernel in the on-disk cache, runs
the CPU target's ``refresh``: it imports and registers every typing and lowering registry
numba has (``numba.np.arraymath``, ``numba.np.linalg`` -- which imports SciPy when it is
installed --, typed containers, random, ...).  That is most of a filled cache's first call
(docs/performance.md, "First call"), and only compiling needs it: loading cached machine code
needs the target context (its code generator and the C helpers), the runtime's symbols
(``rtsys.initialize``) and the cache file.  :func:`load_cached` does exactly those steps,
the ones ``Dispatcher.compile`` takes on a cache hit, minus the refresh; the next compile or
ordinary cache load in the process runs the refresh as usual.

It uses numba internals (``Dispatcher._cache``, ``_load_overload``): any failure, a cache
miss included, leaves the dispatcher as it was and the call goes through numba's normal path.
"""
from numba.core.compiler_lock import global_compiler_lock

_tried = set()


def load_cached(dispatcher, args, key):
    """Make ``dispatcher`` ready for ``args`` from numba's on-disk cache without the target's
    registry refresh, once per ``key`` (a hashable naming the specialization, e.g. the
    dispatcher and the logits' dtype) in the process.  True if it loaded the kernel."""
    if key in _tried:
        return False
    _tried.add(key)
    try:
        from numba.core.runtime.nrt import rtsys
        with global_compiler_lock:
            sig = tuple(dispatcher.typeof_pyval(a) for a in args)
            if sig in dispatcher.overloads:
                return False
            ctx = dispatcher.targetctx
            rtsys.initialize(ctx)
            cres = dispatcher._cache._load_overload(sig, ctx)
            if cres is None or cres.objectmode:
                return False
            ctx.insert_user_function(cres.entry_point, cres.fndesc, [cres.library])
            dispatcher.add_overload(cres)
            dispatcher._cache_hits[sig] += 1
            return True
    except Exception:   # a numba without these internals, an unreadable cache: the normal path
        return False
