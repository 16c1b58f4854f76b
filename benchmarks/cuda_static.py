"""Machine-code figures of every fastce CUDA kernel for sm_90 (H100), without a GPU.

Usage::

    python benchmarks/cuda_static.py            # the table (markdown)
    python benchmarks/cuda_static.py --json     # one JSON object (tests/test_cuda_static.py)

Each kernel is compiled as ``fastce.cuda`` launches it (the warp-shuffle twin, the argument
types of ``fastce.cuda.kernels.signatures``, float32 and float64) to PTX by numba-cuda, then
to a cubin by ``ptxas`` (wheel ``nvidia-cuda-nvcc``) and disassembled by ``nvdisasm`` (wheel
``nvidia-cuda-nvdisasm``); both are in the ``cuda-ptx`` extra.  Per kernel and dtype:

The kernels that cross-entropy launches with a logit soft-cap (row statistics, class-index
and probability targets) are measured twice: as built by default and with the cap
(``<kernel>_softcap``, cap 30).

* ``regs``, ``spill`` (bytes stored + loaded), ``stack``, ``smem``: ptxas' resource usage;
  ``local``: local-memory instructions (LDL/STL) in the SASS.
* ``occ``: theoretical occupancy at the launched block size (``_config.CUDA_THREADS_PER_BLOCK``)
  from registers, shared memory and sm_90's per-SM limits.
* ``div64``: call sites of the 64-bit integer division/remainder subroutines (``hot`` of them
  inside a hot loop, i.e. per element).
* Hot loops: the innermost loops (a backward branch and its target) that load global memory.
  For each: SASS instructions, global loads (count x width in bits), the most loads (and
  bytes) a thread has outstanding at once walking the body in order (a load stays outstanding
  until an instruction reads its register), elements per iteration and instructions per
  element.  Elements per iteration: the stored elements for a loop that stores (every
  elementwise output writes one element per input element), else the loaded bytes divided by
  the itemsize and by the number of arrays that kernel's reading loops read per element
  (``READ_STREAMS``).  The whole address range of a loop counts, rarely taken branches
  included: an upper bound on the common path.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Arrays a kernel's non-storing hot loops read per element (a storing loop counts its stores).
READ_STREAMS = {"stats_kernel": 1, "softmax_kernel": 1, "softmax_kernel_strided": 1,
                "index_kernel": 1, "index_kernel_weighted": 1, "prob_kernel": 2,
                "prob_kernel_weighted": 3, "prepare_kernel": 1,
                "prepare_kernel_int32": 1, "sum_kernel": 1, "rowsum_kernel": 1,
                "bad_value_kernel": 1, "bce_kernel": 2, "bce_logits_kernel": 2,
                "bce_sum_kernel": 3, "bce_logits_sum_kernel": 4,
                "copy_f16_to_f32": 1, "copy_f32_to_f16": 1, "copy_f32_to_f32": 1}

# The kernels cross-entropy launches with logit soft-capping (a compile-time constant: its own
# build, ``name + SOFTCAP_SUFFIX``) are measured again in that build; any cap value gives the
# same code up to the constants.
SOFTCAP, SOFTCAP_SUFFIX = 30.0, "_softcap"
SOFTCAP_KERNELS = ("stats_kernel", "index_kernel", "index_kernel_weighted", "prob_kernel",
                   "prob_kernel_weighted")

# sm_90 per-SM limits (CUDA occupancy calculator): registers, shared memory (bytes, with the
# 1 KB the driver reserves per block), warps, blocks; registers are allocated per warp in
# units of 256.
SM90 = dict(regs=65536, smem=233472, smem_per_block_reserved=1024, warps=64, blocks=32,
            reg_unit=256)


def cuda_home():
    """The nvidia wheels' CUDA folder (``nvidia/cu13``) holding nvvm and bin/ptxas."""
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations if spec else []):
        for name in sorted(os.listdir(root)):
            home = os.path.join(root, name)
            if os.path.isfile(os.path.join(home, "bin", "ptxas")) and \
                    os.path.isdir(os.path.join(home, "nvvm")):
                return home
    return None


