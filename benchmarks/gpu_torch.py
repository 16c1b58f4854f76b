"""fastce.torch on CUDA tensors, on a machine with a GPU: values and gradients against torch's
own functions (float64), gradcheck, torch.compile with no graph break, and the large-vocabulary
options (softcap, z_loss, the per-sample lse) against the plain-torch reference in
``fastce.reference``, with their time beside that formulation's.

    python benchmarks/gpu_torch.py

Prints one line per check (docs/gpu.md quotes an H100 run).
"""
import fastce
from fastce import reference


def main():
    # (imported here: asv imports every module of benchmarks/, torch or not)
    import torch
    import fastce.torch as ft
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_torch.py needs torch with CUDA and a GPU")
    F = torch.nn.functional
    torch.manual_seed(0)
    def rel(a, b):
        return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))
    N, C = 512, 3000
    x0 = torch.randn(N, C, device="cuda", dtype=torch.float64)
    t = torch.randint(0, C, (N,), device="cuda"); t[::7] = -100
    w = torch.rand(C, device="cuda", dtype=torch.float64)
    yb = torch.rand(N, C, device="cuda", dtype=torch.float64)
    cases = [
        ("cross_entropy", lambda f, x: f.cross_entropy(x, t, weight=w.to(x.dtype), label_smoothing=0.1)),
        ("cross_entropy none", lambda f, x: f.cross_entropy(x, t, reduction="none").sum()),
        ("bce_with_logits", lambda f, x: f.binary_cross_entropy_with_logits(x, yb.to(x.dtype), pos_weight=w.to(x.dtype))),
        ("binary_cross_entropy", lambda f, x: f.binary_cross_entropy(torch.sigmoid(x), (x0 > 0).to(x.dtype))),
        ("log_softmax", lambda f, x: (f.log_softmax(x, 1) * w.to(x.dtype)).sum()),
        ("softmax", lambda f, x: (f.softmax(x, 1) * w.to(x.dtype)).sum()),
    ]
    for dt in (torch.float64,):
        for name, fn in cases:
            xa = x0.to(dt).clone().requires_grad_(True); xb = x0.to(dt).clone().requires_grad_(True)
            la = fn(ft, xa); la.backward()
            lb = fn(F, xb); lb.backward()
            print(f"{str(dt)[6:]:8s} {name:22s} loss rel diff {rel(la.detach(), lb.detach()):.1e}  grad rel diff {rel(xa.grad, xb.grad):.1e}  device {la.device}")
    xg = x0[:8, :20].clone().requires_grad_(True); tg = torch.randint(0, 20, (8,), device="cuda")
    print("gradcheck cross_entropy (float64, CUDA):", torch.autograd.gradcheck(lambda x: ft.cross_entropy(x, tg, label_smoothing=0.2), (xg,)))
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1000)).cuda()
    loss_fn = ft.CrossEntropyLoss()
    def step(h, y):
        return loss_fn(model(h), y)
    h = torch.randn(256, 64, device="cuda"); y = torch.randint(0, 1000, (256,), device="cuda")
    ex = torch._dynamo.explain(step)(h, y)
    print("torch.compile graph breaks (CUDA):", ex.graph_break_count)
    cstep = torch.compile(step)
    a = cstep(h, y); b = F.cross_entropy(model(h), y)
    print("compiled step loss rel diff vs torch:", f"{rel(a.detach(), b.detach()):.1e}")
    # large-vocabulary options on the GPU: values against the plain-torch reference, and time
    def timed(fn, n=20, rounds=5):
        fn(); torch.cuda.synchronize()
        out = []
        for _ in range(rounds):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(n): fn()
            b.record(); b.synchronize(); out.append(a.elapsed_time(b) / n * 1e3)
        return sorted(out)[len(out) // 2]
    N, C = 4096, 32000
    x = torch.randn(N, C, device="cuda") * 4; t = torch.randint(0, C, (N,), device="cuda"); t[::9] = -100
    for kw in [dict(), dict(softcap=30.0), dict(z_loss=1e-4), dict(softcap=30.0, z_loss=1e-4)]:
        loss, grad, lse = fastce.cross_entropy_with_grad(x, t, return_lse=True, **kw)
        xr = x.double().requires_grad_(True)
        rl, rlse = reference.torch_cross_entropy_zloss_softcap(xr, t, return_lse=True, **kw)
        rl.backward()
        us_f = timed(lambda: fastce.cross_entropy_with_grad(x, t, **kw))
        xt = x.clone().requires_grad_(True)
        def ref_step():
            xt.grad = None
            reference.torch_cross_entropy_zloss_softcap(xt, t, **kw).backward()
        us_r = timed(ref_step)
        print(f"{N}x{C} {kw}: loss rel {rel(loss, rl.detach()):.1e} grad rel {rel(grad, xr.grad):.1e} lse rel {rel(lse, rlse.detach()):.1e}; fwd+grad fastce {us_f:.0f} us, plain-torch formulation {us_r:.0f} us ({us_r/us_f:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
