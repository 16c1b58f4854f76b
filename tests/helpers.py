"""Shared helpers for the CPU test-suite: torch references, strided layouts, tolerances,
random targets, and a guard that inputs come back unmodified (imported by the test modules;
``conftest.py`` holds only fixtures).

torch is the reference for semantics (the modules using it ``importorskip`` it).  It is evaluated in float64 on the same values (the
float32 results of fastce are compared with a float32 tolerance), so a failure means a
semantic difference or an accuracy problem in fastce, not float32 rounding inside torch.
"""
import contextlib

import mpmath
import numpy as np

try:        # optional here: only the modules that compare with torch need it (they skip)
    import torch
    F = torch.nn.functional
except ImportError:  # pragma: no cover
    torch = F = None

DTYPES = [np.float32, np.float64]

# Tolerances: fastce's exp is within 2 ulp and its sums run in another order than torch's.
RTOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-11}
ATOL = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-13}


NINF, INF, NAN = -np.inf, np.inf, np.nan
ERRORS = (TypeError, ValueError, IndexError)     # the three documented exception types


def lse_mp(row):
    """log(sum(exp(row))) in 50-digit arithmetic."""
    with mpmath.workdps(50):
        return float(mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(float(v))) for v in row)))


def tol(dtype):
    dtype = np.dtype(dtype)
    return dict(rtol=RTOL[dtype], atol=ATOL[dtype])


def assert_close(actual, expected, dtype=None, scale=1.0, equal_nan=True):
    """``actual`` (fastce) vs ``expected`` (reference): same shape, tolerance of ``dtype``
    (default: ``actual``'s), absolute tolerance multiplied by ``scale``."""
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    dt = np.dtype(dtype or actual.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    np.testing.assert_allclose(actual.astype(np.float64), expected.astype(np.float64),
                               rtol=RTOL[dt], atol=ATOL[dt] * scale, equal_nan=equal_nan)


def t64(a):
    """A float64 (or int64) torch tensor holding ``a``'s values."""
    a = np.asarray(a)
    if a.dtype.kind == "f":
        return torch.from_numpy(np.array(a, dtype=np.float64))
    return torch.from_numpy(np.array(a, dtype=np.int64))


def torch_ce(logits, target, weight=None, ignore_index=-100, reduction="mean",
             label_smoothing=0.0, grad_output=None):
    """(loss, grad) from torch autograd in float64: ``loss.backward(grad_output)``."""
    x = t64(logits).requires_grad_(True)
    t = t64(target)
    w = None if weight is None else t64(weight)
    loss = F.cross_entropy(x, t, weight=w, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    go = torch.ones_like(loss) if grad_output is None else t64(grad_output).reshape(loss.shape)
    loss.backward(go)
    return loss.detach().numpy(), x.grad.numpy()


def torch_bce(p, y, weight=None, reduction="mean"):
    return F.binary_cross_entropy(t64(p), t64(y), weight=None if weight is None else
                                  torch.broadcast_to(t64(weight), np.shape(p)),
                                  reduction=reduction).numpy()


def torch_bce_logits(x, y, weight=None, pos_weight=None, reduction="mean"):
    return F.binary_cross_entropy_with_logits(
        t64(x), t64(y), weight=None if weight is None else t64(weight),
        pos_weight=None if pos_weight is None else t64(pos_weight), reduction=reduction).numpy()


# ---------------------------------------------------------------------------------------------
# layouts

LAYOUTS = ["contiguous", "fortran", "step", "negative", "transposed", "readonly"]


def make_layout(a, layout):
    """An array with ``a``'s values (and shape) in the given memory layout."""
    a = np.ascontiguousarray(a)
    if layout == "contiguous":
        return a
    if layout == "fortran":
        out = np.asfortranarray(a)
        assert a.ndim < 2 or not out.flags.c_contiguous or min(a.shape) <= 1
        return out
    if layout == "step":
        # Every other element along every axis of a larger buffer.
        big = np.zeros(tuple(2 * d for d in a.shape), a.dtype)
        view = big[tuple(slice(None, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if layout == "negative":
        rev = np.ascontiguousarray(a[tuple(slice(None, None, -1) for _ in a.shape)])
        return rev[tuple(slice(None, None, -1) for _ in a.shape)]
    if layout == "transposed":
        out = np.ascontiguousarray(a.T).T
        return out
    if layout == "readonly":
        out = a.copy()
        out.flags.writeable = False
        return out
    raise ValueError(layout)


@contextlib.contextmanager
def unchanged(*arrays):
    """Asserts that none of ``arrays`` is modified inside the block (NaN-aware)."""
    arrays = [a for a in arrays if isinstance(a, np.ndarray)]
    copies = [a.copy() for a in arrays]
    flags = [a.flags.writeable for a in arrays]
    yield
    for a, c, f in zip(arrays, copies, flags):
        assert a.dtype == c.dtype and a.shape == c.shape
        assert np.array_equal(a, c, equal_nan=a.dtype.kind in "fc"), "input was modified"
        assert a.flags.writeable == f


def random_targets(rng, shape, C, ignore_index=None, frac_ignored=0.25):
    t = rng.integers(0, C, size=shape)
    if ignore_index is not None:
        mask = rng.random(shape) < frac_ignored
        t = np.where(mask, ignore_index, t)
        # keep at least one non-ignored target so that "mean" is finite
        if np.size(t) and np.all(t == ignore_index):
            flat = t.reshape(-1)
            flat[0] = (ignore_index + 1) % C
            t = flat.reshape(np.shape(t))
    return np.asarray(t, dtype=np.int64)


def random_probs(rng, shape, dtype, axis):
    p = rng.random(shape) + 0.05
    p /= p.sum(axis=axis, keepdims=True)
    return p.astype(dtype)
