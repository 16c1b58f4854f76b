"""Linear cross-entropy forward + backward: the loss of ``hidden @ weight.T`` and the
gradients with respect to hidden and weight, float32.

``impl``: ``fastce`` is ``fastce.linear_cross_entropy_with_grad`` (NumPy), ``fastce-torch``
is ``fastce.torch.linear_cross_entropy`` + ``backward()``, ``torch`` is
``F.cross_entropy(hidden @ weight.T, target)`` + ``backward()`` (the N x V logits
materialized).  The torch rows are skipped when torch is missing.
"""
import numpy as np

from . import common as C

IMPLS = ["fastce", "fastce-torch", "torch"]
# (N, H, V): a tiny sanity row, then a large-vocabulary LM head (Llama-2's V = 32000).
SHAPES = [(64, 128, 1000), (512, 1024, 32000), (4096, 1024, 32000)]


def _make(N, H, V):
    rng = np.random.default_rng(C.SEED)
    h = (rng.standard_normal((N, H), dtype=np.float32) * np.float32(0.05))
    w = (rng.standard_normal((V, H), dtype=np.float32) * np.float32(0.05))
    return h, w, rng.integers(0, V, N)


def _call(impl, h, w, t):
    if impl == "fastce":
        import fastce
        return lambda: fastce.linear_cross_entropy_with_grad(h, w, t)
    if C.torch is None:
        raise NotImplementedError("torch is not installed")
    torch = C.torch
    import fastce.torch as ft
    ht = torch.from_numpy(h).requires_grad_(True)
    wt = torch.from_numpy(w).requires_grad_(True)
    tt = torch.from_numpy(t)
    loss_fn = (ft.linear_cross_entropy if impl == "fastce-torch"
               else lambda a, b, c: torch.nn.functional.cross_entropy(a @ b.T, c))

    def run():
        ht.grad = wt.grad = None
        loss_fn(ht, wt, tt).backward()
    return run


class _LinearSetup:
    params = [IMPLS, SHAPES]
    param_names = ["impl", "shape"]
    number = 1
    repeat = (1, 5, 60.0)
    warmup_time = 0
    timeout = 900

    def setup(self, impl, shape):
        if impl not in IMPLS:
            raise NotImplementedError(impl)
        N, H, V = shape
        C.skip_if_too_large(N * V)

        def build():
            C.configure_threads()
            _call(impl, *_make(64, 16, 2048))()  # compile / warm up (parallel kernels too)
            call = _call(impl, *_make(N, H, V))
            # once at the timed shape too: each sample is a single call (number = 1), and
            # the first call at a shape (its buffers, BLAS's first use of them) is not the
            # steady state the other samples see
            C.warm_up(call)
            return call
        self.call = C.memoize(("LinearCrossEntropy", impl, shape), build)


class LinearCrossEntropy(_LinearSetup):
    def time_forward_backward(self, impl, shape):
        self.call()


class LinearCrossEntropyMemory(_LinearSetup):
    """``peakmem_``: the process's peak RSS (imports + inputs + the call);
    ``track_extra_memory_mib``: what the call adds at its peak, in MiB."""

    def setup(self, impl, shape):
        C._fix_malloc_threshold()
        super().setup(impl, shape)
        C.reset_peak_rss()

    def peakmem_forward_backward(self, impl, shape):
        self.call()

    def track_extra_memory_mib(self, impl, shape):
        base = C.reset_peak_rss()
        if base is None:
            raise NotImplementedError("needs Linux /proc/self/clear_refs")
        self.call()
        return (C.peak_rss() - base) / 2**20

    track_extra_memory_mib.unit = "MiB"
