"""What the confident rows cost the row tiles' forward loss: the class-index tile kernel
(``tiles.ce_index_tiles_serial``, one thread, called directly) on the suite's logits with
three target sets -- the suite's random targets, every target at its row's minimum (no row
confident) and every target at its row's maximum (every row confident) -- beside logsumexp
on the same tiles (the statistics pass alone).

    python benchmarks/ce_confident_cost.py float32 4096x10 4096x32 512x100
    python benchmarks/ce_confident_cost.py float64 4096x10 512x16

Prints the medians (us) of 7 interleaved rounds of 200 calls and the fraction of random
targets that hold their row's max (docs/performance.md, "Session 5: few-class cells").
"""
import os
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    import numba
    import numpy as np

    from benchmarks import common
    from fastce import _runtime
    from fastce._modes import MODE_LOGSUMEXP
    numba.set_num_threads(1)
    tiles = _runtime._import_kernels().tiles
    dname = sys.argv[1]
    for shape in sys.argv[2:]:
        N, C = map(int, shape.split("x"))
        x = common.make_logits((N, C), dname)
        dt = x.dtype
        targets = {"random": common.make_targets((N,), C),
                   "none_confident": np.argmin(x, 1).astype(np.int64),
                   "all_confident": np.argmax(x, 1).astype(np.int64)}
        loss, out = np.empty(N, dt), np.empty((N, 1), dt)
        no_grad, no_w, no_g = np.empty((0, 0), dt), np.empty(0, dt), np.empty(0, dt)
        calls = {"logsumexp": lambda: tiles.softmax_tiles_serial(x, out, MODE_LOGSUMEXP)}
        for name, t in targets.items():
            calls[name] = (lambda t=t: tiles.ce_index_tiles_serial(
                x, t, -100, no_w, dt.type(C), 0.0, no_g, no_grad, loss))
        for f in calls.values():
            f()
        times = {k: [] for k in calls}
        for _ in range(7):
            for k, f in calls.items():
                ts = []
                for _ in range(200):
                    t0 = time.perf_counter()
                    f()
                    ts.append(time.perf_counter() - t0)
                times[k].append(np.median(ts))
        frac = float(np.mean(targets["random"] == targets["all_confident"]))
        print(f"{dname} {shape} (random targets at the max: {frac:.3f}): " + "  ".join(
            f"{k} {np.median(v) * 1e6:.1f}" for k, v in times.items()), flush=True)


if __name__ == "__main__":
    main()
