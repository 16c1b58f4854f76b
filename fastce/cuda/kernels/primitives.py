"""Device functions shared by every CUDA kernel: the ``-inf``-safe (max, sum-exp) algebra of
``fastce._cpu.primitives`` and the group reductions built on one exchange primitive.

The names are the CPU's (``fastce._cpu.primitives``): ``safe_shift``, ``shift_log_sum``,
``lse_minus``, ``lse_from_max_sumexp``, ``merge_max_sumexp``, ``row_max_sumexp``, ``inv_sum``.

Everything is built per compute dtype by :func:`build_primitives` so that every constant is a
value of that dtype: a float32 kernel never meets a float64 literal (numba #888), which the PTX
test checks by grepping for ``.f64``.

Reductions run over a *group* of ``G`` consecutive threads of a 1-D block, where ``G`` is 1, a
power of two up to 32 (sub-warp or warp), or the whole block (a multiple of 32): first within
each warp, then across the warps of a block through shared memory.  The warp-level all-reduce
has two twins, and they are the only difference between the kernels that run on a GPU and the
ones the simulator runs:

* a butterfly of ``shfl_xor_sync`` (real GPUs);
* a shared-memory fold (for ``NUMBA_ENABLE_CUDASIM=1``, which has no warp shuffles,
  numba #8433).

Both twins need every thread of the block to reach every reduction (the shuffle uses a full
mask, the shared twin ``syncthreads``), so kernels keep their control flow uniform up to their
last reduction and mask work with a ``valid`` flag instead of returning early.
"""
import math
from types import SimpleNamespace

import numpy as np
from numba import config, cuda, from_dtype

from ... import _config
from .memory import addr3, load_at, max_nan_f32, steps4

__all__ = ["build_primitives", "use_shuffle", "SHARED_MAX_THREADS"]

# The shared-memory twin keeps one slot per thread; blocks may not be larger than this.
SHARED_MAX_THREADS = 1024
_FULL_MASK = 0xFFFFFFFF


def use_shuffle():
    """Whether kernels built now use warp shuffles: always, except under the simulator."""
    return not config.ENABLE_CUDASIM


def _math_functions(ftype):
    """exp, log and log1p as device functions.

    On a GPU these are libdevice's ``__nv_expf`` etc. for float32 (numba types ``math.exp`` of
    a float32 as float32).  The simulator runs Python's ``math``, which raises on ``log(0)``
    and on overflow where the GPU returns -inf / inf; NumPy's ufuncs on the dtype's scalars
    behave like the GPU, so the simulator uses those.
    """
    if config.ENABLE_CUDASIM:
        def _quiet(f):
            def g(v):
                with np.errstate(all="ignore"):
                    return f(ftype(v))
            return cuda.jit(device=True)(g)
        return _quiet(np.exp), _quiet(np.log), _quiet(np.log1p), _quiet(np.tanh)

    @cuda.jit(device=True)
    def exp(v):
        return math.exp(v)

    @cuda.jit(device=True)
    def tanh(v):
        return math.tanh(v)

    @cuda.jit(device=True)
    def log(v):
        return math.log(v)

    @cuda.jit(device=True)
    def log1p(v):
        return math.log1p(v)

    return exp, log, log1p, tanh


