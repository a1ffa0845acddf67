"""Per-framework adapters for the tensor API: what a tensor is, where it lives, its bytes.

One adapter per array library (NumPy, PyTorch, CuPy, JAX, numba device arrays).
Each answers the same questions so that :mod:`gpucrypt.tensor` never branches on
the framework:

- ``place(x)``: ``HOST`` or ``("cuda", index)``;
- ``dtype_name(x)`` / ``shape(x)``: the portable metadata (see ``DTYPE_ITEMSIZE``);
- ``byte_view(x)``: a zero-copy, 1-D ``uint8`` view of ``x``'s memory *in the same
  framework* (a torch ``uint8`` tensor for torch, ...). Reinterpreting as bytes is
  done by the framework itself (``x.view(torch.uint8)``), never through a NumPy
  dtype, so bfloat16, float8 and complex32 need no NumPy counterpart;
- ``host_array(view)``: for host places, a NumPy ``uint8`` view of such a byte view;
- ``empty(dtype, shape, place)`` / ``empty_bytes(n, place)``: one allocation through
  the framework's own allocator, except large torch host results, which come from
  NumPy's (``gpucrypt._hostmem``: it asks for huge pages, whose faults cost a fraction of
  4 KiB pages'; like safetensors' tensors, such torch tensors have a storage that cannot
  be resized); ``finish(obj)`` turns what ``empty`` returned into
  the tensor handed to the caller (the identity except for JAX, whose arrays are
  immutable and are made from a filled buffer);
- ``current_stream(place)``: the framework's current CUDA stream, or ``None``;
- ``record_stream(x, stream, place)``: tell the framework's allocator that ``x`` is used
  on ``stream`` (torch's ``record_stream``; nothing where the allocator has no such notion).

Limits: little-endian hosts only (the bytes encrypted are the in-memory bytes, and
the dtype names below mean little-endian values). A tensor must sit on one device:
sharded JAX arrays, MPS/XPU/meta torch tensors, structured or object NumPy dtypes
and torch's quantised/sub-byte dtypes are refused with ``ValueError``.

Frameworks are only looked up in ``sys.modules``: nothing here imports torch, CuPy,
JAX or numba unless the caller already did (or a result must be made in one).
"""
from __future__ import annotations

import contextlib
import importlib
import math
import sys
from typing import Any

import numpy as np

from .. import _hostmem

#: Where a tensor lives: ``HOST`` or ``("cuda", device_index)``.
HOST = "host"

#: Portable dtype names and their item sizes in bytes. Names follow PyTorch/NumPy
#: (``float8_e4m3fn`` ...). NumPy dtypes outside this table (big-endian, strings,
#: datetimes, unstructured void, long double) are written ``"numpy:" + dtype.str``.
DTYPE_ITEMSIZE = {
    "bool": 1, "int8": 1, "uint8": 1, "int16": 2, "uint16": 2, "int32": 4, "uint32": 4,
    "int64": 8, "uint64": 8, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "complex32": 4, "complex64": 8, "complex128": 16,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "float8_e3m4": 1, "float8_e4m3": 1, "float8_e4m3b11fnuz": 1,
}
#: Names NumPy itself has (the rest need ``ml_dtypes`` or torch).
_NUMPY_NATIVE = {"bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
                 "uint64", "float16", "float32", "float64", "complex64", "complex128"}
NUMPY_PREFIX = "numpy:"

#: Codes used in the serialised metadata (docs/TENSOR_FORMAT.md).
FRAMEWORK_CODES = {"numpy": 1, "torch": 2, "cupy": 3, "jax": 4, "numba": 5}


# ----------------------------------------------------------------------------- dtypes
#: dtype -> portable name, for the dtypes seen (NumPy's ``dtype.name`` is Python code: a
#: fifth of a 16 KiB tensor's time in a batch of 2048).
_NUMPY_DTYPE_NAMES: dict = {}


