"""Threads, child processes, the threading layer, the numba cache location, and the import
footprint.

Everything that needs a fresh interpreter runs in a subprocess; this module does not import
torch (spawned children re-import it)."""
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastce

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code, tmp_path=None, env=None, timeout=300, script=False):
    """Run ``code`` in a fresh interpreter (as a script file when ``script``); returns the
    CompletedProcess."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
    for k, v in (env or {}).items():
        if v is None:
            full_env.pop(k, None)
        else:
            full_env[k] = v
    code = textwrap.dedent(code)
    if script:
        path = tmp_path / "script.py"
        path.write_text(code)
        args = [sys.executable, str(path)]
    else:
        args = [sys.executable, "-c", code]
    return subprocess.run(args, capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=str(tmp_path) if tmp_path else None)


def _ok(proc):
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# ---------------------------------------------------------------------------------------------
# threads

def _workload():
    """(name, call) pairs, each large enough to run a parallel kernel (serial, split-row and
    spatial paths), with results computed once up front."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((300, 257)).astype(np.float32)
    t = rng.integers(0, 257, 300)
    long_rows = rng.standard_normal((2, 70000)).astype(np.float32)
    kdim = rng.standard_normal((64, 9, 130))
    kt = rng.integers(0, 9, (64, 130))
    p = rng.random((300, 257)).astype(np.float32)
    calls = [
        ("ce_grad", lambda: fastce.cross_entropy_with_grad(x, t, label_smoothing=0.1)),
        ("softmax", lambda: fastce.softmax(x)),
        ("lse_split", lambda: fastce.logsumexp(long_rows)),
        ("ce_kdim", lambda: fastce.cross_entropy_with_grad(kdim, kt, reduction="none")),
        ("bce", lambda: fastce.binary_cross_entropy_with_logits(x, p, reduction="none")),
    ]
    return [(name, f, f()) for name, f in calls]


def _same(a, b):
    if isinstance(a, tuple):
        return all(_same(u, v) for u, v in zip(a, b))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    return True


def test_threads_8x50_parallel_kernels():
    """8 Python threads x 50 calls of the parallel kernels at once: correct results, no
    abort (the layer is a thread-safe one: omp here, tbb where installed)."""
    work = _workload()
    n_threads, n_calls = 8, 50
    barrier = threading.Barrier(n_threads)
    errors, done = [], []

    def run(k):
        try:
            barrier.wait()
            for i in range(n_calls):
                name, f, want = work[(k + i) % len(work)]
                _same(f(), want)
            done.append(k)
        except BaseException as exc:  # noqa: BLE001 -- reported below
            errors.append((k, repr(exc)))

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert not errors, errors
    assert sorted(done) == list(range(n_threads))
    assert fastce._runtime.threading_layer() in ("omp", "tbb")


THREAD_SCRIPT = """
import threading, numpy as np, numba, fastce
x = np.random.default_rng(0).standard_normal((300, 257))
t = np.arange(300) % 257
want = fastce.cross_entropy_with_grad(x, t)
errors = []
def run():
    try:
        for _ in range(20):
            loss, g = fastce.cross_entropy_with_grad(x, t)
            assert loss == want[0] and np.array_equal(g, want[1])
    except BaseException as exc:
        errors.append(repr(exc))
ths = [threading.Thread(target=run) for _ in range(4)]
[th.start() for th in ths]
run()
[th.join() for th in ths]
assert not errors, errors
print(numba.threading_layer(), numba.config.THREADING_LAYER)
"""


def test_layer_pinned_to_threadsafe_in_fresh_process():
    out = _ok(_python(THREAD_SCRIPT, env={"NUMBA_THREADING_LAYER": None}))
    layer, config = out.split()
    assert layer in ("omp", "tbb") and config == "threadsafe"


def _tbb_distribution_installed():
    from importlib import metadata
    try:
        metadata.version("tbb")
        return True
    except metadata.PackageNotFoundError:
        return False


def test_pip_tbb_is_found_and_chosen():
    """pip's ``tbb`` wheel puts libtbb in the environment's lib/, where numba's tbbpool does
    not look; fastce loads it at import, so the layer becomes tbb -- also when the user's own
    code (not fastce) launches numba's layer first."""
    if not _tbb_distribution_installed():
        pytest.skip("the tbb distribution is not installed (a fastce dependency on x86-64)")
    out = _ok(_python("""
        import numba, fastce
        numba.get_num_threads()                 # numba's default choice, launched by the user
        print(numba.threading_layer())
    """, env={"NUMBA_THREADING_LAYER": None}))
    assert out.split() == ["tbb"]
    out = _ok(_python(THREAD_SCRIPT, env={"NUMBA_THREADING_LAYER": None}))
    assert out.split() == ["tbb", "threadsafe"]


