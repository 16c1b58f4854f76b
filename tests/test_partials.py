"""fastce._partials: per-(row, class-chunk) partials, their merge and finish, against float64
NumPy references; the merge must not depend on the merge tree and must be -inf-safe (a chunk
whose classes are all masked, merged first, last or alone)."""
import numpy as np
import pytest
from scipy.special import logsumexp as sp_logsumexp

from fastce import _partials as P

TOL = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-13}


def _logits(dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((7, 40)) * 4).astype(dtype)
    x[1, :30] = -np.inf            # chunks of only -inf, then finite ones
    x[2, :39] = -np.inf            # the only finite value is the last class
    x[3, 10:25] = -np.inf
    x[4, 0] = dtype(80)            # a large logit first
    x[5, :] = -np.inf              # all masked
    return x


EDGES = [0, 3, 10, 11, 25, 30, 39, 40]


def _chunks(a, edges=EDGES):
    return [a[:, lo:hi] for lo, hi in zip(edges[:-1], edges[1:])]


def _close(got, ref, dtype):
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_array_equal(got[np.isinf(ref)], ref[np.isinf(ref)])
    fin = np.isfinite(ref)
    err = np.abs(got[fin] - ref[fin]) / np.maximum(1, np.abs(ref[fin]))
    assert err.max(initial=0) <= TOL[np.dtype(dtype)], err.max()


def _tree(parts):
    """Merge pairwise in a balanced tree (another order than one merge of all)."""
    while len(parts) > 1:
        parts = [P.merge(np.stack(parts[i:i + 2], axis=1)) if i + 1 < len(parts) else parts[i]
                 for i in range(0, len(parts), 2)]
    return parts[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lse_any_merge_order_matches_float64(dtype):
    x = _logits(dtype)
    parts = [P.stat_partials(c) for c in _chunks(x)]
    ref = sp_logsumexp(x.astype(np.float64), axis=1)
    all_at_once = P.lse(P.merge(np.stack(parts, axis=1)))
    right_fold = parts[-1]
    for p in parts[-2::-1]:
        right_fold = P.merge(np.stack([p, right_fold], axis=1))
    for merged in (all_at_once, P.lse(_tree(parts)), P.lse(right_fold)):
        _close(merged, ref, dtype)
    assert all_at_once[5] == -np.inf                   # all masked: -inf, never NaN


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("eps", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_finish_matches_float64(dtype, eps, weighted):
    x = _logits(dtype)
    C = x.shape[1]
    rng = np.random.default_rng(1)
    w = (rng.random(C) + 0.2).astype(dtype) if weighted else None
    t = np.array([5, 35, 39, 30, -100, 3, 17])
    parts = [P.ce_partials(c, lo, C, t, None if w is None else w[lo:hi], -100, eps)
             for c, lo, hi in zip(_chunks(x), EDGES[:-1], EDGES[1:])]
    loss = P.ce_finish(_tree(parts), C, eps)
    # float64 reference: (1 - eps) w_t (lse - x_t) + eps / C sum_c w_c (lse - x_c)
    x64 = x.astype(np.float64)
    w64 = np.ones(C) if w is None else w.astype(np.float64)
    lse = sp_logsumexp(x64, axis=1)
    with np.errstate(invalid="ignore"):
        ref = np.array([
            0.0 if t[i] == -100 else
            (1 - eps) * w64[t[i]] * (lse[i] - x64[i, t[i]])
            + (eps / C * np.sum(w64 * (lse[i] - x64[i])) if eps else 0.0)
            for i in range(len(t))])
    ref[5] = np.nan if eps else np.inf       # all masked: +inf, NaN once smoothing adds -inf - -inf
    _close(loss, ref, dtype)
    assert loss[4] == 0                       # ignored


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_probability_targets_and_gradient_match_float64(dtype):
    x = _logits(dtype)[[0, 3, 4, 6]]
    C = x.shape[1]
    rng = np.random.default_rng(2)
    p = rng.random(x.shape)
    p[np.isinf(x)] = 0                        # no mass on masked classes: finite losses
    p = (p / p.sum(axis=1, keepdims=True)).astype(dtype)
    eps = 0.1
    parts = [P.ce_partials(c, lo, C, pc, eps=eps, probs=True)
             for c, pc, lo in zip(_chunks(x), _chunks(p), EDGES[:-1])]
    merged = _tree(parts)
    g = np.array([1.0, 2.0, 0.5, 1.5], dtype)
    loss, coefs = P.ce_finish(merged, C, eps, probs=True, g=g)
    grad = np.concatenate([P.ce_grad_chunk(c, lo, C, pc, merged, coefs, eps=eps, probs=True)
                           for c, pc, lo in zip(_chunks(x), _chunks(p), EDGES[:-1])], axis=1)
    x64, p64 = x.astype(np.float64), (1 - eps) * p.astype(np.float64) + eps / C
    lse = sp_logsumexp(x64, axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        terms = np.where(p64 != 0, p64 * (lse - x64), 0.0)
    # eps > 0 puts mass on the masked classes of row 1: +inf, as in memory
    ref_loss = terms.sum(axis=1)
    _close(loss, ref_loss, dtype)
    soft = np.exp(x64 - lse)
    ref_grad = g[:, None] * (p64.sum(axis=1, keepdims=True) * soft - p64)
    finite = np.isfinite(ref_loss)
    _close(grad[finite], ref_grad[finite], dtype)
