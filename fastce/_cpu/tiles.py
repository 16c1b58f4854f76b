"""Row tiles: many short rows (one to a few hundred classes) vectorized across rows.

A row of C <= 256 classes is too short for the rows kernels' vector loops to pay off: each
row costs the loops' set-up, horizontal reductions and a scalar remainder of up to 63
elements (exps included) -- more than its arithmetic (docs/performance.md).  Here a tile of
``TILE_ROWS`` rows is transposed into an L1/L2-resident (C, TILE_ROWS) buffer, 16 x 16
(float32) or 8 x 8 (float64) blocks at a time with register shuffles (:func:`transpose_block`;
the class tail and a partial tile's last rows with masked loads and stores,
:func:`transpose_part`), so that every loop over classes runs with the rows as vector lanes:
fixed trip counts, no remainders, no horizontal reductions.  Elementwise outputs
(log_softmax, softmax, the cross-entropy gradient) are computed in the buffer and transposed
back; softmax and the gradient reuse the exps of the statistics pass (kept in the buffer).

The statistics are the rows kernels' own (shift = the row's max, ``exp_term`` sums,
``shift_log_sum``, ``lse_minus``), and so are the special values (NaN, +-inf rows).  The
confident-row precision (docs/semantics.md): cross-entropy runs the rows kernels' test and
second pass, row by row (``rest_sum``) when a tile holds few confident rows, across the tile
(``spatial_rest_sum`` on the buffer, the K-dim layout of one sample) when many; log_softmax,
and the forward loss of rows of a few classes (``CE_REST_TILE_MAX_CLASSES``), compute every
row as max + log1p(rest) in one pass (:func:`tile_max_rest`).
"""
import types as pytypes

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .._config import CE_REST_TILE_MAX_CLASSES, FASTMATH, TILE_ROWS, TILES_PER_TASK
from .._modes import MODE_LOG_SOFTMAX, MODE_LOGSUMEXP
from .cross_entropy import (_target_grad, _upstream, _upstream_block, ce_index_small,
                            index_pairs)
from .primitives import (confident, exp_term, inv_sum, kernel_twins, log1p, lse_confident,
                         lse_minus, lse_needs_rest, nan_max, pair_lse_parts,
                         rest_sum, rest_term, rest_total,
                         safe_shift, shift_log_sum, spatial_rest_sum, kahan_add, wide_vectors)

# Up to this many confident rows in a tile take the second pass row by row (``rest_sum``);
# more, and it runs vectorized across the whole tile (``spatial_rest_sum``), float64 exps on
# every lane.
_FEW_CONFIDENT = TILE_ROWS // 8

_REST_TILE_MAX_C32, _REST_TILE_MAX_C64 = CE_REST_TILE_MAX_CLASSES

# Rows per unit of the two-class loops' parallel loop.
_PAIR_BLOCK = 2048


