"""Device-side half of ``gpucrypt bench``: AEADs and keystreams on device-resident data,
timed with CUDA events.

What is timed: one ``seal_batch``/``open_batch`` (AEADs) or ``xor_keystream_device``
(ChaCha20, AES-CTR) call per message (the same one message per call as the CPU
rows), on data already in device memory, between two
CUDA events on the stream the backend launches on (the default stream unless CuPy
has another current stream). Host-side Python overhead per call is part of
the figure, as it is for every user of the API. ``open_batch`` synchronises (it
reports which tags verified), so decryption includes one synchronisation per call.

L2 rotation: source and destination views are cut from pools of at least twice
the L2 cache (100 MiB on an H100), :data:`MAX_VIEWS` views at most, and each call
takes the next view. From 128 KiB per message upwards a full cycle of views moves
more than the L2 holds, so a message is never still cached from the previous
cycle; smaller messages are launch-bound and the rotation cannot help them.

Memory per cell: three pools (plaintext, ciphertext for decryption, output) of
``max(2 x L2, 2 x size)`` bytes each: about 6 GiB for a 1 GiB message.

This module is the only place in gpucrypt that touches numba directly above the
backend (events, device attributes, device-to-device copies): a benchmark
harness has to measure the device itself.

Device time (``device_time=True``, ``gpucrypt bench --device-time``): each call costs the
host about as long as a small message costs the device (0.8 ms on the H200 of
2026-12-04), so a run of calls between two events measures the host whenever the device
is faster than that. In this mode the stream is first given enough device-to-device
copies to outlast the host's queueing of the timed calls, then the start event, the
calls and the end event are queued behind them: the device runs the calls back to
back, and the events time the device alone. An event recorded after the copies tells
whether the device reached the calls before the host had queued them all (then the
host set the pace): the run is repeated with a longer delay, and a cell whose host
never got ahead is not reported. Decryption synchronises once per call (it returns the
verdicts), so it has no device-time rows.

Under numba's CUDA simulator nothing here is a measurement: :class:`GpuSession`
refuses to start there unless ``simulator_smoke`` is set, and then times with the
host clock and labels every figure as "simulator (not a measurement)".
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from .cpu import Algorithm, Material, Timing, plan_loop

#: Most views per pool. 1024 x 128 KiB = 128 MiB > 2 x the H100's 50 MiB L2.
MAX_VIEWS = 1024
#: L2 size assumed when the device does not say.
DEFAULT_L2_BYTES = 50 << 20
#: Bytes copied per repetition of the device-to-device copy measurement.
COPY_BYTES = 256 << 20
#: Device-time mode: the queued delay is this many times the host's expected queueing time.
DELAY_FACTOR = 2.0
#: ... and at least this long (seconds), tried again up to this many times, each 4x longer.
MIN_DELAY_SECONDS = 2e-3
DELAY_TRIES = 3
#: Calls per timed run in device-time mode. The GPU backend reuses two slots of pinned
#: staging (``backends/gpu.py``: ``_RING``) and waits for a slot's last upload before refilling
#: it, so a third call would wait on the host for the delay queued before the first.
DEVICE_TIME_MAX_CALLS = 2
#: Bytes of each of the two buffers the delay copies between (less where memory is short).
DELAY_BYTES = 1 << 30
#: Label of every figure produced by the simulator.
SIMULATOR_LABEL = "simulator (not a measurement)"
#: Largest message a simulator smoke run accepts.
SIMULATOR_MAX_SIZE = 4096

_TAG_PATHS = {"gpucrypt-gpu": "gpu", "gpucrypt-gpu-hosttag": "host"}


def device_time_refusal(implementation: str, alg: Algorithm, operation: str) -> str | None:
    """Why ``implementation`` (``gpucrypt-gpu`` or ``gpucrypt-gpu-hosttag``) has no
    device-time row for ``operation`` of ``alg``, or None where it has one: a call that
    waits on the host once (the host-tag path's copy back, decryption's verdicts) cannot
    be queued ahead of it. The run plans its rows by this too (``gpucrypt.bench``)."""
    if alg.kind == "stream":
        return None
    if _TAG_PATHS[implementation] == "host":
        return ("the host-tag path copies every message back to the host for its tag, so its "
                "device time cannot be queued ahead of the host")
    if operation != "encrypt":
        return ("decryption waits for its verdicts once per call, so its device time cannot be "
                "queued ahead of the host: see the rows without --device-time")
    return None


class GpuRefused(Exception):
    """The GPU is not timed in this run; the message says why."""


class HostFellBehind(GpuRefused):
    """Device-time mode: the device reached the timed calls before the host had queued them."""


def _simulator() -> bool:
    from numba import config

    return bool(config.ENABLE_CUDASIM)


class GpuSession:
    """The GPU backend plus what the bench needs to time it.

    Raises :class:`gpucrypt.backends.BackendUnavailable` (with the reason) when there
    is no GPU backend, and :class:`GpuRefused` under the simulator without
    ``simulator_smoke``.
    """

    def __init__(self, simulator_smoke: bool = False, device_time: bool = False):
        from ..backends import get_backend

        self.backend = get_backend("gpu")
        self.simulator = _simulator()
        if self.simulator and not simulator_smoke:
            raise GpuRefused("numba's CUDA simulator is active (NUMBA_ENABLE_CUDASIM=1): its timings "
                             "mean nothing, so the GPU is not timed (--simulator-smoke runs a tiny "
                             "functional pass, labelled as such)")
        from numba import cuda

        self._cuda = cuda
        self.device_time = device_time
        self._delay = None   # (a, b, seconds per copy): made on first use in device-time mode
        self._host_per_call = 0.0
        if self.simulator:
            self.device_name = SIMULATOR_LABEL
            self.l2_bytes = 0
        else:
            device = cuda.get_current_device()
            self.device_name = str(getattr(self.backend, "device_name", "") or _decode(device.name))
            try:
                self.l2_bytes = int(device.L2_CACHE_SIZE) or DEFAULT_L2_BYTES
            except Exception:
                self.l2_bytes = DEFAULT_L2_BYTES

    # ---- timing primitives
    def _time_calls(self, call, iterations: int) -> float:
        """Seconds for ``iterations`` rounds of ``call(i)``, ending when the device is done."""
        if self.simulator:
            t0 = time.perf_counter()
            for i in range(iterations):
                call(i)
            self.backend.synchronize()
            return time.perf_counter() - t0
        # the events go on the stream the backend launches on when given none (CuPy's
        # current stream once CuPy is imported, else the default stream)
        stream = self.backend._stream(None)
        start, end = self._cuda.event(), self._cuda.event()
        if not self.device_time:
            start.record(stream)
            for i in range(iterations):
                call(i)
            end.record(stream)
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        factor = DELAY_FACTOR
        for _ in range(DELAY_TRIES):
            reached = self._queue_delay(stream, factor * self._host_per_call * iterations)
            start.record(stream)
            for i in range(iterations):
                call(i)
            end.record(stream)
            host_behind = reached.query()   # the device got past the delay before the last call
            end.synchronize()
            if not host_behind:
                return start.elapsed_time(end) / 1e3
            factor *= 4
        raise HostFellBehind(f"the host could not queue {iterations} call(s) ahead of the device "
                             f"(tried delays up to {factor / 4 * self._host_per_call * iterations * 1e3:.1f} ms)")

    def _queue_delay(self, stream, seconds: float):
        """Queue device-to-device copies lasting at least ``seconds`` on ``stream``; returns
        an event recorded after them."""
        if self._delay is None:
            free = self._cuda.current_context().get_memory_info()[0]
            nbytes = max(1 << 20, min(DELAY_BYTES, free // 8))
            a = self._cuda.device_array(nbytes, dtype=np.uint8, stream=stream)
            b = self._cuda.device_array(nbytes, dtype=np.uint8, stream=stream)
            timer = (self._cuda.event(), self._cuda.event())
            timer[0].record(stream)
            for _ in range(4):
                b.copy_to_device(a, stream=stream)
            timer[1].record(stream)
            timer[1].synchronize()
            self._delay = (a, b, max(timer[0].elapsed_time(timer[1]) / 1e3 / 4, 1e-6))
        a, b, per_copy = self._delay
        for _ in range(max(1, int(np.ceil(max(seconds, MIN_DELAY_SECONDS) / per_copy)))):
            b.copy_to_device(a, stream=stream)
        reached = self._cuda.event()
        reached.record(stream)
        return reached

    def _measure(self, call, budget: float) -> Timing:
        if self.simulator:  # one pass; the number is a label, not a result
            return Timing(1, 1, self._time_calls(call, 1))
        call(0)
        call(1)  # warm-up: JIT compilation, first-touch of the views
        if self.device_time:  # what queueing one call costs the host (calls do not wait)
            self.backend.synchronize()
            t0 = time.perf_counter()
            for i in range(2, 6):
                call(i)
            self._host_per_call = (time.perf_counter() - t0) / 4
            self.backend.synchronize()
        most = DEVICE_TIME_MAX_CALLS if self.device_time else None
        per_call = self._time_calls(call, 1)
        if per_call < 1e-3:
            calls = min(16, most or 16)
            per_call = self._time_calls(call, calls) / calls
        repetitions, iterations = plan_loop(per_call, budget)
        iterations = min(iterations, most or iterations)
        samples = [self._time_calls(lambda i, k=k: call(k * iterations + i), iterations)
                   for k in range(repetitions)]
        return Timing(repetitions, iterations, statistics.median(samples) / iterations)

    # ---- buffers
    def _pool(self, size: int, extra: int = 0) -> tuple[int, int, int]:
        """(pool bytes, number of views, stride) for messages of ``size`` (+ ``extra``) bytes."""
        room = size + extra
        if self.simulator:
            return 2 * room, 2, room
        pool = max(2 * self.l2_bytes, 2 * room)
        views = max(2, min(MAX_VIEWS, pool // room))
        return pool, views, pool // views

    def _device_pool(self, fill: np.ndarray | None, pool: int, views: int, stride: int):
        """A device pool, its first ``len(fill)`` bytes of each view set to ``fill``."""
        host = np.zeros(pool, dtype=np.uint8)
        if fill is not None:
            for v in range(views):
                host[v * stride: v * stride + len(fill)] = fill
        return self.backend.to_device(host)

    # ---- what the bench calls
    def time_cell(self, implementation: str, m: Material, operation: str, budget: float) -> Timing:
        """Median seconds per message of ``operation`` on the GPU for ``implementation``
        (``gpucrypt-gpu`` or ``gpucrypt-gpu-hosttag``)."""
        alg: Algorithm = m.algorithm
        if self.simulator and m.size > SIMULATOR_MAX_SIZE:
            raise GpuRefused(f"simulator smoke runs stop at {SIMULATOR_MAX_SIZE} bytes")
        if alg.kind == "stream":
            return self._time_stream(m, operation, budget)
        tag_path = _TAG_PATHS[implementation]
        refused = device_time_refusal(implementation, alg, operation) if self.device_time \
            and not self.simulator else None
        if refused:
            raise GpuRefused(refused)
        gpu, size = self.backend, m.size
        pool, views, stride = self._pool(size)
        src_pool = self._device_pool(m.plaintext, pool, views, stride)
        dst_pool = self._device_pool(None, pool, views, stride)
        srcs = [src_pool[v * stride: v * stride + size] for v in range(views)]
        dsts = [dst_pool[v * stride: v * stride + size] for v in range(views)]
        keys, nonces, aads = [m.key], [m.nonce], [m.aad]
        family = alg.family

        def seal(v, into):
            return gpu.seal_batch(family, keys, nonces, [srcs[v]], aads, [into[v]], tag=tag_path)

        # Every view's ciphertext is made once up front and the first is checked
        # against the reference: a wrong kernel is reported, never timed.
        ct_pool = self._device_pool(None, pool, views, stride)
        cts = [ct_pool[v * stride: v * stride + size] for v in range(views)]
        all_tags = gpu.seal_batch(family, keys * views, nonces * views, srcs, aads * views, cts,
                                  tag=tag_path)  # one batch: a key and nonce may repeat
        tags = [all_tags[v: v + 1] for v in range(views)]
        gpu.synchronize()
        got = np.concatenate([gpu.to_host(cts[0]), gpu.to_host(tags[0]).reshape(-1)])
        if not np.array_equal(got, m.sealed):
            raise RuntimeError(f"{implementation} {alg.name} {size} bytes: the GPU's ciphertext "
                               f"and tag differ from the reference; not timed")

        if operation == "encrypt":
            def call(i):
                return seal(i % views, dsts)
        else:
            def call(i):
                v = i % views
                ok = gpu.open_batch(family, keys, nonces, [cts[v]], tags[v], aads, [dsts[v]],
                                    tag=tag_path)
                if not ok[0]:
                    raise RuntimeError(f"{implementation} {alg.name}: the GPU rejected a valid tag")
        # the timed call itself, once, checked too: its output is another buffer than the
        # batch's above, and decryption's plaintext is not the tag's verdict
        tag = call(0)
        gpu.synchronize()
        if operation == "encrypt":
            got, expected = np.concatenate([gpu.to_host(dsts[0]), gpu.to_host(tag).reshape(-1)]), m.sealed
        else:
            got, expected = gpu.to_host(dsts[0]), m.plaintext
        if not np.array_equal(got, expected):
            raise RuntimeError(f"{implementation} {alg.name} {size} bytes: the timed "
                               f"{operation} call's output differs from the reference; not timed")
        return self._measure(call, budget)

    def _time_stream(self, m: Material, operation: str, budget: float) -> Timing:
        """The raw keystream (``xor_keystream_device``) over device views; decryption is the
        same XOR, run over the ciphertext."""
        gpu, size, alg = self.backend, m.size, m.algorithm
        xor = gpu.xor_keystream_device
        pool, views, stride = self._pool(size)
        source = m.sealed if operation == "decrypt" else m.plaintext
        expected = m.plaintext if operation == "decrypt" else m.sealed
        src_pool = self._device_pool(source, pool, views, stride)
        dst_pool = self._device_pool(None, pool, views, stride)
        srcs = [src_pool[v * stride: v * stride + size] for v in range(views)]
        dsts = [dst_pool[v * stride: v * stride + size] for v in range(views)]
        xor(alg.family, m.key, m.nonce, 0, srcs[0], dsts[0])
        gpu.synchronize()
        if not np.array_equal(gpu.to_host(dsts[0]), expected):
            raise RuntimeError(f"gpucrypt-gpu {alg.name} {size} bytes: the GPU's keystream differs "
                               f"from the reference; not timed")

        def call(i):
            v = i % views
            xor(alg.family, m.key, m.nonce, 0, srcs[v], dsts[v])
        return self._measure(call, budget)

    def copy_bandwidth(self, budget: float) -> float | None:
        """Bytes copied per second by a device-to-device copy (each byte is read once and
        written once, so the memory traffic is twice this); None under the simulator."""
        if self.simulator:
            return None
        nbytes = max(COPY_BYTES, 2 * self.l2_bytes)
        a = self._cuda.device_array(nbytes, dtype=np.uint8)
        b = self._cuda.device_array(nbytes, dtype=np.uint8)
        timing = self._measure(lambda i: (b.copy_to_device(a) if i % 2 == 0 else a.copy_to_device(b)),
                               budget)
        return nbytes / timing.median_seconds


def backend_to_time(script: str):
    """The GPU backend for a script that times it, or None after printing why there is none
    worth timing: no GPU backend, or numba's simulator (its timings mean nothing)."""
    from ..backends import BackendUnavailable

    try:
        return GpuSession().backend
    except (BackendUnavailable, GpuRefused) as exc:
        print(f"{script} needs a real GPU: {exc}")
        return None


def _decode(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)