def _exp_shifted_f32():
    """``(exp_shifted, exp_shifted_err)`` for float32: ``exp(d)`` and ``exp(d + e)`` (``e`` a
    tiny exact remainder of ``d``) for the hot loops' shifted arguments ``d = x - shift <= 0``,
    in six (seven) instructions where libdevice's ``expf`` takes eight.

    ``h = fl(d log2 e)`` goes to the hardware's ``ex2.approx.ftz`` (``t = 2^h``, within 2 ulp,
    CUDA's ``exp2f``); the rounding of ``h`` is put back by ``r = d - h ln 2`` (two FMAs with
    ln 2 split in hi/lo, exact to far below an ulp of ``r``) and one more FMA,
    ``exp(d) = t (1 + r)`` (``|r| < 2^-17`` for ``|d| < 104``, so ``r^2/2`` is below the
    rounding; ``e`` joins ``r``).  Worst case about 2.5 ulp, libdevice's class (2 ulp).
    A ``max(., 0)`` last maps the NaN that ``d = -inf`` gives (``inf - inf`` in ``r``; and a
    NaN ``e`` from TwoSum) to 0 = exp(-inf); it maps a NaN ``d`` to 0 too: in the kernels a NaN
    logit is the row's max (NaN-propagating), so the shift, ``1/sum`` or the statistics carry
    the NaN, not the term.  Results below 2^-126 are flushed to 0 (``.ftz``; libdevice gives
    subnormals there): every such term sits beside the row max's term 1, and a probability that
    small is 0 to 1e-38.  ``d > 88`` overflows (the kernels only reach it when the row max is
    +inf, where the sum is ignored and the probabilities are NaN).

    The simulator (no PTX) runs the same steps in NumPy, the FMAs exact in float64 and
    ``ex2`` correctly rounded, so the simulator suite checks the algorithm's error budget."""
    L2E = np.float32(1.4426950408889634)
    NLN2_HI = np.float32(-0.6931471805599453)
    NLN2_LO = np.float32(-(0.6931471805599453 - float(np.float32(0.6931471805599453))))
    if config.ENABLE_CUDASIM:
        f32, f64, tiny = np.float32, np.float64, np.float32(2.0 ** -126)

        def _exp_err(d, e):
            with np.errstate(all="ignore"):
                d = f32(d)
                h = f32(d * L2E)
                r = f32(f64(h) * f64(NLN2_HI) + f64(d))  # an FMA: one rounding
                r = f32(f64(h) * f64(NLN2_LO) + f64(f32(r + f32(e))))
                t = f32(np.exp2(f64(h)))
                if abs(t) < tiny:
                    t = f32(0)
                res = f32(f64(t) * f64(r) + f64(t))
                return res if res > 0 else f32(0)  # max.f32: NaN -> 0

        @cuda.jit(device=True)
        def exp_shifted(d):
            return _exp_err(d, 0)

        @cuda.jit(device=True)
        def exp_shifted_err(d, e):
            return _exp_err(d, e)

        return exp_shifted, exp_shifted_err

    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic

    def _hex(v):
        return "0f%08X" % int(np.float32(v).view(np.uint32))

    head = (f"{{ .reg .f32 h, r, t; mul.rn.f32 h, $1, {_hex(L2E)}; "
            f"fma.rn.f32 r, h, {_hex(NLN2_HI)}, $1; ")
    tail = "ex2.approx.ftz.f32 t, h; fma.rn.f32 t, t, r, t; max.f32 $0, t, 0f00000000; }"
    f32t = ir.FloatType()

    @intrinsic
    def exp_shifted(typingctx, d):
        def codegen(context, builder, sig, args):
            asm = ir.InlineAsm(ir.FunctionType(f32t, [f32t]),
                               head + f"fma.rn.f32 r, h, {_hex(NLN2_LO)}, r; " + tail, "=f,f")
            return builder.call(asm, list(args))
        return types.float32(types.float32), codegen

    @intrinsic
    def exp_shifted_err(typingctx, d, e):
        def codegen(context, builder, sig, args):
            asm = ir.InlineAsm(ir.FunctionType(f32t, [f32t, f32t]),
                               head + "add.rn.f32 r, r, $2; "
                               f"fma.rn.f32 r, h, {_hex(NLN2_LO)}, r; " + tail, "=f,f,f")
            return builder.call(asm, list(args))
        return types.float32(types.float32, types.float32), codegen

    return exp_shifted, exp_shifted_err


def _softcap_functions(softcap, ftype, load_at):
    """``(xload, cap_value, cap_grad)``: the logits' load, a loaded logit, and a gradient
    element, with logit soft-capping ``y = softcap * tanh(x / softcap)`` built in, the cap a
    compile-time constant; with ``softcap`` None the plain load and identities, so the
    kernels compile to exactly the code they had without it."""
    if softcap is None:
        @cuda.jit(device=True)
        def cap_value(v):
            return v

        @cuda.jit(device=True)
        def cap_grad(g, y):
            return g

        return load_at, cap_value, cap_grad
    CAP, RCAP, ONE = ftype(softcap), ftype(1.0 / softcap), ftype(1)
    tanh = _math_functions(ftype)[3]

    @cuda.jit(device=True)
    def cap_value(v):
        return CAP * tanh(v * RCAP)

    @cuda.jit(device=True)
    def xload(a, p, n, c, s):
        return cap_value(load_at(a, p, n, c, s))

    @cuda.jit(device=True)
    def cap_grad(g, y):
        """``g * dy/dx`` at the capped value ``y``: ``g (1 - u)(1 + u)``, ``u = y / cap``."""
        u = y * RCAP
        return g * ((ONE - u) * (ONE + u))

    return xload, cap_value, cap_grad


