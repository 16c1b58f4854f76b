"""pytest fixtures shared by the test modules (the helpers they import are in helpers.py)."""
import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def pytest_collection_modifyitems(config, items):
    """``FASTCE_SIM_SHARD=i/n`` (set by tests/test_cuda_sim.py for its subprocesses) keeps
    every n-th collected test from the i-th on: the n shards together run each test once."""
    import os
    shard = os.environ.get("FASTCE_SIM_SHARD")
    if not shard:
        return
    i, n = (int(v) for v in shard.split("/"))
    keep = [item for k, item in enumerate(items) if k % n == i]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep
