"""Key references: a picklable name for a key-encryption key that a provider holds.

A :class:`KeyReference` is built from a URI (:mod:`gpucrypt.keys._uri`:
``pkcs11:token=...;object=...``, ``awskms://arn:...``, ``file:///keyset.json``) and works
wherever a recipient or an identity does: :func:`~gpucrypt.keys.seal_envelope`,
:func:`~gpucrypt.keys.open_envelope`, ``encrypt_file``/``decrypt_file``/``rekey_file``.
It holds the URI and nothing else that survives pickling: the provider's session or
client, opened on first use in the process that uses it, is dropped by ``pickle`` and
after a ``fork``. PINs and passphrases are read from their source (an environment
variable or a file) at that moment, in that process. So a reference can travel in a
task graph, to a Ray worker or a DCP rank, and each resolves it itself.

Providers that keep their key inside (an HSM, a KMS) implement :class:`ExternalKey`:
they wrap and unwrap data keys and never return the key-encryption key. Their stanzas
are of type ``key-ref`` (docs/KEYS.md): the id is the key's canonical reference, the
body the provider's own wrapped form. ``file:`` references resolve to a
:class:`~gpucrypt.keys.keyset.Keyset` and make ordinary ``aes-kwp`` stanzas.

**Binding.** Sealing and opening take a ``context`` (str -> str), which the file layer
fills with :func:`file_context` (the file header's random salt). AWS KMS binds it as the
encryption context, PKCS#11 AES-GCM as associated data: a wrapped key moved into another
file's header no longer unwraps, and a KMS's own audit trail names the file.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Any, Mapping, Protocol, runtime_checkable

from .. import audit
from .._errors import KeyProviderError, KeysetError
from ._uri import KeyUri, check_absolute, check_secret_source, parse_key_uri

__all__ = ["KeyReference", "ExternalKey", "file_context", "context_bytes", "read_secret_source",
           "secret_source_path", "check_source_is_absolute", "with_passphrase_source",
           "PROVIDERS"]

#: URI scheme -> "module:class" of its :class:`ExternalKey` (imported on first use, so that
#: importing gpucrypt.keys imports neither python-pkcs11 nor boto3)
PROVIDERS = {
    "pkcs11": "gpucrypt.keys.pkcs11:Pkcs11Key",
    "awskms": "gpucrypt.keys.awskms:AwsKmsKey",
}

#: what each scheme needs installed, for the error when it is missing
_EXTRAS = {"pkcs11": "pip install 'gpucrypt[pkcs11]' (python-pkcs11)",
           "awskms": "pip install 'gpucrypt[aws]' (boto3)"}

_MAX_STANZA_ID = 255

#: where a ``file:`` reference naming no ``passphrase-source`` finds its keyset's passphrase:
#: the command line's variable, so that ``--kek file://KS`` reads what ``--keyset KS`` reads
DEFAULT_PASSPHRASE_ENV = "GPUCRYPT_PASSPHRASE"


@runtime_checkable
class ExternalKey(Protocol):
    """A key-encryption key that stays inside its provider (HSM, KMS).

    Contract:

    - ``provider``: a short name for audit records (``"pkcs11"``, ``"awskms"``);
    - ``wrap(dek, context) -> (stanza_id, body)``: wrap ``dek`` (16 to 64 bytes), bound to
      ``context`` where the mechanism can bind; ``stanza_id`` is the key's canonical
      reference (at most 255 bytes of UTF-8, no secret), ``body`` at most 65535 bytes;
    - ``owns(stanza_id) -> bool``: whether a ``key-ref`` stanza with this id is this key's
      to open (no network call needed when the answer is plain from the ids);
    - ``unwrap(stanza_id, body, context) -> dek``: raise
      :class:`~gpucrypt.keys.KeyNotFound` when the stanza turns out not to be this key's,
      :class:`~gpucrypt.keys.KeyUnavailable` when the provider refuses this key or this
      body (disabled key, wrong context, altered body), and
      :class:`~gpucrypt.keys.KeyProviderError` when the provider cannot be used at all.

    Messages name keys and endpoints, never a PIN, a credential or key material.
    """

    provider: str

    def wrap(self, dek: bytes, context: Mapping[str, str]) -> tuple[str, bytes]: ...

    def owns(self, stanza_id: str) -> bool: ...

    def unwrap(self, stanza_id: str, body: bytes, context: Mapping[str, str]) -> bytes: ...


def file_context(salt: bytes) -> dict:
    """The binding context of a file whose header carries ``salt`` (random per file):
    ``{"gpucrypt-file": <salt in hex>}``. Rekeying keeps the salt, so it keeps the context."""
    return {"gpucrypt-file": bytes(salt).hex()}


def check_context(context: Any) -> dict:
    """``context`` as a new dict of str -> str (None -> {}); TypeError otherwise."""
    if context is None:
        return {}
    if not isinstance(context, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in context.items()):
        raise TypeError("context must be a mapping of str to str")
    return dict(context)


def context_bytes(context: Mapping[str, str]) -> bytes:
    """Canonical bytes of ``context`` (sorted, compact JSON), for use as associated data."""
    return json.dumps(dict(context), sort_keys=True, separators=(",", ":")).encode("utf-8")


def secret_source_path(source: str) -> str | None:
    """The file a ``*-source`` value names (``file:PATH``, ``file://PATH`` or a plain
    absolute path), None for ``env:VAR``: the one place that says which forms are files,
    for the reader below and for the command line's permission check of the same file."""
    if source.startswith("env:"):
        return None
    path = source[5:] if source.startswith("file:") else source
    return path[2:] if path.startswith("//") else path


