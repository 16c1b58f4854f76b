"""CPU kernels for binary cross-entropy on probabilities and on logits (elementwise), forward
and fused forward + gradient.

One loop body (:func:`_elementwise_loss`) serves both losses and every variant: the loss's
elementwise math comes in as an ``element`` function returning ``(loss, d loss / d input,
valid)``, and the optional arrays (weight, pos_weight, upstream gradient, unreduced output,
gradient output) are ``None`` or arrays: numba compiles one specialization per combination
and prunes the branches of the absent ones, so a plain forward carries no gradient code and a
forward + gradient is the same pass with one more store.

Data arrive as C-contiguous (R, C) views (R = 1 for a flat input); ``weight`` and
``pos_weight`` are (1, C) rows broadcast over R, or (R, C).  The data checks (targets, and
for BCE probabilities, in range) are fused into the pass: it returns the number of invalid
elements and the front end, only then, finds and reports the first one.
"""
import types as pytypes

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .._config import BCE_CHUNK, FASTMATH
from .primitives import exp, kernel_twins, log1p_vec, log_nonneg, wide_vectors


@njit(error_model="numpy", cache=True, nogil=True)
def first_outside_unit_interval(p):
    """Index of the first element of ``p`` not in [0, 1] (NaN included), or -1."""
    for i in range(p.shape[0]):
        v = p[i]
        if not (v >= 0 and v <= 1):
            return i
    return -1


def _like(x, v):
    """``v`` as a constant of ``x``'s float type (jitted code only): a plain Python float
    would make float32 arithmetic float64."""
    raise NotImplementedError


@overload(_like, jit_options={"error_model": "numpy"})
def _like_impl(x, v):
    if x == types.float32:
        return lambda x, v: np.float32(v)
    if x == types.float64:
        return lambda x, v: np.float64(v)
    return None


# torch's BCE backward clamps (1 - p) p at EPSILON, a C++ ``float`` 1e-12 in every dtype.
_TORCH_BCE_EPS = float(np.float32(1e-12))


@njit(fastmath=FASTMATH, error_model="numpy", inline="always")
def bce_element(p, y, pos_weight):
    """torch's BCE on a probability: loss ``(y - 1) max(log1p(-p), -100) - y max(log p, -100)``,
    its gradient ``(p - y) / max((1 - p) p, 1e-12)`` (torch's backward, EPSILON included) and
    whether ``p`` and ``y`` lie in [0, 1].  ``pos_weight`` is not used.

    ``log1p(-p)`` keeps full precision for small ``p``, where ``log(1 - p)`` would not."""
    one = _like(p, 1.0)
    zero = _like(p, 0.0)
    floor = _like(p, -100.0)
    lp = log_nonneg(p)
    lq = log1p_vec(-p)
    lp = lp if lp > floor else floor
    lq = lq if lq > floor else floor
    loss = (y - one) * lq - y * lp
    den = (one - p) * p
    eps = _like(p, _TORCH_BCE_EPS)
    grad = (p - y) / (den if den > eps else eps)
    ok = (p >= zero) & (p <= one) & (y >= zero) & (y <= one)
    return loss, grad, ok


@njit(fastmath=FASTMATH, error_model="numpy", inline="always")
def bce_with_logits_element(x, y, pos_weight):
    """BCE on a logit, torch's ``(1 - y) x + lw softplus(-x)`` with ``lw = 1 + (pw - 1) y``,
    rearranged as

        (1 - y) max(x, 0) + pw y max(-x, 0) + lw log1p(exp(-|x|))

    whose terms (lw = (1 - y) + pw y too) are all >= 0 for y in [0, 1] and pw >= 0: no
    cancellation, so the loss keeps its relative precision for large |x| (torch's form loses
    it where the loss is small).  A term with a zero coefficient is 0 even for an infinite
    logit: ``x = +inf, y = 1`` costs 0, not torch's NaN.  Gradient ``lw sigmoid(x) - pw y``,
    evaluated per sign of x from ``q = sigmoid(-|x|)`` without cancellation; valid: ``y``
    finite."""
    one = _like(x, 1.0)
    zero = _like(x, 0.0)
    inf = _like(x, np.inf)
    t = exp(-abs(x))
    neg = one - y
    pos = pos_weight * y
    lw = neg + pos      # = 1 + (pw - 1) y, without its cancellation for pw y ~ y
    a = x if x > zero else zero
    b = zero - x if x < zero else zero
    # a zero coefficient gives 0, even against an infinite logit
    loss = ((neg * a if neg != zero else zero) + (pos * b if pos != zero else zero)
            + lw * log1p_vec(t))
    q = t / (one + t)
    grad = neg - lw * q if x >= zero else lw * q - pos
    ok = (y > -inf) & (y < inf)
    return loss, grad, ok


