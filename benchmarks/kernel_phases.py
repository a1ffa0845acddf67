"""Device time of each step of one GPU seal: which kernel carries the AEADs' fixed cost.

    python benchmarks/kernel_phases.py [--sizes 1MiB,64MiB,1GiB] [--runs 5] [--json F]

On an H200 (2026-12-04, ``gpucrypt bench --device-time``) a 1 MiB seal took 68 us of device time
for ChaCha20-Poly1305 and 167 us for AES-256-GCM, where the raw ciphers took 9 and 13 us: a fixed
cost of the MAC path. This script seals one message of each size with each AEAD and records a
CUDA event on the launch stream before and after every kernel launch (every launch of
``gpucrypt.kernels`` goes through ``_launch.launch``), and around the whole call. Per launch it
prints the kernel, its work units and threads per block, and the median device time over
``--runs`` seals;
"between" is what the call's span holds besides the kernels (the upload of its tables, memsets,
gaps between launches). The events add a few microseconds of their own per launch.

Needs a real GPU: the simulator's events do not time a device.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict


def parse_size(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for unit, scale in units.items():
        if text.endswith(unit):
            return int(text[: -len(unit)]) * scale
    return int(text)


def timed_launches(cuda, modules):
    """Wrap the ``launch`` each kernel module calls: events before and after every launch, on
    the launch's own stream. Returns (records, undo); each record is (name, units, threads per
    block, e0, e1); ``undo`` gives each module back the launcher it had."""
    from gpucrypt.kernels import _launch

    records, real = [], _launch.launch

    def launch(kernel, units, args, stream, **kw):
        threads = _launch.threads_for(units, kw.get("multiple", 1))
        start, end = cuda.event(), cuda.event()
        start.record(stream)
        real(kernel, units, args, stream, **kw)
        end.record(stream)
        name = getattr(getattr(kernel, "py_func", None), "__name__", str(kernel))
        records.append((name, int(units), threads, start, end))
    before = [(module, module.launch) for module in modules]
    for module in modules:
        module.launch = launch

    def undo():
        for module, previous in before:
            module.launch = previous
    return records, undo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1MiB,64MiB,1GiB")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    from gpucrypt.bench.gpu import backend_to_time

    gpu = backend_to_time("kernel_phases.py")
    if gpu is None:
        return 2
    import numpy as np
    from numba import cuda

    from gpucrypt.kernels import aes, chacha20, ghash, poly1305
    stream = cuda.stream()
    out = {"device": gpu.device_name, "runs": args.runs, "rows": []}
    for size in (parse_size(s) for s in args.sizes.split(",")):
        data = cuda.to_device(np.frombuffer(os.urandom(size), np.uint8))
        for algorithm, key_len in (("chacha20-poly1305", 32), ("aes-gcm", 32)):
            key, nonce = os.urandom(key_len), os.urandom(12)

            def seal():
                gpu.seal_batch(algorithm, [key], [nonce], [data], [b""], [data], stream=stream)
            for _ in range(3):   # compiled, slots grown, views made
                seal()
            stream.synchronize()
            per_launch, spans = defaultdict(list), []
            records, undo = timed_launches(cuda, (aes, chacha20, ghash, poly1305))
            try:
                for _ in range(args.runs):
                    records.clear()
                    start, end = cuda.event(), cuda.event()
                    start.record(stream)
                    seal()
                    end.record(stream)
                    end.synchronize()
                    spans.append(cuda.event_elapsed_time(start, end) * 1e3)
                    for i, (name, units, threads, e0, e1) in enumerate(records):
                        per_launch[(i, name, units, threads)].append(cuda.event_elapsed_time(e0, e1) * 1e3)
            finally:
                undo()
            total = statistics.median(spans)
            kernels = 0.0
            print(f"{algorithm} {size} B: {total:.1f} us for the call (median of {args.runs})")
            for (i, name, units, threads), times in sorted(per_launch.items()):
                t = statistics.median(times)
                kernels += t
                print(f"  {i}: {name:32s} {units:>12d} units x{threads} threads  {t:9.1f} us")
                out["rows"].append({"algorithm": algorithm, "size": size, "launch": i, "kernel": name,
                                    "units": units, "threads": threads, "us": t})
            print(f"  between: {total - kernels:.1f} us")
            out["rows"].append({"algorithm": algorithm, "size": size, "launch": None, "kernel": "call",
                                "us": total})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
