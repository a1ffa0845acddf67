"""What an in-place cipher pass on the CPU can reach through the installed ``cryptography``,
with no gpucrypt code: the ceiling for issue 13's in-place state-dict figures.

cryptography 51 refuses an ``update_into`` whose output is its input ("data and buf must
not overlap"), so an in-place pass through it costs a copy, whatever the route. This times
the routes on the shapes ``tensor_bench.py`` uses: one flat buffer of ``--mib`` MiB on one
thread (the reference of the 2-thread criterion), and the same bytes as 300 model-shaped
buffers on two threads (each thread takes every other buffer), the process pinned to that
many cores. Routes, each a streaming encryptor per buffer:

- ``in place``: ``update_into(buf, buf)`` (where the installed cryptography takes it);
- ``window``: into a 256 KiB window of the thread's, copied back (gpucrypt's route on 51);
- ``copy in``: 1 MiB copied into the thread's window, then ``update_into`` from it into place;
- ``apart``: into a separate buffer of the same size (no in-place constraint: a reference
  for a pass that reads one buffer and writes another).

Copies are ``ctypes.memmove`` (the GIL released). Algorithms: AES-256-GCM (the streaming
GCM encryptor: CTR and GHASH in one pass) and ChaCha20 (the keystream alone; gpucrypt's
ChaCha20-Poly1305 adds Poly1305 over the same bytes). Every route's output is checked
against ``apart``'s before timing. Each round times every route and case once, interleaved
(two passes: the second restores the plaintext); medians.

Usage::

    python benchmarks/in_place_ceiling.py [--mib 1024] [--reps 7] [--json F]
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import statistics
import sys
import threading
import time

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tensor_bench import model_sizes  # noqa: E402 (the same shapes as the state-dict bench)

WINDOW = 256 << 10
COPY_IN = 1 << 20
KEY = bytes(range(32))
ALGORITHMS = ("aes-256-gcm", "chacha20")
ROUTES = ("in place", "window", "copy in", "apart")


def encryptor(algorithm: str):
    if algorithm == "aes-256-gcm":
        return Cipher(algorithms.AES(KEY), modes.GCM(bytes(12))).encryptor()
    return Cipher(algorithms.ChaCha20(KEY, bytes(16)), None).encryptor()


def takes_in_place() -> bool:
    buf = memoryview(bytearray(64))
    try:
        encryptor("chacha20").update_into(buf, buf)
        return True
    except ValueError:
        return False


class Scratch(threading.local):
    """A thread's window (with block-size slack for GCM's ``update_into``)."""

    def __init__(self):
        self.array = np.zeros(max(WINDOW, COPY_IN) + 16, dtype=np.uint8)
        self.view = memoryview(self.array)
        self.address = self.array.ctypes.data


def one_pass(algorithm: str, route: str, buf: np.ndarray, apart: np.ndarray | None,
             scratch: Scratch) -> None:
    """``buf`` encrypted in place by ``route`` (``apart``: into ``apart``)."""
    enc, src, n = encryptor(algorithm), memoryview(buf), len(buf)
    if route == "in place":
        enc.update_into(src, src)
    elif route == "apart":
        enc.update_into(src, memoryview(apart))
    elif route == "window":
        for start in range(0, n, WINDOW):
            done = enc.update_into(src[start:start + WINDOW], scratch.view)
            ctypes.memmove(buf.ctypes.data + start, scratch.address, done)
    else:  # copy in
        for start in range(0, n, COPY_IN):
            size = min(COPY_IN, n - start)
            ctypes.memmove(scratch.address, buf.ctypes.data + start, size)
            enc.update_into(scratch.view[:size], src[start:start + size])
    enc.finalize()


def run_case(algorithm: str, route: str, parts: list[list], scratch: Scratch) -> float:
    """Seconds for every thread to run ``route`` over its buffers, started together."""
    def work(part):
        for buf, apart in part:
            one_pass(algorithm, route, buf, apart, scratch)

    threads = [threading.Thread(target=work, args=(p,)) for p in parts]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def digest(bufs) -> str:
    h = hashlib.sha256()
    for b in bufs:
        h.update(memoryview(b))
    return h.hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024)  # tensor_bench's default
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    import cryptography

    from gpucrypt.bench import _cpu_model, _git_commit

    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2:
        print("two usable cores needed", file=sys.stderr)
        return 1
    routes = [r for r in ROUTES if r != "in place" or takes_in_place()]
    total = args.mib << 20
    rng = np.random.default_rng(1)
    cases = {"flat, 1 thread": ([total], 1), "model, 2 threads": (model_sizes(total), 2)}
    out = {"benchmark": "in_place_ceiling", "cpu": _cpu_model(), "commit": _git_commit(),
           "cryptography": cryptography.__version__, "numpy": np.__version__, "mib": args.mib,
           "reps": args.reps, "window": WINDOW, "copy_in": COPY_IN, "routes": routes,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_average_start": os.getloadavg()[0],
           "rows": []}
    for algorithm in ALGORITHMS:
        data = {case: [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
                for case, (sizes, _) in cases.items()}
        aparts = {case: [np.empty(len(b) + 16, dtype=np.uint8) for b in bufs]
                  for case, bufs in data.items()}
        plain = {case: digest(bufs) for case, bufs in data.items()}
        scratch = Scratch()
        for case, bufs in data.items():  # the reference: apart, then every route against it
            one = [[(b, a) for b, a in zip(bufs, aparts[case])]]
            run_case(algorithm, "apart", one, scratch)
            expected = digest(a[:len(b)] for b, a in zip(bufs, aparts[case]))
            for route in routes:
                if route == "apart":
                    continue
                run_case(algorithm, route, one, scratch)
                if digest(bufs) != expected:
                    print(f"{algorithm} {route} ({case}): not cryptography's bytes", file=sys.stderr)
                    return 1
                run_case(algorithm, route, one, scratch)
                if digest(bufs) != plain[case]:
                    print(f"{algorithm} {route} ({case}): a second pass did not restore the "
                          f"plaintext", file=sys.stderr)
                    return 1
        times = {(case, route): [] for case in cases for route in routes}
        for _ in range(args.reps):
            for case, (_, nthreads) in cases.items():
                os.sched_setaffinity(0, usable[:nthreads])
                pairs = list(zip(data[case], aparts[case]))
                parts = [pairs[i::nthreads] for i in range(nthreads)]
                for route in routes:
                    times[(case, route)] += [run_case(algorithm, route, parts, scratch)
                                             for _ in range(2)]  # the second restores the plaintext
        os.sched_setaffinity(0, usable)
        for (case, route), samples in times.items():
            gbps = total / statistics.median(samples) / 1e9
            out["rows"].append({"algorithm": algorithm, "case": case, "route": route,
                                "gb_per_s": gbps, "samples_s": samples})
            print(f"{algorithm:12s} {case:17s} {route:9s} {gbps:6.2f} GB/s", flush=True)
        del data, aparts
    for algorithm in ALGORITHMS:
        rows = {(r["case"], r["route"]): r["gb_per_s"] for r in out["rows"] if r["algorithm"] == algorithm}
        for route in routes:
            ratio = rows[("model, 2 threads", route)] / rows[("flat, 1 thread", route)]
            out.setdefault("two_threads_over_flat", {}).setdefault(algorithm, {})[route] = ratio
            print(f"{algorithm}: {route}: model on 2 threads / flat on 1 = x{ratio:.2f}")
    out["load_average_end"] = os.getloadavg()[0]
    print(f"cryptography {cryptography.__version__}; 1-minute load average "
          f"{out['load_average_start']:.2f} at the start, {out['load_average_end']:.2f} at the end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
