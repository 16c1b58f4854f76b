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


class CrossEntropyLargeVocab:
    """Cross-entropy with the large-vocabulary options (softcap 30, z-loss 1e-4: Gemma 2 /
    PaLM values) on (512, 32000) float32 logits, against the same without them: fastce's
    NumPy function, ``fastce.torch.cross_entropy``, and torch's plain formulation
    (``fastce.reference.torch_cross_entropy_zloss_softcap``: tanh, cross_entropy, logsumexp,
    autograd).  ``options`` "none" is each implementation's default path."""

    IMPLS = ["fastce", "fastce-torch", "torch"]
    OPTIONS = {"softcap+z_loss": dict(softcap=30.0, z_loss=1e-4), "none": {}}
    params = [IMPLS, [512], [32000], list(OPTIONS), ["float32"]]
    param_names = ["impl", "batch", "classes", "options", "dtype"]
    timeout = 300

    def setup(self, impl, batch, classes, options, dtype):
        if impl not in self.IMPLS:
            raise NotImplementedError(impl)
        if impl != "fastce" and C.torch is None:
            raise NotImplementedError("torch is not installed")
        C.skip_if_too_large(batch * classes)

        def build():
            C.configure_threads()
            x = C.make_logits((batch, classes), dtype)
            t = C.make_targets((batch,), classes)
            kw = self.OPTIONS[options]
            if impl == "fastce":
                import fastce
                fwd = lambda: fastce.cross_entropy(x, t, **kw)               # noqa: E731
                grad = lambda: fastce.cross_entropy_with_grad(x, t, **kw)    # noqa: E731
            else:
                torch = C.torch
                import fastce.torch as ft
                from fastce.reference import torch_cross_entropy_zloss_softcap
                f = ft.cross_entropy if impl == "fastce-torch" else \
                    torch_cross_entropy_zloss_softcap
                xt = torch.from_numpy(x).requires_grad_(True)
                tt = torch.from_numpy(t)

                def fwd():
                    with torch.no_grad():
                        return f(xt, tt, **kw)

                def grad():
                    xt.grad = None
                    f(xt, tt, **kw).backward()
            C.warm_up(fwd, min_seconds=C.steady_seconds(x))   # compile / warm up
            C.warm_up(grad, min_seconds=C.steady_seconds(x))
            return fwd, grad
        self.fwd, self.grad = C.memoize(
            ("CrossEntropyLargeVocab", impl, batch, classes, options, dtype), build)

    def time_forward(self, impl, batch, classes, options, dtype):
        self.fwd()

    def time_forward_grad(self, impl, batch, classes, options, dtype):
        self.grad()
