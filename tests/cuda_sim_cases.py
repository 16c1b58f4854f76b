"""fastce's CUDA kernels in Numba's CUDA simulator, against the CPU kernels and torch.

Not collected by a plain ``pytest`` run (the name does not start with ``test_``): the simulator
must be switched on before numba is first imported, so ``tests/test_cuda_sim.py`` runs this
file in a subprocess with ``NUMBA_ENABLE_CUDASIM=1``.  To run it directly::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda_sim_cases.py

On a machine with a GPU, ``python -m pytest tests/cuda_sim_cases.py`` (simulator off) runs
the same cases on the real, warp-shuffle kernels, plus the cases marked ``real_gpu`` (torch
tensors and streams, default launch sizes, large inputs).

The simulator runs one Python thread per GPU thread, so every case uses a tiny grid: blocks
of 32 threads (64 where the cross-warp reduction is under test) and a few rows.  The launch
knobs in ``fastce._config`` are lowered so that tiny inputs take every kernel path (sub-warp,
warp/block and thread-per-row groups, split rows); each case asserts the path it meant to
take, so a change of heuristics cannot silently leave a path untested.
"""
import sys
import threading
import time

import mpmath
import numpy as np
import pytest
from numba import config

from numba import cuda  # noqa: E402

SIM = bool(config.ENABLE_CUDASIM)
if not SIM and not cuda.is_available():
    raise RuntimeError("tests/cuda_sim_cases.py needs NUMBA_ENABLE_CUDASIM=1 set before numba "
                       "is imported (tests/test_cuda_sim.py runs it that way), or a GPU")


def _lock_simulator_shared_arrays():
    """Make the simulator's ``cuda.shared.array`` one array per call site and launch.

    numba-cuda's simulator (0.30.4) allocates a shared array on a thread's first call by an
    unlocked look-up-then-insert in a dict keyed by the calling line.  Its threads are
    Python threads: one preempted between the look-up and the insert lets another allocate
    too, and the two groups of threads then write and read different arrays, so a
    reduction reads uninitialized values after its barrier (a float32 1-d cross-entropy's
    loss once came out -4.8e-31, about one launch in 10^4-10^5).  The look-up and the
    insert are done here under one lock.  A bug of the simulator, not of the kernels: a
    real GPU has one shared array per block."""
    from numba.cuda.simulator import kernelapi
    cls = kernelapi.FakeCUDAShared
    original = cls.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory / unsupported
            return original(self, shape, dtype, alignment)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)  # the simulator's own key
        with lock:
            res = self._allocations.get(key)
            if res is None:
                if isinstance(dtype, kernelapi.types.Type):
                    dtype = kernelapi.numpy_support.as_dtype(dtype)
                res = self._allocations[key] = np.empty(shape, dtype)
        return res

    cls.array = array


if SIM:
    _lock_simulator_shared_arrays()

import fastce  # noqa: E402
import fastce.cuda as fc  # noqa: E402
from fastce import _config  # noqa: E402
from fastce.cuda import _impl  # noqa: E402

torch = pytest.importorskip("torch")
F = torch.nn.functional

# The simulator evaluates inf - inf etc. on NumPy scalars, which warn.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

DTYPES = [np.float32, np.float64]
TOL = {np.dtype(np.float32): dict(rtol=2e-5, atol=2e-6),
       np.dtype(np.float64): dict(rtol=1e-11, atol=1e-13)}
HALF_TOL = dict(rtol=2e-3, atol=2e-3)


@pytest.fixture(autouse=True)
def tiny_launches(monkeypatch):
    monkeypatch.setattr(_config, "CUDA_THREADS_PER_BLOCK", 32)
    monkeypatch.setattr(_config, "CUDA_SMALL_C", 8)
    monkeypatch.setattr(_config, "CUDA_THREAD_ROW_MAX_C", 8)
    monkeypatch.setattr(_config, "CUDA_SPLIT_MIN_CHUNK", 16)
    monkeypatch.setattr(_config, "CUDA_SPLIT_TARGET_BLOCKS", 0)


def use_path(monkeypatch, path):
    """Apply a layout's launch settings."""
    if path in ("block2warps",):
        monkeypatch.setattr(_config, "CUDA_THREADS_PER_BLOCK", 64)
    if path == "split":
        monkeypatch.setattr(_config, "CUDA_SPLIT_TARGET_BLOCKS", 4)


def check_plan(rows, C, S, expect_G, expect_split, allow_split=True):
    G, n_split, _, tpb = _impl.plan(rows, C, S, allow_split)
    G = "block" if (G == tpb and G > 32) else G
    assert (G, n_split) == (expect_G, expect_split), "the case no longer takes its path"


def dev(a):
    return cuda.to_device(np.asarray(a, order="C"))


def permuted(d, axes):
    """A view of the device array ``d`` with its axes permuted (no copy: Numba's own
    ``.T`` / ``.transpose`` copy on a real GPU, and refuse more than two dimensions)."""
    v = _impl._as_view(d)
    return _impl._strided_view(v, [v.shape[i] for i in axes], [v.strides[i] for i in axes])


def host(d):
    assert not isinstance(d, np.ndarray), "fastce.cuda must return device arrays"
    return np.asarray(d.copy_to_host())


def close(actual, expected, dtype, **kw):
    t = dict(TOL[np.dtype(dtype)], **kw)
    np.testing.assert_allclose(actual, expected, equal_nan=True, **t)


def outcome(fn):
    try:
        return fn(), None
    except Exception as exc:  # compared below: type and message
        return None, exc


def same_outcome(cpu_fn, gpu_fn, dtype):
    """Both raise the same exception type with the same message, or both return close
    values."""
    want, want_exc = outcome(cpu_fn)
    got, got_exc = outcome(gpu_fn)
    if want_exc is not None or got_exc is not None:
        assert type(got_exc) is type(want_exc), (want_exc, got_exc)
        assert str(got_exc) == str(want_exc)
        return want_exc
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    for g, w in zip(got, want):
        close(host(g), w, dtype)
    return None


# ---------------------------------------------------------------------------------------------
# the simulator itself

@cuda.jit
def _shared_sum_kernel(out):
    """Every thread writes its slot of a shared array, then reads all of them."""
    sa = cuda.shared.array(32, np.float64)
    t = cuda.threadIdx.x
    sa[t] = t + 1.0
    cuda.syncthreads()
    acc = 0.0
    for j in range(32):
        acc += sa[j]
    out[t] = acc


@pytest.mark.skipif(not SIM, reason="a workaround of the simulator")
def test_simulator_shared_arrays_one_per_block(monkeypatch):
    """All threads of a block see one shared array even when the first threads to call
    ``cuda.shared.array`` are preempted between its look-up and its insert (see
    ``_lock_simulator_shared_arrays``): a sleep after the look-up makes that certain (unlocked,
    most threads of the launch sum an array of their own)."""
    from numba.cuda.simulator import kernelapi

    class SlowLookup(dict):
        def get(self, key, default=None):
            found = dict.get(self, key, default)
            time.sleep(0.005)  # lets the other threads run to the same call
            return found

    init = kernelapi.FakeCUDAShared.__init__

    def slow_init(self, dynshared_size):
        init(self, dynshared_size)
        self._allocations = SlowLookup()

    monkeypatch.setattr(kernelapi.FakeCUDAShared, "__init__", slow_init)
    out = np.zeros(32)
    _shared_sum_kernel[1, 32](out)
    np.testing.assert_array_equal(out, np.full(32, 32 * 33 / 2))
    # fastce's own block reduction (the warp all-reduce's shared twin) under the same stress
    K = _impl.kernels(np.float64)
    vals = np.arange(1.0, 33.0)
    total = np.zeros(1)
    K.sum_kernel[1, 32](vals, total, _impl.SUM_TOTAL, np.zeros(0), 0.0)
    assert total[0] == 32 * 33 / 2


# ---------------------------------------------------------------------------------------------
# softmax family

