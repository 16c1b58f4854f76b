"""fastce: fast, numerically stable cross-entropy kernels (Numba CPU and CUDA).

The public functions take NumPy arrays (CPU kernels) or CUDA arrays (anything with
``__cuda_array_interface__``: the CUDA kernels) and follow ``torch.nn.functional``'s
semantics value for value.
"""
from ._bce import (binary_cross_entropy, binary_cross_entropy_with_grad,
                   binary_cross_entropy_with_logits, binary_cross_entropy_with_logits_with_grad)
from ._cross_entropy import cross_entropy, cross_entropy_with_grad
from ._softmax import log_softmax, logsumexp, softmax
from ._nll import nll_loss, nll_loss_with_grad
from .linear import linear_cross_entropy, linear_cross_entropy_with_grad

__version__ = "0.1.0"

__all__ = ["logsumexp", "log_softmax", "softmax", "cross_entropy", "cross_entropy_with_grad",
           "binary_cross_entropy", "binary_cross_entropy_with_logits",
           "binary_cross_entropy_with_grad", "binary_cross_entropy_with_logits_with_grad",
           "nll_loss", "nll_loss_with_grad", "linear_cross_entropy",
           "linear_cross_entropy_with_grad"]
