"""Row tiles (``fastce/_cpu/tiles.py``): many short rows vectorized across rows, and the BCE
small-call entry.  Each test pins the path it means (the dispatch rule, and a spy on the
kernel) and checks results against torch in float64 or mpmath; special values against the
rows kernels the tiles replace (same semantics), and against torch where torch defines them.
"""
import mpmath
import numpy as np
import pytest
import torch
from helpers import DTYPES, F, assert_close, t64, torch_bce, torch_bce_logits, torch_ce
from numba import njit

import fastce
from fastce import _config, _runtime
from fastce._cpu import bce as bce_kernels
from fastce._cpu import tiles
from fastce._cpu.primitives import REST_TERM_BIAS, rest_term

# (N, C): a partial last tile (N % 64), class counts off the 16/8-wide transpose blocks, the
# serial twin (N * C < 2**16) and the parallel one (float32 only: a compile each).
SHAPES = [(33, 17), (100, 37), (64, 100), (100, 7)]
PARALLEL_SHAPE = (1100, 64)


@pytest.fixture
def spy(monkeypatch):
    """Count the calls of the tile kernels (both twins, and the small-call entry)."""
    calls = []
    for name in ("softmax_tiles", "softmax_tiles_serial", "ce_index_tiles",
                 "ce_index_tiles_serial", "ce_index_small_tiles"):
        real = getattr(tiles, name)

        def wrapped(*args, _real=real, _name=name):
            calls.append(_name)
            return _real(*args)
        monkeypatch.setattr(tiles, name, wrapped)
    return calls


def _rows_path(monkeypatch):
    """Turn the row tiles off: the rows kernels (the reference for special values)."""
    monkeypatch.setattr(_config, "ROW_TILE_MAX_CLASSES", (0, 0))


def _logits(rng, shape, dtype):
    return (rng.standard_normal(shape) * 3).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_family_on_tiles(shape, dtype, rng, spy):
    assert _runtime._row_tiles(*shape, np.dtype(dtype))
    x = _logits(rng, shape, dtype)
    x[3, 5] = x[3, 0]          # a tie at the max is possible: a row with two equal entries
    x64 = t64(x)
    assert_close(fastce.logsumexp(x), torch.logsumexp(x64, -1).numpy(), dtype)
    assert_close(fastce.log_softmax(x), torch.log_softmax(x64, -1).numpy(), dtype)
    assert_close(fastce.softmax(x), torch.softmax(x64, -1).numpy(), dtype)
    # through the general path too (an axis given as -1 of a 3-D view, out=)
    out = np.empty_like(x)
    assert fastce.log_softmax(x, out=out) is out
    assert_close(out, torch.log_softmax(x64, -1).numpy(), dtype)
    assert spy and set(spy) <= {"softmax_tiles_serial"}


def test_parallel_twins_on_tiles(rng, spy, monkeypatch):
    monkeypatch.setattr(_runtime, "_parallel", lambda *args: True)
    monkeypatch.setattr(fastce._softmax, "_parallel", lambda *args: True)
    monkeypatch.setattr(fastce._cross_entropy, "_parallel", lambda *args: True)
    x = _logits(rng, PARALLEL_SHAPE, np.float32)
    t = rng.integers(0, x.shape[1], x.shape[0])
    x64 = t64(x)
    assert_close(fastce.softmax(x, axis=1), torch.softmax(x64, -1).numpy())
    loss, g = fastce.cross_entropy_with_grad(x, t, reduction="sum", label_smoothing=0.1)
    rl, rg = torch_ce(x, t, reduction="sum", label_smoothing=0.1)
    assert_close(loss, rl, scale=100)
    assert_close(g, rg)
    # few classes, forward: the rest tiles (_config.CE_REST_TILE_MAX_CLASSES) in parallel
    x = _logits(rng, (7000, 10), np.float32)      # past the small entry's size
    t = rng.integers(0, 10, 7000)
    assert_close(fastce.cross_entropy(x, t, reduction="sum"), torch_ce(x, t, reduction="sum")[0],
                 scale=100)
    assert set(spy) == {"softmax_tiles", "ce_index_tiles"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("opts", [
    {},
    {"reduction": "none"},
    {"weight": True, "ignore_index": 2, "label_smoothing": 0.15},
    {"reduction": "sum", "weight": True, "grad_output": 0.5},
    {"reduction": "none", "label_smoothing": 0.3, "grad_output": True},
])
def test_cross_entropy_on_tiles(shape, dtype, opts, rng, spy):
    assert _runtime._row_tiles(*shape, np.dtype(dtype))
    N, C = shape
    x = _logits(rng, shape, dtype)
    t = rng.integers(0, C, N)
    t[1] = t[7] = -100
    kw = dict(opts)
    if kw.get("weight"):
        kw["weight"] = (rng.random(C) + 0.2).astype(dtype)
    if "ignore_index" in kw:
        t[t == -100] = kw["ignore_index"]
    if kw.get("grad_output") is True:
        kw["grad_output"] = rng.random(N).astype(dtype)
    loss, g = fastce.cross_entropy_with_grad(x, t, **kw)
    fwd_kw = {k: v for k, v in kw.items() if k != "grad_output"}
    rl, rg = torch_ce(x, t, **kw)
    assert_close(loss, rl, dtype, scale=C)
    assert_close(g, rg, dtype)
    assert_close(fastce.cross_entropy(x, t, **fwd_kw), rl, dtype, scale=C)
    ignored = t == kw.get("ignore_index", -100)
    assert np.all(g[ignored] == 0)
    assert spy and set(spy) <= {"ce_index_tiles_serial", "ce_index_small_tiles"}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, tiled", [((32, 100), False), ((48, 100), True),
                                          ((32, 64), True), ((40, 192), False)])
