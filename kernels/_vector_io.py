"""16-byte global loads and stores shared by the kernels, with their simulator twins.

numba indexes a ``uint8`` array one byte at a time; these small LLVM intrinsics
move 16 bytes with one ``LDG.E.128`` / ``STG.E.128`` instead:

* ``address_of(a, i)``: the address of element ``a[i]`` as ``uint64`` (to test alignment);
* ``load_u32x4(a, i)``: the 16 bytes starting at element ``a[i]`` as 4 little-endian
  ``uint32`` (one ``LDG.E.128``);
* ``store_u32x4(a, i, w0, w1, w2, w3)``: the reverse (one ``STG.E.128``);
* ``bswap32(x)``: a word's bytes reversed (one ``PRMT``: inline PTX), for big-endian data
  (AES, GHASH) loaded as little-endian words.

``a`` is a C-contiguous ``uint8`` or ``uint32`` array of any dimension; ``i`` is a
flat element index (``row * columns + column`` for a 2-D array). Contract: ``i >= 0``,
16 bytes in bounds from ``a[i]``, and ``address_of(a, i) % 16 == 0``; nothing is
checked on the device.

Under numba's CUDA simulator the intrinsics cannot run; Python twins with the
same contract (alignment asserted) take their place. The choice is made here,
once, at import (:data:`ON_SIMULATOR`).
"""
from __future__ import annotations

import numpy as np
from numba import cuda, uint32, uint64

from ._compile import device_function
from ._launch import is_simulator


def _make_intrinsics(intrinsic=None):
    """The device versions: LLVM vector loads and stores of ``<4 x i32>``, 16-byte aligned.

    ``intrinsic`` is numba-cuda's decorator by default; the device-typed tests pass
    ``numba.extending.intrinsic`` to run the same code generation on the CPU.
    """
    from llvmlite import ir
    from numba import types

    if intrinsic is None:
        from numba.cuda.extending import intrinsic

    vec_t = ir.VectorType(ir.IntType(32), 4)

    def element_pointer(context, builder, array_type, array, index):
        ary = context.make_array(array_type)(context, builder, value=array)
        return builder.gep(ary.data, [index])

    @intrinsic
    def address_of(typingctx, array, index):
        def codegen(context, builder, sig, args):
            ptr = element_pointer(context, builder, sig.args[0], args[0], args[1])
            return builder.ptrtoint(ptr, ir.IntType(64))

        return types.uint64(array, index), codegen

    @intrinsic
    def load_u32x4(typingctx, array, index):
        ret = types.UniTuple(types.uint32, 4)

        def codegen(context, builder, sig, args):
            ptr = element_pointer(context, builder, sig.args[0], args[0], args[1])
            vec = builder.load(builder.bitcast(ptr, vec_t.as_pointer()), align=16)
            words = [builder.extract_element(vec, ir.Constant(ir.IntType(32), k)) for k in range(4)]
            return context.make_tuple(builder, ret, words)

        return ret(array, index), codegen

    @intrinsic
    def store_u32x4(typingctx, array, index, w0, w1, w2, w3):
        def codegen(context, builder, sig, args):
            ptr = element_pointer(context, builder, sig.args[0], args[0], args[1])
            vec = ir.Constant(vec_t, ir.Undefined)
            for k in range(4):
                word = context.cast(builder, args[2 + k], sig.args[2 + k], types.uint32)
                vec = builder.insert_element(vec, word, ir.Constant(ir.IntType(32), k))
            builder.store(vec, builder.bitcast(ptr, vec_t.as_pointer()), align=16)
            return context.get_dummy_value()

        return types.void(array, index, w0, w1, w2, w3), codegen

    return address_of, load_u32x4, store_u32x4


def _make_simulator_twins():
    """Simulator twins: same contract, alignment asserted.

    They run as plain Python inside the simulator's threads, on the NumPy array
    that the simulator's fake device array wraps.
    """

    def _bytes_at(array, index):
        base = getattr(array, "_ary", array)
        flat = base.reshape(-1)
        address = flat.ctypes.data + int(index) * flat.itemsize
        assert address % 16 == 0, "16-byte access at a misaligned address"
        start = int(index) * flat.itemsize
        return flat.view(np.uint8)[start:start + 16]

    @cuda.jit(device=True)
    def address_of(array, index):
        base = getattr(array, "_ary", array)
        return uint64(base.ctypes.data + int(index) * base.itemsize)

    @cuda.jit(device=True)
    def load_u32x4(array, index):
        words = _bytes_at(array, index).copy().view("<u4")
        return uint32(words[0]), uint32(words[1]), uint32(words[2]), uint32(words[3])

    @cuda.jit(device=True)
    def store_u32x4(array, index, w0, w1, w2, w3):
        words = np.array([w0, w1, w2, w3], dtype="<u4")
        _bytes_at(array, index)[:] = words.view(np.uint8)

    return address_of, load_u32x4, store_u32x4


#: The one place where the simulator twins are chosen.
ON_SIMULATOR = is_simulator()
address_of, load_u32x4, store_u32x4 = _make_simulator_twins() if ON_SIMULATOR else _make_intrinsics()


def _make_byte_swap(intrinsic=None):
    """The device byte swap: one ``PRMT`` (inline PTX ``prmt.b32`` with selector 0x0123).
    Written out in numba (whose ``uint32`` shifts are 64-bit) it costs about 6
    instructions a word, and NVVM lowers LLVM's ``bswap`` to shifts too.
    ``intrinsic`` as in :func:`_make_intrinsics`; the CPU build (the device-typed tests)
    uses LLVM's ``bswap``, the same function, since PTX cannot run there."""
    from llvmlite import ir
    from numba import types

    on_device = intrinsic is None
    if on_device:
        from numba.cuda.extending import intrinsic

    @intrinsic
    def byte_swap(typingctx, x):
        def codegen(context, builder, sig, args):
            word = context.cast(builder, args[0], sig.args[0], types.uint32)
            if not on_device:
                return builder.bswap(word)
            asm = ir.InlineAsm(ir.FunctionType(ir.IntType(32), [ir.IntType(32)]),
                               "prmt.b32 $0, $1, 0, 0x0123;", "=r,r")
            return builder.call(asm, [word])

        return types.uint32(x), codegen

    return byte_swap


def _make_byte_swap_simulator():
    @cuda.jit(device=True)
    def byte_swap(x):
        x = uint32(x)
        return uint32((x >> uint32(24)) | ((x >> uint32(8)) & uint32(0xFF00))
                      | ((x << uint32(8)) & uint32(0xFF0000)) | (x << uint32(24)))

    return byte_swap


#: Chosen with the twins above.
byte_swap = _make_byte_swap_simulator() if ON_SIMULATOR else _make_byte_swap()


@device_function
def bswap32(x):
    """Byte swap of a 32-bit word (one PRMT on the device)."""
    return uint32(byte_swap(uint32(x)))
