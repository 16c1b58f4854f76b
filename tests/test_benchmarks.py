"""Smoke tests of the asv suite, so benchmarks can't rot.

Every ``time_`` / ``peakmem_`` / ``track_`` method runs once, through its
class's ``setup``, on the smallest parameters for every CPU implementation;
GPU implementations must skip (NotImplementedError) where no GPU exists.
The registry's implementations must agree with each other on small inputs.
"""

import importlib
import inspect
import itertools
import pkgutil
import subprocess
import sys

import numpy as np
import pytest

import benchmarks
from benchmarks import common as C
from fastce.reference import IMPLEMENTATIONS

PREFIXES = ("time_", "peakmem_", "track_")


def _bench_classes():
    for info in pkgutil.iter_modules(benchmarks.__path__):
        if not info.name.startswith("bench_"):
            continue
        mod = importlib.import_module(f"benchmarks.{info.name}")
        for name, cls in inspect.getmembers(mod, inspect.isclass):
            if name.startswith("_") or cls.__module__ != mod.__name__:
                continue
            methods = [m for m in dir(cls) if m.startswith(PREFIXES + ("timeraw_",))]
            if methods:
                yield f"{info.name}.{name}", cls, methods


CLASSES = list(_bench_classes())


def _smallest(cls):
    """Smallest value of every parameter (impl handled separately)."""
    params = getattr(cls, "params", [])
    names = getattr(cls, "param_names", [])
    if params and not isinstance(params[0], list):
        params = [params]
    out = []
    for n, values in zip(names, params):
        if n == "impl":
            out.append(None)
        elif n == "shape":
            out.append(min(values, key=lambda s: int(np.prod(s))))
        else:
            out.append(values[0])
    return names, out


def _cases():
    for qual, cls, methods in CLASSES:
        names, smallest = _smallest(cls)
        impls = [None]
        if names and names[0] == "impl":
            # the class's own implementations (fastce-torch is not in the NumPy registry)
            own = cls.params[0] if isinstance(cls.params[0], list) else cls.params
            impls = [i for i in own if i not in C.GPU_IMPLS
                     and (i not in IMPLEMENTATIONS or IMPLEMENTATIONS[i].available())]
        for m in methods:
            if m.startswith("timeraw_"):
                continue
            for impl in impls:
                args = [impl if v is None and n == "impl" else v for n, v in zip(names, smallest)]
                yield pytest.param(cls, m, args, id=f"{qual}.{m}[{','.join(map(str, args))}]")


def test_suite_has_every_kind():
    kinds = {m.split("_")[0] for _, _, ms in CLASSES for m in ms}
    assert kinds == {"time", "peakmem", "track", "timeraw"}
    names = {q for q, _, _ in CLASSES}
    assert {"bench_cross_entropy.CrossEntropy", "bench_cross_entropy.CrossEntropyGrad",
            "bench_logsumexp.LogSumExp", "bench_roof.Roof",
            "bench_cross_entropy.CrossEntropyKDim"} <= names


@pytest.mark.parametrize("cls,method,args", list(_cases()))
def test_benchmark_runs(cls, method, args):
    C._CACHE.clear()
    bench = cls()
    if hasattr(bench, "setup"):
        bench.setup(*args)
        bench.setup(*args)  # asv calls setup before every sample: must be cheap and idempotent
    result = getattr(bench, method)(*args)
    if method.startswith("track_"):
        assert isinstance(result, (int, float))
        assert result >= 0
        impl = args[0] if getattr(cls, "param_names", [""])[0] == "impl" else None
        if "rel_error" in method and impl != "numpy-naive":
            # smallest scale (1): every stable implementation is accurate
            assert result < 1e-5, (impl, result)
    else:
        assert result is None


@pytest.mark.parametrize("impl", C.GPU_IMPLS)
def test_gpu_impls_skip_without_gpu(impl):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from benchmarks.bench_cross_entropy import CrossEntropy

    with pytest.raises(NotImplementedError):
        CrossEntropy().setup(impl, 1, 2, "float32")


def test_oversized_combinations_skip():
    from benchmarks.bench_cross_entropy import CrossEntropy

    assert 4096 * 128000 > C.max_elements()
    with pytest.raises(NotImplementedError):
        CrossEntropy().setup("numpy-stable", 4096, 128000, "float32")


