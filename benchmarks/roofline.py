"""fastce vs PyTorch vs the memory-bandwidth roof, measured side by side in one process.

Usage::

    python benchmarks/roofline.py [--rounds 7] [--dtype float32|float64|both] [--quick]
    python benchmarks/roofline.py --micro      # single-thread throughput of the primitives
    python benchmarks/roofline.py --busy       # single calls with the neighbour core spinning

For every case of the CPU-speed targets (docs/performance.md) it prints fastce's median time,
torch's median time, the speedup, and fastce's fraction of the roof: a numba one-pass parallel
read of the same logits (forward) or a read + write pass into a preallocated array
(forward + gradient, softmax, log_softmax).  The implementations are timed in interleaved
rounds (A, B, roof, A, B, roof, ...) so that machine noise hits them alike; each entry is the
median over rounds.  Compilation and torch warm-up happen before timing.
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastce  # noqa: E402
from fastce._config import FASTMATH  # noqa: E402
from numba import get_num_threads, njit, prange  # noqa: E402


@njit(fastmath=FASTMATH, parallel=True, cache=True)
def _read_roof(x2, out):
    for i in prange(x2.shape[0]):
        row = x2[i]
        acc = row.dtype.type(0)
        for j in range(row.shape[0]):
            acc += row[j]
        out[i] = acc


@njit(fastmath=FASTMATH, parallel=True, cache=True)
def _read_write_roof(x2, y2):
    for i in prange(x2.shape[0]):
        row = x2[i]
        orow = y2[i]
        for j in range(row.shape[0]):
            orow[j] = row[j] * row.dtype.type(0.5)


def _micro():
    """Single-thread throughput of the primitives on an L1-resident 2048-element row."""
    from fastce._cpu.primitives import exp, exp_term, nan_max, row_max_sumexp, wide_vectors

    @njit(fastmath=FASTMATH)
    def plain_sum(x, reps):
        wide_vectors()
        acc = x.dtype.type(0)
        for _ in range(reps):
            for j in range(x.shape[0]):
                acc += x[j]
        return acc

    @njit(fastmath=FASTMATH)
    def nan_propagating_max(x, reps):
        wide_vectors()
        acc = x.dtype.type(-np.inf)
        for _ in range(reps):
            for j in range(x.shape[0]):
                acc = nan_max(acc, x[j])
        return acc

    @njit(fastmath=FASTMATH)
    def numpy_exp(x, reps):
        acc = x.dtype.type(0)
        for _ in range(reps):
            for j in range(x.shape[0]):
                acc += np.exp(x[j] - x.dtype.type(1))
        return acc

    @njit(fastmath=FASTMATH)
    def fastce_exp(x, reps):
        wide_vectors()
        acc = x.dtype.type(0)
        for _ in range(reps):
            for j in range(x.shape[0]):
                acc += exp(x[j] - x.dtype.type(1))
        return acc

    @njit(fastmath=FASTMATH)
    def fastce_exp_term(x, reps):
        wide_vectors()
        acc = x.dtype.type(0)
        for _ in range(reps):
            for j in range(x.shape[0]):
                acc += exp_term(x[j] - x.dtype.type(1))
        return acc

    @njit(fastmath=FASTMATH)
    def row_statistics(x, reps):
        acc = x.dtype.type(0)
        for _ in range(reps):
            acc += row_max_sumexp(x)[1]
        return acc

    fns = (plain_sum, nan_propagating_max, numpy_exp, fastce_exp, fastce_exp_term,
           row_statistics)
    print("single thread, 2048-element row in L1, G elements/s (best of 7)")
    print(f"{'primitive':<22} {'float32':>8} {'float64':>8}")
    res = {}
    for dtype in (np.float32, np.float64):
        x = np.random.default_rng(0).standard_normal(2048).astype(dtype)
        for fn in fns:
            fn(x, 1)
            best = min(_timeit_once(lambda: fn(x, 2000)) for _ in range(7))
            res.setdefault(fn.__name__, []).append(2048 * 2000 / best / 1e9)
    for name, (a, b) in res.items():
        print(f"{name:<22} {a:8.2f} {b:8.2f}")


def _timeit_once(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _timeit(fn, min_time):
    """Seconds per call of ``fn``: enough calls to last ``min_time``, then the mean."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= min_time or n >= 1 << 20:
            return dt / n
        n *= 4 if dt < min_time / 8 else 2


def measure(fns, rounds, min_time):
    """Median seconds per call for each entry of ``fns`` over interleaved rounds."""
    for fn in fns.values():  # warm-up: compile, load caches, torch's first-call costs
        fn()
        fn()
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            samples[k].append(_timeit(fn, min_time))
    return {k: float(np.median(v)) for k, v in samples.items()}


def _fmt_time(t):
    if t < 1e-3:
        return f"{t * 1e6:8.2f} us"
    return f"{t * 1e3:8.2f} ms"


# ---------------------------------------------------------------------------------------------
# --busy: single calls while another process spins on one core

_SPIN = "import os, sys; os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass"