def numpy_dtype_name(dt: np.dtype) -> str:
    """The portable name of a NumPy (or ``ml_dtypes``) dtype; ``ValueError`` if it has none."""
    if isinstance(dt, np.dtype):  # a dtype seen before costs one lookup, no np.dtype() call
        name = _NUMPY_DTYPE_NAMES.get(dt)
        if name is not None:
            return name
    dt = np.dtype(dt)
    name = _NUMPY_DTYPE_NAMES.get(dt)
    if name is None:
        name = _numpy_dtype_name(dt)
        if len(_NUMPY_DTYPE_NAMES) < 256:
            _NUMPY_DTYPE_NAMES[dt] = name
    return name


def _numpy_dtype_name(dt: np.dtype) -> str:
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        raise ValueError(f"dtype {dt} cannot be encrypted as raw bytes (object, structured or "
                         f"sub-array dtypes are not supported)")
    if dt.itemsize == 0:  # only void can be (NumPy makes S0 and U0 arrays S1, U1): every
        # size check would pass at 0 bytes, so readers refuse it (parse_numpy_dtype_str)
        raise ValueError(f"dtype {dt} has elements of no bytes: its values cannot be stored; "
                         f"view the array as bytes first")
    # the portable names are little-endian values (docs/TENSOR_FORMAT.md): told from dt.str,
    # which spells the byte order out, whatever this machine's
    if dt.str[0] in "<|" and dt.name in DTYPE_ITEMSIZE and DTYPE_ITEMSIZE[dt.name] == dt.itemsize:
        return dt.name
    if dt.kind == "V" and dt.type is not np.void:
        # an ml_dtypes type outside the table (int4, float6_e2m3fn, ...) or byte-swapped:
        # NumPy spells it "<V1", which names plain void bytes, so it could never be read back
        raise ValueError(f"dtype {dt.name} ({dt.str}) has no name in gpucrypt's tensor format, "
                         f"so its ciphertext could not be decrypted back to it: encrypt its "
                         f"bytes (x.view(numpy.uint8)) and keep the dtype beside them")
    return NUMPY_PREFIX + dt.str


def numpy_dtype(name: str) -> np.dtype:
    """The NumPy dtype for a portable name; ``ValueError`` if NumPy (and ``ml_dtypes``) lack it."""
    if name.startswith(NUMPY_PREFIX):
        return parse_numpy_dtype_str(name[len(NUMPY_PREFIX):])
    if name in _NUMPY_NATIVE:
        return np.dtype(name)
    try:
        ml_dtypes = importlib.import_module("ml_dtypes")
        return np.dtype(getattr(ml_dtypes, name))
    except (ImportError, AttributeError, TypeError):
        raise ValueError(f"NumPy has no dtype {name!r} (install ml_dtypes, or decrypt it as a "
                         f"torch tensor)") from None


def is_canonical_numpy_name(name: str) -> bool:
    """Whether a ``numpy:`` name is what a writer gives its dtype: only a dtype without a
    portable name (another byte order than little-endian, a unit, a width) has one. Told
    from the string alone, whatever this machine's byte order."""
    text = name[len(NUMPY_PREFIX):]
    dt = parse_numpy_dtype_str(text)  # ValueError for anything a writer cannot have made
    little = text[0] in "<|"
    return not (little and dt.name in DTYPE_ITEMSIZE and DTYPE_ITEMSIZE[dt.name] == dt.itemsize)


def parse_numpy_dtype_str(text: str) -> np.dtype:
    """``np.dtype(text)`` for a ``dtype.str`` we wrote; ``ValueError`` for anything else."""
    try:
        dt = np.dtype(text)
    except Exception:
        raise ValueError(f"invalid NumPy dtype string {text!r}") from None
    # 0-byte elements: every size check would pass at any shape (no writer makes them)
    if dt.str != text or dt.hasobject or dt.fields is not None or dt.subdtype is not None \
            or dt.itemsize == 0:
        raise ValueError(f"invalid NumPy dtype string {text!r}")
    return dt


def dtype_itemsize(name: str) -> int:
    """Bytes per element of a portable dtype name; ``ValueError`` if the name is unknown."""
    if name in DTYPE_ITEMSIZE:
        return DTYPE_ITEMSIZE[name]
    if name.startswith(NUMPY_PREFIX):
        return parse_numpy_dtype_str(name[len(NUMPY_PREFIX):]).itemsize
    raise ValueError(f"unknown dtype {name!r}")


