"""Large-vocabulary options of cross-entropy (issue #12 item 2): ``softcap``, ``z_loss`` and
``return_lse`` in the NumPy API, ``fastce.linear`` and ``fastce.torch``, against the plain-torch
reference ``fastce.reference.torch_cross_entropy_zloss_softcap`` (evaluated in float64)."""
import numpy as np
import pytest
from numba import njit

import fastce
from fastce import _config
from fastce._cpu.primitives import tanh as vector_tanh
from fastce.reference import torch_cross_entropy_zloss_softcap as reference

torch = pytest.importorskip("torch")
import fastce.torch as ft  # noqa: E402

TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-11, atol=1e-13)}

# name: (logits shape, class-axis size hint) -- each takes another layout of the CPU front end
LAYOUTS = {
    "1d": (37,),
    "rows": (7, 50),
    "kdim": (3, 5, 4),
    "few_classes": (2 * _config.FEW_CLASSES_MIN_ROWS, 6),   # run as the K-dim layout
    # a shape the row tiles take without options (they implement none: the rows kernels)
    "tile_shaped": (64, 100),
}
# name: (weight, ignore some, label_smoothing, reduction, grad_output, softcap, z_loss)
OPTIONS = {
    "cap": (False, False, 0.0, "mean", None, 3.0, 0.0),
    "z": (False, True, 0.0, "sum", "scalar", None, 0.05),
    "cap_z_weight_ignore": (True, True, 0.0, "mean", None, 2.0, 0.1),
    "cap_z_smooth_none": (False, True, 0.2, "none", "per_row", 4.0, 0.02),
    "cap_z_weight_smooth_sum": (True, False, 0.1, "sum", None, 1.5, 0.3),
}


def _case(shape, dtype, option, probs, seed=0):
    use_w, ignore, eps, reduction, go_kind, cap, z = OPTIONS[option]
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    C = shape[0] if len(shape) == 1 else shape[1]
    tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    if probs:
        t = rng.random(shape).astype(dtype)
        t /= t.sum(axis=0 if len(shape) == 1 else 1, keepdims=True)
    else:
        t = rng.integers(0, C, tshape)
        if ignore and t.size > 1:
            t.reshape(-1)[::3] = -100
    w = (rng.random(C) + 0.5).astype(dtype) if use_w else None
    go = None
    if go_kind == "scalar":
        go = 0.7
    elif go_kind == "per_row":
        go = rng.standard_normal(tshape).astype(dtype)
    kw = dict(weight=w, reduction=reduction, label_smoothing=eps, softcap=cap, z_loss=z)
    return x, t, kw, go


def _reference(x, t, kw, go):
    """float64 loss, gradient and lse of the torch reference."""
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    tt = torch.tensor(t.astype(np.float64) if t.dtype.kind == "f" else t)
    opts = dict(kw)
    if opts["weight"] is not None:
        opts["weight"] = torch.tensor(opts["weight"].astype(np.float64))
    loss, lse = reference(xt, tt, return_lse=True, **opts)
    g = torch.ones_like(loss) if go is None else torch.as_tensor(
        np.asarray(go, np.float64)).expand_as(loss)
    loss.backward(g)
    return loss.detach().numpy(), xt.grad.numpy(), lse.detach().numpy()


# float64 takes the options all on (each combination of options given or None is a kernel
# specialization to compile: the module's run time is mostly compilation).
CASES = [(d, lay, opt, probs) for d in (np.float32, np.float64) for lay in LAYOUTS
         for opt in OPTIONS for probs in (False, True)
         if not (probs and opt in ("z", "cap_z_weight_ignore"))     # (nothing to ignore)
         and (d == np.float32 or (opt in ("cap_z_smooth_none", "cap_z_weight_smooth_sum")
                                  and lay in ("rows", "kdim")))]


@pytest.mark.parametrize("dtype,layout,option,probs", CASES,
                         ids=[f"{np.dtype(d).name}-{lay}-{o}-{'probs' if p else 'index'}"
                              for d, lay, o, p in CASES])
