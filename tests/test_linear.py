"""fastce.linear_cross_entropy(_with_grad) and fastce.nll_loss(_with_grad) (NumPy API) against
torch autograd in float64, with the chunking forced small so that every path (several row
chunks, several vocabulary blocks with their logits kept or recomputed for the gradient pass,
short last chunks and blocks, slabs of the weight-gradient accumulation) runs."""
import numpy as np
import pytest

import fastce
from fastce import _config
from fastce.linear import _chunking
from fastce.reference import torch_cross_entropy_zloss_softcap

from helpers import F, assert_close, t64, torch

pytestmark = pytest.mark.skipif(torch is None, reason="torch is the reference")


def _torch_linear_ce(h, w, t, b, grad_output=None, **kw):
    ht, wt = t64(h).requires_grad_(True), t64(w).requires_grad_(True)
    bt = None if b is None else t64(b).requires_grad_(True)
    z = ht @ wt.T + (0 if bt is None else bt)
    loss = torch_cross_entropy_zloss_softcap(z, t64(t), **kw)
    go = torch.ones_like(loss) if grad_output is None else t64(grad_output).reshape(loss.shape)
    loss.backward(go)
    grads = (ht.grad.numpy(), wt.grad.numpy()) + (() if bt is None else (bt.grad.numpy(),))
    return loss.detach().numpy(), grads


# At V = 13, N = 23: (LINEAR_CHUNK_ELEMENTS, LINEAR_VOCAB_CHUNK, LINEAR_MIN_ROWS) and the
# chunking they give, (rows per chunk, vocabulary block, logits kept for the gradient pass).
CHUNKINGS = {"rows": ((7 * 13, 13, 4), (6, 13, True)),
             "blocks-kept": ((7 * 13, 5, 4), (6, 5, True)),
             "blocks-recomputed": ((9 * 5, 5, 8), (8, 5, False))}


@pytest.fixture(params=list(CHUNKINGS))
def small_chunks(request, monkeypatch):
    """Whole-row chunks of 6 rows; or blocks of 5 vocabulary entries (13 = 5 + 5 + 3) with a
    row chunk's logits kept (6 rows), or recomputed (8 rows); weight-gradient slabs of 2."""
    (budget, vocab, min_rows), chunking = CHUNKINGS[request.param]
    monkeypatch.setattr(_config, "LINEAR_CHUNK_ELEMENTS", budget)
    monkeypatch.setattr(_config, "LINEAR_VOCAB_CHUNK", vocab)
    monkeypatch.setattr(_config, "LINEAR_MIN_ROWS", min_rows)
    monkeypatch.setattr(_config, "LINEAR_VOCAB_SLAB", 2)
    assert _chunking(23, 13, True) == chunking


