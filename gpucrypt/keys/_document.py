"""Key files on disk: the JSON documents that keysets and identities are saved as.

Every such file is a JSON object with ``format`` and ``version`` (the number 1), read
strictly (:func:`strict_json`: no member twice, no ``NaN``). A *sealed* file keeps
its public part (ids, statuses, algorithm names) readable, so ``gpucrypt keys list``
works without the passphrase, and encrypts its secrets as one JSON object, with the
canonical JSON of the public part as associated data: changing a status or an id in
the file breaks the seal. Two protections exist (docs/KEYS.md):

- ``passphrase``: scrypt (N = 2**17, r = 8, p = 1 by default) then ChaCha20-Poly1305;
- ``kek``: a 32-byte key-encryption key, AES-256-GCM.

scrypt's bounds are :mod:`~gpucrypt.keys.passphrase`'s: files are written with N from
2**MIN_LOG_N to 2**MAX_LOG_N (r = 8, p = 1); a file is read when it asks for r = 8, p = 1
and N a power of 2 up to 2**MAX_LOG_N (:func:`~gpucrypt.keys.passphrase.readable_log_n`,
the check a passphrase-encrypted file's stanza passes too), refused before any work.

Used by :mod:`~gpucrypt.keys.keyset` and :mod:`~gpucrypt.keys.recipients`. Imports the
ground floor (:mod:`gpucrypt._errors`), :mod:`~gpucrypt.keys.passphrase` and, when sealing,
:mod:`gpucrypt.aead`.
"""
from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import json
import os
import stat
from datetime import datetime, timezone
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .._buffers import bytes_arg
from .._errors import KeysetError
from . import passphrase as _passphrase

FILE_VERSION = 1

#: scrypt work factor for passphrase sealing: N = 2**17, r = 8, p = 1 (128 MiB, ~1.4 s measured here)
DEFAULT_SCRYPT_N = 2**17


def printable_text(text: str) -> str:
    """``text`` from a file, as it may be shown: a terminal's escape sequences and line
    breaks in it (a forged "decrypted OK" line, a retitled window) escaped, and every
    other character that does not print (a lone surrogate included). Here, below every
    module that words messages with what a file holds (key ids, stanza ids)."""
    return text if text.isprintable() else "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


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


def write_key_file(path: str | os.PathLike, data: bytes, *, replace: bool, what: str,
                   refusal: str | None = None, keep: os.stat_result | None = None) -> None:
    """Write a private key file (0600, atomically). ``replace=False``: an existing file at
    ``path`` is left as it is (:class:`KeysetError`, also when one appears while this
    writes): a key file written over is keys lost, and whatever was encrypted to them.
    ``refusal``: that error's message, where the caller knows better than "this {what}
    was not read from it" (it was, before it was saved elsewhere).

    ``keep``: the ``fstat`` of the file replaced, given only when it is the key object's
    own file (the one it was loaded from or last saved to), locked and found unchanged,
    so that what is kept is the owner of the very bytes checked. The new file then keeps
    that owner and group where this process may set them
    (:func:`~gpucrypt.files._atomic._keep_owner`, as data files rewritten in place keep
    theirs), and its mode if stricter than 0600: ``sudo gpucrypt keys add`` on a service's
    keyset left a root-owned file the service could no longer read, an outage at the
    rotation. Not its group or other bits, nor its ACLs, which would give others the keys
    (a key file is 0600; chmod it again, deliberately, if it is shared). Not the owner at
    all in a folder others may write to (``/tmp``): there a file's owner is whoever made
    it first, and the keys are the saver's. Without ``keep`` (a new file, or
    ``overwrite=True`` over another file: its owner says nothing about who should hold
    keys made now, and anyone may have planted it) the file is the saver's, 0600, as a
    data file written with ``--force`` is.

    ``path`` itself a symbolic link is refused (:class:`KeysetError`), as every output's
    is (:class:`~gpucrypt.files._atomic.AtomicFile`): callers pass the resolved path of
    the file a key object was read from, which may be reached through a link."""
    from ..files._atomic import AtomicFile, OutputExists

    try:
        with AtomicFile(path, 0o600, overwrite=replace) as f:
            if keep is not None:
                _keep_owner_and_mode(f.fileno(), keep, path)
            f.write(data)
    except OutputExists:
        raise KeysetError(refusal or
                          f"{os.fspath(path)} exists, and this {what} was not read from it: "
                          f"writing over it would destroy the keys it holds (and what was "
                          f"encrypted to them); save to a new path, or pass overwrite=True "
                          f"if that file is no longer needed") from None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        # AtomicFile's refusal of a link, with its advice: a KeysetError, as documented
        raise KeysetError(f"{os.fspath(path)}: {exc.strerror}") from None