def occupancy(regs, smem, threads):
    warps = -(-threads // 32)
    per_warp = -(-regs * 32 // SM90["reg_unit"]) * SM90["reg_unit"]
    by_regs = (SM90["regs"] // per_warp) // warps if regs else SM90["blocks"]
    by_smem = SM90["smem"] // (smem + SM90["smem_per_block_reserved"])
    by_warps = SM90["warps"] // warps
    blocks = min(by_regs, by_smem, by_warps, SM90["blocks"])
    return blocks * warps / SM90["warps"]


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_REG = re.compile(r"\bR(\d+)\b")


def parse_sass(text):
    """[(address, predicate, opcode, operands)] and {label: address} of one function."""
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.search(line)
        if not m:
            continue
        addr = int(m.group(1), 16)
        for lb in pending:
            labels[lb] = addr
        pending = []
        body = m.group(2).strip()
        pred = ""
        if body.startswith("@"):
            pred, body = body.split(None, 1)
        op, _, rest = body.partition(" ")
        instrs.append((addr, pred, op, rest.strip()))
    return instrs, labels


def _is_global_load(op):
    return op.startswith("LDG") or op == "LD" or op.startswith("LD.")


def _is_store(op):
    return op.startswith("STG") or op == "ST" or op.startswith("ST.")


def _width(op):
    m = re.search(r"\.(64|128|U8|S8|U16|S16)\b", op)
    if not m:
        return 32
    return {"64": 64, "128": 128, "U8": 8, "S8": 8, "U16": 16, "S16": 16}[m.group(1)]


def _regs_of(token, width):
    """Register numbers a load writes (``R4`` with width 128 is R4..R7)."""
    m = _REG.search(token)
    if not m:
        return set()
    r = int(m.group(1))
    return set(range(r, r + max(1, width // 32)))


def in_flight(body):
    """(loads, bytes): the most global loads a thread has outstanding at once in ``body``."""
    pending = {}  # register -> (load id, bytes)
    best = (0, 0)
    for _, _, op, rest in body:
        operands = [t.strip() for t in rest.split(",")]
        sources = operands if (_is_store(op) or op.startswith(("RED", "ATOM", "BRA"))) \
            else operands[1:]
        used = set()
        for t in sources:
            used |= {int(r) for r in _REG.findall(t)}
        for r in used & set(pending):
            lid, _ = pending.pop(r)
            for k in [k for k, v in pending.items() if v[0] == lid]:
                del pending[k]
        if _is_global_load(op):
            w = _width(op)
            lid = object()
            for r in _regs_of(operands[0], w):
                pending[r] = (lid, w // 8)
        loads = {v[0]: v[1] for v in pending.values()}
        cur = (len(loads), sum(loads.values()))
        best = max(best, cur)
    return best


def hot_loops(instrs, labels, itemsize, streams):
    index = {a: i for i, (a, _, _, _) in enumerate(instrs)}
    loops = []
    for i, (addr, _, op, rest) in enumerate(instrs):
        if not op.startswith("BRA"):
            continue
        m = re.search(r"\((\.L_x_\d+)\)", rest)
        if not m or labels.get(m.group(1), addr + 1) > addr:
            continue
        lo = index[labels[m.group(1)]]
        body = instrs[lo:i + 1]
        if any(_is_global_load(o) for _, _, o, _ in body):
            loops.append((lo, i))
    inner = [(lo, hi) for lo, hi in loops
             if not any((l2, h2) != (lo, hi) and lo <= l2 and h2 <= hi for l2, h2 in loops)]
    out = []
    for lo, hi in inner:
        body = instrs[lo:hi + 1]
        loads = [_width(o) for _, _, o, _ in body if _is_global_load(o)]
        stores = [_width(o) for _, _, o, _ in body if _is_store(o)]
        if stores:
            elems = sum(stores) / (8 * itemsize)
        else:
            elems = sum(loads) / (8 * itemsize) / streams
        n_fl, b_fl = in_flight(body)
        out.append(dict(
            start=hex(instrs[lo][0]), instructions=len(body),
            loads=len(loads), load_bits=sorted(set(loads)), load_bytes=sum(loads) // 8,
            stores=len(stores), in_flight_loads=n_fl, in_flight_bytes=b_fl,
            elements=elems, per_element=round(len(body) / elems, 1) if elems else None,
            div64=sum(1 for _, _, o, r in body if o.startswith("CALL") and
                      re.search(r"(div|rem)_[su]64", r)),
            exp=sum(1 for _, _, o, _ in body if o.startswith("MUFU.EX2"))))
    return out


def analyze(name, ptx, itemsize, threads, tools, workdir):
    ptx_path = os.path.join(workdir, f"{name}.ptx")
    cubin = os.path.join(workdir, f"{name}.cubin")
    with open(ptx_path, "w") as f:
        f.write(ptx)
    res = subprocess.run([tools["ptxas"], "-arch=sm_90", "-O3", "-v", "-o", cubin, ptx_path],
                         capture_output=True, text=True, check=True)
    info = res.stderr
    regs = int(re.search(r"Used (\d+) registers", info).group(1))
    m = re.search(r"(\d+) bytes smem", info)
    smem = int(m.group(1)) if m else 0
    stack = int(re.search(r"(\d+) bytes stack frame", info).group(1))
    spill = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    sass = subprocess.run([tools["nvdisasm"], "-c", cubin], capture_output=True, text=True,
                          check=True).stdout
    instrs, labels = parse_sass(sass)
    streams = READ_STREAMS.get(name.removesuffix(SOFTCAP_SUFFIX), 1)
    loops = hot_loops(instrs, labels, itemsize, streams)
    div_calls = sum(1 for _, _, o, r in instrs if o.startswith("CALL") and
                    re.search(r"(div|rem)_[su]64", r))
    return dict(regs=regs, smem=smem, stack=stack, spill=spill,
                local=sum(1 for _, _, o, _ in instrs if o.startswith(("LDL", "STL"))),
                occupancy=occupancy(regs, smem, threads), threads=threads,
                instructions=len(instrs), div64=div_calls,
                div64_hot=sum(lp["div64"] for lp in loops), loops=loops)


def collect():
    """{"<dtype>/<kernel>": figures} for every kernel."""
    home = cuda_home()
    if home is None:
        raise SystemExit("the CUDA 13 wheels are not installed: pip install fastce[cuda-ptx]")
    os.environ["CUDA_HOME"] = home
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
    tools = {t: os.path.join(home, "bin", t) for t in ("ptxas", "nvdisasm")}
    for t, p in tools.items():
        if not os.path.isfile(p):
            raise SystemExit(f"{t} not found in {home}/bin: pip install fastce[cuda-ptx]")
    import numpy as np
    from numba import cuda

    from fastce import _config
    from fastce.cuda._impl import kernels
    from fastce.cuda.kernels.reduce import copy_kernel
    from fastce.cuda.kernels.signatures import (CC, copy_signatures, launch_signatures,
                                                offline_target)
    offline_target()
    threads = int(_config.CUDA_THREADS_PER_BLOCK)
    report = {}
    with tempfile.TemporaryDirectory() as wd:
        for dt in (np.float32, np.float64):
            for cap, suffix in ((None, ""), (SOFTCAP, SOFTCAP_SUFFIX)):
                K = kernels(np.dtype(dt), True, softcap=cap)
                for name, (kern, sig) in launch_signatures(K, dt).items():
                    if cap is not None and name not in SOFTCAP_KERNELS:
                        continue
                    ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=CC, launch_bounds=getattr(
                        kern, "targetoptions", {}).get("launch_bounds"))
                    report[f"{np.dtype(dt).name}/{name}{suffix}"] = analyze(
                        name + suffix, ptx, np.dtype(dt).itemsize, threads, tools, wd)
        for name, sig in copy_signatures().items():
            ptx, _ = cuda.compile_ptx(copy_kernel.py_func, sig, cc=CC, launch_bounds=getattr(
                copy_kernel, "targetoptions", {}).get("launch_bounds"))
            itemsize = 2 if name.endswith("f16") else 4
            report[f"copy/copy_{name}"] = analyze(f"copy_{name}", ptx, itemsize, threads,
                                                  tools, wd)
    return report


def table(report):
    rows = ["| kernel | dtype | regs | spill | smem B | occ | div64 (hot) | hot loops: "
            "SASS/elem (instr / elems), loads x bits, in flight (loads / B) |",
            "|---|---|---|---|---|---|---|---|"]
    for key, r in report.items():
        dt, name = key.split("/")
        loops = "; ".join(
            f"{lp['per_element']} ({lp['instructions']}/{lp['elements']:g}), "
            f"{lp['loads']}x{'/'.join(map(str, lp['load_bits']))}, "
            f"{lp['in_flight_loads']}/{lp['in_flight_bytes']}" for lp in r["loops"]) or "-"
        rows.append(f"| {name} | {dt} | {r['regs']} | {r['spill'] + r['local']} | {r['smem']} | "
                    f"{r['occupancy']:.0%} | {r['div64']} ({r['div64_hot']}) | {loops} |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    report = collect()
    print(json.dumps(report) if args.json else table(report))


if __name__ == "__main__":
    main()