def _start_spinner():
    """A process spinning on this process's last allowed core (``os.sched_setaffinity``);
    returns it (stop it with ``_stop_spinner``)."""
    core = max(os.sched_getaffinity(0))
    return subprocess.Popen([sys.executable, "-c", _SPIN, str(core)]), core


def _stop_spinner(proc):
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def busy_cases(dtype):
    """(name, shape, call factory) for ``--busy``: every op at the shapes where the threaded
    kernels lost to one thread with the neighbour core busy, a split-row and a K-dim case."""
    ops = {
        "forward": lambda x, t: (lambda: fastce.cross_entropy(x, t)),
        "forward+grad": lambda x, t: (lambda: fastce.cross_entropy_with_grad(x, t)),
        "logsumexp": lambda x, t: (lambda: fastce.logsumexp(x)),
        "log_softmax": lambda x, t: (lambda: fastce.log_softmax(x, axis=1)),
        "softmax": lambda x, t: (lambda: fastce.softmax(x, axis=1)),
    }
    cases = [(op, shape, f) for shape in ((4096, 100), (4096, 1000), (512, 32000))
             for op, f in ops.items()]
    cases += [("forward", (2, 128000), ops["forward"]),
              ("forward+grad", (8, 21, 64, 64), ops["forward+grad"]),
              ("log_softmax", (8, 21, 64, 64), ops["log_softmax"])]
    return cases


