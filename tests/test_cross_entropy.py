"""cross_entropy and cross_entropy_with_grad against torch (F.cross_entropy + autograd,
``loss.backward(grad_output)``): every option and combination, class-index and probability
targets, 1-D / 2-D / K-dim, both dtypes, every memory layout, serial/parallel/split paths,
every bad argument, and the numerical corners (masked rows, +inf and NaN logits, huge and
denormal logits, large C, empty and single-class inputs) against torch and mpmath."""
import re

import numba
import numpy as np
import pytest

import fastce

pytest.importorskip("torch")
from helpers import (DTYPES, INF, LAYOUTS, NAN, NINF, assert_close, lse_mp, make_layout,
                     random_probs, random_targets, torch, torch_ce, unchanged)

C = 5
SHAPES = {"1d": (C,), "2d": (6, C), "kdim": (3, C, 2, 3)}


def _index_shape(shape):
    return () if len(shape) == 1 else (shape[0],) + shape[2:]


def _grad_output(rng, reduction, loss_shape, dtype):
    if reduction == "none":
        return (rng.random(loss_shape) + 0.5).astype(dtype)
    return dtype(1.7)


def _check(x, t, dtype, grad_output=None, **kw):
    """fastce loss and gradient vs torch; inputs must come back unchanged."""
    with unchanged(x, t, kw.get("weight"), grad_output):
        loss = fastce.cross_entropy(x, t, **kw)
        loss2, grad = fastce.cross_entropy_with_grad(x, t, grad_output=grad_output, **kw)
    ref_loss, ref_grad = torch_ce(x, t, grad_output=grad_output, **kw)
    assert np.asarray(loss).dtype == dtype and grad.dtype == dtype
    assert grad.shape == np.shape(x)
    assert_close(loss, ref_loss, dtype, scale=10)
    assert_close(loss2, ref_loss, dtype, scale=10)
    assert_close(grad, ref_grad, dtype)
    if kw.get("reduction", "mean") != "none":
        assert np.ndim(loss) == 0 and isinstance(loss, np.generic)
    return loss, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("ignore", ["none", "outside", "inside"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", list(SHAPES))
def test_index_targets_all_options(kind, reduction, weighted, ignore, smoothing, dtype, rng):
    shape = SHAPES[kind]
    x = (rng.standard_normal(shape) * 2).astype(dtype)
    ignore_index = {"none": -100, "outside": -1, "inside": 2}[ignore]
    t = random_targets(rng, _index_shape(shape), C,
                       None if ignore == "none" else ignore_index)
    if kind == "1d" and ignore != "none":
        t = np.asarray(ignore_index if ignore == "outside" else 3)  # a 0-d target
    w = (rng.random(C) + 0.2).astype(dtype) if weighted else None
    go = _grad_output(rng, reduction, t.shape, dtype)
    _check(x, t, dtype, go, weight=w, ignore_index=ignore_index, reduction=reduction,
           label_smoothing=smoothing)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.25])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", list(SHAPES))
def test_probability_targets_all_options(kind, reduction, weighted, smoothing, dtype, rng):
    shape = SHAPES[kind]
    x = (rng.standard_normal(shape) * 2).astype(dtype)
    t = random_probs(rng, shape, dtype, axis=0 if kind == "1d" else 1)
    w = (rng.random(C) + 0.2).astype(dtype) if weighted else None
    go = _grad_output(rng, reduction, _index_shape(shape), dtype)
    _check(x, t, dtype, go, weight=w, reduction=reduction, label_smoothing=smoothing)


def test_worked_example():
    x = np.array([[0.3, 0.6, 0.1], [0.1, 0.2, 0.7], [0.8, 0.1, 0.1]], np.float32)
    t = np.array([1, 0, 2])
    assert round(float(fastce.cross_entropy(x, t)), 4) == 1.2037
    assert round(float(torch.nn.CrossEntropyLoss()(torch.from_numpy(x), torch.from_numpy(t))),
                 4) == 1.2037
    _check(x, t, np.float32)
    _check(x.astype(np.float64), t, np.float64)


def test_default_grad_output_is_one(rng):
    x = rng.standard_normal((4, C))
    t = rng.integers(0, C, 4)
    for red in ("mean", "sum", "none"):
        _, g = fastce.cross_entropy_with_grad(x, t, reduction=red)
        assert_close(g, torch_ce(x, t, reduction=red)[1])


@pytest.mark.parametrize("target_dtype", [np.int8, np.uint8, np.int16, np.int32, np.uint32,
                                          np.int64, np.uint64])
def test_integer_target_dtypes(target_dtype, rng):
    x = rng.standard_normal((4, C))
    t = np.array([0, 1, 4, 2], target_dtype)
    assert_close(fastce.cross_entropy(x, t), torch_ce(x, t.astype(np.int64))[0])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["2d", "kdim"])
