"""Cross-entropy: cross_entropy and cross_entropy_with_grad (torch's semantics).

A call runs as named steps (:func:`_ce_run`): validate the arguments (``_validate``), check
the targets and find the 'mean' denominator, form the upstream gradient, choose a layout
(row tiles, few classes, rows, or K-dim spatial), launch the CPU kernel of
``fastce._cpu.cross_entropy`` (``fastce._cpu.tiles``) on it, reduce the loss and cast back.
Small common calls take one jitted entry instead (:func:`_ce_small`; the smallest take the
scalar kernel of ``fastce._cpu.tiny``); CUDA arrays go to ``fastce.cuda``.
"""
import numpy as np

from . import _config
from ._arrays import (EMPTY, _as_array, _into, _reduce_loss, _reduced_total, _result,
                      is_device_array, upstream_gradient)
from ._runtime import (_cuda, _import_kernels, _parallel, _row_chunks, _row_tiles,
                       _small_call, _split_stats)
from ._validate import (PROB_TARGET_VALUES, check_out, compute_dtype, cross_entropy_problem,
                        large_vocab_options, position, raise_bad_class_index, raise_bad_value,
                        result_dtype)

__all__ = ["cross_entropy", "cross_entropy_with_grad"]

_kernels = _import_kernels()
_ce, _checks, _tiles, _tiny = (_kernels.cross_entropy, _kernels.checks, _kernels.tiles,
                              _kernels.tiny)

_EMPTY_2D = {k: v.reshape(0, 0) for k, v in EMPTY.items()}
_EMPTY_3D = {k: v.reshape(0, 0, 0) for k, v in EMPTY.items()}
_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_I64 = np.dtype(np.int64)
_SCALAR = {_F32: np.float32, _F64: np.float64}


def _few_classes_many_rows(N, C):
    return C <= _config.FEW_CLASSES and N >= _config.FEW_CLASSES_MIN_ROWS


def _ce_small(logits, target, ignore_index, reduction, want_grad, grad_input=None):
    """The common small call in one jitted entry, or None when the call is not one: (N, C)
    logits that ``_runtime._small_call`` accepts, int64 (N,) targets, no weight, no
    smoothing, "mean"/"sum", no grad_output.  The entry: the scalar ``tiny.ce_index_tiny``
    up to ``_config.TINY_MAX_ELEMENTS`` logits (it compiles fastest: the first call in a
    fresh process), else the vectorized ``ce_index_small`` or its row-tiles twin.

    For tiny inputs the general path's Python checks and NumPy glue cost several times the
    kernel (docs/performance.md).  These tests are cheap: they compare dtypes by identity
    (NumPy's builtin descriptors are singletons; a false "no" only means the general path).
    Any error (an invalid target included) is left to the general path, which raises it.
    """
    if not _small_call(logits) or type(target) is not np.ndarray:
        return None
    dt = logits.dtype
    if not (target.dtype is _I64 and logits.ndim == 2
            and target.ndim == 1 and len(logits) == len(target)
            and target.flags.c_contiguous
            and type(ignore_index) is int and (reduction == "mean" or reduction == "sum")):
        return None
    if logits.size <= _config.TINY_MAX_ELEMENTS:
        entry = _tiny.ce_index_tiny
    elif _row_tiles(*logits.shape, dt):
        entry = _tiles.ce_index_small_tiles
    elif _few_classes_many_rows(*logits.shape):
        return None
    else:
        entry = _ce.ce_index_small
    if want_grad:
        if grad_input is None:
            grad = np.empty(logits.shape, dt)
        else:
            _check_grad_input(grad_input, logits, target, None, None)
            if not grad_input.flags.c_contiguous:
                return None                 # the general path copies into other layouts
            grad = grad_input
    else:
        # Forward only: a 0 x 0 gradient, so that both calls share one compiled specialization.
        grad = _EMPTY_2D[dt]
    loss, bad = entry(logits, target, ignore_index, reduction == "mean", grad)
    if bad >= 0:
        return None
    loss = _SCALAR[dt](loss)
    return (loss, grad) if want_grad else loss


