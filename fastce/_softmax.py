"""The softmax family: logsumexp, log_softmax and softmax along any axis.

A call is validated (``_validate``), viewed as C-contiguous (outer, C, inner) blocks
(``_arrays``), and run by the CPU kernels of ``fastce._cpu.softmax`` -- the rows kernel when
the axis is the last (inner == 1), the spatial kernel otherwise, serial or parallel as
``_runtime`` decides -- or, for a CUDA array, by ``fastce.cuda``.
"""
import numpy as np

from . import _config
from ._arrays import (_as_array, _canonical_3d, _into, _out_buffer, _result,
                      is_device_array)
from ._modes import MODE_LOG_SOFTMAX, MODE_LOGSUMEXP, MODE_SOFTMAX
from ._runtime import (_cuda, _import_kernels, _parallel, _row_chunks, _row_tiles,
                       _small_call, _split_stats)
from ._validate import check_axis, check_out, compute_dtype, result_dtype

__all__ = ["logsumexp", "log_softmax", "softmax"]

_kernels = _import_kernels()
_sm, _tiles = _kernels.softmax, _kernels.tiles


def _small_rows(x, axis, mode):
    """The common small call -- 1-D or 2-D ``x`` that ``_runtime._small_call`` accepts,
    reduced along its last axis -- in one jitted call (``softmax_small_rows``, or the row
    tiles for many short rows, threaded from ``PARALLEL_MIN_WRITE_ELEMENTS``) into an output
    allocated here, or None when the call is
    not one.  The general path's Python glue (checks, canonical views, the serial/parallel
    choice) costs many times the kernel on inputs like (1, 10) (docs/performance.md)."""
    if not _small_call(x) or type(axis) is not int:
        return None
    # log_softmax and softmax from PARALLEL_MIN_WRITE_ELEMENTS run threaded: the parallel
    # row tiles take the same three arguments; the rows kernel's threaded form goes through
    # the general path.
    lse = mode == MODE_LOGSUMEXP
    size = x.size
    par = (not lse and size >= _config.PARALLEL_MIN_WRITE_ELEMENTS
           and _parallel(size, _config.PARALLEL_MIN_WRITE_ELEMENTS))
    shape = x.shape
    if len(shape) == 2:
        if axis != -1 and axis != 1:
            return None
        N, C = shape
        # (its first test inline: no call for the common few-row case)
        tiles = N >= _config.ROW_TILE_MIN_ROWS and _row_tiles(N, C, x.dtype)
        if par and not tiles:
            return None
        o = np.empty((N, 1) if lse else shape, x.dtype)
        if tiles:
            (_tiles.softmax_tiles if par else _tiles.softmax_tiles_serial)(x, o, mode)
        else:
            _sm.softmax_small_rows(x, o, mode)
        return o.reshape(N) if lse else o
    if par or len(shape) != 1 or (axis != -1 and axis != 0):
        return None
    C = shape[0]
    o = np.empty((1, 1 if lse else C), x.dtype)
    _sm.softmax_small_rows(x.reshape(1, C), o, mode)
    return o[0, 0] if lse else o.reshape(C)


def _softmax_family(x, axis, mode, out=None):
    x = _as_array(x, "x")
    dtype = compute_dtype(x.dtype, "x")
    axis = check_axis(axis, x.ndim)
    in_dtype = x.dtype
    lse = mode == MODE_LOGSUMEXP
    if out is not None:
        check_out(out, "out", x.shape, result_dtype(in_dtype), [("x", x)], "x's")
    if x.dtype != dtype:
        x = x.astype(dtype)
    x3, back = _canonical_3d(x, axis)
    outer, C, inner = x3.shape
    shape3 = (outer, 1 if lse else C, inner)
    if out is None:
        out3, direct = np.empty(shape3, dtype), False
    else:
        out3, direct = _out_buffer(out, x, shape3, dtype)
    if lse and C == 0:
        out3.fill(-np.inf)
    elif out3.size:
        par = _parallel(x3.size, None if lse else _config.PARALLEL_MIN_WRITE_ELEMENTS)
        if inner == 1:
            x2 = x3.reshape(outer, C)
            if _row_tiles(outer, C, dtype):
                kern = _tiles.softmax_tiles if par else _tiles.softmax_tiles_serial
                kern(x2, out3.reshape(outer, out3.shape[1]), mode)
                return _finish(out, out3, back, direct, lse, in_dtype)
            n_chunks = _row_chunks(outer, C) if par else 1
            m, s = _split_stats(x2, n_chunks, mode == MODE_LOG_SOFTMAX)
            # logsumexp from split statistics is a per-row formula: no second wake-up.
            serial = not par or (lse and n_chunks > 1)
            kern = _sm.softmax_rows_serial if serial else _sm.softmax_rows
            kern(x2, out3.reshape(outer, out3.shape[1]), mode, n_chunks, m, s)
        else:
            kern = _sm.softmax_spatial if par else _sm.softmax_spatial_serial
            kern(x3, out3, mode)
    return _finish(out, out3, back, direct, lse, in_dtype)


def _finish(out, out3, back, direct, lse, in_dtype):
    """The result in the caller's shape and dtype (or in ``out``)."""
    if out is not None:
        return _into(out, back(out3, True), direct)
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
    small = _small_rows(x, axis, MODE_LOGSUMEXP)
    if small is not None:
        return small
    if is_device_array(x):
        return _cuda().logsumexp(x, axis=axis)
    return _softmax_family(x, axis, MODE_LOGSUMEXP)


def log_softmax(x, axis=-1, *, out=None):
    """Logarithm of the softmax along an axis: ``x - logsumexp(x, axis)``.

    Parameters
    ----------
    x : array_like or CUDA array
        Floating-point input.
    axis : int, optional
        The class axis.  Default: the last (``torch.log_softmax`` needs ``dim``; this is the
        same as ``dim=-1``).
    out : ndarray, optional
        Where to write the result (NumPy's convention): a writeable array of ``x``'s shape
        and of the dtype the result would have, sharing no memory with ``x``; any memory
        layout (the kernels write into it directly when its layout matches ``x``'s C or
        Fortran order, else the result is copied in).  Returned.

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
    if out is None:
        small = _small_rows(x, axis, MODE_LOG_SOFTMAX)
        if small is not None:
            return small
    if is_device_array(x):
        return _cuda().log_softmax(x, axis=axis, out=out)
    return _softmax_family(x, axis, MODE_LOG_SOFTMAX, out)


def softmax(x, axis=-1, *, out=None):
    """Softmax along an axis: ``exp(x - logsumexp(x, axis))``.

    Parameters
    ----------
    x : array_like or CUDA array
        Floating-point input.
    axis : int, optional
        The class axis.  Default: the last.
    out : ndarray, optional
        Where to write the result (NumPy's convention): a writeable array of ``x``'s shape
        and of the dtype the result would have, sharing no memory with ``x``; any memory
        layout (the kernels write into it directly when its layout matches ``x``'s C or
        Fortran order, else the result is copied in).  Returned.

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
    >>> buf = np.empty((1, 2))
    >>> fastce.softmax(np.array([[0.0, 0.0]]), out=buf) is buf
    True
    """
    if out is None:
        small = _small_rows(x, axis, MODE_SOFTMAX)
        if small is not None:
            return small
    if is_device_array(x):
        return _cuda().softmax(x, axis=axis, out=out)
    return _softmax_family(x, axis, MODE_SOFTMAX, out)
