"""Per-row (max, sum-exp) statistics, the partials every kernel is built from.

``split_row_stats`` is for few rows with a huge class count: each row is cut into chunks that
run on different threads, and the chunks' partials are merged with the ``-inf``-safe rule.
``spatial_max_sumexp`` is for the K-dim layout (N, C, S), vectorized across S.
"""
import numpy as np
from numba import njit, prange

from .._config import FASTMATH, SPATIAL_BLOCK
from .partials import STAT_FIELDS, merge_partials
from .primitives import (exp_term, nan_max, row_exact_max_sumexp, row_max_sumexp, safe_shift,
                         softcap, wide_vectors)


@njit(fastmath=FASTMATH, error_model="numpy", parallel=True, cache=True, nogil=True)
def split_row_stats(x, n_chunks, out_m, out_s, exact_max):
    """(max, sum-exp) of each row of the C-contiguous (N, C) ``x``, each row cut into
    ``n_chunks`` chunks that are reduced in parallel and then merged (the partials mechanism
    of ``partials``, as Dask class chunks use it).  With ``exact_max`` the merged shift is
    each row's exact max (``primitives.row_exact_max_sumexp``), which log_softmax wants."""
    wide_vectors()
    N, C = x.shape
    chunk = (C + n_chunks - 1) // n_chunks
    parts = np.empty((N, n_chunks, STAT_FIELDS), dtype=x.dtype)
    for u in prange(N * n_chunks):
        i = u // n_chunks
        k = u - i * n_chunks
        lo = k * chunk
        part = x[i, lo:min(lo + chunk, C)]
        if exact_max:
            parts[i, k, 0], parts[i, k, 1] = row_exact_max_sumexp(part)
        else:
            parts[i, k, 0], parts[i, k, 1] = row_max_sumexp(part)
    merged = np.empty((N, STAT_FIELDS), dtype=x.dtype)
    merge_partials(parts, merged)
    for i in range(N):
        out_m[i] = merged[i, 0]
        out_s[i] = merged[i, 1]


@njit(fastmath=FASTMATH, error_model="numpy")
def spatial_max_sumexp(x, n, s0, s1, m, s, shift, cap=None):
    """(max, sum-exp) over the class axis of sample ``n`` of the (N, C, S) ``x``, for the
    positions ``s0:s1`` all at once: the inner loops run along the contiguous S axis.  Writes
    ``m[j]``, ``s[j]`` and the safe shift ``shift[j]`` for position ``s0 + j``.  Two passes
    over the (C, s1 - s0) slab, which is sized to stay in L1/L2.

    Every slab row is taken as ``x[n, c, s0:s1]``: numba types that 1-D view C-contiguous,
    so the loops vectorize (a 2-D slab view's rows are typed strided and run several times
    slower: docs/performance.md).  With ``cap`` (``primitives.softcap``), of the capped logits.
    """
    wide_vectors()
    C = x.shape[1]
    B = s1 - s0
    for j in range(B):
        m[j] = -np.inf
        s[j] = 0
    for c in range(C):
        xc = x[n, c, s0:s1]
        for j in range(B):
            m[j] = nan_max(m[j], softcap(xc[j], cap))
    for j in range(B):
        shift[j] = safe_shift(m[j])
    for c in range(C):
        xc = x[n, c, s0:s1]
        for j in range(B):
            s[j] += exp_term(softcap(xc[j], cap) - shift[j])


@njit(fastmath=FASTMATH, error_model="numpy")
def spatial_blocks(x):
    """How many work units the (N, C, S) ``x`` splits into: N times the S-blocks."""
    return x.shape[0] * ((x.shape[2] + SPATIAL_BLOCK - 1) // SPATIAL_BLOCK)


@njit(fastmath=FASTMATH, error_model="numpy")
def spatial_block_stats(x, u, cap=None):
    """Work unit ``u`` of the (N, C, S) layout: sample ``n``, positions ``s0:s1``, and their
    statistics ``(m, s, shift)`` from :func:`spatial_max_sumexp` in fresh arrays."""
    S = x.shape[2]
    per_sample = (S + SPATIAL_BLOCK - 1) // SPATIAL_BLOCK
    n = u // per_sample
    s0 = (u - n * per_sample) * SPATIAL_BLOCK
    s1 = min(s0 + SPATIAL_BLOCK, S)
    m = np.empty(s1 - s0, dtype=x.dtype)
    s = np.empty(s1 - s0, dtype=x.dtype)
    shift = np.empty(s1 - s0, dtype=x.dtype)
    spatial_max_sumexp(x, n, s0, s1, m, s, shift, cap)
    return n, s0, s1, m, s, shift