def _transpose_codegen(masked):
    """Code generator of :func:`transpose_block` (``masked`` False) and
    :func:`transpose_part` (True)."""
    def typer(typingctx, src, r0, c0, dst, d0, e0, *counts):
        if not (isinstance(src, types.Array) and isinstance(dst, types.Array)
                and src.ndim == 2 and dst.ndim == 2 and src.layout == "C"
                and dst.layout == "C" and src.dtype == dst.dtype
                and isinstance(src.dtype, types.Float)
                and len(counts) == (2 if masked else 0)):
            return None
        lanes = 16 if src.dtype.bitwidth == 32 else 8
        align = src.dtype.bitwidth // 8

        def codegen(context, builder, sig, args):
            sty, dty = sig.args[0], sig.args[3]
            sa = context.make_array(sty)(context, builder, args[0])
            da = context.make_array(dty)(context, builder, args[3])
            r0v, c0v, d0v, e0v = (context.cast(builder, args[k], sig.args[k], types.intp)
                                  for k in (1, 2, 4, 5))
            vty = ir.VectorType(context.get_data_type(sty.dtype), lanes)
            intp = context.get_value_type(types.intp)
            i32 = ir.IntType(32)
            bty = ir.VectorType(ir.IntType(1), lanes)

            def vec_ptr(ary, aty, i, j):
                # Plain (not inbounds) address arithmetic: a masked-off row may lie past
                # the array's end.
                off = builder.add(builder.mul(i, builder.extract_value(ary.shape, 1)), j)
                return builder.bitcast(builder.gep(ary.data, [off]), vty.as_pointer())

            if masked:
                nrow, ncol = (context.cast(builder, args[k], sig.args[k], types.intp)
                              for k in (6, 7))
                ity = ir.VectorType(intp, lanes)
                lane_ids = ir.Constant(ity, list(range(lanes)))

                def below(n):   # lanes < n, as a mask
                    v = builder.insert_element(ir.Constant(ity, None), n, i32(0))
                    v = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, lanes),
                                                                 [0] * lanes))
                    return builder.icmp_signed("<", lane_ids, v)

                def splat(bit):
                    v = builder.insert_element(ir.Constant(bty, None), bit, i32(0))
                    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, lanes),
                                                                    [0] * lanes))

                col_mask, row_mask = below(ncol), below(nrow)
                mload = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(vty, [vty.as_pointer(), i32, bty, vty]),
                    f"llvm.masked.load.v{lanes}{'f32' if align == 4 else 'f64'}.p0")
                mstore = cgutils.get_or_insert_function(
                    builder.module, ir.FunctionType(ir.VoidType(), [vty, vty.as_pointer(),
                                                                    i32, bty]),
                    f"llvm.masked.store.v{lanes}{'f32' if align == 4 else 'f64'}.p0")
                zero = ir.Constant(vty, [0.0] * lanes)

                def load(i):
                    live = builder.icmp_signed("<", intp(i), nrow)
                    mask = builder.and_(col_mask, splat(live))
                    return builder.call(mload, [vec_ptr(sa, sty, builder.add(r0v, intp(i)),
                                                        c0v), i32(align), mask, zero])

                def store(k, v):
                    live = builder.icmp_signed("<", intp(k), ncol)
                    mask = builder.and_(row_mask, splat(live))
                    builder.call(mstore, [v, vec_ptr(da, dty, builder.add(d0v, intp(k)), e0v),
                                          i32(align), mask])
            else:
                def load(i):
                    return builder.load(vec_ptr(sa, sty, builder.add(r0v, intp(i)), c0v),
                                        align=align)

                def store(k, v):
                    builder.store(v, vec_ptr(da, dty, builder.add(d0v, intp(k)), e0v),
                                  align=align)

            rows = [load(i) for i in range(lanes)]
            mty = ir.VectorType(i32, lanes)
            bit = 1
            while bit < lanes:
                # Swap bit `bit` of the row index with the same bit of the lane index.
                lo_mask = ir.Constant(mty, [c if not c & bit else lanes + (c ^ bit)
                                            for c in range(lanes)])
                hi_mask = ir.Constant(mty, [c ^ bit if not c & bit else lanes + c
                                            for c in range(lanes)])
                new = list(rows)
                for r in range(lanes):
                    if not r & bit:
                        lo, hi = rows[r], rows[r | bit]
                        new[r] = builder.shuffle_vector(lo, hi, lo_mask)
                        new[r | bit] = builder.shuffle_vector(lo, hi, hi_mask)
                rows = new
                bit *= 2
            for k in range(lanes):
                store(k, rows[k])
            return context.get_dummy_value()

        return types.none(src, r0, c0, dst, d0, e0, *counts), codegen

    return typer


@intrinsic
def transpose_block(typingctx, src, r0, c0, dst, d0, e0):
    """``dst[d0 + k, e0 + i] = src[r0 + i, c0 + k]`` for ``i, k < W``, W = 16 (float32) or 8
    (float64) -- one 512-bit vector per row: W vector loads, a shuffle network of log2(W)
    stages (each swaps one bit of the row index with one bit of the column index), W vector
    stores.  About 2.5x faster than an element loop, which LLVM leaves scalar.  Both arrays
    2-D C-contiguous; no bounds checks (callers stay in range)."""
    return _transpose_codegen(False)(typingctx, src, r0, c0, dst, d0, e0)


