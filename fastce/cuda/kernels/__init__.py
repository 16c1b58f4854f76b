"""The CUDA kernels, one module per family, built per compute dtype from the device functions
of :mod:`.primitives` (see ``fastce.cuda._impl.kernels``)."""
