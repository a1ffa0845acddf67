"""Key management: keysets, envelope encryption for several recipients, key providers.

Every file (model, tensor batch) is encrypted under a fresh random **data key**
(DEK). The DEK never leaves memory in the clear: it is *wrapped* once per
recipient, and the wrapped copies form the file's **envelope** (format in
:mod:`gpucrypt.keys._envelope` and docs/KEYS.md), which the stream header carries.
Four wrappings exist:

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
``key-ref``                 a key that stays inside a provider, named by a
                            :class:`KeyReference` URI: a PKCS#11 token
                            (:mod:`~gpucrypt.keys.pkcs11`) or AWS KMS
                            (:mod:`~gpucrypt.keys.awskms`)
``scrypt``                  a passphrase (:class:`Passphrase`): scrypt, then
                            ChaCha20-Poly1305; alone in its envelope, as in age
==========================  ======================================================

All but ``key-ref`` come from ``cryptography`` (``keywrap``, ``hazmat.primitives.hpke``,
``Scrypt``); ``key-ref`` from the token or the KMS; nothing here implements a primitive.

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

Where things are:

- :mod:`~gpucrypt.keys.keyset`: :class:`Keyset`, :class:`KeysetKey`, key statuses;
- :mod:`~gpucrypt.keys.providers`: :class:`KeyProvider` and its implementations,
  :class:`WrappingKey`;
- :mod:`~gpucrypt.keys.references`: :class:`KeyReference` (``pkcs11:``, ``awskms://``,
  ``file://`` URIs, parsed by ``_uri``), :class:`ExternalKey`; the providers behind them
  in :mod:`~gpucrypt.keys.pkcs11` and :mod:`~gpucrypt.keys.awskms` (optional extras,
  imported when a reference is first used);
- :mod:`~gpucrypt.keys.recipients`: :class:`Recipient`, :class:`Identity`, and
  :func:`seal_envelope`/:func:`open_envelope`/:func:`describe_envelope`;
- :mod:`~gpucrypt.keys.passphrase`: :class:`Passphrase` (passphrase-encrypted files);
- :mod:`~gpucrypt.keys.portable`: :class:`KeyReferences`, keys named by reference (paths,
  providers) so that they travel to other processes without their material;
- ``_envelope`` (envelope bytes), ``_document`` (key files on disk, sealing);
- the errors live in :mod:`gpucrypt._errors`, shared with :mod:`gpucrypt.audit`.

``encrypt_file``, ``decrypt_file`` and ``rekey_file`` live in
:mod:`gpucrypt.files.keyed`; they are reachable here too, imported on first use.

May import: the ground floor (``_errors``, ``_buffers``, ``audit``), :mod:`gpucrypt.aead`
(to seal key files) and ``files._atomic`` (atomic writes). Never the rest of
:mod:`gpucrypt.files`, the tensors, the pipeline or the CLI.
"""
from __future__ import annotations

from typing import Any

from .._errors import (EnvelopeError, KeyManagementError, KeyNotFound, KeyProviderError,
                       KeysetError, KeyUnavailable, NoMatchingRecipient)
# DEFAULT_SCRYPT_N, FILE_VERSION, EnvelopeFormatError, Stanza, DEFAULT_KEK_ALGORITHM,
# KEK_ALGORITHMS and the *_FORMAT names are not in __all__ but were always reachable here.
from ._document import DEFAULT_SCRYPT_N, FILE_VERSION
from ._envelope import EnvelopeFormatError, Stanza
from .passphrase import Passphrase
from .keyset import (DEFAULT_KEK_ALGORITHM, DESTROYED, DISABLED, ENABLED, KEK_ALGORITHMS,
                     KEYSET_FORMAT, PRIMARY, Keyset, KeysetKey)
from .providers import (CallableKeyProvider, EnvKeyProvider, FileKeyProvider, KeyProvider,
                        WrappingKey)
from .references import ExternalKey, KeyReference, file_context
from .recipients import (DEK_SIZE, HPKE_INFO, IDENTITY_FORMAT, RECIPIENT_FORMAT, Identity,
                         Recipient, describe_envelope, generate_dek, open_envelope,
                         seal_envelope)

__all__ = [
    "KeyManagementError", "KeysetError", "KeyNotFound", "KeyUnavailable", "NoMatchingRecipient",
    "EnvelopeError", "KeyProviderError", "KeyReference", "ExternalKey", "file_context", "KeysetKey", "Keyset", "Recipient", "Identity", "WrappingKey", "Passphrase",
    "KeyProvider", "FileKeyProvider", "EnvKeyProvider", "CallableKeyProvider",
    "generate_dek", "seal_envelope", "open_envelope", "describe_envelope",
    "encrypt_file", "decrypt_file", "rekey_file",
    "PRIMARY", "ENABLED", "DISABLED", "DESTROYED", "HPKE_INFO", "DEK_SIZE",
]

_FILE_OPERATIONS = ("encrypt_file", "decrypt_file", "rekey_file")


def __getattr__(name: str) -> Any:
    """``encrypt_file``, ``decrypt_file``, ``rekey_file``: from :mod:`gpucrypt.files.keyed`,
    imported on first use so that importing the keys does not import the files layer."""
    if name in _FILE_OPERATIONS:
        from ..files import keyed

        return getattr(keyed, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
