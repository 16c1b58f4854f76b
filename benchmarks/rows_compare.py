"""Many short rows and tiny BCE calls side by side: fastce vs torch (eager) vs jax.jit, in one
process (issue #11 item 3); with ``--grid``, every report op over the report grid against
every strong peer (torch eager, torch.compile, jax.jit).

    python benchmarks/rows_compare.py                 # float32, 2 threads, 7 rounds
    python benchmarks/rows_compare.py --dtypes float32,float64 --rounds 9
    python benchmarks/rows_compare.py --kernels --dtypes float32,float64   # rows vs tiles
    python benchmarks/rows_compare.py --grid --quick  # 7 ops x 9 cells, a few minutes
    python benchmarks/rows_compare.py --grid --rounds 5   # the whole report grid
    python benchmarks/rows_compare.py --grid --batches 1 --classes 10,100,1000  # some cells

``--grid`` times what the asv suite times: its input makers (the ``bench_*`` classes'
``make_inputs``) and its implementation registry (``common.make_call``: ``fastce``,
``torch``, ``torch-compile``, ``jax``), over ``common.BATCHES`` x ``common.CLASSES`` capped by
``FASTCE_BENCH_MAX_ELEMENTS`` as the suite caps it.  It prints one row per cell (medians
in us, each peer's time over fastce's) and then the cells where fastce loses.

Thread counts are fixed before numba, torch and jax are imported (XLA's CPU thread pool cannot
be resized later).  Each cell runs ``--rounds`` interleaved rounds (every implementation once
per round, ``number`` calls timed per round, the round's median kept); the table shows the
median over rounds, each peer's time divided by fastce's (> 1: fastce is faster) and which
implementation was fastest.  Each implementation's block starts after a 20 ms pause and 3
untimed calls: the previous block's thread pool (torch's OpenMP workers spin after a parallel
region) would otherwise hold the other core during the first timed calls.
"""
import argparse
import os
import sys
import time

ROW_SHAPES = [(512, 32), (512, 100), (4096, 32), (4096, 100), (4096, 256)]
BCE_SHAPES = [(1, 10), (32, 10)]


def kernels(rounds, dtypes):
    """Serial kernels called directly, the rows kernels against the row tiles (the layout
    choice of ``_runtime._row_tiles``), in us: median of ``rounds`` interleaved rounds."""
    import numpy as np

    from fastce._runtime import _import_kernels
    k = _import_kernels()
    rows, ce, tiles = k.softmax, k.cross_entropy, k.tiles
    rng = np.random.default_rng(0)
    print("| dtype | N x C | forward rows / tiles | forward + grad | log_softmax | softmax |")
    print("|---|---|---|---|---|---|")
    for dname in dtypes:
        dt = np.dtype(dname).type
        for N, C in [(4096, 16), (4096, 32), (4096, 100), (4096, 192), (4096, 256), (100, 37)]:
            x = (rng.standard_normal((N, C)) * 3).astype(dt)
            t = rng.integers(0, C, N)
            e, g0, gs = np.empty(0, dt), np.empty((0, 0), dt), np.ones(1, dt)
            part, loss = np.empty((N, 1), dt), np.empty(N, dt)
            g, o = np.empty((N, C), dt), np.empty((N, C), dt)
            fns = {
                "fwd rows": lambda: ce.ce_index_rows_serial(x, t, -100, e, dt(C), 0.0, gs, g0,
                                                            part, 1, e, e),
                "fwd tiles": lambda: tiles.ce_index_tiles_serial(x, t, -100, e, dt(C), 0.0, gs,
                                                                 g0, loss),
                "grad rows": lambda: ce.ce_index_rows_serial(x, t, -100, e, dt(C), 0.0, gs, g,
                                                             part, 1, e, e),
                "grad tiles": lambda: tiles.ce_index_tiles_serial(x, t, -100, e, dt(C), 0.0, gs,
                                                                  g, loss),
                "lsm rows": lambda: rows.softmax_rows_serial(x, o, 1, 1, e, e),
                "lsm tiles": lambda: tiles.softmax_tiles_serial(x, o, 1),
                "sm rows": lambda: rows.softmax_rows_serial(x, o, 2, 1, e, e),
                "sm tiles": lambda: tiles.softmax_tiles_serial(x, o, 2),
            }
            for f in fns.values():
                f()
            res = {name: [] for name in fns}
            for _ in range(rounds):
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    for _ in range(10):
                        f()
                    res[name].append((time.perf_counter() - t0) / 10)
            med = {name: np.median(v) * 1e6 for name, v in res.items()}
            cells = [f"{med[a + ' rows']:.0f} / {med[a + ' tiles']:.0f}"
                     for a in ("fwd", "grad", "lsm", "sm")]
            print(f"| {dname} | {N} x {C} | " + " | ".join(cells) + " |")
            sys.stdout.flush()


