"""fastce.dask against the in-memory fastce result on the same values: every option of
cross_entropy / cross_entropy_with_grad and the softmax family, chunkings from one class per
chunk to one chunk, ragged chunks, masked (-inf) classes spanning chunks, rows whose only finite
value sits in the last chunk; random chunkings (hypothesis); laziness, block sizes, bad input.

The in-memory functions are themselves tested against torch (test_cross_entropy.py,
test_softmax.py); here the Dask graph must reproduce them to 2e-6 (float32) / 1e-12 (float64),
relative to max(1, |value|), with infinities and NaNs at the same places.
"""
import subprocess
import sys

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
import dask  # noqa: E402
from dask.callbacks import Callback  # noqa: E402
from hypothesis import given, settings, strategies as st, HealthCheck  # noqa: E402

import fastce  # noqa: E402
import fastce.dask as fd  # noqa: E402

TOL = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-12}
DTYPES = [np.float32, np.float64]
N, C = 9, 23
CHUNKINGS = {
    "class-per-chunk": (4, 1),
    "ragged": ((2, 3, 4), (1, 4, 7, 10, 1)),
    "one-chunk": (N, C),
    "rows-only": ((5, 4), C),
}


@pytest.fixture(autouse=True, scope="module")
def _synchronous():
    # The graphs are tiny: the synchronous scheduler keeps the module fast on 2 shared cores.
    with dask.config.set(scheduler="synchronous"):
        yield


