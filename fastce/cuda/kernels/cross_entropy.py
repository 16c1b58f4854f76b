"""CUDA kernels for cross-entropy with class-index or class-probability targets, forward and
fused forward + gradient, on an (N, C, S) view of the logits.

The math is ``fastce._cpu.cross_entropy``'s, row for row: with ``eps`` the label smoothing,

    loss  = (1 - eps) * w[t] * (lse - x[t]) + eps / C * sum_c w[c] * (lse - x[c])
    dloss = g * (A * p_c - eps / C * w[c] - (1 - eps) * w[t] * [c == t]),
    A     = (1 - eps) * w[t] + eps / C * sum_c w[c],

where ``g`` is the upstream gradient of the row (divided by the "mean" denominator); every
``lse - x`` is evaluated as ``(max - x) + L`` with ``L = log_sum(max, sum)``.  A work
unit is a row or a chunk of one (see ``fastce.cuda.kernels.softmax``): pass 1 reads it for the
(max, sum-exp) pair, pass 2 (only with a gradient or label smoothing) reads it again, still in
L2 for moderate C, to write the gradient and sum the smoothing term.  ``loss_part[r, k]`` gets
chunk k's share of row r's loss.

Class-index targets are checked by :func:`prepare_kernel` on the device: an index outside
[0, C) that is not ``ignore_index`` lowers an error flag to its flat position (the host turns
that into the CPU path's IndexError after the launch) and is treated as ignored by the loss
kernels, so nothing reads out of bounds.
"""
from types import SimpleNamespace

from numba import cuda, int64

__all__ = ["build_cross_entropy"]


