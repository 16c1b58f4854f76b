"""logsumexp / log_softmax / softmax against torch: every axis of 1-D..4-D inputs, both
dtypes, every memory layout, the serial, parallel and split-row kernels, and the numerical
corners (masked rows, +inf, NaN, huge and denormal logits) against torch and mpmath."""
import numpy as np
import pytest

import fastce

pytest.importorskip("torch")
from helpers import (DTYPES, INF, LAYOUTS, NAN, NINF, assert_close, lse_mp, make_layout, t64,
                     torch, unchanged)

FUNCS = {
    "logsumexp": (fastce.logsumexp, lambda x, d: torch.logsumexp(x, dim=d)),
    "log_softmax": (fastce.log_softmax, lambda x, d: torch.log_softmax(x, dim=d)),
    "softmax": (fastce.softmax, lambda x, d: torch.softmax(x, dim=d)),
}
SHAPES = [(7,), (5, 9), (3, 4, 6), (2, 3, 4, 5)]


def _cases():
    for shape in SHAPES:
        for axis in range(-len(shape), len(shape)):
            yield shape, axis


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", list(_cases()))
@pytest.mark.parametrize("name", FUNCS)
def test_every_axis_vs_torch(name, shape, axis, dtype, rng):
    ours, ref = FUNCS[name]
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    with unchanged(x):
        got = ours(x, axis=axis)
    want = ref(t64(x), axis).numpy()
    assert np.asarray(got).dtype == dtype
    assert_close(got, want)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("name", FUNCS)
def test_layouts(name, axis, layout, rng):
    ours, ref = FUNCS[name]
    base = rng.standard_normal((6, 5, 4)).astype(np.float32)
    x = make_layout(base, layout)
    with unchanged(x, base):
        got = ours(x, axis=axis)
    assert_close(got, ref(t64(base), axis).numpy())


def test_default_axis_is_last(rng):
    x = rng.standard_normal((3, 4, 5))
    assert_close(fastce.log_softmax(x), torch.log_softmax(t64(x), -1).numpy())
    assert_close(fastce.softmax(x), torch.softmax(t64(x), -1).numpy())
    assert_close(fastce.logsumexp(x), torch.logsumexp(t64(x), -1).numpy())


def test_logsumexp_1d_returns_scalar():
    out = fastce.logsumexp(np.array([1000.0, 1000.0]))
    assert np.ndim(out) == 0 and isinstance(out, np.float64)
    assert out == pytest.approx(1000.0 + np.log(2.0), rel=1e-15)


# Sizes that select the parallel kernels, and few long rows that select the split-row path.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((300, 257), 1), ((2, 70000), 1), ((1, 40000), -1),
                                        ((64, 9, 130), 1), ((9, 40, 200), 0)])
@pytest.mark.parametrize("name", FUNCS)
def test_parallel_and_split_paths(name, shape, axis, dtype, rng):
    ours, ref = FUNCS[name]
    x = (rng.standard_normal(shape) * 4).astype(dtype)
    got = ours(x, axis=axis)
    assert_close(got, ref(t64(x), axis).numpy())


@pytest.mark.parametrize("dtype", [np.float16, np.dtype(">f4"), np.dtype(">f8")])
def test_other_float_dtypes(dtype, rng):
    x = rng.standard_normal((4, 6)).astype(dtype)
    got = fastce.log_softmax(x)
    assert got.dtype == np.dtype(dtype).newbyteorder("=")
    want = torch.log_softmax(t64(x.astype(np.float64)), -1).numpy()
    np.testing.assert_allclose(got.astype(np.float64), want,
                               rtol=2e-3 if np.dtype(dtype).itemsize == 2 else
                               (2e-5 if np.dtype(dtype).itemsize == 4 else 1e-11), atol=1e-6)


def test_list_input():
    assert_close(fastce.softmax([[0.0, 0.0]]), np.array([[0.5, 0.5]]))


