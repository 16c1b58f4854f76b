"""Every argument check and every error message, for the CPU and the CUDA backends alike.

The checks here look only at shapes, dtypes and scalar options, never at array data, so they
serve NumPy arrays and device arrays alike.  The data checks (class indices in range, targets
and probabilities in their intervals, no NaN) are kernels of each backend -- on the CPU
separate passes over the data before the compute kernel (``fastce._cpu.checks`` and the
``check_*``/``first_*`` kernels), on the GPU flags set by device kernels -- and both report
what they find through the ``raise_*`` functions here, so the messages are the same.
"""
import math
import numbers
from typing import NamedTuple

import numpy as np

REDUCTIONS = ("none", "mean", "sum")

_COMPUTE = {np.dtype(np.float32): np.dtype(np.float32), np.dtype(np.float64): np.dtype(np.float64)}


def compute_dtype(dtype, name):
    """The dtype a floating input is computed in: float32/float64 as they are, any other
    floating dtype (float16, longdouble) in float32.  Non-floating dtypes raise TypeError."""
    dtype = np.dtype(dtype)
    found = _COMPUTE.get(dtype)
    if found is not None:
        return found
    if dtype.kind == "f" and not dtype.isnative:
        # Big-endian (non-native) floats are computed in their native twin: >f8 in float64.
        return compute_dtype(dtype.newbyteorder("="), name)
    if dtype.kind == "f":
        return np.dtype(np.float32)
    raise TypeError(f"{name} must be a floating-point array (float32 or float64), "
                    f"got dtype {dtype}")


def result_dtype(dtype):
    """The dtype of an elementwise result for an input of ``dtype``: the same, in native
    byte order (float16 is computed in float32 and cast back)."""
    dtype = np.dtype(dtype)
    return dtype if dtype.isnative else dtype.newbyteorder("=")


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum', got {reduction!r}")


def check_axis(axis, ndim, name="x"):
    """Normalized axis; ``np.exceptions.AxisError`` (a ValueError and an IndexError)."""
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    if ndim == 0:
        raise ValueError(f"{name} must have at least 1 dimension, got a 0-d array")
    if not -ndim <= axis < ndim:
        raise np.exceptions.AxisError(
            f"axis {axis} is out of bounds for {name} with {ndim} dimension(s)")
    return int(axis) % ndim


def split_at_axis(shape, axis):
    """(outer, classes, inner) sizes of ``shape`` around ``axis``."""
    outer = 1
    for d in shape[:axis]:
        outer *= d
    inner = 1
    for d in shape[axis + 1:]:
        inner *= d
    return outer, shape[axis], inner


class CrossEntropyProblem(NamedTuple):
    """A validated cross-entropy call, in the canonical (N, C, S) view of the logits."""
    N: int
    C: int
    S: int
    probs: bool            # probability target (else class indices)
    dtype: np.dtype        # compute dtype
    loss_shape: tuple      # shape of the unreduced loss (the target's shape for indices)


_CE_PROBLEMS = {}


def cross_entropy_problem(logits_shape, logits_dtype, target_shape, target_dtype,
                          weight_shape, ignore_index, reduction, label_smoothing):
    """Validate a cross-entropy call's metadata; the result for a combination seen before
    comes from a small memo (a lookup costs far less than validating: tiny calls matter).
    The options' types are part of the key, so ``True`` never passes for ``1``."""
    key = (logits_shape, logits_dtype, target_shape, target_dtype, weight_shape,
           ignore_index, type(ignore_index), reduction, type(reduction), label_smoothing,
           type(label_smoothing))
    try:
        return _CE_PROBLEMS[key]
    except KeyError:
        pass
    except TypeError:          # an unhashable option: validate it (it will be rejected)
        return _cross_entropy_problem(logits_shape, logits_dtype, target_shape, target_dtype,
                                      weight_shape, ignore_index, reduction, label_smoothing)
    prob = _cross_entropy_problem(logits_shape, logits_dtype, target_shape, target_dtype,
                                  weight_shape, ignore_index, reduction, label_smoothing)
    if len(_CE_PROBLEMS) >= 512:
        _CE_PROBLEMS.clear()
    _CE_PROBLEMS[key] = prob
    return prob


