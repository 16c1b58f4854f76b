"""Device-side reductions of loss arrays (sum, mean) and the strided copy that brings any
device array into a contiguous buffer of the compute dtype.

The final reduction never leaves the device: "mean" reads its denominator from a device array
when it was computed on the device (the weighted count of non-ignored targets), so a call
queues its kernels and returns a 0-d device array without waiting for them.
"""
from types import SimpleNamespace

from numba import cuda, int64

from .memory import base6, flat_addr, load1, load1_at, store1_at

__all__ = ["build_reduce", "COPY_NDIM", "SUM_PARTIAL", "SUM_TOTAL", "SUM_MEAN"]

# The strided copy works on arrays of up to this many (merged) dimensions.
COPY_NDIM = 6

SUM_PARTIAL = 0   # each block writes its partial sum to out[blockIdx]
SUM_TOTAL = 1     # one block: out[0] = sum
SUM_MEAN = 2      # one block: out[0] = sum / denominator (NaN for 0/0, as torch)


@cuda.jit(device=True)
def _carry(i, d, up):
    """One digit of a mixed-radix counter: (i mod d, up + carry) for 0 <= i < 2 * d."""
    if i >= d:
        return i - d, up + 1
    return i, up



def build_reduce(P):
    """Reduction and copy kernels for the primitives ``P`` of one compute dtype.

    Returns
    -------
    types.SimpleNamespace
        ``sum_kernel(vals, out, mode, stats, denom)``: grid-stride sum of the 1-D ``vals``;
        with ``mode == SUM_MEAN`` the denominator is ``stats[0]`` when ``stats`` is not
        empty, else ``denom``.  ``rowsum_kernel(parts, out)``: ``out[r] = sum(parts[r, :])``.
        ``bad_value_kernel(a, lo, hi, flag)``: the data checks of the CPU path (NaN,
        infinite or out-of-range values) as a device error flag.
    """
    ZERO, NAN = P.ZERO, P.NAN
    allreduce_sum2 = P.allreduce_sum2

    @cuda.jit
    def sum_kernel(vals, out, mode, stats, denom):
        t = cuda.threadIdx.x
        i = int64(cuda.blockIdx.x) * cuda.blockDim.x + t  # 64-bit
        stride = int64(cuda.gridDim.x) * cuda.blockDim.x
        acc = ZERO
        n = vals.shape[0]
        end = n - 3 * stride
        while i < end:  # four independent loads a step
            acc += (load1(vals, i) + load1(vals, i + stride)) + \
                   (load1(vals, i + 2 * stride) + load1(vals, i + 3 * stride))
            i += 4 * stride
        for j in range(3):  # the last 0-3 elements of this thread (unrolled: not a loop)
            if i + j * stride < n:
                acc += load1(vals, i + j * stride)
        acc, _ = allreduce_sum2(acc, ZERO, cuda.blockDim.x)
        if t == 0:
            if mode == SUM_PARTIAL:
                out[cuda.blockIdx.x] = acc
            elif mode == SUM_TOTAL:
                out[0] = acc
            else:
                d = stats[0] if stats.shape[0] > 0 else denom
                out[0] = acc / d if d != ZERO else NAN

    @cuda.jit
    def rowsum_kernel(parts, out):
        r = int64(cuda.grid(1))
        if r < parts.shape[0]:
            acc = ZERO
            K = parts.shape[1]
            k = 0
            while k < K:  # four independent loads a step (the last three guarded)
                v1 = parts[r, k + 1] if k + 1 < K else ZERO
                v2 = parts[r, k + 2] if k + 2 < K else ZERO
                v3 = parts[r, k + 3] if k + 3 < K else ZERO
                acc += (parts[r, k] + v1) + (v2 + v3)
                k += 4
            out[r] = acc

    NEG_INF, INF = P.NEG_INF, P.INF

    @cuda.jit(device=True)
    def bad(v, lo, hi):
        return not (v >= lo and v <= hi and v > NEG_INF and v < INF)

    @cuda.jit(device=True)
    def step3(i0, i1, i2, s0, s1, s2, d1, d2):
        """(i0, i1, i2) advanced by the decomposition (s0, s1, s2) of the stride, with
        carries (the top digit may run past its dimension: it is never read then)."""
        i2, i1 = _carry(i2 + s2, d2, i1 + s1)
        i1, i0 = _carry(i1, d1, i0 + s0)
        return i0, i1, i2

    @cuda.jit
    def bad_value_kernel(a, lo, hi, flag):
        """Lower ``flag[0]`` (atomic min) to the C-order flat position of any element of the
        3-D ``a`` that is NaN, infinite, or outside [lo, hi].  Grid-stride over flat
        positions; the index (i0, i1, i2) advances by the stride's own decomposition with
        carries, so the loop divides nothing."""
        d0, d1, d2 = a.shape
        total = d0 * d1 * d2
        i = int64(cuda.grid(1))  # 64-bit: inputs may exceed 2**31 elements
        stride = int64(cuda.gridsize(1))
        if i >= total:
            return
        q = i // d2
        i2 = i - q * d2
        i0 = q // d1
        i1 = q - i0 * d1
        sq = stride // d2
        s2 = stride - sq * d2
        s0 = sq // d1
        s1 = sq - s0 * d1
        end = total - 3 * stride
        while i < end:  # four positions a step: their loads are independent
            j0, j1, j2 = step3(i0, i1, i2, s0, s1, s2, d1, d2)
            k0, k1, k2 = step3(j0, j1, j2, s0, s1, s2, d1, d2)
            l0, l1, l2 = step3(k0, k1, k2, s0, s1, s2, d1, d2)
            va = a[i0, i1, i2]
            vb = a[j0, j1, j2]
            vc = a[k0, k1, k2]
            vd = a[l0, l1, l2]
            if bad(va, lo, hi):
                cuda.atomic.min(flag, 0, i)
            if bad(vb, lo, hi):
                cuda.atomic.min(flag, 0, i + stride)
            if bad(vc, lo, hi):
                cuda.atomic.min(flag, 0, i + 2 * stride)
            if bad(vd, lo, hi):
                cuda.atomic.min(flag, 0, i + 3 * stride)
            i += 4 * stride
            i0, i1, i2 = step3(l0, l1, l2, s0, s1, s2, d1, d2)
        for j in range(3):  # the last 0-3 positions of this thread (unrolled: not a loop)
            if i < total:
                if bad(a[i0, i1, i2], lo, hi):
                    cuda.atomic.min(flag, 0, i)
                i += stride
                i0, i1, i2 = step3(i0, i1, i2, s0, s1, s2, d1, d2)

    return SimpleNamespace(sum_kernel=sum_kernel, rowsum_kernel=rowsum_kernel,
                           bad_value_kernel=bad_value_kernel)


