"""Kernels for per-(row, class-chunk) partials: the one mechanism for rows that do not fit in
one place (a row split over threads, over Dask chunks, over machines).

A row's classes are cut into chunks.  Each chunk yields a small partial row; partials of
disjoint chunks merge associatively (:func:`merge_partials`, built on the ``-inf``-safe
``merge_max_sumexp``); a finish step turns the merged partial into the loss, the lse and the
gradient's per-row scale.  Outputs of the logits' shape (log_softmax, softmax, gradient) are a
second pass over each chunk with the merged row statistics.

Partial fields (``F_*``; softmax-family partials hold the first two only):

* ``shift``, ``sum``: the (shift, sum-exp) pair of ``primitives.row_max_sumexp``;
* ``hit``: 1 in the chunk holding a non-ignored class-index target (always 1 for probability
  targets), so that merged 0 means "ignored row";
* ``xt``, ``wt``: the target's logit and its class weight (1 unweighted), 0 elsewhere;
* ``lin``, ``coef``: the linear part of label smoothing / probability targets,
  ``lin = sum_c a_c (r - x_c)`` and ``coef = sum_c a_c`` with ``r = safe_shift(shift)``
  (``a_c = w_c`` for smoothed class indices, ``a_c = w_c ((1 - eps) t_c + eps / C)`` for
  probabilities).  Re-referencing ``lin`` to another shift is exact algebra,
  ``lin' = lin + coef (r' - r)``, so the finished sum ``sum_c a_c (lse - x_c) = lin + coef L``
  never forms ``lse - x_c`` against a chunk's own, smaller shift.
"""
import numpy as np
from numba import njit, types
from numba.extending import overload

from .._config import FASTMATH
from .primitives import (exp_term, inv_sum, lse_from_max_sumexp, lse_minus, merge_max_sumexp,
                         row_max_sumexp, safe_shift, shift_log_sum, softcap, softcap_grad,
                         wide_vectors)

F_SHIFT, F_SUM, F_HIT, F_XT, F_WT, F_LIN, F_COEF = range(7)
STAT_FIELDS = 2
CE_FIELDS = 7

_OPTS = dict(fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)


@njit(fastmath=FASTMATH, error_model="numpy")
def _row(x, layout, i):
    """Row ``i`` of a chunk given as the flat ``x`` and ``layout = (rows, classes, stride)``:
    ``x[i * stride : i * stride + classes]``, typed C-contiguous so its loops vectorize (a
    chunk cut from a wider array is read in place, without a copy)."""
    return x[i * layout[2]:i * layout[2] + layout[1]]


@njit(**_OPTS)
def stat_partials(x, layout, out):
    """(shift, sum-exp) of each row of the chunk (``x``, ``layout``) into ``out`` (R, 2)."""
    for i in range(layout[0]):
        out[i, F_SHIFT], out[i, F_SUM] = row_max_sumexp(_row(x, layout, i))


@njit(**_OPTS)
def ce_index_partials(x, layout, lo, n_classes, target, weight, ignore_index, eps, out,
                      cap=None):
    """Cross-entropy partials (R, 7) of the (R, c) chunk (``x``, ``layout``) holding classes ``lo:lo + c``
    of ``n_classes``, for class-index ``target`` (R,) and the chunk's ``weight`` (c,) (empty:
    unweighted).  ``lin``/``coef`` are filled only with label smoothing (``eps > 0``).  With
    ``cap`` (``primitives.softcap``'s (cap, 1/cap) pair) the partials are those of the
    soft-capped logits."""
    wide_vectors()
    R, c = layout[0], layout[1]
    has_w = weight.shape[0] > 0
    zero = x.dtype.type(0)
    one = x.dtype.type(1)
    for i in range(R):
        row = _row(x, layout, i)
        m, s = row_max_sumexp(row, cap)
        out[i, F_SHIFT] = m
        out[i, F_SUM] = s
        t = target[i]
        hit, xt, wt = zero, zero, zero
        if t != ignore_index and lo <= t < lo + c:
            hit = one
            xt = softcap(row[t - lo], cap)
            wt = weight[t - lo] if has_w else one
        out[i, F_HIT] = hit
        out[i, F_XT] = xt
        out[i, F_WT] = wt
        lin, coef = zero, zero
        if eps > 0 and t != ignore_index:
            r = safe_shift(m)
            if has_w:
                for k in range(c):
                    lin += weight[k] * (r - softcap(row[k], cap))
                    coef += weight[k]
            else:
                for k in range(c):
                    lin += r - softcap(row[k], cap)
                coef = x.dtype.type(c)
        out[i, F_LIN] = lin
        out[i, F_COEF] = coef