def assert_same(got, ref, dtype):
    """Same shape; NaN and +-inf at the same places; finite values within TOL relative to
    max(1, |ref|)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    fin = np.isfinite(ref)
    np.testing.assert_array_equal(got[~fin & ~np.isnan(ref)], ref[~fin & ~np.isnan(ref)])
    err = np.abs(got[fin] - ref[fin]) / np.maximum(1.0, np.abs(ref[fin]))
    assert err.size == 0 or err.max() <= TOL[np.dtype(dtype)], err.max()


def make_logits(dtype, masked, shape=(N, C), seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    if masked:
        x[1, :C - 3] = -np.inf         # finite only in the last classes (last chunk(s))
        x[2, :C - 1] = -np.inf         # the only finite value is the last class
        x[3, 3:13] = -np.inf           # a masked run spanning several chunks
        x[5, :] = -np.inf              # every class masked
        x[6, 8] = -np.inf              # the target's class is masked (loss +inf)
        x[7, 0] = np.float32(60)       # a large logit in the first chunk
    return x


def make_targets(masked, seed=1):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, C, N)
    if masked:
        t[1], t[2], t[3], t[6] = 21, C - 1, 15, 8
    return t


def make_probs(dtype, shape=(N, C), seed=2):
    rng = np.random.default_rng(seed)
    p = rng.random(shape)
    p[rng.random(shape) < 0.3] = 0          # zero coefficients (skip -inf logits)
    return (p / np.maximum(p.sum(axis=1, keepdims=True), 1e-9)).astype(dtype)


OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore_index": 5},
    "smooth": {"label_smoothing": 0.1},
    "all": {"weight": True, "ignore_index": 5, "label_smoothing": 0.25},
}


def _kw(opts, dtype, n_classes=C, seed=3):
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = (np.random.default_rng(seed).random(n_classes) + 0.1).astype(dtype)
    return kw


def _compare_ce(x, t, dtype, X, T, kw, grad_outputs):
    """Forward of all three reductions and the fused gradient, one dask.compute."""
    lazy, refs = [], []
    for red in ("none", "mean", "sum"):
        go = grad_outputs[red]
        lazy.append(fd.cross_entropy(X, T, reduction=red, **kw))
        lazy.extend(fd.cross_entropy_with_grad(X, T, reduction=red, grad_output=go, **kw))
        refs.append(fastce.cross_entropy(x, t, reduction=red, **kw))
        refs.extend(fastce.cross_entropy_with_grad(x, t, reduction=red, grad_output=go, **kw))
    assert all(isinstance(a, da.Array) for a in lazy)
    got = dask.compute(*lazy)
    for g, r, a in zip(got, refs, lazy):
        assert a.dtype == np.asarray(r).dtype and g.dtype == np.asarray(r).dtype
        assert_same(g, r, dtype)
    grad = lazy[2]
    assert grad.chunks == X.chunks    # the gradient comes back in the logits' own blocks


def _grad_outputs(loss_shape, dtype, seed=4):
    rng = np.random.default_rng(seed)
    return {"none": (rng.random(loss_shape) + 0.5).astype(dtype), "mean": 1.7, "sum": None}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("masked", [False, True], ids=["finite", "masked"])
@pytest.mark.parametrize("opt", OPTIONS)
def test_cross_entropy_index(dtype, chunking, masked, opt):
    x = make_logits(dtype, masked)
    t = make_targets(masked)
    if "ignore_index" in OPTIONS[opt]:
        t[[0, 4]] = 5
    X = da.from_array(x, chunks=CHUNKINGS[chunking])
    _compare_ce(x, t, dtype, X, t, _kw(OPTIONS[opt], dtype), _grad_outputs((N,), dtype))


PROB_OPTIONS = {k: v for k, v in OPTIONS.items() if "ignore_index" not in v}
PROB_OPTIONS["weight-smooth"] = {"weight": True, "label_smoothing": 0.25}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("masked", [False, True], ids=["finite", "masked"])
@pytest.mark.parametrize("opt", PROB_OPTIONS)
def test_cross_entropy_probs(dtype, chunking, masked, opt):
    x = make_logits(dtype, masked)
    p = make_probs(dtype)
    X = da.from_array(x, chunks=CHUNKINGS[chunking])
    P = da.from_array(p, chunks=((3, 6), (12, 11)))   # not the logits' chunks: rechunked
    _compare_ce(x, p, dtype, X, P, _kw(PROB_OPTIONS[opt], dtype), _grad_outputs((N,), dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("opt", ["plain", "all"])
def test_cross_entropy_kdim(dtype, probs, opt):
    shape = (4, 7, 3, 5)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) * 2).astype(dtype)
    x[1, 2:6, 1, :] = -np.inf                       # masked classes across class chunks
    X = da.from_array(x, chunks=((1, 3), (2, 1, 4), (2, 1), 5))
    kw = _kw(OPTIONS[opt], dtype, n_classes=7)
    if probs:
        kw.pop("ignore_index", None)
        t = rng.random(shape).astype(dtype)
        T = da.from_array(t, chunks=(2, 7, 3, (1, 4)))
    else:
        t = rng.integers(0, 7, (4, 3, 5))
        t[0, 0, :2] = kw.get("ignore_index", -100)
        T = da.from_array(t, chunks=((3, 1), 1, (2, 3)))   # misaligned with the logits
    _compare_ce(x, t, dtype, X, T, kw, _grad_outputs((4, 3, 5), dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_1d(dtype):
    x = make_logits(dtype, True)[1]                 # (C,): finite in the last classes only
    X = da.from_array(x, chunks=5)
    _compare_ce(x, np.int64(21), dtype, X, np.int64(21), {"label_smoothing": 0.0},
                {"none": dtype(0.5), "mean": 2.0, "sum": None})
    p = make_probs(dtype)[0]
    _compare_ce(x, p, dtype, X, p, {"label_smoothing": 0.2},
                {"none": dtype(0.5), "mean": 2.0, "sum": None})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunking", CHUNKINGS)
@pytest.mark.parametrize("masked", [False, True], ids=["finite", "masked"])
def test_softmax_family(dtype, chunking, masked):
    x = make_logits(dtype, masked)
    X = da.from_array(x, chunks=CHUNKINGS[chunking])
    ops = [(fd.logsumexp, fastce.logsumexp), (fd.log_softmax, fastce.log_softmax),
           (fd.softmax, fastce.softmax)]
    lazy, refs = [], []
    for axis in (-1, 0):
        for f_dask, f_mem in ops:
            lazy.append(f_dask(X, axis=axis))
            refs.append(f_mem(x, axis=axis))
    for g, r in zip(dask.compute(*lazy), refs):
        assert g.dtype == r.dtype
        assert_same(g, r, dtype)


def test_softmax_family_kdim_and_float16():
    rng = np.random.default_rng(6)
    x = (rng.standard_normal((3, 10, 4, 2)) * 4).astype(np.float32)
    x[0, :7, 1, 0] = -np.inf
    X = da.from_array(x, chunks=(2, (3, 3, 4), 3, 1))
    for f_dask, f_mem in [(fd.logsumexp, fastce.logsumexp), (fd.log_softmax, fastce.log_softmax),
                          (fd.softmax, fastce.softmax)]:
        for axis in (1, -2, 3):
            out = f_dask(X, axis=axis)
            assert_same(out.compute(), f_mem(x, axis=axis), np.float32)
        # float16 is computed in float32 and cast back, as in memory
        h = x.astype(np.float16)
        got = f_dask(da.from_array(h, chunks=(2, 3, 3, 1)), axis=1).compute()
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, f_mem(h, axis=1))


# ---------------------------------------------------------------------------------------------
# random chunkings


def _cuts(draw, n, max_chunks):
    k = draw(st.integers(1, min(n, max_chunks)))
    inner = sorted(draw(st.sets(st.integers(1, n - 1), min_size=k - 1, max_size=k - 1))) \
        if n > 1 else []
    edges = [0] + inner + [n]
    return tuple(b - a for a, b in zip(edges[:-1], edges[1:]))


@st.composite
def chunkings(draw):
    return (_cuts(draw, N, 4), _cuts(draw, C, C))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=chunkings(), split_every=st.sampled_from([None, 2, 3]),
       dtype=st.sampled_from(DTYPES), masked=st.booleans())
def test_random_chunkings(chunks, split_every, dtype, masked):
    x = make_logits(dtype, masked)
    t = make_targets(masked)
    t[0] = -100
    w = (np.random.default_rng(7).random(C) + 0.1).astype(dtype)
    X = da.from_array(x, chunks=chunks)
    kw = dict(weight=w, label_smoothing=0.15, reduction="none")
    p = make_probs(dtype)
    lazy = [fd.logsumexp(X, split_every=split_every),
            *fd.cross_entropy_with_grad(X, t, split_every=split_every, **kw),
            *fd.cross_entropy_with_grad(X, p, split_every=split_every, **kw)]
    refs = [fastce.logsumexp(x), *fastce.cross_entropy_with_grad(x, t, **kw),
            *fastce.cross_entropy_with_grad(x, p, **kw)]
    for g, r in zip(dask.compute(*lazy), refs):
        assert_same(g, r, dtype)


# ---------------------------------------------------------------------------------------------
# laziness and block sizes


class _WidestResult(Callback):
    """Records the most classes (last axis) of any 2-D or wider array a task returned, but for
    the final gathering of a computed output ("finalize" tasks)."""

    def __init__(self):
        super().__init__()
        self.widest = 0

    def _posttask(self, key, result, dsk, state, worker_id):
        name = key[0] if isinstance(key, tuple) else key
        if isinstance(result, np.ndarray) and result.ndim >= 2 and \
                not str(name).startswith("finalize"):
            self.widest = max(self.widest, result.shape[-1])


def test_lazy_and_never_a_full_row():
    x = make_logits(np.float64, False, shape=(8, 400))

    def block(block_info=None):     # logits made block by block: no task holds them whole
        (r0, r1), (c0, c1) = block_info[None]["array-location"]
        return x[r0:r1, c0:c1].copy()

    X = da.map_blocks(block, chunks=((4, 4), (50,) * 8), dtype=x.dtype)
    w = np.linspace(0.5, 1.5, 400)
    t = np.arange(8) * 37

    def refuse(*args, **kwargs):
        raise AssertionError("computed at call time")

    with dask.config.set(scheduler=refuse):
        lazy = [fd.logsumexp(X), fd.softmax(X), fd.log_softmax(X),
                fd.cross_entropy(X, t, weight=w, label_smoothing=0.1),
                *fd.cross_entropy_with_grad(X, t, weight=w, label_smoothing=0.1)]
    with _WidestResult() as cb:
        got = dask.compute(*lazy)
    # No task ever returned more than one block's 50 classes of a row: no row gathered whole.
    assert cb.widest == 50
    refs = [fastce.logsumexp(x), fastce.softmax(x), fastce.log_softmax(x),
            fastce.cross_entropy(x, t, weight=w, label_smoothing=0.1),
            *fastce.cross_entropy_with_grad(x, t, weight=w, label_smoothing=0.1)]
    for g, r in zip(got, refs):
        assert_same(g, r, np.float64)


def test_import_fastce_does_not_import_dask():
    code = "import sys, fastce; fastce.cross_entropy([[0.0, 1.0]], [1]); " \
           "assert 'dask' not in sys.modules, 'dask imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------
# bad input


def test_target_chunks_not_aligned_are_rechunked():
    x = make_logits(np.float32, False)
    t = make_targets(False)
    X = da.from_array(x, chunks=((2, 3, 4), 5))
    T = da.from_array(t, chunks=((4, 4, 1),))
    W = da.from_array(np.linspace(0.1, 2, C).astype(np.float32), chunks=7)
    got = fd.cross_entropy(X, T, weight=W, reduction="none").compute()
    assert_same(got, fastce.cross_entropy(x, t, weight=np.linspace(0.1, 2, C).astype(np.float32),
                                          reduction="none"), np.float32)


def _unknown_chunks(a):
    d = da.from_array(a, chunks=3)
    return d[d[(slice(None),) + (0,) * (a.ndim - 1)] > -np.inf] if a.ndim > 1 else d[d > -1]


def test_unknown_chunk_sizes_name_the_argument():
    x = make_logits(np.float32, False)
    t = make_targets(False)
    with pytest.raises(ValueError, match=r"logits has unknown chunk sizes.*compute_chunk_sizes"):
        fd.cross_entropy(_unknown_chunks(x), t)
    with pytest.raises(ValueError, match=r"x has unknown chunk sizes along axis 0"):
        fd.logsumexp(_unknown_chunks(x))
    X = da.from_array(x, chunks=3)
    T = _unknown_chunks(t)
    with pytest.raises(ValueError, match=r"(target has unknown chunk sizes|target of class)"):
        fd.cross_entropy(X, T)


def _messages(f_mem, f_dask, *args, **kw):
    with pytest.raises(Exception) as mem:
        f_mem(*args, **kw)
    dargs = [da.from_array(np.asarray(a)) if isinstance(a, np.ndarray) else a for a in args]
    with pytest.raises(Exception) as lazy:
        f_dask(*dargs, **kw)
    assert type(lazy.value) is type(mem.value)
    assert str(lazy.value) == str(mem.value)


@pytest.mark.parametrize("case", [
    dict(t=np.zeros(8, np.int64)),                                     # wrong target shape
    dict(t=np.zeros((N, C), np.float64)),                              # probs of another dtype
    dict(t=np.zeros(N, bool)),                                         # bool target
    dict(kw=dict(weight=np.ones(C - 1, np.float32))),                  # weight length
    dict(kw=dict(reduction="avg")),
    dict(kw=dict(label_smoothing=1.5)),
    dict(kw=dict(ignore_index=1.0)),
    dict(x=np.zeros((N, 0), np.float32), t=np.zeros(N, np.int64)),     # no classes
    dict(x=np.zeros((N, C), bool)),                                    # bool logits
    dict(x=np.zeros((N, C), np.int32)),                                # integer logits
])
def test_bad_arguments_same_errors_as_in_memory(case):
    x = case.get("x", np.zeros((N, C), np.float32))
    t = case.get("t", np.zeros(N, np.int64))
    _messages(fastce.cross_entropy, fd.cross_entropy, x, t, **case.get("kw", {}))


def test_bad_axis_and_dtype_same_errors_as_in_memory():
    x = np.zeros((3, 4), np.float32)
    _messages(fastce.logsumexp, fd.logsumexp, x, axis=2)
    _messages(fastce.softmax, fd.softmax, x, axis=1.0)
    _messages(fastce.log_softmax, fd.log_softmax, x.astype(bool))
    _messages(fastce.logsumexp, fd.logsumexp, x.astype(np.int64))


def test_bad_grad_output_same_errors_as_in_memory():
    x = np.zeros((N, C), np.float32)
    t = np.zeros(N, np.int64)
    _messages(fastce.cross_entropy_with_grad, fd.cross_entropy_with_grad, x, t,
              reduction="none", grad_output=np.ones(N + 1, np.float32))
    _messages(fastce.cross_entropy_with_grad, fd.cross_entropy_with_grad, x, t,
              reduction="mean", grad_output=np.ones(2, np.float32))


def test_bad_target_values_raise_when_computed():
    x = make_logits(np.float32, False)
    t = make_targets(False)
    t[6] = C
    X = da.from_array(x, chunks=(4, 5))
    T = da.from_array(t, chunks=4)
    with pytest.raises(IndexError) as mem:
        fastce.cross_entropy(x, t)
    lazy = fd.cross_entropy(X, T)                    # building the graph does not check data
    with pytest.raises(IndexError) as got:
        lazy.compute()
    assert str(got.value) == str(mem.value)          # same message, same position (6,)
    p = make_probs(np.float32)
    p[7, 11] = -0.5
    with pytest.raises(ValueError) as mem:
        fastce.cross_entropy(x, p)
    with pytest.raises(ValueError) as got:
        fd.cross_entropy(X, da.from_array(p, chunks=(4, 5))).compute()
    assert str(got.value) == str(mem.value)
