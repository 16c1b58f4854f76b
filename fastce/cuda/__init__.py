"""fastce's CUDA kernels: the public functions of :mod:`fastce` for device arrays.

Every function takes CUDA arrays -- anything with ``__cuda_array_interface__``: Numba device
arrays, CuPy arrays, PyTorch CUDA tensors -- (NumPy arrays are copied to the device), runs
hand-written ``numba.cuda`` kernels on the caller's stream (torch's current stream for
tensors) and returns device arrays: a torch tensor for a torch input, a CuPy array for a CuPy
input, else a Numba device array.  Reductions ('mean', 'sum') stay on the device and come
back as 0-d arrays.  Semantics, errors and messages are those of the CPU functions in
:mod:`fastce`, value for value.

Importing this module needs nothing beyond fastce's own dependencies; the first call checks
for NVIDIA's ``numba-cuda`` (``pip install 'fastce[cuda]'``; from a clone
``pip install -e '.[cuda]'``) and for a GPU, and says which is
missing.  With ``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported, the same kernels run
in Numba's CUDA simulator (slowly; that is how the tests run them without a GPU).

float32 and float64 are computed in their own precision, float16 (and other floating types)
in float32, converted back on output.
"""
import importlib.util
import inspect
import textwrap

from .. import _bce, _cross_entropy, _nll, _softmax
from .._modes import MODE_LOG_SOFTMAX, MODE_LOGSUMEXP, MODE_SOFTMAX

__all__ = ["logsumexp", "log_softmax", "softmax", "cross_entropy", "cross_entropy_with_grad",
           "binary_cross_entropy", "binary_cross_entropy_with_logits",
           "binary_cross_entropy_with_grad", "binary_cross_entropy_with_logits_with_grad",
           "nll_loss", "nll_loss_with_grad", "is_available"]

_IMPL = None


def _backend():
    """``fastce.cuda._impl``, imported on first use once numba-cuda and a GPU (or the
    simulator) are known to be there."""
    global _IMPL
    if _IMPL is not None:
        return _IMPL
    if importlib.util.find_spec("numba_cuda") is None:
        raise ImportError("fastce's CUDA kernels need NVIDIA's numba-cuda, which is not "
                          "installed: pip install 'fastce[cuda]' (from a clone of fastce: "
                          "pip install -e '.[cuda]')")
    from numba import config, cuda
    if not config.ENABLE_CUDASIM and not cuda.is_available():
        raise RuntimeError("fastce got a CUDA array but numba-cuda finds no usable GPU "
                           "(numba.cuda.is_available() is False: no NVIDIA GPU or driver on "
                           "this machine); pass NumPy arrays to use the CPU kernels")
    from . import _impl as impl
    _IMPL = impl
    return impl


def is_available():
    """Whether the CUDA kernels can run here (numba-cuda installed and a GPU present, or the
    simulator enabled).

    Returns
    -------
    bool
    """
    try:
        _backend()
    except (ImportError, RuntimeError):
        return False
    return True


_ON_DEVICE = ("On the GPU: takes CUDA arrays (host arrays are copied to the device), runs on "
              "the input's stream and returns a device array of the input's kind; 'mean' and "
              "'sum' stay on the device as 0-d arrays.")
_WAITS = (" Bad {what} are found on the device and raised once the call's kernels are "
          "queued: raising waits for the stream.")


def _documented_by(front, waits=None):
    """Give a ``fastce.cuda`` function the summary of ``front`` (its ``fastce`` twin), a
    note on what differs on the GPU, and a pointer to the full docstring: the parameters,
    semantics and errors are the same and documented once."""
    def decorate(f):
        summary = inspect.cleandoc(front.__doc__).split("\n\n")[0]
        note = textwrap.fill(_ON_DEVICE + (_WAITS.format(what=waits) if waits else ""), 92)
        f.__doc__ = (f"{summary}\n\n{note}\n\nSee Also\n--------\nfastce.{front.__name__} : "
                     f"parameters, semantics, errors and examples.\n")
        return f
    return decorate


def _no_out(out, name):
    if out is not None:
        raise NotImplementedError(f"{name}= (writing into the caller's array) is not "
                                  f"implemented for CUDA arrays yet; call without it")


@_documented_by(_softmax.logsumexp)
def logsumexp(x, axis=-1):
    return _backend().softmax_family(x, axis, MODE_LOGSUMEXP)


@_documented_by(_softmax.log_softmax)
def log_softmax(x, axis=-1, *, out=None):
    _no_out(out, "out")
    return _backend().softmax_family(x, axis, MODE_LOG_SOFTMAX)


@_documented_by(_softmax.softmax)
def softmax(x, axis=-1, *, out=None):
    _no_out(out, "out")
    return _backend().softmax_family(x, axis, MODE_SOFTMAX)


@_documented_by(_cross_entropy.cross_entropy, waits="class indices and probability targets")
def cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0, softcap=None, z_loss=0.0, return_lse=False):
    return _backend().cross_entropy(logits, target, weight, ignore_index, reduction,
                                    label_smoothing, None, False, softcap=softcap,
                                    z_loss=z_loss, return_lse=return_lse)


@_documented_by(_cross_entropy.cross_entropy_with_grad,
                waits="class indices and probability targets")
def cross_entropy_with_grad(logits, target, *, weight=None, ignore_index=-100,
                            reduction="mean", label_smoothing=0.0, grad_output=None,
                            grad_input=None, softcap=None, z_loss=0.0, return_lse=False):
    _no_out(grad_input, "grad_input")
    return _backend().cross_entropy(logits, target, weight, ignore_index, reduction,
                                    label_smoothing, grad_output, True, softcap=softcap,
                                    z_loss=z_loss, return_lse=return_lse)


@_documented_by(_nll.nll_loss, waits="class indices")
def nll_loss(log_probs, target, *, weight=None, ignore_index=-100, reduction="mean"):
    return _backend().nll_loss(log_probs, target, weight, ignore_index, reduction)


@_documented_by(_nll.nll_loss_with_grad, waits="class indices")
def nll_loss_with_grad(log_probs, target, *, weight=None, ignore_index=-100, reduction="mean",
                       grad_output=None):
    return _backend().nll_loss(log_probs, target, weight, ignore_index, reduction, grad_output,
                               True)


@_documented_by(_bce.binary_cross_entropy, waits="inputs and targets")
def binary_cross_entropy(input, target, *, weight=None, reduction="mean"):
    return _backend().binary_cross_entropy(input, target, weight, reduction)


@_documented_by(_bce.binary_cross_entropy_with_logits, waits="targets")
def binary_cross_entropy_with_logits(input, target, *, weight=None, pos_weight=None,
                                     reduction="mean"):
    return _backend().binary_cross_entropy_with_logits(input, target, weight, pos_weight,
                                                       reduction)


@_documented_by(_bce.binary_cross_entropy_with_grad, waits="inputs and targets")
def binary_cross_entropy_with_grad(input, target, *, weight=None, reduction="mean",
                                   grad_output=None):
    return _backend().binary_cross_entropy(input, target, weight, reduction, grad_output, True)


@_documented_by(_bce.binary_cross_entropy_with_logits_with_grad, waits="targets")
def binary_cross_entropy_with_logits_with_grad(input, target, *, weight=None, pos_weight=None,
                                               reduction="mean", grad_output=None):
    return _backend().binary_cross_entropy_with_logits(input, target, weight, pos_weight,
                                                       reduction, grad_output, True)
