"""Host side of the CUDA kernels: bring the caller's arrays onto the device in the kernels'
canonical layout, choose the launch shape, queue the kernels on the caller's stream, and hand
back device arrays.

Imported only by ``fastce.cuda``'s functions, after they checked that numba-cuda and a GPU (or
the simulator) are there.

Layout.  Kernels see the logits as an (N, C, S) strided view (class axis in the middle),
built without a copy whenever the dimensions before and after the class axis merge; any other
input (negative or unmergeable strides, float16) is first copied into a contiguous buffer of
the compute dtype by one strided-copy kernel.

Launch shape (see :func:`plan`).  ``G`` threads share a row: the whole block when C is large,
a warp or sub-warp for C <= ``CUDA_SMALL_C``, one thread per row when the rows are strided
positions of a K-dim input (consecutive threads read consecutive positions, so loads
coalesce).  With few rows and a huge C each row is split over several blocks whose (max,
sum-exp) partials are merged.

Synchronization.  Calls return without waiting for the GPU, except where the host must look
at data: class-index targets and BCE probabilities are checked on the device, and the 8-byte
error flag (16 bytes for BCE: input and target) is copied back after all of the call's kernels
are queued (one wait per call, the same point at which the CPU path would raise).
"""
import contextlib
import functools
import sys
from types import SimpleNamespace

import numpy as np
from numba import config, cuda

from .. import _config
from .._arrays import _as_array, is_device_array
from .._modes import MODE_LOGSUMEXP
from .._validate import (BCE_LOGITS_TARGET_VALUES, BCE_TARGET_VALUES, PROB_TARGET_VALUES,
                         bce_problem, broadcastable, check_axis, check_grad_output,
                         compute_dtype, cross_entropy_problem, large_vocab_options,
                         nll_loss_problem, pos_weight_is_compact,
                         raise_bad_class_index, raise_bad_probability, raise_bad_value,
                         split_at_axis)
from .kernels.bce import build_bce
from .kernels.cross_entropy import build_cross_entropy
from .kernels.nll import build_nll
from .kernels.primitives import SHARED_MAX_THREADS, build_primitives
from ._launch import CALL_DEVICE, DeviceView, FastKernel, c_contiguous
from .kernels.reduce import COPY_NDIM, SUM_MEAN, SUM_PARTIAL, SUM_TOTAL, build_reduce, copy_kernel
from .kernels.softmax import build_softmax

SIM = bool(config.ENABLE_CUDASIM)
_copy_kernel = FastKernel(copy_kernel)


def kernels(dtype, shuffle=None, softcap=None):
    """Every kernel of one compute dtype (built once per process and block size; numba
    compiles each on its first launch with a given signature).  ``shuffle``: the reduction
    twin (default: warp shuffles, except under the simulator); ``softcap``: the logit cap
    compiled in (one build per value)."""
    # The block size is part of the key: the float32 kernels are compiled with launch bounds
    # for it, and a launch with more threads than the bound fails (CUDA_ERROR_INVALID_VALUE).
    return _kernels(np.dtype(dtype), shuffle, _threads(), softcap)


@functools.lru_cache(maxsize=None)
def _kernels(dtype, shuffle, threads_per_block, softcap):
    P = build_primitives(dtype, shuffle, softcap)
    soft = build_softmax(P)
    ns = SimpleNamespace(P=P)
    ce = build_cross_entropy(P, soft)
    for part in (soft, ce, build_nll(P, ce), build_bce(P), build_reduce(P)):
        ns.__dict__.update(vars(part))
    for name, value in vars(ns).items():
        if name.endswith("_kernel"):
            setattr(ns, name, FastKernel(value))
    return ns


# ---------------------------------------------------------------------------------------------
# launch configuration


def _threads():
    tpb = int(_config.CUDA_THREADS_PER_BLOCK)
    if tpb % 32 or not 32 <= tpb <= SHARED_MAX_THREADS:
        raise ValueError(f"fastce._config.CUDA_THREADS_PER_BLOCK must be a multiple of 32 in "
                         f"[32, {SHARED_MAX_THREADS}], got {tpb}")
    return tpb