def _warp_allreduce(combine, nbtype, shuffle):
    """``warp_allreduce(a, b, width)``: the pair (a, b) all-reduced with ``combine`` over
    aligned groups of ``width`` lanes (a power of two <= 32).  The two twins:

    * shuffle: a butterfly of ``shfl_xor_sync`` steps; each step combines the same two
      partials on both partner lanes (in swapped order; IEEE ``+`` and ``max`` commute), so
      every lane ends with the same bits;
    * shared memory (the simulator): every thread writes its pair, ``syncthreads``, and every
      lane folds its group's pairs in lane order -- two barriers instead of two per butterfly
      step, which is what makes the simulator affordable.
    """
    if shuffle:
        @cuda.jit(device=True)
        def warp_allreduce(a, b, width):
            off = width >> 1
            while off > 0:
                a2 = cuda.shfl_xor_sync(_FULL_MASK, a, off)
                b2 = cuda.shfl_xor_sync(_FULL_MASK, b, off)
                a, b = combine(a, b, a2, b2)
                off >>= 1
            return a, b
        return warp_allreduce

    @cuda.jit(device=True)
    def warp_allreduce(a, b, width):
        sa = cuda.shared.array(SHARED_MAX_THREADS, nbtype)
        sb = cuda.shared.array(SHARED_MAX_THREADS, nbtype)
        t = cuda.threadIdx.x
        sa[t] = a
        sb[t] = b
        cuda.syncthreads()
        base = t - (t & (width - 1))
        a = sa[base]
        b = sb[base]
        for j in range(base + 1, base + width):
            a, b = combine(a, b, sa[j], sb[j])
        cuda.syncthreads()  # nobody overwrites sa/sb before everyone has read them
        return a, b
    return warp_allreduce


def _group_allreduce(combine, ident_a, ident_b, nbtype, shuffle):
    """All-reduce of a pair of values over groups of ``G`` threads (1, a power of two <= 32,
    or the whole block) with an associative, commutative ``combine``; every thread of a group
    gets the same result."""
    warp_allreduce = _warp_allreduce(combine, nbtype, shuffle)

    @cuda.jit(device=True)
    def allreduce(a, b, G):
        if G == 1:
            return a, b
        a, b = warp_allreduce(a, b, min(G, 32))
        if G > 32:
            # G is the whole block: each warp publishes its result, every warp then reduces
            # the (at most 32) warp results itself, so no broadcast step is needed.
            sa = cuda.shared.array(32, nbtype)
            sb = cuda.shared.array(32, nbtype)
            t = cuda.threadIdx.x
            lane = t & 31
            if lane == 0:
                sa[t >> 5] = a
                sb[t >> 5] = b
            cuda.syncthreads()
            if lane < (G >> 5):
                a = sa[lane]
                b = sb[lane]
            else:
                a = ident_a
                b = ident_b
            cuda.syncthreads()  # sa/sb may be reused by the next reduction
            a, b = warp_allreduce(a, b, 32)
        return a, b

    return allreduce


