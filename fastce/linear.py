"""Linear cross-entropy: the loss of ``hidden @ weight.T (+ bias)`` without the N x V logits.

The logits are computed in blocks of R rows x Vc vocabulary entries, each by one BLAS matmul
(``hidden[rows] @ weight[vocab].T``).  Each block yields fastce's mergeable per-row partials
(shift, sum-exp, target logit, label-smoothing sums: ``fastce._partials``); a row chunk's
partials merge over its vocabulary blocks and the finish step gives the loss and the
gradient's per-row factors.  A second pass over the blocks writes d_logits in place and folds
them into ``d_hidden[rows] += g @ weight[vocab]`` and ``d_weight[vocab] += g.T @ hidden[rows]``.

Between the two passes the blocks' logits are either kept (R x V values: three matmuls in all,
as autograd does) or, when V is so large that keeping them would leave too few rows per chunk
for efficient matmuls, recomputed (R x Vc values, a fourth matmul).  The forward alone keeps
nothing: one block.  See :func:`_chunking`.
"""
import numpy as np

from . import _config
from . import _partials as P
from ._arrays import EMPTY, _as_array, _result, upstream_gradient
from ._cross_entropy import _check_targets
from ._validate import (CrossEntropyProblem, large_vocab_options,
                        linear_cross_entropy_problem)

__all__ = ["linear_cross_entropy", "linear_cross_entropy_with_grad"]