@intrinsic
def transpose_part(typingctx, src, r0, c0, dst, d0, e0, nrow, ncol):
    """:func:`transpose_block` of the ``nrow`` x ``ncol`` corner of the W x W block (0 <
    ``nrow``, ``ncol`` <= W): masked vector loads and stores (AVX-512 masks; nothing outside
    the corner is read or written), for the class tail of a tile and its last rows."""
    return _transpose_codegen(True)(typingctx, src, r0, c0, dst, d0, e0, nrow, ncol)


@njit(fastmath=FASTMATH, error_model="numpy")
def _lanes(x):
    """Rows (and classes) per :func:`transpose_block`: one 512-bit vector."""
    return 64 // x.itemsize


@njit(fastmath=FASTMATH, error_model="numpy")
def load_tile(x, r0, buf):
    """``buf[c, j] = x[r0 + j, c]`` for the rows ``r0 .. r0 + TILE_ROWS`` of the C-contiguous
    (N, C) ``x``; lanes past the last row get 0 (finite, so they stay out of every special
    case; their results are never stored)."""
    N, C = x.shape
    W = _lanes(x)
    n = min(TILE_ROWS, N - r0)
    nb = n - n % W      # rows in whole blocks of W (all of them in a full tile)
    cw = C - C % W
    for jb in range(0, nb, W):
        for c0 in range(0, cw, W):
            transpose_block(x, r0 + jb, c0, buf, c0, jb)
        if cw < C:
            transpose_part(x, r0 + jb, cw, buf, cw, jb, W, C - cw)
    if nb < n:
        for c0 in range(0, C, W):
            transpose_part(x, r0 + nb, c0, buf, c0, nb, n - nb, min(W, C - c0))
    for c in range(C):
        for j in range(n, TILE_ROWS):
            buf[c, j] = 0


@njit(fastmath=FASTMATH, error_model="numpy")
def store_tile(buf, out, r0):
    """``out[r0 + j, c] = buf[c, j]`` for the rows of the tile that exist in ``out``."""
    N, C = out.shape
    W = _lanes(out)
    n = min(TILE_ROWS, N - r0)
    nb = n - n % W
    cw = C - C % W
    for jb in range(0, nb, W):
        for c0 in range(0, cw, W):
            transpose_block(buf, c0, jb, out, r0 + jb, c0)
        if cw < C:
            transpose_part(buf, cw, jb, out, r0 + jb, cw, C - cw, W)
    if nb < n:
        for c0 in range(0, C, W):
            transpose_part(buf, c0, nb, out, r0 + nb, c0, min(W, C - c0), n - nb)


@njit(fastmath=FASTMATH, error_model="numpy")
def tile_max(buf, m):
    """``m[j]`` = the NaN-propagating max of lane j of the (C, TILE_ROWS) ``buf``.  Four
    classes are merged in registers before each update of ``m``: with one update per class
    LLVM may keep ``m`` in memory and turn the NaN select into a masked store, whose
    store-to-load round trip made the max a quarter of a softmax tile
    (docs/performance.md "Session 5")."""
    wide_vectors()
    C = buf.shape[0]
    for j in range(TILE_ROWS):
        m[j] = -np.inf
    c4 = C - C % 4
    for c in range(0, c4, 4):
        for j in range(TILE_ROWS):
            m[j] = nan_max(m[j], nan_max(nan_max(buf[c, j], buf[c + 1, j]),
                                         nan_max(buf[c + 2, j], buf[c + 3, j])))
    for c in range(c4, C):
        for j in range(TILE_ROWS):
            m[j] = nan_max(m[j], buf[c, j])


