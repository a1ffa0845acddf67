"""Where the host's time goes in one GPU call: wall time per call, then cProfile's top entries.

    python benchmarks/host_profile.py [--calls 50] [--top 30]

Needs a real GPU (the simulator runs another code path). Three calls, each on data already in
device memory, after five warm-up calls (kernels compiled, slots grown, views made):

- ``xor``: one raw ChaCha20 keystream call over 1 MiB (``xor_keystream_device``);
- ``seal``: one ChaCha20-Poly1305 ``seal_batch`` of one 1 MiB message (device tags);
- ``tensors``: ``encrypt_tensors`` of 256 torch CUDA tensors of 16 KiB, in place.

Per call it prints the median wall time of ``--calls`` calls (CUDA-synchronized before and
after each run of calls, no profiler), then the profile of as many more calls, sorted by
cumulative time: the entries from numba-cuda's Python layer are what a launch costs the host.
Measured on an H200 (2026-12-04, before DeviceSpan and the cached views): 1.1 ms per raw call
and 3.4 ms per seal at 1 MiB.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    from gpucrypt.bench.gpu import backend_to_time

    gpu = backend_to_time("host_profile.py")   # the simulator runs another host path
    if gpu is None:
        return 2
    import numpy as np
    from numba import cuda

    import gpucrypt
    n = 1 << 20
    src = cuda.to_device(np.frombuffer(os.urandom(n), np.uint8))
    key, nonce = os.urandom(32), os.urandom(12)
    calls = {
        "xor": lambda: gpu.xor_keystream_device("chacha20", key, bytes(4) + nonce, 0, src, src),
        "seal": lambda: gpu.seal_batch("chacha20-poly1305", [key], [nonce], [src], [b""], [src]),
    }
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        tensors = {f"t{i}": torch.randint(0, 256, (16384,), dtype=torch.uint8, device="cuda")
                   for i in range(256)}
        calls["tensors"] = lambda: gpucrypt.encrypt_tensors(tensors, key, inplace=True)
    else:
        print("tensors: skipped (no torch with CUDA)")
    for label, call in calls.items():
        for _ in range(5):
            call()
        cuda.synchronize()
        times = []
        for _ in range(args.calls):
            t = time.perf_counter()
            call()
            cuda.synchronize()
            times.append(time.perf_counter() - t)
        print(f"{label}: {statistics.median(times) * 1e3:.3f} ms per call (median of {args.calls}, "
              f"synchronized after each)", flush=True)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            call()
        cuda.synchronize()
        profile.disable()
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text)
        stats.sort_stats("cumulative").print_stats(args.top)
        print("\n".join(line[:160] for line in text.getvalue().splitlines() if line.strip()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
