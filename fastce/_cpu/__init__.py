"""Numba CPU kernels.  ``primitives`` holds the shared numerics; one module per op family,
``checks`` the data checks.  ``fastce._runtime`` imports them (and purges numba's on-disk
cache of them when any kernel source changed)."""
