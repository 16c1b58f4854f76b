"""pytest fixtures shared by the test modules (the helpers they import are in helpers.py)."""
import os

import numpy as np
import pytest

# Modules whose module-scoped fixture is a costly subprocess (every CUDA kernel compiled to
# PTX / SASS, an asv run): under pytest-xdist each goes whole to one worker (see
# pytest_xdist_make_scheduler), so that the fixture runs once instead of once per worker.
ONE_WORKER_MODULES = ("test_cuda_static.py", "test_cuda_ptx.py", "test_report.py")
# Long single tests (subprocesses: the CUDA simulator shards, fresh-interpreter probes) go
# first, so that the workers do not end waiting on one of them.
SLOW_FIRST = ("test_cuda_sim.py::test_cuda_kernels_in_simulator",)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """``FASTCE_SIM_SHARD=i/n`` (set by tests/test_cuda_sim.py for its subprocesses) keeps
    every n-th collected test from the i-th on: the n shards together run each test once.
    Otherwise: the slow-first order above (the same on every xdist worker)."""
    shard = os.environ.get("FASTCE_SIM_SHARD")
    if shard:
        i, n = (int(v) for v in shard.split("/"))
        keep = [item for k, item in enumerate(items) if k % n == i]
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep
        return
    items.sort(key=lambda item: not any(s in item.nodeid for s in SLOW_FIRST))


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: unknown without it (-p no:xdist)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's default ``--dist load``, except that each of ONE_WORKER_MODULES is sent
    whole to one worker.  (``--dist loadgroup`` would do it with marks, but pytest-xdist 3.8
    cannot rename the tests of pytest 9 to their group, so its groups are ignored.)"""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerModules(LoadScopeScheduling):
        # A scope is a unit of work sent to one worker: the module for those modules, else
        # the test itself.  Scopes go out largest first (those modules), then in collection
        # order.
        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0]
            return module if os.path.basename(module) in ONE_WORKER_MODULES else nodeid

    return OneWorkerModules(config, log)