def _loaded(module: str):
    """The module if the program already imported it, else ``None``."""
    return sys.modules.get(module)


# ----------------------------------------------------------------------------- adapters
class Adapter:
    """The questions :mod:`gpucrypt.tensor` asks about a tensor. See the module docstring."""

    name = ""
    #: False for frameworks whose arrays cannot be written (JAX): no in-place work.
    mutable = True

    def owns(self, x: Any) -> bool:
        raise NotImplementedError

    def place(self, x: Any):
        raise NotImplementedError

    def dtype_name(self, x: Any) -> str:
        return numpy_dtype_name(x.dtype)

    def shape(self, x: Any) -> tuple[int, ...]:
        return tuple(int(d) for d in x.shape)

    def needs_copy(self, x: Any) -> bool:
        """True when ``x``'s memory is not its logical bytes in C order."""
        return not x.flags.c_contiguous

    def contiguous_copy(self, x: Any) -> Any:
        raise NotImplementedError

    def byte_view(self, x: Any) -> Any:
        return x.reshape(-1).view(np.uint8)

    def host_array(self, view: Any) -> np.ndarray:
        return np.asarray(view)

    def empty(self, dtype: str, shape: tuple[int, ...], place) -> Any:
        raise NotImplementedError

    def empty_bytes(self, nbytes: int, place) -> Any:
        raise NotImplementedError

    def adopt_host(self, array: np.ndarray) -> Any:
        """A host ``uint8`` NumPy array as this framework's host buffer (zero-copy)."""
        return array

    def view_as(self, view: Any, dtype: str, shape: tuple[int, ...]) -> Any:
        """The tensor of ``dtype``/``shape`` whose memory is the byte view ``view``."""
        return view.view(numpy_dtype(dtype)).reshape(shape)

    def finish(self, obj: Any, home: Any = None) -> Any:
        """The result a filled ``empty`` object stands for; ``home``: see :meth:`home`."""
        return obj

    def home(self, x: Any) -> Any:
        """The device object ``x`` is on where its place does not say (JAX's CPU devices,
        which all are ``HOST``), for :meth:`finish` to put the result back there; None
        where the place says it all."""
        return None

    def copy_bytes(self, view: Any, place) -> Any:
        """A byte buffer of this framework at ``place``, of its own, holding ``view``'s
        bytes (a byte view of a tensor, as ``byte_view`` makes) and nothing more."""
        return view.copy()

    def current_stream(self, place) -> Any:
        return None

    def allocation_stream(self, stream: Any, place) -> Any:
        """A context in which ``empty``/``empty_bytes`` allocate memory on ``place`` for
        work queued on ``stream`` (a caller-given stream of that device, or None for the
        current one): the memory belongs to that stream, as if the caller had allocated
        it there."""
        return contextlib.nullcontext()

    def record_stream(self, x: Any, stream: Any, place) -> None:
        """``x`` (a device tensor of this framework) is read or written by work queued on
        ``stream``, a stream other than the one it was made on: where the framework's
        allocator tracks streams, its memory must not be reused before that work is done."""


def memory_address(view: Any) -> int | None:
    """The address of a byte view's first byte (host or device), or None if it has none
    to tell (JAX)."""
    if hasattr(view, "data_ptr"):  # torch
        return int(view.data_ptr())
    for attr in ("__cuda_array_interface__", "__array_interface__"):
        interface = getattr(view, attr, None)
        if interface is not None:
            return int(interface["data"][0] or 0)
    return None


def stream_device(stream: Any) -> int | None:
    """The CUDA device index a torch or CuPy stream belongs to (None where the stream
    object does not say: numba streams, raw handles, None)."""
    device = getattr(stream, "device", None)   # torch.cuda.Stream: a torch.device
    index = getattr(device, "index", None) if device is not None else getattr(stream, "device_id", None)
    return None if index is None else int(index)


def stream_handle(stream: Any) -> int | None:
    """The raw CUDA stream handle of a torch, CuPy or numba stream or an int (None for
    None: the framework's current stream)."""
    if stream is None:
        return None
    if isinstance(stream, int):
        return stream
    for attr in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream
        if hasattr(stream, attr):
            return int(getattr(stream, attr))
    handle = getattr(stream, "handle", None)  # numba
    if handle is not None:
        return int(getattr(handle, "value", handle) or 0)
    raise TypeError(f"unsupported stream object {type(stream).__name__}")


class NumpyAdapter(Adapter):
    """NumPy arrays, subclasses included: their memory is read as a plain ``ndarray``
    (``np.matrix`` keeps two dimensions through ``reshape(-1)``; a ``np.memmap`` is
    its mapping's memory all the same). Masked arrays are refused: their mask is not in
    their memory, and would be dropped without a word."""

    name = "numpy"

    def owns(self, x):
        return isinstance(x, np.ndarray)

    def place(self, x):
        # asked first of every array: a masked array is refused before anything is read
        masked = sys.modules.get("numpy.ma")
        if type(x) is not np.ndarray and masked is not None and isinstance(x, masked.MaskedArray):
            raise TypeError("masked arrays cannot be encrypted: the mask is not in the "
                            "array's memory and would be lost; encrypt .data and "
                            "np.ma.getmaskarray(x) as two tensors (or x.filled())")
        return HOST

    def byte_view(self, x):
        if type(x) is not np.ndarray:  # a subclass: its own reshape and view may not be NumPy's
            x = x.view(np.ndarray)
        return x.reshape(-1).view(np.uint8)

    def contiguous_copy(self, x):
        return np.ascontiguousarray(x)

    def empty(self, dtype, shape, place):
        np_dtype = numpy_dtype(dtype)
        return np.empty(shape, dtype=np_dtype)

    def empty_bytes(self, nbytes, place):
        return np.empty(nbytes, dtype=np.uint8)


#: the refusal of a tensor whose memory is not its values (:func:`memory_not_its_own`)
MEMORY_NOT_ITS_OWN = (
    "this torch tensor has no memory of its own (a DTensor, a FakeTensor or "
    "FunctionalTensor, a subclass wrapping other tensors, or a zero tensor: its "
    "data_ptr() is 0, and its bytes would be read from, or written to, address 0): "
    "encrypt its local shard (DTensor.to_local()), or a materialised copy "
    "(DTensor.full_tensor(), .clone())")


def memory_not_its_own(x: Any) -> bool:
    """Whether the torch tensor ``x``, holding some elements, has no memory of its own:
    its ``data_ptr()`` is 0 (a wrapper subclass, FakeTensor, FunctionalTensor, torch's
    zero tensor) or raises (DTensor: "invalid python storage"). Such a tensor reports a
    storage of the right size, so the storage check passes it. A subclass with storage
    of its own (Parameter, one made by ``_make_subclass``) has its address, and passes."""
    if not x.numel():
        return False
    try:
        if _dispatches_to_python(type(x)):
            import warnings

            with warnings.catch_warnings():  # FakeTensor's: "accessing the data pointer
                warnings.simplefilter("ignore")  # of FakeTensor is deprecated"
                return x.data_ptr() == 0
        return x.data_ptr() == 0
    except RuntimeError:
        return True


#: tensor type -> whether it (or a base other than torch.Tensor) defines __torch_dispatch__
_DISPATCHING_TYPES: dict[type, bool] = {}


def _dispatches_to_python(cls: type) -> bool:
    known = _DISPATCHING_TYPES.get(cls)
    if known is None:
        torch = sys.modules["torch"]
        known = any("__torch_dispatch__" in vars(k) for k in cls.__mro__
                    if k is not torch.Tensor and k is not torch._C.TensorBase)
        if len(_DISPATCHING_TYPES) < 256:
            _DISPATCHING_TYPES[cls] = known
    return known


class TorchAdapter(Adapter):
    name = "torch"

    @staticmethod
    def _torch():
        return sys.modules.get("torch") or importlib.import_module("torch")

    def owns(self, x):
        torch = _loaded("torch")
        return torch is not None and isinstance(x, torch.Tensor)

    def place(self, x):
        if x.layout is not self._torch().strided or x.is_nested:
            # asked first of every tensor: no other question has an answer for these
            raise ValueError(f"torch tensors with layout {x.layout}{' (nested)' if x.is_nested else ''} "
                             f"have no single block of values to encrypt: convert them first "
                             f"(.to_dense(), or each of a nested tensor's .unbind())")
        if memory_not_its_own(x):
            raise ValueError(MEMORY_NOT_ITS_OWN)
        if x.device.type == "cpu":
            return HOST
        if x.device.type == "cuda":
            index = x.device.index
            return ("cuda", int(index if index is not None else self._torch().cuda.current_device()))
        raise ValueError(f"torch tensors on {x.device.type!r} are not supported (cpu and cuda are)")

    def dtype_name(self, x):
        name = str(x.dtype).removeprefix("torch.")
        if name not in DTYPE_ITEMSIZE or x.dtype.itemsize != DTYPE_ITEMSIZE[name]:
            raise ValueError(f"torch dtype {x.dtype} is not supported (quantised and sub-byte "
                             f"dtypes have no plain byte layout)")
        return name

    def shape(self, x):
        return tuple(x.shape)  # torch.Size holds ints already (the generic form costs 1.5 us)

    def needs_copy(self, x):
        # a lazily conjugated/negated view's memory is not its values
        return not x.is_contiguous() or x.is_conj() or x.is_neg()

    def contiguous_copy(self, x):
        return x.detach().resolve_conj().resolve_neg().contiguous()

    def byte_view(self, x):
        return x.detach().reshape(-1).view(self._torch().uint8)

    def host_array(self, view):
        return view.numpy()

    def _device(self, place):
        return "cpu" if place == HOST else f"cuda:{place[1]}"

    def empty(self, dtype, shape, place):
        torch = self._torch()
        torch_dtype = getattr(torch, dtype)
        if place == HOST and torch_dtype.itemsize * math.prod(shape) >= _hostmem.HUGE_PAGE_MIN_BYTES:
            raw = self.empty_bytes(torch_dtype.itemsize * math.prod(shape), place)
            return raw.view(torch_dtype).reshape(shape)
        return torch.empty(shape, dtype=torch_dtype, device=self._device(place))

    def empty_bytes(self, nbytes, place):
        torch = self._torch()
        if place == HOST and nbytes >= _hostmem.HUGE_PAGE_MIN_BYTES:
            return torch.from_numpy(_hostmem.empty_host_bytes(nbytes))
        return torch.empty(nbytes, dtype=torch.uint8, device=self._device(place))

    def adopt_host(self, array):
        if not array.size:
            # NumPy copies an empty array (a copy or deep copy of a result, a pickle's
            # in-place ciphertext) with stride 0, which torch keeps and its views of another
            # dtype refuse (view_as: an in-place decrypt): one of its own has stride 1
            array = np.empty(1, dtype=np.uint8)[:0]
        return self._torch().from_numpy(array)

    def copy_bytes(self, view, place):
        # a storage of exactly the view's bytes (a view pickles its whole storage)
        return view.clone(memory_format=self._torch().contiguous_format)

    def view_as(self, view, dtype, shape):
        return view.view(getattr(self._torch(), dtype)).reshape(shape)

    def current_stream(self, place):
        if place == HOST:
            return None
        return self._torch().cuda.current_stream(self._device(place))

    def allocation_stream(self, stream, place):
        # The caching allocator ties a block to the stream current at allocation and hands
        # it out again in that stream's order: allocated on the current stream but
        # written on ``stream``, a block could be reused (or still be in use) by work on
        # the current stream that ``stream`` is not ordered with.
        handle = stream_handle(stream)
        if handle is None or place == HOST:
            return contextlib.nullcontext()
        torch = self._torch()
        return torch.cuda.stream(self._torch_stream(stream, handle, place))

    def _torch_stream(self, stream, handle, place):
        torch = self._torch()
        if isinstance(stream, torch.cuda.Stream):
            return stream
        # a foreign handle: say its device
        return torch.cuda.ExternalStream(handle, device=torch.device("cuda", place[1]))

    def record_stream(self, x, stream, place):
        # The caching allocator frees a block for reuse on the stream it was allocated on:
        # without this, memory of an input dropped by the caller while the side stream
        # still reads it could be handed out and overwritten.
        handle = stream_handle(stream)
        if handle is None or place == HOST:
            return
        x.record_stream(self._torch_stream(stream, handle, place))


