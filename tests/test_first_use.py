"""What a newcomer meets first: the README's examples, the documented commands, the first-use
cache tools (``python -m fastce precompile``) and the error messages for common mistakes."""
import importlib
import inspect
import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastce

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


def _blocks(path, lang):
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), flags=re.S)


# ---------------------------------------------------------------------------------------------
# the README's python blocks run as shown


def _readme_python():
    """The README's python blocks, each with the reason it is not run (a block right after an
    ``<!-- not run: why -->`` comment, e.g. one that reads the user's data files) or None."""
    found = re.findall(r"(<!-- not run: ([^>]*?) -->\s*)?```python\n(.*?)```",
                       (ROOT / "README.md").read_text(), flags=re.S)
    return [(code, why or None) for _, why, code in found]


@pytest.mark.parametrize("i", range(len(_readme_python())))
def test_readme_python_block_runs(i):
    code, why_not = _readme_python()[i]
    if why_not:
        pytest.skip(f"README block marked not run: {why_not}")
    for mod in re.findall(r"^\s*(?:import|from) (\w+)", code, flags=re.M):
        pytest.importorskip(mod)      # an optional dependency (torch, dask) not installed
    exec(compile(code, f"README.md python block {i}", "exec"), {"__name__": "readme"})


def test_readme_worked_example_is_there():
    text = (ROOT / "README.md").read_text()
    assert "0.3190" in text and "1.2037" in text


# ---------------------------------------------------------------------------------------------
# the documented shell commands: revisions, benchmark filters and files exist


def _shell_commands():
    for path in DOCS:
        for block in _blocks(path, "sh"):
            for line in block.splitlines():
                line = line.split("  #")[0].strip()
                if line and not line.startswith("#"):
                    yield path.name, line


def _benchmark_names():
    """Every benchmark as asv's ``-b`` regexes see it: ``module.Class.method(params)``."""
    sys.path.insert(0, str(ROOT))
    try:
        names = []
        for f in sorted((ROOT / "benchmarks").glob("bench_*.py")):
            mod = importlib.import_module(f"benchmarks.{f.stem}")
            for cname, cls in inspect.getmembers(mod, inspect.isclass):
                if cls.__module__ != mod.__name__ or cname.startswith("_"):
                    continue
                for mname, _ in inspect.getmembers(cls, inspect.isfunction):
                    if not re.match(r"(time|timeraw|peakmem|mem|track)_", mname):
                        continue
                    base = f"{f.stem}.{cname}.{mname}"
                    params = getattr(cls, "params", [])
                    if params and not isinstance(params[0], (list, tuple)):
                        params = [params]
                    if not params:
                        names.append((base, base))
                    for combo in itertools.product(*params):
                        names.append((base, f"{base}({', '.join(repr(p) for p in combo)})"))
        return names
    finally:
        sys.path.remove(str(ROOT))


def _git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def test_documented_commands_name_things_that_exist():
    if _git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout")
    names = _benchmark_names()
    assert names
    checked = 0
    for doc, line in _shell_commands():
        try:
            argv = shlex.split(line.replace("$(git rev-parse HEAD)", "HEAD"))
        except ValueError as exc:
            pytest.fail(f"{doc}: cannot parse {line!r}: {exc}")
        for word in argv:
            if word.endswith(".sh") and "/" in word:
                assert (ROOT / word).is_file(), f"{doc}: {line!r} names a missing file {word}"
        if argv[:1] != ["asv"] or len(argv) < 2:
            continue
        sub, rest = argv[1], argv[2:]
        revs = []
        if sub in ("run", "continuous", "compare"):
            takes_value = {"-b", "--bench", "-f", "--factor", "-a", "--attribute", "-E",
                           "--environment", "-m", "--machine", "--python", "-j"}
            revs = [w for prev, w in zip([""] + rest, rest) if not w.startswith("-")
                    and "=" not in w and prev not in takes_value]
            if sub == "run":
                revs = revs[:1]
        for rev in revs:
            for r in re.split(r"\.\.", rev.replace("^!", "")):
                ok = _git("rev-parse", "--verify", "--quiet", f"{r}^{{commit}}").returncode == 0
                assert ok, f"{doc}: {line!r}: no such revision {r!r} in this clone"
                checked += 1
        for flag, regex in zip(rest, rest[1:]):
            if flag in ("-b", "--bench"):
                hit = {base for base, name in names if re.search(regex, name)}
                assert hit, f"{doc}: {line!r}: -b {regex!r} selects no benchmark"
                assert len(hit) == 1, (f"{doc}: {line!r}: -b {regex!r} selects {sorted(hit)}; "
                                       f"anchor it so that it selects one benchmark")
                checked += 1
    assert checked >= 3


