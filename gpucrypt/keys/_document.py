"""Key files on disk: the JSON documents that keysets and identities are saved as.

Every such file is a JSON object with ``format`` and ``version``. A *sealed* file keeps
its public part (ids, statuses, algorithm names) readable, so ``gpucrypt keys list``
works without the passphrase, and encrypts its secrets as one JSON object, with the
canonical JSON of the public part as associated data: changing a status or an id in
the file breaks the seal. Two protections exist (docs/KEYS.md):

- ``passphrase``: scrypt (N = 2**17, r = 8, p = 1 by default) then ChaCha20-Poly1305;
- ``kek``: a 32-byte key-encryption key, AES-256-GCM.

Used by :mod:`~gpucrypt.keys.keyset` and :mod:`~gpucrypt.keys.recipients`. Imports the
ground floor (:mod:`gpucrypt._errors`) and, when sealing, :mod:`gpucrypt.aead`.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
from datetime import datetime, timezone
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .._buffers import bytes_arg
from .._errors import KeysetError

FILE_VERSION = 1

#: scrypt work factor for passphrase sealing: N = 2**17, r = 8, p = 1 (128 MiB, ~1.4 s measured here)
DEFAULT_SCRYPT_N = 2**17
_SCRYPT_MAX_N = 2**22  # refuse files that ask for more (4 GiB of memory): a denial of service


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: Any, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise KeysetError(f"{what} is not valid base64") from None


def utc_timestamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def read_json(path: str | os.PathLike, expected_format: str) -> dict:
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise KeysetError(f"{os.fspath(path)}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise KeysetError(f"{os.fspath(path)}: not a {expected_format} file (not JSON)") from None
    if not isinstance(doc, dict) or doc.get("format") != expected_format:
        raise KeysetError(f"{os.fspath(path)}: not a {expected_format} file")
    if doc.get("version") != FILE_VERSION:
        raise KeysetError(f"{os.fspath(path)}: {expected_format} version {doc.get('version')!r} "
                          f"is not supported (this gpucrypt reads version {FILE_VERSION})")
    return doc


def _passphrase_bytes(passphrase: str | bytes) -> bytes:
    if isinstance(passphrase, str):
        return passphrase.encode("utf-8")
    if isinstance(passphrase, (bytes, bytearray)):
        return bytes(passphrase)
    raise TypeError("passphrase must be str or bytes")


def seal_document(public: dict, secret: dict, *, passphrase=None, kek=None, kek_id=None,
                   scrypt_n: int = DEFAULT_SCRYPT_N) -> dict:
    from ..aead import AESGCM, ChaCha20Poly1305

    nonce = os.urandom(12)
    if passphrase is not None:
        salt = os.urandom(16)
        protection = {"method": "passphrase", "kdf": "scrypt", "salt": b64e(salt),
                      "n": int(scrypt_n), "r": 8, "p": 1, "aead": "chacha20-poly1305",
                      "nonce": b64e(nonce)}
        key = Scrypt(salt=salt, length=32, n=int(scrypt_n), r=8, p=1).derive(
            _passphrase_bytes(passphrase))
        cipher: Any = ChaCha20Poly1305(key, device="cpu")
    else:
        kek = bytes_arg(kek, "kek")  # bytes(32) would be a key of 32 zero bytes
        if len(kek) != 32:
            raise ValueError("a key-encryption key for sealing must be 32 bytes (AES-256)")
        protection = {"method": "kek", "kek_id": kek_id, "aead": "aes-256-gcm",
                      "nonce": b64e(nonce)}
        cipher = AESGCM(kek, device="cpu")
    doc = {**public, "protection": protection}
    doc["sealed"] = b64e(cipher.encrypt(nonce, _canonical(secret), _canonical(doc)))
    return doc


def open_document(doc: dict, where: str, *, passphrase=None, kek=None) -> dict:
    from ..aead import AESGCM, ChaCha20Poly1305

    protection = doc.get("protection")
    if protection is None:
        raise KeysetError(f"{where}: not sealed")
    if not isinstance(protection, dict):
        raise KeysetError(f"{where}: malformed protection block")
    method = protection.get("method")
    public = {k: v for k, v in doc.items() if k != "sealed"}
    nonce = b64d(protection.get("nonce"), f"{where}: nonce")
    try:
        if method == "passphrase":
            if passphrase is None:
                raise KeysetError(f"{where} is sealed with a passphrase: give the passphrase "
                                  f"(--passphrase-file, GPUCRYPT_PASSPHRASE or the prompt)")
            n, r, p = protection.get("n"), protection.get("r"), protection.get("p")
            if protection.get("kdf") != "scrypt" or not all(isinstance(v, int) for v in (n, r, p)):
                raise KeysetError(f"{where}: unsupported key derivation")
            if not (2 <= n <= _SCRYPT_MAX_N and 1 <= r <= 32 and 1 <= p <= 16):
                raise KeysetError(f"{where}: scrypt parameters out of the accepted range "
                                  f"(N <= 2**22, r <= 32, p <= 16)")
            salt = b64d(protection.get("salt"), f"{where}: salt")
            key = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(_passphrase_bytes(passphrase))
            cipher: Any = ChaCha20Poly1305(key, device="cpu")
        elif method == "kek":
            if kek is None:
                raise KeysetError(f"{where} is sealed by a key-encryption key "
                                  f"(id {protection.get('kek_id')!r}): give it with kek=")
            cipher = AESGCM(bytes_arg(kek, "kek"), device="cpu")
        else:
            raise KeysetError(f"{where}: unknown protection method {method!r}")
        plain = cipher.decrypt(nonce, b64d(doc.get("sealed"), f"{where}: sealed part"),
                               _canonical(public))
    except InvalidTag:
        raise KeysetError(f"{where}: wrong passphrase or key-encryption key, or the file was "
                          f"altered") from None
    except ValueError as exc:
        if isinstance(exc, KeysetError):
            raise
        raise KeysetError(f"{where}: malformed protection block") from None
    try:
        return json.loads(plain)
    except json.JSONDecodeError:
        raise KeysetError(f"{where}: sealed part is not JSON") from None