@cuda.jit(device=True)
def _carry_at(i, d, up, p, back):
    """:func:`_carry` of a digit that also moves a byte address: by ``back`` (the upper
    digit's stride less ``d`` of this digit's) on a carry."""
    if i >= d:
        return i - d, up + 1, p + back
    return i, up, p


@cuda.jit(device=True)
def _digits6(q, dims):
    """The C-order 6-D index of flat position ``q`` for the shape ``(d0, *dims)`` (five
    64-bit divisions: once per thread, never per element)."""
    d1, d2, d3, d4, d5 = dims
    i5 = q % d5
    q //= d5
    i4 = q % d4
    q //= d4
    i3 = q % d3
    q //= d3
    i2 = q % d2
    q //= d2
    return q // d1, q % d1, i2, i3, i4, i5


@cuda.jit(device=True)
def _offset6(ix, st):
    i0, i1, i2, i3, i4, i5 = ix
    s0, s1, s2, s3, s4, s5 = st
    return ((i0 * s0 + i1 * s1) + (i2 * s2 + i3 * s3)) + (i4 * s4 + i5 * s5)


@cuda.jit(device=True)
def _advance6(ix, p, sx, dp, dims, back):
    """A 6-D index and the byte address of its element, advanced by the grid stride's
    decomposition ``sx`` (``dp`` bytes when no digit carries), with carries (the top digit
    may run past its dimension: it is never read then)."""
    i0, i1, i2, i3, i4, i5 = ix
    s0, s1, s2, s3, s4, s5 = sx
    d1, d2, d3, d4, d5 = dims
    b1, b2, b3, b4, b5 = back
    i5, i4, p = _carry_at(i5 + s5, d5, i4 + s4, p + dp, b5)
    i4, i3, p = _carry_at(i4, d4, i3 + s3, p, b4)
    i3, i2, p = _carry_at(i3, d3, i2 + s2, p, b3)
    i2, i1, p = _carry_at(i2, d2, i1 + s1, p, b2)
    i1, i0, p = _carry_at(i1, d1, i0 + s0, p, b1)
    return (i0, i1, i2, i3, i4, i5), p


@cuda.jit
def copy_kernel(src, dst):
    """``dst = src`` elementwise for 6-D arrays of one shape; ``dst`` is C-contiguous.
    Grid-stride over flat positions, four a step: the 6-D index and the source element's
    byte address advance by the stride's own decomposition with carries (divisions once per
    thread, none per element), and the four loads are issued before the four stores."""
    d0, d1, d2, d3, d4, d5 = dst.shape
    dims = (d1, d2, d3, d4, d5)
    st = src.strides
    back = (st[0] - d1 * st[1], st[1] - d2 * st[2], st[2] - d3 * st[3], st[3] - d4 * st[4],
            st[4] - d5 * st[5])
    i = int64(cuda.grid(1))  # 64-bit: inputs may exceed 2**31 elements
    stride = int64(cuda.gridsize(1))
    total = d0 * d1 * d2 * d3 * d4 * d5
    if i >= total:
        return
    ix = _digits6(i, dims)
    p = base6(src) + _offset6(ix, st)
    sx = _digits6(stride, dims)
    dp = _offset6(sx, st)
    end = total - 3 * stride
    while i < end:
        ib, pb = _advance6(ix, p, sx, dp, dims, back)
        ic, pc = _advance6(ib, pb, sx, dp, dims, back)
        id4, pd = _advance6(ic, pc, sx, dp, dims, back)
        va = load1_at(src, p, ix)
        vb = load1_at(src, pb, ib)
        vc = load1_at(src, pc, ic)
        vd = load1_at(src, pd, id4)
        store1_at(dst, flat_addr(dst, i), ix, va)
        store1_at(dst, flat_addr(dst, i + stride), ib, vb)
        store1_at(dst, flat_addr(dst, i + 2 * stride), ic, vc)
        store1_at(dst, flat_addr(dst, i + 3 * stride), id4, vd)
        i += 4 * stride
        ix, p = _advance6(id4, pd, sx, dp, dims, back)
    for j in range(3):  # the last 0-3 positions of this thread (unrolled: not a loop)
        if i < total:
            store1_at(dst, flat_addr(dst, i), ix, load1_at(src, p, ix))
            i += stride
            ix, p = _advance6(ix, p, sx, dp, dims, back)
