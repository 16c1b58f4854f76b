"""Linear cross-entropy: the loss of ``hidden @ weight.T (+ bias)`` without the N x V logits.

Rows are processed in chunks: a chunk's logits come from one BLAS matmul (NumPy ``@``) into a
reused buffer, fastce's fused kernel turns them into the chunk's loss and d_logits, and two
more matmuls fold d_logits into ``d_hidden`` (``g @ W``) and ``d_weight`` (``g.T @ h``).  Each
chunk holds whole rows, so no cross-chunk merge of softmax statistics is needed; peak memory
is the outputs plus two chunks of logits, independent of N.
"""
import numpy as np

from . import _config
from ._arrays import EMPTY, _as_array, _result, upstream_gradient
from ._cross_entropy import _check_targets, cross_entropy, cross_entropy_with_grad
from ._validate import (CrossEntropyProblem, large_vocab_options,
                        linear_cross_entropy_problem)

__all__ = ["linear_cross_entropy", "linear_cross_entropy_with_grad"]


def _rows_per_chunk(N, V):
    return max(1, min(N, _config.LINEAR_CHUNK_ELEMENTS // max(V, 1)))


class NumpyBLAS:
    """The matmuls, through NumPy's BLAS.  ``matmul_add`` accumulates ``out += a @ b`` in
    slabs of ``out``'s rows: NumPy has no GEMM with beta = 1, and a whole ``a @ b`` temporary
    would be V x H."""

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
    large_vocab_options(softcap, z_loss, False, dt)   # checked here too: N may be 0
    h = np.ascontiguousarray(hidden, dtype=dt)
    W = np.ascontiguousarray(weight, dtype=dt)
    b = None if bias is None else np.ascontiguousarray(bias, dtype=dt)
    # The targets' check and the upstream gradient are cross-entropy's, on the (N, V) logits
    # this computes: a scalar for 'mean'/'sum' (the mean's 1/denominator folded in), one per
    # row for 'none'.
    prob = CrossEntropyProblem(N, V, 1, False, dt, (N,))
    t, denom = _check_targets(target, prob, ignore_index, EMPTY[dt])
    if want_grad:
        gscale = upstream_gradient(grad_output, reduction, prob.loss_shape, dt, denom)
        row_go = gscale if gscale.size == N and reduction == "none" else None
        scale = float(gscale[0]) if row_go is None else 1.0

    rows = _rows_per_chunk(N, V)
    logits = np.empty((rows, V), dt)
    per_row = np.empty(N, dt) if reduction == "none" else None
    total = 0.0
    if want_grad:
        d_h = np.empty((N, H), dt)
        d_W = np.zeros((V, H), dt) if N == 0 else np.empty((V, H), dt)
        d_b = None if b is None else np.zeros(V, dt)
    part = "none" if reduction == "none" else "sum"
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        h_c = h[r0:r1]
        z = logits[:r1 - r0]
        blas.matmul(h_c, W.T, z)
        if b is not None:
            z += b
        opts = dict(ignore_index=ignore_index, reduction=part, label_smoothing=label_smoothing,
                    softcap=softcap, z_loss=z_loss)
        if not want_grad:
            loss_c = cross_entropy(z, t[r0:r1], **opts)
        else:
            if part == "none":
                go_c = None if row_go is None else row_go[r0:r1]
            else:
                go_c = scale
            loss_c, g = cross_entropy_with_grad(z, t[r0:r1], grad_output=go_c, **opts)
            blas.matmul(g, W, d_h[r0:r1])
            (blas.matmul if r0 == 0 else blas.matmul_add)(g.T, h_c, d_W)
            if d_b is not None:
                d_b += g.sum(axis=0)
            del g
        if per_row is not None:
            per_row[r0:r1] = loss_c
        else:
            total += float(loss_c)
    del logits

    in_dtype = hidden.dtype
    if per_row is not None:
        loss = _result(per_row, in_dtype)
    elif reduction == "mean":
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
    Rows are processed in chunks of about ``fastce._config.LINEAR_CHUNK_ELEMENTS`` logits: one
    matmul per chunk into a reused buffer, then fastce's one-pass cross-entropy kernel.  The
    extra memory is one chunk of logits, whatever N is.

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
    Per chunk of rows: logits by one matmul, the fused cross-entropy kernel writes the chunk's
    d_logits (the upstream gradient folded in), then ``d_hidden[chunk] = g @ W`` and
    ``d_weight += g.T @ h[chunk]`` (accumulated in vocabulary slabs, so the temporary is a
    slab, not V x H).  Three matmuls in all, as autograd does, and no N x V array.

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