def test_empty_axes():
    x = np.zeros((0, 5), np.float32)
    assert fastce.softmax(x).shape == (0, 5)
    assert fastce.logsumexp(x).shape == (0,)
    # An empty class axis: logsumexp of nothing is -inf (torch agrees).
    e = np.zeros((3, 0))
    np.testing.assert_array_equal(fastce.logsumexp(e), torch.logsumexp(t64(e), -1).numpy())
    assert fastce.log_softmax(e).shape == (3, 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_properties_identity(dtype, rng):
    x = (rng.standard_normal((20, 33)) * 10).astype(dtype)
    lse = fastce.logsumexp(x, axis=1)
    assert_close(fastce.log_softmax(x, axis=1), x - lse[:, None], scale=10)
    assert_close(fastce.softmax(x, axis=1).sum(axis=1), np.ones(20, dtype))


@pytest.mark.parametrize("bad_axis", [2, -3, 1.0, "1", None, True])
def test_axis_errors(bad_axis):
    x = np.zeros((2, 3))
    with pytest.raises((TypeError, ValueError, IndexError), match="axis"):
        fastce.softmax(x, axis=bad_axis)


@pytest.mark.parametrize("bad", [np.zeros((2, 3), np.int64), np.zeros(3, bool),
                                 np.zeros(3, complex), np.array(["a"]), np.zeros(2, object)])
def test_dtype_errors(bad):
    for f in (fastce.logsumexp, fastce.log_softmax, fastce.softmax):
        with pytest.raises(TypeError, match="x"):
            f(bad)


def test_0d_error():
    for f in (fastce.logsumexp, fastce.log_softmax, fastce.softmax):
        with pytest.raises(ValueError, match="x must have at least 1 dimension"):
            f(np.float64(1.0))


# ---------------------------------------------------------------------------------------------
# numerical corners (docs/semantics.md): -inf (masked), +inf and NaN logits, extreme magnitudes

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4, 6), (2, 6, 3)])
def test_partially_masked_rows_match_torch(shape, dtype, rng):
    x = rng.standard_normal(shape).astype(dtype)
    x[:, 0] = NINF
    x[:, 3] = NINF
    for f, ref in ((fastce.log_softmax, torch.log_softmax), (fastce.softmax, torch.softmax)):
        assert_close(f(x, axis=1), ref(t64(x), 1).numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 5), (300, 257), (1, 40000)])
def test_fully_masked_rows(shape, dtype):
    """logsumexp = -inf (torch too); softmax/log_softmax = NaN like torch (the loss: see
    test_cross_entropy.py)."""
    x = np.zeros(shape, dtype)
    x[0] = NINF
    lse = fastce.logsumexp(x)
    assert lse[0] == NINF and np.all(np.isfinite(lse[1:]))
    assert torch.logsumexp(t64(x), -1)[0] == NINF
    for f in (fastce.log_softmax, fastce.softmax):
        out = f(x)
        assert np.all(np.isnan(out[0])) and not np.any(np.isnan(out[1:]))


def test_fully_masked_kdim():
    x = np.zeros((2, 3, 4))
    x[1, :, 2] = NINF
    lse = fastce.logsumexp(x, axis=1)
    assert lse[1, 2] == NINF and np.isfinite(np.delete(lse.ravel(), 6)).all()


def test_split_row_merge_never_nan():
    """Few long rows are cut into chunks whose (max, sum) partials are merged: a chunk that
    is entirely -inf must not produce exp(-inf - (-inf)) = NaN (flash-attn #1930)."""
    C = 80000
    x = np.full((1, C), NINF, np.float32)
    x[0, -5:] = np.arange(5, dtype=np.float32)
    ref = lse_mp(np.arange(5))
    assert fastce.logsumexp(x)[0] == pytest.approx(ref, rel=1e-6)
    x2 = x[:, ::-1].copy()                         # the -inf chunk last
    assert fastce.logsumexp(x2)[0] == pytest.approx(ref, rel=1e-6)
    p = fastce.softmax(x2)
    assert not np.any(np.isnan(p)) and p.sum() == pytest.approx(1, rel=1e-6)