def check_source_is_absolute(attribute: str, source: str) -> None:
    """KeysetError for a ``*-source`` naming a relative file (``file:pin.txt``): a reference
    is resolved in whichever process uses it, from whatever folder that process is in, so
    a relative name could read another file there. The value is not quoted (it may be the
    secret itself, pasted in the wrong place)."""
    path = secret_source_path(source)
    if path is not None:
        check_absolute(attribute, path, f"{attribute}=file:/path/to/file")


def read_secret_source(source: str | None, default_env: str, what: str,
                       attribute: str = "pin-source") -> str:
    """The secret named by ``source``: ``env:VAR`` (an environment variable), ``file:/PATH``
    or a plain absolute path (the file's text without its final newline); with no source,
    the environment variable ``default_env``. :class:`KeyProviderError` saying where to put
    it when it is missing or not UTF-8, :class:`KeysetError` for a source of none of these
    forms. The secret is never part of a message."""
    if source is None:
        source = "env:" + default_env
    check_secret_source(attribute, source)
    check_source_is_absolute(attribute, source)
    if source.startswith("env:"):
        name = source[4:]
        value = os.environ.get(name)
        if not value:
            # set but empty is named as such: "set the variable" to one who did reads as a bug
            state = "set but empty" if value == "" else "not set"
            raise KeyProviderError(f"{what} is needed: set the environment variable {name} "
                                   f"({state} in this process), or name a file holding it in "
                                   f"the URI ({attribute}=file:/path)")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # bytes os.environ could not decode: never quoted
            raise KeyProviderError(f"{what}: the environment variable {name} is not valid "
                                   f"UTF-8: set it to UTF-8 text") from None
        return value
    path = secret_source_path(source)
    try:  # read as the command line reads --passphrase-file (its earlier reading kept)
        from .passphrase import from_file_bytes

        with open(path, "rb") as f:
            value = from_file_bytes(f.read())
    except OSError as exc:
        raise KeyProviderError(f"{what}: cannot read {path} ({exc.strerror})") from None
    except UnicodeDecodeError:  # the codec's message would quote a byte of the secret
        raise KeyProviderError(f"{what}: {path} is not valid UTF-8: save it as UTF-8 "
                               f"text") from None
    if not value:
        raise KeyProviderError(f"{what}: {path} is empty")
    return value


