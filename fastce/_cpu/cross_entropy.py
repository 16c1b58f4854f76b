"""CPU kernels for cross-entropy with class-index or class-probability targets, forward and
fused forward + gradient.

Per row the kernels keep the partials explicit: (shift, sum-exp) -> lse, the target logit, and
for label smoothing the weighted sum of (lse - x_c).  Every ``lse - x`` is evaluated as
``(shift - x) + log(sum)`` (see ``shift_log_sum``) so that large logits keep the loss's low
bits.  The loss of row i is

    (1 - eps) * w[t] * (lse - x[t]) + eps / C * sum_c w[c] * (lse - x[c])

and its gradient, scaled by the upstream factor g_i (1/denominator for "mean"),

    g_i * (A * p_c - eps / C * w[c] - (1 - eps) * w[t] * [c == t]),
    A = (1 - eps) * w[t] + eps / C * sum_c w[c].

With the large-vocabulary options, every logit is first soft-capped, ``y = cap tanh(x /
cap)`` (``cap`` None: the kernels compile without it, see ``primitives.softcap``), the
statistics above are the capped row's, and a non-ignored row's loss gets ``z_loss * lse**2``
(unweighted; its gradient ``2 z_loss lse p_c`` joins A); every gradient element is then
multiplied by ``dy/dx = 1 - (y / cap)**2``.  ``lse_out`` receives each row's lse, ignored
rows included.  ``z_loss`` and ``lse_out`` are None when not used: like ``cap``, numba then
compiles the kernels without them (``if arg is None`` on an argument is decided at compile
time), so the default path runs the code it ran before the options existed.

Rows are unnormalized here; ``fastce._cross_entropy`` applies the reduction.  Gradient rows are written
right after the row's statistics, while the row is still in L2: one read of the logits from
memory and one write.  Targets arrive validated (in range or ``ignore_index``).
"""
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .._config import FASTMATH
from .primitives import (confident, exp_term, inv_sum, kernel_twins, log1p,
                         lse_from_max_sumexp, lse_minus, rest_sum, row_exact_max_sumexp,
                         row_max_sumexp, safe_shift, shift_log_sum, softcap, softcap_grad,
                         spatial_rest_sum, wide_vectors)
from .stats import spatial_block_stats, spatial_blocks


