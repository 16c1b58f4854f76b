"""The cross-entropy family on Dask arrays chunked along the batch AND the class axes.

Nothing here holds a full row: each block of logits yields per-(row, class-chunk) partials
(``fastce._partials``: shift, sum-exp, target logit, the label-smoothing / probability-target
sums), the partials of a row merge associatively in a tree reduction across the class chunks
(the ``-inf``-safe merge of ``fastce._cpu.primitives``), and a finish step gives the loss or the
lse.  Outputs of the logits' shape (log_softmax, softmax, the gradient) are a second blockwise
pass with the merged row statistics broadcast over the class chunks.  Every result is a lazy
Dask array; the same graph runs on the threaded scheduler, on a ``dask.distributed`` cluster or
out of core.

Needs the optional ``dask`` extra (``pip install 'fastce[dask]'``); ``import fastce`` does not
import Dask.  Arguments are validated by ``fastce._validate``, with the in-memory API's checks
and messages; the class-index / probability values of the target are checked when the graph
runs (the error names the position, as in memory).
"""
import math

import numpy as np

try:
    import dask.array as da
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("fastce.dask needs Dask: pip install 'fastce[dask]' "
                      "(dask[array,distributed])") from exc

from . import _partials as P
from ._validate import (PROB_TARGET_VALUES, check_axis, check_grad_output, check_numeric_dtype,
                        compute_dtype, cross_entropy_problem, raise_bad_class_index,
                        raise_bad_value, raise_not_array_like)

__all__ = ["logsumexp", "log_softmax", "softmax", "cross_entropy", "cross_entropy_with_grad"]


# ---------------------------------------------------------------------------------------------
# arguments


def _as_dask(a, name):
    """``a`` as a Dask array (a NumPy array or array-like becomes one block)."""
    if not isinstance(a, da.Array):
        try:
            a = np.asarray(a)
        except Exception as exc:  # ragged lists and the like
            raise_not_array_like(a, name, exc)
        check_numeric_dtype(a.dtype, name)
        a = da.from_array(a, chunks=a.shape if a.ndim else ())
    check_numeric_dtype(a.dtype, name)
    return a


def _known_chunks(a, name):
    """A clear error for arrays whose chunk sizes are unknown (NaN in ``chunks``, e.g. after
    boolean indexing): the blocks' class offsets and row alignment need them."""
    for axis, sizes in enumerate(a.chunks):
        if any(isinstance(c, float) and math.isnan(c) for c in sizes):
            raise ValueError(
                f"{name} has unknown chunk sizes along axis {axis} (NaN in {name}.chunks); "
                f"call {name}.compute_chunk_sizes() first: fastce.dask needs every block's "
                f"position to line up rows and classes")


def _out_dtype(dtype):
    """The caller's dtype in native byte order (float16 is computed in float32 and cast back)."""
    return dtype if dtype.isnative else dtype.newbyteorder("=")


def _cast(a, dtype):
    return a if a.dtype == dtype else a.astype(dtype)


# ---------------------------------------------------------------------------------------------
# block functions: N-d blocks in the rows layout (..., classes) seen as 2-D (rows, classes)


def _rows(shape):
    r = 1
    for d in shape:
        r *= d
    return r


def _as_2d(x):
    """The block as (rows, classes): a view when it can be one (the kernels read rows in
    place, see ``fastce._partials``)."""
    return x.reshape(_rows(x.shape[:-1]), x.shape[-1])


def _stat_block(x):
    return P.stat_partials(_as_2d(x)).reshape(x.shape[:-1] + (1, P.STAT_FIELDS))


def _ce_index_block(x, lo, t, w, *, n_classes, ignore_index, eps):
    lo = int(lo[0])
    parts = P.ce_partials(_as_2d(x), lo, n_classes, t.reshape(-1), w, ignore_index, eps)
    return parts.reshape(x.shape[:-1] + (1, P.CE_FIELDS))


