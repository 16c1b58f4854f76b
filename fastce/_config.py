"""Tuning knobs shared by the kernels: fastmath flags, block sizes, thresholds, launch sizes.

The CPU values were chosen by measurement on the project's 2-vCPU znver4 machines, where
``docs/performance.md`` gives the figures; the CUDA launch values are starting points that no
GPU measurement has confirmed yet (``docs/gpu.md``).  The kernels read these as compile-time
constants (change them before the first call); the CUDA host reads its launch values at
call time.
"""

# LLVM fast-math flags for every CPU kernel.  Deliberately not numba's blanket fast-math: that implies
# ``nnan``/``ninf``, which lets LLVM fold away the ``-inf``/NaN guards that masked logits rely on.
# ``reassoc`` is what lets the sum reductions vectorize; ``contract`` allows FMA.
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}

# Rows are processed in blocks of this many classes: the block max is found first (vectorized),
# then the block's exp-sum is taken against the running max while the block is still in L1.
CLASS_BLOCK = 1024

# Below this many logits a call runs the serial kernel: waking the thread pool costs more than
# the work.
PARALLEL_MIN_ELEMENTS = 1 << 16
# log_softmax and softmax (a full N x C output to write) run threaded from this many logits:
# their write pass scales with a second thread where the pool's wake-up (tbb) costs a few us
# (docs/performance.md, "Session 4: medium and large softmax-family cells").
PARALLEL_MIN_WRITE_ELEMENTS = 1 << 15

# The BCE family runs threaded from this many elements (float32, float64): a float64
# element's log/exp work costs about three float32 ones, so the pool's round trip pays off
# earlier (docs/performance.md, "Session 5: few-class cells").
PARALLEL_MIN_BCE_ELEMENTS = (1 << 16, 1 << 15)

# The elementwise BCE kernels cut their input into chunks of this many elements (the units the
# threads share; a flat input is one long row).
BCE_CHUNK = 8192
# A weight or pos_weight that repeats along rows shorter than this is materialized to the
# input's full shape so that the kernel runs over one flat row instead of many short ones.
BCE_MIN_ROW = 64
# At import (unless numba's threading layer already runs), load libtbb from where pip/conda
# put it, so that the layer, whoever launches it, finds tbb: tbb stays fast when the other
# core is busy, omp does not (docs/performance.md).  False: numba's own search only (read
# once, when fastce is imported).
PREFER_TBB = True

# With fewer rows than this many per thread, rows are split into chunks that run on different
# threads and their (max, sum-exp) partials are merged.
SPLIT_ROWS_PER_THREAD = 2
# Smallest chunk of one row worth handing to a thread.
SPLIT_MIN_CHUNK = 1 << 14

# Class-index cross-entropy calls of at most this many logits that the small-call entry would
# take run the scalar float64 kernel ``_cpu.tiny`` instead: it compiles in a fraction of the
# vectorized entry's time (the first call in a fresh process) and runs as fast up to about
# this size, slower beyond (libm's scalar exp; docs/performance.md, "First call").
TINY_MAX_ELEMENTS = 40

# (N, C) cross-entropy with at most FEW_CLASSES classes and at least FEW_CLASSES_MIN_ROWS rows
# (that the row tiles do not take: probability targets) runs as the K-dim layout (1, C, N):
# vectorized across rows instead of paying a row's fixed cost for 2-16 classes.  Tried up to
# 128 classes: no gain from 32 on.
FEW_CLASSES = 16
FEW_CLASSES_MIN_ROWS = 64

