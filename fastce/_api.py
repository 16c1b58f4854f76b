"""The public functions: validate once, bring the data into the kernels' canonical layout,
dispatch (NumPy arrays to the CPU kernels, ``__cuda_array_interface__`` arrays to
``fastce.cuda``), and apply torch's reductions.
"""
import os
import threading

import numba
import numpy as np

from . import _config


def _import_kernels():
    """Import the CPU kernel modules.

    Their ``cache=True`` dispatchers make numba raise RuntimeError ("cannot cache function
    ...: no locator available") at import when it finds no writable cache location: the
    package's ``__pycache__`` read-only AND no usable ``NUMBA_CACHE_DIR`` / user cache dir.
    Then the kernels cache into a private temporary directory (removed at exit) instead: the
    import works, only the compile-once-per-machine saving is lost.
    """
    try:
        from ._cpu import bce, cross_entropy, softmax, stats
    except RuntimeError as exc:
        if "cannot cache function" not in str(exc):
            raise
        import atexit
        import shutil
        import tempfile
        cache_dir = tempfile.mkdtemp(prefix="fastce-numba-cache-")
        atexit.register(shutil.rmtree, cache_dir, True)
        numba.config.CACHE_DIR = cache_dir
        from ._cpu import bce, cross_entropy, softmax, stats
    return bce, cross_entropy, softmax, stats


_bce, _ce, _sm, _stats = _import_kernels()
split_row_stats = _stats.split_row_stats
from ._validate import (bce_problem, broadcastable, check_axis, check_reduction,
                        compute_dtype, cross_entropy_problem, split_at_axis)

__all__ = ["logsumexp", "log_softmax", "softmax", "cross_entropy", "cross_entropy_with_grad",
           "binary_cross_entropy", "binary_cross_entropy_with_logits",
           "binary_cross_entropy_with_grad", "binary_cross_entropy_with_logits_with_grad"]

_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32),
          np.dtype(np.float64): np.empty(0, np.float64)}
_EMPTY_2D = {k: v.reshape(0, 0) for k, v in _EMPTY.items()}


@numba.njit(cache=True, nogil=True)
def _first_bad_value(a, lo, hi):
    """Index of the first element of the flat ``a`` that is NaN, infinite, or outside
    [lo, hi]; -1 if none.  Blocked so that the common all-good case runs as a branch-free
    (vectorizable) and-reduction."""
    n = a.shape[0]
    lo = a.dtype.type(lo)
    hi = a.dtype.type(hi)
    for b in range(0, n, 4096):
        e = min(b + 4096, n)
        ok = True
        for i in range(b, e):
            v = a[i]
            ok &= (v >= lo) & (v <= hi) & (v > -np.inf) & (v < np.inf)
        if not ok:
            for i in range(b, e):
                v = a[i]
                if not (v >= lo and v <= hi and v > -np.inf and v < np.inf):
                    return i
    return -1


def _report_bad_value(bad, flat, shape, name, what):
    if bad >= 0:
        pos = tuple(int(i) for i in np.unravel_index(bad, shape)) if len(shape) else ()
        raise ValueError(f"{name} must hold {what}; found {flat[bad]!s} at position {pos}")


def _is_cuda(a):
    # __cuda_ndarray__ marks Numba device arrays, including the CUDA simulator's, which
    # have no __cuda_array_interface__ (numba #7505).
    return not isinstance(a, np.ndarray) and (hasattr(a, "__cuda_array_interface__")
                                              or getattr(a, "__cuda_ndarray__", False) is True)


def _cuda():
    from . import cuda
    return cuda


def _as_array(a, name):
    """``a`` as an ndarray; anything NumPy accepts is accepted, object arrays are not."""
    if not isinstance(a, np.ndarray):
        try:
            a = np.asarray(a)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{name} must be array-like, got {type(a).__name__}: {exc}") from None
    if a.dtype.kind in "OSUVMmc":
        raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
    return a


