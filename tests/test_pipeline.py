"""gpucrypt.pipeline: ordering, overlap, failures and buffer bounds of the one bulk pipeline."""
from __future__ import annotations

import io
import os
import threading
import time

import numpy as np
import pytest

from gpucrypt import pipeline, stream

KEY = bytes(range(32))


def test_split_evenly_keeps_order_and_balances_bytes():
    jobs = [pipeline.Job(i, b"", b"", bytes(n), None) for i, n in enumerate([5, 1, 1, 1, 1, 1, 5, 5])]
    runs = pipeline.split_evenly(jobs, 2)
    assert [j.ident for r in runs for j in r] == list(range(8))
    assert len(runs) == 2 and all(sum(j.size for j in r) <= 12 for r in runs)
    assert pipeline.split_evenly(jobs, 1) == [jobs]


def _batches(n_batches, per_batch, log, read_delay=0.0):
    for k in range(n_batches):
        time.sleep(read_delay)  # the producer "reads" batch k
        jobs = [pipeline.Job((k, j), b"", b"", b"x", None) for j in range(per_batch)]
        yield pipeline.Batch(jobs, done=lambda b, r, k=k: log.append((k, r)))


def test_done_runs_in_batch_order_in_the_callers_thread():
    log, caller = [], threading.get_ident()
    threads_seen = set()

    def crypto(job, src):
        threads_seen.add(threading.get_ident())
        time.sleep(0.001 * (3 - job.ident[1]))  # later jobs finish first
        return job.ident

    with pipeline.CpuRunner(crypto, 2) as runner:
        pipeline.run(_batches(5, 3, log), runner, depth=2)
    assert [k for k, _ in log] == list(range(5))
    assert all(r == [(k, 0), (k, 1), (k, 2)] for k, r in log)
    assert caller not in threads_seen


@pytest.mark.parametrize("threads", [1, 2])
def test_reading_overlaps_sealing(threads):
    """A producer that sleeps READ per batch and jobs that take SEAL per batch: the run
    takes about max(reads, seals) plus one batch, not their sum."""
    n, read, seal = 6, 0.08, 0.08
    log = []

    def crypto(job, src):
        time.sleep(seal / len_per_batch * threads)  # a batch's jobs are split over the threads
        return True

    len_per_batch = 4
    with pipeline.CpuRunner(crypto, threads) as runner:
        start = time.perf_counter()
        pipeline.run(_batches(n, len_per_batch, log, read_delay=read), runner, depth=2)
        took = time.perf_counter() - start
    serial = n * (read + seal)
    assert len(log) == n
    assert took < 0.75 * serial, f"{took:.2f} s: reads and seals did not overlap ({serial:.2f} s in series)"


def test_stream_encrypt_overlaps_a_slow_source_with_sealing(monkeypatch):
    """stream.encrypt from a file object whose reads sleep, with sealing slowed to the
    same pace: the total is near the larger of the two, and the bytes are right."""
    seg, n_segments, delay = 4096, 12, 0.03
    monkeypatch.setattr(pipeline, "CPU_BATCH_BYTES", 2 * seg)  # six batches of two segments
    data = os.urandom(n_segments * seg)

    class SlowReader(io.RawIOBase):
        def __init__(self):
            self._inner = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, buf):
            time.sleep(delay)
            return self._inner.readinto(buf)

    real_seal = pipeline.seal

    def slow_seal(ctx):
        inner = real_seal(ctx)

        def seal_one(job, src):
            time.sleep(delay)
            return inner(job, src)
        return seal_one

    monkeypatch.setattr(pipeline, "seal", slow_seal)
    out = io.BytesIO()
    start = time.perf_counter()
    stream.encrypt(SlowReader(), out, KEY, segment_size=seg, device="cpu", threads=1)
    took = time.perf_counter() - start
    reads = (n_segments + 1) * delay  # one more read finds the end
    seals = n_segments * delay
    assert took < 0.8 * (reads + seals), f"{took:.2f} s for {reads:.2f} s of reads and {seals:.2f} s of seals"
    back = io.BytesIO()
    stream.decrypt(out.getvalue(), back, KEY, device="cpu")
    assert back.getvalue() == data


