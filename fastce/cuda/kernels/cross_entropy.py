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

The large-vocabulary options are the CPU kernels' too: logits soft-capped on load (``P.xload``,
``P.cap_value``; the cap is a compile-time constant of the primitives ``P``, identity without
it), every gradient element times the cap's derivative (``P.cap_grad``), ``z_loss * lse**2``
added to a non-ignored row's loss with ``2 z_loss lse`` joining the softmax coefficient, and
each row's lse written to ``lse_out`` when that is 1-D (ignored rows included); without
lse it is a 2-D placeholder.  An array's rank is a compile-time constant: numba prunes the
branch, so the kernels that return no lse hold no trace of it.

Class-index targets are checked by :func:`prepare_kernel` on the device: an index outside
[0, C) that is not ``ignore_index`` lowers an error flag to its flat position (the host turns
that into the CPU path's IndexError after the launch) and is treated as ignored by the loss
kernels, so nothing reads out of bounds.
"""
from types import SimpleNamespace

import numpy as np
from numba import cuda, int64

from .memory import addr1, addr3, load1_at, load_at, steps4, store3, store_at

__all__ = ["build_cross_entropy"]


def build_cross_entropy(P, soft):
    """Kernels for the primitives ``P`` of one compute dtype; ``soft`` is the namespace of
    ``build_softmax(P)`` (its ``unit_stats`` reads or merges a unit's row statistics).

    Returns
    -------
    types.SimpleNamespace
        ``prepare_kernel``, ``index_kernel``, ``prob_kernel`` (see their docstrings; both
        for calls without class weights), ``index_kernel_weighted``,
        ``prob_kernel_weighted`` (the same with weights).
    """
    ZERO, ONE, INF, NEG_INF = P.ZERO, P.ONE, P.INF, P.NEG_INF
    unit, shift_log_sum, lse_minus = P.unit, P.shift_log_sum, P.lse_minus
    safe_shift, exp_shifted, inv_sum, log1p = P.safe_shift, P.exp_shifted, P.inv_sum, P.log1p
    confident, rest_sum, block_any = P.confident, P.rest_sum, P.block_any
    allreduce_sum2, allreduce_max_sumexp, push_block4 = (P.allreduce_sum2,
                                                        P.allreduce_max_sumexp, P.push_block4)
    push_block8 = P.push_block8
    ftype = P.ftype
    xload, cap_value, cap_grad = P.xload, P.cap_value, P.cap_grad
    unit_stats = soft.unit_stats
    # The weighted, soft-capped gradient loop is the most register-bound (64 in float32):
    # with plain offsets p + k d ptxas interleaves its loads with the tanh (3 in flight);
    # chained cursors (memory.steps4) keep them issued together.  Elsewhere the plain
    # offsets measure fewer instructions (docs/gpu.md).
    CAPPED = P.softcap is not None
    # The probability rows' steps chain their cursors (memory.steps4) in float32 (64-register
    # bound) and in the soft-capped float64 builds; the uncapped float64 kernels (unbounded
    # registers) measure fewer instructions with plain offsets for the inputs (the weighted
    # one still chains the gradient's cursor) (docs/gpu.md).
    CHAIN_F32 = P.dtype == np.float32
    # The uncapped float32 class-index gradient loop steps eight elements (two four-element
    # steps: the loop's own instructions shared by eight); float64 (unbounded registers) and
    # the capped builds keep four.
    INDEX_STEP8 = P.dtype == np.float32 and not CAPPED
    # The same for the uncapped float32 probability rows' pass 1 (row statistics and total
    # target weight; the capped values would go through cap_value here).
    PROB_STEP8 = INDEX_STEP8
    # float64: unbounded (at 80 registers these two kernels spill)
    bounded_jit = P.row_kernel_jit(None)

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
    def index_term(xc, wc, m, L, sh, gi, iv, ge):
        """Class c's ``lse - x_c`` (its smoothing term is ``w_c`` times it) and gradient,
        less the target's ``-(1 - eps) w_t g`` (the kernel fixes the target's element up
        after); ``xc`` is the (capped) logit; the probability's factor is ``gi`` times
        ``iv`` (see :func:`grad_factors`)."""
        return lse_minus(m, L, xc), cap_grad(gi * (exp_shifted(xc - sh) * iv) - ge * wc, xc)

    @cuda.jit(device=True)
    def grad_factors(ga, inv, has_w):
        """``(gi, iv)`` for :func:`index_term`: ``(ga / sum, 1)``, one multiplication an
        element; the unweighted capped build keeps ``(ga, 1 / sum)``, two (with one factor
        ptxas interleaved that loop's loads with its tanh: 2 in flight)."""
        if CAPPED and not has_w:
            return ga, inv
        return ga * inv, ONE

    @cuda.jit(device=True)
    def store_step4(grad, q, e, n, c, s, G, chain, v0, v1, v2, v3):
        """Store four gradient elements from cursor ``q`` (step ``e``; chained addresses when
        ``chain``, see ``memory.steps4``); the cursor's next position."""
        if chain:
            q1, q2, q3, q4 = steps4(q, e)
        else:
            q1, q2, q3, q4 = q + e, q + 2 * e, q + 3 * e, q + 4 * e
        store_at(grad, q, n, c, s, v0)
        store_at(grad, q1, n, c + G, s, v1)
        store_at(grad, q2, n, c + 2 * G, s, v2)
        store_at(grad, q3, n, c + 3 * G, s, v3)
        return q4

    @cuda.jit(device=True)
    def index_step4(x, weight, grad, p, pw, q, d, dw, e, n, c, s, G, has_w, want_grad,
                    smooth, sm, m, L, sh, gi, iv, ge):
        """Four elements of :func:`index_row` from the cursors ``p`` (x), ``pw`` (weights),
        ``q`` (gradient): the smoothing sum ``sm`` with their terms added (with weights,
        one FMA a term) and the cursors' next positions."""
        chain = CAPPED  # compile-time: see CAPPED
        if chain:
            p1, p2, p3, p4 = steps4(p, d)
            pw1, pw2, pw3, pw4 = steps4(pw, dw)
        else:
            p1, p2, p3, p4 = p + d, p + 2 * d, p + 3 * d, p + 4 * d
            pw1, pw2, pw3, pw4 = pw + dw, pw + 2 * dw, pw + 3 * dw, pw + 4 * dw
        x0 = load_at(x, p, n, c, s)
        x1 = load_at(x, p1, n, c + G, s)
        x2 = load_at(x, p2, n, c + 2 * G, s)
        x3 = load_at(x, p3, n, c + 3 * G, s)
        w0 = load1_at(weight, pw, c) if has_w else ONE
        w1 = load1_at(weight, pw1, c + G) if has_w else ONE
        w2 = load1_at(weight, pw2, c + 2 * G) if has_w else ONE
        w3 = load1_at(weight, pw3, c + 3 * G) if has_w else ONE
        s0, v0 = index_term(cap_value(x0), w0, m, L, sh, gi, iv, ge)
        s1, v1 = index_term(cap_value(x1), w1, m, L, sh, gi, iv, ge)
        s2, v2 = index_term(cap_value(x2), w2, m, L, sh, gi, iv, ge)
        s3, v3 = index_term(cap_value(x3), w3, m, L, sh, gi, iv, ge)
        if smooth and has_w:
            sm = cuda.fma(w3, s3, cuda.fma(w2, s2, cuda.fma(w1, s1, cuda.fma(w0, s0, sm))))
        elif smooth:
            sm += (s0 + s1) + (s2 + s3)
        if want_grad:
            q = store_step4(grad, q, e, n, c, s, G, chain or has_w, v0, v1, v2, v3)
        return sm, p4, pw4, q

    @cuda.jit(device=True)
    def index_row(x, weight, grad, n, s, lo, hi, lane, G, has_w, want_grad, smooth,
                  m, L, sh, inv, ga, ge):
        """Pass 2 of a class-index row over the thread's share of [lo, hi): the gradient
        (``want_grad``) and the sum of the smoothing terms (``smooth``); four independent
        loads of x (and of the weights) before the four stores, through byte cursors;
        eight elements a step (two :func:`index_step4`) in the uncapped float32 builds."""
        sm = ZERO
        c = lo + lane
        p = addr3(x, n, c, s)
        q = addr3(grad, n, c, s) if want_grad else 0
        pw = addr1(weight, c) if has_w else 0
        d = G * x.strides[1]
        e = G * grad.strides[1]
        dw = G * weight.strides[0]
        end = hi - 3 * G
        gi, iv = grad_factors(ga, inv, has_w)
        if INDEX_STEP8:
            end8 = hi - 7 * G
            while c < end8:
                sm, p, pw, q = index_step4(x, weight, grad, p, pw, q, d, dw, e, n, c, s, G,
                                           has_w, want_grad, smooth, sm, m, L, sh, gi, iv, ge)
                sm, p, pw, q = index_step4(x, weight, grad, p, pw, q, d, dw, e, n, c + 4 * G,
                                           s, G, has_w, want_grad, smooth, sm, m, L, sh, gi, iv,
                                           ge)
                c += 8 * G
            if c < end:  # four more (not a loop)
                sm, p, pw, q = index_step4(x, weight, grad, p, pw, q, d, dw, e, n, c, s, G,
                                           has_w, want_grad, smooth, sm, m, L, sh, gi, iv, ge)
                c += 4 * G
        else:
            while c < end:
                sm, p, pw, q = index_step4(x, weight, grad, p, pw, q, d, dw, e, n, c, s, G,
                                           has_w, want_grad, smooth, sm, m, L, sh, gi, iv, ge)
                c += 4 * G
        for j in range(3):  # the last 0-3 elements of this thread (unrolled: not a loop)
            cj = c + j * G
            if cj < hi:
                wj = load1_at(weight, pw + j * dw, cj) if has_w else ONE
                sj, vj = index_term(xload(x, p + j * d, n, cj, s), wj, m, L, sh, gi, iv, ge)
                if smooth:
                    sm += wj * sj
                if want_grad:
                    store_at(grad, q + j * e, n, cj, s, vj)
        return sm

    @cuda.jit(device=True)
    def zero_row(grad, n, s, lo, hi, lane, G):
        c = lo + lane
        while c < hi:
            store3(grad, n, c, s, ZERO)
            c += G

    @cuda.jit(device=True)
    def step2(n, s, sn, ss, S):
        """(n, s) advanced by the stride's decomposition (sn, ss), with a carry."""
        s += ss
        n += sn
        if s >= S:
            s -= S
            n += 1
        return n, s

    @cuda.jit(device=True)
    def count_target(t, i, ignore_index, C, weight, has_w, flag):
        """Target t's share of the 'mean' denominator; an invalid index lowers the flag."""
        if t == ignore_index:
            return ZERO
        if t < 0 or t >= C:
            cuda.atomic.min(flag, 0, i)
            return ZERO
        return weight[t] if has_w else ONE

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
        # (n, s) of position i advance by the stride's decomposition with a carry: no
        # division per element.
        n = i // S
        s = i - n * S
        sn = stride // S
        ss = stride - sn * S
        total = N * S
        end = total - 3 * stride
        while i < end:  # four positions a step: their loads are independent
            n1, s1 = step2(n, s, sn, ss, S)
            n2, s2 = step2(n1, s1, sn, ss, S)
            n3, s3 = step2(n2, s2, sn, ss, S)
            ta = int64(target[n, s])
            tb = int64(target[n1, s1])
            tc = int64(target[n2, s2])
            td = int64(target[n3, s3])
            acc += (count_target(ta, i, ignore_index, C, weight, has_w, flag) +
                    count_target(tb, i + stride, ignore_index, C, weight, has_w, flag)) + \
                   (count_target(tc, i + 2 * stride, ignore_index, C, weight, has_w, flag) +
                    count_target(td, i + 3 * stride, ignore_index, C, weight, has_w, flag))
            i += 4 * stride
            n, s = step2(n3, s3, sn, ss, S)
        for j in range(3):  # the last 0-3 positions of this thread (unrolled: not a loop)
            if i < total:
                acc += count_target(int64(target[n, s]), i, ignore_index, C, weight, has_w,
                                    flag)
                i += stride
                n, s = step2(n, s, sn, ss, S)
        acc, _ = allreduce_sum2(acc, ZERO, cuda.blockDim.x)
        if t0 == 0:
            partials[cuda.blockIdx.x] = acc

    def make_index_kernel(weighted):
        """``index_kernel`` with class weights (``weighted``) or without: one template, two
        specializations (weights are rare; without them the gradient loop loads, tests and
        indexes no weight)."""
        @bounded_jit
        def index_kernel(x, target, ignore_index, weight, stats, keep, eps_c, mean, g0, gout,
                         grad, loss_part, G, n_split, part_m, part_s, z_loss, lse_out):
            """Class-index targets.  ``stats`` = [denominator, sum of weights] (device);
            ``keep = 1 - eps``, ``eps_c = eps / C``; ``grad`` is (N, C, S), or (0, 0, 0) for the
            forward only; ``loss_part`` is (N * S, n_split); ``lse_out`` (N * S,) or 2-D (none)."""
            N, C, S = x.shape
            has_w = weighted  # compile-time: the other specialization holds no weight code
            want_grad = grad.shape[0] > 0
            want_lse = lse_out.ndim == 1
            smooth = eps_c > ZERO
            valid, lane, r, k, n, s, lo, hi = unit(N * S * n_split, G, n_split, S, C)
            t = int64(0)
            active = False
            if valid:
                t = int64(target[n, s])
                active = t != ignore_index and t >= 0 and t < C
            # An ignored row reads nothing (unless its lse is wanted); it still joins the
            # group's reductions.
            read = active or (valid and want_lse)
            m, acc = unit_stats(x, G, n_split, part_m, part_s, read, lane, r, n, s, lo,
                                hi if read else lo)
            m, L = shift_log_sum(m, acc)  # lse - x is (m - x) + L: keeps L for large logits
            if lse_out.ndim == 1:
                if valid and lane == 0 and k == 0:
                    lse_out[r] = m + L
            # The target's share (loss and gradient) belongs to the chunk that holds it.
            holds_t = active and t >= lo and t < hi
            xt = NEG_INF
            nll = ZERO
            need = False
            if holds_t:
                xt = cap_value(x[n, t, s])
                if xt != NEG_INF:
                    nll = lse_minus(m, L, xt)
                    # a confident row (the target holds the max; the CPU's test): see below
                    need = confident(xt - m, nll)
            sm = ZERO
            if active and (want_grad or smooth):
                w_total = stats[1] if has_w else ftype(C)
                g = upstream(gout, g0, r, mean, stats[0])
                w_t = weight[t] if has_w else ONE
                sh = safe_shift(m)
                inv = inv_sum(m, acc)
                zz = ftype(2) * z_loss * (m + L) if z_loss != ZERO else ZERO
                ga = g * (keep * w_t + eps_c * w_total + zz)
                ge = g * eps_c
                if want_grad:
                    sm = index_row(x, weight, grad, n, s, lo, hi, lane, G, has_w, True, smooth,
                                   m, L, sh, inv, ga, ge)
                    # The target's element: its thread rewrites it with the -(1 - eps) w_t g
                    # term (g and w_t read again: not kept live across the loop).
                    if holds_t and np.uint32(t - lo) % np.uint32(G) == np.uint32(lane):
                        wt = weight[t] if has_w else ONE
                        gi, iv = grad_factors(ga, inv, has_w)
                        _, vt = index_term(xt, wt, m, L, sh, gi, iv, ge)
                        gt = upstream(gout, g0, r, mean, stats[0]) * keep * wt
                        store3(grad, n, t, s, vt - cap_grad(gt, xt))
                else:
                    sm = index_row(x, weight, grad, n, s, lo, hi, lane, G, has_w, False, True,
                                   m, L, sh, inv, ga, ge)
            elif valid and want_grad:
                zero_row(grad, n, s, lo, hi, lane, G)
            if smooth:
                sm, _ = allreduce_sum2(sm, ZERO, G)
            # Confident rows: the loss is log1p(rest) and the target's gradient comes from rest,
            # a second pass over the row (rare; last, so that little is live across it).
            if block_any(need):  # block-uniform, as the reductions need
                rest = rest_sum(x, n, s, C, lane, G, xt, need)
                if need:
                    nll = log1p(rest)
                    if want_grad and np.uint32(t - lo) % np.uint32(G) == np.uint32(lane):
                        # p_t - 1 = -rest / (1 + rest), without the cancelling subtraction (the
                        # CPU's _target_grad); it replaces what pass 2 wrote there.  The factors
                        # are read again rather than kept live across the pass.
                        # (z-loss: lse = x_t + log1p(rest) for a confident row.)
                        gr = upstream(gout, g0, r, mean, stats[0])
                        wr = weight[t] if has_w else ONE
                        pt = ONE / (ONE + rest)
                        zr = ftype(2) * z_loss * (xt + nll) if z_loss != ZERO else ZERO
                        store3(grad, n, t, s, cap_grad(
                            (gr * keep * wr) * (-rest * pt) +
                            (gr * eps_c) * ((stats[1] if has_w else ftype(C)) * pt - wr) +
                            (gr * zr) * pt, xt))
            part = ZERO
            if holds_t:
                # A target on a -inf logit costs +inf, even in an all-masked row.
                # (the target's weight is read again: not kept live across the passes)
                part = keep * (weight[t] if has_w else ONE) * nll if xt != NEG_INF else INF
                if z_loss != ZERO:
                    # lse = x_t + (lse - x_t): no (m, L) kept live across the second pass.
                    part += z_loss * (xt + nll) * (xt + nll)
            if valid and lane == 0:
                loss_part[r, k] = part + eps_c * sm if smooth else part
        return index_kernel

    @cuda.jit(device=True)
    def cursors(x, target, weight, n, c, s, G, has_w):
        """Byte cursors at element c of a row of x and of the targets, and of the weights,
        with their steps for G classes."""
        return (addr3(x, n, c, s), G * x.strides[1], addr3(target, n, c, s),
                G * target.strides[1], addr1(weight, c) if has_w else 0,
                G * weight.strides[0])

    @cuda.jit(device=True)
    def target_weight(target, weight, pt, pw, n, c, s, has_w, keep, eps_c):
        """The smoothed, weighted target ``wt_c = ((1 - eps) t_c + eps / C) * w_c`` (``t_c``
        and ``w_c`` at byte addresses ``pt``, ``pw``)."""
        wt = keep * load_at(target, pt, n, c, s) + eps_c
        return wt * load1_at(weight, pw, c) if has_w else wt

    @cuda.jit(device=True)
    def load_step4(x, target, weight, p, d, pt, dt, pw, dw, n, c, s, G, has_w, keep, eps_c,
                   chain):
        """One step of a probability-target row's loops: four raw logits (loads issued
        first) and the four smoothed, weighted targets at the cursors (addresses chained with
        ``steps4`` when ``chain``, see ``CHAIN_F32``), and the cursors' next positions."""
        if chain:
            p1, p2, p3, p4 = steps4(p, d)
            t1, t2, t3, t4 = steps4(pt, dt)
            w1, w2, w3, w4 = steps4(pw, dw) if has_w else (pw, pw, pw, pw)
        else:
            p1, p2, p3, p4 = p + d, p + 2 * d, p + 3 * d, p + 4 * d
            t1, t2, t3, t4 = pt + dt, pt + 2 * dt, pt + 3 * dt, pt + 4 * dt
            w1, w2, w3, w4 = ((pw + dw, pw + 2 * dw, pw + 3 * dw, pw + 4 * dw) if has_w
                              else (pw, pw, pw, pw))
        x0 = load_at(x, p, n, c, s)
        x1 = load_at(x, p1, n, c + G, s)
        x2 = load_at(x, p2, n, c + 2 * G, s)
        x3 = load_at(x, p3, n, c + 3 * G, s)
        y0 = target_weight(target, weight, pt, pw, n, c, s, has_w, keep, eps_c)
        y1 = target_weight(target, weight, t1, w1, n, c + G, s, has_w, keep, eps_c)
        y2 = target_weight(target, weight, t2, w2, n, c + 2 * G, s, has_w, keep, eps_c)
        y3 = target_weight(target, weight, t3, w3, n, c + 3 * G, s, has_w, keep, eps_c)
        return x0, x1, x2, x3, y0, y1, y2, y3, p4, t4, w4

    @cuda.jit(device=True)
    def prob_term(xc, wt, m, L, sh, gi, g):
        """Class c's ``lse - x_c`` (0 where ``wt_c == 0``, even for ``x_c = -inf``: the
        loss term is ``wt_c`` times it) and gradient; ``gi = ga / sum``."""
        return (lse_minus(m, L, xc) if wt != ZERO else ZERO,
                cap_grad(gi * exp_shifted(xc - sh) - g * wt, xc))

    @cuda.jit(device=True)
    def prob_step4(x, target, weight, grad, p, d, pt, dt, pw, dw, q, e, n, c, s, G, has_w,
                   want_grad, keep, eps_c, chain, lsum, m, L, sh, gi, g):
        """Four elements of :func:`prob_row`: the loss sum ``lsum`` with their terms added
        (one FMA a term), their gradients stored, and the cursors' next positions."""
        x0, x1, x2, x3, t0, t1, t2, t3, p, pt, pw = load_step4(
            x, target, weight, p, d, pt, dt, pw, dw, n, c, s, G, has_w, keep, eps_c, chain)
        l0, v0 = prob_term(cap_value(x0), t0, m, L, sh, gi, g)
        l1, v1 = prob_term(cap_value(x1), t1, m, L, sh, gi, g)
        l2, v2 = prob_term(cap_value(x2), t2, m, L, sh, gi, g)
        l3, v3 = prob_term(cap_value(x3), t3, m, L, sh, gi, g)
        lsum = cuda.fma(t3, l3, cuda.fma(t2, l2, cuda.fma(t1, l1, cuda.fma(t0, l0, lsum))))
        if want_grad:
            q = store_step4(grad, q, e, n, c, s, G, chain or has_w, v0, v1, v2, v3)
        return lsum, p, pt, pw, q

    @cuda.jit(device=True)
    def prob_row(x, target, weight, grad, n, s, lo, hi, lane, G, has_w, want_grad, keep,
                 eps_c, m, L, sh, inv, ga, g, chain):
        """Pass 2 of a probability-target row over the thread's share: the loss terms'
        sum and the gradient; four independent loads of x and of the targets a
        :func:`prob_step4`, two a step in the uncapped float32 builds."""
        lsum = ZERO
        c = lo + lane
        p, d, pt, dt, pw, dw = cursors(x, target, weight, n, c, s, G, has_w)
        q = addr3(grad, n, c, s) if want_grad else 0
        e = G * grad.strides[1]
        end = hi - 3 * G
        gi = ga * inv
        if PROB_STEP8:
            end8 = hi - 7 * G
            while c < end8:
                lsum, p, pt, pw, q = prob_step4(
                    x, target, weight, grad, p, d, pt, dt, pw, dw, q, e, n, c, s, G, has_w,
                    want_grad, keep, eps_c, chain, lsum, m, L, sh, gi, g)
                lsum, p, pt, pw, q = prob_step4(
                    x, target, weight, grad, p, d, pt, dt, pw, dw, q, e, n, c + 4 * G, s, G,
                    has_w, want_grad, keep, eps_c, chain, lsum, m, L, sh, gi, g)
                c += 8 * G
            if c < end:  # four more (not a loop)
                lsum, p, pt, pw, q = prob_step4(
                    x, target, weight, grad, p, d, pt, dt, pw, dw, q, e, n, c, s, G, has_w,
                    want_grad, keep, eps_c, chain, lsum, m, L, sh, gi, g)
                c += 4 * G
        else:
            while c < end:
                lsum, p, pt, pw, q = prob_step4(
                    x, target, weight, grad, p, d, pt, dt, pw, dw, q, e, n, c, s, G, has_w,
                    want_grad, keep, eps_c, chain, lsum, m, L, sh, gi, g)
                c += 4 * G
        for j in range(3):  # the last 0-3 elements of this thread (unrolled: not a loop)
            cj = c + j * G
            if cj < hi:
                tj = target_weight(target, weight, pt + j * dt, pw + j * dw, n, cj, s, has_w,
                                   keep, eps_c)
                lj, vj = prob_term(xload(x, p + j * d, n, cj, s), tj, m, L, sh, gi, g)
                lsum += tj * lj
                if want_grad:
                    store_at(grad, q + j * e, n, cj, s, vj)
        return lsum

    @cuda.jit(device=True)
    def prob_stats_step4(x, target, weight, p, d, pt, dt, pw, dw, n, c, s, G, has_w, keep,
                         eps_c, chain, m, sh, acc, tw):
        """Four elements of a probability row's pass 1: the running (max, shift, sum-exp)
        and total target weight, and the cursors' next positions."""
        x0, x1, x2, x3, t0, t1, t2, t3, p, pt, pw = load_step4(
            x, target, weight, p, d, pt, dt, pw, dw, n, c, s, G, has_w, keep, eps_c, chain)
        m, sh, acc = push_block4(m, sh, acc, cap_value(x0), cap_value(x1), cap_value(x2),
                                 cap_value(x3))
        return m, sh, acc, tw + ((t0 + t1) + (t2 + t3)), p, pt, pw

    def make_prob_kernel(weighted):
        """:func:`make_index_kernel` for ``prob_kernel``."""
        @bounded_jit
        def prob_kernel(x, target, weight, keep, eps_c, mean, denom, g0, gout, grad, loss, G,
                        z_loss, lse_out):
            """Probability targets of the logits' (N, C, S) layout; whole rows (no split).  The
            smoothed, weighted target is ``wt_c = ((1 - eps) t_c + eps / C) * w_c``; a class with
            ``wt_c == 0`` adds 0 to the loss even where ``x_c = -inf``."""
            N, C, S = x.shape
            has_w = weighted  # compile-time: the other specialization holds no weight code
            chain = CHAIN_F32 or CAPPED  # compile-time, see CHAIN_F32
            want_grad = grad.shape[0] > 0
            valid, lane, r, k, n, s, lo, hi = unit(N * S, G, 1, S, C)
            # Pass 1: the row's (max, sum-exp) and the total target weight sum_c wt_c.
            m = NEG_INF
            sh = ZERO
            acc = ZERO
            tw = ZERO
            c = lo + lane
            p, d, pt, dt, pw, dw = cursors(x, target, weight, n, c, s, G, has_w)
            end = hi - 3 * G
            if PROB_STEP8:
                end8 = hi - 7 * G
                while c < end8:
                    x0, x1, x2, x3, t0, t1, t2, t3, p, pt, pw = load_step4(
                        x, target, weight, p, d, pt, dt, pw, dw, n, c, s, G, has_w, keep, eps_c,
                        chain)
                    x4, x5, x6, x7, t4, t5, t6, t7, p, pt, pw = load_step4(
                        x, target, weight, p, d, pt, dt, pw, dw, n, c + 4 * G, s, G, has_w, keep,
                        eps_c, chain)
                    m, sh, acc = push_block8(m, sh, acc, x0, x1, x2, x3, x4, x5, x6, x7)
                    tw += ((t0 + t1) + (t2 + t3)) + ((t4 + t5) + (t6 + t7))
                    c += 8 * G
                if c < end:  # four more (not a loop)
                    m, sh, acc, tw, p, pt, pw = prob_stats_step4(
                        x, target, weight, p, d, pt, dt, pw, dw, n, c, s, G, has_w, keep, eps_c,
                        chain, m, sh, acc, tw)
                    c += 4 * G
            else:
                while c < end:
                    m, sh, acc, tw, p, pt, pw = prob_stats_step4(
                        x, target, weight, p, d, pt, dt, pw, dw, n, c, s, G, has_w, keep, eps_c,
                        chain, m, sh, acc, tw)
                    c += 4 * G
            if c < hi:  # the last 1-3 elements of this thread
                x1 = NEG_INF
                x2 = NEG_INF
                if c + G < hi:
                    x1 = xload(x, p + d, n, c + G, s)
                    tw += target_weight(target, weight, pt + dt, pw + dw, n, c + G, s, has_w,
                                        keep, eps_c)
                if c + 2 * G < hi:
                    x2 = xload(x, p + 2 * d, n, c + 2 * G, s)
                    tw += target_weight(target, weight, pt + 2 * dt, pw + 2 * dw, n, c + 2 * G,
                                        s, has_w, keep, eps_c)
                tw += target_weight(target, weight, pt, pw, n, c, s, has_w, keep, eps_c)
                m, sh, acc = push_block4(m, sh, acc, xload(x, p, n, c, s), x1, x2, NEG_INF)
            m, acc = allreduce_max_sumexp(m, acc, G)
            tw, _ = allreduce_sum2(tw, ZERO, G)
            m, L = shift_log_sum(m, acc)
            if lse_out.ndim == 1:
                if valid and lane == 0:
                    lse_out[r] = m + L
            # Pass 2: the loss terms and the gradient.
            g = upstream(gout, g0, r, mean, denom)
            zz = ftype(2) * z_loss * (m + L) if z_loss != ZERO else ZERO
            if want_grad:
                lsum = prob_row(x, target, weight, grad, n, s, lo, hi, lane, G, has_w, True,
                                keep, eps_c, m, L, safe_shift(m), inv_sum(m, acc), g * (tw + zz),
                                g, chain)
            else:
                lsum = prob_row(x, target, weight, grad, n, s, lo, hi, lane, G, has_w, False,
                                keep, eps_c, m, L, safe_shift(m), inv_sum(m, acc), g * (tw + zz),
                                g, chain)
            if lane == 0 and z_loss != ZERO:
                lsum += z_loss * (m + L) * (m + L)
            lsum, _ = allreduce_sum2(lsum, ZERO, G)
            if valid and lane == 0:
                loss[r] = lsum
        return prob_kernel

    return SimpleNamespace(prepare_kernel=prepare_kernel,
                           index_kernel=make_index_kernel(False),
                           index_kernel_weighted=make_index_kernel(True),
                           prob_kernel=make_prob_kernel(False),
                           prob_kernel_weighted=make_prob_kernel(True),
                           upstream=upstream)