def _ce_prob_block(x, t, w, *, n_classes, eps):
    parts = P.ce_partials(_as_2d(x), 0, n_classes, _as_2d(t), w, eps=eps, probs=True)
    return parts.reshape(x.shape[:-1] + (1, P.CE_FIELDS))


def _keep(a, axis=None, keepdims=True):
    return a


def _merge_block(a, axis=None, keepdims=True):
    merged = P.merge(a.reshape(_rows(a.shape[:-2]), a.shape[-2], a.shape[-1]))
    tail = (1, a.shape[-1]) if keepdims else (a.shape[-1],)
    return merged.reshape(a.shape[:-2] + tail)


def _lse_block(stats):
    return P.lse(stats.reshape(-1, stats.shape[-1])).reshape(stats.shape[:-1])


def _softmax_block(x, stats, *, log):
    out = P.softmax_chunk(_as_2d(x), stats.reshape(-1, stats.shape[-1]), log)
    return out.reshape(x.shape)


def _ce_loss_block(parts, *, n_classes, eps, probs):
    loss = P.ce_finish(parts.reshape(-1, P.CE_FIELDS), n_classes, eps, probs)
    return loss.reshape(parts.shape[:-1])


def _ce_finish_block(parts, g, *, n_classes, eps, probs):
    """[loss, ga, gb, gt] per row: the loss and the gradient's per-row factors."""
    flat = parts.reshape(-1, P.CE_FIELDS)
    g = np.asarray(g, parts.dtype)
    loss, coefs = P.ce_finish(flat, n_classes, eps, probs, g.reshape(-1) if g.ndim else g[None])
    return np.concatenate([loss[:, None], coefs], axis=1).reshape(parts.shape[:-1] + (4,))


def _ce_index_grad_block(x, lo, t, w, parts, fin, *, n_classes, ignore_index, eps):
    lo = int(lo[0])
    g = P.ce_grad_chunk(_as_2d(x), lo, n_classes, t.reshape(-1),
                        parts.reshape(-1, P.CE_FIELDS), fin.reshape(-1, 4)[:, 1:], w,
                        ignore_index, eps)
    return g.reshape(x.shape)


def _ce_prob_grad_block(x, t, w, parts, fin, *, n_classes, eps):
    g = P.ce_grad_chunk(_as_2d(x), 0, n_classes, _as_2d(t), parts.reshape(-1, P.CE_FIELDS),
                        fin.reshape(-1, 4)[:, 1:], w, eps=eps, probs=True)
    return g.reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# the graph: partials per block, tree merge, finish


def _merge_tree(parts, split_every):
    """Merge the partials (rows..., class chunks, fields) over the class-chunk axis in a tree
    reduction (``split_every`` chunks per merge) -> (rows..., fields)."""
    nd = parts.ndim
    return da.reduction(parts, chunk=_keep, combine=_merge_block, aggregate=_merge_block,
                        axis=nd - 2, keepdims=False, dtype=parts.dtype,
                        split_every=split_every, concatenate=True,
                        meta=np.empty((0,) * (nd - 1), parts.dtype), name="fastce-merge")


def _rows_layout(x, axis):
    """``x`` with ``axis`` moved last (lazy: each block is transposed, nothing is rechunked)."""
    return x if axis == x.ndim - 1 else da.moveaxis(x, axis, -1)