@njit(**_OPTS)
def ce_prob_partials(x, layout, target, t_layout, weight, n_classes, eps, out):
    """Cross-entropy partials (R, 7) of the (R, c) chunk (``x``, ``layout``) for probability
    targets (``target``, ``t_layout``) (R, c) and the chunk's ``weight`` (c,) (empty: unweighted).  A class whose
    coefficient is 0 contributes nothing, even at a ``-inf`` logit (as the in-memory kernel)."""
    wide_vectors()
    R, c = layout[0], layout[1]
    has_w = weight.shape[0] > 0
    zero = x.dtype.type(0)
    one = x.dtype.type(1)
    eps_c = x.dtype.type(eps / n_classes)
    keep = x.dtype.type(1 - eps)
    for i in range(R):
        row = _row(x, layout, i)
        trow = _row(target, t_layout, i)
        m, s = row_max_sumexp(row)
        r = safe_shift(m)
        lin, coef = zero, zero
        for k in range(c):
            a = (keep * trow[k] + eps_c) * (weight[k] if has_w else one)
            coef += a
            lin += a * (r - row[k]) if a != 0 else zero
        out[i, F_SHIFT] = m
        out[i, F_SUM] = s
        out[i, F_HIT] = one
        out[i, F_XT] = zero
        out[i, F_WT] = zero
        out[i, F_LIN] = lin
        out[i, F_COEF] = coef


@njit(**_OPTS)
def merge_partials(parts, out):
    """Merge ``parts`` (R, k, F) along k into ``out`` (R, F): (shift, sum) by the ``-inf``-safe
    ``merge_max_sumexp``, ``hit``/``xt``/``wt``/``coef`` by addition, ``lin`` re-referenced to
    the merged shift.  Associative (up to rounding), so any tree of merges gives the result."""
    R, K, F = parts.shape
    for i in range(R):
        m = parts[i, 0, F_SHIFT]
        s = parts[i, 0, F_SUM]
        for f in range(2, F):
            out[i, f] = parts[i, 0, f]
        for k in range(1, K):
            m2 = parts[i, k, F_SHIFT]
            mm, ss = merge_max_sumexp(m, s, m2, parts[i, k, F_SUM])
            if F > STAT_FIELDS:
                r = safe_shift(mm)
                out[i, F_LIN] = (out[i, F_LIN] + out[i, F_COEF] * (r - safe_shift(m))
                                 + parts[i, k, F_LIN]
                                 + parts[i, k, F_COEF] * (r - safe_shift(m2)))
                out[i, F_COEF] += parts[i, k, F_COEF]
                out[i, F_HIT] += parts[i, k, F_HIT]
                out[i, F_XT] += parts[i, k, F_XT]
                out[i, F_WT] += parts[i, k, F_WT]
            m, s = mm, ss
        out[i, F_SHIFT] = m
        out[i, F_SUM] = s


@njit(**_OPTS)
def lse_finish(stats, out):
    """log-sum-exp of each merged (shift, sum) row of ``stats`` (R, >= 2) into ``out`` (R,)."""
    for i in range(stats.shape[0]):
        out[i] = lse_from_max_sumexp(stats[i, F_SHIFT], stats[i, F_SUM])


@njit(fastmath=FASTMATH, error_model="numpy")
def _linear_term(lin, coef, m, L):
    """``sum_c a_c (lse - x_c)`` of a merged row from ``lin``, ``coef``, the merged shift ``m``
    and ``L = log(sum)``, with the in-memory kernels' value where the shift is not finite."""
    if m > -np.inf and m < np.inf:
        return lin + coef * L
    # Constants typed float32 unify with lin's own type: float32 stays float32.
    if m == -np.inf:
        # Every logit is -inf: each term with a_c != 0 is -inf - (-inf) = NaN.
        return np.float32(np.nan) if coef != 0 else np.float32(0)
    if m == np.inf and not (L != L) and not (lin != lin) and lin != -np.inf:
        # A +inf logit with a_c = 0 (lin holds -inf otherwise): every other term is +inf.
        return np.float32(np.inf) if coef != 0 else np.float32(0)
    return np.float32(np.nan)


@njit(**_OPTS)
def ce_finish(parts, probs, eps, n_classes, g, loss, coefs):
    """Loss of each merged cross-entropy partial row of ``parts`` (R, 7) into ``loss`` (R,);
    with ``coefs`` (R, 3) not empty also the gradient's per-row factors
    ``(ga, gb, gt)``: ``grad_c = ga p_c - gb a_c - gt [c == t]`` (see ``ce_*_grad``), for the
    upstream factors ``g`` ((R,) or (1,))."""
    R = parts.shape[0]
    want = coefs.shape[0] > 0
    zero = parts.dtype.type(0)
    eps_c = parts.dtype.type(eps / n_classes)
    keep = parts.dtype.type(1 - eps)
    for i in range(R):
        m = parts[i, F_SHIFT]
        a, L = shift_log_sum(m, parts[i, F_SUM])
        lin = parts[i, F_LIN]
        coef = parts[i, F_COEF]
        gi = (g[i] if g.shape[0] > 1 else g[0]) if want else zero
        if probs:
            loss[i] = _linear_term(lin, coef, m, L)
            if want:
                coefs[i, 0] = gi * coef
                coefs[i, 1] = gi
                coefs[i, 2] = zero
            continue
        if parts[i, F_HIT] == 0:          # ignored target
            loss[i] = zero
            if want:
                coefs[i, 0] = zero
                coefs[i, 1] = zero
                coefs[i, 2] = zero
            continue
        xt = parts[i, F_XT]
        w_t = parts[i, F_WT]
        # A target logit of -inf (masked class) costs +inf, as in the in-memory kernel.
        part = keep * w_t * lse_minus(a, L, xt) if xt != -np.inf else parts.dtype.type(np.inf)
        if eps > 0:
            part += eps_c * _linear_term(lin, coef, m, L)
        loss[i] = part
        if want:
            coefs[i, 0] = gi * (keep * w_t + eps_c * coef)
            coefs[i, 1] = gi * eps_c
            coefs[i, 2] = gi * keep * w_t