# ---------------------------------------------------------------------------------------------
# the general path, step by step


def _check_grad_input(grad_input, logits, target, weight, grad_output):
    check_out(grad_input, "grad_input", logits.shape, result_dtype(logits.dtype),
              [("logits", logits), ("target", target), ("weight", weight),
               ("grad_output", grad_output)], "the logits'")


def _validate_call(logits, target, weight, ignore_index, reduction, label_smoothing):
    """The arguments as arrays, and the validated problem (``CrossEntropyProblem``)."""
    logits = _as_array(logits, "logits")
    compute_dtype(logits.dtype, "logits")   # non-floating logits: refused before the target
    target = _as_array(target, "target")
    if weight is not None:
        weight = _as_array(weight, "weight")
    prob = cross_entropy_problem(logits.shape, logits.dtype, target.shape, target.dtype,
                                 None if weight is None else weight.shape,
                                 ignore_index, reduction, label_smoothing)
    return logits, target, weight, prob


def _check_targets(target, prob, ignore_index, w, check=True):
    """The targets as the kernels take them -- (N, C, S) probabilities in the compute dtype,
    or flat int64 class indices -- after the data check, and the denominator of 'mean' (the
    number of loss elements, or the summed weights of the non-ignored targets).  ``check``
    False (class indices only): neither, the denominator None -- the kernel checks them."""
    N, C, S, dt = prob.N, prob.C, prob.S, prob.dtype
    if prob.probs:
        t3 = np.ascontiguousarray(target, dtype=dt).reshape(N, C, S)
        flat = t3.reshape(-1)
        lo, hi, what = PROB_TARGET_VALUES
        bad = _checks.first_bad_value(flat, lo, hi)
        if bad >= 0:
            raise_bad_value("target", what, flat[bad], bad, target.shape)
        return t3, float(N * S)
    t_flat = np.ascontiguousarray(target).reshape(-1)
    if t_flat.dtype != np.int64:
        if t_flat.dtype.kind == "u" and t_flat.size and t_flat.max() > np.iinfo(np.int64).max:
            t_flat = np.where(t_flat > C, C, t_flat)  # out of range either way; keep it so
        t_flat = t_flat.astype(np.int64)
    if not check:
        return t_flat, None
    bad, denom = _ce.check_index_target(t_flat, C, ignore_index, w)
    if bad >= 0:
        _raise_bad_target(target, bad, C, ignore_index)
    return t_flat, denom


def _raise_bad_target(target, bad, C, ignore_index):
    raise_bad_class_index(target[position(bad, target.shape)], bad, target.shape, C,
                          ignore_index)


def _few_classes_layout(prob, x3, t, w, w_total, ignore_index, eps, gscale, grad, par, lv):
    """(N, C) with a few classes and many rows, run as the K-dim layout (1, C, N): vectorized
    across rows instead of paying each row's fixed cost, at the price of an N x C copy."""
    N, C, dt = prob.N, prob.C, prob.dtype
    cap, z, lse = lv
    lse = None if lse is None else lse.reshape(1, N)
    xT = np.ascontiguousarray(x3.reshape(N, C).T).reshape(1, C, N)
    gT = np.empty((1, C, N), dt) if grad is not None else _EMPTY_3D[dt]
    loss = np.empty((1, N), dt)
    if prob.probs:
        tT = np.ascontiguousarray(t.reshape(N, C).T).reshape(1, C, N)
        (_ce.ce_prob_spatial if par else _ce.ce_prob_spatial_serial)(
            xT, tT, w, eps, gscale, gT, loss, cap, z, lse)
    else:
        (_ce.ce_index_spatial if par else _ce.ce_index_spatial_serial)(
            xT, t.reshape(1, N), ignore_index, w, dt.type(w_total), eps, gscale, gT, loss,
            cap, z, lse, False)
    if grad is not None:
        grad.reshape(N, C)[...] = gT.reshape(C, N).T
    return loss