@njit(fastmath=FASTMATH, error_model="numpy")
def tile_max_sumexp(buf, m, s, sh, keep_exp):
    """Per lane j of the (C, TILE_ROWS) ``buf``: the max ``m[j]`` (NaN-propagating), the safe
    shift ``sh[j]`` and ``s[j] = sum_c exp(buf[c, j] - sh[j])`` -- 0 when the max is not
    finite, as ``row_max_sumexp`` gives it.  With ``keep_exp`` the terms replace the logits
    in ``buf`` (softmax and the gradient then need no second exp)."""
    wide_vectors()
    C = buf.shape[0]
    for j in range(TILE_ROWS):
        s[j] = 0
    tile_max(buf, m)
    for j in range(TILE_ROWS):
        sh[j] = safe_shift(m[j])
    if keep_exp:
        for c in range(C):
            for j in range(TILE_ROWS):
                e = exp_term(buf[c, j] - sh[j])
                s[j] += e
                buf[c, j] = e
    else:
        for c in range(C):
            for j in range(TILE_ROWS):
                s[j] += exp_term(buf[c, j] - sh[j])
    for j in range(TILE_ROWS):
        finite = m[j] > -np.inf and m[j] < np.inf
        s[j] = s[j] if finite else buf.dtype.type(0)


@njit(fastmath=FASTMATH, error_model="numpy")
def tile_max_rest(buf, m, rest, work):
    """Per lane j of the (C, TILE_ROWS) ``buf``: the max ``m[j]`` and, in float64,
    ``rest[j] = sum_c exp(buf[c, j] - m[j])`` over the entries below the max, plus one for
    each further entry equal to it: ``logsumexp = m + log1p(rest)`` to full relative
    precision (each difference exact and each term within 1.5 ulp, :func:`rest_term`; the
    sum Kahan-compensated in the data's dtype, :func:`kahan_add`).  A lane whose max is not
    finite gets ``rest = 0`` (``m - x + log1p(rest)`` then gives the one-pass values there:
    -inf or NaN entries from ``m``).  ``work``: (3, TILE_ROWS) scratch of ``buf``'s dtype."""
    wide_vectors()
    C = buf.shape[0]
    zero = buf.dtype.type(0)
    hi, lo, ties = work[0], work[1], work[2]
    for j in range(TILE_ROWS):
        hi[j] = 0
        lo[j] = 0
        ties[j] = 0
    tile_max(buf, m)
    one = buf.dtype.type(1)
    for c in range(C):
        for j in range(TILE_ROWS):
            v = buf[c, j]
            term = rest_term(v, m[j]) if v < m[j] else zero
            hi[j], lo[j] = kahan_add(hi[j], lo[j], term)
            # a select: converting the comparison to a number took three more operations
            ties[j] += one if v == m[j] else zero
    for j in range(TILE_ROWS):
        finite = m[j] > -np.inf and m[j] < np.inf
        r = rest_total(np.float64(hi[j]), -np.float64(lo[j]), buf.itemsize,
                       np.float64(ties[j]))
        rest[j] = r if finite else np.float64(0)


@njit(fastmath=FASTMATH, error_model="numpy")
def _tile_scratch(x):
    """The tile buffer and its per-lane vectors (max, sum, safe shift, log of the sum),
    allocated once per task of ``TILES_PER_TASK`` tiles."""
    C = x.shape[1]
    return (np.empty((C, TILE_ROWS), dtype=x.dtype), np.empty(TILE_ROWS, dtype=x.dtype),
            np.empty(TILE_ROWS, dtype=x.dtype), np.empty(TILE_ROWS, dtype=x.dtype),
            np.empty(TILE_ROWS, dtype=x.dtype))


@njit(fastmath=FASTMATH, error_model="numpy")
def _tasks(N):
    """The parallel loop's units: runs of ``TILES_PER_TASK`` tiles (the scratch arrays are
    allocated once per run, not once per tile: ~10 % of a 32-class tile's time)."""
    n_tiles = (N + TILE_ROWS - 1) // TILE_ROWS
    return (n_tiles + TILES_PER_TASK - 1) // TILES_PER_TASK, n_tiles


@njit(fastmath=FASTMATH, error_model="numpy")
def _pair_blocks(N):
    return (N + _PAIR_BLOCK - 1) // _PAIR_BLOCK


@njit(fastmath=FASTMATH, error_model="numpy")
def _finite_pair(a, b):
    return abs(a) < np.inf and abs(b) < np.inf