def test_matches_torch_reference(dtype, layout, option, probs):
    x, t, kw, go = _case(LAYOUTS[layout], dtype, option, probs)
    loss, grad, lse = fastce.cross_entropy_with_grad(x, t, grad_output=go, return_lse=True,
                                                     **kw)
    r_loss, r_grad, r_lse = _reference(x, t, kw, go)
    assert grad.dtype == dtype and np.asarray(loss).dtype == dtype and lse.dtype == dtype
    assert lse.shape == (t.shape if not probs else r_lse.shape)
    np.testing.assert_allclose(loss, r_loss, **TOL[dtype])
    np.testing.assert_allclose(grad, r_grad, **TOL[dtype])
    np.testing.assert_allclose(lse, r_lse, **TOL[dtype])     # ignored samples included
    f_loss, f_lse = fastce.cross_entropy(x, t, return_lse=True, **kw)
    np.testing.assert_allclose(f_loss, loss, rtol=1e-6 if dtype == np.float32 else 1e-14)
    np.testing.assert_array_equal(f_lse, lse)
    if dtype == np.float32 and option == "cap_z_smooth_none":   # (the kernels without lse)
        np.testing.assert_array_equal(fastce.cross_entropy(x, t, **kw), f_loss)


@pytest.mark.parametrize("softcap", [None, 20.0])
def test_split_rows_and_parallel(softcap):
    """Few long rows (the parallel kernel; split into chunks across threads without a cap)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3, 1 << 15)) * 3).astype(np.float32)
    t = np.array([5, -100, 30000])
    kw = dict(weight=None, reduction="none", label_smoothing=0.0, softcap=softcap,
              z_loss=0.01)
    loss, grad, lse = fastce.cross_entropy_with_grad(x, t, return_lse=True, **kw)
    r_loss, r_grad, r_lse = _reference(x, t, kw, None)
    np.testing.assert_allclose(loss, r_loss, **TOL[np.float32])
    np.testing.assert_allclose(grad, r_grad, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(lse, r_lse, **TOL[np.float32])


def test_defaults_change_nothing():
    """softcap=None, z_loss=0 give the same bits as a call without them (the small path and
    the general path)."""
    rng = np.random.default_rng(4)
    for shape in ((8, 10), (300, 400)):
        x = rng.standard_normal(shape).astype(np.float32)
        t = rng.integers(0, shape[1], shape[0])
        a = fastce.cross_entropy_with_grad(x, t)
        b = fastce.cross_entropy_with_grad(x, t, softcap=None, z_loss=0.0)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_lse_details():
    """lse of an ignored row is its own lse; 'mean' over all-ignored targets is NaN (torch's
    0/0) even with z-loss; float16 logits give a float16 lse; grad_input is written."""
    x = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]], np.float32)
    t = np.array([-100, -100])
    loss, lse = fastce.cross_entropy(x, t, z_loss=0.5, softcap=2.0, return_lse=True)
    assert np.isnan(loss)
    capped = 2.0 * np.tanh(x.astype(np.float64) / 2.0)
    np.testing.assert_allclose(lse, np.log(np.exp(capped).sum(1)), rtol=1e-6)
    l16, lse16 = fastce.cross_entropy(x.astype(np.float16), np.array([0, 2]), return_lse=True,
                                      reduction="none")
    assert lse16.dtype == np.float16 and l16.dtype == np.float16
    buf = np.empty_like(x)
    out = fastce.cross_entropy_with_grad(x, np.array([0, 2]), grad_input=buf, return_lse=True,
                                         z_loss=0.1)
    assert len(out) == 3 and out[1] is buf


def test_confident_rows_keep_precision_with_softcap():
    """A row whose capped target dominates: the loss (tiny) keeps its relative precision
    through the second pass, computed on the capped values."""
    x = np.full((2, 1000), -30.0, np.float32)
    x[:, 7] = 30.0
    x[1, 8] = 5.0
    t = np.array([7, 7])
    cap = 25.0
    loss, grad = fastce.cross_entropy_with_grad(x, t, softcap=cap, reduction="none")
    y = cap * np.tanh(x.astype(np.float64) / cap)
    ref = np.log1p(np.exp(np.delete(y, 7, axis=1) - y[:, 7:8]).sum(1))
    # (A one-pass lse - y_t would be off by ~1e-6 absolute, all of these losses; what is
    # left is the float32 rounding of the capped logits themselves, a few ulp of 21.)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    p = np.exp(y - y.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dy = p.copy()
    rest = np.exp(np.delete(y, 7, axis=1) - y[:, 7:8]).sum(1)
    dy[:, 7] = -rest / (1 + rest)       # p_t - 1 without the cancellation
    np.testing.assert_allclose(grad, dy * (1 - (y / cap) ** 2), rtol=1e-5, atol=1e-30)


def test_vector_tanh_accuracy():
    @njit
    def run(v, out):
        for i in range(v.shape[0]):
            out[i] = vector_tanh(v[i])

    for dt, max_ulp in ((np.float32, 3), (np.float64, 6)):
        v = np.concatenate([np.linspace(-12, 12, 20001), np.geomspace(1e-30, 20, 2000),
                            -np.geomspace(1e-30, 20, 2000)]).astype(dt)
        out = np.empty_like(v)
        run(v, out)
        ref = np.tanh(v.astype(np.float64))
        ulp = np.abs(out - ref) / np.spacing(np.abs(ref).astype(dt)).astype(np.float64)
        assert ulp.max() <= max_ulp, (dt, ulp.max())
        special = np.array([0.0, np.inf, -np.inf, np.nan, 100.0, -100.0], dt)
        out = np.empty_like(special)
        run(special, out)
        np.testing.assert_array_equal(out, [0.0, 1.0, -1.0, np.nan, 1.0, -1.0])


@pytest.mark.parametrize("kw,exc,match", [
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"),
    (dict(softcap=float("nan")), ValueError, "softcap"),
    (dict(softcap=1e39), ValueError, "softcap"),           # not a float32
    (dict(softcap="30"), TypeError, "softcap"),
    (dict(softcap=[30.0]), TypeError, "softcap"),
    (dict(softcap=True), TypeError, "softcap"),
    (dict(z_loss=-1e-4), ValueError, "z_loss"),
    (dict(z_loss=float("nan")), ValueError, "z_loss"),
    (dict(z_loss=None), TypeError, "z_loss"),
    (dict(return_lse="yes"), TypeError, "return_lse"),
])
def test_bad_options(kw, exc, match):
    x = np.zeros((2, 3), np.float32)
    t = np.array([0, 1])
    for f in (fastce.cross_entropy, fastce.cross_entropy_with_grad):
        with pytest.raises(exc, match=match):
            f(x, t, **kw)
    lv = {k: v for k, v in kw.items() if k != "return_lse"}
    if lv:
        with pytest.raises(exc, match=match):   # checked even with no rows to compute
            fastce.linear_cross_entropy(np.zeros((0, 2), np.float32),
                                        np.zeros((3, 2), np.float32), np.zeros(0, np.int64),
                                        **lv)
    if lv and lv.get("softcap") != 1e39:        # (a float64 option: the module takes it)
        with pytest.raises(exc, match=match):
            ft.CrossEntropyLoss(**lv)
        with pytest.raises(exc, match=match):
            ft.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 1]), **lv)


# ---------------------------------------------------------------------------------------------
# fastce.linear and fastce.torch


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy(reduction):
    rng = np.random.default_rng(5)
    h, W, b = rng.standard_normal((9, 6)), rng.standard_normal((40, 6)), rng.standard_normal(40)
    t = rng.integers(0, 40, 9)
    t[4] = -100
    kw = dict(reduction=reduction, softcap=3.0, z_loss=0.05, label_smoothing=0.1)
    loss, d_h, d_W, d_b = fastce.linear_cross_entropy_with_grad(h, W, t, b, **kw)
    ht, Wt, bt = (torch.tensor(a, requires_grad=True) for a in (h, W, b))
    ref = reference(ht @ Wt.T + bt, torch.tensor(t), **kw)
    ref.sum().backward()
    tol = dict(rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(loss, ref.detach().numpy(), **tol)
    np.testing.assert_allclose(fastce.linear_cross_entropy(h, W, t, b, **kw),
                               ref.detach().numpy(), **tol)
    for mine, theirs in ((d_h, ht), (d_W, Wt), (d_b, bt)):
        np.testing.assert_allclose(mine, theirs.grad.numpy(), **tol)


GRADCHECK = [
    ("index_weight_mean", (5, 7), dict(reduction="mean", label_smoothing=0.1)),
    ("index_sum", (5, 7), dict(reduction="sum")),
    ("kdim_none", (2, 4, 3), dict(reduction="none")),
    ("probs_mean", (4, 6), dict(reduction="mean", label_smoothing=0.2)),
]


@pytest.mark.parametrize("name,shape,kw", GRADCHECK, ids=[g[0] for g in GRADCHECK])
def test_torch_gradcheck(name, shape, kw):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    C = shape[1]
    if name.startswith("probs"):
        t = torch.softmax(torch.randn(shape, dtype=torch.float64), 1)
    else:
        t = torch.randint(0, C, (shape[0],) + shape[2:])
        t.view(-1)[0] = -100
    w = torch.rand(C, dtype=torch.float64) + 0.5 if "weight" in name else None
    opts = dict(kw, weight=w, softcap=2.0, z_loss=0.1)
    assert torch.autograd.gradcheck(lambda v: ft.cross_entropy(v, t, **opts), (x,))
    torch.testing.assert_close(ft.cross_entropy(x, t, **opts), reference(x, t, **opts))


def test_torch_module_lse_and_linear():
    torch.manual_seed(1)
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([1, 2, -100, 4, 5, 0])
    m = ft.CrossEntropyLoss(label_smoothing=0.1, softcap=3.0, z_loss=1e-2)
    torch.testing.assert_close(m(x, t), reference(x, t, label_smoothing=0.1, softcap=3.0,
                                                  z_loss=1e-2))
    loss, lse = ft.cross_entropy(x, t, softcap=3.0, return_lse=True)
    assert not lse.requires_grad and lse.shape == (6,)
    torch.testing.assert_close(lse, reference(x, t, softcap=3.0, return_lse=True)[1]
                               .detach())
    loss.backward()
    assert x.grad is not None
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor([1, 2, 3, -100, 10])
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda a, b: ft.linear_cross_entropy(a, b, tt, reduction=reduction, softcap=2.0,
                                                 z_loss=0.1), (h, W))


def test_torch_compile_no_graph_break():
    x = torch.randn(4, 5)
    t = torch.tensor([0, 1, 2, 3])

    def f(v):
        loss, lse = ft.cross_entropy(v, t, softcap=5.0, z_loss=1e-3, return_lse=True)
        return loss + lse.sum()

    assert torch._dynamo.explain(f)(x).graph_break_count == 0


def test_special_values_with_softcap():
    """-inf logits are capped to -softcap (masked classes become finite, as in the torch
    formulation), +inf to +softcap, NaN stays NaN; values, lse and gradients match."""
    x = np.array([[0.0, -np.inf, 1, 2], [np.inf, 0, 1, 2], [np.nan, 0, 1, 2], [-np.inf] * 4],
                 np.float32)
    t = np.array([1, 0, 2, 3])
    kw = dict(weight=None, reduction="none", label_smoothing=0.0, softcap=5.0, z_loss=0.1)
    loss, grad, lse = fastce.cross_entropy_with_grad(x, t, return_lse=True, **kw)
    r_loss, r_grad, r_lse = _reference(x, t, kw, None)
    np.testing.assert_allclose(loss, r_loss, **TOL[np.float32])   # NaN where NaN
    np.testing.assert_allclose(lse, r_lse, **TOL[np.float32])
    np.testing.assert_allclose(grad, r_grad, **TOL[np.float32])
    assert np.isfinite(loss[[0, 1, 3]]).all() and np.isnan(grad[2]).all()
