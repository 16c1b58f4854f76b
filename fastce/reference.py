"""Reference implementations of the fastce operations.

Each implementation exposes the same functions, with the same signatures and
the semantics of :mod:`torch.nn.functional`, as the fastce public API:

``logsumexp``, ``log_softmax``, ``softmax``, ``cross_entropy``,
``cross_entropy_with_grad``, ``binary_cross_entropy`` and
``binary_cross_entropy_with_logits``.

Implementations (keys of :data:`IMPLEMENTATIONS`):

``numpy-naive``
    Textbook formulas, ``log(sum(exp(x)))`` with no max shift.  It overflows
    on purpose: it is the baseline that shows why stability matters.
``numpy-stable``
    Max-shifted, vectorized NumPy.  It implements torch's full
    cross-entropy semantics (class weights, ``ignore_index``, reductions,
    label smoothing, probability targets, K-dimensional inputs with the class
    axis 1) and doubles as an independent reference for fastce's tests.
``scipy``
    :func:`scipy.special.logsumexp`, :func:`~scipy.special.log_softmax`,
    :func:`~scipy.special.softmax` and :func:`~scipy.special.log_expit`.
``torch``
    :mod:`torch.nn.functional` on CPU tensors sharing the NumPy buffers;
    ``cross_entropy_with_grad`` runs the forward and the backward through
    autograd.
``torch-compile``
    The same torch functions through ``torch.compile(..., dynamic=False)``
    (inductor's C++ backend on the CPU): one specialization per shape, compiled on
    the first call with that shape; the gradient runs ``.backward()`` through the
    compiled forward's graph.
``jax``
    ``jax.jit`` of ``jax.nn`` / ``jax.numpy`` formulations on jax's CPU device
    (``jax.value_and_grad`` for the gradient, ``jax.vjp`` for ``reduction='none'``).
    Using it turns on ``jax_enable_x64`` in the process, or float64 inputs would be
    computed in float32.
``fastce``
    fastce itself, so callers can treat every implementation alike.

SciPy, PyTorch and JAX are imported on first use only, so ``import fastce`` needs
nothing but NumPy and Numba.

Examples
--------
>>> import numpy as np
>>> from fastce.reference import get_implementation
>>> ref = get_implementation("numpy-stable")
>>> x = np.array([[1000.0, 0.0]], dtype=np.float32)
>>> float(ref.logsumexp(x)[0])
1000.0
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np

__all__ = [
    "IMPLEMENTATIONS",
    "Implementation",
    "available_implementations",
    "get_implementation",
]

FUNCTIONS = (
    "logsumexp",
    "log_softmax",
    "softmax",
    "cross_entropy",
    "cross_entropy_with_grad",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
)

_REDUCTIONS = ("none", "mean", "sum")


# ---------------------------------------------------------------------------
# logsumexp / log_softmax / softmax kernels, one set per NumPy flavour
# ---------------------------------------------------------------------------


def _float_array(x):
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"expected a floating-point array, got dtype {x.dtype}")
    return x


def _safe_max(x, axis):
    # A row of all -inf (or an empty shift from +inf) must not produce
    # inf - inf = nan; shifting by 0 there keeps -inf / inf exact.
    m = np.max(x, axis=axis, keepdims=True)
    return np.where(np.isfinite(m), m, np.zeros((), dtype=x.dtype))


def _naive_logsumexp(x, axis=-1):
    x = _float_array(x)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return np.log(np.sum(np.exp(x), axis=axis))


def _naive_log_softmax(x, axis=-1):
    x = _float_array(x)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return x - np.log(np.sum(np.exp(x), axis=axis, keepdims=True))


def _naive_softmax(x, axis=-1):
    x = _float_array(x)
    with np.errstate(over="ignore", invalid="ignore"):
        e = np.exp(x)
        return e / np.sum(e, axis=axis, keepdims=True)


def _stable_logsumexp(x, axis=-1):
    x = _float_array(x)
    m = _safe_max(x, axis)
    s = np.sum(np.exp(x - m), axis=axis, keepdims=True)
    with np.errstate(divide="ignore"):  # all -inf row: log(0) = -inf
        return np.squeeze(np.log(s) + m, axis=axis)


def _stable_log_softmax(x, axis=-1):
    x = _float_array(x)
    m = _safe_max(x, axis)
    shifted = x - m
    with np.errstate(divide="ignore", invalid="ignore"):
        return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def _stable_softmax(x, axis=-1):
    x = _float_array(x)
    e = np.exp(x - _safe_max(x, axis))
    return e / np.sum(e, axis=axis, keepdims=True)


def _scipy_special():
    return importlib.import_module("scipy.special")


def _scipy_logsumexp(x, axis=-1):
    x = _float_array(x)
    return np.asarray(_scipy_special().logsumexp(x, axis=axis), dtype=x.dtype)


def _scipy_log_softmax(x, axis=-1):
    x = _float_array(x)
    return np.asarray(_scipy_special().log_softmax(x, axis=axis), dtype=x.dtype)


def _scipy_softmax(x, axis=-1):
    x = _float_array(x)
    return np.asarray(_scipy_special().softmax(x, axis=axis), dtype=x.dtype)


# ---------------------------------------------------------------------------
# cross-entropy in NumPy, parameterized by a log_softmax
# ---------------------------------------------------------------------------


def _check_reduction(reduction):
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _to_rows(a, ndim):
    """Move the class axis (1 for >= 2-D, 0 for 1-D) last and flatten."""
    c = a.shape[0] if ndim == 1 else a.shape[1]
    moved = a if ndim == 1 else np.moveaxis(a, 1, -1)
    return moved.reshape(-1, c), moved.shape


def _from_rows(rows, moved_shape, ndim):
    moved = rows.reshape(moved_shape)
    return moved if ndim == 1 else np.moveaxis(moved, -1, 1)


def _ce_numpy(
    logits,
    target,
    weight,
    ignore_index,
    reduction,
    label_smoothing,
    log_softmax,
    with_grad=False,
    grad_output=None,
):
    """Cross-entropy (and its gradient) with torch's semantics in NumPy.

    The loss is written as ``-sum_c q[i, c] * logp[i, c]`` with an effective
    target distribution ``q`` (one-hot or probabilities, smoothed and
    weighted); the gradient of that row loss is ``p * sum(q) - q``.
    """
    _check_reduction(reduction)
    logits = _float_array(logits)
    if logits.ndim == 0:
        raise ValueError("logits must have at least one dimension")
    dt = logits.dtype
    ndim = logits.ndim
    n_classes = logits.shape[0] if ndim == 1 else logits.shape[1]
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    eps = dt.type(label_smoothing)
    x2, moved_shape = _to_rows(logits, ndim)
    batch_shape = moved_shape[:-1]
    m = x2.shape[0]

    w = None
    if weight is not None:
        w = np.asarray(weight, dtype=dt)
        if w.shape != (n_classes,):
            raise ValueError(f"weight must have shape ({n_classes},), got {w.shape}")

    target = np.asarray(target)
    logp = log_softmax(x2, axis=-1)
    if target.dtype.kind == "f":
        # probability targets: ignore_index does not apply, mean divides by
        # the number of rows (torch's rule)
        if target.shape != logits.shape:
            raise ValueError(
                f"probability target shape {target.shape} != logits shape {logits.shape}"
            )
        q, _ = _to_rows(target.astype(dt, copy=False), ndim)
        if eps:
            q = q * (dt.type(1) - eps) + eps / dt.type(n_classes)
        if w is not None:
            q = q * w
        per_row = -np.sum(q * logp, axis=-1)
        denom = dt.type(m)
        valid = None
    elif target.dtype.kind in "iu":
        if target.shape != batch_shape:
            raise ValueError(
                f"class-index target shape {target.shape} != expected {batch_shape}"
            )
        y = target.reshape(-1).astype(np.int64)
        valid = y != ignore_index
        bad = valid & ((y < 0) | (y >= n_classes))
        if np.any(bad):
            raise IndexError(
                f"target {int(y[bad][0])} is out of bounds for {n_classes} classes"
            )
        ys = np.where(valid, y, 0)
        wy = np.ones(m, dtype=dt) if w is None else w[ys]
        wy = np.where(valid, wy, dt.type(0))
        nll = -np.take_along_axis(logp, ys[:, None], axis=1)[:, 0]
        per_row = np.where(valid, wy * nll, dt.type(0))
        if eps:
            lw = logp if w is None else logp * w
            smooth = -np.sum(lw, axis=-1) / dt.type(n_classes)
            per_row = (dt.type(1) - eps) * per_row + eps * np.where(
                valid, smooth, dt.type(0)
            )
        # mean divides by the summed weights of the non-ignored targets; all
        # ignored gives 0/0 = nan, as torch does (pytorch#70348)
        denom = np.sum(wy)
        q = None
    else:
        raise TypeError(f"target must hold class indices or probabilities, got {target.dtype}")

    if reduction == "none":
        loss = per_row.reshape(batch_shape).astype(dt, copy=False)
    elif reduction == "sum":
        loss = dt.type(np.sum(per_row))
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            loss = dt.type(np.sum(per_row) / denom)
    if not with_grad:
        return loss

    if q is None:
        q = np.zeros_like(x2)
        q[np.arange(m), ys] = wy * (dt.type(1) - eps)
        if eps:
            wc = np.ones(n_classes, dtype=dt) if w is None else w
            q += (eps / dt.type(n_classes)) * wc[None, :] * valid[:, None].astype(dt)
    p = np.exp(logp)
    g = p * np.sum(q, axis=-1, keepdims=True) - q
    if reduction == "none":
        go = (
            np.ones(m, dtype=dt)
            if grad_output is None
            else np.broadcast_to(np.asarray(grad_output, dtype=dt), batch_shape).reshape(-1)
        )
        g = g * go[:, None]
    else:
        go = dt.type(1) if grad_output is None else dt.type(grad_output)
        if reduction == "mean":
            with np.errstate(invalid="ignore", divide="ignore"):
                go = dt.type(go / denom)
        g = g * go
    return loss, _from_rows(g.astype(dt, copy=False), moved_shape, ndim)


def _make_ce(log_softmax):
    def cross_entropy(
        logits, target, *, weight=None, ignore_index=-100, reduction="mean",
        label_smoothing=0.0,
    ):
        return _ce_numpy(
            logits, target, weight, ignore_index, reduction, label_smoothing, log_softmax
        )

    def cross_entropy_with_grad(
        logits, target, *, weight=None, ignore_index=-100, reduction="mean",
        label_smoothing=0.0, grad_output=None,
    ):
        return _ce_numpy(
            logits, target, weight, ignore_index, reduction, label_smoothing,
            log_softmax, with_grad=True, grad_output=grad_output,
        )

    cross_entropy.__doc__ = _CE_DOC
    cross_entropy_with_grad.__doc__ = _CE_GRAD_DOC
    return cross_entropy, cross_entropy_with_grad


_CE_DOC = """Cross-entropy loss with the semantics of ``torch.nn.functional.cross_entropy``.