def _chunking(N, V, want_grad):
    """``(rows, vocab, keep)``: rows per row chunk, vocabulary entries per block, and whether
    a row chunk's logits are kept between the partials pass and the gradient pass.

    Blocks are ``LINEAR_VOCAB_CHUNK`` wide.  The logits held at once -- a row chunk's (R x V)
    when kept, else one block (R x Vc) -- stay within ``LINEAR_CHUNK_ELEMENTS``.  With
    gradients they are kept when that still allows ``LINEAR_MIN_ROWS`` rows (or all N);
    otherwise they are recomputed.  The rows are spread evenly over the chunks."""
    budget = _config.LINEAR_CHUNK_ELEMENTS
    vc = max(1, min(V, _config.LINEAR_VOCAB_CHUNK))
    keep_rows = budget // max(V, 1)
    keep = want_grad and keep_rows >= min(N, _config.LINEAR_MIN_ROWS)
    rows = max(1, min(N, keep_rows if keep else budget // vc))
    n_chunks = -(-N // rows)
    return (-(-N // n_chunks) if N else 1), vc, keep


class NumpyBLAS:
    """The matmuls, through NumPy's BLAS.  ``matmul_add`` accumulates ``out += a @ b`` in
    slabs of ``out``'s rows: NumPy has no GEMM with beta = 1, and a whole ``a @ b`` temporary
    would be as large as ``out``."""

    @staticmethod
    def matmul(a, b, out):
        np.matmul(a, b, out=out)

    @staticmethod
    def matmul_add(a, b, out):
        slab = min(out.shape[0], _config.LINEAR_VOCAB_SLAB)
        acc = np.empty((slab, out.shape[1]), out.dtype)
        for v0 in range(0, out.shape[0], slab):
            v1 = min(out.shape[0], v0 + slab)
            tmp = acc[:v1 - v0]
            np.matmul(a[v0:v1], b, out=tmp)
            out[v0:v1] += tmp


def _empty_aligned(shape, dtype, align=64):
    """``np.empty`` starting on an ``align``-byte boundary (NumPy's own start 16 bytes past
    one): the BLAS GEMMs run measurably slower on misaligned output rows."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    buf = np.empty(n * dtype.itemsize + align, np.uint8)
    skip = -buf.ctypes.data % align
    return buf[skip:skip + n * dtype.itemsize].view(dtype).reshape(shape)


def _z_loss(parts, loss, coefs, z_loss, g):
    """Add ``z_loss * lse**2`` to the non-ignored rows' ``loss`` and its gradient's factor
    ``2 z_loss lse p_c`` to the softmax coefficient of ``coefs`` (``P.ce_finish``'s)."""
    hit = parts[:, P.F_HIT] != 0
    lse = P.lse(parts)
    dt = loss.dtype.type
    loss += np.where(hit, dt(z_loss) * lse * lse, dt(0))
    if coefs is not None:
        coefs[:, 0] += np.where(hit, dt(2 * z_loss) * lse * g, dt(0))


def _run(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, grad_output,
         want_grad, blas=NumpyBLAS, softcap=None, z_loss=0.0):
    """The implementation; ``blas`` does the matmuls on the arrays' memory (``fastce.torch``
    passes torch's, which accumulates in place with GEMM's beta = 1)."""
    hidden = _as_array(hidden, "hidden")
    weight = _as_array(weight, "weight")
    target = _as_array(target, "target")
    if bias is not None:
        bias = _as_array(bias, "bias")
    for name, a in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if a is not None and a.dtype.kind == "b":
            raise TypeError(f"{name} must be a floating-point array, got dtype bool")
    N, H, V, dt = linear_cross_entropy_problem(
        hidden.shape, hidden.dtype, weight.shape, weight.dtype, target.shape, target.dtype,
        None if bias is None else bias.shape, None if bias is None else bias.dtype,
        ignore_index, reduction, label_smoothing)
    cap, z_loss = large_vocab_options(softcap, z_loss, False, dt)  # checked here: N may be 0
    h = np.ascontiguousarray(hidden, dtype=dt)
    W = np.ascontiguousarray(weight, dtype=dt)
    b = None if bias is None else np.ascontiguousarray(bias, dtype=dt)
    # The targets' check and the upstream gradient are cross-entropy's, on the (N, V) logits
    # this computes: a scalar for 'mean'/'sum' (the mean's 1/denominator folded in), one per
    # row for 'none'.
    prob = CrossEntropyProblem(N, V, 1, False, dt, (N,))
    t, denom = _check_targets(target, prob, ignore_index, EMPTY[dt])
    t = np.ascontiguousarray(t, np.int64)
    eps = float(label_smoothing)
    if want_grad:
        gscale = upstream_gradient(grad_output, reduction, prob.loss_shape, dt, denom)
        per_row_g = reduction == "none" and gscale.size == N
        g_all = np.ascontiguousarray(gscale, dt).reshape(-1)[:1]

    rows, vc, keep = _chunking(N, V, want_grad)
    blocks = [(v0, min(V, v0 + vc)) for v0 in range(0, V, vc)]
    # keep: one row chunk's logits, block after block (each block C-contiguous); else one
    # block.  The gradient pass writes d_logits over them.
    logits = _empty_aligned(rows * (V if keep else vc), dt)
    per_row = np.empty(N, dt)
    if want_grad:
        d_h = _empty_aligned((N, H), dt)
        d_W = np.zeros((V, H), dt) if N == 0 else _empty_aligned((V, H), dt)
        d_b = None if b is None else np.zeros(V, dt)
    parts = np.empty((rows, len(blocks), P.CE_FIELDS), dt)

    def block_logits(r0, r1, j):
        v0, v1 = blocks[j]
        off = (r1 - r0) * v0 if keep else 0
        z = logits[off:off + (r1 - r0) * (v1 - v0)].reshape(r1 - r0, v1 - v0)
        return z, v0, v1

    def compute(z, h_c, v0, v1):
        blas.matmul(h_c, W[v0:v1].T, z)
        if b is not None:
            z += b[v0:v1]

    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        h_c, t_c = h[r0:r1], t[r0:r1]
        p_c = parts[:r1 - r0]
        for j in range(len(blocks)):
            z, v0, v1 = block_logits(r0, r1, j)
            compute(z, h_c, v0, v1)
            P.ce_partials(z, v0, V, t_c, None, ignore_index, eps, cap=cap, out=p_c[:, j])
        merged = P.merge(p_c)
        if not want_grad:
            loss_c = P.ce_finish(merged, V, eps)
            coefs = g_c = None
        else:
            g_c = gscale[r0:r1] if per_row_g else g_all
            loss_c, coefs = P.ce_finish(merged, V, eps, g=g_c)
        if z_loss:
            _z_loss(merged, loss_c, coefs, z_loss, g_c)
        per_row[r0:r1] = loss_c
        if not want_grad:
            continue
        for j in range(len(blocks)):
            z, v0, v1 = block_logits(r0, r1, j)
            if not keep:
                compute(z, h_c, v0, v1)
            g = P.ce_grad_chunk(z, v0, V, t_c, merged, coefs, None, ignore_index, eps, cap=cap,
                                in_place=True)
            (blas.matmul if j == 0 else blas.matmul_add)(g, W[v0:v1], d_h[r0:r1])
            (blas.matmul if r0 == 0 else blas.matmul_add)(g.T, h_c, d_W[v0:v1])
            if d_b is not None:
                d_b[v0:v1] += g.sum(axis=0)
    del logits

    in_dtype = hidden.dtype
    if reduction == "none":
        loss = _result(per_row, in_dtype)
    else:
        total = float(per_row.sum(dtype=np.float64))
        if reduction == "mean":
            loss = in_dtype.type(total / denom if denom != 0 else np.nan)
        else:
            loss = in_dtype.type(total)
    if not want_grad:
        return loss
    out = (loss, _result(d_h, in_dtype), _result(d_W, in_dtype))
    return out if d_b is None else out + (_result(d_b, in_dtype),)


def linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index=-100,
                         reduction="mean", label_smoothing=0.0, softcap=None, z_loss=0.0):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` without holding the N x V logits.

    Parameters
    ----------
    hidden : array_like
        (N, H) activations (float32 or float64).
    weight : array_like
        (V, H) output-layer weight, as ``torch.nn.Linear(H, V).weight``; the hidden's dtype.
    target : array_like of int
        (N,) class indices in [0, V) or ``ignore_index``.
    bias : array_like, optional
        (V,).
    ignore_index : int, optional
        Target value that contributes neither loss nor gradient (default -100).
    reduction : {'mean', 'sum', 'none'}, optional
        'mean' divides by the number of non-ignored targets.
    label_smoothing : float, optional
        In [0, 1], as in :func:`fastce.cross_entropy`.
    softcap : float, optional
        Logit soft-capping: the logits become ``softcap * tanh(logits / softcap)`` (in the
        cross-entropy kernel, chunk by chunk), as in :func:`fastce.cross_entropy`.
    z_loss : float, optional
        ``z_loss * lse**2`` joins each non-ignored row's loss, as in
        :func:`fastce.cross_entropy`.

    Returns
    -------
    numpy scalar or ndarray
        The loss, as ``fastce.cross_entropy(hidden @ weight.T + bias, target, ...)``.

    Notes
    -----
    The logits are computed in blocks of rows x vocabulary entries (one matmul each, into a
    reused buffer) and reduced to fastce's mergeable per-row partials, merged per row chunk:
    the extra memory is one block of at most ``fastce._config.LINEAR_CHUNK_ELEMENTS`` logits,
    whatever N and V are (see :mod:`fastce.linear`).

    Examples
    --------
    >>> import numpy as np, fastce
    >>> rng = np.random.default_rng(0)
    >>> h, w = rng.standard_normal((4, 8)), rng.standard_normal((10, 8))
    >>> t = np.array([1, 2, 3, 4])
    >>> bool(np.isclose(fastce.linear_cross_entropy(h, w, t), fastce.cross_entropy(h @ w.T, t)))
    True
    """
    return _run(hidden, weight, target, bias, ignore_index, reduction, label_smoothing, None,
                False, softcap=softcap, z_loss=z_loss)


def linear_cross_entropy_with_grad(hidden, weight, target, bias=None, *, ignore_index=-100,
                                   reduction="mean", label_smoothing=0.0, grad_output=None,
                                   softcap=None, z_loss=0.0):
    """:func:`linear_cross_entropy` and its gradients, in one chunked pass.

    Parameters
    ----------
    hidden, weight, target, bias, ignore_index, reduction, label_smoothing, softcap, z_loss
        As in :func:`linear_cross_entropy`.
    grad_output : array_like or float, optional
        The upstream gradient: (N,) for ``reduction='none'``, a scalar otherwise.  Default:
        ones.

    Returns
    -------
    loss : numpy scalar or ndarray
    d_hidden : ndarray
        (N, H): ``g @ weight`` with ``g`` the gradient with respect to the logits.
    d_weight : ndarray
        (V, H): ``g.T @ hidden``.
    d_bias : ndarray
        (V,): ``g.sum(0)``; returned only when ``bias`` is given.

    Notes
    -----
    Per chunk of rows: the logits block by block (one matmul each), their partials merged
    and finished, then d_logits written over each block (the upstream gradient folded in)
    and folded into ``d_hidden[rows] += g @ W[vocab]`` and ``d_weight[vocab] += g.T @
    h[rows]``.  Three matmuls in all, as autograd does, while a row chunk's R x V logits fit
    ``LINEAR_CHUNK_ELEMENTS`` with enough rows; for larger V a fourth (the block recomputed
    in the gradient pass).  No N x V array.

    Examples
    --------
    >>> import numpy as np, fastce
    >>> rng = np.random.default_rng(0)
    >>> h, w = rng.standard_normal((4, 8)), rng.standard_normal((10, 8))
    >>> loss, d_h, d_w = fastce.linear_cross_entropy_with_grad(h, w, np.array([1, 2, 3, 4]))
    >>> d_h.shape, d_w.shape
    ((4, 8), (10, 8))
    """
    return _run(hidden, weight, target, bias, ignore_index, reduction, label_smoothing,
                grad_output, True, softcap=softcap, z_loss=z_loss)
