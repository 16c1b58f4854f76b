"""Fresh outputs vs outputs into the caller's memory: ``log_softmax``/``softmax`` with and
without ``out=``, ``cross_entropy_with_grad`` with and without ``grad_input=``.

A training loop that reuses its buffers skips the page faults of a fresh N x C array; this
suite measures what that saves (``form``: "fresh" allocates per call, "out" reuses one
buffer).  fastce only: the other implementations have no such keyword in common.
"""
import fastce

from . import common as C


class OutputBuffer:
    params = [["fresh", "out"], [512, 4096], [1000, 32000], C.DTYPES]
    param_names = ["form", "batch", "classes", "dtype"]
    timeout = 300

    def setup(self, form, batch, classes, dtype):
        C.skip_if_too_large(batch * classes)

        def build():
            x = C.make_logits((batch, classes), dtype)
            t = C.make_targets((batch,), classes)
            buf = x.copy() if form == "out" else None
            calls = {
                "log_softmax": lambda: fastce.log_softmax(x, out=buf),
                "softmax": lambda: fastce.softmax(x, out=buf),
                "grad": lambda: fastce.cross_entropy_with_grad(x, t, grad_input=buf),
            }
            for call in calls.values():
                C.warm_up(call, min_seconds=C.steady_seconds(x))
            return calls

        self.calls = C.memoize(("OutputBuffer", form, batch, classes, dtype), build)

    def time_log_softmax(self, form, batch, classes, dtype):
        self.calls["log_softmax"]()

    def time_softmax(self, form, batch, classes, dtype):
        self.calls["softmax"]()

    def time_cross_entropy_with_grad(self, form, batch, classes, dtype):
        self.calls["grad"]()