def _cross_entropy_problem(logits_shape, logits_dtype, target_shape, target_dtype,
                           weight_shape, ignore_index, reduction, label_smoothing):
    dtype = compute_dtype(logits_dtype, "logits")
    nd = len(logits_shape)
    if nd == 0:
        raise ValueError("logits must have at least 1 dimension (C,), (N, C) or "
                         "(N, C, d1, ..., dk), got a 0-d array")
    if nd == 1:
        N, C, S = 1, logits_shape[0], 1
        index_shape = ()
    else:
        N, C = logits_shape[0], logits_shape[1]
        S = 1
        for d in logits_shape[2:]:
            S *= d
        index_shape = (logits_shape[0],) + tuple(logits_shape[2:])
    if C == 0:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits_shape)} "
                         f"with 0 classes on axis {0 if nd == 1 else 1}")
    tkind = np.dtype(target_dtype).kind
    if tkind in "iu":
        probs = False
        if tuple(target_shape) != index_shape:
            hint = (" (for class probabilities use a floating target of the logits' dtype)"
                    if tuple(target_shape) == tuple(logits_shape) else "")
            if nd >= 3 and tuple(target_shape) == tuple(logits_shape[:-1]):
                # (N, d1, ..., dk, C) logits with an (N, d1, ..., dk) target: channels-last.
                raise ValueError(
                    f"logits of shape {tuple(logits_shape)} look channels-last (classes on the "
                    f"last axis, C={logits_shape[-1]}) for a target of shape "
                    f"{tuple(target_shape)}: the class axis is 1, as in torch; pass "
                    f"np.moveaxis(logits, -1, 1) (shape "
                    f"{(logits_shape[0], logits_shape[-1]) + tuple(logits_shape[1:-1])})")
            raise ValueError(
                f"target of class indices must have shape {index_shape} for logits of shape "
                f"{tuple(logits_shape)}, got {tuple(target_shape)}{hint}")
    elif tkind == "f":
        probs = True
        if tuple(target_shape) != tuple(logits_shape):
            raise ValueError(
                f"target of class probabilities must have the logits' shape "
                f"{tuple(logits_shape)}, got {tuple(target_shape)} (for class indices use an "
                f"integer target of shape {index_shape})")
        if np.dtype(target_dtype).newbyteorder("=") != np.dtype(logits_dtype).newbyteorder("="):
            raise TypeError(f"target of class probabilities must have the logits' dtype "
                            f"{np.dtype(logits_dtype)}, got {np.dtype(target_dtype)}")
    else:
        raise TypeError(f"target must hold integer class indices or floating class "
                        f"probabilities, got dtype {np.dtype(target_dtype)}")
    if weight_shape is not None and tuple(weight_shape) != (C,):
        raise ValueError(f"weight must be a 1-D array of length C={C} (one weight per class), "
                         f"got shape {tuple(weight_shape)}")
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if probs and ignore_index >= 0:
        # torch raises here too; a negative ignore_index (the default -100) is simply unused.
        raise ValueError(f"ignore_index={ignore_index} is not supported with class-probability "
                         f"targets (a negative value, like the default -100, is ignored)")
    check_reduction(reduction)
    check_label_smoothing(label_smoothing)
    return CrossEntropyProblem(N, C, S, probs, dtype, tuple(target_shape) if not probs else index_shape)


def check_label_smoothing(label_smoothing):
    try:
        ok = 0.0 <= float(label_smoothing) <= 1.0
    except (TypeError, ValueError):
        raise TypeError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}") from None
    if not ok:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")


def bce_problem(input_shape, input_dtype, target_shape, target_dtype, reduction,
                input_name="input"):
    dtype = compute_dtype(input_dtype, input_name)
    if np.dtype(target_dtype).kind != "f":
        raise TypeError(f"target must be a floating-point array of the {input_name}'s shape, "
                        f"got dtype {np.dtype(target_dtype)}")
    if tuple(target_shape) != tuple(input_shape):
        raise ValueError(f"target must have the {input_name}'s shape {tuple(input_shape)}, "
                         f"got {tuple(target_shape)}")
    check_reduction(reduction)
    return dtype


def check_numeric_dtype(dtype, name):
    """What the front ends take as an array at all: real numbers (bool and ints included;
    the per-argument checks narrow it down)."""
    if dtype.kind in "OSUVMmc":
        raise TypeError(f"{name} must be a real numeric array, got dtype {dtype}")


def raise_mixed_devices(name, a):
    """A CUDA array passed with host (NumPy) logits/input: torch's "same device" rule."""
    raise TypeError(f"{name} is a CUDA array ({type(a).__name__}) but the first argument is a "
                    f"host (NumPy) array: the arrays are on different devices; pass both as "
                    f"NumPy arrays (CPU kernels) or both as CUDA arrays (CUDA kernels)")


def raise_not_array_like(a, name, exc):
    raise TypeError(f"{name} must be array-like, got {type(a).__name__}: {exc}") from None


def position(flat_index, shape):
    """The index tuple of element ``flat_index`` of a C-ordered array of ``shape``."""
    shape = tuple(shape)
    if not shape:
        return ()
    return tuple(int(i) for i in np.unravel_index(flat_index, shape))