class CupyAdapter(Adapter):
    name = "cupy"

    def owns(self, x):
        cupy = _loaded("cupy")
        return cupy is not None and isinstance(x, cupy.ndarray)

    def place(self, x):
        return ("cuda", int(x.device.id))

    def contiguous_copy(self, x):
        return importlib.import_module("cupy").ascontiguousarray(x)

    def empty(self, dtype, shape, place):
        cupy = importlib.import_module("cupy")
        with cupy.cuda.Device(place[1]):
            return cupy.empty(shape, dtype=numpy_dtype(dtype))

    def empty_bytes(self, nbytes, place):
        cupy = importlib.import_module("cupy")
        with cupy.cuda.Device(place[1]):
            return cupy.empty(nbytes, dtype=np.uint8)

    def copy_bytes(self, view, place):
        cupy = importlib.import_module("cupy")
        with cupy.cuda.Device(place[1]):  # CuPy copies onto the current device
            return view.copy()

    def current_stream(self, place):
        cupy = importlib.import_module("cupy")
        with cupy.cuda.Device(place[1]):
            return cupy.cuda.get_current_stream()

    def allocation_stream(self, stream, place):
        # CuPy's pool keeps one arena per stream (the current one at allocation) and
        # reuses freed blocks on that stream only: allocate on the stream that uses them.
        handle = stream_handle(stream)
        if handle is None or place == HOST:
            return contextlib.nullcontext()
        cupy = importlib.import_module("cupy")
        try:
            return cupy.cuda.ExternalStream(handle, device_id=place[1])
        except TypeError:  # CuPy before 13 has no device_id: the current device is assumed
            return cupy.cuda.ExternalStream(handle)


class NumbaAdapter(Adapter):
    """numba device arrays (``DeviceNDArray``; ``FakeCUDAArray`` under the simulator)."""

    name = "numba"

    def owns(self, x):
        if _loaded("numba.cuda") is None:
            return False
        from numba.cuda.cudadrv import devicearray

        return bool(devicearray.is_cuda_ndarray(x))

    def place(self, x):
        return ("cuda", _numba_array_device(x))

    def needs_copy(self, x):
        return not x.is_c_contiguous()

    def contiguous_copy(self, x):
        from numba import cuda

        with _numba_device(self.place(x)):
            return cuda.to_device(np.ascontiguousarray(x.copy_to_host()))

    def byte_view(self, x):
        return x.reshape(x.size).view(np.uint8)

    def empty(self, dtype, shape, place):
        from numba import cuda

        with _numba_device(place):
            return cuda.device_array(shape, dtype=numpy_dtype(dtype))

    def empty_bytes(self, nbytes, place):
        from numba import cuda

        with _numba_device(place):
            return cuda.device_array(nbytes, dtype=np.uint8)

    def copy_bytes(self, view, place):
        out = self.empty_bytes(view.size, place)
        with _numba_device(place):
            out.copy_to_device(view)
        return out


def _numba_device_index() -> int:
    from numba import cuda

    dev = cuda.get_current_device()
    return int(getattr(dev, "id", 0) or 0)


def _numba_array_device(x) -> int:
    """The device whose memory a numba device array is: that of the context its
    allocation belongs to (the current device only where the array does not say)."""
    context = getattr(getattr(x, "gpu_data", None), "context", None)
    device = getattr(context, "device", None)
    if device is not None and getattr(device, "id", None) is not None:
        return int(device.id)
    return _numba_device_index()


def _numba_device(place):
    """numba's context manager making ``place``'s device current (nothing when it is)."""
    from numba import cuda

    if place == HOST or place[1] == _numba_device_index():
        return contextlib.nullcontext()
    return cuda.gpus[place[1]]