def test_layouts(kind, layout, rng):
    shape = SHAPES[kind]
    base = rng.standard_normal(shape).astype(np.float32)
    tb = random_targets(rng, _index_shape(shape), C, -100)
    x = make_layout(base, layout)
    t = make_layout(tb, layout)
    w = make_layout((rng.random(C) + 0.5).astype(np.float32), layout)
    with unchanged(base, tb):
        _check(x, t, np.float32, weight=w, label_smoothing=0.1)
    pb = random_probs(rng, shape, np.float32, axis=1)
    _check(x, make_layout(pb, layout), np.float32, reduction="sum")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3000, 33), (2, 50000), (1, 40000), (40, 7, 300),
                                   (2, 3, 20000)])
@pytest.mark.parametrize("target", ["index", "prob"])
def test_parallel_and_split_paths(target, shape, dtype, rng):
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    C_ = shape[1]
    w = (rng.random(C_) + 0.5).astype(dtype)
    if target == "index":
        t = random_targets(rng, _index_shape(shape), C_, -100)
        kw = dict(weight=w, label_smoothing=0.1)
    else:
        t = random_probs(rng, shape, dtype, axis=1)
        kw = dict(weight=w, label_smoothing=0.1)
    _check(x, t, dtype, **kw)
    go = (np.random.default_rng(1).random(_index_shape(shape)) + 0.5).astype(dtype)
    _check(x, t, dtype, go, reduction="none", **kw)


def test_ignore_index_inside_range_gets_zero_grad(rng):
    x = rng.standard_normal((5, C))
    t = np.array([0, 3, 3, 1, 4])
    loss, g = fastce.cross_entropy_with_grad(x, t, ignore_index=3, reduction="none")
    assert loss[1] == 0 and loss[2] == 0
    assert np.all(g[1:3] == 0)
    _check(x, t, np.float64, ignore_index=3, label_smoothing=0.2, weight=rng.random(C))


def test_mean_denominator_is_weight_sum(rng):
    x = rng.standard_normal((6, C))
    t = np.array([0, 0, 1, 2, 3, -100])
    w = np.array([2.0, 1.0, 0.5, 0.25, 4.0])
    per = fastce.cross_entropy(x, t, weight=w, reduction="none")
    assert fastce.cross_entropy(x, t, weight=w) == pytest.approx(
        per.sum() / (2 + 2 + 1 + 0.5 + 0.25), rel=1e-13)


def test_zero_weights(rng):
    """Weight with zeros: those classes contribute nothing; a batch whose targets all have
    weight 0 has 'mean' = 0/0 = NaN, as in torch."""
    x = rng.standard_normal((4, C))
    w = np.array([0.0, 1.0, 0.0, 2.0, 1.0])
    _check(x, np.array([0, 1, 2, 3]), np.float64, weight=w, label_smoothing=0.1)
    loss = fastce.cross_entropy(x, np.array([0, 2, 0, 2]), weight=w)
    assert np.isnan(loss) and np.isnan(torch_ce(x, np.array([0, 2, 0, 2]), weight=w)[0])
    _, g = fastce.cross_entropy_with_grad(x, np.array([0, 2, 0, 2]), weight=w)
    assert np.all(g == 0)


def test_grad_output_shapes(rng):
    x = rng.standard_normal((3, C, 2))
    t = rng.integers(0, C, (3, 2))
    _check(x, t, np.float64, rng.random((3, 2)), reduction="none")
    _check(x, t, np.float64, np.array(2.5), reduction="mean")
    _check(x, t, np.float64, 0.5, reduction="sum")
    with pytest.raises(ValueError, match="grad_output"):
        fastce.cross_entropy_with_grad(x, t, reduction="none", grad_output=np.ones(6))
    with pytest.raises(ValueError, match="grad_output"):
        fastce.cross_entropy_with_grad(x, t, reduction="mean", grad_output=np.ones(2))


def test_float16_logits(rng):
    x = rng.standard_normal((4, C)).astype(np.float16)
    t = rng.integers(0, C, 4)
    loss, g = fastce.cross_entropy_with_grad(x, t)
    assert np.asarray(loss).dtype == np.float16 and g.dtype == np.float16
    ref_loss, ref_g = torch_ce(x.astype(np.float64), t)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-3)
    np.testing.assert_allclose(g.astype(np.float64), ref_g, atol=2e-3)


# ---------------------------------------------------------------------------------------------
# bad input: exception type AND a message naming the argument

X = np.zeros((4, 3), np.float32)
T = np.array([0, 1, 2, 0])


@pytest.mark.parametrize("bad,pos,val", [
    (np.array([0, 1, 3, 0]), (2,), 3),
    (np.array([0, -1, 2, 7]), (1,), -1),
    (np.array([0, 1, 2, -5]), (3,), -5),
])
def test_class_index_out_of_range(bad, pos, val):
    with unchanged(bad):
        for f in (fastce.cross_entropy, fastce.cross_entropy_with_grad):
            with pytest.raises(IndexError, match=rf"target.*index {val} at position {re.escape(str(pos))}"):
                f(X, bad)