def _float_array(a, name, dtype=None):
    """C-contiguous copy-free-when-possible ``a`` in its compute dtype."""
    a = _as_array(a, name)
    dt = compute_dtype(a.dtype, name) if dtype is None else dtype
    if a.dtype.kind == "b":
        raise TypeError(f"{name} must be a floating-point array, got dtype bool")
    return np.ascontiguousarray(a, dtype=dt)


# ---------------------------------------------------------------------------------------------
# threading layer
#
# The parallel kernels run on numba's threading layer, launched by the first parallel call in
# the process.  numba's default choice here is "omp" (tbb when installed), but where neither
# loads it falls back to "workqueue", which ABORTS the process when two Python threads run
# parallel kernels at once.  So, unless the user chose a layer (NUMBA_THREADING_LAYER or
# numba.config.THREADING_LAYER), the first parallel call asks for "threadsafe" (tbb, else
# omp).  If the layer in use is "workqueue" anyway (the user's choice, nothing else loads, or
# another library launched it first), parallel kernels run only from the main thread and calls
# from other threads take the serial kernels: correct results, no abort.  GNU OpenMP is not
# fork-safe (a forked child of a process that has used it is killed on its first parallel
# region), so after os.fork() in such a process the child runs the serial kernels.

_PAR_UNSET, _PAR_ANY, _PAR_MAIN_ONLY, _PAR_NEVER = range(4)
_par_mode = _PAR_UNSET
_par_lock = threading.Lock()


def _setup_threading_layer():
    """Launch numba's threading layer (pinned to a thread-safe one unless the user chose) and
    set how parallel kernels may be called from here on.  Runs once per process."""
    global _par_mode
    with _par_lock:
        if _par_mode != _PAR_UNSET:
            return
        from numba.np.ufunc import parallel as _npar
        chosen = (os.environ.get("NUMBA_THREADING_LAYER")
                  or str(numba.config.THREADING_LAYER).lower() != "default")
        if not _npar._is_initialized and not chosen:
            numba.config.THREADING_LAYER = "threadsafe"
            try:
                numba.get_num_threads()            # launches the layer
            except ValueError:                     # neither tbb nor omp loads here
                numba.config.THREADING_LAYER = "default"
        numba.get_num_threads()
        layer = numba.threading_layer()
        _par_mode = _PAR_MAIN_ONLY if layer == "workqueue" else _PAR_ANY


def _after_fork_in_child():
    global _par_mode, _par_lock
    _par_lock = threading.Lock()
    try:
        layer = numba.threading_layer()
    except ValueError:                             # the parent never launched a layer
        return
    if layer == "omp":
        _par_mode = _PAR_NEVER


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def threading_layer():
    """The numba threading layer fastce's parallel kernels run on (launching it if needed)."""
    if _par_mode == _PAR_UNSET:
        _setup_threading_layer()
    return numba.threading_layer()


def _parallel(n_elements):
    """Whether a call over ``n_elements`` values runs the parallel kernel."""
    if n_elements < _config.PARALLEL_MIN_ELEMENTS:
        return False
    mode = _par_mode
    if mode == _PAR_ANY:
        return True
    if mode == _PAR_UNSET:
        _setup_threading_layer()
        mode = _par_mode
        if mode == _PAR_ANY:
            return True
    if mode == _PAR_MAIN_ONLY:
        return threading.current_thread() is threading.main_thread()
    return False


