"""numba's on-disk cache of fastce's kernels, safe when several processes fill it at once.

numba files a compiled signature by reading the function's index (``*.nbi``), adding an
entry that names a data file (``*.N.nbc``), writing the index back, then writing the data
file, with no lock.  Two processes that compile two signatures of one kernel at the same
time -- pytest-xdist workers, ``fastce precompile``'s worker processes, dask workers -- can
interleave those steps so that the index files signature A under a data file the other
process fills with signature B's machine code (numba#4807, #10128).  numba does not check
what it loads: every later process then runs B's code on A's arguments (float32 data read as
float64, say) until the cache is purged.

:func:`guard` makes a cached fastce kernel hold an exclusive lock (``fcntl.flock`` on a
``.lock`` file next to its index) while it saves or loads, so the index update and the data
write are one step for every other process, and makes a load that finds another signature's
code in the data file a miss (the kernel is compiled and the entry rewritten).  Without
``fcntl`` (Windows) only the check applies.
"""
import contextlib

from numba.core.caching import IndexDataCacheFile

try:
    import fcntl
except ImportError:  # pragma: no cover -- Windows
    fcntl = None


class LockedIndexDataCacheFile(IndexDataCacheFile):
    """numba's index + data cache files, saved and loaded under an inter-process lock."""

    @contextlib.contextmanager
    def _locked(self):
        lock = None
        if fcntl is not None:
            try:
                lock = open(self._index_path + ".lock", "ab")
                fcntl.flock(lock, fcntl.LOCK_EX)
            except OSError:          # a read-only cache location: numba copes without
                if lock is not None:
                    lock.close()
                lock = None
        try:
            yield
        finally:
            if lock is not None:
                lock.close()         # closing the file releases the lock

    def save(self, key, data):
        with self._locked():
            super().save(key, data)

    def load(self, key):
        with self._locked():
            data = super().load(key)
        # A CompileResult's payload holds its signature (4th item): it must be the one the
        # index files it under (key[0], the argument types).
        sig = data[3] if isinstance(data, tuple) and len(data) > 3 else None
        if sig is not None and getattr(sig, "args", key[0]) != key[0]:
            return None
        return data


def guard(dispatcher):
    """Give the cached numba ``dispatcher`` the locked cache files."""
    cache_file = getattr(dispatcher._cache, "_cache_file", None)
    if type(cache_file) is IndexDataCacheFile:
        cache_file.__class__ = LockedIndexDataCacheFile
