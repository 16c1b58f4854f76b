"""Binary cross-entropy: binary_cross_entropy (on probabilities),
binary_cross_entropy_with_logits, and their fused forward + gradient (torch's semantics).

A call is validated (``_validate``), its arrays are viewed in the compute dtype as (R, C)
(one flat row when no weight repeats along rows; else the input's last axis as C, with weight
and pos_weight as (1, C) rows or the full (R, C)), and one pass of the elementwise kernel of
``fastce._cpu.bce`` computes the loss (or its per-chunk partial sums), the gradient when asked,
and counts invalid targets / probabilities.  Only when it counted some are the data checks run
to name the first one, in the order the errors have always come (targets first).  CUDA arrays
go to ``fastce.cuda``.
"""
import numpy as np

from . import _config
from ._arrays import (_as_array, _broadcast_rows, _reduce_loss, _result, is_device_array,
                      upstream_gradient)
from ._runtime import _cuda, _import_kernels, _parallel, _small_call, _thread_count
from ._validate import (BCE_LOGITS_TARGET_VALUES, BCE_TARGET_VALUES, bce_problem, position,
                        raise_bad_probability, raise_bad_value)

__all__ = ["binary_cross_entropy", "binary_cross_entropy_with_logits",
           "binary_cross_entropy_with_grad", "binary_cross_entropy_with_logits_with_grad"]

_kernels = _import_kernels()
_bce, _checks = _kernels.bce, _kernels.checks
_SCALAR = {np.dtype(np.float32): np.float32, np.dtype(np.float64): np.float64}


def _bce_small(input, target, weight, pos_weight, reduction, grad_output, want_grad, logits):
    """The common small call in one jitted entry (``_cpu.bce.bce_small`` /
    ``bce_with_logits_small``), or None when the call is not one: ``input`` that
    ``_runtime._small_call`` accepts, a C-contiguous ``target`` of its shape and dtype, no
    weight, pos_weight or grad_output, reduction "mean" or "sum".

    For tiny inputs the general path's Python glue costs several times the kernel
    (docs/performance.md).  An invalid element is left to the general path, which raises.
    """
    if (weight is not None or pos_weight is not None or grad_output is not None
            or not _small_call(input) or type(target) is not np.ndarray):
        return None
    if not (target.dtype is input.dtype and target.shape == input.shape
            and target.flags.c_contiguous and (reduction == "mean" or reduction == "sum")):
        return None
    min_par = _config.PARALLEL_MIN_BCE_ELEMENTS[input.dtype.itemsize == 8]
    if input.size >= min_par and _parallel(input.size, min_par):
        return None     # threaded: the general path
    grad = np.empty(input.shape, input.dtype) if want_grad else None
    entry = _bce.bce_with_logits_small if logits else _bce.bce_small
    loss, bad = entry(input, target, reduction == "mean", grad)
    if bad:
        return None
    loss = _SCALAR[input.dtype](loss)
    return (loss, grad) if want_grad else loss


def _check_values(y, shape, name, values):
    """The data check of a flat argument against ``values`` = (lo, hi, what)."""
    lo, hi, what = values
    bad = _checks.first_bad_value(y, lo, hi)
    if bad >= 0:
        raise_bad_value(name, what, y[bad], bad, shape)


def _raise_first_bad(input, target, x, y, logits):
    """Name the first invalid element after the kernel counted some: targets first, then
    (probabilities) the input."""
    if logits:
        _check_values(y, target.shape, "target", BCE_LOGITS_TARGET_VALUES)
    else:
        _check_values(y, target.shape, "target", BCE_TARGET_VALUES)
        bad = _bce.first_outside_unit_interval(x)
        if bad >= 0:
            raise_bad_probability(input[position(bad, input.shape)], bad, input.shape)
    raise AssertionError("the BCE kernel counted invalid elements that the checks do not find")


