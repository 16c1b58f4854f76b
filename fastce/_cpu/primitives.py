"""Numeric primitives shared by every CPU kernel: a vectorizing exp and log, a NaN-propagating
max, and the ``-inf``-safe (shift, sum-exp) algebra.

Why hand-written: numba has no SVML, so ``np.exp`` in a loop is split back into scalar ``expf``
calls and dominates the runtime; and ``max``/``if v > m`` never vectorize (numba #5067).  The
functions here compile to straight-line LLVM IR that the loop vectorizer turns into AVX-512.

A row's log-sum-exp is kept as the pair ``(m, s)``: a shift ``m`` (a block max, never above
the row's max and at most e^62 below it) and ``s = sum(exp(x - m))``.  Pairs from different
blocks, chunks or shards merge exactly (:func:`merge_max_sumexp`), which is what the split-row
kernels use today and what vocabulary sharding will use tomorrow.
"""
import math
import types as pytypes

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .._config import CLASS_BLOCK, FASTMATH, SHORT_ROW

__all__ = ["kernel_twins", "wide_vectors", "prefetch", "nan_max", "exp", "exp_term",
           "log_normal", "log_nonneg", "log1p_vec", "log1p", "two_sum", "two_sum_inlined",
           "kahan_add",
           "two_diff", "exp_diff",
           "safe_shift", "inv_sum", "lse_from_max_sumexp", "shift_log_sum", "lse_minus",
           "merge_max_sumexp", "row_max", "row_max_sumexp", "row_argmax", "confident", "lse_needs_rest",
           "rest_sum", "rest_total", "row_rest", "rest_term", "REST_TERM_BIAS", "lse_confident",
           "spatial_rest_sum", "exp_diff_native", "pair_parts", "pair_lse_parts",
           "pair_lse_minus",
           "tanh", "softcap", "softcap_grad"]


