"""The shared CPU numerics (fastce/_cpu/primitives.py) against long-double NumPy references."""
import numpy as np
import pytest
from numba import njit

from fastce._config import FASTMATH
from fastce._cpu.primitives import (exp, exp_term, kahan_add, log1p, log1p_vec, log_nonneg,
                                    log_normal, merge_max_sumexp, nan_max, rest_sum,
                                    row_max_sumexp, shift_log_sum, two_sum)

DTYPES = [np.float32, np.float64]


def _elementwise(fn):
    @njit(fastmath=FASTMATH, error_model="numpy")
    def apply(a, out):
        for i in range(a.size):
            out[i] = fn(a[i])
    return apply


_exp = _elementwise(exp)
_exp_term = _elementwise(exp_term)
_log = _elementwise(log_normal)
_log_nonneg = _elementwise(log_nonneg)
_log1p_vec = _elementwise(log1p_vec)
_log1p = _elementwise(log1p)


def _ulp_error(got, x, ref_fn, dtype):
    ref = ref_fn(x.astype(np.longdouble))
    ok = np.isfinite(ref) & (np.abs(ref) >= np.finfo(dtype).tiny)
    ulp = np.spacing(np.abs(ref[ok]).astype(dtype)).astype(np.longdouble)
    return float(np.max(np.abs(got[ok].astype(np.longdouble) - ref[ok]) / ulp))


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_accuracy_over_the_whole_range(dtype):
    lo = -104.0 if dtype is np.float32 else -745.0
    hi = 88.7 if dtype is np.float32 else 709.7
    x = np.linspace(lo, hi, 400_001).astype(dtype)
    out = np.empty_like(x)
    _exp(x, out)
    assert _ulp_error(out, x, np.exp, dtype) <= (2.0 if dtype is np.float32 else 2.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_special_values(dtype):
    x = np.array([-np.inf, np.nan, np.inf, 0.0, -800.0, 800.0], dtype)
    out = np.empty_like(x)
    _exp(x, out)
    assert out[0] == 0 and np.isnan(out[1]) and out[2] == np.inf and out[3] == 1
    assert out[4] == 0 and out[5] == np.inf


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_term_accuracy_and_underflow(dtype):
    x = np.linspace(-80.0, 60.0, 200_001).astype(dtype)
    out = np.empty_like(x)
    _exp_term(x, out)
    ref = np.exp(x.astype(np.longdouble))
    rel = np.max(np.abs(out - ref) / ref)
    assert rel <= (2.5e-7 if dtype is np.float32 else 5e-16)
    special = np.array([-np.inf, -1000.0, np.nan], dtype)
    out = np.empty_like(special)
    _exp_term(special, out)
    assert out[0] == 0 and out[1] == 0 and np.isnan(out[2])


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_normal_accuracy(dtype):
    x = np.concatenate([np.linspace(1.0, 4.0, 200_001),
                        np.geomspace(1e-30, 1e30, 200_001)]).astype(dtype)
    out = np.empty_like(x)
    _log(x, out)
    assert _ulp_error(out, x, np.log, dtype) <= 3.0
    nan = np.array([np.nan], dtype)
    _log(nan, nan)
    assert np.isnan(nan[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_nonneg_accuracy_subnormals_and_specials(dtype):
    fi = np.finfo(dtype)
    x = np.concatenate([np.geomspace(fi.smallest_subnormal, fi.max / 4, 400_001),
                        np.linspace(0.5, 2.0, 200_001)]).astype(dtype)
    out = np.empty_like(x)
    _log_nonneg(x, out)
    assert _ulp_error(out, x, np.log, dtype) <= 3.0
    special = np.array([0.0, -0.0, np.inf, -1.0, np.nan, fi.smallest_subnormal], dtype)
    out = np.empty_like(special)
    _log_nonneg(special, out)
    assert out[0] == -np.inf and out[1] == -np.inf and out[2] == np.inf
    assert np.isnan(out[3]) and np.isnan(out[4])
    assert out[5] == pytest.approx(np.log(float(fi.smallest_subnormal)), rel=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_log1p_vec_accuracy_whole_domain(dtype):
    """log1p over (-1, max]: tiny arguments of both signs (where log(1 + x) loses every
    digit), the neighbourhood of -1 and huge values, <= 3 ulp."""
    fi = np.finfo(dtype)
    tiny_to_max = np.geomspace(fi.smallest_subnormal, fi.max / 4, 400_001)
    x = np.concatenate([tiny_to_max, -np.geomspace(fi.smallest_subnormal, 1 - fi.epsneg, 400_001),
                        np.linspace(-0.999, 3.0, 400_001)]).astype(dtype)
    out = np.empty_like(x)
    _log1p_vec(x, out)
    assert _ulp_error(out, x, np.log1p, dtype) <= 3.0
    small = np.array([1e-30, -1e-30, fi.tiny], dtype)
    out = np.empty_like(small)
    _log1p_vec(small, out)
    np.testing.assert_array_equal(out, small)   # log1p(x) = x to the last bit
    sub = np.geomspace(fi.smallest_subnormal, fi.tiny, 1000).astype(dtype)
    out = np.empty_like(sub)
    _log1p_vec(sub, out)    # subnormal: within one subnormal step (x / 2 is rounded once)
    assert np.max(np.abs(out - sub)) <= fi.smallest_subnormal
    special = np.array([-1.0, np.inf, -1.5, np.nan, 0.0], dtype)
    out = np.empty_like(special)
    _log1p_vec(special, out)
    assert out[0] == -np.inf and out[1] == np.inf and np.isnan(out[2]) and np.isnan(out[3])
    assert out[4] == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_log1p_accuracy(dtype):
    """<= 1 ulp from -1 to 1e30, tiny arguments included (log1p(x) = x there)."""
    x = np.concatenate([np.linspace(-0.999, 4.0, 200_001),
                        np.geomspace(1e-30, 1e30, 200_001),
                        -np.geomspace(1e-30, 0.5, 20_001)]).astype(dtype)
    out = np.empty_like(x)
    _log1p(x, out)
    assert _ulp_error(out, x, np.log1p, dtype) <= 1.0
    tiny = np.array([1e-38 if dtype is np.float32 else 1e-300], dtype)
    _log1p(tiny.copy(), out[:1])
    assert out[0] == tiny[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_log1p_special_values(dtype):
    x = np.array([0.0, -1.0, -2.0, np.inf, np.nan, -np.inf], dtype)
    out = np.empty_like(x)
    _log1p(x, out)
    assert out[0] == 0 and out[1] == -np.inf and np.isnan(out[2]) and out[3] == np.inf
    assert np.isnan(out[4]) and np.isnan(out[5])


@njit(fastmath=FASTMATH, error_model="numpy")
def _two_sum(a, b):
    return two_sum(a, b)


def test_two_sum_is_exact_under_the_kernels_fast_math():
    """The error term survives a caller compiled with "reassoc"."""
    s, e = _two_sum(1.0, 1e-20)
    assert s == 1.0 and e == 1e-20
    s, e = _two_sum(np.float32(1), np.float32(1e-10))
    assert s == 1 and e == np.float32(1e-10)


@njit(fastmath=FASTMATH, error_model="numpy")
def _kahan_sum(a):
    s = a.dtype.type(0)
    comp = a.dtype.type(0)
    for i in range(a.shape[0]):
        s, comp = kahan_add(s, comp, a[i])
    return s, comp


@pytest.mark.parametrize("dtype", DTYPES)
def test_kahan_add_compensates_under_the_kernels_fast_math(dtype):
    """Sums of non-negative terms (the rest sums' case) within 2 eps of the exact sum, in a
    caller compiled with "reassoc"; a plain sum of the same terms is far off."""
    rng = np.random.default_rng(3)
    eps = float(np.finfo(dtype).eps)
    # one large term, then many that each lose bits against it
    a = np.concatenate([[1.0], rng.uniform(0, 1, 20000) * eps]).astype(dtype)
    # terms spread over many binades
    b = np.exp(rng.uniform(-30, 0, 3000)).astype(dtype)
    for x in (a, b):
        s, comp = _kahan_sum(x)
        total = np.longdouble(s) - np.longdouble(comp)
        exact = np.sum(x.astype(np.longdouble))
        assert abs(total - exact) <= 2 * eps * exact, (total, exact)
    plain = np.float64(np.cumsum(a)[-1])     # sequential, in a's dtype
    assert abs(plain - float(np.sum(a.astype(np.longdouble)))) > 10 * eps


@njit(fastmath=FASTMATH, error_model="numpy")
def _rest(row, skip, pivot):
    return rest_sum(row, skip, pivot)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rest_sum_exact_differences(dtype):
    """rest_sum skips one index and takes every difference exactly: against mpmath, within
    1 eps of float64 for rows of 3 to 3000 (blocks, the skipped index in a later block)."""
    import mpmath
    rng = np.random.default_rng(2)
    for C, skip in ((3, 0), (300, 299), (3000, 1700)):
        row = (rng.standard_normal(C) * 7).astype(dtype)
        row[skip] = dtype(33.3)
        got = _rest(row, skip, row[skip])
        with mpmath.workdps(40):
            p = mpmath.mpf(float(row[skip]))
            ref = mpmath.fsum(mpmath.exp(mpmath.mpf(float(v)) - p)
                              for j, v in enumerate(row) if j != skip)
        assert abs(got - float(ref)) <= 2.3e-16 * float(ref), (C, got, ref)
    with_masked = np.array([0.0, -np.inf, -1.0], dtype)
    assert _rest(with_masked, 0, with_masked[0]) == pytest.approx(np.exp(-1.0), rel=1e-15)


@njit(fastmath=FASTMATH, error_model="numpy")
def _merge(m1, s1, m2, s2):
    m, s = merge_max_sumexp(m1, s1, m2, s2)
    a, L = shift_log_sum(m, s)
    return m, s, a + L


def test_merge_never_forms_inf_minus_inf():
    # two all-masked partials stay (-inf, 0); a masked partial adds nothing to a finite one
    m, s, lse = _merge(-np.inf, 0.0, -np.inf, 0.0)
    assert m == -np.inf and s == 0 and lse == -np.inf
    m, s, lse = _merge(-np.inf, 0.0, 2.0, 3.0)
    assert m == 2.0 and s == 3.0 and lse == pytest.approx(2.0 + np.log(3.0))
    m, s, lse = _merge(1.0, 1.0, 3.0, 1.0)
    assert lse == pytest.approx(np.log(np.exp(1.0) + np.exp(3.0)), rel=1e-15)
    assert np.isnan(_merge(np.nan, 1.0, 3.0, 1.0)[2])


@njit(fastmath=FASTMATH, error_model="numpy")
def _row_lse(row):
    m, s = row_max_sumexp(row)
    a, L = shift_log_sum(m, s)
    return a + L


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_statistics_with_a_rising_shift(dtype, rng=np.random.default_rng(7)):
    """Later blocks far above the first block's max force the rescaling path; values far
    below keep the fused path; both must match a long-double reference."""
    row = rng.standard_normal(10_000).astype(dtype)
    row[3000:4000] += 70   # beyond the e^62 headroom of the first blocks' shift
    row[6000:7000] += 30   # within the headroom: summed against the stale shift
    row[9000] = -np.inf
    ref = np.log(np.sum(np.exp(row.astype(np.longdouble)[np.isfinite(row)])))
    assert float(_row_lse(row)) == pytest.approx(float(ref), rel=4 * float(np.finfo(dtype).eps))


@njit(fastmath=FASTMATH, error_model="numpy")
def _max(a):
    m = a.dtype.type(-np.inf)
    for i in range(a.size):
        m = nan_max(m, a[i])
    return m


def test_nan_max_propagates_nan():
    a = np.arange(100.0)
    a[37] = np.nan
    assert np.isnan(_max(a))
    assert _max(np.arange(100.0)) == 99.0
