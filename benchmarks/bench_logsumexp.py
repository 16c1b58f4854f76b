"""logsumexp, log_softmax and softmax over the class axis of (batch, classes) logits."""

import numpy as np

from . import common as C


class _Family(C.OpBenchmark):
    def make_inputs(self, batch, classes, dtype):
        return [C.make_logits((batch, classes), dtype)], {"axis": -1}


class LogSumExp(_Family):
    """``logsumexp(x, axis=-1)``: one read of the logits, N outputs."""

    op = "logsumexp"
    roof = C.ROOF_READ

    def time_logsumexp(self, impl, batch, classes, dtype):
        self.call()


class LogSoftmax(_Family):
    """``log_softmax(x, axis=-1)``: reads and writes N x C."""

    op = "log_softmax"
    roof = C.ROOF_READ_WRITE

    def time_log_softmax(self, impl, batch, classes, dtype):
        self.call()


class Softmax(_Family):
    """``softmax(x, axis=-1)``: reads and writes N x C."""

    op = "softmax"
    roof = C.ROOF_READ_WRITE

    def time_softmax(self, impl, batch, classes, dtype):
        self.call()


class LogSumExpAccuracy:
    """Max relative error of logsumexp against an extended-precision reference.

    Logits are ``scale`` times standard normal: at scale 100 float32
    ``exp`` overflows (numpy-naive returns inf), at scale 1000 float64 does.
    The reference is computed in ``np.longdouble`` (80-bit on x86) from the
    same inputs; errors are ``|y - ref| / max(|ref|, 1)``, 1e30 (shown as inf/nan
    by fastce-report) where an implementation returns inf or nan for a finite
    reference.
    """

    params = [C.EAGER_IMPLS, [10, 1000, 32000], C.DTYPES, [1, 10, 100, 1000]]
    param_names = ["impl", "classes", "dtype", "scale"]
    batch = 64
    unit = "relative error"

    def setup(self, impl, classes, dtype, scale):
        def build():
            x = C.make_logits((self.batch, classes), dtype, scale=float(scale), seed=7)
            call = C.make_call(impl, "logsumexp", x, axis=-1)
            C.warm_up(call, times=1)
            xl = x.astype(np.longdouble)
            m = xl.max(axis=-1, keepdims=True)
            ref = (np.log(np.exp(xl - m).sum(axis=-1)) + m[:, 0])
            return call, ref

        self.call, self.ref = C.memoize(("lse-acc", impl, classes, dtype, scale), build)

    def track_max_rel_error(self, impl, classes, dtype, scale):
        return C.max_rel_error(self.call(), self.ref)