def build_cross_entropy(P, soft):
    """Kernels for the primitives ``P`` of one compute dtype; ``soft`` is the namespace of
    ``build_softmax(P)`` (its ``unit_stats`` reads or merges a unit's row statistics).

    Returns
    -------
    types.SimpleNamespace
        ``prepare_kernel``, ``index_kernel``, ``prob_kernel`` (see their docstrings).
    """
    ZERO, ONE, INF, NEG_INF = P.ZERO, P.ONE, P.INF, P.NEG_INF
    unit, log_sum, safe_shift, exp, inv_sum = P.unit, P.log_sum, P.safe_shift, P.exp, P.inv_sum
    allreduce_sum2, allreduce_max_sumexp, push = P.allreduce_sum2, P.allreduce_max_sumexp, P.push
    ftype = P.ftype
    unit_stats = soft.unit_stats

    @cuda.jit(device=True)
    def upstream(gout, g0, r, mean, denom):
        """The row's upstream gradient: ``gout[r]`` (reduction 'none' with a grad_output),
        ``gout[0]`` (a device scalar), or ``g0``; divided by the 'mean' denominator (0 when
        the denominator is 0, as the CPU path)."""
        if gout.shape[0] > 1:
            g = gout[r]
        elif gout.shape[0] == 1:
            g = gout[0]
        else:
            g = g0
        if mean:
            g = g / denom if denom != ZERO else ZERO
        return g

    @cuda.jit
    def prepare_kernel(target, ignore_index, C, weight, flag, partials):
        """Check the (N, S) class indices and sum the 'mean' denominator (the weights of the
        non-ignored targets, or their count): one partial per block.  ``flag[0]`` is lowered
        (atomic min) to the flat position of any invalid index."""
        N, S = target.shape
        has_w = weight.shape[0] > 0
        t0 = cuda.threadIdx.x
        i = int64(cuda.blockIdx.x) * cuda.blockDim.x + t0  # 64-bit
        stride = int64(cuda.gridDim.x) * cuda.blockDim.x
        acc = ZERO
        while i < N * S:
            n = i // S
            t = int64(target[n, i - n * S])
            if t != ignore_index:
                if t < 0 or t >= C:
                    cuda.atomic.min(flag, 0, i)
                else:
                    acc += weight[t] if has_w else ONE
            i += stride
        acc, _ = allreduce_sum2(acc, ZERO, cuda.blockDim.x)
        if t0 == 0:
            partials[cuda.blockIdx.x] = acc

    @cuda.jit
    def index_kernel(x, target, ignore_index, weight, stats, keep, eps_c, mean, g0, gout,
                     grad, loss_part, G, n_split, part_m, part_s):
        """Class-index targets.  ``stats`` = [denominator, sum of weights] (device);
        ``keep = 1 - eps``, ``eps_c = eps / C``; ``grad`` is (N, C, S), or (0, 0, 0) for the
        forward only; ``loss_part`` is (N * S, n_split)."""
        N, C, S = x.shape
        has_w = weight.shape[0] > 0
        want_grad = grad.shape[0] > 0
        smooth = eps_c > ZERO
        valid, lane, r, k, n, s, lo, hi = unit(N * S * n_split, G, n_split, S, C)
        t = int64(0)
        active = False
        if valid:
            t = int64(target[n, s])
            active = t != ignore_index and t >= 0 and t < C
        # An ignored row reads nothing; it still joins the group's reductions.
        m, acc = unit_stats(x, G, n_split, part_m, part_s, active, lane, r, n, s, lo,
                            hi if active else lo)
        L = log_sum(m, acc)  # lse - x is (m - x) + L: keeps L for large logits
        w_t = weight[t] if (has_w and active) else ONE
        part = ZERO
        if active and k == 0:
            xt = x[n, t, s]
            # A target on a -inf logit costs +inf, even in an all-masked row.
            part = keep * w_t * ((m - xt) + L) if xt != NEG_INF else INF
        sm = ZERO
        c = lo + lane
        if active and (want_grad or smooth):
            w_total = stats[1] if has_w else ftype(C)
            g = upstream(gout, g0, r, mean, stats[0])
            sh = safe_shift(m)
            inv = inv_sum(m, acc)
            ga = g * (keep * w_t + eps_c * w_total)
            ge = g * eps_c
            gt = g * keep * w_t
            while c < hi:
                xc = x[n, c, s]
                wc = weight[c] if has_w else ONE
                if smooth:
                    sm += wc * ((m - xc) + L)
                if want_grad:
                    v = ga * (exp(xc - sh) * inv) - ge * wc
                    if c == t:
                        v -= gt
                    grad[n, c, s] = v
                c += G
        elif valid and want_grad:
            while c < hi:
                grad[n, c, s] = ZERO
                c += G
        if smooth:
            sm, _ = allreduce_sum2(sm, ZERO, G)
        if valid and lane == 0:
            loss_part[r, k] = part + eps_c * sm if smooth else part

    @cuda.jit
    def prob_kernel(x, target, weight, keep, eps_c, mean, denom, g0, gout, grad, loss, G):
        """Probability targets of the logits' (N, C, S) layout; whole rows (no split).  The
        smoothed, weighted target is ``wt_c = ((1 - eps) t_c + eps / C) * w_c``; a class with
        ``wt_c == 0`` adds 0 to the loss even where ``x_c = -inf``."""
        N, C, S = x.shape
        has_w = weight.shape[0] > 0
        want_grad = grad.shape[0] > 0
        valid, lane, r, k, n, s, lo, hi = unit(N * S, G, 1, S, C)
        # Pass 1: the row's (max, sum-exp) and the total target weight sum_c wt_c.
        m = NEG_INF
        acc = ZERO
        tw = ZERO
        c = lo + lane
        while c < hi:
            m, acc = push(m, acc, x[n, c, s])
            wt = keep * target[n, c, s] + eps_c
            tw += wt * weight[c] if has_w else wt
            c += G
        m, acc = allreduce_max_sumexp(m, acc, G)
        tw, _ = allreduce_sum2(tw, ZERO, G)
        L = log_sum(m, acc)
        # Pass 2: the loss terms and the gradient.
        g = upstream(gout, g0, r, mean, denom)
        sh = safe_shift(m)
        inv = inv_sum(m, acc)
        ga = g * tw
        lsum = ZERO
        c = lo + lane
        while c < hi:
            xc = x[n, c, s]
            wt = keep * target[n, c, s] + eps_c
            if has_w:
                wt *= weight[c]
            if wt != ZERO:
                lsum += wt * ((m - xc) + L)
            if want_grad:
                grad[n, c, s] = ga * (exp(xc - sh) * inv) - g * wt
            c += G
        lsum, _ = allreduce_sum2(lsum, ZERO, G)
        if valid and lane == 0:
            loss[r] = lsum

    return SimpleNamespace(prepare_kernel=prepare_kernel, index_kernel=index_kernel,
                           prob_kernel=prob_kernel)