def test_no_placeholders_in_docs():
    for path in DOCS:
        assert "~WALL" not in path.read_text(), path.name


# ---------------------------------------------------------------------------------------------
# precompile


def _run_python(code, env, *args):
    """``code`` run by a fresh interpreter in ``env`` (``args`` its ``sys.argv[1:]``); its
    standard output (it must succeed)."""
    out = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_precompile_fills_the_cache(tmp_path):
    """``python -m fastce precompile`` writes numba cache entries that a fresh process then
    loads instead of compiling (numba's own cache statistics say which).  One group, the one
    the probe loads: tests/run.sh runs every common group, both dtypes, before the tests."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-m", "fastce", "precompile", "--group",
                          "cross_entropy_small", "--dtype", "float32", "-j", "1"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "cross_entropy_small" in out.stdout and "1 groups" in out.stdout, out.stdout
    assert list(tmp_path.rglob("*.nbi")), "no cache index written"
    probe = ("import numpy as np, fastce, fastce._runtime as r\n"
             "x = np.ones((4, 10), np.float32); t = np.arange(8)\n"
             "fastce.cross_entropy(x, t[:4])\n"
             "fastce.cross_entropy(np.ones((8, 100), np.float32), t)\n"
             "k = r._import_kernels()\n"
             "for f in (k.tiny.ce_index_tiny, k.cross_entropy.ce_index_small):\n"
             "    print(sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values()))\n")
    for line in _run_python(probe, env).splitlines():
        hits, misses = map(int, line.split())
        assert hits == 1 and misses == 0, line


def test_first_tiny_call_loads_without_numba_start_up(tmp_path):
    """With the tiny kernel cached, the first call in a fresh process loads it without numba's
    compiler start-up (``fastce._quickload``): numba's array-function registry (which imports
    SciPy's linalg when installed) is not imported.  The result is the float64 reference's, and
    a later call that needs compiling (float64 logits) still compiles and answers right."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    fill = ("import numpy as np, fastce\n"
            "fastce.cross_entropy(np.zeros((4, 10), np.float32), np.arange(4))\n")
    _run_python(fill, env)
    probe = ("import sys, numpy as np, fastce, fastce._runtime as r\n"
             "x = np.random.default_rng(1).standard_normal((4, 10)) * 5\n"
             "t = np.array([3, 0, 9, 5])\n"
             "loss, g = fastce.cross_entropy_with_grad(x.astype(np.float32), t)\n"
             "print('numba.np.arraymath' in sys.modules, 'scipy.linalg' in sys.modules)\n"
             "print(sum(r._import_kernels().tiny.ce_index_tiny.stats.cache_hits.values()))\n"
             "print(repr(float(loss)), repr(float(fastce.cross_entropy(x, t))))\n"
             "print(' '.join(repr(float(v)) for v in g.ravel()))\n")
    out = _run_python(probe, env)
    imported, hits, losses, grad = out.splitlines()
    assert imported == "False False", out
    assert int(hits) == 1
    x = np.random.default_rng(1).standard_normal((4, 10)) * 5
    t = np.array([3, 0, 9, 5])
    x32 = x.astype(np.float32).astype(np.float64)
    for xs, got in zip((x32, x), map(float, losses.split())):
        lse = np.log(np.exp(xs - xs.max(1, keepdims=True)).sum(1)) + xs.max(1)
        assert got == pytest.approx(np.mean(lse - xs[np.arange(4), t]), rel=1e-6)
    p = np.exp(x32 - x32.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(4), t] -= 1
    np.testing.assert_allclose(np.array(grad.split(), float).reshape(4, 10), p / 4,
                               rtol=1e-5, atol=1e-7)


