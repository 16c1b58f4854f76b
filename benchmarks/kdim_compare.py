"""The K-dim cross-entropy cells (``bench_cross_entropy.CrossEntropyKDim`` and ``...KDimGrad``:
(N, C, d1, d2) logits, class axis 1) side by side in one process: fastce against torch,
torch.compile and jax.jit, and optionally against another fastce checkout (``--baseline``).

    python benchmarks/kdim_compare.py                        # asv's K-dim shapes, both dtypes
    python benchmarks/kdim_compare.py --baseline /tmp/main   # + a column for that checkout
    python benchmarks/kdim_compare.py --shapes 16x2x256x256,4x5x64x64 --ops forward

The inputs are the asv classes' own (``make_inputs``), the peers asv's registry
(``common.make_call``).  ``--baseline DIR`` imports ``DIR/fastce`` under another name
(``fastce_baseline``; its numba cache stays in DIR) and times its ``cross_entropy`` /
``cross_entropy_with_grad`` on the same arrays.  Each cell runs ``--rounds`` interleaved
rounds (every implementation once per round, the median of its single calls kept; each
block after a pause and 3 untimed calls, as ``rows_compare.py`` does); the table shows the
median over rounds in ms and each column's time over fastce's (> 1: fastce faster).
"""
import argparse
import importlib
import importlib.util
import os
import sys

OPS = {"forward": ("CrossEntropyKDim", "cross_entropy"),
       "forward+grad": ("CrossEntropyKDimGrad", "cross_entropy_with_grad")}
PEERS = ["torch", "torch-compile", "jax"]


def _load_baseline(path):
    """``path/fastce`` as the package ``fastce_baseline`` (its relative imports stay inside).

    Its kernels cache in a directory of their own (numba picks a dispatcher's cache
    location when the kernel module is imported): cached under the other name in the
    checkout's ``__pycache__``, they would fail to load there as ``fastce``."""
    import tempfile

    import numba
    init = os.path.join(os.path.abspath(path), "fastce", "__init__.py")
    spec = importlib.util.spec_from_file_location(
        "fastce_baseline", init, submodule_search_locations=[os.path.dirname(init)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fastce_baseline"] = mod
    saved = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = os.path.join(tempfile.gettempdir(), "fastce-baseline-cache")
    try:
        spec.loader.exec_module(mod)     # imports the kernels (fastce._cross_entropy does)
    finally:
        numba.config.CACHE_DIR = saved
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--ops", default="forward,forward+grad")
    ap.add_argument("--shapes", default="",
                    help="comma-separated NxCxHxW (default: the asv suite's KDIM_SHAPES)")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--baseline", default="", help="another checkout's root to compare with")
    args = ap.parse_args()
    t = str(args.threads)
    os.environ["NUMBA_NUM_THREADS"] = t
    os.environ["OMP_NUM_THREADS"] = t
    os.environ["PJRT_NPROC"] = t
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    C = importlib.import_module("benchmarks.common")
    bench_mod = importlib.import_module("benchmarks.bench_cross_entropy")
    from benchmarks.rows_compare import interleaved_medians
    import torch._dynamo
    for knob in ("cache_size_limit", "recompile_limit"):    # one compile per shape
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 4096)
    C.configure_threads()
    import fastce._runtime
    base = _load_baseline(args.baseline) if args.baseline else None
    shapes = ([tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
              if args.shapes else C.KDIM_SHAPES)
    peers = [p for p in args.peers.split(",") if p]
    cols = (["baseline"] if base else []) + peers
    print(f"threads={args.threads} numba layer={fastce._runtime.threading_layer()} "
          f"loadavg={os.getloadavg()[0]:.2f}; ms, median of {args.rounds} interleaved rounds; "
          f"(r x) = column / fastce (> 1: fastce faster)"
          + (f"; baseline = {args.baseline}" if base else ""))
    head = ["op", "dtype", "shape", "fastce"] + cols + ["fastest"]
    print("| " + " | ".join(head) + " |")
    print("|---" * len(head) + "|")
    for op in args.ops.split(","):
        cls, func = OPS[op]
        bench = getattr(bench_mod, cls)()
        for dname in args.dtypes.split(","):
            for shape in shapes:
                arrays, kwargs = bench.make_inputs(shape, dname)
                fns = {"fastce": C.make_call("fastce", func, *arrays, **kwargs)}
                if base:
                    f_base = getattr(base, func)
                    fns["baseline"] = (lambda f=f_base: f(*arrays, **kwargs))
                for p in peers:
                    try:
                        fns[p] = C.make_call(p, func, *arrays, **kwargs)
                    except NotImplementedError:
                        pass
                med = interleaved_medians(fns, args.rounds, 0.1, 200)
                ref = med["fastce"]
                best = min((k for k in med if k != "baseline"), key=med.get)
                cells = [f"{ref * 1e3:.2f}"]
                for k in cols:
                    cells.append(f"{med[k] * 1e3:.2f} ({med[k] / ref:.2f}x)" if k in med
                                 else "-")
                cells.append(best if best == "fastce" else f"{best} ({ref / med[best]:.2f}x)")
                print(f"| {op} | {dname} | {'x'.join(map(str, shape))} | "
                      + " | ".join(cells) + " |")
                sys.stdout.flush()
    print(f"\nloadavg {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