def test_class_index_out_of_range_kdim_position():
    x = np.zeros((2, 3, 2, 2))
    t = np.zeros((2, 2, 2), np.int64)
    t[1, 0, 1] = 9
    with pytest.raises(IndexError, match=r"9 at position \(1, 0, 1\)"):
        fastce.cross_entropy(x, t)
    with pytest.raises(IndexError, match=r"target.*-100.*position \(\)"):
        fastce.cross_entropy(np.zeros(3), np.array(-100), ignore_index=0)


@pytest.mark.parametrize("x,t,match", [
    (X, np.array([0, 1, 2]), "target of class indices must have shape"),
    (X, np.array([[0, 1, 2, 0]]), "target of class indices must have shape"),
    (np.zeros((2, 3, 4)), np.zeros((2, 5), np.int64), r"target.*\(2, 4\)"),
    (np.zeros(3), np.array([1]), r"target.*shape \(\)"),
    (X, np.zeros((4, 2), np.float32), "target of class probabilities must have the logits' shape"),
    (X, np.zeros((3, 3), np.float32), "target of class probabilities"),
])
def test_target_shape_mismatch(x, t, match):
    with pytest.raises(ValueError, match=match):
        fastce.cross_entropy(x, t)


@pytest.mark.parametrize("w", [np.ones(2), np.ones(4), np.ones((1, 3)), np.ones((3, 1)), np.ones(())])
def test_weight_shape(w):
    with pytest.raises(ValueError, match="weight must be a 1-D array of length C=3"):
        fastce.cross_entropy(X, T, weight=w)


@pytest.mark.parametrize("red", ["avg", "MEAN", None, 1, "elementwise_mean"])
def test_unknown_reduction(red):
    with pytest.raises(ValueError, match="reduction"):
        fastce.cross_entropy(X, T, reduction=red)
    with pytest.raises(ValueError, match="reduction"):
        fastce.cross_entropy_with_grad(X, T, reduction=red)


@pytest.mark.parametrize("eps,exc", [(-0.1, ValueError), (1.5, ValueError),
                                     (float("nan"), ValueError), ("a", TypeError),
                                     (None, TypeError)])
def test_label_smoothing_range(eps, exc):
    with pytest.raises(exc, match="label_smoothing"):
        fastce.cross_entropy(X, T, label_smoothing=eps)


def test_label_smoothing_bounds_accepted(rng):
    x = rng.standard_normal((4, 3))
    for eps in (0.0, 1.0, np.float32(0.5)):
        _check(x, T, np.float64, label_smoothing=float(eps))


def test_0d_logits_and_zero_classes():
    with pytest.raises(ValueError, match="logits must have at least 1 dimension"):
        fastce.cross_entropy(np.float32(1.0), np.array(0))
    with pytest.raises(ValueError, match="logits must have at least one class"):
        fastce.cross_entropy(np.zeros((4, 0)), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="logits must have at least one class"):
        fastce.cross_entropy(np.zeros(0), np.array(0))


@pytest.mark.parametrize("dt", [np.int32, np.int64, np.uint8, bool, complex, object])
def test_non_float_logits(dt):
    for f in (fastce.cross_entropy, fastce.cross_entropy_with_grad):
        with pytest.raises(TypeError, match="logits"):
            f(np.zeros((4, 3), dt), T)


def test_ignore_index_type():
    with pytest.raises(TypeError, match="ignore_index"):
        fastce.cross_entropy(X, T, ignore_index=1.5)
    with pytest.raises(TypeError, match="ignore_index"):
        fastce.cross_entropy(X, T, ignore_index=None)


