"""The GPU backend: numba-cuda kernels (``gpucrypt.kernels``) over device memory.

Every operation works on a *batch* of messages and costs one launch per step,
whatever the batch size: a single 10 GB tensor and ten thousand small tensors
are both one keystream launch and one MAC pass.

ChaCha20-Poly1305 (and XChaCha20-Poly1305, under HChaCha20 subkeys made on the
host from the host-held key):
  1. one ChaCha20 launch writes each message's Poly1305 one-time key (block 0)
     into device scratch and one encrypts the data (blocks 1..) in place or out
     of place;
  2. the Poly1305 kernels MAC every ciphertext (tag="gpu"), or the ciphertext
     goes to the host and ``cryptography``'s Poly1305 does it (tag="host").
AES-GCM:
  1. one AES launch computes H = E_K(0^128) and E_K(J0) per message and the
     GCTR keystream from inc32(J0); J0 itself is nonce || 1 for 12-byte nonces,
     and GHASH_H of the nonce, on the host, for other lengths;
  2. the GHASH kernels (tag="gpu") or the host GHASH (tag="host") make the tag.
Decryption MACs the ciphertext first, compares tags on the host in constant
time, and only then runs the keystream over the messages that verified.

Host orchestration, what a GPU rewards:

- Every array the host makes for a batch (key tables, segment tables, message
  tables, the associated data) is packed into one *pinned* staging buffer and
  uploaded in one copy, before the first launch. A copy from pageable memory, or
  one queued behind a launch, makes the host wait for the device; here nothing
  waits between the first launch and the result: ``seal_batch`` with tag="gpu"
  returns with its work queued, and ``open_batch`` waits once, for its verdicts.
- Device memory is reused across calls. Per device a few *slots* (pinned
  staging, a device buffer for the tables, device scratch for one-time keys,
  GCM key blocks and MAC partials) are handed out in turn and grow when a batch
  needs more; a steady-state ``seal_batch`` allocates only the tags it returns.
  A slot's pinned staging is refilled once its last upload is done (an event
  the host waits for, before any launch); a slot last used on another stream is
  ordered after that use on the device (an event wait, the host does not wait).
- Work runs on the current device (the caller switches it: ``device(index)``)
  and on the caller's stream.
- Few numba device arrays per call: each one costs tens of microseconds of
  Python on the host (an H200 call took 1.1-4.2 ms of host time whatever its
  size, 2026-12-04). A message buffer is a :class:`DeviceSpan` (address, length,
  owner), a slot's typed views are made from addresses and kept per layout,
  and copies and memsets take byte counts instead of slices.

Memory: kernels address one source and one destination array by byte offsets.
Separate device allocations (the tensors of a state dict) are addressed through
one *span* array that starts at the lowest allocation and covers the highest;
the kernels touch only the bytes of their segments. A destination may share
memory only with its own source, and then exactly (in place): anything else
would race on a device (threads of one launch read and write in no set order),
so it is refused before any launch. The simulator has no address space, so
there the batch is gathered into one staging array and scattered back.
"""
from __future__ import annotations

import contextlib
import functools
import hmac
import struct
import sys
import threading
from collections import deque
from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag

from .. import _limits
from .._buffers import bytes_arg
from .._interrupts import held_interrupts, uninterrupted
from ._base import AeadContext, Backend
from ._probe import gpu_unavailable_reason  # noqa: F401  (its public home until now)

_TAG = 16
_ALGORITHMS = ("chacha20-poly1305", "xchacha20-poly1305", "aes-gcm")
#: Offsets of the arrays packed into a slot's staging and scratch buffers: the kernels'
#: 16-byte loads (key rows) and the MAC kernels' 8-byte words need no more; 256 keeps
#: each array on its own cache lines.
_ALIGN = 256
#: Smallest slot buffer: a batch of small messages fits without growing.
_MIN_CAPACITY = 64 << 10
#: Layouts whose views a slot keeps (a cache cleared when full): a process encrypting a few
#: shapes of batch over and over makes its views once.
_VIEW_LAYOUTS = 32
#: Slots made ahead of need per device: two, so that a call refills the staging of the
#: call before last (whose upload finished long ago) while the last one's is in flight.
_RING = 2


@functools.cache
def _simulated() -> bool:
    """numba's CUDA simulator is on: fixed when numba was imported, so asked once (the import
    statement it took cost about half a microsecond per call, and a batch asks several
    times per message)."""
    from numba import config

    return bool(config.ENABLE_CUDASIM)


def _by_address() -> bool:
    """Whether a batch handles its buffers by address: message buffers as
    :class:`DeviceSpan`, one arena array over their address range, slot views made from
    addresses. On a device, always. The simulator has no device address space: there the
    buffers are NumPy arrays, gathered into one staging array and sliced. (Its tests turn
    this on over host addresses, to run the device's branch with the real kernels.)"""
    return not _simulated()


def _device_memset(dev, value: int, nbytes: int, stream) -> None:
    """``nbytes`` bytes of the device array ``dev`` set to ``value``, queued on ``stream``
    (cuMemsetD8Async; synchronous on stream 0). In the device's context, made current on
    this thread if it is not (as numba's own array methods do)."""
    from numba.cuda.cudadrv.devices import get_context
    from numba.cuda.cudadrv.driver import device_memset

    get_context()
    device_memset(dev, value, nbytes, stream=stream)


def _host_to_device(dev, host: np.ndarray, nbytes: int, stream) -> None:
    """The first ``nbytes`` of ``host`` (pinned: asynchronous) copied to the start of the device
    array ``dev``, queued on ``stream`` (cuMemcpyHtoDAsync), in the current context as above."""
    from numba.cuda.cudadrv.devices import get_context
    from numba.cuda.cudadrv.driver import host_to_device

    get_context()
    host_to_device(dev, host, nbytes, stream=stream)


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


# --------------------------------------------------------------------------- device arrays

class DeviceSpan:
    """``nbytes`` bytes of device memory at address ``ptr``, kept alive by ``owner``: what a
    batch needs of each message's buffer (where it is, how long), without a numba device
    array. Making one of those costs tens of microseconds of Python on the host (numba-cuda's
    context checks and shape bookkeeping; on an H200, 2026-12-04, about 80 us of host time
    per tensor in a batch of 2048), and a batch made several per message. Kernels never see
    a span: they address every message through one array over all of them (:class:`_Arena`).

    Exposes the CUDA array interface (1-D ``uint8``), so numba, CuPy and torch can still
    view it, and ``size``/``nbytes`` as a byte array does."""

    __slots__ = ("ptr", "nbytes", "owner")

    def __init__(self, ptr: int, nbytes: int, owner: Any):
        self.ptr, self.nbytes, self.owner = int(ptr), int(nbytes), owner

    def __len__(self) -> int:
        return self.nbytes

    @property
    def size(self) -> int:
        return self.nbytes

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False),
                "version": 3, "strides": None}

    def __repr__(self) -> str:
        return f"DeviceSpan(0x{self.ptr:x}, {self.nbytes})"


