"""Softmax-family op modes, shared by the CPU and CUDA kernels (ints: numba compiles one
specialization per literal value)."""
MODE_LOGSUMEXP = 0
MODE_LOG_SOFTMAX = 1
MODE_SOFTMAX = 2
