"""Encrypted model loads to CPU tensors: gpucrypt against tensorizer and plain safetensors.

One state dict (``--size``, default 1 GiB, of bfloat16 tensors shaped like a decoder's:
per layer four square projections, three MLP matrices and two norms, plus an
embedding) is written three ways in ``--dir`` (default /dev/shm, so the page cache and
not a disk is what every loader reads from):

- ``gpucrypt``: ``models.save_encrypted`` (ChaCha20-Poly1305 and AES-256-GCM, 1 MiB
  segments), loaded with ``models.load_encrypted(path, key, "cpu")``;
- ``tensorizer``: ``TensorSerializer(path, encryption=EncryptionParams(key=...))``
  (libsodium XSalsa20-Poly1305), loaded with ``TensorDeserializer(path,
  encryption=DecryptionParams.from_key(key), device="cpu")``;
- ``safetensors``: ``safetensors.torch.save_file`` on the plaintext, loaded with
  ``safetensors.torch.load_file`` (no encryption: the floor), and the same with a copy of
  each tensor (what any loader that writes its own memory pays at least);
- ``floor``: ``cryptography``'s one-shot decryption of the same number of bytes in 1 MiB
  segments, from memory into memory already faulted in, on as many threads as gpucrypt:
  the cipher alone, which no encrypted load can undercut. Set against ``load_file`` it
  says whether issue 18's "at most x1.15 the time of safetensors" can be met at all.

gpucrypt runs on its default threads (the usable cores); tensorizer with its default
``num_readers`` (it picks up to 8 threads) and with as many readers as cores. On a loaded
machine a loader with more threads than cores takes a larger share of the CPU, so the
same-thread-count row is the fair comparison there.

Each load ends with every tensor *materialised*: one byte of every 4 KiB page read, so
that a loader that maps the file (safetensors does) pays for its pages as the others
pay for their copies. Loads are interleaved round by round, in this one process, and
the medians compared as ratios. Each round runs the loaders in a new random order
(``--seed``, recorded): what a load costs depends on the memory the one before it freed
(freed heap memory comes back without page faults; memory returned to the kernel is
faulted in again, and on a VM whose kernel reports free memory to the hypervisor, as
ours does, that can cost 1 s per GiB), and a rotating order gives every loader the same
predecessor in every round: a fixed bias for or against it. The 1-minute load average is recorded
at the start and the end: on a shared machine other processes take CPU time too.

Usage::

    python benchmarks/model_load_bench.py [--size 1GiB] [--rounds 5] [--dir /dev/shm/x]
                                          [--json benchmarks/results/DATE-cpu-...-model-load.json]

tensorizer is not a gpucrypt dependency: ``pip install tensorizer`` (it needs the system's
libsodium, ``apt-get install libsodium23``), see benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time

import torch

from gpucrypt import models
from gpucrypt.bench import _cpu_model
from gpucrypt.cli._common import parse_size

PAGE = 4096
TENSORIZER = "tensorizer xsalsa20-poly1305 (num_readers default)"
SAFETENSORS = "safetensors load_file (plaintext)"
#: rows that are not loaders: the cipher alone, a lower bound for any encrypted load
FLOOR = "floor: cryptography decrypt_into alone (1 MiB segments in memory)"


def state_dict(size: int) -> dict:
    """bfloat16 tensors adding up to about ``size`` bytes, shaped like a small decoder."""
    hidden = 2048
    per_layer = (4 * hidden * hidden + 3 * hidden * (hidden * 11 // 4) + 2 * hidden) * 2
    layers = max(1, (size - 32000 * hidden * 2) // per_layer)
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": rnd(32000, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = rnd(hidden, hidden)
        for name, shape in (("gate_proj", (hidden * 11 // 4, hidden)),
                            ("up_proj", (hidden * 11 // 4, hidden)),
                            ("down_proj", (hidden, hidden * 11 // 4))):
            sd[p + f"mlp.{name}.weight"] = rnd(*shape)
        sd[p + "input_layernorm.weight"] = rnd(hidden)
        sd[p + "post_attention_layernorm.weight"] = rnd(hidden)
    return sd


def cipher_floor(algorithm: str, key: bytes, nbytes: int, threads: int):
    """A loader that does only what no encrypted load can skip: ``cryptography``'s one-shot
    decryption of every 1 MiB segment, from ciphertext already in memory into a buffer
    already faulted in, on ``threads`` threads; no file, no allocation, no parsing. The
    ciphertext is ``nbytes`` of distinct segments (one segment reused would sit in cache)."""
    from concurrent.futures import ThreadPoolExecutor

    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    aead = (AESGCM if algorithm == "aes-256-gcm" else ChaCha20Poly1305)(key)
    seg, tag = 1 << 20, 16
    n = -(-nbytes // seg)
    plain = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).numpy()
    sealed = bytearray(nbytes + n * tag)
    nonces = [i.to_bytes(12, "big") for i in range(n)]
    for i in range(n):
        lo, hi = i * seg, min(nbytes, (i + 1) * seg)
        aead.encrypt_into(nonces[i], plain[lo:hi], None,
                          memoryview(sealed)[lo + i * tag:hi + (i + 1) * tag])
    out = torch.zeros(nbytes, dtype=torch.uint8)  # faulted in once, here
    view, dst = memoryview(sealed), out.numpy()
    pool = ThreadPoolExecutor(threads)

    def open_share(first: int) -> None:
        for i in range(first, n, threads):
            lo, hi = i * seg, min(nbytes, (i + 1) * seg)
            aead.decrypt_into(nonces[i], view[lo + i * tag:hi + (i + 1) * tag], None, dst[lo:hi])

    def load() -> dict:
        list(pool.map(open_share, range(threads)))
        return {"all": out}
    load()
    assert torch.equal(out, torch.from_numpy(plain))
    return load


def materialise(tensors: dict) -> int:
    """Read one byte of every page of every tensor; returns their total size."""
    total = 0
    for t in tensors.values():
        raw = t.reshape(-1).view(torch.uint8)
        int(raw[::PAGE].sum())
        total += raw.numel()
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", default="/dev/shm/gpucrypt-model-load-bench")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--seed", type=int, default=0, help="of the random order of each round")
    args = parser.parse_args(argv)

    from safetensors.torch import load_file, save_file
    from tensorizer import (DecryptionParams, EncryptionParams, TensorDeserializer,
                            TensorSerializer)
    import tensorizer

    os.makedirs(args.dir, exist_ok=True)
    key = os.urandom(32)
    sd = state_dict(args.size)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    paths = {name: os.path.join(args.dir, name) for name in
             ("plain.safetensors", "chacha.gc", "aes.gc", "tensorizer.tensors")}
    save_file(sd, paths["plain.safetensors"])
    models.save_encrypted(sd, paths["chacha.gc"], key, device="cpu")
    models.save_encrypted(sd, paths["aes.gc"], key, device="cpu", algorithm="aes-256-gcm")
    writer = TensorSerializer(paths["tensorizer.tensors"], encryption=EncryptionParams(key=key))
    writer.write_state_dict(sd)
    writer.close()
    names = list(sd)
    del sd
    gc.collect()

    def tensorizer_load(readers):
        with TensorDeserializer(paths["tensorizer.tensors"], device="cpu", num_readers=readers,
                                encryption=DecryptionParams.from_key(key)) as d:
            return {k: d[k] for k in names}

    cores = len(os.sched_getaffinity(0))
    floors = {alg: cipher_floor(alg, key, nbytes, cores) for alg in ("chacha20-poly1305", "aes-256-gcm")}
    loaders = {
        f"gpucrypt chacha20-poly1305 ({cores} threads)":
            lambda: models.load_encrypted(paths["chacha.gc"], key, "cpu"),
        f"gpucrypt aes-256-gcm ({cores} threads)":
            lambda: models.load_encrypted(paths["aes.gc"], key, "cpu"),
        TENSORIZER: lambda: tensorizer_load(None),
        f"tensorizer xsalsa20-poly1305 ({cores} readers)": lambda: tensorizer_load(cores),
        SAFETENSORS: lambda: load_file(paths["plain.safetensors"]),
        "safetensors load_file + a copy of each tensor (plaintext)":
            lambda: {k: v.clone() for k, v in load_file(paths["plain.safetensors"]).items()},
        **{f"{FLOOR} {alg}, {cores} threads": floor for alg, floor in floors.items()},
    }
    times: dict[str, list[float]] = {name: [] for name in loaders}
    load_start = os.getloadavg()
    shuffle = random.Random(args.seed).shuffle
    orders = []
    for r in range(args.rounds + 1):  # round 0 warms up (imports, first page-ins)
        order = list(loaders)
        shuffle(order)
        orders.append(order)
        for name in order:
            gc.collect()
            start = time.perf_counter()
            tensors = loaders[name]()
            assert materialise(tensors) == nbytes, name
            seconds = time.perf_counter() - start
            del tensors
            if r:
                times[name].append(seconds)
    load_end = os.getloadavg()
    shutil.rmtree(args.dir, ignore_errors=True)

    medians = {name: statistics.median(t) for name, t in times.items()}
    plain, tz = medians[SAFETENSORS], medians[TENSORIZER]
    rows = [{"name": name, "median_s": medians[name], "gb_per_s": nbytes / medians[name] / 1e9,
             "times_s": times[name], "over_safetensors": medians[name] / plain,
             "tensorizer_over_this": tz / medians[name]} for name in loaders]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=here).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, cwd=here).stdout.strip())
    except OSError:
        commit, dirty = "", False
    doc = {"benchmark": "model_load_bench", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                  time.gmtime()),
           "bytes": nbytes, "tensors": len(names), "rounds": args.rounds, "dir": args.dir,
           "cores": os.cpu_count(), "cpu": _cpu_model(),
           "python": platform.python_version(), "torch": torch.__version__,
           "tensorizer": tensorizer.__version__, "commit": commit, "git_dirty": dirty,
           "load_average_start": load_start[0], "load_average_end": load_end[0],
           "seed": args.seed, "orders": orders, "rows": rows}
    for row in rows:
        print(f"{row['name']:58s} {row['median_s']:7.3f} s  {row['gb_per_s']:6.2f} GB/s  "
              f"x{row['over_safetensors']:.2f} of safetensors  tensorizer/this x"
              f"{row['tensorizer_over_this']:.2f}")
    print(f"load average {load_start[0]:.2f} at the start, {load_end[0]:.2f} at the end, "
          f"{os.cpu_count()} cores")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
