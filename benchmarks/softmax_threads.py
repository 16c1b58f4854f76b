"""log_softmax and softmax single calls, one process, p50/p90 in us: the medium and large
cells of issue #11 with a chosen thread count (docs/performance.md, "Session 4").

    python benchmarks/softmax_threads.py --threads 1
    python benchmarks/softmax_threads.py --threads 2 --shapes 512x100,4096x10 --dtypes float64

Run it with 1 and with 2 threads (fresh processes: numba's pool size is fixed at import) to
see what the second thread brings; fastce alone in the process (no torch thread pool spinning
beside it).
"""
import argparse
import os
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--shapes", default="512x100,4096x10,4096x100,512x1000,4096x1000")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    os.environ["NUMBA_NUM_THREADS"] = str(args.threads)
    import numpy as np

    import fastce
    print(f"threads={args.threads} loadavg={os.getloadavg()[0]:.2f}; single calls, us")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    for dname in args.dtypes.split(","):
        for N, C in shapes:
            x = (np.random.default_rng(0).standard_normal((N, C)) * 3).astype(dname)
            number = max(5, min(500, int(2e6 / (N * C))))
            cells = []
            for name, f in (("log_softmax", fastce.log_softmax), ("softmax", fastce.softmax)):
                ts = []
                for _ in range(args.rounds):
                    for _ in range(3):
                        f(x)
                    for _ in range(number):
                        t0 = time.perf_counter()
                        f(x)
                        ts.append(time.perf_counter() - t0)
                ts = np.array(ts) * 1e6
                cells.append(f"{name} p50 {np.median(ts):.1f} p90 {np.percentile(ts, 90):.1f}")
            print(f"{dname} {N}x{C}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
