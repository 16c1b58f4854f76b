"""Cost of the large-vocabulary options (softcap, z-loss, return_lse) on the CPU: each
implementation with the options off and on, interleaved call by call in one process, medians.

    python benchmarks/large_vocab.py [--batch 512] [--classes 32000] [--rounds 7]
    python benchmarks/large_vocab.py --accuracy

``--accuracy`` prints instead the errors of fastce (float32) and of torch's float32
formulation against the float64 reference on the same float32 inputs (softcap 30, z-loss 1e-4,
every 7th target ignored).

Implementations: fastce's NumPy functions, ``fastce.torch.cross_entropy`` and torch's plain
formulation (``fastce.reference.torch_cross_entropy_zloss_softcap``: tanh, cross_entropy,
logsumexp and autograd); forward, and forward + gradient.  The asv twin is
``bench_torch.CrossEntropyLargeVocab``.
"""
import argparse
import time

import numpy as np

OPTIONS = {"none": {}, "softcap": dict(softcap=30.0), "z_loss": dict(z_loss=1e-4),
           "softcap+z_loss": dict(softcap=30.0, z_loss=1e-4)}


def calls(batch, classes):
    import torch

    import fastce
    import fastce.torch as ft
    from fastce.reference import torch_cross_entropy_zloss_softcap as ref

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((batch, classes)) * 3).astype(np.float32)
    t = rng.integers(0, classes, batch)
    xt = torch.from_numpy(x).requires_grad_(True)
    tt = torch.from_numpy(t)
    out = {}
    for opt, kw in OPTIONS.items():
        out[("fastce", opt, "forward")] = lambda kw=kw: fastce.cross_entropy(x, t, **kw)
        out[("fastce", opt, "forward+grad")] = \
            lambda kw=kw: fastce.cross_entropy_with_grad(x, t, **kw)
        for name, f in (("fastce.torch", ft.cross_entropy), ("torch", ref)):
            def fwd(f=f, kw=kw):
                with torch.no_grad():
                    return f(xt, tt, **kw)

            def grad(f=f, kw=kw):
                xt.grad = None
                f(xt, tt, **kw).backward()
            out[(name, opt, "forward")] = fwd
            out[(name, opt, "forward+grad")] = grad
    return out


def accuracy():
    import torch

    import fastce
    from fastce.reference import torch_cross_entropy_zloss_softcap as ref

    rng = np.random.default_rng(0)
    print("max relative error of the loss (non-ignored rows) and of the lse; the gradient's "
          "max absolute error over its max")
    for (N, C), scale in (((512, 32000), 3.0), ((512, 32000), 30.0), ((4096, 1000), 10.0)):
        x = (rng.standard_normal((N, C)) * scale).astype(np.float32)
        t = rng.integers(0, C, N)
        t[::7] = -100
        w = (rng.random(C) + 0.5).astype(np.float32)
        for extra in ({}, dict(label_smoothing=0.1, weight=w)):
            kw = dict(softcap=30.0, z_loss=1e-4, reduction="none", **extra)
            loss, g, lse = fastce.cross_entropy_with_grad(x, t, return_lse=True, **kw)

            def run(dt):
                xt = torch.tensor(x, dtype=dt, requires_grad=True)
                kk = dict(kw)
                if "weight" in kk:
                    kk["weight"] = torch.tensor(w, dtype=dt)
                lo, ls = ref(xt, torch.tensor(t), return_lse=True, **kk)
                lo.sum().backward()
                return [a.detach().numpy().astype(np.float64) for a in (lo, xt.grad, ls)]

            L64, G64, S64 = run(torch.float64)
            L32, G32, S32 = run(torch.float32)
            keep = t != -100

            def rel(a, b):
                a = np.asarray(a, np.float64)
                return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))

            def grel(a, b):
                return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))

            tag = f"({N}, {C}) x{scale:g}{' smoothing+weight' if extra else ''}"
            print(f"{tag:<34} fastce loss {rel(loss[keep], L64[keep]):.1e} lse "
                  f"{rel(lse, S64):.1e} grad {grel(g, G64):.1e} | torch float32 loss "
                  f"{rel(L32[keep], L64[keep]):.1e} lse {rel(S32, S64):.1e} grad "
                  f"{grel(G32, G64):.1e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--classes", type=int, default=32000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--accuracy", action="store_true", help="errors instead of times")
    args = ap.parse_args(argv)
    if args.accuracy:
        accuracy()
        return
    cs = calls(args.batch, args.classes)
    for f in cs.values():          # compile and warm up
        f()
        f()
    times = {k: [] for k in cs}
    for _ in range(args.rounds):
        for k, f in cs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in times.items()}
    print(f"({args.batch}, {args.classes}) float32, median of {args.rounds} interleaved "
          f"rounds, ms; ratio = options on / off for the same implementation")
    print(f"{'implementation':<14} {'what':<13} " + " ".join(f"{o:>16}" for o in OPTIONS))
    for impl in ("fastce", "fastce.torch", "torch"):
        for what in ("forward", "forward+grad"):
            base = med[(impl, "none", what)]
            cells = [f"{med[(impl, o, what)] * 1e3:8.2f} ({med[(impl, o, what)] / base:4.2f})"
                     for o in OPTIONS]
            print(f"{impl:<14} {what:<13} " + " ".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
