"""Data checks run before a compute kernel: one pass that finds the first bad value, so that
the front end can name it (see ``fastce._validate.raise_bad_value``).

The class-index check of cross-entropy (``cross_entropy.check_index_target``) and the
probability check of binary cross-entropy (``bce.first_outside_unit_interval``) sit with their
kernels; this one serves any argument with an interval.
"""
import numpy as np
from numba import njit

from .._config import CHECK_BLOCK


@njit(cache=True, nogil=True)
def first_bad_value(a, lo, hi):
    """Index of the first element of the flat ``a`` that is NaN, infinite, or outside
    [lo, hi]; -1 if none.  Blocked so that the common all-good case runs as a branch-free
    (vectorizable) and-reduction."""
    n = a.shape[0]
    lo = a.dtype.type(lo)
    hi = a.dtype.type(hi)
    for b in range(0, n, CHECK_BLOCK):
        e = min(b + CHECK_BLOCK, n)
        ok = True
        for i in range(b, e):
            v = a[i]
            ok &= (v >= lo) & (v <= hi) & (v > -np.inf) & (v < np.inf)
        if not ok:
            for i in range(b, e):
                v = a[i]
                if not (v >= lo and v <= hi and v > -np.inf and v < np.inf):
                    return i
    return -1