def _softmax_family(x, axis, op, split_every):
    x = _as_dask(x, "x")
    dt = compute_dtype(x.dtype, "x")
    axis = check_axis(axis, x.ndim)
    _known_chunks(x, "x")
    out_dt = _out_dtype(x.dtype)
    xm = _rows_layout(_cast(x, dt), axis)
    nd = xm.ndim
    ind = tuple(range(nd))
    parts = da.blockwise(_stat_block, ind + (nd,), xm, ind, new_axes={nd: P.STAT_FIELDS},
                         adjust_chunks={nd - 1: 1}, dtype=dt,
                         meta=np.empty((0,) * (nd + 1), dt), token="fastce-stat-partials")
    stats = _merge_tree(parts, split_every)
    if op == "logsumexp":
        out = stats.map_blocks(_lse_block, drop_axis=nd - 1, dtype=dt,
                               meta=np.empty((0,) * (nd - 1), dt), token="fastce-lse")
        return _cast(out, out_dt)
    out = da.blockwise(_softmax_block, ind, xm, ind, stats, ind[:-1] + (nd,), dtype=dt,
                       concatenate=True, log=op == "log_softmax",
                       meta=np.empty((0,) * nd, dt), token=f"fastce-{op.replace('_', '-')}")
    if axis != nd - 1:
        out = da.moveaxis(out, -1, axis)
    return _cast(out, out_dt)


def logsumexp(x, axis=-1, *, split_every=None):
    """Log of the sum of exponentials along an axis, for a Dask array chunked along any axes.

    Parameters
    ----------
    x : dask.array.Array or array_like
        Floating-point input (float32 and float64 are computed in their own precision, other
        floating dtypes in float32), chunked along any axes, the reduced one included.
    axis : int, optional
        The axis to reduce.  Default: the last.
    split_every : int, optional
        How many class chunks one merge task takes (Dask's ``split_every``; default Dask's).

    Returns
    -------
    dask.array.Array
        Lazy ``log(sum(exp(x), axis))`` with ``axis`` removed, in ``x``'s dtype; equal to
        :func:`fastce.logsumexp` of the computed ``x`` up to rounding.

    Notes
    -----
    Each block gives its rows' (shift, sum-exp) pairs; the pairs of a row's class chunks
    merge in a tree reduction with the ``-inf``-safe rule, so a row whose every value in one
    chunk is ``-inf`` (or whose only finite value sits in the last chunk) is exact.  No block
    is ever rechunked to a full row.

    Examples
    --------
    >>> import dask.array as da, numpy as np, fastce.dask
    >>> x = da.from_array(np.array([[1000.0, 1000.0, 0.0, 0.0]]), chunks=(1, 2))
    >>> np.round(fastce.dask.logsumexp(x).compute(), 6)
    array([1000.693147])
    """
    return _softmax_family(x, axis, "logsumexp", split_every)


def log_softmax(x, axis=-1, *, split_every=None):
    """Logarithm of the softmax along an axis, for a Dask array chunked along any axes.

    Parameters
    ----------
    x : dask.array.Array or array_like
        Floating-point input.
    axis : int, optional
        The class axis.  Default: the last.
    split_every : int, optional
        Fan-in of the tree merge of the row statistics.

    Returns
    -------
    dask.array.Array
        Lazy, of ``x``'s shape, dtype and chunks: :func:`fastce.log_softmax` of ``x``.

    Notes
    -----
    Two passes over the logits: one for the merged row statistics, one blockwise pass that
    writes each block with its rows' lse.  A row of all ``-inf`` gives NaN, as in torch.

    Examples
    --------
    >>> import dask.array as da, numpy as np, fastce.dask
    >>> x = da.zeros((1, 4), chunks=(1, 1))
    >>> np.round(fastce.dask.log_softmax(x).compute(), 4)
    array([[-1.3863, -1.3863, -1.3863, -1.3863]])
    """
    return _softmax_family(x, axis, "log_softmax", split_every)


def softmax(x, axis=-1, *, split_every=None):
    """Softmax along an axis, for a Dask array chunked along any axes.

    Parameters
    ----------
    x : dask.array.Array or array_like
        Floating-point input.
    axis : int, optional
        The class axis.  Default: the last.
    split_every : int, optional
        Fan-in of the tree merge of the row statistics.

    Returns
    -------
    dask.array.Array
        Lazy, of ``x``'s shape, dtype and chunks: :func:`fastce.softmax` of ``x``.

    Examples
    --------
    >>> import dask.array as da, fastce.dask
    >>> fastce.dask.softmax(da.ones((1, 4), chunks=(1, 2))).compute()
    array([[0.25, 0.25, 0.25, 0.25]])
    """
    return _softmax_family(x, axis, "softmax", split_every)


