"""The GPU backend: numba-cuda kernels (``gpucrypt.kernels``) over device memory.

Every operation works on a *batch* of messages and costs one launch per step,
whatever the batch size: a single 10 GB tensor and ten thousand small tensors
are both one keystream launch and one MAC pass.

ChaCha20-Poly1305 (and XChaCha20-Poly1305, under HChaCha20 subkeys made on the
host from the host-held key):
  1. one ChaCha20 launch writes each message's Poly1305 one-time key (block 0)
     into a small device buffer and encrypts the data (blocks 1..) in place or
     out of place;
  2. the Poly1305 kernels MAC every ciphertext (tag="gpu"), or the ciphertext
     goes to the host and ``cryptography``'s Poly1305 does it (tag="host").
AES-GCM:
  1. one AES launch computes H = E_K(0^128) and E_K(J0) per message and the
     GCTR keystream from inc32(J0); J0 itself is nonce || 1 for 12-byte nonces,
     and GHASH_H of the nonce, on the host, for other lengths;
  2. the GHASH kernels (tag="gpu") or the host GHASH (tag="host") make the tag.
Decryption MACs the ciphertext first, compares tags on the host in constant
time, and only then runs the keystream over the messages that verified.

Memory: kernels address one source and one destination array by byte offsets.
Separate device allocations (the tensors of a state dict) are addressed through
one *span* array that starts at the lowest allocation and covers the highest;
the kernels touch only the bytes of their segments. The simulator has no address
space, so there the batch is gathered into one staging array and scattered back.
"""
from __future__ import annotations

import hmac
import struct
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag

from ._base import AeadContext, Backend
from ._probe import gpu_unavailable_reason  # noqa: F401  (its public home until now)

_TAG = 16
_ALGORITHMS = ("chacha20-poly1305", "xchacha20-poly1305", "aes-gcm")


def _simulated() -> bool:
    from numba import config

    return bool(config.ENABLE_CUDASIM)


def _device_memset(dev, value: int, nbytes: int, stream) -> None:
    """``nbytes`` bytes of the device array ``dev`` set to ``value``, queued on ``stream``
    (cuMemsetD8Async; synchronous on stream 0)."""
    from numba.cuda.cudadrv.driver import device_memset

    device_memset(dev, value, nbytes, stream=stream)


# --------------------------------------------------------------------------- device arrays

def _interface_of(obj: Any) -> tuple[int, int] | None:
    """(device pointer, nbytes) of a C-contiguous device object, or None if it is not one."""
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
        if tuple(reversed(expected)) != tuple(strides) and int(np.prod(shape)) > 1:
            raise ValueError("device array is not C-contiguous; make a contiguous copy first")
    return int(cai["data"][0]), int(np.prod(shape, dtype=np.int64)) * itemsize


@dataclass
class _Region:
    """Where one message's bytes live inside the launch's base array."""

    base: Any
    offset: int
    length: int


