"""CPU kernels for logsumexp, log_softmax and softmax.

Inputs arrive in the canonical layout of ``fastce._softmax``: C-contiguous (N, C) rows when the
reduced axis is the last one, or a C-contiguous (N, C, S) block when it is not (the class axis
is then strided and the kernels vectorize across S instead).  Each kernel reads a row's logits
once from memory for its statistics and, for the elementwise outputs, writes them while the
row is still in cache.
"""
import numpy as np
from numba import njit, prange

from .._config import CLASS_BLOCK, FASTMATH
from .._modes import MODE_LOG_SOFTMAX, MODE_LOGSUMEXP, MODE_SOFTMAX
from .primitives import (confident, exp_term, inv_sum, kernel_twins, log1p, lse_confident,
                         lse_minus, lse_needs_rest, nan_max, rest_sum, row_argmax,
                         row_exact_max_sumexp, row_max, row_max_sumexp, row_rest, safe_shift,
                         shift_log_sum, spatial_rest_sum, wide_vectors)
from .stats import spatial_block_stats, spatial_blocks


def _softmax_rows(x, out, mode, n_chunks, stat_m, stat_s):
    """Rows layout.  ``out`` is (N, 1) for logsumexp, (N, C) otherwise.  With ``n_chunks > 1``
    the row statistics come precomputed in ``stat_m``/``stat_s`` (see ``split_row_stats``) and
    each row's output is written by ``n_chunks`` parallel units."""
    wide_vectors()
    N, C = x.shape
    chunk = (C + n_chunks - 1) // n_chunks
    for u in prange(N * n_chunks):
        i = u // n_chunks
        lo = (u - i * n_chunks) * chunk
        hi = min(lo + chunk, C)
        if mode == MODE_SOFTMAX and n_chunks == 1 and C <= CLASS_BLOCK:
            softmax_one_block(x[i], out[i])
            continue
        if n_chunks == 1 and mode == MODE_LOG_SOFTMAX:
            log_softmax_row(x[i], out[i])
            continue
        if n_chunks == 1:
            m, s = row_max_sumexp(x[i])
        else:
            m, s = stat_m[i], stat_s[i]
        if mode == MODE_LOGSUMEXP:
            a, L = shift_log_sum(m, s)
            lse = a + L
            if lse_needs_rest(lse, L):
                lse = x.dtype.type(lse_confident(x[i]))
            out[i, 0] = lse
            continue
        row = x[i, lo:hi]
        orow = out[i, lo:hi]
        if mode == MODE_LOG_SOFTMAX:
            a, L = shift_log_sum(m, s)
            top = x.dtype.type(-np.inf)
            for c in range(row.shape[0]):
                orow[c] = -lse_minus(a, L, row[c])
                top = nan_max(top, row[c])
            # A chunk of a split row (the shift is the row's exact max, split_row_stats):
            # the chunk's largest entry is the one that can have cancelled; if it needs it,
            # redo the chunk from the row's max with that max's term carried apart.
            if confident(top - a, lse_minus(a, L, top)):
                log_softmax_confident_row(x[i], row, orow)
        else:
            sh = safe_shift(m)
            inv = inv_sum(m, s)
            for c in range(row.shape[0]):
                orow[c] = exp_term(row[c] - sh) * inv


@njit(fastmath=FASTMATH, error_model="numpy")
def log_softmax_row(row, out):
    """log_softmax of a whole row, full relative precision at a confident row's max entry.
    float32: every row as its max, the precise rest (:func:`row_rest`) and the output
    ``-((m - x) + log1p(rest))``, three passes; the float32 rest costs about 1.6 one-pass
    sums, less than the one-pass sum plus the rest that a confident row needs otherwise.
    float64 (whose rest costs about 1.9 sums): the max and the one-pass sum with the shift at
    the exact max, and the rest only for a confident row; either way the row's confidence
    is known before any output is written, and the output is written once
    (docs/performance.md "Session 6")."""
    wide_vectors()
    if row.itemsize == 4:
        m = row_max(row)
        L = np.float64(0)
        if m > -np.inf and m < np.inf:
            L = log1p(row_rest(row, m))
    else:
        m, s = row_exact_max_sumexp(row)
        m, L = shift_log_sum(m, s)
        if confident(_zero_if_finite(m), L):
            L = log1p(row_rest(row, m))
    Lc = row.dtype.type(L)
    for c in range(row.shape[0]):
        out[c] = -lse_minus(m, Lc, row[c])


@njit(fastmath=FASTMATH, error_model="numpy")
def softmax_one_block(row, out):
    """softmax of a row of at most ``CLASS_BLOCK`` classes: its max, then its terms written to
    ``out`` as they are summed, then scaled -- one exp an element where the statistics pass
    followed by a write pass takes two.  The special rows as ``inv_sum`` gives them: a row
    whose max is not finite (NaN, +inf, all -inf) is all NaN."""
    wide_vectors()
    n = row.shape[0]
    m = row.dtype.type(-np.inf)
    for c in range(n):
        m = nan_max(m, row[c])
    if not (m > -np.inf and m < np.inf):
        for c in range(n):
            out[c] = np.nan
        return
    acc = row.dtype.type(0)
    for c in range(n):
        e = exp_term(row[c] - m)
        out[c] = e
        acc += e
    inv = row.dtype.type(1) / acc
    for c in range(n):
        out[c] = out[c] * inv


