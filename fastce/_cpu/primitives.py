"""Numeric primitives shared by every CPU kernel: a vectorizing exp, a NaN-propagating max, and
the ``-inf``-safe (max, sum-exp) algebra.

Why hand-written: numba has no SVML, so ``np.exp`` in a loop is split back into scalar ``expf``
calls and dominates the runtime; and ``max``/``if v > m`` never vectorize (numba #5067).  The
functions here compile to straight-line LLVM IR that the loop vectorizer turns into AVX-512.

A row's log-sum-exp is kept as the pair ``(m, s)`` = (max, sum of exp(x - m)).  Pairs from
different blocks, chunks or shards merge exactly (:func:`merge_max_sumexp`), which is what the
split-row kernels use today and what vocabulary sharding will use tomorrow.
"""
import math
import types as pytypes

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .._config import CLASS_BLOCK, FASTMATH

__all__ = ["kernel_twins", "nan_max", "exp", "safe_shift", "lse_from_max_sumexp", "merge_max_sumexp", "row_max_sumexp"]


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


@intrinsic
def _scale_by_pow2(typingctx, p, n):
    """``p * 2**n`` for an integral-valued float ``n``, with the power built directly in the
    exponent bits (integer add + shift + bitcast: vectorizes, unlike ``ldexp``).

    ``2**n`` is applied as ``2**(n//2) * 2**(n - n//2)`` so that both factors stay normal
    numbers over the whole range the callers clamp ``n`` to; the product then underflows to
    denormals and exactly 0, or overflows to inf, the way the true exp does.
    """
    if not (isinstance(p, types.Float) and p == n):
        return None

    def codegen(context, builder, sig, args):
        pv, nv = args
        width = p.bitwidth
        ity = ir.IntType(width)
        mant = 23 if width == 32 else 52
        bias = 127 if width == 32 else 1023
        ni = builder.fptosi(nv, ity)
        n1 = builder.ashr(ni, ity(1))
        n2 = builder.sub(ni, n1)
        out = pv
        for part in (n1, n2):
            bits = builder.shl(builder.add(part, ity(bias)), ity(mant))
            out = builder.fmul(out, builder.bitcast(bits, pv.type), flags=("contract",))
        return out

    return p(p, n), codegen


# Cody-Waite reduction: x = n*ln2 + r with |r| <= ln2/2; ln2 split so n*LN2_HI is exact.
_LOG2E = 1.4426950408889634
_F32 = dict(
    ln2_hi=np.float32(0.693359375),
    ln2_lo=np.float32(-2.12194440e-4),
    lo=np.float32(-110.0),   # exp(x) rounds to exactly 0 below this
    hi=np.float32(89.0),     # ... and to inf above this
    # Relative-error-weighted least-squares fit of (e^r - 1)/r, degree 5: max rel. error of the
    # polynomial 2.2e-9 on [-ln2/2, ln2/2], far below float32's 6e-8 rounding.
    c=tuple(np.float32(v) for v in (
        1.0000000360921264, 0.4999999535099431, 0.16666420945132046,
        0.0416677243209173, 0.008374763974941822, 0.0013859291077513098)),
)
_F64 = dict(
    ln2_hi=np.float64(6.93147180369123816490e-01),
    ln2_lo=np.float64(1.90821492927058770002e-10),
    lo=np.float64(-760.0),
    hi=np.float64(710.0),
    # Taylor coefficients 1/(k+1)! for (e^r - 1)/r up to r^11: truncation error 1.7e-16.
    c=tuple(np.float64(1.0 / math.factorial(k + 1)) for k in range(12)),
)


def _make_exp(K, dtype):
    ln2_hi, ln2_lo, lo, hi = K["ln2_hi"], K["ln2_lo"], K["lo"], K["hi"]
    c = K["c"]
    log2e = dtype(_LOG2E)
    one = dtype(1.0)
    deg = len(c)

    # Compiled with "contract" only and NOT inlined at the numba-IR level (LLVM still inlines
    # it): inlined IR would inherit the caller's "reassoc", which lets LLVM fold the Cody-Waite
    # split (x - n*hi) - n*lo back into x - n*(hi + lo) and lose ~7 bits in float64.
    @njit(fastmath={"contract"})
    def _exp(x):
        # Clamp so n stays in range; NaN passes the comparisons untouched and flows into r.
        xc = lo if x < lo else (hi if x > hi else x)
        n = np.rint(xc * log2e)
        r = (xc - n * ln2_hi) - n * ln2_lo
        q = c[deg - 1]
        for k in range(deg - 2, -1, -1):
            q = q * r + c[k]
        return _scale_by_pow2(one + r * q, n)

    return _exp


