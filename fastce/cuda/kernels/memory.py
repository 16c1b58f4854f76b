"""Element access for the hot loops, and the NaN-propagating float32 max.

Numba's own ``x[n, c, s]`` wraps negative indices and multiplies 64-bit indices by 64-bit
strides at every access, and strided ('A') arrays get generic rather than global loads.  The
intrinsics here take the in-row index ``c`` as a 32-bit unsigned value (a row has fewer than
2**32 elements) and index nothing negative, so the row's base address is loop-invariant and
hoisted, and the access is one wide multiply-add and a global load:

* ``load3(x, n, c, s)`` / ``store3(out, n, c, s, v)``: element ``[n, c, s]`` of a 3-D array;
* a cursor for walking a row: ``addr3(x, n, c, s)`` is the byte address of ``x[n, c, s]``,
  ``load_at(x, p, n, c, s)`` / ``store_at(out, p, n, c, s, v)`` access the element at address
  ``p`` (the hot loops advance ``p`` by a byte step, so an access costs one 64-bit add);
  ``(n, c, s)`` is the same element's index, which only the simulator's twin reads;
  ``addr1(a, i)`` and ``load1_at(a, p, i)`` are the same for a 1-D array;
* ``load1(a, i)`` / ``store1(a, i, v)``: element ``i`` (``0 <= i``, 64-bit) of a 1-D array.
* for the strided copy, a 6-D array walked by byte address: ``base6(a)`` is the address of
  element 0 (``a.strides`` give the steps), ``flat_addr(a, i)`` the address of flat element
  ``i`` of a C-contiguous ``a``; ``load1_at(a, p, i)`` / ``store1_at(a, p, i, v)`` access
  the element at address ``p`` whose index (here the 6-D tuple) ``i`` only the simulator's
  twin reads.

``step(p, d)``: the byte address ``p + d`` as one PTX ``add.s64`` that LLVM cannot look through.
A hot loop that walks several cursors ``p, p + d, p + 2d, ...`` written with plain adds has
each one turned into an invariant 64-bit offset from one induction variable; under a
register bound ptxas then rebuilds every offset inside the loop (three ``IMAD`` a load).
Chained ``step``s keep one cursor and one step live: two instructions an address.
``steps4(p, d)`` is the chain ``(p + d, p + 2d, p + 3d, p + 4d)`` of a four-element step.

``max_nan_f32(a, b)``: PTX ``max.NaN.f32``, one instruction (sm_80+), where the comparison
form costs three.

The simulator cannot run intrinsics: under ``NUMBA_ENABLE_CUDASIM=1`` the same names are plain
indexing and the comparison max.
"""
from numba import config, cuda

__all__ = ["load3", "store3", "addr3", "load_at", "store_at", "addr1", "load1_at",
           "load1", "store1", "base6", "flat_addr", "store1_at",
           "step", "steps4", "max_nan_f32"]


def _sim_twins():
    @cuda.jit(device=True)
    def load3(x, n, c, s):
        return x[n, c, s]

    @cuda.jit(device=True)
    def store3(out, n, c, s, v):
        out[n, c, s] = v

    @cuda.jit(device=True)
    def addr3(x, n, c, s):
        return 0

    @cuda.jit(device=True)
    def load_at(x, p, n, c, s):
        return x[n, c, s]

    @cuda.jit(device=True)
    def store_at(out, p, n, c, s, v):
        out[n, c, s] = v

    @cuda.jit(device=True)
    def addr1(a, i):
        return 0

    @cuda.jit(device=True)
    def load1_at(a, p, i):
        return a[i]

    @cuda.jit(device=True)
    def load1(a, i):
        return a[i]

    @cuda.jit(device=True)
    def store1(a, i, v):
        a[i] = v

    @cuda.jit(device=True)
    def base6(a):
        return 0

    @cuda.jit(device=True)
    def flat_addr(a, i):
        return 0

    @cuda.jit(device=True)
    def store1_at(a, p, i, v):
        a[i] = v

    @cuda.jit(device=True)
    def step(p, d):
        return p + d

    @cuda.jit(device=True)
    def max_nan_f32(a, b):
        return a if (a > b or a != a) else b

    return (load3, store3, addr3, load_at, store_at, addr1, load1_at, load1, store1, base6,
            flat_addr, store1_at, step, max_nan_f32)


