"""CUDA kernels for cross-entropy with class-index or class-probability targets, forward and
fused forward + gradient, on an (N, C, S) view of the logits.

The math is ``fastce._cpu.cross_entropy``'s, row for row: with ``eps`` the label smoothing,

    loss  = (1 - eps) * w[t] * (lse - x[t]) + eps / C * sum_c w[c] * (lse - x[c])
    dloss = g * (A * p_c - eps / C * w[c] - (1 - eps) * w[t] * [c == t]),
    A     = (1 - eps) * w[t] + eps / C * sum_c w[c],

where ``g`` is the upstream gradient of the row (divided by the "mean" denominator); every
``lse - x`` is evaluated as ``(max - x) + L`` (``lse_minus``, ``L`` from ``shift_log_sum``).  A work
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

from .memory import load1, load3, store3

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
    unit, shift_log_sum, lse_minus = P.unit, P.shift_log_sum, P.lse_minus
    safe_shift, exp, inv_sum = P.safe_shift, P.exp, P.inv_sum
    allreduce_sum2, allreduce_max_sumexp, push_block = (P.allreduce_sum2,
                                                        P.allreduce_max_sumexp, P.push_block)
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

    @cuda.jit(device=True)
    def index_term(xc, wc, is_t, m, L, sh, inv, ga, ge, gt):
        """Class c's smoothing term ``w_c (lse - x_c)`` and gradient."""
        v = ga * (exp(xc - sh) * inv) - ge * wc
        return wc * lse_minus(m, L, xc), (v - gt if is_t else v)

    @cuda.jit(device=True)
    def index_row(x, weight, grad, n, s, lo, hi, lane, G, has_w, want_grad, smooth, t,
                  m, L, sh, inv, ga, ge, gt):
        """Pass 2 of a class-index row over the thread's share of [lo, hi): the gradient
        (``want_grad``) and the sum of the smoothing terms (``smooth``); four independent
        loads of x (and of the weights) before the four stores."""
        sm = ZERO
        c = lo + lane
        end = hi - 3 * G
        while c < end:
            x0 = load3(x, n, c, s)
            x1 = load3(x, n, c + G, s)
            x2 = load3(x, n, c + 2 * G, s)
            x3 = load3(x, n, c + 3 * G, s)
            w0 = load1(weight, c) if has_w else ONE
            w1 = load1(weight, c + G) if has_w else ONE
            w2 = load1(weight, c + 2 * G) if has_w else ONE
            w3 = load1(weight, c + 3 * G) if has_w else ONE
            s0, v0 = index_term(x0, w0, c == t, m, L, sh, inv, ga, ge, gt)
            s1, v1 = index_term(x1, w1, c + G == t, m, L, sh, inv, ga, ge, gt)
            s2, v2 = index_term(x2, w2, c + 2 * G == t, m, L, sh, inv, ga, ge, gt)
            s3, v3 = index_term(x3, w3, c + 3 * G == t, m, L, sh, inv, ga, ge, gt)
            if smooth:
                sm += (s0 + s1) + (s2 + s3)
            if want_grad:
                store3(grad, n, c, s, v0)
                store3(grad, n, c + G, s, v1)
                store3(grad, n, c + 2 * G, s, v2)
                store3(grad, n, c + 3 * G, s, v3)
            c += 4 * G
        for j in range(3):  # the last 0-3 elements of this thread (unrolled: not a loop)
            cj = c + j * G
            if cj < hi:
                sj, vj = index_term(load3(x, n, cj, s), load1(weight, cj) if has_w else ONE,
                                    cj == t, m, L, sh, inv, ga, ge, gt)
                if smooth:
                    sm += sj
                if want_grad:
                    store3(grad, n, cj, s, vj)
        return sm

    @cuda.jit(device=True)
    def zero_row(grad, n, s, lo, hi, lane, G):
        c = lo + lane
        while c < hi:
            store3(grad, n, c, s, ZERO)
            c += G

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
        m, L = shift_log_sum(m, acc)  # lse - x is (m - x) + L: keeps L for large logits
        w_t = weight[t] if (has_w and active) else ONE
        part = ZERO
        if active and k == 0:
            xt = x[n, t, s]
            # A target on a -inf logit costs +inf, even in an all-masked row.
            part = keep * w_t * lse_minus(m, L, xt) if xt != NEG_INF else INF
        sm = ZERO
        if active and (want_grad or smooth):
            w_total = stats[1] if has_w else ftype(C)
            g = upstream(gout, g0, r, mean, stats[0])
            sh = safe_shift(m)
            inv = inv_sum(m, acc)
            ga = g * (keep * w_t + eps_c * w_total)
            ge = g * eps_c
            gt = g * keep * w_t
            if want_grad:
                sm = index_row(x, weight, grad, n, s, lo, hi, lane, G, has_w, True, smooth, t,
                               m, L, sh, inv, ga, ge, gt)
            else:
                sm = index_row(x, weight, grad, n, s, lo, hi, lane, G, has_w, False, smooth, t,
                               m, L, sh, inv, ga, ge, gt)
        elif valid and want_grad:
            zero_row(grad, n, s, lo, hi, lane, G)
        if smooth:
            sm, _ = allreduce_sum2(sm, ZERO, G)
        if valid and lane == 0:
            loss_part[r, k] = part + eps_c * sm if smooth else part

    @cuda.jit(device=True)
    def target_weight(target, weight, n, c, s, has_w, keep, eps_c):
        """The smoothed, weighted target ``wt_c = ((1 - eps) t_c + eps / C) * w_c``."""
        wt = keep * load3(target, n, c, s) + eps_c
        return wt * load1(weight, c) if has_w else wt

    @cuda.jit(device=True)
    def prob_term(xc, wt, m, L, sh, inv, ga, g):
        """Class c's loss term (0 where ``wt_c == 0``, even for ``x_c = -inf``) and
        gradient."""
        return (wt * lse_minus(m, L, xc) if wt != ZERO else ZERO,
                ga * (exp(xc - sh) * inv) - g * wt)

    @cuda.jit(device=True)
    def prob_row(x, target, weight, grad, n, s, lo, hi, lane, G, has_w, want_grad, keep,
                 eps_c, m, L, sh, inv, ga, g):
        """Pass 2 of a probability-target row over the thread's share: the loss terms'
        sum and the gradient; four independent loads of x and of the targets per step."""
        lsum = ZERO
        c = lo + lane
        end = hi - 3 * G
        while c < end:
            x0 = load3(x, n, c, s)
            x1 = load3(x, n, c + G, s)
            x2 = load3(x, n, c + 2 * G, s)
            x3 = load3(x, n, c + 3 * G, s)
            t0 = target_weight(target, weight, n, c, s, has_w, keep, eps_c)
            t1 = target_weight(target, weight, n, c + G, s, has_w, keep, eps_c)
            t2 = target_weight(target, weight, n, c + 2 * G, s, has_w, keep, eps_c)
            t3 = target_weight(target, weight, n, c + 3 * G, s, has_w, keep, eps_c)
            l0, v0 = prob_term(x0, t0, m, L, sh, inv, ga, g)
            l1, v1 = prob_term(x1, t1, m, L, sh, inv, ga, g)
            l2, v2 = prob_term(x2, t2, m, L, sh, inv, ga, g)
            l3, v3 = prob_term(x3, t3, m, L, sh, inv, ga, g)
            lsum += (l0 + l1) + (l2 + l3)
            if want_grad:
                store3(grad, n, c, s, v0)
                store3(grad, n, c + G, s, v1)
                store3(grad, n, c + 2 * G, s, v2)
                store3(grad, n, c + 3 * G, s, v3)
            c += 4 * G
        for j in range(3):  # the last 0-3 elements of this thread (unrolled: not a loop)
            cj = c + j * G
            if cj < hi:
                lj, vj = prob_term(load3(x, n, cj, s),
                                   target_weight(target, weight, n, cj, s, has_w, keep, eps_c),
                                   m, L, sh, inv, ga, g)
                lsum += lj
                if want_grad:
                    store3(grad, n, cj, s, vj)
        return lsum

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
        sh = ZERO
        acc = ZERO
        tw = ZERO
        c = lo + lane
        end = hi - 3 * G
        while c < end:
            x0 = load3(x, n, c, s)
            x1 = load3(x, n, c + G, s)
            x2 = load3(x, n, c + 2 * G, s)
            x3 = load3(x, n, c + 3 * G, s)
            t0 = target_weight(target, weight, n, c, s, has_w, keep, eps_c)
            t1 = target_weight(target, weight, n, c + G, s, has_w, keep, eps_c)
            t2 = target_weight(target, weight, n, c + 2 * G, s, has_w, keep, eps_c)
            t3 = target_weight(target, weight, n, c + 3 * G, s, has_w, keep, eps_c)
            m, sh, acc = push_block(m, sh, acc, x0, x1, x2, x3)
            tw += (t0 + t1) + (t2 + t3)
            c += 4 * G
        if c < hi:  # the last 1-3 elements of this thread
            x1 = NEG_INF
            x2 = NEG_INF
            if c + G < hi:
                x1 = load3(x, n, c + G, s)
                tw += target_weight(target, weight, n, c + G, s, has_w, keep, eps_c)
            if c + 2 * G < hi:
                x2 = load3(x, n, c + 2 * G, s)
                tw += target_weight(target, weight, n, c + 2 * G, s, has_w, keep, eps_c)
            tw += target_weight(target, weight, n, c, s, has_w, keep, eps_c)
            m, sh, acc = push_block(m, sh, acc, load3(x, n, c, s), x1, x2, NEG_INF)
        m, acc = allreduce_max_sumexp(m, acc, G)
        tw, _ = allreduce_sum2(tw, ZERO, G)
        m, L = shift_log_sum(m, acc)
        # Pass 2: the loss terms and the gradient.
        g = upstream(gout, g0, r, mean, denom)
        if want_grad:
            lsum = prob_row(x, target, weight, grad, n, s, lo, hi, lane, G, has_w, True,
                            keep, eps_c, m, L, safe_shift(m), inv_sum(m, acc), g * tw, g)
        else:
            lsum = prob_row(x, target, weight, grad, n, s, lo, hi, lane, G, has_w, False,
                            keep, eps_c, m, L, safe_shift(m), inv_sum(m, acc), g * tw, g)
        lsum, _ = allreduce_sum2(lsum, ZERO, G)
        if valid and lane == 0:
            loss[r] = lsum

    return SimpleNamespace(prepare_kernel=prepare_kernel, index_kernel=index_kernel,
                           prob_kernel=prob_kernel)