class JaxAdapter(Adapter):
    """JAX arrays on one device (tested on the CPU; GPU arrays travel through DLPack).

    JAX arrays are immutable: ``inplace=True`` and ``out=`` are refused, and a
    decrypted tensor is a new array, one copy more than elsewhere. Host arrays are read
    through ``np.asarray`` (no copy); a host result is filled as NumPy and copied to
    JAX's CPU device (even where JAX's default device is a GPU), so a CPU array comes
    back a CPU array. A GPU array is read through ``__cuda_array_interface__``; its
    ciphertext, and a GPU result before it becomes a JAX array, live in a CuPy or torch
    buffer (JAX cannot make a writable one), so GPU results need CuPy or a CUDA torch.
    dtypes: those of ``DTYPE_ITEMSIZE`` (64-bit ones exist only with ``jax_enable_x64``);
    the sub-byte ones (int2/int4/uint2/uint4/float4_e2m1fn) are refused.
    """

    name = "jax"
    mutable = False

    def owns(self, x):
        jax = _loaded("jax")
        return jax is not None and isinstance(x, jax.Array)

    def place(self, x):
        devices = list(x.devices())
        if len(devices) != 1:
            raise ValueError("sharded JAX arrays are not supported; encrypt each shard")
        return _jax_device_place(devices[0])

    def dtype_name(self, x):
        try:
            name = numpy_dtype_name(x.dtype)   # JAX's dtypes are NumPy's and ml_dtypes'
        except ValueError:  # ml_dtypes' sub-byte types, which the table has no name for
            name = None
        if name not in DTYPE_ITEMSIZE:
            raise ValueError(f"JAX dtype {x.dtype} is not supported (sub-byte dtypes have no "
                             f"plain byte layout)")
        return name

    def needs_copy(self, x):
        return False

    def byte_view(self, x):
        import jax.numpy as jnp

        if isinstance(x, np.ndarray):   # a host result being filled (see empty)
            return x.reshape(-1).view(np.uint8)
        if self.place(x) == HOST:
            return np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8)
        # Array.view handles bool and complex too (lax.bitcast_convert_type refuses
        # complex); flattened first so that 0-d arrays have an axis to widen. JAX
        # dispatches asynchronously and its __cuda_array_interface__ hands out the
        # pointer without waiting: the bytes must exist before another library reads them.
        return x.reshape(-1).view(jnp.uint8).block_until_ready()

    def empty(self, dtype, shape, place):
        dt = _jax_dtype(dtype)
        if place == HOST:
            return np.empty(shape, dtype=dt)
        return _JaxDeviceResult(_device_bytes_buffer(
            int(np.prod(shape, dtype=np.int64)) * dtype_itemsize(dtype), place), dtype, shape)

    def empty_bytes(self, nbytes, place):
        if place == HOST:
            return np.empty(nbytes, dtype=np.uint8)
        return _device_bytes_buffer(nbytes, place)

    def view_as(self, view, dtype, shape):
        return self.finish(view.view(_jax_dtype(dtype)).reshape(shape))

    def home(self, x):
        devices = x.devices()
        if len(devices) == 1:
            (device,) = devices
            if device.platform == "cpu":
                return device
        return None

    def finish(self, obj, home=None):
        import jax
        import jax.numpy as jnp

        if isinstance(obj, np.ndarray):
            # the CPU device the array was on (there may be several), else the first one
            return jax.device_put(obj, home if home is not None
                                  else jax.local_devices(backend="cpu")[0])
        raw = jax.dlpack.from_dlpack(obj.buffer)
        if obj.dtype == "bool":
            return raw.reshape(obj.shape) != 0
        # Array.view, not lax.bitcast_convert_type: the latter refuses complex dtypes
        return raw.view(jnp.dtype(_jax_dtype(obj.dtype))).reshape(obj.shape)

    @staticmethod
    def default_place():
        """Where JAX puts a new array: its default device (``HOST`` when that is the CPU)."""
        import jax

        return _jax_device_place(jax.devices()[0])


