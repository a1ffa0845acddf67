"""Tensor API on a real GPU: encrypt_tensors / decrypt_tensors of torch CUDA state dicts.

Run by ``benchmarks/gpu_session.sh`` (step ``tensor``); needs torch with CUDA. Prints
one line per case and writes them as JSON (``--json FILE``).

Cases, per algorithm (in place, on torch's current stream, timed with torch CUDA
events around the call; decryption synchronises by itself):
- ``large``: a few large bfloat16 tensors, ``--mib`` MiB in all (bandwidth);
- ``many``: 2048 tensors of 16 KiB (launch and per-tensor overhead: one batch).
Every timed round trip is checked byte for byte against a copy. Before timing, a
check that work queued on a torch side stream is waited for: encrypt there, read
``to_bytes()`` at once, decrypt those bytes on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def state_dict(torch, kind: str, mib: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(1)
    if kind == "large":
        total, sizes = mib << 20, []
        for share in (0.5, 0.25, 0.125, 0.0625, 0.0625):  # fractions of the total, in bytes
            sizes.append(int(total * share) // 2)
        return {f"w{i}": torch.randn(n, device="cuda", generator=gen).to(torch.bfloat16)
                for i, n in enumerate(sizes)}
    return {f"t{i}": torch.randint(0, 256, (16384,), dtype=torch.uint8, device="cuda", generator=gen)
            for i in range(2048)}


def side_stream_check(torch, gpucrypt) -> str:
    from gpucrypt import EncryptedTensor

    key = os.urandom(32)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        x = torch.randn(64 << 18, device="cuda")  # 64 MiB of float32, written on the side stream
        enc = gpucrypt.encrypt_tensor(x, key)
        blob = enc.to_bytes()  # must wait for the side stream's work
    back = gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(blob), key, device="cpu")
    side.synchronize()
    return "ok" if torch.equal(back, x.cpu()) else "MISMATCH"


def time_case(torch, gpucrypt, algorithm: str, tensors: dict, reps: int) -> dict:
    key = os.urandom(32)
    ref = {n: t.clone() for n, t in tensors.items()}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    stream = torch.cuda.current_stream()
    enc_s, dec_s = [], []
    for rep in range(reps + 1):  # the first round trip warms up (kernel compilation)
        a, b, c = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        a.record(stream)
        encs = gpucrypt.encrypt_tensors(tensors, key, algorithm=algorithm, inplace=True)
        b.record(stream)
        gpucrypt.decrypt_tensors(encs, key)
        c.record(stream)
        c.synchronize()
        if rep:
            enc_s.append(a.elapsed_time(b) / 1e3)
            dec_s.append(b.elapsed_time(c) / 1e3)
    same = all(torch.equal(tensors[n], ref[n]) for n in tensors)
    enc, dec = statistics.median(enc_s), statistics.median(dec_s)
    return {"algorithm": algorithm, "tensors": len(tensors), "bytes": nbytes, "reps": reps,
            "encrypt_s": enc, "decrypt_s": dec, "encrypt_gbps": nbytes / enc / 1e9,
            "decrypt_gbps": nbytes / dec / 1e9, "roundtrip_identical": same}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="MiB in the 'large' state dict")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    import torch

    import gpucrypt

    if not torch.cuda.is_available():
        print("torch has no CUDA device here", file=sys.stderr)
        return 1
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "cases": []}
    out["side_stream_to_bytes"] = side_stream_check(torch, gpucrypt)
    print(f"side-stream encrypt then to_bytes: {out['side_stream_to_bytes']}", flush=True)
    for kind in ("large", "many"):
        for algorithm in ("chacha20-poly1305", "aes-gcm"):
            tensors = state_dict(torch, kind, args.mib)
            row = {"case": kind, **time_case(torch, gpucrypt, algorithm, tensors, args.reps)}
            out["cases"].append(row)
            print(f"{kind:5} {algorithm:18} {row['tensors']:5} tensors {row['bytes'] / 2**20:8.1f} MiB  "
                  f"encrypt {row['encrypt_gbps']:7.1f} GB/s  decrypt {row['decrypt_gbps']:7.1f} GB/s  "
                  f"identical={row['roundtrip_identical']}", flush=True)
            del tensors
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    ok = out["side_stream_to_bytes"] == "ok" and all(r["roundtrip_identical"] for r in out["cases"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