# "contract" only: the pair primitives are inlined and must not be reassociated.  Each loop
# first copies the block's two columns into contiguous scratch: a loop reading the (N, 2)
# rows in place stays scalar (strided loads), about 4x slower.
@njit(fastmath={"contract"}, error_model="numpy")
def lse_pairs(x, out, r0, r1):
    """logsumexp of the two-class rows ``r0:r1`` of the (N, 2) ``x`` into ``out[:, 0]`` in
    closed form (:func:`pair_lse_parts`): no transpose, no second pass, vectorized across
    rows.  Returns the number of rows with a non-finite logit (their results are not valid:
    the caller then runs the tiles on the call)."""
    wide_vectors()
    n = r1 - r0
    a, b = np.empty(n, x.dtype), np.empty(n, x.dtype)
    for i in range(n):
        a[i] = x[r0 + i, 0]
        b[i] = x[r0 + i, 1]
    bad = 0
    for i in range(n):
        av, bv = a[i], b[i]
        M, L = pair_lse_parts(av, bv)
        a[i] = M + L
        bad += not _finite_pair(av, bv)
    for i in range(n):
        out[r0 + i, 0] = a[i]
    return bad


@njit(fastmath={"contract"}, error_model="numpy")
def ce_index_pairs(x, target, ignore_index, weight, w_total, eps, gscale, grad, loss, r0, r1):
    """Class-index cross-entropy of the two-class rows ``r0:r1`` of the (N, 2) ``x``, forward
    or with the gradient, in closed form (``cross_entropy.index_pairs``, the K-dim layout's
    two-class kernel; full relative precision on confident rows without the tiles' second
    pass): the rows' two columns, targets and upstream factors
    copied into contiguous runs (a loop over the interleaved rows stays scalar), the losses
    and gradients copied back.  Targets already checked.  Returns the number of rows with a
    non-finite logit (the caller then runs the tiles on the call)."""
    wide_vectors()
    n = r1 - r0
    a, b, ln = np.empty(n, x.dtype), np.empty(n, x.dtype), np.empty(n, x.dtype)
    t = np.empty(n, target.dtype)
    for i in range(n):
        a[i] = x[r0 + i, 0]
        b[i] = x[r0 + i, 1]
        t[i] = target[r0 + i]
    want_grad = grad.shape[0] > 0
    m = n if want_grad else 0
    gs, g0, g1 = np.empty(m, x.dtype), np.empty(m, x.dtype), np.empty(m, x.dtype)
    if want_grad:
        _upstream_block(gscale, r0, gs, n)
    bad, _, _ = index_pairs(a, b, t, ignore_index, weight, w_total, eps, gs, g0, g1, ln)
    for i in range(n):
        loss[r0 + i] = ln[i]
    if want_grad:
        for i in range(n):
            grad[r0 + i, 0] = g0[i]
            grad[r0 + i, 1] = g1[i]
    return bad


def _softmax_tiles(x, out, mode):
    """The rows layout of ``softmax._softmax_rows`` (whole rows, no split), tile by tile.
    ``out`` is (N, 1) for logsumexp, (N, C) otherwise."""
    wide_vectors()
    N, C = x.shape
    if C == 2 and mode == MODE_LOGSUMEXP:
        bad = 0
        for blk in prange(_pair_blocks(N)):
            bad += lse_pairs(x, out, blk * _PAIR_BLOCK, min(N, (blk + 1) * _PAIR_BLOCK))
        if bad == 0:
            return
    n_tasks, n_tiles = _tasks(N)
    for task in prange(n_tasks):
        buf, m, s, sh, L = _tile_scratch(x)
        lp = np.empty(TILE_ROWS)
        work = np.empty((3, TILE_ROWS), dtype=x.dtype)
        for tile in range(task * TILES_PER_TASK, min(n_tiles, (task + 1) * TILES_PER_TASK)):
            _softmax_tile(x, out, mode, tile * TILE_ROWS, buf, m, s, sh, L, lp, work)