def _busy(args):
    """p50/p90 of single calls, all threads vs one thread, interleaved call by call, with
    (by default) a spinning process on one core."""
    import numba
    rng = np.random.default_rng(0)
    dtypes = ["float32", "float64"] if args.dtype == "both" else [args.dtype]
    threads = get_num_threads()
    spinner, core = (None, None) if args.no_spin else _start_spinner()
    try:
        print(f"numba layer: {fastce._runtime.threading_layer()}, threads: {threads}, "
              f"neighbour: {'spinning on core %d' % core if spinner else 'none started'}, "
              f"single calls, interleaved (all threads, one thread), "
              f"{args.busy_calls} calls each or {args.busy_seconds:g} s per case")
        print(f"{'case':<14} {'dtype':<8} {'shape':>14} {'p50 all':>11} {'p50 one':>11} "
              f"{'ratio':>6} {'p90 all':>11} {'p90 one':>11} {'ratio':>6}")
        rows = []
        for dtype in dtypes:
            for name, shape, make in busy_cases(dtype):
                x = rng.standard_normal(shape).astype(dtype)
                t = rng.integers(0, shape[1], (shape[0],) + tuple(shape[2:]))
                call = make(x, t)
                for k in (threads, 1):  # compile and warm both
                    numba.set_num_threads(k)
                    call()
                    call()
                samples = {threads: [], 1: []}
                t_end = time.perf_counter() + args.busy_seconds
                while (len(samples[1]) < args.busy_calls
                       and (time.perf_counter() < t_end or len(samples[1]) < 20)):
                    for k in (threads, 1):
                        numba.set_num_threads(k)
                        samples[k].append(_timeit_once(call))
                numba.set_num_threads(threads)
                p = {k: np.percentile(v, [50, 90]) for k, v in samples.items()}
                r = (name, dtype, "x".join(map(str, shape)), p[threads][0], p[1][0],
                     p[threads][0] / p[1][0], p[threads][1], p[1][1],
                     p[threads][1] / p[1][1], len(samples[1]))
                rows.append(r)
                print(f"{r[0]:<14} {r[1]:<8} {r[2]:>14} {_fmt_time(r[3])} {_fmt_time(r[4])} "
                      f"{r[5]:6.2f} {_fmt_time(r[6])} {_fmt_time(r[7])} {r[8]:6.2f}", flush=True)
    finally:
        if spinner is not None:
            _stop_spinner(spinner)
    worst50 = max(r[5] for r in rows)
    worst90 = max(r[8] for r in rows)
    print(f"worst ratios (all threads / one thread): p50 {worst50:.2f} (target <= 1.25), "
          f"p90 {worst90:.2f} (target <= 1.5); calls per mode per case: "
          f"{min(r[9] for r in rows)}-{max(r[9] for r in rows)}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dtype", choices=["float32", "float64", "both"], default="both")
    ap.add_argument("--quick", action="store_true", help="smaller big cases (1024 x 32000)")
    ap.add_argument("--micro", action="store_true",
                    help="only the single-thread throughput of the primitives")
    ap.add_argument("--same-process", action="store_true",
                    help="run every case in this process (default: one process per case)")
    ap.add_argument("--busy", action="store_true",
                    help="p50/p90 of single calls, all threads vs one thread, with a process "
                         "spinning on one core (started and stopped here)")
    ap.add_argument("--no-spin", action="store_true",
                    help="with --busy: start no spinning process (the quiet-machine control)")
    ap.add_argument("--busy-calls", type=int, default=200,
                    help="with --busy: single calls per mode and case (default 200)")
    ap.add_argument("--busy-seconds", type=float, default=3.0,
                    help="with --busy: at most this long per case (default 3)")
    ap.add_argument("--case", type=int, help=argparse.SUPPRESS)  # one case, for a subprocess
    args = ap.parse_args(argv)
    if args.micro:
        return _micro()
    if args.busy:
        return _busy(args)
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(get_num_threads())

    rng = np.random.default_rng(0)
    big_n = 1024 if args.quick else 4096
    dtypes = ["float32", "float64"] if args.dtype == "both" else [args.dtype]
    rows = []

    def case(name, dtype, shape, kind, min_time=0.05):
        dt = np.dtype(dtype)
        x = rng.standard_normal(shape).astype(dt)
        nd = len(shape)
        C = shape[1] if nd > 1 else shape[0]
        tshape = (shape[0],) + tuple(shape[2:]) if nd > 1 else ()
        t = rng.integers(0, C, size=tshape)
        xt = torch.from_numpy(x)
        tt = torch.from_numpy(np.asarray(t))
        x2 = np.ascontiguousarray(x).reshape(-1, C if nd <= 2 else int(np.prod(shape[1:])))
        red = np.empty(x2.shape[0], dt)
        y2 = np.empty_like(x2)
        if kind == "fwd":
            f = lambda: fastce.cross_entropy(x, t)
            g = lambda: F.cross_entropy(xt, tt)
            roof = lambda: _read_roof(x2, red)
        elif kind == "grad":
            def f():
                return fastce.cross_entropy_with_grad(x, t)

            def g():
                xg = xt.detach().requires_grad_(True)
                F.cross_entropy(xg, tt).backward()
                return xg.grad
            roof = lambda: _read_write_roof(x2, y2)
        else:
            fn, tfn = {"logsumexp": (fastce.logsumexp, torch.logsumexp),
                       "log_softmax": (fastce.log_softmax, torch.log_softmax),
                       "softmax": (fastce.softmax, torch.softmax)}[kind]
            f = lambda: fn(x, axis=-1)
            g = lambda: tfn(xt, -1)
            roof = (lambda: _read_roof(x2, red)) if kind == "logsumexp" else \
                (lambda: _read_write_roof(x2, y2))
        res = measure({"fastce": f, "torch": g, "roof": roof}, args.rounds, min_time)
        gbs = x.nbytes / res["fastce"] / 1e9
        rows.append((name, dtype, "x".join(map(str, shape)), res["fastce"], res["torch"],
                     res["torch"] / res["fastce"], res["roof"] / res["fastce"], gbs))
        r = rows[-1]
        print(f"{r[0]:<22} {r[1]:<8} {r[2]:>14} {_fmt_time(r[3])} {_fmt_time(r[4])} "
              f"{r[5]:7.2f}x {r[6]:6.2f} {r[7]:7.2f}", flush=True)

    cases = []
    for dtype in dtypes:
        cases += [("forward", dtype, (big_n, 32000), "fwd"),
                  ("forward+grad", dtype, (big_n, 32000), "grad")]
        cases += [(op, dtype, (big_n, 32000), op)
                  for op in ("logsumexp", "log_softmax", "softmax")]
        cases += [("tiny forward", dtype, (1, 10), "fwd", 0.02),
                  ("tiny forward", dtype, (32, 10), "fwd", 0.02),
                  ("tiny forward+grad", dtype, (1, 10), "grad", 0.02),
                  ("tiny forward+grad", dtype, (32, 10), "grad", 0.02),
                  ("few rows, huge C", dtype, (1, 256000), "fwd"),
                  ("few rows, huge C", dtype, (2, 128000), "fwd"),
                  ("K-dim forward", dtype, (8, 21, 128, 128), "fwd"),
                  ("K-dim forward+grad", dtype, (8, 21, 128, 128), "grad")]
    if args.case is not None:
        case(*cases[args.case])
        return rows

    print(f"numba threads: {get_num_threads()}, torch threads: {torch.get_num_threads()}, "
          f"rounds: {args.rounds} (median), "
          f"{'one process' if args.same_process else 'a fresh process per case'}")
    print(f"{'case':<22} {'dtype':<8} {'shape':>14} {'fastce':>11} {'torch':>11} "
          f"{'speedup':>8} {'roof':>6} {'GB/s':>7}")
    for i, c in enumerate(cases):
        if args.same_process:
            case(*c)
        else:
            # A fresh process per case, as asv does: what one case leaves behind (freed
            # half-gigabyte arrays, torch's spinning OpenMP workers) once made the next
            # case's numbers swing 3x.
            subprocess.run([sys.executable, os.path.abspath(__file__), "--case", str(i),
                            "--rounds", str(args.rounds), "--dtype", args.dtype]
                           + (["--quick"] if args.quick else []), check=True)
    print("speedup = torch time / fastce time; roof = roof time / fastce time (1.0 = at the "
          "roof: a parallel read for forward/logsumexp, a parallel read+write into a "
          "preallocated array otherwise); GB/s = logits bytes / fastce time.")
    return rows


if __name__ == "__main__":
    main()
