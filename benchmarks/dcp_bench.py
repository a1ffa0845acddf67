"""Encrypted DCP checkpoints (gpucrypt.distributed) against plain DCP, in one run.

Issue 16's target: on this machine, 2 ranks, a state dict of a few hundred MiB:
encrypted save and load within 1.15x of plain ``torch.distributed.checkpoint`` on the
same state dict. Two real gloo ranks (``torch.multiprocessing``) hold a state dict of
``--tensors`` float32 DTensors sharded along dim 0 (``--size`` bytes in all, half per
rank). Every round times, in turn (interleaved, so that a noisy neighbour hurts all
rows alike; the order rotates from round to round; a first round warms up and is not
counted):

- ``plain DCP``: ``FileSystemWriter`` / ``FileSystemReader``, DCP's defaults (one file
  per rank, fsync);
- ``EncryptedWriter/Reader <algorithm>``: gpucrypt's storage pair, keyset-wrapped data
  keys, for ChaCha20-Poly1305 (the default) and AES-256-GCM;
- ``EncryptionExtension``: DCP's stock writer and reader with gpucrypt's stream transform;
- ``plain DCP (again)``: plain DCP once more, in its own folder: its ratio to the first
  is the noise of the run (on a shared machine, far from x1.00).

Besides the wall time, each op's CPU time (``time.process_time``, every thread of the
process, summed over the ranks) is recorded: on a machine shared with other work it
shows what the encryption adds, which wall times there mostly do not.

A save or load is timed on every rank between two barriers; the slower rank's time
counts. Loads go into a preallocated state dict (zeros), as training restarts do, and
are checked against the saved tensors after the timed rounds. Each variant writes its
own folder under ``--dir`` (default: a fresh folder in /tmp, on disk; the page cache is
warm for the loads). Ratio = variant / plain DCP, medians of the rounds.

Usage::

    python benchmarks/dcp_bench.py [--size 256MiB] [--tensors 32] [--rounds 7]
                                   [--dir DIR] [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings

TARGET = 1.15
VARIANTS = ("plain DCP", "EncryptedWriter/Reader chacha20-poly1305",
            "EncryptedWriter/Reader aes-256-gcm", "EncryptionExtension chacha20-poly1305",
            "plain DCP (again)")


def _storage(variant: str, folder: str, keyset, op: str):
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    from gpucrypt.distributed import EncryptedReader, EncryptedWriter, EncryptionExtension

    if variant.startswith("plain DCP"):
        return FileSystemWriter(folder) if op == "save" else FileSystemReader(folder)
    if variant.startswith("EncryptionExtension"):
        ext = EncryptionExtension(keyset=keyset)
        return FileSystemWriter(folder, _extensions=[ext]) if op == "save" else \
            FileSystemReader(folder, _extension_registry=ext.registry())
    algorithm = variant.rsplit(" ", 1)[1]
    return EncryptedWriter(folder, keyset=keyset, algorithm=algorithm) if op == "save" else \
        EncryptedReader(folder, keyset=keyset, device="cpu")


def _rank(rank: int, world: int, work: str, size: int, tensors: int, rounds: int) -> None:
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from gpucrypt import keys

    dist.init_process_group("gloo", init_method=f"file://{work}/rendezvous", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=600))
    mesh = init_device_mesh("cpu", (world,))
    keyset = keys.Keyset.load(os.path.join(work, "keyset.json"))
    rows = size // tensors // 4 // 1024
    torch.manual_seed(0)
    state = {f"layer{i}.weight": distribute_tensor(torch.randn(rows, 1024), mesh, [Shard(0)])
             for i in range(tensors)}
    targets = {name: distribute_tensor(torch.zeros(rows, 1024), mesh, [Shard(0)])
               for name in state}
    times: dict[str, dict[str, list]] = {v: {"save": [], "load": [], "save_cpu": [],
                                              "load_cpu": []} for v in VARIANTS}

    def timed(fn) -> tuple[float, float]:
        """(wall seconds of the slower rank, CPU seconds of all ranks)."""
        dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        wall = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
        cpu = torch.tensor([time.process_time() - cpu], dtype=torch.float64)
        dist.all_reduce(wall, op=dist.ReduceOp.MAX)
        dist.all_reduce(cpu, op=dist.ReduceOp.SUM)
        return float(wall), float(cpu)

    for k in range(rounds + 1):  # round 0 warms up (first-call costs) and is not counted
        order = VARIANTS[k % len(VARIANTS):] + VARIANTS[:k % len(VARIANTS)]
        for op in ("save", "load"):
            for variant in order:
                folder = os.path.join(work, variant.replace(" ", "_").replace("/", "_"))
                if op == "save":
                    seconds = timed(lambda: dcp.save(
                        state, storage_writer=_storage(variant, folder, keyset, "save")))
                else:
                    seconds = timed(lambda: dcp.load(
                        targets, storage_reader=_storage(variant, folder, keyset, "load")))
                if k:
                    times[variant][op].append(seconds[0])
                    times[variant][op + "_cpu"].append(seconds[1])
                if op == "load":
                    for name, value in state.items():
                        assert torch.equal(targets[name].to_local(), value.to_local()), variant
                        targets[name].to_local().zero_()
    if rank == 0:
        with open(os.path.join(work, "times.json"), "w") as f:
            json.dump(times, f)
    dist.destroy_process_group()


def _git_commit() -> str:
    from gpucrypt.bench import _git_commit as commit  # with -dirty, as gpucrypt bench

    return commit() or ""


def main(argv: list[str] | None = None) -> int:
    from gpucrypt.cli._common import parse_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="256MiB", help="bytes of the whole state dict")
    parser.add_argument("--tensors", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where the checkpoints go (default: /tmp)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    size = parse_size(args.size)

    import torch
    import torch.multiprocessing as mp

    from gpucrypt import keys
    from gpucrypt.bench import _cpu_model

    work = tempfile.mkdtemp(prefix="dcp_bench.", dir=args.dir)
    load_start = os.getloadavg()
    try:
        keys.Keyset.generate().save(os.path.join(work, "keyset.json"))
        mp.start_processes(_rank, args=(args.world, work, size, args.tensors, args.rounds),
                           nprocs=args.world, start_method="spawn")
        with open(os.path.join(work, "times.json")) as f:
            times = json.load(f)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_end = os.getloadavg()

    rows = []
    for op in ("save", "load"):
        base = statistics.median(times["plain DCP"][op])
        base_cpu = statistics.median(times["plain DCP"][op + "_cpu"])
        for variant in VARIANTS:
            median = statistics.median(times[variant][op])
            cpu = statistics.median(times[variant][op + "_cpu"])
            rows.append({"variant": variant, "op": op, "median_s": median,
                         "gb_per_s": size / median / 1e9, "ratio": median / base,
                         "cpu_s": cpu, "cpu_ratio": cpu / base_cpu,
                         "seconds": times[variant][op], "cpu_seconds": times[variant][op + "_cpu"]})
    doc = {
        "benchmark": "dcp_bench", "size": size, "tensors": args.tensors, "world": args.world,
        "rounds": args.rounds, "dir": os.path.dirname(work), "target": TARGET,
        "cpu": _cpu_model(), "cores": os.cpu_count(), "commit": _git_commit(),
        "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_average_start": list(load_start), "load_average_end": list(load_end),
        "rows": rows,
    }
    for r in rows:
        print(f"{r['op']:4} {r['variant']:42} {r['median_s']:7.3f} s  {r['gb_per_s']:6.2f} GB/s  "
              f"x{r['ratio']:.2f}   cpu {r['cpu_s']:6.3f} s x{r['cpu_ratio']:.2f}")
    print(f"load average: start {load_start}, end {load_end}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
