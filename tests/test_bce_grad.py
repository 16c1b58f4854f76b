"""The BCE family's fused forward + gradient (binary_cross_entropy_with_grad,
binary_cross_entropy_with_logits_with_grad) against torch's autograd in float64, over every
option; the kernels' accuracy against long-double references over wide ranges; the checks
fused into the pass (first offending position, targets before inputs)."""
import numpy as np
import pytest

import fastce

pytest.importorskip("torch")
from helpers import DTYPES, assert_close, t64, torch, unchanged

F = torch.nn.functional
SHAPE = (4, 3, 5)
WEIGHT_SHAPES = [None, (), (5,), (3, 1), (1, 3, 5), SHAPE]
POS_WEIGHT_SHAPES = [None, (5,), (1,), (3, 5)]
L = np.longdouble


def _upstream(kind, reduction, shape, rng):
    if kind == "none":
        return None
    if reduction == "none":
        return rng.standard_normal(shape)
    return 1.7 if kind == "float" else np.array(-0.6)


def torch_grad(logits, x, y, weight, pos_weight, reduction, grad_output):
    xt = t64(x).requires_grad_()
    kw = dict(weight=None if weight is None else t64(weight), reduction=reduction)
    if logits:
        loss = F.binary_cross_entropy_with_logits(
            xt, t64(y), pos_weight=None if pos_weight is None else t64(pos_weight), **kw)
    else:
        if weight is not None:   # torch's BCE wants the weight at the input's shape
            kw["weight"] = torch.broadcast_to(kw["weight"], np.shape(x))
        loss = F.binary_cross_entropy(xt, t64(y), **kw)
    go = torch.ones_like(loss) if grad_output is None else \
        torch.as_tensor(np.asarray(grad_output, np.float64)).reshape(loss.shape)
    loss.backward(go)
    return loss.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize("upstream", ["none", "float", "array"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("wshape", WEIGHT_SHAPES)
def test_bce_grad_vs_torch_autograd(wshape, reduction, upstream, rng):
    p = rng.uniform(0.01, 0.99, SHAPE)
    p.flat[:4] = [0.0, 1.0, 0.5, 1e-13]   # the clamped logs and torch's 1e-12 in the gradient
    y = rng.random(SHAPE)
    y.flat[:3] = [1.0, 0.0, 1.0]
    w = None if wshape is None else rng.random(wshape) + 0.5
    go = _upstream(upstream, reduction, SHAPE, rng)
    with unchanged(p, y, w, go):
        loss, g = fastce.binary_cross_entropy_with_grad(p, y, weight=w, reduction=reduction,
                                                        grad_output=go)
    rl, rg = torch_grad(False, p, y, w, None, reduction, go)
    assert g.shape == SHAPE and g.dtype == np.float64
    assert_close(loss, rl)
    np.testing.assert_allclose(g, rg, rtol=1e-13, atol=0)
    assert_close(loss, fastce.binary_cross_entropy(p, y, weight=w, reduction=reduction))


@pytest.mark.parametrize("upstream", ["none", "float", "array"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("pwshape", POS_WEIGHT_SHAPES)
@pytest.mark.parametrize("wshape", [None, (), (5,), (3, 1), SHAPE])
def test_bce_with_logits_grad_vs_torch_autograd(wshape, pwshape, reduction, upstream, rng):
    x = rng.standard_normal(SHAPE) * 5
    x.flat[:5] = [0.0, 40.0, -40.0, 1e-30, -0.0]
    y = rng.random(SHAPE)
    y.flat[:3] = [1.0, 0.0, 1.0]
    w = None if wshape is None else rng.random(wshape) + 0.5
    pw = None if pwshape is None else rng.random(pwshape) * 3
    go = _upstream(upstream, reduction, SHAPE, rng)
    with unchanged(x, y, w, pw, go):
        loss, g = fastce.binary_cross_entropy_with_logits_with_grad(
            x, y, weight=w, pos_weight=pw, reduction=reduction, grad_output=go)
    rl, rg = torch_grad(True, x, y, w, pw, reduction, go)
    assert g.shape == SHAPE and g.dtype == np.float64
    assert_close(loss, rl)
    np.testing.assert_allclose(g, rg, rtol=1e-12, atol=1e-15)
    assert_close(loss, fastce.binary_cross_entropy_with_logits(x, y, weight=w, pos_weight=pw,
                                                               reduction=reduction))


@pytest.mark.parametrize("logits", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_float32_and_parallel_path(logits, dtype, rng):
    """Big enough for the threaded kernel; float32 against torch's float64 autograd."""
    shape = (300, 257)
    x = (rng.standard_normal(shape) * 3 if logits else rng.uniform(0.001, 0.999, shape))
    y = rng.random(shape)
    w = rng.random(257) + 0.5
    x, y, w = x.astype(dtype), y.astype(dtype), w.astype(dtype)
    if logits:
        loss, g = fastce.binary_cross_entropy_with_logits_with_grad(
            x, y, weight=w, pos_weight=w, reduction="sum")
    else:
        loss, g = fastce.binary_cross_entropy_with_grad(x, y, weight=w, reduction="sum")
    rl, rg = torch_grad(logits, x, y, w, w if logits else None, "sum", None)
    assert g.dtype == dtype and np.asarray(loss).dtype == dtype
    assert_close(loss, rl, dtype, scale=100)
    assert_close(g, rg, dtype, scale=100)


@pytest.mark.parametrize("f", [fastce.binary_cross_entropy_with_grad,
                               fastce.binary_cross_entropy_with_logits_with_grad])
def test_empty_input(f):
    e = np.zeros((0, 3))
    loss, g = f(e, e)
    assert np.isnan(loss) and g.shape == (0, 3)
    tl, tg = torch_grad(f is fastce.binary_cross_entropy_with_logits_with_grad, e, e, None,
                        None, "mean", None)
    assert np.isnan(tl) and tg.shape == (0, 3)
    loss, g = f(e, e, reduction="sum", grad_output=2.0)
    assert loss == 0 and g.shape == (0, 3)
    loss, g = f(e, e, reduction="none", grad_output=e)
    assert loss.shape == (0, 3) and g.shape == (0, 3)


@pytest.mark.parametrize("f", [fastce.binary_cross_entropy_with_grad,
                               fastce.binary_cross_entropy_with_logits_with_grad])
def test_grad_output_checks_match_cross_entropy(f):
    """Same validation and messages as cross_entropy_with_grad."""
    p = np.full((2, 3), 0.5)
    t = np.array([0, 1])
    for ce_args, bce_args in [
            (dict(reduction="none", grad_output=np.ones(3)),
             dict(reduction="none", grad_output=np.ones(3))),
            (dict(reduction="mean", grad_output=np.ones(2)),
             dict(reduction="mean", grad_output=np.ones(2))),
            (dict(reduction="sum", grad_output="x"), dict(reduction="sum", grad_output="x"))]:
        with pytest.raises((ValueError, TypeError)) as ce_err:
            fastce.cross_entropy_with_grad(p, t, **ce_args)
        with pytest.raises(ce_err.type) as bce_err:
            f(p, p, **bce_args)
        # the messages differ only in the loss's shape
        assert str(bce_err.value).split(" (")[0].split("got")[0] == \
            str(ce_err.value).split(" (")[0].split("got")[0]
    with pytest.raises(ValueError, match=r"grad_output must have the loss's shape \(2, 3\) "
                                         r"for reduction='none', got \(3, 2\)"):
        f(p, p, reduction="none", grad_output=np.ones((3, 2)))
    with pytest.raises(ValueError, match="grad_output must be a scalar for reduction='mean', "
                                         r"got shape \(2,\)"):
        f(p, p, grad_output=[1.0, 2.0])


def test_grad_checks_and_options_as_forward():
    p = np.full((2, 3), 0.5)
    with pytest.raises(ValueError, match=r"input must hold probabilities in \[0, 1\].*\(1, 2\)"):
        fastce.binary_cross_entropy_with_grad(np.array([[0.5] * 3, [0.5, 0.5, 2.0]]), p)
    with pytest.raises(ValueError, match="reduction"):
        fastce.binary_cross_entropy_with_logits_with_grad(p, p, reduction="avg")
    with pytest.raises(ValueError, match="pos_weight of shape"):
        fastce.binary_cross_entropy_with_logits_with_grad(p, p, pos_weight=np.ones(2))


# ---------------------------------------------------------------------------------------------
# checks fused into the pass: the first offending position, targets before inputs


@pytest.mark.parametrize("n", [7, 200_003])   # serial and threaded kernels
def test_fused_checks_report_first_position(n):
    p = np.full(n, 0.5)
    y = np.full(n, 0.5)
    p[[n - 1, n - 3]] = [1.5, -2.0]
    with pytest.raises(ValueError, match=rf"found \S*-2.0\S* at position \({n - 3},\)"):
        fastce.binary_cross_entropy(p, y)
    y[n - 2] = 3.0   # a bad target is reported first, wherever it is
    with pytest.raises(ValueError, match=rf"target must hold values in \[0, 1\].*\({n - 2},\)"):
        fastce.binary_cross_entropy(p, y)
    y[[n - 2, 1]] = [np.nan, np.inf]
    with pytest.raises(ValueError, match=r"target must hold finite values.*\(1,\)"):
        fastce.binary_cross_entropy_with_logits_with_grad(p, y)


# ---------------------------------------------------------------------------------------------
# accuracy against long double


def _ref_bce(p, y):
    p, y = p.astype(L), y.astype(L)
    with np.errstate(divide="ignore"):
        return (y - 1) * np.maximum(np.log1p(-p), -100) - y * np.maximum(np.log(p), -100)


def _ref_logits(x, y, pw):
    x, y, pw = x.astype(L), y.astype(L), pw.astype(L)
    s = np.log1p(np.exp(-np.abs(x)))
    return pw * y * (s + np.maximum(-x, 0)) + (1 - y) * (s + np.maximum(x, 0))


def _max_rel(got, ref, dtype):
    ok = np.abs(ref) >= np.finfo(dtype).tiny    # results the dtype holds as normal numbers
    return float(np.max(np.abs(got[ok].astype(L) - ref[ok]) / np.abs(ref[ok])))


BOUND = {np.float32: 3e-7, np.float64: 1e-15}    # ~2.5 ulp; float64 well inside 1e-14


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_accuracy_wide_range(dtype, rng):
    """p from the smallest subnormal to 1 - eps/2 (both tails, log-spaced), hard and soft
    targets: every loss within ~2.5 ulp of the long-double value (torch's log(1 - p) would
    lose all digits of a tiny p's loss)."""
    fi = np.finfo(dtype)
    p = np.concatenate([np.geomspace(fi.smallest_subnormal, 0.5, 20000),
                        1 - np.geomspace(fi.eps / 2, 0.5, 20000),
                        rng.random(20000)]).astype(dtype)
    for y in (np.zeros_like(p), np.ones_like(p), rng.random(p.size).astype(dtype)):
        got = fastce.binary_cross_entropy(p, y, reduction="none")
        assert _max_rel(got, _ref_bce(p, y), dtype) <= BOUND[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_with_logits_accuracy_wide_range(dtype, rng):
    """Logits from the smallest subnormal to 1e30 (float32) / 1e300 in magnitude, both
    signs, with and without pos_weight: every loss within ~2.5 ulp of the long-double value,
    also where it is tiny (x = -30, y = 0: 9.4e-14), where torch's form cancels to 0."""
    fi = np.finfo(dtype)
    big = 1e30 if dtype is np.float32 else 1e300
    mag = np.geomspace(fi.smallest_subnormal, big, 30000)
    x = np.concatenate([mag, -mag, rng.standard_normal(20000) * 20]).astype(dtype)
    for y in (np.zeros_like(x), np.ones_like(x), rng.random(x.size).astype(dtype)):
        ones = np.ones_like(x)
        got = fastce.binary_cross_entropy_with_logits(x, y, reduction="none")
        assert _max_rel(got, _ref_logits(x, y, ones), dtype) <= BOUND[dtype]
        pw = (rng.random(x.size) * 3).astype(dtype)
        got = fastce.binary_cross_entropy_with_logits(x, y, pos_weight=pw, reduction="none")
        assert _max_rel(got, _ref_logits(x, y, pw), dtype) <= BOUND[dtype]
    zero = np.zeros(1, dtype)
    got = fastce.binary_cross_entropy_with_logits(np.full(1, -30, dtype), zero, reduction="none")
    torch_says = F.binary_cross_entropy_with_logits(torch.full((1,), -30.0), torch.zeros(1),
                                                    reduction="none")
    assert got[0] == pytest.approx(np.log1p(np.exp(-30.0)), rel=BOUND[dtype])
    assert dtype is np.float64 or float(torch_says[0]) == 0.0   # (documented difference)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_with_logits_grad_accuracy(dtype, rng):
    """The gradient lw sigmoid(x) - pw y against long double, relative where it is not 0."""
    fi = np.finfo(dtype)
    mag = np.geomspace(1e-6, 80 if dtype is np.float32 else 700, 20000)
    x = np.concatenate([mag, -mag]).astype(dtype)
    y = np.concatenate([np.ones(20000), np.zeros(20000)]).astype(dtype)
    _, g = fastce.binary_cross_entropy_with_logits_with_grad(x, y, reduction="sum")
    xl, yl = x.astype(L), y.astype(L)
    # sigmoid(x) - y, with sigmoid(x) - 1 = -sigmoid(-x) (long double cannot take 1 - 1e-300)
    ref = np.where(yl == 1, -1 / (1 + np.exp(xl)), 1 / (1 + np.exp(-xl)) - yl)
    ok = np.abs(ref) >= fi.tiny
    rel = np.max(np.abs(g[ok] - ref[ok]) / np.abs(ref[ok]))
    assert rel <= (5e-7 if dtype is np.float32 else 2e-15)


def test_infinite_logits_take_their_limit():
    """A zero-coefficient term is 0 against an infinite logit (torch: NaN from 0 * inf)."""
    x = np.array([np.inf, -np.inf, np.inf, -np.inf, np.nan])
    y = np.array([1.0, 0.0, 0.0, 1.0, 0.5])
    got = fastce.binary_cross_entropy_with_logits(x, y, reduction="none")
    np.testing.assert_array_equal(got, [0.0, 0.0, np.inf, np.inf, np.nan])
    _, g = fastce.binary_cross_entropy_with_logits_with_grad(x, y, reduction="none")
    np.testing.assert_array_equal(g, [0.0, 0.0, 1.0, -1.0, np.nan])