# name: (shape, axis, expected group size, expected chunks per row)
SOFTMAX_LAYOUTS = {
    "subwarp": ((3, 5), -1, 8, 1),
    "block": ((2, 40), -1, 32, 1),
    "block2warps": ((2, 70), -1, "block", 1),
    "split": ((1, 70), -1, 32, 4),
    "kdim_thread": ((2, 5, 3), 1, 1, 1),
    "kdim_block": ((2, 12, 3), 1, 32, 1),
    "kdim_wide": ((2, 12, 40), 1, 1, 1),
    "axis0": ((9, 4), 0, 32, 1),
}
SOFTMAX_FNS = ["logsumexp", "log_softmax", "softmax"]


def _softmax_case(monkeypatch, path, dtype, seed=0):
    shape, axis, G, n_split = SOFTMAX_LAYOUTS[path]
    use_path(monkeypatch, path)
    N, C, S = fastce._validate.split_at_axis(shape, axis % len(shape))
    check_plan(N * S, C, S, G, n_split)
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype) * 3, axis


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", list(SOFTMAX_LAYOUTS))
@pytest.mark.parametrize("fn", SOFTMAX_FNS)
def test_softmax_family(monkeypatch, fn, path, dtype):
    x, axis = _softmax_case(monkeypatch, path, dtype)
    got = host(getattr(fc, fn)(dev(x), axis=axis))
    close(got, getattr(fastce, fn)(x, axis=axis), dtype)
    xt = torch.from_numpy(x.astype(np.float64))
    ref = {"logsumexp": torch.logsumexp, "log_softmax": torch.log_softmax,
           "softmax": torch.softmax}[fn](xt, axis).numpy()
    close(got, ref, np.float32 if dtype == np.float32 else np.float64)
    assert got.dtype == dtype


def _mask_rows(xm, target=None):
    """Write special values into the rows ``xm[..., :]`` (a view): row 0 all -inf, row 1
    -inf off the target, row 2 -inf on the target, row 3 one +inf, row 4 one NaN."""
    rows = list(np.ndindex(xm.shape[:-1]))
    C = xm.shape[-1]
    t = np.zeros(len(rows), np.int64) if target is None else target.reshape(-1)
    specials = [lambda r, i: r.fill(-np.inf),
                lambda r, i: r.__setitem__((t[i] + 1) % C, -np.inf),
                lambda r, i: r.__setitem__(t[i], -np.inf),
                lambda r, i: r.__setitem__(0, np.inf),
                lambda r, i: r.__setitem__(C - 1, np.nan)]
    for i, (row, special) in enumerate(zip(rows, specials)):
        special(xm[row], i)


@pytest.mark.parametrize("path", ["subwarp", "block", "split", "kdim_thread"])
def test_softmax_family_special_values(monkeypatch, path):
    """-inf rows give logsumexp -inf (softmax NaN), +inf gives +inf, NaN propagates; the same
    values as the CPU kernels."""
    x, axis = _softmax_case(monkeypatch, path, np.float32)
    _mask_rows(np.moveaxis(x, axis, -1))
    for fn in SOFTMAX_FNS:
        close(host(getattr(fc, fn)(dev(x), axis=axis)), getattr(fastce, fn)(x, axis=axis),
              np.float32)


def test_softmax_family_float16_and_layouts(monkeypatch):
    """float16 is computed in float32 and returned as float16; a transposed (Fortran-order)
    input is read in place; a permuted 4-D input goes through the strided copy."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 20)).astype(np.float16)
    got = fc.log_softmax(dev(x))
    assert got.dtype == np.float16
    np.testing.assert_allclose(host(got).astype(np.float32),
                               fastce.log_softmax(x).astype(np.float32), **HALF_TOL)
    xf = rng.standard_normal((20, 3)).astype(np.float32)
    d = permuted(dev(xf), (1, 0))
    assert not _impl._is_c_contig(d)
    close(host(fc.softmax(d)), fastce.softmax(xf.T), np.float32)
    x4 = rng.standard_normal((2, 3, 4, 5)).astype(np.float64)
    d4 = permuted(dev(x4), (0, 2, 1, 3))
    assert _impl._grouped_view(d4, (0, 1, 2, 4)) is None  # really takes the copy
    close(host(fc.logsumexp(d4, axis=1)), fastce.logsumexp(x4.transpose(0, 2, 1, 3), axis=1),
          np.float64)


def test_softmax_family_empty_and_errors():
    x = np.zeros((3, 0), np.float32)
    close(host(fc.logsumexp(dev(x))), fastce.logsumexp(x), np.float32)
    assert host(fc.softmax(dev(np.zeros((0, 4), np.float64)))).shape == (0, 4)
    one = host(fc.logsumexp(dev(np.array([1.0, 2.0], np.float32))))
    assert one.shape == ()
    close(one, fastce.logsumexp(np.array([1.0, 2.0], np.float32)), np.float32)
    for fn in SOFTMAX_FNS:
        for bad in (dict(x=np.zeros((2, 3), np.float32), axis=2),
                    dict(x=np.zeros((2, 3), np.int32), axis=-1),
                    dict(x=np.zeros((2, 3), np.bool_), axis=-1)):
            same_outcome(lambda: getattr(fastce, fn)(bad["x"], axis=bad["axis"]),
                         lambda: getattr(fc, fn)(dev(bad["x"]), axis=bad["axis"]), np.float32)
    with pytest.raises(NotImplementedError, match="negative strides"):
        fc.softmax(dev(np.zeros((2, 3), np.float32))[:, ::-1])


# ---------------------------------------------------------------------------------------------
# cross-entropy

# name: (logits shape, expected group size, expected chunks per row)
CE_LAYOUTS = {
    "1d": ((5,), 8, 1),
    "subwarp": ((4, 6), 8, 1),
    "block": ((3, 40), 32, 1),
    "block2warps": ((2, 70), "block", 1),
    "split": ((2, 70), 32, 2),
    "kdim_thread": ((2, 5, 3), 1, 1),
    "kdim_block": ((2, 12, 3), 32, 1),
    "kdim_wide": ((2, 4, 40), 1, 1),
    "kdim_4d": ((2, 5, 2, 3), 1, 1),
}

# name: (weight, some targets ignored, label_smoothing, reduction, grad_output kind)
CE_OPTIONS = {
    "mean": (False, False, 0.0, "mean", None),
    "weight_ignore_mean": (True, True, 0.0, "mean", None),
    "smooth_weight_sum": (True, False, 0.2, "sum", "host"),
    "smooth_ignore_none": (False, True, 0.1, "none", "device"),
    "smooth_mean_devscalar": (False, False, 0.3, "mean", "device"),
}


def _ce_case(monkeypatch, path, dtype, option, probs=False, seed=0):
    shape, G, n_split = CE_LAYOUTS[path]
    use_path(monkeypatch, path)
    N, C = (1, shape[0]) if len(shape) == 1 else shape[:2]
    S = int(np.prod(shape[2:], dtype=np.int64))
    check_plan(N * S, C, S, G, 1 if probs else n_split, allow_split=not probs)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    use_w, ignore, eps, reduction, go_kind = CE_OPTIONS[option]
    if probs:
        t = rng.random(shape).astype(dtype)
        t /= t.sum(axis=0 if len(shape) == 1 else 1, keepdims=True)
    else:
        t = rng.integers(0, C, tshape).astype(np.int64)
        if ignore and t.size > 1:
            t.reshape(-1)[::3] = -100
    kw = dict(reduction=reduction, label_smoothing=eps)
    w = rng.random(C).astype(dtype) + 0.5 if use_w else None
    loss_shape = tshape if not probs else tshape
    go = None
    if go_kind is not None:
        go = (rng.standard_normal(loss_shape if reduction == "none" else ())
              .astype(dtype))
    return x, t, w, kw, go, go_kind


def _torch_ce(x, t, w, kw, go):
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    tt = torch.tensor(t.astype(np.float64) if t.dtype.kind == "f" else t)
    wt = None if w is None else torch.tensor(w.astype(np.float64))
    loss = F.cross_entropy(xt, tt, weight=wt, **kw)
    loss.backward(torch.ones_like(loss) if go is None else torch.tensor(go.astype(np.float64)))
    return loss.detach().numpy(), xt.grad.numpy()


def _gpu_go(go, kind):
    if go is None:
        return None
    return dev(go) if kind == "device" else (float(go) if go.ndim == 0 else go)


# float32: every option set on every layout; float64: two option sets per layout (time).
CE_GRAD_CASES = [(np.float32, path, opt) for path in CE_LAYOUTS for opt in CE_OPTIONS] + \
    [(np.float64, path, opt) for path in CE_LAYOUTS for opt in ("mean", "smooth_weight_sum")]


@pytest.mark.parametrize("dtype,path,option", CE_GRAD_CASES,
                         ids=[f"{np.dtype(d).name}-{p}-{o}" for d, p, o in CE_GRAD_CASES])
def test_cross_entropy_with_grad(monkeypatch, dtype, path, option):
    x, t, w, kw, go, go_kind = _ce_case(monkeypatch, path, dtype, option)
    loss, grad = fc.cross_entropy_with_grad(dev(x), dev(t), weight=None if w is None else dev(w),
                                            grad_output=_gpu_go(go, go_kind), **kw)
    ref_loss, ref_grad = fastce.cross_entropy_with_grad(x, t, weight=w, grad_output=go, **kw)
    loss, grad = host(loss), host(grad)
    assert grad.shape == x.shape and grad.dtype == dtype and loss.dtype == dtype
    close(loss, ref_loss, dtype)
    close(grad, ref_grad, dtype)
    t_loss, t_grad = _torch_ce(x, t, w, kw, go)
    close(loss, t_loss, dtype)
    close(grad, t_grad, dtype)


@pytest.mark.parametrize("option", ["weight_ignore_mean", "smooth_weight_sum",
                                    "smooth_ignore_none"])
@pytest.mark.parametrize("path", list(CE_LAYOUTS))
def test_cross_entropy_forward(monkeypatch, path, option):
    """The forward-only kernel (its own smoothing pass); the target comes from the host."""
    x, t, w, kw, _, _ = _ce_case(monkeypatch, path, np.float32, option, seed=1)
    loss = host(fc.cross_entropy(dev(x), t, weight=w, **kw))
    close(loss, fastce.cross_entropy(x, t, weight=w, **kw), np.float32)
    close(loss, _torch_ce(x, t, w, kw, None)[0], np.float32)


@pytest.mark.parametrize("option", ["mean", "smooth_weight_sum", "smooth_ignore_none"])
@pytest.mark.parametrize("path", ["1d", "subwarp", "block", "kdim_thread", "kdim_block"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_probability_targets(monkeypatch, dtype, path, option):
    x, t, w, kw, go, go_kind = _ce_case(monkeypatch, path, dtype, option, probs=True)
    loss, grad = fc.cross_entropy_with_grad(dev(x), dev(t), weight=w,
                                            grad_output=_gpu_go(go, go_kind), **kw)
    ref_loss, ref_grad = fastce.cross_entropy_with_grad(x, t, weight=w, grad_output=go, **kw)
    close(host(loss), ref_loss, dtype)
    close(host(grad), ref_grad, dtype)
    t_loss, t_grad = _torch_ce(x, t, w, kw, go)
    close(host(loss), t_loss, dtype)
    close(host(grad), t_grad, dtype)
    if option == "mean":
        close(host(fc.cross_entropy(dev(x), dev(t), **kw)), ref_loss, dtype)


@pytest.mark.parametrize("path", ["subwarp", "block", "split", "kdim_thread", "kdim_block"])
def test_cross_entropy_special_values(monkeypatch, path):
    """Masked logits: an all -inf row, a target on a -inf logit (+inf loss), -inf elsewhere
    in a row, +inf and NaN logits -- loss and gradient equal the CPU kernels'."""
    x, t, w, kw, _, _ = _ce_case(monkeypatch, path, np.float32, "smooth_ignore_none")
    t = t.copy()
    t[t == -100] = 0
    _mask_rows(np.moveaxis(x, 0 if x.ndim == 1 else 1, -1), t)
    for eps in (0.0, 0.1):
        kw = dict(reduction="none", label_smoothing=eps)
        loss, grad = fc.cross_entropy_with_grad(dev(x), dev(t), **kw)
        ref_loss, ref_grad = fastce.cross_entropy_with_grad(x, t, **kw)
        close(host(loss), ref_loss, np.float32)
        close(host(grad), ref_grad, np.float32)
        if eps == 0:  # with smoothing the all -inf row sums -inf - (-inf): NaN, as on the CPU
            assert np.isposinf(host(loss).reshape(-1)[0])


