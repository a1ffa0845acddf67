"""The GPU backend's host side as a device would see it.

What the simulator cannot show, because it runs every copy and launch at once on the
host: the order of uploads, launches and waits in a batch (an upload from pageable
memory, or one queued behind a launch, makes the host wait for the device), the
memory a batch allocates, the device context and stream the work lands in, the
launch geometry, and the batches that would race on a device. Spies on numba's
calls record all of it while the real kernels run in the simulator; a fake second
device stands in for a multi-GPU machine.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from types import SimpleNamespace

import numpy as np
import pytest

from _reference import reference_seal, require_gpu_backend

pytestmark = pytest.mark.cudasim

ALGORITHMS = ("chacha20-poly1305", "aes-gcm")
_LAUNCHERS = (("chacha20", "chacha20_xor"), ("aes", "aes_ctr_xor"),
              ("poly1305", "poly1305_aead_tags"), ("ghash", "ghash_aead_tags"))


@pytest.fixture(scope="module")
def gpu():
    return require_gpu_backend()


def _install_spy(mp, gpu):
    """A log of (kind, detail) for every allocation, upload, download, wait, event,
    kernel launch and kernel configuration, in order, installed through ``mp`` (a
    MonkeyPatch). ``log.device()`` is the device a launch or allocation is made on (0
    unless a test installs fake devices). The backend's slots are made afresh, under
    the spy, so that it sees which host memory is pinned."""
    from numba import cuda
    from numba.cuda.simulator import api as simulator
    from numba.cuda.simulator.cudadrv import devicearray
    from numba.cuda.simulator.kernel import FakeCUDAKernel

    from gpucrypt.kernels import _launch

    log = SimpleNamespace(entries=[], pinned=[], device=lambda: 0, inside_launch=[False])
    mp.setattr(gpu, "_rings", {}, raising=False)

    def add(kind, detail=None):
        log.entries.append((kind, detail))

    for name in [n for n in ("device_array", "device_array_like", "pinned_array", "mapped_array",
                             "managed_array") if hasattr(cuda, n)]:
        def alloc(*a, _real=getattr(cuda, name), _name=name, **k):
            out = _real(*a, **k)
            add("alloc", (_name, log.device()))
            if _name == "pinned_array":
                log.pinned.append(out)
            return out
        mp.setattr(cuda, name, alloc)
    real_to_device = cuda.to_device

    def to_device(ary, stream=0, copy=True, to=None):
        add("upload", "pageable")
        if to is None:
            add("alloc", ("to_device", log.device()))
        return real_to_device(ary, stream=stream, copy=copy, to=to)
    mp.setattr(cuda, "to_device", to_device)
    real_up, real_down = devicearray.FakeCUDAArray.copy_to_device, devicearray.FakeCUDAArray.copy_to_host

    def copy_to_device(self, ary, stream=0):
        pinned = isinstance(ary, np.ndarray) and any(np.shares_memory(ary, p) for p in log.pinned)
        add("upload", "pinned" if pinned else "pageable")
        return real_up(self, ary, stream)

    def copy_to_host(self, ary=None, stream=0):
        add("download", log.device())
        return real_down(self, ary, stream)
    mp.setattr(devicearray.FakeCUDAArray, "copy_to_device", copy_to_device)
    mp.setattr(devicearray.FakeCUDAArray, "copy_to_host", copy_to_host)
    mp.setattr(simulator.stream, "synchronize", lambda self: add("wait", "stream"))
    mp.setattr(cuda, "synchronize", lambda: add("wait", "device"))
    mp.setattr(simulator.Event, "synchronize", lambda self: add("wait", "event"))
    mp.setattr(simulator.Event, "record", lambda self, stream=0: add("record", stream))
    mp.setattr(simulator.Event, "wait", lambda self, stream=0: add("event wait", stream))

    def launch(kernel, *a, _real=getattr(_launch, "launch", None), **k):  # the occupancy-aware launcher
        log.inside_launch[0] = True
        try:
            return _real(kernel, *a, **k)
        finally:
            log.inside_launch[0] = False
    for module, name in _LAUNCHERS:
        mod = importlib.import_module(f"gpucrypt.kernels.{module}")

        def launcher(*a, _real=getattr(mod, name), _name=name, **k):
            add("launch", (_name, log.device(), k.get("stream")))
            return _real(*a, **k)
        mp.setattr(mod, name, launcher)
        mp.setattr(mod, "launch", launch, raising=False)
    real_getitem = FakeCUDAKernel.__getitem__

    def getitem(self, config):
        add("configure", (self.fn.__name__, log.inside_launch[0]))
        return real_getitem(self, config)
    mp.setattr(FakeCUDAKernel, "__getitem__", getitem)
    return log


@pytest.fixture
def spy(monkeypatch, on_cudasim, gpu):
    if not on_cudasim:
        pytest.skip("the spies wrap the simulator's classes")
    return _install_spy(monkeypatch, gpu)


def _messages(algorithm, lengths, seed=0):
    rng = np.random.default_rng(seed)
    key = bytes(rng.integers(0, 256, 32 if algorithm != "aes-gcm" else 16, dtype=np.uint8))
    return [(key, bytes(rng.integers(0, 256, 12, dtype=np.uint8)),
             rng.integers(0, 256, n, dtype=np.uint8), bytes(rng.integers(0, 256, i % 7, dtype=np.uint8)))
            for i, n in enumerate(lengths)]


def _seal(gpu, algorithm, msgs, **kw):
    bufs = [m[2].copy() for m in msgs]
    tags = gpu.seal_batch(algorithm, [m[0] for m in msgs], [m[1] for m in msgs], bufs,
                          [m[3] for m in msgs], bufs, **kw)
    return bufs, tags


def _check_sealed(gpu, algorithm, msgs, bufs, tags):
    tags = gpu.to_host(tags)
    for m, buf, t in zip(msgs, bufs, tags):
        assert buf.tobytes() + t.tobytes() == reference_seal(algorithm, m[0], m[1], m[2].tobytes(), m[3])


def _after_first_launch(entries):
    kinds = [k for k, _ in entries]
    assert "launch" in kinds, entries
    first = kinds.index("launch")
    return entries[:first], entries[first:]


@pytest.fixture(scope="module", params=ALGORITHMS)
def session(request, gpu, on_cudasim):
    """Per algorithm, under the spy: two seal batches on one stream (they make the two
    slots of the ring), a third on another stream (the steady state: it reuses the
    first slot, last used on the first stream), then an open batch of what it sealed.
    The logs of the third seal and of the open, and every result."""
    if not on_cudasim:
        pytest.skip("the spies wrap the simulator's classes")
    from numba import cuda

    algorithm = request.param
    msgs = _messages(algorithm, [0, 5, 70, 33], seed=ALGORITHMS.index(algorithm))
    first, second = cuda.stream(), cuda.stream()
    with pytest.MonkeyPatch.context() as mp:
        log = _install_spy(mp, gpu)
        warm = [_seal(gpu, algorithm, msgs, stream=first) for _ in range(2)]
        log.entries.clear()
        sealed = _seal(gpu, algorithm, msgs, stream=second)
        seal_log = list(log.entries)
        tags = gpu.to_host(sealed[1])
        outs = [b.copy() for b in sealed[0]]
        log.entries.clear()
        ok = gpu.open_batch(algorithm, [m[0] for m in msgs], [m[1] for m in msgs], outs, list(tags),
                            [m[3] for m in msgs], outs, stream=second)
        open_log = list(log.entries)
    return SimpleNamespace(algorithm=algorithm, msgs=msgs, warm=warm, sealed=sealed, seal_log=seal_log,
                           open_log=open_log, ok=ok, outs=outs, stream=second)


def test_seal_and_open_batches_are_right(gpu, session):
    for bufs, tags in session.warm + [session.sealed]:
        _check_sealed(gpu, session.algorithm, session.msgs, bufs, tags)
    assert list(session.ok) == [True] * len(session.msgs)
    assert [o.tobytes() for o in session.outs] == [m[2].tobytes() for m in session.msgs]


def test_seal_batch_uploads_once_from_pinned_memory_before_any_launch_and_never_waits(session):
    before, after = _after_first_launch(session.seal_log)
    assert [d for k, d in before if k == "upload"] == ["pinned"], session.seal_log
    assert not [e for e in after if e[0] in ("upload", "download", "wait")], \
        f"after the first launch the host must not wait for the device: {after}"


def test_open_batch_waits_once_for_its_verdicts(session):
    before, after = _after_first_launch(session.open_log)
    assert [d for k, d in before if k == "upload"] == ["pinned"], session.open_log
    assert [k for k, _ in after if k not in ("launch", "configure", "record")] == ["download", "wait"], \
        f"one copy of the verdicts and one wait, the decryption queued after them: {after}"
    assert [k for k, _ in after][-2:] == ["configure", "record"]   # decryption queued, slot released


def test_steady_state_seal_batch_allocates_at_most_two_device_buffers(session):
    allocations = [d for k, d in session.seal_log if k == "alloc"]
    assert len(allocations) <= 2, allocations
    assert [d for k, d in session.open_log if k == "alloc"] == []


def test_slot_last_used_on_another_stream_is_waited_for_on_the_device(session):
    before, _ = _after_first_launch(session.seal_log)
    assert [d for k, d in before if k == "event wait"] == [session.stream], session.seal_log
    kinds = [k for k, _ in before]
    assert kinds.index("event wait") < kinds.index("upload")
    assert {d[2] for k, d in session.seal_log + session.open_log if k == "launch"} == {session.stream}


def test_every_kernel_launch_goes_through_the_occupancy_aware_launcher(session):
    """Each launch is configured inside ``_launch.launch`` (so its grid comes from the
    kernel's occupancy on the device); a kernel configured anywhere else fails this."""
    configured = [d for k, d in session.seal_log + session.open_log if k == "configure"]
    expected = ({"_chacha20_xor_kernel", "_poly1305_powers", "_poly1305_aead_partial"}
                if session.algorithm != "aes-gcm" else {"_aes_ctr_xor_kernel", "_ghash_blocks"})
    assert expected <= {name for name, _ in configured}, configured
    assert all(inside for _, inside in configured), [name for name, inside in configured if not inside]


# ----------------------------------------------------------------------------- overlaps
def _overlap_batch(gpu, algorithm, layout):
    """layout: per message (src start, dst start, length) in one shared 512-byte device buffer."""
    msgs = _messages(algorithm, [n for _, _, n in layout], seed=4)
    memory = gpu.to_device(np.arange(512, dtype=np.uint8))
    srcs = [memory[a:a + n] for a, _, n in layout]
    dsts = [memory[b:b + n] for _, b, n in layout]
    return msgs, memory, srcs, dsts


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("layout,match", [
    ([(0, 0, 100), (50, 300, 100)], "message 1: its destination overlaps the source of message 0"),
    ([(0, 200, 100), (300, 250, 100)], "message 1: its destination overlaps the destination of message 0"),
    ([(0, 10, 100)], "message 0: its destination overlaps its own source at another address"),
    ([(0, 0, 100), (100, 50, 100)], "message 1: its destination overlaps the destination of message 0"),
])
def test_destinations_sharing_memory_with_other_messages_are_refused(gpu, algorithm, layout, match):
    msgs, memory, srcs, dsts = _overlap_batch(gpu, algorithm, layout)
    before = gpu.to_host(memory)
    with pytest.raises(ValueError, match=match):
        gpu.seal_batch(algorithm, [m[0] for m in msgs], [m[1] for m in msgs], srcs,
                       [m[3] for m in msgs], dsts)
    assert np.array_equal(gpu.to_host(memory), before), "a refused batch touches nothing"


def test_overlapping_sources_and_in_place_are_allowed(gpu):
    """Sources may share memory (they are only read); a destination may be its own source."""
    algorithm = "chacha20-poly1305"
    msgs, memory, srcs, _ = _overlap_batch(gpu, algorithm, [(0, 0, 100), (40, 0, 100), (300, 300, 50)])
    plain = [gpu.to_host(s) for s in srcs]
    outs = [gpu.device_array(100), gpu.device_array(100), srcs[2]]   # the last one in place
    tags = gpu.to_host(gpu.seal_batch(algorithm, [m[0] for m in msgs], [m[1] for m in msgs], srcs,
                                      [m[3] for m in msgs], outs))
    for m, p, o, t in zip(msgs, plain, outs, tags):
        assert gpu.to_host(o).tobytes() + t.tobytes() == reference_seal(algorithm, m[0], m[1], p.tobytes(), m[3])


# ----------------------------------------------------------------------------- devices and streams
class _TwoDevices:
    """numba's device list with two devices: entering ``[i]`` makes ``i`` current."""

    def __init__(self):
        self.stack = [0]

    def __len__(self):
        return 2

    @contextlib.contextmanager
    def _use(self, index):
        self.stack.append(index)
        try:
            yield
        finally:
            self.stack.pop()

    def __getitem__(self, index):
        if index not in (0, 1):
            raise IndexError(index)
        return self._use(index)

    def current(self):
        return SimpleNamespace(id=self.stack[-1], compute_capability=(9, 0))


@pytest.fixture
def two_devices(monkeypatch, spy):
    from numba import cuda

    devices = _TwoDevices()
    monkeypatch.setattr(cuda, "gpus", devices)
    monkeypatch.setattr(cuda, "get_current_device", devices.current)
    spy.device = lambda: devices.stack[-1]
    return devices


def _on_device_one(x):
    """A numba device array whose memory says it belongs to device 1's context."""
    from numba import cuda

    d = cuda.to_device(x)
    d.gpu_data = SimpleNamespace(context=SimpleNamespace(device=SimpleNamespace(id=1)))
    return d


def test_tensor_on_another_device_is_worked_on_in_its_context(gpu, spy, two_devices):
    import gpucrypt
    from gpucrypt.tensors import _frameworks as fw

    x = np.arange(300, dtype=np.float32)
    d = _on_device_one(x)
    assert fw.adapter_for(d).place(d) == ("cuda", 1)
    algorithm, key = "chacha20-poly1305", os.urandom(32)
    spy.entries.clear()
    enc = gpucrypt.encrypt_tensor(d, key, algorithm=algorithm)
    tag = enc.tag
    back = gpucrypt.decrypt_tensor(enc, key)
    assert two_devices.stack == [0], "the caller's current device is left as it was"
    launches = [d for k, d in spy.entries if k == "launch"]
    assert launches and {dev for _, dev, _ in launches} == {1}, launches
    made = [d for k, d in spy.entries if k in ("alloc", "download")]
    assert made and all((d[1] if isinstance(d, tuple) else d) == 1 for d in made), made
    assert np.asarray(back.copy_to_host()).tobytes() == x.tobytes()
    assert gpu.to_host(enc.ciphertext).tobytes() + tag == reference_seal(
        algorithm, key, enc.nonce, x.tobytes(), enc.associated_data())


def test_model_file_of_a_tensor_on_another_device_is_sealed_in_its_context(spy, two_devices, tmp_path):
    from gpucrypt.files import models

    x = np.arange(100, dtype=np.float32)
    path = tmp_path / "m.gpucrypt"
    key = os.urandom(32)
    spy.entries.clear()
    models.save_encrypted({"w": _on_device_one(x)}, path, key, device="gpu")
    launches = [d for k, d in spy.entries if k == "launch"]
    assert launches and {dev for _, dev, _ in launches} == {1}, launches
    loaded = models.load_encrypted(path, key, device="cpu", framework="numpy")
    assert loaded["w"].tobytes() == x.tobytes()


def test_explicit_stream_waits_for_the_inputs_stream_on_the_device(gpu, spy):
    import gpucrypt
    from numba import cuda

    side = cuda.stream()
    x = np.arange(256, dtype=np.uint8)
    d = cuda.to_device(x)
    key = os.urandom(32)
    spy.entries.clear()
    enc = gpucrypt.encrypt_tensor(d, key, stream=side)
    before, _ = _after_first_launch(spy.entries)
    records = [d for k, d in before if k == "record"]
    waits = [d for k, d in before if k == "event wait"]
    assert side in waits and records and records[0] is not side, spy.entries
    assert {d[2] for k, d in spy.entries if k == "launch"} == {side}
    assert gpucrypt.decrypt_tensor(enc, key, stream=side).copy_to_host().tobytes() == x.tobytes()


# ----------------------------------------------------------------------------- launch geometry
def test_resident_blocks_estimate_counts_registers_per_warp_and_shared_memory():
    from gpucrypt.kernels import _launch

    assert _launch.estimate_resident_blocks(96, 0, 256) == 2       # 21 warps of 96 registers
    assert _launch.estimate_resident_blocks(38, 0, 256) == 6       # 40 registers: 51 warps
    assert _launch.estimate_resident_blocks(32, 0, 256) == 8       # threads bound it
    assert _launch.estimate_resident_blocks(40, 32768, 256) == 6   # AES's 32 KiB table: shared memory
    assert _launch.estimate_resident_blocks(255, 0, 1024) == 1     # at least one


def test_grid_is_what_the_kernel_keeps_resident_and_never_under_numbas_warning_threshold(monkeypatch):
    from gpucrypt.kernels import _launch

    monkeypatch.setattr(_launch, "is_simulator", lambda: False)
    monkeypatch.setattr(_launch, "sm_count", lambda: 132)

    class Overload:  # the driver cannot answer here: the estimate from registers is used
        regs_per_thread, shared_mem_per_block = 96, 0

        def max_cooperative_grid_blocks(self, threads):
            raise RuntimeError("no device")

    kernel = SimpleNamespace(overloads={"sig": Overload()})
    resident = _launch.resident_blocks(kernel, (), 256)
    assert resident == 132 * 2
    for units in (1, 255, 256 * 100, 256 * 264, 10**9):
        blocks = _launch.grid_for(units, 256, resident)
        assert _launch.MIN_GRID_BLOCKS <= blocks <= resident, (units, blocks)
        if units >= 256 * resident:
            assert blocks == resident   # no late second wave
    assert _launch.grid_for(10**9, 256, 40) == 160   # a small GPU: whole waves of 40


# ----------------------------------------------------------------------------- the pipeline
def test_pipeline_reads_and_uploads_ahead_on_a_copy_stream_and_reuses_its_pinned_staging(gpu, spy, monkeypatch):
    """Host data through the GPU runner: batch k+1 and k+2 are read and uploaded before
    batch k is finished, on a copy stream apart from the launch stream, and the pinned
    staging of the first depth + 1 batches is reused by the rest."""
    from gpucrypt import pipeline

    for name, kind in (("copy_to_device", "staged upload"), ("copy_to_host", "staged download")):
        def copy(a, b, stream, _real=getattr(gpu, name), _kind=kind):
            spy.entries.append((_kind, stream))
            return _real(a, b, stream)
        monkeypatch.setattr(gpu, name, copy)
    key, count = os.urandom(32), 6
    msgs = _messages("chacha20-poly1305", [100 + k for k in range(count)], seed=8)
    outs = [np.zeros(len(m[2]), np.uint8) for m in msgs]
    tags = {}

    def done(batch, results):
        spy.entries.append(("done", batch.payload))
        tags[batch.payload] = results[0]
    batches = (pipeline.Batch([pipeline.Job(k, m[1], m[3], m[2], outs[k])], done=done, payload=k)
               for k, m in enumerate(msgs))
    pipeline.run(batches, pipeline.GpuRunner(gpu, "seal", "chacha20-poly1305", msgs[0][0]), depth=2)
    for m, out, k in zip(msgs, outs, range(count)):
        assert out.tobytes() + tags[k] == reference_seal("chacha20-poly1305", m[0], m[1], m[2].tobytes(), m[3])
    kinds = [k for k, _ in spy.entries]
    uploads = [i for i, k in enumerate(kinds) if k == "staged upload"]
    assert len(uploads) == count and uploads[2] < kinds.index("done"), spy.entries
    copy_streams = {d for k, d in spy.entries if k.startswith("staged")}
    launch_streams = {d[2] for k, d in spy.entries if k == "launch"}
    assert len(copy_streams) == 1 and len(launch_streams) == 1 and not copy_streams & launch_streams
    assert "pinned_array" not in [d[0] for k, d in spy.entries[uploads[3]:] if k == "alloc"], \
        "the staging of the first three batches is reused"


# --------------------------------------------------------------------------- addresses, not arrays
#
# On a device, a batch's message buffers are DeviceSpans (address, length, owner) and the typed
# views of a slot's buffers are made from addresses: numba device arrays cost tens of
# microseconds of host time each. The simulator has no addresses, so these tests drive the
# device branch with a stand-in for numba's cuda module that records what it is asked to make.

class _FakeDeviceArray:
    """Device memory as the CUDA array interface describes it (no bytes behind it)."""

    def __init__(self, ptr, shape, typestr="|u1", strides=None):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (ptr, False),
                                         "version": 3, "strides": strides}


