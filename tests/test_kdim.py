"""The K-dim class-index cross-entropy kernels (``_cpu/cross_entropy.py``: (N, C, S) logits,
vectorized across positions): the two-class closed form (``spatial_index_pairs``), the
general block with its two ways to the target logit (selected up to
``SPATIAL_SELECT_MAX_CLASSES``, gathered beyond) and its two ways through the confident
positions' second pass (their columns gathered when few, across the block when many).
Against torch in float64 and mpmath; special values against the rows kernels (same
semantics); blocks and tasks cut at sizes off their lengths, serial and parallel twins.
"""
import mpmath
import numpy as np
import pytest
from helpers import DTYPES, INF, NAN, NINF, assert_close, torch_ce

import fastce
from fastce import _config, _cross_entropy

# across the closed form's block (2048) and the general blocks' (256) and tasks (8 blocks)
S_LONG = _config.SPATIAL_PAIR_BLOCK + 2 * _config.SPATIAL_BLOCK + 37
SEL = _config.SPATIAL_SELECT_MAX_CLASSES


def _kdim(rng, N, C, S, dtype, scale=3.0):
    return (rng.standard_normal((N, C, S)) * scale).astype(dtype)


def _targets(rng, N, C, S, ignore_index):
    t = rng.integers(0, C, (N, S))
    t[rng.random((N, S)) < 0.1] = ignore_index
    return t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [2, 3, SEL, SEL + 1, 40])
