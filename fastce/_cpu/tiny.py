"""The tiny-call cross-entropy kernel: a few tens of logits, scalar, in float64.

For calls of up to ``_config.TINY_MAX_ELEMENTS`` logits the first call's compile time, not
the arithmetic, is what the user waits for: the vectorized small entry
(``cross_entropy.ce_index_small``) composes some thirty primitives and compiles for seconds
in a fresh process (docs/performance.md, "First call").  This kernel is one self-contained
function on libm's scalar ``exp``/``log1p`` (no njit callee but the inlined TwoSum): it
compiles in a fraction of that and, at these sizes, runs as fast.

Per row, in float64 whatever the logits' dtype (float32 results are rounded once, at the
store): ``m`` the row's max at position ``k`` (the target's position when it holds the max),
``rest = sum_{j != k} exp(x_j - m)`` TwoSum-compensated, each difference exact (a float64
difference's rounding error recovered with TwoSum and applied as ``exp(d) (1 + e)``), and

    loss = (m - x_t) + log1p(rest),    grad_j = g exp(x_j - m) / (1 + rest) - g [j == t],

with the target's gradient ``-g rest / (1 + rest)`` when it holds the max: full relative
precision for confident rows (issue #13), like the general path's second pass.

The corners follow the general path (docs/semantics.md): a row whose max is NaN or +inf
has a NaN gradient row; a fully masked row (max -inf) costs +inf; a target on a -inf logit
costs +inf; a NaN logit makes its row's loss NaN; ignored rows have 0 loss and gradient.
"""
import math

import numpy as np
from numba import njit

from .primitives import two_sum_inlined


@njit(error_model="numpy", cache=True, nogil=True)
def ce_index_tiny(x, target, ignore_index, mean, grad):
    """Cross-entropy of C-contiguous (N, C) logits and int64 class indices, no weight, no
    smoothing, "mean" (``mean``) or "sum", and its gradient into ``grad`` (0 rows: forward
    only), in one call.  Returns (loss as float64, first invalid target position or -1);
    with an invalid target nothing is computed (the caller raises the error)."""
    N, C = x.shape
    want_grad = grad.shape[0] > 0
    denom = 0
    for i in range(N):
        t = target[i]
        if t != ignore_index:
            if t < 0 or t >= C:
                return 0.0, i
            denom += 1
    g = (1.0 / denom if denom > 0 else 0.0) if mean else 1.0
    total = 0.0
    for i in range(N):
        t = target[i]
        if t == ignore_index:
            if want_grad:
                for j in range(C):
                    grad[i, j] = 0
            continue
        m = np.float64(x[i, 0])
        k = 0
        nan = m != m
        for j in range(1, C):
            v = np.float64(x[i, j])
            if v > m:
                m = v
                k = j
            nan |= v != v
        xt = np.float64(x[i, t])
        if xt == m:
            k = t
        if nan:
            m = np.nan
        rest = 0.0
        rest_lo = 0.0
        for j in range(C):
            d, e = two_sum_inlined(np.float64(x[i, j]), -m)
            v = math.exp(d)
            if v != 0:          # (a -inf logit: e is NaN, its term stays 0)
                v += v * e
            if want_grad:
                grad[i, j] = v
            if j != k:
                rest, err = two_sum_inlined(rest, v)
                rest_lo += err
        rest += rest_lo
        total += np.inf if m == -np.inf else (m - xt) + math.log1p(rest)
        if want_grad:
            inv = g / (1.0 + rest) if abs(m) < np.inf else np.nan
            for j in range(C):
                grad[i, j] = grad[i, j] * inv
            if t == k and abs(m) < np.inf:
                grad[i, t] = -rest * inv
            else:
                grad[i, t] = grad[i, t] - g
    if mean:
        total = total / denom if denom > 0 else np.nan
    return total, -1
