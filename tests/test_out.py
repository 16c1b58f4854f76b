"""Outputs into the caller's memory: ``out=`` of log_softmax/softmax and ``grad_input=`` of
cross_entropy_with_grad, checked against torch, and their argument errors."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastce

RNG = np.random.default_rng(11)
TORCH_OP = {fastce.log_softmax: torch.log_softmax, fastce.softmax: torch.softmax}
TOL = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-14),
       np.float16: dict(rtol=2e-3, atol=1e-3)}


def _torch_ref(op, x, axis):
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
    return TORCH_OP[op](xt, axis).numpy()


@pytest.mark.parametrize("op", [fastce.log_softmax, fastce.softmax])
@pytest.mark.parametrize("shape,axis", [((5, 7), -1), ((5, 7), 0), ((3, 4, 6), 1),
                                        ((300, 257), -1), ((64, 9, 130), 1)])
@pytest.mark.parametrize("x_order,out_order", [("C", "C"), ("F", "F"), ("C", "F"),
                                               ("F", "C")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_family_out(op, shape, axis, x_order, out_order, dtype):
    x = np.asarray(RNG.standard_normal(shape).astype(dtype) * 3, order=x_order)
    x_before = x.copy()
    out = np.full(shape, np.nan, dtype=dtype, order=out_order)
    got = op(x, axis=axis, out=out)
    assert got is out
    np.testing.assert_allclose(out, _torch_ref(op, x, axis), **TOL[dtype])
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(out, op(x, axis=axis))   # same values as without out=


@pytest.mark.parametrize("op", [fastce.log_softmax, fastce.softmax])
def test_out_strided_and_float16(op):
    """A strided (non-contiguous) out and a float16 out (computed in float32, copied in)."""
    x = RNG.standard_normal((6, 10))
    big = np.zeros((6, 20))
    got = op(x, out=big[:, ::2])
    assert got.base is big
    np.testing.assert_allclose(big[:, ::2], _torch_ref(op, x, -1), **TOL[np.float64])
    assert not big[:, 1::2].any()                          # the rest is untouched
    h = x.astype(np.float16)
    out = np.empty_like(h)
    assert op(h, out=out) is out
    np.testing.assert_allclose(out.astype(np.float64), _torch_ref(op, h, -1), **TOL[np.float16])


def test_out_interleaved_with_input_but_disjoint_is_accepted():
    buf = np.zeros((4, 6))
    buf[:, :3] = RNG.standard_normal((4, 3))
    fastce.softmax(buf[:, :3], out=buf[:, 3:])
    np.testing.assert_allclose(buf[:, 3:], _torch_ref(fastce.softmax, buf[:, :3], -1),
                               **TOL[np.float64])


@pytest.mark.parametrize("op", [fastce.log_softmax, fastce.softmax])
def test_out_errors(op):
    x = RNG.standard_normal((4, 5))
    with pytest.raises(ValueError, match=r"out must have x's shape \(4, 5\), got \(5, 4\)"):
        op(x, out=np.empty((5, 4)))
    with pytest.raises(TypeError, match="out must have x's dtype float64, got float32"):
        op(x, out=np.empty((4, 5), np.float32))
    with pytest.raises(TypeError, match="out must be a numpy.ndarray .* got list"):
        op(x, out=[[0.0] * 5] * 4)
    ro = np.empty((4, 5))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out is read-only"):
        op(x, out=ro)
    with pytest.raises(ValueError, match="out shares memory with x"):
        op(x, out=x)
    with pytest.raises(ValueError, match="out shares memory with x"):
        op(x, axis=0, out=x[::-1])
    # logsumexp reduces: it takes no out (a TypeError from Python, as for any bad keyword)
    with pytest.raises(TypeError):
        fastce.logsumexp(x, out=np.empty(4))


# ---------------------------------------------------------------------------------------------
# cross_entropy_with_grad(grad_input=...)

def _torch_grad(x, t, **kw):
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64)).requires_grad_(True)
    go = kw.pop("grad_output", None)
    loss = F.cross_entropy(xt, torch.from_numpy(t), **kw)
    loss.backward(None if go is None else torch.as_tensor(go, dtype=torch.float64))
    return loss.detach().numpy(), xt.grad.numpy()


CE_CASES = [
    ((4, 7), {}),                                           # the small one-entry path
    ((300, 257), {}),                                       # parallel rows
    ((200, 5), {"label_smoothing": 0.1}),                   # few classes, many rows
    ((2, 70000), {}),                                       # split rows
    ((8, 5, 6, 7), {"reduction": "sum"}),                   # K-dim
    ((30, 11), {"weight": "w", "ignore_index": 2}),
    ((30, 11), {"reduction": "none", "grad_output": "go"}),
]


@pytest.mark.parametrize("shape,kw", CE_CASES)
@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grad_input(shape, kw, order, dtype):
    kw = dict(kw)
    C = shape[1]
    x = np.asarray(RNG.standard_normal(shape).astype(dtype), order=order)
    t = RNG.integers(0, C, (shape[0],) + shape[2:])
    if kw.get("weight") == "w":
        kw["weight"] = RNG.random(C).astype(dtype) + 0.5
    if kw.get("grad_output") == "go":
        kw["grad_output"] = RNG.standard_normal(t.shape).astype(dtype)
    x_before = x.copy()
    g = np.full(shape, np.nan, dtype=dtype, order=order)
    loss, got = fastce.cross_entropy_with_grad(x, t, grad_input=g, **kw)
    assert got is g
    tkw = dict(kw)
    if "weight" in tkw:
        tkw["weight"] = torch.from_numpy(tkw["weight"].astype(np.float64))
    want_loss, want_grad = _torch_grad(x, t, **tkw)
    np.testing.assert_allclose(g, want_grad, **TOL[dtype])
    np.testing.assert_allclose(loss, want_loss, rtol=TOL[dtype]["rtol"] * 10,
                               atol=TOL[dtype]["atol"])
    np.testing.assert_array_equal(x, x_before)
    plain_loss, plain_grad = fastce.cross_entropy_with_grad(x, t, **kw)
    np.testing.assert_array_equal(g, plain_grad)            # same values as without it
    np.testing.assert_array_equal(loss, plain_loss)


def test_grad_input_float16_and_strided():
    x = RNG.standard_normal((40, 9)).astype(np.float16)
    t = RNG.integers(0, 9, 40)
    g = np.empty_like(x)
    loss, got = fastce.cross_entropy_with_grad(x, t, grad_input=g)
    assert got is g
    np.testing.assert_allclose(g.astype(np.float64), _torch_grad(x, t)[1], rtol=2e-3,
                               atol=1e-4)
    x64 = x.astype(np.float64)
    big = np.zeros((40, 18))
    fastce.cross_entropy_with_grad(x64, t, grad_input=big[:, 1::2])
    np.testing.assert_allclose(big[:, 1::2], _torch_grad(x64, t)[1], **TOL[np.float64])
    assert not big[:, ::2].any()


def test_grad_input_errors():
    x = RNG.standard_normal((4, 5))
    t = np.array([0, 1, 2, 3])
    ce = fastce.cross_entropy_with_grad
    with pytest.raises(ValueError, match=r"grad_input must have the logits' shape \(4, 5\)"):
        ce(x, t, grad_input=np.empty((4, 4)))
    with pytest.raises(TypeError, match="grad_input must have the logits' dtype float64"):
        ce(x, t, grad_input=np.empty((4, 5), np.float32))
    with pytest.raises(TypeError, match="grad_input must be a numpy.ndarray"):
        ce(x, t, grad_input=0.0)
    with pytest.raises(ValueError, match="grad_input shares memory with logits"):
        ce(x, t, grad_input=x)
    w = np.ones(20)
    with pytest.raises(ValueError, match="grad_input shares memory with weight"):
        ce(x, t, weight=w[:5], grad_input=w.reshape(4, 5))
    go = np.ones((4, 5))
    with pytest.raises(ValueError, match="grad_input shares memory with grad_output"):
        ce(x, t, reduction="none", grad_output=go[0, :4], grad_input=go)
    ro = np.empty((4, 5))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="grad_input is read-only"):
        ce(x, t, grad_input=ro)
    # An invalid target is still reported as such, and the buffer is not half-written.
    g = np.full((4, 5), 7.0)
    with pytest.raises(IndexError):
        ce(x, np.array([0, 1, 2, 9]), grad_input=g)
    assert (g == 7.0).all()


def test_cuda_functions_refuse_out_clearly():
    """No GPU needed: the keyword is refused before the backend is looked for."""
    import fastce.cuda
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(NotImplementedError, match="out= .* not implemented for CUDA"):
        fastce.cuda.log_softmax(x, out=np.empty_like(x))
    with pytest.raises(NotImplementedError, match="out= .* not implemented for CUDA"):
        fastce.cuda.softmax(x, out=np.empty_like(x))
    with pytest.raises(NotImplementedError, match="grad_input= .* not implemented for CUDA"):
        fastce.cuda.cross_entropy_with_grad(x, np.array([0, 1]), grad_input=np.empty_like(x))