# ---------------------------------------------------------------------------------------------
# cross-entropy


def _global_flat_index(bad, block, info):
    """The flat index, in the whole array, of element ``bad`` of ``block`` (``info``: the
    array's ``block_info`` entry)."""
    local = np.unravel_index(bad, block.shape) if block.ndim else ()
    pos = tuple(int(lo + i) for (lo, _), i in zip(info["array-location"], local))
    return int(np.ravel_multi_index(pos, info["shape"])) if pos else 0


def _check_index_block(t, *, n_classes, ignore_index, block_info=None):
    bad = P.first_bad_index(t, n_classes, ignore_index)
    if bad >= 0:
        info = block_info[0]
        raise_bad_class_index(t.reshape(-1)[bad], _global_flat_index(bad, t, info),
                              info["shape"], n_classes, ignore_index)
    return t


def _check_prob_block(t, *, compute, block_info=None):
    flat, bad = P.first_bad_probability(t, compute)
    if bad >= 0:
        info = block_info[0]
        raise_bad_value("target", PROB_TARGET_VALUES[2], flat[bad],
                        _global_flat_index(bad, t, info), info["shape"])
    return t


def _grad_scale(grad_output, reduction, denom, loss_shape, dt, row_chunks):
    """The upstream factor: per row (a Dask array of the rows' chunks) for 'none', else a lazy
    0-d array (``grad_output / denom`` for 'mean', 0 when ``denom`` is 0)."""
    if reduction == "none":
        if grad_output is None:
            return None
        go = _as_dask(grad_output, "grad_output")
        _known_chunks(go, "grad_output")
        check_grad_output(go.shape, reduction, loss_shape)
        return _cast(go, dt).reshape(tuple(sum(c) for c in row_chunks)).rechunk(row_chunks)
    g0 = 1.0
    if grad_output is not None:
        go = _as_dask(grad_output, "grad_output")
        _known_chunks(go, "grad_output")
        check_grad_output(go.shape, reduction, loss_shape)
        g0 = go.reshape(()).astype(np.float64)
    if reduction == "mean":
        safe = da.where(denom != 0, denom, 1.0)
        return da.where(denom != 0, g0 / safe, 0.0).astype(dt)
    return da.asarray(g0, dtype=np.float64).astype(dt) if not isinstance(g0, da.Array) \
        else g0.astype(dt)