def _jax_device_place(dev):
    if dev.platform == "cpu":
        return HOST
    if dev.platform in ("gpu", "cuda"):
        return ("cuda", int(getattr(dev, "local_hardware_id", dev.id) or 0))
    raise ValueError(f"JAX arrays on {dev.platform!r} are not supported")


def _jax_dtype(name: str) -> np.dtype:
    """The dtype of a JAX array of the portable dtype ``name``; ``ValueError`` where this
    JAX cannot make one (64-bit types without ``jax_enable_x64``, ``complex32``, ...)."""
    import jax

    if name not in DTYPE_ITEMSIZE:
        raise ValueError(f"JAX has no dtype {name!r}")
    dt = numpy_dtype(name)
    if jax.dtypes.canonicalize_dtype(dt) != dt:
        raise ValueError(f"this tensor is {name}, which JAX makes only with 64-bit types "
                         f"enabled: jax.config.update('jax_enable_x64', True) before decrypting")
    return dt


class _JaxDeviceResult:
    """A device byte buffer (CuPy or torch) that becomes a JAX array once filled."""

    def __init__(self, buffer, dtype, shape):
        self.buffer, self.dtype, self.shape = buffer, dtype, shape


def _device_bytes_buffer(nbytes: int, place):
    """A writable device ``uint8`` buffer from CuPy or torch, for frameworks that cannot make one."""
    try:
        importlib.import_module("cupy")
        return CupyAdapter().empty_bytes(nbytes, place)
    except ImportError:
        pass
    try:
        if importlib.import_module("torch").cuda.is_available():
            return TorchAdapter().empty_bytes(nbytes, place)
    except ImportError:
        pass
    raise ValueError("a JAX array on the GPU is made from a writable device buffer, which needs "
                     "CuPy or a CUDA build of torch; install one, or decrypt with device='cpu'")


# The order matters: torch and CuPy arrays also expose __cuda_array_interface__.
_ADAPTERS = (TorchAdapter(), CupyAdapter(), JaxAdapter(), NumbaAdapter(), NumpyAdapter())
BY_NAME = {a.name: a for a in _ADAPTERS}


def adapter_for(x: Any) -> Adapter:
    """The adapter of ``x``'s framework; ``TypeError`` for anything that is not a tensor."""
    for adapter in _ADAPTERS:
        if adapter.owns(x):
            return adapter
    raise TypeError(f"expected a tensor (NumPy, PyTorch, CuPy, JAX or numba device array), not "
                    f"{type(x).__name__}")


def result_adapter(framework: str, place) -> Adapter:
    """The adapter that makes a result of ``framework`` at ``place``.

    A host result of a device-only framework (CuPy, numba), or of a framework this
    process cannot import, is a NumPy array.
    """
    if framework in ("cupy", "numba") and place == HOST:
        return BY_NAME["numpy"]
    if framework in ("torch", "cupy", "jax"):
        try:
            importlib.import_module(framework)
        except ImportError:
            if place != HOST:
                raise ValueError(f"this tensor was made with {framework}, which is not "
                                 f"installed here; decrypt it on the CPU") from None
            return BY_NAME["numpy"]
    if framework == "numba" and place != HOST:
        importlib.import_module("numba.cuda")
    return BY_NAME[framework]


def current_device_place(framework: str):
    """The place of a new device result of ``framework`` (its current CUDA device; for JAX
    its default device, ``HOST`` when JAX has no GPU)."""
    if framework == "torch":
        torch = importlib.import_module("torch")
        if not torch.cuda.is_available():  # current_device() asserts on a CPU-only torch
            raise ValueError("this torch has no CUDA device, so a GPU decrypt cannot make a "
                             "torch result on one: give a host out=, or leave device unset")
        return ("cuda", int(torch.cuda.current_device()))
    if framework == "cupy":
        return ("cuda", int(importlib.import_module("cupy").cuda.Device().id))
    if framework == "jax":   # HOST when JAX sees no GPU: a JAX array can only be where JAX is
        return JaxAdapter.default_place()
    return ("cuda", _numba_device_index())