def test_user_choice_of_omp_is_respected():
    out = _ok(_python(THREAD_SCRIPT, env={"NUMBA_THREADING_LAYER": "omp"}))
    assert out.split() == ["omp", "omp"]


def test_one_thread_takes_the_serial_kernels():
    """``numba.set_num_threads(1)`` (per thread) makes large calls take the serial kernels,
    with the same results as the parallel ones."""
    import numba
    rng = np.random.default_rng(3)
    x = rng.standard_normal((512, 300))
    t = rng.integers(0, 300, 512)
    assert fastce._runtime._parallel(x.size) == (numba.get_num_threads() > 1)
    want = (fastce.log_softmax(x), fastce.cross_entropy_with_grad(x, t))
    prev = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        assert not fastce._runtime._parallel(x.size)
        got = (fastce.log_softmax(x), fastce.cross_entropy_with_grad(x, t))
    finally:
        numba.set_num_threads(prev)
    _same(got, want)


def test_user_choice_of_workqueue_is_respected_and_does_not_abort():
    """workqueue aborts the process when two threads run parallel kernels at once; fastce
    then runs parallel kernels from the main thread only (others take the serial twins)."""
    out = _ok(_python(THREAD_SCRIPT, env={"NUMBA_THREADING_LAYER": "workqueue"}))
    assert out.split() == ["workqueue", "workqueue"]


# ---------------------------------------------------------------------------------------------
# processes

PROCESS_SCRIPT = """
import multiprocessing as mp, sys
import numpy as np
import fastce

def work(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((300, 257))          # parallel kernel
    t = rng.integers(0, 257, 300)
    loss, g = fastce.cross_entropy_with_grad(x, t)
    return float(loss), float(np.abs(g).sum()), float(fastce.logsumexp(x[:2, :10]).sum())

if __name__ == "__main__":
    method = sys.argv[1]
    want = [work(s) for s in range(3)]            # the parent has launched its thread pool
    ctx = mp.get_context(method)
    with ctx.Pool(2) as pool:
        got = pool.map(work, range(3))
    assert np.allclose(got, want, rtol=1e-12), (got, want)
    print("ok", method)
"""


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_child_processes(method, tmp_path):
    """spawn and forkserver children work; fork works too: GNU OpenMP is not fork-safe (a
    forked child's first parallel region kills it), so a child forked from a process whose
    omp pool is running takes the serial kernels."""
    if method not in __import__("multiprocessing").get_all_start_methods():
        pytest.skip(f"{method} unavailable")
    out = _ok(_python(PROCESS_SCRIPT.replace("sys.argv[1]", repr(method)), tmp_path,
                      script=True))
    assert f"ok {method}" in out


# ---------------------------------------------------------------------------------------------
# numba cache location

IMPORT_AND_RUN = """
import numpy as np, fastce
print(float(fastce.cross_entropy(np.zeros((2, 3)), np.array([0, 1]))))
"""


