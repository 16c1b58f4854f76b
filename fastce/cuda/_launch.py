"""Kernel launches at a small host cost.

Numba-cuda's ``kernel[grid, block, stream](*args)`` types every argument, looks the overload
up, wraps every array in a memory view and builds a launch configuration and a stream object
on each call, and a Numba device array costs tens of microseconds to make: several times
what the kernels of a medium-sized call run for (docs/gpu.md).  A fastce call queues one to
six kernels, so that host cost was the whole of the time for all but the largest inputs.

:class:`FastKernel` wraps a dispatcher with the same ``[grid, block, stream](*args)`` syntax.
The first launch with a given argument signature goes through numba (which compiles, if
needed, and launches); it records the compiled kernel under a cheap key made of each
argument's Python type, dtype, rank and layout, computed the way numba types them.  Later
launches with that key pack the kernel parameters directly (the same flattening numba uses:
meminfo, parent, size, itemsize, pointer, shape, strides for an array; a ctypes value for a
scalar) and hand them to ``cuda.core.launch``.  Under the simulator the dispatcher is used
as it is.
"""
import ctypes
import threading

import numpy as np
from numba import config

SIM = bool(config.ENABLE_CUDASIM)


class DeviceView:
    """A strided view of device memory: pointer, shape, byte strides, dtype, and the object
    that owns the memory (kept alive with the view).  What the host code passes to kernels
    on a real GPU, in place of Numba device arrays (see the module docstring)."""

    __slots__ = ("ptr", "shape", "strides", "dtype", "owner", "size")

    def __init__(self, ptr, shape, strides, dtype, owner):
        self.ptr = int(ptr or 0)
        self.shape = tuple(shape)
        self.strides = tuple(strides)
        self.dtype = dtype
        self.owner = owner
        size = 1
        for d in self.shape:
            size *= d
        self.size = size

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "strides": self.strides, "typestr": self.dtype.str,
                "data": (self.ptr, False), "version": 3, "stream": None}

    def __getitem__(self, index):
        """Basic slicing with unit steps (what the host takes: one element, a sub-range)."""
        if not isinstance(index, tuple):
            index = (index,)
        ptr, shape, strides = self.ptr, [], []
        for i, (d, st) in enumerate(zip(self.shape, self.strides)):
            sl = index[i] if i < len(index) else slice(None)
            if isinstance(sl, slice):
                lo, hi, step = sl.indices(d)
                if step != 1:
                    raise NotImplementedError("DeviceView slices take unit steps")
                ptr += lo * st
                shape.append(max(0, hi - lo))
                strides.append(st)
            else:
                ptr += (int(sl) % d) * st
        return DeviceView(ptr, shape, strides, self.dtype, self.owner)

    def copy_to_host(self, stream=0):
        from numba import cuda
        return cuda.as_cuda_array(self, sync=False).copy_to_host(stream=stream)


def c_contiguous(shape, strides, itemsize):
    """Whether (shape, strides) is C-contiguous (NumPy's rule: size-1 dims take any stride)."""
    expected = itemsize
    for d, st in zip(reversed(shape), reversed(strides)):
        if d == 0:
            return True
        if d != 1 and st != expected:
            return False
        expected *= d
    return True


def _layout(shape, strides, itemsize):
    if c_contiguous(shape, strides, itemsize):
        return "C"
    if c_contiguous(shape[::-1], strides[::-1], itemsize):
        return "F"
    return "A"


_SCALAR_CTYPES = {"int64": ctypes.c_int64, "int32": ctypes.c_int32, "uint64": ctypes.c_uint64,
                  "uint32": ctypes.c_uint32, "float32": ctypes.c_float,
                  "float64": ctypes.c_double}


def _arg_key(a):
    """A hashable key that decides the numba type of the kernel argument ``a``."""
    t = type(a)
    if t is DeviceView:
        return (a.dtype, len(a.shape), _layout(a.shape, a.strides, a.dtype.itemsize))
    if t is bool or t is int or t is float:
        return t
    if isinstance(a, np.generic):
        return a.dtype
    raise TypeError(f"fastce.cuda: no fast launch for a kernel argument of type {t.__name__}")


