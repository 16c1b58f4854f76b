"""Compile every fastce CUDA kernel to PTX for sm_90 without a GPU and report, per kernel,
the PTX lines that use float64 (``.f64``).

Run by ``tests/test_cuda_ptx.py`` in a subprocess (with the simulator off and ``CUDA_HOME``
pointing at the NVVM of the ``nvidia-*`` pip wheels); prints one JSON object
``{"<dtype>/<twin>/<kernel>": summary}`` on its last line (see :func:`summarize`).  The
signatures are those of ``fastce.cuda.kernels.signatures``.
"""
import json
import re
import sys

import numpy as np
from numba import cuda

from fastce.cuda._impl import kernels
from fastce.cuda.kernels.reduce import copy_kernel
from fastce.cuda.kernels.signatures import (CC, copy_signatures, launch_signatures,
                                            nll_signatures, offline_target)


def summarize(ptx):
    """The PTX lines using float64 (any instruction, register or parameter of type f64: add.f64,
    cvt.f64.f32, .param .f64, ...), the count of float32 lines and of warp shuffles."""
    lines = [ln.strip() for ln in ptx.splitlines() if not ln.strip().startswith("//")]
    return {"f64": [ln for ln in lines if re.search(r"\.f64\b", ln)],
            "f32": sum(1 for ln in lines if re.search(r"\.f32\b", ln)),
            "shfl": sum(1 for ln in lines if ln.startswith("shfl."))}


def main():
    offline_target()
    report = {}
    for dt in (np.float32, np.float64):
        # shuffle=False: the simulator's twin, type-checked by the real compiler (float32).
        for shuffle in ((True, False) if dt == np.float32 else (True,)):
            K = kernels(np.dtype(dt), shuffle)
            twin = "shuffle" if shuffle else "shared"
            sigs = dict(launch_signatures(K, dt), **nll_signatures(K, dt))
            for name, (kern, sig) in sigs.items():
                ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=CC)
                assert ".entry" in ptx
                report[f"{np.dtype(dt).name}/{twin}/{name}"] = summarize(ptx)
    for name, sig in copy_signatures().items():
        if name == "f32_to_f32":
            continue
        ptx, _ = cuda.compile_ptx(copy_kernel.py_func, sig, cc=CC)
        report[f"float32/copy/{name}"] = summarize(ptx)
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
