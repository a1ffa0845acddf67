"""Key management: keysets, envelope encryption for several recipients, key providers.

Every file (model, tensor batch) is encrypted under a fresh random **data key**
(DEK). The DEK never leaves memory in the clear: it is *wrapped* once per
recipient, and the wrapped copies form the file's **envelope** (format in
:mod:`gpucrypt.keys._envelope` and docs/KEYS.md), which the stream header carries.
Three wrappings exist:

==========================  ======================================================
stanza                      wraps the DEK with
==========================  ======================================================
``aes-kwp``                 a symmetric key-encryption key (KEK) from a keyset or a
                            :class:`KeyProvider`: AES key wrap with padding, RFC 5649
``hpke-x25519``             a recipient's X25519 public key: HPKE (RFC 9180) base
                            mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
                            ChaCha20-Poly1305, ``info = b"gpucrypt-envelope-v1"``
``hpke-mlkem768-x25519``    a post-quantum hybrid public key: the same HPKE with the
                            ML-KEM-768 + X25519 KEM
==========================  ======================================================

All three come from ``cryptography`` (``keywrap``, ``hazmat.primitives.hpke``);
nothing here implements a primitive.

Limits and rules:

- a data key is 16 to 64 bytes (gpucrypt makes 32); an envelope holds 1 to 255 stanzas;
- a keyset has exactly one primary key, used to wrap new data keys; ``enabled``
  keys still unwrap; ``disabled`` keys refuse until enabled again; ``destroyed``
  keys keep their id and lose their material for good;
- key objects never print their material (``repr``/``str`` show ids only);
- secret files are written 0600, atomically (temporary file in the same folder,
  fsync, rename, fsync of the folder);
- Python cannot wipe ``bytes``: dropping material (``destroy``) removes every
  reference gpucrypt holds, which is the best an interpreter allows.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.keywrap import (InvalidUnwrap, aes_key_unwrap_with_padding,
                                                    aes_key_wrap_with_padding)

from .. import audit
from . import _envelope
from ..files._atomic import write_atomically
from .._buffers import bytes_arg
from ._envelope import EnvelopeFormatError, Stanza

__all__ = [
    "KeyManagementError", "KeysetError", "KeyNotFound", "KeyUnavailable", "NoMatchingRecipient",
    "EnvelopeError", "KeysetKey", "Keyset", "Recipient", "Identity", "WrappingKey",
    "KeyProvider", "FileKeyProvider", "EnvKeyProvider", "CallableKeyProvider",
    "generate_dek", "seal_envelope", "open_envelope", "describe_envelope",
    "encrypt_file", "decrypt_file", "rekey_file",
    "PRIMARY", "ENABLED", "DISABLED", "DESTROYED", "HPKE_INFO", "DEK_SIZE",
]

# --------------------------------------------------------------------------- errors


class KeyManagementError(Exception):
    """Base of gpucrypt's key errors. Messages name key ids and files, never secrets."""


class KeysetError(KeyManagementError, ValueError):
    """A keyset, identity or recipient file is malformed, or its passphrase/KEK is wrong."""


class KeyNotFound(KeyManagementError, LookupError):
    """No key with this id."""


class KeyUnavailable(KeyManagementError):
    """The key exists but may not be used: disabled, or destroyed."""


class NoMatchingRecipient(KeyManagementError):
    """None of the given identities opens any stanza of the envelope."""


class EnvelopeError(KeyManagementError, ValueError):
    """The envelope is malformed, or a data key cannot be wrapped as asked."""


# --------------------------------------------------------------------------- constants

PRIMARY, ENABLED, DISABLED, DESTROYED = "primary", "enabled", "disabled", "destroyed"
_STATUSES = (PRIMARY, ENABLED, DISABLED, DESTROYED)

#: symmetric KEK algorithms a keyset can hold -> key size in bytes
KEK_ALGORITHMS = {"aes-256-kwp": 32}
DEFAULT_KEK_ALGORITHM = "aes-256-kwp"

#: HPKE ``info`` for every public-key stanza: binds the wrapping to this use
HPKE_INFO = b"gpucrypt-envelope-v1"
DEK_SIZE = 32
_DEK_MIN, _DEK_MAX = 16, 64

#: KEM name -> (stanza type, HPKE suite)
_KEMS = {
    "x25519": ("hpke-x25519",
               hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)),
    "mlkem768-x25519": ("hpke-mlkem768-x25519",
                        hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256,
                                   hpke.AEAD.CHACHA20_POLY1305)),
}
_KEM_OF_STANZA = {stanza: kem for kem, (stanza, _) in _KEMS.items()}
_MLKEM768_SEED, _MLKEM768_PUBLIC, _X25519_SIZE = 64, 1184, 32

KEYSET_FORMAT, IDENTITY_FORMAT, RECIPIENT_FORMAT = ("gpucrypt-keyset", "gpucrypt-identity",
                                                    "gpucrypt-recipient")
FILE_VERSION = 1

#: scrypt work factor for passphrase sealing: N = 2**17, r = 8, p = 1 (128 MiB, ~1.4 s measured here)
DEFAULT_SCRYPT_N = 2**17
_SCRYPT_MAX_N = 2**22  # refuse files that ask for more (4 GiB of memory): a denial of service


# --------------------------------------------------------------------------- small helpers