def test_a_worker_error_names_its_job_and_stops_the_run():
    def crypto(job, src):
        if job.ident == (1, 2):
            raise OSError("disk gone")
        return True

    log = []
    with pipeline.CpuRunner(crypto, 2) as runner, pytest.raises(OSError) as err:
        pipeline.run(_batches(4, 3, log), runner)
    assert "(1, 2)" in "".join(getattr(err.value, "__notes__", [])) or not hasattr(err.value, "add_note")
    assert [k for k, _ in log] == [0]


def test_a_producer_error_comes_after_the_batches_before_it():
    """The producer raising (a cut file) lets the started batches finish first, so an
    earlier failure, raised from their done, is the one reported."""
    def batches():
        def fail(b, r):
            raise ValueError("batch 0 failed")
        yield pipeline.Batch([pipeline.Job(0, b"", b"", b"x", None)], done=fail)
        raise EOFError("cut")

    with pipeline.CpuRunner(lambda j, s: True, 1) as runner, pytest.raises(ValueError):
        pipeline.run(batches(), runner)


def test_failed_opens_are_never_stored():
    stored = []
    jobs = [pipeline.Job(i, b"", b"", b"x", None) for i in range(6)]
    batch = pipeline.Batch(jobs, store=lambda job, r: stored.append(job.ident))
    with pipeline.CpuRunner(lambda job, src: job.ident % 2 == 0, 2) as runner:
        pipeline.run([batch], runner)
    assert stored == [0, 2, 4]


def test_scratch_is_writable_and_sized():
    buf = pipeline.scratch(10)
    buf[:] = b"0123456789"
    assert len(buf) == 10 and bytes(buf) == b"0123456789" and len(pipeline.scratch(0)) == 0


def test_a_failed_batch_is_waited_for_whole_before_run_raises():
    """One run of a batch raises at once while the other is still working: run() returns
    only after that other run stopped (its writes must not outlive the caller's buffers
    or output file), with no ``with`` around the runner to hide it."""
    finished = []

    def crypto(job, src):
        if job.ident == (0, 0):
            raise OSError("read failed")
        time.sleep(0.2)
        finished.append(job.ident)
        return True

    runner = pipeline.CpuRunner(crypto, 2)
    try:
        with pytest.raises(OSError):
            pipeline.run(_batches(1, 2, []), runner)
        assert finished == [(0, 1)]  # the second run had finished before run() raised
    finally:
        runner.close()


def test_a_batch_run_in_the_callers_thread_failing_lets_earlier_batches_report_first():
    """With the inline runner a later batch's exception comes from start(); the batch
    before it still finishes first, and its failure is the one raised."""
    def fail(b, r):
        raise ValueError("batch 0 failed")

    def crypto(job, src):
        if job.ident == 1:
            raise OSError("later")
        return True

    batches = [pipeline.Batch([pipeline.Job(0, b"", b"", b"x", None)], done=fail),
               pipeline.Batch([pipeline.Job(1, b"", b"", b"x", None)])]
    with pipeline.CpuRunner(crypto, 0) as runner, pytest.raises(ValueError):
        pipeline.run(batches, runner)


def test_an_interrupt_while_waiting_is_raised_after_the_workers_stop(monkeypatch):
    """Ctrl-C while the caller waits for a batch: the workers finish first (they write to
    the caller's buffers), then the KeyboardInterrupt is raised, not lost."""
    import concurrent.futures

    finished = []

    def crypto(job, src):
        time.sleep(0.1)
        finished.append(job.ident)
        return True

    real = concurrent.futures.Future.exception
    interrupts = iter([KeyboardInterrupt()])

    def interrupted_once(self, timeout=None):
        exc = next(interrupts, None)
        if exc is not None:
            raise exc
        return real(self, timeout)

    monkeypatch.setattr(concurrent.futures.Future, "exception", interrupted_once)
    with pipeline.CpuRunner(crypto, 2) as runner, pytest.raises(KeyboardInterrupt):
        pipeline.run(_batches(1, 2, []), runner)
    assert sorted(finished) == [(0, 0), (0, 1)]


