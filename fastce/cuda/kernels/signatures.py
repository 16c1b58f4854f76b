"""The argument types every CUDA kernel is launched with, for compiling them ahead of time
without a GPU (``tests/cuda_ptx_compile.py``, ``benchmarks/cuda_static.py``).

They are the types ``fastce.cuda._impl`` launches with: Python ints are int64, bools boolean,
float scalars the compute dtype's NumPy scalars; ``S3`` is a strided (N, C, S) view.
"""
from types import SimpleNamespace

import numpy as np
from numba import from_dtype, types

__all__ = ["CC", "launch_signatures", "nll_signatures", "copy_signatures", "offline_target"]

CC = (9, 0)  # sm_90 (H100)
i64 = types.int64
b1 = types.boolean


def launch_signatures(K, dt):
    """``{name: (kernel, argument types)}`` for the kernels of ``K = _impl.kernels(dt)``; a
    kernel launched with two layouts appears twice (``softmax_kernel_strided``, ...)."""
    f = from_dtype(np.dtype(dt))
    A1, A2, A3 = (types.Array(f, n, "C") for n in (1, 2, 3))
    S3 = types.Array(f, 3, "A")
    I1 = types.Array(i64, 1, "C")
    T2 = types.Array(i64, 2, "A")
    T2i32 = types.Array(types.int32, 2, "A")
    NO_LSE = A2  # the cross-entropy kernels' lse_out placeholder when no lse is returned
    BCE = (A1, A1, A1, A1, A1, f, f, A1, A1, I1)  # (x, y, weight, pos_weight, gout, g0, ...)
    INDEX = (A3, T2, i64, A1, A1, f, f, b1, f, A1, A3, A2, i64, i64, A1, A1, f, NO_LSE)
    PROB = (A3, S3, A1, f, f, b1, f, f, A1, A3, A1, i64, f, NO_LSE)
    return {
        "stats_kernel": (K.stats_kernel, (A3, i64, i64, A1, A1)),
        "softmax_kernel": (K.softmax_kernel, (A3, A3, i64, i64, i64, A1, A1)),
        "softmax_kernel_strided": (K.softmax_kernel, (S3, A3, i64, i64, i64, A1, A1)),
        "prepare_kernel": (K.prepare_kernel, (T2, i64, i64, A1, I1, A1)),
        "prepare_kernel_int32": (K.prepare_kernel, (T2i32, i64, i64, A1, I1, A1)),
        "index_kernel": (K.index_kernel, INDEX),
        "index_kernel_weighted": (K.index_kernel_weighted, INDEX),
        "prob_kernel": (K.prob_kernel, PROB),
        "prob_kernel_weighted": (K.prob_kernel_weighted, PROB),
        "bce_kernel": (K.bce_kernel, BCE),
        "bce_logits_kernel": (K.bce_logits_kernel, BCE),
        "bce_grad_kernel": (K.bce_grad_kernel, BCE),
        "bce_logits_grad_kernel": (K.bce_logits_grad_kernel, BCE),
        "bce_sum_kernel": (K.bce_sum_kernel, BCE),
        "bce_logits_sum_kernel": (K.bce_logits_sum_kernel, BCE),
        "bce_grad_sum_kernel": (K.bce_grad_sum_kernel, BCE),
        "bce_logits_grad_sum_kernel": (K.bce_logits_grad_sum_kernel, BCE),
        "sum_kernel": (K.sum_kernel, (A1, A1, i64, A1, f)),
        "rowsum_kernel": (K.rowsum_kernel, (A2, A1)),
        "bad_value_kernel": (K.bad_value_kernel, (S3, f, f, I1)),
    }


def nll_signatures(K, dt):
    """As :func:`launch_signatures`, for the nll_loss gather kernels (``kernels.nll``): kept
    apart because the sm_90 static table (``benchmarks/cuda_static.py``) does not cover them
    yet; the PTX compile test does."""
    f = from_dtype(np.dtype(dt))
    A1, A3 = types.Array(f, 1, "C"), types.Array(f, 3, "C")
    S3 = types.Array(f, 3, "A")
    T2 = types.Array(i64, 2, "A")
    return {
        "nll_loss_kernel": (K.nll_loss_kernel, (S3, T2, i64, A1, A1)),
        "nll_grad_kernel": (K.nll_grad_kernel, (S3, T2, i64, A1, A1, b1, f, A1, A3)),
    }


def copy_signatures():
    """``{name: argument types}`` of the strided-copy kernel's float16 conversions (the
    compute dtype is float32) and of a plain float32 copy."""
    return {
        "f16_to_f32": (types.Array(types.float16, 6, "A"), types.Array(types.float32, 6, "C")),
        "f32_to_f16": (types.Array(types.float32, 6, "A"), types.Array(types.float16, 6, "C")),
        "f32_to_f32": (types.Array(types.float32, 6, "A"), types.Array(types.float32, 6, "C")),
    }


def offline_target():
    """numba-cuda compiles a ``@cuda.jit(device=True)`` function called from a kernel for the
    current device's compute capability, which needs a driver even under ``compile_ptx``:
    pretend the current device is the target."""
    import numba.cuda.dispatcher as dispatcher
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=CC)
