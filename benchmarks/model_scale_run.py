"""End to end at model scale: encrypt a safetensors file with one command, load it back.

Writes a safetensors file of ``--size`` bytes (``--tensors`` tensors of bfloat16-sized
elements, random bytes) in ``--dir``, then runs each step in its own process and
records wall time and peak resident memory (the child's ``VmHWM``, Linux; imports
included). The disk is the reference: ``write+fsync`` writes
the same number of bytes to a file and fsyncs it, as the two commands must (their
output is fsynced before it is renamed into place):

1. ``gpucrypt encrypt-model --key-file K plain.safetensors model.gc``;
2. ``models.load_encrypted(model.gc, K, device)`` for each ``--load-device`` (``cpu``:
   the tensors end up in host memory, so its peak is the model's size; ``cuda``: the
   tensors end up on the GPU, so the host peak should stay near the staging buffers);
3. ``gpucrypt decrypt-model`` back to safetensors, compared byte for byte with the
   input.

Usage::

    python benchmarks/model_scale_run.py --size 10GiB --dir /tmp/scale [--load-device cpu,cuda]
                                         [--json out.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

import numpy as np

from gpucrypt.cli._common import parse_size
from gpucrypt.files._safetensors import safetensors_layout
from gpucrypt.bench import _cpu_model, _git_commit

_CHILD = r"""
import json, os, re, sys, time
open("/proc/self/clear_refs", "w").write("5")  # the peak so far is the parent's (vfork)
start = time.perf_counter()
kind, args = sys.argv[1], sys.argv[2:]
if kind == "disk":
    path, size = args[0], int(args[1])
    block = bytes(16 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    for _ in range(size // len(block)):
        os.write(fd, block)
    os.fsync(fd)
    os.close(fd)
    os.remove(path)
    code = 0
elif kind == "cli":
    from gpucrypt.cli import main
    code = main(args)
else:
    from gpucrypt import models
    path, key_file, device, _ = args
    key = open(key_file, "rb").read()
    tensors = models.load_encrypted(path, key, device,
                                    framework="numpy" if device == "cpu" else "torch")
    if device != "cpu":
        import torch
        torch.cuda.synchronize()
    code = 0 if len(tensors) == int(args[3]) else 1
seconds = time.perf_counter() - start
peak_mib = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read())[1]) // 1024
print(json.dumps({"code": code, "seconds": seconds, "peak_rss_mib": peak_mib}))
"""


def _write_plain(path: str, size: int, count: int) -> None:
    """A safetensors file of ``count`` bfloat16 tensors adding up to ``size`` bytes."""
    per = (size // count) & ~1
    entries = [(f"model.layers.{i}.weight", "bfloat16", (per // 2,), per) for i in range(count)]
    prefix, offsets = safetensors_layout(entries, {"format": "pt"})
    block = np.frombuffer(os.urandom(64 << 20), dtype=np.uint8)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.pwrite(fd, prefix, 0)
        for i, (name, _, _, nbytes) in enumerate(entries):
            start, done = (i * 4096) % (len(block) // 2), 0  # tensors differ from each other
            while done < nbytes:
                n = min(len(block) - start, nbytes - done)
                os.pwrite(fd, block[start:start + n], offsets[name] + done)
                done += n
    finally:
        os.close(fd)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _child(*argv: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"step {argv} failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        raise SystemExit(f"step {argv} returned {result['code']}:\n{done.stderr}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=10 << 30)
    parser.add_argument("--tensors", type=int, default=300)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--load-device", default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    plain, enc, back, key = (os.path.join(args.dir, n) for n in
                             ("plain.safetensors", "model.gc", "back.safetensors", "key"))
    # 0600: the CLI refuses key files that group or others can read, as ssh does
    with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(os.urandom(32))
    steps = {}
    try:
        t = time.perf_counter()
        _write_plain(plain, args.size, args.tensors)
        os.sync()  # its write-back would otherwise compete with the steps timed below
        print(f"wrote {os.path.getsize(plain) / 2**30:.2f} GiB in {time.perf_counter() - t:.1f} s")
        steps["write+fsync (the disk)"] = _child("disk", os.path.join(args.dir, "disk"),
                                                 str(args.size))
        steps["encrypt-model"] = _child("cli", "encrypt-model", "--key-file", key, plain, enc)
        for device in args.load_device.split(","):
            steps[f"load_encrypted {device}"] = _child("load", enc, key, device, str(args.tensors))
        steps["decrypt-model"] = _child("cli", "decrypt-model", "--key-file", key, enc, back)
        identical = _sha256(plain) == _sha256(back)
    finally:
        for p in (plain, enc, back, key):
            if os.path.exists(p):
                os.remove(p)
    size = args.size
    print(f"{size / 2**30:g} GiB model, {args.tensors} tensors; decrypt-model output identical: "
          f"{identical}")
    for name, r in steps.items():
        print(f"  {name:28s} {r['seconds']:7.1f} s  {size / r['seconds'] / 1e9:6.2f} GB/s  "
              f"peak RSS {r['peak_rss_mib']:6d} MiB")
    if args.json:
        commit = _git_commit()  # with -dirty, as gpucrypt bench
        with open(args.json, "w") as f:
            json.dump({"benchmark": "model_scale_run", "size": size, "tensors": args.tensors,
                       "cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0)),
                       "commit": commit, "identical": identical, "steps": steps}, f, indent=1)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
