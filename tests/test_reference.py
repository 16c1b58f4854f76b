"""fastce.reference: the NumPy / SciPy / PyTorch implementations and the registry.

numpy-stable is checked against hand-written formulas (math module, float64
loops) and against torch on the full semantic surface; the others against it.
"""

import math

import numpy as np
import pytest

from fastce import reference
from fastce.reference import IMPLEMENTATIONS, get_implementation

ST = get_implementation("numpy-stable")
NAIVE = get_implementation("numpy-naive")


def _hand_ce(x, y, w=None, eps=0.0):
    """Per-row torch cross-entropy, written with math.* loops."""
    n, c = x.shape
    out = []
    for i in range(n):
        m = max(x[i])
        lse = m + math.log(sum(math.exp(v - m) for v in x[i]))
        logp = [v - lse for v in x[i]]
        wy = 1.0 if w is None else w[y[i]]
        smooth = -sum((1.0 if w is None else w[j]) * logp[j] for j in range(c)) / c
        out.append((1 - eps) * (-wy * logp[y[i]]) + eps * smooth)
    return np.array(out)


def test_stable_matches_hand_formulas():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 4)) * 3
    y = np.array([0, 3, 1, 2, 3])
    w = np.array([0.5, 2.0, 1.0, 3.0])
    lse = [math.log(sum(math.exp(v) for v in row)) for row in x]
    np.testing.assert_allclose(ST.logsumexp(x), lse, rtol=1e-14)
    np.testing.assert_allclose(ST.log_softmax(x), x - np.array(lse)[:, None], rtol=1e-13)
    np.testing.assert_allclose(ST.softmax(x).sum(axis=1), 1.0, rtol=1e-14)
    per = _hand_ce(x, y, w, eps=0.2)
    got = ST.cross_entropy(x, y, weight=w, label_smoothing=0.2, reduction="none")
    np.testing.assert_allclose(got, per, rtol=1e-13)
    # weighted mean divides by the summed weights of the targets
    got = ST.cross_entropy(x, y, weight=w, label_smoothing=0.2)
    np.testing.assert_allclose(got, per.sum() / w[y].sum(), rtol=1e-13)


def test_stable_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 2))  # K-dim: class axis 1
    y = rng.integers(0, 4, (3, 2))
    y[0, 0] = -100
    kw = dict(weight=np.array([1.0, 2.0, 0.5, 1.5]), label_smoothing=0.1)
    loss, g = ST.cross_entropy_with_grad(x, y, **kw)
    h = 1e-6
    num = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        num[idx] = (ST.cross_entropy(xp, y, **kw) - ST.cross_entropy(xm, y, **kw)) / (2 * h)
    np.testing.assert_allclose(g, num, atol=1e-8)
    assert np.all(g[0, :, 0] == 0)  # ignored position: no gradient


def test_naive_overflows_and_stable_does_not():
    x = np.array([[100.0, 0.0]], dtype=np.float32)
    assert np.isinf(NAIVE.logsumexp(x)[0])
    assert ST.logsumexp(x)[0] == np.float32(100.0)
    assert not np.isfinite(NAIVE.cross_entropy(x, np.array([1])))
    assert ST.cross_entropy(x, np.array([1])) == pytest.approx(100.0, rel=1e-6)


def test_edge_values():
    x = np.array([[-np.inf, -np.inf], [np.inf, 0.0], [np.nan, 1.0]])
    r = ST.logsumexp(x)
    assert r[0] == -np.inf and r[1] == np.inf and np.isnan(r[2])
    # every target ignored: mean is 0/0 = nan, as in torch
    assert np.isnan(ST.cross_entropy(np.zeros((2, 3)), np.array([-100, -100])))
    with pytest.raises(IndexError):
        ST.cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError):
        ST.cross_entropy(np.zeros((2, 3)), np.array([0, 1]), reduction="avg")


