"""Binary cross-entropy: binary_cross_entropy (on probabilities) and
binary_cross_entropy_with_logits (torch's semantics).

A call is validated (``_validate``), its arrays are flattened in the compute dtype (weights
broadcast to the input's shape), the targets -- and for probabilities the input -- pass a data
check, the elementwise CPU kernel of ``fastce._cpu.bce`` runs, and the loss is reduced as
cross-entropy's is (``_arrays._reduce_loss``).  CUDA arrays go to ``fastce.cuda``.
"""
import numpy as np

from ._arrays import EMPTY, _as_array, _broadcast_flat, _reduce_loss, is_device_array
from ._runtime import _cuda, _import_kernels, _parallel
from ._validate import (BCE_LOGITS_TARGET_VALUES, BCE_TARGET_VALUES, bce_problem,
                        pos_weight_is_compact, position, raise_bad_probability, raise_bad_value)

__all__ = ["binary_cross_entropy", "binary_cross_entropy_with_logits"]

_kernels = _import_kernels()
_bce, _checks = _kernels.bce, _kernels.checks


def _flat_inputs(input, target, reduction):
    """(input, target, compute dtype, flat input, flat target), validated."""
    input = _as_array(input, "input")
    target = _as_array(target, "target")
    dt = bce_problem(input.shape, input.dtype, target.shape, target.dtype, reduction)
    x = np.ascontiguousarray(input, dtype=dt).reshape(-1)
    y = np.ascontiguousarray(target, dtype=dt).reshape(-1)
    return input, target, dt, x, y


def _check_values(y, shape, name, values):
    """The data check of a flat argument against ``values`` = (lo, hi, what)."""
    lo, hi, what = values
    bad = _checks.first_bad_value(y, lo, hi)
    if bad >= 0:
        raise_bad_value(name, what, y[bad], bad, shape)


def _weight(weight, shape, dt):
    return EMPTY[dt] if weight is None else _broadcast_flat(weight, shape, dt, "weight")


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
    Each log is clamped at -100, as torch does, so ``p = 0`` or ``1`` gives a finite loss.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> p = np.array([0.8, 0.2, 0.6], np.float32)
    >>> round(float(fastce.binary_cross_entropy(p, np.array([1.0, 0.0, 1.0], np.float32))), 4)
    0.319
    """
    if is_device_array(input):
        return _cuda().binary_cross_entropy(input, target, weight=weight, reduction=reduction)
    input, target, dt, p, y = _flat_inputs(input, target, reduction)
    _check_values(y, target.shape, "target", BCE_TARGET_VALUES)
    bad = _bce.first_outside_unit_interval(p)
    if bad >= 0:
        raise_bad_probability(input[position(bad, input.shape)], bad, input.shape)
    w = _weight(weight, input.shape, dt)
    out = np.empty(p.shape, dt)
    (_bce.bce if _parallel(p.size) else _bce.bce_serial)(p, y, w, out)
    return _reduce_loss(out, reduction, out.size, input.shape, input.dtype)


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
    The stable form ``(1 - y) x + lw (log1p(exp(-|x|)) + max(-x, 0))`` with
    ``lw = 1 + (pos_weight - 1) y``: no overflow for any finite logit.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> round(float(fastce.binary_cross_entropy_with_logits(np.array([0.0]), np.array([1.0]))), 4)
    0.6931
    """
    if is_device_array(input):
        return _cuda().binary_cross_entropy_with_logits(
            input, target, weight=weight, pos_weight=pos_weight, reduction=reduction)
    input, target, dt, x, y = _flat_inputs(input, target, reduction)
    _check_values(y, target.shape, "target", BCE_LOGITS_TARGET_VALUES)
    w = _weight(weight, input.shape, dt)
    if pos_weight is None:
        pw = EMPTY[dt]
    else:
        pw = _as_array(pos_weight, "pos_weight")
        if pos_weight_is_compact(pw.shape, input.shape):
            pw = np.ascontiguousarray(pw, dtype=dt).reshape(-1)
        else:
            pw = _broadcast_flat(pw, input.shape, dt, "pos_weight")
    out = np.empty(x.shape, dt)
    (_bce.bce_with_logits if _parallel(x.size) else _bce.bce_with_logits_serial)(x, y, w, pw, out)
    return _reduce_loss(out, reduction, out.size, input.shape, input.dtype)
