"""One bulk pipeline: batches of AEAD jobs on a CPU thread pool or on the GPU, with bounded memory.

Stream files, model files and tensor batches all describe their work here, as
:class:`Job` objects (one AEAD message each) grouped into :class:`Batch` objects, and
:func:`run` keeps the machine busy. Their own modules keep only what is theirs: layout,
headers, metadata and the wording of errors.

How a batch moves (``depth`` batches run while the next one is prepared)::

    caller's thread   take batch k+1 from the iterator (it may read its input now)
                      start it on the runner
                      finish batch k-depth+1: done(batch, results), in order
    runner            CPU: the jobs split into contiguous runs of about equal bytes,
                      one run per worker; each job is load -> crypto -> store in the
                      worker, while its bytes are in cache (pread, seal in place, pwrite)
                      GPU: one seal_batch/open_batch launch for the whole batch

So a batch's buffers are free again once its ``done`` returned, and a producer that
recycles ``depth + 1`` buffers never overwrites one still in use. Reading (in the
iterator or in ``load``), sealing and writing (in ``store`` or ``done``) overlap.

Contract of the callbacks:

- ``Batch.load(job)`` runs in a worker before the job's crypto and returns the job's
  source view (it may fill ``job.dst`` and return a slice of it: in-place sealing);
- ``Batch.store(job, result)`` runs in the worker right after the crypto, and only for
  a job whose crypto succeeded (an opened job that failed is never stored: no
  unauthenticated plaintext leaves the pipeline);
- ``Batch.done(batch, results)`` runs in the caller's thread, in batch order, once all
  of the batch's jobs finished; an exception there stops the pipeline.

Errors: a job's crypto reports a failed tag as ``False`` (the caller names the job in
its own words); any other exception in a worker is raised from :func:`run` with a note
naming the job (``Job.ident``: a segment index, a tensor name). When :func:`run` raises,
every worker has stopped first, so the caller may wipe or free its buffers.
"""
from __future__ import annotations

import mmap
import os
import sys
from collections import deque
from typing import Any, Callable, Iterable, Sequence

from cryptography.exceptions import InvalidTag

#: bytes per batch: on the CPU big enough to amortise a hand-off to the workers and small
#: enough to stay in cache; on the GPU big enough to fill the device in one launch
CPU_BATCH_BYTES = 8 << 20
GPU_BATCH_BYTES = 64 << 20

__all__ = ["CPU_BATCH_BYTES", "GPU_BATCH_BYTES", "Job", "Batch", "CpuRunner", "GpuRunner",
           "DeviceTags", "run", "scratch", "seal", "seal_detached", "open_attached",
           "open_detached", "split_evenly"]


def __getattr__(name: str) -> Any:
    # concurrent.futures (and the logging it imports) loads when a pool is first made: a
    # small file's whole run is shorter than that import
    if name == "ThreadPoolExecutor":
        from concurrent.futures import ThreadPoolExecutor

        globals()[name] = ThreadPoolExecutor
        return ThreadPoolExecutor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Job:
    """One AEAD message: ``ident`` (what errors name), ``nonce``, ``aad``, ``src`` (its input
    view, or None when the batch's ``load`` provides it), ``dst`` (where its output goes),
    ``tag`` (for a detached open: the tag to check), ``size`` (input bytes, for balancing),
    and ``key``/``algorithm`` where they differ from the runner's (a :class:`GpuRunner`
    takes one algorithm per batch: it refuses a batch that mixes them)."""

    __slots__ = ("ident", "nonce", "aad", "src", "dst", "tag", "size", "key", "algorithm")

    def __init__(self, ident: Any, nonce: bytes, aad: Any, src: Any, dst: Any, *,
                 tag: Any = None, size: int | None = None, key: bytes | None = None,
                 algorithm: str | None = None):
        self.ident, self.nonce, self.aad, self.src, self.dst = ident, nonce, aad, src, dst
        self.tag, self.key, self.algorithm = tag, key, algorithm
        self.size = len(src) if size is None else size


