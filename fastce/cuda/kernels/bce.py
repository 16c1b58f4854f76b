"""CUDA kernels for binary cross-entropy on probabilities and on logits: elementwise over
flat, contiguous arrays of the compute dtype, one grid-stride loop each.

``weight`` is empty or already broadcast to the input's size; ``pos_weight`` is empty or
indexed ``i % len(pos_weight)`` (its length is 1, the last axis' length, or the input's size).
"""
from types import SimpleNamespace

from numba import cuda, int64

__all__ = ["build_bce"]


def build_bce(P):
    """Kernels for the primitives ``P`` of one compute dtype.

    Returns
    -------
    types.SimpleNamespace
        ``bce_kernel(p, y, weight, out, flag)`` and
        ``bce_logits_kernel(x, y, weight, pos_weight, out)``.
    """
    ZERO, ONE, NAN = P.ZERO, P.ONE, P.NAN
    FLOOR = P.ftype(-100)
    exp, log, log1p = P.exp, P.log, P.log1p

    @cuda.jit
    def bce_kernel(p, y, weight, out, flag):
        """out = -w * (y * max(log p, -100) + (1 - y) * max(log(1 - p), -100)), torch's
        clamp.  A p outside [0, 1] (or NaN) lowers ``flag[0]`` to its position (atomic
        min) for the host to raise, and is not passed to log."""
        has_w = weight.shape[0] > 0
        i = int64(cuda.grid(1))  # 64-bit: inputs may exceed 2**31 elements
        stride = int64(cuda.gridsize(1))
        while i < p.shape[0]:
            pi = p[i]
            if pi >= ZERO and pi <= ONE:
                lp = max(log(pi), FLOOR)
                lq = max(log(ONE - pi), FLOOR)
                v = -(y[i] * lp + (ONE - y[i]) * lq)
                out[i] = v * weight[i] if has_w else v
            else:
                cuda.atomic.min(flag, 0, i)
                out[i] = NAN
            i += stride

    @cuda.jit
    def bce_logits_kernel(x, y, weight, pos_weight, out):
        """The stable form (1 - y) x + lw (log1p(exp(-|x|)) + max(-x, 0)), with
        lw = 1 + (pos_weight - 1) y."""
        has_w = weight.shape[0] > 0
        n_pw = pos_weight.shape[0]
        i = int64(cuda.grid(1))  # 64-bit: inputs may exceed 2**31 elements
        stride = int64(cuda.gridsize(1))
        while i < x.shape[0]:
            xi = x[i]
            yi = y[i]
            softplus_neg = log1p(exp(-abs(xi))) + max(-xi, ZERO)
            lw = ONE + (pos_weight[i % n_pw] - ONE) * yi if n_pw > 0 else ONE
            v = (ONE - yi) * xi + lw * softplus_neg
            out[i] = v * weight[i] if has_w else v
            i += stride

    return SimpleNamespace(bce_kernel=bce_kernel, bce_logits_kernel=bce_logits_kernel)