class _Arena:
    """One base array covering every buffer of a launch, plus each buffer's offset in it.

    On a GPU the base is a zero-copy span over the device address range of all the
    buffers. In the simulator (no address space) the buffers are copied into one
    staging array and copied back by :meth:`write_back`.
    """

    def __init__(self, cuda, buffers: Sequence[Any]):
        self._cuda = cuda
        self._buffers = list(buffers)
        self.offsets: list[int] = []
        self._staged = _simulated()
        if self._staged:
            sizes = [b.nbytes for b in self._buffers]
            self.base = np.zeros(max(sum(sizes), 1), dtype=np.uint8)
            cursor = 0
            seen: dict[tuple, int] = {}
            for buf, size in zip(self._buffers, sizes):
                key = (buf.__array_interface__["data"][0], size)
                if key in seen:  # the same memory given twice (in place): one copy
                    self.offsets.append(seen[key])
                    continue
                self.base[cursor:cursor + size] = buf.reshape(-1).view(np.uint8)
                seen[key] = cursor
                self.offsets.append(cursor)
                cursor += size
            return
        spans = [_interface_of(buf) for buf in self._buffers]
        # Empty buffers may carry a null pointer: they are never touched, so they take no
        # part in the span (offset 0).
        used = [(p, n) for p, n in spans if n > 0]
        if not used:
            self.base = cuda.device_array(1, dtype=np.uint8)
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
        if not self._staged:
            return
        for i in indices:
            buf = self._buffers[i]
            flat = buf.reshape(-1).view(np.uint8)
            flat[:] = self.base[self.offsets[i]:self.offsets[i] + flat.size]


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

    # ---- device memory helpers (the layer above never touches numba or CuPy) ----
    def as_device_bytes(self, obj: Any):
        """A zero-copy 1-D uint8 device view of ``obj`` (NumPy arrays stand in under the simulator)."""
        if _simulated():
            if isinstance(obj, np.ndarray):
                if not obj.flags.c_contiguous:
                    raise ValueError("array is not C-contiguous; make a contiguous copy first")
                return obj.reshape(-1).view(np.uint8)
            if hasattr(obj, "copy_to_host"):  # a simulator device array
                return obj.reshape(-1).view(np.uint8) if hasattr(obj, "view") else obj
            raise TypeError(f"{type(obj).__name__} is not device memory in the simulator "
                            f"(NumPy arrays stand in for device arrays there)")
        found = _interface_of(obj)
        if found is None:
            raise TypeError(f"{type(obj).__name__} is not a CUDA device array (no "
                            f"__cuda_array_interface__); copy it with to_device first")
        ptr, size = found
        return self._cuda.from_cuda_array_interface(
            {"shape": (size,), "typestr": "|u1", "data": (ptr, False), "version": 3,
             "strides": None}, owner=obj, sync=False)

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
            self.synchronize(s)
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
        if stream is None and not _simulated():
            self._cuda.synchronize()
        s = self._stream(stream)
        host = dev.copy_to_host(out, stream=s) if out is not None else dev.copy_to_host(stream=s)
        # numba runs a copy asked for on stream 0 on the array's own stream, and a copy
        # on a stream into pinned memory returns before it is done: wait for it.
        used = s if not isinstance(s, int) else getattr(dev, "stream", 0)
        if not isinstance(used, int) and not _simulated():
            used.synchronize()
        return host

    def synchronize_device(self) -> None:
        """Wait for all work queued on the device, on every stream (work the caller
        queued on streams of its own, which nothing here is ordered after)."""
        if not _simulated():
            self._cuda.synchronize()

    def synchronize(self, stream=None) -> None:
        if _simulated():
            return
        s = self._stream(stream)
        s.synchronize() if not isinstance(s, int) else self._cuda.synchronize()

    def _stream(self, stream: Any):
        """A numba stream for ``stream``: numba's own, a torch or CuPy stream, a raw handle,
        or (None) CuPy's current stream when CuPy is in use, else the default stream."""
        if _simulated():
            return 0
        cuda = self._cuda
        if stream is None:
            cupy = sys.modules.get("cupy")
            if cupy is not None:
                ptr = cupy.cuda.get_current_stream().ptr
                return cuda.external_stream(ptr) if ptr else 0
            return 0
        if isinstance(stream, int):
            return cuda.external_stream(stream) if stream else 0
        if hasattr(stream, "handle") and hasattr(stream, "synchronize") and \
                type(stream).__module__.startswith("numba"):
            return stream
        for attr in ("cuda_stream", "ptr"):  # torch.cuda.Stream, cupy.cuda.Stream
            if hasattr(stream, attr):
                ptr = int(getattr(stream, attr))
                return cuda.external_stream(ptr) if ptr else 0
        raise TypeError(f"unsupported stream object {type(stream).__name__}")

    def _upload(self, arr: np.ndarray, stream):
        return arr if _simulated() else self._cuda.to_device(arr, stream=stream)

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
        src = self.as_device_bytes(src)
        dst = src if dst is None else self.as_device_bytes(dst)
        if dst.size < src.size:
            raise ValueError("dst is smaller than src")
        s = self._stream(stream)
        arena = _Arena(self._cuda, [src, dst])
        if algorithm == "chacha20":
            from gpucrypt.kernels import chacha20 as k

            counter = struct.unpack("<I", iv[:4])[0]
            keys = k.key_words(key).reshape(1, 8)
            table, starts = k.pack_segments([arena.offsets[0]], [arena.offsets[1]], [src.size], [0],
                                            k.nonce_words(iv[4:]).reshape(1, 3), [counter * 64 + position])
            k.chacha20_xor(arena.base, arena.base, self._upload(keys.reshape(-1), s), self._upload(table.reshape(-1), s),
                           self._upload(starts, s), 1, int(starts[-1]), stream=s)
        elif algorithm == "aes-ctr":
            from gpucrypt.kernels import aes as k

            words, rounds = k.expand_key(key)
            table, starts = k.pack_segments([arena.offsets[0]], [arena.offsets[1]], [src.size], [0],
                                            k.counter_block_words(iv).reshape(1, 4), [position], inc32=False)
            k.aes_ctr_xor(arena.base, arena.base, self._upload(words.reshape(1, -1), s), rounds,
                          self._upload(table, s), self._upload(starts, s), 1, int(starts[-1]), stream=s)
        else:
            raise ValueError(f"unknown keystream algorithm {algorithm!r}")
        arena.write_back([1])

    # ---- batched AEAD on device arrays ----
    def seal_batch(self, algorithm: str, keys: Sequence[bytes], nonces: Sequence[bytes],
                   srcs: Sequence[Any], aads: Sequence[bytes], dsts: Sequence[Any], *,
                   tag: str = "gpu", stream=None):
        """Encrypt every message ``srcs[i] -> dsts[i]`` (in place allowed); return tags uint8[n, 16] (device).

        No synchronisation with tag="gpu". ``dsts[i]`` must hold at least ``len(srcs[i])`` bytes.
        """
        plan, s, arena, src_off, dst_off = self._launch_setup(algorithm, keys, nonces, srcs, aads, dsts, tag,
                                                             stream)
        n = plan.n
        tags = self._keystream_then_tags(plan, arena, src_off, dst_off, s, encrypt=True)
        arena.write_back(range(n, 2 * n))
        return tags

    def open_batch(self, algorithm: str, keys: Sequence[bytes], nonces: Sequence[bytes],
                   srcs: Sequence[Any], tags: Any, aads: Sequence[bytes], dsts: Sequence[Any], *,
                   tag: str = "gpu", stream=None) -> np.ndarray:
        """Verify every tag, then decrypt only the messages that verified; return ok flags.

        A failed message's ``dst`` is zeroed, or left untouched when it is ``src`` (in place).
        Synchronises: the verdicts are needed on the host.
        """
        plan, s, arena, src_off, dst_off = self._launch_setup(algorithm, keys, nonces, srcs, aads, dsts, tag,
                                                             stream)
        n = plan.n
        computed = self._keystream_then_tags(plan, arena, src_off, dst_off, s, encrypt=False)
        computed_host = self.to_host(computed, stream=s)
        self.synchronize(stream)
        expected = self._expected_tags(tags, n)
        ok = np.array([hmac.compare_digest(computed_host[i].tobytes(), expected[i]) for i in range(n)],
                      dtype=bool)
        good = [i for i in range(n) if ok[i]]
        if good:
            sub = plan.subset(good)
            if sub.family == "chacha":
                self._chacha_keystream(sub, arena, [src_off[i] for i in good], [dst_off[i] for i in good],
                                       s, data=True, otk=False)
            else:
                self._gcm_keystream(sub, arena, [src_off[i] for i in good], [dst_off[i] for i in good],
                                    s, data=True, key_blocks=False)
        for i in range(n):
            if not ok[i] and dst_off[i] != src_off[i] and plan.lengths[i]:
                self._fill_zero(arena.base, dst_off[i], plan.lengths[i], s)
        arena.write_back([n + i for i in range(n) if ok[i] or dst_off[i] != src_off[i]])
        self.synchronize(stream)
        return ok

    # ---- internals ----
    def _keystream_then_tags(self, plan, arena, src_off, dst_off, s, *, encrypt: bool):
        """The key-setup launch (with the data keystream when encrypting), then the tags of
        the ciphertext: written at ``dst`` when encrypting, read at ``src`` when decrypting."""
        tags = self._zeros((plan.n, _TAG), s)
        ct_off = dst_off if encrypt else src_off
        if plan.family == "chacha":
            otk = self._chacha_keystream(plan, arena, src_off, dst_off, s, data=encrypt, otk=True)
            self._chacha_tags(plan, arena.base, ct_off, otk, tags, s)
        else:
            h, ekj0 = self._gcm_keystream(plan, arena, src_off, dst_off, s, data=encrypt)
            self._gcm_tags(plan, arena.base, ct_off, h, ekj0, tags, s)
        return tags

    def _launch_setup(self, algorithm, keys, nonces, srcs, aads, dsts, tag, stream):
        """Validate a batch and lay it out: (plan, numba stream, arena, src offsets, dst offsets)."""
        plan = self._plan(algorithm, keys, nonces, srcs, aads, dsts, tag)
        arena = _Arena(self._cuda, plan.srcs + plan.dsts)
        return plan, self._stream(stream), arena, arena.offsets[:plan.n], arena.offsets[plan.n:]

    def _zeros(self, shape, stream):
        if _simulated():
            return np.zeros(shape, dtype=np.uint8)
        arr = self._cuda.device_array(shape, dtype=np.uint8, stream=stream)
        if arr.size:
            _device_memset(arr, 0, arr.size, stream)
        return arr

    def _fill_zero(self, base, offset: int, length: int, stream) -> None:
        if _simulated():
            base[offset:offset + length] = 0
            return
        # a memset on the device: no host buffer of ``length`` zeros, no PCIe transfer
        _device_memset(base[offset:offset + length], 0, length, stream)

    def _expected_tags(self, tags: Any, n: int) -> list[bytes]:
        if isinstance(tags, (list, tuple)):
            out = [bytes(t) for t in tags]
        else:
            host = self.to_host(tags) if not isinstance(tags, np.ndarray) else tags
            out = [host[i].tobytes() for i in range(n)]
        if len(out) != n or any(len(t) != _TAG for t in out):
            raise ValueError(f"tags must be {n} tags of {_TAG} bytes")
        return out

    def _plan(self, algorithm, keys, nonces, srcs, aads, dsts, tag) -> "_Plan":
        if algorithm not in _ALGORITHMS:
            raise ValueError(f"algorithm must be one of {_ALGORITHMS}, not {algorithm!r}")
        if tag not in ("gpu", "host"):
            raise ValueError(f"tag must be 'gpu' or 'host', not {tag!r}")
        n = len(srcs)
        if not (len(keys) == len(nonces) == len(aads) == len(dsts) == n):
            raise ValueError("keys, nonces, srcs, aads and dsts must have one entry per message")
        srcs = [self.as_device_bytes(x) for x in srcs]
        dsts = [self.as_device_bytes(x) for x in dsts]
        lengths = [int(x.size) for x in srcs]
        for i in range(n):
            if dsts[i].size < lengths[i]:
                raise ValueError(f"message {i}: destination holds {dsts[i].size} bytes, needs {lengths[i]}")
        return _Plan.build(algorithm, [bytes(k) for k in keys], [bytes(x) for x in nonces],
                           srcs, dsts, [bytes(a) for a in aads], lengths, tag)

    def _chacha_keystream(self, plan, arena, src_off, dst_off, s, *, data: bool, otk: bool):
        """One launch: one-time keys (block 0) into a fresh buffer and/or data (blocks 1..)."""
        from gpucrypt.kernels import chacha20 as k

        n = plan.n
        otk_buf = np.zeros(n * 32, dtype=np.uint8) if otk else None
        nonce_words = np.stack([k.nonce_words(x) for x in plan.nonces]) if n else np.zeros((0, 3), np.uint32)
        rows = []  # (src_off, dst_off, length, key, nonce row, position, target)
        if otk:
            for i in range(n):
                rows.append((i * 32, i * 32, 32, plan.key_index[i], i, 0, "otk"))
        if data:
            for i in range(n):
                if plan.lengths[i]:
                    rows.append((src_off[i], dst_off[i], plan.lengths[i], plan.key_index[i], i, 64, "data"))
        if not rows:
            return None
        key_table = self._upload(np.stack([k.key_words(x) for x in plan.unique_keys]).reshape(-1), s)
        otk_dev = self._upload(otk_buf, s) if otk else None
        for target, src, dst in (("otk", otk_dev, otk_dev), ("data", arena.base, arena.base)):
            part = [r for r in rows if r[6] == target]
            if not part:
                continue
            table, starts = k.pack_segments([r[0] for r in part], [r[1] for r in part], [r[2] for r in part],
                                            [r[3] for r in part], nonce_words[[r[4] for r in part]],
                                            [r[5] for r in part])
            k.chacha20_xor(src, dst, key_table, self._upload(table.reshape(-1), s), self._upload(starts, s),
                           len(part), int(starts[-1]), stream=s)
        return otk_dev

    def _chacha_tags(self, plan, ct_base, ct_off, otk_dev, tags_out, s) -> None:
        n = plan.n
        if plan.tag == "host":
            self._host_tags(plan, ct_base, ct_off, tags_out, s, otk_dev=otk_dev)
            return
        from gpucrypt.kernels import poly1305 as p

        aad_buf, aad_off = self._pack_aads(plan, s)
        table = p.pack_messages(aad_off, [len(a) for a in plan.aads], ct_off, plan.lengths).to_device(s)
        p.poly1305_aead_tags(aad_buf, ct_base, table, n, otk_dev.reshape(n, 32) if n else otk_dev,
                             tags_out, stream=s)

    def _pack_aads(self, plan, s):
        offsets, cursor = [], 0
        for a in plan.aads:
            offsets.append(cursor)
            cursor += len(a)
        host = np.frombuffer(b"".join(plan.aads) or b"\x00", dtype=np.uint8).copy()
        return self._upload(host, s), offsets

    def _gcm_keystream(self, plan, arena, src_off, dst_off, s, *, data: bool, key_blocks: bool = True):
        """One launch per key size: H and E_K(J0) (16-byte segments over zeros) and/or GCTR from inc32(J0)."""
        from gpucrypt.kernels import aes as k

        n = plan.n
        # rows 0..n-1: H_i, rows n..2n-1: E_K(J0_i); computed over zeros, two contiguous halves
        blocks = np.zeros(2 * n * 16, dtype=np.uint8)
        blocks_dev = self._upload(blocks, s) if key_blocks else None
        j0_words = [k.counter_block_words(j) for j in plan.j0]
        zero = np.zeros(4, dtype=np.uint32)
        for rounds in sorted(set(plan.rounds)):
            ids = [i for i in range(n) if plan.rounds[i] == rounds]
            key_rows = sorted({plan.key_index[i] for i in ids})
            row_of = {kid: r for r, kid in enumerate(key_rows)}
            round_keys = np.stack([k.expand_key(plan.unique_keys[kid])[0] for kid in key_rows])
            rk_dev = self._upload(round_keys, s)
            if key_blocks:
                segs = [(16 * i, 16 * i, 16, row_of[plan.key_index[i]], zero, 0) for i in ids] + \
                       [(16 * (n + i), 16 * (n + i), 16, row_of[plan.key_index[i]], j0_words[i], 0) for i in ids]
                self._aes_launch(k, blocks_dev, rk_dev, rounds, segs, s)
            if data:
                segs = [(src_off[i], dst_off[i], plan.lengths[i], row_of[plan.key_index[i]], j0_words[i], 16)
                        for i in ids if plan.lengths[i]]
                if segs:
                    self._aes_launch(k, arena.base, rk_dev, rounds, segs, s)
        if not key_blocks:
            return None, None
        if not n:
            return blocks_dev, blocks_dev
        view = blocks_dev.reshape(2 * n, 16)
        return view[:n], view[n:]

    def _aes_launch(self, k, buf, rk_dev, rounds, segs, s) -> None:
        table, starts = k.pack_segments([x[0] for x in segs], [x[1] for x in segs], [x[2] for x in segs],
                                        [x[3] for x in segs], np.stack([x[4] for x in segs]),
                                        [x[5] for x in segs], inc32=True)
        k.aes_ctr_xor(buf, buf, rk_dev, rounds, self._upload(table, s), self._upload(starts, s),
                      len(segs), int(starts[-1]), stream=s)

    def _gcm_tags(self, plan, ct_base, ct_off, h, ekj0, tags_out, s) -> None:
        if plan.tag == "host":
            self._host_tags(plan, ct_base, ct_off, tags_out, s)
            return
        from gpucrypt.kernels import ghash as g

        n = plan.n
        aad_buf, aad_off = self._pack_aads(plan, s)
        table = g.pack_messages(aad_off, [len(a) for a in plan.aads], ct_off, plan.lengths).to_device(s)
        g.ghash_aead_tags(aad_buf, ct_base, table, n, h, ekj0, tags_out, stream=s)

    def _host_tags(self, plan, ct_base, ct_off, tags_out, s, otk_dev=None) -> None:
        """tag="host": ciphertext to the host, tags by ``cryptography`` (the reference path)."""
        from .._host_primitives import Poly1305AeadMac, gcm_tag

        otks = self.to_host(otk_dev, stream=s).reshape(plan.n, 32) if otk_dev is not None else None
        self.synchronize(None if s == 0 else s)
        host_tags = np.zeros((plan.n, _TAG), dtype=np.uint8)
        for i in range(plan.n):
            ct = self.to_host(ct_base[ct_off[i]:ct_off[i] + plan.lengths[i]], stream=s) \
                if plan.lengths[i] else np.zeros(0, np.uint8)
            self.synchronize(None if s == 0 else s)
            aad = plan.aads[i]
            if plan.family == "chacha":
                mac = Poly1305AeadMac(otks[i].tobytes(), aad)
                mac.update(ct)
                tag = mac.finalize()
            else:
                tag = gcm_tag(plan.unique_keys[plan.key_index[i]], plan.j0[i], aad, ct)
            host_tags[i] = np.frombuffer(tag, dtype=np.uint8)
        if _simulated():
            tags_out[...] = host_tags
        else:
            self._cuda.to_device(host_tags, to=tags_out, stream=s)


@dataclass
class _Plan:
    """Host-side facts of one batch: keys deduplicated, per-message nonces/J0, lengths."""

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
                _need(_limits.GCM_MIN_NONCE <= len(nonce) <= _limits.GCM_MAX_NONCE, i, "AESGCM nonce length out of range")
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