def test_partial_tile_only_when_its_empty_lanes_cost_little(shape, tiled, dtype, rng, spy):
    """Fewer rows than a tile: tiles while (TILE_ROWS - N) * C <= ROW_TILE_PARTIAL_MAX_WASTE,
    the rows kernels beyond; torch's results either way."""
    if dtype == np.float64 and shape[1] > _config.ROW_TILE_MAX_CLASSES[1]:
        tiled = False
    assert _runtime._row_tiles(*shape, np.dtype(dtype)) == tiled
    N, C = shape
    x = _logits(rng, shape, dtype)
    t = rng.integers(0, C, N)
    x64 = t64(x)
    assert_close(fastce.log_softmax(x), torch.log_softmax(x64, -1).numpy(), dtype)
    assert_close(fastce.softmax(x), torch.softmax(x64, -1).numpy(), dtype)
    loss, g = fastce.cross_entropy_with_grad(x, t)
    rl, rg = torch_ce(x, t)
    assert_close(loss, rl, dtype, scale=C)
    assert_close(g, rg, dtype)
    assert bool(spy) == tiled


def _special_rows(dtype, C, rng):
    x = _logits(rng, (70, C), dtype)
    x[0] = np.nan                       # all NaN
    x[1, 3] = np.nan                    # one NaN
    x[2] = -np.inf                      # all masked
    x[3, :C // 2] = -np.inf             # half masked
    x[4, 5] = np.inf                    # a +inf logit
    x[5, 5] = x[5, 6] = np.inf          # two
    x[6, ::2] = -np.inf                 # masked classes, and the target on one (below)
    x[7] = 1e30 if dtype == np.float32 else 1e300  # huge equal logits: lse - x = log C
    x[8] = 0
    x[66, 1] = -np.inf                  # in the partial last tile
    x[69, 0] = np.nan
    t = rng.integers(0, C, 70)
    t[6] = 0                            # a -inf target logit: loss +inf
    t[3] = C - 1
    return x, t


# C = 10: the forward loss takes the few-class rest tiles (_config.CE_REST_TILE_MAX_CLASSES)
@pytest.mark.parametrize("C", [37, 10])
@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_same_as_rows_kernels(dtype, C, rng, monkeypatch):
    x, t = _special_rows(dtype, C, rng)
    before = x.copy()
    tiled = [fastce.logsumexp(x), fastce.log_softmax(x), fastce.softmax(x),
             *fastce.cross_entropy_with_grad(x, t, reduction="none"),
             *fastce.cross_entropy_with_grad(x, t, reduction="none", label_smoothing=0.2),
             fastce.cross_entropy(x, t, reduction="none")]
    assert np.array_equal(x, before, equal_nan=True)      # inputs untouched
    with monkeypatch.context() as m:
        _rows_path(m)
        assert not _runtime._row_tiles(70, C, np.dtype(dtype))
        rows = [fastce.logsumexp(x), fastce.log_softmax(x), fastce.softmax(x),
                *fastce.cross_entropy_with_grad(x, t, reduction="none"),
                *fastce.cross_entropy_with_grad(x, t, reduction="none", label_smoothing=0.2),
                fastce.cross_entropy(x, t, reduction="none")]
    for a, b in zip(tiled, rows):
        assert np.array_equal(np.isnan(a), np.isnan(b))
        assert np.array_equal(np.isinf(a) & (a > 0), np.isinf(b) & (b > 0))
        assert np.array_equal(np.isinf(a) & (a < 0), np.isinf(b) & (b < 0))
        assert_close(a, b, dtype)
    # and torch where it defines the values: finite rows and the masked-but-finite ones
    ok = np.array([i not in (0, 1, 2, 4, 5, 6, 69) for i in range(70)])
    x64 = t64(x[ok])
    assert_close(tiled[1][ok], torch.log_softmax(x64, -1).numpy(), dtype)
    assert_close(tiled[0][ok], torch.logsumexp(x64, -1).numpy(), dtype)
    rl, rg = torch_ce(x[ok], t[ok], reduction="none")
    assert_close(tiled[3][ok], rl, dtype)
    assert_close(tiled[7][ok], rl, dtype)
    assert tiled[3][6] == np.inf and tiled[7][6] == np.inf
    assert np.isnan(tiled[1][2]).all() and np.isnan(tiled[2][2]).all()   # torch: NaN


def _mp_log1p_rest(row):
    """log1p(sum of exp(x - max) over all entries but one max), 50 digits."""
    k = int(np.argmax(row))
    with mpmath.workdps(50):
        M = mpmath.mpf(float(row[k]))
        rest = mpmath.fsum(mpmath.exp(mpmath.mpf(float(v)) - M)
                           for j, v in enumerate(row) if j != k)
        return float(mpmath.log1p(rest))


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_softmax_max_entry_full_precision(dtype, rng):
    """Every tile row is computed as max + log1p(rest): the max entry's log_softmax within
    the 8 eps guarantee of docs/semantics.md, down to tiny values (confident rows)."""
    C, N = 40, 48
    x = rng.standard_normal((N, C)) * rng.choice([0.5, 3.0], (N, 1))
    gaps = np.geomspace(0.05, 60.0 if dtype == np.float32 else 600.0, N)
    k = rng.integers(0, C, N)
    x[np.arange(N), k] = np.max(x, axis=1) + gaps
    x = x.astype(dtype)
    lsm = fastce.log_softmax(x)
    eps = float(np.finfo(dtype).eps)
    for i in range(N):
        ref = _mp_log1p_rest(x[i])
        if ref < float(np.finfo(dtype).tiny):
            continue
        assert abs(-float(lsm[i, k[i]]) - ref) <= 8 * eps * ref, (i, lsm[i, k[i]], ref)


@pytest.mark.parametrize("C", [29, 10])
@pytest.mark.parametrize("dtype", DTYPES)
def test_confident_targets_on_tiles(dtype, C, rng):
    """Targets holding the max with small losses: the loss and p_t - 1 within 8 eps, with
    few confident rows in a tile (row by row) and with many (vectorized over the tile); the
    forward loss alone too (at C = 10 the few-class rest tiles)."""
    N = 96
    x = rng.standard_normal((N, C))
    t = rng.integers(0, C, N)
    conf = np.arange(N) < 72          # tile 0 all confident, tile 1 a few
    conf[64:] = np.arange(N - 64) < 3
    gaps = np.geomspace(0.5, 60.0 if dtype == np.float32 else 600.0, N)
    x[conf, t[conf]] = np.max(x[conf], axis=1) + gaps[conf]
    x = x.astype(dtype)
    loss, g = fastce.cross_entropy_with_grad(x, t, reduction="none")
    fwd = fastce.cross_entropy(x, t, reduction="none")
    eps = float(np.finfo(dtype).eps)
    for i in np.flatnonzero(conf):
        row = x[i].astype(np.float64)
        with mpmath.workdps(50):
            xt = mpmath.mpf(row[t[i]])
            rest = mpmath.fsum(mpmath.exp(mpmath.mpf(v) - xt)
                               for j, v in enumerate(row) if j != t[i])
            ref_l, ref_g = float(mpmath.log1p(rest)), float(-rest / (1 + rest))
        if ref_l < float(np.finfo(dtype).tiny):
            continue
        assert abs(float(loss[i]) - ref_l) <= 8 * eps * ref_l, (i, loss[i], ref_l, x[i], t[i])
        assert abs(float(fwd[i]) - ref_l) <= 8 * eps * ref_l, (i, fwd[i], ref_l, x[i], t[i])
        assert abs(float(g[i, t[i]]) - ref_g) <= 8 * eps * abs(ref_g), (i, g[i, t[i]], ref_g)


@njit
def _rest_terms(x, pivot, out):
    for i in range(x.shape[0]):
        out[i] = rest_term(x[i], pivot)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rest_term(dtype):
    """exp(x - pivot) from the exact difference (float32: biased by 2**REST_TERM_BIAS), within
    2 ulp over the -150..0 range, exact 1 at 0, 0 for -inf."""
    pivot = dtype(3.3)
    d = -np.concatenate([np.geomspace(1e-7, 149.0, 400), [0.0]])
    x = (pivot + d).astype(dtype)
    out = np.empty_like(x)
    _rest_terms(x, pivot, out)
    bias = 2.0 ** REST_TERM_BIAS if dtype == np.float32 else 1.0
    eps = float(np.finfo(dtype).eps)
    with mpmath.workdps(40):
        for xi, oi in zip(x, out):
            ref = float(mpmath.exp(mpmath.mpf(float(xi)) - mpmath.mpf(float(pivot)))) * bias
            assert abs(float(oi) - ref) <= 2 * eps * ref, (xi, oi, ref)
    assert out[-1] == bias
    z = np.array([-np.inf], dtype)
    _rest_terms(z, pivot, z)
    assert z[0] == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(150, 45), (150, 10), (37, 3), (64, 16)])
