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

from .._config import (CHECK_BLOCK, FASTMATH, SPATIAL_BLOCK, SPATIAL_BLOCKS_PER_TASK,
                       SPATIAL_PAIR_BLOCK, SPATIAL_SELECT_MAX_CLASSES)
from .primitives import (confident, exp_term, inv_sum, kernel_twins, log1p,
                         lse_from_max_sumexp, lse_minus, pair_parts, rest_sum,
                         row_exact_max_sumexp, row_max_sumexp, safe_shift, shift_log_sum,
                         softcap, softcap_grad, spatial_rest_sum, wide_vectors)
from .stats import spatial_block_stats, spatial_blocks, spatial_max_sumexp


@njit(fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
def check_index_target(target, n_classes, ignore_index, weight):
    """One pass over the class-index targets: the first invalid position (-1 if none) and the
    denominator of torch's "mean" (sum of the weights of the non-ignored targets).

    The denominator is summed in float64 whatever the logits' dtype: it is a count or a sum of
    up to N weights, and rounding it would bias every row's gradient alike.  Blocked as
    ``checks.first_bad_value`` is: each block's test and count run branch-free (vectorized),
    the position search only in a block that failed.
    """
    has_w = weight.shape[0] > 0
    n = target.shape[0]
    denom = 0.0
    count = 0
    for b in range(0, n, CHECK_BLOCK):
        blk = target[b:min(b + CHECK_BLOCK, n)]
        bad = 0
        live = 0
        for i in range(blk.shape[0]):
            t = blk[i]
            keep = t != ignore_index
            bad += 1 if keep and (t < 0 or t >= n_classes) else 0
            live += 1 if keep else 0
        if bad > 0:
            for i in range(blk.shape[0]):
                t = blk[i]
                if t != ignore_index and (t < 0 or t >= n_classes):
                    return b + i, denom + count
        if has_w:
            acc = 0.0
            for i in range(blk.shape[0]):
                t = blk[i]
                w = np.float64(weight[min(max(t, 0), n_classes - 1)])
                acc += w if t != ignore_index else 0.0
            denom += acc
        else:
            count += live
    return -1, denom + count


@njit(fastmath=FASTMATH, error_model="numpy")
def _upstream(gscale, i):
    return gscale[i] if gscale.shape[0] > 1 else gscale[0]


@njit(fastmath=FASTMATH, error_model="numpy")
def _upstream_block(gscale, i0, out, B):
    """``out[j]`` for ``j < B``: the upstream factor of flat position ``i0 + j`` (``gscale``
    holds one per position, or one for all).  Read from ``out``, the factors keep the loops
    over positions vectorized: ``_upstream``'s branch on the length, in the loop, kept them
    scalar."""
    if gscale.shape[0] > 1:
        src = gscale[i0:i0 + B]
        for j in range(B):
            out[j] = src[j]
    else:
        g = gscale[0]
        for j in range(B):
            out[j] = g


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
                      cap, z_loss, lse_out, check):
    """(N, C, S) layout; ``target``, ``loss`` and ``lse_out`` (unless None) are (N, S),
    ``gscale`` (N*S,) or (1,).  Every loop runs along the contiguous S axis, positions as
    vector lanes: two classes in closed form (:func:`spatial_index_pairs`), other class
    counts block by block (:func:`spatial_index_block`), the blocks' scratch allocated once
    per task of ``SPATIAL_BLOCKS_PER_TASK`` blocks.

    ``loss`` with 0 rows: the per-position loss is not stored but summed, while the block
    is in cache (float64, per task; the tasks' sums added in their order, so the total does
    not depend on the thread schedule).  ``check`` (forward only): each block's targets are
    checked as :func:`check_index_target` does, in the same pass, and "mean"'s denominator
    summed; a block with an invalid target is not computed.  Returns (the loss's sum, the
    denominator, the first invalid flat position or -1): zeros and -1 for what was not
    asked."""
    N, C, S = x.shape
    pairs = C == 2 and cap is None and z_loss is None
    reduce = loss.shape[0] == 0
    # unweighted, the closed form checks the targets and counts them in its own loop
    pair_check = pairs and check and weight.shape[0] == 0
    blk = SPATIAL_PAIR_BLOCK if pairs else SPATIAL_BLOCK
    per_sample = (S + blk - 1) // blk
    per_task = 1 if pairs else SPATIAL_BLOCKS_PER_TASK
    n_units = N * per_sample
    n_tasks = (n_units + per_task - 1) // per_task
    sums = np.zeros((n_tasks if reduce else 0, 2))
    first_bad = np.full(n_tasks if check else 0, -1, dtype=np.int64)
    for task in prange(n_tasks):
        # (the closed form needs none: allocated if a block hands back to the general code)
        sc = spatial_index_scratch(x, 0 if pairs else blk)
        ln_buf = np.empty(blk if reduce else 0, dtype=x.dtype)
        total = 0.0
        denom = 0.0
        for u in range(task * per_task, min(n_units, (task + 1) * per_task)):
            n = u // per_sample
            s0 = (u - n * per_sample) * blk
            s1 = min(s0 + blk, S)
            if check and not pair_check:
                bad, d = _check_index_target_inlined(target[n, s0:s1], C, ignore_index,
                                                     weight)
                if bad >= 0:
                    first_bad[task] = n * S + s0 + bad
                    break
                denom += d
            ln = ln_buf[:s1 - s0] if reduce else loss[n, s0:s1]
            done = False
            if pairs:
                n_nonfinite, n_live, n_out = spatial_index_pairs(
                    x, target, ignore_index, weight, w_total, eps, gscale, grad, ln, lse_out,
                    n, s0, s1)
                done = n_nonfinite == 0
                if pair_check:
                    if n_out > 0:
                        first_bad[task] = n * S + s0 + _check_index_target_inlined(
                            target[n, s0:s1], C, ignore_index, weight)[0]
                        break
                    denom += n_live
                if not done and sc[0].shape[1] < blk:
                    sc = spatial_index_scratch(x, blk)
            if not done:
                spatial_index_block(x, target, ignore_index, weight, w_total, eps, gscale,
                                    grad, ln, cap, z_loss, lse_out, n, s0, s1, sc)
            if reduce:
                for j in range(s1 - s0):
                    total += np.float64(ln[j])
        if reduce:
            sums[task, 0] = total
            sums[task, 1] = denom
    total = 0.0
    denom = 0.0
    for k in range(sums.shape[0]):
        total += sums[k, 0]
        denom += sums[k, 1]
    bad = -1
    for k in range(first_bad.shape[0]):
        if first_bad[k] >= 0:
            bad = first_bad[k]
            break
    return total, denom, bad


