"""Key references: names of keys that travel to other processes, resolved where they are used.

Distributed readers and writers (fsspec filesystems pickled to workers, Ray actors) must
never carry key bytes in a pickle or a task graph. They carry a :class:`KeyReferences`
instead, and each process calls :meth:`KeyReferences.resolve` to load the keys itself.

A single reference is one of:

- a path (str or PathLike) to a keyset file, an identity file or a recipient file
  (``gpucrypt keys ...`` writes them); which one is read from the file's ``format``.
  Sealed files take their passphrase from the environment variable ``passphrase_env``
  names, read at resolution time (never stored); a ``file://`` key URI too, unless it
  names its own ``passphrase-source``;
- an object with a ``resolve()`` method returning a key object (the hook for URI
  references such as ``pkcs11:`` or a KMS, resolved on the worker);
- a key object that holds no material: a :class:`~gpucrypt.keys.providers.WrappingKey`
  built from a provider, a :class:`~gpucrypt.keys.recipients.Recipient` (public), or
  any :class:`~gpucrypt.keys.providers.KeyProvider` other than those that cache
  material (a loaded :class:`Keyset`, a :class:`FileKeyProvider`: give their path).

Objects holding secret material (a ``Keyset``, ``KeysetKey``, ``Identity``, or a
``WrappingKey`` made from bytes, or from a provider that is itself refused) are refused
with a ``TypeError``: they would travel in every pickle.
"""
from __future__ import annotations

import os
import threading
from typing import Any

from .._errors import KeysetError
from .keyset import KEYSET_FORMAT, Keyset, KeysetKey
from .providers import FileKeyProvider, KeyProvider, WrappingKey, _sealed_with_passphrase
from ._uri import SCHEMES
from .recipients import (IDENTITY_FORMAT, RECIPIENT_FORMAT, Identity, Recipient, _file_document,
                         open_file_envelope, recipient_list)
from .references import KeyReference, with_passphrase_source

__all__ = ["KeyReferences", "ResolvedKeys", "resolve_reference"]

#: unwrapped data keys a :class:`ResolvedKeys` remembers (by envelope), so that reading
#: many segments or files under one envelope unwraps it once
_DATA_KEY_CACHE = 1024


def _as_tuple(refs: Any) -> tuple:
    if refs is None:
        return ()
    if isinstance(refs, (list, tuple)):
        return tuple(refs)
    return (refs,)


def _is_key_uri(ref: str) -> bool:
    """A ``pkcs11:``, ``awskms://`` or ``file://`` key reference (docs/KEYS.md), not a path."""
    scheme, colon, _ = ref.partition(":")
    return bool(colon) and scheme.lower() in SCHEMES


def _check_reference(ref: Any) -> Any:
    """``ref`` if it may travel in a pickle (see the module docstring), else TypeError.
    A key URI string becomes a :class:`~gpucrypt.keys.references.KeyReference` (pickled
    as its URI), so a malformed one fails here, in the driver, not on a worker."""
    if isinstance(ref, str) and _is_key_uri(ref):
        return KeyReference(ref)
    if isinstance(ref, (str, os.PathLike)):
        return os.fspath(ref)
    if isinstance(ref, (bytes, bytearray, memoryview)):
        raise TypeError("key bytes are not a key reference: they would travel in every "
                        "pickle; give the path of a keyset or identity file instead")
    if isinstance(ref, (Keyset, KeysetKey, Identity)):
        raise TypeError(f"a loaded {type(ref).__name__} holds key material and would travel in "
                        f"every pickle; give the path of its file instead")
    if isinstance(ref, FileKeyProvider):
        raise TypeError("a FileKeyProvider caches its keyset once used, and would then carry "
                        "it in every pickle; give the keyset path")
    if isinstance(ref, WrappingKey) and ref._key is not None:
        raise TypeError(f"{ref!r} holds its key bytes, which would travel in every pickle; "
                        f"build it with WrappingKey.from_provider(...) so that only the "
                        f"provider travels")
    if isinstance(ref, WrappingKey):
        try:
            _check_reference(ref._provider)  # the provider travels with it
        except TypeError as exc:
            raise TypeError(f"{ref!r} is built from a provider that may not travel: "
                            f"{exc}") from None
    if hasattr(ref, "resolve") or isinstance(ref, (WrappingKey, Recipient, KeyProvider)):
        return ref
    raise TypeError(f"not a key reference: {type(ref).__name__}; give a path to a keyset, "
                    f"identity or recipient file, a provider-backed WrappingKey, or an object "
                    f"with a resolve() method")