_exp_f32 = _make_exp(_F32, np.float32)
_exp_f64 = _make_exp(_F64, np.float64)


def exp(x):
    """Vectorizing ``e**x`` in the precision of ``x`` (float32: <= 2 ulp, float64: <= 2 ulp).

    Exactly 0 for ``x <= -110`` (float32) / ``-760`` (float64) and for ``-inf``; inf for large
    ``x``; NaN for NaN.  Callable from jitted code only.
    """
    raise NotImplementedError("fastce._cpu.primitives.exp is for jitted code")


@overload(exp, jit_options={"fastmath": {"contract"}})
def _exp_overload(x):
    if x == types.float32:
        return lambda x: _exp_f32(x)
    if x == types.float64:
        return lambda x: _exp_f64(x)
    return None


@njit(fastmath=FASTMATH)
def safe_shift(m):
    """The value to subtract before exp: the max, or 0 when the max is +-inf.

    With ``m = -inf`` (every logit masked) ``x - m`` would be ``-inf - (-inf) = NaN``; shifting
    by 0 instead gives ``exp(-inf) = 0`` and a zero sum (flash-attn #1930).  NaN stays NaN.
    """
    # float32(0) unifies with m's own type, so float32 stays float32.
    return m if (m != np.inf and m != -np.inf) else np.float32(0)


@njit(fastmath=FASTMATH)
def lse_from_max_sumexp(m, s):
    """log-sum-exp from the pair (max, sum of exp(x - safe_shift(max))).

    ``-inf`` for an all-``-inf`` row, ``+inf`` when the max is ``+inf`` (the sum is NaN then,
    from ``inf - inf``), NaN when any logit is NaN (the max propagates it).
    """
    if m == np.inf or m == -np.inf:
        return m
    return m + np.log(s)


@njit(fastmath=FASTMATH)
def merge_max_sumexp(m1, s1, m2, s2):
    """Merge two (max, sum-exp) partials of disjoint parts of a row into one.

    Never evaluates ``exp(-inf - (-inf))``: each sum is rescaled from its own safe shift to the
    merged one, and a partial whose max is ``-inf`` contributes its (zero) sum unscaled.
    """
    m = nan_max(m1, m2)
    sh = safe_shift(m)
    a = s1 * exp(safe_shift(m1) - sh) if m1 != -np.inf else s1
    b = s2 * exp(safe_shift(m2) - sh) if m2 != -np.inf else s2
    return m, a + b


@njit(fastmath=FASTMATH)
def row_max_sumexp(row, lo, hi):
    """(max, sum-exp) of the contiguous ``row[lo:hi]`` in one pass over memory.

    The row is walked in blocks of ``CLASS_BLOCK``: the block max first (vectorized through
    :func:`nan_max`), then the block's exp-sum against the running max while the block is still
    in L1.  When the max grows, the running sum is rescaled once per block, not per element.
    """
    m = row.dtype.type(-np.inf)
    s = row.dtype.type(0)
    for b in range(lo, hi, CLASS_BLOCK):
        e = min(b + CLASS_BLOCK, hi)
        bm = row.dtype.type(-np.inf)
        for i in range(b, e):
            bm = nan_max(bm, row[i])
        mn = nan_max(m, bm)
        if mn != m:
            # Rescale the old sum to the new shift; when the old max was -inf the sum is 0.
            if m != -np.inf:
                s = s * exp(safe_shift(m) - safe_shift(mn))
            m = mn
        sh = safe_shift(m)
        acc = row.dtype.type(0)
        for i in range(b, e):
            acc += exp(row[i] - sh)
        s += acc
    return m, s


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
    opts = dict(fastmath=FASTMATH, cache=True, nogil=True)
    return njit(parallel=True, **opts)(py_func), njit(**opts)(serial)