@pytest.mark.parametrize("path", ["1d", "subwarp", "split", "kdim_4d"])
def test_cross_entropy_out_of_range_label(monkeypatch, path):
    """An index outside [0, C) that is not ignore_index: the CPU path's IndexError, same
    message (value and position), raised from the device error flag."""
    x, t, _, _, _, _ = _ce_case(monkeypatch, path, np.float32, "mean")
    C = x.shape[0] if x.ndim == 1 else x.shape[1]
    for bad in (C, -1, 10 * C):
        tb = t.copy()
        tb.reshape(-1)[-1] = bad
        if tb.size > 2:
            tb.reshape(-1)[1] = -100
        for dt in (np.int64, np.int32):
            exc = same_outcome(lambda: fastce.cross_entropy(x, tb.astype(dt)),
                               lambda: fc.cross_entropy(dev(x), dev(tb.astype(dt))), np.float32)
            assert isinstance(exc, IndexError)
    with pytest.raises(IndexError):
        fc.cross_entropy_with_grad(dev(x), t * 0 + C, ignore_index=-1)


# Logits so large that max + log(sum) rounds log(sum) away: lse - x must be evaluated as
# (max - x) + log(sum).  float32 stores 1e8 - 1 as 1e8 (target loss log 2).
BIG_ROWS = {np.float32: [[1e4] * 3, [1e8, 1e8 - 1, 0.0]],
            np.float64: [[1e300] * 3, [1e4] * 3, [1e8, 1e8 - 1, 0.0]]}
# The default float32 rtol (2e-5) would pass the old 1.0986328 for log 3 = 1.0986123.
BIG_TOL = {np.float32: dict(rtol=1e-6, atol=1e-7), np.float64: {}}


def _lse_minus_ref(x, axis):
    """lse - x of the stored values, in float64, as (max - x) + log(sum(exp(x - max)))."""
    x = x.astype(np.float64)
    m = x.max(axis, keepdims=True)
    return (m - x) + np.log(np.exp(x - m).sum(axis, keepdims=True))