def _rows_layout(prob, x3, t, w, w_total, ignore_index, eps, gscale, grad, par, lv):
    """(N, C) rows; with few, long rows (class-index targets, no softcap) each row is cut
    into chunks run on different threads."""
    N, C, dt = prob.N, prob.C, prob.dtype
    cap, z, lse = lv
    lse = None if lse is None else lse.reshape(N)
    x2 = x3.reshape(N, C)
    g2 = grad.reshape(N, C) if grad is not None else _EMPTY_2D[dt]
    if prob.probs:
        loss = np.empty(N, dt)
        (_ce.ce_prob_rows if par else _ce.ce_prob_rows_serial)(
            x2, t.reshape(N, C), w, eps, gscale, g2, loss, cap, z, lse)
        return loss
    # (The split statistics are of the raw logits: capped rows are not split.)
    n_chunks = _row_chunks(N, C) if par and cap is None else 1
    # the shift at each row's exact max: the confident-row test is then not widened by a
    # stale block max (see _cpu.cross_entropy._ce_index_rows)
    m, s = _split_stats(x2, n_chunks, True)
    part = np.empty((N, n_chunks), dt)
    # With split statistics the forward has little left to do: the serial twin saves a
    # second thread-pool wake-up.
    rows_par = par and (grad is not None or n_chunks == 1 or eps > 0)
    (_ce.ce_index_rows if rows_par else _ce.ce_index_rows_serial)(
        x2, t, ignore_index, w, dt.type(w_total), eps, gscale, g2, part, n_chunks, m, s,
        cap, z, lse)
    return part[:, 0] if n_chunks == 1 else part.sum(axis=1)


def _row_tiles_layout(prob, x3, t, w, w_total, ignore_index, eps, gscale, grad, par, lv):
    """(N, C) rows of up to a few hundred classes, many of them, class-index targets, none
    of the large-vocabulary options (``lv`` all None): row tiles, vectorized across rows
    (``_cpu.tiles``)."""
    N, C, dt = prob.N, prob.C, prob.dtype
    g2 = grad.reshape(N, C) if grad is not None else _EMPTY_2D[dt]
    loss = np.empty(N, dt)
    (_tiles.ce_index_tiles if par else _tiles.ce_index_tiles_serial)(
        x3.reshape(N, C), t, ignore_index, w, dt.type(w_total), eps, gscale, g2, loss)
    return loss


def _spatial_layout(prob, x3, t, w, w_total, ignore_index, eps, gscale, grad, par, lv):
    """(N, C, S): the class axis strided, the kernels vectorized across positions."""
    N, S, dt = prob.N, prob.S, prob.dtype
    cap, z, lse = lv
    lse = None if lse is None else lse.reshape(N, S)
    g3 = grad if grad is not None else _EMPTY_3D[dt]
    loss = np.empty((N, S), dt)
    if prob.probs:
        (_ce.ce_prob_spatial if par else _ce.ce_prob_spatial_serial)(
            x3, t, w, eps, gscale, g3, loss, cap, z, lse)
    else:
        (_ce.ce_index_spatial if par else _ce.ce_index_spatial_serial)(
            x3, t.reshape(N, S), ignore_index, w, dt.type(w_total), eps, gscale, g3, loss,
            cap, z, lse, False)
    return loss