@njit(fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
def check_index_target(target, n_classes, ignore_index, weight):
    """One pass over the class-index targets: the first invalid position (-1 if none) and the
    denominator of torch's "mean" (sum of the weights of the non-ignored targets).

    The denominator is summed in float64 whatever the logits' dtype: it is a count or a sum of
    up to N weights, and rounding it would bias every row's gradient alike.
    """
    has_w = weight.shape[0] > 0
    denom = 0.0
    for i in range(target.shape[0]):
        t = target[i]
        if t == ignore_index:
            continue
        if t < 0 or t >= n_classes:
            return i, denom
        denom += weight[t] if has_w else 1.0
    return -1, denom


@njit(fastmath=FASTMATH, error_model="numpy")
def _upstream(gscale, i):
    return gscale[i] if gscale.shape[0] > 1 else gscale[0]


@njit(fastmath=FASTMATH, error_model="numpy")
def _target_grad(rest, g, keep_wt, eps_c, w_total, w_t, zz):
    """The target's gradient ``g (keep w_t (p_t - 1) + eps/C (w_total p_t - w_t) + zz p_t)``
    of a confident row (``zz = 2 z_loss lse``), with ``p_t - 1 = -rest / (1 + rest)`` taken
    from the row's rest sum instead of the cancelling ``p_t - 1`` (float64, rounded once at
    the store)."""
    p_t = np.float64(1) / (np.float64(1) + rest)
    return (g * (keep_wt * (-rest * p_t)) + (g * eps_c) * (w_total * p_t - w_t)
            + (g * zz) * p_t)


def _z_grad(z_loss, a, L):
    """``2 z_loss lse`` (``lse = a + L``), the z-loss's share of a row's softmax coefficient;
    0 without z-loss (``z_loss`` None).  Jitted code only."""
    raise NotImplementedError("fastce._cpu.cross_entropy._z_grad is for jitted code")


@overload(_z_grad, jit_options={"fastmath": FASTMATH, "error_model": "numpy"})
def _z_grad_impl(z_loss, a, L):
    if z_loss is None or isinstance(z_loss, (types.NoneType, types.Omitted)):
        return lambda z_loss, a, L: np.float32(0)
    return lambda z_loss, a, L: np.float32(2) * z_loss * (a + L)


def _ce_index_rows(x, target, ignore_index, weight, w_total, eps, gscale, grad,
                   loss_part, n_chunks, stat_m, stat_s, cap, z_loss, lse_out):
    """Rows layout (N, C).  ``weight`` empty means unweighted; ``grad`` with 0 rows means
    forward only.  ``loss_part[i, k]`` receives chunk k's share of row i's loss.  Rows are
    split (``n_chunks > 1``) only without ``cap``."""
    wide_vectors()
    N, C = x.shape
    has_w = weight.shape[0] > 0
    want_grad = grad.shape[0] > 0
    one = x.dtype.type(1)
    zero = x.dtype.type(0)
    eps_c = x.dtype.type(eps / C)
    keep = x.dtype.type(1 - eps)
    chunk = (C + n_chunks - 1) // n_chunks
    for u in prange(N * n_chunks):
        i = u // n_chunks
        k = u - i * n_chunks
        lo = k * chunk
        hi = min(lo + chunk, C)
        row = x[i, lo:hi]
        wrow = weight[lo:hi]
        t = target[i]
        if t == ignore_index:
            loss_part[i, k] = 0
            if want_grad:
                grow = grad[i, lo:hi]
                for c in range(grow.shape[0]):
                    grow[c] = 0
            if lse_out is not None:
                if k == 0:
                    if n_chunks == 1:
                        m, s = row_max_sumexp(x[i], cap)
                    else:
                        m, s = stat_m[i], stat_s[i]
                    lse_out[i] = lse_from_max_sumexp(m, s)
            continue
        if n_chunks == 1:
            m, s = row_max_sumexp(x[i], cap)
        else:
            m, s = stat_m[i], stat_s[i]
        a, L = shift_log_sum(m, s)
        w_t = weight[t] if has_w else one
        part = zero
        # The target's share (loss and gradient) belongs to the chunk that holds it.
        holds_t = lo <= t < hi
        rest = np.float64(-1)  # >= 0: the row is confident, rest = sum_{c != t} e^(x_c - x_t)
        if holds_t:
            # A target logit of -inf (masked class) costs +inf, even in an all-masked row.
            xt = softcap(x[i, t], cap)
            if xt != -np.inf:
                nll = lse_minus(a, L, xt)
                if xt > a and confident(xt - a, nll):
                    # The one-pass shift lies below the target, and the test widens with
                    # that gap: a target well above a stale block max (often the argmax, at
                    # p = 0.1) would take the precise pass for nothing.  Test again from the
                    # row's exact max (split rows have it already: split_row_stats).
                    m, s = row_exact_max_sumexp(x[i], cap)
                    a, L = shift_log_sum(m, s)
                    nll = lse_minus(a, L, xt)
                if confident(xt - a, nll):
                    rest = rest_sum(x[i], t, xt, cap)
                    nll = x.dtype.type(log1p(rest))
                part = keep * w_t * nll
            else:
                part = x.dtype.type(np.inf)
            if z_loss is not None:
                part += z_loss * (a + L) * (a + L)
        if lse_out is not None:
            if k == 0:
                lse_out[i] = a + L
        if eps > 0:
            acc = zero
            if has_w:
                for c in range(row.shape[0]):
                    acc += wrow[c] * lse_minus(a, L, softcap(row[c], cap))
            else:
                for c in range(row.shape[0]):
                    acc += lse_minus(a, L, softcap(row[c], cap))
            part += eps_c * acc
        loss_part[i, k] = part
        if want_grad:
            grow = grad[i, lo:hi]
            g = _upstream(gscale, i)
            sh = safe_shift(m)
            inv = inv_sum(m, s)
            zz = _z_grad(z_loss, a, L)
            ga = g * (keep * w_t + eps_c * w_total + zz)
            gb = g * eps_c
            if has_w:
                for c in range(row.shape[0]):
                    y = softcap(row[c], cap)
                    grow[c] = softcap_grad(ga * (exp_term(y - sh) * inv) - gb * wrow[c], y, cap)
            else:
                for c in range(row.shape[0]):
                    y = softcap(row[c], cap)
                    grow[c] = softcap_grad(ga * (exp_term(y - sh) * inv) - gb, y, cap)
            if holds_t:
                yt = softcap(x[i, t], cap)
                if rest >= 0:
                    grad[i, t] = softcap_grad(
                        _target_grad(rest, g, keep * w_t, eps_c, w_total, w_t, zz), yt, cap)
                else:
                    grad[i, t] -= softcap_grad(g * keep * w_t, yt, cap)


def _ce_index_spatial(x, target, ignore_index, weight, w_total, eps, gscale, grad, loss,
                      cap, z_loss, lse_out):
    """(N, C, S) layout; ``target``, ``loss`` and ``lse_out`` (unless None) are (N, S),
    ``gscale`` (N*S,) or (1,)."""
    wide_vectors()
    N, C, S = x.shape
    has_w = weight.shape[0] > 0
    want_grad = grad.shape[0] > 0
    one = x.dtype.type(1)
    zero = x.dtype.type(0)
    eps_c = x.dtype.type(eps / C)
    keep = x.dtype.type(1 - eps)
    for u in prange(spatial_blocks(x)):
        n, s0, s1, m, s, sh = spatial_block_stats(x, u, cap)
        B = s1 - s0
        lse = np.empty(B, dtype=x.dtype)
        acc = np.zeros(B, dtype=x.dtype)
        tn = target[n, s0:s1]
        for j in range(B):
            m[j], lse[j] = shift_log_sum(m[j], s[j])  # lse[j] holds L: lse = m + L
        if lse_out is not None:
            for j in range(B):
                lse_out[n, s0 + j] = m[j] + lse[j]
        if eps > 0:
            for c in range(C):
                wc = weight[c] if has_w else one
                xc = x[n, c, s0:s1]
                for j in range(B):
                    acc[j] += wc * lse_minus(m[j], lse[j], softcap(xc[j], cap))
        n_conf = 0
        for j in range(B):
            t = tn[j]
            if t == ignore_index:
                loss[n, s0 + j] = 0
                continue
            w_t = weight[t] if has_w else one
            xt = softcap(x[n, t, s0 + j], cap)
            if xt != -np.inf:
                v = lse_minus(m[j], lse[j], xt)
                n_conf += confident(xt - m[j], v)
                nll = keep * w_t * v
            else:
                nll = x.dtype.type(np.inf)
            loss[n, s0 + j] = nll + eps_c * acc[j]
        # Confident positions (the target holds the max, the loss is small): their rest sums
        # in one pass vectorized across the block's positions; rest < 0 marks the others.
        rest = np.empty(B if n_conf > 0 else 0, dtype=np.float64)
        if n_conf > 0:
            pivot = np.zeros(B, dtype=np.float64)
            skip = np.full(B, -1, dtype=np.int64)
            for j in range(B):
                t = tn[j]
                if t != ignore_index:
                    xt = softcap(x[n, t, s0 + j], cap)
                    if xt != -np.inf and confident(xt - m[j], lse_minus(m[j], lse[j], xt)):
                        pivot[j] = xt
                        skip[j] = t
            spatial_rest_sum(x, n, s0, s1, pivot, skip, rest, cap)
            for j in range(B):
                if skip[j] < 0:
                    rest[j] = -1
                else:
                    t = tn[j]
                    w_t = weight[t] if has_w else one
                    loss[n, s0 + j] = keep * w_t * x.dtype.type(log1p(rest[j])) + eps_c * acc[j]
        if z_loss is not None:
            for j in range(B):
                if tn[j] != ignore_index:
                    loss[n, s0 + j] += z_loss * (m[j] + lse[j]) * (m[j] + lse[j])
        if want_grad:
            # Per position: zz <- 2 z_loss lse, acc <- g*A and lse <- g*eps/C (both 0 where
            # ignored), s <- 1/s.
            if z_loss is not None:
                zz = np.zeros(B, dtype=x.dtype)
            for j in range(B):
                t = tn[j]
                g = _upstream(gscale, n * S + s0 + j)
                if t == ignore_index:
                    acc[j] = 0
                    lse[j] = 0
                else:
                    w_t = weight[t] if has_w else one
                    zj = zero
                    if z_loss is not None:
                        zj = _z_grad(z_loss, m[j], lse[j])
                        zz[j] = zj
                    acc[j] = g * (keep * w_t + eps_c * w_total + zj)
                    lse[j] = g * eps_c
                s[j] = inv_sum(m[j], s[j])  # m still holds the shift
            for c in range(C):
                wc = weight[c] if has_w else one
                xc = x[n, c, s0:s1]
                gc = grad[n, c, s0:s1]
                for j in range(B):
                    y = softcap(xc[j], cap)
                    gc[j] = softcap_grad(acc[j] * (exp_term(y - sh[j]) * s[j]) - lse[j] * wc,
                                         y, cap)
            for j in range(B):
                t = tn[j]
                if t == ignore_index:
                    # Exactly 0, also where the logits hold NaN or -inf (acc = 0 alone would
                    # leave 0 * NaN).
                    for c in range(C):
                        grad[n, c, s0 + j] = 0
                else:
                    w_t = weight[t] if has_w else one
                    g = _upstream(gscale, n * S + s0 + j)
                    yt = softcap(x[n, t, s0 + j], cap)
                    if n_conf > 0 and rest[j] >= 0:
                        zj = zero
                        if z_loss is not None:
                            zj = zz[j]
                        grad[n, t, s0 + j] = softcap_grad(
                            _target_grad(rest[j], g, keep * w_t, eps_c, w_total, w_t, zj),
                            yt, cap)
                    else:
                        grad[n, t, s0 + j] -= softcap_grad(g * keep * w_t, yt, cap)


def _ce_prob_rows(x, target, weight, eps, gscale, grad, loss, cap, z_loss, lse_out):
    """Rows layout with a probability target of the logits' shape.  The smoothed target is
    t' = (1 - eps) * t + eps / C; loss_i = sum_c w_c t'_c (lse - x_c), where a term with
    t'_c = 0 is 0 even if x_c = -inf (torch gives NaN there)."""
    wide_vectors()
    N, C = x.shape
    has_w = weight.shape[0] > 0
    want_grad = grad.shape[0] > 0
    one = x.dtype.type(1)
    zero = x.dtype.type(0)
    eps_c = x.dtype.type(eps / C)
    keep = x.dtype.type(1 - eps)
    for i in prange(N):
        row = x[i]
        trow = target[i]
        m, s = row_max_sumexp(row, cap)
        a, L = shift_log_sum(m, s)
        if lse_out is not None:
            lse_out[i] = a + L
        acc_wt = zero
        acc = zero
        for c in range(C):
            wt = (keep * trow[c] + eps_c) * (weight[c] if has_w else one)
            acc_wt += wt
            acc += wt * lse_minus(a, L, softcap(row[c], cap)) if wt != 0 else zero
        if z_loss is not None:
            acc += z_loss * (a + L) * (a + L)
        loss[i] = acc
        if want_grad:
            grow = grad[i]
            g = _upstream(gscale, i)
            sh = safe_shift(m)
            inv = inv_sum(m, s)
            ga = g * (acc_wt + _z_grad(z_loss, a, L))
            for c in range(C):
                wt = (keep * trow[c] + eps_c) * (weight[c] if has_w else one)
                y = softcap(row[c], cap)
                grow[c] = softcap_grad(ga * (exp_term(y - sh) * inv) - g * wt, y, cap)


def _ce_prob_spatial(x, target, weight, eps, gscale, grad, loss, cap, z_loss, lse_out):
    """(N, C, S) layout of :func:`_ce_prob_rows`; ``loss`` and ``lse_out`` (unless None)
    are (N, S)."""
    wide_vectors()
    N, C, S = x.shape
    has_w = weight.shape[0] > 0
    want_grad = grad.shape[0] > 0
    one = x.dtype.type(1)
    zero = x.dtype.type(0)
    eps_c = x.dtype.type(eps / C)
    keep = x.dtype.type(1 - eps)
    for u in prange(spatial_blocks(x)):
        n, s0, s1, m, s, sh = spatial_block_stats(x, u, cap)
        B = s1 - s0
        acc = np.zeros(B, dtype=x.dtype)
        acc_wt = np.zeros(B, dtype=x.dtype)
        L = np.empty(B, dtype=x.dtype)
        for j in range(B):
            m[j], L[j] = shift_log_sum(m[j], s[j])
        if lse_out is not None:
            for j in range(B):
                lse_out[n, s0 + j] = m[j] + L[j]
        for c in range(C):
            wc = weight[c] if has_w else one
            xc = x[n, c, s0:s1]
            tc = target[n, c, s0:s1]
            for j in range(B):
                wt = (keep * tc[j] + eps_c) * wc
                acc_wt[j] += wt
                acc[j] += wt * lse_minus(m[j], L[j], softcap(xc[j], cap)) if wt != 0 else zero
        for j in range(B):
            loss[n, s0 + j] = acc[j]
        if z_loss is not None:
            for j in range(B):
                loss[n, s0 + j] += z_loss * (m[j] + L[j]) * (m[j] + L[j])
        if want_grad:
            for j in range(B):
                g = _upstream(gscale, n * S + s0 + j)
                acc_wt[j] = g * (acc_wt[j] + _z_grad(z_loss, m[j], L[j]))
                acc[j] = g
                s[j] = inv_sum(m[j], s[j])
            for c in range(C):
                wc = weight[c] if has_w else one
                xc = x[n, c, s0:s1]
                tc = target[n, c, s0:s1]
                gc = grad[n, c, s0:s1]
                for j in range(B):
                    wt = (keep * tc[j] + eps_c) * wc
                    y = softcap(xc[j], cap)
                    gc[j] = softcap_grad(acc_wt[j] * (exp_term(y - sh[j]) * s[j]) - acc[j] * wt,
                                         y, cap)


ce_index_rows, ce_index_rows_serial = kernel_twins(_ce_index_rows)
ce_index_spatial, ce_index_spatial_serial = kernel_twins(_ce_index_spatial)
ce_prob_rows, ce_prob_rows_serial = kernel_twins(_ce_prob_rows)
ce_prob_spatial, ce_prob_spatial_serial = kernel_twins(_ce_prob_spatial)
# ce_index_small takes the rows body and the target check inlined (numba IR) rather than
# calling their dispatchers: each call to another dispatcher compiles and optimizes the
# callee once more on the first call (docs/performance.md, "First call").
_ce_index_rows_inlined = njit(inline="always", fastmath=FASTMATH, error_model="numpy")(
    _ce_index_rows)
_check_index_target_inlined = njit(inline="always", fastmath=FASTMATH, error_model="numpy")(
    check_index_target.py_func)


@njit(fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
def ce_index_small(x, target, ignore_index, mean, grad):
    """The whole of a small, common call in one jitted entry: C-contiguous (N, C) logits,
    int64 class indices, no weight, no smoothing, reduction "mean" (``mean``) or "sum".

    Python-side argument handling costs more than the arithmetic for inputs like (32, 10);
    here the target check, the "mean" denominator, the serial rows kernel and the reduction
    run without returning to the interpreter.  Returns (loss, first invalid target position
    or -1); ``grad`` with 0 rows means forward only.
    """
    N, C = x.shape
    no_weight = np.empty(0, dtype=x.dtype)
    bad, denom = _check_index_target_inlined(target, C, ignore_index, no_weight)
    if bad >= 0:
        return x.dtype.type(0), bad
    gscale = np.empty(1, dtype=x.dtype)
    gscale[0] = (1.0 / denom if denom > 0 else 0.0) if mean else 1.0
    part = np.empty((N, 1), dtype=x.dtype)
    _ce_index_rows_inlined(x, target, ignore_index, no_weight, x.dtype.type(C), 0.0, gscale,
                           grad, part, 1, no_weight, no_weight, None, None, None)
    total = x.dtype.type(0)
    for i in range(N):          # not part.sum(): two more functions to compile
        total += part[i, 0]
    if mean:
        total = total / x.dtype.type(denom) if denom > 0 else x.dtype.type(np.nan)
    return total, -1

