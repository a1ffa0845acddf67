"""Files sealed for recipients or a keyset: :func:`encrypt_file`, :func:`decrypt_file`,
:func:`rekey_file`.

Each file gets a fresh data key; the key's envelope (:mod:`gpucrypt.keys`) goes into
the header of a :mod:`gpucrypt.files.stream` file, and the data into its segments.
Rekeying rewrites only the header, of a stream file or of a model file
(:mod:`gpucrypt.files.models`, told apart by their magic bytes). Keys inside an HSM or a
KMS (``KeyReference``) are bound to the file through :func:`gpucrypt.keys.file_context`
of the header's salt, which is drawn here, before the header, so that the envelope can
carry the binding; rekeying keeps the salt and with it the binding. Users reach these as ``gpucrypt.keys.encrypt_file``
and so on; they live here because keys sit below files: a key never needs to know
about files.
"""
from __future__ import annotations

import os
from typing import Any

from .. import audit
from ..keys import (KeyReference, Keyset, KeysetKey, NoMatchingRecipient, WrappingKey,
                    describe_envelope, file_context, generate_dek)
from ..keys.recipients import (identity_list, open_file_envelope, recipient_list,
                               seal_envelope_with_labels)
from . import _format, stream

__all__ = ["encrypt_file", "decrypt_file", "rekey_file"]


def _header_field(header: Any, name: str) -> Any:
    return header.get(name) if isinstance(header, dict) else getattr(header, name, None)


def _primary_key_id(recipients: list) -> str | None:
    for item in recipients:
        if isinstance(item, KeyReference) and item.scheme == "file":
            item = item.resolve()  # a keyset file, loaded once (cached on the reference)
        if isinstance(item, Keyset):
            return item.primary.id
        if isinstance(item, KeysetKey):
            return item.id
        if isinstance(item, WrappingKey):
            return item.key_id
    return None


def _gather(recipients: Any, keyset: Keyset | None) -> list:
    items = [] if recipients is None else recipient_list(recipients)
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
    items = _gather(recipients, keyset)
    path = src if isinstance(src, (str, os.PathLike)) else None
    with audit.timed("file.encrypt", path=os.fspath(path) if path else None) as ev:
        dek, salt = generate_dek(), os.urandom(_format.SALT_SIZE)  # fresh per file, as stream's own
        envelope, labels = seal_envelope_with_labels(dek, items, context=file_context(salt))
        key_id = _primary_key_id(items)
        ev.update(key_id=key_id, recipients=labels)
        header = stream.encrypt(src, dst, dek, key_id=key_id, envelope=envelope, _salt=salt,
                                **stream_options)
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
    items = identity_list(identities)
    if keyset is not None:
        items.append(keyset)
    if not items:
        raise ValueError("give identities= and/or keyset=")
    return items


def _is_model_file(path: Any) -> bool:
    from .models import MAGIC

    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _file_envelope(src: Any, model: bool = False) -> tuple[bytes, Any, Any]:
    """The envelope and header of ``src``, and ``src`` as the stream reads it again: rewound
    where it can be, else with the header put back in front of the rest (a pipe)."""
    if model:
        from . import models

        header = models.read_header(src)
    else:
        header, src = stream._header_and_whole(src)
    envelope = _header_field(header, "envelope")
    if not envelope:
        raise NoMatchingRecipient("this file carries no envelope: it was encrypted with a raw "
                                  "key, not for recipients or a keyset")
    return envelope, header, src


def decrypt_file(src: Any, dst: Any, *, identities: Any = None, keyset: Keyset | None = None,
                 **stream_options: Any) -> dict:
    """Decrypt ``src`` (made by :func:`encrypt_file`, or any stream file with an envelope)
    to ``dst``, unwrapping the data key with ``identities`` and/or ``keyset``.

    :class:`NoMatchingRecipient` when no key opens the envelope (nothing is written
    then); the stream's own errors for altered data. Returns ``{"key_id"}``.
    """
    path = src if isinstance(src, (str, os.PathLike)) else None
    with audit.timed("file.decrypt", path=os.fspath(path) if path else None) as ev:
        envelope, header, src = _file_envelope(src)
        ev["recipients"] = describe_envelope(envelope)
        ev["key_id"] = _header_field(header, "key_id")
        dek = open_file_envelope(envelope, _identities_for(identities, keyset),
                                 _header_field(header, "salt"))
        verified = stream.decrypt(src, dst, dek, **stream_options)
        _note_stream_result(ev, verified, stream_options, dst)
    return {"key_id": _header_field(header, "key_id")}


def rekey_file(path: str | os.PathLike, *, recipients: Any = None, keyset: Keyset | None = None,
               identities: Any = None, old_keyset: Keyset | None = None) -> dict:
    """Re-wrap a file's data key for new recipients and rewrite only its header: a stream
    file's, or a model file's (:func:`gpucrypt.models.replace_envelope`).

    The old envelope is opened with ``identities`` and/or ``old_keyset`` (``keyset``
    when neither is given: rotation within one keyset), a new one is sealed for
    ``recipients`` and/or ``keyset``'s current primary, and
    :func:`gpucrypt.stream.replace_envelope` writes it. Leaving a recipient out revokes
    it for this file from now on. The segments are not re-encrypted: whoever kept the
    data key (or an old copy of the file) can still read that copy.
    Returns ``{"key_id", "recipients", "previous_recipients"}``.
    """
    new_items = _gather(recipients, keyset)
    if identities is None and old_keyset is None:
        old = _identities_for(None, keyset)
    else:
        old = _identities_for(identities, old_keyset)
    with audit.timed("file.rekey", path=os.fspath(path)) as ev:
        model = _is_model_file(path)
        envelope, header, _ = _file_envelope(path, model)
        previous = describe_envelope(envelope)
        ev["key_ids"] = previous
        salt = _header_field(header, "salt")
        dek = open_file_envelope(envelope, old, salt)
        new_envelope, labels = seal_envelope_with_labels(dek, new_items, context=file_context(salt))
        key_id = _primary_key_id(new_items)
        ev.update(key_id=key_id, recipients=labels)
        if model:
            from . import models

            models.replace_envelope(path, dek, new_envelope, key_id=key_id)
        else:
            stream.replace_envelope(path, dek, new_envelope, key_id=key_id)
    return {"key_id": key_id, "recipients": labels, "previous_recipients": previous}
