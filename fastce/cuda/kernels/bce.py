"""CUDA kernels for binary cross-entropy on probabilities and on logits: elementwise over
flat, contiguous arrays of the compute dtype, one grid-stride loop each.

``weight`` is empty or already broadcast to the input's size; ``pos_weight`` is empty or
indexed ``i % len(pos_weight)`` (its length is 1, the last axis' length, or the input's size).
"""
from types import SimpleNamespace

from numba import cuda, int64

from .memory import load1, store1

__all__ = ["build_bce"]


def build_bce(P):
    """Kernels for the primitives ``P`` of one compute dtype.

    Returns
    -------
    types.SimpleNamespace
        ``bce_kernel(p, y, weight, out, flag)``,
        ``bce_logits_kernel(x, y, weight, pos_weight, out)`` and their fused forward +
        gradient twins ``bce_grad_kernel(p, y, weight, gout, g0, scale, out, grad, flag)``,
        ``bce_logits_grad_kernel(x, y, weight, pos_weight, gout, g0, scale, out, grad)``.
    """
    ZERO, ONE, NAN = P.ZERO, P.ONE, P.NAN
    FLOOR = P.ftype(-100)
    exp, log, log1p = P.exp, P.log, P.log1p

    @cuda.jit(device=True)
    def bce_one(p, y, weight, out, flag, i, has_w, pi, yi, wi):
        """Element i of :func:`bce_kernel` from its loaded values."""
        v = NAN
        if pi >= ZERO and pi <= ONE:
            lp = max(log(pi), FLOOR)
            lq = max(log(ONE - pi), FLOOR)
            v = -(yi * lp + (ONE - yi) * lq)
            if has_w:
                v *= wi
        else:
            cuda.atomic.min(flag, 0, i)
        store1(out, i, v)

    @cuda.jit
    def bce_kernel(p, y, weight, out, flag):
        """out = -w * (y * max(log p, -100) + (1 - y) * max(log(1 - p), -100)), torch's
        clamp.  A p outside [0, 1] (or NaN) lowers ``flag[0]`` to its position (atomic
        min) for the host to raise, and is not passed to log.  Two positions a step, their
        loads issued together."""
        has_w = weight.shape[0] > 0
        i = int64(cuda.grid(1))  # 64-bit: inputs may exceed 2**31 elements
        stride = int64(cuda.gridsize(1))
        n = p.shape[0]
        while i < n:
            j = i + stride
            more = j < n
            p0 = load1(p, i)
            y0 = load1(y, i)
            p1 = load1(p, j) if more else ZERO
            y1 = load1(y, j) if more else ZERO
            w0 = load1(weight, i) if has_w else ONE
            w1 = load1(weight, j) if (has_w and more) else ONE
            bce_one(p, y, weight, out, flag, i, has_w, p0, y0, w0)
            if more:
                bce_one(p, y, weight, out, flag, j, has_w, p1, y1, w1)
            i += 2 * stride

    @cuda.jit(device=True)
    def bce_logits_one(xi, yi, wi, pwi, has_w, n_pw):
        softplus_neg = log1p(exp(-abs(xi))) + max(-xi, ZERO)
        lw = ONE + (pwi - ONE) * yi if n_pw > 0 else ONE
        v = (ONE - yi) * xi + lw * softplus_neg
        return v * wi if has_w else v

    @cuda.jit
    def bce_logits_kernel(x, y, weight, pos_weight, out):
        """The stable form (1 - y) x + lw (log1p(exp(-|x|)) + max(-x, 0)), with
        lw = 1 + (pos_weight - 1) y.  Two positions a step, their loads issued together."""
        has_w = weight.shape[0] > 0
        n_pw = pos_weight.shape[0]
        i = int64(cuda.grid(1))  # 64-bit: inputs may exceed 2**31 elements
        stride = int64(cuda.gridsize(1))
        n = x.shape[0]
        # k = i % n_pw advances by stride % n_pw with a carry: no division per element.
        k = i % n_pw if n_pw > 0 else i
        sk = stride % n_pw if n_pw > 0 else stride
        while i < n:
            j = i + stride
            more = j < n
            k1 = k + sk
            if k1 >= n_pw:
                k1 -= n_pw
            x0 = load1(x, i)
            y0 = load1(y, i)
            x1 = load1(x, j) if more else ZERO
            y1 = load1(y, j) if more else ZERO
            w0 = load1(weight, i) if has_w else ONE
            w1 = load1(weight, j) if (has_w and more) else ONE
            pw0 = load1(pos_weight, k) if n_pw > 0 else ONE
            pw1 = load1(pos_weight, k1) if (n_pw > 0 and more) else ONE
            store1(out, i, bce_logits_one(x0, y0, w0, pw0, has_w, n_pw))
            if more:
                store1(out, j, bce_logits_one(x1, y1, w1, pw1, has_w, n_pw))
            i += 2 * stride
            k = k1 + sk
            if k >= n_pw:
                k -= n_pw

    EPS = P.ftype(1e-12)  # torch's floor of p (1 - p) in the gradient

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

    @cuda.jit
    def bce_grad_kernel(p, y, weight, gout, g0, scale, out, grad, flag):
        """:func:`bce_kernel`'s loss into ``out`` and, from the same loads, its gradient
        ``g w (p - y) / max((1 - p) p, 1e-12)`` into ``grad`` (torch's backward: not the
        gradient of the clamped loss).  Two positions a step."""
        has_w = weight.shape[0] > 0
        i = int64(cuda.grid(1))
        stride = int64(cuda.gridsize(1))
        n = p.shape[0]
        while i < n:
            j = i + stride
            more = j < n
            p0 = load1(p, i)
            y0 = load1(y, i)
            p1 = load1(p, j) if more else ZERO
            y1 = load1(y, j) if more else ZERO
            w0 = load1(weight, i) if has_w else ONE
            w1 = load1(weight, j) if (has_w and more) else ONE
            bce_one(p, y, weight, out, flag, i, has_w, p0, y0, w0)
            store1(grad, i, upstream(gout, g0, i, scale) * w0 * (p0 - y0)
                   / max((ONE - p0) * p0, EPS))
            if more:
                bce_one(p, y, weight, out, flag, j, has_w, p1, y1, w1)
                store1(grad, j, upstream(gout, g0, j, scale) * w1 * (p1 - y1)
                       / max((ONE - p1) * p1, EPS))
            i += 2 * stride

    @cuda.jit(device=True)
    def bce_logits_grad_one(xi, yi, pwi, n_pw):
        """d loss / dx = lw sigmoid(x) - pw y with lw = 1 + (pw - 1) y; the sigmoid from
        exp(-|x|), per sign, so that it keeps its relative precision where it is small."""
        e = exp(-abs(xi))
        sig = ONE / (ONE + e) if xi >= ZERO else e / (ONE + e)
        if n_pw > 0:
            return (ONE + (pwi - ONE) * yi) * sig - pwi * yi
        return sig - yi

    @cuda.jit
    def bce_logits_grad_kernel(x, y, weight, pos_weight, gout, g0, scale, out, grad):
        """:func:`bce_logits_kernel`'s loss into ``out`` and its gradient
        ``g w (lw sigmoid(x) - pos_weight y)`` into ``grad``.  Two positions a step."""
        has_w = weight.shape[0] > 0
        n_pw = pos_weight.shape[0]
        i = int64(cuda.grid(1))
        stride = int64(cuda.gridsize(1))
        n = x.shape[0]
        k = i % n_pw if n_pw > 0 else i
        sk = stride % n_pw if n_pw > 0 else stride
        while i < n:
            j = i + stride
            more = j < n
            k1 = k + sk
            if k1 >= n_pw:
                k1 -= n_pw
            x0 = load1(x, i)
            y0 = load1(y, i)
            x1 = load1(x, j) if more else ZERO
            y1 = load1(y, j) if more else ZERO
            w0 = load1(weight, i) if has_w else ONE
            w1 = load1(weight, j) if (has_w and more) else ONE
            pw0 = load1(pos_weight, k) if n_pw > 0 else ONE
            pw1 = load1(pos_weight, k1) if (n_pw > 0 and more) else ONE
            store1(out, i, bce_logits_one(x0, y0, w0, pw0, has_w, n_pw))
            store1(grad, i, upstream(gout, g0, i, scale) * w0
                   * bce_logits_grad_one(x0, y0, pw0, n_pw))
            if more:
                store1(out, j, bce_logits_one(x1, y1, w1, pw1, has_w, n_pw))
                store1(grad, j, upstream(gout, g0, j, scale) * w1
                       * bce_logits_grad_one(x1, y1, pw1, n_pw))
            i += 2 * stride
            k = k1 + sk
            if k >= n_pw:
                k -= n_pw

    return SimpleNamespace(bce_kernel=bce_kernel, bce_logits_kernel=bce_logits_kernel,
                           bce_grad_kernel=bce_grad_kernel,
                           bce_logits_grad_kernel=bce_logits_grad_kernel)
