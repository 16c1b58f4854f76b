"""fastce's CUDA kernels: the public functions of :mod:`fastce` for device arrays.

Every function takes CUDA arrays -- anything with ``__cuda_array_interface__``: Numba device
arrays, CuPy arrays, PyTorch CUDA tensors -- (NumPy arrays are copied to the device), runs
hand-written ``numba.cuda`` kernels on the caller's stream (torch's current stream for
tensors) and returns device arrays: a torch tensor for a torch input, a CuPy array for a CuPy
input, else a Numba device array.  Reductions ('mean', 'sum') stay on the device and come
back as 0-d arrays.  Semantics, errors and messages are those of the CPU functions in
:mod:`fastce`, value for value.

Importing this module needs nothing beyond fastce's own dependencies; the first call checks
for NVIDIA's ``numba-cuda`` (``pip install fastce[cuda]``) and for a GPU, and says which is
missing.  With ``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported, the same kernels run
in Numba's CUDA simulator (slowly; that is how the tests run them without a GPU).

float32 and float64 are computed in their own precision, float16 (and other floating types)
in float32, converted back on output.
"""
import importlib.util

__all__ = ["logsumexp", "log_softmax", "softmax", "cross_entropy", "cross_entropy_with_grad",
           "binary_cross_entropy", "binary_cross_entropy_with_logits", "is_available"]

_IMPL = None


def _backend():
    """``fastce.cuda._impl``, imported on first use once numba-cuda and a GPU (or the
    simulator) are known to be there."""
    global _IMPL
    if _IMPL is not None:
        return _IMPL
    if importlib.util.find_spec("numba_cuda") is None:
        raise ImportError("fastce's CUDA kernels need NVIDIA's numba-cuda, which is not "
                          "installed: pip install fastce[cuda]")
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


def logsumexp(x, axis=-1):
    """Log of the sum of exponentials along an axis, on the GPU.

    Parameters
    ----------
    x : CUDA array
        Floating-point input.
    axis : int, optional
        The axis to reduce.  Default: the last.

    Returns
    -------
    device array
        ``x``'s shape without ``axis``, ``x``'s dtype (0-d for 1-D input).

    See Also
    --------
    fastce.logsumexp : the semantics (``-inf`` rows, ``+inf``, NaN, empty axes).
    """
    return _backend().softmax_family(x, axis, "logsumexp")


def log_softmax(x, axis=-1):
    """Logarithm of the softmax along an axis, on the GPU.

    Parameters
    ----------
    x : CUDA array
        Floating-point input.
    axis : int, optional
        The class axis.  Default: the last.

    Returns
    -------
    device array
        Same shape and dtype as ``x``.

    See Also
    --------
    fastce.log_softmax
    """
    return _backend().softmax_family(x, axis, "log_softmax")


def softmax(x, axis=-1):
    """Softmax along an axis, on the GPU.

    Parameters
    ----------
    x : CUDA array
        Floating-point input.
    axis : int, optional
        The class axis.  Default: the last.

    Returns
    -------
    device array
        Same shape and dtype as ``x``.

    See Also
    --------
    fastce.softmax
    """
    return _backend().softmax_family(x, axis, "softmax")


def cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                  label_smoothing=0.0):
    """Cross-entropy between logits and targets, on the GPU.

    Parameters
    ----------
    logits : CUDA array
        (C,), (N, C) or (N, C, d1, ..., dk).
    target : CUDA array or array_like
        Class indices of the logits' shape without the class axis, or class probabilities of
        the logits' shape and dtype.
    weight : CUDA array or array_like, optional
        Per-class weight of shape (C,).
    ignore_index : int, optional
    reduction : {'mean', 'sum', 'none'}, optional
    label_smoothing : float, optional

    Returns
    -------
    device array
        0-d for 'mean'/'sum' (computed on the device), the target's shape for 'none'.

    Raises
    ------
    IndexError
        A class index outside [0, C) that is not ``ignore_index``: checked on the device,
        raised after the call's kernels are queued (this waits for the stream).

    See Also
    --------
    fastce.cross_entropy : the semantics.
    """
    return _backend().cross_entropy(logits, target, weight, ignore_index, reduction,
                                 label_smoothing, None, False)


def cross_entropy_with_grad(logits, target, *, weight=None, ignore_index=-100,
                            reduction="mean", label_smoothing=0.0, grad_output=None):
    """Cross-entropy and its gradient with respect to the logits, on the GPU, in one pass.

    Parameters
    ----------
    logits, target, weight, ignore_index, reduction, label_smoothing
        As in :func:`cross_entropy`.
    grad_output : CUDA array, array_like or float, optional
        The upstream gradient: the loss's shape for 'none', a scalar otherwise.

    Returns
    -------
    loss : device array
    grad_logits : device array
        The logits' shape and dtype.

    See Also
    --------
    fastce.cross_entropy_with_grad
    """
    return _backend().cross_entropy(logits, target, weight, ignore_index, reduction,
                                 label_smoothing, grad_output, True)


def binary_cross_entropy(input, target, *, weight=None, reduction="mean"):
    """Binary cross-entropy between probabilities and targets, on the GPU.

    Parameters
    ----------
    input : CUDA array
        Probabilities in [0, 1].
    target : CUDA array or array_like
        The input's shape.
    weight : CUDA array or array_like, optional
        Broadcastable to the input's shape.
    reduction : {'mean', 'sum', 'none'}, optional

    Returns
    -------
    device array

    Raises
    ------
    ValueError
        An input outside [0, 1] or NaN (checked on the device; raising waits for the stream).

    See Also
    --------
    fastce.binary_cross_entropy
    """
    return _backend().binary_cross_entropy(input, target, weight, reduction)


def binary_cross_entropy_with_logits(input, target, *, weight=None, pos_weight=None,
                                     reduction="mean"):
    """Binary cross-entropy on logits, on the GPU.

    Parameters
    ----------
    input : CUDA array
        Logits.
    target : CUDA array or array_like
        The input's shape.
    weight, pos_weight : CUDA array or array_like, optional
    reduction : {'mean', 'sum', 'none'}, optional

    Returns
    -------
    device array

    See Also
    --------
    fastce.binary_cross_entropy_with_logits
    """
    return _backend().binary_cross_entropy_with_logits(input, target, weight, pos_weight,
                                                    reduction)
