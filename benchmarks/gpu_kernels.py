"""fastce's CUDA kernels on a real GPU: device time per call against the memory roof.

Run on a machine with an NVIDIA GPU and a CUDA build of torch::

    python benchmarks/gpu_kernels.py                    # markdown table on stdout
    python benchmarks/gpu_kernels.py --json out.json    # the figures as JSON too
    python benchmarks/gpu_kernels.py --n 1024           # smaller inputs

``benchmarks/gpu_bench.py`` times whole calls (host included); this script times only what
the GPU does for each call, so that the kernels' machine code (``benchmarks/cuda_static.py``)
can be judged against the roof it was built for.  Each case runs ``--reps`` calls under
``torch.profiler`` after a warm-up; a call's device time is the sum of the CUDA kernels and
memsets it queued (every kernel named in the table), divided by the calls.  GB/s counts the
fewest bytes the op must move (every input read once, every output written once); "% roof"
divides that by a device-to-device copy measured in the same process (bytes read plus bytes
written).  torch's eager kernels are timed the same way beside each case.
"""
import argparse
import json
import re
import statistics
import sys

import fastce

try:
    import torch
    from torch.profiler import ProfilerActivity, profile
    F = torch.nn.functional
except ImportError:  # (asv imports every module here; main() says what is missing)
    torch = F = None

def short_name(name):
    """A kernel's own name, without namespaces, template or ABI tags and arguments, from the
    profiler's demangled name or numba's mangled symbol ``_ZN<len><id><len><id>...``."""
    if name.startswith("_ZN"):
        idents, i = [], 3
        while i < len(name) and name[i].isdigit():
            m = re.match(r"\d+", name[i:])
            k = int(m.group())
            i += len(m.group())
            idents.append(name[i:i + k])
            i += k
        if idents:
            return idents[-1]
    name = name.replace("(anonymous namespace)::", "").removeprefix("void ")
    return re.split(r"[(<\[]", name)[0].split("::")[-1]


def copy_roof_gbs(nbytes=1 << 30, reps=20):
    """Device-to-device copy of ``nbytes``, counting bytes read plus bytes written (GB/s)."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps / 1e3)
    return 2 * nbytes / statistics.median(times) / 1e9


def device_us_per_call(fn, reps):
    """(device µs per call, {kernel: µs per call}) of ``fn``, from torch.profiler's CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per_kernel = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        t = getattr(evt, "device_time", None)
        if t is None:
            t = evt.cuda_time
        key = short_name(evt.name)
        per_kernel[key] = per_kernel.get(key, 0.0) + t / reps
    return sum(per_kernel.values()), per_kernel


