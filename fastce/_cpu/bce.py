"""CPU kernels for binary cross-entropy on probabilities and on logits (elementwise).

Arrays arrive flattened and C-contiguous; ``weight`` is either empty or already broadcast to
the input's size, ``pos_weight`` is empty or has the length of the input's last axis.
"""
import numpy as np
from numba import njit, prange

from .primitives import exp, kernel_twins, wide_vectors


@njit(error_model="numpy", cache=True, nogil=True)
def first_outside_unit_interval(p):
    """Index of the first element of ``p`` not in [0, 1] (NaN included), or -1."""
    for i in range(p.shape[0]):
        v = p[i]
        if not (v >= 0 and v <= 1):
            return i
    return -1


def _bce(p, y, weight, out):
    """out = -w * (y * max(log p, -100) + (1 - y) * max(log(1 - p), -100)), torch's clamp."""
    wide_vectors()
    has_w = weight.shape[0] > 0
    floor = p.dtype.type(-100)
    one = p.dtype.type(1)
    for i in prange(p.shape[0]):
        lp = max(np.log(p[i]), floor)
        lq = max(np.log(one - p[i]), floor)
        v = -(y[i] * lp + (one - y[i]) * lq)
        out[i] = v * weight[i] if has_w else v


def _bce_with_logits(x, y, weight, pos_weight, out):
    """The stable form: (1 - y) * x + lw * (log1p(exp(-|x|)) + max(-x, 0)), with
    lw = 1 + (pos_weight - 1) * y (lw = 1 without pos_weight)."""
    wide_vectors()
    has_w = weight.shape[0] > 0
    n_pw = pos_weight.shape[0]
    one = x.dtype.type(1)
    zero = x.dtype.type(0)
    for i in prange(x.shape[0]):
        xi = x[i]
        yi = y[i]
        softplus_neg = np.log1p(exp(-abs(xi))) + max(-xi, zero)
        lw = one + (pos_weight[i % n_pw] - one) * yi if n_pw > 0 else one
        v = (one - yi) * xi + lw * softplus_neg
        out[i] = v * weight[i] if has_w else v


bce, bce_serial = kernel_twins(_bce)
bce_with_logits, bce_with_logits_serial = kernel_twins(_bce_with_logits)
