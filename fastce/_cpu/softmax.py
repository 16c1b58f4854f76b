"""CPU kernels for logsumexp, log_softmax and softmax.

Inputs arrive in the canonical layout of ``fastce._softmax``: C-contiguous (N, C) rows when the
reduced axis is the last one, or a C-contiguous (N, C, S) block when it is not (the class axis
is then strided and the kernels vectorize across S instead).  Each kernel reads a row's logits
once from memory for its statistics and, for the elementwise outputs, writes them while the
row is still in cache.
"""
from numba import prange

from .._modes import MODE_LOG_SOFTMAX, MODE_LOGSUMEXP
from .primitives import (exp_term, inv_sum, kernel_twins, lse_from_max_sumexp, lse_minus,
                         row_max_sumexp, safe_shift, shift_log_sum, wide_vectors)
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
        if n_chunks == 1:
            m, s = row_max_sumexp(x[i])
        else:
            m, s = stat_m[i], stat_s[i]
        if mode == MODE_LOGSUMEXP:
            out[i, 0] = lse_from_max_sumexp(m, s)
            continue
        row = x[i, lo:hi]
        orow = out[i, lo:hi]
        if mode == MODE_LOG_SOFTMAX:
            a, L = shift_log_sum(m, s)
            for c in range(row.shape[0]):
                orow[c] = -lse_minus(a, L, row[c])
        else:
            sh = safe_shift(m)
            inv = inv_sum(m, s)
            for c in range(row.shape[0]):
                orow[c] = exp_term(row[c] - sh) * inv


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
                o0[j] = lse_from_max_sumexp(m[j], s[j])
        elif mode == MODE_LOG_SOFTMAX:
            for j in range(B):
                m[j], s[j] = shift_log_sum(m[j], s[j])
            for c in range(C):
                xc = x[n, c, s0:s1]
                oc = out[n, c, s0:s1]
                for j in range(B):
                    oc[j] = -lse_minus(m[j], s[j], xc[j])
        else:
            for j in range(B):
                s[j] = inv_sum(m[j], s[j])
            for c in range(C):
                xc = x[n, c, s0:s1]
                oc = out[n, c, s0:s1]
                for j in range(B):
                    oc[j] = exp_term(xc[j] - sh[j]) * s[j]


softmax_rows, softmax_rows_serial = kernel_twins(_softmax_rows)
softmax_spatial, softmax_spatial_serial = kernel_twins(_softmax_spatial)