def _interface_of(obj: Any) -> tuple[int, int] | None:
    """(device pointer, nbytes) of a C-contiguous device object, or None if it is not one."""
    if type(obj) is DeviceSpan:
        return obj.ptr, obj.nbytes
    if hasattr(obj, "data_ptr") and hasattr(obj, "is_cuda"):  # torch
        if not obj.is_cuda:
            return None
        if not obj.is_contiguous():
            raise ValueError("tensor is not contiguous; call .contiguous() first "
                             "(or pass contiguous=True to the tensor API)")
        return int(obj.data_ptr()), int(obj.numel() * obj.element_size())
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is None:
        return None
    shape = tuple(cai["shape"])
    itemsize = np.dtype(cai["typestr"]).itemsize
    strides = cai.get("strides")
    if strides is not None:
        expected, step = [], itemsize
        for dim in reversed(shape):
            expected.append(step)
            step *= dim
        # an axis of length 1 is never stepped along: its stride is whatever the exporter
        # wrote (NumPy-style x[:, None] says 0), as NumPy's own contiguity flags take it
        if len(strides) != len(shape):  # zip() below would stop at the shorter
            raise ValueError(f"device array's interface gives {len(strides)} strides for "
                             f"{len(shape)} dimensions: it is malformed")
        if int(np.prod(shape)) > 1 and any(dim != 1 and stride != want for dim, stride, want
                                           in zip(shape, strides, reversed(expected))):
            raise ValueError("device array is not C-contiguous; make a contiguous copy first")
    return int(cai["data"][0]), int(np.prod(shape, dtype=np.int64)) * itemsize


def _device_interface(obj: Any) -> tuple[int, int]:
    """:func:`_interface_of`, or a ``TypeError`` that says what to do for host memory."""
    found = _interface_of(obj)
    if found is None:
        raise TypeError(f"{type(obj).__name__} is not a CUDA device array (no "
                        f"__cuda_array_interface__); copy it with to_device first")
    return found


def _span_of(buf: Any) -> tuple[int, int]:
    """(address, nbytes) of a byte buffer of a batch: device memory, or under the
    simulator the host memory that stands in for it."""
    if not _by_address():
        return int(buf.__array_interface__["data"][0]), int(buf.nbytes)
    return _interface_of(buf)


def _refuse_overlaps(spans: Sequence[tuple[int, int]], n: int) -> None:
    """``ValueError`` when a destination (``spans[n:]``) shares memory with anything but
    its own source at the same address (in place). Sources may overlap each other: they
    are only read."""
    ranges = sorted((p, p + size, i % n, i >= n) for i, (p, size) in enumerate(spans) if size)
    active: list = []
    for start, end, msg, is_dst in ranges:
        active = [r for r in active if r[1] > start]
        for a_start, _, a_msg, a_dst in active:
            if not (is_dst or a_dst):
                continue
            if a_msg == msg and a_dst != is_dst and a_start == start:
                continue  # in place
            first, second = sorted((a_msg, msg))
            what = ("its own source at another address" if a_msg == msg else
                    f"the {'destination' if (a_dst if a_msg == second else is_dst) else 'source'} "
                    f"of message {first}")
            raise ValueError(
                f"message {second}: its destination overlaps {what}; the messages of a batch "
                f"run at the same time on the device, so each destination must be memory of "
                f"its own (or exactly its source, for in place)")
        active.append((start, end, msg, is_dst))


def _fake_device_array(host: np.ndarray):
    """Under the simulator, ``host`` as a simulated device array without a copy (a NumPy
    argument would be copied in and out at every launch)."""
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    return FakeCUDAArray(host)


class _Arena:
    """One base array covering every buffer of a launch, plus each buffer's offset in it.

    On a GPU the base is a zero-copy span over the device address range of all the
    buffers. In the simulator (no address space) the buffers are copied into one
    staging array and copied back by :meth:`write_back`; a source and its in-place
    destination (one address) share one copy, as they share memory on a device.
    ``base`` is None when no buffer has a byte.
    """

    def __init__(self, cuda, buffers: Sequence[Any], spans: Sequence[tuple[int, int]]):
        self._buffers = list(buffers)
        self.offsets: list[int] = []
        self.base = None
        self._staged = not _by_address()
        if self._staged:
            sizes: dict[int, int] = {}
            for p, size in spans:
                sizes[p] = max(sizes.get(p, 0), size)
            at, cursor = {}, 0
            for p, size in sizes.items():
                at[p], cursor = cursor, cursor + size
            self.offsets = [at[p] for p, _ in spans]
            if cursor:
                staging = np.empty(cursor, dtype=np.uint8)
                for buf, (p, size) in zip(self._buffers, spans):
                    if size == sizes[p]:
                        staging[at[p]:at[p] + size] = np.asarray(buf).reshape(-1).view(np.uint8)
                self.base = _fake_device_array(staging)
            return
        # Empty buffers may carry a null pointer: they are never touched, so they take no
        # part in the span (offset 0).
        used = [(p, n) for p, n in spans if n > 0]
        if not used:
            self.offsets = [0] * len(spans)
            return
        low = min(p for p, _ in used)
        high = max(p + n for p, n in used)
        self.offsets = [p - low if n > 0 else 0 for p, n in spans]
        self.base = cuda.from_cuda_array_interface(
            {"shape": (max(high - low, 1),), "typestr": "|u1", "data": (low, False),
             "version": 3, "strides": None}, owner=self._buffers, sync=False)

    def write_back(self, indices: Sequence[int]) -> None:
        """Copy staged results back into the buffers at ``indices`` (simulator only)."""
        if not self._staged or self.base is None:
            return
        staged = self.base._ary
        for i in indices:
            flat = self._buffers[i].reshape(-1).view(np.uint8)
            flat[:] = staged[self.offsets[i]:self.offsets[i] + flat.size]


# --------------------------------------------------------------------------- reused memory

class _Slot:
    """The memory one batch uses and a later one reuses: pinned host staging for its
    tables, the device buffer they are uploaded to, and device scratch.

    ``uploaded`` is recorded after the slot's last upload: the staging may be refilled
    once it has completed. ``released`` is recorded after the slot's last use, on the
    stream keyed ``stream_key``: a batch on another stream waits for it on the device.
    """

    def __init__(self, cuda):
        self._cuda = cuda
        self.staging = self.tables = self.scratch = None
        self._view_cache: dict = {}   # (id(buffer), layout) -> (buffer, views)
        self.uploaded = self.released = None
        self.stream_key = None

    def _event(self):
        return self._cuda.event() if _simulated() else self._cuda.event(timing=False)

    def begin(self, stream) -> None:
        """Order this slot's device buffers after their last use, if that was on another stream."""
        key = _stream_key(stream)
        if self.released is not None and self.stream_key != key:
            self.released.wait(stream)
        self.stream_key = key

    def end(self, stream) -> None:
        if self.released is None:
            self.released = self._event()
        self.released.record(stream)

    def upload(self, parts: list, nbytes: int, stream) -> Any:
        """``parts`` ((offset, array) pairs) copied into the staging at their offsets and
        uploaded in one copy on ``stream``; returns the device buffer."""
        cuda = self._cuda
        if self.uploaded is not None:
            self.uploaded.synchronize()   # its last upload: before any launch of this batch
        if self.staging is None or self.staging.size < nbytes:
            self.staging = cuda.pinned_array(_capacity(nbytes), dtype=np.uint8)
        if self.tables is None or self.tables.size < nbytes:
            self._forget_views(self.tables)
            self.tables = cuda.device_array(_capacity(nbytes), dtype=np.uint8, stream=stream)
        for offset, arr in parts:
            self.staging[offset:offset + arr.nbytes] = arr.reshape(-1).view(np.uint8)
        if not _by_address():
            self.tables[:nbytes].copy_to_device(self.staging[:nbytes], stream=stream)
        else:   # what the slices' copy_to_device calls, without making two device arrays
            _host_to_device(self.tables, self.staging, nbytes, stream)
        if self.uploaded is None:
            self.uploaded = self._event()
        self.uploaded.record(stream)
        return self.tables

    def scratch_buffer(self, nbytes: int, stream) -> Any:
        if self.scratch is None or self.scratch.size < nbytes:
            self._forget_views(self.scratch)
            self.scratch = self._cuda.device_array(_capacity(nbytes), dtype=np.uint8, stream=stream)
        return self.scratch

    def _forget_views(self, buffer) -> None:
        """Drop the views of a buffer being replaced: they would keep its memory alive."""
        if buffer is not None:
            self._view_cache = {k: v for k, v in self._view_cache.items() if v[0] is not buffer}

    def views(self, buffer, layout) -> list:
        """:func:`_views` of this slot's ``buffer``, made once per layout: a call shaped like
        an earlier one (the same message count and lengths, as a training loop's) reuses them.
        A buffer that grew is a new buffer: the views of the old one are dropped with it."""
        key = (id(buffer), tuple(layout))   # an entry keeps its buffer, so the id stays its own
        found = self._view_cache.get(key)
        if found is not None:
            return found[1]
        if len(self._view_cache) >= _VIEW_LAYOUTS:
            self._view_cache.clear()
        views = _views(self._cuda, buffer, layout)
        self._view_cache[key] = (buffer, views)
        return views


