"""CUDA kernels for binary cross-entropy on probabilities and on logits: elementwise over
flat, contiguous arrays of the compute dtype, one grid-stride loop (one template) for all.

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
        ``bce_kernel``, ``bce_logits_kernel`` (the loss) and their fused loss + gradient twins
        ``bce_grad_kernel``, ``bce_logits_grad_kernel``, all four made by one template with
        the arguments ``(x, y, weight, pos_weight, gout, g0, scale, out, grad, flag)``:
        ``pos_weight`` is empty for the probabilities form, ``gout``/``grad`` empty and
        ``flag`` unused where a kernel does not read or write them.
    """
    ZERO, ONE, NAN = P.ZERO, P.ONE, P.NAN
    FLOOR = P.ftype(-100)
    EPS = P.ftype(1e-12)  # torch's floor of p (1 - p) in the gradient
    exp, log, log1p = P.exp, P.log, P.log1p

    @cuda.jit(device=True)
    def bce_loss(pi, yi, pwi, n_pw, flag, i):
        """-(y max(log p, -100) + (1 - y) max(log(1 - p), -100)), torch's clamp.  A p outside
        [0, 1] (or NaN) lowers ``flag[0]`` to its position (atomic min) for the host to raise,
        and is not passed to log."""
        if pi >= ZERO and pi <= ONE:
            lp = max(log(pi), FLOOR)
            lq = max(log(ONE - pi), FLOOR)
            return -(yi * lp + (ONE - yi) * lq)
        cuda.atomic.min(flag, 0, i)
        return NAN

    @cuda.jit(device=True)
    def bce_grad(pi, yi, pwi, n_pw):
        """torch's backward ``(p - y) / max((1 - p) p, 1e-12)`` (not the gradient of the
        clamped loss)."""
        return (pi - yi) / max((ONE - pi) * pi, EPS)

    @cuda.jit(device=True)
    def logits_loss(xi, yi, pwi, n_pw, flag, i):
        """The stable form (1 - y) x + lw (log1p(exp(-|x|)) + max(-x, 0)), with
        lw = 1 + (pos_weight - 1) y."""
        softplus_neg = log1p(exp(-abs(xi))) + max(-xi, ZERO)
        lw = ONE + (pwi - ONE) * yi if n_pw > 0 else ONE
        return (ONE - yi) * xi + lw * softplus_neg

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

    def elementwise(loss_at, grad_at, want_grad):
        """The grid-stride loop shared by the four kernels: two positions a step, their loads
        issued together; ``out`` gets ``w * loss_at(...)`` and, when ``want_grad`` (a
        compile-time constant), ``grad`` gets ``g * w * grad_at(...)``.  ``pos_weight[k]``
        with ``k = i % len(pos_weight)`` advancing by ``stride % len`` with a carry: no
        division per element."""

        @cuda.jit(device=True)
        def one(x0, y0, w0, pw0, has_w, n_pw, gout, g0, scale, out, grad, flag, i):
            v = loss_at(x0, y0, pw0, n_pw, flag, i)
            store1(out, i, v * w0 if has_w else v)
            if want_grad:
                store1(grad, i, upstream(gout, g0, i, scale) * w0 * grad_at(x0, y0, pw0, n_pw))

        @cuda.jit
        def kernel(x, y, weight, pos_weight, gout, g0, scale, out, grad, flag):
            has_w = weight.shape[0] > 0
            n_pw = pos_weight.shape[0]
            i = int64(cuda.grid(1))  # 64-bit: inputs may exceed 2**31 elements
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
                one(x0, y0, w0, pw0, has_w, n_pw, gout, g0, scale, out, grad, flag, i)
                if more:
                    one(x1, y1, w1, pw1, has_w, n_pw, gout, g0, scale, out, grad, flag, j)
                i += 2 * stride
                k = k1 + sk
                if k >= n_pw:
                    k -= n_pw

        return kernel

    return SimpleNamespace(bce_kernel=elementwise(bce_loss, bce_grad, False),
                           bce_logits_kernel=elementwise(logits_loss, logits_grad, False),
                           bce_grad_kernel=elementwise(bce_loss, bce_grad, True),
                           bce_logits_grad_kernel=elementwise(logits_loss, logits_grad, True))