@njit(fastmath=FASTMATH, error_model="numpy")
def _softmax_tile(x, out, mode, r0, buf, m, s, sh, L, lp, work):
    """One tile of :func:`_softmax_tiles`: the rows ``r0 .. r0 + TILE_ROWS``."""
    wide_vectors()
    N, C = x.shape
    n = min(TILE_ROWS, N - r0)
    load_tile(x, r0, buf)
    if mode == MODE_LOG_SOFTMAX:
        # Every row as max + log1p(rest) (see tile_max_rest): full relative precision at
        # the max entry without a second pass for the confident rows, which are most
        # rows at these lengths.
        tile_max_rest(buf, m, lp, work)
        for j in range(TILE_ROWS):
            L[j] = log1p(lp[j])
        # -((max - x) + log1p(rest)): exact at the max entry, one rounding more elsewhere.
        for c in range(C):
            for j in range(TILE_ROWS):
                buf[c, j] = -lse_minus(m[j], L[j], buf[c, j])
        store_tile(buf, out, r0)
        return
    tile_max_sumexp(buf, m, s, sh, mode != MODE_LOGSUMEXP)
    for j in range(TILE_ROWS):
        m[j], L[j] = shift_log_sum(m[j], s[j])   # m keeps the shift a: lse = a + L
    if mode == MODE_LOGSUMEXP:
        for j in range(n):
            lse = m[j] + L[j]
            if lse_needs_rest(lse, L[j]):
                lse = x.dtype.type(lse_confident(x[r0 + j]))
            out[r0 + j, 0] = lse
    else:   # softmax
        for j in range(TILE_ROWS):
            L[j] = inv_sum(m[j], s[j])
        for c in range(C):
            for j in range(TILE_ROWS):
                buf[c, j] = buf[c, j] * L[j]
        store_tile(buf, out, r0)


def _ce_index_tiles(x, target, ignore_index, weight, w_total, eps, gscale, grad, loss):
    """``cross_entropy._ce_index_rows`` (whole rows) tile by tile: ``loss[i]`` receives row
    i's loss; ``grad`` with 0 rows means forward only."""
    N, C = x.shape
    if C == 2:
        bad = 0
        for blk in prange(_pair_blocks(N)):
            bad += ce_index_pairs(x, target, ignore_index, weight, w_total, eps, gscale, grad,
                                  loss, blk * _PAIR_BLOCK, min(N, (blk + 1) * _PAIR_BLOCK))
        if bad == 0:
            return
    n_tasks, n_tiles = _tasks(N)
    rest_max_c = _REST_TILE_MAX_C64 if x.itemsize == 8 else _REST_TILE_MAX_C32
    if C <= rest_max_c and eps == 0 and grad.shape[0] == 0:
        for task in prange(n_tasks):
            buf, m, s, sh, L = _tile_scratch(x)
            rest = np.empty(TILE_ROWS)
            work = np.empty((3, TILE_ROWS), dtype=x.dtype)
            for tile in range(task * TILES_PER_TASK, min(n_tiles, (task + 1) * TILES_PER_TASK)):
                _ce_index_rest_tile(x, target, ignore_index, weight, loss, tile * TILE_ROWS,
                                    buf, m, rest, work)
        return
    for task in prange(n_tasks):
        buf, m, s, sh, L = _tile_scratch(x)
        acc = np.empty(TILE_ROWS, dtype=x.dtype)
        rest = np.empty(TILE_ROWS)
        pivot = np.empty(TILE_ROWS)
        skip = np.empty(TILE_ROWS, dtype=np.int64)
        # the logits where the gradient's pass has turned buf into exps
        xsave = np.empty((C if grad.shape[0] > 0 else 0, TILE_ROWS), dtype=x.dtype)
        for tile in range(task * TILES_PER_TASK, min(n_tiles, (task + 1) * TILES_PER_TASK)):
            _ce_index_tile(x, target, ignore_index, weight, w_total, eps, gscale, grad, loss,
                           tile * TILE_ROWS, buf, m, s, sh, L, acc, rest, pivot, skip, xsave)


@njit(fastmath=FASTMATH, error_model="numpy")
def _row_target(x, target, ignore_index, weight, i):
    """(whether row i is ignored, its target's weight, its target logit); the logit is
    not read for an ignored row (its index may lie outside the row)."""
    t = target[i]
    if t == ignore_index:
        return True, x.dtype.type(0), x.dtype.type(0)
    return False, weight[t] if weight.shape[0] > 0 else x.dtype.type(1), x[i, t]