@njit(fastmath=FASTMATH, error_model="numpy")
def log_softmax_confident_row(row, part, out):
    """log_softmax of ``part`` (a chunk of ``row``, or the row) from the row's max with its
    term carried apart, in float64: full relative precision at the max entry."""
    M, k = row_argmax(row)
    lp = log1p(rest_sum(row, k, M))
    for c in range(part.shape[0]):
        out[c] = -lse_minus(np.float64(M), lp, np.float64(part[c]))



def _softmax_spatial(x, out, mode):
    """(N, C, S) layout; ``out`` is (N, 1, S) for logsumexp, (N, C, S) otherwise."""
    wide_vectors()
    N, C, S = x.shape
    for u in prange(spatial_blocks(x)):
        n, s0, s1, m, s, sh = spatial_block_stats(x, u)
        B = s1 - s0
        if mode == MODE_LOGSUMEXP:
            o0 = out[n, 0, s0:s1]
            for j in range(B):
                a, L = shift_log_sum(m[j], s[j])
                lse = a + L
                if lse_needs_rest(lse, L):
                    # rare (a result near 0): one position at a time, down the class axis
                    lse = x.dtype.type(lse_confident(x[n, :, s0 + j]))
                o0[j] = lse
        elif mode == MODE_LOG_SOFTMAX:
            n_conf = 0
            for j in range(B):
                m[j], s[j] = shift_log_sum(m[j], s[j])
                # The shift is the position's max: confident when log(sum) is small.
                n_conf += confident(_zero_if_finite(m[j]), s[j])
            for c in range(C):
                xc = x[n, c, s0:s1]
                oc = out[n, c, s0:s1]
                for j in range(B):
                    oc[j] = -lse_minus(m[j], s[j], xc[j])
            if n_conf > 0:
                spatial_log_softmax_confident(x, out, n, s0, s1, m, s)
        else:
            for j in range(B):
                s[j] = inv_sum(m[j], s[j])
            for c in range(C):
                xc = x[n, c, s0:s1]
                oc = out[n, c, s0:s1]
                for j in range(B):
                    oc[j] = exp_term(xc[j] - sh[j]) * s[j]


@njit(fastmath=FASTMATH, error_model="numpy")
def _zero_if_finite(v):
    """0 for a finite ``v``, NaN otherwise (a gap that makes :func:`confident` false)."""
    return np.float32(0) if (v > -np.inf and v < np.inf) else np.float32(np.nan)


@njit(fastmath=FASTMATH, error_model="numpy")
def spatial_log_softmax_confident(x, out, n, s0, s1, m, L):
    """Redo the confident positions of a K-dim log_softmax block (``m`` their max, ``L`` the
    log of their sum) from the max with its term carried apart."""
    wide_vectors()
    B = s1 - s0
    pivot = np.zeros(B, dtype=np.float64)
    skip = np.full(B, -1, dtype=np.int64)
    lp = np.empty(B, dtype=np.float64)
    for j in range(B):
        if confident(_zero_if_finite(m[j]), L[j]):
            pivot[j] = m[j]
            for c in range(x.shape[1]):
                if x[n, c, s0 + j] == m[j]:
                    skip[j] = c
                    break
    spatial_rest_sum(x, n, s0, s1, pivot, skip, lp)
    for j in range(B):
        lp[j] = log1p(lp[j])
    for c in range(x.shape[1]):
        xc = x[n, c, s0:s1]
        oc = out[n, c, s0:s1]
        for j in range(B):
            if skip[j] >= 0:
                oc[j] = -lse_minus(pivot[j], lp[j], np.float64(xc[j]))


softmax_rows, softmax_rows_serial = kernel_twins(_softmax_rows)
softmax_spatial, softmax_spatial_serial = kernel_twins(_softmax_spatial)


# The small-call entry of the softmax family: the C-contiguous 2-D ``x`` reduced along its
# rows by the serial rows kernel's body into ``out`` (allocated by the caller: NumPy's
# allocation and a third argument cost less than an array allocated here and boxed on return,
# docs/performance.md "Session 4") -- one dispatch with three arguments instead of the Python
# glue around a six-argument kernel call.  The body is inlined (as in
# ``cross_entropy.ce_index_small``): calling the serial kernel's dispatcher would compile it
# twice on a first call, once alone and once inside the entry.  Many short rows take the
# serial row tiles kernel itself (``tiles.softmax_tiles_serial``: the same three arguments).
_softmax_rows_inlined = njit(inline="always", fastmath=FASTMATH, error_model="numpy")(
    _softmax_rows)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
def softmax_small_rows(x, out, mode):
    """Small-call entry: the rows kernel's body; ``out`` is (N, 1) for logsumexp, (N, C)
    otherwise."""
    empty = np.empty(0, dtype=x.dtype)
    _softmax_rows_inlined(x, out, mode, 1, empty, empty)
