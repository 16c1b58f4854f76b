"""CUDA kernels for binary cross-entropy on probabilities and on logits: elementwise over
flat, contiguous arrays of the compute dtype, one grid-stride loop (one template) for all.

Each call reads ``x`` and ``y`` once: the target's value check (the CPU path's data check:
NaN, infinite, or outside [0, 1] for probabilities) is done by the loss kernel on the values
it loads, and for reduction 'mean'/'sum' no per-element loss is written: every block sums
its elements (each thread in grid-stride order, then the block's fixed-order tree, so the
result is the same bits on every run) into one partial, which ``sum_kernel`` adds up.

``weight`` is empty or already broadcast to the input's size; ``pos_weight`` is empty or
indexed ``i % len(pos_weight)`` (its length is 1, the last axis' length, or the input's size).
"""
from types import SimpleNamespace

from numba import cuda, int32, int64

from .memory import load1, store1

__all__ = ["build_bce", "BAD_INPUT", "BAD_TARGET"]

# The two entries of the kernels' error flag: the first position (C order) of an input that
# is not a probability, and of a target that fails its check.
BAD_INPUT, BAD_TARGET = 0, 1


def build_bce(P):
    """Kernels for the primitives ``P`` of one compute dtype.

    Returns
    -------
    types.SimpleNamespace
        ``bce_kernel``, ``bce_logits_kernel`` (the loss) and their fused loss + gradient twins
        ``bce_grad_kernel``, ``bce_logits_grad_kernel`` write the per-element loss
        (reduction='none'); the ``*_sum_kernel`` twins of the four write one partial sum of
        the loss per block instead (``out`` has ``gridDim.x`` elements).  All eight are made
        by one template with the arguments ``(x, y, weight, pos_weight, gout, g0, scale,
        out, grad, flag)``: ``pos_weight`` is empty for the probabilities form,
        ``gout``/``grad`` empty where a kernel does not read or write them; ``flag`` (two
        int64, both starting at the element count) is lowered (atomic min) to the first bad
        position: ``flag[BAD_INPUT]`` for a probability outside [0, 1] or NaN,
        ``flag[BAD_TARGET]`` for a target outside [0, 1] (probabilities form) or not finite
        (logits form).
    """
    ZERO, ONE, INF = P.ZERO, P.ONE, P.INF
    FLOOR = P.ftype(-100)
    EPS = P.ftype(1e-12)  # torch's floor of p (1 - p) in the gradient
    exp, log, log1p = P.exp, P.log, P.log1p
    allreduce_sum2 = P.allreduce_sum2

    @cuda.jit(device=True)
    def bce_loss(pi, yi, pwi, n_pw):
        """-(y max(log p, -100) + (1 - y) max(log(1 - p), -100)), torch's clamp (a p outside
        [0, 1] gives a meaningless value: the kernel flags it and the host raises)."""
        lp = max(log(pi), FLOOR)
        lq = max(log(ONE - pi), FLOOR)
        return -(yi * lp + (ONE - yi) * lq)

    @cuda.jit(device=True)
    def in_unit_interval(v):
        return v >= ZERO and v <= ONE  # False for NaN

    @cuda.jit(device=True)
    def bce_grad(pi, yi, pwi, n_pw):
        """torch's backward ``(p - y) / max((1 - p) p, 1e-12)`` (not the gradient of the
        clamped loss)."""
        return (pi - yi) / max((ONE - pi) * pi, EPS)

    @cuda.jit(device=True)
    def logits_loss(xi, yi, pwi, n_pw):
        """The stable form (1 - y) x + lw (log1p(exp(-|x|)) + max(-x, 0)), with
        lw = 1 + (pos_weight - 1) y."""
        softplus_neg = log1p(exp(-abs(xi))) + max(-xi, ZERO)
        lw = ONE + (pwi - ONE) * yi if n_pw > 0 else ONE
        return (ONE - yi) * xi + lw * softplus_neg

    @cuda.jit(device=True)
    def finite(v):
        return abs(v) < INF  # False for NaN and +-inf

    @cuda.jit(device=True)
    def any_value(v):
        return True  # every logit is a valid input (a compile-time constant)

    @cuda.jit(device=True)
    def logits_grad(xi, yi, pwi, n_pw):
        """d loss / dx = lw sigmoid(x) - pw y; the sigmoid from exp(-|x|), per sign, so that
        it keeps its relative precision where it is small."""
        e = exp(-abs(xi))
        sig = ONE / (ONE + e) if xi >= ZERO else e / (ONE + e)
        if n_pw > 0:
            return (ONE + (pwi - ONE) * yi) * sig - pwi * yi
        return sig - yi

    @cuda.jit(device=True)
    def upstream(gout, g0, i, scale):
        """Element i's upstream gradient: ``gout[i]`` ('none' with a grad_output), ``gout[0]``
        (a device scalar) or ``g0``; times ``scale`` (1 / n for 'mean')."""
        n_g = gout.shape[0]
        if n_g > 1:
            g = load1(gout, i)
        elif n_g == 1:
            g = load1(gout, 0)
        else:
            g = g0
        return g * scale

    def elementwise(loss_at, input_ok, target_ok, grad_at, want_grad, reduced):
        """The grid-stride loop shared by the eight kernels: two positions a step, their
        loads issued together; ``w * loss_at(...)`` goes to ``out[i]`` or, when ``reduced``
        (a compile-time constant), into the thread's running sum; when ``want_grad`` (also
        compile-time), ``grad`` gets ``g * w * grad_at(...)``.  The checks cost a compare or
        two an element and a select a step: a thread notes the first loop step at which it
        met an input failing ``input_ok`` or a target failing ``target_ok``, and after its
        loop (a rare, cold path) lowers the flag to that step's first failing position.
        ``pos_weight[k]`` with ``k = i % len(pos_weight)`` advancing by ``stride % len``
        with a carry: no division per element."""

        @cuda.jit(device=True)
        def flag_first(flag, entry, ok, a, step, start, stride):
            """Lower ``flag[entry]`` to the first failing position of the two that the
            thread read at loop step ``step`` (``ok`` the check, ``a`` the array): the cold
            path after the loop, straight-line code."""
            p = start + 2 * int64(step) * stride
            cuda.atomic.min(flag, entry, p if not ok(load1(a, p)) else p + stride)

        @cuda.jit(device=True)
        def one(x0, y0, w0, pw0, has_w, n_pw, gout, g0, scale, out, grad, i, acc):
            v = loss_at(x0, y0, pw0, n_pw)
            v = v * w0 if has_w else v
            if reduced:
                acc += v
            else:
                store1(out, i, v)
            if want_grad:
                store1(grad, i, upstream(gout, g0, i, scale) * w0 * grad_at(x0, y0, pw0, n_pw))
            return acc

        @cuda.jit
        def kernel(x, y, weight, pos_weight, gout, g0, scale, out, grad, flag):
            has_w = weight.shape[0] > 0
            n_pw = pos_weight.shape[0]
            i = int64(cuda.grid(1))  # 64-bit: inputs may exceed 2**31 elements
            stride = int64(cuda.gridsize(1))
            start = i
            n = x.shape[0]
            k = i % n_pw if n_pw > 0 else i
            sk = stride % n_pw if n_pw > 0 else stride
            acc = ZERO
            step = int32(0)
            bad_x_step = int32(-1)  # the first loop step that met a bad input (-1: none)
            bad_y_step = int32(-1)  # ... a bad target
            while i < n:
                j = i + stride
                more = j < n
                k1 = k + sk
                if k1 >= n_pw:
                    k1 -= n_pw
                x0 = load1(x, i)
                y0 = load1(y, i)
                # the second position's padding passes both checks
                x1 = load1(x, j) if more else ZERO
                y1 = load1(y, j) if more else ZERO
                w0 = load1(weight, i) if has_w else ONE
                w1 = load1(weight, j) if (has_w and more) else ONE
                pw0 = load1(pos_weight, k) if n_pw > 0 else ONE
                pw1 = load1(pos_weight, k1) if (n_pw > 0 and more) else ONE
                if bad_x_step < 0 and not (input_ok(x0) and input_ok(x1)):
                    bad_x_step = step
                if bad_y_step < 0 and not (target_ok(y0) and target_ok(y1)):
                    bad_y_step = step
                acc = one(x0, y0, w0, pw0, has_w, n_pw, gout, g0, scale, out, grad, i, acc)
                if more:
                    acc = one(x1, y1, w1, pw1, has_w, n_pw, gout, g0, scale, out, grad, j,
                              acc)
                i += 2 * stride
                step = int32(step + int32(1))
                k = k1 + sk
                if k >= n_pw:
                    k -= n_pw
            if bad_x_step >= 0:
                flag_first(flag, BAD_INPUT, input_ok, x, bad_x_step, start, stride)
            if bad_y_step >= 0:
                flag_first(flag, BAD_TARGET, target_ok, y, bad_y_step, start, stride)
            if reduced:
                # Every thread of the block gets here (no early return): the block's
                # all-reduce needs them all.
                acc, _ = allreduce_sum2(acc, ZERO, cuda.blockDim.x)
                if cuda.threadIdx.x == 0:
                    out[cuda.blockIdx.x] = acc

        return kernel

    # (loss, input check, target check, gradient) of the two forms
    forms = {"bce": (bce_loss, in_unit_interval, in_unit_interval, bce_grad),
             "bce_logits": (logits_loss, any_value, finite, logits_grad)}
    ns = SimpleNamespace()
    for name, (loss_at, input_ok, target_ok, grad_at) in forms.items():
        for want_grad in (False, True):
            for reduced in (False, True):
                kname = name + ("_grad" if want_grad else "") + ("_sum" if reduced else "")
                setattr(ns, kname + "_kernel", elementwise(loss_at, input_ok, target_ok,
                                                           grad_at, want_grad, reduced))
    return ns
