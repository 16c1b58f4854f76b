"""The softmax family's small path (one jitted entry for small C-contiguous float32/float64
inputs reduced along the last axis), against torch and against the general path."""
import numpy as np
import pytest
import torch

import fastce
from fastce import _softmax
from fastce._modes import MODE_LOG_SOFTMAX, MODE_LOGSUMEXP, MODE_SOFTMAX

OPS = [(fastce.logsumexp, torch.logsumexp, MODE_LOGSUMEXP),
       (fastce.log_softmax, torch.log_softmax, MODE_LOG_SOFTMAX),
       (fastce.softmax, torch.softmax, MODE_SOFTMAX)]
TOL = {np.float32: dict(rtol=2e-6, atol=1e-6), np.float64: dict(rtol=1e-14, atol=1e-15)}


def _inputs(shape, dtype):
    x = (np.random.default_rng(5).standard_normal(shape) * 4).astype(dtype)
    if x.ndim == 2 and x.shape[0] >= 4:
        x[1] = -np.inf          # a row of -inf
        x[2, 0] = 1e4           # far above the rest: probabilities 0 and 1
        x[3, -1] = np.nan
    return x


@pytest.mark.parametrize("op,top,mode", OPS)
@pytest.mark.parametrize("shape", [(1, 10), (32, 10), (10,), (1, 1), (256, 100)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_path_against_torch_and_general_path(op, top, mode, shape, dtype):
    x = _inputs(shape, dtype)
    before = x.copy()
    assert _softmax._small_rows(x, -1, mode) is not None       # the small path is taken
    got = op(x)
    want = top(torch.from_numpy(x.astype(np.float64)), -1).numpy()
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **TOL[dtype])
    general = _softmax._softmax_family(x, -1, mode)
    assert type(got) is type(general)
    assert np.shape(got) == np.shape(general) and np.asarray(got).dtype == dtype
    np.testing.assert_array_equal(got, general)
    np.testing.assert_array_equal(x, before)
    assert not np.shares_memory(np.asarray(got), x)
    if x.ndim == 2:
        np.testing.assert_array_equal(op(x, axis=1), general)


@pytest.mark.parametrize("op,top,mode", OPS)
def test_other_calls_take_the_general_path(op, top, mode):
    x = _inputs((8, 6), np.float64)
    for call in (x.T, x[:, ::2], x.astype(np.float16), x.reshape(2, 4, 6), x.tolist()):
        assert _softmax._small_rows(call, -1, mode) is None
    assert _softmax._small_rows(x, 0, mode) is None
    assert _softmax._small_rows(x, np.int64(1), mode) is None
    np.testing.assert_allclose(op(x, axis=0), top(torch.from_numpy(x), 0).numpy(),
                               rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(op(x[:, ::2]), top(torch.from_numpy(x[:, ::2].copy()), -1),
                               rtol=1e-14, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# cross-entropy's tiny-call kernel (``_cpu.tiny.ce_index_tiny``: up to
# ``_config.TINY_MAX_ELEMENTS`` logits, scalar, float64)

import mpmath  # noqa: E402
from helpers import assert_close, torch_ce  # noqa: E402

from fastce import _config, _cross_entropy  # noqa: E402
from fastce._cpu import tiny  # noqa: E402

TINY_SHAPES = [(1, 1), (1, 2), (1, 10), (4, 10), (40, 1), (8, 5)]


@pytest.fixture
def tiny_calls(monkeypatch):
    """Count the tiny kernel's calls (and fail if an entry other than it is taken)."""
    calls = []

    def wrapped(*args, _real=tiny.ce_index_tiny):
        calls.append(args[0].shape)
        return _real(*args)
    monkeypatch.setattr(tiny, "ce_index_tiny", wrapped)
    return calls


def _tiny_logits(rng, shape, dtype):
    """Logits with the corners a row can have at that width: a masked class, a target on a
    masked class, a tie at the max (target on it, and off it), an ignored row."""
    N, C = shape
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    t = rng.integers(0, C, N)
    if C >= 3 and N >= 4:
        x[0, (t[0] + 1) % C] = -np.inf                  # a masked class
        x[1, t[1]] = -np.inf                            # the target on a masked class
        m = x[2].max()
        x[2, t[2]] = m                                  # a tie, the target on it
        x[2, (t[2] + 1) % C] = m
        x[3, (t[3] + 1) % C] = x[3, (t[3] + 2) % C] = x[3].max() + 1   # a tie off the target
    if N >= 2:
        t[-1] = -100
    return x, t


def _mp_ce(x, t, reduction):
    """Exact (mpmath, 40 digits) cross-entropy and gradient of float logits, rounded to
    float64; ignore_index -100."""
    with mpmath.workdps(40):
        total, n = mpmath.mpf(0), 0
        grad = np.zeros(x.shape)
        rows = []
        for row, ti in zip(x, t):
            if ti == -100:
                rows.append(None)
                continue
            v = [mpmath.mpf(float(a)) if np.isfinite(a) else None for a in row]
            m = max(a for a in v if a is not None)
            e = [mpmath.exp(a - m) if a is not None else mpmath.mpf(0) for a in v]
            s = mpmath.fsum(e)
            total += mpmath.log(s) + m - v[ti] if v[ti] is not None else mpmath.inf
            n += 1
            rows.append((e, s, ti))
        g = mpmath.mpf(1) / n if reduction == "mean" else mpmath.mpf(1)
        for i, r in enumerate(rows):
            if r is not None:
                e, s, ti = r
                grad[i] = [float(g * (ej / s - (j == ti))) for j, ej in enumerate(e)]
        return float(total * g), grad


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shape", TINY_SHAPES)
def test_tiny_kernel_against_torch(shape, reduction, dtype, tiny_calls):
    assert np.prod(shape) <= _config.TINY_MAX_ELEMENTS
    x, t = _tiny_logits(np.random.default_rng(sum(shape)), shape, dtype)
    before = x.copy()
    loss = fastce.cross_entropy(x, t, reduction=reduction)
    loss_g, grad = fastce.cross_entropy_with_grad(x, t, reduction=reduction)
    buf = np.full(shape, np.nan, dtype)
    loss_b, grad_b = fastce.cross_entropy_with_grad(x, t, reduction=reduction, grad_input=buf)
    assert tiny_calls == [shape] * 3
    assert type(loss) is type(loss_g) is dtype and grad.dtype == dtype
    assert grad_b is buf
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(loss_g, loss_b)
    np.testing.assert_array_equal(grad, grad_b)
    assert np.all(grad[t == -100] == 0)
    ref_loss, ref_grad = torch_ce(x, t, reduction=reduction)
    assert_close(grad, ref_grad, dtype)
    mp_loss, mp_grad = _mp_ce(x, t, reduction)
    # float64 throughout, rounded once: within a few eps of the exact value (torch's own
    # float64 loss is not, for confident rows)
    eps = np.finfo(dtype).eps
    np.testing.assert_allclose(grad, mp_grad, rtol=4 * eps, atol=4 * eps * float(np.finfo(dtype).tiny))
    if shape[0] >= 4 and shape[1] >= 3:
        assert loss == np.inf and ref_loss == np.inf       # a target on a masked class
        ok = t != -100
        ok[1] = False
        ref_loss = torch_ce(x[ok], t[ok], reduction=reduction)[0]
        mp_loss = _mp_ce(x[ok], t[ok], reduction)[0]
        loss = fastce.cross_entropy(x[ok], t[ok], reduction=reduction)
    assert_close(loss, ref_loss, dtype)
    np.testing.assert_allclose(loss, mp_loss, rtol=4 * eps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiny_kernel_corners_match_the_general_path(dtype, tiny_calls, monkeypatch):
    """Rows the general path decides apart from torch (docs/semantics.md): fully masked (loss
    +inf, gradient NaN), a +inf logit (NaN gradient; loss +inf off it, NaN on it), a NaN logit
    (loss and gradient NaN), and an ignored row of NaN (0 loss, 0 gradient)."""
    x = np.array([[-np.inf, -np.inf, -np.inf, -np.inf],
                  [np.inf, 1.0, 2.0, 0.0],
                  [np.inf, 1.0, 2.0, 0.0],
                  [0.5, np.nan, 2.0, 0.0],
                  [np.nan, np.nan, 1.0, 0.0],
                  [1.0, 3.0, 2.0, 0.0]], dtype)
    t = np.array([1, 2, 0, 2, -100, 1])
    got = []
    for i in range(len(x)):
        rows, ti = x[[i, 5]], t[[i, 5]]
        got.append((fastce.cross_entropy(rows, ti, reduction="sum"),
                    *fastce.cross_entropy_with_grad(rows, ti, reduction="sum")))
    assert len(tiny_calls) == 2 * len(x)
    monkeypatch.setattr(_cross_entropy, "_ce_small", lambda *a, **k: None)
    for i, (loss, loss_g, grad) in enumerate(got):
        rows, ti = x[[i, 5]], t[[i, 5]]
        want = fastce.cross_entropy(rows, ti, reduction="sum")
        want_g, want_grad = fastce.cross_entropy_with_grad(rows, ti, reduction="sum")
        np.testing.assert_array_equal(loss, want)
        np.testing.assert_array_equal(loss_g, want_g)
        np.testing.assert_array_equal(np.isnan(grad), np.isnan(want_grad))
        eps = np.finfo(dtype).eps
        np.testing.assert_allclose(grad, want_grad, rtol=8 * eps, atol=8 * eps)
    assert np.isnan(got[3][0]) and got[4][0] == fastce.cross_entropy(x[5:], t[5:], reduction="sum")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tiny_kernel_mean_of_all_ignored_is_nan(dtype, tiny_calls):
    x = np.zeros((3, 4), dtype)
    t = np.array([-100, -100, -100])
    loss, grad = fastce.cross_entropy_with_grad(x, t)
    assert np.isnan(loss) and np.all(grad == 0)
    assert fastce.cross_entropy(x, t, reduction="sum") == 0
    ref = torch_ce(x, t)
    assert np.isnan(ref[0]) and np.all(ref[1] == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_grad", [False, True])
def test_tiny_kernel_invalid_targets_raise_like_torch(dtype, with_grad, tiny_calls):
    """An invalid target makes the kernel return its position and the general path raise
    the error (the kernel is called, then the general path runs)."""
    f = fastce.cross_entropy_with_grad if with_grad else fastce.cross_entropy
    x = np.zeros((4, 10), dtype)
    for bad, pos in ((10, 2), (-1, 3), (-100, None)):
        t = np.array([1, 2, 3, 4])
        t[pos if pos is not None else 0] = bad
        if pos is None:
            assert np.isfinite(np.asarray(f(x, t, ignore_index=-100)[0] if with_grad
                                          else f(x, t, ignore_index=-100)))
            continue
        with pytest.raises(IndexError, match=rf"class index {bad} at position \({pos},\)"):
            f(x, t)
    # ignore_index is a class: that class's targets are ignored, not rejected
    t = np.array([3, 3, 1, 2])
    loss = fastce.cross_entropy(x, t, ignore_index=3)
    assert_close(loss, torch_ce(x, t, ignore_index=3)[0], dtype)
    assert len(tiny_calls) == 4


def test_tiny_kernel_threshold(tiny_calls):
    """Calls over ``TINY_MAX_ELEMENTS`` logits take the vectorized entries."""
    n = _config.TINY_MAX_ELEMENTS
    for shape, tiny_taken in (((1, n), True), ((1, n + 1), False), ((n, 1), True),
                              ((32, 10), False)):
        x = np.zeros(shape, np.float32)
        t = np.zeros(shape[0], np.int64)
        tiny_calls.clear()
        np.testing.assert_allclose(fastce.cross_entropy(x, t), np.log(shape[1]), rtol=1e-6)
        assert bool(tiny_calls) is tiny_taken, shape