def plan(rows, C, S, allow_split=True):
    """Launch shape for ``rows`` rows of C classes (rows are strided by S).

    Returns
    -------
    (G, n_split, blocks, threads)
        Threads per row (1, a power of two <= 32, or the block), chunks per row, grid and
        block size.
    """
    tpb = _threads()
    small = int(_config.CUDA_SMALL_C)
    if S >= 32 or (S > 1 and C <= int(_config.CUDA_THREAD_ROW_MAX_C)):
        G = 1
    elif C <= small:
        G = min(32, 1 << max(0, int(C - 1).bit_length()))
    else:
        G = tpb
    n_split = 1
    if allow_split and G == tpb:
        min_chunk = int(_config.CUDA_SPLIT_MIN_CHUNK)
        target = int(_config.CUDA_SPLIT_TARGET_BLOCKS)
        if rows < target and C >= 2 * min_chunk:
            n_split = max(1, min(-(-target // rows), C // min_chunk))
    per_block = tpb // G
    blocks = -(-rows * n_split // per_block)
    return G, n_split, blocks, tpb


# ---------------------------------------------------------------------------------------------
# arrays


def _is_torch(a):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(a, torch.Tensor)


def _is_cupy(a):
    return type(a).__module__.split(".")[0] == "cupy"


def _as_view(a):
    """A view of the device array ``a``'s memory (no copy): a :class:`DeviceView` on a GPU,
    a Numba (simulator) array under the simulator."""
    if SIM:
        if getattr(a, "__cuda_ndarray__", False):
            return a
        return cuda.as_cuda_array(a, sync=False)
    if type(a) is DeviceView:
        return a
    if _is_torch(a):
        a = a.detach()  # tensors with requires_grad refuse to export their interface
        dtype = _torch_numpy_dtype(a.dtype)
        if dtype is not None:
            return DeviceView(a.data_ptr(), tuple(a.shape),
                              tuple(st * dtype.itemsize for st in a.stride()), dtype, a)
    if getattr(a, "__cuda_ndarray__", False):
        return DeviceView(a.device_ctypes_pointer.value, a.shape, a.strides, a.dtype, a)
    desc = a.__cuda_array_interface__
    dtype = np.dtype(desc["typestr"])
    shape = tuple(desc["shape"])
    strides = desc.get("strides") or _c_strides(shape, dtype.itemsize)
    return DeviceView(desc["data"][0], shape, strides, dtype, a)


@functools.lru_cache(maxsize=None)
def _torch_numpy_dtype(torch_dtype):
    """The NumPy dtype of a torch dtype, or None for one NumPy lacks (bfloat16...)."""
    try:
        return np.dtype(str(torch_dtype).rpartition(".")[2])
    except TypeError:
        return None


def _strided_view(a, shape, strides):
    """A view of ``a``'s buffer, starting at its first element, with the given shape and byte
    strides (all >= 0)."""
    shape = tuple(int(d) for d in shape)
    strides = tuple(int(s) for s in strides)
    if SIM:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        base = a._ary
        return FakeCUDAArray(np.lib.stride_tricks.as_strided(base, shape, strides),
                             stream=a.stream)
    return DeviceView(a.ptr, shape, strides, a.dtype, a.owner)


def _c_strides(shape, itemsize):
    strides = []
    acc = itemsize
    for d in reversed(shape):
        strides.append(acc)
        acc *= max(int(d), 1)
    return tuple(reversed(strides))


def _merge(shape, strides):
    """(size, byte stride) of the dims ``shape`` merged in C order, or None when they do not
    merge into one strided dimension; the stride is None for a group of size <= 1."""
    size = 1
    for d in shape:
        size *= int(d)
    dims = [(int(d), int(s)) for d, s in zip(shape, strides) if d != 1]
    if size <= 1 or not dims:
        return size, None
    for (d0, s0), (d1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * d1:
            return None
    if any(s < 0 for _, s in dims):
        return None
    return size, dims[-1][1]


def _grouped_view(a, cuts):
    """``a`` viewed with its dims merged into groups ``dims[cuts[i]:cuts[i+1]]``, or None
    when some group does not merge.  Strides of size-1 groups are filled in so that a
    C-contiguous ``a`` gives a C-contiguous view."""
    shape, strides = tuple(a.shape), tuple(a.strides)
    sizes, strs = [], []
    for lo, hi in zip(cuts, cuts[1:]):
        m = _merge(shape[lo:hi], strides[lo:hi])
        if m is None:
            return None
        sizes.append(m[0])
        strs.append(m[1])
    acc = a.dtype.itemsize
    for i in range(len(sizes) - 1, -1, -1):
        if strs[i] is None:
            strs[i] = acc
        acc = strs[i] * max(sizes[i], 1)
    return _strided_view(a, sizes, strs)


def _compress(shape, strides):
    """Shape and strides with size-1 dims dropped and mergeable neighbours merged."""
    dims = [(int(d), int(s)) for d, s in zip(shape, strides) if d != 1]
    out = []
    for d, s in dims:
        if out and out[-1][1] == s * d:
            out[-1] = (out[-1][0] * d, s)
        else:
            out.append((d, s))
    return [d for d, _ in out], [s for _, s in out]


class Call:
    """One public call: the device, stream and array type of its primary input, and the
    helpers that allocate, convert and return arrays on that stream."""

    def __init__(self, primary):
        self.like = primary
        self.torch = _is_torch(primary)
        self.cupy = _is_cupy(primary)
        self._ctx = contextlib.ExitStack()
        if is_device_array(primary):
            self.x = _as_view(primary)
            self.stream = self._stream(primary)
        else:
            # fastce.cuda's functions also take host arrays: copied to the device.
            self.stream = 0
            self.x = self.to_device(_as_array(primary, "input"))

    def __enter__(self):
        if self.torch and not SIM:
            import torch
            index = self.like.device.index or 0
            if torch.cuda.current_device() != index:
                # Kernels are compiled and launched in the tensor's device's context.
                self._ctx.enter_context(cuda.gpus[index])
            self._ctx.callback(setattr, CALL_DEVICE, "index", None)
            CALL_DEVICE.index = index
        return self

    def __exit__(self, *exc):
        self._ctx.close()
        return False

    def _stream(self, a):
        if self.torch:
            import torch
            return _external_stream(torch.cuda.current_stream(a.device).cuda_stream)
        if getattr(a, "__cuda_ndarray__", False):
            return a.stream
        st = a.__cuda_array_interface__.get("stream")
        if st is None:
            return 0
        if st == 1:
            return cuda.legacy_default_stream()
        if st == 2:
            return cuda.per_thread_default_stream()
        return _external_stream(st)

    # -- arrays in -----------------------------------------------------------------------------

    def meta(self, a, name):
        """(array, is_device): a Numba device view of a device array, else an ndarray (with
        the CPU path's TypeError for what NumPy cannot take)."""
        if is_device_array(a):
            return _as_view(a), True
        return _as_array(a, name), False

    def to_device(self, a, dtype=None):
        """A device copy of the host array ``a`` (C-contiguous, optionally converted)."""
        a = np.asarray(a, dtype=dtype, order="C")  # keeps 0-d arrays 0-d
        if self.torch and not SIM:
            import torch
            return _as_view(torch.as_tensor(a, device=self.like.device))
        return _as_view(cuda.to_device(a, stream=self.stream))

    def empty(self, shape, dtype):
        shape = tuple(int(d) for d in shape)
        dtype = np.dtype(dtype)
        if self.torch and not SIM:
            import torch
            t = torch.empty(shape, dtype=getattr(torch, dtype.name), device=self.like.device)
            return _as_view(t)
        return _as_view(cuda.device_array(shape, dtype, stream=self.stream))

    def contiguous(self, a, dtype):
        """A new C-contiguous array of ``dtype`` with ``a``'s values (one strided copy)."""
        out = self.empty(a.shape, dtype)
        if out.size == 0:
            return out
        if any(int(st) < 0 for d, st in zip(a.shape, a.strides) if d > 1):
            # A Numba view's buffer starts at its lowest address, not at its first element.
            raise NotImplementedError("fastce.cuda does not take arrays with negative strides; "
                                      "pass a contiguous copy")
        shape, strides = _compress(a.shape, a.strides)
        if len(shape) > COPY_NDIM:
            raise NotImplementedError(
                f"fastce.cuda copies non-contiguous arrays of up to {COPY_NDIM} non-mergeable "
                f"dimensions; got shape {tuple(a.shape)} with strides {tuple(a.strides)}")
        pad = COPY_NDIM - len(shape)
        shape6 = [1] * pad + list(shape)
        src = _strided_view(a, shape6, [0] * pad + list(strides))
        dst = _strided_view(out, shape6, _c_strides(shape6, out.dtype.itemsize))
        tpb = _threads()
        blocks = min(-(-out.size // (4 * tpb)), 65535)  # four positions a thread's step
        _copy_kernel[blocks, tpb, self.stream](src, dst)
        return out

    def compute(self, a, dtype):
        """``a`` in the compute dtype: itself, or a contiguous converted copy."""
        return a if a.dtype == dtype else self.contiguous(a, dtype)

    def grouped(self, a, cuts, dtype):
        """``a`` in ``dtype`` viewed with its dims merged at ``cuts`` (copying only when the
        dims do not merge)."""
        a = self.compute(a, dtype)
        v = _grouped_view(a, cuts)
        if v is None:
            v = _grouped_view(self.contiguous(a, dtype), cuts)
        return v

    def flat(self, a, dtype):
        """``a`` as a flat contiguous array of ``dtype``."""
        if a.dtype != dtype or not _is_c_contig(a):
            a = self.contiguous(a, dtype)
        return self.reshape(a, (a.size,))

    def broadcast(self, a, shape, dtype):
        """``a`` (device) broadcast to ``shape`` and materialized flat in ``dtype``."""
        shape = tuple(shape)
        pad = len(shape) - len(a.shape)
        src_shape = (1,) * pad + tuple(a.shape)
        src_strides = (0,) * pad + tuple(a.strides)
        strides = [0 if (sd == 1 and d != 1) else st
                   for sd, st, d in zip(src_shape, src_strides, shape)]
        n = int(np.prod(shape, dtype=np.int64))
        if n == 0:
            return self.empty((0,), dtype)
        v = _strided_view(a, shape, strides)
        return self.reshape(self.contiguous(v, dtype), (n,))

    def reshape(self, a, shape):
        """A C-contiguous ``a`` with another shape (a view)."""
        shape = tuple(int(d) for d in shape)
        if a.size == 0:
            return self.empty(shape, a.dtype)
        return _strided_view(a, shape, _c_strides(shape, a.dtype.itemsize))

    # -- arrays out ----------------------------------------------------------------------------

    def result(self, a, shape, dtype):
        """``a`` (contiguous) reshaped and converted to the caller's dtype, as the caller's
        array type where that costs no copy (torch tensor, CuPy array), else a Numba device
        array."""
        a = self.reshape(a, shape)
        if a.dtype != dtype:
            a = self.reshape(self.contiguous(a, dtype), shape)
        if SIM:
            return a
        owner = a.owner
        if self.torch:
            if _is_torch(owner) and owner.data_ptr() == a.ptr and owner.numel() == a.size:
                return owner.view(a.shape)  # a is all of a contiguous tensor we made
            import torch
            return torch.as_tensor(a, device=self.like.device)
        if self.cupy:
            import cupy
            return cupy.asarray(a)
        return cuda.as_cuda_array(a, sync=False)

    def read(self, a, index):
        """One element of a device array, on the host (a NumPy scalar)."""
        sl = tuple(slice(int(i), int(i) + 1) for i in index)
        h = a[sl].copy_to_host(stream=self.stream)
        if self.stream:
            self.stream.synchronize()
        return h.reshape(-1)[0]

    def flag(self, sentinel, count=1):
        """A device error flag of ``count`` entries holding ``sentinel`` (kernels atomically
        lower them)."""
        if self.torch and not SIM:
            import torch
            t = torch.full((count,), sentinel, dtype=torch.int64, device=self.like.device)
            return _as_view(t)
        return self.to_device(np.full(count, sentinel, np.int64))

    def check_values(self, K, a3, values):
        """Queue the CPU path's value check of the 3-D ``a3`` against ``values`` = (lo, hi,
        what) of ``fastce._validate``: NaN, infinite or outside [lo, hi] is an error (see
        ``bad_value_kernel``); returns the error flag."""
        lo, hi, _ = values
        n = a3.size
        flag = self.flag(n)
        if n:
            tpb = _threads()
            dt = K.P.dtype
            K.bad_value_kernel[min(-(-n // tpb), 65535), tpb, self.stream](
                a3, dt.type(lo), dt.type(hi), flag)
        return flag

    def raise_bad_value(self, flag, a3, shape, name, values):
        """Raise the CPU path's ValueError if ``check_values`` found a bad value."""
        bad = self.first_error(flag, a3.size)
        if bad is not None:
            d0, d1, d2 = a3.shape
            q, k = divmod(bad, d2)
            value = self.read(a3, (q // d1, q % d1, k))
            raise_bad_value(name, values[2], value, bad, shape)

    def first_error(self, flag, sentinel):
        """The position recorded in a one-entry device error flag, or None (waits for the
        stream)."""
        return self.first_errors(flag, sentinel)[0]

    def first_errors(self, flag, sentinel):
        """The positions recorded in a device error flag, one per entry (None: no error),
        read back in one copy (waits for the stream)."""
        if not SIM and _is_torch(flag.owner):
            h = flag.owner.tolist()  # torch's current stream is the call's stream
        else:
            h = flag.copy_to_host(stream=self.stream)
            if self.stream:
                self.stream.synchronize()
        return [None if int(v) >= sentinel else int(v) for v in h]


_EXTERNAL_STREAMS = {}


def _external_stream(handle):
    """Numba's wrapper of a foreign stream handle, made once per handle (the wrapper holds
    only the handle; making it costs ~20 us)."""
    st = _EXTERNAL_STREAMS.get(handle)
    if st is None:
        if len(_EXTERNAL_STREAMS) > 256:
            _EXTERNAL_STREAMS.clear()
        st = _EXTERNAL_STREAMS[handle] = cuda.external_stream(handle)
    return st


def _is_c_contig(a):
    return c_contiguous(a.shape, a.strides, a.dtype.itemsize)


_EMPTY = {}


def _empty(dtype, ndim=1):
    key = (np.dtype(dtype), ndim)
    if key not in _EMPTY:
        _EMPTY[key] = _as_view(cuda.device_array((0,) * ndim, np.dtype(dtype)))
    return _EMPTY[key]


def _sum(call, K, vals, reduction, stats, denom):
    """Sum (or mean) of the flat device array ``vals`` into a 1-element device array, on the
    device: one block, or per-block partials and one more block for large inputs."""
    dt = K.P.dtype
    tpb = _threads()
    out = call.empty((1,), dt)
    mode = SUM_MEAN if reduction == "mean" else SUM_TOTAL
    n = vals.shape[0]
    nb = min(-(-n // (tpb * _config.CUDA_REDUCE_ITEMS_PER_THREAD)),
             _config.CUDA_REDUCE_MAX_BLOCKS)
    stats = _empty(dt) if stats is None else stats
    denom = dt.type(denom)
    if nb > 1:
        parts = call.empty((nb,), dt)
        K.sum_kernel[nb, tpb, call.stream](vals, parts, SUM_PARTIAL, stats, denom)
        vals = parts
    K.sum_kernel[1, tpb, call.stream](vals, out, mode, stats, denom)
    return out


# ---------------------------------------------------------------------------------------------
# softmax family

def softmax_family(x, axis, mode):
    """``mode``: one of ``fastce._modes``' MODE_* ints."""
    with Call(x) as call:
        xd = call.x
        dt = compute_dtype(xd.dtype, "x")
        axis = check_axis(axis, len(xd.shape))
        shape = tuple(xd.shape)
        N, C, S = split_at_axis(shape, axis)
        lse = mode == MODE_LOGSUMEXP
        out_shape = shape[:axis] + shape[axis + 1:] if lse else shape
        out = call.empty((N, 1 if lse else C, S), dt)
        if lse and C == 0 and N * S:
            out = call.to_device(np.full((N, 1, S), -np.inf, dt))
        elif N * S and C:
            K = kernels(dt)
            x3 = call.grouped(xd, (0, axis, axis + 1, len(shape)), dt)
            G, n_split, blocks, tpb = plan(N * S, C, S)
            pm, ps = _stats_partials(call, K, x3, G, n_split, blocks, tpb)
            K.softmax_kernel[blocks, tpb, call.stream](x3, out, mode, G, n_split, pm, ps)
        return call.result(out, out_shape, xd.dtype)


def _stats_partials(call, K, x3, G, n_split, blocks, tpb):
    """Per-chunk (max, sum-exp) partials for split rows (empty arrays when not split)."""
    dt = K.P.dtype
    if n_split == 1:
        return _empty(dt), _empty(dt)
    N, C, S = x3.shape
    pm = call.empty((N * S * n_split,), dt)
    ps = call.empty((N * S * n_split,), dt)
    K.stats_kernel[blocks, tpb, call.stream](x3, G, n_split, pm, ps)
    return pm, ps


# ---------------------------------------------------------------------------------------------
# cross-entropy


def _grad_output(call, grad_output, reduction, loss_shape, dt):
    """(g0, gout): the host scalar and the device array the kernels read the upstream
    gradient from (see ``cross_entropy.upstream``), with the CPU path's checks."""
    one = dt.type(1)
    if grad_output is None:
        return one, _empty(dt)
    go, on_dev = call.meta(grad_output, "grad_output")
    check_grad_output(tuple(go.shape), reduction, loss_shape)
    if reduction == "none":
        if int(np.prod(tuple(go.shape), dtype=np.int64)) == 0:
            return one, _empty(dt)
        return one, (call.flat(go, dt) if on_dev else call.to_device(go.reshape(-1), dt))
    if on_dev:
        return one, call.flat(go, dt)
    return dt.type(float(go.reshape(()))), _empty(dt)


def _index_inputs(call, want_grad, grad_output, reduction, loss_shape, w, w_dev, dt):
    """(g0, gout, weight) of the class-index kernels (cross-entropy's and nll's): the upstream
    gradient as :func:`_grad_output` gives it (a plain 1 without gradient) and the class
    weights on the device (empty: unweighted)."""
    g0, gout = _grad_output(call, grad_output, reduction, loss_shape, dt) \
        if want_grad else (dt.type(1), _empty(dt))
    if w is None:
        return g0, gout, _empty(dt)
    return g0, gout, (call.flat(w, dt) if w_dev else call.to_device(w, dt))


def _prepare_index_targets(call, K, t2, ignore_index, C, wd, flag, denom_out):
    """Check the (N, S) class indices ``t2`` (``flag`` lowered to the first bad position) and
    sum the 'mean' denominator into the 1-element device array ``denom_out``."""
    dt = K.P.dtype
    tpb = _threads()
    rows = t2.shape[0] * t2.shape[1]
    nbp = min(-(-rows // (tpb * _config.CUDA_REDUCE_ITEMS_PER_THREAD)),
              _config.CUDA_REDUCE_MAX_BLOCKS)
    partials = call.empty((nbp,), dt)
    K.prepare_kernel[nbp, tpb, call.stream](t2, int(ignore_index), C, wd, flag, partials)
    K.sum_kernel[1, tpb, call.stream](partials, denom_out, SUM_TOTAL, _empty(dt), dt.type(0))


def cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing,
                  grad_output, want_grad, softcap=None, z_loss=0.0, return_lse=False):
    with Call(logits) as call:
        x = call.x
        tgt, t_dev = call.meta(target, "target")
        w, w_dev = None, False
        if weight is not None:
            w, w_dev = call.meta(weight, "weight")
        prob = cross_entropy_problem(tuple(x.shape), x.dtype, tuple(tgt.shape), tgt.dtype,
                                     None if w is None else tuple(w.shape),
                                     ignore_index, reduction, label_smoothing)
        N, C, S, dt = prob.N, prob.C, prob.S, prob.dtype
        cap, z = large_vocab_options(softcap, z_loss, return_lse, dt)
        K = kernels(dt, softcap=None if cap is None else float(softcap))
        z = dt.type(z)
        lse = call.empty((N * S,), dt) if return_lse else None
        lse_arg = lse if return_lse else _empty(dt, 2)   # (its rank decides, compile-time)
        rows = N * S
        eps = float(label_smoothing)
        keep, eps_c = dt.type(1 - eps), dt.type(eps / C)
        mean = reduction == "mean"
        g0, gout, wd = _index_inputs(call, want_grad, grad_output, reduction,
                                     prob.loss_shape, w, w_dev, dt)
        nd = len(x.shape)
        cuts = (0, 0, 1, 1) if nd == 1 else (0, 1, 2, nd)
        x3 = call.grouped(x, cuts, dt) if rows else None
        grad = call.empty((N, C, S), dt) if want_grad else None
        grad3 = grad if want_grad else _empty(dt, 3)
        if not t_dev and rows:
            tgt = call.to_device(tgt)

        if prob.probs:
            loss = call.empty((rows,), dt)
            t3 = call.grouped(tgt, cuts, dt) if rows else None
            if rows:
                t_flag = call.check_values(K, t3, PROB_TARGET_VALUES)
                G, _, blocks, tpb = plan(rows, C, S, allow_split=False)
                prob_kernel = K.prob_kernel if w is None else K.prob_kernel_weighted
                prob_kernel[blocks, tpb, call.stream](
                    x3, t3, wd, keep, eps_c, mean, dt.type(rows), g0, gout, grad3, loss, G,
                    z, lse_arg)
            stats, denom, flag = None, rows, None
        else:
            tpb = _threads()
            stats = call.empty((2,), dt)
            flag = call.flag(rows)
            if rows:
                t2 = call.grouped(tgt, (0, 0, 0) if nd == 1 else (0, 1, nd - 1), tgt.dtype)
                _prepare_index_targets(call, K, t2, ignore_index, C, wd, flag, stats[0:1])
            else:
                K.sum_kernel[1, tpb, call.stream](_empty(dt), stats[0:1], SUM_TOTAL,
                                                  _empty(dt), dt.type(0))
            if w is not None:
                K.sum_kernel[1, tpb, call.stream](wd, stats[1:2], SUM_TOTAL, _empty(dt),
                                                  dt.type(0))
            if rows:
                G, n_split, blocks, tpb = plan(rows, C, S)
                pm, ps = _stats_partials(call, K, x3, G, n_split, blocks, tpb)
                parts = call.empty((rows, n_split), dt)
                index_kernel = K.index_kernel if w is None else K.index_kernel_weighted
                index_kernel[blocks, tpb, call.stream](
                    x3, t2, int(ignore_index), wd, stats, keep, eps_c, mean, g0, gout, grad3,
                    parts, G, n_split, pm, ps, z, lse_arg)
                if n_split == 1 or reduction != "none":
                    loss = call.reshape(parts, (rows * n_split,))
                else:
                    loss = call.empty((rows,), dt)
                    K.rowsum_kernel[-(-rows // tpb), tpb, call.stream](parts, loss)
            else:
                loss = call.empty((0,), dt)
            denom = 0

        if reduction == "none":
            out = call.result(loss, prob.loss_shape, x.dtype)
        else:
            out = call.result(_sum(call, K, loss, reduction, stats, denom), (), x.dtype)

        if prob.probs and rows:
            call.raise_bad_value(t_flag, t3, tuple(tgt.shape), "target", PROB_TARGET_VALUES)
        if flag is not None:
            bad = call.first_error(flag, rows)
            if bad is not None:
                raise_bad_class_index(call.read(t2, divmod(bad, S)), bad, tuple(tgt.shape), C,
                                      ignore_index)
        lse_out = (call.result(lse, prob.loss_shape, x.dtype),) if return_lse else ()
        if not want_grad:
            return (out,) + lse_out if return_lse else out
        return (out, call.result(grad, tuple(x.shape), x.dtype)) + lse_out


# ---------------------------------------------------------------------------------------------
# nll_loss


def _grid_stride_blocks(n, tpb):
    """Blocks for a grid-stride loop over ``n`` items: each thread takes at least
    ``CUDA_REDUCE_ITEMS_PER_THREAD`` of them (its loop, carries included, runs even on tiny
    inputs)."""
    return max(1, min(-(-n // (tpb * _config.CUDA_REDUCE_ITEMS_PER_THREAD)), 65535))


def nll_loss(log_probs, target, weight, ignore_index, reduction, grad_output=None,
             want_grad=False):
    """The gather of ``kernels.nll``: the class indices checked and the 'mean' denominator
    summed on the device by cross-entropy's ``prepare_kernel`` first."""
    with Call(log_probs) as call:
        x = call.x
        if x.dtype.kind == "b":
            raise TypeError("log_probs must be a floating-point array (float32 or float64), "
                            "got dtype bool")
        tgt, t_dev = call.meta(target, "target")
        w, w_dev = None, False
        if weight is not None:
            w, w_dev = call.meta(weight, "weight")
        prob = nll_loss_problem(tuple(x.shape), x.dtype, tuple(tgt.shape), tgt.dtype,
                                None if w is None else tuple(w.shape), ignore_index, reduction)
        N, C, S, dt = prob.N, prob.C, prob.S, prob.dtype
        K = kernels(dt)
        rows = N * S
        tpb = _threads()
        g0, gout, wd = _index_inputs(call, want_grad, grad_output, reduction,
                                     prob.loss_shape, w, w_dev, dt)
        nd = len(x.shape)
        loss = call.empty((rows,), dt)
        grad = call.empty((N, C, S), dt) if want_grad else None
        stats = call.empty((1,), dt)
        flag = call.flag(rows)
        if rows:
            x3 = call.grouped(x, (0, 0, 1, 1) if nd == 1 else (0, 1, 2, nd), dt)
            if not t_dev:
                tgt = call.to_device(tgt)
            t2 = call.grouped(tgt, (0, 0, 0) if nd == 1 else (0, 1, nd - 1), tgt.dtype)
            _prepare_index_targets(call, K, t2, ignore_index, C, wd, flag, stats)
            K.nll_loss_kernel[_grid_stride_blocks(rows, tpb), tpb, call.stream](
                x3, t2, int(ignore_index), wd, loss)
            if want_grad and grad.size:
                K.nll_grad_kernel[_grid_stride_blocks(grad.size, tpb), tpb, call.stream](
                    x3, t2, int(ignore_index), wd, stats, reduction == "mean", g0, gout,
                    grad)
        else:
            K.sum_kernel[1, tpb, call.stream](_empty(dt), stats, SUM_TOTAL, _empty(dt),
                                              dt.type(0))
        if reduction == "none":
            out = call.result(loss, prob.loss_shape, x.dtype)
        else:
            out = call.result(_sum(call, K, loss, reduction, stats, 0), (), x.dtype)
        bad = call.first_error(flag, rows)
        if bad is not None:
            raise_bad_class_index(call.read(t2, divmod(bad, S)), bad, tuple(tgt.shape), C,
                                  ignore_index)
        if not want_grad:
            return out
        return out, call.result(grad, tuple(x.shape), x.dtype)


# ---------------------------------------------------------------------------------------------
# binary cross-entropy


def _bce_inputs(call, target, weight, reduction):
    x = call.x
    t, t_dev = call.meta(target, "target")
    dt = bce_problem(tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, reduction)
    shape = tuple(x.shape)
    xf = call.flat(x, dt)
    yf = call.flat(t, dt) if t_dev else call.to_device(t.reshape(-1), dt)
    if weight is None:
        wf = _empty(dt)
    else:
        w, w_dev = call.meta(weight, "weight")
        broadcastable(tuple(w.shape), shape, "weight")
        wf = call.broadcast(w if w_dev else call.to_device(w, dt), shape, dt)
    return dt, shape, xf, yf, wf


def _bce_run(call, K, form, x, y, w, pw, shape, reduction, grad_output, want_grad):
    """Queue the one BCE kernel of a call (``kernels.bce``'s template, ``form`` "bce" or
    "bce_logits"): for 'none' it writes the per-element loss, for 'mean'/'sum' one partial
    per block that ``_sum`` adds up; with ``want_grad`` it also writes the gradient.

    Returns (loss, grad, flag): the loss as the caller's array, the gradient (flat, compute
    dtype) or None, and the kernel's two-entry error flag (see ``kernels.bce``)."""
    dt = K.P.dtype
    n = x.shape[0]
    tpb = _threads()
    flag = call.flag(n, 2)
    reduced = reduction != "none"
    if want_grad:
        g0, gout = _grad_output(call, grad_output, reduction, shape, dt)
        scale = dt.type(1.0 / n if (reduction == "mean" and n) else 1.0)
        grad = call.empty((n,), dt)
    else:
        g0, gout, scale, grad = dt.type(1), _empty(dt), dt.type(1), _empty(dt)
    if reduced:
        # A grid-stride loop of at least CUDA_REDUCE_ITEMS_PER_THREAD elements a thread:
        # at most CUDA_REDUCE_MAX_BLOCKS partials for the one-block second stage.
        blocks = min(-(-n // (tpb * _config.CUDA_REDUCE_ITEMS_PER_THREAD)),
                     _config.CUDA_REDUCE_MAX_BLOCKS)
    else:
        blocks = min(-(-n // tpb), 65535)
    out = call.empty((blocks if reduced else n,), dt)
    if n:
        kernel = getattr(K, form + ("_grad" if want_grad else "") +
                         ("_sum" if reduced else "") + "_kernel")
        kernel[blocks, tpb, call.stream](x, y, w, pw, gout, g0, scale, out, grad, flag)
    if reduced:
        loss = call.result(_sum(call, K, out, reduction, None, n), (), call.x.dtype)
    else:
        loss = call.result(out, shape, call.x.dtype)
    return loss, (grad if want_grad else None), flag


def _bce_raise(call, flag, shape, y, values, p=None):
    """The CPU path's error for the first bad target (then, for probabilities ``p``, the
    first bad input) that the BCE kernel recorded in ``flag`` (waits for the stream)."""
    bad_input, bad_target = call.first_errors(flag, y.shape[0])
    if bad_target is not None:
        raise_bad_value("target", values[2], call.read(y, (bad_target,)), bad_target, shape)
    if p is not None and bad_input is not None:
        raise_bad_probability(call.x.dtype.type(call.read(p, (bad_input,))), bad_input, shape)


def binary_cross_entropy(input, target, weight, reduction, grad_output=None, want_grad=False):
    with Call(input) as call:
        dt, shape, p, y, w = _bce_inputs(call, target, weight, reduction)
        K = kernels(dt)
        loss, grad, flag = _bce_run(call, K, "bce", p, y, w, _empty(dt), shape, reduction,
                                    grad_output, want_grad)
        _bce_raise(call, flag, shape, y, BCE_TARGET_VALUES, p)
        if not want_grad:
            return loss
        return loss, call.result(grad, shape, call.x.dtype)


def binary_cross_entropy_with_logits(input, target, weight, pos_weight, reduction,
                                     grad_output=None, want_grad=False):
    with Call(input) as call:
        dt, shape, x, y, w = _bce_inputs(call, target, weight, reduction)
        K = kernels(dt)
        if pos_weight is None:
            pw = _empty(dt)
        else:
            pwa, pw_dev = call.meta(pos_weight, "pos_weight")
            compact = pos_weight_is_compact(tuple(pwa.shape), shape)
            if not pw_dev:
                pwa = call.to_device(pwa, dt)
            pw = call.flat(pwa, dt) if compact else call.broadcast(pwa, shape, dt)
        loss, grad, flag = _bce_run(call, K, "bce_logits", x, y, w, pw, shape, reduction,
                                    grad_output, want_grad)
        _bce_raise(call, flag, shape, y, BCE_LOGITS_TARGET_VALUES)
        if not want_grad:
            return loss
        return loss, call.result(grad, shape, call.x.dtype)