def test_tile_transpose_round_trip(dtype, shape, rng):
    """load_tile / store_tile: the shuffle transpose of full blocks, the masked class tail
    (C not a multiple of the vector width, or narrower than one vector) and the partial
    last tile; nothing outside the tile's rows is written."""
    @njit
    def round_trip(x, out, bufs):
        buf = np.empty((x.shape[1], _config.TILE_ROWS), x.dtype)
        for k, r0 in enumerate(range(0, x.shape[0], _config.TILE_ROWS)):
            tiles.load_tile(x, r0, buf)
            bufs[k] = buf
            tiles.store_tile(buf, out, r0)

    N, C = shape
    T = _config.TILE_ROWS
    n_tiles = -(-N // T)
    x = rng.standard_normal((N + 1, C)).astype(dtype)
    out = np.full_like(x, 7)
    bufs = np.empty((n_tiles, C, T), dtype)
    round_trip(x[:N], out[:N], bufs)
    assert np.array_equal(out[:N], x[:N])
    assert np.all(out[N] == 7)      # the row past the end untouched
    padded = np.zeros((n_tiles * T, C), dtype)
    padded[:N] = x[:N]
    assert np.array_equal(bufs, padded.reshape(n_tiles, T, C).transpose(0, 2, 1))


# ---------------------------------------------------------------------------------------------
# BCE small path

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 10), (32, 10)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bce_small_path(shape, reduction, dtype, rng, monkeypatch):
    calls = []
    for name in ("bce_small", "bce_with_logits_small"):
        real = getattr(bce_kernels, name)

        def wrapped(*args, _real=real, _name=name):
            calls.append(_name)
            return _real(*args)
        monkeypatch.setattr(bce_kernels, name, wrapped)
    p = rng.uniform(0.001, 0.999, shape).astype(dtype)
    p.flat[0] = 0.0                                  # torch's log clamp at -100
    y = rng.random(shape).astype(dtype)
    x = _logits(rng, shape, dtype)
    x.flat[-1] = np.inf
    got = fastce.binary_cross_entropy(p, y, reduction=reduction)
    assert type(got) is dtype
    assert_close(got, torch_bce(p, y, reduction=reduction), dtype, scale=10)
    lg = fastce.binary_cross_entropy_with_logits(x, y, reduction=reduction)
    assert type(lg) is dtype
    y_inf = y.copy()
    y_inf.flat[-1] = 0.0                           # +inf logit, y = 0: loss inf (torch too)
    assert fastce.binary_cross_entropy_with_logits(x, y_inf, reduction=reduction) == np.inf
    fin = np.isfinite(x)
    x2 = np.where(fin, x, 0).astype(dtype)
    assert_close(fastce.binary_cross_entropy_with_logits(x2, y, reduction=reduction),
                 torch_bce_logits(x2, y, reduction=reduction), dtype, scale=10)
    # the gradients, against torch's autograd
    loss, g = fastce.binary_cross_entropy_with_grad(p, y, reduction=reduction)
    assert_close(loss, got, dtype)
    q = t64(p).requires_grad_()
    F.binary_cross_entropy(q, t64(y), reduction=reduction).backward()
    assert_close(g, q.grad.numpy(), dtype)
    loss, g = fastce.binary_cross_entropy_with_logits_with_grad(x2, y, reduction=reduction)
    q = t64(x2).requires_grad_()
    F.binary_cross_entropy_with_logits(q, t64(y), reduction=reduction).backward()
    assert_close(loss, torch_bce_logits(x2, y, reduction=reduction), dtype, scale=10)
    assert_close(g, q.grad.numpy(), dtype)
    assert calls.count("bce_small") == 2 and calls.count("bce_with_logits_small") == 4
    # invalid data: the general path names it, as before
    bad = p.copy()
    bad.flat[-1] = 1.5
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]; found 1.5"):
        fastce.binary_cross_entropy(bad, y, reduction=reduction)
    bad_y = y.copy()
    bad_y.flat[0] = np.nan
    with pytest.raises(ValueError, match="target"):
        fastce.binary_cross_entropy_with_logits_with_grad(x2, bad_y, reduction=reduction)