def _b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64d(text: Any, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise KeysetError(f"{what} is not valid base64") from None


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _read_json(path: str | os.PathLike, expected_format: str) -> dict:
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


# --------------------------------------------------------------------------- sealing of files
# A sealed document keeps its public part (ids, statuses, algorithm names) readable, so
# `gpucrypt keys list` works without the passphrase, and encrypts the secrets as one JSON
# object, with the canonical JSON of the public part as associated data: changing a
# status or an id in the file breaks the seal.


def _seal_document(public: dict, secret: dict, *, passphrase=None, kek=None, kek_id=None,
                   scrypt_n: int = DEFAULT_SCRYPT_N) -> dict:
    from ..aead import AESGCM, ChaCha20Poly1305

    nonce = os.urandom(12)
    if passphrase is not None:
        salt = os.urandom(16)
        protection = {"method": "passphrase", "kdf": "scrypt", "salt": _b64e(salt),
                      "n": int(scrypt_n), "r": 8, "p": 1, "aead": "chacha20-poly1305",
                      "nonce": _b64e(nonce)}
        key = Scrypt(salt=salt, length=32, n=int(scrypt_n), r=8, p=1).derive(
            _passphrase_bytes(passphrase))
        cipher: Any = ChaCha20Poly1305(key, device="cpu")
    else:
        kek = bytes(kek)
        if len(kek) != 32:
            raise ValueError("a key-encryption key for sealing must be 32 bytes (AES-256)")
        protection = {"method": "kek", "kek_id": kek_id, "aead": "aes-256-gcm",
                      "nonce": _b64e(nonce)}
        cipher = AESGCM(kek, device="cpu")
    doc = {**public, "protection": protection}
    doc["sealed"] = _b64e(cipher.encrypt(nonce, _canonical(secret), _canonical(doc)))
    return doc


def _open_document(doc: dict, where: str, *, passphrase=None, kek=None) -> dict:
    from ..aead import AESGCM, ChaCha20Poly1305

    protection = doc.get("protection")
    if protection is None:
        raise KeysetError(f"{where}: not sealed")
    if not isinstance(protection, dict):
        raise KeysetError(f"{where}: malformed protection block")
    method = protection.get("method")
    public = {k: v for k, v in doc.items() if k != "sealed"}
    nonce = _b64d(protection.get("nonce"), f"{where}: nonce")
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
            salt = _b64d(protection.get("salt"), f"{where}: salt")
            key = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(_passphrase_bytes(passphrase))
            cipher: Any = ChaCha20Poly1305(key, device="cpu")
        elif method == "kek":
            if kek is None:
                raise KeysetError(f"{where} is sealed by a key-encryption key "
                                  f"(id {protection.get('kek_id')!r}): give it with kek=")
            cipher = AESGCM(bytes(kek), device="cpu")
        else:
            raise KeysetError(f"{where}: unknown protection method {method!r}")
        plain = cipher.decrypt(nonce, _b64d(doc.get("sealed"), f"{where}: sealed part"),
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


# --------------------------------------------------------------------------- keysets


class KeysetKey:
    """One key of a keyset: ``id``, ``algorithm``, ``created`` (ISO 8601 UTC) and ``status``.

    The material is reachable only through :meth:`secret_bytes`, and never printed.
    """

    __slots__ = ("id", "algorithm", "created", "status", "_material")

    def __init__(self, id: str, algorithm: str, created: str, status: str,
                 material: bytes | None):
        self.id, self.algorithm, self.created, self.status = id, algorithm, created, status
        self._material = material

    def __repr__(self) -> str:
        return f"KeysetKey(id={self.id!r}, algorithm={self.algorithm!r}, status={self.status!r})"

    __str__ = __repr__

    @property
    def usable(self) -> bool:
        """True when the key may unwrap (primary or enabled)."""
        return self.status in (PRIMARY, ENABLED)

    def secret_bytes(self) -> bytes:
        """The key material; refuses for a disabled or destroyed key."""
        _require_usable(self)
        assert self._material is not None
        return self._material

    def metadata(self) -> dict:
        """Everything but the material (what ``keys list`` shows)."""
        return {"id": self.id, "algorithm": self.algorithm, "created": self.created,
                "status": self.status}


def _require_usable(key: KeysetKey) -> None:
    if key.status == DISABLED:
        raise KeyUnavailable(f"key {key.id} is disabled in this keyset: enable it again "
                             f"(gpucrypt keys enable) to use it")
    if key.status == DESTROYED:
        raise KeyUnavailable(f"key {key.id} was destroyed: its material is gone, and data "
                             f"wrapped only under it cannot be recovered")


def _refuse_primary(key: KeysetKey) -> KeysetKey:
    """``key``, unless it is the primary (KeyUnavailable: the keyset would have none)."""
    if key.status == PRIMARY:
        raise KeyUnavailable(f"key {key.id} is the primary: promote another key first")
    return key


def _new_key_id() -> str:
    return secrets.token_hex(8)


class Keyset:
    """An ordered set of symmetric key-encryption keys with one primary.

    ``Keyset.generate()`` makes one with a single primary key; :meth:`load` and
    :meth:`save` read and write the JSON file described in docs/KEYS.md. New data
    keys are wrapped under :attr:`primary`; unwrapping finds the key by the id the
    envelope records. A keyset is also a :class:`KeyProvider`.
    """

    def __init__(self, keys: Iterable[KeysetKey] = ()):
        self._keys: dict[str, KeysetKey] = {}
        for key in keys:
            if key.id in self._keys:
                raise KeysetError(f"duplicate key id {key.id}")
            if key.status not in _STATUSES:
                raise KeysetError(f"key {key.id}: unknown status {key.status!r}")
            self._keys[key.id] = key
        primaries = [k for k in self._keys.values() if k.status == PRIMARY]
        if self._keys and len(primaries) != 1:
            raise KeysetError(f"a keyset has exactly one primary key, this one has {len(primaries)}")
        self._seal: dict | None = None  # how it was loaded, so save() keeps it sealed

    def __repr__(self) -> str:
        primary = next((k.id for k in self._keys.values() if k.status == PRIMARY), None)
        return f"Keyset(primary={primary!r}, keys={list(self._keys)})"

    __str__ = __repr__

    # --- creation, files
    @classmethod
    def generate(cls, algorithm: str = DEFAULT_KEK_ALGORITHM) -> "Keyset":
        """A new keyset holding one fresh primary key."""
        keyset = cls([_fresh_key(algorithm, PRIMARY)])
        audit.event("keyset.generate", key_id=keyset.primary.id, algorithm=algorithm)
        return keyset

    @classmethod
    def inspect(cls, path: str | os.PathLike) -> dict:
        """The file's public part: ``{"keys": [metadata...], "protection": method or None}``,
        readable without the passphrase."""
        doc = _read_json(path, KEYSET_FORMAT)
        keys = doc.get("keys")
        if not isinstance(keys, list):
            raise KeysetError(f"{os.fspath(path)}: malformed keyset (no key list)")
        protection = doc.get("protection")
        return {"keys": [{k: v for k, v in entry.items() if k != "material"} for entry in keys],
                "protection": protection.get("method") if isinstance(protection, dict) else None}

    @classmethod
    def load(cls, path: str | os.PathLike, passphrase: str | bytes | None = None, *,
             kek: bytes | None = None) -> "Keyset":
        """Read a keyset file; a sealed one needs its ``passphrase`` or ``kek``.

        Raises :class:`KeysetError` for a malformed file or a wrong passphrase/KEK.
        """
        where = os.fspath(path)
        with audit.timed("keyset.load", path=where) as ev:
            doc = _read_json(path, KEYSET_FORMAT)
            entries = doc.get("keys")
            if not isinstance(entries, list):
                raise KeysetError(f"{where}: malformed keyset (no key list)")
            if "protection" in doc:
                materials = _open_document(doc, where, passphrase=passphrase, kek=kek)
                if not isinstance(materials, dict):
                    raise KeysetError(f"{where}: malformed sealed part")
            else:
                materials = {e.get("id"): e.get("material") for e in entries
                             if isinstance(e, dict) and "material" in e}
            keys = []
            for entry in entries:
                keys.append(_key_from_entry(entry, materials, where))
            keyset = cls(keys)
            if "protection" in doc:
                keyset._seal = {"passphrase": passphrase, "kek": kek,
                                "kek_id": doc["protection"].get("kek_id"),
                                "scrypt_n": doc["protection"].get("n", DEFAULT_SCRYPT_N)}
            ev["count"] = len(keys)
            ev["key_id"] = keyset.primary.id
        return keyset

    def save(self, path: str | os.PathLike, passphrase: str | bytes | None = None, *,
             kek: bytes | None = None, kek_id: str | None = None,
             scrypt_n: int | None = None, unsealed: bool = False) -> None:
        """Write the keyset to ``path`` (0600, atomically).

        With ``passphrase`` (scrypt + ChaCha20-Poly1305) or ``kek`` (32 bytes, AES-256-GCM)
        the materials are sealed. A keyset loaded sealed stays sealed with the same
        secret unless another is given, or ``unsealed=True`` asks for plain JSON.
        """
        if not self._keys:  # a keyset file without a primary key could not be loaded back
            raise KeysetError("the keyset has no keys: add one (Keyset.generate) before saving")
        if passphrase is None and kek is None and not unsealed and self._seal is not None:
            passphrase, kek = self._seal["passphrase"], self._seal["kek"]
            kek_id = kek_id or self._seal["kek_id"]
            scrypt_n = scrypt_n or self._seal["scrypt_n"]
        public = {"format": KEYSET_FORMAT, "version": FILE_VERSION,
                  "keys": [k.metadata() for k in self._keys.values()]}
        if passphrase is None and kek is None:
            for entry, key in zip(public["keys"], self._keys.values()):
                if key._material is not None:
                    entry["material"] = _b64e(key._material)
            doc = public
            method = None
        else:
            materials = {k.id: _b64e(k._material) for k in self._keys.values()
                         if k._material is not None}
            doc = _seal_document(public, materials, passphrase=passphrase, kek=kek, kek_id=kek_id,
                                 scrypt_n=scrypt_n or DEFAULT_SCRYPT_N)
            method = doc["protection"]["method"]
            self._seal = {"passphrase": passphrase, "kek": kek, "kek_id": kek_id,
                          "scrypt_n": scrypt_n or DEFAULT_SCRYPT_N}
        write_atomically(path, json.dumps(doc, indent=2).encode("utf-8") + b"\n", 0o600)
        audit.event("keyset.save", path=os.fspath(path), count=len(self._keys),
                    key_id=self.primary.id, status=method or "unsealed")

    # --- reading
    def __iter__(self) -> Iterator[KeysetKey]:
        return iter(list(self._keys.values()))

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def primary(self) -> KeysetKey:
        """The key that wraps new data keys."""
        for key in self._keys.values():
            if key.status == PRIMARY:
                return key
        raise KeyNotFound("this keyset is empty: it has no primary key")

    def _find(self, key_id: str) -> KeysetKey:
        try:
            return self._keys[key_id]
        except KeyError:
            raise KeyNotFound(f"no key {key_id!r} in this keyset (it holds "
                              f"{', '.join(self._keys) or 'nothing'})") from None

    def get(self, key_id: str) -> KeysetKey:
        """The key ``key_id``, if it may be used; :class:`KeyUnavailable` for a disabled
        or destroyed key, :class:`KeyNotFound` for an unknown id."""
        key = self._find(key_id)
        _require_usable(key)
        return key

    def get_key(self, key_id: str) -> bytes:
        """:class:`KeyProvider` interface: the material of a usable key."""
        return self.get(key_id).secret_bytes()

    # --- changes
    def add(self, algorithm: str = DEFAULT_KEK_ALGORITHM, *, primary: bool = False) -> KeysetKey:
        """Add a fresh ``enabled`` key (or make it the primary at once) and return it."""
        key = _fresh_key(algorithm, ENABLED)
        self._keys[key.id] = key
        audit.event("keyset.add", key_id=key.id, algorithm=algorithm, status=ENABLED)
        if primary:
            self.promote(key.id)
        return key

    def _find_not_destroyed(self, key_id: str) -> KeysetKey:
        """The key ``key_id``; KeyNotFound if absent, KeyUnavailable if destroyed."""
        key = self._find(key_id)
        if key.status == DESTROYED:
            _require_usable(key)
        return key

    def promote(self, key_id: str) -> KeysetKey:
        """Make ``key_id`` (enabled or disabled) the primary; the old primary stays enabled."""
        key = self._find_not_destroyed(key_id)
        for other in self._keys.values():
            if other.status == PRIMARY:
                other.status = ENABLED
        key.status = PRIMARY
        audit.event("keyset.promote", key_id=key.id, status=PRIMARY)
        return key

    def enable(self, key_id: str) -> KeysetKey:
        """Let a disabled key unwrap again."""
        key = self._find_not_destroyed(key_id)
        if key.status == DISABLED:
            key.status = ENABLED
        audit.event("keyset.enable", key_id=key.id, status=key.status)
        return key

    def disable(self, key_id: str) -> KeysetKey:
        """Stop a key from unwrapping (reversible). The primary cannot be disabled."""
        key = _refuse_primary(self._find_not_destroyed(key_id))
        key.status = DISABLED
        audit.event("keyset.disable", key_id=key.id, status=DISABLED)
        return key

    def destroy(self, key_id: str) -> KeysetKey:
        """Drop a key's material for good; its id stays, marked ``destroyed``."""
        key = _refuse_primary(self._find(key_id))
        key.status, key._material = DESTROYED, None
        audit.event("keyset.destroy", key_id=key.id, status=DESTROYED)
        return key


def _fresh_key(algorithm: str, status: str) -> KeysetKey:
    if algorithm not in KEK_ALGORITHMS:
        raise ValueError(f"unknown key algorithm {algorithm!r}; choose one of {sorted(KEK_ALGORITHMS)}")
    return KeysetKey(_new_key_id(), algorithm, _now(), status, os.urandom(KEK_ALGORITHMS[algorithm]))


def _key_from_entry(entry: Any, materials: dict, where: str) -> KeysetKey:
    if not isinstance(entry, dict) or not all(isinstance(entry.get(f), str) for f in
                                              ("id", "algorithm", "created", "status")):
        raise KeysetError(f"{where}: malformed key entry")
    key_id, algorithm, status = entry["id"], entry["algorithm"], entry["status"]
    if algorithm not in KEK_ALGORITHMS:
        raise KeysetError(f"{where}: key {key_id}: unknown algorithm {algorithm!r}")
    if status not in _STATUSES:
        raise KeysetError(f"{where}: key {key_id}: unknown status {status!r}")
    material = None
    if status != DESTROYED:
        if materials.get(key_id) is None:
            raise KeysetError(f"{where}: key {key_id} has no material")
        material = _b64d(materials[key_id], f"{where}: key {key_id}")
        if len(material) != KEK_ALGORITHMS[algorithm]:
            raise KeysetError(f"{where}: key {key_id} has the wrong length for {algorithm}")
    return KeysetKey(key_id, algorithm, entry["created"], status, material)


# --------------------------------------------------------------------------- key providers


@runtime_checkable
class KeyProvider(Protocol):
    """Where symmetric key-encryption keys come from: a keyset file, an environment
    variable, a cloud KMS or an HSM.

    Contract: ``get_key(key_id)`` returns the key-encryption key called ``key_id``
    (32 bytes for AES-256 key wrap), or raises :class:`KeyNotFound` (a ``LookupError``)
    when it has no such key, or :class:`KeyUnavailable` when it has it but refuses.
    It must not return a key for an id it does not own: the id is how an envelope
    stanza names its key. Implementations may fetch lazily and cache.
    """

    def get_key(self, key_id: str) -> bytes: ...


class FileKeyProvider:
    """Keys from a keyset file, loaded on first use (``passphrase``/``kek`` if sealed)."""

    def __init__(self, path: str | os.PathLike, passphrase: str | bytes | None = None, *,
                 kek: bytes | None = None):
        self._path, self._passphrase, self._kek = os.fspath(path), passphrase, kek
        self._keyset: Keyset | None = None

    def __repr__(self) -> str:
        return f"FileKeyProvider({self._path!r})"

    @property
    def keyset(self) -> Keyset:
        if self._keyset is None:
            self._keyset = Keyset.load(self._path, self._passphrase, kek=self._kek)
        return self._keyset

    def get_key(self, key_id: str) -> bytes:
        return self.keyset.get_key(key_id)


class EnvKeyProvider:
    """One key from an environment variable, in hex (64 digits) or base64, answering to
    ``key_id``. The variable is read at each call, so rotating it needs no restart."""

    def __init__(self, key_id: str, variable: str = "GPUCRYPT_KEK"):
        self.key_id, self.variable = key_id, variable

    def __repr__(self) -> str:
        return f"EnvKeyProvider(key_id={self.key_id!r}, variable={self.variable!r})"

    def get_key(self, key_id: str) -> bytes:
        if key_id != self.key_id:
            raise KeyNotFound(f"environment key provider holds key {self.key_id!r}, not {key_id!r}")
        text = os.environ.get(self.variable)
        if not text:
            raise KeyNotFound(f"environment variable {self.variable} is not set")
        return _parse_key_text(text.strip(), f"environment variable {self.variable}")


def _parse_key_text(text: str, where: str) -> bytes:
    if len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    standard = text.replace("-", "+").replace("_", "/")  # base64url accepted too
    standard += "=" * (-len(standard) % 4)
    try:
        key = base64.b64decode(standard, validate=True)
    except (binascii.Error, ValueError):
        raise KeysetError(f"{where}: a key must be 64 hex digits or base64") from None
    if len(key) != 32:
        raise KeysetError(f"{where}: a key must be 32 bytes, this one is {len(key)}")
    return key


class CallableKeyProvider:
    """Wrap any ``func(key_id) -> bytes`` (a KMS client call, say) as a provider. The
    function signals an unknown id by raising ``LookupError`` (or ``KeyError``)."""

    def __init__(self, func: Callable[[str], bytes], name: str = "callable"):
        self._func, self._name = func, name

    def __repr__(self) -> str:
        return f"CallableKeyProvider({self._name!r})"

    def get_key(self, key_id: str) -> bytes:
        try:
            key = self._func(key_id)
        except KeyManagementError:
            raise
        except LookupError:
            raise KeyNotFound(f"{self._name} key provider has no key {key_id!r}") from None
        if key is None:
            raise KeyNotFound(f"{self._name} key provider has no key {key_id!r}")
        return bytes(key)


class WrappingKey:
    """A symmetric key-encryption key with an id: as a recipient it wraps with AES-KWP,
    as an identity it unwraps stanzas carrying its id. Build one from bytes, or from a
    provider with :meth:`from_provider` (the material is fetched when needed)."""

    def __init__(self, key_id: str, key: bytes | None = None, *,
                 provider: KeyProvider | None = None):
        if (key is None) == (provider is None):
            raise TypeError("give exactly one of key= and provider=")
        if key is not None and len(bytes(key)) not in (16, 24, 32):
            raise ValueError("an AES key-wrap key must be 16, 24 or 32 bytes")
        self.key_id, self._key, self._provider = key_id, (bytes(key) if key else None), provider

    @classmethod
    def from_provider(cls, provider: KeyProvider, key_id: str) -> "WrappingKey":
        return cls(key_id, provider=provider)

    def __repr__(self) -> str:
        return f"WrappingKey(id={self.key_id!r})"

    def secret_bytes(self) -> bytes:
        if self._key is not None:
            return self._key
        assert self._provider is not None
        return self._provider.get_key(self.key_id)


# --------------------------------------------------------------------------- public-key recipients


def _fingerprint(kem: str, public: bytes) -> str:
    digest = hashlib.sha256(b"gpucrypt-recipient-v1\x00" + kem.encode() + b"\x00" + public)
    return f"{kem}:{digest.hexdigest()[:32]}"


class Recipient:
    """A public key data keys can be wrapped for: ``kem`` is ``"x25519"`` or
    ``"mlkem768-x25519"`` (post-quantum hybrid). ``fingerprint`` names it in envelopes
    and audit logs (``"x25519:" + 32 hex digits``, the first 16 bytes of a SHA-256)."""

    def __init__(self, kem: str, public_bytes: bytes):
        if kem not in _KEMS:
            raise ValueError(f"unknown KEM {kem!r}; choose one of {sorted(_KEMS)}")
        self.kem, self.public_bytes = kem, bytes(public_bytes)
        self._public_key = _load_public(kem, self.public_bytes)  # validates
        self.fingerprint = _fingerprint(kem, self.public_bytes)

    def __repr__(self) -> str:
        return f"Recipient({self.fingerprint!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipient) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    @property
    def stanza_id(self) -> bytes:
        return bytes.fromhex(self.fingerprint.split(":", 1)[1])

    def to_json(self) -> dict:
        return {"format": RECIPIENT_FORMAT, "version": FILE_VERSION, "kem": self.kem,
                "public_key": _b64e(self.public_bytes), "fingerprint": self.fingerprint}

    def save(self, path: str | os.PathLike) -> None:
        """Write the public file (0644: it is meant to be shared)."""
        write_atomically(path, json.dumps(self.to_json(), indent=2).encode() + b"\n", 0o644)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipient":
        """Read a recipient file; an identity file is accepted too (its public half is used)."""
        try:
            return Identity.load(path).recipient if _file_format(path) == IDENTITY_FORMAT \
                else cls._from_doc(_read_json(path, RECIPIENT_FORMAT), os.fspath(path))
        except KeysetError as exc:
            if "sealed with a passphrase" in str(exc):
                raise KeysetError(f"{os.fspath(path)} is a sealed identity: use its .pub "
                                  f"recipient file") from None
            raise

    @classmethod
    def _from_doc(cls, doc: dict, where: str) -> "Recipient":
        return _checked_key(
            lambda: cls(doc.get("kem"), _b64d(doc.get("public_key"), f"{where}: public key")),
            doc, where, "public")


def _checked_key(make: Callable[[], Any], doc: dict, where: str, half: str) -> Any:
    """``make()`` (a Recipient or Identity built from the file ``where``'s document ``doc``),
    its ValueErrors reported as KeysetError "invalid {half} key"; KeysetError too when
    ``doc`` records a fingerprint that is not the key's."""
    try:
        key = make()
    except ValueError as exc:
        if isinstance(exc, KeysetError):
            raise
        raise KeysetError(f"{where}: invalid {half} key ({exc})") from None
    if doc.get("fingerprint") not in (None, key.fingerprint):
        raise KeysetError(f"{where}: the fingerprint does not match the {half} key")
    return key


def _file_format(path) -> str | None:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def _load_public(kem: str, public: bytes):
    if kem == "x25519":
        if len(public) != _X25519_SIZE:
            raise ValueError("an X25519 public key is 32 bytes")
        return x25519.X25519PublicKey.from_public_bytes(public)
    if len(public) != _MLKEM768_PUBLIC + _X25519_SIZE:
        raise ValueError(f"an ML-KEM-768 + X25519 public key is {_MLKEM768_PUBLIC + 32} bytes")
    return hpke.MLKEM768X25519PublicKey(
        mlkem.MLKEM768PublicKey.from_public_bytes(public[:_MLKEM768_PUBLIC]),
        x25519.X25519PublicKey.from_public_bytes(public[_MLKEM768_PUBLIC:]))


class Identity:
    """A private key that opens stanzas wrapped for its :attr:`recipient`.

    Stored material: X25519, the 32-byte private key; ML-KEM-768 + X25519, the
    64-byte ML-KEM seed followed by the 32-byte X25519 private key."""

    def __init__(self, kem: str, private_bytes: bytes, created: str | None = None):
        if kem not in _KEMS:
            raise ValueError(f"unknown KEM {kem!r}; choose one of {sorted(_KEMS)}")
        self.kem, self._private_bytes, self.created = kem, bytes(private_bytes), created or _now()
        if kem == "x25519":
            if len(self._private_bytes) != _X25519_SIZE:
                raise ValueError("an X25519 private key is 32 bytes")
            self._x = x25519.X25519PrivateKey.from_private_bytes(self._private_bytes)
            self._private_key: Any = self._x
            public = self._x.public_key().public_bytes_raw()
        else:
            if len(self._private_bytes) != _MLKEM768_SEED + _X25519_SIZE:
                raise ValueError("an ML-KEM-768 + X25519 private key is 96 bytes (seed + X25519)")
            m = mlkem.MLKEM768PrivateKey.from_seed_bytes(self._private_bytes[:_MLKEM768_SEED])
            self._x = x25519.X25519PrivateKey.from_private_bytes(self._private_bytes[_MLKEM768_SEED:])
            self._private_key = hpke.MLKEM768X25519PrivateKey(m, self._x)
            public = m.public_key().public_bytes_raw() + self._x.public_key().public_bytes_raw()
        self.recipient = Recipient(kem, public)

    def __repr__(self) -> str:
        return f"Identity({self.recipient.fingerprint!r})"

    __str__ = __repr__

    @property
    def fingerprint(self) -> str:
        return self.recipient.fingerprint

    @classmethod
    def generate(cls, kem: str = "x25519") -> "Identity":
        """A fresh key pair."""
        if kem == "x25519":
            private = x25519.X25519PrivateKey.generate().private_bytes_raw()
        elif kem == "mlkem768-x25519":
            private = (mlkem.MLKEM768PrivateKey.generate().private_bytes_raw()
                       + x25519.X25519PrivateKey.generate().private_bytes_raw())
        else:
            raise ValueError(f"unknown KEM {kem!r}; choose one of {sorted(_KEMS)}")
        identity = cls(kem, private)
        audit.event("identity.generate", key_id=identity.fingerprint, algorithm=_KEMS[kem][0])
        return identity

    def save(self, path: str | os.PathLike, passphrase: str | bytes | None = None, *,
             scrypt_n: int = DEFAULT_SCRYPT_N) -> None:
        """Write the private file (0600, atomically), sealed when ``passphrase`` is given."""
        public = {"format": IDENTITY_FORMAT, "version": FILE_VERSION, "kem": self.kem,
                  "created": self.created, "public_key": _b64e(self.recipient.public_bytes),
                  "fingerprint": self.fingerprint}
        secret = {"private_key": _b64e(self._private_bytes)}
        doc = (_seal_document(public, secret, passphrase=passphrase, scrypt_n=scrypt_n)
               if passphrase is not None else {**public, **secret})
        write_atomically(path, json.dumps(doc, indent=2).encode() + b"\n", 0o600)

    @classmethod
    def load(cls, path: str | os.PathLike, passphrase: str | bytes | None = None) -> "Identity":
        where = os.fspath(path)
        doc = _read_json(path, IDENTITY_FORMAT)
        secret = (_open_document(doc, where, passphrase=passphrase) if "protection" in doc
                  else doc)
        return _checked_key(
            lambda: cls(doc.get("kem"), _b64d(secret.get("private_key"), f"{where}: private key"),
                        doc.get("created")),
            doc, where, "private")

    def _unwrap(self, body: bytes) -> bytes:
        return _KEMS[self.kem][1].decrypt(body, self._private_key, info=HPKE_INFO)


# --------------------------------------------------------------------------- envelopes


def generate_dek() -> bytes:
    """A fresh random data key (32 bytes)."""
    return os.urandom(DEK_SIZE)


def _stanza_label(stanza: Stanza) -> str:
    if stanza.kind == "aes-kwp":
        return "aes-kwp:" + stanza.recipient_id.decode("utf-8", "replace")
    return f"{_KEM_OF_STANZA[stanza.kind]}:{stanza.recipient_id.hex()}"


def describe_envelope(envelope: bytes) -> list[str]:
    """Who the envelope is for, one label per stanza: ``"aes-kwp:<key id>"`` or a
    recipient fingerprint ``"x25519:<hex>"``. Needs no key."""
    return [_stanza_label(s) for s in _decode(envelope)]


def _decode(envelope: bytes) -> list[Stanza]:
    try:
        return _envelope.decode(envelope)
    except EnvelopeFormatError as exc:
        raise EnvelopeError(f"malformed envelope: {exc}") from None


def _as_recipients(recipients: Any) -> list:
    if isinstance(recipients, (Recipient, Identity, Keyset, KeysetKey, WrappingKey)):
        return [recipients]
    return list(recipients)


def _check_dek(dek: Any) -> bytes:
    dek = bytes_arg(dek, "dek")
    if not _DEK_MIN <= len(dek) <= _DEK_MAX:
        raise ValueError(f"a data key must be {_DEK_MIN} to {_DEK_MAX} bytes, not {len(dek)}")
    return dek


def seal_envelope(dek: bytes, recipients: Any) -> bytes:
    """Wrap ``dek`` once for each recipient and return the envelope bytes.

    ``recipients``: one or a sequence of :class:`Recipient` (HPKE), :class:`Identity`
    (its public half), :class:`Keyset` (its primary key, AES-KWP), :class:`KeysetKey`
    or :class:`WrappingKey` (AES-KWP). Duplicates are wrapped once. Raises
    ``ValueError`` for no recipient or more than 255, :class:`KeyUnavailable` for a
    disabled or destroyed keyset key.
    """
    dek = _check_dek(dek)
    stanzas, labels = [], []
    with audit.timed("envelope.seal") as ev:
        for item in _as_recipients(recipients):
            if isinstance(item, Identity):
                item = item.recipient
            if isinstance(item, Keyset):
                item = item.primary
            if isinstance(item, Recipient):
                kind, suite = _KEMS[item.kem]
                stanza = Stanza(kind, item.stanza_id,
                                suite.encrypt(dek, item._public_key, info=HPKE_INFO))
            elif isinstance(item, (KeysetKey, WrappingKey)):
                key_id = item.id if isinstance(item, KeysetKey) else item.key_id
                stanza = Stanza("aes-kwp", key_id.encode("utf-8"),
                                aes_key_wrap_with_padding(item.secret_bytes(), dek))
            else:
                raise TypeError(f"cannot wrap a data key for a {type(item).__name__}: give "
                                f"Recipient, Identity, Keyset, KeysetKey or WrappingKey objects")
            label = _stanza_label(stanza)
            if label not in labels:
                stanzas.append(stanza)
                labels.append(label)
        if not stanzas:
            raise ValueError("seal_envelope needs at least one recipient")
        ev.update(recipients=labels, count=len(stanzas))
        return _envelope.encode(stanzas)


def _as_identities(identities: Any) -> list:
    if identities is None:
        return []
    items = list(identities) if isinstance(identities, (list, tuple, set, frozenset)) else [identities]
    for item in items:
        if isinstance(item, Recipient):
            raise TypeError(f"{item!r} is a public key: opening an envelope needs the private "
                            f"Identity (the identity file, not the .pub file)")
        if not isinstance(item, (Identity, KeysetKey, WrappingKey, KeyProvider)):
            raise TypeError(f"cannot open an envelope with a {type(item).__name__}: give Identity, "
                            f"Keyset, KeysetKey, WrappingKey or KeyProvider objects")
    return items


def open_envelope(envelope: bytes, identities: Any) -> bytes:
    """The data key, unwrapped by the first stanza one of ``identities`` opens.

    ``identities``: one or a sequence of :class:`Identity`, :class:`Keyset`,
    :class:`KeysetKey`, :class:`WrappingKey` or any :class:`KeyProvider`. A stanza is
    tried only with identities that own its id (a fingerprint or key id). Raises
    :class:`NoMatchingRecipient` ("no recipient in this file matches your key(s)",
    with why for each near miss: a disabled key, a failed unwrap) when none opens,
    :class:`EnvelopeError` when the envelope is malformed.
    """
    candidates = _as_identities(identities)
    with audit.timed("envelope.open") as ev:
        stanzas = _decode(envelope)
        ev["recipients"] = [_stanza_label(s) for s in stanzas]
        notes: list[str] = []
        for stanza in stanzas:
            for identity in candidates:
                try:
                    dek = _try_open(stanza, identity)
                except KeyNotFound:
                    continue
                except (KeyUnavailable, KeysetError) as exc:
                    notes.append(str(exc))
                    continue
                except (InvalidUnwrap, InvalidTag, ValueError):
                    notes.append(f"the wrapped key for {_stanza_label(stanza)} failed to "
                                 f"authenticate: the envelope was altered or made with another key")
                    continue
                if dek is not None:
                    ev["key_id"] = _stanza_label(stanza)
                    return dek
        detail = "; ".join(dict.fromkeys(notes))
        raise NoMatchingRecipient("no recipient in this file matches your key(s)"
                                  + (f" ({detail})" if detail else ""))


def _try_open(stanza: Stanza, identity: Any) -> bytes | None:
    """The DEK if ``identity`` owns ``stanza`` and unwraps it; None if it does not own it."""
    if stanza.kind == "aes-kwp":
        key_id = stanza.recipient_id.decode("utf-8", "replace")
        if isinstance(identity, KeysetKey):
            if identity.id != key_id:
                return None
            kek = identity.secret_bytes()
        elif isinstance(identity, WrappingKey):
            if identity.key_id != key_id:
                return None
            kek = identity.secret_bytes()
        elif isinstance(identity, KeyProvider):  # a Keyset included
            kek = identity.get_key(key_id)
        else:
            return None
        return aes_key_unwrap_with_padding(kek, stanza.body)
    if isinstance(identity, Identity) and _KEMS[identity.kem][0] == stanza.kind \
            and identity.recipient.stanza_id == stanza.recipient_id:
        return identity._unwrap(stanza.body)
    return None


# --------------------------------------------------------------------------- files (on gpucrypt.stream)


def _header_field(header: Any, name: str) -> Any:
    return header.get(name) if isinstance(header, dict) else getattr(header, name, None)


def _primary_key_id(recipients: list) -> str | None:
    for item in recipients:
        if isinstance(item, Keyset):
            return item.primary.id
        if isinstance(item, KeysetKey):
            return item.id
        if isinstance(item, WrappingKey):
            return item.key_id
    return None


def _gather(recipients: Any, keyset: Keyset | None) -> list:
    items = [] if recipients is None else _as_recipients(recipients)
    if keyset is not None:
        items.append(keyset)
    if not items:
        raise ValueError("give recipients= and/or keyset=")
    return items


def encrypt_file(src: Any, dst: Any, *, recipients: Any = None, keyset: Keyset | None = None,
                 **stream_options: Any) -> dict:
    """Encrypt ``src`` to ``dst`` with :func:`gpucrypt.stream.encrypt` under a fresh data
    key wrapped for every recipient and/or the keyset's primary key.

    The header records the envelope and ``key_id`` (the keyset's primary id, or None
    for public-key recipients only). ``stream_options`` pass through (``algorithm``,
    ``device``, ...). Returns ``{"key_id", "recipients"}``.
    """
    from ..files import stream

    items = _gather(recipients, keyset)
    path = src if isinstance(src, (str, os.PathLike)) else None
    with audit.timed("file.encrypt", path=os.fspath(path) if path else None) as ev:
        dek = generate_dek()
        envelope = seal_envelope(dek, items)
        key_id = _primary_key_id(items)
        labels = describe_envelope(envelope)
        ev.update(key_id=key_id, recipients=labels)
        header = stream.encrypt(src, dst, dek, key_id=key_id, envelope=envelope, **stream_options)
        _note_stream_result(ev, header, stream_options, src)
    return {"key_id": key_id, "recipients": labels}


def _note_stream_result(ev: dict, header: Any, options: dict, plaintext: Any) -> None:
    """Audit fields from the stream's returned header and the plaintext's size."""
    ev["device"] = str(options.get("device", "auto"))
    algorithm = _header_field(header, "algorithm")
    if isinstance(algorithm, str):
        ev["algorithm"] = algorithm
    size = _size_of(plaintext)
    if size is not None:
        ev["bytes"] = size


def _size_of(obj: Any) -> int | None:
    if isinstance(obj, (str, os.PathLike)):
        try:
            return os.path.getsize(obj)
        except OSError:
            return None
    try:
        return memoryview(obj).nbytes
    except TypeError:
        return None


def _identities_for(identities: Any, keyset: Keyset | None) -> list:
    items = _as_identities(identities)
    if keyset is not None:
        items.append(keyset)
    if not items:
        raise ValueError("give identities= and/or keyset=")
    return items


def _file_envelope(src: Any) -> tuple[bytes, Any]:
    from ..files import stream

    if hasattr(src, "read") and hasattr(src, "seek"):
        start = src.tell()
        header = stream.read_header(src)
        src.seek(start)  # the stream reads the header again
    else:
        header = stream.read_header(src)
    envelope = _header_field(header, "envelope")
    if not envelope:
        raise NoMatchingRecipient("this file carries no envelope: it was encrypted with a raw "
                                  "key, not for recipients or a keyset")
    return envelope, header


def decrypt_file(src: Any, dst: Any, *, identities: Any = None, keyset: Keyset | None = None,
                 **stream_options: Any) -> dict:
    """Decrypt ``src`` (made by :func:`encrypt_file`, or any stream file with an envelope)
    to ``dst``, unwrapping the data key with ``identities`` and/or ``keyset``.

    :class:`NoMatchingRecipient` when no key opens the envelope (nothing is written
    then); the stream's own errors for altered data. Returns ``{"key_id"}``.
    """
    from ..files import stream

    path = src if isinstance(src, (str, os.PathLike)) else None
    with audit.timed("file.decrypt", path=os.fspath(path) if path else None) as ev:
        envelope, header = _file_envelope(src)
        ev["recipients"] = describe_envelope(envelope)
        ev["key_id"] = _header_field(header, "key_id")
        dek = open_envelope(envelope, _identities_for(identities, keyset))
        verified = stream.decrypt(src, dst, dek, **stream_options)
        _note_stream_result(ev, verified, stream_options, dst)
    return {"key_id": _header_field(header, "key_id")}


def rekey_file(path: str | os.PathLike, *, recipients: Any = None, keyset: Keyset | None = None,
               identities: Any = None, old_keyset: Keyset | None = None) -> dict:
    """Re-wrap a file's data key for new recipients and rewrite only its header.

    The old envelope is opened with ``identities`` and/or ``old_keyset`` (``keyset``
    when neither is given: rotation within one keyset), a new one is sealed for
    ``recipients`` and/or ``keyset``'s current primary, and
    :func:`gpucrypt.stream.replace_envelope` writes it. Leaving a recipient out revokes
    it for this file from now on. The segments are not re-encrypted: whoever kept the
    data key (or an old copy of the file) can still read that copy.
    Returns ``{"key_id", "recipients", "previous_recipients"}``.
    """
    from ..files import stream

    new_items = _gather(recipients, keyset)
    if identities is None and old_keyset is None:
        old = _identities_for(None, keyset)
    else:
        old = _identities_for(identities, old_keyset)
    with audit.timed("file.rekey", path=os.fspath(path)) as ev:
        envelope, _ = _file_envelope(path)
        previous = describe_envelope(envelope)
        ev["key_ids"] = previous
        dek = open_envelope(envelope, old)
        new_envelope = seal_envelope(dek, new_items)
        key_id = _primary_key_id(new_items)
        labels = describe_envelope(new_envelope)
        ev.update(key_id=key_id, recipients=labels)
        stream.replace_envelope(path, dek, new_envelope, key_id=key_id)
    return {"key_id": key_id, "recipients": labels, "previous_recipients": previous}