class _RecordingCuda:
    def __init__(self):
        self.made = []

    def from_cuda_array_interface(self, desc, owner=None, sync=True):
        self.made.append((desc, owner, sync))
        return SimpleNamespace(desc=desc)


@pytest.fixture
def on_device(monkeypatch):
    """The GPU backend's module with its device branch taken (``_simulated()`` false)."""
    from gpucrypt.backends import gpu as module

    monkeypatch.setattr(module, "_simulated", lambda: False)
    return module


def test_message_buffers_on_a_device_are_spans_of_their_memory(on_device):
    backend = on_device.GpuBackend.__new__(on_device.GpuBackend)   # no device needed
    words = _FakeDeviceArray(0x7000_0000, (3, 4), "<u4")
    span = backend.device_span(words)
    assert (span.ptr, span.nbytes, span.size, span.owner) == (0x7000_0000, 48, 48, words)
    assert backend.device_span(span) is span
    assert on_device._interface_of(span) == (0x7000_0000, 48)
    assert span.__cuda_array_interface__["shape"] == (48,)
    part = backend.byte_range(words, 8, 40)
    assert (part.ptr, part.nbytes, part.owner) == (0x7000_0008, 32, words)
    assert backend.byte_range(words, 48, 48).nbytes == 0
    for start, stop in ((40, 49), (-1, 4), (9, 8)):
        with pytest.raises(IndexError):
            backend.byte_range(words, start, stop)
    with pytest.raises(ValueError, match="not C-contiguous"):
        backend.device_span(_FakeDeviceArray(0x7000_0000, (4, 4), "<u4", strides=(4, 16)))
    with pytest.raises(TypeError, match="copy it with to_device first"):
        backend.device_span(np.zeros(4, np.uint8))