@njit(fastmath=FASTMATH, error_model="numpy")
def spatial_index_scratch(x, blk):
    """Scratch of :func:`spatial_index_block` for blocks of up to ``blk`` positions: per
    position rows of the logits' dtype, float64 and int64, and the (1, C, blk // 4) buffer
    that the few confident positions' columns are gathered into."""
    C = x.shape[1]
    return (np.empty((10, blk), dtype=x.dtype), np.empty((2, blk)),
            np.empty((3, blk), dtype=np.int64),
            np.empty((1, C, blk // _FEW_CONFIDENT_SHARE), dtype=x.dtype))


# A block with fewer confident positions than 1/_FEW_CONFIDENT_SHARE of its length gathers
# their columns and runs the second pass on them alone; more, and the pass runs across the
# whole block (float64 exps on every lane).
_FEW_CONFIDENT_SHARE = 4


@njit(fastmath=FASTMATH, error_model="numpy")
def spatial_index_block(x, target, ignore_index, weight, w_total, eps, gscale, grad, ln,
                        cap, z_loss, lse_out, n, s0, s1, sc):
    """Positions ``s0:s1`` of sample ``n`` of :func:`_ce_index_spatial`, any class count,
    their loss into ``ln``: every loop vectorized across the positions.  A position's target class (``tc``, -1 where
    ignored), its logit and weight are selected in one pass over the classes when there are
    at most ``SPATIAL_SELECT_MAX_CLASSES``, gathered position by position beyond; the
    confident positions' second pass (``spatial_rest_sum``) runs on their gathered columns
    when they are few; the gradient's target share is selected in the class loop."""
    wide_vectors()
    C = x.shape[1]
    S = x.shape[2]
    B = s1 - s0
    has_w = weight.shape[0] > 0
    want_grad = grad.shape[0] > 0
    one = x.dtype.type(1)
    zero = x.dtype.type(0)
    eps_c = x.dtype.type(eps / C)
    keep = x.dtype.type(1 - eps)
    f, f64, i64, cols = sc
    m, s, sh, L, acc, xt, wt, ga, gb, gt = (f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7],
                                           f[8], f[9])
    pivot, rest = f64[0], f64[1]
    tc, skip, idx = i64[0], i64[1], i64[2]
    tn = target[n, s0:s1]
    spatial_max_sumexp(x, n, s0, s1, m, s, sh, cap)
    for j in range(B):
        m[j], L[j] = shift_log_sum(m[j], s[j])  # m keeps the shift: lse = m + L
    if lse_out is not None:
        for j in range(B):
            lse_out[n, s0 + j] = m[j] + L[j]
    for j in range(B):
        t = tn[j]
        tc[j] = -1 if t == ignore_index else t
    if C <= SPATIAL_SELECT_MAX_CLASSES:
        for j in range(B):
            xt[j] = zero
            wt[j] = one
        for c in range(C):
            xc = x[n, c, s0:s1]
            wc = weight[c] if has_w else one
            for j in range(B):
                hit = tc[j] == c
                a = xc[j]
                b = xt[j]
                xt[j] = a if hit else b
                if has_w:
                    b = wt[j]
                    wt[j] = wc if hit else b
    else:
        for j in range(B):
            t = max(tc[j], 0)
            xt[j] = x[n, t, s0 + j]
            wt[j] = weight[t] if has_w else one
    for j in range(B):
        xt[j] = softcap(xt[j], cap)
    if eps > 0:
        for j in range(B):
            acc[j] = zero
        for c in range(C):
            wc = weight[c] if has_w else one
            xc = x[n, c, s0:s1]
            for j in range(B):
                acc[j] += wc * lse_minus(m[j], L[j], softcap(xc[j], cap))
    # The loss; a confident position (the target holds the max, the loss is small) is
    # marked in skip (its target class, else -1) and redone below.  A target logit of -inf
    # (masked class) costs +inf.
    n_conf = 0
    for j in range(B):
        y = xt[j]
        v = lse_minus(m[j], L[j], y)
        conf = tc[j] >= 0 and confident(y - m[j], v)
        part = keep * wt[j] * v if y != -np.inf else x.dtype.type(np.inf)
        if eps > 0:
            part += eps_c * acc[j]
        ln[j] = part if tc[j] >= 0 else zero
        skip[j] = tc[j] if conf else -1
        n_conf += conf
    # rest[k]: the rest sum of the k-th confident position, idx[k] its position
    if n_conf > 0:
        if n_conf * _FEW_CONFIDENT_SHARE < B:
            k = 0
            for j in range(B):
                if skip[j] >= 0:
                    idx[k] = j
                    k += 1
            for c in range(C):
                xc = x[n, c, s0:s1]
                cc = cols[0, c]
                for k in range(n_conf):
                    cc[k] = xc[idx[k]]
            for k in range(n_conf):
                j = idx[k]
                pivot[k] = xt[j]
                skip[k] = tc[j]
            spatial_rest_sum(cols, 0, 0, n_conf, pivot, skip, rest, cap)
        else:
            for j in range(B):
                pivot[j] = xt[j]
            spatial_rest_sum(x, n, s0, s1, pivot, skip, rest, cap)
            k = 0
            for j in range(B):
                if skip[j] >= 0:
                    idx[k] = j
                    rest[k] = rest[j]
                    k += 1
        for k in range(n_conf):
            j = idx[k]
            part = keep * wt[j] * x.dtype.type(log1p(rest[k]))
            ln[j] = part + eps_c * acc[j] if eps > 0 else part
    if z_loss is not None:
        for j in range(B):
            lse = m[j] + L[j]
            ln[j] += z_loss * lse * lse if tc[j] >= 0 else zero
    if not want_grad:
        return
    # Per position: ga <- g A / s, gb <- g eps/C, gt <- g (1 - eps) w_t (all 0 where
    # ignored).
    _upstream_block(gscale, n * S + s0, gt, B)
    for j in range(B):
        g = gt[j]
        live = tc[j] >= 0
        ga[j] = g * (keep * wt[j] + eps_c * w_total + _z_grad(z_loss, m[j], L[j])) if live \
            else zero
        gb[j] = g * eps_c if live else zero
        gt[j] = g * keep * wt[j] if live else zero
        # one factor per position, formed once (ga / s): written as ga * (exp * s), "reassoc"
        # may regroup it differently in a cached and a fresh compile (1 ulp apart)
        ga[j] = ga[j] * inv_sum(m[j], s[j])  # m still holds the shift
    for c in range(C):
        wc = weight[c] if has_w else one
        xc = x[n, c, s0:s1]
        gc = grad[n, c, s0:s1]
        for j in range(B):
            y = softcap(xc[j], cap)
            v = ga[j] * exp_term(y - sh[j]) - gb[j] * wc
            v = v - gt[j] if tc[j] == c else v
            # Exactly 0 where ignored, also for NaN or -inf logits (ga = 0 alone would
            # leave 0 * NaN).
            gc[j] = softcap_grad(v, y, cap) if tc[j] >= 0 else zero
    for k in range(n_conf):
        j = idx[k]
        t = tc[j]
        g = _upstream(gscale, n * S + s0 + j)
        grad[n, t, s0 + j] = softcap_grad(
            _target_grad(rest[k], g, keep * wt[j], eps_c, w_total, wt[j],
                         _z_grad(z_loss, m[j], L[j])), xt[j], cap)


@njit(inline="always", fastmath={"contract"}, error_model="numpy")
def _pair_position(a, b, t, ignore_index, w0, w1):
    """A two-class position's parts: :func:`pair_parts` of its logits ``a``, ``b``, whether
    its target ``t`` is class 1, whether it is not ignored, the target's and the other
    class's logit and weight."""
    on1 = t == 1
    M, e, L = pair_parts(a, b)
    return (M, e, L, on1, t != ignore_index, b if on1 else a, a if on1 else b,
            w1 if on1 else w0, w0 if on1 else w1)


# "contract" only: the pair primitives are inlined and must not be reassociated.
@njit(fastmath={"contract"}, error_model="numpy")
def index_pairs(x0, x1, tn, ignore_index, weight, w_total, eps, gs, g0, g1, ln):
    """Two-class cross-entropy in closed form (:func:`pair_parts`) over 1-D runs of rows or
    positions: class-0 logits ``x0``, class-1 logits ``x1``, targets ``tn``; the loss into
    ``ln`` and, when ``g0`` is not empty, the gradient into ``g0``/``g1`` with the upstream
    factors ``gs``.  No softcap or z-loss.  One pass over the two logits and the target,
    vectorized, no second pass for the confident ones.  With ``M`` the larger logit, ``e =
    exp(min - M)`` and ``L = log1p(e)``: ``lse - x_c = (M - x_c) + L``; the probabilities ``1
    / (1 + e)`` and ``e / (1 + e)``; the target's gradient ``g ((1 - eps) w_t (p_t - 1) +
    eps/2 (w_total p_t - w_t))`` with ``p_t - 1 = -p_o``.  Returns the number of entries
    with a non-finite logit (their results are not valid: the caller then takes its general
    path), of those not ignored, and of targets outside [0, 2) that are not ignored (their
    results are not valid either: unchecked targets are taken as class 0)."""
    wide_vectors()
    has_w = weight.shape[0] > 0
    one = x0.dtype.type(1)
    zero = x0.dtype.type(0)
    w0 = weight[0] if has_w else one
    w1 = weight[1] if has_w else one
    eps_c = x0.dtype.type(eps / 2)
    keep = x0.dtype.type(1 - eps)
    bad = 0
    n_live = 0
    n_out = 0
    for j in range(x0.shape[0]):
        a = x0[j]
        b = x1[j]
        t = tn[j]
        M, e, L, on1, live, xt, xo, w_t, w_o = _pair_position(a, b, t, ignore_index, w0, w1)
        n_live += live
        n_out += live and (t < 0 or t > 1)
        lt = (M - xt) + L
        part = keep * w_t * lt
        if eps > 0:
            part += eps_c * (w_t * lt + w_o * ((M - xo) + L))
        ln[j] = part if live else zero
        bad += not (abs(a) < np.inf and abs(b) < np.inf)
    if g0.shape[0] > 0:
        for j in range(x0.shape[0]):
            a = x0[j]
            b = x1[j]
            M, e, L, on1, live, xt, xo, w_t, w_o = _pair_position(a, b, tn[j], ignore_index,
                                                                  w0, w1)
            q = one / (one + e)
            t_max = on1 != (a >= b)          # the target holds M (either, on a tie)
            p_t = q if t_max else e * q
            p_o = e * q if t_max else q
            g = gs[j]
            gt = g * (keep * w_t * -p_o) + (g * eps_c) * (w_total * p_t - w_t)
            go = g * ((keep * w_t + eps_c * w_total) * p_o - eps_c * w_o)
            gt = gt if live else zero
            go = go if live else zero
            g0[j] = gt if not on1 else go
            g1[j] = gt if on1 else go
    return bad, n_live, n_out


@njit(fastmath={"contract"}, error_model="numpy")
def spatial_index_pairs(x, target, ignore_index, weight, w_total, eps, gscale, grad, ln,
                        lse_out, n, s0, s1):
    """Positions ``s0:s1`` of sample ``n`` of the two-class (N, 2, S) layout:
    :func:`index_pairs` on the sample's two class planes, and the lse into ``lse_out`` when
    given.  Returns :func:`index_pairs`'s counts (non-finite: the caller then runs
    :func:`spatial_index_block` on the block)."""
    S = x.shape[2]
    x0 = x[n, 0, s0:s1]
    x1 = x[n, 1, s0:s1]
    if grad.shape[0] > 0:
        gs = np.empty(s1 - s0, dtype=x.dtype)
        _upstream_block(gscale, n * S + s0, gs, s1 - s0)
        counts = index_pairs(x0, x1, target[n, s0:s1], ignore_index, weight, w_total, eps,
                             gs, grad[n, 0, s0:s1], grad[n, 1, s0:s1], ln)
    else:
        none = np.empty(0, dtype=x.dtype)
        counts = index_pairs(x0, x1, target[n, s0:s1], ignore_index, weight, w_total, eps,
                             none, none, none, ln)
    if lse_out is not None:
        for j in range(s1 - s0):
            M, e, L = pair_parts(x0[j], x1[j])
            lse_out[n, s0 + j] = M + L
    return counts


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
                # the exp's factor formed once (see spatial_index_block)
                acc_wt[j] = (g * (acc_wt[j] + _z_grad(z_loss, m[j], L[j]))
                             * inv_sum(m[j], s[j]))
                acc[j] = g
            for c in range(C):
                wc = weight[c] if has_w else one
                xc = x[n, c, s0:s1]
                tc = target[n, c, s0:s1]
                gc = grad[n, c, s0:s1]
                for j in range(B):
                    wt = (keep * tc[j] + eps_c) * wc
                    y = softcap(xc[j], cap)
                    gc[j] = softcap_grad(acc_wt[j] * exp_term(y - sh[j]) - acc[j] * wt,
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