def _keep_owner_and_mode(fd: int, old: os.stat_result, path: str | os.PathLike) -> None:
    """Give the unpublished key file ``fd`` the owner and group of ``old`` (the file at
    ``path`` it replaces, as locked and checked) where this process may, unless the folder
    is writable by others, and ``old``'s mode if stricter than 0600."""
    from ..files._atomic import _keep_owner

    try:
        shared = bool(os.stat(os.path.dirname(os.path.abspath(path))).st_mode & stat.S_IWOTH)
    except OSError:
        shared = True  # unknown: the saver's, as a new file is
    if not shared:
        _keep_owner(fd, old)
    mode = stat.S_IMODE(old.st_mode) & 0o600
    if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
        try:
            os.fchmod(fd, mode)
        except OSError as exc:  # a file system without modes (FAT, exFAT) keeps its own
            if exc.errno not in (errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise


def read_json(path: str | os.PathLike, expected_format: str) -> dict:
    return read_document(path, expected_format)[0]


def file_digest(path: str | os.PathLike) -> bytes | None:
    """SHA-256 of the file's bytes now, None when there is no such file."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).digest()
    except FileNotFoundError:
        return None


#: what each kind of key file is, said when another kind was expected (a recipient's
#: public file given where its private identity goes is the usual mix-up)
_KINDS = {
    "gpucrypt-recipient": "a recipient file, a public key: it encrypts to its identity "
                          "(recipients=, -r); to decrypt, give that private identity file",
    "gpucrypt-identity": "an identity file, a private key (identities=, -i)",
    "gpucrypt-keyset": "a keyset file (keyset=, --keyset)",
}


class UnreadableKeyFile(KeysetError):
    """The key file is missing or cannot be read, or is not a key file of the kind and
    version asked for: the wrong file was named (the command line's usage error, exit 2),
    where a file of the right kind that is damaged or does not open is a failure of the
    data (exit 1)."""


def read_document(path: str | os.PathLike, expected_format: str) -> tuple[dict, bytes]:
    """The file's JSON document and the SHA-256 of the bytes it was parsed from;
    :class:`UnreadableKeyFile` when it is not one (see there)."""
    return parse_document(read_key_bytes(path), path, expected_format)


def read_key_bytes(path: str | os.PathLike) -> bytes:
    """The key file's bytes, read once (a FIFO or ``/dev/fd/N`` gives them only once:
    whoever inspects them before loading passes them on, :func:`parse_document`);
    :class:`UnreadableKeyFile` when it cannot be read."""
    where = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise UnreadableKeyFile(f"{where}: no such file") from None
    except OSError as exc:  # a folder, no permission: as for a missing file, a KeysetError
        raise UnreadableKeyFile(f"{where}: cannot read it ({exc.strerror})") from None


class AmbiguousJSON(ValueError):
    """JSON that readers may take in different ways (:func:`strict_json`)."""


#: how much of a member name a message shows (a crafted file's may be megabytes long)
_SHOWN_NAME = 64


def _unique_members(pairs: list[tuple[str, Any]]) -> dict:
    seen: set[str] = set()  # one pass: a crafted file's thousands of members cost no more
    for name, _ in pairs:
        if name in seen:
            shown = name if len(name) <= _SHOWN_NAME else name[:_SHOWN_NAME] + "..."
            raise AmbiguousJSON(f"the member {printable_text(shown)!r} appears twice in one "
                                f"object, so readers could disagree on its value; the file "
                                f"was damaged or edited: restore it from a copy")
        seen.add(name)
    return dict(pairs)


def _no_constant(name: str) -> Any:
    raise AmbiguousJSON(f"it holds {name}, which JSON does not have; the file was damaged "
                        f"or edited: restore it from a copy")


def strict_json(text: str | bytes) -> Any:
    """``json.loads(text)``, refusing (:class:`AmbiguousJSON`, a ValueError) what readers
    may take in different ways: a member name twice in one object (Python keeps the last,
    other readers the first: a sealed file's bytes could then say one status to a person
    or a tool and another to gpucrypt, with the seal intact, as it authenticates what was
    parsed), and ``NaN``/``Infinity``, which are not JSON. A key file has one meaning."""
    return json.loads(text, object_pairs_hook=_unique_members, parse_constant=_no_constant)


def parse_document(raw: bytes, path: str | os.PathLike,
                   expected_format: str) -> tuple[dict, bytes]:
    """:func:`read_document` for the bytes ``raw`` already read from ``path``."""
    where = os.fspath(path)
    try:
        doc = strict_json(raw.decode("utf-8"))
    # ValueError: not UTF-8, not JSON, or a number past int's 4300 digits (json.loads says
    # so with a plain ValueError); RecursionError: nested too deeply
    except (ValueError, RecursionError) as exc:
        why = ("not JSON" if isinstance(exc, (UnicodeDecodeError, json.JSONDecodeError,
                                              RecursionError))
               else f"not JSON gpucrypt reads: {exc}" if isinstance(exc, AmbiguousJSON)
               else "not JSON gpucrypt reads: a number in it is too long")
        raise UnreadableKeyFile(f"{where}: not a {expected_format} file ({why})") from None
    if not isinstance(doc, dict) or doc.get("format") != expected_format:
        found = doc.get("format") if isinstance(doc, dict) else None
        # only a string is looked up: a list or an object is unhashable (a TypeError)
        kind = _KINDS.get(found) if isinstance(found, str) else None
        raise UnreadableKeyFile(f"{where}: not a {expected_format} file"
                                + (f": it is {kind}" if kind else ""))
    # a bool is an int to Python, and 1.0 == 1: only the number 1 itself is version 1
    if type(doc.get("version")) is not int or doc["version"] != FILE_VERSION:
        # said as JSON spells it (true, 1.0, "1", null: missing), not as Python does (True)
        version = doc.get("version")
        shown = ("a list" if isinstance(version, list) else "an object"
                 if isinstance(version, dict) else printable_text(json.dumps(version)))
        if len(shown) > _SHOWN_NAME:
            shown = shown[:_SHOWN_NAME] + "..."
        raise UnreadableKeyFile(f"{where}: {expected_format} version {shown} is not "
                                f"supported (this gpucrypt reads version {FILE_VERSION})")
    return doc, hashlib.sha256(raw).digest()


def protection_method(doc: dict, where: str) -> str | None:
    """How the file is sealed (``"passphrase"``, ``"kek"``), None when it is not;
    KeysetError for a protection block that is not an object with a method."""
    if "protection" not in doc:
        return None
    protection = doc["protection"]
    if not isinstance(protection, dict) or not isinstance(protection.get("method"), str):
        raise KeysetError(f"{where}: malformed protection block (the file was damaged or "
                          f"edited: restore it from a copy)")
    return protection["method"]


def scrypt_n_to_write(scrypt_n: int) -> int:
    """``scrypt_n`` if sealing may use it (a power of 2 within passphrase.check_log_n's
    bounds), else ValueError."""
    n = int(scrypt_n)
    if n < 2 or n & (n - 1):
        raise ValueError(f"scrypt_n must be a power of 2, not {n}")
    _passphrase.check_log_n(n.bit_length() - 1)
    return n


def refuse_both_secrets(passphrase: Any, kek: Any) -> None:
    """ValueError when both a passphrase and a key-encryption key are given: a file is
    sealed by one of them, and the other would be dropped without a word (a save "with a
    KEK" that wrote a passphrase-sealed file, which then did not load with that KEK)."""
    if passphrase is not None and kek is not None:
        raise ValueError("give a passphrase or a key-encryption key (kek=), not both: a key "
                         "file is sealed by one of them, and the other would be ignored")


def kept_secrets(passphrase: Any, kek: Any) -> tuple[Any, bytes | None]:
    """``passphrase`` and ``kek`` as an object keeps them for later (a keyset's next save, a
    provider's first load): a ``bytearray`` copied, since a careful caller wipes it once
    the call returns (the one way Python has to drop a secret), and a save after that
    sealed every key under zeros, a secret anyone can guess. Text is immutable; a kek is
    any bytes-like (``TypeError`` otherwise, as :func:`bytes_arg` says)."""
    if isinstance(passphrase, bytearray):
        passphrase = bytes(passphrase)
    return passphrase, (None if kek is None else bytes_arg(kek, "kek"))


def seal_document(public: dict, secret: dict, *, passphrase=None, kek=None, kek_id=None,
                   scrypt_n: int = DEFAULT_SCRYPT_N) -> dict:
    from ..aead import AESGCM, ChaCha20Poly1305

    refuse_both_secrets(passphrase, kek)
    nonce = os.urandom(12)
    if passphrase is not None:
        salt, n = os.urandom(16), scrypt_n_to_write(scrypt_n)
        protection = {"method": "passphrase", "kdf": "scrypt", "salt": b64e(salt),
                      "n": n, "r": 8, "p": 1, "aead": "chacha20-poly1305",
                      "nonce": b64e(nonce)}
        sealing_form = _passphrase.forms(passphrase)[0]  # text in NFC
        key = Scrypt(salt=salt, length=32, n=n, r=8, p=1).derive(sealing_form)
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


def open_document(doc: dict, where: str, *, passphrase=None, kek=None) -> dict | None:
    """The sealed part of ``doc`` (the file ``where``), opened with ``passphrase`` or ``kek``;
    None for a file that is not sealed, and KeysetError when one of them was given for
    such a file: the file may have been replaced, and using it would wrap new data keys
    under someone else's keys."""
    from ..aead import AESGCM, ChaCha20Poly1305

    refuse_both_secrets(passphrase, kek)  # else a keyset would remember both, to seal with
    method = protection_method(doc, where)
    if method is None:
        if passphrase is None and kek is None:
            return None
        given = "passphrase" if passphrase is not None else "key-encryption key"
        how = (" (on the command line: no --passphrase-file, and GPUCRYPT_PASSPHRASE unset)"
               if passphrase is not None else "")
        raise KeysetError(f"{where} is not sealed, though a {given} was given: it may have "
                          f"been replaced. Check where the file came from; if it is meant to "
                          f"be unsealed, load it without one{how}")
    protection = doc["protection"]
    public = {k: v for k, v in doc.items() if k != "sealed"}
    # the caller's secret is checked before anything of the file, and said as what it is:
    # the ValueError catch-all below is for the file's protection block
    if method == "passphrase" and passphrase is not None:
        try:
            forms = _passphrase.forms(passphrase)
        except ValueError as exc:  # not UTF-8: passphrase.encode's KeysetError, as it is
            if isinstance(exc, KeysetError):
                raise
            raise KeysetError(f"{where}: the passphrase given is empty: give the passphrase "
                              f"the file was sealed with") from None
    if method == "kek" and kek is not None:
        kek = bytes_arg(kek, "kek")
        if len(kek) != 32:
            raise KeysetError(f"{where}: a key-encryption key is 32 bytes, not {len(kek)}: "
                              f"give the raw key the file was sealed with (not hex or base64 "
                              f"text of it)")
    nonce = b64d(protection.get("nonce"), f"{where}: nonce")
    try:
        if method == "passphrase":
            if passphrase is None:
                # the library's ways: the command line asks for it before loading, and
                # Recipient.load recognises "sealed with a passphrase"
                raise KeysetError(f"{where} is sealed with a passphrase, and none was given: "
                                  f"pass it (load(path, passphrase), FileKeyProvider(path, "
                                  f"passphrase); passphrase_env= for a path in KeyReferences)")
            n, r, p = protection.get("n"), protection.get("r"), protection.get("p")
            if protection.get("kdf") != "scrypt" or not all(isinstance(v, int) for v in (n, r, p)):
                raise KeysetError(f"{where}: unsupported key derivation")
            # only what gpucrypt writes (r = 8, p = 1, N = 2**k up to 2**MAX_LOG_N), refused
            # before any work: a file is untrusted until the seal opens, and scrypt's memory
            # is 128 * r * (N + p) bytes, so any other (r, p) lets it ask for gigabytes
            if _passphrase.readable_log_n(n, r, p) is None:
                raise KeysetError(f"{where}: its scrypt parameters are outside what gpucrypt "
                                  f"writes (r = {_passphrase.SCRYPT_R}, p = "
                                  f"{_passphrase.SCRYPT_P}, N a power of 2 up to "
                                  f"2**{_passphrase.MAX_LOG_N}), refused before any work: the "
                                  f"file was damaged or crafted; restore it from a copy")
            salt = b64d(protection.get("salt"), f"{where}: salt")
            if len(salt) != 16:  # what every save writes; no other length is read
                raise KeysetError(f"{where}: its scrypt salt is {len(salt)} bytes, not 16: the "
                                  f"file was damaged or crafted; restore it from a copy")
            sealed, aad = b64d(doc.get("sealed"), f"{where}: sealed part"), _canonical(public)
            # each of the passphrase's forms, NFC first (passphrase.forms: files sealed
            # before passphrases were normalised, or from an earlier reading of a
            # passphrase file, open too; one more scrypt each, for those passphrases only)
            for form in forms:
                key = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(form)
                try:
                    plain = ChaCha20Poly1305(key, device="cpu").decrypt(nonce, sealed, aad)
                    break
                except InvalidTag:
                    continue
            else:
                raise InvalidTag()
            cipher = None
        elif method == "kek":
            if kek is None:
                raise KeysetError(f"{where} is sealed by a key-encryption key "
                                  f"(id {protection.get('kek_id')!r}): give it with kek=")
            cipher = AESGCM(kek, device="cpu")
        else:
            raise KeysetError(f"{where}: unknown protection method {method!r}")
        if cipher is not None:
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
        secret = strict_json(plain)
    except (ValueError, RecursionError) as exc:  # as parse_document's
        why = f" ({exc})" if isinstance(exc, AmbiguousJSON) else ""
        raise KeysetError(f"{where}: sealed part is not JSON gpucrypt reads{why}") from None
    if not isinstance(secret, dict):
        raise KeysetError(f"{where}: malformed sealed part")
    return secret