def _two_class_rows(rng, N, dtype):
    """(N, 2) logits, a third of the rows confident (the target far above the other class,
    losses down to ~1e-26 / 1e-260), the rest random; targets with a few ignored."""
    x = rng.standard_normal((N, 2)) * 3
    t = rng.integers(0, 2, N)
    conf = np.arange(N) % 3 == 0
    gaps = np.geomspace(0.05, 60.0 if dtype == np.float32 else 600.0, N)
    x[conf, t[conf]] = x[conf, 1 - t[conf]] + gaps[conf]
    t[5] = t[77] = -100
    return x.astype(dtype), t


def _two_class_case(rng, dtype, parallel, monkeypatch):
    """``(N, x, t)`` of :func:`_two_class_rows`; with ``parallel`` the threaded twin forced
    and enough rows for several row blocks and a partial one."""
    if parallel:
        for mod in (_runtime, fastce._softmax, fastce._cross_entropy):
            monkeypatch.setattr(mod, "_parallel", lambda *args: True)
    N = 4500 if parallel else 150
    return (N, *_two_class_rows(rng, N, dtype))


# the parallel twin in float32 only (one more compile)
@pytest.mark.parametrize("dtype, parallel", [(np.float32, False), (np.float64, False),
                                             (np.float32, True)])
