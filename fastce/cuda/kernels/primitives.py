"""Device functions shared by every CUDA kernel: the ``-inf``-safe (max, sum-exp) algebra of
``fastce._cpu.primitives`` and the group reductions built on one exchange primitive.

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
        return _quiet(np.exp), _quiet(np.log), _quiet(np.log1p)

    @cuda.jit(device=True)
    def exp(v):
        return math.exp(v)

    @cuda.jit(device=True)
    def log(v):
        return math.log(v)

    @cuda.jit(device=True)
    def log1p(v):
        return math.log1p(v)

    return exp, log, log1p


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


def build_primitives(dtype, shuffle=None):
    """Device functions for one compute dtype.

    Parameters
    ----------
    dtype : numpy dtype
        float32 or float64.
    shuffle : bool, optional
        Warp shuffles (True) or the shared-memory twin (False).  Default: :func:`use_shuffle`.

    Returns
    -------
    types.SimpleNamespace
        ``ftype`` (the NumPy scalar type), constants ``ZERO``, ``ONE``, ``INF``, ``NEG_INF``,
        ``NAN``, and device functions ``exp``, ``log``, ``log1p``, ``nan_max``,
        ``safe_shift``, ``log_sum``, ``lse``, ``inv_sum``, ``merge``, ``push``,
        ``allreduce_max_sumexp(m, s, G)``, ``allreduce_sum2(a, b, G)``, ``unit``, ``row_stats``.
    """
    if shuffle is None:
        shuffle = use_shuffle()
    dtype = np.dtype(dtype)
    ftype = dtype.type
    nbtype = from_dtype(dtype)
    ZERO, ONE = ftype(0), ftype(1)
    INF, NEG_INF, NAN = ftype(np.inf), ftype(-np.inf), ftype(np.nan)
    exp, log, log1p = _math_functions(ftype)

    @cuda.jit(device=True)
    def nan_max(a, b):
        """max(a, b) that propagates NaN (``max``/``fmaxf`` drop it)."""
        return a if (a > b or a != a) else b

    @cuda.jit(device=True)
    def safe_shift(m):
        """The value subtracted before exp: the max, or 0 when the max is +-inf (so an
        all-``-inf`` row never evaluates ``-inf - (-inf)``)."""
        return m if (m != INF and m != NEG_INF) else ZERO

    @cuda.jit(device=True)
    def log_sum(m, s):
        """``L`` with ``lse = m + L`` (``fastce._cpu.primitives.shift_log_sum``): log(s), or 0
        when the max is +-inf.  Kernels evaluate ``lse - x`` as ``(m - x) + L``, never as
        ``(m + L) - x``: with logits of 1e300 (1e8 in float32) ``m + L`` rounds ``L`` away
        and the loss would be 0 instead of log(C).  A NaN logit makes ``m`` NaN already."""
        if m == INF or m == NEG_INF:
            return ZERO
        return log(s)

    @cuda.jit(device=True)
    def lse(m, s):
        """log-sum-exp from (max, sum of exp(x - safe_shift(max))): -inf for an all-``-inf``
        row, +inf when the max is +inf, NaN when the max is NaN."""
        return m + log_sum(m, s)

    @cuda.jit(device=True)
    def inv_sum(m, s):
        """1/s, the factor turning exp(x - shift) into probabilities; NaN when the max is not
        finite, so that rows holding +inf or only -inf give NaN probabilities and gradients,
        as torch (and the CPU kernels) do."""
        if m > NEG_INF and m < INF:
            return ONE / s
        return NAN

    @cuda.jit(device=True)
    def merge(m1, s1, m2, s2):
        """Merge the (max, sum-exp) partials of two disjoint parts of a row.  A partial whose
        max is -inf keeps its (zero) sum unscaled: ``exp(0 - sh)`` could overflow."""
        m = nan_max(m1, m2)
        sh = safe_shift(m)
        a = s1 * exp(safe_shift(m1) - sh) if m1 != NEG_INF else s1
        b = s2 * exp(safe_shift(m2) - sh) if m2 != NEG_INF else s2
        return m, a + b

    @cuda.jit(device=True)
    def push(m, s, v):
        """Add one element to a running (max, sum-exp): one exp per element, plus a rescale
        of the sum when the max grows (or turns NaN)."""
        mn = nan_max(m, v)
        if mn != m:
            if m != NEG_INF:
                s = s * exp(safe_shift(m) - safe_shift(mn))
            m = mn
        return m, s + exp(v - safe_shift(m))

    @cuda.jit(device=True)
    def add2(a1, b1, a2, b2):
        return a1 + a2, b1 + b2

    allreduce_max_sumexp = _group_allreduce(merge, NEG_INF, ZERO, nbtype, shuffle)
    allreduce_sum2 = _group_allreduce(add2, ZERO, ZERO, nbtype, shuffle)

    @cuda.jit(device=True)
    def unit(n_units, G, n_split, S, C):
        """This thread's work unit: a chunk ``k`` of row ``r = n * S + s`` (``n_split``
        chunks per row), handled by a group of ``G`` threads; ``blockDim // G`` units per
        block.  Returns (valid, lane, r, k, n, s, lo, hi) with the unit's class range
        [lo, hi); an invalid unit (past the end) gets an empty range at row 0."""
        t = cuda.threadIdx.x
        grp = t // G
        lane = t - grp * G
        u = cuda.blockIdx.x * (cuda.blockDim.x // G) + grp
        valid = u < n_units
        if not valid:
            return False, lane, 0, 0, 0, 0, 0, 0
        r = u // n_split
        k = u - r * n_split
        n = r // S
        chunk = (C + n_split - 1) // n_split
        lo = k * chunk
        return True, lane, r, k, n, r - n * S, lo, min(lo + chunk, C)

    @cuda.jit(device=True)
    def row_stats(x, n, s, lo, hi, lane, G):
        """(max, sum-exp) of ``x[n, lo:hi, s]`` over a group: each thread keeps a running
        pair in registers over a strided share (consecutive lanes read consecutive classes,
        so loads coalesce), then the group merges the pairs."""
        m = NEG_INF
        acc = ZERO
        c = lo + lane
        while c < hi:
            m, acc = push(m, acc, x[n, c, s])
            c += G
        return allreduce_max_sumexp(m, acc, G)

    return SimpleNamespace(
        dtype=dtype, ftype=ftype, nbtype=nbtype, shuffle=shuffle,
        ZERO=ZERO, ONE=ONE, INF=INF, NEG_INF=NEG_INF, NAN=NAN,
        exp=exp, log=log, log1p=log1p, nan_max=nan_max, safe_shift=safe_shift,
        log_sum=log_sum, lse=lse,
        inv_sum=inv_sum,
        merge=merge, push=push, allreduce_max_sumexp=allreduce_max_sumexp,
        allreduce_sum2=allreduce_sum2, unit=unit, row_stats=row_stats)
