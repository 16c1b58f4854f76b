"""CUDA kernels for the negative log-likelihood loss on log-probabilities: a gather, one value
per sample, as ``fastce._cpu.nll.nll_gather``.

The host checks the class indices and sums torch's 'mean' denominator first (the
cross-entropy ``prepare_kernel``: ``stats[0]``), so these kernels only gather.  An index
outside [0, C) that is not ``ignore_index`` (the host raises for it once the kernels are
queued) is never read: its loss is NaN and its gradient row 0.
"""
from types import SimpleNamespace

from numba import cuda, int64

__all__ = ["build_nll"]


def build_nll(P, ce):
    """Kernels for the primitives ``P`` of one compute dtype; ``ce`` is the namespace of
    ``build_cross_entropy`` (its ``upstream`` reads a sample's upstream gradient).

    Returns
    -------
    types.SimpleNamespace
        ``nll_loss_kernel(x, target, ignore_index, weight, loss)`` and
        ``nll_grad_kernel(x, target, ignore_index, weight, stats, mean, g0, gout, grad)``.
    """
    ZERO, ONE, NAN = P.ZERO, P.ONE, P.NAN
    upstream = ce.upstream

    @cuda.jit(device=True)
    def position(i, C, S):
        """(n, c, s) of flat position ``i`` in (N, C, S): the one division, outside the loop."""
        n = i // (C * S)
        c = (i - n * (C * S)) // S
        return n, c, i - n * (C * S) - c * S

    @cuda.jit(device=True)
    def advance(n, c, s, step, C, S):
        """(n, c, s) advanced by ``step`` (the grid stride's own (n, c, s)) with carries: no
        division per element."""
        s += step[2]
        c += step[1]
        n += step[0]
        if s >= S:
            s -= S
            c += 1
        if c >= C:
            c -= C
            n += 1
        return n, c, s

    @cuda.jit(device=True)
    def target_weight(t, C, weight, ignore_index):
        """(valid, w_t): the sample counts (and is read) only for an index in [0, C)."""
        if t == ignore_index or t < 0 or t >= C:
            return False, ZERO
        return True, (weight[t] if weight.shape[0] > 0 else ONE)

    @cuda.jit
    def nll_loss_kernel(x, target, ignore_index, weight, loss):
        """``loss[n * S + s] = -w[t] x[n, t, s]`` over the (N, S) samples (grid-stride), 0 for
        ``ignore_index``.  ``x`` is (N, C, S), ``target`` (N, S)."""
        N, C, S = x.shape
        i = int64(cuda.grid(1))  # 64-bit: N * S may exceed 2**31
        stride = int64(cuda.gridsize(1))
        n, c, s = position(i, 1, S)
        step = position(stride, 1, S)
        while i < N * S:
            t = int64(target[n, s])
            ok, w = target_weight(t, C, weight, ignore_index)
            if ok:
                loss[i] = -w * x[n, t, s]
            else:
                loss[i] = ZERO if t == ignore_index else NAN
            i += stride
            n, c, s = advance(n, c, s, step, 1, S)

    @cuda.jit
    def nll_grad_kernel(x, target, ignore_index, weight, stats, mean, g0, gout, grad):
        """The whole (N, C, S) gradient, element by element (grid-stride, coalesced writes):
        ``-w[t] g`` at the target's class, 0 elsewhere and on ignored samples.  ``g`` is
        ``gout[n * S + s]`` ('none' with a grad_output), ``gout[0]`` (a device scalar) or
        ``g0``; for 'mean' divided by ``stats[0]`` (0 when that is 0, as the CPU path)."""
        N, C, S = x.shape
        i = int64(cuda.grid(1))
        stride = int64(cuda.gridsize(1))
        total = N * C * S
        denom = stats[0] if mean else ONE
        n, c, s = position(i, C, S)
        step = position(stride, C, S)
        while i < total:
            t = int64(target[n, s])
            v = ZERO
            if c == t:
                ok, w = target_weight(t, C, weight, ignore_index)
                if ok:
                    v = -w * upstream(gout, g0, n * S + s, mean, denom)
            grad[n, c, s] = v
            i += stride
            n, c, s = advance(n, c, s, step, C, S)

    return SimpleNamespace(nll_loss_kernel=nll_loss_kernel, nll_grad_kernel=nll_grad_kernel)