def test_views_on_a_device_are_made_from_the_buffers_address(on_device):
    cuda, buffer = _RecordingCuda(), _FakeDeviceArray(0x9000_0000, (4096,))
    layout = [(0, 32, np.dtype(np.uint32), (8,)), (256, 64, np.dtype(np.uint8), (4, 16)),
              (512, 16, np.dtype(np.uint64), (1, 2))]
    views = on_device._views(cuda, buffer, layout)
    assert len(views) == 3
    assert [(d["data"], d["shape"], d["typestr"], d["strides"]) for d, _, _ in cuda.made] == [
        ((0x9000_0000, False), (8,), "<u4", None), ((0x9000_0100, False), (4, 16), "|u1", None),
        ((0x9000_0200, False), (1, 2), "<u8", None)]
    assert all(owner is buffer and sync is False for _, owner, sync in cuda.made)
    for bad in ((4090, 8, np.dtype(np.uint8), (8,)), (0, 32, np.dtype(np.uint32), (9,))):
        with pytest.raises(AssertionError):
            on_device._views(cuda, buffer, [bad])


def test_arena_on_a_device_spans_every_buffer_from_the_lowest(on_device):
    cuda = _RecordingCuda()
    buffers = [on_device.DeviceSpan(0x5000_1000, 100, None), on_device.DeviceSpan(0x5000_0000, 16, None),
               on_device.DeviceSpan(0, 0, None), on_device.DeviceSpan(0x5000_1000, 100, None)]
    arena = on_device._Arena(cuda, buffers, [on_device._span_of(b) for b in buffers])
    assert arena.offsets == [0x1000, 0, 0, 0x1000]
    (desc, owner, sync), = cuda.made
    assert desc["data"] == (0x5000_0000, False) and desc["shape"] == (0x1000 + 100,)
    assert owner == buffers and sync is False


