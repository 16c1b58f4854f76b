"""binary_cross_entropy and binary_cross_entropy_with_logits against torch: weight and
pos_weight broadcasting, all reductions, both dtypes, layouts, the parallel kernels, and every
bad argument (NaN, inf and out-of-interval targets included)."""
import numpy as np
import pytest

import fastce

pytest.importorskip("torch")
from helpers import (DTYPES, INF, LAYOUTS, NAN, assert_close, make_layout, t64, torch,
                     torch_bce, torch_bce_logits, unchanged)

SHAPE = (4, 3, 5)
WEIGHT_SHAPES = [None, (), (5,), (3, 1), (1, 3, 5), SHAPE]
POS_WEIGHT_SHAPES = [None, (), (1,), (5,), (3, 5), SHAPE]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("wshape", WEIGHT_SHAPES)
def test_bce_vs_torch(wshape, reduction, dtype, rng):
    p = rng.uniform(0.01, 0.99, SHAPE).astype(dtype)
    p.flat[:3] = [0.0, 1.0, 0.5]   # log clamped at -100, as in torch
    y = rng.random(SHAPE).astype(dtype)
    y.flat[:3] = [1.0, 0.0, 1.0]
    w = None if wshape is None else (rng.random(wshape) + 0.5).astype(dtype)
    with unchanged(p, y, w):
        got = fastce.binary_cross_entropy(p, y, weight=w, reduction=reduction)
    assert np.asarray(got).dtype == dtype
    assert_close(got, torch_bce(p, y, w, reduction), dtype, scale=100)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("pwshape", POS_WEIGHT_SHAPES)
@pytest.mark.parametrize("wshape", [None, (5,), (3, 1)])
def test_bce_with_logits_vs_torch(wshape, pwshape, reduction, dtype, rng):
    x = (rng.standard_normal(SHAPE) * 5).astype(dtype)
    x.flat[:4] = [0.0, 80.0, -80.0, 1e-30]
    y = rng.random(SHAPE).astype(dtype)
    w = None if wshape is None else (rng.random(wshape) + 0.5).astype(dtype)
    pw = None if pwshape is None else (rng.random(pwshape) * 3).astype(dtype)
    with unchanged(x, y, w, pw):
        got = fastce.binary_cross_entropy_with_logits(x, y, weight=w, pos_weight=pw,
                                                      reduction=reduction)
    assert np.asarray(got).dtype == dtype
    assert_close(got, torch_bce_logits(x, y, w, pw, reduction), dtype, scale=10)


def test_worked_example():
    p = np.array([0.8, 0.2, 0.6], np.float32)
    y = np.array([1.0, 0.0, 1.0], np.float32)
    assert round(float(fastce.binary_cross_entropy(p, y)), 4) == 0.3190
    assert round(float(torch.nn.BCELoss()(torch.from_numpy(p), torch.from_numpy(y))), 4) == 0.3190
    # the same through logits
    x = np.log(p / (1 - p))
    assert round(float(fastce.binary_cross_entropy_with_logits(x, y)), 4) == 0.3190