@njit(fastmath=FASTMATH, error_model="numpy")
def _ce_index_rest_tile(x, target, ignore_index, weight, loss, r0, buf, m, rest, work):
    """One tile of the forward loss (no smoothing, no gradient) of few-class rows, every row
    as ``w_t ((max - x_t) + log1p(rest))`` from :func:`tile_max_rest`: the precise rest in
    the one statistics pass, so that no row needs the confident rows' second pass (at a few
    classes, about one row in C has its target at the max).  Both terms are >= 0: full
    relative precision on every row.  Non-finite rows keep the other path's values: a max of
    +-inf or NaN gives ``rest = 0`` and ``max - x_t`` its inf/NaN; a target logit of -inf
    costs +inf."""
    wide_vectors()
    n = min(TILE_ROWS, x.shape[0] - r0)
    load_tile(x, r0, buf)
    tile_max_rest(buf, m, rest, work)
    for j in range(TILE_ROWS):
        rest[j] = log1p(rest[j])
    for j in range(n):
        ignored, w_t, xt = _row_target(x, target, ignore_index, weight, r0 + j)
        # float64: exact for float32 logits, and no "reassoc" regrouping (lse_minus)
        v = x.dtype.type(lse_minus(np.float64(m[j]), rest[j], np.float64(xt)))
        v = w_t * v if xt != -np.inf else x.dtype.type(np.inf)
        loss[r0 + j] = x.dtype.type(0) if ignored else v


@njit(fastmath=FASTMATH, error_model="numpy")
def _ce_index_tile(x, target, ignore_index, weight, w_total, eps, gscale, grad, loss, r0, buf,
                   m, s, sh, L, acc, rest, pivot, skip, xsave):
    """One tile of :func:`_ce_index_tiles`: the rows ``r0 .. r0 + TILE_ROWS``."""
    wide_vectors()
    N, C = x.shape
    has_w = weight.shape[0] > 0
    want_grad = grad.shape[0] > 0
    one = x.dtype.type(1)
    zero = x.dtype.type(0)
    eps_c = x.dtype.type(eps / C)
    keep = x.dtype.type(1 - eps)
    n = min(TILE_ROWS, N - r0)
    for j in range(TILE_ROWS):
        acc[j] = 0
        rest[j] = -1        # >= 0: a confident row's rest sum
        pivot[j] = 0
        skip[j] = -1
    load_tile(x, r0, buf)
    # With the gradient, buf's logits become their exps (tile_max_sumexp); xs keeps the
    # logits where the smoothing sum needs them.
    xs = buf
    if want_grad and eps > 0:
        xs = xsave
        for c in range(C):
            for j in range(TILE_ROWS):
                xs[c, j] = buf[c, j]
    tile_max_sumexp(buf, m, s, sh, want_grad)
    for j in range(TILE_ROWS):
        m[j], L[j] = shift_log_sum(m[j], s[j])
    if eps > 0:
        for c in range(C):
            wc = weight[c] if has_w else one
            for j in range(TILE_ROWS):
                acc[j] += wc * lse_minus(m[j], L[j], xs[c, j])
    n_conf = 0
    for j in range(n):
        i = r0 + j
        ignored, w_t, xt = _row_target(x, target, ignore_index, weight, i)
        if ignored:
            loss[i] = 0
            continue
        t = target[i]
        # A target logit of -inf (masked class) costs +inf, even in an all-masked row.
        if xt != -np.inf:
            nll = lse_minus(m[j], L[j], xt)
            if confident(xt - m[j], nll):
                pivot[j] = xt
                skip[j] = t
                n_conf += 1
            part = keep * w_t * nll
        else:
            part = x.dtype.type(np.inf)
        loss[i] = part + eps_c * acc[j] if eps > 0 else part
    if n_conf > 0:
        # Confident rows (the target holds the max, the loss is small): their rest sums,
        # row by row when few, else vectorized across the tile's rows as in the K-dim
        # layout (1, C, TILE_ROWS).
        if n_conf > _FEW_CONFIDENT:
            if want_grad and eps == 0:
                xs = xsave
                load_tile(x, r0, xs)
            spatial_rest_sum(xs.reshape(1, C, TILE_ROWS), 0, 0, TILE_ROWS, pivot, skip,
                             rest)
        for j in range(n):
            if skip[j] < 0:
                rest[j] = -1
            else:
                if n_conf <= _FEW_CONFIDENT:
                    rest[j] = rest_sum(x[r0 + j], skip[j], pivot[j])
                t = skip[j]
                w_t = weight[t] if has_w else one
                part = keep * w_t * x.dtype.type(log1p(rest[j]))
                loss[r0 + j] = part + eps_c * acc[j] if eps > 0 else part
    if want_grad:
        # Per lane: acc <- g A, L <- g eps/C (0 for ignored rows and padding), then
        # acc <- g A / s: one factor per row, formed here once.  Written as
        # acc * (buf * s), "reassoc" lets LLVM hoist acc * s out of the class loop in one
        # compilation of this function and not in another (its own library's vs the copy
        # re-optimized inside a caller's module; which one a caller runs depends on whether
        # the cache or this process compiled it): results 1 ulp apart.
        for j in range(TILE_ROWS):
            acc[j] = zero
            L[j] = zero
        for j in range(n):
            t = target[r0 + j]
            if t != ignore_index:
                g = _upstream(gscale, r0 + j)
                w_t = weight[t] if has_w else one
                acc[j] = g * (keep * w_t + eps_c * w_total)
                L[j] = g * eps_c
        for j in range(TILE_ROWS):
            acc[j] = acc[j] * inv_sum(m[j], s[j])
        for c in range(C):
            wc = weight[c] if has_w else one
            for j in range(TILE_ROWS):
                buf[c, j] = acc[j] * buf[c, j] - L[j] * wc
        store_tile(buf, grad, r0)
        for j in range(n):
            i = r0 + j
            t = target[i]
            if t == ignore_index:
                # Exactly 0, also where the row holds NaN or -inf (0 * NaN is NaN).
                grow = grad[i]
                for c in range(C):
                    grow[c] = 0
                continue
            g = _upstream(gscale, i)
            w_t = weight[t] if has_w else one
            if rest[j] >= 0:
                grad[i, t] = _target_grad(rest[j], g, keep * w_t, eps_c, w_total, w_t, 0.0)
            else:
                grad[i, t] -= g * keep * w_t


