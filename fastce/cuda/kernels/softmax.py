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
from .memory import addr1, addr3, load1_at, load_at, store_at

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
    unit, row_max_sumexp = P.unit, P.row_max_sumexp
    thread_max_sumexp, rescaled, nan_max = P.thread_max_sumexp, P.rescaled, P.nan_max
    shift_log_sum, lse_minus = P.shift_log_sum, P.lse_minus
    safe_shift, exp_shifted, inv_sum, log1p = P.safe_shift, P.exp_shifted, P.inv_sum, P.log1p
    confident, lse_needs_rest, rest_sum, block_any = (P.confident, P.lse_needs_rest,
                                                         P.rest_sum, P.block_any)
    NEG_INF, ZERO = P.NEG_INF, P.ZERO
    allreduce_max_sumexp = P.allreduce_max_sumexp

    @cuda.jit(device=True)
    def partial(part_m, part_s, pm, ps, k, n_split):
        """Partial ``k`` of a split row (at byte addresses ``pm``, ``ps``), or the empty
        partial (-inf, 0) past the last."""
        if k < n_split:
            return load1_at(part_m, pm, k), load1_at(part_s, ps, k)
        return NEG_INF, ZERO

    @cuda.jit(device=True)
    def unit_stats(x, G, n_split, part_m, part_s, valid, lane, r, n, s, lo, hi):
        """(max, sum-exp) of the unit's whole row: read here, or merged from the row's
        ``n_split`` partials (the group reads them in parallel, four per thread and step,
        then all-reduces)."""
        if n_split == 1:
            m, acc = thread_max_sumexp(x, n, s, lo, hi, lane, G)
        else:
            m = NEG_INF
            acc = ZERO
            k = lane if valid else n_split
            base = r * n_split
            pm = addr1(part_m, base + k)
            ps = addr1(part_s, base + k)
            d = G * part_m.strides[0]
            while k < n_split:
                m0 = load1_at(part_m, pm, base + k)  # k < n_split: no test
                s0 = load1_at(part_s, ps, base + k)
                m1, s1 = partial(part_m, part_s, pm + d, ps + d, base + k + G, base + n_split)
                m2, s2 = partial(part_m, part_s, pm + 2 * d, ps + 2 * d, base + k + 2 * G,
                                 base + n_split)
                m3, s3 = partial(part_m, part_s, pm + 3 * d, ps + 3 * d, base + k + 3 * G,
                                 base + n_split)
                mm = nan_max(nan_max(m, nan_max(m0, m1)), nan_max(m2, m3))
                acc = rescaled(acc, m, mm) + ((rescaled(s0, m0, mm) + rescaled(s1, m1, mm)) +
                                              (rescaled(s2, m2, mm) + rescaled(s3, m3, mm)))
                m = mm
                k += 4 * G
                pm += 4 * d
                ps += 4 * d
        return allreduce_max_sumexp(m, acc, G)

    @cuda.jit(device=True)
    def elementwise(v, log_softmax, a, b):
        """One output element: ``log_softmax(x) = -(lse - x)`` with ``(a, b) = (shift, L)``,
        else ``softmax(x) = exp(x - a) * b`` with ``(a, b) = (safe shift, 1 / sum)``."""
        if log_softmax:
            return -lse_minus(a, b, v)
        return exp_shifted(v - a) * b

    @cuda.jit(device=True)
    def write_row(x, out, n, s, lo, hi, lane, G, log_softmax, a, b):
        """``out[n, c, s] = elementwise(x[n, c, s])`` over the thread's share of [lo, hi):
        four independent loads per step, then four stores (through byte cursors)."""
        c = lo + lane
        p = addr3(x, n, c, s)
        q = addr3(out, n, c, s)
        d = G * x.strides[1]
        e = G * out.strides[1]
        end = hi - 3 * G
        while c < end:
            v0 = load_at(x, p, n, c, s)
            v1 = load_at(x, p + d, n, c + G, s)
            v2 = load_at(x, p + 2 * d, n, c + 2 * G, s)
            v3 = load_at(x, p + 3 * d, n, c + 3 * G, s)
            store_at(out, q, n, c, s, elementwise(v0, log_softmax, a, b))
            store_at(out, q + e, n, c + G, s, elementwise(v1, log_softmax, a, b))
            store_at(out, q + 2 * e, n, c + 2 * G, s, elementwise(v2, log_softmax, a, b))
            store_at(out, q + 3 * e, n, c + 3 * G, s, elementwise(v3, log_softmax, a, b))
            c += 4 * G
            p += 4 * d
            q += 4 * e
        # The last 0-3 elements of this thread: loaded together before the first store (a
        # store may alias x, so a load after it could not be hoisted: in short rows, where
        # this tail is the whole row, each element would cost its own memory round trip).
        h0 = c < hi
        h1 = c + G < hi
        h2 = c + 2 * G < hi
        v0 = load_at(x, p, n, c, s) if h0 else ZERO
        v1 = load_at(x, p + d, n, c + G, s) if h1 else ZERO
        v2 = load_at(x, p + 2 * d, n, c + 2 * G, s) if h2 else ZERO
        if h0:
            store_at(out, q, n, c, s, elementwise(v0, log_softmax, a, b))
        if h1:
            store_at(out, q + e, n, c + G, s, elementwise(v1, log_softmax, a, b))
        if h2:
            store_at(out, q + 2 * e, n, c + 2 * G, s, elementwise(v2, log_softmax, a, b))

    @cuda.jit
    def stats_kernel(x, G, n_split, part_m, part_s):
        N, C, S = x.shape
        valid, lane, r, k, n, s, lo, hi = unit(N * S * n_split, G, n_split, S, C)
        m, acc = row_max_sumexp(x, n, s, lo, hi, lane, G)
        if valid and lane == 0:
            part_m[r * n_split + k] = m
            part_s[r * n_split + k] = acc

    @P.row_kernel_jit(3)
    def softmax_kernel(x, out, mode, G, n_split, part_m, part_s):
        N, C, S = x.shape
        valid, lane, r, k, n, s, lo, hi = unit(N * S * n_split, G, n_split, S, C)
        m, acc = unit_stats(x, G, n_split, part_m, part_s, valid, lane, r, n, s, lo, hi)
        if mode == MODE_LOGSUMEXP or mode == MODE_LOG_SOFTMAX:
            a, L = shift_log_sum(m, acc)
            # Confident rows (the CPU's test, fastce._cpu.softmax): logsumexp near 0, or a
            # log_softmax chunk holding the row max with a small log(sum): L is redone as
            # log1p(rest), the max's term carried apart.
            need = False
            if valid:
                if mode == MODE_LOGSUMEXP:
                    need = k == 0 and lse_needs_rest(a + L, L)
                else:
                    top = m if n_split == 1 else part_m[r * n_split + k]  # the chunk's max
                    need = confident(top - a, lse_minus(a, L, top))
            if block_any(need):  # rare; block-uniform, as the reductions need
                rest = rest_sum(x, n, s, C, lane, G, m, need)
                if need:
                    L = log1p(rest)
            if not valid:
                return  # after the last reduction: no barrier is left to wait for this thread
            if mode == MODE_LOGSUMEXP:
                if lane == 0 and k == 0:
                    out[n, 0, s] = a + L
            else:
                write_row(x, out, n, s, lo, hi, lane, G, True, a, L)
        elif valid:
            write_row(x, out, n, s, lo, hi, lane, G, False, safe_shift(m), inv_sum(m, acc))

    return SimpleNamespace(stats_kernel=stats_kernel, softmax_kernel=softmax_kernel,
                           unit_stats=unit_stats, write_row=write_row)