def test_ignore_index_with_probability_targets(rng):
    """torch: a non-negative ignore_index with probability targets is an error; a negative
    one (the default -100) is unused."""
    x = rng.standard_normal((3, 4))
    p = np.full((3, 4), 0.25)
    for ii in (0, 3, 10):
        with pytest.raises(ValueError, match="ignore_index"):
            fastce.cross_entropy(x, p, ignore_index=ii)
    _check(x, p, np.float64, ignore_index=-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", [(1, 10), (32, 10), (7, 300), (3, 1)])
def test_small_call_fast_path_matches_general_path(shape, reduction, dtype, rng, monkeypatch):
    """Small, common calls take one jitted entry (``_ce_small``); it must agree with the
    general path and with torch, masked rows and ignored targets included, and leave errors
    to the general path."""
    from fastce import _config, _cross_entropy
    x = rng.standard_normal(shape).astype(dtype) * 3
    if shape[1] > 1:
        x[0, 0] = -np.inf  # a masked class (an all-masked row differs from torch on purpose)
    t = rng.integers(0, shape[1], size=shape[0])
    t[-1] = -100
    # the fast path applies
    assert _cross_entropy._ce_small(x, t, -100, reduction, False) is not None
    fast = fastce.cross_entropy(x, t, reduction=reduction)
    fast_loss, fast_grad = fastce.cross_entropy_with_grad(x, t, reduction=reduction)
    monkeypatch.setattr(_cross_entropy, "_ce_small", lambda *a: None)
    slow = fastce.cross_entropy(x, t, reduction=reduction)
    slow_loss, slow_grad = fastce.cross_entropy_with_grad(x, t, reduction=reduction)
    assert type(fast) is type(slow) is dtype
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(fast, slow, rtol=8 * eps)  # the row sum's order may differ
    np.testing.assert_allclose(fast_loss, slow_loss, rtol=8 * eps)
    if x.size <= _config.TINY_MAX_ELEMENTS:
        # the tiny kernel (_cpu.tiny) computes in float64 and rounds once
        np.testing.assert_allclose(fast_grad, slow_grad, rtol=8 * eps, atol=8 * eps)
    else:
        np.testing.assert_array_equal(fast_grad, slow_grad)
    ref_loss, ref_grad = torch_ce(x, t, reduction=reduction)
    assert_close(fast, ref_loss, dtype)
    assert_close(fast_grad, ref_grad, dtype)
    monkeypatch.undo()
    bad = t.copy()
    bad[0] = shape[1]
    with pytest.raises(IndexError, match=r"target holds class index \d+ at position \(0,\)"):
        fastce.cross_entropy(x, bad, reduction=reduction)
    with pytest.raises(IndexError, match="target"):
        fastce.cross_entropy_with_grad(x, bad, reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C,N", [(1, 64), (2, 64), (10, 1000), (16, 300), (17, 300)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("probs", [False, True])
def test_few_classes_many_rows(C, N, reduction, probs, dtype, rng):
    """(N, C) inputs with few classes: class indices run on the row tiles
    (``_config.ROW_TILE_MAX_CLASSES``), probabilities transposed through the K-dim kernels
    (``_config.FEW_CLASSES``; C = 17 on the rows kernels).  Same results either way."""
    x = rng.standard_normal((N, C)).astype(dtype) * 3
    w = (rng.random(C) + 0.1).astype(dtype)
    kw = dict(weight=w, reduction=reduction, label_smoothing=0.2)
    if probs:
        t = random_probs(rng, (N, C), dtype, axis=1)
    else:
        t = rng.integers(0, C, N)
        t[5] = -100
    go = rng.random(N).astype(dtype) if reduction == "none" else None
    loss, grad = fastce.cross_entropy_with_grad(x, t, grad_output=go, **kw)
    ref_loss, ref_grad = torch_ce(x, t, grad_output=go, **kw)
    assert grad.flags.c_contiguous and grad.shape == (N, C)
    assert_close(loss, ref_loss, dtype)
    assert_close(grad, ref_grad, dtype)
    assert_close(fastce.cross_entropy(x, t, **kw), ref_loss, dtype)


# ---------------------------------------------------------------------------------------------
# numerical corners (docs/semantics.md): -inf (masked) logits

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4, 6), (2, 6, 3)])
def test_partially_masked_rows_match_torch(shape, dtype, rng):
    x = rng.standard_normal(shape).astype(dtype)
    x[:, 0] = NINF
    x[:, 3] = NINF
    t = rng.choice([1, 2, 4, 5], size=(shape[0],) + shape[2:])
    for kw in ({}, {"label_smoothing": 0.0, "weight": rng.random(6).astype(dtype)}):
        loss, g = fastce.cross_entropy_with_grad(x, t, reduction="none", **kw)
        rl, rg = torch_ce(x, t, reduction="none", **kw)
        assert np.all(np.isfinite(loss)) and np.all(np.isfinite(g))
        assert_close(loss, rl, dtype)
        assert_close(g, rg, dtype)
        assert np.all(g[:, 0] == 0) and np.all(g[:, 3] == 0)


def test_target_on_masked_class_costs_inf(rng):
    """A target on a -inf logit: loss +inf (torch: +inf too in a partially masked row)."""
    x = rng.standard_normal((2, 4))
    x[:, 2] = NINF
    loss, g = fastce.cross_entropy_with_grad(x, np.array([2, 0]), reduction="none")
    assert loss[0] == INF and np.isfinite(loss[1])
    rl, rg = torch_ce(x, np.array([2, 0]), reduction="none")
    assert rl[0] == INF
    assert_close(g, rg)       # the gradient stays finite: softmax - onehot
    assert fastce.cross_entropy(x, np.array([2, 0])) == INF



@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 5), (300, 257), (1, 40000)])
def test_fully_masked_rows(shape, dtype):
    """loss = +inf (torch: NaN); the gradient of such a row is NaN (torch: NaN).  (logsumexp
    and softmax of such a row: see test_softmax.py.)"""
    x = np.zeros(shape, dtype)
    x[0] = NINF
    t = np.zeros(shape[0], np.int64)
    loss = fastce.cross_entropy(x, t, reduction="none")
    assert loss[0] == INF and np.all(np.isfinite(loss[1:]))
    loss, g = fastce.cross_entropy_with_grad(x, t, reduction="none")
    assert loss[0] == INF and np.all(np.isnan(g[0])) and np.all(np.isfinite(g[1:]))


def test_fully_masked_kdim():
    x = np.zeros((2, 3, 4))
    x[1, :, 2] = NINF
    loss = fastce.cross_entropy(x, np.zeros((2, 4), np.int64), reduction="none")
    assert loss[1, 2] == INF