@intrinsic
def wide_vectors(typingctx):
    """Mark the calling function ``"prefer-vector-width"="512"``.

    LLVM vectorizes to 256 bits on Intel AVX-512 parts by default (a tuning against old
    clock throttling); the exp-bound loops here run markedly faster with 512-bit vectors
    (docs/performance.md has the figures).  Call it first thing in every function that holds a hot loop.
    A no-op where the CPU has no 512-bit vectors.
    """
    def codegen(context, builder, sig, args):
        # llvmlite validates attribute names against a fixed list that lacks string
        # attributes; the set underneath accepts one and prints it verbatim.
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def prefetch(typingctx, arr, index):
    """Hint the CPU to bring ``arr[index]``'s cache line into L1 (``llvm.prefetch``; no
    fault on any address).  Used one block ahead in the row loops: with the exp keeping the
    core busy, the hardware prefetcher alone leaves the loads waiting on memory (-16 % time
    single-threaded, docs/performance.md)."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        aryty = sig.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        idx = context.cast(builder, args[1], sig.args[1], types.intp)
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [idx], wraparound=False,
                                       boundscheck=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        # read, high temporal locality, data cache
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.none(arr, index), codegen


@intrinsic
def nan_max(typingctx, a, b):
    """max(a, b) that propagates NaN and vectorizes (``llvm.maximum``)."""
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, sig, args):
        fnty = ir.FunctionType(args[0].type, [args[0].type, args[1].type])
        name = "llvm.maximum.f32" if a.bitwidth == 32 else "llvm.maximum.f64"
        fn = cgutils.get_or_insert_function(builder.module, fnty, name)
        return builder.call(fn, args)

    return a(a, b), codegen


def _pow2_scaler(steps):
    """Intrinsic ``p * 2**n`` for an integral-valued float ``n``, the power built directly in the
    exponent bits (integer add + shift + bitcast: vectorizes, unlike ``ldexp``).

    With ``steps=2``, ``2**n`` is applied as ``2**(n//2) * 2**(n - n//2)`` so both factors stay
    normal numbers over the whole clamped range: the product then underflows to denormals and
    exactly 0, or overflows to inf, the way the true exp does.  ``steps=1`` is valid for ``n``
    in the normal exponent range only and saves three instructions.
    """
    @intrinsic
    def scale(typingctx, p, n):
        if not (isinstance(p, types.Float) and p == n):
            return None

        def codegen(context, builder, sig, args):
            pv, nv = args
            width = p.bitwidth
            ity = ir.IntType(width)
            mant = 23 if width == 32 else 52
            bias = 127 if width == 32 else 1023
            ni = builder.fptosi(nv, ity)
            parts = (ni,)
            if steps == 2:
                half = builder.ashr(ni, ity(1))
                parts = (half, builder.sub(ni, half))
            out = pv
            for part in parts:
                bits = builder.shl(builder.add(part, ity(bias)), ity(mant))
                out = builder.fmul(out, builder.bitcast(bits, pv.type), flags=("contract",))
            return out

        return p(p, n), codegen

    return scale


_scale_by_pow2 = _pow2_scaler(2)
_scale_by_pow2_normal = _pow2_scaler(1)


@intrinsic
def _frexp_sqrt2(typingctx, x):
    """``(m, e)`` with ``x = m * 2**e``, ``m`` in [sqrt(1/2), sqrt(2)) and ``e`` an
    integral-valued float, for positive normal ``x``: the exponent and mantissa fields are cut
    out with integer ops on the bits (vectorizes, unlike ``np.frexp``)."""
    if not isinstance(x, types.Float):
        return None

    def codegen(context, builder, sig, args):
        (xv,) = args
        width = x.bitwidth
        ity = ir.IntType(width)
        mant = 23 if width == 32 else 52
        mant_mask = (1 << mant) - 1
        # The bits of the smallest m in [sqrt(1/2), 1): mantissa fields from that of the
        # dtype's sqrt(2) up belong to m/2 with e + 1.  Subtracting them borrows from the
        # exponent field exactly when the mantissa lies below, so one integer subtraction
        # does the split and the halving (no compare, no select).
        sqrt2_bits = int(np.array(math.sqrt(2), np.float32 if width == 32 else np.float64)
                         .view(np.uint32 if width == 32 else np.uint64))
        low = ((sqrt2_bits & mant_mask) + 1) | ((127 - 1 if width == 32 else 1023 - 1) << mant)
        d = builder.sub(builder.bitcast(xv, ity), ity(low))
        e = builder.ashr(d, ity(mant))
        m = builder.bitcast(builder.add(builder.and_(d, ity(mant_mask)), ity(low)), xv.type)
        ef = builder.sitofp(e, xv.type)
        return context.make_tuple(builder, sig.return_type, [m, ef])

    return types.UniTuple(x, 2)(x), codegen


def _by_dtype(stub, impl_f32, impl_f64):
    """Make the jitted-code-only ``stub`` call ``impl_f32`` or ``impl_f64`` by argument type.

    The implementations keep their own fast-math flags ("contract" only, see ``_make_exp``):
    they are separate functions that LLVM inlines, not IR inlined into the caller.
    """
    @overload(stub, jit_options={"fastmath": {"contract"}, "error_model": "numpy"})
    def _impl(x):
        # The implementation's own Python function, compiled as the overload: a forwarding
        # lambda would be one more function for numba to compile at the first call.
        if x == types.float32:
            return impl_f32.py_func
        if x == types.float64:
            return impl_f64.py_func
        return None
    return _impl


def _make_log(dtype, n_terms):
    """The logs of one dtype: ``log_normal``'s, and the whole-domain ``log_nonneg`` and
    ``log1p_vec``, all ending in one series (``_series``)."""
    ln2_hi = dtype(0.693359375) if dtype is np.float32 else dtype(6.93147180369123816490e-01)
    ln2_lo = dtype(-2.12194440e-4) if dtype is np.float32 else dtype(1.90821492927058770002e-10)
    # log(m) = 2 atanh(z), z = (m - 1)/(m + 1), |z| <= 0.1716: 2z * sum z^(2k) / (2k + 1).
    c = tuple(dtype(2.0 / (2 * k + 1)) for k in range(n_terms))
    one = dtype(1)
    zero = dtype(0)
    inf = dtype(np.inf)
    nan = dtype(np.nan)
    # Subnormal inputs of log_nonneg are scaled into the normal range first.
    sub_bits = 24 if dtype is np.float32 else 54
    sub_scale = dtype(2.0 ** sub_bits)
    sub_e = dtype(sub_bits)
    tiny = dtype(np.finfo(dtype).tiny)
    min_exp = dtype(np.finfo(dtype).minexp)

    @njit(fastmath={"contract"}, error_model="numpy")
    def _series(num, den, e):
        """e*ln2 + log(m) for (m - 1, m + 1) given as (num, den)."""
        z = num / den
        z2 = z * z
        q = c[n_terms - 1]
        for k in range(n_terms - 2, -1, -1):
            q = q * z2 + c[k]
        return e * ln2_hi + (e * ln2_lo + z * q)

    @njit(fastmath={"contract"}, error_model="numpy")
    def _log(x):
        m, e = _frexp_sqrt2(x)
        r = _series(m - one, m + one, e)
        return r if x == x else x  # NaN in, NaN out (the bit tricks alone give a number)

    @njit(fastmath={"contract"}, error_model="numpy")
    def _log_nonneg(x):
        sub = x < tiny
        m, e = _frexp_sqrt2(x * sub_scale if sub else x)
        r = _series(m - one, m + one, e - (sub_e if sub else zero))
        # 0 -> -inf, +inf -> +inf, negative or NaN -> NaN.
        special = -inf if x == zero else (x if x > zero else nan)
        return r if (x > zero) & (x < inf) else special

    @njit(fastmath={"contract"}, error_model="numpy")
    def _log1p(x):
        u = one + x
        # u's rounding error, exact ("contract" only: nothing regroups it); it enters the
        # series as a correction of u's mantissa, so no second division is needed.
        err = x - (u - one)
        m, e = _frexp_sqrt2(u)
        # err * 2**-e in one step: err is 0 wherever -e would leave the normal range (u that
        # large has no rounding error left in 1 + x), so clamping -e there changes nothing.
        ne = zero - e
        err = _scale_by_pow2_normal(err, ne if ne > min_exp else min_exp)
        r = _series((m - one) + err, (m + one) + err, e)
        # x = -1 -> -inf, +inf -> +inf, x < -1 or NaN -> NaN.
        special = -inf if u == zero else (u if u > zero else nan)
        return r if (u > zero) & (u < inf) else special

    return _log, _log_nonneg, _log1p


# Truncation error 2 z^(2n+1) / (2n+1) at |z| = 0.1716: 5e-10 (float32, n = 5), 1e-17
# (float64, n = 10).
_log_f32, _log_nonneg_f32, _log1p_f32 = _make_log(np.float32, 5)
_log_f64, _log_nonneg_f64, _log1p_f64 = _make_log(np.float64, 10)


def log_normal(x):
    """Vectorizing natural log for positive normal ``x`` (not 0, denormals or inf; NaN gives
    NaN), in ``x``'s precision, <= 3 ulp.  Callable from jitted code only."""
    raise NotImplementedError("fastce._cpu.primitives.log_normal is for jitted code")


_by_dtype(log_normal, _log_f32, _log_f64)


def log_nonneg(x):
    """Vectorizing natural log for ``x >= 0``, subnormals included: 0 gives ``-inf``, inf
    gives inf, a negative ``x`` or NaN gives NaN; <= 3 ulp.  A few selects dearer than
    :func:`log_normal`.  Jitted code only."""
    raise NotImplementedError("fastce._cpu.primitives.log_nonneg is for jitted code")


_by_dtype(log_nonneg, _log_nonneg_f32, _log_nonneg_f64)


def log1p_vec(x):
    """Vectorizing ``log(1 + x)`` for ``x >= -1``, accurate for tiny ``x`` (``log1p_vec(x) = x``
    to the last bit there): -1 gives ``-inf``, inf gives inf, ``x < -1`` or NaN gives NaN;
    <= 3 ulp.  One division, like :func:`log_normal`: the rounding error of ``1 + x`` is
    folded into the series' argument.  Jitted code only."""
    raise NotImplementedError("fastce._cpu.primitives.log1p_vec is for jitted code")


_by_dtype(log1p_vec, _log1p_f32, _log1p_f64)


def _make_log1p(dtype, n_terms):
    ln2_hi = dtype(0.693359375) if dtype is np.float32 else dtype(6.93147180369123816490e-01)
    ln2_lo = dtype(-2.12194440e-4) if dtype is np.float32 else dtype(1.90821492927058770002e-10)
    # log1p(f) = 2 atanh(t), t = f/(2 + f) = 2t + t R(t^2), R = sum_k 2 t^(2k) / (2k + 1).
    c = tuple(dtype(2.0 / (2 * k + 1)) for k in range(1, n_terms + 1))
    one = dtype(1)
    half = dtype(0.5)
    ninf = dtype(-np.inf)
    nan = dtype(np.nan)

    @njit(fastmath={"contract"}, error_model="numpy")
    def _log1p(x):
        # u = 1 + x exactly as u + err (TwoSum), then u = m 2^e with m in [sqrt(1/2), sqrt 2)
        # and f = m - 1 exact: log1p(x) = e ln2 + log1p(f) + err/u.
        u = one + x
        bb = u - one
        err = (one - (u - bb)) + (x - bb)
        m, e = _frexp_sqrt2(u)
        f = m - one
        t = f / (f + dtype(2))
        t2 = t * t
        q = c[n_terms - 1]
        for k in range(n_terms - 2, -1, -1):
            q = q * t2 + c[k]
        R = t2 * q
        hf = half * f * f
        # log1p(f) = f - (hf - t (hf + R)): the leading f is exact, the rest is small.
        r = e * ln2_hi - ((hf - (t * (hf + R) + (e * ln2_lo + err / u))) - f)
        r = r if x > -one else (ninf if x == -one else nan)
        return x if (x == np.inf or x != x) else r

    return _log1p


# Truncation of R relative to the result: t^(2n+2)/(2n+3) at t^2 = 0.0295: 2e-10 (float32,
# n = 5), 6e-19 (float64, n = 10).
_log1p_accurate_f32 = _make_log1p(np.float32, 5)
_log1p_accurate_f64 = _make_log1p(np.float64, 10)


def log1p(x):
    """Vectorizing ``log(1 + x)`` in ``x``'s precision, <= 1 ulp (the confident-row losses
    need the last bit; :func:`log1p_vec` is the cheaper <= 3 ulp one the BCE loop
    uses), accurate for tiny ``x``
    (``log1p(1e-30) = 1e-30``).  -1 gives -inf, below -1 NaN, inf inf, NaN NaN.  Jitted code
    only."""
    raise NotImplementedError("fastce._cpu.primitives.log1p is for jitted code")


_by_dtype(log1p, _log1p_accurate_f32, _log1p_accurate_f64)


@njit(fastmath={"contract"}, error_model="numpy")
def two_sum(a, b):
    """``(s, err)`` with ``s = fl(a + b)`` and ``a + b = s + err`` exactly (Knuth's TwoSum).

    Compiled without "reassoc" (LLVM keeps the flags per instruction once inlined), so a
    caller's fast-math cannot fold ``err`` to 0.
    """
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@njit(fastmath={"contract"}, error_model="numpy")
def kahan_add(s, comp, t):
    """One step of Kahan's compensated sum: ``(s', comp')`` with ``s' - comp'`` carrying
    ``s - comp + t``; the total is ``s - comp`` at the end.  Four operations where
    :func:`two_sum` plus the error sum take seven (relative error of a sum of non-negative
    terms ~2 u + O(n u^2) instead of ~u).  Compiled without "reassoc", which would fold
    ``comp'`` to 0."""
    y = t - comp
    s2 = s + y
    return s2, (s2 - s) - y


# The same, inlined at the numba-IR level: for a caller compiled without "reassoc" (its flags
# apply to the inlined code) that must not pay a separate compile (``tiny.ce_index_tiny``).
two_sum_inlined = njit(inline="always", error_model="numpy")(two_sum.py_func)


@njit(fastmath={"contract"}, error_model="numpy")
def two_diff(a, b):
    """``(d, err)`` with ``d = fl(a - b)`` and ``a - b = d + err`` exactly."""
    return two_sum(a, -b)


# Cody-Waite reduction: x = n*ln2 + r with |r| <= ln2/2; ln2 split so n*LN2_HI is exact.
_LOG2E = 1.4426950408889634
_F32 = dict(
    ln2_hi=np.float32(0.693359375),
    ln2_lo=np.float32(-2.12194440e-4),
    lo=np.float32(-110.0),   # exp(x) rounds to exactly 0 below this
    hi=np.float32(89.0),     # ... and to inf above this
    # Relative-error-weighted least-squares fits of (e^r - 1)/r on [-ln2/2, ln2/2].  Degree 5
    # (e^r to degree 6): max rel. error 2.2e-9, far below float32's 6e-8 rounding.
    c=tuple(np.float32(v) for v in (
        1.0000000360921264, 0.4999999535099431, 0.16666420945132046,
        0.0416677243209173, 0.008374763974941822, 0.0013859291077513098)),
    # Degree 4 for sum terms: max rel. error 1.0e-7 (under 2 ulp), one FMA less.
    c_term=tuple(np.float32(v) for v in (
        0.9999995316748532, 0.49999141033239475, 0.16668114265113723,
        0.041898732028905504, 0.008261531003481955)),
    # Sum/probability terms clamp here: rint(lo_term * log2 e) = -127, whose one-step scale
    # 2**-127 has all exponent bits 0, i.e. is exactly 0.0 (denormal results flush to 0).
    lo_term=np.float32(-88.0),
    # ... and above hi_term the scale's exponent bits are all 1: the result is inf.
    hi_term=np.float32(88.5),
)
_F64 = dict(
    ln2_hi=np.float64(6.93147180369123816490e-01),
    ln2_lo=np.float64(1.90821492927058770002e-10),
    lo=np.float64(-760.0),
    hi=np.float64(710.0),
    # Taylor coefficients 1/(k+1)! for (e^r - 1)/r up to r^11: truncation error 1.7e-16.
    c=tuple(np.float64(1.0 / math.factorial(k + 1)) for k in range(12)),
    c_term=tuple(np.float64(1.0 / math.factorial(k + 1)) for k in range(12)),
    lo_term=np.float64(-709.0),  # rint(-709 log2 e) = -1023: the scale is exactly 0.0
    hi_term=np.float64(709.5),   # rint(709.5 log2 e) = 1024: the scale is inf
)


def _make_exp(dtype, c, lo, hi, scale):
    """A vectorizable exp: clamp to [lo, hi], Cody-Waite reduction x = n ln2 + r, polynomial
    e^r = 1 + r q(r), then ``scale`` multiplies by 2**n through the exponent bits."""
    K = _F32 if dtype is np.float32 else _F64
    ln2_hi, ln2_lo = K["ln2_hi"], K["ln2_lo"]
    log2e = dtype(_LOG2E)
    one = dtype(1.0)
    deg = len(c)

    # Compiled with "contract" only and NOT inlined at the numba-IR level (LLVM still inlines
    # it): inlined IR would inherit the caller's "reassoc", which lets LLVM fold the Cody-Waite
    # split (x - n*hi) - n*lo back into x - n*(hi + lo) and lose ~7 bits in float64.
    @njit(fastmath={"contract"})
    def _exp(x):
        # Written so that NaN fails both comparisons and flows on into r: each clamp is then
        # one max/min instruction (x86's operand order propagates the NaN).
        xc = lo if x < lo else (hi if x > hi else x)
        n = np.rint(xc * log2e)
        r = (xc - n * ln2_hi) - n * ln2_lo
        q = c[deg - 1]
        for k in range(deg - 2, -1, -1):
            q = q * r + c[k]
        return scale(one + r * q, n)

    return _exp


_exp_f32 = _make_exp(np.float32, _F32["c"], _F32["lo"], _F32["hi"], _scale_by_pow2)
_exp_f64 = _make_exp(np.float64, _F64["c"], _F64["lo"], _F64["hi"], _scale_by_pow2)
# Sum and probability terms: one-step scaling; results below the smallest normal number
# flush to 0, results above ~e^88 (float32) are inf.
_exp_term_f32 = _make_exp(np.float32, _F32["c_term"], _F32["lo_term"], _F32["hi_term"],
                          _scale_by_pow2_normal)
_exp_term_f64 = _make_exp(np.float64, _F64["c_term"], _F64["lo_term"], _F64["hi_term"],
                          _scale_by_pow2_normal)


def _make_tanh(dtype, c, lo, hi):
    """A vectorizable tanh: ``tanh|x| = -t / (t + 2)`` with ``t = expm1(-2|x|)`` in (-1, 0].

    expm1 comes from the exp's own reduction without the cancelling ``e^x - 1``:
    ``e^x - 1 = 2^n r q(r) + (2^n - 1)``, both parts exact or small (for n = 0 the result is
    ``r q(r)`` itself), so tanh keeps full relative precision near 0 where ``1 - e^-2x`` would
    not.  Only the exp's arguments <= 0 occur, so ``2^n - 1`` never rounds.
    """
    K = _F32 if dtype is np.float32 else _F64
    ln2_hi, ln2_lo = K["ln2_hi"], K["ln2_lo"]
    log2e = dtype(_LOG2E)
    one = dtype(1.0)
    two = dtype(2.0)
    zero = dtype(0.0)
    deg = len(c)

    @njit(fastmath={"contract"})
    def _tanh(x):
        a = abs(x)
        u = -two * a
        uc = lo if u < lo else u          # NaN fails the test and flows on
        n = np.rint(uc * log2e)
        r = (uc - n * ln2_hi) - n * ln2_lo
        q = c[deg - 1]
        for k in range(deg - 2, -1, -1):
            q = q * r + c[k]
        # One-step scaling: n >= the dtype's lowest normal exponent - 1 here, where 2^n
        # comes out as exactly 0 (then t = -1, as the true value rounds to).
        t = _scale_by_pow2_normal(r * q, n) + (_scale_by_pow2_normal(one, n) - one)
        th = zero - t / (t + two)       # (tanh(+0) = +0, not -t/(t + 2) = -0)
        return th if x >= 0 else -th

    return _tanh


# Clamped at lo_term (e^-88 and below: tanh of half of it is 1 in float32 either way).
_tanh_f32 = _make_tanh(np.float32, _F32["c"], _F32["lo_term"], _F32["hi"])
_tanh_f64 = _make_tanh(np.float64, _F64["c"], _F64["lo_term"], _F64["hi"])


def tanh(x):
    """Vectorizing ``tanh(x)`` in ``x``'s precision (no SVML: built on the exp's reduction,
    see :func:`_make_tanh`): odd, +-1 at +-inf, NaN for NaN; a few ulp.  Jitted code only."""
    raise NotImplementedError("fastce._cpu.primitives.tanh is for jitted code")


_by_dtype(tanh, _tanh_f32, _tanh_f64)


# ---------------------------------------------------------------------------------------------
# Logit soft-capping (Gemma 2): y = cap * tanh(x / cap).  ``cap`` is either None -- the
# kernels then compile to exactly the code they had without it (the helpers below are the
# identity at typing time, nothing is left in the loops) -- or the pair (cap, 1/cap) in the
# logits' dtype, so the loops multiply instead of divide.


def softcap(x, cap):
    """``cap[0] * tanh(x * cap[1])``, or ``x`` itself when ``cap`` is None.  Jitted code only."""
    raise NotImplementedError("fastce._cpu.primitives.softcap is for jitted code")


def softcap_grad(v, y, cap):
    """``v * dy/dx`` at the capped value ``y``: ``v * (1 - (y / cap)^2)`` written as
    ``(1 - u)(1 + u)``, or ``v`` itself when ``cap`` is None.  Jitted code only."""
    raise NotImplementedError("fastce._cpu.primitives.softcap_grad is for jitted code")


def _no_cap(cap):
    return cap is None or isinstance(cap, (types.NoneType, types.Omitted))


@overload(softcap, jit_options={"fastmath": FASTMATH, "error_model": "numpy"})
def _softcap_impl(x, cap):
    if _no_cap(cap):
        return lambda x, cap: x
    return lambda x, cap: cap[0] * tanh(x * cap[1])


@overload(softcap_grad, jit_options={"fastmath": FASTMATH, "error_model": "numpy"})
def _softcap_grad_impl(v, y, cap):
    if _no_cap(cap):
        return lambda v, y, cap: v
    one = np.float32(1)

    def impl(v, y, cap):
        u = y * cap[1]
        return v * ((one - u) * (one + u))
    return impl


def exp_term(x):
    """``e**x`` for the terms of a shifted sum or probabilities: three instructions cheaper
    than :func:`exp`.  Results below the smallest normal number flush to 0 (``-inf`` gives
    exactly 0); from ``x > 88.38`` (float32) / ``709.1`` (float64) the result is inf, a little
    early; NaN gives NaN.  Relative error <= 1.7e-7 (float32).  Jitted code only."""
    raise NotImplementedError("fastce._cpu.primitives.exp_term is for jitted code")


_by_dtype(exp_term, _exp_term_f32, _exp_term_f64)


def exp(x):
    """Vectorizing ``e**x`` in the precision of ``x`` (float32: <= 2 ulp, float64: <= 2.5 ulp).

    Exactly 0 for ``x <= -110`` (float32) / ``-760`` (float64) and for ``-inf``; inf for large
    ``x``; NaN for NaN.  Callable from jitted code only.
    """
    raise NotImplementedError("fastce._cpu.primitives.exp is for jitted code")


_by_dtype(exp, _exp_f32, _exp_f64)


@njit(fastmath=FASTMATH, error_model="numpy")
def safe_shift(m):
    """The value to subtract before exp: the max, or 0 when the max is +-inf.

    With ``m = -inf`` (every logit masked) ``x - m`` would be ``-inf - (-inf) = NaN``; shifting
    by 0 instead gives ``exp(-inf) = 0`` and a zero sum (flash-attn #1930).  NaN stays NaN.
    """
    # float32(0) unifies with m's own type, so float32 stays float32.
    return m if (m != np.inf and m != -np.inf) else np.float32(0)


@njit(fastmath=FASTMATH, error_model="numpy")
def shift_log_sum(m, s):
    """Split log-sum-exp into ``(a, L)`` with ``lse = a + L``, from a (shift, sum) pair.

    ``a`` is the shift, ``L = log(s)``; for an all-``-inf`` row ``(-inf, 0)``; for a row
    holding ``+inf``, ``(+inf, 0)``, or NaN in ``L`` if a NaN reached the sum before the
    ``+inf``.  Callers compute ``lse - x`` with :func:`lse_minus` as ``(a - x) + L``, never as
    ``(a + L) - x``: with logits of 1e300 (or 1e8 in float32) ``a + L`` rounds ``L`` away and
    the loss would come out 0 instead of log(C).
    """
    # Branch-free, so that the K-dim kernels' loop over positions vectorizes: log_normal is
    # valid here because a finite shift is the max of some value, whose term is exp(0) = 1,
    # so s >= 1; its result is discarded otherwise.
    L = log_normal(s)
    # For a -inf or +inf shift: L = 0 (float32 unifies with s's own type), or NaN if a NaN
    # reached the sum before the +inf (a +inf row's sum may itself be inf: no NaN).
    special = s if s != s else np.float32(0)
    return m, (special if (m == -np.inf or m == np.inf) else L)


@njit(fastmath={"contract"}, error_model="numpy")
def lse_minus(a, L, x):
    """``lse - x`` as ``(a - x) + L`` for ``lse = a + L`` (see :func:`shift_log_sum`).

    Compiled without "reassoc" (LLVM keeps flags per instruction, also once inlined), so the
    kernels' fast-math cannot regroup it into ``(a + L) - x``, which loses ``L`` for large
    logits.
    """
    return (a - x) + L


@njit(fastmath=FASTMATH, error_model="numpy")
def lse_from_max_sumexp(m, s):
    """log-sum-exp from a (shift, sum of exp(x - safe_shift(shift))) pair.

    ``-inf`` for an all-``-inf`` row; ``+inf`` when the row holds ``+inf`` and no NaN; NaN
    when it holds a NaN (carried by the shift or by the sum).
    """
    a, L = shift_log_sum(m, s)
    return a + L


@njit(fastmath=FASTMATH, error_model="numpy")
def merge_max_sumexp(m1, s1, m2, s2):
    """Merge two (shift, sum-exp) partials of disjoint parts of a row into one.

    Never evaluates ``exp(-inf - (-inf))``: each sum is rescaled from its own safe shift to the
    merged one, and a partial whose shift is ``-inf`` contributes its (zero) sum unscaled.
    """
    m = nan_max(m1, m2)
    sh = safe_shift(m)
    a = s1 * exp(safe_shift(m1) - sh) if m1 != -np.inf else s1
    b = s2 * exp(safe_shift(m2) - sh) if m2 != -np.inf else s2
    return m, a + b


# A block's exp-sum against a stale shift is kept while it stays below this: every term is
# then <= e^62 (float32), and the row's sum cannot overflow for rows of up to ~1e9 classes.
_BLOCK_SUM_LIMIT_F32 = np.float32(2.0 ** 90)
_BLOCK_SUM_LIMIT_F64 = np.float64(2.0 ** 700)

# Loops below run over 0-based slices: an index that numba can prove non-negative needs no
# wrap-around select, and only then does LLVM emit plain vector loads instead of gathers.


@njit(fastmath=FASTMATH, error_model="numpy")
def _block_max(blk, cap):
    wide_vectors()
    bm = blk.dtype.type(-np.inf)
    for i in range(blk.shape[0]):
        bm = nan_max(bm, softcap(blk[i], cap))
    return bm


@njit(fastmath=FASTMATH, error_model="numpy")
def _block_sumexp(blk, sh, cap):
    wide_vectors()
    acc = blk.dtype.type(0)
    for i in range(blk.shape[0]):
        acc += exp_term(softcap(blk[i], cap) - sh)
    return acc


@njit(fastmath=FASTMATH, error_model="numpy")
def row_max(row):
    """The NaN-propagating max of the contiguous 1-D ``row`` (vectorized)."""
    return _block_max(row, None)


@njit(fastmath=FASTMATH, error_model="numpy")
def row_exact_max_sumexp(row, cap=None):
    """:func:`row_max_sumexp` with the shift at the row's exact max: one max pass, then the
    exp-sum block by block against it (the second read comes from cache for a row that fits
    in L2).  :func:`row_max_sumexp` takes it for short rows; log_softmax wants it for every
    row: with a shift below the max, the second-pass test (:func:`confident`) widens by the
    gap, and wide random rows would take the precise pass for nothing."""
    wide_vectors()
    n = row.shape[0]
    m = _block_max(row, cap)
    s = row.dtype.type(0)
    if m > -np.inf and m < np.inf:
        for b in range(0, n, CLASS_BLOCK):
            s += _block_sumexp(row[b:min(b + CLASS_BLOCK, n)], m, cap)
    return m, s


@njit(fastmath=FASTMATH, error_model="numpy")
def row_max_sumexp(row, cap=None):
    """(shift, sum-exp) of the contiguous 1-D ``row``, reading memory once:
    ``logsumexp(row) = shift + log(sum)``.

    The shift is a block max of the row: never above the row's max, and no value lies more
    than 62 (float32; 485 for float64) above it, so no term can overflow, and the row's
    largest terms never underflow.  It is +inf or NaN when the row holds one, and -inf when
    every value is -inf (the sum is then 0).

    The row is walked in blocks of ``CLASS_BLOCK``.  Once a finite shift is known, each block
    costs ONE cheap loop -- the exp-sum against the current shift, no max at all (the
    NaN-propagating max costs three instructions per vector, as much as a quarter of the
    loop).  A block whose sum overflows the limit (a value far above the shift, or +inf)
    is redone against its own max; NaN flows through the sum.

    With ``cap`` (see :func:`softcap`) the statistics are those of the soft-capped row.
    """
    wide_vectors()
    n = row.shape[0]
    if n <= SHORT_ROW:
        return row_exact_max_sumexp(row, cap)
    limit = _BLOCK_SUM_LIMIT_F32 if row.dtype.type is np.float32 else _BLOCK_SUM_LIMIT_F64
    sh = row.dtype.type(-np.inf)
    s = row.dtype.type(0)
    line = 64 // row.itemsize
    for b in range(0, n, CLASS_BLOCK):
        for p in range(b + CLASS_BLOCK, min(b + 2 * CLASS_BLOCK, n), line):
            prefetch(row, p)
        blk = row[b:min(b + CLASS_BLOCK, n)]
        finite = sh > -np.inf and sh < np.inf
        if finite:
            acc = _block_sumexp(blk, sh, cap)
            if not (acc > limit):
                s += acc
                continue
        # No finite shift yet, or this block overflows it: move the shift to the block max.
        nsh = nan_max(sh, _block_max(blk, cap))
        if nsh > -np.inf and nsh < np.inf:
            if finite:
                s = s * exp(sh - nsh)
            s += _block_sumexp(blk, nsh, cap)
        sh = nsh
    return sh, s


@njit(fastmath=FASTMATH, error_model="numpy")
def inv_sum(m, s):
    """1/s for turning exp(x - shift) into probabilities; NaN when the shift is not finite,
    so that rows with a +inf or only -inf logits give NaN probabilities, as torch does (a
    NaN logit makes the sum NaN already)."""
    # float32 constants unify with s's own type: float32 stays float32.
    if m > -np.inf and m < np.inf:
        return np.float32(1) / s
    return np.float32(np.nan)


# ---------------------------------------------------------------------------------------------
# Confident rows: full relative precision where lse - x is small.
#
# When the pivot x_p (the target logit, or the row max) holds the row's maximum,
# lse - x_p = log1p(rest) with rest = sum_{j != p} exp(x_j - x_p).  From the one-pass
# statistics it comes out as (shift - x_p) + log(sum), which has lost rest's low bits
# (log(1 + rest) rounds 1 + rest) and, with a shift below x_p, cancels.  Rows whose computed
# value could be off by more than a few ulp take a second pass over the row (:func:`rest_sum`):
# every difference x_j - x_p exact (float32 rows in float64; float64 rows with TwoSum), the sum
# compensated, then log1p.  Random rows never qualify; the test costs a few scalar operations.

# The second pass runs when v = lse - x_p (as computed) < _CONF_BASE + _CONF_SLOPE * (x_p - shift)
# and x_p >= shift.  From the one-pass error (about 3 eps * log(sum) + the sum's relative
# error + eps/2 * (x_p - shift), divided by v), every row outside keeps its relative error
# within ~6 eps; tests/test_confident.py checks rows on both sides of the line.
_CONF_BASE = np.float32(1.5)
_CONF_SLOPE = np.float32(1.5)


@njit(fastmath=FASTMATH, error_model="numpy")
def confident(gap, v):
    """Whether ``v = lse - x_p``, computed from the one-pass statistics with ``gap = x_p -
    shift``, needs the second pass.  False for NaN or infinite inputs."""
    return gap >= 0 and v < _CONF_BASE + _CONF_SLOPE * gap


@njit(fastmath=FASTMATH, error_model="numpy")
def lse_needs_rest(lse, L):
    """Whether ``lse = shift + L`` may have lost relative precision (a result near 0, e.g.
    logsumexp([0, -40])): then :func:`lse_confident` recomputes it.  False for NaN/inf."""
    return abs(lse) < np.float32(0.6) * (L + np.float32(1))


def exp_diff(x, pivot):
    """``exp(x - pivot)`` in float64 from the exact difference: float32 ``x`` is widened (the
    difference of two float32 values is exact in float64); for float64 ``x`` the rounding
    error ``e`` of ``x - pivot`` is recovered with TwoSum and applied as ``exp(d) (1 + e)``.
    ``pivot`` is float64.  Vectorizes.  Jitted code only."""
    raise NotImplementedError("fastce._cpu.primitives.exp_diff is for jitted code")


_EXP_DIFF_LO_F32 = np.float32(-150.0)
_EXP_DIFF_C_F32 = _F32["c"]
_LN2_HI_F32, _LN2_LO_F32 = _F32["ln2_hi"], _F32["ln2_lo"]


@njit(fastmath={"contract"}, error_model="numpy")
def _exp_diff_parts_f32(x, pivot):
    """``(p, n)``, float32, with ``exp(x - pivot) = p * 2**n`` for float32 ``x`` and
    ``pivot``: the difference's rounding error (TwoSum) applied as ``exp(d) (1 + e)``, the
    reduction and polynomial in float32 (16 lanes a vector), p in ~[0.7, 1.42], <= 1.5 ulp;
    n >= -217.  Below a difference of -150, and for -inf or NaN, p = 0 (a term under e^-150
    is below the float32 precision of any sum that holds a normal number)."""
    d, e = two_diff(x, pivot)
    lo = _EXP_DIFF_LO_F32
    c = _EXP_DIFF_C_F32
    dc = lo if d < lo else d
    n = np.rint(dc * np.float32(_LOG2E))
    r = (dc - n * _LN2_HI_F32) - n * _LN2_LO_F32
    q = c[5]
    q = q * r + c[4]
    q = q * r + c[3]
    q = q * r + c[2]
    q = q * r + c[1]
    q = q * r + c[0]
    p = np.float32(1) + r * q
    p = p + p * e
    return (p if d >= lo else np.float32(0)), n


@njit(fastmath={"contract"}, error_model="numpy")
def _exp_diff_f32(x, pivot):
    return _exp_f64(np.float64(x) - pivot)


# rest_term's float32 terms carry a factor 2**REST_TERM_BIAS: every term of the -150 range
# stays a normal float32 number (terms <= 2**100), and a sum of up to 2**27 of them cannot
# overflow.
REST_TERM_BIAS = 100


@njit(fastmath={"contract"}, error_model="numpy")
def _rest_term_f32(x, pivot):
    p, n = _exp_diff_parts_f32(x, pivot)
    return _scale_by_pow2_normal(p, n + np.float32(REST_TERM_BIAS))


@njit(fastmath={"contract"}, error_model="numpy")
def _rest_term_f64(x, pivot):
    return _exp_diff_f64(x, pivot)


def rest_term(x, pivot):
    """A term ``exp(x - pivot)`` of a rest sum (``pivot`` the row's max, ``x <= pivot``, both
    of one dtype) in that dtype, from the exact difference: float64 as :func:`exp_diff`;
    float32 (:func:`_exp_diff_parts_f32`) scaled by ``2**REST_TERM_BIAS`` (undo it on the
    float64 sum), <= 1.5 ulp, at 16 lanes a vector where :func:`exp_diff`'s float64 runs at
    8.  Jitted code only."""
    raise NotImplementedError("fastce._cpu.primitives.rest_term is for jitted code")


@njit(fastmath={"contract"}, error_model="numpy")
def _exp_diff_f64(x, pivot):
    d, e = two_diff(x, pivot)
    v = _exp_f64(d)
    # (a -inf logit: e is NaN, and its term must stay 0)
    return v + v * e if v != 0 else v


def _by_dtype_pair(stub, impl_f32, impl_f64):
    """:func:`_by_dtype` for a stub of two arguments of one dtype, ``(x, pivot)``."""
    @overload(stub, jit_options={"fastmath": {"contract"}, "error_model": "numpy"})
    def _impl(x, pivot):
        if x == types.float32 and pivot == types.float32:
            return impl_f32.py_func
        if x == types.float64 and pivot == types.float64:
            return impl_f64.py_func
        return None
    return _impl


_by_dtype_pair(rest_term, _rest_term_f32, _rest_term_f64)


@overload(exp_diff, jit_options={"fastmath": {"contract"}, "error_model": "numpy"})
def _exp_diff_impl(x, pivot):
    if x == types.float32:
        return lambda x, pivot: _exp_diff_f32(x, pivot)
    if x == types.float64:
        return lambda x, pivot: _exp_diff_f64(x, pivot)
    return None


# Block length of the second pass: short enough that the vectorized block sum (a few terms
# per lane) stays within ~1 eps; the block sums are added with TwoSum.
_REST_BLOCK = 256


@njit(fastmath=FASTMATH, error_model="numpy")
def _block_rest(blk, pivot, cap):
    wide_vectors()
    acc = np.float64(0)
    for j in range(blk.shape[0]):
        acc += exp_diff(softcap(blk[j], cap), pivot)
    return acc


@njit(fastmath=FASTMATH, error_model="numpy")
def rest_sum(row, skip, pivot, cap=None):
    """``sum_{j != skip} exp(row[j] - pivot)`` in float64, each difference exact
    (:func:`exp_diff`), compensated across blocks: relative error ~2 eps (float64).
    ``row`` may be strided (the K-dim layouts pass a column); with ``cap`` the row is
    soft-capped first (``pivot`` is then a capped value)."""
    p = np.float64(pivot)
    n = row.shape[0]
    if n <= SHORT_ROW:
        # One loop, the skipped entry's term selected away: two slices' loop set-up and
        # scalar remainders cost more than a short row's arithmetic.
        wide_vectors()
        acc = np.float64(0)
        for j in range(n):
            term = exp_diff(softcap(row[j], cap), p)
            acc += term if j != skip else np.float64(0)
        return acc
    hi = np.float64(0)
    lo = np.float64(0)
    for b in range(0, n, _REST_BLOCK):
        e = min(b + _REST_BLOCK, n)
        if b <= skip < e:
            acc = _block_rest(row[b:skip], p, cap) + _block_rest(row[skip + 1:e], p, cap)
        else:
            acc = _block_rest(row[b:e], p, cap)
        hi, err = two_sum(hi, acc)
        lo += err
    return hi + lo


@njit(fastmath={"contract"}, error_model="numpy")
def rest_total(hi, lo, itemsize, ties):
    """The rest from its compensated sum ``hi + lo`` of :func:`rest_term` terms (data of
    ``itemsize`` bytes: float32 terms carry ``2**REST_TERM_BIAS``) and the count of entries
    equal to the max: ``(hi + lo) * unbias + (ties - 1)`` in this order, compiled without
    "reassoc", which would regroup it as ``(... + ties) - 1`` and lose the rest's low bits
    against 1."""
    unbias = np.float64(2.0 ** -REST_TERM_BIAS) if itemsize == 4 else np.float64(1)
    return (hi + lo) * unbias + (ties - np.float64(1))


@njit(fastmath=FASTMATH, error_model="numpy")
def _block_rest_below(blk, m):
    """(sum of the :func:`rest_term` terms of the entries below ``m``, count of the entries
    equal to ``m``), both returned as float64, both accumulated in the data's dtype: one
    loop at the dtype's full vector width (a float64 accumulator made LLVM run float32 terms
    at 8 lanes, docs/performance.md "Session 6").  The float32 sum of a block of at most
    ``_REST_BLOCK`` terms, vectorized (16 lanes x 4 partial sums of ~4 terms, then a
    6-level tree), has a relative error of at most ~9 u/2 (non-negative terms); the count
    is exact."""
    wide_vectors()
    zero = blk.dtype.type(0)
    one = blk.dtype.type(1)
    acc = zero
    ties = zero
    for j in range(blk.shape[0]):
        v = blk[j]
        acc += rest_term(v, m) if v < m else zero
        ties += one if v == m else zero
    return np.float64(acc), np.float64(ties)


@njit(fastmath=FASTMATH, error_model="numpy")
def row_rest(row, m):
    """``rest = sum exp(row[c] - m)`` over the entries below the row's finite max ``m``,
    plus one for each further entry equal to it, in float64 to full relative precision
    (``tiles.tile_max_rest``'s terms: each difference exact; each block of ``_REST_BLOCK``
    summed in the data's dtype, :func:`_block_rest_below`, the block sums compensated), so
    that ``lse = m + log1p(rest)``: one pass, no search for the max's position."""
    n = row.shape[0]
    hi = np.float64(0)
    lo = np.float64(0)
    ties = np.float64(0)
    for b in range(0, n, _REST_BLOCK):
        acc, t = _block_rest_below(row[b:min(b + _REST_BLOCK, n)], m)
        hi, err = two_sum(hi, acc)
        lo += err
        ties += t
    return rest_total(hi, lo, row.itemsize, ties)


@njit(fastmath=FASTMATH, error_model="numpy")
def row_argmax(row):
    """(max, index of its first occurrence) of a row with no NaN (-1 if every value is NaN
    or the row is empty)."""
    wide_vectors()
    m = row.dtype.type(-np.inf)
    for j in range(row.shape[0]):
        m = nan_max(m, row[j])
    for j in range(row.shape[0]):
        if row[j] == m:
            return m, j
    return m, -1


@njit(fastmath=FASTMATH, error_model="numpy")
def lse_confident(row):
    """logsumexp of a finite-max row as ``max + log1p(rest)`` (float64), the max's own term
    carried apart: full relative precision unless ``max < 0`` cancels ``log1p(rest)``."""
    M, k = row_argmax(row)
    return np.float64(M) + log1p(rest_sum(row, k, M))


@njit(fastmath={"contract"}, error_model="numpy")
def _exp_diff_native_f32(x, pivot):
    p, n = _exp_diff_parts_f32(x, pivot)
    return _scale_by_pow2(p, n)


def exp_diff_native(x, pivot):
    """``exp(x - pivot)`` for finite ``x <= pivot`` of one dtype, in that dtype, from the
    exact difference: float32 as :func:`_exp_diff_parts_f32` (16 lanes a vector where
    :func:`exp_diff`'s float64 runs 8), scaled down into the subnormal range and to 0 below
    a difference of -150; float64 as :func:`exp_diff`.  <= 2.5 ulp for normal results.
    Jitted code only."""
    raise NotImplementedError("fastce._cpu.primitives.exp_diff_native is for jitted code")


_by_dtype_pair(exp_diff_native, _exp_diff_native_f32, _exp_diff_f64)


# Inlined into the caller's numba IR (a called function of this size is not inlined by LLVM, and
# the loop over rows then stays scalar): the caller's fast-math flags apply, and a caller with
# ``reassoc`` would cancel ``M - x`` against ``L`` -- the callers compile with "contract" only.
@njit(inline="always", fastmath={"contract"}, error_model="numpy")
def pair_lse_parts(a, b):
    """The logsumexp of two finite logits in parts, float64: ``(M, L)`` with ``M`` the larger
    and ``L = log1p(exp(min - M))`` from the exact difference (:func:`exp_diff`), so that
    ``lse = M + L`` and ``lse - x = (M - x) + L`` -- the latter to full relative precision
    when ``x`` is the max (a confident two-class row; no second pass).  Vectorizes."""
    M = np.float64(a if a >= b else b)
    return M, log1p(exp_diff(b if a >= b else a, M))


@njit(inline="always", fastmath={"contract"}, error_model="numpy")
def pair_parts(a, b):
    """:func:`pair_lse_parts` in the logits' own dtype, for two finite logits: ``(M, e, L)``
    with ``M`` the larger, ``e = exp(min - M)`` from the exact difference
    (:func:`exp_diff_native`) and ``L = log1p(e)``.  ``lse - x = (M - x) + L`` keeps full
    relative precision for ``x = M`` (within a few ulp: the rounding of ``e`` and of the
    log1p), and the two probabilities are ``1 / (1 + e)`` (of the larger) and ``e / (1 +
    e)``, neither cancelling.  float32 runs at 16 lanes a vector.  Same inlining and flags
    as :func:`pair_lse_parts`."""
    M = a if a >= b else b
    e = exp_diff_native(b if a >= b else a, M)
    return M, e, log1p(e)


@njit(inline="always", fastmath={"contract"}, error_model="numpy")
def pair_lse_minus(a, b, x):
    """``logsumexp(a, b) - x`` in float64 for ``x`` one of the two finite logits (the
    two-class loss): ``(M - x) + L`` of :func:`pair_lse_parts`, in this order (callers
    without ``reassoc``, see above)."""
    M, L = pair_lse_parts(a, b)
    return (M - np.float64(x)) + L


@njit(fastmath=FASTMATH, error_model="numpy")
def spatial_rest_sum(x, n, s0, s1, pivot, skip, rest, cap=None):
    """:func:`rest_sum` for the positions ``s0:s1`` of sample ``n`` of the (N, C, S) ``x`` at
    once, vectorized across positions: ``rest[j] = sum_{c != skip[j]} exp(x[n, c, s0 + j] -
    pivot[j])`` (float64 ``pivot`` and ``rest``; TwoSum-compensated over the classes)."""
    wide_vectors()
    B = s1 - s0
    lo = np.zeros(B, dtype=np.float64)
    for j in range(B):
        rest[j] = 0
    for c in range(x.shape[1]):
        xc = x[n, c, s0:s1]
        for j in range(B):
            v = exp_diff(softcap(xc[j], cap), pivot[j])
            v = v if c != skip[j] else np.float64(0)
            rest[j], err = two_sum(rest[j], v)
            lo[j] += err
    for j in range(B):
        rest[j] += lo[j]


def kernel_twins(py_func):
    """Compile one kernel body twice: ``parallel=True`` (its ``prange`` runs on the thread
    pool) and serial (``prange`` acts as ``range``; no thread-pool wake-up for small inputs).

    The serial twin is a copy of the function under another qualified name: numba's on-disk
    cache is keyed by qualified name and line, so two dispatchers of one function object would
    overwrite each other's cache entries.
    """
    serial = pytypes.FunctionType(py_func.__code__, py_func.__globals__,
                                  py_func.__name__ + "_serial", py_func.__defaults__,
                                  py_func.__closure__)
    serial.__qualname__ = py_func.__qualname__ + "_serial"
    serial.__doc__ = py_func.__doc__
    # error_model="numpy": a float division by zero gives inf/NaN instead of raising
    # ZeroDivisionError (and needs no branch in the hot loops).
    opts = dict(fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)
    return njit(parallel=True, **opts)(py_func), njit(**opts)(serial)