def _raised_in_time(call, seconds: float = 30.0) -> tuple[BaseException, float]:
    """``call()`` in a thread given ``seconds`` (a clean-up that waits forever fails the
    test instead of hanging it): the exception it raised and when."""
    outcome = {}

    def target():
        try:
            call()
        except BaseException as exc:  # handed to the test's thread
            outcome["exc"], outcome["at"] = exc, time.monotonic()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"run() still running after {seconds} s"
    assert "exc" in outcome, "run() returned instead of raising"
    return outcome["exc"], outcome["at"]


class _Jobs:
    """A crypto function whose jobs take ``seconds`` each, counting those inside it
    (``active``) and recording when each one's output was written (``written``)."""

    def __init__(self, seconds: float = 0.2):
        self.seconds, self.lock, self.active, self.written = seconds, threading.Lock(), 0, []

    def __call__(self, job, src):
        with self.lock:
            self.active += 1
        time.sleep(self.seconds)
        with self.lock:
            self.active -= 1
            self.written.append((job.ident, time.monotonic()))
        return True

    def check_stopped_when_raised(self, call) -> None:
        exc, at = _raised_in_time(call)
        assert isinstance(exc, KeyboardInterrupt), repr(exc)
        with self.lock:
            assert self.active == 0, f"{self.active} job(s) still running when run() raised"
        time.sleep(3 * self.seconds)  # time enough for a job left running to finish
        late = [ident for ident, when in self.written if when > at]
        assert not late, f"written after run() raised: {late}"


@pytest.mark.parametrize("where", ["before the second submit", "inside it, once queued"])
def test_an_interrupt_while_a_batch_is_submitted_stops_its_runs_before_run_raises(
        monkeypatch, where):
    """Ctrl-C while CpuRunner.start submitted a batch's runs: those submitted were in no
    batch in flight, so run() raised while they went on writing (to buffers the caller
    frees on the way out). A KeyboardInterrupt is injected at the second submit, before
    it queues its run or after (then no future names the run)."""
    from concurrent.futures import ThreadPoolExecutor

    class InterruptedPool(ThreadPoolExecutor):
        submits = 0

        def submit(self, *args, **kwargs):
            InterruptedPool.submits += 1
            if InterruptedPool.submits == 2 and where.startswith("before"):
                raise KeyboardInterrupt
            future = super().submit(*args, **kwargs)
            if InterruptedPool.submits == 2:
                raise KeyboardInterrupt
            return future

    monkeypatch.setattr(pipeline, "ThreadPoolExecutor", InterruptedPool, raising=False)
    jobs = _Jobs()
    runner = pipeline.CpuRunner(jobs, 2)
    try:
        jobs.check_stopped_when_raised(lambda: pipeline.run(_batches(1, 4, []), runner))
        assert InterruptedPool.submits == 2
    finally:
        runner.close()


def test_an_interrupt_just_after_a_batch_started_waits_for_it(monkeypatch):
    """Ctrl-C between runner.start() returning and run() putting the batch in flight:
    its runs were not waited for on the way out. Injected as the append raising."""
    from collections import deque

    class InterruptedDeque(deque):
        def append(self, item):
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "deque", InterruptedDeque)
    jobs = _Jobs()
    with pipeline.CpuRunner(jobs, 2) as runner:
        jobs.check_stopped_when_raised(lambda: pipeline.run(_batches(1, 4, []), runner))
    assert len(jobs.written) == 4


# ---------------------------------------------------------------------------- GpuRunner
# In numba's CUDA simulator here (conftest), on the device on a lent GPU.
def _gpu_runner(op: str, key: bytes, **kw) -> "pipeline.GpuRunner":
    from gpucrypt.backends import get_backend

    return pipeline.GpuRunner(get_backend("gpu"), op, "chacha20-poly1305", key, **kw)