def _numba_type(key):
    from numba.cuda import types
    from numba.cuda.np import numpy_support
    if key is bool:
        return types.boolean
    if key is int:
        return types.int64
    if key is float:
        return types.float64
    if isinstance(key, tuple):
        dtype, ndim, layout = key
        return types.Array(numpy_support.from_dtype(dtype), ndim, layout)
    return numpy_support.from_dtype(key)


def _pack_array(a, out):
    out += (0, 0, a.size, a.dtype.itemsize, a.ptr)
    out += a.shape
    out += a.strides


def _packer(numba_type):
    """The function that appends one argument of ``numba_type`` to the parameter list."""
    from numba.cuda import types
    if isinstance(numba_type, types.Array):
        return _pack_array
    if numba_type == types.boolean:
        return lambda v, out: out.append(bool(v))
    ctype = _SCALAR_CTYPES.get(str(numba_type))
    if ctype is None:
        return None
    return lambda v, out: out.append(ctype(v))


class _Streams:
    """cuda.core stream objects for numba streams (numba builds one on every launch)."""

    def __init__(self):
        self._by_id = {}

    def core(self, stream):
        entry = self._by_id.get(id(stream))
        if entry is None or entry[0] is not stream:
            from numba.cuda.cudadrv.driver import _to_core_stream
            if len(self._by_id) > 256:
                self._by_id.clear()
            entry = self._by_id[id(stream)] = (stream, _to_core_stream(stream))
        return entry[1]


_STREAMS = _Streams()

# The CUDA device of the call in progress on this thread, when the caller's array names it
# (torch tensors): lets a launch reuse the kernel's function handle for that device instead of
# asking numba for the current context each time.
CALL_DEVICE = threading.local()


class FastKernel:
    """A numba CUDA dispatcher with a cached launch path (see the module docstring)."""

    def __init__(self, dispatcher):
        self.dispatcher = dispatcher
        self._overloads = {}
        self._configs = {}
        self._functions = {}

    def __getattr__(self, name):
        # Everything else (py_func, targetoptions, overloads...) is the dispatcher's.
        return getattr(self.dispatcher, name)

    def __getitem__(self, launch):
        if SIM:
            return self.dispatcher[launch]
        grid, block, stream = launch
        return lambda *args: self._launch(grid, block, stream, args)

    def _launch(self, grid, block, stream, args):
        key = tuple(map(_arg_key, args))
        entry = self._overloads.get(key)
        if entry is None:
            entry = self._overloads[key] = self._compile(key)
        kernel, packers = entry
        params = []
        for pack, a in zip(packers, args):
            pack(a, params)
        from cuda.core import launch
        launch(_STREAMS.core(stream), self._config(grid, block), self._function(kernel),
               *params)

    def _function(self, kernel):
        """The kernel's function handle on the call's device."""
        device = getattr(CALL_DEVICE, "index", None)
        if device is None:
            return kernel._codelibrary.get_cufunc().kernel
        key = (id(kernel), device)
        fn = self._functions.get(key)
        if fn is None:
            fn = self._functions[key] = kernel._codelibrary.get_cufunc().kernel
        return fn

    def _compile(self, key):
        """The compiled kernel for an argument key (numba compiles it, or takes it from its
        cache), and the packer of each parameter."""
        argtypes = tuple(_numba_type(k) for k in key)
        kernel = self.dispatcher.compile(argtypes)
        packers = [_packer(t) for t in kernel.argument_types]
        if None in packers or getattr(kernel, "launch_config_sensitive", False):
            raise NotImplementedError(f"fastce.cuda: kernel argument types {argtypes} have no "
                                      f"fast launch")
        return kernel, packers

    def _config(self, grid, block):
        cfg = self._configs.get((grid, block))
        if cfg is None:
            from cuda.core import LaunchConfig
            cfg = self._configs[(grid, block)] = LaunchConfig(grid=grid, block=block,
                                                              shmem_size=0)
        return cfg