@pytest.mark.parametrize("shape", [(3, 5), (2, 5, 3), (300, 257), (1, 40000)])
def test_masked_rows_under_ignore_index_have_zero_grad(shape):
    """torch #11551: torch gives a NaN gradient for an ignored, fully masked row; fastce gives
    exactly 0 loss and 0 gradient for every ignored row whatever its logits."""
    x = np.zeros(shape)
    x[0] = NINF
    t = np.zeros((shape[0],) + shape[2:], np.int64)
    t[0] = -100
    for kw in ({}, {"label_smoothing": 0.2}, {"weight": np.linspace(0.5, 1.5, shape[1])}):
        loss, g = fastce.cross_entropy_with_grad(x, t, reduction="none", **kw)
        assert np.all(loss[0] == 0) and np.all(g[0] == 0)
        assert np.all(np.isfinite(g))
        loss, g = fastce.cross_entropy_with_grad(x, t, **kw)
        assert np.isfinite(loss) or shape[0] == 1      # all ignored: mean = NaN
        assert np.all(np.isfinite(g))



def test_split_row_merge_never_nan():
    """Few long rows are cut into chunks whose (max, sum) partials are merged: a chunk that
    is entirely -inf must not produce exp(-inf - (-inf)) = NaN (flash-attn #1930)."""
    C = 80000
    x = np.full((1, C), NINF, np.float32)
    x[0, -5:] = np.arange(5, dtype=np.float32)
    ref = lse_mp(np.arange(5))
    x2 = x[:, ::-1].copy()                         # the -inf chunk last
    loss, g = fastce.cross_entropy_with_grad(x2, np.array([0]))
    assert np.isfinite(loss) and np.all(np.isfinite(g))
    assert g[0, 0] == pytest.approx(np.exp(4 - ref) - 1, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# +inf and NaN logits

def test_plus_inf_logits():
    """Decided: a +inf logit never gives a finite loss.  The gradient is NaN at the +inf
    entries; the loss is +inf for a target on a finite logit and NaN for a target on the +inf
    logit (torch: NaN for both)."""
    x = np.array([[INF, 1.0, 2.0], [0.0, 1.0, 2.0]])
    loss, g = fastce.cross_entropy_with_grad(x, np.array([1, 1]), reduction="none")
    assert loss[0] == INF and np.isfinite(loss[1])
    assert np.isnan(g[0, 0]) and np.all(np.isfinite(g[1]))
    assert_close(g[1], torch_ce(x, np.array([1, 1]), reduction="none")[1][1])
    loss = fastce.cross_entropy(x, np.array([0, 1]), reduction="none")
    assert np.isnan(loss[0])
    assert not np.isfinite(fastce.cross_entropy(x, np.array([1, 1])))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((4, 7), 1), ((300, 257), 1), ((1, 40000), 1),
                                        ((3, 7, 5), 1), ((60, 9, 130), 1)])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_nan_logits_propagate(where, shape, axis, dtype, rng):
    """A NaN logit makes its row's loss and gradient row NaN, in every kernel path, and the
    reduced loss NaN; never silently dropped (torch agrees)."""
    x = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    c = {"first": 0, "middle": C // 2, "last": C - 1}[where]
    idx = [0] * len(shape)
    idx[axis] = c
    x[tuple(idx)] = NAN
    row = tuple(slice(None) if d == axis else 0 for d in range(len(shape)))
    t = np.zeros((shape[0],) + shape[2:], np.int64)
    t.flat[0] = (c + 1) % C
    loss, g = fastce.cross_entropy_with_grad(x, t, reduction="none")
    assert np.isnan(loss.flat[0]) and np.isnan(loss).sum() == 1
    assert np.all(np.isnan(g[row])) and np.isnan(g).sum() == C
    assert np.isnan(fastce.cross_entropy(x, t))
    assert np.isnan(fastce.cross_entropy(x, t, reduction="sum"))
    assert np.isnan(torch_ce(x, t, reduction="none")[0].flat[0])


def test_nan_logit_in_ignored_row_is_ignored():
    x = np.array([[NAN, 0.0], [0.0, 1.0]])
    loss, g = fastce.cross_entropy_with_grad(x, np.array([-100, 1]))
    assert np.isfinite(loss) and np.all(g[0] == 0)
    assert loss == pytest.approx(torch_ce(x, np.array([-100, 1]))[0])



# ---------------------------------------------------------------------------------------------
# extreme magnitudes

@pytest.mark.parametrize("dtype,big", [(np.float32, 1e4), (np.float64, 1e300),
                                       (np.float32, 3.0e38), (np.float64, 1.7e308)])
def test_huge_logits_do_not_overflow(dtype, big):
    x = np.array([[big, 0.0, -big], [-big, -big, -big], [big, big, 0.0],
                  [big, big * 0.5, big * 0.25]], dtype)
    ref = np.array([lse_mp(r) for r in x.astype(np.float64)])
    t = np.array([0, 1, 0, 0])
    loss, g = fastce.cross_entropy_with_grad(x, t, reduction="none")
    assert np.all(np.isfinite(g))
    # lse - x_t: accurate to a few ulp of the largest logit (see the next test for better)
    ulp = float(np.finfo(dtype).eps) * big
    np.testing.assert_allclose(loss.astype(np.float64), ref - x.astype(np.float64)[[0, 1, 2, 3], t],
                               rtol=1e-6, atol=4 * ulp)
    # (lse - x_t) itself can overflow: [big, -big] with the target on -big costs 2*big.
    loss = fastce.cross_entropy(np.array([[big, -big]], dtype), np.array([1]), reduction="none")
    if 2 * big > float(np.finfo(dtype).max):
        assert loss[0] == INF
    else:
        assert float(loss[0]) == pytest.approx(2 * big, rel=1e-6)


@pytest.mark.parametrize("dtype,big", [(np.float32, 1e4), (np.float64, 1e300)])
def test_large_logits_small_loss_accuracy(dtype, big):
    """The loss of a confident row with large logits: torch computes (x_t - m) - log(s),
    exact in the first term, and gets 1.0986123 for [1e4, 1e4, 1e4] in float32; lse - x_t
    = (m + log s) - x_t loses the low bits of log(s) to the rounding of m + log(s)."""
    x = np.array([[big, big, big], [big, big - 1, 0.0]], dtype)
    t = np.array([0, 1])
    # The reference from the values as stored (in float64, 1e300 - 1 == 1e300), each as
    # (max - x_t) + log(sum(exp(x - max))): exact for these rows.
    x64 = x.astype(np.float64)
    m = x64.max(axis=1)
    ref = (m - x64[[0, 1], t]) + np.log(np.exp(x64 - m[:, None]).sum(axis=1))
    assert ref[0] == pytest.approx(np.log(3.0), rel=1e-12)
    loss = fastce.cross_entropy(x, t, reduction="none")
    np.testing.assert_allclose(loss.astype(np.float64), ref, rtol=1e-6)
    np.testing.assert_allclose(torch_ce(x, t, reduction="none")[0], ref, rtol=1e-6)
    ls = fastce.log_softmax(x)
    np.testing.assert_allclose(ls[0].astype(np.float64), -np.log(3.0), rtol=1e-6)



@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_denormals(dtype, rng):
    tiny = np.finfo(dtype).smallest_subnormal
    x = np.array([[tiny, -tiny, 0.0], [0.0, -100.0, -110.0 if dtype == np.float32 else -740.0]],
                 dtype)
    assert_close(fastce.cross_entropy(x, np.array([0, 2]), reduction="none"),
                 torch_ce(x, np.array([0, 2]), reduction="none")[0], dtype)


@pytest.mark.parametrize("C", [32000, 128000, 1_000_000])
@pytest.mark.parametrize("threads", [None, 1])
def test_float32_accuracy_large_C(C, threads):
    """float32 within 1e-6 relative of the float64 result on the same values: the sum-exp
    accumulation must not drift (one long row; with one thread it is summed serially)."""
    rng = np.random.default_rng(C)
    rows = 3 if C <= 128000 else 1
    x = (rng.standard_normal((rows, C)) * 4).astype(np.float32)
    x64 = x.astype(np.float64)
    m = x64.max(1, keepdims=True)
    ref = (m + np.log(np.exp(x64 - m).sum(1, keepdims=True)))[:, 0]
    t = rng.integers(0, C, rows)
    old = numba.get_num_threads()
    try:
        if threads:
            numba.set_num_threads(threads)
        lse = fastce.logsumexp(x)
        loss = fastce.cross_entropy(x, t, reduction="none")
        loss2, g = fastce.cross_entropy_with_grad(x, t, reduction="none")
    finally:
        numba.set_num_threads(old)
    np.testing.assert_allclose(lse, ref, rtol=1e-6)
    np.testing.assert_allclose(loss, ref - x64[np.arange(rows), t], rtol=1e-6)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    np.testing.assert_allclose(g.sum(1), 0, atol=1e-5)
    p64 = np.exp(x64 - ref[:, None])
    p64[np.arange(rows), t] -= 1
    np.testing.assert_allclose(g, p64, rtol=1e-5, atol=1e-11)


@pytest.mark.parametrize("C", [32000, 128000])
def test_float64_accuracy_large_C(C):
    """float64 loss and logsumexp within 1e-13 relative of a long-double reference."""
    rng = np.random.default_rng(C + 1)
    x = rng.standard_normal((2, C)) * 4
    xl = x.astype(np.longdouble)
    m = xl.max(1, keepdims=True)
    ref = (m + np.log(np.exp(xl - m).sum(1, keepdims=True)))[:, 0]
    t = rng.integers(0, C, 2)
    np.testing.assert_allclose(fastce.logsumexp(x), ref.astype(np.float64), rtol=1e-13)
    loss_ref = (ref - xl[np.arange(2), t]).astype(np.float64)
    np.testing.assert_allclose(fastce.cross_entropy(x, t, reduction="none"), loss_ref,
                               rtol=1e-13)
    np.testing.assert_allclose(fastce.cross_entropy_with_grad(x, t, reduction="none")[0],
                               loss_ref, rtol=1e-13)


# ---------------------------------------------------------------------------------------------
# reductions and sizes

def test_all_ignored_mean_is_nan_with_zero_grad():
    """torch #70348: torch returns NaN (0/0).  fastce: NaN as well, and a zero gradient
    (torch's gradient is NaN... for 'mean' it is 0 * (1/0): we give exactly 0)."""
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    t = np.full(3, -100)
    loss, g = fastce.cross_entropy_with_grad(x, t)
    assert np.isnan(loss) and np.isnan(torch_ce(x, t)[0])
    assert np.all(g == 0)
    assert fastce.cross_entropy(x, t, reduction="sum") == 0
    assert np.all(fastce.cross_entropy(x, t, reduction="none") == 0)
    assert np.isnan(fastce.cross_entropy(x, t, label_smoothing=0.1))


@pytest.mark.parametrize("shape", [(0, 4), (0, 4, 3), (2, 4, 0)])
def test_empty_batch(shape):
    x = np.zeros(shape, np.float32)
    t = np.zeros((shape[0],) + shape[2:], np.int64)
    for red in ("mean", "sum", "none"):
        ours = fastce.cross_entropy(x, t, reduction=red)
        loss, g = fastce.cross_entropy_with_grad(x, t, reduction=red)
        ref, rg = torch_ce(x, t, reduction=red)
        assert np.asarray(ours).shape == ref.shape and g.shape == shape
        np.testing.assert_array_equal(np.asarray(ours, np.float64), ref)
    p = np.zeros(shape, np.float32)
    assert np.isnan(fastce.cross_entropy(x, p)) and np.isnan(torch_ce(x, p)[0])


def test_single_class(rng):
    x = rng.standard_normal((5, 1))
    t = np.zeros(5, np.int64)
    for kw in ({}, {"label_smoothing": 0.5}, {"weight": np.array([2.0])}):
        loss, g = fastce.cross_entropy_with_grad(x, t, **kw)
        rl, rg = torch_ce(x, t, **kw)
        assert loss == 0 and np.all(g == 0)
        assert_close(loss, rl) and assert_close(g, rg)


def test_single_sample_1d(rng):
    x = rng.standard_normal(7).astype(np.float32)
    for t in (np.array(3), np.int64(3), 3):
        loss, g = fastce.cross_entropy_with_grad(x, t)
        rl, rg = torch_ce(x, np.array(3))
        assert g.shape == (7,)
        assert_close(loss, rl, np.float32) and assert_close(g, rg, np.float32)
    p = np.full(7, 1 / 7, np.float32)
    assert_close(fastce.cross_entropy(x, p), torch_ce(x, p)[0], np.float32)


def test_huge_C_single_row():
    x = np.zeros((1, 1_000_000), np.float32)
    x[0, 123] = 5.0
    loss, g = fastce.cross_entropy_with_grad(x, np.array([123]))
    ref = np.log(np.exp(5.0) + 999_999) - 5.0
    assert float(loss) == pytest.approx(ref, rel=1e-6)
    assert g.shape == (1, 1_000_000) and abs(float(g.sum(dtype=np.float64))) < 1e-5



# ---------------------------------------------------------------------------------------------
# probability targets

def test_probability_zero_on_masked_logit_contributes_zero():
    """0 * log 0 = 0: a class with target probability 0 and logit -inf contributes nothing
    (torch gives NaN from 0 * -inf -- a deliberate difference)."""
    x = np.array([[NINF, 1.0, 2.0], [0.0, 1.0, 2.0]])
    p = np.array([[0.0, 0.5, 0.5], [0.0, 0.5, 0.5]])
    loss, g = fastce.cross_entropy_with_grad(x, p, reduction="none")
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(g))
    rl, rg = torch_ce(x, p, reduction="none")
    assert np.isnan(rl[0])
    expect = -(0.5 * (1 - lse_mp([1, 2])) + 0.5 * (2 - lse_mp([1, 2])))
    assert loss[0] == pytest.approx(expect, rel=1e-12)
    assert_close(loss[1], rl[1]) and assert_close(g[1], rg[1])
    assert g[0, 0] == 0
    # zeros with finite logits: same as torch
    p2 = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    _ = [assert_close(a, b) for a, b in zip(fastce.cross_entropy_with_grad(
        x[1:].repeat(2, 0), p2, reduction="none"), torch_ce(x[1:].repeat(2, 0), p2,
                                                             reduction="none"))]
    # but a positive probability on a -inf logit costs +inf
    assert fastce.cross_entropy(x, np.array([[0.1, 0.4, 0.5]] * 2), reduction="none")[0] == INF


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_probabilities_not_summing_to_one(smoothing, rng):
    x = rng.standard_normal((4, 5))
    for p in (rng.random((4, 5)) * 3, np.zeros((4, 5)), rng.random((4, 5)) * 0.1):
        for kw in ({}, {"weight": rng.random(5)}):
            loss, g = fastce.cross_entropy_with_grad(x, p, label_smoothing=smoothing, **kw)
            rl, rg = torch_ce(x, p, label_smoothing=smoothing, **kw)
            assert_close(loss, rl) and assert_close(g, rg)


