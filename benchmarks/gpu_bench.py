"""fastce-cuda against torch on one NVIDIA GPU: every public function, float32, side by side.

Run on a machine with a GPU and a CUDA build of torch::

    python benchmarks/gpu_bench.py               # markdown table on stdout
    python benchmarks/gpu_bench.py --compile     # adds torch.compile (inductor) as a peer
    python benchmarks/gpu_bench.py --json out.json
    python benchmarks/gpu_bench.py --compile --min-elements 4000000   # the large shapes only

Inputs are torch CUDA tensors, which fastce hands to its CUDA kernels (``fastce.cross_entropy``
etc. dispatch on ``__cuda_array_interface__``).  Each timing is the median over ``--rounds``
rounds of the mean of ``--reps`` back-to-back calls between two CUDA events on torch's current
stream; the implementations alternate round by round so that clock and thermal drift hit all of
them alike.  GB/s counts the bytes each op must move at least once: the logits read, plus the
output (log_softmax, softmax) or gradient (``*_with_grad``, torch's backward) written, plus the
BCE target read.
"""
import argparse
import json
import statistics
import sys

import fastce

try:
    import torch
    F = torch.nn.functional
except ImportError:  # (asv imports every module here; main() says what is missing)
    torch = F = None

# (op, shapes): the report's shapes on the GPU, from one row to LLM vocabularies.
SHAPES = {
    "cross_entropy": [(1, 10), (512, 100), (4096, 100), (65536, 10), (4096, 1000),
                      (4096, 32000), (512, 128000), (8, 256000)],
    "cross_entropy_with_grad": [(512, 100), (65536, 10), (4096, 1000), (4096, 32000),
                                (512, 128000), (8, 256000)],
    "log_softmax": [(1, 10), (4096, 100), (4096, 32000), (8, 256000)],
    "softmax": [(4096, 100), (4096, 32000)],
    "logsumexp": [(4096, 100), (4096, 32000), (8, 256000)],
    "binary_cross_entropy": [(4096, 1000), (512, 32000)],
    "binary_cross_entropy_with_logits": [(4096, 1000), (512, 32000)],
}


def bytes_moved(op, n, c, itemsize=4):
    x = n * c * itemsize
    if op in ("cross_entropy", "logsumexp"):
        return x
    if op in ("cross_entropy_with_grad", "log_softmax", "softmax"):
        return 2 * x
    return 2 * x  # BCE: input and target read


def make_inputs(op, n, c, gen):
    x = torch.randn(n, c, device="cuda", generator=gen, dtype=torch.float32)
    if op.startswith("cross_entropy"):
        t = torch.randint(0, c, (n,), device="cuda", generator=gen)
        return x, t
    if op == "binary_cross_entropy":
        p = torch.rand(n, c, device="cuda", generator=gen).clamp_(1e-6, 1 - 1e-6)
        y = torch.rand(n, c, device="cuda", generator=gen)
        return p, y
    if op == "binary_cross_entropy_with_logits":
        return x, torch.rand(n, c, device="cuda", generator=gen)
    return (x,)


def torch_callables(op, args):
    """torch's eager function for ``op`` on ``args`` (forward + backward for ``*_with_grad``)."""
    if op == "cross_entropy":
        return lambda: F.cross_entropy(*args)
    if op == "cross_entropy_with_grad":
        x = args[0].detach().requires_grad_(True)
        t = args[1]

        def fwd_bwd():
            x.grad = None
            loss = F.cross_entropy(x, t)
            loss.backward()
            return loss, x.grad
        return fwd_bwd
    if op == "log_softmax":
        return lambda: F.log_softmax(args[0], dim=-1)
    if op == "softmax":
        return lambda: F.softmax(args[0], dim=-1)
    if op == "logsumexp":
        return lambda: torch.logsumexp(args[0], dim=-1)
    if op == "binary_cross_entropy":
        return lambda: F.binary_cross_entropy(*args)
    if op == "binary_cross_entropy_with_logits":
        return lambda: F.binary_cross_entropy_with_logits(*args)
    raise KeyError(op)


