"""Array plumbing shared by the front ends and the CUDA host: bringing arguments in as
arrays, telling device arrays from host arrays, the kernels' canonical (outer, C, inner)
views, and bringing results back (reduction, the caller's dtype).

Checks and their messages live in ``_validate``; this module only moves and reshapes.
"""
import numpy as np

from . import _validate

EMPTY = {np.dtype(np.float32): np.empty(0, np.float32),
         np.dtype(np.float64): np.empty(0, np.float64)}
"""An empty array per compute dtype: what the kernels get for an absent optional array."""


def is_device_array(a):
    """Whether ``a`` is a CUDA array: anything with ``__cuda_array_interface__``, or a Numba
    device array (``__cuda_ndarray__``: the CUDA simulator's have no interface, numba
    #7505)."""
    if isinstance(a, np.ndarray):
        return False
    if getattr(a, "__cuda_ndarray__", False) is True:
        return True
    try:
        return hasattr(a, "__cuda_array_interface__")
    except RuntimeError:
        # A CUDA torch tensor that requires grad refuses to export its interface (hasattr
        # passes only AttributeError on); the CUDA host detaches it.
        return bool(getattr(a, "is_cuda", False))


def _as_array(a, name):
    """``a`` as an ndarray; anything NumPy accepts is accepted, object arrays are not."""
    if not isinstance(a, np.ndarray):
        if is_device_array(a):
            # The first argument decides the device; this one is on the other.
            _validate.raise_mixed_devices(name, a)
        try:
            a = np.asarray(a)
        except Exception as exc:  # ragged lists and the like
            _validate.raise_not_array_like(a, name, exc)
    _validate.check_numeric_dtype(a.dtype, name)
    return a


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
        x3 = xt.reshape(_validate.split_at_axis(xt.shape, ax))

        def back(o, keep):
            return o.reshape(xt.shape if keep else _drop(xt.shape, ax)).T
        return x3, back
    x = np.ascontiguousarray(x)
    x3 = x.reshape(_validate.split_at_axis(x.shape, axis))

    def back(o, keep):
        return o.reshape(x.shape if keep else _drop(x.shape, axis))
    return x3, back


def _out_buffer(out, x, shape3, dtype):
    """The kernels' C-contiguous (outer, C, inner) output, ``shape3``, of ``dtype``: a view
    of the caller's ``out`` when it has the same memory layout as the canonical view of
    ``x`` (see :func:`_canonical_3d`) and the compute dtype, else a fresh array (the result
    is then copied into ``out``).  Returns (buffer, whether it is ``out``'s memory)."""
    if out is not None and out.dtype == dtype:
        fortran = x.ndim > 1 and not x.flags.c_contiguous and x.flags.f_contiguous
        o = out.T if fortran else out
        if o.flags.c_contiguous:
            return o.reshape(shape3), True
    return np.empty(shape3, dtype), False


def _into(out, result, direct):
    """``out`` holding ``result`` (copied unless the kernels wrote into ``out`` directly)."""
    if not direct:
        np.copyto(out, result)
    return out


def _broadcast_rows(a, shape, n_rows, dtype, name):
    """A weight-like ``a`` broadcast to ``shape`` (checked), as the elementwise kernels take
    it: one C-contiguous (1, C) row shared by every row when ``a`` varies along the last axis
    only, else the full (``n_rows``, C) array; C is ``shape``'s last dimension."""
    a = _as_array(a, name)
    _validate.broadcastable(a.shape, shape, name)
    C = shape[-1] if len(shape) else 1
    a = a.astype(dtype, copy=False)
    if all(d == 1 for d in a.shape[:-1]):
        row = a.reshape(a.shape[-1:] if a.ndim else (1,))
        return np.ascontiguousarray(np.broadcast_to(row, (C,))).reshape(1, C)
    return np.ascontiguousarray(np.broadcast_to(a, shape)).reshape(n_rows, C)


def upstream_gradient(grad_output, reduction, loss_shape, dtype, denom):
    """The factor each loss element's gradient is scaled by, as the fused kernels read it:
    one value (a scalar ``grad_output``, divided by the denominator for 'mean') or one per
    loss element ('none'), in ``dtype``; ``grad_output``'s shape checked against the loss's."""
    if reduction == "none":
        if grad_output is None:
            return np.ones(1, dtype)
        go = _as_array(grad_output, "grad_output")
        _validate.check_grad_output(go.shape, reduction, loss_shape)
        gscale = np.ascontiguousarray(go, dtype=dtype).reshape(-1)
        return gscale.copy() if gscale.size == 1 else gscale
    g0 = 1.0
    if grad_output is not None:
        go = _as_array(grad_output, "grad_output")
        _validate.check_grad_output(go.shape, reduction, loss_shape)
        g0 = float(go.reshape(()))
    if reduction == "mean":
        g0 = g0 / denom if denom != 0 else 0.0
    return np.array([g0], dtype)


def _result(out, dtype):
    """Cast back to the caller's dtype (float16 etc. are computed in float32) in native byte
    order; 0-d -> scalar."""
    if not dtype.isnative:
        dtype = dtype.newbyteorder("=")
    if out.dtype != dtype:
        out = out.astype(dtype)
    return out[()] if out.ndim == 0 else out


def _reduce_loss(loss, reduction, denom, shape, dtype):
    """torch's reduction of the per-element ``loss`` (in the compute dtype): 'none' gives it
    back in ``shape`` and the caller's ``dtype``; 'sum' its sum, 'mean' the sum divided by
    ``denom`` (NaN when ``denom`` is 0, as torch's 0/0), as a scalar of ``dtype``."""
    if reduction == "none":
        return _result(loss.reshape(shape), dtype)
    dt = loss.dtype
    # One element (the tiny calls): skip NumPy's reduction machinery.
    total = loss[(0,) * loss.ndim] if loss.size == 1 else loss.sum(dtype=dt)
    return _reduced_total(total, reduction, denom, dt, dtype)


def _reduced_total(total, reduction, denom, dt, dtype):
    """'sum' or 'mean' (``total`` divided by ``denom``, NaN when ``denom`` is 0) of a loss
    whose sum is ``total``, rounded once to the compute dtype ``dt``, as a scalar of
    ``dtype``."""
    if reduction == "mean":
        total = total / denom if denom != 0 else np.nan
    return dtype.type(dt.type(total))
