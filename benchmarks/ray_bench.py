"""Ray Data throughput of gpucrypt.ray with 1 and 2 CPU actors, and the per-file overhead of
small files, in one run on one local cluster (``ray.init(num_cpus=--cpus)``).

- **Dataset throughput.** An in-memory dataset of ``--rows`` rows of ``--row-size`` random
  bytes (one row per block, materialized in the object store once) is encrypted by
  ``map_batches(EncryptBatch, compute=ActorPoolStrategy(size=k))`` for k = 1 and 2, the
  output materialized. Starting actors takes seconds, and more on a loaded machine, so
  each batch records when its actor began and finished it, and the rate is the bytes over
  the span from the first batch's start to the last batch's end: actor start-up is
  excluded, Ray Data's hand-offs between batches are not. Rounds are interleaved (k = 1,
  then 2) so that a noisy neighbour hurts both alike; medians. The batches are
  ``gray.BATCH_FORMAT`` ones, as ``encrypt_files`` asks for. Within each span the CPU
  seconds of the cluster's processes are sampled (psutil, every 0.25 s) and summed by kind: the
  actors, the driver, the raylet, the GCS, Ray's Python services, Ray's other workers and
  the rest of the machine. With 2 CPUs, what is not the actors' is what caps the scaling.
- **Ray Data alone**, in the same rounds: the same jobs with ``CopyBatch`` (each row copied,
  no cipher) in place of ``EncryptBatch``: what Ray's hand-offs allow, and how they scale.
- **Per-file overhead, in one process** (what an actor pays per row), for ``--small``-byte
  files: ``cryptography``'s ``ChaCha20Poly1305.encrypt`` of the bytes (the floor), a raw-key
  ``stream.encrypt`` into memory (header, key derivation, one segment), ``EncryptBatch``
  (plus a fresh data key and its envelope per file) and ``DecryptBatch``; microseconds per
  file, medians.
- **Per-file overhead on the cluster**: ``--files`` small files encrypted by 2 actors: the
  same span, divided by the number of files.

The machine's 1-minute load average is recorded at the start and the end: above the core
count, other processes shared the CPUs and every figure is a lower bound.

Usage::

    python benchmarks/ray_bench.py [--rows 32] [--row-size 4MiB] [--rounds 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa

from gpucrypt.bench import _cpu_model
from gpucrypt.cli._common import parse_size


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _per_file_in_process(size: int, files: int, keyset: str, repeat: int) -> list[dict]:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    from gpucrypt import ray as gray
    from gpucrypt.files import stream as file_stream

    rng = np.random.default_rng(1)
    blobs = [rng.bytes(size) for _ in range(files)]
    # the batch as the actors get it (gray.BATCH_FORMAT)
    batch = pa.table({"path": [f"f{i}" for i in range(files)], "bytes": pa.array(blobs, pa.binary())})
    aead, nonce, key = ChaCha20Poly1305(bytes(32)), bytes(12), bytes(range(32))
    encrypt, decrypt = gray.EncryptBatch(keyset=keyset), gray.DecryptBatch(keyset=keyset)
    sealed = encrypt(batch)

    def raw_stream():
        for b in blobs:
            file_stream.encrypt(b, io.BytesIO(), key, device="cpu")

    cases = {"cryptography ChaCha20Poly1305.encrypt": lambda: [aead.encrypt(nonce, b, None) for b in blobs],
             "stream.encrypt, raw key": raw_stream,
             "EncryptBatch (data key + envelope per file)": lambda: encrypt(batch),
             "DecryptBatch": lambda: decrypt(sealed)}
    times = {name: [] for name in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            times[name].append(_timed(fn))
    return [{"name": name, "us_per_file": statistics.median(t) / files * 1e6} for name, t in times.items()]


class CpuSampler:
    """CPU seconds (user + system) sampled every ``period`` seconds in a thread, by kind:
    the actors (Ray Data's ``MapWorker`` processes), Ray's other workers, the raylet, the
    GCS, Ray's Python services (dashboard agent, monitors), this driver (the sampler's own
    reads included: about 2 ms a sample), and the rest of the machine (all its busy CPU
    time less those: other users). Only this process and its descendants (the local
    cluster) are read one by one. ``between(a, b)`` gives each kind's CPU seconds between
    two wall-clock times (the nearest samples)."""

    def __init__(self, period: float = 0.25):
        import threading

        import psutil  # installed with the test extra (gpucrypt[hf] brings it)

        self._psutil, self.period, self.samples = psutil, period, []
        self._me = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _kind(self, proc) -> str:
        if proc.pid == os.getpid():
            return "driver"
        name = proc.name()
        if name.startswith("ray::"):
            if "MapWorker" in name:
                return "actors"
            if name in ("ray::DashboardAgent", "ray::RuntimeEnvAgent"):
                return "ray services"
            return "other ray workers"
        if name in ("raylet", "gcs_server"):
            return name
        return "ray services"

    def _sample(self) -> dict:
        """{pid: (kind, CPU seconds so far)}, and the machine's busy CPU seconds under -1."""
        now = {}
        for proc in [self._me, *self._me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
                now[proc.pid] = (self._kind(proc), times.user + times.system)
            except (self._psutil.Error, OSError):
                continue
        machine = self._psutil.cpu_times()
        now[-1] = ("rest of machine", sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
                   - getattr(machine, "guest", 0.0) - getattr(machine, "guest_nice", 0.0))
        return now

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), self._sample()))
            self._stop.wait(self.period)

    def between(self, start: float, end: float) -> dict:
        """CPU seconds by kind (the kind at ``end``: an idle worker may become an actor);
        a process that started in between counts from its first sample, one that exited
        is left out."""
        def nearest(t):
            return min(self.samples, key=lambda s: abs(s[0] - t))[1]
        a, b = nearest(start), nearest(end)
        first = {}
        for _, sample in self.samples:
            for pid, (_, used) in sample.items():
                first.setdefault(pid, used)
        totals: dict = {}
        for pid, (kind, used) in b.items():
            totals[kind] = totals.get(kind, 0.0) + used - a.get(pid, (kind, first[pid]))[1]
        # the machine's busy time, less what the cluster's processes used
        totals["rest of machine"] -= sum(v for k, v in totals.items() if k != "rest of machine")
        return {k: round(v, 3) for k, v in sorted(totals.items())}

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class CopyBatch:
    """Ray Data's own ceiling: each row's bytes copied into a new buffer (the memory traffic
    of EncryptBatch's output), no cipher and no keys; the same batches and hand-offs."""

    def __init__(self, keys=None, column: str = "bytes"):
        self.column = column

    def __call__(self, batch):
        col = batch.column(self.column).combine_chunks()
        _, offsets, data = col.buffers()
        copied = pa.py_buffer(np.frombuffer(data, np.uint8).copy())
        values = pa.Array.from_buffers(col.type, len(col), [None, offsets, copied], offset=col.offset)
        return batch.set_column(batch.schema.get_field_index(self.column), self.column, values)


