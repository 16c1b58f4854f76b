"""cross_entropy and cross_entropy_with_grad against torch (F.cross_entropy + autograd,
``loss.backward(grad_output)``): every option and combination, class-index and probability
targets, 1-D / 2-D / K-dim, both dtypes, every memory layout, serial/parallel/split paths,
and every bad argument."""
import re

import numpy as np
import pytest

import fastce

pytest.importorskip("torch")
from conftest import (DTYPES, LAYOUTS, assert_close, make_layout, random_probs,
                      random_targets, t64, torch, torch_ce, unchanged)

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
    from fastce import _cross_entropy
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
    """(N, C) inputs with few classes run transposed through the K-dim kernels (see
    ``_config.FEW_CLASSES``); C = 17 stays on the rows kernels.  Same results either way."""
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
