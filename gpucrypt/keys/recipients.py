"""Public-key recipients and identities, and the envelope that wraps a data key for them.

A :class:`Recipient` is a public key (``x25519``, or ``mlkem768-x25519``, a
post-quantum hybrid); its :class:`Identity` is the private half. :func:`seal_envelope`
wraps a data key once per recipient, keyset or :class:`~gpucrypt.keys.providers.WrappingKey`,
and :func:`open_envelope` unwraps it with whichever identity or key matches a stanza.
The envelope bytes themselves are :mod:`gpucrypt.keys._envelope`'s.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
from typing import Any, Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.keywrap import (InvalidUnwrap, aes_key_unwrap_with_padding,
                                                    aes_key_wrap_with_padding)

from .. import audit
from .._buffers import bytes_arg
from .._errors import (EnvelopeError, KeyNotFound, KeysetError, KeyUnavailable,
                       NoMatchingRecipient)
from . import _envelope
from ._document import (DEFAULT_SCRYPT_N, FILE_VERSION, b64d, b64e, kept_secrets,
                        open_document, parse_document, printable_text, read_key_bytes,
                        scrypt_n_to_write, seal_document, utc_timestamp, write_key_file)
from ._envelope import EnvelopeFormatError, Stanza
from ._material import HoldsKeyMaterial
from .keyset import Keyset, KeysetKey, _locked_digest, _scrypt_n_to_keep
from .passphrase import STANZA_KIND as _SCRYPT, Passphrase
from .providers import EnvKeyProvider, FileKeyProvider, KeyProvider, WrappingKey
from .references import KeyReference, check_context

__all__ = ["Recipient", "Identity", "generate_dek", "seal_envelope", "open_envelope",
           "describe_envelope", "seal_envelope_with_labels", "recipient_list", "identity_list",
           "HPKE_INFO", "DEK_SIZE", "IDENTITY_FORMAT", "RECIPIENT_FORMAT"]

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
_X25519_PRIME = 2**255 - 19

IDENTITY_FORMAT, RECIPIENT_FORMAT = "gpucrypt-identity", "gpucrypt-recipient"


# --------------------------------------------------------------------------- public-key recipients


def _fingerprint(kem: str, public: bytes) -> str:
    digest = hashlib.sha256(b"gpucrypt-recipient-v1\x00" + kem.encode() + b"\x00" + public)
    return f"{kem}:{digest.hexdigest()[:32]}"


class Recipient:
    """A public key data keys can be wrapped for: ``kem`` is ``"x25519"`` or
    ``"mlkem768-x25519"`` (post-quantum hybrid). ``fingerprint`` names it in envelopes
    and audit logs (``"x25519:" + 32 hex digits``, the first 16 bytes of a SHA-256)."""

    def __init__(self, kem: str, public_bytes: bytes):
        _check_kem_type(kem)
        if kem not in _KEMS:
            raise ValueError(f"unknown KEM {kem!r}; choose one of {sorted(_KEMS)}")
        self.kem, self.public_bytes = kem, bytes_arg(public_bytes, "public_bytes")
        self._public_key = _load_public(kem, self.public_bytes)  # validates
        self.fingerprint = _fingerprint(kem, self.public_bytes)

    def __repr__(self) -> str:
        return f"Recipient({self.fingerprint!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipient) and other.fingerprint == self.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __reduce__(self):
        # public, so it travels (KeyReferences takes it): as its KEM and public bytes,
        # since cryptography's key objects do not pickle
        return (Recipient, (self.kem, self.public_bytes))

    @property
    def stanza_id(self) -> bytes:
        return bytes.fromhex(self.fingerprint.split(":", 1)[1])

    def to_json(self) -> dict:
        return {"format": RECIPIENT_FORMAT, "version": FILE_VERSION, "kem": self.kem,
                "public_key": b64e(self.public_bytes), "fingerprint": self.fingerprint}

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Write the public file (0644: it is meant to be shared), atomically. An existing
        file is left as it is (:class:`KeysetError`) unless ``overwrite=True``: the path
        mistaken for the ``.pub`` one would otherwise replace its private identity."""
        from ..files._atomic import AtomicFile, OutputExists

        try:
            with AtomicFile(path, 0o644, overwrite=overwrite) as f:
                f.write(json.dumps(self.to_json(), indent=2).encode() + b"\n")
        except OutputExists:
            raise KeysetError(f"{os.fspath(path)} exists: a recipient file is written to a new "
                              f"path, or over the old one with overwrite=True") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipient":
        """Read a recipient file; an identity file is accepted too (its public half is used)."""
        return cls._load_bytes(path, None)

    @classmethod
    def _load_bytes(cls, path: str | os.PathLike, data: bytes | None) -> "Recipient":
        """:meth:`load` from ``data``, the bytes already read from ``path`` (None: read
        them here, once: a FIFO or ``/dev/fd/N`` gives them only once)."""
        raw = read_key_bytes(path) if data is None else data
        try:
            if _document_format(raw) == IDENTITY_FORMAT:
                return Identity._load_bytes(path, raw).recipient
            return cls._from_doc(parse_document(raw, path, RECIPIENT_FORMAT)[0], os.fspath(path))
        except KeysetError as exc:
            if "sealed with a passphrase" in str(exc):
                raise KeysetError(f"{os.fspath(path)} is a sealed identity: use its .pub "
                                  f"recipient file") from None
            raise

    @classmethod
    def _from_doc(cls, doc: dict, where: str) -> "Recipient":
        return _checked_key(
            lambda: cls(doc.get("kem"), b64d(doc.get("public_key"), f"{where}: public key")),
            doc, where, "public")


