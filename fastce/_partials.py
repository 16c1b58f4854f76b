"""Host API of the per-(row, class-chunk) partials (kernels in ``fastce._cpu.partials``).

A computation over rows whose classes are split into chunks -- across Dask blocks, machines or
threads -- runs in three steps, each on NumPy arrays:

1. per chunk, :func:`stat_partials` / :func:`ce_partials`: one small partial row per logits row
   (the chunk's class offset tells it where the class-index target falls);
2. :func:`merge`: partials of disjoint chunks of the same rows, stacked on axis 1, merge into
   one (associative: merge in any tree);
3. :func:`lse` / :func:`ce_finish`: the finished value per row (and the gradient's per-row
   factors), then for outputs of the logits' shape a second pass over each chunk
   (:func:`softmax_chunk`, :func:`ce_grad_chunk`) with the merged row statistics.

Chunks are (rows, classes) arrays in the compute dtype (read in place when their rows are
contiguous); arguments arrive validated
(``fastce._validate``) except for the target values, which the partial step checks and reports
(``first_bad_index``, ``first_bad_probability``).
"""
import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import _runtime

# Through the runtime: the stale on-disk cache purge and the no-cache-location fallback run
# before numba loads these kernels.
_kernels = _runtime._import_kernels()
_k = _kernels.partials

CE_FIELDS = _k.CE_FIELDS
STAT_FIELDS = _k.STAT_FIELDS
F_WT = _k.F_WT
F_HIT = _k.F_HIT

_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32),
          np.dtype(np.float64): np.empty(0, np.float64)}
_NO_G = {k: np.ones(1, k) for k in _EMPTY}
_NO_COEFS = {k: np.empty((0, 3), k) for k in _EMPTY}


def _rows(x, dtype=None, writeable=False):
    """The 2-D chunk ``x`` as ``(flat, (rows, classes, stride))``, row i at
    ``flat[i * stride : i * stride + classes]``.  A chunk whose rows are contiguous -- a block
    cut from a wider C-contiguous array, as Dask's ``from_array`` hands them out -- is read in
    place through a 1-D view spanning it; anything else is copied C-contiguous first."""
    x = np.asarray(x)
    if dtype is not None and x.dtype != dtype:
        x = x.astype(dtype)
    R, c = x.shape
    item = x.itemsize
    if (R > 0 and c > 0 and x.dtype.isnative and x.strides[1] == item
            and x.strides[0] % item == 0 and x.strides[0] >= c * item):
        stride = x.strides[0] // item
        span = (R - 1) * stride + c
        return (as_strided(x, shape=(span,), strides=(item,), writeable=writeable),
                (R, c, stride))
    if writeable:
        raise ValueError("the chunk to write in place must have contiguous rows")
    x = np.ascontiguousarray(x)
    return x.reshape(-1), (R, c, c)


def _weight(weight, dtype):
    return _EMPTY[dtype] if weight is None else np.ascontiguousarray(weight, dtype=dtype)


def stat_partials(x):
    """(R, 2) (shift, sum-exp) partials of the (R, c) chunk ``x``."""
    flat, layout = _rows(x)
    out = np.empty((layout[0], STAT_FIELDS), flat.dtype)
    _k.stat_partials(flat, layout, out)
    return out


def ce_partials(x, lo, n_classes, target, weight=None, ignore_index=-100, eps=0.0,
                probs=False, cap=None, out=None):
    """(R, 7) cross-entropy partials of the (R, c) chunk ``x`` holding classes
    ``lo:lo + c`` of ``n_classes``: ``target`` is the rows' class indices (R,) (int64), or with
    ``probs`` the chunk's probability targets (R, c); ``weight`` the chunk's class weights (c,)
    or None.  ``cap`` (class indices only): None or the ``(softcap, 1 / softcap)`` pair of
    ``fastce._validate.large_vocab_options``, for the partials of the soft-capped logits.
    ``out``: an (R, 7) array (a view will do) to write them into."""
    flat, layout = _rows(x)
    if out is None:
        out = np.empty((layout[0], CE_FIELDS), flat.dtype)
    w = _weight(weight, flat.dtype)
    if probs:
        t_flat, t_layout = _rows(target, flat.dtype)
        _k.ce_prob_partials(flat, layout, t_flat, t_layout, w, n_classes, float(eps), out)
    else:
        _k.ce_index_partials(flat, layout, lo, n_classes, np.ascontiguousarray(target, np.int64),
                             w, ignore_index, float(eps), out, cap)
    return out


