"""pytest fixtures shared by the test modules (the helpers they import are in helpers.py)."""
import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