@pytest.mark.parametrize("name", ["numpy-naive", "numpy-stable", "scipy", "torch",
                                  "torch-compile", "jax"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_preserved(name, dtype):
    impl = get_implementation(name) if IMPLEMENTATIONS[name].available() else pytest.skip()
    x = np.random.default_rng(2).standard_normal((4, 5)).astype(dtype)
    y = np.array([0, 1, 2, 4])
    loss = impl.cross_entropy(x, y)
    assert isinstance(loss, np.generic) and loss.dtype == dtype
    loss, g = impl.cross_entropy_with_grad(x, y)
    assert loss.dtype == dtype and g.dtype == dtype and g.shape == x.shape
    for f in ("logsumexp", "log_softmax", "softmax"):
        assert getattr(impl, f)(x).dtype == dtype
    p = np.clip(np.abs(x) / 3, 0.01, 0.99)
    assert impl.binary_cross_entropy(p, (x > 0).astype(dtype)).dtype == dtype
    assert impl.binary_cross_entropy_with_logits(x, (x > 0).astype(dtype)).dtype == dtype


CE_CASES = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none"),
    dict(weight=True),
    dict(label_smoothing=0.25),
    dict(weight=True, label_smoothing=0.1, reduction="sum"),
    dict(weight=True, label_smoothing=0.3, reduction="none"),
    dict(ignore_index=2),
]


# ignore_index does not apply to probability targets: those pairs are not generated.
CE_CASE_TARGETS = [(case, probs) for case in CE_CASES for probs in (False, True)
                   if not (probs and "ignore_index" in case)]


# jax compiles once per (case, shape): one K-dim shape (it goes through the same (N, C, S)
# code as the others) keeps the module fast
_VS_TORCH = ([("numpy-stable", s) for s in [(7,), (6, 5), (3, 5, 4), (2, 5, 3, 2)]]
             + [("jax", (2, 5, 3, 2))])


@pytest.mark.parametrize("case,probs", CE_CASE_TARGETS)
@pytest.mark.parametrize("name,shape", _VS_TORCH)
def test_matches_torch(case, probs, name, shape):
    torch_impl = get_implementation("torch") if IMPLEMENTATIONS["torch"].available() else None
    if torch_impl is None:
        pytest.skip("torch not installed")
    impl = get_implementation(name)
    # numpy-stable evaluates torch's own formula; jax's XLA fusions round differently
    rtol = 1e-12 if name == "numpy-stable" else 1e-10
    rng = np.random.default_rng(3)
    x = rng.standard_normal(shape) * 4
    c = shape[0] if len(shape) == 1 else shape[1]
    kw = dict(case)
    if kw.pop("weight", False):
        kw["weight"] = rng.random(c) + 0.1
    if probs:
        t = rng.random(shape)
        t /= t.sum(axis=0 if len(shape) == 1 else 1, keepdims=True)
    else:
        t = rng.integers(0, c, shape[:1] + shape[2:] if len(shape) > 1 else ())
        if t.ndim:
            t.reshape(-1)[0] = kw.get("ignore_index", -100)
    go = None
    if kw.get("reduction") == "none":
        go = rng.random(np.shape(t) if not probs else shape[:1] + shape[2:]) if len(shape) > 1 else None
    a_loss, a_g = impl.cross_entropy_with_grad(x, t, grad_output=go, **kw)
    b_loss, b_g = torch_impl.cross_entropy_with_grad(x, t, grad_output=go, **kw)
    np.testing.assert_allclose(a_loss, b_loss, rtol=rtol, atol=1e-14)
    np.testing.assert_allclose(a_g, b_g, rtol=10 * rtol, atol=1e-14)
    np.testing.assert_allclose(impl.cross_entropy(x, t, **kw), a_loss, rtol=rtol / 1000)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("pos_weight", [False, True])
def test_bce_family_agrees(weighted, pos_weight):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 3)) * 20  # large: naive log(sigmoid) breaks
    t = rng.random((6, 3))
    p = 1 / (1 + np.exp(-x / 10))
    p[0, 0], p[1, 1] = 0.0, 1.0  # torch clamps the logs at -100
    w = rng.random((6, 3)) if weighted else None
    pw = rng.random(3) + 0.5 if pos_weight else None
    want_logits = np.mean(
        (w if weighted else 1)
        * -((pw if pos_weight else 1) * t * -np.logaddexp(0, -x) + (1 - t) * -np.logaddexp(0, x))
    )
    lp = np.maximum(np.log(np.where(p > 0, p, 1e-300)), -100)
    l1p = np.maximum(np.log(np.where(p < 1, 1 - p, 1e-300)), -100)
    want_p = np.mean((w if weighted else 1) * -(t * lp + (1 - t) * l1p))
    names = [n for n in ("numpy-stable", "scipy", "torch", "jax") if IMPLEMENTATIONS[n].available()]
    for n in names:
        impl = get_implementation(n)
        got = impl.binary_cross_entropy_with_logits(x, t, weight=w, pos_weight=pw)
        np.testing.assert_allclose(got, want_logits, rtol=1e-12, err_msg=n)
        got = impl.binary_cross_entropy(p, t, weight=w)
        np.testing.assert_allclose(got, want_p, rtol=1e-12, err_msg=n)