def fastce_callable(op, args):
    fn = getattr(fastce, op)
    return lambda: fn(*args)


def compiled_callable(op, args):
    """torch.compile of the eager callable (inductor's fused Triton kernels)."""
    if op == "cross_entropy_with_grad":
        x = args[0].detach().requires_grad_(True)
        t = args[1]
        step = torch.compile(lambda x, t: F.cross_entropy(x, t))

        def fwd_bwd():
            x.grad = None
            loss = step(x, t)
            loss.backward()
            return loss, x.grad
        return fwd_bwd
    eager = {"cross_entropy": F.cross_entropy,
             "log_softmax": lambda x: F.log_softmax(x, dim=-1),
             "softmax": lambda x: F.softmax(x, dim=-1),
             "logsumexp": lambda x: torch.logsumexp(x, dim=-1),
             "binary_cross_entropy": F.binary_cross_entropy,
             "binary_cross_entropy_with_logits": F.binary_cross_entropy_with_logits}[op]
    fn = torch.compile(eager)
    return lambda: fn(*args)


def event_ms(fn, reps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def check_agreement(op, ours, ref):
    """Largest relative difference between fastce's and torch's results (a sanity check that
    the timed calls compute the same thing)."""
    a = ours if isinstance(ours, tuple) else (ours,)
    b = ref if isinstance(ref, tuple) else (ref,)
    worst = 0.0
    for u, v in zip(a, b):
        u = torch.as_tensor(u, device="cuda").double()
        v = v.detach().double()
        scale = v.abs().max().clamp_min(1e-30)
        worst = max(worst, float((u - v).abs().max() / scale))
    return worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile", action="store_true", help="add torch.compile as a peer")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--ops", nargs="*", default=list(SHAPES))
    ap.add_argument("--min-elements", type=int, default=0,
                    help="only the shapes with at least this many logits")
    ap.add_argument("--json", help="write the figures to this file too")
    args = ap.parse_args(argv)
    if torch is None or not torch.cuda.is_available():
        sys.exit("benchmarks/gpu_bench.py needs torch with CUDA and a GPU")

    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}; "
          f"float32; median of {args.rounds} rounds x {args.reps} calls (CUDA events)\n")
    peers = ["fastce", "torch"] + (["torch.compile"] if args.compile else [])
    head = ("| op | N x C | " + " | ".join(f"{p} us" for p in peers)
            + " | torch / fastce | fastce GB/s | max rel diff |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for op in args.ops:
        for n, c in SHAPES[op]:
            if n * c < args.min_elements:
                continue
            inputs = make_inputs(op, n, c, gen)
            fns = {"fastce": fastce_callable(op, inputs), "torch": torch_callables(op, inputs)}
            if args.compile:
                fns["torch.compile"] = compiled_callable(op, inputs)
            try:
                diff = check_agreement(op, fns["fastce"](), fns["torch"]())
            except Exception as exc:  # report the cell and go on with the others
                print(f"| {op} | {n} x {c} | failed: {type(exc).__name__}: {exc} |", flush=True)
                continue
            for fn in fns.values():  # warm-up: compile, allocator caches
                for _ in range(3):
                    fn()
            torch.cuda.synchronize()
            times = {p: [] for p in fns}
            for _ in range(args.rounds):
                for p, fn in fns.items():
                    times[p].append(event_ms(fn, args.reps))
            med = {p: statistics.median(v) * 1e3 for p, v in times.items()}
            gbs = bytes_moved(op, n, c) / (med["fastce"] * 1e-6) / 1e9
            rows.append(dict(op=op, shape=[n, c], us=med, gbs=gbs, max_rel_diff=diff))
            print(f"| {op} | {n} x {c} | " + " | ".join(f"{med[p]:.1f}" for p in peers)
                  + f" | {med['torch'] / med['fastce']:.2f}x | {gbs:.0f} | {diff:.1e} |",
                  flush=True)
            del inputs, fns
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(gpu=props.name, torch=torch.__version__, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