def _row_chunks(N, C):
    """How many chunks to cut each row into so that few, long rows still use every thread."""
    if C < 2 * _config.SPLIT_MIN_CHUNK:
        return 1
    threads = numba.get_num_threads()
    if threads < 2 or N >= threads * _config.SPLIT_ROWS_PER_THREAD:
        return 1
    want = -(-threads * _config.SPLIT_ROWS_PER_THREAD // max(N, 1))
    return max(1, min(want, C // _config.SPLIT_MIN_CHUNK))


def _split_stats(x2, n_chunks):
    """Precomputed row statistics for the split-row kernels; unused (empty) otherwise."""
    if n_chunks == 1:
        empty = _EMPTY[x2.dtype]
        return empty, empty
    m = np.empty(x2.shape[0], x2.dtype)
    s = np.empty(x2.shape[0], x2.dtype)
    split_row_stats(x2, n_chunks, m, s)
    return m, s


def _result(out, dtype):
    """Cast back to the caller's dtype (float16 etc. are computed in float32) in native byte
    order; 0-d -> scalar."""
    if not dtype.isnative:
        dtype = dtype.newbyteorder("=")
    if out.dtype != dtype:
        out = out.astype(dtype)
    return out[()] if out.ndim == 0 else out


def _drop(shape, axis):
    return shape[:axis] + shape[axis + 1:]


def _canonical_3d(x, axis):
    """``x`` viewed as a C-contiguous (outer, C, inner) array -- without a copy when ``x`` is
    C- or Fortran-contiguous -- and a function taking an output of that layout (with the class
    axis kept, or reduced away) back to ``x``'s axes."""
    if x.ndim > 1 and not x.flags.c_contiguous and x.flags.f_contiguous:
        # A Fortran array is the C-contiguous transpose: work on the mirrored axis.
        xt = x.T
        ax = x.ndim - 1 - axis
        x3 = xt.reshape(split_at_axis(xt.shape, ax))

        def back(o, keep):
            return o.reshape(xt.shape if keep else _drop(xt.shape, ax)).T
        return x3, back
    x = np.ascontiguousarray(x)
    x3 = x.reshape(split_at_axis(x.shape, axis))

    def back(o, keep):
        return o.reshape(x.shape if keep else _drop(x.shape, axis))
    return x3, back


def _softmax_family(x, axis, mode):
    x = _as_array(x, "x")
    if x.dtype.kind == "b":
        raise TypeError("x must be a floating-point array (float32 or float64), got dtype bool")
    dtype = compute_dtype(x.dtype, "x")
    axis = check_axis(axis, x.ndim)
    in_dtype = x.dtype
    if x.dtype != dtype:
        x = x.astype(dtype)
    x3, back = _canonical_3d(x, axis)
    outer, C, inner = x3.shape
    lse = mode == _sm.MODE_LOGSUMEXP
    out3 = np.empty((outer, 1 if lse else C, inner), dtype)
    if lse and C == 0:
        out3.fill(-np.inf)
    elif out3.size:
        par = _parallel(x3.size)
        if inner == 1:
            x2 = x3.reshape(outer, C)
            n_chunks = _row_chunks(outer, C) if par else 1
            m, s = _split_stats(x2, n_chunks)
            # logsumexp from split statistics is a per-row formula: no second wake-up.
            serial = not par or (lse and n_chunks > 1)
            kern = _sm.softmax_rows_serial if serial else _sm.softmax_rows
            kern(x2, out3.reshape(outer, out3.shape[1]), mode, n_chunks, m, s)
        else:
            kern = _sm.softmax_spatial if par else _sm.softmax_spatial_serial
            kern(x3, out3, mode)
    return _result(back(out3, not lse), in_dtype)


def logsumexp(x, axis=-1):
    """Log of the sum of exponentials along an axis, computed stably.

    Parameters
    ----------
    x : array_like or CUDA array
        Floating-point input (float32 and float64 are computed in their own precision, other
        floating dtypes in float32).
    axis : int, optional
        The axis to reduce.  Default: the last.

    Returns
    -------
    ndarray or scalar
        ``log(sum(exp(x), axis))`` with ``axis`` removed, in ``x``'s dtype; a NumPy scalar for
        1-D input.

    Notes
    -----
    Each row is reduced in one pass over memory as a running pair (max m, sum of exp(x - m)),
    block by block, with a vectorized polynomial exp (<= 2 ulp).  A row of all ``-inf`` gives
    ``-inf``; a ``+inf`` gives ``+inf``; a NaN gives NaN.  An empty axis gives ``-inf``.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> float(fastce.logsumexp(np.array([1000.0, 1000.0])))  # no overflow
    1000.6931471805599
    """
    if _is_cuda(x):
        return _cuda().logsumexp(x, axis=axis)
    return _softmax_family(x, axis, _sm.MODE_LOGSUMEXP)


def log_softmax(x, axis=-1):
    """Logarithm of the softmax along an axis: ``x - logsumexp(x, axis)``.

    Parameters
    ----------
    x : array_like or CUDA array
        Floating-point input.
    axis : int, optional
        The class axis.  Default: the last (``torch.log_softmax`` needs ``dim``; this is the
        same as ``dim=-1``).

    Returns
    -------
    ndarray
        Same shape and dtype as ``x``.

    Notes
    -----
    One read of ``x`` from memory for the row statistics; the output row is written while the
    row is still in cache.  A row of all ``-inf`` gives NaN, as in torch.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> np.round(fastce.log_softmax(np.array([0.0, 0.0])), 4)
    array([-0.6931, -0.6931])
    """
    if _is_cuda(x):
        return _cuda().log_softmax(x, axis=axis)
    return _softmax_family(x, axis, _sm.MODE_LOG_SOFTMAX)


def softmax(x, axis=-1):
    """Softmax along an axis: ``exp(x - logsumexp(x, axis))``.

    Parameters
    ----------
    x : array_like or CUDA array
        Floating-point input.
    axis : int, optional
        The class axis.  Default: the last.

    Returns
    -------
    ndarray
        Same shape and dtype as ``x``; each slice along ``axis`` sums to 1.

    Notes
    -----
    Probabilities below the dtype's smallest normal number may flush to 0.  A row of all
    ``-inf`` gives NaN, as in torch.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> fastce.softmax(np.array([[1.0, 1.0]]))
    array([[0.5, 0.5]])
    """
    if _is_cuda(x):
        return _cuda().softmax(x, axis=axis)
    return _softmax_family(x, axis, _sm.MODE_SOFTMAX)


# ---------------------------------------------------------------------------------------------
# cross-entropy


def _ce_prepare(logits, target, weight, ignore_index, reduction, label_smoothing):
    logits = _as_array(logits, "logits")
    if logits.dtype.kind == "b":
        raise TypeError("logits must be a floating-point array (float32 or float64), got dtype bool")
    target = _as_array(target, "target")
    if weight is not None:
        weight = _as_array(weight, "weight")
    prob = cross_entropy_problem(logits.shape, logits.dtype, target.shape, target.dtype,
                                 None if weight is None else weight.shape,
                                 ignore_index, reduction, label_smoothing)
    return logits, target, weight, prob


_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_I64 = np.dtype(np.int64)
_SCALAR = {_F32: np.float32, _F64: np.float64}


def _few_classes_many_rows(N, C):
    return C <= _config.FEW_CLASSES and N >= _config.FEW_CLASSES_MIN_ROWS


def _ce_small(logits, target, ignore_index, reduction, want_grad):
    """The common small call in one jitted entry (``ce_index_small``), or None when the call
    is not one: C-contiguous native float32/float64 (N, C) logits below the parallel size,
    int64 (N,) targets, no weight, no smoothing, "mean"/"sum", no grad_output.

    For (1, 10) the general path spends ~6 us in Python checks and NumPy glue around a
    sub-microsecond kernel.  These tests cost ~0.4 us; they compare dtypes by identity (NumPy's
    builtin descriptors are singletons; a false "no" only means the general path).  Any error
    (an invalid target included) is left to the general path, which raises it.
    """
    if type(logits) is not np.ndarray or type(target) is not np.ndarray:
        return None
    dt = logits.dtype
    if not ((dt is _F32 or dt is _F64) and target.dtype is _I64 and logits.ndim == 2
            and target.ndim == 1 and len(logits) == len(target)
            and 0 < logits.size < _config.PARALLEL_MIN_ELEMENTS
            and logits.flags.c_contiguous and target.flags.c_contiguous
            and type(ignore_index) is int and (reduction == "mean" or reduction == "sum")
            and not _few_classes_many_rows(*logits.shape)):
        return None
    if want_grad:
        grad = np.empty(logits.shape, dt)
        loss, bad = _ce.ce_index_small(logits, target, ignore_index, reduction == "mean", grad)
    else:
        loss, bad = _ce.ce_index_small_forward(logits, target, ignore_index, reduction == "mean")
    if bad >= 0:
        return None
    loss = _SCALAR[dt](loss)
    return (loss, grad) if want_grad else loss


def _ce_run(logits, target, weight, ignore_index, reduction, label_smoothing, grad_output,
            want_grad):
    logits, target, weight, prob = _ce_prepare(logits, target, weight, ignore_index,
                                               reduction, label_smoothing)
    N, C, S = prob.N, prob.C, prob.S
    dt = prob.dtype
    eps = float(label_smoothing)
    x = np.ascontiguousarray(logits, dtype=dt)
    x3 = x.reshape(N, C, S)
    w = _EMPTY[dt] if weight is None else np.ascontiguousarray(weight, dtype=dt)
    w_total = float(C) if weight is None else float(w.sum(dtype=np.float64))
    par = _parallel(x3.size)

    if prob.probs:
        t3 = np.ascontiguousarray(target, dtype=dt).reshape(N, C, S)
        t_flat = t3.reshape(-1)
        bad = _first_bad_value(t_flat, 0.0, np.inf)
        if bad >= 0:
            _report_bad_value(bad, t_flat, target.shape, "target",
                              "class probabilities (finite and >= 0)")
        denom = float(N * S)
    else:
        t_flat = np.ascontiguousarray(target).reshape(-1)
        if t_flat.dtype != np.int64:
            if t_flat.dtype.kind == "u" and t_flat.size and t_flat.max() > np.iinfo(np.int64).max:
                t_flat = np.where(t_flat > C, C, t_flat)  # out of range either way; keep it so
            t_flat = t_flat.astype(np.int64)
        bad, denom = _ce.check_index_target(t_flat, C, ignore_index, w)
        if bad >= 0:
            pos = np.unravel_index(bad, target.shape) if target.ndim else ()
            raise IndexError(
                f"target holds class index {int(target[pos])} at position "
                f"{tuple(int(p) for p in pos)}; "
                f"class indices must be in [0, {C - 1}] (C={C}) or equal ignore_index={ignore_index}")

    # Upstream gradient per loss element.
    if want_grad:
        if reduction == "none":
            if grad_output is None:
                gscale = np.ones(1, dt)
            else:
                go = _as_array(grad_output, "grad_output")
                if go.shape != prob.loss_shape:
                    raise ValueError(f"grad_output must have the loss's shape {prob.loss_shape} "
                                     f"for reduction='none', got {go.shape}")
                gscale = np.ascontiguousarray(go, dtype=dt).reshape(-1)
                if gscale.size == 1:
                    gscale = gscale.copy()
        else:
            g0 = 1.0
            if grad_output is not None:
                go = _as_array(grad_output, "grad_output")
                if go.size != 1:
                    raise ValueError(f"grad_output must be a scalar for reduction={reduction!r}, "
                                     f"got shape {go.shape}")
                g0 = float(go.reshape(()))
            scale = g0 / denom if (reduction == "mean" and denom != 0) else (0.0 if reduction == "mean" else g0)
            gscale = np.array([scale], dt)
        grad = np.empty((N, C, S), dt)
    else:
        gscale = _EMPTY[dt]
        grad = None

    if S == 1 and _few_classes_many_rows(N, C):
        # A row's fixed cost (~90 ns) outweighs the work of a few classes: run the rows as the
        # K-dim layout (1, C, N), vectorized across rows, at the price of an N x C copy.
        xT = np.ascontiguousarray(x3.reshape(N, C).T).reshape(1, C, N)
        gT = np.empty((1, C, N), dt) if want_grad else _EMPTY_2D[dt].reshape(0, 0, 0)
        loss = np.empty((1, N), dt)
        if prob.probs:
            tT = np.ascontiguousarray(t3.reshape(N, C).T).reshape(1, C, N)
            (_ce.ce_prob_spatial if par else _ce.ce_prob_spatial_serial)(
                xT, tT, w, eps, gscale, gT, loss)
        else:
            (_ce.ce_index_spatial if par else _ce.ce_index_spatial_serial)(
                xT, t_flat.reshape(1, N), ignore_index, w, dt.type(w_total), eps, gscale, gT,
                loss)
        if want_grad:
            grad.reshape(N, C)[...] = gT.reshape(C, N).T
    elif S == 1:
        x2 = x3.reshape(N, C)
        g2 = grad.reshape(N, C) if want_grad else _EMPTY_2D[dt]
        if prob.probs:
            loss = np.empty(N, dt)
            (_ce.ce_prob_rows if par else _ce.ce_prob_rows_serial)(
                x2, t3.reshape(N, C), w, eps, gscale, g2, loss)
        else:
            n_chunks = _row_chunks(N, C) if par else 1
            m, s = _split_stats(x2, n_chunks)
            part = np.empty((N, n_chunks), dt)
            # With split statistics the forward has little left to do: the serial twin
            # saves a second thread-pool wake-up.
            rows_par = par and (want_grad or n_chunks == 1 or eps > 0)
            (_ce.ce_index_rows if rows_par else _ce.ce_index_rows_serial)(
                x2, t_flat, ignore_index, w, dt.type(w_total), eps, gscale, g2, part,
                n_chunks, m, s)
            loss = part[:, 0] if n_chunks == 1 else part.sum(axis=1)
    else:
        g3 = grad if want_grad else _EMPTY_2D[dt].reshape(0, 0, 0)
        loss = np.empty((N, S), dt)
        if prob.probs:
            (_ce.ce_prob_spatial if par else _ce.ce_prob_spatial_serial)(
                x3, t3, w, eps, gscale, g3, loss)
        else:
            (_ce.ce_index_spatial if par else _ce.ce_index_spatial_serial)(
                x3, t_flat.reshape(N, S), ignore_index, w, dt.type(w_total), eps, gscale, g3,
                loss)

    in_dtype = logits.dtype
    if reduction == "none":
        out = _result(loss.reshape(prob.loss_shape), in_dtype)
    else:
        # (one element: skip NumPy's reduction machinery, ~1 us of a tiny call)
        total = loss[(0,) * loss.ndim] if loss.size == 1 else loss.sum(dtype=dt)
        if reduction == "mean":
            total = dt.type(total / denom) if denom != 0 else dt.type(np.nan)
        out = in_dtype.type(total)
    if not want_grad:
        return out
    return out, _result(grad.reshape(logits.shape), in_dtype)


def cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0):
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

    Returns
    -------
    numpy scalar or ndarray
        A scalar of the logits' dtype for 'mean'/'sum'; the per-element loss (the target's
        shape) for 'none'.

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

    Examples
    --------
    >>> import numpy as np, fastce
    >>> x = np.array([[0.3, 0.6, 0.1], [0.1, 0.2, 0.7], [0.8, 0.1, 0.1]], np.float32)
    >>> round(float(fastce.cross_entropy(x, np.array([1, 0, 2]))), 4)
    1.2037
    """
    if weight is None and label_smoothing == 0.0:
        out = _ce_small(logits, target, ignore_index, reduction, False)
        if out is not None:
            return out
    if _is_cuda(logits):
        return _cuda().cross_entropy(logits, target, weight=weight, ignore_index=ignore_index,
                                     reduction=reduction, label_smoothing=label_smoothing)
    return _ce_run(logits, target, weight, ignore_index, reduction, label_smoothing, None, False)


def cross_entropy_with_grad(logits, target, *, weight=None, ignore_index=-100,
                            reduction="mean", label_smoothing=0.0, grad_output=None):
    """Cross-entropy and its gradient with respect to the logits, in one fused call.

    Parameters
    ----------
    logits, target, weight, ignore_index, reduction, label_smoothing
        As in :func:`cross_entropy`.
    grad_output : array_like or float, optional
        The upstream gradient: the loss's shape for ``reduction='none'``, a scalar otherwise.
        Default: ones.

    Returns
    -------
    loss : numpy scalar or ndarray
        As :func:`cross_entropy` returns it.
    grad_logits : ndarray
        d(sum(grad_output * loss)) / d(logits), the logits' shape and dtype: what
        ``loss.backward(grad_output)`` leaves in ``logits.grad`` in torch.

    Notes
    -----
    Each row is read once from memory for its statistics and the gradient row
    ``g * (A * softmax(x) - eps / C * w - (1 - eps) * w[t] * onehot(t))`` is written while the
    row is still in cache: one read and one write of N x C values.  Ignored rows get a zero
    gradient.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> loss, g = fastce.cross_entropy_with_grad(np.zeros((1, 2)), np.array([0]))
    >>> g
    array([[-0.5,  0.5]])
    """
    if weight is None and label_smoothing == 0.0 and grad_output is None:
        out = _ce_small(logits, target, ignore_index, reduction, True)
        if out is not None:
            return out
    if _is_cuda(logits):
        return _cuda().cross_entropy_with_grad(
            logits, target, weight=weight, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, grad_output=grad_output)
    return _ce_run(logits, target, weight, ignore_index, reduction, label_smoothing,
                   grad_output, True)


# ---------------------------------------------------------------------------------------------
# binary cross-entropy


def _bce_operand_rows(a, shape, n_rows, dt, name):
    """A weight-like operand broadcast to ``shape``, as the kernels take it: a (1, C) row
    shared by every row when it varies along the last axis only, else the full (R, C)."""
    a = _as_array(a, name)
    broadcastable(a.shape, shape, name)
    C = shape[-1] if len(shape) else 1
    if all(d == 1 for d in a.shape[:-1]):
        row = a.reshape(a.shape[-1:]) if a.ndim else a.reshape(1)
        return np.ascontiguousarray(np.broadcast_to(row.astype(dt, copy=False), (C,))).reshape(1, C)
    return np.ascontiguousarray(np.broadcast_to(a.astype(dt, copy=False), shape)).reshape(n_rows, C)


def _bce_upstream(grad_output, reduction, shape, dt, n):
    """(scalar factor, per-element array or None) of the upstream gradient, validated as
    cross_entropy_with_grad validates it."""
    if reduction == "none":
        if grad_output is None:
            return 1.0, None
        go = _as_array(grad_output, "grad_output")
        if go.shape != shape:
            raise ValueError(f"grad_output must have the loss's shape {shape} "
                             f"for reduction='none', got {go.shape}")
        return 1.0, np.ascontiguousarray(go, dtype=dt)
    g0 = 1.0
    if grad_output is not None:
        go = _as_array(grad_output, "grad_output")
        if go.size != 1:
            raise ValueError(f"grad_output must be a scalar for reduction={reduction!r}, "
                             f"got shape {go.shape}")
        g0 = float(go.reshape(()))
    if reduction == "mean":
        return (g0 / n if n else 0.0), None
    return g0, None


def _bce_run(input, target, weight, pos_weight, reduction, grad_output, want_grad, logits):
    """The CPU path of the BCE family: validate, canonical (R, C) views, one fused kernel pass
    (loss or its partial sums, gradient, data checks), reduce."""
    input = _as_array(input, "input")
    target = _as_array(target, "target")
    dt = bce_problem(input.shape, input.dtype, target.shape, target.dtype, reduction)
    shape = input.shape
    n = input.size
    x = np.ascontiguousarray(input, dtype=dt)
    y = np.ascontiguousarray(target, dtype=dt)
    C = shape[-1] if len(shape) else 1
    R = n // C if C else 0
    w = None if weight is None else _bce_operand_rows(weight, shape, R, dt, "weight")
    pw = None
    if pos_weight is not None:
        pw = _bce_operand_rows(pos_weight, shape, R, dt, "pos_weight")
    if want_grad:
        g, go = _bce_upstream(grad_output, reduction, shape, dt, n)
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
        if not shared:    # nothing repeats per row: one flat row, cut into chunks
            R, C = 1, n
        x2 = x.reshape(R, C)
        y2 = y.reshape(R, C)
        if w is not None:
            w = w.reshape(-1, C)
        if pw is not None:
            pw = pw.reshape(-1, C)
        part = np.empty((R, -(-C // _config.BCE_CHUNK)), dt)
        out = np.empty((R, C), dt) if reduction == "none" else None
        grad = np.empty((R, C), dt) if want_grad else None
        go2 = None
        if want_grad and go is not None:
            go2 = go.reshape(R, C)
        kernels = (_bce.bce_with_logits, _bce.bce_with_logits_serial) if logits else \
            (_bce.bce, _bce.bce_serial)
        n_bad = kernels[0 if _parallel(n) else 1](
            x2, y2, w, pw if logits else None, go2 if want_grad else None,
            dt.type(g) if want_grad else dt.type(1), out, part, grad)
        if n_bad > 0:
            _bce_report_bad(input, target, x.reshape(-1), y.reshape(-1), logits)
        loss = out if out is not None else part
    in_dtype = input.dtype
    if reduction == "none":
        res = _result(loss.reshape(shape), in_dtype)
    else:
        total = loss.sum(dtype=np.float64) if loss.size != 1 else float(loss.reshape(()))
        if reduction == "mean":
            total = total / n if n else np.nan
        res = in_dtype.type(dt.type(total))
    if not want_grad:
        return res
    return res, _result(grad.reshape(shape), in_dtype)


def _bce_report_bad(input, target, x, y, logits):
    """Raise the error for the first invalid element, targets first (the kernel only counted
    them)."""
    if logits:
        bad = _first_bad_value(y, -np.inf, np.inf)
        _report_bad_value(bad, y, target.shape, "target", "finite values (no NaN or inf)")
    else:
        bad = _first_bad_value(y, 0.0, 1.0)
        # torch: "all elements of target should be between 0 and 1"
        _report_bad_value(bad, y, target.shape, "target", "values in [0, 1]")
        bad = _bce.first_outside_unit_interval(x)
        if bad >= 0:
            pos = tuple(int(i) for i in np.unravel_index(bad, input.shape)) if input.ndim else ()
            raise ValueError(f"input must hold probabilities in [0, 1]; found {input[pos]!r} at "
                             f"position {pos}")
    raise AssertionError("the BCE kernel counted invalid elements that the checks do not find")


def _cuda_not_implemented(name, input):
    if _is_cuda(input):
        raise NotImplementedError(f"fastce.{name} has no CUDA kernel yet: call it with NumPy "
                                  f"arrays, or use fastce.cuda's forward-only BCE functions")


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
    if _is_cuda(input):
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
    The stable form ``(1 - y) x + lw (log1p(exp(-|x|)) + max(-x, 0))`` with
    ``lw = 1 + (pos_weight - 1) y``: no overflow for any finite logit.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> round(float(fastce.binary_cross_entropy_with_logits(np.array([0.0]), np.array([1.0]))), 4)
    0.6931
    """
    if _is_cuda(input):
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
    NotImplementedError
        For a CUDA input: ``fastce.cuda`` has no fused BCE gradient yet.

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
    _cuda_not_implemented("binary_cross_entropy_with_grad", input)
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
    NotImplementedError
        For a CUDA input: ``fastce.cuda`` has no fused BCE gradient yet.

    Notes
    -----
    One read of input and target, one write of the gradient (and of the loss for 'none').
    The sigmoid is evaluated per sign of ``x`` from ``exp(-|x|)``, the one exponential the
    loss needs too, so the gradient keeps its relative precision where it is small.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> loss, g = fastce.binary_cross_entropy_with_logits_with_grad(np.zeros(2), np.array([1.0, 0.0]))
    >>> round(float(loss), 4), g
    (0.6931, array([-0.25,  0.25]))
    """
    _cuda_not_implemented("binary_cross_entropy_with_logits_with_grad", input)
    return _bce_run(input, target, weight, pos_weight, reduction, grad_output, True, True)