def _elementwise_loss(x, y, weight, pos_weight, grad_output, g, out, part, grad):
    """One pass of ``element`` over the (R, C) arrays ``x`` (input) and ``y`` (target).

    ``out`` (R, C) receives the weighted loss, or, when ``out`` is None, ``part[r, k]`` the
    sum of chunk k of row r.  ``grad`` (R, C), when given, receives
    ``g * grad_output * weight * d loss / d x`` (``grad_output`` None: 1).  Rows are cut into
    ``part.shape[1]`` chunks so that a flat input still spreads over the threads.  Returns the
    number of elements that failed ``element``'s validity check (as a float, > 0 if any).
    """
    wide_vectors()
    R, C = x.shape
    kc = part.shape[1]
    ch = (C + kc - 1) // kc
    zero = x.dtype.type(0)
    one = x.dtype.type(1)
    # The count of invalid elements is a float of the data's type: an integer counter keeps
    # LLVM from vectorizing the loop.  (Only its being non-zero matters.)
    n_bad = zero
    for u in prange(R * kc):
        r = u // kc
        k = u - r * kc
        lo = k * ch
        hi = min(lo + ch, C)
        xr = x[r, lo:hi]
        yr = y[r, lo:hi]
        if weight is not None:
            wr = weight[r if weight.shape[0] > 1 else 0, lo:hi]
        if pos_weight is not None:
            pwr = pos_weight[r if pos_weight.shape[0] > 1 else 0, lo:hi]
        if out is not None:
            outr = out[r, lo:hi]
        if grad is not None:
            gr = grad[r, lo:hi]
        if grad_output is not None:
            gor = grad_output[r, lo:hi]
        acc = zero
        bad = zero
        for c in range(xr.shape[0]):
            if pos_weight is not None:
                pwv = pwr[c]
            else:
                pwv = one
            loss, d, ok = element(xr[c], yr[c], pwv)
            bad += zero if ok else one
            if weight is not None:
                loss = loss * wr[c]
                d = d * wr[c]
            if out is not None:
                outr[c] = loss
            else:
                acc += loss
            if grad is not None:
                if grad_output is not None:
                    gr[c] = (g * gor[c]) * d
                else:
                    gr[c] = g * d
        part[r, k] = acc
        n_bad += bad
    return n_bad


def _small_call(x, y, mean, grad):
    """The whole of a small, common call in one jitted entry: C-contiguous ``x`` and ``y`` of
    one shape and float dtype, no weight or pos_weight, reduction "mean" (``mean``) or "sum",
    ``grad`` None (forward) or an array of ``x``'s shape.  Python-side argument handling
    costs more than the arithmetic on inputs like (32, 10).  Returns (loss, whether any
    element failed the data check: then nothing is reported here and the general path
    raises the error)."""
    n = x.size
    x2 = x.reshape(1, n)
    y2 = y.reshape(1, n)
    part = np.empty((1, (n + BCE_CHUNK - 1) // BCE_CHUNK), dtype=x.dtype)
    g = x.dtype.type(1.0 / n) if mean else x.dtype.type(1)
    if grad is None:
        bad = _elementwise_inlined(x2, y2, None, None, None, g, None, part, None)
    else:
        bad = _elementwise_inlined(x2, y2, None, None, None, g, None, part, grad.reshape(1, n))
    total = x.dtype.type(0)
    for k in range(part.shape[1]):
        total += part[0, k]
    if mean:
        total = total / x.dtype.type(n)
    return total, bad > 0


def _loss_kernels(element, name):
    """The (parallel, serial) kernels of :func:`_elementwise_loss` for one ``element``, and
    its small-call entry (:func:`_small_call` with that body inlined: one module to compile).

    The bodies are the same code objects under their own names and with ``element`` (and the
    inlined body) bound in their globals: numba's cache is keyed by the qualified name, and a
    closure over a dispatcher would change its cache key in every process."""
    body = _renamed(_elementwise_loss, name, element=element)
    inlined = njit(inline="always", fastmath=FASTMATH, error_model="numpy")(
        _renamed(_elementwise_loss, name + "_inlined", element=element))
    small = njit(fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)(
        _renamed(_small_call, name + "_small", _elementwise_inlined=inlined))
    return kernel_twins(body) + (small,)


def _renamed(fn, name, **bind):
    """``fn``'s code under the qualified name ``name``, with ``bind`` added to its globals."""
    body = pytypes.FunctionType(fn.__code__, dict(fn.__globals__, **bind), name)
    body.__qualname__ = name
    body.__doc__ = fn.__doc__
    return body


bce, bce_serial, bce_small = _loss_kernels(bce_element, "bce")
bce_with_logits, bce_with_logits_serial, bce_with_logits_small = _loss_kernels(
    bce_with_logits_element, "bce_with_logits")