def _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing,
                   grad_output, want_grad, split_every):
    logits = _as_dask(logits, "logits")
    compute_dtype(logits.dtype, "logits")   # non-floating logits: refused before the target
    target = _as_dask(target, "target")
    if weight is not None:
        weight = _as_dask(weight, "weight")
    for a, name in ((logits, "logits"), (target, "target"), (weight, "weight")):
        if a is not None:
            _known_chunks(a, name)
    prob = cross_entropy_problem(logits.shape, logits.dtype, target.shape, target.dtype,
                                 None if weight is None else weight.shape,
                                 ignore_index, reduction, label_smoothing)
    C, dt = prob.C, prob.dtype
    eps = float(label_smoothing)
    out_dt = _out_dtype(logits.dtype)

    # The rows layout (rows..., C): K-dim logits (N, C, d1..dk) -> (N, d1..dk, C).
    x = _cast(logits, dt)
    x = x[None, :] if logits.ndim == 1 else _rows_layout(x, 1)
    nd = x.ndim
    ind = tuple(range(nd))
    row_ind = ind[:-1]
    row_chunks = x.chunks[:-1]
    if prob.probs:
        t = _cast(target.map_blocks(_check_prob_block, compute=dt, dtype=target.dtype), dt)
        t = (t[None, :] if logits.ndim == 1 else _rows_layout(t, 1)).rechunk(x.chunks)
        t_ind = ind
        denom = float(prob.N * prob.S)
    else:
        # Checked block by block before use (a bad index raises before it reaches a kernel).
        t = target.map_blocks(_check_index_block, n_classes=C, ignore_index=ignore_index,
                              dtype=target.dtype).astype(np.int64)
        t = t.reshape(tuple(sum(c) for c in row_chunks)).rechunk(row_chunks)
        t_ind = row_ind
    w_args = ()
    if weight is not None:
        w_args = (_cast(weight, dt).rechunk((x.chunks[-1],)), (nd - 1,))
    # Each class chunk's offset, one value per block, embedded in the tasks (no data
    # dependency): blockwise pairs block k of it with class chunk k (align_arrays=False; the
    # target and the weight were rechunked to the logits' blocks above).
    offsets = np.cumsum((0,) + x.chunks[-1][:-1]).astype(np.int64)
    cls_args = () if prob.probs else (da.from_array(offsets, chunks=1, inline_array=True),
                                      (nd - 1,))
    kw = dict(n_classes=C, eps=eps)
    if not prob.probs:
        kw["ignore_index"] = int(ignore_index)
    part_fn = _ce_prob_block if prob.probs else _ce_index_block
    parts = da.blockwise(_with_weight(part_fn, weight is not None, n_after=0),
                         ind + (nd,), x, ind, *cls_args, t, t_ind, *w_args,
                         new_axes={nd: P.CE_FIELDS}, adjust_chunks={nd - 1: 1}, dtype=dt,
                         align_arrays=False, meta=np.empty((0,) * (nd + 1), dt),
                         token="fastce-ce-partials", **kw)
    merged = _merge_tree(parts, split_every)

    if not prob.probs:
        denom = merged[..., P.F_WT].sum(dtype=np.float64)
    fin_kw = dict(n_classes=C, eps=eps, probs=prob.probs)
    if want_grad:
        g = _grad_scale(grad_output, reduction, denom, prob.loss_shape, dt, row_chunks)
        g_args = (da.ones(tuple(sum(c) for c in row_chunks), chunks=row_chunks, dtype=dt),
                  row_ind) if g is None else ((g, row_ind) if g.ndim else (g, ()))
        fin = da.blockwise(_ce_finish_block, row_ind + (nd,), merged, row_ind + (nd,),
                           *g_args, adjust_chunks={nd: 4}, dtype=dt,
                           meta=np.empty((0,) * nd, dt), token="fastce-ce-finish", **fin_kw)
        loss = fin[..., 0]
    else:
        loss = merged.map_blocks(_ce_loss_block, drop_axis=nd - 1, dtype=dt,
                                 meta=np.empty((0,) * (nd - 1), dt), token="fastce-ce-loss",
                                 **fin_kw)

    if reduction == "none":
        out = _cast(loss.reshape(prob.loss_shape) if logits.ndim == 1 else loss, out_dt)
    else:
        total = loss.sum(dtype=np.float64)
        if reduction == "mean":
            if prob.probs:
                total = total / denom if denom != 0 else da.full((), np.nan)
            else:
                total = da.where(denom != 0, total / da.where(denom != 0, denom, 1.0), np.nan)
        out = total.astype(out_dt)
    if not want_grad:
        return out

    grad_fn = _ce_prob_grad_block if prob.probs else _ce_index_grad_block
    grad = da.blockwise(_with_weight(grad_fn, weight is not None, n_after=2),
                        ind, x, ind, *cls_args, t, t_ind, *w_args, merged, row_ind + (nd,),
                        fin, row_ind + (nd + 1,), dtype=dt, concatenate=True, align_arrays=False,
                        meta=np.empty((0,) * nd, dt), token="fastce-ce-grad", **kw)
    grad = grad[0] if logits.ndim == 1 else da.moveaxis(grad, -1, 1)
    return out, _cast(grad, out_dt)