#: what opens a sealed key file named by path in a KeyReferences (the load's own hint names
#: --passphrase-file and $GPUCRYPT_PASSPHRASE, which a path never reads)
_PATH_PASSPHRASE_HINT = ("name the environment variable holding it, read in each process, "
                         "with KeyReferences(..., passphrase_env=VAR) (a path reads no other "
                         "variable: not GPUCRYPT_PASSPHRASE)")


def resolve_reference(ref: Any, passphrase_env: str | None = None) -> Any:
    """The key object one reference names, loaded in this process."""
    if isinstance(ref, KeyReference):
        # a key inside an HSM or a KMS is used through its reference (which wraps, unwraps
        # and audits); only a file: reference names a keyset to load
        if ref.scheme != "file":
            return ref
        if passphrase_env:
            # as a path is: the passphrase from passphrase_env, and so a keyset expected
            # sealed (a file: reference naming a passphrase refuses one that is not: it may
            # have been replaced, and its primary would wrap new data keys)
            ref = with_passphrase_source(ref, "env:" + passphrase_env)
        return ref.resolve()
    if hasattr(ref, "resolve") and not isinstance(ref, (str, os.PathLike)):
        return ref.resolve()
    if not isinstance(ref, (str, os.PathLike)):
        return ref
    passphrase = None
    if passphrase_env:
        passphrase = os.environ.get(passphrase_env)
        if not passphrase:
            # set but empty is refused as unset is, and as a file:// reference refuses it:
            # "" went on as a passphrase, and the load failed as if the file were damaged
            state = "not set" if passphrase is None else "set but empty"
            raise KeysetError(f"environment variable {passphrase_env} (the passphrase of "
                              f"{ref}) is {state} in this process: set it to the passphrase")
    doc = _file_document(ref)
    kind = None if doc is None else doc.get("format")
    if kind == KEYSET_FORMAT:
        try:
            return Keyset.load(ref, passphrase)
        except KeysetError as exc:
            if passphrase is None and _sealed_with_passphrase(ref):
                # the document's hint names the command line's sources, which a path in
                # KeyReferences never reads
                raise type(exc)(f"{ref} is sealed with a passphrase: {_PATH_PASSPHRASE_HINT}, "
                                f"or name the keyset as file://{os.path.abspath(ref)}"
                                f"?passphrase-source=env:VAR (or file:/path)") from None
            raise
    if kind == IDENTITY_FORMAT:
        # an identity only unwraps: one that is not sealed is taken as it is beside sealed
        # key files (a keyset, which wraps new data keys under its primary, is refused
        # unsealed when a passphrase is given: it may have been replaced)
        try:
            return Identity.load(ref, passphrase if "protection" in doc else None)
        except KeysetError as exc:
            protection = doc.get("protection")
            if passphrase is None and isinstance(protection, dict) \
                    and protection.get("method") == "passphrase":
                raise type(exc)(f"{ref} is sealed with a passphrase: "
                                f"{_PATH_PASSPHRASE_HINT}") from None
            raise
    if kind == RECIPIENT_FORMAT:
        return Recipient.load(ref)
    if not os.path.exists(ref):
        raise KeysetError(f"key reference {ref}: no such file in this process (is the path "
                          f"the same on every worker?)")
    raise KeysetError(f"key reference {ref}: not a gpucrypt keyset, identity or recipient file")