def _job(ray, gray, ds, actors: int, keys, base=None) -> tuple[float, float]:
    """Encrypt ``ds`` with ``actors`` actors, as :func:`gpucrypt.ray.encrypt_files` does
    (its batch format), or run ``base`` (CopyBatch) instead; the wall-clock times of the
    first batch's start and the last batch's end (actor start-up excluded)."""
    import time as _time

    class TimedEncrypt(base or gray.EncryptBatch):
        def __call__(self, batch):
            start = _time.time()
            out = super().__call__(batch)
            count = len(out)
            out = out.append_column("started", pa.array(np.full(count, start)))
            return out.append_column("finished", pa.array(np.full(count, _time.time())))

    # The output is materialized in the object store, and its times read afterwards: a
    # select_columns stage would run as tasks of its own, in the CPU a single actor leaves
    # free (during the span) but not in one that two actors hold (after it).
    done = ds.map_batches(TimedEncrypt, fn_constructor_kwargs={"keys": keys},
                          compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=1,
                          batch_size=None, batch_format=gray.BATCH_FORMAT).materialize()
    times = done.select_columns(["started", "finished"]).take_all()
    del done
    return min(r["started"] for r in times), max(r["finished"] for r in times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--row-size", type=parse_size, default=parse_size("4MiB"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", type=parse_size, default=parse_size("1KiB"))
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.data

    from gpucrypt import ray as gray
    from gpucrypt.keys import Keyset
    from gpucrypt.keys.portable import KeyReferences

    load_start = os.getloadavg()
    folder = tempfile.mkdtemp(prefix="ray-bench-")
    keyset = os.path.join(folder, "keyset.json")
    Keyset.generate().save(keyset)
    keys = KeyReferences(keyset=keyset)

    per_file = _per_file_in_process(args.small, 500, keyset, repeat=5)
    print("per file, in one process:", *(f"{r['name']}: {r['us_per_file']:.1f} us" for r in per_file),
          sep="\n  ", flush=True)

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    rng = np.random.default_rng(2)
    big = ray.data.from_items([{"bytes": rng.bytes(args.row_size)} for _ in range(args.rows)],
                              override_num_blocks=args.rows).materialize()
    small = ray.data.from_items([{"bytes": rng.bytes(args.small)} for _ in range(args.files)],
                                override_num_blocks=max(2, args.files // 100)).materialize()

    samples = {1: [], 2: []}
    ceiling = {1: [], 2: []}
    small_samples = []
    sampler = CpuSampler()
    for r in range(args.rounds):
        for k in (1, 2):
            start, end = _job(ray, gray, big, k, keys)
            span = end - start
            rate = args.rows * args.row_size / span / 1e9
            cpu = sampler.between(start, end)
            samples[k].append({"span_s": span, "gb_per_s": rate, "cpu_s_in_span": cpu})
            print(f"round {r}: {k} actor(s): {span:.2f} s, {rate:.3f} GB/s; CPU s in the span: "
                  f"{cpu}", flush=True)
        for k in (1, 2):
            start, end = _job(ray, gray, big, k, keys, base=CopyBatch)
            span = end - start
            rate = args.rows * args.row_size / span / 1e9
            ceiling[k].append({"span_s": span, "gb_per_s": rate,
                               "cpu_s_in_span": sampler.between(start, end)})
            print(f"round {r}: {k} actor(s), Ray alone (CopyBatch): {span:.2f} s, {rate:.3f} GB/s",
                  flush=True)
        start, end = _job(ray, gray, small, 2, keys)
        span = end - start
        small_samples.append({"span_s": span, "us_per_file": span / args.files * 1e6,
                              "cpu_s_in_span": sampler.between(start, end)})
        print(f"round {r}: {args.files} small files, 2 actors: {span:.2f} s", flush=True)
    sampler.close()
    ray.shutdown()
    load_end = os.getloadavg()

    rates = {k: statistics.median(s["gb_per_s"] for s in samples[k]) for k in (1, 2)}
    doc = {
        "benchmark": "ray_bench",
        "environment": {"date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                        "cpu": _cpu_model(), "nproc": os.cpu_count(), "python": platform.python_version(),
                        "ray": ray.__version__, "commit": _commit()},
        "config": {"rows": args.rows, "row_size": args.row_size, "rounds": args.rounds,
                   "cluster_cpus": args.cpus, "small": args.small, "files": args.files},
        "load_average_start": load_start, "load_average_end": load_end,
        "throughput": [{"actors": k, "gb_per_s": rates[k], "samples": samples[k]} for k in (1, 2)],
        "scaling_2_over_1": rates[2] / rates[1],
        "ray_alone": [{"actors": k, "gb_per_s": statistics.median(s["gb_per_s"] for s in ceiling[k]),
                       "samples": ceiling[k]} for k in (1, 2)],
        "per_file_in_process": per_file,
        "per_file_on_cluster": {"actors": 2, "files": args.files,
                                "us_per_file": statistics.median(s["us_per_file"] for s in small_samples),
                                "samples": small_samples},
    }
    print(f"throughput: 1 actor {rates[1]:.3f} GB/s, 2 actors {rates[2]:.3f} GB/s "
          f"(x{doc['scaling_2_over_1']:.2f}); per small file on the cluster "
          f"{doc['per_file_on_cluster']['us_per_file']:.0f} us; load average "
          f"{load_start[0]:.2f} -> {load_end[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


def _commit() -> str:
    from gpucrypt.bench import _git_commit  # with -dirty, as gpucrypt bench

    return _git_commit() or ""


if __name__ == "__main__":
    sys.exit(main())
