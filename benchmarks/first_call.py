"""The first call of a fastce function in fresh processes, for the README's "First use" table.

Each sample is a new interpreter with its own ``NUMBA_CACHE_DIR``: with ``--cache empty`` a
new directory (the call compiles), with ``--cache filled`` one directory per tree that one
untimed process filled first (the call loads).  Several trees (``--tree DIR[:PYTHON]``, e.g.
a checkout of main and this one, or the same tree under a core-install interpreter) run
interleaved, so load on a shared machine hits them alike.  Printed per tree: medians of
``import fastce`` (numpy and numba included) and of the first call, wall and the process's
CPU time (steadier than wall on a busy machine), and whether SciPy got imported.

    python benchmarks/first_call.py --runs 9 --cache filled --call cross_entropy --shape 4x10 \\
        --tree /path/to/main --tree .:/path/to/core-venv/bin/python
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

_CHILD = """
import sys, time
c0, w0 = time.process_time(), time.perf_counter()
import fastce
import numpy as np
c1, w1 = time.process_time(), time.perf_counter()
shape = {shape}
x = np.random.default_rng(0).standard_normal(shape).astype("{dtype}")
y = np.arange(shape[0]) % shape[1]
f = fastce.{call}
c2, w2 = time.process_time(), time.perf_counter()
f(x, y) if "{call}".startswith("cross_entropy") else f(x)
c3, w3 = time.process_time(), time.perf_counter()
print(w1 - w0, c1 - c0, w3 - w2, c3 - c2, "scipy.linalg" in sys.modules)
"""


def _run(tree, python, cache_dir, code):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir, PYTHONPATH=os.path.abspath(tree))
    out = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True,
                         cwd=tempfile.gettempdir(), check=True)
    return out.stdout.split()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--cache", choices=("empty", "filled"), default="filled")
    ap.add_argument("--call", default="cross_entropy")
    ap.add_argument("--shape", default="4x10")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tree", action="append", help="DIR[:PYTHON] (default: this tree)")
    args = ap.parse_args(argv)
    shape = tuple(int(n) for n in args.shape.split("x"))
    code = _CHILD.format(shape=shape, dtype=args.dtype, call=args.call)
    trees = [(t.split(":", 1) + [sys.executable])[:2]
             for t in (args.tree or [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))])]
    filled = {}
    if args.cache == "filled":
        for tree, python in trees:
            filled[tree, python] = tempfile.mkdtemp(prefix="fastce-first-call-")
            _run(tree, python, filled[tree, python], code)
    samples = {t: [] for t in map(tuple, trees)}
    try:
        for _ in range(args.runs):
            for tree, python in trees:
                cache = filled.get((tree, python)) or tempfile.mkdtemp(prefix="fastce-first-call-")
                samples[tree, python].append(_run(tree, python, cache, code))
                if (tree, python) not in filled:
                    shutil.rmtree(cache, True)
    finally:
        for d in filled.values():
            shutil.rmtree(d, True)
    print(f"{args.call} {args.dtype} {args.shape}, {args.cache} cache, medians of {args.runs} "
          f"fresh processes (load average {os.getloadavg()[0]:.1f}):")
    for (tree, python), rows in samples.items():
        iw, ic, fw, fc = (statistics.median(float(r[i]) for r in rows) for i in range(4))
        lo, hi = min(float(r[2]) for r in rows), max(float(r[2]) for r in rows)
        print(f"  {tree} ({python}): import fastce {iw:.3f} s (CPU {ic:.3f}), first call "
              f"{fw:.3f} s (CPU {fc:.3f}; wall {lo:.3f}-{hi:.3f}), scipy.linalg imported: "
              f"{rows[0][4]}")


if __name__ == "__main__":
    main()