softmax_tiles, softmax_tiles_serial = kernel_twins(_softmax_tiles)
ce_index_tiles, ce_index_tiles_serial = kernel_twins(_ce_index_tiles)


# The small-call entry of ``cross_entropy`` (``ce_index_small``: target check, denominator,
# kernel and reduction in one jitted function) with the tiles body in place of the rows body:
# the same code object, its rows kernel bound to :func:`_ce_index_tiles_as_rows`.
@njit(inline="always", fastmath=FASTMATH, error_model="numpy")
def _ce_index_tiles_as_rows(x, target, ignore_index, weight, w_total, eps, gscale, grad,
                            loss_part, n_chunks, stat_m, stat_s, cap, z_loss, lse):
    # (The small entry passes no softcap, z-loss or lse: cap, z_loss and lse are None.)
    _ce_index_tiles_inlined(x, target, ignore_index, weight, w_total, eps, gscale, grad,
                            loss_part.reshape(x.shape[0]))


_ce_index_tiles_inlined = njit(inline="always", fastmath=FASTMATH, error_model="numpy")(
    _ce_index_tiles)


def _small_entry():
    body = ce_index_small.py_func
    scope = dict(body.__globals__, _ce_index_rows_inlined=_ce_index_tiles_as_rows)
    fn = pytypes.FunctionType(body.__code__, scope, "ce_index_small_tiles", body.__defaults__,
                              body.__closure__)
    fn.__qualname__ = "ce_index_small_tiles"
    fn.__doc__ = body.__doc__
    return njit(fastmath=FASTMATH, error_model="numpy", cache=True, nogil=True)(fn)


ce_index_small_tiles = _small_entry()
