"""Numba CPU kernels.  ``primitives`` holds the shared numerics; one module per op family."""
import hashlib
import os
from pathlib import Path


def _drop_stale_kernel_cache():
    """Delete numba's on-disk cache of these kernels when any kernel source changed.

    numba keys a cached kernel on its own file only: an edit to a shared helper in
    ``primitives.py`` or a constant in ``_config.py`` would otherwise keep serving the old
    machine code (numba PR #8396 is unmerged).  A digest of all kernel sources, stored next to
    the cache, detects that; checking it costs well under a millisecond per import.
    """
    here = Path(__file__).resolve().parent
    try:
        sources = sorted(here.glob("*.py")) + [here.parent / "_config.py"]
        digest = hashlib.sha1(b"".join(p.read_bytes() for p in sources)).hexdigest()
        dirs = [here / "__pycache__"]
        if os.environ.get("NUMBA_CACHE_DIR"):
            dirs.append(Path(os.environ["NUMBA_CACHE_DIR"]))
        for d in dirs:
            stamp = d / "fastce-kernel-sources.sha1"
            if stamp.is_file() and stamp.read_text() == digest:
                continue
            if d.is_dir():
                for f in list(d.rglob("*.nbi")) + list(d.rglob("*.nbc")):
                    if d == here / "__pycache__" or "fastce" in str(f):
                        f.unlink(missing_ok=True)
            d.mkdir(parents=True, exist_ok=True)
            stamp.write_text(digest)
    except OSError:
        # A read-only install: numba then caches elsewhere or not at all; nothing to guard.
        pass


_drop_stale_kernel_cache()