def test_a_gpu_runner_given_more_batches_in_flight_than_its_depth_mixes_none_up():
    """run(depth=2) over a GpuRunner made for depth 1: its staging turns would come round
    while an older batch's results still waited in them (each batch then got a later
    one's ciphertext). Every batch gets its own."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    key = os.urandom(32)
    batches, expected = [], []
    for b in range(5):
        nonce, msg = os.urandom(12), bytes([b]) * 32
        batches.append(pipeline.Batch([pipeline.Job((b, 0), nonce, b"", bytearray(msg), bytearray(32))]))
        expected.append(ChaCha20Poly1305(key).encrypt(nonce, msg, b"")[:-16])
    pipeline.run(batches, _gpu_runner("seal", key, depth=1), depth=3)
    assert [bytes(batch.jobs[0].dst) for batch in batches] == expected


@pytest.mark.parametrize("runner", ["cpu", "gpu"])
def test_a_failed_open_zeroes_a_separate_destination_on_either_runner(runner):
    """A destination that still held an earlier batch's plaintext (a recycled buffer) must
    not keep it when this job's tag fails: zeros, on the GPU runner as on the CPU one. In
    place, the ciphertext stays."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    from gpucrypt.backends import get_backend

    key, nonce = os.urandom(32), os.urandom(12)
    earlier = b"an earlier batch's plaintext, 39 bytes"
    ct = ChaCha20Poly1305(key).encrypt(nonce, os.urandom(len(earlier)), b"")[:-16]
    apart = pipeline.Job(0, nonce, b"", bytearray(ct), bytearray(earlier), tag=bytes(16))
    in_place_buf = bytearray(ct)
    in_place = pipeline.Job(1, nonce, b"", memoryview(in_place_buf), memoryview(in_place_buf),
                            tag=bytes(16))
    if runner == "cpu":
        run = pipeline.CpuRunner(pipeline.open_detached(get_backend("cpu").aead("chacha20-poly1305", key)), 0)
    else:
        run = _gpu_runner("open", key)
    assert run.start(pipeline.Batch([apart, in_place]))() == [False, False]
    assert bytes(apart.dst) == bytes(len(earlier)) and bytes(in_place_buf) == ct


def test_a_gpu_runners_store_gets_each_tag_as_bytes_with_tags_left_on_the_device():
    key = os.urandom(32)
    stored = {}
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    jobs = [pipeline.Job(i, os.urandom(12), b"", bytearray(b"x" * 20), bytearray(20)) for i in range(2)]
    tags = _gpu_runner("seal", key, host_tags=False).start(
        pipeline.Batch(jobs, store=lambda job, tag: stored.__setitem__(job.ident, tag)))()
    assert stored == {i: tags.row(i) for i in range(2)} and all(len(t) == 16 for t in stored.values())
    # each job's own tag, as the reference computes it
    assert stored == {job.ident: ChaCha20Poly1305(key).encrypt(job.nonce, b"x" * 20, b"")[-16:]
                      for job in jobs}
    assert all(type(t) is bytes for t in stored.values())


def test_a_gpu_batch_whose_scatter_fails_frees_its_staging_turn():
    """A batch whose results could not be scattered (a read-only destination) has failed:
    its staging turn is free again, not kept busy for ever (each later batch would then
    allocate new pinned and device buffers)."""
    key = os.urandom(32)
    runner = _gpu_runner("seal", key, depth=1)
    src = bytearray(b"z" * 20)
    bad = pipeline.Job(0, os.urandom(12), b"", src, memoryview(bytes(20)))  # read-only dst
    with pytest.raises((TypeError, ValueError)):
        pipeline.run([pipeline.Batch([bad])], runner)
    for i in range(6):
        job = pipeline.Job(i, os.urandom(12), b"", bytearray(b"z" * 20), bytearray(20))
        pipeline.run([pipeline.Batch([job])], runner)
    assert len(runner._turns) == 2  # depth + 1, as made


