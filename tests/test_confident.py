"""Full relative precision for confident rows (issue #13), against mpmath at 50 digits.

When the target (or the entry asked for) holds the row maximum, ``lse - x_t`` is
``log1p(rest)`` with ``rest = sum_{j != t} exp(x_j - x_t)``: the loss, the target's gradient
``p_t - 1 = -rest / (1 + rest)`` and log_softmax at the max entry must stay within 8 eps
relative of the exact value of the given floats for every result in the normal range, in
every layout (rows, split rows, few classes transposed, K-dim, the small-call entry).
"""
import functools

import mpmath
import numpy as np
import pytest

import fastce
from fastce import _config

DTYPES = [np.float32, np.float64]
BOUND = 8  # relative error bound, in units of the dtype's eps


def _rest(row, t):
    """(rest, log1p(rest)) of the exact values in ``row`` at 50 digits, pivot ``row[t]``."""
    row = np.ascontiguousarray(row)
    return _rest_of_bytes(row.dtype.str, row.tobytes(), int(t))


@functools.lru_cache(maxsize=256)
def _rest_of_bytes(dtype, data, t):
    # Memoized: several checks of one row (loss, log_softmax, the row alone) share its
    # reference, the costly part of the C = 100k cases (an mpmath exp per element).
    row = np.frombuffer(data, dtype)
    with mpmath.workdps(50):
        xt = mpmath.mpf(float(row[t]))
        rest = mpmath.fsum(mpmath.exp(mpmath.mpf(v) - xt)
                           for j, v in enumerate(row.tolist()) if j != t)
        return rest, mpmath.log1p(rest)


def _ref(row, t):
    """Exact loss ``log1p(rest)`` and target gradient ``-rest / (1 + rest)`` (floats)."""
    rest, lp = _rest(row, t)
    with mpmath.workdps(50):
        return float(lp), float(-rest / (1 + rest))


def _rel_err(got, ref, dtype):
    """Relative error in eps; results below the smallest normal number are compared
    absolutely (their spacing is fixed)."""
    got = float(got)
    tiny = float(np.finfo(dtype).tiny)
    return abs(got - ref) / max(abs(ref), tiny) / float(np.finfo(dtype).eps)


def _confident_rows(rng, n_rows, C, dtype):
    """Rows whose target holds the maximum, with losses from ~1e-30 (float32) / 1e-300
    (float64) to ~5: standard-normal others, the target above the others' max by a gap
    drawn on a log scale, at a random position."""
    x = rng.standard_normal((n_rows, C)) * rng.choice([0.5, 1.0, 3.0], size=(n_rows, 1))
    t = rng.integers(0, C, size=n_rows)
    top = 70.0 if dtype == np.float32 else 690.0
    gaps = np.concatenate([[0.05, 0.5], np.geomspace(1.0, top, n_rows - 2)])[:n_rows]
    for i in range(n_rows):
        others = np.delete(x[i], t[i])
        x[i, t[i]] = others.max() + gaps[i] if C > 1 else 0.0
    x = x.astype(dtype)
    # the cast may create a tie with the target: keep the target strictly the max
    for i in range(n_rows):
        row = x[i]
        m = np.max(np.delete(row, t[i])) if C > 1 else -np.inf
        if row[t[i]] <= m:
            row[t[i]] = np.nextafter(m, dtype(np.inf))
    return x, t