def _check_kem_type(kem: Any) -> None:
    """TypeError unless ``kem`` is a str: ``kem not in _KEMS`` of a list is itself a
    TypeError, "unhashable type", which names neither the argument nor what it should be."""
    if not isinstance(kem, str):
        raise TypeError(f"kem must be a str (one of {sorted(_KEMS)}), not {type(kem).__name__}")


def _checked_key(make: Callable[[], Any], doc: dict, where: str, half: str) -> Any:
    """``make()`` (a Recipient or Identity built from the file ``where``'s document ``doc``),
    its ValueErrors reported as KeysetError "invalid {half} key"; KeysetError too when
    ``doc`` records a fingerprint that is not the key's, or a ``kem`` that is not a string
    (the constructor's TypeError is the caller's mistake; here it is the file's)."""
    from .keyset import _JSON_KINDS

    kem = doc.get("kem")
    if not isinstance(kem, str):
        problem = ("no \"kem\"" if kem is None and "kem" not in doc else
                   f"\"kem\" is {_JSON_KINDS.get(type(kem), 'a value')}, not a string")
        raise KeysetError(f"{where}: invalid {half} key ({problem}; the file was damaged or "
                          f"edited: restore it from a copy)")
    try:
        key = make()
    except ValueError as exc:
        if isinstance(exc, KeysetError):
            raise
        raise KeysetError(f"{where}: invalid {half} key ({exc})") from None
    if doc.get("fingerprint") not in (None, key.fingerprint):
        raise KeysetError(f"{where}: the fingerprint does not match the {half} key")
    return key


def _file_document(path) -> dict | None:
    """A key file's JSON document, None for anything else (loading it says what is wrong)."""
    try:
        with open(path, "rb") as f:
            return _bytes_document(f.read())
    except OSError:
        return None