def _unusable(tmp_path):
    """A path that cannot be created, even by root: it lies below a regular file."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    return str(blocker / "cache")


def test_cache_dir_absent_or_unwritable(tmp_path):
    for cache in (_unusable(tmp_path), str(tmp_path / "does" / "not" / "exist")):
        out = _ok(_python(IMPORT_AND_RUN, tmp_path, env={"NUMBA_CACHE_DIR": cache}))
        assert float(out) == pytest.approx(np.log(3))


def test_no_writable_cache_location_anywhere(tmp_path):
    """Package directory read-only (here: its __pycache__ cannot be created), no user cache
    dir and an unusable NUMBA_CACHE_DIR: numba would raise at import ("no locator
    available"); fastce falls back to a private temporary cache directory."""
    import shutil
    pkg = tmp_path / "site"
    shutil.copytree(os.path.join(REPO, "fastce"), pkg / "fastce",
                    ignore=shutil.ignore_patterns("__pycache__", "cuda"))
    (pkg / "fastce" / "cuda").mkdir()
    (pkg / "fastce" / "cuda" / "__init__.py").write_text("")
    for d in (pkg / "fastce", pkg / "fastce" / "_cpu"):
        (d / "__pycache__").write_text("")       # a file where the cache dir would go
    bad = _unusable(tmp_path)
    env = {"NUMBA_CACHE_DIR": bad, "HOME": bad, "XDG_CACHE_HOME": bad,
           "PYTHONPATH": str(pkg), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", IMPORT_AND_RUN + "print(fastce.__file__)"],
                          capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
                          env={**os.environ, **env})
    out = _ok(proc)
    assert str(pkg) in out and float(out.split()[0]) == pytest.approx(np.log(3))


# Two processes compile two signatures of one cached kernel at once (xdist workers, the
# precompile workers).  numba updates the kernel's index by read-modify-write, then writes the
# data file; this child widens the window the way a descheduled process on a loaded machine
# does: each save waits until both processes have read the index (or 4 s), then sleeps its
# own delays before writing the index and the data.  Unguarded, the index ends up filing
# float64 under a data file that holds the float32 code (numba#4807).
CACHE_RACE_CHILD = """
import os, sys, time
import numpy as np
from numba.core import caching

me, cache = sys.argv[1], os.environ["NUMBA_CACHE_DIR"]
index_delay, data_delay = {"f32": (0.5, 2.0), "f64": (1.0, 0.0)}[me]
save_index, save_data = caching.IndexDataCacheFile._save_index, caching.IndexDataCacheFile._save_data

def slow_save_index(self, overloads):
    open(os.path.join(cache, "read-" + me), "w").close()
    t0 = time.time()
    while time.time() - t0 < 4 and not all(
            os.path.exists(os.path.join(cache, "read-" + k)) for k in ("f32", "f64")):
        time.sleep(0.01)
    time.sleep(index_delay)
    save_index(self, overloads)

def slow_save_data(self, name, data):
    time.sleep(data_delay)
    save_data(self, name, data)

caching.IndexDataCacheFile._save_index = slow_save_index
caching.IndexDataCacheFile._save_data = slow_save_data
from fastce import _runtime
tiny = _runtime._import_kernels().tiny
dt = np.float32 if me == "f32" else np.float64
x = np.zeros((2, 3), dt)
loss, bad = tiny.ce_index_tiny(x, np.zeros(2, np.int64), -100, True, np.empty((0, 0), dt))
print(repr(float(loss)))
"""


def test_concurrent_cache_fills_stay_consistent(tmp_path):
    """Two processes fill the cache of one kernel with two signatures at once; a third then
    loads each signature from the cache: the right results (every index entry holds the code
    of the signature it is filed under)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    script = tmp_path / "child.py"
    script.write_text(CACHE_RACE_CHILD)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache),
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, str(script), k], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k in ("f32", "f64")]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert float(out) == pytest.approx(np.log(3))
    check = """
    import glob, os, pickle, numpy as np
    from fastce import _runtime
    tiny = _runtime._import_kernels().tiny
    for nbi in glob.glob(os.path.join(os.environ["NUMBA_CACHE_DIR"], "**", "*.nbi"),
                         recursive=True):
        with open(nbi, "rb") as f:
            pickle.load(f)
            stamp, overloads = pickle.loads(f.read())
        for key, name in overloads.items():
            with open(os.path.join(os.path.dirname(nbi), name), "rb") as f:
                held = pickle.loads(f.read())[3].args
            print("filed", key[0] == held)
    for dt in (np.float32, np.float64):
        x = np.zeros((2, 3), dt)
        print("loss", float(tiny.ce_index_tiny(x, np.zeros(2, np.int64), -100, True,
                                               np.empty((0, 0), dt))[0]))
    print("hits", sum(tiny.ce_index_tiny.stats.cache_hits.values()))
    """
    out = _ok(_python(check, tmp_path, env={"NUMBA_CACHE_DIR": str(cache)})).split("\n")
    assert "filed False" not in out, out
    assert out.count("filed True") >= 2, out
    for line in out:
        if line.startswith("loss"):
            assert float(line.split()[1]) == pytest.approx(np.log(3), rel=1e-6), out
    assert int(out[-2].split()[1]) == 2, out        # both loaded from the cache


# ---------------------------------------------------------------------------------------------
# import footprint

def test_import_needs_only_numba_and_numpy():
    """``import fastce`` pulls in neither scipy, torch nor matplotlib, and works (including a
    kernel call) when they cannot be imported at all."""
    out = _ok(_python("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("scipy", "torch", "matplotlib", "numba_cuda"):
                    raise ImportError(f"blocked: {name}")
        sys.meta_path.insert(0, Block())
        import fastce, numpy as np
        print(float(fastce.softmax(np.array([0.0, 0.0]))[0]))
        print(sorted(m for m in ("scipy", "torch", "matplotlib") if m in sys.modules))
    """))
    assert out.split("\n")[:2] == ["0.5", "[]"]
    # numba itself imports scipy when it is installed (for its LAPACK bindings): fastce adds
    # nothing to what ``import numba`` loads.
    out = _ok(_python("""
        import sys
        heavy = ("scipy", "torch", "matplotlib")
        import numba
        before = {m for m in heavy if m in sys.modules}
        import fastce
        print(sorted({m for m in heavy if m in sys.modules} - before), "torch" in sys.modules,
              "matplotlib" in sys.modules)
    """))
    assert out.split() == ["[]", "False", "False"]