@pytest.mark.parametrize("bad", [-0.25, NAN, INF, NINF])
def test_probability_target_bad_values(bad):
    x = np.zeros((3, 4), np.float32)
    p = np.full((3, 4), 0.25, np.float32)
    p[2, 1] = bad
    with unchanged(x, p):
        for f in (fastce.cross_entropy, fastce.cross_entropy_with_grad):
            with pytest.raises(ValueError, match=r"target must hold class probabilities.*"
                                                 r"position \(2, 1\)"):
                f(x, p)


def test_smoothing_weights_ignore_together(rng):
    x = rng.standard_normal((6, 4, 2))
    t = rng.integers(0, 4, (6, 2))
    t[0, 0] = t[3, 1] = 1
    w = np.array([0.0, 2.0, 1.0, 0.5])
    for ii in (1, -100):
        for red in ("mean", "sum", "none"):
            kw = dict(weight=w, ignore_index=ii, label_smoothing=0.3, reduction=red)
            loss, g = fastce.cross_entropy_with_grad(x, t, **kw)
            rl, rg = torch_ce(x, t, **kw)
            assert_close(loss, rl) and assert_close(g, rg)



# ---------------------------------------------------------------------------------------------
# bad input: clear errors, nothing modified

@pytest.mark.parametrize("logits,exc,match", [
    ([[0.0, 1.0], [2.0, 3.0]], None, None),                # lists are accepted
    ([[0, 1], [2, 3]], TypeError, "logits must be a floating-point array"),
    (3.0, ValueError, "logits must have at least 1 dimension"),
    (None, TypeError, "logits"),
    ("abc", TypeError, "logits"),
    ([[0.0, 1.0], [2.0]], TypeError, "logits must be array-like"),
    (np.zeros((2, 2), object), TypeError, "logits"),
    (np.zeros((2, 2), complex), TypeError, "logits"),
    (np.zeros((2, 2), bool), TypeError, "logits"),
    (np.zeros((2, 2), "datetime64[s]"), TypeError, "logits"),
])
def test_non_array_and_odd_dtype_logits(logits, exc, match):
    t = [0, 1]
    if exc is None:
        assert_close(fastce.cross_entropy(logits, t), torch_ce(np.array(logits), np.array(t))[0])
        return
    for f in (fastce.cross_entropy, fastce.cross_entropy_with_grad):
        with pytest.raises(exc, match=match):
            f(logits, t)