def _bytes_document(raw: bytes) -> dict | None:
    """The JSON document in a key file's bytes ``raw``, None for anything else."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deeply
        return None
    return doc if isinstance(doc, dict) else None


def _document_format(raw: bytes) -> str | None:
    doc = _bytes_document(raw)
    return None if doc is None else doc.get("format")


#: any fixed X25519 private key: an exchange with it tells a low-order public point
#: (:func:`_x25519_public`); the key itself protects nothing
_PROBE = x25519.X25519PrivateKey.from_private_bytes(
    hashlib.sha256(b"gpucrypt-x25519-low-order-probe").digest())


def _x25519_public(raw: bytes) -> x25519.X25519PublicKey:
    """The X25519 public key ``raw``; ValueError for a low-order point (all zeros, and the
    other few): the secret shared with it is all zeros whatever the private key, so
    cryptography refuses to wrap for it, and a file did load that then failed at sealing
    with "Error computing shared key." naming no recipient. Refused here, as age does.
    An exchange with a fixed key tells: X25519 clamps every private key to a multiple of
    the cofactor 8, so the product is zero exactly for the points of small order.

    ValueError too for a key not in canonical form (bit 255 set, or u at least the prime
    2**255 - 19): RFC 7748 reduces it to the same point as its canonical encoding, so it
    is its owner's key under a second fingerprint, and HPKE binds the encoding given:
    what was sealed to it, no one opened (the stanza names the other fingerprint, and the
    owner's HPKE context differs). The owner's key, one bit flipped, a buggy exporter."""
    if raw[31] & 0x80 or int.from_bytes(raw, "little") >= _X25519_PRIME:
        raise ValueError("the X25519 public key is not in canonical form (bit 255 set, or "
                         "a value not below 2**255 - 19): it is another key's encoding, and "
                         "files sealed to it would open for no one; the file was damaged or "
                         "crafted: ask its owner for the right one")
    key = x25519.X25519PublicKey.from_public_bytes(raw)
    try:
        _PROBE.exchange(key)
    except ValueError:
        raise ValueError("the X25519 public key is a low-order point: no one holds its "
                         "private key, and the secret shared with it is all zeros; the file "
                         "was damaged or crafted: ask its owner for the right one") from None
    return key


def _load_public(kem: str, public: bytes):
    if kem == "x25519":
        if len(public) != _X25519_SIZE:
            raise ValueError("an X25519 public key is 32 bytes")
        return _x25519_public(public)
    if len(public) != _MLKEM768_PUBLIC + _X25519_SIZE:
        raise ValueError(f"an ML-KEM-768 + X25519 public key is {_MLKEM768_PUBLIC + 32} bytes")
    try:
        mlkem_public = mlkem.MLKEM768PublicKey.from_public_bytes(public[:_MLKEM768_PUBLIC])
    except ValueError:
        # the length is right (checked above), so it failed FIPS 203's modulus check;
        # cryptography words that as the length ("is 1184 bytes long"), which misleads
        raise ValueError("the ML-KEM-768 public key is invalid, a coefficient out of range "
                         "(its length is right): the file was damaged or crafted; ask its "
                         "owner for the right one") from None
    return hpke.MLKEM768X25519PublicKey(mlkem_public, _x25519_public(public[_MLKEM768_PUBLIC:]))


class Identity(HoldsKeyMaterial):
    """A private key that opens stanzas wrapped for its :attr:`recipient`.

    Stored material: X25519, the 32-byte private key; ML-KEM-768 + X25519, the
    64-byte ML-KEM seed followed by the 32-byte X25519 private key. It cannot be pickled
    or copied; its :attr:`recipient` (public) can."""

    _travel_instead = ("pickle a KeyReferences naming its identity file instead "
                       "(identities=PATH), and load it in the process that uses it")

    def __init__(self, kem: str, private_bytes: bytes, created: str | None = None):
        _check_kem_type(kem)
        if kem not in _KEMS:
            raise ValueError(f"unknown KEM {kem!r}; choose one of {sorted(_KEMS)}")
        self.kem, self._private_bytes = kem, bytes_arg(private_bytes, "private_bytes")
        self.created = created or utc_timestamp()
        # (the file last read or written, resolved; the SHA-256 of its bytes then)
        self._origin: tuple[str, bytes | None] | None = None
        #: the passphrase and scrypt N of its last sealed load or save: a plain save()
        #: seals with them (None: saved in the clear unless given one)
        self._seal: dict | None = None
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
             scrypt_n: int | None = None, unsealed: bool = False,
             overwrite: bool = False) -> None:
        """Write the private file (0600, atomically), sealed when ``passphrase`` is given,
        with scrypt work factor ``scrypt_n`` (default 2**17).

        An identity loaded sealed (or last saved sealed) is saved sealed again with the
        same passphrase and work factor, as a keyset is, unless another passphrase is
        given, or ``unsealed=True`` asks for the private key in the clear, on purpose
        only (a plain save over its sealed file unsealed it without a word). A save that
        fails changes nothing: the next seals with the passphrase of the last save that
        wrote (or of the load). ``ValueError``, before anything is done, for arguments
        that contradict each other: ``unsealed=True`` with a passphrase, ``scrypt_n``
        with no passphrase to apply to (given or remembered), or one sealing refuses.

        An existing file is left as it is (:class:`KeysetError`) unless it is the one this
        identity was loaded from or last saved to, or ``overwrite=True``. Its own file,
        unchanged since, keeps its owner and group (as :meth:`Keyset.save` says); any
        other file written is the saver's, 0600."""
        if unsealed and passphrase is not None:
            raise ValueError("unsealed=True writes the private key in the clear, and a "
                             "passphrase seals it: give one or the other")
        remembered = self._seal if passphrase is None and not unsealed else None
        if scrypt_n is not None:
            if passphrase is None and remembered is None:
                raise ValueError("scrypt_n is the work factor of passphrase sealing, and this "
                                 "save is not sealed: give the passphrase too, or drop scrypt_n")
            scrypt_n_to_write(scrypt_n)
        if remembered is not None:
            passphrase = remembered["passphrase"]
            if scrypt_n is None:
                scrypt_n = remembered["scrypt_n"]
        if scrypt_n is None:
            scrypt_n = DEFAULT_SCRYPT_N
        public = {"format": IDENTITY_FORMAT, "version": FILE_VERSION, "kem": self.kem,
                  "created": self.created, "public_key": b64e(self.recipient.public_bytes),
                  "fingerprint": self.fingerprint}
        secret = {"private_key": b64e(self._private_bytes)}
        doc = (seal_document(public, secret, passphrase=passphrase, scrypt_n=scrypt_n)
               if passphrase is not None else {**public, **secret})
        target = os.path.realpath(path)
        data = json.dumps(doc, indent=2).encode() + b"\n"
        own = self._origin is not None and self._origin[0] == target
        # as Keyset.save: the check and the write are one step under the file's flock, and
        # its own file is written where it is (through the link it was loaded by, if any)
        with (_locked_digest(target) if own
              else contextlib.nullcontext((None, None))) as (now, held):
            if own and not overwrite and now not in (None, self._origin[1]):
                raise KeysetError(f"{os.fspath(path)} changed since this identity was read "
                                  f"from it (another identity written there, say): nothing "
                                  f"was written; save to a new path, or pass overwrite=True")
            write_key_file(target if own else path, data,
                           replace=overwrite or (own and now is not None), what="identity",
                           keep=held if own and now == self._origin[1] else None)
        if passphrase is not None:  # only now that the file holds it, as Keyset.save
            self._seal = {"passphrase": kept_secrets(passphrase, None)[0],
                          "scrypt_n": scrypt_n}
        self._origin = (target, hashlib.sha256(data).digest())

    @classmethod
    def load(cls, path: str | os.PathLike, passphrase: str | bytes | None = None) -> "Identity":
        """Read an identity file; a sealed one needs its ``passphrase``, and one that is not
        sealed refuses a passphrase (:class:`KeysetError`: it may have been replaced)."""
        return cls._load_bytes(path, None, passphrase)

    @classmethod
    def _load_bytes(cls, path: str | os.PathLike, data: bytes | None,
                    passphrase: str | bytes | None = None) -> "Identity":
        """:meth:`load` from ``data``, the bytes already read from ``path`` (None: read
        them here): a FIFO or ``/dev/fd/N`` gives them only once. What :meth:`save` checks
        the file against is ``path`` (resolved) and the digest of these bytes."""
        where = os.fspath(path)
        raw = read_key_bytes(path) if data is None else data
        doc, digest = parse_document(raw, path, IDENTITY_FORMAT)
        secret = open_document(doc, where, passphrase=passphrase)
        if secret is None:
            secret = doc
        identity = _checked_key(
            lambda: cls(doc.get("kem"), b64d(secret.get("private_key"), f"{where}: private key"),
                        doc.get("created")),
            doc, where, "private")
        identity._origin = (os.path.realpath(path), digest)
        if "protection" in doc:  # saved sealed again, as a keyset is (see save)
            identity._seal = {"passphrase": kept_secrets(passphrase, None)[0],
                              "scrypt_n": _scrypt_n_to_keep(doc["protection"].get("n"))}
        return identity

    def _unwrap(self, body: bytes) -> bytes:
        return _KEMS[self.kem][1].decrypt(body, self._private_key, info=HPKE_INFO)


# --------------------------------------------------------------------------- envelopes


def generate_dek() -> bytes:
    """A fresh random data key (32 bytes)."""
    return os.urandom(DEK_SIZE)


def _stanza_label(stanza: Stanza) -> str:
    if stanza.kind == _SCRYPT:
        return _SCRYPT  # a passphrase: nothing to name (the salt is no one's id)
    if stanza.kind == "aes-kwp":
        return "aes-kwp:" + _printable(stanza.recipient_id)
    if stanza.kind == "key-ref":
        return _printable(stanza.recipient_id)
    return f"{_KEM_OF_STANZA[stanza.kind]}:{stanza.recipient_id.hex()}"


def _printable(raw: bytes) -> str:
    """A stanza's id as text to show: bytes from a file's header, unauthenticated until a
    key opens it, which errors and the command line print (:func:`printable_text`)."""
    return printable_text(raw.decode("utf-8", "replace"))


def describe_envelope(envelope: bytes) -> list[str]:
    """Who the envelope is for, one label per stanza: ``"aes-kwp:<key id>"`` or a
    recipient fingerprint ``"x25519:<hex>"``. Needs no key."""
    return [_stanza_label(s) for s in _decode(envelope)]


def _decode(envelope: bytes) -> list[Stanza]:
    try:
        return _envelope.decode(envelope)
    except EnvelopeFormatError as exc:
        raise EnvelopeError(f"malformed envelope: {exc}") from None


def recipient_list(recipients: Any) -> list:
    """``recipients`` (one recipient or a sequence, as :func:`seal_envelope` takes them)
    as a new list."""
    if isinstance(recipients, (Recipient, Identity, Keyset, KeysetKey, WrappingKey, KeyReference,
                                Passphrase)):
        return [recipients]
    if isinstance(recipients, (bytes, bytearray, memoryview, str, os.PathLike)):
        # iterated, bytes gave ints and a path its letters ("cannot wrap ... for a int")
        raise TypeError(f"recipients must be key objects, not {type(recipients).__name__}: "
                        f"load a file first (Recipient.load, Identity.load, Keyset.load), give a "
                        f"raw key as WrappingKey(key, key_id), or a URI as KeyReference(uri)")
    return list(recipients)


def _check_dek(dek: Any) -> bytes:
    dek = bytes_arg(dek, "dek")
    if not _DEK_MIN <= len(dek) <= _DEK_MAX:
        raise ValueError(f"a data key must be {_DEK_MIN} to {_DEK_MAX} bytes, not {len(dek)}")
    return dek


def seal_envelope(dek: bytes, recipients: Any, *, context: Any = None) -> bytes:
    """Wrap ``dek`` once for each recipient and return the envelope bytes.

    ``recipients``: one or a sequence of :class:`Recipient` (HPKE), :class:`Identity`
    (its public half), :class:`Keyset` (its primary key, AES-KWP), :class:`KeysetKey`
    or :class:`WrappingKey` (AES-KWP), :class:`~gpucrypt.keys.KeyReference` (a key in an
    HSM or KMS: a ``key-ref`` stanza; a ``file:`` keyset: its primary), or one
    :class:`~gpucrypt.keys.passphrase.Passphrase` alone (scrypt). Duplicates (the same
    key given twice) are wrapped once. ``context`` (str -> str) binds the providers'
    stanzas that can bind (AWS KMS encryption context, PKCS#11 AES-GCM); opening needs the
    same one. Raises ``ValueError`` for no recipient, more than 255, a passphrase beside
    other recipients, or two different keys with the same id, :class:`KeyUnavailable` for
    a disabled or destroyed keyset key, :class:`KeyProviderError` for an unreachable
    provider.
    """
    return seal_envelope_with_labels(dek, recipients, context=context)[0]


def seal_envelope_with_labels(dek: bytes, recipients: Any, *,
                              context: Any = None) -> tuple[bytes, list[str]]:
    """:func:`seal_envelope`, also returning what :func:`describe_envelope` would say of
    the result (one label per stanza), without decoding the envelope again."""
    dek = _check_dek(dek)
    context = check_context(context)
    stanzas, labels = [], []
    keks: dict[str, bytes] = {}  # key id -> the symmetric KEK wrapping for it
    wrapped_by: dict[str, KeyReference] = {}  # key-ref stanza id -> the reference that made it
    items = recipient_list(recipients)
    if len(items) > 1 and any(isinstance(item, Passphrase) for item in items):
        raise ValueError("a passphrase-encrypted file has no other recipient (so that only who "
                         "knows the passphrase can have made it): give the passphrase alone")
    with audit.timed("envelope.seal") as ev:
        for item in items:
            if isinstance(item, Passphrase):
                stanzas.append(item.wrap(dek))
                labels.append(_SCRYPT)
                continue
            if isinstance(item, Identity):
                item = item.recipient
            if isinstance(item, KeyReference) and item.scheme == "file":
                item = item.resolve()  # a keyset file: its primary wraps, as below
            if isinstance(item, Keyset):
                item = item.primary
            if isinstance(item, KeyReference):
                stanza_id, body = item.wrap(dek, context)
                stanza = Stanza("key-ref", stanza_id.encode("utf-8"), body)
            elif isinstance(item, Recipient):
                kind, suite = _KEMS[item.kem]
                try:
                    body = suite.encrypt(dek, item._public_key, info=HPKE_INFO)
                except ValueError as exc:  # cryptography's words name no one: say who
                    raise EnvelopeError(f"cannot wrap the data key for recipient "
                                        f"{item.fingerprint} ({exc}): check that recipient's "
                                        f"public key file") from None
                stanza = Stanza(kind, item.stanza_id, body)
            elif isinstance(item, (KeysetKey, WrappingKey)):
                key_id = item.id if isinstance(item, KeysetKey) else item.key_id
                kek = item.secret_bytes()
                if not hmac.compare_digest(keks.setdefault(key_id, kek), kek):
                    raise ValueError(f"two different key-encryption keys have the id {key_id!r}: "
                                     f"an envelope names a key by its id, so one of them could "
                                     f"not open it; give each key its own id")
                stanza = Stanza("aes-kwp", key_id.encode("utf-8"),
                                aes_key_wrap_with_padding(kek, dek))
            else:
                raise TypeError(f"cannot wrap a data key for a {type(item).__name__}: give "
                                f"Recipient, Identity, Keyset, KeysetKey, WrappingKey or "
                                f"KeyReference objects")
            label = _stanza_label(stanza)
            if label in labels:
                # the same key again: wrapped once. Two different references making one
                # stanza id (an alias and its key's ARN, a key with and without x-wrap)
                # would silently lose one of them: said instead
                earlier = wrapped_by.get(label)
                if earlier is not None and earlier != item:
                    raise ValueError(f"{earlier.label} and {item.label} both wrap as {label}: "
                                     f"an envelope holds one stanza per key, so one of them "
                                     f"would be dropped; give that key once")
                continue
            if isinstance(item, KeyReference):
                wrapped_by[label] = item
            stanzas.append(stanza)
            labels.append(label)
        if not stanzas:
            raise ValueError("seal_envelope needs at least one recipient")
        ev.update(recipients=labels, count=len(stanzas))
        return _envelope.encode(stanzas), labels


#: the most stanzas of one envelope a key reference (an HSM or KMS key) is asked to
#: unwrap, in one :func:`open_envelope`. An envelope gpucrypt writes holds one stanza per
#: key reference, and a reference owns the stanzas of the key it names: one where it
#: names the key exactly (an ARN, a PKCS#11 URI with its token's serial), but any of them
#: where it cannot tell (a KMS alias that may not be described owns every ARN of its
#: region, and Decrypt of the alias tells; a PKCS#11 URI without a serial, every
#: serial), and a file sealed for several KMS keys then has a stanza of each before the
#: reader's own. 16 keeps such files open
#: while a forged envelope of 255 stanzas costs 32 asks at most, not 510.
#:
#: A :class:`KeyProvider` given as an identity is asked for the key id of every
#: ``aes-kwp`` stanza (an id whoever wrote the file chose), and may be a KMS or vault
#: call (:class:`CallableKeyProvider`): it too is asked at most this many ids of one
#: envelope, once (these stanzas take no context, so they are not tried again without
#: it). Providers that hold their keys in this process (a :class:`Keyset`, a
#: :class:`FileKeyProvider`, an :class:`EnvKeyProvider`) are not counted.
MAX_PROVIDER_UNWRAPS = 16

#: providers whose get_key is a lookup in this process, not a round trip
_LOCAL_PROVIDERS = (Keyset, FileKeyProvider, EnvKeyProvider)


def _distinct(items: list) -> list:
    """``items`` without repeats (equal or the same object), in order."""
    out: list = []
    for item in items:
        if all(item is not seen and item != seen for seen in out):
            out.append(item)
    return out


def identity_list(identities: Any) -> list:
    """``identities`` (None, one identity or a sequence, as :func:`open_envelope` takes
    them) as a new list; ``TypeError`` for anything that cannot open an envelope."""
    if identities is None:
        return []
    items = list(identities) if isinstance(identities, (list, tuple, set, frozenset)) else [identities]
    for item in items:
        if isinstance(item, Recipient):
            raise TypeError(f"{item!r} is a public key: opening an envelope needs the private "
                            f"Identity (the identity file, not the .pub file)")
        if not isinstance(item, (Identity, KeysetKey, WrappingKey, KeyProvider, KeyReference,
                                 Passphrase)):
            hint = (": load the file first (Identity.load(path), Keyset.load(path)), or give "
                    "a URI as KeyReference(uri)" if isinstance(item, (str, os.PathLike)) else "")
            raise TypeError(f"cannot open an envelope with a {type(item).__name__}: give Identity, "
                            f"Keyset, KeysetKey, WrappingKey, KeyReference, KeyProvider or "
                            f"Passphrase objects{hint}")
    return items


def _asks_a_provider(stanza: Stanza, identity: Any) -> bool:
    """Whether trying ``identity`` on ``stanza`` may be a round trip to an HSM, a KMS or a
    vault, which MAX_PROVIDER_UNWRAPS bounds: a key reference on a ``key-ref`` stanza, a
    key provider other than the local ones on an ``aes-kwp`` stanza."""
    if stanza.kind == "key-ref":
        return isinstance(identity, KeyReference)
    return (stanza.kind == "aes-kwp" and isinstance(identity, KeyProvider)
            and not isinstance(identity, _LOCAL_PROVIDERS))


def _loads_a_keyset_file(identity: Any) -> bool:
    """Whether ``identity`` loads a keyset file when first asked (its KeysetError: the load
    failed, and would fail again)."""
    return isinstance(identity, FileKeyProvider) or \
        isinstance(identity, KeyReference) and identity.scheme == "file"


def _limit_note(identity: Any) -> str:
    if isinstance(identity, KeyReference):
        return (f"{identity.label} was asked to unwrap {MAX_PROVIDER_UNWRAPS} of this "
                f"envelope's stanzas, the most it is asked: the others were not tried (a forged "
                f"envelope could name it in 255); name the key exactly (its ARN, or a pkcs11: "
                f"URI with the token's serial) so that it owns only its own stanza")
    return (f"{identity!r} was asked for {MAX_PROVIDER_UNWRAPS} of this envelope's key ids, the "
            f"most a key provider is asked: the others were not tried (a forged envelope could "
            f"name 255); give WrappingKey.from_provider(provider, KEY_ID) for the key you expect, "
            f"so that only its own stanza asks the provider")


def open_envelope(envelope: bytes, identities: Any, *, context: Any = None,
                  _with_label: bool = False, _then_without_context: bool = False) -> Any:
    """The data key, unwrapped by the first stanza one of ``identities`` opens.

    ``identities``: one or a sequence of :class:`Identity`, :class:`Keyset`,
    :class:`KeysetKey`, :class:`WrappingKey`, :class:`~gpucrypt.keys.KeyReference`, any
    :class:`KeyProvider`, or a :class:`~gpucrypt.keys.passphrase.Passphrase`. A stanza is
    tried only with identities that own its id (a fingerprint, key id or key reference; a
    passphrase for a ``scrypt`` stanza). ``context``: as given to :func:`seal_envelope`.
    :class:`KeyProviderError` (an HSM or KMS that cannot be used at all) propagates. Raises
    :class:`NoMatchingRecipient` ("no recipient in this file matches your key(s); it is
    for ..." with the envelope's labels, then why for each near miss: a disabled key, a
    failed unwrap; for a passphrase file just why: "wrong passphrase, or the file was
    altered", or a work factor above the limit)
    when none opens, :class:`EnvelopeError` when the envelope is malformed.

    ``_with_label`` (private: :func:`open_file_envelope_with_label`): return ``(data key,
    label of the stanza that opened)``. ``_then_without_context`` (private, the same
    caller's): when nothing opens, try the ``key-ref`` stanzas again with no context (the
    other kinds take none: their answer could not change); one error says why for both.
    """
    candidates = identity_list(identities)
    context = check_context(context)
    with audit.timed("envelope.open") as ev:
        stanzas = _decode(envelope)
        if len(stanzas) > 1 and any(s.kind == _SCRYPT for s in stanzas):
            raise EnvelopeError("malformed envelope: a passphrase stanza beside other stanzas "
                                "(a passphrase-encrypted file has no other recipient)")
        ev["recipients"] = [_stanza_label(s) for s in stanzas]
        notes: list[str] = []
        # each identity once (the same key given twice is asked once per stanza; the
        # envelope has no stanza twice, _envelope.decode), and each key reference or
        # remote key provider asked to unwrap at most MAX_PROVIDER_UNWRAPS stanzas per
        # context: every ask is a round trip to an HSM, a KMS or a vault, made before
        # anything authenticates the envelope
        candidates = _distinct(candidates)
        contexts = [context]
        if _then_without_context and context and any(s.kind == "key-ref" for s in stanzas):
            contexts.append({})
        # a keyset file that failed to load (a wrong passphrase) is not loaded again for
        # the next stanza: each load is a scrypt run, and a forged envelope has 255
        unloadable: set[int] = set()
        for attempt, attempt_context in enumerate(contexts):
            asked = [0] * len(candidates)
            for stanza in stanzas:
                if attempt and stanza.kind != "key-ref":
                    continue  # takes no context: tried once, above
                for n, identity in enumerate(candidates):
                    if n in unloadable:
                        continue
                    counted = _asks_a_provider(stanza, identity)
                    if counted and asked[n] == MAX_PROVIDER_UNWRAPS:
                        notes.append(_limit_note(identity))
                        continue
                    try:
                        dek = _try_open(stanza, identity, attempt_context)
                    except KeyNotFound:
                        pass
                    except (KeyUnavailable, KeysetError) as exc:
                        notes.append(str(exc))
                        if isinstance(exc, KeysetError) and _loads_a_keyset_file(identity):
                            unloadable.add(n)
                    except (InvalidUnwrap, InvalidTag, ValueError):
                        notes.append(f"the wrapped key for {_stanza_label(stanza)} failed to "
                                     f"authenticate: the envelope was altered or made with "
                                     f"another key")
                    else:
                        if dek is None:
                            continue  # not its stanza: nothing was asked
                        if not _DEK_MIN <= len(dek) <= _DEK_MAX:  # as sealing checks it
                            raise EnvelopeError(
                                f"the data key {_stanza_label(stanza)} wraps is {len(dek)} "
                                f"bytes, not {_DEK_MIN} to {_DEK_MAX}: the envelope was "
                                f"altered, or not made by gpucrypt")
                        ev["key_id"] = label = _stanza_label(stanza)
                        return (dek, label) if _with_label else dek
                    if counted:
                        asked[n] += 1
        detail = "; ".join(dict.fromkeys(notes))
        if stanzas[0].kind == _SCRYPT:
            raise NoMatchingRecipient(detail or "this file is encrypted with a passphrase, not "
                                                "for your key(s): open it with its passphrase")
        # who it is for (public labels: fingerprints, key ids), as the command line says
        # when no key was given: which key to look for
        labels = [_stanza_label(s) for s in stanzas]
        shown = ", ".join(labels[:8]) + (f" and {len(labels) - 8} more" if len(labels) > 8 else "")
        raise NoMatchingRecipient(f"no recipient in this file matches your key(s); it is for "
                                  f"{shown}" + (f" ({detail})" if detail else ""))


def open_file_envelope(envelope: bytes, identities: Any, salt: bytes) -> bytes:
    """:func:`open_envelope` for the envelope of a file whose header carries ``salt``:
    key references (an HSM, a KMS) bound to the file (:func:`file_context`), as
    ``encrypt_file`` and the command line seal them; then, only when the envelope has
    such stanzas, as sealed with no context (:func:`seal_envelope`'s default, which
    ``save_encrypted`` and ``encrypt_checkpoint`` take as they are given). Other stanzas
    take no context, so a second try could not change their answer (a wrong passphrase
    is not run through scrypt twice)."""
    return open_file_envelope_with_label(envelope, identities, salt)[0]


def open_file_envelope_with_label(envelope: bytes, identities: Any,
                                  salt: bytes) -> tuple[bytes, str]:
    """:func:`open_file_envelope`, also returning the label (as :func:`describe_envelope`
    gives it) of the stanza that opened: the one name of the file's key that someone
    holding only a recipient's public key cannot choose (the header's ``key_id`` is MACed
    under the data key, which whoever seals the file picks)."""
    from .references import file_context

    return _open_data_key(envelope, identities, file_context(salt), then_without_context=True)


def open_data_key(envelope: bytes, identities: Any, *, context: Any = None) -> bytes:
    """:func:`open_envelope` for a gpucrypt file's data key, which is ``DEK_SIZE`` bytes:
    envelopes take 16 to 64, and anyone holding a recipient's public key can wrap another
    length for it, which the file's cipher would refuse with a plain ``ValueError`` (a
    usage error, blaming the caller's key). :class:`EnvelopeError` instead."""
    return _open_data_key(envelope, identities, context)[0]


def _open_data_key(envelope: bytes, identities: Any, context: Any, *,
                   then_without_context: bool = False) -> tuple[bytes, str]:
    """:func:`open_data_key`'s data key and the label of the stanza that opened."""
    dek, label = open_envelope(envelope, identities, context=context, _with_label=True,
                               _then_without_context=then_without_context)
    if len(dek) != DEK_SIZE:
        raise EnvelopeError(f"this file's envelope holds a {len(dek)}-byte data key, not "
                            f"{DEK_SIZE}: the file was altered or not made by gpucrypt")
    return dek, label


def _try_open(stanza: Stanza, identity: Any, context: dict) -> bytes | None:
    """The DEK if ``identity`` owns ``stanza`` and unwraps it; None if it does not own it."""
    if stanza.kind == _SCRYPT:
        return identity.unwrap(stanza) if isinstance(identity, Passphrase) else None
    if isinstance(identity, Passphrase):
        return None
    if stanza.kind == "key-ref":
        stanza_id = stanza.recipient_id.decode("utf-8", "replace")
        if isinstance(identity, KeyReference) and identity.owns(stanza_id):
            return identity.unwrap(stanza_id, stanza.body, context)
        return None
    if isinstance(identity, KeyReference):
        if identity.scheme != "file" or stanza.kind != "aes-kwp":
            return None  # (loaded for the stanzas a keyset opens alone: a load runs scrypt)
        identity = identity.resolve()  # a keyset file: a KeyProvider, as below
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
