"""Compile every fastce CUDA kernel to PTX for sm_90 without a GPU and report, per kernel,
the PTX lines that use float64 (``.f64``).

Run by ``tests/test_cuda_ptx.py`` in a subprocess (with the simulator off and ``CUDA_HOME``
pointing at the NVVM of the ``nvidia-*`` pip wheels); prints one JSON object
``{"<dtype>/<twin>/<kernel>": summary}`` on its last line (see :func:`summarize`).  The
signatures are the argument types ``fastce.cuda._impl`` launches with: Python ints are int64, bools boolean,
float scalars the compute dtype's NumPy scalars.
"""
import json
import re
import sys
from types import SimpleNamespace

import numpy as np
from numba import cuda, from_dtype, types

from fastce.cuda._impl import kernels
from fastce.cuda.kernels.reduce import copy_kernel

CC = (9, 0)
i64 = types.int64
b1 = types.boolean


def signatures(K, dt):
    f = from_dtype(np.dtype(dt))
    A1, A2, A3 = (types.Array(f, n, "C") for n in (1, 2, 3))
    S3 = types.Array(f, 3, "A")   # strided (N, C, S) view
    I1 = types.Array(i64, 1, "C")
    T2 = types.Array(i64, 2, "A")
    T2i32 = types.Array(types.int32, 2, "A")
    return {
        "stats_kernel": (K.stats_kernel, (A3, i64, i64, A1, A1)),
        "softmax_kernel": (K.softmax_kernel, (A3, A3, i64, i64, i64, A1, A1)),
        "softmax_kernel_strided": (K.softmax_kernel, (S3, A3, i64, i64, i64, A1, A1)),
        "prepare_kernel": (K.prepare_kernel, (T2, i64, i64, A1, I1, A1)),
        "prepare_kernel_int32": (K.prepare_kernel, (T2i32, i64, i64, A1, I1, A1)),
        "index_kernel": (K.index_kernel, (A3, T2, i64, A1, A1, f, f, b1, f, A1, A3, A2, i64,
                                          i64, A1, A1)),
        "prob_kernel": (K.prob_kernel, (A3, S3, A1, f, f, b1, f, f, A1, A3, A1, i64)),
        "bce_kernel": (K.bce_kernel, (A1, A1, A1, A1, I1)),
        "bce_logits_kernel": (K.bce_logits_kernel, (A1, A1, A1, A1, A1)),
        "sum_kernel": (K.sum_kernel, (A1, A1, i64, A1, f)),
        "rowsum_kernel": (K.rowsum_kernel, (A2, A1)),
        "bad_value_kernel": (K.bad_value_kernel, (S3, f, f, I1)),
    }


def summarize(ptx):
    """The PTX lines using float64 (any instruction, register or parameter of type f64: add.f64,
    cvt.f64.f32, .param .f64, ...), the count of float32 lines and of warp shuffles."""
    lines = [ln.strip() for ln in ptx.splitlines() if not ln.strip().startswith("//")]
    return {"f64": [ln for ln in lines if re.search(r"\.f64\b", ln)],
            "f32": sum(1 for ln in lines if re.search(r"\.f32\b", ln)),
            "shfl": sum(1 for ln in lines if ln.startswith("shfl."))}


def _no_driver_device_functions():
    """numba-cuda compiles a ``@cuda.jit(device=True)`` function called from a kernel for the
    current device's compute capability, which needs a driver even under ``compile_ptx``;
    pretend the current device is the target."""
    import numba.cuda.dispatcher as dispatcher
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=CC)


def main():
    _no_driver_device_functions()
    report = {}
    for dt in (np.float32, np.float64):
        # shuffle=False: the simulator's twin, type-checked by the real compiler (float32).
        for shuffle in ((True, False) if dt == np.float32 else (True,)):
            K = kernels(np.dtype(dt), shuffle)
            twin = "shuffle" if shuffle else "shared"
            for name, (kern, sig) in signatures(K, dt).items():
                ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=CC)
                assert ".entry" in ptx
                report[f"{np.dtype(dt).name}/{twin}/{name}"] = summarize(ptx)
    f16 = types.Array(types.float16, 6, "A")
    f32 = types.Array(types.float32, 6, "C")
    for name, sig in (("f16_to_f32", (f16, f32)),
                      ("f32_to_f16", (types.Array(types.float32, 6, "A"),
                                      types.Array(types.float16, 6, "C")))):
        ptx, _ = cuda.compile_ptx(copy_kernel.py_func, sig, cc=CC)
        report[f"float32/copy/{name}"] = summarize(ptx)
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
