"""logsumexp / log_softmax / softmax against torch: every axis of 1-D..4-D inputs, both
dtypes, every memory layout, the serial, parallel and split-row kernels."""
import numpy as np
import pytest

import fastce

pytest.importorskip("torch")
from conftest import DTYPES, LAYOUTS, assert_close, make_layout, t64, torch, unchanged

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