def raise_bad_class_index(value, flat_index, target_shape, C, ignore_index):
    """A class-index target outside [0, C) that is not ``ignore_index``."""
    raise IndexError(
        f"target holds class index {int(value)} at position {position(flat_index, target_shape)}; "
        f"class indices must be in [0, {C - 1}] (C={C}) or equal ignore_index={ignore_index}")


def raise_bad_value(name, what, value, flat_index, shape):
    """A value that fails a data check: NaN, infinite, or outside the argument's interval
    (``what`` says what was expected, e.g. "values in [0, 1]")."""
    raise ValueError(f"{name} must hold {what}; found {value!s} at position "
                     f"{position(flat_index, shape)}")


def raise_bad_probability(value, flat_index, shape):
    """binary_cross_entropy's input outside [0, 1] or NaN (``value`` a scalar of the input's
    dtype)."""
    raise_bad_value("input", "probabilities in [0, 1]", value, flat_index, shape)


# What the data checks accept (the ``what`` of :func:`raise_bad_value`), per argument.
PROB_TARGET_VALUES = (0.0, np.inf, "class probabilities (finite and >= 0)")
BCE_TARGET_VALUES = (0.0, 1.0, "values in [0, 1]")    # torch: "between 0 and 1"
BCE_LOGITS_TARGET_VALUES = (-np.inf, np.inf, "finite values (no NaN or inf)")


def check_grad_output(shape, reduction, loss_shape):
    """``grad_output``'s shape: the loss's for reduction='none', one element otherwise."""
    shape = tuple(shape)
    if reduction == "none":
        if shape != tuple(loss_shape):
            raise ValueError(f"grad_output must have the loss's shape {tuple(loss_shape)} "
                             f"for reduction='none', got {shape}")
        return
    size = 1
    for d in shape:
        size *= int(d)
    if size != 1:
        raise ValueError(f"grad_output must be a scalar for reduction={reduction!r}, "
                         f"got shape {shape}")


def pos_weight_is_compact(pw_shape, input_shape):
    """Check ``pos_weight``'s shape against the input's, and say how the kernels take it:
    True for a scalar or one weight per entry of the input's last axis (passed as is; the
    kernels index it modulo its length), False when it must be broadcast to the input's
    shape first."""
    pw_shape, input_shape = tuple(pw_shape), tuple(input_shape)
    broadcastable(pw_shape, input_shape, "pos_weight")
    n = 1
    for d in input_shape:
        n *= int(d)
    size = 1
    for d in pw_shape:
        size *= int(d)
    last = input_shape[-1] if input_shape else 1
    return len(pw_shape) <= 1 and size in (1, last) and n > 0


def broadcastable(shape, to, name):
    try:
        np.broadcast_shapes(tuple(shape), tuple(to))
        if np.broadcast_shapes(tuple(shape), tuple(to)) != tuple(to):
            raise ValueError
    except ValueError:
        raise ValueError(f"{name} of shape {tuple(shape)} cannot be broadcast to the input's "
                         f"shape {tuple(to)}") from None