def _spatial_reduced(prob, x3, t, w, w_total, ignore_index, eps, gscale, grad, par, lv,
                     check):
    """(N, C, S) class indices, 'mean' or 'sum': the loss summed in the kernel's pass (no
    per-position loss array); with ``check`` the targets checked and the denominator
    summed there too.  Returns (the loss's sum, the denominator or 0, the first
    invalid flat target position or -1)."""
    N, S, dt = prob.N, prob.S, prob.dtype
    cap, z, lse = lv
    lse = None if lse is None else lse.reshape(N, S)
    g3 = grad if grad is not None else _EMPTY_3D[dt]
    return (_ce.ce_index_spatial if par else _ce.ce_index_spatial_serial)(
        x3, t.reshape(N, S), ignore_index, w, dt.type(w_total), eps, gscale, g3,
        _EMPTY_2D[dt], cap, z, lse, check)


def _choose_layout(prob, lv):
    if prob.S != 1:                    # K-dim, or no positions at all (S == 0)
        return _spatial_layout
    # The row tiles implement none of softcap, z_loss and the per-sample lse.
    if not prob.probs and all(v is None for v in lv) and _row_tiles(prob.N, prob.C, prob.dtype):
        return _row_tiles_layout
    if _few_classes_many_rows(prob.N, prob.C):
        return _few_classes_layout
    return _rows_layout


def _ce_run(logits, target, weight, ignore_index, reduction, label_smoothing, grad_output,
            want_grad, grad_input=None, softcap=None, z_loss=0.0, return_lse=False):
    """The general path: every option, layout and dtype."""
    logits, target, weight, prob = _validate_call(logits, target, weight, ignore_index,
                                                  reduction, label_smoothing)
    if grad_input is not None:
        _check_grad_input(grad_input, logits, target, weight, grad_output)
    N, C, S, dt = prob.N, prob.C, prob.S, prob.dtype
    cap, z = large_vocab_options(softcap, z_loss, return_lse, dt)
    # Every sample's lse when asked for (the kernels write it, ignored ones included).  The
    # options not used are None: the kernels are then compiled without them.
    lse = np.empty(N * S, dt) if return_lse else None
    x3 = np.ascontiguousarray(logits, dtype=dt).reshape(N, C, S)
    w = EMPTY[dt] if weight is None else np.ascontiguousarray(weight, dtype=dt)
    w_total = float(C) if weight is None else float(w.sum(dtype=np.float64))
    # K-dim class indices reduced: the kernel sums the loss, and in an unweighted forward
    # also checks the targets and counts the denominator, in its one pass over logits and
    # targets.  (A count is exact in any order; a sum of weights in the kernel's blocks could
    # differ in the last bit from check_index_target's, which the gradient's scale needs
    # before the kernel: forward and forward + grad would then give different losses.)
    reduced = prob.S != 1 and not prob.probs and reduction != "none"
    fused_check = reduced and not want_grad and weight is None
    t, denom = _check_targets(target, prob, ignore_index, w, not fused_check)
    gscale = (upstream_gradient(grad_output, reduction, prob.loss_shape, dt, denom)
              if want_grad else EMPTY[dt])
    grad, direct = None, False
    if want_grad:
        # The caller's grad_input is written directly when it is C-contiguous in the
        # compute dtype (float16 logits are computed in float32: copied in at the end).
        direct = (grad_input is not None and grad_input.dtype == dt
                  and grad_input.flags.c_contiguous)
        grad = grad_input.reshape(N, C, S) if direct else np.empty((N, C, S), dt)
    lv = (cap, dt.type(z) if z else None, lse)
    args = (prob, x3, t, w, w_total, ignore_index, float(label_smoothing), gscale, grad,
            _parallel(x3.size), lv)
    run = _spatial_reduced(*args, fused_check) if reduced else _choose_layout(prob, lv)(*args)
    if reduced:
        total, kernel_denom, bad = run
        if bad >= 0:
            _raise_bad_target(target, bad, C, ignore_index)
        out = _reduced_total(total, reduction, kernel_denom if denom is None else denom,
                             dt, logits.dtype)
    else:
        out = _reduce_loss(run, reduction, denom, prob.loss_shape, logits.dtype)
    lse_out = (_result(lse.reshape(prob.loss_shape), logits.dtype),) if return_lse else ()
    if not want_grad:
        return (out,) + lse_out if return_lse else out
    if grad_input is not None:
        return (out, _into(grad_input, grad.reshape(logits.shape), direct)) + lse_out
    return (out, _result(grad.reshape(logits.shape), logits.dtype)) + lse_out