# The report's seven timed ops: (label, asv module, class); each class's ``op`` and
# ``make_inputs`` say what is called on what.
GRID_OPS = [("forward", "bench_cross_entropy", "CrossEntropy"),
            ("forward+grad", "bench_cross_entropy", "CrossEntropyGrad"),
            ("logsumexp", "bench_logsumexp", "LogSumExp"),
            ("log_softmax", "bench_logsumexp", "LogSoftmax"),
            ("softmax", "bench_logsumexp", "Softmax"),
            ("bce", "bench_bce", "BinaryCrossEntropy"),
            ("bce_logits", "bench_bce", "BinaryCrossEntropyWithLogits")]
GRID_PEERS = ["torch", "torch-compile", "jax"]
QUICK_BATCHES, QUICK_CLASSES = [1, 512, 4096], [10, 100, 1000]


def _header(args, peers):
    """The run's conditions (threads, numba's layer, the load average) and the table head."""
    import fastce._runtime
    print(f"threads={args.threads} numba layer={fastce._runtime.threading_layer()} "
          f"loadavg={os.getloadavg()[0]:.2f}; us, median of {args.rounds} interleaved rounds "
          f"(each: every implementation, median of its single calls); (r x) = peer / fastce "
          f"(> 1: fastce faster)")
    cols = ["op", "dtype", "shape", "fastce"] + peers + ["fastest"]
    print("| " + " | ".join(cols) + " |")
    print("|---" * len(cols) + "|")


def _time_block(f, number, pause=0.01):
    """Median seconds of ``number`` single calls, after ``pause`` seconds (the previous
    implementation's thread pool may still be spinning on the other core -- torch's OpenMP
    workers do, for a while -- and goes idle) and 3 untimed calls."""
    import numpy as np
    time.sleep(pause)
    for _ in range(3):
        f()
    ts = []
    for _ in range(number):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def interleaved_medians(fns, rounds, block_seconds, max_number):
    """Median seconds per call of each of ``fns`` (name -> callable): each is called once
    (compiled peers compile there) and timed once to size its blocks (about
    ``block_seconds`` of single calls, 3 to ``max_number``), then ``rounds`` rounds time every
    callable's block in turn; the median over rounds of each block's median."""
    import numpy as np
    number = {}
    for k, f in fns.items():
        f()
        t0 = time.perf_counter()
        f()
        one = time.perf_counter() - t0
        number[k] = max(3, min(max_number, int(block_seconds / max(one, 1e-7))))
    per_round = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            per_round[k].append(_time_block(f, number[k]))
    return {k: float(np.median(v)) for k, v in per_round.items()}