def test_first_call_script_measures_a_quick_load(tmp_path):
    """benchmarks/first_call.py (the README's "First use" figures) runs, and with a filled
    cache the first call it times did not import SciPy's linalg (numba's start-up)."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "first_call.py"), "--runs",
                          "1", "--cache", "filled"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    line = out.stdout.splitlines()[-1]
    assert "first call" in line and line.endswith("scipy.linalg imported: False"), out.stdout


# ---------------------------------------------------------------------------------------------
# messages for common mistakes


class _FakeCudaArray:
    """A stand-in for a CUDA array: only the interface that marks one."""
    def __init__(self, shape, typestr):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr,
                                         "data": (0, False), "version": 3}


@pytest.mark.parametrize("call", [
    lambda d: fastce.cross_entropy(np.zeros((2, 3), np.float32), d((2,), "<i8")),
    lambda d: fastce.cross_entropy(np.zeros((2, 3), np.float32), np.arange(2),
                                   weight=d((3,), "<f4")),
    lambda d: fastce.binary_cross_entropy(np.full(3, 0.5, np.float32), d((3,), "<f4")),
    lambda d: fastce.binary_cross_entropy_with_logits(np.zeros(3), d((3,), "<f8")),
    lambda d: fastce.cross_entropy_with_grad(np.zeros((2, 3)), np.arange(2),
                                             reduction="none", grad_output=d((2,), "<f8")),
])
def test_cuda_argument_with_numpy_logits_says_different_devices(call):
    with pytest.raises(TypeError, match="different devices"):
        call(_FakeCudaArray)


def test_channels_last_logits_say_the_class_axis_is_1():
    x = np.zeros((2, 4, 5, 3), np.float32)          # (N, H, W, C)
    t = np.zeros((2, 4, 5), np.int64)               # (N, H, W)
    with pytest.raises(ValueError, match="class axis is 1") as e:
        fastce.cross_entropy(x, t)
    assert "moveaxis" in str(e.value) and "C=3" in str(e.value)
    # the advice works
    torch = pytest.importorskip("torch")
    moved = np.moveaxis(x, -1, 1)
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(np.ascontiguousarray(moved)),
                                            torch.from_numpy(t))
    assert np.isclose(fastce.cross_entropy(moved, t), ref.item())
    # (N, T, C) sequences, the NLP form of the same mistake
    with pytest.raises(ValueError, match="class axis is 1"):
        fastce.cross_entropy(np.zeros((2, 7, 5)), np.zeros((2, 7), np.int64))


@pytest.mark.parametrize("func, args, shown", [
    (fastce.binary_cross_entropy, (np.array([0.5, 1.2]), np.array([0.0, 1.0])), "found 1.2 "),
    (fastce.binary_cross_entropy, (np.array([0.5, 0.5], np.float32),
                                   np.array([0.0, -0.5], np.float32)), "found -0.5 "),
    (fastce.cross_entropy, (np.zeros((1, 2)), np.array([[0.5, -0.5]])), "found -0.5 "),
])
def test_bad_value_messages_share_one_format(func, args, shown):
    with pytest.raises(ValueError) as e:
        func(*args)
    assert shown in str(e.value) and "np." not in str(e.value), str(e.value)


def test_negative_class_weights_follow_torch():
    """torch accepts negative class weights silently and so does fastce (documented in the
    semantics table): the losses and gradients match, also when 'mean' divides by a
    negative sum of weights."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 4))
    t = np.array([0, 1, 2, 3, 1, 1])
    for w in (np.array([1.0, -0.5, 2.0, 0.25]), np.array([-1.0, -2.0, 0.5, 0.0])):
        for reduction in ("mean", "sum", "none"):
            xt = torch.tensor(x, requires_grad=True)
            ref = F.cross_entropy(xt, torch.tensor(t), weight=torch.tensor(w),
                                  reduction=reduction)
            ref.sum().backward()
            loss, grad = fastce.cross_entropy_with_grad(x, t, weight=w, reduction=reduction)
            np.testing.assert_allclose(loss, ref.detach().numpy(), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_missing_numba_cuda_names_both_install_commands(monkeypatch):
    import importlib.util

    import fastce.cuda as fc
    real = importlib.util.find_spec
    monkeypatch.setattr(fc, "_IMPL", None)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "numba_cuda" else real(name, *a))
    with pytest.raises(ImportError) as e:
        fc._backend()
    msg = str(e.value)
    assert "pip install 'fastce[cuda]'" in msg and "pip install -e '.[cuda]'" in msg
    gpu = (ROOT / "docs" / "gpu.md").read_text()
    assert 'pip install "fastce[cuda]"' in gpu and 'pip install -e ".[cuda]"' in gpu