class KeyReferences:
    """Which keys a distributed reader or writer uses, by reference (picklable, no secrets).

    ``keyset``: a keyset reference; its primary wraps new data keys and any enabled key
    unwraps. ``identities``: references that unwrap (identity files, providers).
    ``recipients``: references that new data keys are wrapped for (recipient files;
    identities wrap for their public half). ``passphrase_env``: the environment variable
    holding the passphrase of sealed key files, read in each process; the keyset file (a
    path, or a ``file://`` URI without its own ``passphrase-source``) is then expected
    sealed (one that is not is refused: it may have been replaced, and its primary would
    wrap new data keys), identity files may be either.
    """

    __slots__ = ("keyset", "identities", "recipients", "passphrase_env")

    def __init__(self, keyset: Any = None, identities: Any = None, recipients: Any = None,
                 passphrase_env: str | None = None):
        self.keyset = None if keyset is None else _check_reference(keyset)
        self.identities = tuple(_check_reference(r) for r in _as_tuple(identities))
        self.recipients = tuple(_check_reference(r) for r in _as_tuple(recipients))
        self.passphrase_env = passphrase_env
        if self.keyset is None and not self.identities and not self.recipients:
            raise ValueError("no key reference given: give keyset=, identities= or recipients=")

    @classmethod
    def of(cls, keys: Any = None, **references: Any) -> "KeyReferences":
        """``keys`` when it already is a KeyReferences, else one built from ``references``."""
        if isinstance(keys, cls):
            if any(v is not None for v in references.values()):
                raise TypeError("give keys= or keyset=/identities=/recipients=, not both")
            return keys
        if keys is not None:
            raise TypeError(f"keys must be a KeyReferences, not {type(keys).__name__}")
        return cls(**references)

    def __repr__(self) -> str:
        return (f"KeyReferences(keyset={self.keyset!r}, identities={list(self.identities)!r}, "
                f"recipients={list(self.recipients)!r})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeyReferences) and self._state() == other._state()

    def __hash__(self) -> int:
        return hash(repr(self))

    def _state(self) -> tuple:
        return self.keyset, self.identities, self.recipients, self.passphrase_env

    def __getstate__(self) -> tuple:
        return self._state()

    def __setstate__(self, state: tuple) -> None:
        self.keyset, self.identities, self.recipients, self.passphrase_env = state

    def resolve(self) -> "ResolvedKeys":
        """Load the keys in this process (on the worker, not in the driver)."""
        def load(ref):
            return resolve_reference(ref, self.passphrase_env)
        keyset = None if self.keyset is None else load(self.keyset)
        return ResolvedKeys(keyset, [load(r) for r in self.identities],
                            [load(r) for r in self.recipients])


class ResolvedKeys:
    """Keys loaded from a :class:`KeyReferences`, in one process; never pickled.

    ``keyset`` and ``recipients`` are what :func:`gpucrypt.keys.encrypt_file` takes;
    ``keyset`` and ``identities``, what :func:`gpucrypt.keys.decrypt_file` takes.
    :meth:`data_key` unwraps an envelope, remembering the last data keys it unwrapped; it
    may be called from several threads at once (a filesystem's readers share one).
    """

    def __init__(self, keyset: Any, identities: list, recipients: list):
        self.keyset, self.identities, self.recipients = keyset, identities, recipients
        self._data_keys: dict[tuple[bytes, bytes], bytes] = {}
        #: guards _data_keys only: two threads evicting at once took the same oldest entry
        #: (KeyError), or one iterated while another inserted (RuntimeError)
        self._data_keys_lock = threading.Lock()

    def __reduce__(self):
        raise TypeError("resolved keys hold key material and never travel: pickle the "
                        "KeyReferences they came from")

    def can_encrypt(self) -> bool:
        return self.keyset is not None or bool(self.recipients)

    def unwrappers(self) -> list:
        """Everything that may open an envelope: the identities, then the keyset."""
        return [*self.identities, *([] if self.keyset is None else [self.keyset])]

    def wrappers(self) -> list:
        """Everything a new data key is wrapped for: the recipients, then the keyset."""
        items = [] if not self.recipients else recipient_list(self.recipients)
        return items + ([] if self.keyset is None else [self.keyset])

    def data_key(self, envelope: bytes, salt: bytes = b"") -> bytes:
        """The data key ``envelope`` wraps (NoMatchingRecipient when none of these keys
        opens it). ``salt``: the file header's, which keys in an HSM or a KMS are bound to
        (:func:`~gpucrypt.keys.file_context`, as ``encrypt_file`` binds them)."""
        slot = (envelope, salt)
        with self._data_keys_lock:
            key = self._data_keys.get(slot)
        if key is not None:
            return key
        # unwrapped outside the lock: an HSM or a KMS takes milliseconds to seconds, and
        # threads reading other files must not wait for it. Two threads missing the same
        # envelope both unwrap it (the same key); the cache keeps one.
        key = open_file_envelope(envelope, self.unwrappers(), salt)
        with self._data_keys_lock:
            if slot not in self._data_keys:
                if len(self._data_keys) >= _DATA_KEY_CACHE:
                    del self._data_keys[next(iter(self._data_keys))]  # the oldest
                self._data_keys[slot] = key
        return key

