"""Binary cross-entropy on (batch, labels) multi-label inputs."""

from . import common as C


class BinaryCrossEntropy(C.OpBenchmark):
    """``binary_cross_entropy(p, t)`` with probabilities ``p``; mean reduction."""

    op = "binary_cross_entropy"
    roof = C.ROOF_READ
    roof_arrays = 2  # probabilities and targets

    def make_inputs(self, batch, classes, dtype):
        shape = (batch, classes)
        return [C.make_probabilities(shape, dtype), C.make_binary_targets(shape, dtype)], {}

    def time_forward(self, impl, batch, classes, dtype):
        self.call()


class BinaryCrossEntropyWithLogits(C.OpBenchmark):
    """``binary_cross_entropy_with_logits(x, t)``; mean reduction."""

    op = "binary_cross_entropy_with_logits"
    roof = C.ROOF_READ
    roof_arrays = 2  # logits and targets

    def make_inputs(self, batch, classes, dtype):
        shape = (batch, classes)
        return [C.make_logits(shape, dtype), C.make_binary_targets(shape, dtype)], {}

    def time_forward(self, impl, batch, classes, dtype):
        self.call()
