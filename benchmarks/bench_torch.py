"""``fastce.torch.CrossEntropyLoss`` against ``torch.nn.CrossEntropyLoss``: the module's
forward, and forward + backward, on (batch, classes) float32 logits.  Skipped when torch is
missing."""
import numpy as np

from . import common as C

IMPLS = ["fastce-torch", "torch"]


class CrossEntropyLossModule:
    params = [IMPLS, [32, 512, 4096], [10, 1000, 32000], ["float32"]]
    param_names = ["impl", "batch", "classes", "dtype"]
    timeout = 300

    def setup(self, impl, batch, classes, dtype):
        if impl not in IMPLS:
            raise NotImplementedError(impl)
        if C.torch is None:
            raise NotImplementedError("torch is not installed")
        C.skip_if_too_large(batch * classes)

        def build():
            torch = C.torch
            import fastce.torch as ft
            C.configure_threads()
            module = (ft.CrossEntropyLoss if impl == "fastce-torch"
                      else torch.nn.CrossEntropyLoss)()
            x = torch.from_numpy(C.make_logits((batch, classes), dtype)).requires_grad_(True)
            t = torch.from_numpy(C.make_targets((batch,), classes))
            module(x, t).backward()                  # compile / warm up
            return module, x, t
        self.module, self.x, self.t = C.memoize(
            ("CrossEntropyLossModule", impl, batch, classes, dtype), build)

    def time_forward(self, impl, batch, classes, dtype):
        with C.torch.no_grad():
            self.module(self.x, self.t)

    def time_forward_backward(self, impl, batch, classes, dtype):
        self.x.grad = None
        self.module(self.x, self.t).backward()
