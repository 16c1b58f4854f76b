"""``nll_loss`` / ``nll_loss_with_grad``: the negative log-likelihood on log-probabilities,
as ``torch.nn.functional.nll_loss`` (class-index targets, per-class weight, ignore_index)."""
import numpy as np

from ._arrays import (EMPTY, _as_array, _reduce_loss, _result, is_device_array,
                      upstream_gradient)
from ._cross_entropy import _check_targets
from ._runtime import _cuda, _import_kernels
from ._validate import nll_loss_problem

__all__ = ["nll_loss", "nll_loss_with_grad"]

_nll = _import_kernels().nll


def _nll_run(log_probs, target, weight, ignore_index, reduction, grad_output, want_grad):
    """Validate, check the class indices (and find the 'mean' denominator) and form the
    upstream gradient as cross-entropy does, then one gather pass."""
    if is_device_array(log_probs):
        cu = _cuda()
        if want_grad:
            return cu.nll_loss_with_grad(log_probs, target, weight=weight,
                                         ignore_index=ignore_index, reduction=reduction,
                                         grad_output=grad_output)
        return cu.nll_loss(log_probs, target, weight=weight, ignore_index=ignore_index,
                           reduction=reduction)
    log_probs = _as_array(log_probs, "log_probs")
    if log_probs.dtype.kind == "b":
        raise TypeError("log_probs must be a floating-point array (float32 or float64), "
                        "got dtype bool")
    target = _as_array(target, "target")
    if weight is not None:
        weight = _as_array(weight, "weight")
    prob = nll_loss_problem(log_probs.shape, log_probs.dtype, target.shape, target.dtype,
                            None if weight is None else weight.shape, ignore_index, reduction)
    N, C, S, dt = prob.N, prob.C, prob.S, prob.dtype
    x3 = np.ascontiguousarray(log_probs, dtype=dt).reshape(N, C, S)
    w = EMPTY[dt] if weight is None else np.ascontiguousarray(weight, dtype=dt)
    t_flat, denom = _check_targets(target, prob, ignore_index, w)
    if want_grad:
        gscale = upstream_gradient(grad_output, reduction, prob.loss_shape, dt, denom)
        grad = np.zeros((N, C, S), dt)
    else:
        gscale, grad = EMPTY[dt], EMPTY[dt].reshape(0, 0, 0)
    loss = np.empty((N, S), dt)
    _nll.nll_gather(x3, t_flat.reshape(N, S), ignore_index, w, gscale, grad, loss)
    out = _reduce_loss(loss, reduction, denom, prob.loss_shape, log_probs.dtype)
    if not want_grad:
        return out
    return out, _result(grad.reshape(log_probs.shape), log_probs.dtype)


def nll_loss(log_probs, target, *, weight=None, ignore_index=-100, reduction="mean"):
    """Negative log-likelihood of log-probabilities, as ``torch.nn.functional.nll_loss``.

    Parameters
    ----------
    log_probs : array_like
        Log-probabilities (for example :func:`fastce.log_softmax`'s output) of shape (C,),
        (N, C) or (N, C, d1, ..., dk); the class axis is 1 for 2-D and up.
    target : array_like of int
        Class indices of shape (), (N,) or (N, d1, ..., dk).
    weight : array_like, optional
        Per-class weight of shape (C,).
    ignore_index : int, optional
        Target value that contributes neither loss nor gradient (default -100).
    reduction : {'mean', 'sum', 'none'}, optional
        'mean' divides by the summed weights of the non-ignored targets.

    Returns
    -------
    numpy scalar or ndarray
        ``-weight[t] * log_probs[n, t, ...]`` per sample (0 where ignored), reduced.

    Raises
    ------
    IndexError
        A class index outside [0, C) that is not ``ignore_index`` (its position is named).
    ValueError, TypeError
        Shapes, dtypes or options that do not fit; a floating target.

    Notes
    -----
    A gather: one value per sample is read, so the cost is O(N) whatever C is.  With every
    target ignored, 'mean' is NaN (0/0), as in torch.  CUDA arrays go to
    :func:`fastce.cuda.nll_loss`.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> lp = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    >>> round(float(fastce.nll_loss(lp, np.array([0, 1]))), 4)
    0.4581
    """
    return _nll_run(log_probs, target, weight, ignore_index, reduction, None, False)


def nll_loss_with_grad(log_probs, target, *, weight=None, ignore_index=-100,
                       reduction="mean", grad_output=None):
    """:func:`nll_loss` and its gradient with respect to ``log_probs``, in one call.

    Parameters
    ----------
    log_probs, target, weight, ignore_index, reduction
        As in :func:`nll_loss`.
    grad_output : array_like or float, optional
        The upstream gradient: the loss's shape for ``reduction='none'``, a scalar otherwise.
        Default: ones.

    Returns
    -------
    loss : numpy scalar or ndarray
    grad_log_probs : ndarray
        Zero except ``-weight[t] * g`` at each non-ignored target (``g`` divided by the
        weight sum for 'mean'): what ``loss.backward(grad_output)`` leaves in torch.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> loss, g = fastce.nll_loss_with_grad(np.log(np.full((2, 2), 0.5)), np.array([0, 1]))
    >>> g
    array([[-0.5,  0. ],
           [ 0. , -0.5]])
    """
    return _nll_run(log_probs, target, weight, ignore_index, reduction, grad_output, True)
