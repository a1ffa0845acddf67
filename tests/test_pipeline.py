"""gpucrypt.pipeline: ordering, overlap, failures and buffer bounds of the one bulk pipeline."""
from __future__ import annotations

import io
import os
import threading
import time

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