def cases(n, c, dtype, gen):
    """(label, fastce callable, torch callable, bytes moved at least)."""
    s = torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(n, c, device="cuda", generator=gen, dtype=dtype) * 2
    t = torch.randint(0, c, (n,), device="cuda", generator=gen)
    p = torch.softmax(torch.randn(n, c, device="cuda", generator=gen, dtype=dtype), dim=-1)
    w = torch.rand(c, device="cuda", generator=gen, dtype=dtype) + 0.5
    y = torch.rand(n, c, device="cuda", generator=gen, dtype=dtype)
    prob = torch.sigmoid(x)
    xb = n * c * s

    def ce_grad_torch(target, **kw):
        xg = x.detach().requires_grad_(True)

        def step():
            xg.grad = None
            F.cross_entropy(xg, target, **kw).backward()
        return step

    def softcapped_torch(cap):
        xg = x.detach().requires_grad_(True)

        def step():
            xg.grad = None
            F.cross_entropy(cap * torch.tanh(xg / cap), t).backward()
        return step

    return [
        ("logsumexp", lambda: fastce.logsumexp(x, axis=-1),
         lambda: torch.logsumexp(x, dim=-1), xb),
        ("softmax", lambda: fastce.softmax(x), lambda: F.softmax(x, dim=-1), 2 * xb),
        ("log_softmax", lambda: fastce.log_softmax(x), lambda: F.log_softmax(x, dim=-1), 2 * xb),
        ("cross_entropy", lambda: fastce.cross_entropy(x, t),
         lambda: F.cross_entropy(x, t), xb),
        ("cross_entropy weight+smoothing",
         lambda: fastce.cross_entropy(x, t, weight=w, label_smoothing=0.1),
         lambda: F.cross_entropy(x, t, weight=w, label_smoothing=0.1), xb),
        ("cross_entropy probability target", lambda: fastce.cross_entropy(x, p),
         lambda: F.cross_entropy(x, p), 2 * xb),
        ("cross_entropy probability target+weight",
         lambda: fastce.cross_entropy(x, p, weight=w),
         lambda: F.cross_entropy(x, p, weight=w), 2 * xb),
        ("cross_entropy softcap=30", lambda: fastce.cross_entropy(x, t, softcap=30.0),
         lambda: F.cross_entropy(30.0 * torch.tanh(x / 30.0), t), xb),
        ("cross_entropy_with_grad", lambda: fastce.cross_entropy_with_grad(x, t),
         ce_grad_torch(t), 2 * xb),
        ("cross_entropy_with_grad weight+smoothing",
         lambda: fastce.cross_entropy_with_grad(x, t, weight=w, label_smoothing=0.1),
         ce_grad_torch(t, weight=w, label_smoothing=0.1), 2 * xb),
        ("cross_entropy_with_grad probability target",
         lambda: fastce.cross_entropy_with_grad(x, p), ce_grad_torch(p), 3 * xb),
        ("cross_entropy_with_grad softcap=30",
         lambda: fastce.cross_entropy_with_grad(x, t, softcap=30.0), softcapped_torch(30.0),
         2 * xb),
        ("binary_cross_entropy", lambda: fastce.binary_cross_entropy(prob, y),
         lambda: F.binary_cross_entropy(prob, y), 2 * xb),
        ("binary_cross_entropy_with_logits",
         lambda: fastce.binary_cross_entropy_with_logits(x, y),
         lambda: F.binary_cross_entropy_with_logits(x, y), 2 * xb),
    ]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4096, help="rows (default 4096)")
    ap.add_argument("--c", type=int, default=32000, help="classes (default 32000)")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--only", help="comma-separated substrings of the case labels to run")
    ap.add_argument("--json", help="write the figures to this file too")
    args = ap.parse_args(argv)
    if torch is None or not torch.cuda.is_available():
        sys.exit("gpu_kernels.py needs torch with CUDA and a GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    roof = copy_roof_gbs()
    print(f"GPU: {torch.cuda.get_device_name()}; device-to-device copy {roof:.0f} GB/s "
          f"(read + write); {args.n} x {args.c}; device time per call, {args.reps} calls "
          "under torch.profiler\n")
    print("| op | dtype | fastce us | GB/s | % roof | torch us | torch / fastce | fastce kernels (us) |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for label, ours, theirs, nbytes in cases(args.n, args.c, dtype, gen):
            if args.only and not any(k in label for k in args.only.split(",")):
                continue
            try:
                us, kernels = device_us_per_call(ours, args.reps)
                ref_us, _ = device_us_per_call(theirs, args.reps)
            except Exception as exc:  # one failing case must not hide the others' figures
                print(f"| {label} | {dtype_name} | failed: {type(exc).__name__}: {exc} |||||")
                continue
            gbs = nbytes / (us * 1e-6) / 1e9
            top = ", ".join(f"{k} {v:.0f}" for k, v in
                            sorted(kernels.items(), key=lambda kv: -kv[1]) if v >= 1.0)
            print(f"| {label} | {dtype_name} | {us:.1f} | {gbs:.0f} | {100 * gbs / roof:.0f} | "
                  f"{ref_us:.1f} | {ref_us / us:.2f}x | {top} |", flush=True)
            rows.append(dict(op=label, dtype=dtype_name, n=args.n, c=args.c, fastce_us=us,
                             torch_us=ref_us, gbs=gbs, roof_gbs=roof, kernels=kernels))
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
