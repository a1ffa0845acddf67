"""Make the known-answer file of a passphrase-encrypted stream (docs/KEYS.md, "Passphrases").

Run once, from the repository root; the file is never rewritten (future versions must
keep reading these bytes):

    .venv/bin/python tests/vectors/passphrase/make_vector.py

Writes ``scrypt.json``: the passphrase, the stanza's salt and work factor (2**10: small,
so that checking it is quick), the data key, the stanza body, the whole envelope, and a
small stream file sealed under the data key with its plaintext. The salt, the data key
and the stream's salt and nonce prefix are random, drawn once and recorded.
tests/test_cli.py checks the stanza with ``cryptography``'s Scrypt and ChaCha20Poly1305
directly, not with gpucrypt's code.
"""
from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from gpucrypt import stream  # noqa: E402
from gpucrypt.keys import Passphrase, _envelope  # noqa: E402
from gpucrypt.keys import passphrase as _passphrase  # noqa: E402
from gpucrypt.files._format import prefix_size  # noqa: E402

OUT = HERE / "scrypt.json"

if __name__ == "__main__":
    if OUT.exists():
        sys.exit(f"{OUT} exists: known-answer files are never rewritten")
    passphrase, log_n = "correct horse battery staple", 10
    _passphrase.MIN_LOG_N = log_n  # writers refuse a work factor this small otherwise
    salt, dek = os.urandom(16), os.urandom(32)
    stanza = Passphrase(passphrase, log_n=log_n).wrap(dek, _salt=salt)
    envelope = _envelope.encode([stanza])
    plaintext = b"a passphrase-encrypted gpucrypt stream\n" * 3
    sealed = io.BytesIO()
    stream.encrypt(plaintext, sealed, dek, segment_size=4096, envelope=envelope, device="cpu",
                   _salt=os.urandom(32), _nonce_prefix=os.urandom(prefix_size("chacha20-poly1305")))
    OUT.write_text(json.dumps({
        "source": "tests/vectors/passphrase/make_vector.py (gpucrypt); checked independently "
                  "with cryptography's Scrypt and ChaCha20Poly1305 in tests/test_cli.py",
        "passphrase": passphrase, "salt": salt.hex(), "log_n": log_n, "r": 8, "p": 1,
        "scrypt_salt": "gpucrypt-passphrase-v1\\x00 || salt", "dek": dek.hex(),
        "stanza_id": stanza.recipient_id.hex(), "stanza_body": stanza.body.hex(),
        "envelope": envelope.hex(), "plaintext": plaintext.hex(), "stream": sealed.getvalue().hex(),
    }, indent=1) + "\n")