def _check_rows(x, t, loss, grad, dtype):
    worst = 0.0
    for i in range(x.shape[0]):
        ref_loss, ref_g = _ref(x[i], t[i])
        if ref_loss < float(np.finfo(dtype).tiny):
            continue  # a subnormal result: outside the guarantee
        e_loss = _rel_err(loss[i], ref_loss, dtype)
        e_grad = _rel_err(grad[i, t[i]], ref_g, dtype)
        assert e_loss <= BOUND, (i, x.shape, float(loss[i]), ref_loss, e_loss)
        assert e_grad <= BOUND, (i, x.shape, float(grad[i, t[i]]), ref_g, e_grad)
        worst = max(worst, e_loss, e_grad)
    return worst


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [2, 3, 10, 100, 1000, 5000])
def test_cross_entropy_confident_rows(C, dtype):
    rng = np.random.default_rng(C)
    x, t = _confident_rows(rng, 24, C, dtype)
    loss, grad = fastce.cross_entropy_with_grad(x, t, reduction="none")
    assert np.array_equal(loss, fastce.cross_entropy(x, t, reduction="none"))
    _check_rows(x, t, loss, grad, dtype)
    # log_softmax at the max entry (the target) is -loss
    lsm = fastce.log_softmax(x, axis=-1)
    for i in range(x.shape[0]):
        ref, _ = _ref(x[i], t[i])
        if ref >= float(np.finfo(dtype).tiny):
            assert _rel_err(-lsm[i, t[i]], ref, dtype) <= BOUND


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_rows_and_split_rows(dtype):
    """C = 100k: the blocked one-pass statistics with a target in a later block, and the
    split-row path (few rows, chunks on different threads) for loss, gradient, log_softmax."""
    rng = np.random.default_rng(1)
    C = 100_000
    x, t = _confident_rows(rng, 2, C, dtype)
    x[0, :1024] -= dtype(20)  # a low first block: the target lies above the running shift
    t[0] = 70_000
    x[0, t[0]] = x[0].max() + dtype(12)
    t[1] = 5
    # N = 2 rows of 100k run split when there are >= 2 threads (see _runtime._row_chunks)
    loss, grad = fastce.cross_entropy_with_grad(x, t, reduction="none")
    _check_rows(x, t, loss, grad, dtype)
    lsm = fastce.log_softmax(x)
    for i in range(2):
        assert _rel_err(-lsm[i, t[i]], _ref(x[i], t[i])[0], dtype) <= BOUND
    # one row at a time: the rows path
    for i in range(2):
        li, gi = fastce.cross_entropy_with_grad(x[i:i + 1], t[i:i + 1], reduction="none")
        _check_rows(x[i:i + 1], t[i:i + 1], li, gi, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [2, 5, 16])
def test_few_classes_transposed_path(C, dtype):
    """(N >= 64, C <= 16): the row tiles (class-index targets take them before the
    transposed few-classes layout)."""
    rng = np.random.default_rng(100 + C)
    N = max(_config.FEW_CLASSES_MIN_ROWS, 80)
    x, t = _confident_rows(rng, N, C, dtype)
    loss, grad = fastce.cross_entropy_with_grad(x, t, reduction="none")
    _check_rows(x, t, loss, grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kdim_layout(dtype):
    """(N, C, S) logits: loss, target gradient and log_softmax along axis 1."""
    rng = np.random.default_rng(5)
    N, C, S = 2, 21, 40
    rows, t = _confident_rows(rng, N * S, C, dtype)
    x = np.ascontiguousarray(rows.reshape(N, S, C).transpose(0, 2, 1))
    t2 = t.reshape(N, S)
    loss, grad = fastce.cross_entropy_with_grad(x, t2, reduction="none")
    g_rows = grad.transpose(0, 2, 1).reshape(N * S, C)
    _check_rows(rows, t, loss.reshape(-1), g_rows, dtype)
    lsm = fastce.log_softmax(x, axis=1).transpose(0, 2, 1).reshape(N * S, C)
    for i in range(N * S):
        ref, _ = _ref(rows[i], t[i])
        if ref >= float(np.finfo(dtype).tiny):
            assert _rel_err(-lsm[i, t[i]], ref, dtype) <= BOUND


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [2, 10, 100])
def test_small_call_entry(dtype, C):
    """One confident row through the small-call entries, "sum": up to
    ``_config.TINY_MAX_ELEMENTS`` logits the scalar ``tiny.ce_index_tiny``, above it
    ``ce_index_small``."""
    rng = np.random.default_rng(9)
    x, t = _confident_rows(rng, 12, C, dtype)
    for i in range(x.shape[0]):
        xi, ti = x[i:i + 1], t[i:i + 1]
        assert fastce._cross_entropy._ce_small(xi, ti, -100, "sum", True) is not None
        loss, grad = fastce.cross_entropy_with_grad(xi, ti, reduction="sum")
        _check_rows(xi, ti, np.array([loss]), grad, dtype)
        assert fastce.cross_entropy(xi, ti, reduction="sum") == loss