# (bias, label_smoothing, softcap, z_loss): each option alone and all together.
OPTIONS = [(False, 0.0, None, 0.0), (True, 0.0, None, 0.0), (False, 0.3, None, 0.0),
           (False, 0.0, 1.5, 0.0), (False, 0.0, None, 0.01), (True, 0.3, 1.5, 0.01)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias,smoothing,softcap,z_loss", OPTIONS)
def test_linear_cross_entropy_matches_torch(small_chunks, dtype, reduction, with_bias,
                                            smoothing, softcap, z_loss):
    rng = np.random.default_rng(int(with_bias) + 2 * int(smoothing * 10))
    N, H, V = 23, 6, 13
    h = rng.standard_normal((N, H)).astype(dtype)
    w = rng.standard_normal((V, H)).astype(dtype)
    b = rng.standard_normal(V).astype(dtype) if with_bias else None
    t = rng.integers(0, V, N)
    t[[0, 9]] = -100
    go = rng.random(N) if reduction == "none" else 1.7
    kw = dict(reduction=reduction, label_smoothing=smoothing, softcap=softcap, z_loss=z_loss)
    ref_loss, ref_grads = _torch_linear_ce(h, w, t, b, go, **kw)
    loss = fastce.linear_cross_entropy(h, w, t, b, **kw)
    out = fastce.linear_cross_entropy_with_grad(h, w, t, b, grad_output=go, **kw)
    assert len(out) == (4 if with_bias else 3)
    assert np.asarray(loss).dtype == dtype
    assert_close(loss, ref_loss, scale=10)
    assert_close(out[0], ref_loss, scale=10)
    for got, want in zip(out[1:], ref_grads):
        assert got.dtype == dtype
        assert_close(got, want, scale=10)


def test_linear_cross_entropy_float32_within_1e5_of_torch_with_default_chunks():
    """Several default-size chunks (V = 32000 gives 524 rows per chunk, then 76) in float32 against
    torch's float32 F.cross_entropy(hidden @ weight.T): within 1e-5."""
    rng = np.random.default_rng(1)
    N, H, V = 600, 32, 32000
    h = (rng.standard_normal((N, H)) * 0.3).astype(np.float32)
    w = (rng.standard_normal((V, H)) * 0.3).astype(np.float32)
    t = rng.integers(0, V, N)
    ht, wt = torch.from_numpy(h).requires_grad_(True), torch.from_numpy(w).requires_grad_(True)
    ref = F.cross_entropy(ht @ wt.T, torch.from_numpy(t))
    ref.backward()
    loss, d_h, d_w = fastce.linear_cross_entropy_with_grad(h, w, t)
    assert abs(float(loss) - ref.item()) <= 1e-5 * abs(ref.item())
    np.testing.assert_allclose(d_h, ht.grad.numpy(), rtol=0, atol=1e-5 * np.abs(d_h).max())
    np.testing.assert_allclose(d_w, wt.grad.numpy(), rtol=0, atol=1e-5 * np.abs(d_w).max())


def test_linear_cross_entropy_edge_cases():
    rng = np.random.default_rng(0)
    h, w = rng.standard_normal((3, 4)), rng.standard_normal((5, 4))
    all_ignored = np.full(3, -100)
    loss, d_h, d_w = fastce.linear_cross_entropy_with_grad(h, w, all_ignored)
    assert np.isnan(loss) and not d_h.any() and not d_w.any()       # torch: NaN, zero grads
    loss, d_h, d_w = fastce.linear_cross_entropy_with_grad(h[:0], w, all_ignored[:0],
                                                           reduction="sum")
    assert loss == 0 and d_h.shape == (0, 4) and not d_w.any()


def test_linear_cross_entropy_rejects_bad_input():
    h, w, t = np.zeros((3, 4)), np.zeros((5, 4)), np.array([0, 1, 2])
    with pytest.raises(ValueError, match=r"weight must have shape \(V, H=4\)"):
        fastce.linear_cross_entropy(h, np.zeros((5, 3)), t)
    with pytest.raises(ValueError, match="hidden must be 2-D"):
        fastce.linear_cross_entropy(h[0], w, t)
    with pytest.raises(IndexError, match=r"class index 5 at position \(1,\)"):
        fastce.linear_cross_entropy(h, w, np.array([0, 5, 1]))
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        fastce.linear_cross_entropy(h, w.astype(np.float32), t)
    with pytest.raises(ValueError, match="bias must have shape"):
        fastce.linear_cross_entropy(h, w, t, np.zeros(4))
    with pytest.raises(TypeError, match="integer class indices"):
        fastce.linear_cross_entropy(h, w, t.astype(float))
    with pytest.raises(ValueError, match="grad_output must have the loss's shape"):
        fastce.linear_cross_entropy_with_grad(h, w, t, reduction="none", grad_output=[1.0])
    before = [a.copy() for a in (h, w, t)]
    fastce.linear_cross_entropy_with_grad(h, w, t)
    for a, b in zip((h, w, t), before):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# nll_loss (NumPy API)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(5,), (6, 4), (3, 4, 2, 3)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_loss_matches_torch(dtype, shape, reduction):
    rng = np.random.default_rng(len(shape))
    x = np.log(fastce.softmax(rng.standard_normal(shape), axis=0 if len(shape) == 1 else 1))
    x = x.astype(dtype)
    C = shape[0] if len(shape) == 1 else shape[1]
    tshape = () if len(shape) == 1 else shape[:1] + shape[2:]
    t = rng.integers(0, C, tshape)
    if t.size > 1:
        t.reshape(-1)[1] = 2
    w = rng.random(C) + 0.2
    go = rng.random(tshape) if reduction == "none" else 0.7
    xt = t64(x).requires_grad_(True)
    ref = F.nll_loss(xt, t64(t), weight=t64(w), ignore_index=2, reduction=reduction)
    ref.backward(t64(go).reshape(ref.shape))
    loss = fastce.nll_loss(x, t, weight=w.astype(dtype), ignore_index=2, reduction=reduction)
    loss2, grad = fastce.nll_loss_with_grad(x, t, weight=w.astype(dtype), ignore_index=2,
                                            reduction=reduction, grad_output=go)
    assert_close(loss, ref.detach().numpy())
    assert_close(loss2, ref.detach().numpy())
    assert grad.dtype == dtype
    assert_close(grad, xt.grad.numpy())


def test_nll_loss_edge_cases_and_errors():
    x = np.log(np.full((2, 3), 1 / 3))
    assert np.isnan(fastce.nll_loss(x, np.array([-100, -100])))        # 0/0, as torch
    assert fastce.nll_loss(np.array([[-np.inf, 0.0]]), np.array([0])) == np.inf
    with pytest.raises(IndexError, match=r"class index 3 at position \(1,\)"):
        fastce.nll_loss(x, np.array([0, 3]))
    with pytest.raises(TypeError, match="integer class indices"):
        fastce.nll_loss(x, np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"target must have shape \(2,\)"):
        fastce.nll_loss(x, np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="weight must be a 1-D array of length C=3"):
        fastce.nll_loss(x, np.array([0, 1]), weight=np.ones(2))
    with pytest.raises(ValueError, match="reduction"):
        fastce.nll_loss(x, np.array([0, 1]), reduction="avg")
    with pytest.raises(TypeError, match="log_probs must be a floating-point"):
        fastce.nll_loss(np.zeros((2, 3), int), np.array([0, 1]))