class Batch:
    """A list of jobs run together, with the optional callbacks described in the module
    docstring. ``payload`` is the producer's own (the buffer to write, say)."""

    __slots__ = ("jobs", "load", "store", "done", "payload")

    def __init__(self, jobs: list[Job], *, load: Callable | None = None,
                 store: Callable | None = None, done: Callable | None = None,
                 payload: Any = None):
        self.jobs, self.load, self.store, self.done, self.payload = jobs, load, store, done, payload


#: below this, :func:`scratch` takes heap memory: zeroing a few pages costs less than the
#: mmap and munmap system calls (about 50 us a pair here), which a small file pays per buffer
SMALL_SCRATCH_BYTES = 64 << 10
#: from this size, :func:`scratch` asks for transparent huge pages (2 MiB on x86-64)
HUGE_SCRATCH_BYTES = 4 << 20


def scratch(nbytes: int) -> memoryview:
    """A writable buffer of ``nbytes`` that costs nothing until touched: an anonymous
    mapping, not ``bytearray`` (which zeroes every page first: a fresh multi-MiB buffer
    is filled at page-fault speed, and a batch buffer is overwritten anyway). Below
    :data:`SMALL_SCRATCH_BYTES`, a ``bytearray``."""
    if nbytes < SMALL_SCRATCH_BYTES:
        return memoryview(bytearray(nbytes))
    if not hasattr(mmap, "MAP_PRIVATE"):  # Windows: an anonymous mapping of its own kind
        return memoryview(mmap.mmap(-1, nbytes))[:nbytes]
    # Private: mmap's default for anonymous memory is MAP_SHARED, which is shared memory
    # (shmem), shared with forked children and never given huge pages here.
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if nbytes >= HUGE_SCRATCH_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
        # Where transparent huge pages are "madvise" (as on our machines), a batch buffer
        # is otherwise touched in 4 KiB page faults, 2048 per 8 MiB: measured here, 8 ms
        # of system time per 8 MiB against 1 ms in 2 MiB pages.
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return memoryview(buf)[:nbytes]


# ---------------------------------------------------------------------------- per-job crypto
# The usual job functions over one backend AEAD context (see gpucrypt.backends._base).
def seal(ctx) -> Callable[[Job, Any], None]:
    """``dst`` gets ciphertext || tag (``len(src) + 16`` bytes; ``src`` may lie at its start)."""
    return lambda job, src: ctx.seal(job.nonce, src, job.aad, job.dst)


def seal_detached(ctx) -> Callable[[Job, Any], bytes]:
    """``dst`` gets the ciphertext (in place when it is ``src``); the result is the tag."""
    return lambda job, src: ctx.seal_detached(job.nonce, memoryview(src), memoryview(job.aad),
                                              memoryview(job.dst))


def open_attached(ctx) -> Callable[[Job, Any], bool]:
    """``src`` is ciphertext || tag; ``dst`` gets the plaintext, or zeros when the tag fails."""
    def open_one(job: Job, src: Any) -> bool:
        try:
            ctx.open(job.nonce, src, job.aad, job.dst)
        except InvalidTag:
            return False
        return True
    return open_one


def open_detached(ctx) -> Callable[[Job, Any], bool]:
    """Verify ``job.tag``, then decrypt into ``dst`` (in place allowed: then a failure leaves
    ``src`` as it was)."""
    def open_one(job: Job, src: Any) -> bool:
        try:
            ctx.open_detached(job.nonce, memoryview(src), job.tag, memoryview(job.aad),
                              memoryview(job.dst))
        except InvalidTag:
            return False
        return True
    return open_one


# ---------------------------------------------------------------------------- runners
def split_evenly(jobs: Sequence[Job], parts: int) -> list[Sequence[Job]]:
    """``jobs`` cut into at most ``parts`` contiguous runs of about equal bytes."""
    if parts <= 1 or len(jobs) <= 1:
        return [jobs]
    weights = [j.size for j in jobs] if any(j.size for j in jobs) else [1] * len(jobs)
    total = sum(weights)
    runs, start, acc = [], 0, 0
    for i, weight in enumerate(weights):
        acc += weight
        if acc * parts >= total * (len(runs) + 1) and len(runs) < parts - 1:
            runs.append(jobs[start:i + 1])
            start = i + 1
    if start < len(jobs):
        runs.append(jobs[start:])
    return runs


