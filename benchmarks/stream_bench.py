"""Segmented encryption (gpucrypt.stream) against one-thread ``cryptography``, in one run.

Issue 7's CPU target: on 2 cores, segmented ChaCha20-Poly1305 encryption of 1 GiB held
in memory runs at >= 1.7x single-threaded ``cryptography``. Every round times, in
turn (interleaved, so that a noisy neighbour hurts all rows alike):

- ``cryptography 1 call``: ``ChaCha20Poly1305.encrypt_into`` over the whole buffer on
  preallocated output (the best one thread can do);
- ``cryptography 1 MiB x N``: the same data as 1 MiB messages, one after another;
- ``cryptography T threads``: the buffer cut in T parts, one ``encrypt_into`` per
  thread: what these cores can do at best, the ceiling for any T-thread scheme (on a
  VM whose two vCPUs share a physical core this is far below Tx);
- ``gpucrypt.stream threads=T``: ``stream.encrypt`` from the in-memory buffer (read in
  place) to a sink that drops the bytes (so no copy of the output is timed), for
  T = 1 and every core;
- the same for ``stream.decrypt`` of that ciphertext, ``threads=`` every core.

With ``--model DIR``, a second table puts side by side the three rates of loading an
encrypted model file of ``--size`` bytes (300 tensors) written in DIR: reading the
file into memory (``readinto``; the page cache is warm after the first round, so this
is the memory copy rate, an upper bound for the disk), decrypting it in memory
(``gpucrypt.stream`` rate above, the same segments), and ``models.load_encrypted``
from the file, on the CPU and, where a real GPU is usable, onto it (``device="cuda"``,
torch tensors) next to a pinned host-to-device copy of the same bytes. Loading is
"limited by the disk or PCIe" when its rate is close to the read (or copy) rate.

Usage::

    python benchmarks/stream_bench.py [--size 1GiB] [--rounds 5] [--model DIR] [--json out.json]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import threading
import time

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from gpucrypt import stream
from gpucrypt.bench import _cpu_model, _git_commit
from gpucrypt.cli._common import parse_size

KEY = bytes(range(32))


class _Drop(io.RawIOBase):
    """A writable binary sink that keeps nothing (counts what it was given)."""

    def __init__(self):
        self.count = 0

    def writable(self):
        return True

    def write(self, b):
        n = memoryview(b).nbytes
        self.count += n
        return n


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cells(size: int, cores: int):
    data = memoryview(bytearray(os.urandom(1 << 20)) * (size >> 20))
    out = bytearray(size + 16)
    aead = ChaCha20Poly1305(KEY)
    nonce = bytes(12)
    ct = io.BytesIO()
    stream.encrypt(data, ct, KEY, threads=cores, device="cpu")
    ct = ct.getbuffer()
    back = io.BytesIO()  # before timing: what is timed decrypts back (through threads=1)
    stream.decrypt(ct, back, KEY, threads=1, device="cpu")
    if back.getbuffer() != data:
        raise SystemExit("gpucrypt.stream does not decrypt its own output back")
    seg = 1 << 20

    def one_call():
        aead.encrypt_into(nonce, data, None, out)

    def one_mib_messages():
        view = memoryview(out)
        for i in range(0, size, seg):
            aead.encrypt_into(nonce, data[i:i + seg], None, view[i:i + seg + 16])

    def threads_ceiling():
        part = size // cores
        workers = [threading.Thread(target=aead.encrypt_into, args=(
            nonce, data[i * part:(i + 1) * part], None, outs[i])) for i in range(cores)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    outs = [bytearray(size // cores + 16) for _ in range(cores)]

    def stream_encrypt(threads):
        # the timed call, once into memory first: its file must decrypt to the data (a
        # fresh salt per call: each call's file is its own, so it is checked, not compared)
        sealed, again = io.BytesIO(), io.BytesIO()
        stream.encrypt(data, sealed, KEY, threads=threads, device="cpu")
        stream.decrypt(sealed.getbuffer(), again, KEY, threads=1, device="cpu")
        if again.getbuffer() != data:
            raise SystemExit(f"gpucrypt.stream encrypt threads={threads}: its file does not "
                             f"decrypt to the data: not timed")
        return lambda: stream.encrypt(data, _Drop(), KEY, threads=threads, device="cpu")

    opened = io.BytesIO()  # the timed decrypt, once into memory first
    stream.decrypt(ct, opened, KEY, threads=cores, device="cpu")
    if opened.getbuffer() != data:
        raise SystemExit(f"gpucrypt.stream decrypt threads={cores} does not give the data back: "
                         f"not timed")

    cells = {"cryptography 1 call": one_call, "cryptography 1 MiB x N": one_mib_messages,
             "gpucrypt.stream encrypt threads=1": stream_encrypt(1)}
    if cores > 1:
        cells[f"cryptography {cores} threads (ceiling)"] = threads_ceiling
        cells[f"gpucrypt.stream encrypt threads={cores}"] = stream_encrypt(cores)
    cells[f"gpucrypt.stream decrypt threads={cores}"] = \
        lambda: stream.decrypt(ct, _Drop(), KEY, threads=cores, device="cpu")
    return cells


def _model_cells(size: int, folder: str, cores: int):
    """Cells for loading a model file of ``size`` bytes (300 tensors) written in ``folder``."""
    import numpy as np

    from gpucrypt import models
    from gpucrypt.backends import BackendUnavailable, get_backend

    per = size // 300
    tensors = {f"layer{i}.weight": np.frombuffer(os.urandom(per), dtype=np.uint8)
               for i in range(300)}
    path = os.path.join(folder, "stream_bench_model.gcsafetensors")
    models.save_encrypted(tensors, path, KEY, device="cpu")
    target = np.empty(os.path.getsize(path), dtype=np.uint8)

    def read_file():
        with open(path, "rb", buffering=0) as f:
            view, got = memoryview(target), 0
            while got < len(view):
                got += f.readinto(view[got:])

    loaded = models.load_encrypted(path, KEY, "cpu", framework="numpy", threads=cores)
    if list(loaded) != list(tensors) or any(not np.array_equal(loaded[name], x)
                                            for name, x in tensors.items()):
        raise SystemExit("load_encrypted does not give the saved tensors back: not timed")
    del loaded
    cells = {"read the file (readinto)": read_file,
             f"load_encrypted cpu threads={cores}":
                 lambda: models.load_encrypted(path, KEY, "cpu", framework="numpy", threads=cores)}
    try:
        gpu = get_backend("gpu")
        real_gpu = not gpu.describe().get("simulator")
    except BackendUnavailable:
        real_gpu = False
    if real_gpu:
        import torch

        pinned = torch.empty(len(target), dtype=torch.uint8, pin_memory=True)
        device_copy = torch.empty(len(target), dtype=torch.uint8, device="cuda")

        def copy_to_gpu():
            device_copy.copy_(pinned, non_blocking=True)
            torch.cuda.synchronize()

        def load_to_gpu():
            models.load_encrypted(path, KEY, "cuda")
            torch.cuda.synchronize()

        on_gpu = models.load_encrypted(path, KEY, "cuda")  # checked once, as timed
        if any(not np.array_equal(on_gpu[name].cpu().numpy(), x) for name, x in tensors.items()):
            raise SystemExit("load_encrypted to the GPU does not give the saved tensors back: "
                             "not timed")
        del on_gpu

        cells["pinned host-to-device copy"] = copy_to_gpu
        cells["load_encrypted cuda (torch)"] = load_to_gpu
    return cells, path


def _run(cells: dict, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in cells}
    for _ in range(rounds):
        for name, run in cells.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def _table(title: str, times: dict, size: int, base_name: str) -> list[dict]:
    base = statistics.median(times[base_name])
    print(title)
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"name": name, "median_s": med, "gb_per_s": size / med / 1e9,
                     "ratio": base / med, "times_s": ts})
        print(f"  {name:40s} {size / med / 1e9:7.2f} GB/s  x{base / med:.2f}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", metavar="DIR", help="also time loading a model file "
                        "written in DIR (removed afterwards)")
    parser.add_argument("--json", help="write the run here")
    args = parser.parse_args(argv)
    if args.size % (1 << 20):
        parser.error("--size must be a whole number of MiB")
    cores = _cores()
    times = _run(_cells(args.size, cores), args.rounds)
    rows = _table(f"ChaCha20-Poly1305, {args.size / 2**30:g} GiB in memory, {cores} cores, "
                  f"median of {args.rounds} interleaved rounds", times, args.size,
                  "cryptography 1 call")
    model_rows = None
    if args.model:
        cells, path = _model_cells(args.size, args.model, cores)
        try:
            model_rows = _table(f"loading a {args.size / 2**30:g} GiB model file (300 tensors); "
                                f"ratio to reading the file", _run(cells, args.rounds),
                                args.size, "read the file (readinto)")
        finally:
            os.remove(path)
    if args.json:
        import cryptography

        commit = _git_commit()  # with -dirty, as gpucrypt bench
        record = {"benchmark": "stream_bench", "size": args.size, "rounds": args.rounds,
                  "cores": cores, "cpu": _cpu_model(), "model_rows": model_rows,
                  "python": sys.version.split()[0], "cryptography": cryptography.__version__,
                  "commit": commit, "load_average": os.getloadavg(), "rows": rows}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
