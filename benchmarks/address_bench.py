"""How fast the CPU backend seals one buffer in place, by where the buffer starts.

Issue 13 compares a 300-tensor state dict with one flat buffer of the same size. On the
Intel Xeon (AVX-512) sessions, OpenSSL's ChaCha20 and Poly1305 ran at speeds that depend
on the buffer's address modulo 4 KiB, enough to move that ratio by several percent: the
flat buffer is one large allocation (glibc maps it, and it starts 64 bytes into a page),
while the model's tensors start wherever the heap put them. This script measures it:
the same bytes, sealed in place from several offsets past a 2 MiB boundary, in
interleaved rounds (medians), through the same call the tensor API makes
(``seal_detached(..., one_pass=True)``), and, for reference, the two primitives alone.

Every sealed result is checked once against ``cryptography``'s one-shot AEAD before
timing.

Usage::

    python benchmarks/address_bench.py [--mib 256] [--reps 7] [--json F]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

OFFSETS = (0, 16, 64, 128, 1024, 4096 + 16, 832)
ALIGN = 2 << 20


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
    from cryptography.hazmat.primitives.poly1305 import Poly1305

    from gpucrypt.backends import get_backend

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    n = args.mib << 20
    key, nonce, aad = os.urandom(32), os.urandom(12), os.urandom(80)
    backing = np.frombuffer(os.urandom(n + 2 * ALIGN), dtype=np.uint8).copy()
    base = (-backing.ctypes.data) % ALIGN  # index of the first 2 MiB boundary
    cpu = get_backend("cpu")
    chacha, gcm = cpu.aead("chacha20-poly1305", key), cpu.aead("aes-gcm", key)
    piece = 512 << 10

    def seal(ctx):
        return lambda v: ctx.seal_detached(nonce, v, memoryview(aad), v, one_pass=True)

    def keystream(v):
        enc = Cipher(algorithms.ChaCha20(key, bytes(16)), None).encryptor()
        for i in range(0, len(v), piece):
            enc.update_into(v[i:i + piece], v[i:i + piece])

    def poly1305(v):
        mac = Poly1305(key)
        for i in range(0, len(v), piece):
            mac.update(v[i:i + piece])
        mac.finalize()

    cases = {"chacha20-poly1305 one-pass seal": seal(chacha), "aes-gcm seal": seal(gcm),
             "chacha20 keystream alone": keystream, "poly1305 alone": poly1305}
    # check: a seal from every offset gives cryptography's bytes
    sample = os.urandom(1 << 20)
    for name, ctx, reference in (("chacha20-poly1305", chacha, ChaCha20Poly1305(key)),
                                 ("aes-gcm", gcm, AESGCM(key))):
        for off in OFFSETS:
            view = memoryview(backing)[base + off:base + off + len(sample)]
            view[:] = sample
            tag = ctx.seal_detached(nonce, view, memoryview(aad), view, one_pass=True)
            if bytes(view) + tag != reference.encrypt(nonce, sample, aad):
                raise SystemExit(f"{name} at offset {off}: not cryptography's bytes")
    times: dict = {(c, off): [] for c in cases for off in OFFSETS}
    load_start = os.getloadavg()[0]
    for rep in range(args.reps + 1):
        for c, fn in cases.items():
            for off in OFFSETS:
                view = memoryview(backing)[base + off:base + off + n]
                t = time.perf_counter()
                fn(view)
                if rep:  # the first round warms up
                    times[(c, off)].append(time.perf_counter() - t)
    rows = [{"case": c, "offset": off, "gib_per_s": n / statistics.median(times[(c, off)]) / 2**30}
            for c in cases for off in OFFSETS]
    cpu_name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                     if line.startswith("model name")), platform.processor())
    print(f"{cpu_name}, {os.cpu_count()} cores, {args.mib} MiB in place, medians of {args.reps}, "
          f"load {load_start:.2f}")
    print(f"{'case':34}" + "".join(f"{'+' + str(off):>9}" for off in OFFSETS) + "   (GiB/s by offset past 2 MiB)")
    for c in cases:
        print(f"{c:34}" + "".join(f"{r['gib_per_s']:9.2f}" for r in rows if r["case"] == c))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            from gpucrypt.bench import _git_commit

            commit = _git_commit()  # with -dirty, as gpucrypt bench
            json.dump({"benchmark": "address_bench", "commit": commit or None,
                       "cpu": cpu_name, "cores": os.cpu_count(),
                       "mib": args.mib, "reps": args.reps, "load_average_start": load_start,
                       "load_average_end": os.getloadavg()[0], "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