def _run_jobs(jobs: Sequence[Job], batch: Batch, crypto: Callable) -> list:
    results = []
    load, store = batch.load, batch.store
    for job in jobs:
        try:
            src = load(job) if load is not None else job.src
            result = crypto(job, src)
            if store is not None and result is not False:
                store(job, result)
        except BaseException as exc:
            exc.add_note(f"(gpucrypt pipeline: while processing {job.ident!r})")
            raise
        results.append(result)
    return results


class _Runs:
    """The runs of one batch submitted to a pool, to be stopped as one: after ``stop()``
    no run starts any more, and it returns once none is running. For an interrupt
    (Ctrl-C) while the runs are being submitted, which may come inside ``submit`` after
    the run was queued and before its future is returned: a run no future names would
    otherwise go on writing after :func:`run` raised."""

    def __init__(self):
        import threading

        self._changed = threading.Condition()
        self._running = 0
        self._stopped = False

    def run(self, jobs: Sequence[Job], batch: Batch, crypto: Callable) -> list:
        """``_run_jobs`` in a worker, unless the batch was stopped before it started."""
        with self._changed:
            if self._stopped:
                return []
            self._running += 1
        try:
            return _run_jobs(jobs, batch, crypto)
        finally:
            with self._changed:
                self._running -= 1
                self._changed.notify_all()

    def stop(self) -> None:
        """Let no run start and wait for those running; a further interrupt while waiting
        is dropped (the caller is raising the first) and the wait goes on."""
        while True:
            try:
                with self._changed:
                    self._stopped = True
                    while self._running:
                        self._changed.wait()
                return
            except BaseException:
                continue


class CpuRunner:
    """Runs each batch's jobs on ``threads`` workers (``cryptography`` releases the GIL
    inside OpenSSL). ``crypto(job, src)`` is one of the job functions above, or the
    caller's. ``threads=0`` runs every batch in the caller's thread: for work too small
    to be worth a hand-off (a single small tensor)."""

    def __init__(self, crypto: Callable[[Job, Any], Any], threads: int):
        self.crypto = crypto
        self.threads = threads
        self._pool = sys.modules[__name__].ThreadPoolExecutor(threads) if threads >= 1 else None

    def start(self, batch: Batch) -> Callable[[], list]:
        if self._pool is None:
            results = _run_jobs(batch.jobs, batch, self.crypto)
            return lambda: results
        runs, futures = _Runs(), []
        try:
            for run_ in split_evenly(batch.jobs, self.threads):
                futures.append(self._pool.submit(runs.run, run_, batch, self.crypto))
        except BaseException:
            # Ctrl-C (or a pool shut down) between two submits: the runs queued so far, a
            # future returned for them or not, stop before this leaves (the contract: when
            # run() raises, every worker has stopped)
            runs.stop()
            raise

        def wait() -> list:
            # Every run first, then the results: when one run raised, the others must have
            # stopped before the caller goes on to free (or close) what they write to. An
            # interrupt (Ctrl-C) while waiting is raised once they have.
            interrupted = None
            for f in futures:
                while True:
                    try:
                        f.exception()
                        break
                    except Exception:  # cancelled
                        break
                    except BaseException as exc:  # KeyboardInterrupt: keep waiting, then raise
                        interrupted = interrupted or exc
            if interrupted is not None:
                raise interrupted
            return [r for f in futures for r in f.result()]
        return wait

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "CpuRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Staging:
    """One turn of a :class:`GpuRunner`'s reused buffers: pinned host memory for a batch's
    upload and download, the device buffer they go to and from, and the mark after the
    last work that used them (waited for before they are refilled)."""

    __slots__ = ("host", "device", "done", "busy")

    def __init__(self):
        self.host = self.device = self.done = None
        self.busy = False  # a started batch's results are still in ``host``, not scattered yet


def _same_start(a: Any, b: Any) -> bool:
    """Whether two host buffers start at the same address (an in-place job's source and
    destination)."""
    from ._buffers import address

    return address(memoryview(a).cast("B")) == address(memoryview(b).cast("B"))


def _layout(views: dict, start: int) -> tuple[dict, int]:
    """Each view's (start, end) back to back from ``start``, and where they end."""
    bounds, cursor = {}, start
    for i, view in views.items():
        n = memoryview(view).nbytes
        bounds[i] = (cursor, cursor + n)
        cursor += n
    return bounds, cursor