def test_scipy_matches_stable():
    sc = get_implementation("scipy") if IMPLEMENTATIONS["scipy"].available() else pytest.skip()
    x = np.random.default_rng(5).standard_normal((4, 6, 3)) * 50
    for axis in (0, 1, -1):
        for f in ("logsumexp", "log_softmax", "softmax"):
            np.testing.assert_allclose(
                getattr(sc, f)(x, axis=axis), getattr(ST, f)(x, axis=axis), rtol=1e-12, atol=1e-300
            )


def test_registry():
    assert set(IMPLEMENTATIONS) >= {"fastce", "numpy-naive", "numpy-stable", "scipy", "torch"}
    assert "numpy-stable" in reference.available_implementations()
    with pytest.raises(KeyError, match="numpy-stable"):
        get_implementation("numpy-fast")
    missing = reference.Implementation("x", "needs a library that is absent", {},
                                       requires="no_such_module_fastce",
                                       install_hint="pip install no-such")
    reference.IMPLEMENTATIONS["missing-lib"] = missing
    try:
        with pytest.raises(ImportError, match="pip install no-such"):
            get_implementation("missing-lib")
    finally:
        del reference.IMPLEMENTATIONS["missing-lib"]
    with pytest.raises(AttributeError):
        ST.not_a_function
    for name in ("numpy-naive", "numpy-stable", "scipy", "torch", "torch-compile", "jax"):
        assert all(IMPLEMENTATIONS[name].supports(f) for f in reference.FUNCTIONS)


def test_fastce_entry_is_the_package():
    import fastce

    impl = get_implementation("fastce")
    assert impl.cross_entropy is fastce.cross_entropy


def test_compiled_peers_reject_bad_input_like_torch():
    for name in ("jax", "torch-compile"):
        if not IMPLEMENTATIONS[name].available():
            continue
        impl = get_implementation(name)
        with pytest.raises(IndexError):
            impl.cross_entropy(np.zeros((2, 3)), np.array([0, 3]))
        with pytest.raises((ValueError, TypeError)):
            impl.cross_entropy(np.zeros((2, 3)), np.array([0, 1]), reduction="avg")
        with pytest.raises(TypeError):
            impl.logsumexp(np.arange(3))


@pytest.mark.parametrize("name", ["torch", "torch-compile", "jax"])
def test_bind_converts_once_and_returns_framework_arrays(name):
    if not IMPLEMENTATIONS[name].available():
        pytest.skip(f"{name} not installed")
    impl = get_implementation(name)
    x = np.random.default_rng(6).standard_normal((4, 7)).astype(np.float32)
    y = np.array([0, 6, 3, 2])
    call = impl.bind("cross_entropy_with_grad", x, y)
    for _ in range(2):  # callable again: the inputs it holds are not consumed
        loss, g = call()
        assert not isinstance(g, np.ndarray)  # the framework's own array, not converted
        want_loss, want_g = ST.cross_entropy_with_grad(x, y)
        loss, g = (np.asarray(a.detach() if hasattr(a, "detach") else a) for a in (loss, g))
        np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
        np.testing.assert_allclose(g, want_g, rtol=1e-5, atol=1e-7)
