"""fastce.dask against the in-memory path: cross-entropy forward at a large shape, the logits
already in memory (in-memory), in the threaded scheduler's process (dask-threads), or persisted
on a dask.distributed LocalCluster of 1 or 2 single-threaded worker processes.

Skipped (NotImplementedError) where dask / distributed are not installed.  The grid is tiny:
each cluster path starts worker processes and holds a copy of the logits on them.

Run directly for the scaling table of docs/scale-out.md (one process, paths interleaved,
medians), or for where a cluster call's time goes::

    .venv/bin/python -m benchmarks.bench_dask
    .venv/bin/python -m benchmarks.bench_dask --task-stream
"""
import atexit
import time

import numpy as np

from . import common as C

PATHS = ["in-memory", "dask-threads", "dask-1-worker", "dask-2-workers"]
SHAPES = [(4096, 32000), (16384, 32000)]
CHUNKS = (1024, 16000)   # blocks of 64 MB (float32): 2 class chunks per row

_clusters = {}


def _close_clusters():
    for client, cluster in _clusters.values():
        client.close()
        cluster.close()
    _clusters.clear()


atexit.register(_close_clusters)


def _cluster(n_workers):
    """A LocalCluster of ``n_workers`` single-threaded worker processes and its client, one per
    process (asv re-runs setup before every sample)."""
    if n_workers not in _clusters:
        _close_clusters()
        from distributed import Client, LocalCluster
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=50)
        _clusters[n_workers] = (Client(cluster), cluster)
    return _clusters[n_workers][0]


def make_case(path, shape):
    """A no-argument callable computing the mean cross-entropy of float32 logits of ``shape``
    by ``path``, warmed up (kernels compiled, data in place)."""
    try:
        import dask
        import dask.array as da
        import fastce.dask as fd
    except ImportError as exc:
        raise NotImplementedError(f"dask is not installed: {exc}") from None
    import fastce

    x = C.make_logits(shape, "float32")
    t = C.make_targets(shape[:1], shape[1])
    if path == "in-memory":
        def call():
            return fastce.cross_entropy(x, t)
    elif path == "dask-threads":
        X = da.from_array(x, chunks=CHUNKS)
        T = da.from_array(t, chunks=CHUNKS[:1])

        def call():
            with dask.config.set(scheduler="threads", num_workers=C.n_threads()):
                return fd.cross_entropy(X, T).compute()
    else:
        client = _cluster(1 if path == "dask-1-worker" else 2)
        # The logits are made on the workers, block by block, and stay there, as they would
        # on a cluster: only the graph and the scalar result travel.
        chunks = da.core.normalize_chunks(CHUNKS, shape)
        seed = C.SEED

        def logits_block(block_info=None):    # nested: sent to the workers by value
            g = np.random.default_rng([seed, *block_info[None]["chunk-location"]])
            shape = block_info[None]["chunk-shape"]
            return g.standard_normal(shape, dtype=np.float32) * np.float32(3)

        X = client.persist(da.map_blocks(logits_block, chunks=chunks, dtype=np.float32))
        T = client.persist(da.from_array(t, chunks=CHUNKS[:1]))
        from distributed import wait
        wait([X, T])

        def call():
            return client.compute(fd.cross_entropy(X, T)).result()
    call()
    return call


class DaskCrossEntropy:
    """Mean cross-entropy of float32 (N, C) logits chunked (1024, 16000), by path."""

    params = [PATHS, SHAPES]
    param_names = ["path", "shape"]
    timeout = 600

    def setup(self, path, shape):
        self.call = C.memoize(("dask", path, shape), lambda: make_case(path, shape))

    def time_cross_entropy(self, path, shape):
        self.call()


def main(repeats=7):
    """The scaling table: each Dask path timed in rounds interleaved with the in-memory path
    (one cluster alive at a time), medians and ratios."""
    print(f"float32, chunks {CHUNKS}, {repeats} rounds interleaved; "
          f"NUMBA_NUM_THREADS={C.n_threads()}")
    for shape in SHAPES:
        in_memory = make_case("in-memory", shape)
        times = {p: [] for p in PATHS}
        for p in PATHS[1:]:
            call = make_case(p, shape)
            for _ in range(repeats):
                for q, f in (("in-memory", in_memory), (p, call)):
                    start = time.perf_counter()
                    f()
                    times[q].append(time.perf_counter() - start)
        _close_clusters()
        base = np.median(times["in-memory"])
        for p in PATHS:
            med = np.median(times[p])
            print(f"{shape[0]} x {shape[1]}  {p:15s} median {med * 1e3:8.1f} ms "
                  f"(min {min(times[p]) * 1e3:7.1f}, max {max(times[p]) * 1e3:7.1f})  "
                  f"{med / base:5.2f} x in-memory")


def task_stream(shape=(4096, 32000), repeats=3):
    """Where a cluster call's time goes: wall time against the summed compute and transfer
    time of its tasks (``distributed.get_task_stream``), for 1 and 2 workers."""
    from distributed import get_task_stream
    for path in PATHS[2:]:
        call = make_case(path, shape)
        client = _clusters[1 if path == "dask-1-worker" else 2][0]
        for _ in range(repeats):
            start = time.perf_counter()
            with get_task_stream(client) as ts:
                call()
            wall = time.perf_counter() - start
            spent = {}
            for task in ts.data:
                for ss in task["startstops"]:
                    spent[ss["action"]] = spent.get(ss["action"], 0.0) + ss["stop"] - ss["start"]
            print(f"{shape[0]} x {shape[1]}  {path:15s} wall {wall * 1e3:7.1f} ms  tasks: "
                  + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in sorted(spent.items())))
    _close_clusters()


if __name__ == "__main__":
    import sys
    task_stream() if "--task-stream" in sys.argv else main()
