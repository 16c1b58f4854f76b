"""CPU kernel for the negative log-likelihood loss on log-probabilities: a gather (one value
per sample), so one serial pass; the class-index check and torch's "mean" denominator come
from ``cross_entropy.check_index_target`` before it."""
from numba import njit


@njit(error_model="numpy", cache=True, nogil=True)
def nll_gather(x, target, ignore_index, weight, gscale, grad, loss):
    """``x`` (N, C, S) log-probabilities, ``target`` (N, S) checked class indices.

    ``loss[n, s] = -w[t] * x[n, t, s]`` (0 where ``t == ignore_index``); with ``grad`` of N
    rows (0 rows: forward only, else zero-filled by the caller) ``grad[n, t, s] = -w[t] * g``,
    ``g`` the upstream gradient of that sample (``gscale`` of one element: the same for all).
    """
    N, C, S = x.shape
    has_w = weight.shape[0] > 0
    want_grad = grad.shape[0] > 0
    one_g = gscale.shape[0] == 1
    one = x.dtype.type(1)
    zero = x.dtype.type(0)
    for n in range(N):
        for s in range(S):
            t = target[n, s]
            if t == ignore_index:
                loss[n, s] = zero
                continue
            w = weight[t] if has_w else one
            loss[n, s] = -w * x[n, t, s]
            if want_grad:
                g = gscale[0] if one_g else gscale[n * S + s]
                grad[n, t, s] = -w * g