def grid(args):
    """Every report op over the report grid: fastce against each peer, interleaved rounds."""
    import importlib

    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    C = importlib.import_module("benchmarks.common")
    import torch._dynamo
    # one specialization per shape (reference._compiled_kernel): lift dynamo's per-function
    # recompile limit, or after 8 shapes torch.compile silently runs eager
    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 4096)
    C.configure_threads()
    import fastce._runtime
    batches = QUICK_BATCHES if args.quick else C.BATCHES
    classes = QUICK_CLASSES if args.quick else C.CLASSES
    if args.batches:
        batches = [int(v) for v in args.batches.split(",")]
    if args.classes:
        classes = [int(v) for v in args.classes.split(",")]
    only = set(filter(None, args.only.split(",")))
    impls = ["fastce"] + GRID_PEERS
    _header(args, ["torch", "torch.compile", "jax.jit"])
    losses = []
    for dname in args.dtypes.split(","):
        for label, mod, cls in GRID_OPS:
            if only and label not in only:
                continue
            bench = getattr(importlib.import_module(f"benchmarks.{mod}"), cls)()
            for N in batches:
                for K in classes:
                    if N * K > C.max_elements():
                        continue
                    arrays, kwargs = bench.make_inputs(N, K, dname)
                    fns = {}
                    for impl in impls:
                        try:
                            fns[impl] = C.make_call(impl, bench.op, *arrays, **kwargs)
                        except NotImplementedError:
                            continue
                    # about 20 ms of single calls per block, 3 to 1000 of them
                    med = interleaved_medians(fns, args.rounds, 0.02, 1000)
                    base = med["fastce"]
                    best = min(med, key=med.get)
                    cells = [f"{base * 1e6:.1f}"]
                    for impl in GRID_PEERS:
                        cells.append(f"{med[impl] * 1e6:.1f} ({med[impl] / base:.2f}x)"
                                     if impl in med else "-")
                    cells.append(best if best == "fastce" else
                                 f"{best} ({base / med[best]:.2f}x)")
                    print(f"| {label} | {dname} | {N}x{K} | " + " | ".join(cells) + " |")
                    sys.stdout.flush()
                    if best != "fastce":
                        losses.append((label, dname, N, K, best, base / med[best]))
    print(f"\nfastce loses {len(losses)} cells (fastce time / fastest peer's; loadavg "
          f"{os.getloadavg()[0]:.2f} at the end):")
    for label, dname, N, K, best, r in sorted(losses, key=lambda e: -e[-1]):
        print(f"  {label:13s} {dname} {N}x{K}: {r:.2f}x slower than {best}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--only", default="", help="comma-separated op names to run")
    ap.add_argument("--grid", action="store_true",
                    help="the 7 report ops over the report grid vs torch, torch.compile, jax")
    ap.add_argument("--quick", action="store_true",
                    help="with --grid: batches 1, 512, 4096 x classes 10, 100, 1000")
    ap.add_argument("--batches", default="",
                    help="with --grid: comma-separated batch sizes (instead of the grid's)")
    ap.add_argument("--classes", default="",
                    help="with --grid: comma-separated class counts (instead of the grid's)")
    ap.add_argument("--kernels", action="store_true",
                    help="serial rows kernels vs row tiles, called directly (one thread)")
    args = ap.parse_args()
    if args.kernels:
        os.environ["NUMBA_NUM_THREADS"] = "1"
        return kernels(args.rounds, args.dtypes.split(","))
    t = str(args.threads)
    os.environ["NUMBA_NUM_THREADS"] = t
    os.environ["OMP_NUM_THREADS"] = t
    if args.grid:
        # XLA's CPU pool is sized by PJRT_NPROC (benchmarks/common.py sets it from numba's count)
        os.environ["PJRT_NPROC"] = t
        return grid(args)
    multi = "true" if args.threads > 1 else "false"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_cpu_multi_thread_eigen={multi}"
                               f" intra_op_parallelism_threads={t}")
    import numpy as np
    import numba
    import torch
    import jax
    import jax.numpy as jnp
    import fastce
    import fastce._runtime
    jax.config.update("jax_enable_x64", True)
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    F = torch.nn.functional

    def jax_ce(x, t):
        lp = jax.nn.log_softmax(x, axis=-1)
        return -jnp.take_along_axis(lp, t[:, None], axis=-1).mean()

    def ce_fwd(x, t):
        xt, tt = torch.from_numpy(x), torch.from_numpy(t)
        f = jax.jit(jax_ce)
        xj, tj = jnp.asarray(x), jnp.asarray(t)
        return {"fastce": lambda: fastce.cross_entropy(x, t),
                "torch": lambda: F.cross_entropy(xt, tt),
                "jax": lambda: f(xj, tj).block_until_ready()}

    def ce_grad(x, t):
        xt, tt = torch.from_numpy(x), torch.from_numpy(t)

        def tb():
            q = xt.detach().requires_grad_()
            F.cross_entropy(q, tt).backward()
            return q.grad
        f = jax.jit(jax.value_and_grad(jax_ce))
        xj, tj = jnp.asarray(x), jnp.asarray(t)
        return {"fastce": lambda: fastce.cross_entropy_with_grad(x, t), "torch": tb,
                "jax": lambda: jax.block_until_ready(f(xj, tj))}

    def log_softmax(x, t):
        xt = torch.from_numpy(x)
        f = jax.jit(lambda x: jax.nn.log_softmax(x, axis=-1))
        xj = jnp.asarray(x)
        return {"fastce": lambda: fastce.log_softmax(x),
                "torch": lambda: torch.log_softmax(xt, -1),
                "jax": lambda: f(xj).block_until_ready()}

    def softmax(x, t):
        xt = torch.from_numpy(x)
        f = jax.jit(lambda x: jax.nn.softmax(x, axis=-1))
        xj = jnp.asarray(x)
        return {"fastce": lambda: fastce.softmax(x),
                "torch": lambda: torch.softmax(xt, -1),
                "jax": lambda: f(xj).block_until_ready()}

    def logsumexp(x, t):
        xt = torch.from_numpy(x)
        f = jax.jit(lambda x: jax.nn.logsumexp(x, axis=-1))
        xj = jnp.asarray(x)
        return {"fastce": lambda: fastce.logsumexp(x),
                "torch": lambda: torch.logsumexp(xt, -1),
                "jax": lambda: f(xj).block_until_ready()}

    def bce_expr(xp):
        return lambda p, y: -(y * xp.maximum(xp.log(p), -100)
                              + (1 - y) * xp.maximum(xp.log1p(-p), -100)).mean()

    def logits_expr(xp):
        return lambda x, y: (xp.maximum(x, 0) - x * y + xp.log1p(xp.exp(-xp.abs(x)))).mean()

    def bce(p, y):
        pt, yt = torch.from_numpy(p), torch.from_numpy(y)
        f = jax.jit(bce_expr(jnp))
        pj, yj = jnp.asarray(p), jnp.asarray(y)
        return {"fastce": lambda: fastce.binary_cross_entropy(p, y),
                "torch": lambda: F.binary_cross_entropy(pt, yt),
                "jax": lambda: f(pj, yj).block_until_ready()}

    def bce_grad(p, y):
        pt, yt = torch.from_numpy(p), torch.from_numpy(y)

        def tb():
            q = pt.detach().requires_grad_()
            F.binary_cross_entropy(q, yt).backward()
            return q.grad
        f = jax.jit(jax.value_and_grad(bce_expr(jnp)))
        pj, yj = jnp.asarray(p), jnp.asarray(y)
        return {"fastce": lambda: fastce.binary_cross_entropy_with_grad(p, y), "torch": tb,
                "jax": lambda: jax.block_until_ready(f(pj, yj))}

    def bce_logits(x, y):
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        f = jax.jit(logits_expr(jnp))
        xj, yj = jnp.asarray(x), jnp.asarray(y)
        return {"fastce": lambda: fastce.binary_cross_entropy_with_logits(x, y),
                "torch": lambda: F.binary_cross_entropy_with_logits(xt, yt),
                "jax": lambda: f(xj, yj).block_until_ready()}

    def bce_logits_grad(x, y):
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)

        def tb():
            q = xt.detach().requires_grad_()
            F.binary_cross_entropy_with_logits(q, yt).backward()
            return q.grad
        f = jax.jit(jax.value_and_grad(logits_expr(jnp)))
        xj, yj = jnp.asarray(x), jnp.asarray(y)
        return {"fastce": lambda: fastce.binary_cross_entropy_with_logits_with_grad(x, y),
                "torch": tb, "jax": lambda: jax.block_until_ready(f(xj, yj))}

    row_ops = [("forward", ce_fwd), ("forward+grad", ce_grad), ("log_softmax", log_softmax),
               ("softmax", softmax), ("logsumexp", logsumexp)]
    bce_ops = [("bce", bce), ("bce+grad", bce_grad), ("bce_logits", bce_logits),
               ("bce_logits+grad", bce_logits_grad)]
    only = set(filter(None, args.only.split(",")))
    rng = np.random.default_rng(0)
    _header(args, ["torch", "jax.jit"])
    cases = []
    for dname in args.dtypes.split(","):
        dt = np.dtype(dname)
        for name, make in row_ops:
            for shape in ROW_SHAPES:
                x = (rng.standard_normal(shape) * 3).astype(dt)
                tg = rng.integers(0, shape[1], shape[0])
                cases.append((name, dname, shape, make, (x, tg)))
        for name, make in bce_ops:
            for shape in BCE_SHAPES:
                if "logits" in name:
                    a = (rng.standard_normal(shape) * 3).astype(dt)
                else:
                    a = rng.uniform(0.001, 0.999, shape).astype(dt)
                y = rng.random(shape).astype(dt)
                cases.append((name, dname, shape, make, (a, y)))
    for name, dname, shape, make, data in cases:
        if only and name not in only:
            continue
        n = shape[0] * shape[1]
        number = max(20, min(2000, int(3e6 // (n * 20 + 3000))))
        fns = make(*data)
        for f in fns.values():
            f()
            f()
        rounds = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, f in fns.items():
                rounds[k].append(_time_block(f, number, 0.02))
        med = {k: float(np.median(v)) for k, v in rounds.items()}
        base = med["fastce"]
        best = min(med, key=med.get)
        cells = [f"{base * 1e6:.1f}"]
        for k in ("torch", "jax"):
            cells.append(f"{med[k] * 1e6:.1f} ({med[k] / base:.2f}x)")
        cells.append(best if best == "fastce" else f"{best} ({base / med[best]:.2f}x)")
        print(f"| {name} | {dname} | {shape[0]}x{shape[1]} | " + " | ".join(cells) + " |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
