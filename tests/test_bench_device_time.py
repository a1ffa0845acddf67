"""`gpucrypt bench --device-time`: the GPU rows time the device alone, with the calls queued
behind a delay, and refuse when the host cannot stay ahead (gpucrypt/bench/gpu.py).

No GPU runs the timing logic here: a model of one CUDA stream stands in for numba. It has
a host clock and a device clock. Work queued at host time h starts when both the host has
queued it and the device has finished what came before it. Events complete when the
device reaches them, and ``query()`` says whether that has happened by the host's present
time. The H200 run of 2026-12-04 measured what this models: about 0.8 ms of host time per
call, whatever the size.
"""
from __future__ import annotations

import pytest

from gpucrypt.bench import gpu as bench_gpu


class _Stream:
    def __init__(self):
        self.host = 0.0          # seconds of host time so far
        self.device_free = 0.0   # when the device finishes what is queued
        self.copies = 0

    def queue(self, seconds: float) -> float:
        self.device_free = max(self.host, self.device_free) + seconds
        return self.device_free


class _Event:
    def __init__(self, stream: _Stream):
        self.stream, self.at = stream, None

    def record(self, stream):
        self.at = self.stream.queue(0.0)

    def query(self) -> bool:
        return self.at <= self.stream.host

    def synchronize(self):
        self.stream.host = max(self.stream.host, self.at)

    def elapsed_time(self, later) -> float:
        return (later.at - self.at) * 1e3


class _Array:
    def __init__(self, stream: _Stream, copy_seconds: float):
        self.stream, self.copy_seconds = stream, copy_seconds

    def copy_to_device(self, other, stream=None):
        self.stream.copies += 1
        self.stream.queue(self.copy_seconds)


class _Context:
    def get_memory_info(self):
        return (64 << 30, 80 << 30)


class _Cuda:
    def __init__(self, stream, copy_seconds):
        self.stream, self.copy_seconds = stream, copy_seconds

    def event(self, timing=True):
        return _Event(self.stream)

    def device_array(self, n, dtype=None, stream=None):
        return _Array(self.stream, self.copy_seconds)

    def current_context(self):
        return _Context()


class _Backend:
    def __init__(self, stream):
        self.stream = stream

    def _stream(self, stream):
        return self.stream

    def synchronize(self, stream=None):
        self.stream.host = max(self.stream.host, self.stream.device_free)


def _session(device_time: bool, copy_seconds: float = 0.5e-3):
    stream = _Stream()
    session = object.__new__(bench_gpu.GpuSession)   # no GPU: the model's stream instead
    session.backend, session._cuda = _Backend(stream), _Cuda(stream, copy_seconds)
    session.simulator, session.device_time = False, device_time
    session._delay, session._host_per_call = None, 0.0
    session.device_name = "model"
    return session, stream


def _record_delays(session) -> list:
    """The delays (seconds) the session asks for, in order."""
    asked, real = [], session._queue_delay

    def queue_delay(stream, seconds):
        asked.append(max(seconds, bench_gpu.MIN_DELAY_SECONDS))
        return real(stream, seconds)
    session._queue_delay = queue_delay
    return asked


def _calls(stream: _Stream, host_seconds: float, device_seconds: float):
    def call(i):
        stream.host += host_seconds      # what queueing the call costs the host
        stream.queue(device_seconds)     # what running it costs the device
    return call


def test_events_around_calls_time_the_host_when_it_is_slower():
    session, stream = _session(device_time=False)
    per_call = session._time_calls(_calls(stream, 0.8e-3, 20e-6), 2) / 2
    assert per_call == pytest.approx(0.8e-3, rel=0.05)   # the host's pace, not the device's


def test_device_time_leaves_the_host_out():
    session, stream = _session(device_time=True)
    session._host_per_call = 0.8e-3
    asked = _record_delays(session)
    per_call = session._time_calls(_calls(stream, 0.8e-3, 20e-6), 2) / 2
    assert per_call == pytest.approx(20e-6, rel=1e-6)
    # one delay, DELAY_FACTOR times the host's 2 x 0.8 ms, made of whole 0.5 ms copies (after
    # the four that measured one copy)
    assert asked == [pytest.approx(bench_gpu.DELAY_FACTOR * 2 * 0.8e-3)]
    assert asked[0] <= (stream.copies - 4) * 0.5e-3 < asked[0] + 0.5e-3 + 1e-9


def test_a_host_slower_than_expected_gets_a_longer_delay():
    session, stream = _session(device_time=True)
    session._host_per_call = 1e-3
    asked = _record_delays(session)
    per_call = session._time_calls(_calls(stream, 3e-3, 50e-6), 2) / 2   # 3x the estimate
    assert per_call == pytest.approx(50e-6, rel=1e-6)
    first = max(bench_gpu.MIN_DELAY_SECONDS, bench_gpu.DELAY_FACTOR * 2 * 1e-3)
    assert asked == [pytest.approx(first), pytest.approx(4 * first)]   # 4 ms fell short of 6 ms


def test_a_host_that_never_gets_ahead_is_refused():
    session, stream = _session(device_time=True)
    session._host_per_call = 1e-6   # far under what the calls cost it
    with pytest.raises(bench_gpu.HostFellBehind, match="could not queue 2 call"):
        session._time_calls(_calls(stream, 50e-3, 10e-6), 2)


def test_rows_whose_calls_wait_on_the_host_are_refused():
    """Decryption (its verdicts) and the host-tag path (its copy back) wait on the host once
    per call: no device-time rows, said before any device memory is taken."""
    from gpucrypt.bench.cpu import ALGORITHMS, Material

    session, _ = _session(device_time=True)
    m = Material(ALGORITHMS["chacha20-poly1305"], 64)
    with pytest.raises(bench_gpu.GpuRefused, match="host-tag path"):
        session.time_cell("gpucrypt-gpu-hosttag", m, "encrypt", 0.01)
    with pytest.raises(bench_gpu.GpuRefused, match="decryption waits for its verdicts"):
        session.time_cell("gpucrypt-gpu", m, "decrypt", 0.01)