@pytest.mark.parametrize("kdim", [False, True], ids=["rows", "kdim"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits_keep_log_sum(dtype, kdim):
    """[1e300]*3 (float64), [1e4]*3 and [1e8, 1e8-1, 0] (float32): cross-entropy log 3 / log 2
    (not 0, not 1.0986328), log_softmax -log 3; rows (R, C) and K-dim (1, C, R) layouts."""
    x = np.array(BIG_ROWS[dtype], dtype)
    R, C = x.shape
    probs = np.tile(np.array([0.5, 0.25, 0.25], dtype), (R, 1))
    probs[-1] = [0.5, 0.5, 0.0]
    t = np.zeros(R, np.int64)
    ref_d = _lse_minus_ref(x, 1)  # (R, C): lse - x_c
    if kdim:  # rows along axis 1 of (1, C, R)
        x, probs, t = (np.ascontiguousarray(a.T[None]) for a in (x, probs, t[:, None]))
        t = t[:, 0]
    axis = 1
    tol = BIG_TOL[dtype]
    ls = host(fc.log_softmax(dev(x), axis=axis))
    close(ls, fastce.log_softmax(x, axis=axis), dtype, **tol)
    close(ls, -(ref_d.T[None] if kdim else ref_d), dtype, **tol)
    for eps in (0.0, 0.2):
        kw = dict(reduction="none", label_smoothing=eps)
        ref_idx = (1 - eps) * ref_d[:, 0] + eps / C * ref_d.sum(1)
        assert np.isclose(ref_idx[0], np.log(3))  # the reference does not round L away
        p = probs[0].T if kdim else probs
        ref_prob = (((1 - eps) * p.astype(np.float64) + eps / C) * ref_d).sum(1)
        for tgt, ref in ((t, ref_idx), (probs, ref_prob)):
            got = host(fc.cross_entropy(dev(x), dev(tgt), **kw)).reshape(-1)
            close(got, fastce.cross_entropy(x, tgt, **kw).reshape(-1), dtype, **tol)
            close(got, ref, dtype, **tol)
        loss, _ = fc.cross_entropy_with_grad(dev(x), dev(t), **kw)  # the fused kernel's loss
        close(host(loss).reshape(-1), ref_idx, dtype, **tol)


def test_cross_entropy_edge_cases_and_errors():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    t = np.full(4, -100)
    # Every target ignored: mean is NaN (0/0), sum 0, gradient 0 -- as torch.
    for red in ("mean", "sum", "none"):
        same_outcome(lambda: fastce.cross_entropy_with_grad(x, t, reduction=red),
                     lambda: fc.cross_entropy_with_grad(dev(x), dev(t), reduction=red),
                     np.float32)
    assert np.isnan(host(fc.cross_entropy(dev(x), dev(t))))
    # An empty batch.
    x0 = np.zeros((0, 6), np.float64)
    for red in ("mean", "sum", "none"):
        same_outcome(lambda: fastce.cross_entropy_with_grad(x0, np.zeros(0, np.int64),
                                                            reduction=red),
                     lambda: fc.cross_entropy_with_grad(dev(x0), np.zeros(0, np.int64),
                                                        reduction=red), np.float64)
    # Bad shapes and options: the CPU path's exceptions and messages.
    bad_calls = [
        dict(target=np.zeros(3, np.int64)),
        dict(target=np.zeros((4, 6), np.float64)),
        dict(target=np.zeros(4, np.int64), weight=np.ones(5, np.float32)),
        dict(target=np.zeros(4, np.int64), reduction="avg"),
        dict(target=np.zeros(4, np.int64), label_smoothing=1.5),
        dict(target=np.zeros(4, np.bool_)),
        dict(target=np.zeros(4, np.int64), grad_output=np.ones(3, np.float32),
             reduction="none"),
        dict(target=np.zeros(4, np.int64), grad_output=np.ones(2, np.float32)),
    ]
    for kw in bad_calls:
        kw = dict(kw)
        tgt = kw.pop("target")
        exc = same_outcome(lambda: fastce.cross_entropy_with_grad(x, tgt, **kw),
                           lambda: fc.cross_entropy_with_grad(dev(x), dev(tgt), **kw),
                           np.float32)
        assert exc is not None, kw
    # Probability targets must be finite and >= 0 wherever the CPU path says so.
    tp = np.full((4, 6), 1 / 6, np.float32)
    tp[2, 3] = -0.5
    same_outcome(lambda: fastce.cross_entropy(x, tp), lambda: fc.cross_entropy(dev(x), dev(tp)),
                 np.float32)
    # float16 logits: computed in float32, returned as float16.
    xh = x.astype(np.float16)
    th = np.array([0, 5, 2, 1])
    loss, grad = fc.cross_entropy_with_grad(dev(xh), dev(th), reduction="none")
    assert grad.dtype == np.float16 and loss.dtype == np.float16
    ref_loss, ref_grad = fastce.cross_entropy_with_grad(xh, th, reduction="none")
    np.testing.assert_allclose(host(loss).astype(np.float32), ref_loss.astype(np.float32),
                               **HALF_TOL)
    np.testing.assert_allclose(host(grad).astype(np.float32), ref_grad.astype(np.float32),
                               **HALF_TOL)


# ---------------------------------------------------------------------------------------------
# binary cross-entropy

BCE_CASES = {
    # name: (input shape, weight shape, pos_weight shape)
    "flat": ((7,), None, None),
    "weight_row": ((3, 4), (4,), (4,)),
    "weight_col": ((3, 4), (3, 1), (1,)),
    "weight_full_3d": ((2, 3, 4), (2, 3, 4), (2, 3, 4)),
    "two_level_sum": ((600,), None, None),
}


BCE_RUNS = [(d, c, r) for d in DTYPES for c in BCE_CASES for r in ("mean", "sum", "none")
            if not (c == "two_level_sum" and r == "none")]  # that case is about reducing


@pytest.mark.parametrize("dtype,case,reduction", BCE_RUNS,
                         ids=[f"{np.dtype(d).name}-{c}-{r}" for d, c, r in BCE_RUNS])
def test_bce_with_grad(dtype, case, reduction):
    """The fused loss + gradient kernels against the CPU's fused path and torch's autograd:
    weights, pos_weight, and the upstream gradient as a host scalar, a device scalar or (for
    'none') a device array."""
    shape, wshape, pwshape = BCE_CASES[case]
    rng = np.random.default_rng(6)
    p = rng.uniform(0.02, 0.98, shape).astype(dtype)
    y = rng.random(shape).astype(dtype)
    x = (rng.standard_normal(shape) * 6).astype(dtype)
    w = None if wshape is None else (rng.random(wshape) + 0.5).astype(dtype)
    pw = None if pwshape is None else (rng.random(pwshape) * 3).astype(dtype)
    go = (rng.standard_normal(shape) if reduction == "none" else np.array(1.7)).astype(dtype)
    # two_level_sum is about the reduction: one upstream gradient form (the other cases take
    # all three through the same front end; the torch check below passes a host scalar).
    for go_in in (dev(go),) if case == "two_level_sum" else (None, go, dev(go)):
        dw = None if w is None else dev(w)
        loss, grad = fc.binary_cross_entropy_with_grad(dev(p), dev(y), weight=dw,
                                                       reduction=reduction, grad_output=go_in)
        ref_loss, ref_grad = fastce.binary_cross_entropy_with_grad(
            p, y, weight=w, reduction=reduction, grad_output=None if go_in is None else go)
        close(host(loss), ref_loss, dtype)
        close(host(grad), ref_grad, dtype)
        loss, grad = fc.binary_cross_entropy_with_logits_with_grad(
            dev(x), dev(y), weight=dw, pos_weight=None if pw is None else dev(pw),
            reduction=reduction, grad_output=go_in)
        ref_loss, ref_grad = fastce.binary_cross_entropy_with_logits_with_grad(
            x, y, weight=w, pos_weight=pw, reduction=reduction,
            grad_output=None if go_in is None else go)
        close(host(loss), ref_loss, dtype)
        close(host(grad), ref_grad, dtype)
    # torch's autograd, in float64, for the logits form
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    F.binary_cross_entropy_with_logits(
        xt, torch.tensor(y.astype(np.float64)),
        weight=None if w is None else torch.tensor(w.astype(np.float64)),
        pos_weight=None if pw is None else torch.tensor(pw.astype(np.float64)),
        reduction=reduction).backward(torch.tensor(go.astype(np.float64)))
    _, grad = fc.binary_cross_entropy_with_logits_with_grad(
        dev(x), dev(y), weight=None if w is None else dev(w),
        pos_weight=None if pw is None else dev(pw), reduction=reduction, grad_output=go)
    close(host(grad), xt.grad.numpy(), dtype)


def test_bce_with_grad_errors():
    """The fused functions raise what the forward ones raise, and check grad_output."""
    p = np.array([[0.5, 0.5, 2.0]], np.float32)
    with pytest.raises(ValueError, match=r"input must hold probabilities in \[0, 1\]"):
        fc.binary_cross_entropy_with_grad(dev(p), dev(np.full_like(p, 0.5)))
    with pytest.raises(ValueError, match=r"target must hold finite values"):
        fc.binary_cross_entropy_with_logits_with_grad(dev(p), dev(p * np.float32(np.nan)))
    with pytest.raises(ValueError, match="grad_output must be a scalar for reduction='mean'"):
        fc.binary_cross_entropy_with_logits_with_grad(dev(p), dev(p * 0.1),
                                                      grad_output=np.ones(3, np.float32))


# (shape, weighted): 2-D with class weights, K-dim unweighted, one sample of shape (C,).
NLL_CASES = {"2d_weighted": ((9, 5), True), "kdim": ((3, 4, 2, 5), False),
             "1d_weighted": ((6,), True)}


@pytest.mark.parametrize("case", list(NLL_CASES))
def test_nll_loss_with_grad(case):
    """The gather kernels against the CPU's nll_loss(_with_grad) and torch's autograd:
    ignore_index, class weights, the three reductions, the upstream gradient as a host
    scalar, a device scalar or (for 'none') a device array; float32 and float64."""
    shape, weighted = NLL_CASES[case]
    rng = np.random.default_rng(len(shape))
    C = shape[0] if len(shape) == 1 else shape[1]
    tshape = () if len(shape) == 1 else shape[:1] + shape[2:]
    for dtype in DTYPES:
        x = np.log(fastce.softmax(rng.standard_normal(shape), axis=0 if len(shape) == 1
                                  else 1)).astype(dtype)
        t = rng.integers(0, C, tshape)
        if t.size > 1:
            t.reshape(-1)[1] = 2                               # the ignored class
        w = (rng.random(C) + 0.2).astype(dtype) if weighted else None
        for reduction in ("mean", "sum", "none"):
            go = (rng.standard_normal(tshape) if reduction == "none"
                  else np.array(0.7)).astype(dtype)
            kw = dict(ignore_index=2, reduction=reduction)
            dw = None if w is None else dev(w)
            close(host(fc.nll_loss(dev(x), dev(t), weight=dw, **kw)),
                  fastce.nll_loss(x, t, weight=w, **kw), dtype)
            xt = torch.tensor(x.astype(np.float64), requires_grad=True)
            ref = F.nll_loss(xt, torch.tensor(t), ignore_index=2, reduction=reduction,
                             weight=None if w is None else torch.tensor(w.astype(np.float64)))
            ref.backward(torch.tensor(go.astype(np.float64)))
            for go_in in (go, dev(go)):
                loss, grad = fc.nll_loss_with_grad(dev(x), dev(t), weight=dw, grad_output=go_in,
                                                   **kw)
                close(host(loss), ref.detach().numpy(), dtype)
                close(host(grad), xt.grad.numpy(), dtype)


def test_nll_loss_edges_and_errors():
    """All targets ignored ('mean' is NaN, the gradient 0), empty input, and the CPU's
    errors: a class index out of range (raised after the kernels), bad shapes, bool input."""
    x = np.log(np.full((2, 3), 1 / 3, np.float32))
    ign = np.array([-100, -100])
    assert np.isnan(host(fc.nll_loss(dev(x), dev(ign))))
    loss, grad = fc.nll_loss_with_grad(dev(x), dev(ign))
    assert np.isnan(host(loss)) and not host(grad).any()
    assert host(fc.nll_loss(dev(x[:0]), dev(ign[:0]), reduction="sum")) == 0
    with pytest.raises(IndexError, match=r"class index 3 at position \(1,\)"):
        fc.nll_loss(dev(x), dev(np.array([0, 3])))
    with pytest.raises(ValueError, match=r"target must have shape \(2,\)"):
        fc.nll_loss(dev(x), dev(np.array([0, 1, 2])))
    with pytest.raises(ValueError, match="weight must be a 1-D array of length C=3"):
        fc.nll_loss(dev(x), dev(np.array([0, 1])), weight=dev(np.ones(2, np.float32)))
    with pytest.raises(TypeError, match="log_probs must be a floating-point"):
        fc.nll_loss(dev(np.zeros((2, 3), bool)), dev(np.array([0, 1])))


@pytest.mark.parametrize("dtype,case,reduction", BCE_RUNS,
                         ids=[f"{np.dtype(d).name}-{c}-{r}" for d, c, r in BCE_RUNS])
def test_bce(dtype, case, reduction):
    shape, wshape, pwshape = BCE_CASES[case]
    rng = np.random.default_rng(4)
    p = rng.random(shape).astype(dtype)
    p.reshape(-1)[:2] = (0.0, 1.0)  # torch's log clamp at -100
    y = rng.random(shape).astype(dtype)
    w = None if wshape is None else (rng.random(wshape) + 0.5).astype(dtype)
    got = host(fc.binary_cross_entropy(dev(p), dev(y), weight=None if w is None else dev(w),
                                       reduction=reduction))
    close(got, fastce.binary_cross_entropy(p, y, weight=w, reduction=reduction), dtype)
    wt = None if w is None else torch.tensor(w.astype(np.float64))
    ref = F.binary_cross_entropy(torch.tensor(p.astype(np.float64)),
                                 torch.tensor(y.astype(np.float64)), weight=wt,
                                 reduction=reduction).numpy()
    close(got, ref, dtype)

    x = (rng.standard_normal(shape) * 10).astype(dtype)
    x.reshape(-1)[:2] = (-100.0, 100.0)
    pw = None if pwshape is None else (rng.random(pwshape) * 3).astype(dtype)
    got = host(fc.binary_cross_entropy_with_logits(
        dev(x), dev(y), weight=w, pos_weight=None if pw is None else dev(pw),
        reduction=reduction))
    close(got, fastce.binary_cross_entropy_with_logits(x, y, weight=w, pos_weight=pw,
                                                       reduction=reduction), dtype)
    ref = F.binary_cross_entropy_with_logits(
        torch.tensor(x.astype(np.float64)), torch.tensor(y.astype(np.float64)), weight=wt,
        pos_weight=None if pw is None else torch.tensor(pw.astype(np.float64)),
        reduction=reduction).numpy()
    close(got, ref, dtype)


def test_bce_errors_and_edges():
    p = np.array([[0.2, 0.5], [0.9, 0.1]], np.float32)
    y = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
    for bad in (1.5, -0.25, np.nan):
        pb = p.copy()
        pb[1, 0] = bad
        exc = same_outcome(lambda: fastce.binary_cross_entropy(pb, y),
                           lambda: fc.binary_cross_entropy(dev(pb), dev(y)), np.float32)
        assert isinstance(exc, ValueError)
    for bad in (np.nan, 1.5, -np.inf):
        yb = y.copy()
        yb[0, 1] = bad
        for fn in ("binary_cross_entropy", "binary_cross_entropy_with_logits"):
            same_outcome(lambda: getattr(fastce, fn)(p, yb),
                         lambda: getattr(fc, fn)(dev(p), dev(yb)), np.float32)
    for kw in (dict(target=np.ones(3, np.float32)), dict(target=np.ones((2, 2), np.int64)),
               dict(target=y, weight=np.ones(3, np.float32)), dict(target=y, reduction="x")):
        kw = dict(kw)
        tgt = kw.pop("target")
        for fn in ("binary_cross_entropy", "binary_cross_entropy_with_logits"):
            exc = same_outcome(lambda: getattr(fastce, fn)(p, tgt, **kw),
                               lambda: getattr(fc, fn)(dev(p), dev(tgt), **kw), np.float32)
            assert exc is not None
    # Empty input: mean NaN, sum 0.
    for red in ("mean", "sum", "none"):
        e = np.zeros((0, 3), np.float64)
        same_outcome(lambda: fastce.binary_cross_entropy_with_logits(e, e, reduction=red),
                     lambda: fc.binary_cross_entropy_with_logits(dev(e), dev(e), reduction=red),
                     np.float64)
    # float16 input comes back as float16.
    got = fc.binary_cross_entropy_with_logits(dev(p.astype(np.float16)), dev(y),
                                              reduction="none")
    assert got.dtype == np.float16


BCE_FUNCTIONS = ("binary_cross_entropy", "binary_cross_entropy_with_logits",
                 "binary_cross_entropy_with_grad", "binary_cross_entropy_with_logits_with_grad")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_checks_in_the_loss_kernel(reduction):
    """The target check runs inside the one BCE kernel of every form and reduction (the
    per-block partial sums for 'mean'/'sum', the per-element loss for 'none'): the first
    bad position over several blocks (atomic min), the target's error before the input's,
    and the input's alone, with the CPU path's messages."""
    n = 600  # several blocks and grid-stride steps at the tiny launch size
    rng = np.random.default_rng(11)
    p = rng.uniform(0.05, 0.95, n).astype(np.float32)
    y = rng.random(n).astype(np.float32)
    y_bad = y.copy()
    y_bad[[517, 437, 590]] = (1.5, np.nan, -np.inf)     # first bad target: 437
    p_bad = p.copy()
    p_bad[[301, 12]] = (2.0, np.nan)                    # first bad probability: 12
    for fn in BCE_FUNCTIONS:
        for pp, yy in ((p, y_bad), (p_bad, y_bad), (p_bad, y)):
            if "logits" in fn and pp is p_bad:
                continue                                # any finite logit is valid
            exc = same_outcome(
                lambda: getattr(fastce, fn)(pp, yy, reduction=reduction),
                lambda: getattr(fc, fn)(dev(pp), dev(yy), reduction=reduction), np.float32)
            assert isinstance(exc, ValueError), (fn, exc)
            where = "at position (12,)" if yy is y else "at position (437,)"
            assert where in str(exc), (fn, str(exc))


def test_bce_reduction_is_reproducible():
    """'mean'/'sum' add the per-block partials in a fixed order (no float atomics): the same
    bits on every call; and they match the sum of the 'none' losses."""
    rng = np.random.default_rng(12)
    x = (rng.standard_normal(600) * 4).astype(np.float32)
    y = rng.random(600).astype(np.float32)
    first = host(fc.binary_cross_entropy_with_logits(dev(x), dev(y), reduction="sum"))
    for _ in range(2):
        again = host(fc.binary_cross_entropy_with_logits(dev(x), dev(y), reduction="sum"))
        assert again.tobytes() == first.tobytes()
    each = host(fc.binary_cross_entropy_with_logits(dev(x), dev(y), reduction="none"))
    close(first, each.astype(np.float64).sum(), np.float32)


# ---------------------------------------------------------------------------------------------
# the simulator really runs the shared-memory twin; dispatch from fastce.*


def test_simulator_uses_shared_memory_twin():
    assert _impl.kernels(np.float32).P.shuffle is (not SIM)


# ---------------------------------------------------------------------------------------------
# real GPUs only

real_gpu = pytest.mark.skipif(SIM, reason="needs a real GPU")


@real_gpu
@pytest.mark.parametrize("shape", [(64, 50000), (512, 3000), (4096, 1000), (3, 7),
                                   (8, 21, 64, 64), (4, 300, 5)])
def test_default_launch_sizes(monkeypatch, shape):
    """The launch configuration of fastce._config (not the simulator's tiny one), on sizes
    that take the split, block, warp, sub-warp and thread-per-position paths."""
    monkeypatch.undo()
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    t = rng.integers(0, shape[1], (shape[0],) + shape[2:])
    loss, grad = fc.cross_entropy_with_grad(dev(x), dev(t), label_smoothing=0.1)
    ref_loss, ref_grad = fastce.cross_entropy_with_grad(x, t, label_smoothing=0.1)
    close(host(loss), ref_loss, np.float32, rtol=1e-4)
    close(host(grad), ref_grad, np.float32, rtol=1e-4, atol=1e-6)
    close(host(fc.logsumexp(dev(x), axis=1)), fastce.logsumexp(x, axis=1), np.float32)


@real_gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with CUDA")
def test_torch_tensors_on_their_stream(monkeypatch):
    """torch CUDA tensors through the public functions: run on torch's current stream, come
    back as torch tensors on the input's device, equal to torch's own result."""
    monkeypatch.undo()
    x = torch.randn(256, 3000, device="cuda", requires_grad=True)
    t = torch.randint(0, 3000, (256,), device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        loss, grad = fastce.cross_entropy_with_grad(x, t)
        sm = fastce.softmax(x)
        bce = fastce.binary_cross_entropy_with_logits(x, torch.rand_like(x))
    s.synchronize()
    assert isinstance(loss, torch.Tensor) and loss.device == x.device and loss.shape == ()
    assert isinstance(grad, torch.Tensor) and grad.shape == x.shape and bce.shape == ()
    ref = F.cross_entropy(x, t)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sm, torch.softmax(x.detach(), -1), rtol=1e-5, atol=1e-7)


def test_public_api_dispatches_device_arrays():
    d = dev(np.array([[1.0, 2.0, 3.0]], np.float32))
    if not fastce._arrays.is_device_array(d):
        pytest.skip("fastce._arrays.is_device_array does not recognize the simulator's device "
                    "arrays (they have no __cuda_array_interface__, numba #7505)")
    got = fastce.softmax(d)
    assert not isinstance(got, np.ndarray)
    close(host(got), fastce.softmax(d.copy_to_host()), np.float32)


# ---------------------------------------------------------------------------------------------
# confident rows (issue #13): full relative precision, against mpmath at 50 digits

CONF_BOUND = 8  # relative error bound in eps of the dtype (the CPU's, tests/test_confident.py)


def _conf_rows(n_rows, C, dtype, rng):
    """(n_rows, C) rows whose entry p[i] holds the row max, above the others' max by gaps
    from 0.05 to ~70 (float32) / ~690 (float64): losses from ~1 down to ~1e-30 / 1e-300."""
    top = 70.0 if dtype == np.float32 else 690.0
    gaps = np.array([0.05, 3.0, 17.0, 45.0, top])
    x = rng.standard_normal((n_rows, C)) * 2
    p = rng.integers(0, C, n_rows)
    for i in range(n_rows):
        others = np.delete(x[i], p[i])
        x[i, p[i]] = (others.max() if C > 1 else 0.0) + gaps[(i + rng.integers(5)) % 5]
    return x.astype(dtype), p


def _to_layout(rows, shape, N, C, S):
    """(N * S, C) rows in (n, s) order -> the array of ``shape`` (class axis 1 of (N, C, S))."""
    return np.ascontiguousarray(rows.reshape(N, S, C).transpose(0, 2, 1)).reshape(shape)


def _from_layout(a, N, C, S):
    return np.ascontiguousarray(np.asarray(a).reshape(N, C, S).transpose(0, 2, 1)).reshape(
        N * S, C)


def _mp_rest(row, p):
    """(pivot, rest) at 50 digits: rest = sum_{j != p} exp(row[j] - row[p])."""
    with mpmath.workdps(50):
        xp = mpmath.mpf(float(row[p]))
        return xp, mpmath.fsum(mpmath.exp(mpmath.mpf(float(v)) - xp)
                               for j, v in enumerate(row) if j != p)


def _rel(got, ref, dtype):
    """Relative error in eps (results below the smallest normal compared absolutely)."""
    fi = np.finfo(dtype)
    return abs(float(got) - ref) / max(abs(ref), float(fi.tiny)) / float(fi.eps)


CONF_WORST = {}  # (kernel, dtype name) -> worst relative error seen, in eps


def _note(key, err):
    CONF_WORST[key] = max(CONF_WORST.get(key, 0.0), err)
    assert err <= CONF_BOUND, (key, err)


@pytest.fixture(scope="module", autouse=True)
def _report_confident_errors():
    yield
    if CONF_WORST:
        print("\nconfident rows, worst relative error (eps):",
              {f"{k}/{d}": round(v, 2) for (k, d), v in sorted(CONF_WORST.items())})


@pytest.mark.parametrize("path", list(CE_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_confident_cross_entropy(monkeypatch, dtype, path):
    """Index targets on the row max: the loss log1p(rest) and the target gradient
    -rest/(1 + rest) within 8 eps of mpmath (forward and fused kernels); the other gradient
    entries, and a smoothed, weighted call, equal to the CPU kernels (its loss within 16
    eps)."""
    shape, G, n_split = CE_LAYOUTS[path]
    use_path(monkeypatch, path)
    N, C = (1, shape[0]) if len(shape) == 1 else shape[:2]
    S = int(np.prod(shape[2:], dtype=np.int64))
    check_plan(N * S, C, S, G, n_split)
    rng = np.random.default_rng(11)
    rows, p = _conf_rows(N * S, C, dtype, rng)
    if n_split > 1:
        p[:2] = (3, C - 2)  # a target in each chunk
        for i in range(2):
            rows[i, p[i]] = np.delete(rows[i], p[i]).max() + dtype(1 + 20 * i)
    x = _to_layout(rows, shape, N, C, S)
    t = p.reshape(() if len(shape) == 1 else (shape[0],) + shape[2:]).astype(np.int64)
    kw = dict(reduction="none")
    loss_f = host(fc.cross_entropy(dev(x), dev(t), **kw)).reshape(-1)
    loss, grad = fc.cross_entropy_with_grad(dev(x), dev(t), **kw)
    loss, grad = host(loss).reshape(-1), _from_layout(host(grad), N, C, S)
    for i in range(N * S):
        _, rest = _mp_rest(rows[i], p[i])
        with mpmath.workdps(50):
            ref_loss, ref_g = float(mpmath.log1p(rest)), float(-rest / (1 + rest))
        _note(("cross_entropy loss", np.dtype(dtype).name), _rel(loss_f[i], ref_loss, dtype))
        _note(("cross_entropy loss", np.dtype(dtype).name), _rel(loss[i], ref_loss, dtype))
        _note(("cross_entropy grad[t]", np.dtype(dtype).name),
              _rel(grad[i, p[i]], ref_g, dtype))
    close(grad, _from_layout(fastce.cross_entropy_with_grad(x, t, **kw)[1], N, C, S), dtype)
    # smoothing and weights: the same formulas as the CPU kernels (which are exact)
    w = (rng.random(C) + 0.5).astype(dtype)
    kw = dict(reduction="none", label_smoothing=0.1, weight=w)
    loss, grad = fc.cross_entropy_with_grad(dev(x), dev(t), **kw)
    ref_loss, ref_grad = fastce.cross_entropy_with_grad(x, t, **kw)
    tight = dict(rtol=16 * float(np.finfo(dtype).eps), atol=float(np.finfo(dtype).tiny))
    close(host(loss), ref_loss, dtype, **tight)
    # (the other classes' gradient p_c A - eps/C w_c cancels in both: default tolerance)
    close(host(grad), ref_grad, dtype)


@pytest.mark.parametrize("path", list(SOFTMAX_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_confident_log_softmax_logsumexp(monkeypatch, dtype, path):
    """log_softmax of rows with a clear max: every entry -((max - x_c) + log1p(rest)) within
    8 eps of mpmath; logsumexp of rows whose max is 0 (a result near 0): log1p(rest)."""
    shape, axis, G, n_split = SOFTMAX_LAYOUTS[path]
    use_path(monkeypatch, path)
    N, C, S = fastce._validate.split_at_axis(shape, axis % len(shape))
    check_plan(N * S, C, S, G, n_split)
    rng = np.random.default_rng(12)
    rows, p = _conf_rows(N * S, C, dtype, rng)
    out = _from_layout(host(fc.log_softmax(dev(_to_layout(rows, shape, N, C, S)), axis=axis)),
                       N, C, S)
    near0 = rows - rows[np.arange(N * S), p][:, None]  # max exactly 0
    lse = host(fc.logsumexp(dev(_to_layout(near0, shape, N, C, S)), axis=axis)).reshape(-1)
    for i in range(N * S):
        xp, rest = _mp_rest(rows[i], p[i])
        with mpmath.workdps(50):
            lp = mpmath.log1p(rest)
            for c in range(C):
                ref = float(-((xp - mpmath.mpf(float(rows[i, c]))) + lp))
                _note(("log_softmax", np.dtype(dtype).name), _rel(out[i, c], ref, dtype))
        _, rest0 = _mp_rest(near0[i], p[i])
        with mpmath.workdps(50):
            _note(("logsumexp", np.dtype(dtype).name),
                  _rel(lse[i], float(mpmath.log1p(rest0)), dtype))


ISSUE_ROWS = [  # issue #13's table: (logits, target 0), dtype
    ([20.0] + [0.0] * 9, np.float32),
    ([30.0, 0.0, 0.0], np.float32),
    ([30.0, 0.0, 0.0], np.float64),
    ([50.0] + list(np.linspace(-5, 5, 999)), np.float64),
]


def _check_confident_row(x, label):
    """Class 0 holds the max of the one row ``x``: the loss, the target gradient and
    log_softmax at the target against mpmath (noted under ``label``)."""
    dtype = x.dtype
    t = np.zeros(1, np.int64)
    _, rest = _mp_rest(x[0], 0)
    with mpmath.workdps(50):
        ref_loss, ref_g = float(mpmath.log1p(rest)), float(-rest / (1 + rest))
    loss, grad = fc.cross_entropy_with_grad(dev(x), dev(t), reduction="none")
    name = np.dtype(dtype).name
    _note((f"{label} loss", name), _rel(host(loss)[0], ref_loss, dtype))
    _note((f"{label} grad[t]", name), _rel(host(grad)[0, 0], ref_g, dtype))
    _note((f"{label} log_softmax", name),
          _rel(host(fc.log_softmax(dev(x)))[0, 0], -ref_loss, dtype))


@pytest.mark.parametrize("k", range(len(ISSUE_ROWS)))
def test_confident_issue_table(k):
    """The issue's rows (tiny-launch block path; C = 1000 strides 32 threads): loss,
    target gradient and log_softmax at the target within 8 eps of mpmath, and
    logsumexp([0, -40]) = 4.248e-18 (float64)."""
    vals, dtype = ISSUE_ROWS[k]
    _check_confident_row(np.array([vals], dtype), "issue table")
    if k == 0:
        lse = host(fc.logsumexp(dev(np.array([0.0, -40.0]))))
        with mpmath.workdps(50):
            ref = float(mpmath.log1p(mpmath.exp(-40)))
        _note(("issue table logsumexp", "float64"), _rel(lse, ref, np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_confident_row_with_masked_logits(dtype):
    """A confident row holding -inf logits (masked classes; C = 1000, 32 threads a row):
    the second pass adds nothing for them (float32 computes every term branch-free and maps
    their NaN TwoSum error to a finite factor of exp(-inf) = 0): loss, target gradient and
    log_softmax at the target within the confident-row bound of mpmath."""
    rng = np.random.default_rng(7)
    row = rng.uniform(-5.0, 5.0, 1000)
    row[1::7] = -np.inf
    row[0] = 20.0
    _check_confident_row(np.array([row], dtype), "masked row")


@real_gpu
def test_cupy_and_numba_arrays_come_back_as_their_type(monkeypatch):
    """CuPy arrays in give CuPy arrays out, Numba device arrays give Numba device arrays, on
    the arrays' own stream, equal to the CPU path (C- and Fortran-ordered inputs, which the
    launcher types differently)."""
    monkeypatch.undo()
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(9)
    x = rng.standard_normal((300, 700)).astype(np.float32)
    t = rng.integers(0, 700, 300)
    for xin in (x, np.asfortranarray(x)):
        got = fastce.log_softmax(cupy.asarray(xin))
        assert isinstance(got, cupy.ndarray)
        close(cupy.asnumpy(got), fastce.log_softmax(xin), np.float32)
        loss = fastce.cross_entropy(cupy.asarray(xin), cupy.asarray(t), reduction="none")
        assert isinstance(loss, cupy.ndarray)
        close(cupy.asnumpy(loss), fastce.cross_entropy(xin, t, reduction="none"), np.float32)
        got = fastce.softmax(cuda.to_device(xin))
        assert getattr(got, "__cuda_ndarray__", False)
        close(host(got), fastce.softmax(xin), np.float32)


# ---------------------------------------------------------------------------------------------
# large-vocabulary options (#12 item 2): softcap, z_loss, return_lse

# name: (CE_OPTIONS key, softcap, z_loss)
LV_OPTIONS = {
    "cap_z_weight_ignore_mean": ("weight_ignore_mean", 2.0, 0.05),
    "z_smooth_ignore_none": ("smooth_ignore_none", None, 0.1),
    "cap_smooth_weight_sum": ("smooth_weight_sum", 3.0, 0.0),
}
# (The simulator runs a thread per GPU thread: the block-wide layouts take two option sets.)
LV_CASES = [(np.float32, p, o) for p in ("1d", "subwarp", "block", "kdim_thread")
            for o in LV_OPTIONS] + \
    [(np.float32, "split", o) for o in ("cap_z_weight_ignore_mean", "cap_smooth_weight_sum")] + \
    [(np.float32, "kdim_block", o)
     for o in ("cap_z_weight_ignore_mean", "z_smooth_ignore_none")] + \
    [(np.float64, p, "cap_z_weight_ignore_mean") for p in ("block", "kdim_thread")]


def _lv_reference(x, t, w, kw, go, softcap, z_loss):
    """Loss, gradient and lse from fastce.reference's plain-torch formulation (float64)."""
    from fastce.reference import torch_cross_entropy_zloss_softcap
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    tt = torch.tensor(t.astype(np.float64) if t.dtype.kind == "f" else t)
    wt = None if w is None else torch.tensor(w.astype(np.float64))
    loss, lse = torch_cross_entropy_zloss_softcap(xt, tt, weight=wt, softcap=softcap,
                                                  z_loss=z_loss, return_lse=True, **kw)
    loss.backward(torch.ones_like(loss) if go is None else torch.tensor(go.astype(np.float64)))
    return loss.detach().numpy(), xt.grad.numpy(), lse.detach().numpy()


@pytest.mark.parametrize("dtype,path,option", LV_CASES,
                         ids=[f"{np.dtype(d).name}-{p}-{o}" for d, p, o in LV_CASES])
def test_cross_entropy_softcap_zloss_lse(monkeypatch, dtype, path, option):
    base, softcap, z_loss = LV_OPTIONS[option]
    x, t, w, kw, go, go_kind = _ce_case(monkeypatch, path, dtype, base)
    lv = dict(softcap=softcap, z_loss=z_loss, return_lse=True)
    loss, grad, lse = fc.cross_entropy_with_grad(
        dev(x), dev(t), weight=None if w is None else dev(w),
        grad_output=_gpu_go(go, go_kind), **kw, **lv)
    ref_loss, ref_grad, ref_lse = fastce.cross_entropy_with_grad(x, t, weight=w, grad_output=go,
                                                                 **kw, **lv)
    loss, grad, lse = host(loss), host(grad), host(lse)
    assert lse.shape == t.shape and lse.dtype == dtype
    close(loss, ref_loss, dtype)
    close(grad, ref_grad, dtype)
    close(lse, ref_lse, dtype)
    t_loss, t_grad, t_lse = _lv_reference(x, t, w, kw, go, softcap, z_loss)
    close(loss, t_loss, dtype)
    close(grad, t_grad, dtype)
    close(lse, t_lse, dtype)    # ignored rows included
    f_loss, f_lse = fc.cross_entropy(dev(x), dev(t), weight=None if w is None else dev(w),
                                     **kw, **lv)
    close(host(f_loss), t_loss, dtype)
    close(host(f_lse), t_lse, dtype)


@pytest.mark.parametrize("path", ["subwarp", "kdim_block"])
def test_cross_entropy_softcap_zloss_probability_targets(monkeypatch, path):
    x, t, w, kw, go, go_kind = _ce_case(monkeypatch, path, np.float32, "smooth_weight_sum",
                                        probs=True)
    lv = dict(softcap=2.5, z_loss=0.02, return_lse=True)
    loss, grad, lse = fc.cross_entropy_with_grad(dev(x), dev(t), weight=w,
                                                 grad_output=_gpu_go(go, go_kind), **kw, **lv)
    t_loss, t_grad, t_lse = _lv_reference(x, t, w, kw, go, 2.5, 0.02)
    close(host(loss), t_loss, np.float32)
    close(host(grad), t_grad, np.float32)
    close(host(lse), t_lse, np.float32)


def test_cross_entropy_large_vocab_errors():
    x = dev(np.zeros((2, 3), np.float32))
    t = dev(np.array([0, 1]))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap"):
            fc.cross_entropy(x, t, softcap=bad)
    with pytest.raises(ValueError, match="z_loss"):
        fc.cross_entropy(x, t, z_loss=-0.1)
    with pytest.raises(TypeError, match="return_lse"):
        fc.cross_entropy(x, t, return_lse="yes")


@pytest.mark.parametrize("src_dtype,dst_dtype", [(np.float16, np.float32),
                                                 (np.float32, np.float16),
                                                 (np.float32, np.float32)])
def test_strided_copy_kernel_steps_and_carries(src_dtype, dst_dtype):
    """The strided copy launched on a small grid, so that every thread takes several
    four-position steps whose index carries through every digit, equals NumPy's
    conversion of the permuted array (values exactly representable in both dtypes)."""
    rng = np.random.default_rng(16)
    x = rng.integers(-512, 512, (2, 3, 4, 5, 3, 2)).astype(src_dtype) / src_dtype(8)
    axes = (4, 1, 5, 0, 3, 2)
    src = permuted(dev(x), axes)
    want = np.ascontiguousarray(x.transpose(axes)).astype(dst_dtype)
    for blocks, threads in ((1, 7), (2, 5), (1, 1)):
        dst = cuda.device_array(want.shape, dst_dtype)
        _impl._copy_kernel[blocks, threads, cuda.default_stream()](src, _impl._as_view(dst))
        cuda.synchronize()
        np.testing.assert_array_equal(host(dst), want)


def test_strided_copy_address_walk():
    """The copy kernel's byte address (which only a GPU reads: the simulator's load indexes
    by the 6-D index) stays the address of the index it walks with, through every carry:
    the device functions run as Python under the simulator."""
    if not config.ENABLE_CUDASIM:
        pytest.skip("calls device functions from Python (simulator only)")
    from fastce.cuda.kernels import reduce as R
    shape = (3, 2, 1, 4, 5, 3)
    st = (7, 1000, 13, 96, 24, 2000)  # arbitrary byte strides, any order
    dims = shape[1:]
    back = tuple(st[k - 1] - shape[k] * st[k] for k in range(1, 6))
    total = int(np.prod(shape))
    for start, stride in ((0, 1), (5, 7), (2, 37), (11, total - 1)):
        ix = R._digits6(start, dims)
        p = R._offset6(ix, st)
        sx = R._digits6(stride, dims)
        dp = R._offset6(sx, st)
        for i in range(start, total, stride):
            assert tuple(ix) == np.unravel_index(i, shape)
            assert p == int(np.dot(ix, st))
            ix, p = R._advance6(ix, p, sx, dp, dims, back)


def test_exp_shifted_float32():
    """The float32 hot loops' exp (``primitives.exp_shifted``: ``ex2`` of the rounded log2
    argument, the rounding put back by FMAs; ``exp_shifted_err(d, e)`` = exp(d + e) for a
    TwoSum remainder ``e``) against float64 exp over [-87, 0]: within 1.5 ulp where ``ex2`` is
    correctly rounded (the simulator), 3.5 ulp on a GPU (its ``ex2.approx``: <= 2 ulp);
    exp(0) = 1 exactly; exp(-inf) = 0, also with the NaN remainder TwoSum gives there; results
    below 2^-126 flushed to 0 or within 2^-126."""
    from fastce.cuda.kernels.primitives import build_primitives
    P = build_primitives(np.float32)
    exp_shifted, exp_shifted_err = P.exp_shifted, P.exp_shifted_err

    @cuda.jit
    def kern(d, e, out, out_err):
        i = cuda.grid(1)
        if i < d.shape[0]:
            out[i] = exp_shifted(d[i])
            out_err[i] = exp_shifted_err(d[i], e[i])

    rng = np.random.default_rng(16)
    d = np.concatenate([-rng.uniform(0, 87, 40), -rng.uniform(0, 1, 12),
                        -np.exp(rng.uniform(-30, 0, 8)),
                        [0.0, -1e-30, -87.3, -88.0, -100.0, -np.inf]]).astype(np.float32)
    e = (rng.uniform(-0.5, 0.5, d.size) * np.spacing(np.abs(d))).astype(np.float32)
    e[d == -np.inf] = np.nan
    e[d == 0] = 0
    out, out_err = np.zeros_like(d), np.zeros_like(d)
    dd, de, do, doe = (cuda.to_device(a) for a in (d, e, out, out_err))
    kern[-(-d.size // 32), 32](dd, de, do, doe)
    bound = 1.5 if SIM else 3.5
    tiny = float(np.finfo(np.float32).tiny)
    for got, ref in ((do.copy_to_host(), np.exp(d.astype(np.float64))),
                     (doe.copy_to_host(), np.exp(d.astype(np.float64) +
                                                 np.nan_to_num(e.astype(np.float64))))):
        normal = ref >= tiny
        ulp = np.spacing(ref[normal].astype(np.float32)).astype(np.float64)
        assert (np.abs(got[normal] - ref[normal]) / ulp).max() <= bound
        assert np.all(np.abs(got[~normal]) <= tiny)
        assert got[d == 0][0] == 1.0 and got[d == -np.inf][0] == 0.0
