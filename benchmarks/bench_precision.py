"""Relative precision on confident rows (issue #13), per implementation.

A confident row's target (or the entry asked for) holds the row maximum, so its loss
``lse - x_t = log1p(sum_{j != t} exp(x_j - x_t))`` is small.  One-pass formulas subtract two
nearly equal numbers there and return 0 or a few correct digits.  These ``track_`` benchmarks
report the worst relative error over such rows, in units of the dtype's machine epsilon
(1 = one unit of the last place near 1), against mpmath at 30 digits on the same floats.
"""

import numpy as np

from . import common as C

# A result with no correct digit (0 for a positive true value) scores 1 / eps.
_QUANTITIES = ["loss", "target_grad", "log_softmax_at_max", "logsumexp_near_0"]


def confident_rows(n_rows, classes, dtype, seed=12):
    """Seeded rows whose target holds the maximum, losses from ~1 down to ~1e-25 (float32) /
    1e-250 (float64): the target sits above the others' max by a gap on a log scale."""
    g = np.random.default_rng([C.SEED, seed, classes])
    x = g.standard_normal((n_rows, classes))
    t = g.integers(0, classes, size=n_rows)
    top = 55.0 if dtype == "float32" else 570.0
    gaps = np.geomspace(0.5, top, n_rows)
    for i in range(n_rows):
        x[i, t[i]] = np.delete(x[i], t[i]).max() + gaps[i]
    return x.astype(dtype), t


def _exact_rest(row, t):
    """(rest, log1p(rest)) at 30 digits for the exact values of ``row``, pivot ``row[t]``."""
    import mpmath

    with mpmath.workdps(30):
        xt = mpmath.mpf(float(row[t]))
        rest = mpmath.fsum(mpmath.exp(mpmath.mpf(float(v)) - xt)
                           for j, v in enumerate(row) if j != t)
        return rest, mpmath.log1p(rest)


def _rel_error_eps(got, ref, dtype):
    """Worst ``|got - ref| / |ref|`` in eps; non-finite results score ``NONFINITE_ERROR``."""
    got = C._to_numpy(got).astype(np.float64).ravel()
    ref = np.asarray(ref, dtype=np.float64).ravel()
    if not np.all(np.isfinite(got)):
        return C.NONFINITE_ERROR
    return float(np.max(np.abs(got - ref) / np.abs(ref)) / np.finfo(dtype).eps)


class ConfidentRowsPrecision:
    """Worst relative error (in eps) over 24 confident rows: the per-row loss, the target's
    gradient ``p_t - 1``, log_softmax at the max entry, and logsumexp of rows whose max is 0
    (the same rows shifted, e.g. ``logsumexp([0, -40]) = 4.2e-18``)."""

    params = [C.IMPLS, _QUANTITIES, [10, 1000], C.DTYPES]
    param_names = ["impl", "quantity", "classes", "dtype"]
    n_rows = 24
    unit = "eps"

    def setup(self, impl, quantity, classes, dtype):
        def build():
            try:
                import mpmath  # noqa: F401  (torch's dependency; the reference needs it)
            except ImportError:
                raise NotImplementedError("the precision reference needs mpmath") from None
            x, t = confident_rows(self.n_rows, classes, dtype)
            rows = np.arange(self.n_rows)
            if quantity == "logsumexp_near_0":
                x = x - x[rows, t][:, None]  # the max becomes 0 (the others round)
            exact = [_exact_rest(x[i], t[i]) for i in rows]
            rest = np.array([float(r) for r, _ in exact])
            lp = np.array([float(v) for _, v in exact])
            if quantity == "loss":
                call = C.make_call(impl, "cross_entropy", x, t, reduction="none")
                pick, ref = (lambda y: y), lp
            elif quantity == "target_grad":
                call = C.make_call(impl, "cross_entropy_with_grad", x, t, reduction="none")
                pick, ref = (lambda y: C._to_numpy(y[1])[rows, t]), -rest / (1 + rest)
            elif quantity == "log_softmax_at_max":
                call = C.make_call(impl, "log_softmax", x, axis=-1)
                pick, ref = (lambda y: C._to_numpy(y)[rows, t]), -lp
            else:
                call = C.make_call(impl, "logsumexp", x, axis=-1)
                pick, ref = (lambda y: y), lp
            C.warm_up(call)
            return call, pick, ref

        self.call, self.pick, self.ref = C.memoize(
            ("precision", impl, quantity, classes, dtype), build)

    def track_confident_error_eps(self, impl, quantity, classes, dtype):
        return _rel_error_eps(self.pick(self.call()), self.ref, dtype)

    track_confident_error_eps.unit = "eps"