def _row_kernel_jit(dtype):
    """``row_kernel_jit(float64_blocks)``: ``cuda.jit`` with launch bounds for the launched
    block size, so that ptxas holds a row kernel's registers to an occupancy target: float32
    four 256-thread blocks an SM (64 registers a thread, 50 %), float64 ``float64_blocks``
    (3: 80 registers, 37.5 %; None: unbounded, for the kernels that would spill there).
    Unbounded, ptxas takes up to 72 (float32) and 128 (float64) registers.  The simulator's
    jit takes no launch bounds."""
    def row_kernel_jit(float64_blocks):
        blocks = 1024 if np.dtype(dtype) == np.float32 else \
            (None if float64_blocks is None else 256 * float64_blocks)
        if config.ENABLE_CUDASIM or blocks is None:
            return cuda.jit
        tpb = int(_config.CUDA_THREADS_PER_BLOCK)
        return cuda.jit(launch_bounds=(tpb, max(1, blocks // tpb)))
    return row_kernel_jit


def build_primitives(dtype, shuffle=None, softcap=None):
    """Device functions for one compute dtype (and logit soft-cap).

    Parameters
    ----------
    dtype : numpy dtype
        float32 or float64.
    shuffle : bool, optional
        Warp shuffles (True) or the shared-memory twin (False).  Default: :func:`use_shuffle`.
    softcap : float, optional
        Every logit the row functions read is soft-capped, ``softcap * tanh(x / softcap)``
        (a compile-time constant: one build per cap value).

    Returns
    -------
    types.SimpleNamespace
        ``ftype`` (the NumPy scalar type), constants ``ZERO``, ``ONE``, ``INF``, ``NEG_INF``,
        ``NAN``, and device functions ``exp``, ``exp_shifted`` (the hot loops' exp of
        ``x - shift``, see :func:`_exp_shifted_f32`), ``exp_shifted_err``, ``log``, ``log1p``,
        ``nan_max``,
        ``safe_shift``, ``shift_log_sum``, ``lse_minus``, ``lse_from_max_sumexp``,
        ``inv_sum``, ``merge_max_sumexp``, ``rescaled``, ``push_block4``, ``push_block8``,
        ``allreduce_max_sumexp(m, s, G)``, ``allreduce_sum2(a, b, G)``, ``unit``,
        ``row_max_sumexp``; for confident rows (issue #13) ``confident``,
        ``lse_needs_rest``, ``two_sum``, ``rest_term``, ``allreduce_two_sum``, ``block_any``
        and ``rest_sum`` (the second pass); ``xload``, ``cap_value``, ``cap_grad`` (see
        :func:`_softcap_functions`); ``row_kernel_jit(float64_blocks)``, the row kernels'
        decorator (launch bounds, see :func:`_row_kernel_jit`).
    """
    if shuffle is None:
        shuffle = use_shuffle()
    dtype = np.dtype(dtype)
    ftype = dtype.type
    nbtype = from_dtype(dtype)
    ZERO, ONE = ftype(0), ftype(1)
    INF, NEG_INF, NAN = ftype(np.inf), ftype(-np.inf), ftype(np.nan)
    exp, log, log1p, _ = _math_functions(ftype)
    if dtype == np.float32:
        exp_shifted, exp_shifted_err = _exp_shifted_f32()
    else:  # float64: libdevice's exp (the float64 rest pass branches, see rest_term)
        exp_shifted = exp

        @cuda.jit(device=True)
        def exp_shifted_err(d, e):
            t = exp(d)
            return t + t * e
    xload, cap_value, cap_grad = _softcap_functions(softcap, ftype, load_at)

    if dtype == np.float32:
        nan_max = max_nan_f32
    else:
        @cuda.jit(device=True)
        def nan_max(a, b):
            """max(a, b) that propagates NaN (``max``/``fmax`` drop it)."""
            return a if (a > b or a != a) else b

    @cuda.jit(device=True)
    def safe_shift(m):
        """The value subtracted before exp: the max, or 0 when the max is +-inf (so an
        all-``-inf`` row never evaluates ``-inf - (-inf)``)."""
        return m if (m != INF and m != NEG_INF) else ZERO

    @cuda.jit(device=True)
    def shift_log_sum(m, s):
        """``(a, L)`` with ``lse = a + L`` from a (max, sum-exp) pair: ``(m, log(s))``, or
        ``L = 0`` when the max is +-inf (NaN if a NaN reached the sum).  Kernels evaluate
        ``lse - x`` with :func:`lse_minus` as ``(a - x) + L``, never as ``(a + L) - x``: with
        logits of 1e300 (1e8 in float32) ``a + L`` rounds ``L`` away and the loss would be 0
        instead of log(C)."""
        if m == INF or m == NEG_INF:
            return m, (s if s != s else ZERO)
        return m, log(s)

    @cuda.jit(device=True)
    def lse_minus(a, L, x):
        """``lse - x`` as ``(a - x) + L`` (see :func:`shift_log_sum`); NVVM does not
        reassociate floating point without fast-math, so the grouping stays."""
        return (a - x) + L

    @cuda.jit(device=True)
    def lse_from_max_sumexp(m, s):
        """log-sum-exp from (max, sum of exp(x - safe_shift(max))): -inf for an all-``-inf``
        row, +inf when the max is +inf, NaN when the max (or the sum) is NaN."""
        a, L = shift_log_sum(m, s)
        return a + L

    @cuda.jit(device=True)
    def inv_sum(m, s):
        """1/s, the factor turning exp(x - shift) into probabilities; NaN when the max is not
        finite, so that rows holding +inf or only -inf give NaN probabilities and gradients,
        as torch (and the CPU kernels) do."""
        if m > NEG_INF and m < INF:
            return ONE / s
        return NAN

    RESCALE_BRANCHLESS = dtype == np.float32

    @cuda.jit(device=True)
    def rescaled(s, mj, m):
        """A partial's sum ``s`` (relative to its max ``mj``) made relative to a merged max
        ``m >= mj``: the rule of :func:`merge_max_sumexp` for one partial of a many-way
        merge.  float32 without a branch: ``exp_shifted`` maps the ``-inf - (-inf)`` (and
        ``inf - inf``) NaN to 0, which scales an empty partial's 0 to 0, and for a +inf max
        the sums matter only for a NaN, which the max itself then carries."""
        if RESCALE_BRANCHLESS:
            return s * exp_shifted(mj - m)
        if mj != NEG_INF and mj != m:
            return s * exp(mj - m)
        return s

    @cuda.jit(device=True)
    def merge_max_sumexp(m1, s1, m2, s2):
        """Merge the (max, sum-exp) partials of two disjoint parts of a row, with one exp:
        the partial holding the larger max is already relative to the merged shift, the
        other one is rescaled by exp(its max - the merged max).  Never ``exp(-inf - (-inf))``
        or ``exp(inf - inf)``: a partial whose max is -inf keeps its (zero or NaN) sum
        unscaled, one whose max equals the merged max is not scaled.  (With a +inf max
        the sums matter only for carrying a NaN.)  Symmetric: ``merge(a, b)`` and
        ``merge(b, a)`` give the same bits (the butterfly relies on it)."""
        m = nan_max(m1, m2)
        if m1 >= m2:
            hs, lm, ls = s1, m2, s2
        else:
            hs, lm, ls = s2, m1, s1
        if lm != NEG_INF and lm != m:
            ls = ls * exp(lm - m)
        return m, hs + ls

    @cuda.jit(device=True)
    def rescale(m, sh, acc, bm):
        """Move a running (max, shift, sum-exp) to a block max ``bm`` above the running max
        (or NaN): the sum is rescaled to the new shift (one exp)."""
        mn = nan_max(m, bm)
        nsh = safe_shift(mn)
        if m != NEG_INF:
            acc = acc * exp(sh - nsh)
        return mn, nsh, acc

    @cuda.jit(device=True)
    def push_block4(m, sh, acc, v0, v1, v2, v3):
        """Add four elements to a running (max, shift, sum-exp): one exp per element, and a
        rescale of the sum only when the block's max exceeds the running one (or is NaN).
        ``sh`` is ``safe_shift(m)``, kept so that the common path does not recompute it."""
        bm = nan_max(nan_max(v0, v1), nan_max(v2, v3))
        if not (bm <= m):
            m, sh, acc = rescale(m, sh, acc, bm)
        return m, sh, acc + ((exp_shifted(v0 - sh) + exp_shifted(v1 - sh)) +
                             (exp_shifted(v2 - sh) + exp_shifted(v3 - sh)))

    @cuda.jit(device=True)
    def push_block8(m, sh, acc, v0, v1, v2, v3, v4, v5, v6, v7):
        """:func:`push_block4` for eight elements (one max test for eight)."""
        bm = nan_max(nan_max(nan_max(v0, v1), nan_max(v2, v3)),
                     nan_max(nan_max(v4, v5), nan_max(v6, v7)))
        if not (bm <= m):
            m, sh, acc = rescale(m, sh, acc, bm)
        return m, sh, acc + (((exp_shifted(v0 - sh) + exp_shifted(v1 - sh)) +
                              (exp_shifted(v2 - sh) + exp_shifted(v3 - sh))) +
                             ((exp_shifted(v4 - sh) + exp_shifted(v5 - sh)) +
                              (exp_shifted(v6 - sh) + exp_shifted(v7 - sh))))

    @cuda.jit(device=True)
    def add2(a1, b1, a2, b2):
        return a1 + a2, b1 + b2

    # Confident rows (issue #13): the CPU's test and second pass (fastce._cpu.primitives:
    # confident, lse_needs_rest, rest_term, rest_sum), in the kernel's own dtype -- float32
    # kernels stay free of float64 (the exact difference comes from TwoSum, as for float64).
    CONF_BASE, CONF_SLOPE, LSE_REST = ftype(1.5), ftype(1.5), ftype(0.6)

    @cuda.jit(device=True)
    def confident(gap, v):
        """Whether ``v = lse - x_p`` from the one-pass statistics, with ``gap = x_p - max``,
        may be off by more than a few ulp (the CPU's test).  False for NaN or inf."""
        return gap >= ZERO and v < CONF_BASE + CONF_SLOPE * gap

    @cuda.jit(device=True)
    def lse_needs_rest(lse, L):
        """Whether ``lse = max + L`` may have lost relative precision (near 0)."""
        return abs(lse) < LSE_REST * (L + ONE)

    @cuda.jit(device=True)
    def two_sum(a, b):
        """``(fl(a + b), err)`` with ``a + b = s + err`` exactly (NVVM does not reassociate
        without fast-math)."""
        sm = a + b
        bb = sm - a
        return sm, (a - (sm - bb)) + (b - bb)

    @cuda.jit(device=True)
    def fast_two_sum(a, b):
        """``(fl(a + b), err)`` with ``a + b = s + err`` exactly, for ``|a| >= |b|`` (or
        ``b = 0``): Fast2Sum, three instructions where TwoSum takes six."""
        sm = a + b
        return sm, b - (sm - a)

    @cuda.jit(device=True)
    def diff_below(v, q):
        """``two_sum(v, q)`` for ``v <= -q`` (``-q`` the row's max, the pivot), bit for bit,
        in five instructions: Fast2Sum of the operands ordered by magnitude.  With
        ``v <= -q``, ``min(v, q)`` has the larger magnitude (``q >= 0``: ``v <= -q`` or
        ``|v| <= q``; ``q < 0``: ``v <= -q < 0 < q``).  ``v = -inf`` gives a NaN error, as
        TwoSum does."""
        return fast_two_sum(min(v, q), max(v, q))

    @cuda.jit(device=True)
    def add_nonneg(hi, t):
        """``two_sum(hi, t)`` for ``hi, t >= 0``: Fast2Sum, the larger first (five
        instructions)."""
        return fast_two_sum(max(hi, t), min(hi, t))

    # float64 branches around the exp of a pivot entry: its exp is long, and four of them
    # at once cost the kernels registers (occupancy); float32 selects.
    PIVOT_BRANCH = dtype == np.float64

    # float32 chains a step's cursors (64-register bound: see memory.step); float64's pass
    # keeps the offsets p + k d (at 80 registers the chain spills).
    CHAIN_CURSORS = dtype == np.float32
    REST_STEP16 = dtype == np.float32 and softcap is None  # see thread_rest

    @cuda.jit(device=True)
    def rest_term(v, pivot):
        """``(term, is_pivot)``: ``exp(v - pivot)`` from the exact difference ``d + e`` as
        ``exp(d) (1 + e)``, or 0 where ``v`` equals the pivot (those entries are counted
        apart: their term is exactly 1), with ``is_pivot`` 1 there, else 0.  float64 branches
        around the pivot (see ``PIVOT_BRANCH``) and guards ``exp(d) == 0``; float32 is
        branch-free: ``d == 0`` exactly when ``v == pivot``, and there ``exp(d + e) = 1``
        exactly, so subtracting ``is_pivot`` zeroes the term; ``exp_shifted_err`` folds
        ``e`` into its own correction and maps ``v = -inf`` (a NaN TwoSum error) to 0."""
        if PIVOT_BRANCH and v == pivot:
            return ZERO, ONE
        if PIVOT_BRANCH:
            d, e = two_sum(v, -pivot)
            t = exp(d)
            return (ZERO if (d == ZERO or t == ZERO) else t + t * e), (ONE if d == ZERO else ZERO)
        d, e = diff_below(v, -pivot)
        k = ONE if d == ZERO else ZERO
        return exp_shifted_err(d, e) - k, k

    @cuda.jit(device=True)
    def rest_step4(x, p, d, n, c, s, G, pivot):
        """Four elements of the second pass from cursor ``p`` (loads issued first): the sum
        of their terms (pairwise), their pivot count, and the cursor's next position.
        float32 chains the addresses with ``steps4`` (one cursor and one step live under
        the 64-register bound); float64 (80 registers) spills with the chain and keeps the
        offsets ``p + k d``."""
        if CHAIN_CURSORS:
            p1, p2, p3, p4 = steps4(p, d)
        else:
            p1, p2, p3, p4 = p + d, p + 2 * d, p + 3 * d, p
        v0 = load_at(x, p, n, c, s)
        v1 = load_at(x, p1, n, c + G, s)
        v2 = load_at(x, p2, n, c + 2 * G, s)
        v3 = load_at(x, p3, n, c + 3 * G, s)
        r0, k0 = rest_term(cap_value(v0), pivot)
        r1, k1 = rest_term(cap_value(v1), pivot)
        r2, k2 = rest_term(cap_value(v2), pivot)
        r3, k3 = rest_term(cap_value(v3), pivot)
        return ((r0 + r1) + (r2 + r3), (k0 + k1) + (k2 + k3),
                p4 if CHAIN_CURSORS else p + 4 * d)

    @cuda.jit(device=True)
    def thread_rest(x, n, s, C, lane, G, pivot):
        """This thread's share of the second pass over the whole row ``x[n, :C, s]``:
        ``(hi, lo, cnt)``, ``hi + lo`` the sum of ``exp(x_c - pivot)`` over the entries not
        equal to the pivot (terms summed pairwise a step, the step sums compensated with
        TwoSum), ``cnt`` the count of those equal.  float32 steps sixteen elements (four
        :func:`rest_step4`, one ordered Fast2Sum, :func:`add_nonneg`), then eight and four;
        float64 four, and so do the soft-capped builds: there the wider pass costs the
        weighted gradient loop (``index_row``) its loads in flight under the 64-register
        bound (docs/gpu.md).  ``C = 0`` reads nothing."""
        hi = ZERO
        lo = ZERO
        cnt = ZERO
        c = lane
        p = addr3(x, n, c, s)
        d = G * x.strides[1]
        end = C - 3 * G
        if REST_STEP16:
            end16 = C - 15 * G
            while c < end16:
                a, ka, p = rest_step4(x, p, d, n, c, s, G, pivot)
                b, kb, p = rest_step4(x, p, d, n, c + 4 * G, s, G, pivot)
                a2, ka2, p = rest_step4(x, p, d, n, c + 8 * G, s, G, pivot)
                b2, kb2, p = rest_step4(x, p, d, n, c + 12 * G, s, G, pivot)
                hi, e = add_nonneg(hi, (a + b) + (a2 + b2))
                lo += e
                cnt += (ka + kb) + (ka2 + kb2)
                c += 16 * G
            if c < C - 7 * G:  # eight more (not a loop)
                a, ka, p = rest_step4(x, p, d, n, c, s, G, pivot)
                b, kb, p = rest_step4(x, p, d, n, c + 4 * G, s, G, pivot)
                hi, e = two_sum(hi, a + b)
                lo += e
                cnt += ka + kb
                c += 8 * G
            if c < end:  # four more (not a loop)
                a, ka, p = rest_step4(x, p, d, n, c, s, G, pivot)
                hi, e = two_sum(hi, a)
                lo += e
                cnt += ka
                c += 4 * G
        else:
            while c < end:
                a, ka, p = rest_step4(x, p, d, n, c, s, G, pivot)
                hi, e = two_sum(hi, a)
                lo += e
                cnt += ka
                c += 4 * G
        for j in range(3):  # the last 0-3 elements of this thread (unrolled: not a loop)
            if c + j * G < C:
                rj, kj = rest_term(xload(x, p + j * d, n, c + j * G, s), pivot)
                hi, e = two_sum(hi, rj)
                lo += e
                cnt += kj
        return hi, lo, cnt

    @cuda.jit(device=True)
    def sum_two(h1, l1, h2, l2):
        # Symmetric: TwoSum's error is exact, so both partner lanes get the same bits.
        sm, e = two_sum(h1, h2)
        return sm, e + (l1 + l2)

    allreduce_max_sumexp = _group_allreduce(merge_max_sumexp, NEG_INF, ZERO, nbtype, shuffle)
    allreduce_sum2 = _group_allreduce(add2, ZERO, ZERO, nbtype, shuffle)
    allreduce_two_sum = _group_allreduce(sum_two, ZERO, ZERO, nbtype, shuffle)
    # rest_sum's own instance: a device function holding shared arrays must not reach one
    # kernel by two call paths (NVVM links its module twice: "_cudapy_smem_N multiply
    # defined"), and the cross-entropy kernel calls allreduce_sum2 itself.
    allreduce_count = _group_allreduce(add2, ZERO, ZERO, nbtype, shuffle)

    @cuda.jit(device=True)
    def block_any(pred):
        """Whether ``pred`` holds for any thread of the block: the block-uniform test that
        guards the second pass, whose reductions every thread must reach.  A shared flag and
        two barriers (NVVM 13 rejects numba's ``syncthreads_or``); once per kernel: the flag
        is not reset for a second call."""
        flag = cuda.shared.array(1, np.int32)
        if cuda.threadIdx.x == 0:
            flag[0] = 0
        cuda.syncthreads()
        if pred:
            flag[0] = 1  # every writer writes the same value
        cuda.syncthreads()
        return flag[0] != 0

    @cuda.jit(device=True)
    def rest_sum(x, n, s, C, lane, G, pivot, need):
        """``rest = sum_{c != p} exp(x[n, c, s] - pivot)`` for a row whose entry ``p`` holds
        the pivot, the row's maximum (the other entries equal to it add 1 each), summed by
        the group; -1 where ``need`` is False.  Every thread of the group must call it (it
        reduces); a thread with ``need`` False reads nothing."""
        hi, lo, cnt = thread_rest(x, n, s, C if need else 0, lane, G, pivot)
        hi, lo = allreduce_two_sum(hi, lo, G)
        cnt, _ = allreduce_count(cnt, ZERO, G)
        return (hi + (cnt - ONE)) + lo if need else -ONE

    @cuda.jit(device=True)
    def unit(n_units, G, n_split, S, C):
        """This thread's work unit: a chunk ``k`` of row ``r = n * S + s`` (``n_split``
        chunks per row), handled by a group of ``G`` threads; ``blockDim // G`` units per
        block.  Returns (valid, lane, r, k, n, s, lo, hi) with the unit's class range
        [lo, hi); an invalid unit (past the end) gets an empty range at row 0.  Divisions
        by the block-level values are 32-bit; the 64-bit ones are skipped in the common
        cases (rows not split, S = 1)."""
        t = np.uint32(cuda.threadIdx.x)
        g = np.uint32(G)
        grp = t // g
        lane = np.int64(t - grp * g)
        u = np.int64(cuda.blockIdx.x) * np.int64(np.uint32(cuda.blockDim.x) // g) + \
            np.int64(grp)
        valid = u < n_units
        if not valid:
            return False, lane, 0, 0, 0, 0, 0, 0
        if n_split == 1:
            r = u
            k = 0
            lo = 0
            hi = C
        else:
            r = u // n_split
            k = u - r * n_split
            chunk = (C + n_split - 1) // n_split
            lo = k * chunk
            hi = min(lo + chunk, C)
        if S == 1:
            n = r
            s = 0
        else:
            n = r // S
            s = r - n * S
        return True, lane, r, k, n, s, lo, hi

    @cuda.jit(device=True)
    def thread_max_sumexp8(x, n, s, lo, hi, lane, G):
        """This thread's (max, sum-exp) partial of ``x[n, lo:hi, s]`` for a group of ``G``
        threads: a running pair in registers over a strided share (consecutive lanes read
        consecutive classes, so loads coalesce), eight independent loads per step through a
        byte cursor (float32)."""
        m = NEG_INF
        sh = ZERO
        acc = ZERO
        c = lo + lane
        p = addr3(x, n, c, s)
        d = G * x.strides[1]  # bytes between a thread's consecutive elements
        end = hi - 7 * G
        while c < end:
            # the raw loads first: a soft-cap's tanh between them would serialize them
            v0 = load_at(x, p, n, c, s)
            v1 = load_at(x, p + d, n, c + G, s)
            v2 = load_at(x, p + 2 * d, n, c + 2 * G, s)
            v3 = load_at(x, p + 3 * d, n, c + 3 * G, s)
            v4 = load_at(x, p + 4 * d, n, c + 4 * G, s)
            v5 = load_at(x, p + 5 * d, n, c + 5 * G, s)
            v6 = load_at(x, p + 6 * d, n, c + 6 * G, s)
            v7 = load_at(x, p + 7 * d, n, c + 7 * G, s)
            m, sh, acc = push_block8(m, sh, acc, cap_value(v0), cap_value(v1), cap_value(v2),
                                     cap_value(v3), cap_value(v4), cap_value(v5),
                                     cap_value(v6), cap_value(v7))
            c += 8 * G
            p += 8 * d
        if c < hi:  # the last 1-7 elements of this thread
            v1 = xload(x, p + d, n, c + G, s) if c + G < hi else NEG_INF
            v2 = xload(x, p + 2 * d, n, c + 2 * G, s) if c + 2 * G < hi else NEG_INF
            v3 = xload(x, p + 3 * d, n, c + 3 * G, s) if c + 3 * G < hi else NEG_INF
            v4 = xload(x, p + 4 * d, n, c + 4 * G, s) if c + 4 * G < hi else NEG_INF
            v5 = xload(x, p + 5 * d, n, c + 5 * G, s) if c + 5 * G < hi else NEG_INF
            v6 = xload(x, p + 6 * d, n, c + 6 * G, s) if c + 6 * G < hi else NEG_INF
            m, sh, acc = push_block8(m, sh, acc, xload(x, p, n, c, s), v1, v2, v3, v4, v5,
                                     v6, NEG_INF)
        return m, acc

    @cuda.jit(device=True)
    def thread_max_sumexp4(x, n, s, lo, hi, lane, G):
        """:func:`thread_max_sumexp8` four elements a step (float64: its exp needs more
        registers, and four 8-byte loads already put 32 bytes in flight)."""
        m = NEG_INF
        sh = ZERO
        acc = ZERO
        c = lo + lane
        p = addr3(x, n, c, s)
        d = G * x.strides[1]
        end = hi - 3 * G
        while c < end:
            v0 = load_at(x, p, n, c, s)
            v1 = load_at(x, p + d, n, c + G, s)
            v2 = load_at(x, p + 2 * d, n, c + 2 * G, s)
            v3 = load_at(x, p + 3 * d, n, c + 3 * G, s)
            m, sh, acc = push_block4(m, sh, acc, cap_value(v0), cap_value(v1), cap_value(v2),
                                     cap_value(v3))
            c += 4 * G
            p += 4 * d
        if c < hi:  # the last 1-3 elements of this thread
            v1 = xload(x, p + d, n, c + G, s) if c + G < hi else NEG_INF
            v2 = xload(x, p + 2 * d, n, c + 2 * G, s) if c + 2 * G < hi else NEG_INF
            m, sh, acc = push_block4(m, sh, acc, xload(x, p, n, c, s), v1, v2, NEG_INF)
        return m, acc

    thread_max_sumexp = thread_max_sumexp8 if dtype == np.float32 else thread_max_sumexp4

    @cuda.jit(device=True)
    def row_max_sumexp(x, n, s, lo, hi, lane, G):
        """(max, sum-exp) of ``x[n, lo:hi, s]`` over a group: the threads' partials
        (:func:`thread_max_sumexp`), merged."""
        m, acc = thread_max_sumexp(x, n, s, lo, hi, lane, G)
        return allreduce_max_sumexp(m, acc, G)

    return SimpleNamespace(
        dtype=dtype, ftype=ftype, nbtype=nbtype, shuffle=shuffle,
        ZERO=ZERO, ONE=ONE, INF=INF, NEG_INF=NEG_INF, NAN=NAN,
        exp=exp, exp_shifted=exp_shifted, exp_shifted_err=exp_shifted_err, log=log,
        log1p=log1p, nan_max=nan_max,
        safe_shift=safe_shift,
        shift_log_sum=shift_log_sum, lse_minus=lse_minus,
        lse_from_max_sumexp=lse_from_max_sumexp, inv_sum=inv_sum,
        merge_max_sumexp=merge_max_sumexp, rescaled=rescaled, push_block4=push_block4,
        push_block8=push_block8,
        allreduce_max_sumexp=allreduce_max_sumexp, allreduce_sum2=allreduce_sum2,
        unit=unit, thread_max_sumexp=thread_max_sumexp, row_max_sumexp=row_max_sumexp,
        confident=confident, lse_needs_rest=lse_needs_rest, two_sum=two_sum,
        rest_term=rest_term, rest_sum=rest_sum, block_any=block_any,
        allreduce_two_sum=allreduce_two_sum, softcap=softcap, xload=xload,
        cap_value=cap_value, cap_grad=cap_grad, row_kernel_jit=_row_kernel_jit(dtype))