@njit(**_OPTS)
def softmax_chunk(x, layout, stats, log, out):
    """log_softmax (``log``) or softmax of the (R, c) chunk (``x``, ``layout``) from its rows'
    merged (shift, sum) ``stats`` (R, >= 2) into ``out`` (R, c)."""
    wide_vectors()
    for i in range(layout[0]):
        m = stats[i, F_SHIFT]
        s = stats[i, F_SUM]
        row = _row(x, layout, i)
        orow = out[i]
        if log:
            a, L = shift_log_sum(m, s)
            for k in range(row.shape[0]):
                orow[k] = -lse_minus(a, L, row[k])
        else:
            sh = safe_shift(m)
            inv = inv_sum(m, s)
            for k in range(row.shape[0]):
                orow[k] = exp_term(row[k] - sh) * inv


def _out_row(row, out, i):
    """``out[i]``, or ``row`` itself when ``out`` is None (resolved at typing time)."""
    raise NotImplementedError("fastce._cpu.partials._out_row is for jitted code")


@overload(_out_row, jit_options={"fastmath": FASTMATH, "error_model": "numpy"})
def _out_row_impl(row, out, i):
    if out is None or isinstance(out, (types.NoneType, types.Omitted)):
        return lambda row, out, i: row
    return lambda row, out, i: out[i]


@njit(**_OPTS)
def ce_index_grad(x, layout, lo, target, weight, ignore_index, parts, coefs, out, cap=None):
    """Gradient (R, c) of the chunk (``x``, ``layout``) (classes ``lo:lo + c``) for
    class-index targets, from the merged partials ``parts`` and the factors ``coefs`` of
    :func:`ce_finish`; with ``cap`` through the soft-capping.  ``out`` None: written over the
    chunk itself (each row through the one array, so that the loops vectorize: through two
    arrays holding the same memory, LLVM's overlap check would send them to the scalar loop)."""
    wide_vectors()
    R, c = layout[0], layout[1]
    has_w = weight.shape[0] > 0
    for i in range(R):
        row = _row(x, layout, i)
        orow = _out_row(row, out, i)
        t = target[i]
        if t == ignore_index:
            # Exactly 0, also where the logits hold NaN or -inf.
            for k in range(c):
                orow[k] = 0
            continue
        m = parts[i, F_SHIFT]
        sh = safe_shift(m)
        inv = inv_sum(m, parts[i, F_SUM])
        ga, gb = coefs[i, 0], coefs[i, 1]
        hit = lo <= t < lo + c
        yt = softcap(row[t - lo], cap) if hit else sh   # read before it is overwritten
        if has_w:
            for k in range(c):
                y = softcap(row[k], cap)
                orow[k] = softcap_grad(ga * (exp_term(y - sh) * inv) - gb * weight[k], y, cap)
        else:
            for k in range(c):
                y = softcap(row[k], cap)
                orow[k] = softcap_grad(ga * (exp_term(y - sh) * inv) - gb, y, cap)
        if hit:
            orow[t - lo] -= softcap_grad(coefs[i, 2], yt, cap)


@njit(**_OPTS)
def ce_prob_grad(x, layout, target, t_layout, weight, n_classes, eps, parts, coefs, out):
    """Gradient (R, c) of the chunk (``x``, ``layout``) for probability targets
    (``target``, ``t_layout``)."""
    wide_vectors()
    R, c = layout[0], layout[1]
    has_w = weight.shape[0] > 0
    one = x.dtype.type(1)
    eps_c = x.dtype.type(eps / n_classes)
    keep = x.dtype.type(1 - eps)
    for i in range(R):
        m = parts[i, F_SHIFT]
        sh = safe_shift(m)
        inv = inv_sum(m, parts[i, F_SUM])
        ga, g = coefs[i, 0], coefs[i, 1]
        row = _row(x, layout, i)
        trow = _row(target, t_layout, i)
        orow = out[i]
        for k in range(c):
            a = (keep * trow[k] + eps_c) * (weight[k] if has_w else one)
            orow[k] = ga * (exp_term(row[k] - sh) * inv) - g * a