def test_a_batch_shaped_like_the_last_reuses_its_slots_views(gpu, monkeypatch):
    """Views of a slot's buffers are made once per layout: a second batch of the same shape on
    the same slot makes none (and is still right); a batch of another shape makes new ones;
    a slot buffer that grows drops the views of the old one (they would keep it alive)."""
    from numba import cuda

    from gpucrypt.backends import gpu as module

    made = []
    real = module._views
    monkeypatch.setattr(module, "_views", lambda *a: made.append(a[2]) or real(*a))
    monkeypatch.setattr(gpu, "_rings", {}, raising=False)
    monkeypatch.setattr(module, "_RING", 1)
    stream = cuda.stream()
    for algorithm in ALGORITHMS:
        msgs = _messages(algorithm, [0, 5, 70, 33])
        _check_sealed(gpu, algorithm, msgs, *_seal(gpu, algorithm, msgs, stream=stream))
        first = len(made)
        assert first >= 2
        again = _messages(algorithm, [0, 5, 70, 33], seed=1)   # other keys and bytes, same shape
        _check_sealed(gpu, algorithm, again, *_seal(gpu, algorithm, again, stream=stream))
        assert len(made) == first
        more = _messages(algorithm, [40] * 9, seed=2)
        _check_sealed(gpu, algorithm, more, *_seal(gpu, algorithm, more, stream=stream))
        assert len(made) > first
    slot = module._Slot(cuda)
    layout = [(0, 64, np.dtype(np.uint8), (64,))]
    small = slot.scratch_buffer(64, stream)
    views = slot.views(small, layout)
    assert slot.views(small, layout) is views
    tables = slot.upload([(0, np.arange(64, dtype=np.uint8))], 64, stream)
    table_views = slot.views(tables, layout)
    large = slot.scratch_buffer(module._MIN_CAPACITY + 1, stream)
    assert large is not small and slot.views(large, layout) is not views
    assert all(buffer is not small for buffer, _ in slot._view_cache.values())
    assert slot.views(tables, layout) is table_views   # the other buffer's views stay
    grown = slot.upload([(0, np.arange(64, dtype=np.uint8))], module._MIN_CAPACITY + 1, stream)
    assert grown is not tables and all(buffer is not tables for buffer, _ in slot._view_cache.values())
    assert slot.views(large, layout) is slot.views(large, layout)