def test_plus_inf_logits():
    """Decided: a +inf logit never gives a finite-looking row.
    logsumexp = +inf (torch too); softmax is NaN at the +inf entries (the rest of the row is
    NaN as in torch, or its 0 limit); log_softmax is NaN at the +inf entries and -inf (its
    limit) or NaN elsewhere."""
    x = np.array([[INF, 1.0, 2.0], [0.0, 1.0, 2.0]])
    lse = fastce.logsumexp(x)
    assert lse[0] == INF and torch.logsumexp(t64(x), -1)[0] == INF
    ls = fastce.log_softmax(x)
    assert np.isnan(ls[0, 0]) and not np.any(np.isfinite(ls[0]))
    sm = fastce.softmax(x)
    assert np.isnan(sm[0, 0]) and np.all(np.isnan(sm[0, 1:]) | (sm[0, 1:] == 0))
    assert_close(ls[1], torch.log_softmax(t64(x), -1)[1].numpy())
    assert_close(sm[1], torch.softmax(t64(x), -1)[1].numpy())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", [((4, 7), 1), ((300, 257), 1), ((1, 40000), 1),
                                        ((3, 7, 5), 1), ((60, 9, 130), 1)])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_nan_logits_propagate(where, shape, axis, dtype, rng):
    """A NaN logit makes its whole row NaN in every output, in every kernel path; never
    silently dropped (torch agrees)."""
    x = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    c = {"first": 0, "middle": C // 2, "last": C - 1}[where]
    idx = [0] * len(shape)
    idx[axis] = c
    x[tuple(idx)] = NAN
    row = tuple(slice(None) if d == axis else 0 for d in range(len(shape)))
    assert np.isnan(fastce.logsumexp(x, axis=axis).flat[0])
    for f in (fastce.log_softmax, fastce.softmax):
        out = f(x, axis=axis)
        assert np.all(np.isnan(out[row]))
        assert np.isnan(out).sum() == C


@pytest.mark.parametrize("dtype,big", [(np.float32, 1e4), (np.float64, 1e300),
                                       (np.float32, 3.0e38), (np.float64, 1.7e308)])
def test_huge_logits_do_not_overflow(dtype, big):
    x = np.array([[big, 0.0, -big], [-big, -big, -big], [big, big, 0.0],
                  [big, big * 0.5, big * 0.25]], dtype)
    lse = fastce.logsumexp(x)
    ref = np.array([lse_mp(r) for r in x.astype(np.float64)])
    assert np.all(np.isfinite(lse))
    np.testing.assert_allclose(lse.astype(np.float64), ref, rtol=1e-6)
    ls = fastce.log_softmax(x)
    assert ls[0, 0] == 0 and ls[2, 2] == pytest.approx(-big - np.log(2), rel=1e-6)
    p = fastce.softmax(x)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(1), 1, rtol=1e-6)
    assert_close(p, torch.softmax(t64(x), -1).numpy(), dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_denormals(dtype, rng):
    tiny = np.finfo(dtype).smallest_subnormal
    x = np.array([[tiny, -tiny, 0.0], [0.0, -100.0, -110.0 if dtype == np.float32 else -740.0]],
                 dtype)
    assert_close(fastce.log_softmax(x), torch.log_softmax(t64(x), -1).numpy())
    p = fastce.softmax(x)
    ref = torch.softmax(t64(x), -1).numpy()
    np.testing.assert_allclose(p.astype(np.float64), ref, rtol=1e-5,
                               atol=4 * float(np.finfo(dtype).tiny))


def test_outputs_never_alias_inputs(rng):
    """No function writes into caller memory or returns a view of it."""
    x = rng.standard_normal((4, 5))
    for o in (fastce.log_softmax(x), fastce.softmax(x), fastce.logsumexp(x)):
        assert not np.shares_memory(o, x)