# Many short rows run as row tiles (``_cpu.tiles``): TILE_ROWS rows transposed in cache so that
# the vector lanes are rows.  Taken for rows of ROW_TILE_MIN_CLASSES to ROW_TILE_MAX_CLASSES
# classes (by dtype: float32, float64; float64 rows of 256 ran faster in the rows kernels)
# and at least ROW_TILE_MIN_ROWS rows (docs/performance.md, "Many short rows").  Class-index
# cross-entropy takes them before the FEW_CLASSES layout below (faster at every C measured).
TILE_ROWS = 64
# Tiles per unit of the parallel loop (scratch arrays are allocated once per unit).
TILES_PER_TASK = 4
ROW_TILE_MIN_CLASSES = 1
ROW_TILE_MAX_CLASSES = (256, 192)
ROW_TILE_MIN_ROWS = 32
# A partial tile (fewer than TILE_ROWS rows) costs a whole tile: it is taken only while the work of
# its empty lanes, (TILE_ROWS - N) * C, stays at most this; 32 x 100 ran faster as rows
# (docs/performance.md, "Session 5: partial tiles").
ROW_TILE_PARTIAL_MAX_WASTE = 2048

# The forward class-index loss (no smoothing, no gradient) of tile rows of at most this many
# classes (float32, float64) computes every row's precise rest in its one statistics pass
# (``tiles._ce_index_rest_tile``) instead of an exp-sum plus the confident rows' second pass:
# faster at few classes, slower beyond (docs/performance.md, "Session 5: few-class cells").
CE_REST_TILE_MAX_CLASSES = (16, 10)

# Rows of at most this many classes skip the block machinery of ``row_max_sumexp`` (prefetch,
# stale-shift bookkeeping): a max, then an exp-sum.
SHORT_ROW = 64

# K-dim inputs (N, C, S): spatial positions processed together per class (vectorized across S).
SPATIAL_BLOCK = 256
# Class-index cross-entropy over K-dim inputs: blocks per unit of the parallel loop (the
# scratch is allocated once per unit); two classes, in closed form, take blocks of
# SPATIAL_PAIR_BLOCK positions; up to SPATIAL_SELECT_MAX_CLASSES classes a position's target
# logit is selected in a vectorized pass over the classes instead of gathered one by one
# (docs/performance.md, "Session 5: K-dim cross-entropy").
SPATIAL_BLOCKS_PER_TASK = 8
SPATIAL_PAIR_BLOCK = 2048
SPATIAL_SELECT_MAX_CLASSES = 16

# The data checks (``_cpu.checks``) test values in blocks of this many: a branch-free
# and-reduction per block, the position search only in a block that failed.
CHECK_BLOCK = 4096

# CUDA launch configuration.
CUDA_THREADS_PER_BLOCK = 256
# Rows of at most this many classes get a warp (or a sub-warp: a power of two >= C) each,
# larger ones a block (a block per row left most of its threads idle on short rows; measured in
# docs/gpu.md).
CUDA_SMALL_C = 1024
# K-dim inputs (rows strided by S > 1) with at most this many classes get a thread per row
# (neighbouring threads read neighbouring positions); S >= 32 always does.
CUDA_THREAD_ROW_MAX_C = 64
# Rows with a huge C are split over several blocks when there are fewer rows than this many
# blocks (about two per SM of an H100) ...
CUDA_SPLIT_TARGET_BLOCKS = 264
# ... in chunks of at least this many classes.
CUDA_SPLIT_MIN_CHUNK = 4096
# Device-side sums (the 'mean'/'sum' reductions, the weight totals): each thread of the first
# pass adds at least this many values, over at most this many blocks.
CUDA_REDUCE_ITEMS_PER_THREAD = 8
CUDA_REDUCE_MAX_BLOCKS = 1024

# Linear cross-entropy (fastce.linear._chunking): the logits held at once stay within this
# many values (64 MB of float32), in blocks of LINEAR_VOCAB_CHUNK vocabulary entries; a row
# chunk's logits are kept for the gradient pass (else recomputed) while that leaves at least
# LINEAR_MIN_ROWS rows per chunk.  NumPy's matmuls accumulate in slabs of LINEAR_VOCAB_SLAB
# rows (a temporary of that many rows instead of the whole output).
LINEAR_CHUNK_ELEMENTS = 1 << 25
LINEAR_VOCAB_CHUNK = 32768
LINEAR_MIN_ROWS = 256
LINEAR_VOCAB_SLAB = 4096