def _capacity(nbytes: int) -> int:
    """The size a slot buffer grows to: the next power of two, at least ``_MIN_CAPACITY``."""
    return max(_MIN_CAPACITY, 1 << max(int(nbytes) - 1, 0).bit_length())


def _stream_key(stream) -> int:
    """What tells two streams apart: the raw handle (the simulator's streams have none)."""
    try:
        return int(stream)
    except TypeError:
        return id(stream)


class _SlotRing:
    """The slots of one device, handed out oldest first (one per call in progress)."""

    def __init__(self, cuda):
        self._cuda = cuda
        self._free = deque(_Slot(cuda) for _ in range(_RING))
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def slot(self, stream):
        with self._lock:
            slot = self._free.popleft() if self._free else _Slot(self._cuda)
        slot.begin(stream)
        try:
            yield slot
        finally:
            slot.end(stream)
            with self._lock:
                self._free.append(slot)


class _Work:
    """One batch's device work: the host-made arrays (uploaded together), the scratch it
    needs, and its launches. ``table``/``space`` return an index; the launches are
    functions of the device views ``(tables, scratch)``, run in order per phase."""

    def __init__(self):
        self.parts: list = []          # (offset, host array)
        self.table_bytes = 0
        self.spaces: list = []         # (offset, nbytes, dtype, shape)
        self.zeroed_bytes = 0          # scratch [0, zeroed_bytes) starts as zeros
        self.scratch_bytes = 0
        self.phases: dict[str, list] = {"keys": [], "data": [], "mac": []}

    def table(self, arr: np.ndarray) -> int:
        arr = np.ascontiguousarray(arr)
        offset = _round_up(self.table_bytes, _ALIGN)
        self.parts.append((offset, arr))
        self.table_bytes = offset + max(arr.nbytes, 1)
        return len(self.parts) - 1

    def space(self, nbytes: int, dtype=np.uint8, shape=None, *, zero: bool = False) -> int:
        """Scratch of ``nbytes``; ``zero``: it starts as zeros (zeroed spaces are asked for
        first, so that one memset covers them)."""
        if zero and self.scratch_bytes != self.zeroed_bytes:
            raise AssertionError("zeroed scratch must be asked for before the rest")
        offset = _round_up(self.scratch_bytes, _ALIGN)
        self.spaces.append((offset, int(nbytes), np.dtype(dtype),
                            shape if shape is not None else (int(nbytes) // np.dtype(dtype).itemsize,)))
        self.scratch_bytes = offset + max(int(nbytes), 1)
        if zero:
            self.zeroed_bytes = self.scratch_bytes
        return len(self.spaces) - 1

    def alias(self, index: int, dtype, shape, start: int = 0) -> int:
        """Another view of scratch space ``index``: from its byte ``start``, as ``dtype`` in
        ``shape``. Made with the other views (once per layout), so that a launcher is handed
        the type and shape it works in, where a reshape or a ``view`` per call would make a
        new device array each time."""
        offset, size, _, _ = self.spaces[index]
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not (start >= 0 and start + nbytes <= size and (offset + start) % dtype.itemsize == 0):
            raise AssertionError(f"alias of {nbytes} bytes of {dtype} at {start} does not fit a space of "
                                 f"{size} at {offset} (in it and aligned to its items: a device faults)")
        self.spaces.append((offset + start, nbytes, dtype, tuple(shape)))
        return len(self.spaces) - 1

    def launch(self, phase: str, fn) -> None:
        self.phases[phase].append(fn)


def _views(cuda, buffer, layout) -> list:
    """Typed device views of ``buffer`` at each (offset, nbytes, dtype, shape).

    On a GPU each view is one device array made from its address; slicing, retyping and
    reshaping ``buffer`` would make three, each costing tens of microseconds of Python
    (a seal takes about twenty views). The simulator's arrays are sliced."""
    if not _by_address():
        return [buffer[offset:offset + nbytes].view(dtype).reshape(shape)
                for offset, nbytes, dtype, shape in layout]
    base, size = _device_interface(buffer)
    views = []
    for offset, nbytes, dtype, shape in layout:
        if not (0 <= offset and offset + nbytes <= size
                and int(np.prod(shape, dtype=np.int64)) * dtype.itemsize == nbytes):
            raise AssertionError(f"view ({offset}, {nbytes}, {dtype}, {shape}) does not fit a "
                                 f"buffer of {size} bytes")
        views.append(cuda.from_cuda_array_interface(
            {"shape": tuple(shape), "typestr": dtype.str, "data": (base + offset, False),
             "version": 3, "strides": None}, owner=buffer, sync=False))
    return views


# --------------------------------------------------------------------------- the backend

class GpuBackend(Backend):
    """Batched AEADs and keystreams on a CUDA device (or numba's simulator)."""

    name = "gpu"

    def __init__(self):
        from numba import cuda

        self._cuda = cuda
        dev = cuda.get_current_device()
        name = getattr(dev, "name", b"")
        self.device_name = name.decode() if isinstance(name, bytes) else str(name)
        if _simulated():
            self.device_name = "numba CUDA simulator"
        self._rings: dict[int, _SlotRing] = {}
        self._rings_lock = threading.Lock()

    def describe(self) -> dict:
        from gpucrypt.kernels import _launch

        info = {"name": self.name, "device": self.device_name, "simulator": _simulated()}
        if not _simulated():
            dev = self._cuda.get_current_device()
            info["compute_capability"] = ".".join(map(str, dev.compute_capability))
            info["multiprocessors"] = _launch.sm_count()
            try:
                info["driver"] = ".".join(map(str, self._cuda.cudadrv.driver.driver.get_version()))
            except Exception:  # pragma: no cover - only informative
                pass
        return info

    # ---- devices and streams ----
    def current_device(self) -> int:
        """The index of numba's current CUDA device (0 under the simulator)."""
        return int(getattr(self._cuda.get_current_device(), "id", 0) or 0)

    @contextlib.contextmanager
    def device(self, index: int | None):
        """Make CUDA device ``index`` current for the block (None: leave it as it is).

        Every launch, allocation, stream and copy of the block then belongs to that
        device's context: a tensor on ``cuda:1`` is worked on in ``cuda:1``'s context
        with ``cuda:1``'s streams, whatever device the caller's thread had current."""
        if index is None or index == self.current_device():
            yield
            return
        with self._cuda.gpus[index]:
            yield

    def _ring(self) -> _SlotRing:
        index = self.current_device()
        with self._rings_lock:
            ring = self._rings.get(index)
            if ring is None:
                ring = self._rings[index] = _SlotRing(self._cuda)
        return ring

    def wait_for(self, stream: Any, producer: Any) -> None:
        """Order work queued on ``stream`` from now on after all work queued so far on
        ``producer`` (an event recorded there and waited for on the device; the host
        does not wait). Nothing when they are the same stream."""
        s, p = self._stream(stream), self._stream(producer)
        if s is p or _stream_key(s) == _stream_key(p):
            return
        event = self._cuda.event() if _simulated() else self._cuda.event(timing=False)
        event.record(p)
        event.wait(s)

    def new_stream(self):
        """A stream of the current device of its own (the pipeline's copy stream)."""
        return self._cuda.stream()

    def mark(self, stream: Any):
        """An event recorded now on ``stream``: ``.synchronize()`` waits (on the host) for
        the work queued there so far."""
        event = self._cuda.event() if _simulated() else self._cuda.event(timing=False)
        event.record(self._stream(stream))
        return event

    def pinned(self, nbytes: int) -> np.ndarray:
        """A page-locked host ``uint8`` buffer: copies from and to it are asynchronous (and
        run at full PCIe speed); one from pageable memory makes the host wait."""
        return self._cuda.pinned_array(max(int(nbytes), 1), dtype=np.uint8)[:nbytes]

    def copy_to_device(self, dev: Any, host: np.ndarray, stream: Any) -> None:
        """Queue the copy of ``host`` into the device buffer ``dev`` (same size) on ``stream``."""
        if isinstance(dev, np.ndarray):   # the simulator's stand-in for device memory
            dev[...] = host
            return
        self._array(dev).copy_to_device(host, stream=self._stream(stream))

    def copy_to_host(self, host: np.ndarray, dev: Any, stream: Any) -> None:
        """Queue the copy of the device buffer ``dev`` into ``host`` (same size) on ``stream``;
        the bytes are there once the stream's work up to here is done (:meth:`mark`)."""
        if isinstance(dev, np.ndarray):
            host[...] = dev
            return
        self._array(dev).copy_to_host(host, stream=self._stream(stream))

    def _array(self, dev: Any):
        """``dev`` as a numba device array: a :class:`DeviceSpan` made into one (a span has no
        copies of its own), anything else as it is."""
        return self.as_device_bytes(dev) if type(dev) is DeviceSpan else dev

    # ---- device memory helpers (the layer above never touches numba or CuPy) ----
    def as_device_bytes(self, obj: Any):
        """A zero-copy 1-D uint8 device view of ``obj`` (NumPy arrays stand in under the simulator)."""
        if not _by_address():
            if isinstance(obj, np.ndarray):
                if not obj.flags.c_contiguous:
                    raise ValueError("array is not C-contiguous; make a contiguous copy first")
                return obj.reshape(-1).view(np.uint8)
            if hasattr(obj, "copy_to_host"):  # a simulator device array
                if not obj.is_c_contiguous():
                    raise ValueError("array is not C-contiguous; make a contiguous copy first")
                return obj.reshape(-1).view(np.uint8) if hasattr(obj, "view") else obj
            raise TypeError(f"{type(obj).__name__} is not device memory in the simulator "
                            f"(NumPy arrays stand in for device arrays there)")
        ptr, size = _device_interface(obj)
        return self._cuda.from_cuda_array_interface(
            {"shape": (size,), "typestr": "|u1", "data": (ptr, False), "version": 3,
             "strides": None}, owner=obj, sync=False)

    def device_span(self, obj: Any):
        """``obj``'s bytes as a message buffer of :meth:`seal_batch`/:meth:`open_batch`: a
        :class:`DeviceSpan` on a GPU (no numba device array made), what
        :meth:`as_device_bytes` gives under the simulator. The same refusals as there."""
        if not _by_address():
            return self.as_device_bytes(obj)
        if type(obj) is DeviceSpan:
            return obj
        ptr, size = _device_interface(obj)
        return DeviceSpan(ptr, size, obj)

    def byte_range(self, dev: Any, start: int, stop: int):
        """Bytes ``[start, stop)`` of the device byte buffer ``dev`` as a message buffer: a
        :class:`DeviceSpan` on a GPU, a slice of ``dev`` under the simulator."""
        if not _by_address():
            return dev[start:stop]
        ptr, size = _device_interface(dev)
        if not 0 <= start <= stop <= size:
            raise IndexError(f"bytes [{start}, {stop}) are not within a buffer of {size}")
        return DeviceSpan(ptr + start, stop - start, dev)

    def to_device(self, host: Any, stream=None):
        """A fresh 1-D uint8 device copy of ``host``.

        With ``stream`` the copy is queued there (use it on that stream). Without, the
        bytes are on the device when this returns: a copy from pageable memory can
        return with its last DMA still in flight, which work queued on a
        non-blocking stream (a torch side stream) would not wait for.
        """
        arr = np.frombuffer(memoryview(host).cast("B"), dtype=np.uint8) if not isinstance(host, np.ndarray) \
            else host.reshape(-1).view(np.uint8)
        if _simulated():
            return arr.copy()
        s = self._stream(stream)
        dev = self._cuda.to_device(arr, stream=s)
        if stream is None:
            s.synchronize()
        return dev

    def device_array(self, nbytes: int, stream=None):
        if _simulated():
            return np.zeros(nbytes, dtype=np.uint8)
        return self._cuda.device_array(nbytes, dtype=np.uint8, stream=self._stream(stream))

    def to_host(self, dev: Any, out: np.ndarray | None = None, stream=None) -> np.ndarray:
        """Copy device bytes to the host; returns once they are there.

        Without ``stream``, all queued GPU work is waited for first: ``dev`` may have been
        written on any stream, and a copy on the legacy default stream does not wait for
        non-blocking ones (torch's side streams). With ``stream``, the copy is queued
        after that stream's work.
        """
        if isinstance(dev, np.ndarray):
            if out is None:
                return dev.copy()
            out[...] = dev
            return out
        dev = self._array(dev)
        if stream is None:
            self.synchronize_device()
        s = self._stream(stream)
        host = dev.copy_to_host(out, stream=s) if out is not None else dev.copy_to_host(stream=s)
        s.synchronize()   # a copy on a stream into pinned memory returns before it is done
        return host

    def synchronize_device(self) -> None:
        """Wait for all work queued on the device, on every stream (work the caller
        queued on streams of its own, which nothing here is ordered after)."""
        if not _simulated():
            self._cuda.synchronize()

    def synchronize(self, stream=None) -> None:
        if _simulated():
            return
        self._stream(stream).synchronize()

    def _stream(self, stream: Any):
        """A numba stream for ``stream``: numba's own, a torch or CuPy stream, a raw handle,
        or (None) CuPy's current stream when CuPy is in use, else the default stream.
        Always a stream object (never 0): copies on it are asynchronous."""
        cuda = self._cuda
        if stream is not None and hasattr(stream, "synchronize") and \
                type(stream).__module__.startswith("numba"):
            return stream
        if _simulated():   # no external streams there; every stream is the one
            if stream is not None and not isinstance(stream, int) and \
                    not any(hasattr(stream, attr) for attr in ("cuda_stream", "ptr")):
                # refused as on a device, so that tests see where it is refused
                raise TypeError(f"unsupported stream object {type(stream).__name__}")
            return cuda.default_stream()
        if stream is None:
            cupy = sys.modules.get("cupy")
            ptr = cupy.cuda.get_current_stream().ptr if cupy is not None else 0
            return cuda.external_stream(ptr) if ptr else cuda.default_stream()
        if isinstance(stream, int):
            return cuda.external_stream(stream) if stream else cuda.default_stream()
        for attr in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream
            if hasattr(stream, attr):
                ptr = int(getattr(stream, attr))
                return cuda.external_stream(ptr) if ptr else cuda.default_stream()
        raise TypeError(f"unsupported stream object {type(stream).__name__}")

    # ---- AEAD contexts for host buffers (the public classes) ----
    def aead(self, algorithm: str, key: bytes) -> AeadContext:
        return _HostBufferAead(self, algorithm, key)

    def seal_many(self, algorithm, key, nonces, datas, aads):
        """One host-to-device copy, one batch, one copy back, for the whole list."""
        n = len(datas)
        if n == 0:
            return []
        dev, offsets = self._gather(datas)
        views = [dev[offsets[i]:offsets[i + 1]] for i in range(n)]
        tags = self.to_host(self.seal_batch(algorithm, [key] * n, nonces, views, aads, views))
        host = self.to_host(dev)
        return [bytearray(host[offsets[i]:offsets[i + 1]].tobytes() + tags[i].tobytes()) for i in range(n)]

    def open_many(self, algorithm, key, nonces, datas, aads):
        n = len(datas)
        if n == 0:
            return []
        short = [len(d) < _TAG for d in datas]
        cts = [d[:len(d) - _TAG] if not bad else b"" for d, bad in zip(datas, short)]
        tags = [bytes(d[len(d) - _TAG:]) if not bad else bytes(_TAG) for d, bad in zip(datas, short)]
        dev, offsets = self._gather(cts)
        views = [dev[offsets[i]:offsets[i + 1]] for i in range(n)]
        ok = self.open_batch(algorithm, [key] * n, nonces, views, tags, aads, views)
        host = self.to_host(dev)
        return [bytearray(host[offsets[i]:offsets[i + 1]].tobytes()) if ok[i] and not short[i] else None
                for i in range(n)]

    def _gather(self, buffers):
        offsets = [0]
        for b in buffers:
            offsets.append(offsets[-1] + len(b))
        host = np.empty(max(offsets[-1], 1), dtype=np.uint8)
        for i, b in enumerate(buffers):
            host[offsets[i]:offsets[i + 1]] = np.frombuffer(b, dtype=np.uint8) if len(b) else host[:0]
        return self.to_device(host), offsets

    # ---- keystreams ----
    def xor_keystream(self, algorithm, key, iv, position, data, out):
        dev = self.to_device(data)
        self.xor_keystream_device(algorithm, key, iv, position, dev, dev)
        self.to_host(dev, np.frombuffer(out, dtype=np.uint8))

    def xor_keystream_device(self, algorithm: str, key: bytes, iv: bytes, position: int,
                             src, dst=None, *, stream=None) -> None:
        """XOR the keystream from byte ``position`` of (key, iv) into device ``src`` -> ``dst``.

        ``iv`` as in :meth:`Backend.xor_keystream`. In place when ``dst`` is None.
        """
        src = self.device_span(src)
        dst = src if dst is None else self.device_span(dst)
        if dst.size < src.size:
            raise ValueError("dst is smaller than src")
        spans = [_span_of(src), _span_of(dst)]
        _refuse_overlaps(spans, 1)
        arena = _Arena(self._cuda, [src, dst], spans)
        work = _Work()
        if algorithm == "chacha20":
            from gpucrypt.kernels import chacha20 as k

            # the kernel counts blocks in 64 bits: past block 2**32 - 1 it would carry into
            # the nonce's first word, another nonce's keystream; refused first, as on the CPU
            _limits.check_chacha20_keystream(iv, position, src.size)
            counter = struct.unpack("<I", iv[:4])[0]
            table, starts = k.pack_segments([arena.offsets[0]], [arena.offsets[1]], [src.size], [0],
                                            k.nonce_words(iv[4:]).reshape(1, 3), [counter * 64 + position])
            keys, rows, first = (work.table(k.key_words(key)), work.table(table.reshape(-1)),
                                 work.table(starts))
            work.launch("data", lambda t, _: k.chacha20_xor(
                arena.base, arena.base, t[keys], t[rows], t[first], 1, int(starts[-1]), stream=s))
        elif algorithm == "aes-ctr":
            from gpucrypt.kernels import aes as k

            words, rounds = k.expand_key(key)
            table, starts = k.pack_segments([arena.offsets[0]], [arena.offsets[1]], [src.size], [0],
                                            k.counter_block_words(iv).reshape(1, 4), [position], inc32=False)
            keys, rows, first = (work.table(words.reshape(1, -1)), work.table(table),
                                 work.table(starts))
            work.launch("data", lambda t, _: k.aes_ctr_xor(
                arena.base, arena.base, t[keys], rounds, t[rows], t[first], 1, int(starts[-1]),
                stream=s))
        else:
            raise ValueError(f"unknown keystream algorithm {algorithm!r}")
        s = self._stream(stream)
        if src.size:
            with self._ring().slot(s) as slot:
                self._run(work, slot, s, ("data",))
        arena.write_back([1])

    # ---- batched AEAD on device arrays ----
    def seal_batch(self, algorithm: str, keys: Sequence[bytes], nonces: Sequence[bytes],
                   srcs: Sequence[Any], aads: Sequence[bytes], dsts: Sequence[Any], *,
                   tag: str = "gpu", stream=None):
        """Encrypt every message ``srcs[i] -> dsts[i]`` (in place allowed); return tags uint8[n, 16] (device).

        No synchronisation with tag="gpu": every upload is queued before the first
        launch, from pinned memory, and the call returns with the work queued on
        ``stream``. ``dsts[i]`` must hold at least ``len(srcs[i])`` bytes and share no
        memory with another message (``ValueError``), except ``srcs[i]`` itself. A seal
        that raises (Ctrl-C included) leaves each in-place message as its plaintext.
        """
        plan, s, arena, src_off, dst_off = self._launch_setup(algorithm, keys, nonces, srcs, aads, dsts, tag,
                                                             stream)
        n = plan.n
        tags = self._cuda.device_array((n, _TAG), dtype=np.uint8, stream=s)  # the one allocation
        if n == 0:
            return tags
        work = self._batch_work(plan, arena, src_off, dst_off, s, tags, key_blocks=True, data=True)
        with self._ring().slot(s) as slot:
            self._run(work, slot, s, ("keys",))
            # The keystream overwrites an in-place message before its MAC is made: should the
            # MAC phase fail (a launch, a module load, out of memory) or Ctrl-C come, the caller
            # would be left with ciphertext and no tag, their plaintext gone. The data launches
            # are counted, and those that ran are run again (the keystream XORed twice is none)
            # before the exception goes on. A Ctrl-C among them is held back until they are all
            # counted (two signal.signal calls, against 1-4 ms of host time a batch).
            launched = 0
            try:
                with held_interrupts():
                    for fn in work.phases["data"]:
                        fn(work.tables, work.scratch)
                        launched += 1
                self._finish_tags(plan, work, slot, arena, dst_off, tags, s)
            except BaseException as exc:
                uninterrupted(self._undo_data, work, launched, s, exc)
                raise
        arena.write_back(range(n, 2 * n))
        return tags

    def open_batch(self, algorithm: str, keys: Sequence[bytes], nonces: Sequence[bytes],
                   srcs: Sequence[Any], tags: Any, aads: Sequence[bytes], dsts: Sequence[Any], *,
                   tag: str = "gpu", stream=None) -> np.ndarray:
        """Verify every tag, then decrypt only the messages that verified; return ok flags.

        A failed message's ``dst`` is zeroed, or left untouched when it is ``src`` (in place).
        Waits once for the device: the verdicts are needed on the host. Every upload of
        a batch that verifies is queued before the first launch; the decryption is
        queued on ``stream`` after the verdicts and not waited for.
        """
        plan, s, arena, src_off, dst_off = self._launch_setup(algorithm, keys, nonces, srcs, aads, dsts, tag,
                                                             stream)
        n = plan.n
        expected = self._expected_tags(tags, n)
        if n == 0:
            return np.zeros(0, dtype=bool)
        with self._ring().slot(s) as slot:
            work = self._batch_work(plan, arena, src_off, dst_off, s, None, key_blocks=True, data=True)
            self._run(work, slot, s, ("keys",))
            computed_host = self._finish_tags(plan, work, slot, arena, src_off, None, s)
            ok = np.array([hmac.compare_digest(computed_host[i].tobytes(), expected[i]) for i in range(n)],
                          dtype=bool)
            good = [i for i in range(n) if ok[i]]
            if len(good) == n:
                self._launch(work, "data")
            elif good:  # the failed ones' keystream must not run: tables of the good ones
                sub = plan.subset(good)
                again = self._batch_work(sub, arena, [src_off[i] for i in good],
                                         [dst_off[i] for i in good], s, None, key_blocks=False, data=True)
                self._run(again, slot, s, ("data",))
            for i in range(n):
                if not ok[i] and dst_off[i] != src_off[i] and plan.lengths[i]:
                    self._fill_zero(arena.base, dst_off[i], plan.lengths[i], s)
        arena.write_back([n + i for i in range(n) if ok[i] or dst_off[i] != src_off[i]])
        return ok

    # ---- internals ----
    def _launch_setup(self, algorithm, keys, nonces, srcs, aads, dsts, tag, stream):
        """Validate a batch and lay it out: (plan, numba stream, arena, src offsets, dst offsets)."""
        plan = self._plan(algorithm, keys, nonces, srcs, aads, dsts, tag)
        spans = [_span_of(b) for b in plan.srcs + plan.dsts]
        _refuse_overlaps(spans, plan.n)
        arena = _Arena(self._cuda, plan.srcs + plan.dsts, spans)
        return plan, self._stream(stream), arena, arena.offsets[:plan.n], arena.offsets[plan.n:]

    def _run(self, work: _Work, slot: _Slot, s, phases) -> None:
        """Upload ``work``'s tables in one copy (before any launch), lay out its scratch
        (zeroing what must start as zeros) and run the launches of ``phases``."""
        tables = slot.upload(work.parts, work.table_bytes, s) if work.parts else None
        work.tables = slot.views(tables, [(o, a.nbytes, a.dtype, a.shape) for o, a in work.parts]) \
            if tables is not None else []
        scratch = slot.scratch_buffer(work.scratch_bytes, s) if work.spaces else None
        work.scratch = slot.views(scratch, work.spaces) if scratch is not None else []
        if work.zeroed_bytes:
            if not _by_address():
                self._memset(scratch[:work.zeroed_bytes], s)
            else:   # no slice: making one costs the host more than the memset costs the device
                _device_memset(scratch, 0, work.zeroed_bytes, s)
        for phase in phases:
            self._launch(work, phase)

    @staticmethod
    def _launch(work: _Work, phase: str) -> None:
        for fn in work.phases[phase]:
            fn(work.tables, work.scratch)

    def _undo_data(self, work: _Work, launched: int, s, failure: BaseException) -> None:
        """Run the first ``launched`` data launches of a seal again, on its stream (after
        whatever of the MAC was queued, which reads the ciphertext) and wait for them: each
        in-place message is its plaintext again when ``failure`` reaches the caller. (A
        separate destination gets the same ciphertext again; its source was only read.)

        Every launch is tried even if one before it fails, so that as many messages as can
        be are restored; what could not be is said in a note on ``failure``."""
        problems = []
        for fn in work.phases["data"][:launched]:
            try:
                fn(work.tables, work.scratch)
            except Exception as exc:  # noqa: BLE001 - reported on the failure that goes on
                problems.append(exc)
        if launched and not problems:
            try:
                self.synchronize(s)
            except Exception as exc:  # noqa: BLE001 - as above
                problems.append(exc)
        if problems:
            failure.add_note(
                f"gpucrypt: the seal failed after its keystream ran, and putting the in-place "
                f"messages back failed too ({problems[0]!r}): they may hold ciphertext without a "
                f"tag; restore them from another copy")

    def _finish_tags(self, plan, work, slot, arena, ct_off, tags_out, s):
        """The MAC launches (tag="gpu"), or the host tags (tag="host"). With ``tags_out``
        (sealing) the tags land there; without (opening) they are returned on the host."""
        if plan.tag == "host":
            host_tags = self._host_tags(plan, work, arena.base, ct_off, s)
            if tags_out is not None:
                tags_out.copy_to_device(host_tags, stream=s)
            return host_tags
        self._launch(work, "mac")
        if tags_out is not None:
            return None
        return self.to_host(work.scratch[work.tag_space], stream=s) if plan.n else np.zeros((0, _TAG), np.uint8)

    def _memset(self, dev, stream) -> None:
        if dev.size == 0:
            return
        if _simulated():
            dev[...] = 0
        else:
            _device_memset(dev, 0, dev.nbytes, stream)

    def _fill_zero(self, base, offset: int, length: int, stream) -> None:
        # a memset on the device: no host buffer of ``length`` zeros, no PCIe transfer
        self._memset(base[offset:offset + length], stream)

    def _expected_tags(self, tags: Any, n: int) -> list[bytes]:
        if isinstance(tags, (list, tuple)):
            out = [bytes_arg(t, "tag") for t in tags]
            if len(out) != n:
                raise ValueError(f"tags must be {n} tags (one per message), not {len(out)}")
            return out  # a tag that is not 16 bytes fails its own message only, as on the CPU
        if isinstance(tags, (bytes, bytearray, memoryview)):
            # one message's tag, not in a list: to_host said "no attribute copy_to_host"
            raise TypeError(f"tags must be a list of {n} 16-byte tags (one per message, a "
                            f"list even for one) or a uint8[{n}, {_TAG}] array, not "
                            f"{type(tags).__name__}")
        host = self.to_host(tags) if not isinstance(tags, np.ndarray) else tags
        if host.dtype != np.uint8 or host.shape != (n, _TAG):  # a flat or short array would
            # read as n wrong tags (tampering) or fail on a missing row
            raise ValueError(f"tags as an array must be uint8[{n}, {_TAG}] (one row per message), "
                             f"not {host.dtype}{list(host.shape)}")
        return [host[i].tobytes() for i in range(n)]

    def _plan(self, algorithm, keys, nonces, srcs, aads, dsts, tag) -> "_Plan":
        if algorithm not in _ALGORITHMS:
            raise ValueError(f"algorithm must be one of {_ALGORITHMS}, not {algorithm!r}")
        if tag not in ("gpu", "host"):
            raise ValueError(f"tag must be 'gpu' or 'host', not {tag!r}")
        n = len(srcs)
        if not (len(keys) == len(nonces) == len(aads) == len(dsts) == n):
            raise ValueError("keys, nonces, srcs, aads and dsts must have one entry per message")
        srcs = [self.device_span(x) for x in srcs]
        dsts = [self.device_span(x) for x in dsts]
        lengths = [int(x.size) for x in srcs]
        for i in range(n):
            if dsts[i].size < lengths[i]:
                raise ValueError(f"message {i}: destination holds {dsts[i].size} bytes, needs {lengths[i]}")
        # bytes_arg, not bytes(): bytes(12) would be a nonce (or key) of zero bytes
        return _Plan.build(algorithm, [bytes_arg(k, "key") for k in keys],
                           [bytes_arg(x, "nonce") for x in nonces],
                           srcs, dsts, [bytes_arg(a, "aad") for a in aads], lengths, tag)

    def _batch_work(self, plan, arena, src_off, dst_off, s, tags_out, *, key_blocks: bool,
                    data: bool) -> _Work:
        """Everything one batch queues, prepared on the host: the key-setup launches
        (one-time keys, or H and E_K(J0)) in phase "keys", the data keystream in "data",
        the MAC kernels (tag="gpu") in "mac". The MAC reads the ciphertext at ``dst``
        when sealing (``tags_out`` given) and at ``src`` when opening, whose tags go to
        scratch (``work.tag_space``)."""
        work = _Work()
        n = plan.n
        # 32 bytes a message: Poly1305's one-time key, or GCM's H then E_K(J0) blocks
        key_space = work.space(32 * n, zero=True) if key_blocks else None
        work.tag_space = work.space(_TAG * n, shape=(n, _TAG)) if tags_out is None else None
        empty = work.space(16)  # the ciphertext base when no message has a byte
        base = (lambda sc: arena.base if arena.base is not None else sc[empty])
        if plan.family == "chacha":
            self._chacha_work(work, plan, base, src_off, dst_off, s, key_space, data)
        else:
            self._gcm_work(work, plan, base, src_off, dst_off, s, key_space, data)
        if key_blocks and plan.tag == "gpu" and n:
            self._mac_work(work, plan, base, dst_off if tags_out is not None else src_off,
                           key_space, tags_out, s)
        return work

    def _chacha_work(self, work, plan, base, src_off, dst_off, s, otk_space, data) -> None:
        from gpucrypt.kernels import chacha20 as k

        n = plan.n
        if not n or (otk_space is None and not any(plan.lengths)):
            return
        nonce_words = np.stack([k.nonce_words(x) for x in plan.nonces])
        keys = work.table(np.stack([k.key_words(x) for x in plan.unique_keys]).reshape(-1))

        def segments(phase, rows, buffer):
            if not rows:
                return
            table, starts = k.pack_segments(*zip(*[r[:4] for r in rows]), nonce_words[[r[4] for r in rows]],
                                            [r[5] for r in rows])
            t_rows, t_starts, units = work.table(table.reshape(-1)), work.table(starts), int(starts[-1])
            work.launch(phase, lambda t, sc: k.chacha20_xor(
                buffer(sc), buffer(sc), t[keys], t[t_rows], t[t_starts], len(rows), units, stream=s))

        if otk_space is not None:  # block 0 of each message: its Poly1305 one-time key
            segments("keys", [(32 * i, 32 * i, 32, plan.key_index[i], i, 0) for i in range(n)],
                     lambda sc: sc[otk_space])
        if data:
            segments("data", [(src_off[i], dst_off[i], plan.lengths[i], plan.key_index[i], i, 64)
                              for i in range(n) if plan.lengths[i]], base)

    def _gcm_work(self, work, plan, base, src_off, dst_off, s, blocks_space, data) -> None:
        """H_i (rows 0..n-1) and E_K(J0_i) (rows n..2n-1) computed over zeros, and GCTR
        from inc32(J0): one launch per AES key size and phase."""
        from gpucrypt.kernels import aes as k

        n = plan.n
        j0_words = [k.counter_block_words(j) for j in plan.j0]
        zero = np.zeros(4, dtype=np.uint32)

        def segments(phase, segs, round_keys, rounds, buffer):
            if not segs:
                return
            table, starts = k.pack_segments(*zip(*[x[:4] for x in segs]), np.stack([x[4] for x in segs]),
                                            [x[5] for x in segs], inc32=True)
            t_rows, t_starts, units = work.table(table), work.table(starts), int(starts[-1])

            def run(t, sc):
                data = buffer(sc)   # in place: one lookup for the source and the destination
                k.aes_ctr_xor(data, data, t[round_keys], rounds, t[t_rows], t[t_starts], len(segs), units,
                              stream=s)
            work.launch(phase, run)

        for rounds in sorted(set(plan.rounds)):
            ids = [i for i in range(n) if plan.rounds[i] == rounds]
            key_rows = sorted({plan.key_index[i] for i in ids})
            row_of = {kid: r for r, kid in enumerate(key_rows)}
            round_keys = work.table(np.stack([k.expand_key(plan.unique_keys[kid])[0] for kid in key_rows]))
            if blocks_space is not None:
                segments("keys", [(16 * i, 16 * i, 16, row_of[plan.key_index[i]], zero, 0) for i in ids] +
                         [(16 * (n + i), 16 * (n + i), 16, row_of[plan.key_index[i]], j0_words[i], 0)
                          for i in ids], round_keys, rounds, lambda sc: sc[blocks_space])
            if data:
                segments("data", [(src_off[i], dst_off[i], plan.lengths[i], row_of[plan.key_index[i]],
                                   j0_words[i], 16) for i in ids if plan.lengths[i]], round_keys, rounds, base)

    def _mac_work(self, work, plan, base, ct_off, key_space, tags_out, s) -> None:
        """The MAC launches (phase "mac") over the ciphertext at ``ct_off``: their message
        tables and the associated data go up with the other tables, their partial sums
        live in scratch."""
        n = plan.n
        aad_off, cursor = [], 0
        for a in plan.aads:
            aad_off.append(cursor)
            cursor += len(a)
        aad_host = np.zeros(max(cursor, 16), dtype=np.uint8)  # >= 16: a word view exists
        aad_host[:cursor] = np.frombuffer(b"".join(plan.aads), dtype=np.uint8)
        aad = work.table(aad_host)
        aad_lengths = [len(a) for a in plan.aads]
        out = (lambda sc: tags_out) if tags_out is not None else (lambda sc: sc[work.tag_space])
        if plan.family == "chacha":
            from gpucrypt.kernels import poly1305 as p

            table = p.pack_messages(aad_off, aad_lengths, ct_off, plan.lengths)
            layout, groups = work.table(table.layout), work.table(table.group_start)
            scratch = work.space(4 * table.scratch_words, np.uint32)
            key_words = work.alias(key_space, np.uint32, (n, 8))   # r || s per message, as it reads them
            work.launch("mac", lambda t, sc: p.poly1305_aead_tags(
                t[aad], base(sc), replace(table, layout=t[layout], group_start=t[groups]), n,
                sc[key_words], out(sc), stream=s, scratch=sc[scratch]))
        else:
            from gpucrypt.kernels import ghash as g

            table = g.pack_messages(aad_off, aad_lengths, ct_off, plan.lengths)
            messages, starts = work.table(table.messages), work.table(table.unit_start)
            sizes = list(table.units_total[:2]) + [1, 1]   # as ghash_scratch lays it out
            partials = [work.space(16 * max(1, sizes[i]), np.uint32, (max(1, sizes[i]), 4)) for i in range(2)]
            keys = [work.space(16 * max(1, n), np.uint32, (max(1, n), 4)) for _ in range(2)]
            # One AES key for the whole batch: every row of H is the same, which is the contract of
            # the table kernel (one_key=True); its tables are built on the device from that H.
            one_key = len(set(plan.key_index)) == 1
            tables = work.space(4 * g.KEY_TABLE_WORDS, np.uint32) if one_key else None
            h_blocks = work.alias(key_space, np.uint8, (n, 16))              # H per message
            ekj0_blocks = work.alias(key_space, np.uint8, (n, 16), 16 * n)   # then E_K(J0)
            work.launch("mac", lambda t, sc: g.ghash_aead_tags(
                t[aad], base(sc), g.GhashTable(t[messages], t[starts], table.units_total, table.chunk_blocks),
                n, sc[h_blocks], sc[ekj0_blocks], out(sc), stream=s, one_key=one_key,
                scratch=g.GhashScratch(tuple(sc[i] for i in partials), tuple(sc[i] for i in keys),
                                       sc[tables] if one_key else None)))

    def _host_tags(self, plan, work, ct_base, ct_off, s) -> np.ndarray:
        """tag="host": ciphertext to the host, tags by ``cryptography`` (the reference path)."""
        from .._host_primitives import Poly1305AeadMac, gcm_tag

        host_tags = np.zeros((plan.n, _TAG), dtype=np.uint8)
        if not plan.n:
            return host_tags
        otks = self.to_host(work.scratch[0], stream=s).reshape(plan.n, 32) \
            if plan.family == "chacha" else None   # the one-time keys, made on the device
        for i in range(plan.n):
            ct = self.to_host(ct_base[ct_off[i]:ct_off[i] + plan.lengths[i]], stream=s) \
                if plan.lengths[i] else np.zeros(0, np.uint8)
            aad = plan.aads[i]
            if plan.family == "chacha":
                mac = Poly1305AeadMac(otks[i].tobytes(), aad)
                mac.update(ct)
                tag = mac.finalize()
            else:
                tag = gcm_tag(plan.unique_keys[plan.key_index[i]], plan.j0[i], aad, ct)
            host_tags[i] = np.frombuffer(tag, dtype=np.uint8)
        return host_tags


@dataclass(repr=False)
class _Plan:
    """Host-side facts of one batch: keys deduplicated, per-message nonces/J0, lengths.

    Its repr names the batch's shape only: a generated one printed the keys (and
    XChaCha20's subkeys), and the J0 blocks of GCM's other nonce lengths, which are GHASH
    under H, from which H, and with one tag any forgery under that nonce, can be solved
    for. A plan is a local of every batch call, where a traceback that shows locals
    prints it."""

    algorithm: str
    family: str              # "chacha" or "gcm"
    unique_keys: list
    key_index: list
    nonces: list             # 12-byte ChaCha20 nonces (after XChaCha's subkey step), or GCM nonces
    j0: list                 # GCM pre-counter blocks
    rounds: list             # AES rounds per message (GCM)
    srcs: list
    dsts: list
    aads: list
    lengths: list
    tag: str

    @property
    def n(self) -> int:
        return len(self.srcs)

    def __repr__(self) -> str:
        return (f"_Plan(algorithm={self.algorithm!r}, n={self.n}, keys={len(self.unique_keys)}, "
                f"bytes={sum(self.lengths)}, tag={self.tag!r})")

    @classmethod
    def build(cls, algorithm, keys, nonces, srcs, dsts, aads, lengths, tag) -> "_Plan":
        from .. import _limits
        from .._host_primitives import gcm_j0, xchacha20_key_nonce

        family = "gcm" if algorithm == "aes-gcm" else "chacha"
        effective_keys, eff_nonces, j0, rounds = [], [], [], []
        for i, (key, nonce) in enumerate(zip(keys, nonces)):
            if algorithm == "chacha20-poly1305":
                _need(len(key) == 32 and len(nonce) == 12, i, "ChaCha20Poly1305 needs a 32-byte key and 12-byte nonce")
                _limits.check_length("data", lengths[i], _limits.CHACHA20POLY1305_MAX_PLAINTEXT, "ChaCha20Poly1305")
                effective_keys.append(key)
                eff_nonces.append(nonce)
            elif algorithm == "xchacha20-poly1305":
                _need(len(key) == 32 and len(nonce) == 24, i, "XChaCha20Poly1305 needs a 32-byte key and 24-byte nonce")
                _limits.check_length("data", lengths[i], _limits.CHACHA20POLY1305_MAX_PLAINTEXT, "XChaCha20Poly1305")
                subkey, nonce = xchacha20_key_nonce(key, nonce)
                effective_keys.append(subkey)
                eff_nonces.append(nonce)
            else:
                _need(len(key) in (16, 24, 32), i, "AESGCM needs a 16, 24 or 32-byte key")
                _need(_limits.GCM_MIN_NONCE <= len(nonce) <= _limits.GCM_MAX_NONCE, i,
                      f"AESGCM nonces are {_limits.GCM_MIN_NONCE} to {_limits.GCM_MAX_NONCE} bytes "
                      f"(12 is the standard), not {len(nonce)}")
                _limits.check_length("data", lengths[i], _limits.GCM_MAX_PLAINTEXT, "AESGCM")
                effective_keys.append(key)
                eff_nonces.append(nonce)
                j0.append(gcm_j0(key, nonce))
                rounds.append({16: 10, 24: 12, 32: 14}[len(key)])
            _limits.check_length("associated_data", len(aads[i]),
                                 _limits.GCM_MAX_AAD if family == "gcm" else _limits.CHACHA20POLY1305_MAX_AAD,
                                 algorithm)
        unique, index = [], []
        seen: dict[bytes, int] = {}
        for key in effective_keys:
            if key not in seen:
                seen[key] = len(unique)
                unique.append(key)
            index.append(seen[key])
        return cls(algorithm, family, unique, index, eff_nonces, j0, rounds, srcs, dsts, aads, lengths, tag)

    def subset(self, ids: list) -> "_Plan":
        pick = lambda xs: [xs[i] for i in ids] if xs else xs  # noqa: E731
        return _Plan(self.algorithm, self.family, self.unique_keys, pick(self.key_index), pick(self.nonces),
                     pick(self.j0), pick(self.rounds), pick(self.srcs), pick(self.dsts), pick(self.aads),
                     pick(self.lengths), self.tag)


def _need(condition: bool, index: int, message: str) -> None:
    if not condition:
        raise ValueError(f"message {index}: {message}")


class _HostBufferAead(AeadContext):
    """The public classes' path on the GPU: host buffer -> device -> seal/open in place -> host."""

    def __init__(self, backend: GpuBackend, algorithm: str, key: bytes):
        self._backend = backend
        self._algorithm = algorithm
        self._key = key

    def seal(self, nonce, data, aad, out):
        b = self._backend
        dev = b.to_device(data) if len(data) else b.device_array(0)
        tags = b.seal_batch(self._algorithm, [self._key], [nonce], [dev], [bytes(aad)], [dev])
        host_out = np.frombuffer(out, dtype=np.uint8)
        if len(data):
            b.to_host(dev, host_out[: len(data)])
        host_out[len(data):] = b.to_host(tags).reshape(-1)

    def open(self, nonce, data, aad, out):
        b = self._backend
        ct_len = len(data) - _TAG
        dev = b.to_device(data[:ct_len]) if ct_len else b.device_array(0)
        ok = b.open_batch(self._algorithm, [self._key], [nonce], [dev], [bytes(data[ct_len:])],
                          [bytes(aad)], [dev])
        host_out = np.frombuffer(out, dtype=np.uint8)
        if not ok[0]:
            host_out[:] = 0
            raise InvalidTag()
        if ct_len:
            b.to_host(dev, host_out)