def test_two_classes_closed_form(dtype, parallel, rng, monkeypatch):
    """C = 2 (logsumexp, forward cross-entropy) in closed form, softplus of the exact
    difference: every loss and logsumexp within 8 eps of mpmath, confident rows included;
    weights and ignored rows as torch; the serial and the parallel twin."""
    N, x, t = _two_class_case(rng, dtype, parallel, monkeypatch)
    before = x.copy()
    loss = fastce.cross_entropy(x, t, reduction="none")
    lse = fastce.logsumexp(x)
    assert np.array_equal(x, before)
    eps = float(np.finfo(dtype).eps)
    for i in range(0, N, 1 if N < 1000 else 37):
        a, b = (mpmath.mpf(float(v)) for v in x[i])
        with mpmath.workdps(50):
            ref_lse = float(mpmath.log(mpmath.exp(a) + mpmath.exp(b)))
            ref_l = ref_lse if t[i] < 0 else float(
                mpmath.log1p(mpmath.exp((b, a)[t[i]] - (a, b)[t[i]])))
        assert abs(float(lse[i]) - ref_lse) <= 8 * eps * abs(ref_lse) + 2 * eps * float(
            np.max(np.abs(x[i]))), (i, lse[i], ref_lse)
        if t[i] < 0:
            assert loss[i] == 0
        elif ref_l >= float(np.finfo(dtype).tiny):
            assert abs(float(loss[i]) - ref_l) <= 8 * eps * ref_l, (i, loss[i], ref_l, x[i], t[i])
    w = np.array([0.3, 1.7], dtype)
    for red in ("mean", "sum"):
        rl, _ = torch_ce(x, t, reduction=red, weight=w)
        assert_close(fastce.cross_entropy(x, t, weight=w, reduction=red), rl, dtype, scale=2)
    rl, _ = torch_ce(x, t, reduction="mean")
    assert_close(fastce.cross_entropy(x, t), rl, dtype, scale=2)