Parameters
----------
logits : ndarray, shape (C,), (N, C) or (N, C, d1, ...)
    Unnormalized scores; the class axis is 1 (0 for 1-D input).
target : ndarray
    Class indices (integer, shape of logits without the class axis) or
    class probabilities (floating, shape of logits).
weight : ndarray, shape (C,), optional
    Per-class rescaling weights.
ignore_index : int, default -100
    Index targets equal to it contribute neither loss nor weight.
reduction : {'mean', 'sum', 'none'}, default 'mean'
label_smoothing : float in [0, 1], default 0.0

Returns
-------
loss : numpy scalar or ndarray
    In the dtype of ``logits``.
"""

_CE_GRAD_DOC = _CE_DOC.replace(
    "Returns\n-------\nloss : numpy scalar or ndarray\n    In the dtype of ``logits``.\n",
    "grad_output : scalar or ndarray, optional\n"
    "    Upstream gradient (default 1; ones of the loss shape for 'none').\n\n"
    "Returns\n-------\nloss : numpy scalar or ndarray\n    In the dtype of ``logits``.\n"
    "grad_logits : ndarray\n    d(sum(loss * grad_output)) / d(logits), shape of ``logits``.\n",
).replace("Cross-entropy loss", "Cross-entropy loss and its gradient", 1)


# ---------------------------------------------------------------------------
# binary cross-entropy in NumPy
# ---------------------------------------------------------------------------


def _reduce(loss, reduction, dt):
    _check_reduction(reduction)
    if reduction == "none":
        return loss.astype(dt, copy=False)
    if reduction == "sum":
        return dt.type(np.sum(loss))
    with np.errstate(invalid="ignore", divide="ignore"):
        return dt.type(np.sum(loss) / dt.type(loss.size))


def _bce_inputs(inp, target, weight):
    inp = _float_array(inp)
    dt = inp.dtype
    target = np.asarray(target, dtype=dt)
    if target.shape != inp.shape:
        raise ValueError(f"target shape {target.shape} != input shape {inp.shape}")
    w = None if weight is None else np.asarray(weight, dtype=dt)
    return inp, target, w, dt


def _naive_bce(input, target, *, weight=None, reduction="mean"):
    p, t, w, dt = _bce_inputs(input, target, weight)
    with np.errstate(divide="ignore", invalid="ignore"):
        loss = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    if w is not None:
        loss = loss * w
    return _reduce(loss, reduction, dt)


def _clamped_log(a, dt):
    # torch clamps log terms at -100 so p in {0, 1} gives a finite loss
    with np.errstate(divide="ignore"):
        return np.maximum(np.log(a), dt.type(-100))


def _stable_bce(input, target, *, weight=None, reduction="mean"):
    p, t, w, dt = _bce_inputs(input, target, weight)
    if np.any((p < 0) | (p > 1)):
        raise ValueError("binary_cross_entropy input must lie in [0, 1]")
    one = dt.type(1)
    with np.errstate(divide="ignore"):
        log1mp = np.maximum(np.log1p(-p), dt.type(-100))
    loss = -(t * _clamped_log(p, dt) + (one - t) * log1mp)
    if w is not None:
        loss = loss * w
    return _reduce(loss, reduction, dt)


def _scipy_bce(input, target, *, weight=None, reduction="mean"):
    sp = _scipy_special()
    p, t, w, dt = _bce_inputs(input, target, weight)
    with np.errstate(divide="ignore"):
        # xlogy(0, 0) = 0 handles the t in {0, 1} edges exactly
        loss = -(
            np.maximum(sp.xlogy(t, p), t * dt.type(-100))
            + np.maximum(sp.xlog1py(1 - t, -p), (1 - t) * dt.type(-100))
        )
    if w is not None:
        loss = loss * w
    return _reduce(np.asarray(loss, dtype=dt), reduction, dt)


def _naive_bce_logits(input, target, *, weight=None, pos_weight=None, reduction="mean"):
    x, t, w, dt = _bce_inputs(input, target, weight)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = 1 / (1 + np.exp(-x))
        lp = np.log(s)
        l1p = np.log(1 - s)
    pw = dt.type(1) if pos_weight is None else np.asarray(pos_weight, dtype=dt)
    loss = -(pw * t * lp + (1 - t) * l1p)
    if w is not None:
        loss = loss * w
    return _reduce(loss, reduction, dt)


def _softplus(x):
    # log(1 + exp(x)) without overflow: max(x, 0) + log1p(exp(-|x|))
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _stable_bce_logits(input, target, *, weight=None, pos_weight=None, reduction="mean"):
    x, t, w, dt = _bce_inputs(input, target, weight)
    one = dt.type(1)
    if pos_weight is None:
        loss = (one - t) * x + _softplus(-x)
    else:
        pw = np.asarray(pos_weight, dtype=dt)
        # -[pw*t*log s(x) + (1-t)*log(1-s(x))] with log s(x) = -softplus(-x)
        # and log(1 - s(x)) = -x - softplus(-x)
        loss = (one - t) * x + (one + (pw - one) * t) * _softplus(-x)
    if w is not None:
        loss = loss * w
    return _reduce(loss, reduction, dt)


def _scipy_bce_logits(input, target, *, weight=None, pos_weight=None, reduction="mean"):
    sp = _scipy_special()
    x, t, w, dt = _bce_inputs(input, target, weight)
    pw = dt.type(1) if pos_weight is None else np.asarray(pos_weight, dtype=dt)
    loss = -(pw * t * sp.log_expit(x) + (1 - t) * sp.log_expit(-x))
    if w is not None:
        loss = loss * w
    return _reduce(np.asarray(loss, dtype=dt), reduction, dt)


# ---------------------------------------------------------------------------
# PyTorch (eager and torch.compile)
# ---------------------------------------------------------------------------


def _torch():
    return importlib.import_module("torch")


def _tensor(a):
    # from_numpy shares the buffer: no copy, so the timing is torch's own
    torch = _torch()
    a = np.asarray(a)
    if not (a.flags.writeable and a.flags.c_contiguous):
        a = a.copy()  # (np.ascontiguousarray would turn 0-d into 1-d)
    return torch.from_numpy(a)


def _out(t):
    arr = t.detach().numpy() if hasattr(t, "detach") else np.asarray(t)
    return arr[()] if arr.ndim == 0 else arr


def _torch_kernels():
    """The tensor-level operations, keyed like :data:`FUNCTIONS` (the gradient reuses
    ``cross_entropy``)."""
    torch = _torch()
    F = torch.nn.functional
    return {
        "logsumexp": lambda x, dim: torch.logsumexp(x, dim=dim),
        "log_softmax": lambda x, dim: F.log_softmax(x, dim=dim),
        "softmax": lambda x, dim: F.softmax(x, dim=dim),
        "cross_entropy": F.cross_entropy,
        "binary_cross_entropy": F.binary_cross_entropy,
        "binary_cross_entropy_with_logits": F.binary_cross_entropy_with_logits,
    }


def _eager_kernel(name):
    return _torch_kernels()[name]


_COMPILED_KERNELS = {}


def _compiled_kernel(name):
    # torch.compile is lazy: the graph is traced and inductor's C++ is built on the first
    # call with a given shape (dynamic=False: one specialization per shape), which is why
    # the benchmarks call once in setup.
    try:
        return _COMPILED_KERNELS[name]
    except KeyError:
        k = _torch().compile(_torch_kernels()[name], dynamic=False)
        _COMPILED_KERNELS[name] = k
        return k


def _check_class_indices(logits, target, ignore_index):
    """IndexError, as eager torch raises it, for a class index outside [0, C) that is not
    ``ignore_index``: jax.jit would clamp it, and torch.compile's kernels raise a
    RuntimeError (their bounds check) or not, depending on how inductor compiled them."""
    axis = 1 if logits.ndim > 1 else 0
    bad = (target != ignore_index) & ((target < 0) | (target >= logits.shape[axis]))
    if np.any(bad):
        raise IndexError(f"target holds class indices outside [0, {logits.shape[axis]})")


def _torch_ce_args(logits, target, weight, ignore_index=None):
    """Logits, target tensor and weight tensor for torch; with ``ignore_index`` (the
    torch.compile peer) the class indices are checked first (:func:`_check_class_indices`)."""
    logits = _float_array(logits)
    target = np.asarray(target)
    if target.dtype.kind in "iu":
        target = target.astype(np.int64, copy=False)
        if ignore_index is not None:
            _check_class_indices(logits, target, ignore_index)
    else:
        target = target.astype(logits.dtype, copy=False)
    w = None if weight is None else _tensor(np.asarray(weight, dtype=logits.dtype))
    return logits, _tensor(target), w


def _torch_bind(kernel_of, func, *args, **kwargs):
    """Convert NumPy inputs to tensors once; return a no-argument callable that runs
    ``func`` on them and returns tensors (what a torch user holds)."""
    torch = _torch()
    if func in ("logsumexp", "log_softmax", "softmax"):
        (x,) = args
        xt, k, dim = _tensor(_float_array(x)), kernel_of(func), kwargs.pop("axis", -1)
        _no_more(func, kwargs)
        return lambda: k(xt, dim)
    if func in ("cross_entropy", "cross_entropy_with_grad"):
        logits, target = args
        grad_output = kwargs.pop("grad_output", None) if func != "cross_entropy" else None
        check = kernel_of is _compiled_kernel
        if check:
            # torch.compile raises dynamo's errors for what eager torch rejects plainly
            _check_reduction(kwargs.get("reduction", "mean"))
        logits, t, w = _torch_ce_args(logits, target, kwargs.pop("weight", None),
                                      kwargs.get("ignore_index", -100) if check else None)
        xt, k = _tensor(logits), kernel_of("cross_entropy")
        if func == "cross_entropy":
            return lambda: k(xt, t, weight=w, **kwargs)
        go = None if grad_output is None else torch.as_tensor(
            np.asarray(grad_output, dtype=logits.dtype))

        def forward_backward():
            x = xt.detach().requires_grad_(True)
            loss = k(x, t, weight=w, **kwargs)
            loss.backward(torch.ones_like(loss) if go is None else go.expand_as(loss))
            return loss, x.grad

        return forward_backward
    if func in ("binary_cross_entropy", "binary_cross_entropy_with_logits"):
        a, t, w, dt = _bce_inputs(*args, kwargs.pop("weight", None))
        if "pos_weight" in kwargs and kwargs["pos_weight"] is not None:
            kwargs["pos_weight"] = _tensor(np.asarray(kwargs["pos_weight"], dtype=dt))
        at, tt, wt, k = _tensor(a), _tensor(t), None if w is None else _tensor(w), kernel_of(func)
        return lambda: k(at, tt, weight=wt, **kwargs)
    raise AttributeError(f"no function {func!r}")


def _no_more(func, kwargs):
    if kwargs:
        raise TypeError(f"{func}() got unexpected keyword arguments {sorted(kwargs)}")


def _framework_functions(bind):
    """The seven NumPy-in, NumPy-out functions of an implementation whose ``bind`` converts
    the inputs and returns a no-argument callable (torch, torch.compile, jax)."""

    def logsumexp(x, axis=-1):
        return _out(bind("logsumexp", x, axis=axis)())

    def log_softmax(x, axis=-1):
        return _out(bind("log_softmax", x, axis=axis)())

    def softmax(x, axis=-1):
        return _out(bind("softmax", x, axis=axis)())

    def cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                      label_smoothing=0.0):
        return _out(bind("cross_entropy", logits, target, weight=weight,
                         ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing)())

    def cross_entropy_with_grad(logits, target, *, weight=None, ignore_index=-100,
                                reduction="mean", label_smoothing=0.0, grad_output=None):
        loss, grad = bind("cross_entropy_with_grad", logits, target, weight=weight,
                          ignore_index=ignore_index, reduction=reduction,
                          label_smoothing=label_smoothing, grad_output=grad_output)()
        return _out(loss), np.asarray(_out(grad))

    def binary_cross_entropy(input, target, *, weight=None, reduction="mean"):
        return _out(bind("binary_cross_entropy", input, target, weight=weight,
                         reduction=reduction)())

    def binary_cross_entropy_with_logits(input, target, *, weight=None, pos_weight=None,
                                         reduction="mean"):
        return _out(bind("binary_cross_entropy_with_logits", input, target, weight=weight,
                         pos_weight=pos_weight, reduction=reduction)())

    return {f.__name__: f for f in (
        logsumexp, log_softmax, softmax, cross_entropy, cross_entropy_with_grad,
        binary_cross_entropy, binary_cross_entropy_with_logits)}


def _bind_eager(func, *args, **kwargs):
    return _torch_bind(_eager_kernel, func, *args, **kwargs)


def _bind_compiled(func, *args, **kwargs):
    return _torch_bind(_compiled_kernel, func, *args, **kwargs)


# ---------------------------------------------------------------------------
# JAX (jax.jit on the CPU)
# ---------------------------------------------------------------------------

_JAX_KERNELS = {}


def _jax_kernels():
    """The jitted operations; built on first use (importing jax costs ~1 s)."""
    if _JAX_KERNELS:
        return _JAX_KERNELS
    jax = importlib.import_module("jax")
    # without x64, jax silently computes float64 inputs in float32
    jax.config.update("jax_enable_x64", True)
    jnp = jax.numpy

    def ce(x, t, w, ignore_index, reduction, label_smoothing):
        axis = 1 if x.ndim > 1 else 0
        n_classes = x.shape[axis]
        lsm = jax.nn.log_softmax(x, axis=axis)
        bshape = [1] * x.ndim
        bshape[axis] = n_classes
        wlsm = lsm if w is None else lsm * w.reshape(bshape)
        if jnp.issubdtype(t.dtype, jnp.floating):  # class probabilities
            if label_smoothing:
                t = t * (1 - label_smoothing) + label_smoothing / n_classes
            loss = -jnp.sum(wlsm * t, axis=axis)
            if reduction == "mean":
                return jnp.sum(loss) / max(loss.size, 1)
            return jnp.sum(loss) if reduction == "sum" else loss
        valid = t != ignore_index
        tc = jnp.where(valid, t, 0)
        picked = jnp.squeeze(jnp.take_along_axis(lsm, jnp.expand_dims(tc, axis), axis=axis),
                             axis)
        wt = jnp.where(valid, 1 if w is None else w[tc], 0).astype(x.dtype)
        loss = -picked * wt
        if label_smoothing:
            smooth = jnp.where(valid, -jnp.sum(wlsm, axis=axis), 0)
            loss = (1 - label_smoothing) * loss + (label_smoothing / n_classes) * smooth
        if reduction == "mean":
            return jnp.sum(loss) / jnp.sum(wt)
        return jnp.sum(loss) if reduction == "sum" else loss

    def ce_grad(x, t, w, go, ignore_index, reduction, label_smoothing):
        def f(x):
            return ce(x, t, w, ignore_index, reduction, label_smoothing)

        if reduction == "none":
            loss, vjp = jax.vjp(f, x)
            ones = jnp.ones_like(loss)
            (g,) = vjp(ones if go is None else jnp.broadcast_to(go, loss.shape).astype(x.dtype))
            return loss, g
        loss, g = jax.value_and_grad(f)(x)
        return loss, (g if go is None else g * go.astype(x.dtype))

    def reduce(loss, reduction):
        if reduction == "mean":
            return jnp.mean(loss)
        return jnp.sum(loss) if reduction == "sum" else loss

    def bce(p, t, w, reduction):
        loss = -(t * jnp.maximum(jnp.log(p), -100) + (1 - t) * jnp.maximum(jnp.log1p(-p), -100))
        return reduce(loss if w is None else loss * w, reduction)

    def bce_logits(x, t, w, pw, reduction):
        log_weight = 1 if pw is None else 1 + (pw - 1) * t
        loss = (1 - t) * x + log_weight * (jnp.log1p(jnp.exp(-jnp.abs(x))) + jnp.maximum(-x, 0))
        return reduce(loss if w is None else loss * w, reduction)

    static = ("ignore_index", "reduction", "label_smoothing")
    _JAX_KERNELS.update({
        "logsumexp": jax.jit(lambda x, axis: jax.nn.logsumexp(x, axis=axis),
                             static_argnames="axis"),
        "log_softmax": jax.jit(lambda x, axis: jax.nn.log_softmax(x, axis=axis),
                               static_argnames="axis"),
        "softmax": jax.jit(lambda x, axis: jax.nn.softmax(x, axis=axis), static_argnames="axis"),
        "cross_entropy": jax.jit(ce, static_argnames=static),
        "cross_entropy_with_grad": jax.jit(ce_grad, static_argnames=static),
        "binary_cross_entropy": jax.jit(bce, static_argnames="reduction"),
        "binary_cross_entropy_with_logits": jax.jit(bce_logits, static_argnames="reduction"),
    })
    return _JAX_KERNELS


def _bind_jax(func, *args, **kwargs):
    """Put the inputs on jax's CPU device once; return a no-argument callable running the
    jitted ``func`` and waiting for its result (jax dispatches asynchronously)."""
    kernels = _jax_kernels()
    jax = importlib.import_module("jax")

    def dev(a):
        return None if a is None else jax.device_put(np.asarray(a))

    if func in ("logsumexp", "log_softmax", "softmax"):
        (x,) = args
        axis = kwargs.pop("axis", -1)
        _no_more(func, kwargs)
        x = _float_array(x)
        call_args, call_kwargs = (dev(x),), {"axis": axis}
    elif func in ("cross_entropy", "cross_entropy_with_grad"):
        logits, target = args
        logits = _float_array(logits)
        target = np.asarray(target)
        dt = logits.dtype
        _check_reduction(kwargs.get("reduction", "mean"))
        if target.dtype.kind in "iu":
            target = target.astype(np.int64, copy=False)
            _check_class_indices(logits, target, kwargs.get("ignore_index", -100))
        else:
            target = target.astype(dt, copy=False)
        w = kwargs.pop("weight", None)
        w = None if w is None else np.asarray(w, dtype=dt)
        call_args = [dev(logits), dev(target), dev(w)]
        if func == "cross_entropy_with_grad":
            go = kwargs.pop("grad_output", None)
            call_args.append(None if go is None else dev(np.asarray(go, dtype=dt)))
        call_kwargs = {"ignore_index": int(kwargs.pop("ignore_index", -100)),
                       "reduction": kwargs.pop("reduction", "mean"),
                       "label_smoothing": float(kwargs.pop("label_smoothing", 0.0))}
        _no_more(func, kwargs)
    elif func in ("binary_cross_entropy", "binary_cross_entropy_with_logits"):
        a, t, w, dt = _bce_inputs(*args, kwargs.pop("weight", None))
        call_args = [dev(a), dev(t), dev(w)]
        if func == "binary_cross_entropy_with_logits":
            pw = kwargs.pop("pos_weight", None)
            call_args.append(None if pw is None else dev(np.asarray(pw, dtype=dt)))
        call_kwargs = {"reduction": kwargs.pop("reduction", "mean")}
        _check_reduction(call_kwargs["reduction"])
        _no_more(func, kwargs)
    else:
        raise AttributeError(f"no function {func!r}")
    k = kernels[func]
    return lambda: jax.block_until_ready(k(*call_args, **call_kwargs))


# ---------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------


class Implementation:
    """One implementation of the fastce operations.

    Parameters
    ----------
    name : str
        Registry key, e.g. ``"numpy-stable"``.
    description : str
        One line for reports.
    functions : dict of str to callable, or None
        The operations; for ``fastce`` they are looked up on first use.
    requires : str, optional
        Module that must be importable (``"scipy"``, ``"torch"``).
    install_hint : str, optional
        What to tell the user when ``requires`` is missing.
    binder : callable, optional
        ``binder(function, *arrays, **kwargs) -> callable``: converts the inputs once
        (to tensors, to jax arrays) and returns a no-argument callable that runs the
        operation on them; see :meth:`bind`.

    Attributes
    ----------
    name, description, requires : str
    """

    def __init__(self, name, description, functions=None, requires=None, install_hint=None,
                 binder=None):
        self.name = name
        self._binder = binder
        self.description = description
        self.requires = requires
        self.install_hint = install_hint
        self._functions = functions

    def available(self):
        """Return True if the library this implementation needs is importable."""
        if self.requires is None:
            return True
        try:
            return importlib.util.find_spec(self.requires) is not None
        except (ImportError, ValueError):
            return False

    def _resolve(self):
        if self._functions is None:
            # only fastce: resolved lazily so this module can be imported
            # while fastce/__init__ imports it
            mod = importlib.import_module("fastce")
            self._functions = {f: getattr(mod, f) for f in FUNCTIONS if hasattr(mod, f)}
        return self._functions

    def __getattr__(self, item):
        if item.startswith("_"):
            raise AttributeError(item)
        funcs = self._resolve()
        try:
            return funcs[item]
        except KeyError:
            raise AttributeError(
                f"implementation {self.name!r} has no function {item!r}"
            ) from None

    def bind(self, function, *arrays, **kwargs):
        """Bind ``function`` to its inputs; return a no-argument callable.

        NumPy-based implementations close over the arrays as they are.  torch,
        torch.compile and jax convert them once here (to tensors sharing the buffers,
        to arrays on jax's CPU device), so that calling the result times the
        operation alone, as a user of that framework holding its own arrays sees it;
        their results are the framework's own (tensors, jax arrays, ready: jax's
        asynchronous dispatch is waited for).

        Parameters
        ----------
        function : str
            One of :data:`FUNCTIONS`.
        *arrays : array_like
            Positional inputs of ``function``.
        **kwargs
            Its keyword arguments.

        Returns
        -------
        callable

        Examples
        --------
        >>> import numpy as np
        >>> from fastce.reference import get_implementation
        >>> call = get_implementation("numpy-stable").bind("logsumexp", np.zeros((2, 4)))
        >>> np.round(call(), 4).tolist()
        [1.3863, 1.3863]
        """
        if self._binder is not None:
            return self._binder(function, *arrays, **kwargs)
        f = getattr(self, function)
        if len(arrays) == 1 and list(kwargs) == ["axis"]:
            # The softmax family as its user writes the call: a generic closure's star
            # unpacking alone costs ~0.15 us a call, 10 % of a (1, 10) log_softmax, which the
            # tensor binders (a direct call on bound tensors) do not pay.
            (a,), axis = arrays, kwargs["axis"]
            return lambda: f(a, axis=axis)
        return lambda: f(*arrays, **kwargs)

    def supports(self, function):
        """Return True if this implementation provides ``function``."""
        return function in self._resolve()

    def __repr__(self):
        return f"Implementation({self.name!r})"


def _numpy_impl(name, description, lse, lsm, sm, bce, bce_logits):
    ce, ce_grad = _make_ce(lsm)
    return Implementation(
        name,
        description,
        {
            "logsumexp": lse,
            "log_softmax": lsm,
            "softmax": sm,
            "cross_entropy": ce,
            "cross_entropy_with_grad": ce_grad,
            "binary_cross_entropy": bce,
            "binary_cross_entropy_with_logits": bce_logits,
        },
    )


_TORCH_HINT = "pip install torch==2.13.0  (pin it: an unpinned torch pulls a CUDA build)"

IMPLEMENTATIONS = {
    "fastce": Implementation("fastce", "fastce Numba kernels"),
    "numpy-naive": _numpy_impl(
        "numpy-naive",
        "NumPy log(sum(exp(x))), no max shift (overflows on purpose)",
        _naive_logsumexp, _naive_log_softmax, _naive_softmax,
        _naive_bce, _naive_bce_logits,
    ),
    "numpy-stable": _numpy_impl(
        "numpy-stable",
        "NumPy, max-shifted",
        _stable_logsumexp, _stable_log_softmax, _stable_softmax,
        _stable_bce, _stable_bce_logits,
    ),
    "scipy": _numpy_impl(
        "scipy",
        "scipy.special logsumexp / log_softmax / softmax / log_expit",
        _scipy_logsumexp, _scipy_log_softmax, _scipy_softmax,
        _scipy_bce, _scipy_bce_logits,
    ),
    "torch": Implementation(
        "torch",
        "torch.nn.functional on CPU (autograd for the gradient)",
        _framework_functions(_bind_eager),
        requires="torch",
        install_hint=_TORCH_HINT,
        binder=_bind_eager,
    ),
    "torch-compile": Implementation(
        "torch-compile",
        "torch.compile(dynamic=False) of torch.nn.functional: inductor's C++ backend "
        "(forward compiled; .backward() through the compiled graph)",
        _framework_functions(_bind_compiled),
        requires="torch",
        install_hint=_TORCH_HINT,
        binder=_bind_compiled,
    ),
    "jax": Implementation(
        "jax",
        "jax.jit on the CPU (jax.value_and_grad for the gradient; x64 enabled)",
        _framework_functions(_bind_jax),
        requires="jax",
        install_hint='pip install "jax[cpu]==0.10.2"',
        binder=_bind_jax,
    ),
}
IMPLEMENTATIONS["scipy"].requires = "scipy"
IMPLEMENTATIONS["scipy"].install_hint = "pip install scipy"


def available_implementations():
    """Names of the implementations whose libraries are importable.

    Returns
    -------
    list of str
    """
    return [name for name, impl in IMPLEMENTATIONS.items() if impl.available()]


def get_implementation(name):
    """Return the implementation registered as ``name``.

    Parameters
    ----------
    name : str
        A key of :data:`IMPLEMENTATIONS`.

    Returns
    -------
    Implementation

    Raises
    ------
    KeyError
        If ``name`` is not registered.
    ImportError
        If the library it needs is not installed; the message says how to
        install it.
    """
    try:
        impl = IMPLEMENTATIONS[name]
    except KeyError:
        raise KeyError(
            f"unknown implementation {name!r}; choose from {sorted(IMPLEMENTATIONS)}"
        ) from None
    if not impl.available():
        raise ImportError(
            f"implementation {name!r} needs the {impl.requires!r} package, which is not "
            f"installed: {impl.install_hint}"
        )
    return impl


# ---------------------------------------------------------------------------------------------
# Large-vocabulary options (softcap, z-loss): plain torch, differentiable.


def torch_cross_entropy_zloss_softcap(logits, target, *, weight=None, ignore_index=-100,
                                      reduction="mean", label_smoothing=0.0, softcap=None,
                                      z_loss=0.0, return_lse=False):
    """Cross-entropy with logit soft-capping and z-loss, written in plain torch ops: the
    reference that ``fastce.cross_entropy(..., softcap=, z_loss=, return_lse=)`` is tested
    against.

    Parameters
    ----------
    logits, target, weight : torch.Tensor or array_like
        As for :func:`torch.nn.functional.cross_entropy`; arrays are wrapped (not copied)
        as CPU tensors.  Pass tensors with ``requires_grad`` to differentiate through it.
    ignore_index, reduction, label_smoothing
        As for :func:`torch.nn.functional.cross_entropy`.
    softcap : float, optional
        The logits become ``softcap * torch.tanh(logits / softcap)`` first.
    z_loss : float, optional
        ``z_loss * lse**2`` (lse of the capped logits over the class axis) joins the loss of
        every non-ignored sample before the reduction, unweighted; 'mean' divides the sum
        by torch's own denominator (summed target weights of the non-ignored samples, or the
        number of samples for probability targets).
    return_lse : bool, optional
        Also return the per-sample lse (the loss's shape for 'none').

    Returns
    -------
    torch.Tensor, or (torch.Tensor, torch.Tensor) with ``return_lse``
    """
    torch = _torch()
    F = torch.nn.functional

    def tensor(a):
        return a if torch.is_tensor(a) else _tensor(a)

    x, t = tensor(logits), tensor(target)
    w = None if weight is None else tensor(weight)
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    ce = F.cross_entropy(x, t, weight=w, ignore_index=ignore_index, reduction="none",
                         label_smoothing=label_smoothing)
    lse = torch.logsumexp(x, dim=1 if x.ndim > 1 else 0)
    if t.is_floating_point():
        keep = torch.ones_like(lse, dtype=torch.bool)
        denom = torch.tensor(float(ce.numel()), dtype=ce.dtype)
    else:
        keep = t != ignore_index
        safe_t = torch.where(keep, t, torch.zeros_like(t))
        wt = torch.ones_like(ce) if w is None else w[safe_t]
        denom = torch.where(keep, wt, torch.zeros_like(wt)).sum()
    if z_loss:
        ce = ce + torch.where(keep, z_loss * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        loss = ce
    elif reduction == "sum":
        loss = ce.sum()
    else:
        loss = ce.sum() / denom
    return (loss, lse) if return_lse else loss