def test_a_gpu_batch_whose_store_fails_is_not_stored_twice_by_the_clean_up():
    """run() waits for a failed batch again before it raises (its workers must stop first):
    the GPU runner's second wait must not scatter and store the batch a second time."""
    key = os.urandom(32)
    calls = []

    def store(job, tag):
        calls.append(job.ident)
        if job.ident == 1:
            raise OSError("disk full")

    jobs = [pipeline.Job(i, os.urandom(12), b"", bytearray(b"y" * 20), bytearray(20)) for i in range(3)]
    with pytest.raises(OSError, match="disk full"):
        pipeline.run([pipeline.Batch(jobs, store=store)], _gpu_runner("seal", key))
    assert calls == [0, 1]


def test_a_gpu_open_with_one_tag_of_the_wrong_length_fails_that_message_only():
    """As on the CPU: a 15-byte tag cannot verify, so its message fails; the others open
    (the whole batch was refused with a ValueError)."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    from gpucrypt.backends import get_backend

    key = os.urandom(32)
    msgs = [os.urandom(40) for _ in range(2)]
    nonces = [os.urandom(12) for _ in msgs]
    sealed = [ChaCha20Poly1305(key).encrypt(n, m, b"") for n, m in zip(nonces, msgs)]
    gpu = get_backend("gpu")
    srcs = [gpu.to_device(np.frombuffer(s[:-16], dtype=np.uint8)) for s in sealed]
    dsts = [gpu.device_array(40) for _ in msgs]
    ok = gpu.open_batch("chacha20-poly1305", [key, key], nonces, srcs,
                        [sealed[0][-16:], sealed[1][-16:-1]], [b"", b""], dsts)
    got = [bytes(gpu.to_host(d)) for d in dsts]
    assert list(ok) == [True, False] and got == [msgs[0], bytes(40)]
    with pytest.raises(ValueError, match="one per message"):
        gpu.open_batch("chacha20-poly1305", [key, key], nonces, srcs, [sealed[0][-16:]],
                       [b"", b""], dsts)
    # an array of tags is rows of 16 bytes: a flat one (the right tags, even) is refused,
    # not read as two wrong tags (which would look like tampering)
    flat = np.frombuffer(sealed[0][-16:] + sealed[1][-16:], dtype=np.uint8)
    for tags in (flat, gpu.to_device(flat)):
        with pytest.raises(ValueError, match=r"uint8\[2, 16\]"):
            gpu.open_batch("chacha20-poly1305", [key, key], nonces, srcs, tags, [b"", b""], dsts)


@pytest.mark.parametrize("op", ["seal", "open"])
def test_a_gpu_batch_mixing_algorithms_is_refused_before_anything_is_read(op):
    """A batch is one launch of one algorithm: a ChaCha20-Poly1305 job after an AES-GCM
    one was sealed as AES-GCM (the first job's algorithm ran the whole batch). Refused
    before any job's input is read; jobs that all name one algorithm other than the
    runner's run under it."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    key, nonce, msg = os.urandom(32), os.urandom(12), os.urandom(40)
    sealed = AESGCM(key).encrypt(nonce, msg, b"")

    def job(i, algorithm):
        return pipeline.Job(i, nonce, b"", None, bytearray(40), key=key, algorithm=algorithm,
                            tag=sealed[-16:] if op == "open" else None, size=40)
    loaded = []

    def load(j):
        loaded.append(j.ident)
        return bytearray(msg if op == "seal" else sealed[:-16])
    runner = _gpu_runner(op, key)   # made for ChaCha20-Poly1305
    mixed = [job(0, "aes-gcm"), job(1, "chacha20-poly1305"), job(2, None)]
    with pytest.raises(ValueError, match=r"one algorithm.*job 1 is 'chacha20-poly1305'.*'aes-gcm'"):
        runner.start(pipeline.Batch(mixed, load=load))
    assert loaded == [] and all(not any(j.dst) for j in mixed)
    same = [job(0, "aes-gcm"), job(1, "aes-gcm")]
    results = runner.start(pipeline.Batch(same, load=load))()
    if op == "seal":
        assert [bytes(j.dst) + t for j, t in zip(same, results)] == [sealed, sealed]
    else:
        assert results == [True, True] and [bytes(j.dst) for j in same] == [msg, msg]