def _with_weight(f, has_weight, n_after):
    """``f(x, ..., w, *after)`` called with ``w=None`` when the graph has no weight operand
    (the ``n_after`` trailing operands come after ``w``)."""
    if has_weight:
        return f

    def call(*args, **kw):
        split = len(args) - n_after
        return f(*args[:split], None, *args[split:], **kw)
    return call


def cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, split_every=None):
    """Cross-entropy of Dask logits chunked along the batch and class axes, as
    :func:`fastce.cross_entropy` (``torch.nn.functional.cross_entropy``).

    Parameters
    ----------
    logits : dask.array.Array or array_like
        Logits of shape (C,), (N, C) or (N, C, d1, ..., dk) (class axis 1 from 2-D on),
        chunked along any axes.
    target : dask.array.Array or array_like
        Class indices of shape (), (N,) or (N, d1, ..., dk), or class probabilities of the
        logits' shape and dtype.  Rechunked to line up with the logits' blocks.
    weight : dask.array.Array or array_like, optional
        Per-class weight (C,), rechunked to the logits' class chunks.
    ignore_index, reduction, label_smoothing
        As in :func:`fastce.cross_entropy`.
    split_every : int, optional
        Fan-in of the tree merge of the class-chunk partials.

    Returns
    -------
    dask.array.Array
        Lazy: 0-d for 'mean'/'sum', the per-element loss for 'none'; equal to the in-memory
        :func:`fastce.cross_entropy` up to rounding.

    Raises
    ------
    ValueError, TypeError
        At call time, for shapes, dtypes and options (the in-memory API's messages) and for
        unknown chunk sizes.
    IndexError, ValueError
        When computed, for a class index out of range or a bad probability (position named).

    Notes
    -----
    Per block: the rows' (shift, sum-exp), the target logit and weight where the target
    class falls in the block, and the linear sums of label smoothing / probability targets;
    a tree reduction merges them over the class chunks; the finish step gives the loss.  The
    'mean' denominator (the summed target weights) is a reduction over the same partials.

    Examples
    --------
    >>> import dask.array as da, numpy as np, fastce.dask
    >>> x = da.from_array(np.array([[0.3, 0.6, 0.1], [0.1, 0.2, 0.7], [0.8, 0.1, 0.1]],
    ...                            np.float32), chunks=(2, 1))
    >>> round(float(fastce.dask.cross_entropy(x, np.array([1, 0, 2])).compute()), 4)
    1.2037
    """
    return _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing,
                          None, False, split_every)


def cross_entropy_with_grad(logits, target, *, weight=None, ignore_index=-100,
                            reduction="mean", label_smoothing=0.0, grad_output=None,
                            split_every=None):
    """Cross-entropy and its gradient for Dask logits, as
    :func:`fastce.cross_entropy_with_grad`.

    Parameters
    ----------
    logits, target, weight, ignore_index, reduction, label_smoothing, split_every
        As in :func:`cross_entropy`.
    grad_output : dask.array.Array, array_like or float, optional
        The upstream gradient: the loss's shape for ``reduction='none'``, a scalar otherwise.

    Returns
    -------
    loss : dask.array.Array
        As :func:`cross_entropy` returns it.
    grad_logits : dask.array.Array
        Lazy, of the logits' shape, dtype and chunks.

    Notes
    -----
    The gradient is a second blockwise pass over the logits with the merged row statistics
    and per-row factors.  Compute both with one ``dask.compute(loss, grad)`` to share the
    first pass.

    Examples
    --------
    >>> import dask, dask.array as da, numpy as np, fastce.dask
    >>> loss, g = fastce.dask.cross_entropy_with_grad(da.zeros((1, 2), chunks=1), np.array([0]))
    >>> dask.compute(loss, g)[1]
    array([[-0.5,  0.5]])
    """
    return _cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing,
                          grad_output, True, split_every)
