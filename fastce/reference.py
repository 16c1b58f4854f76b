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
``fastce``
    fastce itself, so callers can treat every implementation alike.

SciPy and PyTorch are imported on first use only, so ``import fastce`` needs
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
# PyTorch
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
    arr = t.detach().numpy()
    return arr[()] if arr.ndim == 0 else arr


def _torch_logsumexp(x, axis=-1):
    return _out(_torch().logsumexp(_tensor(_float_array(x)), dim=axis))


def _torch_log_softmax(x, axis=-1):
    return _out(_torch().nn.functional.log_softmax(_tensor(_float_array(x)), dim=axis))


def _torch_softmax(x, axis=-1):
    return _out(_torch().nn.functional.softmax(_tensor(_float_array(x)), dim=axis))


def _torch_ce_args(logits, target, weight):
    logits = _float_array(logits)
    target = np.asarray(target)
    if target.dtype.kind in "iu":
        target = target.astype(np.int64, copy=False)
    else:
        target = target.astype(logits.dtype, copy=False)
    w = None if weight is None else _tensor(np.asarray(weight, dtype=logits.dtype))
    return logits, _tensor(target), w


def _torch_cross_entropy(
    logits, target, *, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
):
    logits, t, w = _torch_ce_args(logits, target, weight)
    return _out(
        _torch().nn.functional.cross_entropy(
            _tensor(logits), t, weight=w, ignore_index=ignore_index,
            reduction=reduction, label_smoothing=label_smoothing,
        )
    )


def _torch_cross_entropy_with_grad(
    logits, target, *, weight=None, ignore_index=-100, reduction="mean",
    label_smoothing=0.0, grad_output=None,
):
    torch = _torch()
    logits, t, w = _torch_ce_args(logits, target, weight)
    x = _tensor(logits).requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(
        x, t, weight=w, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing,
    )
    if grad_output is None:
        go = torch.ones_like(loss)
    else:
        go = torch.as_tensor(np.asarray(grad_output, dtype=logits.dtype)).expand_as(loss)
    loss.backward(go)
    return _out(loss), x.grad.numpy()


def _torch_bce(input, target, *, weight=None, reduction="mean"):
    p, t, w, _ = _bce_inputs(input, target, weight)
    return _out(
        _torch().nn.functional.binary_cross_entropy(
            _tensor(p), _tensor(t), weight=None if w is None else _tensor(w),
            reduction=reduction,
        )
    )


def _torch_bce_logits(input, target, *, weight=None, pos_weight=None, reduction="mean"):
    x, t, w, dt = _bce_inputs(input, target, weight)
    pw = None if pos_weight is None else _tensor(np.asarray(pos_weight, dtype=dt))
    return _out(
        _torch().nn.functional.binary_cross_entropy_with_logits(
            _tensor(x), _tensor(t), weight=None if w is None else _tensor(w),
            pos_weight=pw, reduction=reduction,
        )
    )


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

    Attributes
    ----------
    name, description, requires : str
    """

    def __init__(self, name, description, functions=None, requires=None, install_hint=None):
        self.name = name
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
        {
            "logsumexp": _torch_logsumexp,
            "log_softmax": _torch_log_softmax,
            "softmax": _torch_softmax,
            "cross_entropy": _torch_cross_entropy,
            "cross_entropy_with_grad": _torch_cross_entropy_with_grad,
            "binary_cross_entropy": _torch_bce,
            "binary_cross_entropy_with_logits": _torch_bce_logits,
        },
        requires="torch",
        install_hint="pip install torch==2.13.0  (pin it: an unpinned torch pulls a CUDA build)",
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
