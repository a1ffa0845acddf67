"""Key providers: where symmetric key-encryption keys come from.

:class:`KeyProvider` is the contract (``get_key(key_id) -> bytes``); a
:class:`~gpucrypt.keys.keyset.Keyset` is one, and so are :class:`FileKeyProvider` (a
keyset file loaded on first use), :class:`EnvKeyProvider` (an environment variable)
and :class:`CallableKeyProvider` (any function: a KMS or HSM client call).
:class:`WrappingKey` names one such key so that it can wrap or unwrap a data key.
"""
from __future__ import annotations

import base64
import binascii
import os
from typing import Callable, Protocol, runtime_checkable

from .._buffers import bytes_arg
from .._errors import KeyManagementError, KeyNotFound, KeysetError
from ._material import HoldsKeyMaterial
from .keyset import KEY_ID_RULE, Keyset, key_id_problem

__all__ = ["KeyProvider", "FileKeyProvider", "EnvKeyProvider", "CallableKeyProvider",
           "WrappingKey"]


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


class FileKeyProvider(HoldsKeyMaterial):
    """Keys from a keyset file, loaded on first use (``passphrase``/``kek`` if sealed).

    Pickles as its path while it holds nothing secret: given a passphrase or a KEK, or
    once it has loaded the keyset, it refuses (``TypeError``), as a keyset does."""

    _travel_instead = ("pickle a KeyReferences naming the keyset file instead (keyset=PATH, "
                       "passphrase_env=VAR), and load it in the process that uses it")

    def __init__(self, path: str | os.PathLike, passphrase: str | bytes | None = None, *,
                 kek: bytes | None = None):
        from ._document import kept_secrets, refuse_both_secrets

        refuse_both_secrets(passphrase, kek)  # here, not at the first get_key far away
        # copies: the keyset is loaded at the first get_key, after the caller may have
        # wiped a bytearray it gave (the load then failed: "wrong passphrase or key")
        passphrase, kek = kept_secrets(passphrase, kek)
        self._path, self._passphrase, self._kek = os.fspath(path), passphrase, kek
        self._keyset: Keyset | None = None

    def __repr__(self) -> str:
        return f"FileKeyProvider({self._path!r})"

    @property
    def keyset(self) -> Keyset:
        if self._keyset is None:
            try:
                self._keyset = Keyset.load(self._path, self._passphrase, kek=self._kek)
            except KeysetError as exc:
                if self._passphrase is None and self._kek is None \
                        and _sealed_with_passphrase(self._path):
                    # the document's hint names the command line's sources (--passphrase-file,
                    # $GPUCRYPT_PASSPHRASE), which this provider never reads
                    raise type(exc)(
                        f"{self._path} is sealed with a passphrase: pass it, "
                        f"FileKeyProvider(path, passphrase) (this provider reads no environment "
                        f"variable: not GPUCRYPT_PASSPHRASE); to load it in other processes, "
                        f"KeyReferences(keyset=path, passphrase_env=VAR) or "
                        f"KeyReference('file://...?passphrase-source=env:VAR') reads it where "
                        f"it is used") from None
                raise
        return self._keyset

    def get_key(self, key_id: str) -> bytes:
        return self.keyset.get_key(key_id)

    def __reduce__(self):
        if self._passphrase is not None or self._kek is not None or self._keyset is not None:
            return super().__reduce__()  # refuses
        return (FileKeyProvider, (self._path,))


def _sealed_with_passphrase(path: str | os.PathLike) -> bool:
    """Whether ``path`` reads as a keyset sealed with a passphrase: what a load without one
    failed for, if so. False for anything else (a missing or malformed file), whose load
    error already says what is wrong."""
    try:
        return Keyset.inspect(path)["protection"] == "passphrase"
    except (KeyManagementError, OSError, ValueError):
        return False


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
        # bytes_arg: bytes(32) would be a key of 32 zero bytes
        return bytes_arg(key, f"the key {self._name} returned for {key_id!r}")


class WrappingKey(HoldsKeyMaterial):
    """A symmetric key-encryption key with an id: as a recipient it wraps with AES-KWP,
    as an identity it unwraps stanzas carrying its id. Build one from bytes, or from a
    provider with :meth:`from_provider` (the material is fetched when needed).

    One built from a provider pickles as its id and provider (which must pickle itself:
    a loaded ``Keyset`` refuses); one holding bytes refuses (``TypeError``)."""

    _travel_instead = ("build it with WrappingKey.from_provider(...) so that only the "
                       "provider travels, or pickle a KeyReferences naming the keyset file")

    def __init__(self, key_id: str, key: bytes | None = None, *,
                 provider: KeyProvider | None = None):
        if (key is None) == (provider is None):
            raise TypeError("give exactly one of key= and provider=")
        if not isinstance(key_id, str):
            raise TypeError(f"key_id must be a str, not {type(key_id).__name__}")
        problem = key_id_problem(key_id)  # here, not at the first wrap
        if problem is not None:
            raise ValueError(f"key_id is {problem}: {KEY_ID_RULE}")
        if key is not None:
            key = bytes_arg(key, "key")  # bytes(16) would be a key of 16 zero bytes
            if len(key) not in (16, 24, 32):
                raise ValueError("an AES key-wrap key must be 16, 24 or 32 bytes")
        self.key_id, self._key, self._provider = key_id, key, provider

    @classmethod
    def from_provider(cls, provider: KeyProvider, key_id: str) -> "WrappingKey":
        return cls(key_id, provider=provider)

    def __repr__(self) -> str:
        return f"WrappingKey(id={self.key_id!r})"

    def __reduce__(self):
        if self._key is not None:
            return super().__reduce__()  # refuses: the bytes would travel
        return (WrappingKey.from_provider, (self._provider, self.key_id))

    def secret_bytes(self) -> bytes:
        if self._key is not None:
            return self._key
        assert self._provider is not None
        return self._provider.get_key(self.key_id)