# ---------------------------------------------------------------------------------------------
# public functions


def cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, softcap=None, z_loss=0.0, return_lse=False):
    """Cross-entropy between logits and targets, as ``torch.nn.functional.cross_entropy``.

    Parameters
    ----------
    logits : array_like or CUDA array
        Unnormalized scores of shape (C,), (N, C) or (N, C, d1, ..., dk): the class axis is 1
        for 2-D and up, as in torch.  float32 and float64 are computed in their own precision.
    target : array_like
        Integer class indices of shape (), (N,) or (N, d1, ..., dk), or class probabilities
        with the logits' shape and dtype.
    weight : array_like, optional
        Per-class weight of shape (C,).
    ignore_index : int, optional
        Class-index target value that contributes neither loss nor gradient (default -100).
        Not used with probability targets.
    reduction : {'mean', 'sum', 'none'}, optional
        'mean' divides by the summed weights of the non-ignored targets (their count without
        ``weight``); with probability targets by the number of loss elements.
    label_smoothing : float, optional
        In [0, 1]: the target is mixed with the uniform distribution, exactly as torch does.
    softcap : float, optional
        Logit soft-capping (Gemma 2): every logit ``x`` is replaced by ``softcap *
        tanh(x / softcap)`` before anything else, in the same pass.  A finite float > 0;
        None (default) for none.
    z_loss : float, optional
        PaLM's auxiliary z-loss (Liger-Kernel's ``lse_square_scale``): ``z_loss * lse**2``,
        with ``lse`` the log-sum-exp of the (capped) logits, is added to the loss of every
        sample that is not ignored, before the reduction.  It is not multiplied by the class
        weight, and 'mean' divides it by the same denominator as the rest.  Default 0.
    return_lse : bool, optional
        Also return each sample's lse (of the capped logits): the loss's shape for
        ``reduction='none'`` (the target's shape), ignored samples included.

    Returns
    -------
    numpy scalar or ndarray
        A scalar of the logits' dtype for 'mean'/'sum'; the per-element loss (the target's
        shape) for 'none'.
    lse : ndarray
        With ``return_lse=True`` only: ``(loss, lse)`` is returned.

    Raises
    ------
    IndexError
        A class index outside [0, C) that is not ``ignore_index`` (its position is named).
    ValueError, TypeError
        Shapes, dtypes or options that do not fit (see the README).

    Notes
    -----
    One read of the logits: per row the running (max, sum-exp) pair gives
    ``lse = max + log(sum)``, and the loss is ``w[t] * (lse - x[t])`` plus the smoothing term
    ``eps / C * sum_c w[c] * (lse - x[c])``.  No (N, C) temporary is allocated.  A target on
    a ``-inf`` logit costs ``+inf``.  With every target ignored, 'mean' is NaN (0/0), as in
    torch.

    With class weights, the z-loss term is unweighted (as in Liger-Kernel), but 'mean'
    divides the whole per-sample loss by torch's denominator, the summed weights of the
    non-ignored targets (Liger divides the z-loss part by their count instead); the two
    agree without weights.  ``reduction='none'`` followed by ``sum() / denominator`` is
    always 'mean'.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> x = np.array([[0.3, 0.6, 0.1], [0.1, 0.2, 0.7], [0.8, 0.1, 0.1]], np.float32)
    >>> round(float(fastce.cross_entropy(x, np.array([1, 0, 2]))), 4)
    1.2037
    >>> loss, lse = fastce.cross_entropy(x, np.array([1, 0, 2]), softcap=30.0, z_loss=1e-4,
    ...                                  return_lse=True)
    >>> lse.shape
    (3,)
    """
    if (weight is None and label_smoothing == 0.0 and softcap is None and z_loss == 0.0
            and return_lse is False):
        out = _ce_small(logits, target, ignore_index, reduction, False)
        if out is not None:
            return out
    if is_device_array(logits):
        return _cuda().cross_entropy(logits, target, weight=weight, ignore_index=ignore_index,
                                     reduction=reduction, label_smoothing=label_smoothing,
                                     softcap=softcap, z_loss=z_loss, return_lse=return_lse)
    return _ce_run(logits, target, weight, ignore_index, reduction, label_smoothing, None, False,
                   softcap=softcap, z_loss=z_loss, return_lse=return_lse)