@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_no_overflow(dtype):
    big = 1e4 if dtype == np.float32 else 1e300
    x = np.array([big, -big, big, -big], dtype)
    y = np.array([1.0, 0.0, 0.0, 1.0], dtype)
    got = fastce.binary_cross_entropy_with_logits(x, y, reduction="none")
    np.testing.assert_array_equal(got, np.array([0.0, 0.0, big, big], dtype))
    assert_close(got, torch_bce_logits(x, y, reduction="none"), dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(layout, rng):
    p = rng.uniform(0.01, 0.99, (6, 7))
    y = rng.random((6, 7))
    w = rng.random(7)
    P, Y = make_layout(p, layout), make_layout(y, layout)
    assert_close(fastce.binary_cross_entropy(P, Y, weight=w, reduction="none"),
                 torch_bce(p, y, w, "none"))
    assert_close(fastce.binary_cross_entropy_with_logits(P, Y, pos_weight=w, reduction="none"),
                 torch_bce_logits(p, y, None, w, "none"))


@pytest.mark.parametrize("dtype", DTYPES)
def test_parallel_path(dtype, rng):
    shape = (300, 257)
    p = rng.uniform(0.001, 0.999, shape).astype(dtype)
    y = rng.random(shape).astype(dtype)
    w = rng.random(257).astype(dtype)
    assert_close(fastce.binary_cross_entropy(p, y, weight=w, reduction="none"),
                 torch_bce(p, y, w, "none"), dtype, scale=100)
    assert_close(fastce.binary_cross_entropy_with_logits(p, y, weight=w, pos_weight=w),
                 torch_bce_logits(p, y, w, w), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threaded_from_bce_threshold(dtype, rng, monkeypatch):
    """A plain call of PARALLEL_MIN_BCE_ELEMENTS or more (float64: below the other ops'
    threshold) skips the small entry and runs the threaded kernel over a number of chunks
    that every thread gets equally many of; below the threshold, the serial small entry."""
    from fastce import _bce as front, _config
    from fastce._cpu import bce as kernels
    min_par = _config.PARALLEL_MIN_BCE_ELEMENTS[dtype == np.float64]
    monkeypatch.setattr(front, "_parallel", lambda n, m=None: n >= m)
    monkeypatch.setattr(front, "_thread_count", lambda: 2)
    calls = []
    for name in ("bce", "bce_with_logits", "bce_small", "bce_with_logits_small"):
        real = getattr(kernels, name)

        def spy(*args, _real=real, _name=name):
            calls.append((_name, args[7].shape if len(args) > 7 else None))
            return _real(*args)
        monkeypatch.setattr(kernels, name, spy)
    # 7 (float64: 51,200 elements) or 9 (float32: 70,000) chunks of BCE_CHUNK, rounded up
    shape, chunks = ((512, 100), 8) if dtype == np.float64 else ((700, 100), 10)
    assert min_par <= shape[0] * shape[1] < 2 * min_par
    p = rng.uniform(0.001, 0.999, shape).astype(dtype)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    y = (rng.random(shape) < 0.5).astype(dtype)
    assert_close(fastce.binary_cross_entropy(p, y), torch_bce(p, y, None, "mean"), dtype)
    assert_close(fastce.binary_cross_entropy_with_logits(x, y),
                 torch_bce_logits(x, y, None, None, "mean"), dtype)
    assert calls == [("bce", (1, chunks)), ("bce_with_logits", (1, chunks))]
    calls.clear()
    assert_close(fastce.binary_cross_entropy(p[:8], y[:8], reduction="sum"),
                 torch_bce(p[:8], y[:8], None, "sum"), dtype, scale=100)
    assert [c[0] for c in calls] == ["bce_small"]


def test_empty_and_scalar():
    e = np.zeros(0, np.float32)
    assert np.isnan(fastce.binary_cross_entropy(e, e))            # torch: nan
    assert np.isnan(torch_bce(e, e))
    assert fastce.binary_cross_entropy(e, e, reduction="sum") == 0
    assert fastce.binary_cross_entropy_with_logits(e, e, reduction="none").shape == (0,)
    s = fastce.binary_cross_entropy_with_logits(np.float64(0.0), np.float64(1.0),
                                                reduction="none")
    assert np.ndim(s) == 0 and s == pytest.approx(np.log(2))


# ---------------------------------------------------------------------------------------------
# bad input

P = np.full((2, 3), 0.5, np.float32)


@pytest.mark.parametrize("f", [fastce.binary_cross_entropy, fastce.binary_cross_entropy_with_logits])
def test_shape_mismatch(f):
    with pytest.raises(ValueError, match="target must have the input's shape"):
        f(P, np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="target must have the input's shape"):
        f(P, np.zeros(3, np.float32))


@pytest.mark.parametrize("f", [fastce.binary_cross_entropy, fastce.binary_cross_entropy_with_logits])
def test_weight_not_broadcastable(f):
    with pytest.raises(ValueError, match="weight of shape"):
        f(P, P, weight=np.ones(2))
    with pytest.raises(ValueError, match="weight of shape"):
        f(P, P, weight=np.ones((1, 2, 3)))   # would grow the loss's shape


def test_pos_weight_not_broadcastable():
    with pytest.raises(ValueError, match="pos_weight"):
        fastce.binary_cross_entropy_with_logits(P, P, pos_weight=np.ones(2))
    with pytest.raises(ValueError, match="pos_weight"):
        fastce.binary_cross_entropy_with_logits(P, P, pos_weight=np.ones((2, 2, 3)))


@pytest.mark.parametrize("bad,pos", [(-0.1, (0, 1)), (1.5, (1, 2)), (np.nan, (1, 0)),
                                     (np.inf, (0, 0))])
def test_probabilities_outside_unit_interval(bad, pos):
    p = P.copy()
    p[pos] = bad
    with unchanged(p):
        with pytest.raises(ValueError, match=rf"input must hold probabilities in \[0, 1\].*"
                                             rf"{str(np.float32(bad))}.*{pos[0]}, {pos[1]}"):
            fastce.binary_cross_entropy(p, P)


@pytest.mark.parametrize("f", [fastce.binary_cross_entropy, fastce.binary_cross_entropy_with_logits])
@pytest.mark.parametrize("dt", [np.int64, bool, complex])
def test_non_float(f, dt):
    with pytest.raises(TypeError, match="input"):
        f(np.zeros((2, 3), dt), P)
    with pytest.raises(TypeError, match="target"):
        f(P, np.zeros((2, 3), dt))


@pytest.mark.parametrize("f", [fastce.binary_cross_entropy, fastce.binary_cross_entropy_with_logits])
def test_unknown_reduction(f):
    with pytest.raises(ValueError, match="reduction"):
        f(P, P, reduction="batchmean")


# ---------------------------------------------------------------------------------------------
# bad targets, aliasing, byte order

@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_bce_target_nan(bad):
    """NaN/inf targets are an error for both BCE forms (torch: an error for BCE on
    probabilities, NaN propagation with logits)."""
    y = np.full((2, 3), 0.5)
    y[1, 1] = bad
    with unchanged(y):
        with pytest.raises(ValueError, match=r"target must hold finite values.*\(1, 1\)"):
            fastce.binary_cross_entropy_with_logits(np.zeros((2, 3)), y)
        with pytest.raises(ValueError, match=r"target must hold values in \[0, 1\].*\(1, 1\)"):
            fastce.binary_cross_entropy(np.full((2, 3), 0.5), y)


@pytest.mark.parametrize("bad", [-0.5, 1.5])
def test_bce_target_outside_unit_interval(bad):
    """BCE on probabilities: targets must be in [0, 1], as torch requires; with logits any
    finite target is accepted, as in torch."""
    y = np.full((2, 3), 0.5)
    y[0, 2] = bad
    with pytest.raises(ValueError, match=r"target must hold values in \[0, 1\].*\(0, 2\)"):
        fastce.binary_cross_entropy(np.full((2, 3), 0.5), y)
    with pytest.raises(RuntimeError, match="between 0 and 1"):
        torch.nn.functional.binary_cross_entropy(t64(np.full((2, 3), 0.5)), t64(y))
    x = np.linspace(-2, 2, 6).reshape(2, 3)
    assert_close(fastce.binary_cross_entropy_with_logits(x, y, reduction="none"),
                 torch_bce_logits(x, y, reduction="none"))



def test_outputs_never_alias_inputs(rng):
    """No function writes into caller memory or returns a view of it."""
    x = rng.standard_normal((4, 5))
    p = np.full((4, 5), 0.2)
    outs = [fastce.binary_cross_entropy_with_logits(x, p, reduction="none"),
            fastce.binary_cross_entropy(p, p, reduction="none")]
    for o in outs:
        for i in (x, p):
            assert not np.shares_memory(o, i)


@pytest.mark.parametrize("order", [">", "<"])
def test_big_endian_inputs(order, rng):
    x = rng.standard_normal((4, 5)).astype(order + "f8")
    p = np.full((4, 5), 0.2, order + "f8")
    assert_close(fastce.binary_cross_entropy_with_logits(x, p),
                 torch_bce_logits(x.astype(float), p.astype(float)))