def _intrinsics():
    from llvmlite import ir
    from numba import types
    from numba.cuda import cgutils
    from numba.cuda.extending import intrinsic

    i32, i64 = ir.IntType(32), ir.IntType(64)

    def _int64(context, builder, val, ty):
        return context.cast(builder, val, ty, types.int64)

    def _global_ptr(context, builder, aryty, ary, offsets):
        """Address ``data + sum(offsets)`` (bytes) of ``ary``'s element type, in the global
        space; the offsets are added in order, so a loop-invariant one given first stays
        hoisted with the data pointer."""
        arr = context.make_array(aryty)(context, builder, value=ary)
        elt = context.get_data_type(aryty.dtype)
        p = builder.bitcast(arr.data, ir.IntType(8).as_pointer())
        for off in offsets:
            p = builder.gep(p, [off], inbounds=True)
        return builder.addrspacecast(builder.bitcast(p, elt.as_pointer()),
                                     ir.PointerType(elt, 1))

    def _offset3(context, builder, sig, args):
        """(row offset, in-row offset) in bytes of element [n, c, s]."""
        aryty, nty, cty, sty = sig.args[:4]
        ary, n, c, s = args[:4]
        arr = context.make_array(aryty)(context, builder, value=ary)
        s0, s1, s2 = cgutils.unpack_tuple(builder, arr.strides, 3)
        # c: 32-bit, non-negative; its product with the class stride is exact in 64 bits.
        c64 = builder.zext(builder.trunc(_int64(context, builder, c, cty), i32), i64)
        row = builder.add(builder.mul(_int64(context, builder, n, nty), s0, flags=["nsw"]),
                          builder.mul(_int64(context, builder, s, sty), s2, flags=["nsw"]),
                          flags=["nsw"])
        return row, builder.mul(c64, s1, flags=["nuw", "nsw"])

    @intrinsic
    def load3(typingctx, x, n, c, s):
        def codegen(context, builder, sig, args):
            offs = _offset3(context, builder, sig, args)
            return builder.load(_global_ptr(context, builder, sig.args[0], args[0], offs))
        return x.dtype(x, n, c, s), codegen

    @intrinsic
    def store3(typingctx, out, n, c, s, v):
        def codegen(context, builder, sig, args):
            offs = _offset3(context, builder, sig, args)
            val = context.cast(builder, args[4], sig.args[4], sig.args[0].dtype)
            builder.store(val, _global_ptr(context, builder, sig.args[0], args[0], offs))
            return context.get_dummy_value()
        return types.void(out, n, c, s, v), codegen

    @intrinsic
    def addr3(typingctx, x, n, c, s):
        def codegen(context, builder, sig, args):
            aryty, nty, cty, sty = sig.args
            arr = context.make_array(aryty)(context, builder, value=args[0])
            st = cgutils.unpack_tuple(builder, arr.strides, 3)
            off = None
            for v, ty, stride in zip(args[1:], sig.args[1:], st):
                term = builder.mul(_int64(context, builder, v, ty), stride, flags=["nsw"])
                off = term if off is None else builder.add(off, term, flags=["nsw"])
            return builder.add(builder.ptrtoint(arr.data, i64), off)
        return types.int64(x, n, c, s), codegen

    def _at(context, builder, aryty, p):
        elt = context.get_data_type(aryty.dtype)
        return builder.inttoptr(p, ir.PointerType(elt, 1))

    @intrinsic
    def load_at(typingctx, x, p, n, c, s):
        def codegen(context, builder, sig, args):
            return builder.load(_at(context, builder, sig.args[0], args[1]))
        return x.dtype(x, p, n, c, s), codegen

    @intrinsic
    def store_at(typingctx, out, p, n, c, s, v):
        def codegen(context, builder, sig, args):
            val = context.cast(builder, args[5], sig.args[5], sig.args[0].dtype)
            builder.store(val, _at(context, builder, sig.args[0], args[1]))
            return context.get_dummy_value()
        return types.void(out, p, n, c, s, v), codegen

    @intrinsic
    def addr1(typingctx, a, i):
        def codegen(context, builder, sig, args):
            arr = context.make_array(sig.args[0])(context, builder, value=args[0])
            off = builder.mul(_int64(context, builder, args[1], sig.args[1]),
                              cgutils.unpack_tuple(builder, arr.strides, 1)[0], flags=["nsw"])
            return builder.add(builder.ptrtoint(arr.data, i64), off)
        return types.int64(a, i), codegen

    @intrinsic
    def load1_at(typingctx, a, p, i):
        def codegen(context, builder, sig, args):
            return builder.load(_at(context, builder, sig.args[0], args[1]))
        return a.dtype(a, p, i), codegen

    def _offset1(context, builder, sig, args):
        itemsize = context.get_abi_sizeof(context.get_data_type(sig.args[0].dtype))
        return builder.mul(_int64(context, builder, args[1], sig.args[1]),
                           ir.Constant(i64, itemsize), flags=["nuw", "nsw"])

    @intrinsic
    def load1(typingctx, a, i):
        def codegen(context, builder, sig, args):
            off = _offset1(context, builder, sig, args)
            return builder.load(_global_ptr(context, builder, sig.args[0], args[0], [off]))
        return a.dtype(a, i), codegen

    @intrinsic
    def store1(typingctx, a, i, v):
        def codegen(context, builder, sig, args):
            off = _offset1(context, builder, sig, args)
            val = context.cast(builder, args[2], sig.args[2], sig.args[0].dtype)
            builder.store(val, _global_ptr(context, builder, sig.args[0], args[0], [off]))
            return context.get_dummy_value()
        return types.void(a, i, v), codegen

    @intrinsic
    def base6(typingctx, a):
        def codegen(context, builder, sig, args):
            arr = context.make_array(sig.args[0])(context, builder, value=args[0])
            return builder.ptrtoint(arr.data, i64)
        return types.int64(a), codegen

    @intrinsic
    def flat_addr(typingctx, a, i):
        def codegen(context, builder, sig, args):
            arr = context.make_array(sig.args[0])(context, builder, value=args[0])
            off = _offset1(context, builder, sig, args)
            return builder.add(builder.ptrtoint(arr.data, i64), off)
        return types.int64(a, i), codegen

    @intrinsic
    def store1_at(typingctx, a, p, i, v):
        def codegen(context, builder, sig, args):
            val = context.cast(builder, args[3], sig.args[3], sig.args[0].dtype)
            builder.store(val, _at(context, builder, sig.args[0], args[1]))
            return context.get_dummy_value()
        return types.void(a, p, i, v), codegen

    @intrinsic
    def step(typingctx, p, d):
        def codegen(context, builder, sig, args):
            p64, d64 = (_int64(context, builder, v, ty) for v, ty in zip(args, sig.args))
            asm = ir.InlineAsm(ir.FunctionType(i64, [i64, i64]), "add.s64 $0, $1, $2;",
                               "=l,l,l")
            return builder.call(asm, [p64, d64])
        return types.int64(p, d), codegen

    @intrinsic
    def max_nan_f32(typingctx, a, b):
        def codegen(context, builder, sig, args):
            f32 = ir.FloatType()
            asm = ir.InlineAsm(ir.FunctionType(f32, [f32, f32]), "max.NaN.f32 $0, $1, $2;",
                               "=f,f,f")
            return builder.call(asm, list(args))
        return types.float32(types.float32, types.float32), codegen

    return (load3, store3, addr3, load_at, store_at, addr1, load1_at, load1, store1, base6,
            flat_addr, store1_at, step, max_nan_f32)


(load3, store3, addr3, load_at, store_at, addr1, load1_at, load1, store1, base6, flat_addr,
 store1_at, step, max_nan_f32) = (
    _sim_twins() if config.ENABLE_CUDASIM else _intrinsics())


@cuda.jit(device=True)
def steps4(p, d):
    p1 = step(p, d)
    p2 = step(p1, d)
    p3 = step(p2, d)
    return p1, p2, p3, step(p3, d)