@pytest.mark.parametrize("target,exc,match", [
    (np.array([0.0, 1.0]), ValueError, "target of class probabilities must have the logits' "
                                       r"shape.*for class indices use an integer target"),
    (np.zeros((2, 3), np.int64), ValueError, "for class probabilities use a floating target"),
    (np.zeros((2, 3), np.float64), TypeError, "target of class probabilities must have the "
                                              "logits' dtype float32"),
    (np.zeros(2, bool), TypeError, "target must hold integer class indices"),
    (np.zeros(2, complex), TypeError, "target"),
    (["a", "b"], TypeError, "target"),
    (None, TypeError, "target"),
    ([0.5, NAN], ValueError, "target"),
])
def test_bad_targets(target, exc, match):
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(exc, match=match):
        fastce.cross_entropy(x, target)


def test_weight_bad_dtype():
    x = np.zeros((2, 3))
    with pytest.raises(TypeError, match="weight"):
        fastce.cross_entropy(x, [0, 1], weight=np.zeros(3, complex))
    with pytest.raises(TypeError, match="weight"):
        fastce.cross_entropy(x, [0, 1], weight=["a", "b", "c"])



def test_outputs_never_alias_inputs(rng):
    """No function writes into caller memory or returns a view of it."""
    x = rng.standard_normal((4, 5))
    t = np.array([0, 1, 2, 3])
    p = np.full((4, 5), 0.2)
    outs = [fastce.cross_entropy(x, t, reduction="none"),
            *fastce.cross_entropy_with_grad(x, t, reduction="none"),
            *fastce.cross_entropy_with_grad(x, p, reduction="none")]
    for o in outs:
        for i in (x, t, p):
            assert not np.shares_memory(o, i)


@pytest.mark.parametrize("order", [">", "<"])
def test_big_endian_inputs(order, rng):
    x = rng.standard_normal((4, 5)).astype(order + "f8")
    p = np.full((4, 5), 0.2, order + "f8")
    t = np.array([0, 1, 2, 3], order + "i4")
    loss, g = fastce.cross_entropy_with_grad(x, t)
    assert g.dtype == np.float64 and g.dtype.isnative
    rl, rg = torch_ce(x.astype(np.float64), t.astype(np.int64))
    assert_close(loss, rl) and assert_close(g, rg)
    assert_close(fastce.cross_entropy(x, p), torch_ce(x.astype(float), p.astype(float))[0])