def check_out(out, name, shape, dtype, inputs, like):
    """An output array given by the caller (``out=`` / ``grad_input=``): a writeable ndarray
    of exactly the result's ``shape`` and ``dtype`` (no casting: a float64 result is not
    silently rounded into a float32 buffer), sharing no memory with any of ``inputs``
    ((name, array) pairs).  Any memory layout is accepted.  ``like`` names what the
    shape and dtype come from ("x's", "the logits'")."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray of shape {tuple(shape)} and dtype "
                        f"{np.dtype(dtype)}, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ValueError(f"{name} must have {like} shape {tuple(shape)}, got "
                         f"{out.shape}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have {like} dtype {np.dtype(dtype)}, got "
                        f"{out.dtype} (fastce does not cast into an output array)")
    if not out.flags.writeable:
        raise ValueError(f"{name} is read-only")
    for in_name, a in inputs:
        if isinstance(a, np.ndarray) and _overlap(out, a):
            raise ValueError(f"{name} shares memory with {in_name}: the kernels read "
                             f"{in_name} while they write {name}; pass a separate array")


def _overlap(a, b):
    if not np.may_share_memory(a, b):
        return False
    too_hard = getattr(getattr(np, "exceptions", np), "TooHardError", Exception)
    try:
        return np.shares_memory(a, b, max_work=100_000)
    except too_hard:     # interleaved strides too costly to decide: assume they overlap
        return True


def nll_loss_problem(input_shape, input_dtype, target_shape, target_dtype, weight_shape,
                     ignore_index, reduction, input_name="log_probs"):
    """Validate an ``nll_loss`` call's metadata (class-index targets only, as in torch); the
    result is a :class:`CrossEntropyProblem` with ``probs=False``."""
    dtype = compute_dtype(input_dtype, input_name)
    shape = tuple(input_shape)
    if len(shape) == 0:
        raise ValueError(f"{input_name} must have at least 1 dimension (C,), (N, C) or "
                         f"(N, C, d1, ..., dk), got a 0-d array")
    N, C, S = (1, shape[0], 1) if len(shape) == 1 else split_at_axis(shape, 1)
    index_shape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    if C == 0:
        raise ValueError(f"{input_name} must have at least one class, got shape {shape}")
    if np.dtype(target_dtype).kind not in "iu":
        raise TypeError(f"target must hold integer class indices, got dtype "
                        f"{np.dtype(target_dtype)} (nll_loss takes no class probabilities)")
    if tuple(target_shape) != index_shape:
        raise ValueError(f"target must have shape {index_shape} for {input_name} of shape "
                         f"{shape}, got {tuple(target_shape)}")
    if weight_shape is not None and tuple(weight_shape) != (C,):
        raise ValueError(f"weight must be a 1-D array of length C={C} (one weight per class), "
                         f"got shape {tuple(weight_shape)}")
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    check_reduction(reduction)
    return CrossEntropyProblem(N, C, S, False, dtype, index_shape)


def linear_cross_entropy_problem(hidden_shape, hidden_dtype, weight_shape, weight_dtype,
                                 target_shape, target_dtype, bias_shape, bias_dtype,
                                 ignore_index, reduction, label_smoothing):
    """Validate a ``linear_cross_entropy`` call's metadata; returns (N, H, V, compute dtype)."""
    dtype = compute_dtype(hidden_dtype, "hidden")
    if len(hidden_shape) != 2:
        raise ValueError(f"hidden must be 2-D (N, H), got shape {tuple(hidden_shape)}")
    if len(weight_shape) != 2:
        raise ValueError(f"weight must be 2-D (V, H), got shape {tuple(weight_shape)}")
    N, H = hidden_shape
    V = weight_shape[0]
    if weight_shape[1] != H:
        raise ValueError(f"weight must have shape (V, H={H}) for hidden of shape "
                         f"{tuple(hidden_shape)}, got {tuple(weight_shape)}")
    if V == 0:
        raise ValueError(f"weight must have at least one row (class), got shape "
                         f"{tuple(weight_shape)}")
    for name, dt in (("weight", weight_dtype), ("bias", bias_dtype)):
        if dt is not None and compute_dtype(dt, name) != dtype:
            raise TypeError(f"{name} must have hidden's dtype {np.dtype(hidden_dtype)}, got "
                            f"{np.dtype(dt)}")
    if np.dtype(target_dtype).kind not in "iu":
        raise TypeError(f"target must hold integer class indices, got dtype "
                        f"{np.dtype(target_dtype)}")
    if tuple(target_shape) != (N,):
        raise ValueError(f"target must have shape ({N},), got {tuple(target_shape)}")
    if bias_shape is not None and tuple(bias_shape) != (V,):
        raise ValueError(f"bias must have shape ({V},), got {tuple(bias_shape)}")
    if isinstance(ignore_index, (bool, np.bool_)) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    check_reduction(reduction)
    check_label_smoothing(label_smoothing)
    return N, H, V, dtype


def check_large_vocab(softcap, z_loss, return_lse):
    """The large-vocabulary options of cross-entropy checked, dtype-free and in plain Python
    (``fastce.torch`` calls it where torch.compile traces): ``(softcap, z_loss)`` as floats
    (``softcap`` None when off)."""
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    if not isinstance(z_loss, numbers.Real) or isinstance(z_loss, (bool, np.bool_)):
        raise TypeError(f"z_loss must be a finite float >= 0, got {z_loss!r}")
    z = float(z_loss)
    if not (math.isfinite(z) and z >= 0):
        raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss!r}")
    if softcap is None:
        return None, z
    if not isinstance(softcap, numbers.Real) or isinstance(softcap, (bool, np.bool_)):
        raise TypeError(f"softcap must be None or a finite float > 0, got {softcap!r}")
    c = float(softcap)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")
    return c, z


def large_vocab_options(softcap, z_loss, return_lse, dtype):
    """:func:`check_large_vocab`, then ``(cap, z_loss)`` as the kernels take them: ``cap``
    None or the pair ``(softcap, 1 / softcap)`` in the compute ``dtype``."""
    c, z = check_large_vocab(softcap, z_loss, return_lse)
    if c is None:
        return None, z
    big = float(np.finfo(dtype).max)
    if not (c <= big and 1.0 / c <= big):
        raise ValueError(f"softcap must be a finite float > 0 whose inverse is finite too in "
                         f"{np.dtype(dtype).name}, got {softcap!r}")
    t = np.dtype(dtype).type
    return (t(c), t(1.0 / c)), z