def test_first_call_benchmark_code_runs():
    """benchmarks/bench_first_call.py's timeraw code (setup + timed statement) runs as asv
    runs it: the 'filled' setup compiles into a fresh cache, the timed part loads it."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.bench_first_call import FirstCall
    finally:
        sys.path.remove(str(ROOT))
    b = FirstCall()
    for cache, what in itertools.product(*FirstCall.params):
        stmt, setup = b.timeraw_first_call(cache, what)
        compile(setup, "setup", "exec")
        compile(stmt, "stmt", "exec")
    stmt, setup = b.timeraw_first_call("filled", "4x10")
    code = (setup + "\n" + stmt + "\nimport fastce._runtime as r\n"
            "print(r._import_kernels().tiny.ce_index_tiny.stats.cache_hits)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert "float32" in out.stdout, out.stdout      # loaded from the cache, not compiled


def test_report_says_what_it_read_and_left_out(tmp_path, capsys):
    """fastce-report without --commit names the results file it picked and how much of the
    suite that run holds (a subset run shows few rows; the report says why)."""
    import json

    from fastce import report
    res = tmp_path / "results"
    (res / "box").mkdir(parents=True)
    (res / "box" / "machine.json").write_text("{}")
    names = ["bench_a.A.time_x", "bench_a.A.time_y", "bench_b.B.track_z"]
    meta = {n: {"name": n, "param_names": ["n"], "params": [["1"]], "type": "time",
                "unit": "seconds"} for n in names}
    meta["version"] = 2
    (res / "benchmarks.json").write_text(json.dumps(meta))
    run = {"commit_hash": "abcdef123456", "env_name": "existing-py", "params": {},
           "result_columns": ["result", "params", "started_at"],
           "results": {"bench_a.A.time_x": [[0.5], [["1"]], 1]}}
    (res / "box" / "abcdef12-existing-py.json").write_text(json.dumps(run))
    assert report.main(["--results-dir", str(res), "-o", str(tmp_path / "out"),
                        "--no-plots", "-q"]) == 0
    err = capsys.readouterr().err
    assert "abcdef12-existing-py.json" in err and "commit abcdef12" in err, err
    assert "1 of the suite's 3 benchmarks" in err, err


def test_cached_kernel_gives_the_bits_of_a_fresh_compile(tmp_path):
    """A kernel loaded from the cache computes what the same kernel compiled in the process
    computes, to the bit.  numba compiles a callee (``tiles._ce_index_tile``) twice: in its
    own library and, re-optimized, inside each caller's module; a caller compiled in the
    process runs the former, one loaded from the cache the latter.  With "reassoc", code that
    leaves LLVM a regrouping (``acc * (buf * s)`` with ``acc * s`` loop-invariant) made the
    two copies 1 ulp apart in a quarter of the gradient: the small-call entry, compiled in a
    pytest-xdist worker, then disagreed with the general path loaded from the other worker's
    cache.  Here process 1 compiles the general path (row tiles, (32, 10) float32); process 2
    compiles the small-call entry, then loads the general path from the cache."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    probe = ("import sys, numpy as np, fastce, fastce._runtime as r, fastce._cross_entropy as c\n"
             "rng = np.random.default_rng(5)\n"
             "x = (rng.standard_normal((32, 10)) * 3).astype(np.float32)\n"
             "t = rng.integers(0, 10, size=32)\n"
             "t[-1] = -100\n"                # 'mean' over 31 rows: a g that rounds
             "if sys.argv[1] == 'both':\n"
             "    assert c._ce_small(x, t, -100, 'mean', True) is not None\n"
             "    print(fastce.cross_entropy_with_grad(x, t)[1].tobytes().hex())\n"
             "c._ce_small = lambda *a: None\n"
             "print(fastce.cross_entropy_with_grad(x, t)[1].tobytes().hex())\n"
             "print(sum(r._import_kernels().tiles.ce_index_tiles_serial.stats.cache_hits.values()))\n")
    general, hits = _run_python(probe, env, "general").split()
    assert hits == "0"                  # compiled
    small, general_loaded, hits = _run_python(probe, env, "both").split()
    assert hits == "1"                  # loaded from the cache
    assert general_loaded == general
    assert small == general
