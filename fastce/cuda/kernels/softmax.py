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

__all__ = ["build_softmax", "MODE_LOGSUMEXP", "MODE_LOG_SOFTMAX", "MODE_SOFTMAX"]

MODE_LOGSUMEXP = 0
MODE_LOG_SOFTMAX = 1
MODE_SOFTMAX = 2


def build_softmax(P):
    """Kernels for the primitives ``P`` of one compute dtype.

    Returns
    -------
    types.SimpleNamespace
        ``stats_kernel(x, G, n_split, part_m, part_s)``: per-chunk (max, sum-exp) partials,
        ``part_*[r * n_split + k]``.  ``softmax_kernel(x, out, mode, G, n_split, part_m,
        part_s)``: ``out`` is (N, 1, S) for logsumexp, (N, C, S) otherwise.
    """
    unit, row_stats, merge = P.unit, P.row_stats, P.merge
    lse, log_sum, safe_shift, exp, inv_sum = P.lse, P.log_sum, P.safe_shift, P.exp, P.inv_sum
    NEG_INF, ZERO = P.NEG_INF, P.ZERO

    @cuda.jit(device=True)
    def unit_stats(x, G, n_split, part_m, part_s, valid, lane, r, n, s, lo, hi):
        """(max, sum-exp) of the unit's whole row: read here, or merged from partials."""
        if n_split == 1:
            return row_stats(x, n, s, lo, hi, lane, G)
        m = NEG_INF
        acc = ZERO
        if valid:
            for k in range(n_split):
                m, acc = merge(m, acc, part_m[r * n_split + k], part_s[r * n_split + k])
        return m, acc

    @cuda.jit
    def stats_kernel(x, G, n_split, part_m, part_s):
        N, C, S = x.shape
        valid, lane, r, k, n, s, lo, hi = unit(N * S * n_split, G, n_split, S, C)
        m, acc = row_stats(x, n, s, lo, hi, lane, G)
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
                out[n, 0, s] = lse(m, acc)
        elif mode == MODE_LOG_SOFTMAX:
            L = log_sum(m, acc)
            c = lo + lane
            while c < hi:
                out[n, c, s] = -((m - x[n, c, s]) + L)  # not x - (m + L): see log_sum
                c += G
        else:
            sh = safe_shift(m)
            inv = inv_sum(m, acc)
            c = lo + lane
            while c < hi:
                out[n, c, s] = exp(x[n, c, s] - sh) * inv
                c += G

    return SimpleNamespace(stats_kernel=stats_kernel, softmax_kernel=softmax_kernel,
                           unit_stats=unit_stats)
