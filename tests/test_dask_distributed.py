"""fastce.dask out of core on dask.distributed: a LocalCluster of 2 worker processes, each with
a memory limit, computes cross-entropy over logits several times larger than one worker's limit
(and than both together), generated lazily block by block from seeds; no worker may restart,
and the value must equal a block-by-block in-memory loop over the same blocks."""
import time

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")
from distributed.diagnostics import MemorySampler  # noqa: E402

import fastce  # noqa: E402
import fastce.dask as fd  # noqa: E402

ROWS, CLASSES = 8192, 98304                 # float32: 3.22 GB of logits
ROW_CHUNK, CLASS_CHUNK = 256, 8192          # 8 MiB blocks, 32 x 12 of them
WORKER_LIMIT = 350 * 2**20                  # bytes, per worker process
IGNORE = -1


def test_out_of_core_cross_entropy_on_local_cluster():
    # Nested so that cloudpickle sends them to the workers by value.
    def logits_block(block_info=None):
        loc = block_info[None]["chunk-location"]
        shape = block_info[None]["chunk-shape"]
        rng = np.random.default_rng((20261124, *loc))
        return rng.random(shape, dtype=np.float32) * np.float32(8) - np.float32(4)

    def target_block(block_info=None):
        (i,) = block_info[None]["chunk-location"]
        rng = np.random.default_rng((7, i))
        t = rng.integers(0, CLASSES, block_info[None]["chunk-shape"])
        t[::17] = IGNORE
        return t

    chunks = ((ROW_CHUNK,) * (ROWS // ROW_CHUNK), (CLASS_CHUNK,) * (CLASSES // CLASS_CHUNK))
    x = da.map_blocks(logits_block, chunks=chunks, dtype=np.float32)
    t = da.map_blocks(target_block, chunks=chunks[:1], dtype=np.int64)
    assert x.nbytes > 4 * WORKER_LIMIT

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  memory_limit=WORKER_LIMIT, dashboard_address=None,
                                  silence_logs=50) as cluster, \
            distributed.Client(cluster) as client:
        pids = client.run(lambda: __import__("os").getpid())
        sampler = MemorySampler()
        start = time.perf_counter()
        with sampler.sample("ce", interval=0.1):
            loss = fd.cross_entropy(x, t, ignore_index=IGNORE, label_smoothing=0.1).compute()
        seconds = time.perf_counter() - start
        peak = max(v for _, v in sampler.samples["ce"])   # both workers' process memory
        # The same two processes did all the work: no worker was restarted or replaced.
        assert client.run(lambda: __import__("os").getpid()) == pids
        assert len(client.scheduler_info()["workers"]) == 2
    print(f"\nout of core: logits {x.shape} float32 = {x.nbytes / 1e9:.2f} GB, 2 workers x "
          f"{WORKER_LIMIT / 2**20:.0f} MiB limit, computed in {seconds:.1f} s; peak memory of "
          f"both worker processes together {peak / 2**20:.0f} MiB")

    # Block by block in memory: one row block of full rows at a time.
    total, denom = 0.0, 0.0
    for i in range(ROWS // ROW_CHUNK):
        rows = np.concatenate([logits_block({None: {"chunk-location": (i, j),
                                                    "chunk-shape": (ROW_CHUNK, CLASS_CHUNK)}})
                               for j in range(CLASSES // CLASS_CHUNK)], axis=1)
        ti = target_block({None: {"chunk-location": (i,), "chunk-shape": (ROW_CHUNK,)}})
        total += float(fastce.cross_entropy(rows, ti, ignore_index=IGNORE, label_smoothing=0.1,
                                            reduction="sum"))
        denom += float(np.count_nonzero(ti != IGNORE))
    expected = total / denom
    assert abs(float(loss) - expected) <= 2e-6 * abs(expected), (float(loss), expected)
