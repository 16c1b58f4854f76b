"""BCE family side by side: fastce vs torch (eager), NumPy's naive expression and jax.jit (when
installed), forward and forward + gradient, with the read roof, in one process.

    python benchmarks/bce_compare.py --threads 1
    python benchmarks/bce_compare.py --threads 2

Thread counts are fixed before numba, torch and jax are imported (XLA's CPU thread pool cannot
be resized later), so run one process per count.  Each case runs ``--rounds`` interleaved
rounds (every implementation once per round, ``number`` calls timed per round, the round's
median kept); the table shows the median over rounds and each peer's time divided by
fastce's (> 1: fastce is faster).  "roof" is the read bandwidth of a parallel numba sum over
the same two arrays; "% roof" is the share of it that fastce's forward reaches.
"""
import argparse
import os
import sys
import time

SHAPES = [(32, 32000), (4096, 1000), (512, 32000), (1, 10)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--no-jax", action="store_true")
    args = ap.parse_args()
    t = str(args.threads)
    os.environ["NUMBA_NUM_THREADS"] = t
    os.environ["OMP_NUM_THREADS"] = t
    multi = "true" if args.threads > 1 else "false"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_cpu_multi_thread_eigen={multi}"
                               f" intra_op_parallelism_threads={t}")
    import numpy as np
    import numba
    import torch
    import fastce
    import fastce._runtime
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    jax = jnp = None
    if not args.no_jax:
        try:
            import jax
            import jax.numpy as jnp
            jax.config.update("jax_enable_x64", True)
        except ImportError:
            pass
    F = torch.nn.functional

    @numba.njit(parallel=True, cache=False)
    def read_roof(a, b):
        s = a.dtype.type(0)
        for i in numba.prange(a.shape[0]):
            s += a[i] + b[i]
        return s

    impls = {}

    def fwd_bce(p, y):
        pt, yt = torch.from_numpy(p), torch.from_numpy(y)
        d = {"fastce": lambda: fastce.binary_cross_entropy(p, y),
             "torch": lambda: F.binary_cross_entropy(pt, yt),
             "numpy": lambda: -(y * np.log(p) + (1 - y) * np.log(1 - p)).mean()}
        if jax is not None:
            f = jax.jit(lambda p, y: -(y * jnp.maximum(jnp.log(p), -100)
                                       + (1 - y) * jnp.maximum(jnp.log1p(-p), -100)).mean())
            pj, yj = jnp.asarray(p), jnp.asarray(y)
            d["jax"] = lambda: f(pj, yj).block_until_ready()
        return d

    def grad_bce(p, y):
        pt, yt = torch.from_numpy(p), torch.from_numpy(y)

        def tb():
            q = pt.detach().requires_grad_()
            F.binary_cross_entropy(q, yt).backward()
            return q.grad
        d = {"fastce": lambda: fastce.binary_cross_entropy_with_grad(p, y), "torch": tb}
        if jax is not None:
            f = jax.jit(jax.value_and_grad(
                lambda p, y: -(y * jnp.maximum(jnp.log(p), -100)
                               + (1 - y) * jnp.maximum(jnp.log1p(-p), -100)).mean()))
            pj, yj = jnp.asarray(p), jnp.asarray(y)
            d["jax"] = lambda: jax.block_until_ready(f(pj, yj))
        return d

    def logits_expr(xp):
        def f(x, y):
            return (xp.maximum(x, 0) - x * y + xp.log1p(xp.exp(-xp.abs(x)))).mean()
        return f

    def fwd_logits(x, y):
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        d = {"fastce": lambda: fastce.binary_cross_entropy_with_logits(x, y),
             "torch": lambda: F.binary_cross_entropy_with_logits(xt, yt),
             "numpy": lambda: logits_expr(np)(x, y)}
        if jax is not None:
            f = jax.jit(logits_expr(jnp))
            xj, yj = jnp.asarray(x), jnp.asarray(y)
            d["jax"] = lambda: f(xj, yj).block_until_ready()
        return d

    def grad_logits(x, y):
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)

        def tb():
            q = xt.detach().requires_grad_()
            F.binary_cross_entropy_with_logits(q, yt).backward()
            return q.grad
        d = {"fastce": lambda: fastce.binary_cross_entropy_with_logits_with_grad(x, y),
             "torch": tb}
        if jax is not None:
            f = jax.jit(jax.value_and_grad(logits_expr(jnp)))
            xj, yj = jnp.asarray(x), jnp.asarray(y)
            d["jax"] = lambda: jax.block_until_ready(f(xj, yj))
        return d

    ops = [("bce", fwd_bce, True), ("bce+grad", grad_bce, True),
           ("bce_logits", fwd_logits, False), ("bce_logits+grad", grad_logits, False)]
    peers = ["torch", "numpy", "jax"]
    rng = np.random.default_rng(0)
    print(f"threads={args.threads} numba layer={fastce._runtime.threading_layer()} "
          f"jax={'yes' if jax is not None else 'no'}; times in us, peer/fastce ratios "
          f"(> 1: fastce faster)")
    print("| op | dtype | shape | fastce | torch | numpy | jax | % roof |")
    print("|---|---|---|---|---|---|---|---|")
    for dname in args.dtypes.split(","):
        dt = np.dtype(dname)
        for shape in SHAPES:
            n = shape[0] * shape[1]
            p = rng.uniform(0.001, 0.999, shape).astype(dt)
            y = rng.random(shape).astype(dt)
            x = rng.standard_normal(shape).astype(dt) * 4
            number = max(1, min(200, int(2e6 // n)))
            a1, b1 = p.reshape(-1), y.reshape(-1)
            read_roof(a1, b1)
            for name, make, probs in ops:
                fns = make(p, y) if probs else make(x, y)
                for f in fns.values():
                    f()
                rounds = {k: [] for k in fns}
                roof = []
                for _ in range(args.rounds):
                    for k, f in fns.items():
                        ts = []
                        for _ in range(number):
                            t0 = time.perf_counter()
                            f()
                            ts.append(time.perf_counter() - t0)
                        rounds[k].append(np.median(ts))
                    ts = []
                    for _ in range(number):
                        t0 = time.perf_counter()
                        read_roof(a1, b1)
                        ts.append(time.perf_counter() - t0)
                    roof.append(np.median(ts))
                med = {k: float(np.median(v)) for k, v in rounds.items()}
                base = med["fastce"]
                cells = [f"{base * 1e6:.1f}"]
                for k in peers:
                    cells.append(f"{med[k] * 1e6:.1f} ({med[k] / base:.2f}x)" if k in med else "-")
                pct = 100 * float(np.median(roof)) / base if not name.endswith("grad") else None
                cells.append(f"{pct:.0f} %" if pct is not None else "-")
                print(f"| {name} | {dname} | {shape} | " + " | ".join(cells) + " |")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