@pytest.mark.parametrize("dtype", DTYPES)
def test_weighted_target(dtype):
    """A class weight scales the confident loss and gradient (one more rounding)."""
    rng = np.random.default_rng(3)
    x, t = _confident_rows(rng, 16, 50, dtype)
    w = rng.uniform(0.5, 2.0, 50).astype(dtype)
    loss, grad = fastce.cross_entropy_with_grad(x, t, weight=w, reduction="none")
    for i in range(x.shape[0]):
        ref_loss, ref_g = _ref(x[i], t[i])
        if ref_loss >= float(np.finfo(dtype).tiny):
            wt = float(w[t[i]])
            assert _rel_err(loss[i], wt * ref_loss, dtype) <= BOUND + 1
            assert _rel_err(grad[i, t[i]], wt * ref_g, dtype) <= BOUND + 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_logsumexp_near_zero(dtype):
    """Rows whose max is 0: logsumexp = log1p(rest), down to the smallest normal result,
    in the rows and the K-dim layouts."""
    rng = np.random.default_rng(11)
    for C in (2, 7, 300, 40_000):
        x, t = _confident_rows(rng, 10, C, dtype)
        x = x - x[np.arange(10), t][:, None]  # the max becomes 0 (the reference uses these values)
        assert np.all(x.max(axis=1) == 0)
        got = fastce.logsumexp(x, axis=-1)
        got_k = fastce.logsumexp(np.ascontiguousarray(x.T), axis=0) if C <= 300 else got
        for i in range(10):
            ref = float(_rest(x[i], t[i])[1])
            if ref >= float(np.finfo(dtype).tiny):
                assert _rel_err(got[i], ref, dtype) <= BOUND, (C, i, got[i], ref)
                assert _rel_err(got_k[i], ref, dtype) <= BOUND, (C, i, got_k[i], ref)


# The issue's table: (logits, target, dtype); the exact values come from mpmath.
ISSUE_TABLE = [
    ([20.0] + [0.0] * 9, np.float32),
    ([30.0, 0.0, 0.0], np.float32),
    ([30.0, 0.0, 0.0], np.float64),
    ([50.0] + list(np.linspace(-5, 5, 999)), np.float64),
]


@pytest.mark.parametrize("row, dtype", ISSUE_TABLE)
def test_issue_table(row, dtype):
    x = np.array([row], dtype)
    t = np.array([0])
    ref_loss, ref_g = _ref(x[0], 0)
    assert ref_loss > 0
    loss, grad = fastce.cross_entropy_with_grad(x, t)
    assert _rel_err(loss, ref_loss, dtype) <= BOUND
    assert _rel_err(fastce.cross_entropy(x, t), ref_loss, dtype) <= BOUND
    assert _rel_err(grad[0, 0], ref_g, dtype) <= BOUND
    assert _rel_err(-fastce.log_softmax(x)[0, 0], ref_loss, dtype) <= BOUND


def test_issue_table_logsumexp():
    x = np.array([0.0, -40.0])
    ref = float(_rest(x, 0)[1])  # 4.248e-18
    assert _rel_err(fastce.logsumexp(x), ref, np.float64) <= BOUND
    x32 = x.astype(np.float32)
    assert _rel_err(fastce.logsumexp(x32), ref, np.float32) <= BOUND


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_near_the_second_pass_threshold(dtype):
    """Rows on both sides of the line where the second pass starts (loss ~1.5 with the
    target at the shift; larger with a stale shift) keep the bound: the one-pass value is
    kept only where it is already accurate."""
    rng = np.random.default_rng(21)
    out = []
    for C in (10, 3000):
        for target_loss in (1.2, 1.45, 1.55, 2.0, 3.0):
            x = rng.standard_normal(C).astype(dtype) * dtype(0.3)
            t = int(rng.integers(0, C))
            # the target above the others by enough for the wanted loss
            others = np.delete(x, t).astype(np.float64)
            base = np.log(np.sum(np.exp(others - others.max())))
            x[t] = dtype(others.max() + base - np.log(np.expm1(target_loss)))
            if x[t] <= others.max():
                continue
            out.append((x, t))
    for x, t in out:
        loss, grad = fastce.cross_entropy_with_grad(x[None], np.array([t]), reduction="none")
        _check_rows(x[None], np.array([t]), loss, grad, dtype)