def _bce_run(input, target, weight, pos_weight, reduction, grad_output, want_grad, logits):
    """The CPU path of the family: (loss reduced as asked[, gradient])."""
    small = _bce_small(input, target, weight, pos_weight, reduction, grad_output, want_grad,
                       logits)
    if small is not None:
        return small
    input = _as_array(input, "input")
    target = _as_array(target, "target")
    dt = bce_problem(input.shape, input.dtype, target.shape, target.dtype, reduction)
    shape = input.shape
    n = input.size
    x = np.ascontiguousarray(input, dtype=dt)
    y = np.ascontiguousarray(target, dtype=dt)
    C = shape[-1] if len(shape) else 1
    R = n // C if C else 0
    w = None if weight is None else _broadcast_rows(weight, shape, R, dt, "weight")
    pw = None
    if pos_weight is not None:
        pw = _broadcast_rows(pos_weight, shape, R, dt, "pos_weight")
    gscale = upstream_gradient(grad_output, reduction, shape, dt, n) if want_grad else None
    if n == 0:
        loss = np.empty(shape, dt)
        grad = np.empty(shape, dt) if want_grad else None
    else:
        shared = [a for a in (w, pw) if a is not None and a.shape[0] == 1]
        if shared and R > 1 and C < _config.BCE_MIN_ROW:
            # Short rows cost more in loop overhead than a copy of the shared rows.
            w = None if w is None else np.ascontiguousarray(np.broadcast_to(w, (R, C)))
            pw = None if pw is None else np.ascontiguousarray(np.broadcast_to(pw, (R, C)))
            shared = []
        if not shared:    # nothing repeats along rows: one flat row, cut into chunks
            R, C = 1, n
        w = None if w is None else w.reshape(-1, C)
        pw = None if pw is None else pw.reshape(-1, C)
        par = _parallel(n, _config.PARALLEL_MIN_BCE_ELEMENTS[dt.itemsize == 8])
        n_chunks = -(-C // _config.BCE_CHUNK)
        if par and R == 1:
            # the same number of chunks for every thread: the scheduler hands each thread a
            # run of whole chunks, and 7 chunks on 2 threads run 4 against 3
            threads = _thread_count()
            n_chunks = -(-n_chunks // threads) * threads
        part = np.empty((R, n_chunks), dt)
        out = np.empty((R, C), dt) if reduction == "none" else None
        grad = np.empty((R, C), dt) if want_grad else None
        g, go = dt.type(1), None
        if want_grad:
            if gscale.size == 1:
                g = gscale[0]
            else:
                go = gscale.reshape(R, C)
        if logits:
            kernel = _bce.bce_with_logits if par else _bce.bce_with_logits_serial
        else:
            kernel = _bce.bce if par else _bce.bce_serial
        if kernel(x.reshape(R, C), y.reshape(R, C), w, pw, go, g, out, part, grad) > 0:
            _raise_first_bad(input, target, x.reshape(-1), y.reshape(-1), logits)
        loss = part if out is None else out
    res = _reduce_loss(loss, reduction, n, shape, input.dtype)
    if not want_grad:
        return res
    return res, _result(grad.reshape(shape), input.dtype)


def binary_cross_entropy(input, target, *, weight=None, reduction="mean"):
    """Binary cross-entropy between probabilities and targets, as
    ``torch.nn.functional.binary_cross_entropy``.

    Parameters
    ----------
    input : array_like or CUDA array
        Probabilities in [0, 1], any shape.
    target : array_like
        Floating targets of the input's shape.
    weight : array_like, optional
        Rescaling weight, broadcastable to the input's shape.
    reduction : {'mean', 'sum', 'none'}, optional

    Returns
    -------
    numpy scalar or ndarray

    Raises
    ------
    ValueError
        An input outside [0, 1] (or NaN), naming its position and value; shape mismatches.

    Notes
    -----
    Each log is clamped at -100, as torch does, so ``p = 0`` or ``1`` gives a finite loss;
    ``log(1 - p)`` is evaluated as ``log1p(-p)`` (full precision for small ``p``).  Within
    ~2.5 ulp of the exact value in float32 and float64; the range checks of input and target
    run inside the same vectorized pass.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> p = np.array([0.8, 0.2, 0.6], np.float32)
    >>> round(float(fastce.binary_cross_entropy(p, np.array([1.0, 0.0, 1.0], np.float32))), 4)
    0.319
    """
    if is_device_array(input):
        return _cuda().binary_cross_entropy(input, target, weight=weight, reduction=reduction)
    return _bce_run(input, target, weight, None, reduction, None, False, False)


def binary_cross_entropy_with_logits(input, target, *, weight=None, pos_weight=None,
                                     reduction="mean"):
    """Binary cross-entropy on logits, as ``torch.nn.functional.binary_cross_entropy_with_logits``.

    Parameters
    ----------
    input : array_like or CUDA array
        Logits, any shape.
    target : array_like
        Floating targets of the input's shape.
    weight : array_like, optional
        Rescaling weight, broadcastable to the input's shape.
    pos_weight : array_like, optional
        Weight of the positive class, broadcast against the input (usually of the last axis'
        length).
    reduction : {'mean', 'sum', 'none'}, optional

    Returns
    -------
    numpy scalar or ndarray

    Notes
    -----
    torch's ``(1 - y) x + lw (log1p(exp(-|x|)) + max(-x, 0))``, ``lw = 1 + (pos_weight - 1) y``,
    evaluated as ``(1 - y) max(x, 0) + pos_weight y max(-x, 0) + lw log1p(exp(-|x|))``: no
    overflow for any logit, and for targets in [0, 1] (and ``pos_weight >= 0``) a sum of
    non-negative terms, so the loss keeps its relative precision where torch's form cancels
    (float32 ``x = -30, y = 0``: 9.4e-14, torch 0).  An infinite logit gives the loss's limit
    (torch: NaN where a term is ``0 * inf``).  Within ~2.5 ulp of the exact value in float32
    and float64; one vectorized ``exp`` and ``log1p`` per element.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> round(float(fastce.binary_cross_entropy_with_logits(np.array([0.0]), np.array([1.0]))), 4)
    0.6931
    """
    if is_device_array(input):
        return _cuda().binary_cross_entropy_with_logits(
            input, target, weight=weight, pos_weight=pos_weight, reduction=reduction)
    return _bce_run(input, target, weight, pos_weight, reduction, None, False, True)


def binary_cross_entropy_with_grad(input, target, *, weight=None, reduction="mean",
                                   grad_output=None):
    """Binary cross-entropy on probabilities and its gradient with respect to them, in one
    fused pass.

    Parameters
    ----------
    input, target, weight, reduction
        As in :func:`binary_cross_entropy`.
    grad_output : array_like or float, optional
        The upstream gradient: the loss's shape (the input's) for ``reduction='none'``, a
        scalar otherwise.  Default: ones.

    Returns
    -------
    loss : numpy scalar or ndarray
        As :func:`binary_cross_entropy` returns it.
    grad_input : ndarray
        d(sum(grad_output * loss)) / d(input), the input's shape and dtype: what torch's
        autograd gives, ``grad_output * weight * (p - y) / max((1 - p) p, 1e-12)`` (divided by
        the element count for 'mean').

    Raises
    ------
    ValueError
        As :func:`binary_cross_entropy`; a ``grad_output`` of the wrong shape.
    Notes
    -----
    One read of input and target, one write of the gradient (and of the loss for 'none'):
    the loss and its derivative come from the same per-element evaluation.  Like torch's
    backward, the gradient is not that of the clamped loss: at ``p = 0`` or ``1`` it is
    ``(p - y) * 1e12``.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> loss, g = fastce.binary_cross_entropy_with_grad(np.array([0.8, 0.2]), np.array([1.0, 0.0]))
    >>> round(float(loss), 4), g.round(4)
    (0.2231, array([-0.625,  0.625]))
    """
    if is_device_array(input):
        return _cuda().binary_cross_entropy_with_grad(input, target, weight=weight,
                                                      reduction=reduction,
                                                      grad_output=grad_output)
    return _bce_run(input, target, weight, None, reduction, grad_output, True, False)


def binary_cross_entropy_with_logits_with_grad(input, target, *, weight=None, pos_weight=None,
                                               reduction="mean", grad_output=None):
    """Binary cross-entropy on logits and its gradient with respect to the logits, in one
    fused pass.

    Parameters
    ----------
    input, target, weight, pos_weight, reduction
        As in :func:`binary_cross_entropy_with_logits`.
    grad_output : array_like or float, optional
        The upstream gradient: the loss's shape (the input's) for ``reduction='none'``, a
        scalar otherwise.  Default: ones.

    Returns
    -------
    loss : numpy scalar or ndarray
        As :func:`binary_cross_entropy_with_logits` returns it.
    grad_input : ndarray
        d(sum(grad_output * loss)) / d(input), the input's shape and dtype:
        ``grad_output * weight * (lw * sigmoid(x) - pos_weight * y)`` with
        ``lw = 1 + (pos_weight - 1) y`` (divided by the element count for 'mean'), as torch's
        autograd gives it.

    Raises
    ------
    ValueError
        As :func:`binary_cross_entropy_with_logits`; a ``grad_output`` of the wrong shape.
    Notes
    -----
    One read of input and target, one write of the gradient (and of the loss for 'none').
    The sigmoid is evaluated per sign of ``x`` from ``exp(-|x|)``, the one exponential the
    loss needs too, so the gradient keeps its relative precision where it is small.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> x, y = np.zeros(2), np.array([1.0, 0.0])
    >>> loss, g = fastce.binary_cross_entropy_with_logits_with_grad(x, y)
    >>> round(float(loss), 4), g
    (0.6931, array([-0.25,  0.25]))
    """
    if is_device_array(input):
        return _cuda().binary_cross_entropy_with_logits_with_grad(
            input, target, weight=weight, pos_weight=pos_weight, reduction=reduction,
            grad_output=grad_output)
    return _bce_run(input, target, weight, pos_weight, reduction, grad_output, True, True)
