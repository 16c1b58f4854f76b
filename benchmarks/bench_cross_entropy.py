"""Cross-entropy forward, forward + gradient, K-dim inputs, memory and accuracy."""

import numpy as np

from . import common as C


class _CE(C.OpBenchmark):
    def make_inputs(self, batch, classes, dtype):
        return [C.make_logits((batch, classes), dtype), C.make_targets((batch,), classes)], {}


class CrossEntropy(_CE):
    """``cross_entropy(logits, target)``, mean reduction, class-index targets."""

    op = "cross_entropy"
    roof = C.ROOF_READ

    def time_forward(self, impl, batch, classes, dtype):
        self.call()


class CrossEntropyGrad(_CE):
    """``cross_entropy_with_grad``: loss and d loss / d logits (torch: autograd)."""

    op = "cross_entropy_with_grad"
    roof = C.ROOF_READ_WRITE

    def time_forward_grad(self, impl, batch, classes, dtype):
        self.call()


class CrossEntropyMemory(C.OpMemoryBenchmark, _CE):
    """Memory of the forward: a fused kernel allocates nothing of size N x C."""

    op = "cross_entropy"

    def peakmem_forward(self, impl, batch, classes, dtype):
        self.call()

    def track_forward_extra_memory(self, impl, batch, classes, dtype):
        return self.extra_memory()

    track_forward_extra_memory.unit = "x logits size"


class CrossEntropyGradMemory(C.OpMemoryBenchmark, _CE):
    """Memory of forward + gradient: the gradient itself is one N x C."""

    op = "cross_entropy_with_grad"

    def peakmem_forward_grad(self, impl, batch, classes, dtype):
        self.call()

    def track_forward_grad_extra_memory(self, impl, batch, classes, dtype):
        return self.extra_memory()

    track_forward_grad_extra_memory.unit = "x logits size"


class _KDim(C.OpBenchmark):
    params = [C.IMPLS, C.KDIM_SHAPES, C.DTYPES]
    param_names = ["impl", "shape", "dtype"]

    def n_elements(self, shape):
        return int(np.prod(shape))

    def make_inputs(self, shape, dtype):
        n, c, *spatial = shape
        return [C.make_logits(shape, dtype), C.make_targets((n, *spatial), c)], {}


class CrossEntropyKDim(_KDim):
    """Segmentation-style ``(N, C, H, W)`` logits, class axis 1."""

    op = "cross_entropy"
    roof = C.ROOF_KDIM_READ

    def time_forward(self, impl, shape, dtype):
        self.call()


class CrossEntropyKDimGrad(_KDim):
    """Forward + gradient on ``(N, C, H, W)`` logits."""

    op = "cross_entropy_with_grad"
    roof = C.ROOF_KDIM_READ_WRITE

    def time_forward_grad(self, impl, shape, dtype):
        self.call()


class CrossEntropyAccuracy:
    """Max relative error of per-row losses against an extended-precision reference.

    Logits are ``scale`` times standard normal (see
    ``bench_logsumexp.LogSumExpAccuracy``); losses use ``reduction='none'``
    so one bad row is not averaged away.  The reference evaluates
    ``logsumexp(x) - x[target]`` in ``np.longdouble`` on the same inputs.
    """

    params = [C.EAGER_IMPLS, [10, 1000, 32000], C.DTYPES, [1, 10, 100, 1000]]
    param_names = ["impl", "classes", "dtype", "scale"]
    batch = 64
    unit = "relative error"

    def setup(self, impl, classes, dtype, scale):
        def build():
            x = C.make_logits((self.batch, classes), dtype, scale=float(scale), seed=8)
            y = C.make_targets((self.batch,), classes, seed=9)
            call = C.make_call(impl, "cross_entropy", x, y, reduction="none")
            C.warm_up(call, times=1)
            xl = x.astype(np.longdouble)
            m = xl.max(axis=-1)
            lse = np.log(np.exp(xl - m[:, None]).sum(axis=-1)) + m
            ref = lse - xl[np.arange(self.batch), y]
            return call, ref

        self.call, self.ref = C.memoize(("ce-acc", impl, classes, dtype, scale), build)

    def track_max_rel_error(self, impl, classes, dtype, scale):
        return C.max_rel_error(self.call(), self.ref)