def cross_entropy_with_grad(logits, target, *, weight=None, ignore_index=-100,
                            reduction="mean", label_smoothing=0.0, grad_output=None,
                            grad_input=None, softcap=None, z_loss=0.0, return_lse=False):
    """Cross-entropy and its gradient with respect to the logits, in one fused call.

    Parameters
    ----------
    logits, target, weight, ignore_index, reduction, label_smoothing, softcap, z_loss
        As in :func:`cross_entropy`.
    grad_output : array_like or float, optional
        The upstream gradient: the loss's shape for ``reduction='none'``, a scalar otherwise.
        Default: ones.
    grad_input : ndarray, optional
        Where to write the gradient: a writeable array of the logits' shape and dtype,
        sharing no memory with the other arguments; any memory layout (written directly when
        C-contiguous, else copied in).  Returned as ``grad_logits``.  The name is torch's
        for this buffer (the ``grad_input`` of the ``*_backward`` out-variants such as
        ``nll_loss_backward.grad_input``): the gradient with respect to the input, the
        counterpart of ``grad_output``.  Reusing one buffer across training steps skips
        the page faults of a fresh N x C array.
    return_lse : bool, optional
        Also return each sample's lse, as :func:`cross_entropy` does.

    Returns
    -------
    loss : numpy scalar or ndarray
        As :func:`cross_entropy` returns it.
    grad_logits : ndarray
        d(sum(grad_output * loss)) / d(logits), the logits' shape and dtype: what
        ``loss.backward(grad_output)`` leaves in ``logits.grad`` in torch.
    lse : ndarray
        With ``return_lse=True`` only: ``(loss, grad_logits, lse)`` is returned.

    Notes
    -----
    Each row is read once from memory for its statistics and the gradient row
    ``g * (A * softmax(x) - eps / C * w - (1 - eps) * w[t] * onehot(t))`` is written while the
    row is still in cache: one read and one write of N x C values.  Ignored rows get a zero
    gradient.  With ``z_loss`` the coefficient of ``softmax(x)`` gains ``2 * z_loss * lse``
    (unweighted); with ``softcap`` every element is multiplied by ``1 - tanh(x / softcap)**2``,
    the derivative of the cap.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> loss, g = fastce.cross_entropy_with_grad(np.zeros((1, 2)), np.array([0]))
    >>> g
    array([[-0.5,  0.5]])
    >>> buf = np.empty((1, 2))
    >>> loss, g = fastce.cross_entropy_with_grad(np.zeros((1, 2)), np.array([0]), grad_input=buf)
    >>> g is buf
    True
    """
    if (weight is None and label_smoothing == 0.0 and grad_output is None and softcap is None
            and z_loss == 0.0 and return_lse is False):
        out = _ce_small(logits, target, ignore_index, reduction, True, grad_input)
        if out is not None:
            return out
    if is_device_array(logits):
        return _cuda().cross_entropy_with_grad(
            logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, grad_output=grad_output, grad_input=grad_input,
            softcap=softcap, z_loss=z_loss, return_lse=return_lse)
    return _ce_run(logits, target, weight, ignore_index, reduction, label_smoothing,
                   grad_output, True, grad_input, softcap=softcap, z_loss=z_loss,
                   return_lse=return_lse)