@pytest.fixture
def host_addresses(monkeypatch, gpu, on_cudasim):
    """The device's by-address branch run in the simulator, over host addresses: buffers are
    spans of NumPy memory, the arena and the slot views are NumPy arrays made from addresses,
    and the real kernels run over them. Returns the list of what was made from an address."""
    if not on_cudasim:
        pytest.skip("on a device every batch takes the by-address branch; the other tests run it")
    import ctypes

    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    from gpucrypt.backends import gpu as module

    real_interface = module._interface_of

    def interface(obj):
        host = obj._ary if isinstance(obj, FakeCUDAArray) else obj
        if isinstance(host, np.ndarray):
            if not host.flags.c_contiguous:
                raise ValueError("array is not C-contiguous; make a contiguous copy first")
            return host.__array_interface__["data"][0], host.nbytes
        return real_interface(obj)

    made = []

    def from_address(desc, owner=None, sync=True):
        dtype, shape = np.dtype(desc["typestr"]), tuple(desc["shape"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        raw = (ctypes.c_ubyte * nbytes).from_address(desc["data"][0])
        made.append((desc["data"][0], nbytes, owner))
        return FakeCUDAArray(np.frombuffer(raw, dtype=np.uint8).view(dtype).reshape(shape))

    monkeypatch.setattr(module, "_by_address", lambda: True)
    monkeypatch.setattr(module, "_interface_of", interface)
    monkeypatch.setattr(gpu._cuda, "from_cuda_array_interface", from_address, raising=False)
    monkeypatch.setattr(gpu, "_rings", {}, raising=False)
    return made


@pytest.mark.parametrize("algorithm", ALGORITHMS + ("xchacha20-poly1305",))
@pytest.mark.parametrize("tag", ["gpu", "host"])
def test_by_address_batches_match_the_reference(gpu, host_addresses, algorithm, tag):
    """Seal and open by address (spans, the arena over their range, views from addresses):
    in place and into separate buffers, an empty message among them, and a tampered one,
    whose in-place ciphertext stays and whose separate output is zeroed."""
    from gpucrypt.backends import gpu as module

    nonce_len = 24 if algorithm == "xchacha20-poly1305" else 12
    rng = np.random.default_rng(7)
    msgs = [(bytes(rng.integers(0, 256, 32, dtype=np.uint8)), bytes(rng.integers(0, 256, nonce_len, dtype=np.uint8)),
             rng.integers(0, 256, n, dtype=np.uint8), bytes(rng.integers(0, 256, i % 5, dtype=np.uint8)))
            for i, n in enumerate([70, 0, 33, 129])]
    keys, nonces, aads = [m[0] for m in msgs], [m[1] for m in msgs], [m[3] for m in msgs]
    srcs = [m[2].copy() for m in msgs]
    dsts = [s if i % 2 == 0 else np.zeros(s.size + 3, np.uint8) for i, s in enumerate(srcs)]
    assert isinstance(gpu.device_span(srcs[0]), module.DeviceSpan)
    tags = gpu.to_host(gpu.seal_batch(algorithm, keys, nonces, srcs, aads, dsts, tag=tag))
    for m, d, t in zip(msgs, dsts, tags):
        expected = reference_seal(algorithm, m[0], m[1], m[2].tobytes(), m[3])
        assert d[:m[2].size].tobytes() + t.tobytes() == expected
    assert any(owner is not None and isinstance(owner, list) for _, _, owner in host_addresses)  # the arena
    cts = [d[:m[2].size].copy() for m, d in zip(msgs, dsts)]
    sent = [c.copy() for c in cts]
    outs = [c if i % 2 == 0 else np.full(c.size, 7, np.uint8) for i, c in enumerate(cts)]
    bad = [t.tobytes() for t in tags]
    bad[2] = bytes([bad[2][0] ^ 1]) + bad[2][1:]
    bad[3] = bytes([bad[3][0] ^ 1]) + bad[3][1:]
    ok = gpu.open_batch(algorithm, keys, nonces, cts, bad, aads, outs, tag=tag)
    assert list(ok) == [True, True, False, False]
    assert outs[0].tobytes() == msgs[0][2].tobytes() and outs[1].size == 0
    assert outs[2].tobytes() == sent[2].tobytes()        # in place: the ciphertext stays
    assert not outs[3].any()                             # apart: zeroed


def test_by_address_keystream_and_pipeline_staging(gpu, host_addresses):
    """The raw keystream by address, and the pipeline's staged host buffers as ranges of its
    device buffer (byte_range), both against cryptography."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    from gpucrypt import pipeline

    key, iv = os.urandom(32), os.urandom(16)
    data = np.frombuffer(os.urandom(300), np.uint8).copy()
    out = np.zeros(300, np.uint8)
    gpu.xor_keystream_device("chacha20", key, iv, 0, data, out)
    assert out.tobytes() == Cipher(algorithms.ChaCha20(key, iv), None).encryptor().update(data.tobytes())
    msgs = _messages("chacha20-poly1305", [5, 0, 200])
    jobs = [pipeline.Job(i, m[1], m[3], bytearray(m[2].tobytes()), bytearray(m[2].size))
            for i, m in enumerate(msgs)]
    runner = pipeline.GpuRunner(gpu, "seal", "chacha20-poly1305", msgs[0][0])
    tags = runner.start(pipeline.Batch(jobs))()
    for m, job, t in zip(msgs, jobs, tags):
        assert bytes(job.dst) + bytes(t) == reference_seal("chacha20-poly1305", m[0], m[1], m[2].tobytes(), m[3])


def test_by_address_spans_copy_like_device_arrays(gpu, host_addresses):
    """A DeviceSpan goes through to_host, copy_to_host and copy_to_device as the device array it
    describes (by address: the device's branch, over host memory)."""
    buf = np.frombuffer(os.urandom(64), np.uint8).copy()
    span = gpu.byte_range(buf, 3, 40)
    assert gpu.to_host(span).tobytes() == buf[3:40].tobytes()
    out = np.zeros(37, np.uint8)
    gpu.copy_to_host(out, span, None)
    gpu.synchronize()
    assert out.tobytes() == buf[3:40].tobytes()
    gpu.copy_to_device(span, np.full(37, 9, np.uint8), None)
    gpu.synchronize()
    assert buf[3:40].tobytes() == bytes([9]) * 37


def _mixed_batch(algorithm, lengths=(40, 0, 17, 70)):
    """A batch by address with most messages in place and one (index 2) into a buffer of
    its own: (msgs, srcs, dsts)."""
    msgs = _messages(algorithm, list(lengths), seed=11)
    srcs = [m[2].copy() for m in msgs]
    dsts = [np.zeros(s.size, np.uint8) if i == 2 else s for i, s in enumerate(srcs)]
    return msgs, srcs, dsts


def _seal_args(msgs, srcs, dsts):
    return [m[0] for m in msgs], [m[1] for m in msgs], srcs, [m[3] for m in msgs], dsts


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("tag", ["gpu", "host"])
@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_a_seal_whose_mac_fails_gives_in_place_messages_their_plaintext_back(
        gpu, host_addresses, monkeypatch, algorithm, tag, failure):
    """The keystream overwrites an in-place message before its MAC is made. A MAC phase
    that fails (a launch or module-load error, out of memory: simulated here), or a
    Ctrl-C there, left the caller's only copy as ciphertext without a tag. By address, as
    on a device (the simulator's staged branch never wrote the caller's buffer early)."""
    from gpucrypt import _host_primitives
    from gpucrypt.kernels import ghash, poly1305

    def fail(*a, **k):
        raise failure("simulated failure of the MAC phase")
    if tag == "gpu":
        monkeypatch.setattr(poly1305, "poly1305_aead_tags", fail)
        monkeypatch.setattr(ghash, "ghash_aead_tags", fail)
    else:
        monkeypatch.setattr(_host_primitives, "Poly1305AeadMac", fail)
        monkeypatch.setattr(_host_primitives, "gcm_tag", fail)
    msgs, srcs, dsts = _mixed_batch(algorithm)
    with pytest.raises(failure, match="simulated"):
        gpu.seal_batch(algorithm, *_seal_args(msgs, srcs, dsts), tag=tag)
    assert [s.tobytes() for s in srcs] == [m[2].tobytes() for m in msgs]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_ctrl_c_during_a_seals_keystream_still_gives_the_plaintext_back(
        gpu, host_addresses, monkeypatch, algorithm):
    """A Ctrl-C that lands as the keystream launch returns (the launch queued, not yet
    counted) is held back until the launches are counted, then undone with them."""
    import signal

    from gpucrypt.kernels import aes, chacha20

    module, name = (chacha20, "chacha20_xor") if algorithm != "aes-gcm" else (aes, "aes_ctr_xor")
    real, calls = getattr(module, name), []

    def launch_then_ctrl_c(*a, **k):
        real(*a, **k)
        calls.append(a[0].size)
        if len(calls) == 2:   # the data launch (the first makes the key blocks)
            signal.raise_signal(signal.SIGINT)
    monkeypatch.setattr(module, name, launch_then_ctrl_c)
    msgs, srcs, dsts = _mixed_batch(algorithm)
    with pytest.raises(KeyboardInterrupt):
        gpu.seal_batch(algorithm, *_seal_args(msgs, srcs, dsts))
    assert len(calls) == 3   # key blocks, data, the data again
    assert [s.tobytes() for s in srcs] == [m[2].tobytes() for m in msgs]


def test_a_seal_whose_restore_fails_too_says_so(gpu, host_addresses, monkeypatch):
    """When running the keystream again fails as well, the exception that goes on is the
    first one, with a note that the in-place messages may be ciphertext."""
    from gpucrypt.kernels import chacha20, poly1305

    real, calls = chacha20.chacha20_xor, []

    def fails_the_third_time(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated launch failure")
        return real(*a, **k)

    def fail(*a, **k):
        raise MemoryError("simulated out of memory in the MAC phase")
    monkeypatch.setattr(chacha20, "chacha20_xor", fails_the_third_time)
    monkeypatch.setattr(poly1305, "poly1305_aead_tags", fail)
    msgs, srcs, dsts = _mixed_batch("chacha20-poly1305")
    with pytest.raises(MemoryError) as caught:
        gpu.seal_batch("chacha20-poly1305", *_seal_args(msgs, srcs, dsts))
    assert any("may hold ciphertext without a tag" in note and "simulated launch failure" in note
               for note in caught.value.__notes__)


@pytest.mark.parametrize("algorithm", ALGORITHMS + ("xchacha20-poly1305",))
def test_by_address_messages_at_odd_offsets_of_one_pool_match_the_reference(gpu, host_addresses, algorithm):
    """Messages carved at odd offsets of one host pool, in place and apart, by address: the
    arena's base and every message start where the memory puts them (the separately
    allocated arrays of the test above are all aligned), so the kernels' choice between
    their aligned fast path and the byte path is made on real addresses, as on a device."""
    rng = np.random.default_rng(9)
    pool = np.zeros(1 << 13, np.uint8)
    lens = [0, 1, 15, 16, 17, 64, 65, 200, 33]
    nonce_len = 24 if algorithm == "xchacha20-poly1305" else 12
    starts = set()
    for shift in (1, 3, 8, 13):
        one_key = shift % 2 == 1   # one key (GHASH's table kernel) and mixed keys
        key_sizes = (16, 24, 32) if algorithm == "aes-gcm" else (32,)
        keys = [rng.bytes(key_sizes[i % len(key_sizes)]) for i in range(len(lens))]
        if one_key:
            keys = [keys[0]] * len(lens)
        nonces = [rng.bytes(nonce_len) for _ in lens]
        aads = [rng.bytes(int(rng.integers(0, 40))) for _ in lens]
        pts = [rng.bytes(n) for n in lens]
        cursor, srcs, dsts = shift, [], []
        for i, n in enumerate(lens):
            src = pool[cursor:cursor + n]
            src[:] = np.frombuffer(pts[i], np.uint8)
            cursor += n + int(rng.integers(0, 20))
            if i % 2:
                dst = pool[cursor:cursor + n]
                cursor += n + int(rng.integers(0, 20))
            else:
                dst = src
            srcs.append(src)
            dsts.append(dst)
            starts.add(dst.ctypes.data % 16)
        tags = gpu.to_host(gpu.seal_batch(algorithm, keys, nonces, srcs, aads, dsts))
        for i in range(len(lens)):
            assert dsts[i].tobytes() + tags[i].tobytes() == \
                reference_seal(algorithm, keys[i], nonces[i], pts[i], aads[i]), (shift, lens[i])
        outs = []   # opened where they were sealed: in place, or into more of the pool
        for i, (d, n) in enumerate(zip(dsts, lens)):
            outs.append(pool[cursor + 1:cursor + 1 + n] if i % 2 else d)
            cursor += (n + 1) if i % 2 else 0
        ok = gpu.open_batch(algorithm, keys, nonces, dsts, list(tags), aads, outs)
        assert ok.all() and [o.tobytes() for o in outs] == pts, shift
    assert len(starts) > 4   # the messages really started at many alignments


def test_aliases_of_scratch_must_fit_and_be_aligned():
    from gpucrypt.backends import gpu as module

    work = module._Work()
    space = work.space(64)
    words = work.alias(space, np.uint32, (2, 8))
    assert work.spaces[words][1:] == (64, np.dtype(np.uint32), (2, 8))
    assert work.alias(space, np.uint8, (2, 16), 32) == words + 1
    for dtype, shape, start in ((np.uint32, (17,), 0), (np.uint32, (4,), 2), (np.uint8, (4,), -1)):
        with pytest.raises(AssertionError):
            work.alias(space, dtype, shape, start)


def test_batch_keys_nonces_and_aads_given_as_ints_are_refused(gpu):
    """bytes(12) is 12 zero bytes, exactly a nonce's size: a batch refuses an int key,
    nonce or aad instead of sealing under zeros."""
    [(key, nonce, data, _)] = _messages("chacha20-poly1305", [5])
    buf = data.copy()
    for keys, nonces, aads in (([32], [nonce], [b""]), ([key], [12], [b""]), ([key], [nonce], [3])):
        with pytest.raises(TypeError, match="must be bytes-like"):
            gpu.seal_batch("chacha20-poly1305", keys, nonces, [buf], aads, [buf])
    assert buf.tobytes() == data.tobytes()
    with pytest.raises(TypeError, match="tag must be bytes-like"):
        gpu.open_batch("chacha20-poly1305", [key], [nonce], [buf], [16], [b""], [buf])
    from gpucrypt.backends import get_backend
    with pytest.raises(TypeError, match="key must be bytes-like"):
        get_backend("cpu").aead("aes-gcm", 16)