@pytest.mark.parametrize("dtype, parallel", [(np.float32, False), (np.float64, False),
                                             (np.float32, True)])
def test_two_classes_gradient_and_smoothing_closed_form(dtype, parallel, rng, monkeypatch):
    """C = 2 with the gradient or label smoothing (``tiles.ce_index_pairs``): loss and
    gradient as torch's in float64 for every reduction, with and without weights and
    smoothing, ignored rows included; the other class's gradient (the probability ``e / (1 +
    e)`` of a confident row, down to ~1e-26 / 1e-260) within 8 eps of mpmath."""
    N, x, t = _two_class_case(rng, dtype, parallel, monkeypatch)
    before = x.copy()
    w = np.array([0.3, 1.7], dtype)
    for weight in (None, w):
        for eps in (0.0, 0.2):
            for red in ("mean", "sum", "none"):
                loss, grad = fastce.cross_entropy_with_grad(x, t, weight=weight, reduction=red,
                                                            label_smoothing=eps)
                rl, rg = torch_ce(x, t, weight=weight, reduction=red, label_smoothing=eps)
                assert_close(loss, rl, dtype, scale=2)
                assert_close(grad, rg, dtype, scale=2)
                if eps > 0:
                    assert_close(fastce.cross_entropy(x, t, weight=weight, reduction=red,
                                                      label_smoothing=eps), rl, dtype, scale=2)
    assert np.array_equal(x, before)
    _, grad = fastce.cross_entropy_with_grad(x, t, reduction="sum")
    eps32 = float(np.finfo(dtype).eps)
    for i in range(0, N, 1 if N < 1000 else 37):
        if t[i] < 0:
            assert grad[i, 0] == 0 and grad[i, 1] == 0
            continue
        a, b = (mpmath.mpf(float(v)) for v in x[i])
        xt, xo = (b, a) if t[i] == 1 else (a, b)
        with mpmath.workdps(50):
            p_o = float(1 / (1 + mpmath.exp(xt - xo)))
        if p_o >= float(np.finfo(dtype).tiny):
            g_o = float(grad[i, 1 - t[i]])
            assert abs(g_o - p_o) <= 8 * eps32 * p_o, (i, g_o, p_o, x[i], t[i])
            assert grad[i, t[i]] == -grad[i, 1 - t[i]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_two_classes_special_values_same_as_rows_kernels(dtype, rng, monkeypatch):
    """NaN, +-inf in two-class rows: the closed form hands the call to the tiles, whose
    values are the rows kernels'."""
    x = _logits(rng, (70, 2), dtype)
    x[0] = np.nan
    x[1, 1] = np.nan
    x[2] = -np.inf
    x[3, 0] = -np.inf
    x[4, 1] = np.inf
    x[5] = np.inf
    x[66, 1] = -np.inf
    t = rng.integers(0, 2, 70)
    t[3] = 0                            # a -inf target logit: loss +inf
    def values():
        loss_g, grad = fastce.cross_entropy_with_grad(x, t, reduction="none")
        return [fastce.logsumexp(x), fastce.cross_entropy(x, t, reduction="none"), loss_g,
                grad, fastce.cross_entropy(x, t, reduction="none", label_smoothing=0.1)]
    tiled = values()
    with monkeypatch.context() as m:
        _rows_path(m)
        rows = values()
    for a, b in zip(tiled, rows):
        assert np.array_equal(a, b, equal_nan=True) or (
            np.array_equal(np.isnan(a), np.isnan(b)) and np.array_equal(
                a[np.isinf(a)], b[np.isinf(a)]))
        assert_close(a, b, dtype)
    assert tiled[1][3] == np.inf