class KeyReference:
    """A key-encryption key named by a URI, resolved on first use in the process using it.

    ``KeyReference("pkcs11:token=prod;object=model-kek")``, ``KeyReference("awskms://arn:aws:
    kms:eu-west-1:111122223333:key/...")``, ``KeyReference("file:///etc/gpucrypt/keyset.json")``.
    Use it as a recipient (wraps under the key; a ``file:`` keyset's primary) and as an
    identity (opens stanzas the key owns). :attr:`uri` is the canonical URI: every
    attribute gpucrypt reads, ``x-wrap`` included, so that a copy or a pickle behaves as the
    original, and references that wrap differently are not equal. :attr:`label` is the
    same without its query (module path, endpoint, PIN source, ``x-wrap``): what audit
    records and errors show. Pickles as its URI only.
    """

    __slots__ = ("uri", "_parsed", "_resolved", "_pid")

    def __init__(self, uri: "str | KeyReference"):
        if isinstance(uri, KeyReference):
            uri = uri.uri
        self._parsed: KeyUri = parse_key_uri(uri)
        for name, value in self._parsed.query.items():
            if name.endswith("-source"):  # said here, in the driver, not on a worker
                check_source_is_absolute(name, value)
        self.uri: str = self._parsed.canonical()
        self._resolved: Any = None
        self._pid = 0

    # --- identity, printing, pickling
    @property
    def scheme(self) -> str:
        return self._parsed.scheme

    @property
    def provider(self) -> str:
        """``"pkcs11"``, ``"awskms"`` or ``"keyset"`` (a ``file:`` reference)."""
        return "keyset" if self.scheme == "file" else self.scheme

    @property
    def label(self) -> str:
        return self.uri.split("?", 1)[0]

    @property
    def query(self) -> dict:
        """The URI's query attributes (how to reach the key), decoded."""
        return dict(self._parsed.query)

    @property
    def attributes(self) -> dict:
        """The URI's path attributes (which key), decoded."""
        return dict(self._parsed.path)

    def __repr__(self) -> str:
        return f"KeyReference({self.label!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeyReference) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __reduce__(self):
        return (KeyReference, (self.uri,))

    # --- resolving
    def resolve(self) -> Any:
        """The provider object (an :class:`ExternalKey`) or, for ``file:``, the
        :class:`~gpucrypt.keys.keyset.Keyset`; opened once per process."""
        if self._resolved is None or self._pid != os.getpid():
            self._resolved, self._pid = self._open(), os.getpid()
        return self._resolved

    def _open(self) -> Any:
        if self.scheme == "file":
            return _load_keyset(self._parsed)
        module_name, _, class_name = PROVIDERS[self.scheme].partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise KeyProviderError(f"{self.label}: the {self.scheme} provider needs a package that "
                                   f"is not installed ({exc.name}): {_EXTRAS[self.scheme]}") from None
        return getattr(module, class_name).from_uri(self._parsed)

    # --- used by the envelope (gpucrypt.keys.recipients)
    def wrap(self, dek: bytes, context: Mapping[str, str]) -> tuple[str, bytes]:
        """``(stanza id, body)`` of ``dek`` wrapped by this external key (not for ``file:``)."""
        with audit.timed("kek.wrap", provider=self.provider, key_ref=self.label) as ev:
            stanza_id, body = self.resolve().wrap(dek, context)
            if not 1 <= len(stanza_id.encode("utf-8")) <= _MAX_STANZA_ID:
                raise KeysetError(f"{self.label}: the key's reference {stanza_id!r} is longer than "
                                  f"an envelope stanza id may be (255 bytes)")
            ev["key_id"] = stanza_id
        return stanza_id, body

    def owns(self, stanza_id: str) -> bool:
        return self.scheme != "file" and self.resolve().owns(stanza_id)

    def unwrap(self, stanza_id: str, body: bytes, context: Mapping[str, str]) -> bytes:
        with audit.timed("kek.unwrap", provider=self.provider, key_ref=self.label,
                         key_id=stanza_id):
            return self.resolve().unwrap(stanza_id, body, context)


def with_passphrase_source(ref: KeyReference, source: str) -> KeyReference:
    """``ref`` reading its keyset's passphrase from ``source`` (``env:VAR``, ``file:/PATH``)
    when it is a ``file:`` reference naming no ``passphrase-source`` (its own one wins);
    ``ref`` itself otherwise. Naming a source makes the keyset expected sealed. This is how
    a passphrase given beside a reference (KeyReferences' ``passphrase_env=``) reaches it."""
    if ref.scheme != "file" or "passphrase-source" in ref.query:
        return ref
    return KeyReference(KeyUri("file", ref.attributes,
                               {**ref.query, "passphrase-source": source}).canonical())


def _load_keyset(parsed: KeyUri):
    from .keyset import Keyset

    path = parsed.path["path"]
    sealed = Keyset.inspect(path)["protection"]
    if sealed not in (None, "passphrase"):
        raise KeysetError(f"{path} is sealed by a key-encryption key: a file: reference opens "
                          f"keysets sealed by a passphrase (or not sealed)")
    source = parsed.query.get("passphrase-source")
    if sealed is None:
        # A passphrase given means the keyset is expected sealed, as Keyset.load and the
        # command line's --keyset expect it: an unsealed file there may have been put in the
        # sealed one's place, and its primary would wrap every new data key. Given is the
        # URI's passphrase-source (KeyReferences' passphrase_env= becomes one), or a
        # $GPUCRYPT_PASSPHRASE that holds one, the variable this reference would read and
        # that the command line hands every keyset it reads (--kek file:// as --keyset).
        # Refused before the source is read: an unsealed file is the problem, not the secret.
        if source is not None:
            undo = ("through a reference without passphrase-source (which KeyReferences' "
                    "passphrase_env= sets on a file:// URI naming none)")
        elif os.environ.get(DEFAULT_PASSPHRASE_ENV):
            undo = (f"with {DEFAULT_PASSPHRASE_ENV} unset (a file:// reference naming no "
                    f"passphrase-source reads it, on the command line too)")
        else:
            return Keyset.load(path)
        raise KeysetError(f"{path} is not sealed, though a passphrase was given: it may have "
                          f"been replaced. Check where the file came from; if it is meant to "
                          f"be unsealed, use it without one: {undo}")
    passphrase = read_secret_source(source, DEFAULT_PASSPHRASE_ENV,
                                    f"the passphrase of the keyset {path}", "passphrase-source")
    # with the passphrase, Keyset.load refuses a file replaced by an unsealed one since inspect
    return Keyset.load(path, passphrase)