def test_timeraw_code_runs():
    from benchmarks.bench_import import ImportAndFirstCall

    b = ImportAndFirstCall()
    for what in ImportAndFirstCall.params[0]:
        compile(b.timeraw_import_first_call(what), what, "exec")
    code = b.timeraw_import_first_call("cross_entropy") + "print('ok')\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_memoized_setup_builds_once():
    from benchmarks.bench_cross_entropy import CrossEntropy

    C._CACHE.clear()
    b = CrossEntropy()
    b.setup("numpy-stable", 32, 10, "float32")
    first = b.arrays[0]
    b.setup("numpy-stable", 32, 10, "float32")
    assert b.arrays[0] is first
    assert first.dtype == np.float32 and first.shape == (32, 10)


def test_roofs_compute_what_they_claim():
    C.configure_threads()
    for size in (1000, 1 << 20):  # serial and parallel paths
        x = C.make_logits((size // 100, 100), "float64")
        assert C.roof_read(x) == pytest.approx(x.sum(), rel=1e-9, abs=1e-6)
        out = np.empty_like(x)
        C.roof_read_write(x, out)
        np.testing.assert_array_equal(out, x)


def test_max_rel_error():
    ref = np.array([1.0, 2.0, 1e-9])
    assert C.max_rel_error(ref.copy(), ref) == 0.0
    assert C.max_rel_error(np.array([1.0, 2.2, 1e-9]), ref) == pytest.approx(0.1)
    assert C.max_rel_error(np.array([1.0, np.inf, 0.0]), ref) == C.NONFINITE_ERROR
    assert C.max_rel_error(np.array([1.0, np.nan, 0.0]), ref) == C.NONFINITE_ERROR
    # near-zero references use an absolute error (floor 1)
    assert C.max_rel_error(np.array([1.0, 2.0, 2e-9]), ref) == pytest.approx(1e-9)


def test_extra_memory_separates_fused_from_materializing():
    from benchmarks.bench_cross_entropy import CrossEntropyMemory

    if C.reset_peak_rss() is None:
        pytest.skip("needs /proc/self/clear_refs")
    C._CACHE.clear()
    b = CrossEntropyMemory()
    b.setup("numpy-stable", 512, 1000, "float64")
    # x - max, exp, log-probabilities: several N x C temporaries
    assert b.track_forward_extra_memory("numpy-stable", 512, 1000, "float64") > 1.0
    C._CACHE.clear()
    b.setup("fastce", 512, 1000, "float64")
    # the fused forward streams the logits: nothing of size N x C
    assert b.track_forward_extra_memory("fastce", 512, 1000, "float64") < 0.5


FUNCS = [
    ("logsumexp", "x"), ("log_softmax", "x"), ("softmax", "x"),
    ("cross_entropy", "xy"), ("cross_entropy_with_grad", "xy"),
    ("binary_cross_entropy", "pt"), ("binary_cross_entropy_with_logits", "xt"),
]


@pytest.mark.parametrize("func,kind", FUNCS)
@pytest.mark.parametrize("dtype", C.DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (5, 10), (32, 1000)])
def test_registry_implementations_agree(func, kind, dtype, shape):
    x = C.make_logits(shape, dtype)  # scale 3: no overflow, so naive agrees too
    arrays = {
        "x": [x],
        "xy": [x, C.make_targets(shape[:1], shape[1])],
        "pt": [C.make_probabilities(shape, dtype), C.make_binary_targets(shape, dtype)],
        "xt": [x, C.make_binary_targets(shape, dtype)],
    }[kind]
    want = C.make_call("numpy-stable", func, *arrays)()
    rtol = 2e-5 if dtype == "float32" else 1e-11
    for impl in C.CPU_IMPLS:
        if not IMPLEMENTATIONS[impl].available():
            continue
        got = C.make_call(impl, func, *arrays)()
        pairs = list(zip(got, want)) if isinstance(got, tuple) else [(got, want)]
        for g, w in pairs:
            assert np.asarray(g).dtype == np.dtype(dtype), impl
            np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * 1e-2, err_msg=impl)