class GpuRunner:
    """Runs each batch as one ``seal_batch`` or ``open_batch`` launch of the GPU backend.

    A job's ``src``/``dst`` may be device views (used where they are) or host buffers:
    host sources are packed into pinned staging and uploaded in one copy, host
    destinations come back in one copy (in place in the staged sources, or apart after
    them) and are scattered to the jobs that succeeded (a failed open's bytes never
    leave the device). ``op``: "seal" (results: per job its 16 tag bytes; with
    ``host_tags=False`` a :class:`DeviceTags` that leaves them on the device until asked)
    or "open" (results: one bool per job; ``job.tag`` holds the tag as bytes, or
    ``batch.payload`` is a :class:`DeviceTags` of the whole batch). ``stream`` is the
    launch stream (None: one of the runner's own); ``device`` the CUDA device whose
    context all of it runs in (None: the current one), that of the batch's device memory
    and of ``stream``.

    Overlap: uploads and downloads run on a copy stream of the runner's own, the
    launches on the launch stream, ordered by events (device-side waits). ``start``
    reads the batch's input (``load``), queues its upload, launches and download, and
    returns; the function it returns waits for the download, scatters it, calls
    ``store`` and gives the results. So while batch k's launches run, batch k+1 is read
    and uploaded, and batch k-1 comes back. The staging buffers are reused: ``depth + 1``
    turns, as :func:`run` keeps at most ``depth`` batches started and not finished
    (a turn's buffers are free again when it comes round). "open" waits in ``start`` for
    its verdicts (they decide what comes back).
    """

    def __init__(self, gpu, op: str, algorithm: str, key: bytes | None = None, *,
                 stream: Any = None, host_tags: bool = True, device: int | None = None,
                 depth: int = 2):
        self.gpu, self.op, self.algorithm, self.key = gpu, op, algorithm, key
        self.stream, self.host_tags, self.device = stream, host_tags, device
        self._turns = [_Staging() for _ in range(max(1, depth) + 1)]
        self._turn = 0
        self._copy = None

    @staticmethod
    def _on_device(view: Any) -> bool:
        """Device memory (numba, CuPy, torch CUDA) says so through its CUDA array
        interface, and has no host buffer; a host buffer is staged. (Under numba's
        simulator the backend's device arrays may be NumPy arrays: staged again, the
        same bytes.)"""
        if hasattr(view, "__cuda_array_interface__"):
            return True
        try:
            memoryview(view)
        except TypeError:
            return True
        return False

    def start(self, batch: Batch) -> Callable[[], list]:
        with self.gpu.device(self.device):
            finish = self._start(batch)

        def wait() -> list:
            with self.gpu.device(self.device):
                return finish()
        return wait

    def _streams(self) -> tuple[Any, Any]:
        """(copy stream, launch stream), made on first use in the device's context. The
        runner's own streams are blocking ones: ordered after the legacy default stream,
        where a caller's device inputs may have been written."""
        if self._copy is None:
            self._copy = self.gpu.new_stream()
            if self.stream is None:
                self.stream = self.gpu.new_stream()
        return self._copy, self.stream

    def _algorithm_of(self, jobs: Sequence[Job]) -> str | None:
        """The one algorithm of a batch's jobs (each job's own, or the runner's).

        A batch is one launch, and a launch is one algorithm, so a mixed batch is refused
        rather than split here: split, a seal would give one device tag array per
        algorithm where the batch's :class:`DeviceTags` is one, and an open given such a
        ``DeviceTags`` as payload would need its rows picked apart. (Run one batch per
        algorithm, as the tensor API does.)"""
        algorithm = self.algorithm
        for i, job in enumerate(jobs):
            own = job.algorithm or self.algorithm
            if i == 0:
                algorithm = own
            elif own != algorithm:
                raise ValueError(
                    f"a GPU batch runs one algorithm, but job {job.ident!r} is {own!r} and job "
                    f"{jobs[0].ident!r} {algorithm!r}; put the jobs of each algorithm in "
                    f"batches of their own")
        return algorithm

    def _staging(self, nbytes: int) -> _Staging:
        """The next turn's buffers, at least ``nbytes`` each, once its last use is done.
        A turn whose batch has not been finished yet (more batches in flight than the
        ``depth`` this runner was made for) is skipped for a new one: reused, it would
        hand that batch this one's bytes."""
        turn = self._turns[self._turn]
        if turn.busy:
            turn = _Staging()
            self._turns.insert(self._turn, turn)
        self._turn = (self._turn + 1) % len(self._turns)
        if turn.done is not None:
            turn.done.synchronize()   # a batch already finished: normally long done
            turn.done = None
        if turn.host is None or turn.host.size < nbytes:
            size = max(nbytes, 1 << 16)
            turn.host = self.gpu.pinned(size)
            turn.device = self.gpu.device_array(size, stream=self.stream)
        return turn

    def _start(self, batch: Batch) -> Callable[[], list]:
        import numpy as np

        gpu, jobs = self.gpu, batch.jobs
        algorithm = self._algorithm_of(jobs)   # before anything is read, staged or launched
        copy, launch = self._streams()
        srcs = [batch.load(j) if batch.load is not None else j.src for j in jobs]
        # Host sources go up in one copy, and host destinations come back in one copy:
        # in place in the staged sources, or in the room after them for the rest.
        host_in = {i: src for i, src in enumerate(srcs) if not self._on_device(src)}
        host_out = [i for i, j in enumerate(jobs) if not self._on_device(j.dst)]
        in_bounds, in_end = _layout(host_in, 0)
        out_bounds, end = _layout({i: jobs[i].dst for i in host_out if i not in host_in}, in_end)
        # a turn for any host buffer, empty ones too: they take (empty) views of its device buffer
        turn = self._staging(end) if host_in or host_out else None
        if in_end:
            for i, (a, b) in in_bounds.items():
                turn.host[a:b] = np.frombuffer(memoryview(host_in[i]).cast("B"), dtype=np.uint8)
            gpu.wait_for(copy, launch)   # the device buffer: after the launches that used it
            gpu.copy_to_device(turn.device[:in_end], turn.host[:in_end], copy)
            gpu.wait_for(launch, copy)   # the launches: after the upload
        dsts = []
        for i, job in enumerate(jobs):
            if i in in_bounds:
                srcs[i] = gpu.byte_range(turn.device, *in_bounds[i])
            if i in host_out:
                a, b = in_bounds[i] if i in in_bounds else out_bounds[i]
                dsts.append(gpu.byte_range(turn.device, a, b))
            else:
                dsts.append(job.dst)
        keys = [self.key if j.key is None else j.key for j in jobs]
        nonces, aads = [j.nonce for j in jobs], [j.aad for j in jobs]
        if self.op == "seal":
            tags = gpu.seal_batch(algorithm, keys, nonces, srcs, aads, dsts, stream=launch)
            ok = [True] * len(jobs)
        else:
            tags = batch.payload.device if isinstance(batch.payload, DeviceTags) \
                else [j.tag for j in jobs]
            ok = [bool(v) for v in np.asarray(
                gpu.open_batch(algorithm, keys, nonces, srcs, tags, aads, dsts,
                               stream=launch), dtype=bool).reshape(-1)]
        back = [i for i in host_out if ok[i]] if end else []   # (empty destinations: nothing to copy)
        # a failed open's host destination apart from its source gets zeros, as on the CPU
        # (what it held before, an earlier batch's plaintext say, must not read as this one's)
        wiped = [i for i in host_out if not ok[i] and not (i in host_in and _same_start(host_in[i], jobs[i].dst))]
        if back:
            gpu.wait_for(copy, launch)
            gpu.copy_to_host(turn.host[:end], turn.device[:end], copy)
            if self.op == "open":  # plaintext: not left in the device buffer (one memset)
                gpu._memset(turn.device[:end], copy)
            turn.done = gpu.mark(copy)
        elif turn is not None:
            turn.done = gpu.mark(launch)
        done = turn.done if back else None
        if back:
            turn.busy = True
        for i in wiped:
            np.frombuffer(memoryview(jobs[i].dst).cast("B"), dtype=np.uint8)[:] = 0
        finished: list = []

        def finish() -> list:
            if done is not None:
                try:
                    done.synchronize()
                    if finished:  # called again after a failure (run's clean-up): the device
                        return finished[0]  # is done, the bytes are where they were put
                    for i in back:
                        a, b = in_bounds[i] if i in in_bounds else out_bounds[i]
                        np.frombuffer(memoryview(jobs[i].dst).cast("B"), dtype=np.uint8)[:] = turn.host[a:b]
                finally:  # scattered, or failed: either way no batch waits in the turn now
                    if self.op == "open":  # plaintext: not left in the pinned buffer either
                        turn.host[:end] = 0
                    turn.busy = False
            elif finished:
                return finished[0]
            results: list = ok
            if self.op == "seal":
                results = DeviceTags(tags, len(jobs), gpu, launch, self.device)
                if self.host_tags:
                    results = [results.row(i) for i in range(len(jobs))]
            finished.append(results)
            if batch.store is not None:
                for i, job in enumerate(jobs):
                    if ok[i]:  # a seal's tag as bytes, from the host copy or the device's
                        batch.store(job, results.row(i) if isinstance(results, DeviceTags) else results[i])
            return results
        return finish

    def close(self) -> None:
        pass

    def __enter__(self) -> "GpuRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DeviceTags(list):
    """A seal batch's tags: the ``uint8[n, 16]`` device array (``device``), copied to the
    host once, on the stream that made them (in the context of the CUDA device
    ``index``), the first time a row is asked for (``row(i)``: 16 bytes)."""

    def __init__(self, device: Any, n: int, gpu, stream: Any = None, index: int | None = None):
        super().__init__([None] * n)
        self.device, self._gpu, self._stream, self._host = device, gpu, stream, None
        self._index = index

    def row(self, i: int) -> bytes:
        if self._host is None:
            import numpy as np

            with self._gpu.device(self._index):
                self._host = np.asarray(self._gpu.to_host(self.device, stream=self._stream)
                                        ).reshape(-1, 16)
        return bytes(self._host[i].tobytes())


