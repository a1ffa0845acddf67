"""Make the known-answer files of the gpucrypt stream format (docs/FORMAT.md, version 1).

Run once, from the repository root, when the format gains a version:

    .venv/bin/python tests/vectors/stream/make_vectors.py

Each case writes ``<name>.gpucrypt`` (the stream) and ``<name>.plain`` (its plaintext)
and a line in ``manifest.json`` with the key, the salt and nonce prefix used, and
the parameters. The plaintexts are deterministic (SHA-256 in counter mode over the
case name); keys, salts and prefixes are random, drawn once and recorded. Files
already listed in the manifest are never rewritten: future versions must keep
reading these bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from gpucrypt import stream  # noqa: E402
from gpucrypt.files._format import prefix_size  # noqa: E402

SEGMENT = 4096
#: name, algorithm, plaintext length, key id, envelope
CASES = [
    (f"{alg}-{label}", alg, length, key_id, envelope)
    for alg in ("chacha20-poly1305", "xchacha20-poly1305", "aes-256-gcm")
    for label, length, key_id, envelope in [
        ("empty", 0, None, None),
        ("one-segment", 1000, None, None),
        ("full-segment", SEGMENT, None, None),
        ("three-segments", 2 * SEGMENT + 123, "kat-key-1", b"opaque envelope \x00\xff bytes"),
    ]
]


def plaintext(name: str, length: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(f"{name}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:length])


def main() -> None:
    manifest_path = HERE / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"cases": []}
    known = {case["name"] for case in manifest["cases"]}
    for name, alg, length, key_id, envelope in CASES:
        if name in known:
            continue
        key, salt, prefix = os.urandom(32), os.urandom(32), os.urandom(prefix_size(alg))
        data = plaintext(name, length)
        (HERE / f"{name}.plain").write_bytes(data)
        stream.encrypt(data, HERE / f"{name}.gpucrypt", key, algorithm=alg, segment_size=SEGMENT,
                       key_id=key_id, envelope=envelope, device="cpu", _salt=salt,
                       _nonce_prefix=prefix)
        manifest["cases"].append({
            "name": name, "format_version": 1, "algorithm": alg, "segment_size": SEGMENT,
            "plaintext_length": length, "key": key.hex(), "salt": salt.hex(),
            "nonce_prefix": prefix.hex(), "key_id": key_id,
            "envelope": None if envelope is None else envelope.hex(),
            "stream": f"{name}.gpucrypt", "plaintext": f"{name}.plain",
            "stream_sha256": hashlib.sha256((HERE / f"{name}.gpucrypt").read_bytes()).hexdigest(),
        })
        print("wrote", name)
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