def merge(parts):
    """Merge partials stacked on axis 1, (R, k, F) -> (R, F)."""
    parts = np.ascontiguousarray(parts)
    out = np.empty((parts.shape[0], parts.shape[2]), parts.dtype)
    _k.merge_partials(parts, out)
    return out


def lse(stats):
    """log-sum-exp (R,) of merged partials (R, F)."""
    out = np.empty(stats.shape[0], stats.dtype)
    _k.lse_finish(np.ascontiguousarray(stats), out)
    return out


def ce_finish(parts, n_classes, eps=0.0, probs=False, g=None):
    """Per-row loss (R,) of merged cross-entropy partials (R, 7); with ``g`` (the upstream
    factor per row (R,), or one for all (1,)) also the gradient's per-row factors (R, 3) for
    :func:`ce_grad_chunk`."""
    parts = np.ascontiguousarray(parts)
    dt = parts.dtype
    loss = np.empty(parts.shape[0], dt)
    if g is None:
        _k.ce_finish(parts, probs, float(eps), n_classes, _NO_G[dt], loss, _NO_COEFS[dt])
        return loss
    coefs = np.empty((parts.shape[0], 3), dt)
    _k.ce_finish(parts, probs, float(eps), n_classes, np.ascontiguousarray(g, dt).reshape(-1),
                 loss, coefs)
    return loss, coefs


def softmax_chunk(x, stats, log):
    """log_softmax (``log``) or softmax of the (R, c) chunk ``x`` given its rows' merged
    partials ``stats`` (R, F)."""
    flat, layout = _rows(x)
    out = np.empty(layout[:2], flat.dtype)
    _k.softmax_chunk(flat, layout, np.ascontiguousarray(stats), log, out)
    return out


def ce_grad_chunk(x, lo, n_classes, target, parts, coefs, weight=None, ignore_index=-100,
                  eps=0.0, probs=False, cap=None, in_place=False):
    """Gradient (R, c) of the chunk ``x`` (classes ``lo:lo + c``), from the rows' merged
    partials and the factors of :func:`ce_finish`; arguments as in :func:`ce_partials`.
    ``in_place`` (class indices only; ``x`` in the compute dtype with contiguous rows):
    written over ``x``, which is returned."""
    if in_place and probs:
        raise ValueError("ce_grad_chunk: in_place is for class-index targets only")
    flat, layout = _rows(x, writeable=in_place)
    out = None if in_place else np.empty(layout[:2], flat.dtype)
    w = _weight(weight, flat.dtype)
    parts = np.ascontiguousarray(parts)
    coefs = np.ascontiguousarray(coefs)
    if probs:
        t_flat, t_layout = _rows(target, flat.dtype)
        _k.ce_prob_grad(flat, layout, t_flat, t_layout, w, n_classes, float(eps), parts, coefs,
                        out)
    else:
        _k.ce_index_grad(flat, layout, lo, np.ascontiguousarray(target, np.int64), w,
                         ignore_index, parts, coefs, out, cap)
    return x if in_place else out


def first_bad_index(target, n_classes, ignore_index):
    """Flat position of the first class index outside [0, n_classes) that is not
    ``ignore_index``, or -1 (the in-memory path's check kernel)."""
    t = np.asarray(target).reshape(-1)
    if t.dtype != np.int64:
        if t.dtype.kind == "u" and t.size and t.max() > np.iinfo(np.int64).max:
            t = np.where(t > n_classes, n_classes, t)  # out of range either way; keep it so
        t = t.astype(np.int64)
    bad, _ = _kernels.cross_entropy.check_index_target(np.ascontiguousarray(t), n_classes,
                                                       ignore_index, _EMPTY[np.dtype(np.float64)])
    return int(bad)


def first_bad_probability(target, dtype):
    """The probability targets in ``dtype`` (flat) and the position of the first one that is
    NaN, infinite or negative, or -1 (the in-memory path's check kernel)."""
    flat = np.ascontiguousarray(target, dtype=dtype).reshape(-1)
    return flat, int(_kernels.checks.first_bad_value(flat, 0.0, np.inf))