def test_random_rows_unchanged():
    """Rows that are not confident take the one-pass value, as before: same result as the
    unnormalized one-pass formula to the last bit is not promised, but the torch-level
    accuracy is (float64 reference, float32 tolerance)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 1000)).astype(np.float32)
    t = rng.integers(0, 1000, 64)
    loss = fastce.cross_entropy(x, t, reduction="none")
    x64 = x.astype(np.float64)
    ref = np.log(np.exp(x64).sum(axis=1)) - x64[np.arange(64), t]
    np.testing.assert_allclose(loss, ref, rtol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_target_above_a_stale_shift(dtype):
    """Wide rows whose first block is low, so the one-pass shift lies far below the target
    (the argmax, in a late block), at probabilities from 0.01 to 0.99: on both sides of the
    confident line the loss and the target's gradient keep full relative precision, whether
    the test is taken again from the row's exact max (rows) or the shift is exact from the
    start (split rows, log_softmax)."""
    rng = np.random.default_rng(7)
    C = 5000
    probs = [0.01, 0.1, 0.2, 0.25, 0.5, 0.9, 0.99]
    x = rng.standard_normal((len(probs), C))
    x[:, :1024] -= 20.0
    t = np.full(len(probs), C - 7)
    for i, p in enumerate(probs):
        others = np.log(np.exp(np.delete(x[i], t[i])).sum())
        x[i, t[i]] = others + np.log(p / (1 - p))
    x = x.astype(dtype)
    loss, grad = fastce.cross_entropy_with_grad(x, t, reduction="none")
    _check_rows(x, t, loss, grad, dtype)
    lsm = fastce.log_softmax(x)
    for i in range(len(probs)):
        assert _rel_err(-lsm[i, t[i]], _ref(x[i], t[i])[0], dtype) <= BOUND
        li, gi = fastce.cross_entropy_with_grad(x[i:i + 1], t[i:i + 1], reduction="none")
        _check_rows(x[i:i + 1], t[i:i + 1], li, gi, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [3, 100, 1000, 1500])
def test_log_softmax_near_ties(C, dtype):
    """log_softmax at the max entry when other entries equal the max or lie an ulp or a few
    below it (their terms round to the max's own term, which the one-block rows count as
    ties), beside a small rest from the others: 8 eps against mpmath."""
    rng = np.random.default_rng(C + 7)
    rows = []
    for k in range(6):
        x = (rng.standard_normal(C) * 2 - 30).astype(dtype)
        m = dtype(rng.uniform(-3, 3))
        p = int(rng.integers(0, C))
        x[p] = m
        q = (p + 1 + k) % C
        if k == 0:
            x[q] = m                                      # an exact tie
        elif k < 4:
            x[q] = m
            for _ in range(k):
                x[q] = np.nextafter(x[q], dtype(-np.inf))   # k ulp below
        elif k == 4:
            x[q] = m - dtype(2.0) ** -20 * max(abs(m), dtype(1))   # just below
        rows.append(x)
    x = np.stack(rows)
    lsm = fastce.log_softmax(x, axis=-1)
    for i in range(x.shape[0]):
        t = int(np.argmax(x[i]))
        ref = float(_rest(x[i], t)[1])
        assert _rel_err(-lsm[i, t], ref, dtype) <= BOUND, (i, float(lsm[i, t]), ref)
