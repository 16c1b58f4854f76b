"""Tuning knobs shared by the kernels: fastmath flags, block sizes, thresholds, launch sizes.

Every value here was chosen by measurement on the project's 2-vCPU znver4 machines; see
``docs/performance.md`` for the figures.
"""

# LLVM fast-math flags for every CPU kernel.  Deliberately not numba's blanket fast-math: that implies
# ``nnan``/``ninf``, which lets LLVM fold away the ``-inf``/NaN guards that masked logits rely on.
# ``reassoc`` is what lets the sum reductions vectorize; ``contract`` allows FMA.
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}

# Rows are processed in blocks of this many classes: the block max is found first (vectorized),
# then the block's exp-sum is taken against the running max while the block is still in L1.
CLASS_BLOCK = 1024

# Below this many logits a call runs the serial kernel: waking the thread pool costs more than
# the work (~5 us to ~8 ms on the project's machines).
PARALLEL_MIN_ELEMENTS = 1 << 16

# With fewer rows than this many per thread, rows are split into chunks that run on different
# threads and their (max, sum-exp) partials are merged.
SPLIT_ROWS_PER_THREAD = 2
# Smallest chunk of one row worth handing to a thread.
SPLIT_MIN_CHUNK = 1 << 14

# (N, C) cross-entropy with at most FEW_CLASSES classes and at least FEW_CLASSES_MIN_ROWS rows
# runs as the K-dim layout (1, C, N): vectorized across rows instead of paying a row's fixed
# cost (~90 ns) for 2-16 classes ((4096, 2) float32: 374 -> 39 us; torch 69 us).  Tried up
# to 128 classes: no gain from 32 on.
FEW_CLASSES = 16
FEW_CLASSES_MIN_ROWS = 64

# K-dim inputs (N, C, S): spatial positions processed together per class (vectorized across S).
SPATIAL_BLOCK = 256

# CUDA launch configuration.
CUDA_THREADS_PER_BLOCK = 256
CUDA_SMALL_C = 64
# Rows with a huge C are split over several blocks when there are fewer rows than this many
# blocks (about two per SM of an H100) ...
CUDA_SPLIT_TARGET_BLOCKS = 264
# ... in chunks of at least this many classes (no GPU figures yet: a starting point).
CUDA_SPLIT_MIN_CHUNK = 4096

# Linear cross-entropy: rows per chunk are chosen so that one chunk's logits hold about this
# many values (64 MB of float32); the weight gradient is accumulated in vocabulary slabs of
# this many rows (a temporary of LINEAR_VOCAB_SLAB x H instead of V x H).
LINEAR_CHUNK_ELEMENTS = 1 << 24
LINEAR_VOCAB_SLAB = 4096
