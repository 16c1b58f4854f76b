"""CUDA kernels for logsumexp, log_softmax and softmax over the class axis of an (N, C, S)
view.

A row is ``x[n, :, s]``.  Each work unit (a row, or a chunk of a row when few rows have a
huge C) is handled by a group of ``G`` threads (see ``fastce.cuda.kernels.primitives``): the group
reads the row once for its (max, sum-exp) and, for the elementwise outputs, a second time to
write them.  With ``n_split > 1`` the statistics come from :func:`stats_kernel` partials,
merged per unit, and each chunk writes its own part of the output.
"""
from types import SimpleNamespace

from numba import cuda

from ..._modes import MODE_LOG_SOFTMAX, MODE_LOGSUMEXP
from .memory import load3, store3

__all__ = ["build_softmax"]


def build_softmax(P):
    """Kernels for the primitives ``P`` of one compute dtype.

    Returns
    -------
    types.SimpleNamespace
        ``stats_kernel(x, G, n_split, part_m, part_s)``: per-chunk (max, sum-exp) partials,
        ``part_*[r * n_split + k]``.  ``softmax_kernel(x, out, mode, G, n_split, part_m,
        part_s)``: ``out`` is (N, 1, S) for logsumexp, (N, C, S) otherwise; ``mode`` is one of
        ``fastce._modes``.
    """
    unit, row_max_sumexp, merge_max_sumexp = P.unit, P.row_max_sumexp, P.merge_max_sumexp
    lse_from_max_sumexp, shift_log_sum, lse_minus = (P.lse_from_max_sumexp, P.shift_log_sum,
                                                      P.lse_minus)
    safe_shift, exp, inv_sum = P.safe_shift, P.exp, P.inv_sum
    NEG_INF, ZERO = P.NEG_INF, P.ZERO

    @cuda.jit(device=True)
    def unit_stats(x, G, n_split, part_m, part_s, valid, lane, r, n, s, lo, hi):
        """(max, sum-exp) of the unit's whole row: read here, or merged from partials."""
        if n_split == 1:
            return row_max_sumexp(x, n, s, lo, hi, lane, G)
        m = NEG_INF
        acc = ZERO
        if valid:
            for k in range(n_split):
                m, acc = merge_max_sumexp(m, acc, part_m[r * n_split + k],
                                          part_s[r * n_split + k])
        return m, acc

    @cuda.jit(device=True)
    def elementwise(v, log_softmax, a, b):
        """One output element: ``log_softmax(x) = -(lse - x)`` with ``(a, b) = (shift, L)``,
        else ``softmax(x) = exp(x - a) * b`` with ``(a, b) = (safe shift, 1 / sum)``."""
        if log_softmax:
            return -lse_minus(a, b, v)
        return exp(v - a) * b

    @cuda.jit(device=True)
    def write_row(x, out, n, s, lo, hi, lane, G, log_softmax, a, b):
        """``out[n, c, s] = elementwise(x[n, c, s])`` over the thread's share of [lo, hi),
        four independent loads per step."""
        c = lo + lane
        end = hi - 3 * G
        while c < end:
            v0 = load3(x, n, c, s)
            v1 = load3(x, n, c + G, s)
            v2 = load3(x, n, c + 2 * G, s)
            v3 = load3(x, n, c + 3 * G, s)
            store3(out, n, c, s, elementwise(v0, log_softmax, a, b))
            store3(out, n, c + G, s, elementwise(v1, log_softmax, a, b))
            store3(out, n, c + 2 * G, s, elementwise(v2, log_softmax, a, b))
            store3(out, n, c + 3 * G, s, elementwise(v3, log_softmax, a, b))
            c += 4 * G
        for j in range(3):  # the last 0-3 elements of this thread (unrolled: not a loop)
            if c + j * G < hi:
                store3(out, n, c + j * G, s,
                       elementwise(load3(x, n, c + j * G, s), log_softmax, a, b))

    @cuda.jit
    def stats_kernel(x, G, n_split, part_m, part_s):
        N, C, S = x.shape
        valid, lane, r, k, n, s, lo, hi = unit(N * S * n_split, G, n_split, S, C)
        m, acc = row_max_sumexp(x, n, s, lo, hi, lane, G)
        if valid and lane == 0:
            part_m[r * n_split + k] = m
            part_s[r * n_split + k] = acc

    @cuda.jit
    def softmax_kernel(x, out, mode, G, n_split, part_m, part_s):
        N, C, S = x.shape
        valid, lane, r, k, n, s, lo, hi = unit(N * S * n_split, G, n_split, S, C)
        m, acc = unit_stats(x, G, n_split, part_m, part_s, valid, lane, r, n, s, lo, hi)
        if not valid:
            return  # after the last reduction: no barrier is left to wait for this thread
        if mode == MODE_LOGSUMEXP:
            if lane == 0 and k == 0:
                out[n, 0, s] = lse_from_max_sumexp(m, acc)
        elif mode == MODE_LOG_SOFTMAX:
            a, L = shift_log_sum(m, acc)
            write_row(x, out, n, s, lo, hi, lane, G, True, a, L)
        else:
            write_row(x, out, n, s, lo, hi, lane, G, False, safe_shift(m), inv_sum(m, acc))

    return SimpleNamespace(stats_kernel=stats_kernel, softmax_kernel=softmax_kernel,
                           unit_stats=unit_stats, write_row=write_row)
