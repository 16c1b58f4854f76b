"""The softmax family's small path (one jitted entry for small C-contiguous float32/float64
inputs reduced along the last axis), against torch and against the general path."""
import numpy as np
import pytest
import torch

import fastce
from fastce import _softmax
from fastce._modes import MODE_LOG_SOFTMAX, MODE_LOGSUMEXP, MODE_SOFTMAX

OPS = [(fastce.logsumexp, torch.logsumexp, MODE_LOGSUMEXP),
       (fastce.log_softmax, torch.log_softmax, MODE_LOG_SOFTMAX),
       (fastce.softmax, torch.softmax, MODE_SOFTMAX)]
TOL = {np.float32: dict(rtol=2e-6, atol=1e-6), np.float64: dict(rtol=1e-14, atol=1e-15)}


def _inputs(shape, dtype):
    x = (np.random.default_rng(5).standard_normal(shape) * 4).astype(dtype)
    if x.ndim == 2 and x.shape[0] >= 4:
        x[1] = -np.inf          # a row of -inf
        x[2, 0] = 1e4           # far above the rest: probabilities 0 and 1
        x[3, -1] = np.nan
    return x


@pytest.mark.parametrize("op,top,mode", OPS)
@pytest.mark.parametrize("shape", [(1, 10), (32, 10), (10,), (1, 1), (256, 100)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_small_path_against_torch_and_general_path(op, top, mode, shape, dtype):
    x = _inputs(shape, dtype)
    before = x.copy()
    assert _softmax._small_rows(x, -1, mode) is not None       # the small path is taken
    got = op(x)
    want = top(torch.from_numpy(x.astype(np.float64)), -1).numpy()
    np.testing.assert_allclose(np.asarray(got, np.float64), want, **TOL[dtype])
    general = _softmax._softmax_family(x, -1, mode)
    assert type(got) is type(general)
    assert np.shape(got) == np.shape(general) and np.asarray(got).dtype == dtype
    np.testing.assert_array_equal(got, general)
    np.testing.assert_array_equal(x, before)
    assert not np.shares_memory(np.asarray(got), x)
    if x.ndim == 2:
        np.testing.assert_array_equal(op(x, axis=1), general)


@pytest.mark.parametrize("op,top,mode", OPS)
def test_other_calls_take_the_general_path(op, top, mode):
    x = _inputs((8, 6), np.float64)
    for call in (x.T, x[:, ::2], x.astype(np.float16), x.reshape(2, 4, 6), x.tolist()):
        assert _softmax._small_rows(call, -1, mode) is None
    assert _softmax._small_rows(x, 0, mode) is None
    assert _softmax._small_rows(x, np.int64(1), mode) is None
    np.testing.assert_allclose(op(x, axis=0), top(torch.from_numpy(x), 0).numpy(),
                               rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(op(x[:, ::2]), top(torch.from_numpy(x[:, ::2].copy()), -1),
                               rtol=1e-14, atol=1e-15)
