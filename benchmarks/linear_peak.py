"""Peak memory and time of linear cross-entropy forward + backward, each measurement in a
fresh process, the implementations interleaved:

* ``torch``: ``F.cross_entropy(hidden @ weight.T, target)`` then ``backward()``;
* ``fastce-torch``: ``fastce.torch.linear_cross_entropy(hidden, weight, target)`` then
  ``backward()``;
* ``fastce``: ``fastce.linear_cross_entropy_with_grad(hidden, weight, target)`` (NumPy).

Peak memory is the process's resident-set high-water mark during the call above what it held
just before (inputs allocated, kernels compiled on a small warm-up): Linux resets the mark on
``echo 5 > /proc/self/clear_refs``, so everything counts -- NumPy, torch's allocator, BLAS
buffers.  For the NumPy path, tracemalloc's peak is printed too as a cross-check.

    python benchmarks/linear_peak.py [N H V] [--rounds 3]
    python benchmarks/linear_peak.py [N H V] --interleave 4   # time only, one process
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

IMPLS = ("torch", "fastce-torch", "fastce")


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _make(N, H, V, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    h = (rng.standard_normal((N, H)) * 0.05).astype(np.float32)
    w = (rng.standard_normal((V, H)) * 0.05).astype(np.float32)
    t = rng.integers(0, V, N)
    return h, w, t


def _step(impl):
    """A function running one forward + backward on (h, w, t) NumPy arrays."""
    import torch
    import torch.nn.functional as F

    import fastce
    import fastce.torch as ft

    def run(h, w, t):
        if impl == "fastce":
            return fastce.linear_cross_entropy_with_grad(h, w, t)
        ht = torch.from_numpy(h).requires_grad_(True)
        wt = torch.from_numpy(w).requires_grad_(True)
        tt = torch.from_numpy(t)
        loss = (F.cross_entropy(ht @ wt.T, tt) if impl == "torch"
                else ft.linear_cross_entropy(ht, wt, tt))
        loss.backward()
        return loss.detach(), ht.grad, wt.grad
    return run


def child(impl, N, H, V, repeats):
    import tracemalloc
    run = _step(impl)
    run(*_make(64, 16, 2048))  # compile / warm up: big enough for the parallel kernels
    h, w, t = _make(N, H, V)
    out = {"impl": impl, "times": []}
    for r in range(repeats):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status("VmRSS")
        if r == 0 and impl == "fastce":
            tracemalloc.start()
        t0 = time.perf_counter()
        result = run(h, w, t)
        out["times"].append(time.perf_counter() - t0)
        if r == 0:
            out["peak_bytes"] = _status("VmHWM") - before
            if impl == "fastce":
                out["tracemalloc_peak_bytes"] = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
        del result
    print(json.dumps(out))


def interleaved(impls, N, H, V, pairs):
    """Times in one process, the implementations alternating call by call, so that a busy
    machine slows them alike: the per-round ratios are the figure to trust there."""
    runs = {i: _step(i) for i in impls}
    for run in runs.values():
        run(*_make(64, 16, 2048))
    h, w, t = _make(N, H, V)
    times = {i: [] for i in impls}
    for k in range(pairs):
        for impl in impls:
            t0 = time.perf_counter()
            runs[impl](h, w, t)
            times[impl].append(time.perf_counter() - t0)
        print(f"round {k}: " + ", ".join(f"{i} {times[i][-1]:.2f} s" for i in impls), flush=True)
    ref = times[impls[0]]
    print(f"\nN={N} H={H} V={V} float32, forward + backward, one process, {pairs} rounds "
          f"interleaved")
    for impl in impls:
        ratios = [a / b for a, b in zip(times[impl], ref)]
        print(f"{impl:13s} median {statistics.median(times[impl]):7.2f} s   median ratio to "
              f"{impls[0]} {statistics.median(ratios):.2f} (per round "
              f"{', '.join('%.2f' % r for r in ratios)})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shape", nargs="*", type=int, default=[4096, 1024, 32000])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="timed calls per process")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="time only, in one process, alternating the implementations")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    N, H, V = a.shape
    if a.child:
        return child(a.child, N, H, V, a.repeats)
    impls = a.impls.split(",")
    if a.interleave:
        return interleaved(impls, N, H, V, a.interleave)
    res = {i: {"times": [], "peaks": [], "tm": []} for i in impls}
    for rnd in range(a.rounds):
        for impl in impls:
            cmd = [sys.executable, __file__, str(N), str(H), str(V), "--child", impl,
                   "--repeats", str(a.repeats)]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                  env=os.environ).stdout.strip().splitlines()[-1]
            r = json.loads(line)
            res[impl]["times"] += r["times"]
            res[impl]["peaks"].append(r["peak_bytes"])
            if "tracemalloc_peak_bytes" in r:
                res[impl]["tm"].append(r["tracemalloc_peak_bytes"])
            print(f"round {rnd} {impl}: times {['%.2f' % x for x in r['times']]} s, "
                  f"peak +{r['peak_bytes'] / 2**20:.0f} MiB", flush=True)
    print(f"\nN={N} H={H} V={V} float32, forward + backward, medians over "
          f"{a.rounds} processes x {a.repeats} calls")
    base = res.get("torch")
    for impl in impls:
        t_med = statistics.median(res[impl]["times"])
        m_med = statistics.median(res[impl]["peaks"])
        line = f"{impl:13s} time {t_med:7.2f} s   peak +{m_med / 2**20:7.0f} MiB"
        if base and impl != "torch":
            line += (f"   time ratio {t_med / statistics.median(base['times']):.2f}"
                     f"   peak ratio {m_med / statistics.median(base['peaks']):.3f}")
        if res[impl]["tm"]:
            line += f"   (tracemalloc peak {statistics.median(res[impl]['tm']) / 2**20:.0f} MiB)"
        print(line)


if __name__ == "__main__":
    main()