# ---------------------------------------------------------------------------- the loop
def run(batches: Iterable[Batch], runner, *, depth: int = 2) -> None:
    """Run every batch of ``batches`` on ``runner``, at most ``depth`` started and not yet
    finished while the next is taken from the iterator; each batch's ``done`` is called in
    order. See the module docstring for the callbacks' contract."""
    in_flight: deque = deque()
    batches = iter(batches)
    started = None  # a batch started and not yet in in_flight (Ctrl-C came in between)
    try:
        while True:
            try:
                batch = next(batches)
                started = runner.start(batch)
            except StopIteration:
                break
            except Exception:
                # The producer found a problem (a cut file, say), or a batch run in this
                # thread failed: the batches before it finish first, so that an earlier
                # failure is the one reported.
                while in_flight:
                    _finish_oldest(in_flight)
                raise
            in_flight.append((batch, started))
            started = None
            while len(in_flight) > depth:
                _finish_oldest(in_flight)
        while in_flight:
            _finish_oldest(in_flight)
    finally:
        # stop the workers before the caller's buffers go away: those of every batch in
        # flight, and of one started that an interrupt kept out of in_flight
        if started is not None and all(wait is not started for _, wait in in_flight):
            _wait_quietly(started)
        while in_flight:
            _wait_quietly(in_flight.popleft()[1])


def _wait_quietly(wait: Callable[[], list]) -> None:
    """``wait()`` for a batch's clean-up, its error dropped (another is being raised)."""
    try:
        wait()
    except BaseException:
        pass


def _finish_oldest(in_flight: deque) -> None:
    """Wait for the oldest batch and call its ``done``; it leaves ``in_flight`` only once
    its workers are known to have stopped (a failed wait is waited for again, fully)."""
    batch, wait = in_flight[0]
    results = wait()
    in_flight.popleft()
    if batch.done is not None:
        batch.done(batch, results)


def cpu_threads(threads: Any) -> int:
    """``threads`` checked (None: the usable cores)."""
    from .backends.cpu import check_threads

    return check_threads(threads)


def pwrite_all(fd: int, data: Any, offset: int) -> None:
    """Write every byte of ``data`` at ``offset`` of ``fd`` (no shared file position)."""
    view, done = memoryview(data).cast("B"), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