def test_all_options_against_torch(C, dtype, rng):
    """Weights, label smoothing, ignore_index outside and inside [0, C), the reductions and
    a per-position upstream gradient, over several blocks."""
    N, S = 2, S_LONG if C <= 3 else 300
    x = _kdim(rng, N, C, S, dtype)
    w = (rng.random(C) + 0.2).astype(dtype)
    for ii, kw in [(-100, dict(weight=w, label_smoothing=0.2)),
                   (1, dict(reduction="sum")),
                   (-1, dict(weight=w, reduction="none")),
                   (0, dict(label_smoothing=0.1, reduction="none"))]:
        t = _targets(rng, N, C, S, ii)
        go = ((rng.random((N, S)) + 0.5).astype(dtype) if kw.get("reduction") == "none"
              else None)
        loss = fastce.cross_entropy(x, t, ignore_index=ii, **kw)
        loss2, grad = fastce.cross_entropy_with_grad(x, t, ignore_index=ii, grad_output=go,
                                                     **kw)
        ref_loss, ref_grad = torch_ce(x, t, ignore_index=ii, grad_output=go, **kw)
        assert np.array_equal(loss, loss2)
        assert_close(loss, ref_loss, dtype, scale=10)
        assert_close(grad, ref_grad, dtype)
        ignored = np.broadcast_to((t == ii)[:, None, :], x.shape)
        assert np.all(grad[ignored] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_parallel_twin(dtype, rng, monkeypatch):
    """The threaded twin, several tasks, two classes and more."""
    monkeypatch.setattr(_cross_entropy, "_parallel", lambda *args: True)
    for C, S in [(2, 2 * S_LONG), (7, 8 * _config.SPATIAL_BLOCK * 2 + 5)]:
        x = _kdim(rng, 2, C, S, dtype)
        t = _targets(rng, 2, C, S, -100)
        loss, grad = fastce.cross_entropy_with_grad(x, t, reduction="none")
        ref_loss, ref_grad = torch_ce(x, t, reduction="none")
        assert_close(loss, ref_loss, dtype, scale=10)
        assert_close(grad, ref_grad, dtype)


def _mp_pos(col, t):
    """(loss, target gradient) of one position's logits at 50 digits: log1p(rest), -rest / (1
    + rest), rest = sum_{c != t} exp(x_c - x_t)."""
    with mpmath.workdps(50):
        xt = mpmath.mpf(float(col[t]))
        rest = mpmath.fsum(mpmath.exp(mpmath.mpf(float(v)) - xt)
                           for c, v in enumerate(col) if c != t)
        return float(mpmath.log1p(rest)), float(-rest / (1 + rest))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C, n_conf", [(2, None), (5, 30), (5, None), (SEL + 4, 12)])
def test_confident_positions_full_precision(C, n_conf, dtype, rng):
    """Positions whose target holds the max, losses down to ~1e-30 (1e-300): loss and target
    gradient within 8 eps of mpmath -- the closed form's own precision (C = 2), and the
    second pass on gathered columns (a few confident positions in a block: ``n_conf``) or
    across the block (every position confident: None)."""
    N, S = 1, 2 * _config.SPATIAL_BLOCK
    x = _kdim(rng, N, C, S, np.float64, scale=1.0)
    t = rng.integers(0, C, (N, S))
    conf = np.arange(S) if n_conf is None else rng.choice(S, n_conf, replace=False)
    top = 70.0 if dtype == np.float32 else 690.0
    gaps = np.geomspace(0.05, top, len(conf))
    for k, j in enumerate(conf):
        others = np.delete(x[0, :, j], t[0, j])
        x[0, t[0, j], j] = others.max() + gaps[k]
    x = x.astype(dtype)
    for j in conf:          # the cast may tie the target with another class: keep it above
        col = x[0, :, j]
        m = np.delete(col, t[0, j]).max()
        if col[t[0, j]] <= m:
            col[t[0, j]] = np.nextafter(m, dtype(np.inf))
    loss, grad = fastce.cross_entropy_with_grad(x, t, reduction="none")
    assert np.array_equal(loss, fastce.cross_entropy(x, t, reduction="none"))
    eps, tiny = float(np.finfo(dtype).eps), float(np.finfo(dtype).tiny)
    for j in conf:
        ref_l, ref_g = _mp_pos(x[0, :, j], t[0, j])
        if ref_l < tiny:
            continue        # a subnormal result: outside the guarantee
        assert abs(float(loss[0, j]) - ref_l) <= 8 * eps * ref_l, (j, loss[0, j], ref_l)
        g = float(grad[0, t[0, j], j])
        assert abs(g - ref_g) <= 8 * eps * max(abs(ref_g), tiny), (j, g, ref_g)
    ref_loss, ref_grad = torch_ce(x, t, reduction="none")
    assert_close(loss, ref_loss, dtype, scale=10)
    assert_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_classes_special_values_same_as_rows(dtype, rng, monkeypatch):
    """NaN and +-inf logits in the two-class layout: the closed form hands those blocks to
    the general block code, whose values are the rows kernels' (the (S, 2) rows of the
    same logits); the other blocks keep the closed form's."""
    S = S_LONG
    x = _kdim(rng, 1, 2, S, dtype)
    t = rng.integers(0, 2, (1, S))
    for j, (a, b) in enumerate([(NAN, 0.0), (1.0, NAN), (NINF, NINF), (NINF, 2.0),
                                (3.0, INF), (INF, INF), (INF, NINF)]):
        x[0, :, 5 + 3 * j] = (a, b)
    t[0, 5 + 9] = 0             # a -inf target logit: loss +inf
    x[0, 1, S - 3] = NINF       # in the last, partial block
    rows = np.ascontiguousarray(x[0].T)
    monkeypatch.setattr(_config, "ROW_TILE_MAX_CLASSES", (0, 0))   # the rows kernels
    for kw in ({}, dict(label_smoothing=0.2, weight=np.array([0.4, 1.3], dtype))):
        got_l, got_g = fastce.cross_entropy_with_grad(x, t, reduction="none", **kw)
        ref_l, ref_g = fastce.cross_entropy_with_grad(rows, t[0], reduction="none", **kw)
        assert got_l[0, 14] == INF
        np.testing.assert_allclose(got_l[0], ref_l, rtol=8 * np.finfo(dtype).eps,
                                   equal_nan=True)
        np.testing.assert_allclose(got_g[0].T, ref_g, rtol=8 * np.finfo(dtype).eps,
                                   atol=float(np.finfo(dtype).tiny), equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_classes_lse_and_large_vocab_options(dtype, rng):
    """return_lse in the closed form; softcap and z-loss (the general block) at C = 2: both
    against the rows layout of the same logits."""
    S = S_LONG
    x = _kdim(rng, 2, 2, S, dtype)
    t = _targets(rng, 2, 2, S, -100)
    rows = np.ascontiguousarray(x.transpose(0, 2, 1).reshape(-1, 2))
    for kw in (dict(return_lse=True), dict(softcap=4.0, z_loss=1e-3, return_lse=True)):
        loss, grad, lse = fastce.cross_entropy_with_grad(x, t, reduction="none", **kw)
        rl, rg, rlse = fastce.cross_entropy_with_grad(rows, t.reshape(-1), reduction="none",
                                                      **kw)
        assert_close(loss.reshape(-1), rl, dtype)
        assert_close(lse.reshape(-1), rlse, dtype)
        assert_close(grad.transpose(0, 2, 1).reshape(-1, 2), rg, dtype)
    ref = np.logaddexp(x[:, 0].astype(np.float64), x[:, 1].astype(np.float64))
    assert_close(fastce.cross_entropy(x, t, return_lse=True)[1], ref, dtype)


def test_inputs_unchanged_and_layout_choice(rng):
    """K-dim inputs take the spatial kernels whatever C; the logits are not modified."""
    x = _kdim(rng, 2, 2, 100, np.float32)
    t = rng.integers(0, 2, (2, 100))
    before = x.copy()
    fastce.cross_entropy_with_grad(x, t)
    assert np.array_equal(x, before)
    prob = _cross_entropy._validate_call(x, t, None, -100, "mean", 0.0)[3]
    assert _cross_entropy._choose_layout(prob, (None, None, None)) is \
        _cross_entropy._spatial_layout


def test_target_check_blocks(rng):
    """The class-index check runs in blocks of ``CHECK_BLOCK``: an invalid target in a later
    block is named at its position; the 'mean' denominator (weights of the non-ignored
    targets) over several blocks, against NumPy."""
    N, C, S = 3, 4, _config.CHECK_BLOCK + 100
    x = _kdim(rng, N, C, S, np.float64)
    t = _targets(rng, N, C, S, -100)
    w = rng.random(C) + 0.5
    denom = w[t[t != -100]].sum()
    for kw, d in ((dict(weight=w), denom), ({}, float(np.count_nonzero(t != -100)))):
        total = fastce.cross_entropy(x, t, reduction="sum", **kw)
        assert_close(fastce.cross_entropy(x, t, **kw), total / d)
    bad = t.copy()
    bad[2, S - 7] = C
    with pytest.raises(IndexError, match=rf"class index {C} at position \(2, {S - 7}\)"):
        fastce.cross_entropy(x, bad)


@pytest.mark.parametrize("par", [False, True])
@pytest.mark.parametrize("C", [2, 5])
def test_reduction_in_the_kernel_against_torch(C, par, rng, monkeypatch):
    """'mean' and 'sum' are summed inside the kernel's pass (``_spatial_reduced``; without
    weights the targets are checked and counted there too): weights, ignore_index outside
    and inside [0, C), a non-finite logit (the closed form hands its block back), both
    dtypes, against torch in float64; with every target ignored 'mean' is NaN (torch's
    0/0) and 'sum' 0; forward and forward + grad give the same bits."""
    monkeypatch.setattr(_cross_entropy, "_parallel", lambda *args: par)
    N, S = 3, 2 * _config.SPATIAL_PAIR_BLOCK + 300
    calls = []
    monkeypatch.setattr(_cross_entropy, "_spatial_reduced",
                        lambda *a, f=_cross_entropy._spatial_reduced: calls.append(a[-1])
                        or f(*a))
    for dtype in DTYPES:
        x = _kdim(rng, N, C, S, dtype)
        x[1, 0, 2100] = NINF
        w = (rng.random(C) + 0.2).astype(dtype)
        for ii in (-100, 1):
            t = _targets(rng, N, C, S, ii)
            for kw in ({}, dict(weight=w), dict(label_smoothing=0.1)):
                for red in ("mean", "sum"):
                    got = fastce.cross_entropy(x, t, ignore_index=ii, reduction=red, **kw)
                    ref, _ = torch_ce(x, t, ignore_index=ii, reduction=red, **kw)
                    assert got.dtype == dtype
                    assert_close(got, ref, dtype, scale=10)
                    loss2, _ = fastce.cross_entropy_with_grad(x, t, ignore_index=ii,
                                                              reduction=red, **kw)
                    assert np.array_equal(got, loss2)
        every = np.full((N, S), 1)
        assert np.isnan(fastce.cross_entropy(x, every, ignore_index=1))
        assert fastce.cross_entropy(x, every, ignore_index=1, reduction="sum") == 0
    # fused check: unweighted forwards; the target check before the kernel otherwise
    assert True in calls and False in calls


@pytest.mark.parametrize("par", [False, True])
@pytest.mark.parametrize("C", [2, 5, SEL + 3])
def test_invalid_target_found_in_the_kernel(C, par, rng, monkeypatch):
    """With the check inside the kernel's pass, an invalid class index still raises
    IndexError naming ``target``, the value and its position: the first one when there are
    several in different blocks and tasks, negative or >= C, also in a block with a NaN
    logit (the closed form hands it back) and with a weight (checked before the kernel)."""
    monkeypatch.setattr(_cross_entropy, "_parallel", lambda *args: par)
    N, S = 2, 3 * _config.SPATIAL_PAIR_BLOCK + 11
    x = _kdim(rng, N, C, S, np.float32)
    t = _targets(rng, N, C, S, -100)
    for pos, val in [((1, S - 3), C), ((0, 5), -1), ((1, _config.SPATIAL_PAIR_BLOCK), C + 7)]:
        bad = t.copy()
        bad[pos] = val
        bad[1, S - 1] = C             # a later one is not the one named
        x2 = x.copy()
        x2[pos[0], 0, pos[1] + 1] = NAN
        for kw in ({}, dict(weight=np.ones(C, np.float32)), dict(reduction="sum")):
            with pytest.raises(IndexError,
                               match=rf"target holds class index {val} at position "
                                     rf"\({pos[0]}, {pos[1]}\)"):
                fastce.cross_entropy(x2, bad, **kw)
