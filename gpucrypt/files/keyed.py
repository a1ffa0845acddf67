"""Files sealed for recipients or a keyset: :func:`encrypt_file`, :func:`decrypt_file`,
:func:`rekey_file`.

Each file gets a fresh data key; the key's envelope (:mod:`gpucrypt.keys`) goes into
the header of a :mod:`gpucrypt.files.stream` file, and the data into its segments.
Rekeying rewrites only the header, of a stream file or of a model file
(:mod:`gpucrypt.files.models`, told apart by their magic bytes), unless it re-encrypts:
then the whole file is written again under a fresh data key and salt, which is what
locks out a recipient who once unwrapped the old data key. Keys inside an HSM or a
KMS (``KeyReference``) are bound to the file through :func:`gpucrypt.keys.file_context`
of the header's salt, which is drawn here, before the header, so that the envelope can
carry the binding; rekeying keeps the salt and with it the binding (re-encrypting binds
to the new salt). Users reach these as ``gpucrypt.keys.encrypt_file``
and so on; they live here because keys sit below files: a key never needs to know
about files.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any, Callable

from .. import audit
from ..keys import (KeyReference, Keyset, KeysetKey, NoMatchingRecipient, WrappingKey,
                    describe_envelope, file_context, generate_dek)
from ..keys.recipients import (identity_list, open_file_envelope, open_file_envelope_with_label,
                               recipient_list, seal_envelope_with_labels)
from . import _format, stream
from ._atomic import held_exclusively, open_regular, regular_size, replacement_for

#: and, for the file formats beside: file_key, new_file_key, gather, audit_path,
#: audit_keyed_open
__all__ = ["encrypt_file", "decrypt_file", "rekey_file"]


def _header_field(header: Any, name: str) -> Any:
    return header.get(name) if isinstance(header, dict) else getattr(header, name, None)


def audit_path(obj: Any) -> str | None:
    """What an audit event records as the place of ``obj``: its path, or None for a file
    object or a buffer."""
    return os.fspath(obj) if isinstance(obj, (str, os.PathLike)) else None


def audit_keyed_open(operation: str, src: Any, opened_by: str,
                     exc: BaseException | None = None) -> None:
    """The audit event of a file opened with an identity or keyset (``stream.open``,
    ``safe_open``): which file, by which stanza; ``error`` (and why) when it failed to
    verify after the key was unwrapped."""
    if exc is None:
        audit.event(operation, path=audit_path(src), key_id=opened_by)
    else:
        audit.event(operation, outcome="error", path=audit_path(src), key_id=opened_by,
                    error=audit.error_fields(exc))


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


def _keyset_object(keyset: Any) -> Any:
    """``keyset`` as given, refusing a path where the object goes (it was taken as a key)."""
    if isinstance(keyset, (str, os.PathLike)):
        raise TypeError(f"keyset= takes a Keyset, not a {type(keyset).__name__}: load it "
                        f"first, keyset=Keyset.load({os.fspath(keyset)!r})")
    return keyset


def _stream_options(function: Any) -> tuple[str, ...]:
    """The keyword options of ``gpucrypt.stream``'s ``function`` that the functions here pass
    on: all but those they fill themselves (the data key's id and envelope, the salt)."""
    return tuple(name for name, p in inspect.signature(function).parameters.items()
                 if p.kind is p.KEYWORD_ONLY and not name.startswith("_")
                 and name not in ("key_id", "envelope"))


_ENCRYPT_OPTIONS = _stream_options(stream.encrypt)
_DECRYPT_OPTIONS = _stream_options(stream.decrypt)


def _check_options(caller: str, options: dict, allowed: tuple[str, ...]) -> None:
    """TypeError, before any key is sealed or opened, for an option ``caller`` does not pass
    on to the stream (it said "stream.encrypt() got multiple values for argument 'key'")."""
    for name in options:
        if name in allowed:
            continue
        if name in ("key", "key_id", "envelope"):
            why = (f"{caller} makes the file's data key, and its id and envelope, from "
                   f"recipients/identities and keyset; for a raw key call "
                   f"gpucrypt.stream.{caller.split('_')[0]}(src, dst, key) instead")
        else:
            why = f"its stream options are {', '.join(allowed)}"
        raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}: {why}")


def gather(recipients: Any, keyset: Keyset | None) -> list:
    """``recipients`` and ``keyset`` as one list to seal a data key for; ``ValueError`` if
    neither is given."""
    items = [] if recipients is None else recipient_list(recipients)
    if keyset is not None:
        items.append(_keyset_object(keyset))
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
    _check_options("encrypt_file", stream_options, _ENCRYPT_OPTIONS)
    items = gather(recipients, keyset)
    with audit.timed("file.encrypt", path=audit_path(src)) as ev:
        dek, salt, envelope, key_id, labels = new_file_key(items)
        ev.update(key_id=key_id, recipients=labels)
        with audit.device_chosen(ev) as ran_on:
            header = stream.encrypt(src, dst, dek, key_id=key_id, envelope=envelope,
                                    _salt=salt, _ran_on=ran_on, **stream_options)
        _note_stream_result(ev, header, src)
    return {"key_id": key_id, "recipients": labels}


def new_file_key(items: list) -> tuple[bytes, bytes, bytes, str | None, list[str]]:
    """A new file's keys for the gathered recipients/keyset ``items``: (data key, salt,
    envelope, key id, labels). Both are fresh per file, as the formats' own; the envelope is
    bound to the salt (:func:`gpucrypt.keys.file_context`), so the salt must be the
    file's."""
    dek, salt = generate_dek(), os.urandom(_format.SALT_SIZE)
    envelope, labels = seal_envelope_with_labels(dek, items, context=file_context(salt))
    return dek, salt, envelope, _primary_key_id(items), labels


def _note_stream_result(ev: dict, header: Any, plaintext: Any) -> None:
    """Audit fields from the stream's returned header and the plaintext's size."""
    algorithm = _header_field(header, "algorithm")
    if isinstance(algorithm, str):
        ev["algorithm"] = algorithm
    size = _size_of(plaintext)
    if size is not None:
        ev["bytes"] = size


def _size_of(obj: Any) -> int | None:
    if isinstance(obj, (str, os.PathLike)):
        return regular_size(obj)
    try:
        return memoryview(obj).nbytes
    except TypeError:
        return None


def _identities_for(identities: Any, keyset: Keyset | None) -> list:
    items = identity_list(identities)
    if keyset is not None:
        items.append(_keyset_object(keyset))
    if not items:
        raise ValueError("give identities= and/or keyset=")
    return items


def file_key(read_header: Any, key: Any = None, keyset: Any = None,
             identity: Any = None) -> tuple[bytes, str | None]:
    """The 32-byte key of a stream or model file, and the label of the envelope stanza
    that opened it (None for ``key``): ``key`` itself, or the data key unwrapped with ``identity``
    and/or ``keyset`` from the envelope of the header ``read_header()`` returns (parsed,
    unverified: called only then, after the arguments are checked). ``ValueError``
    when none or both kinds are given."""
    if key is not None:
        if keyset is not None or identity is not None:
            raise ValueError("give key= or keyset=/identity=, not both")
        return _format.check_key(key), None
    if keyset is None and identity is None:
        raise ValueError("no key given: pass key= (32 bytes), or keyset= and/or identity= "
                         "to unwrap the file's data key")
    items = _identities_for(identity, keyset)
    header = read_header()
    if not header.envelope:
        raise _no_envelope("; open it with key=")
    return open_file_envelope_with_label(header.envelope, items, header.salt)


def _no_envelope(then: str) -> NoMatchingRecipient:
    return NoMatchingRecipient(f"this file carries no envelope: it was encrypted with a raw key, "
                               f"not for recipients or a keyset{then}")


def _is_model_file(path: Any) -> bool:
    """Whether the regular file at ``path`` starts as a model file; ``ValueError`` for
    anything else there (a file is rekeyed where it lies: a FIFO's open waited forever)."""
    with _open_rekeyable(path) as f:
        return _starts_as_model(f)


def _open_rekeyable(path: Any):
    """The file at ``path`` opened without waiting, ``ValueError`` unless it is a regular
    file."""
    return open_regular(path, _not_rekeyable(path))


def _not_rekeyable(path: Any) -> Callable[[str], ValueError]:
    def not_regular(kind: str) -> ValueError:
        return ValueError(f"{os.fspath(path)} is a {kind}: a file is rekeyed where it lies, "
                          f"so it must be a regular file")
    return not_regular


def _starts_as_model(f: Any) -> bool:
    """Whether the file ``f`` (at its start) is a model file; ``f`` is left at its start."""
    from .models import MAGIC

    model = f.read(len(MAGIC)) == MAGIC
    f.seek(0)
    return model


@contextlib.contextmanager
def _opened_once(src: Any, dst: Any):
    """``src``, or for a path the file there, opened once: its header is read to find the
    envelope and the rest is decrypted after it, from that one open (twice, a FIFO's or
    ``/dev/stdin``'s second open read on from where the first one's buffer stopped: "not
    a gpucrypt file"; and a file swapped between the opens was read as two). ``dst``
    naming ``src``'s own file is refused first, as :func:`gpucrypt.stream.decrypt` does."""
    if not isinstance(src, (str, os.PathLike)):
        yield src
        return
    stream._refuse_same_file(src, dst)
    with open(src, "rb", buffering=0) as f:
        yield f


def _file_envelope(src: Any, model: bool = False) -> tuple[bytes, Any, Any]:
    """The envelope and header of ``src``, and ``src`` as the stream reads it again: rewound
    where it can be, else with the header put back in front of the rest (a pipe). A model
    file's table is not decoded: unauthenticated JSON that needs no parsing to find the
    envelope, and 100 MiB of it held 3 GB."""
    if model:
        from . import models

        header = models._parse_path(src) if isinstance(src, (str, os.PathLike)) else \
            models._parse(src)
    else:
        header, src = stream._header_and_whole(src)
    envelope = _header_field(header, "envelope")
    if not envelope:
        raise _no_envelope("")
    return envelope, header, src


def decrypt_file(src: Any, dst: Any, *, identities: Any = None, keyset: Keyset | None = None,
                 **stream_options: Any) -> dict:
    """Decrypt ``src`` (made by :func:`encrypt_file`, or any stream file with an envelope)
    to ``dst``, unwrapping the data key with ``identities`` and/or ``keyset``.

    :class:`NoMatchingRecipient` when no key opens the envelope (nothing is written
    then); the stream's own errors for altered data. Returns ``{"key_id", "opened_by"}``:
    ``opened_by`` is the label (:func:`gpucrypt.keys.describe_envelope`'s) of the stanza
    that opened the data key, ``"aes-kwp:<key id>"``, a recipient fingerprint, a key
    reference or ``"scrypt"``, which the audit event records as its ``key_id``; ``key_id``
    is the id of the keyset key that opened it (None when no keyset key did). Neither is
    the header's ``key_id``: that is MACed under the data key, which whoever made the file
    chose, and anyone with a recipient's public key can make one that claims any key id.
    """
    return decrypt_file_at(src, dst, audit_path(src), identities=identities, keyset=keyset,
                           **stream_options)


def decrypt_file_at(src: Any, dst: Any, place: str | None, *, identities: Any = None,
                    keyset: Keyset | None = None, **stream_options: Any) -> dict:
    """:func:`decrypt_file`, its audit event naming ``place`` as the file's path: for a
    caller that opened the file itself (a checkpoint's ``.metadata``, opened without
    waiting so that a FIFO there is refused) and knows where it is."""
    _check_options("decrypt_file", stream_options, _DECRYPT_OPTIONS)
    with audit.timed("file.decrypt", path=place) as ev, _opened_once(src, dst) as once:
        envelope, header, src = _file_envelope(once)
        ev["recipients"] = describe_envelope(envelope)
        dek, opened_by = open_file_envelope_with_label(
            envelope, _identities_for(identities, keyset), _header_field(header, "salt"))
        ev["key_id"] = opened_by
        with audit.device_chosen(ev) as ran_on:
            verified = stream.decrypt(src, dst, dek, _ran_on=ran_on, **stream_options)
        _note_stream_result(ev, verified, dst)
    key_id = opened_by[len("aes-kwp:"):] if opened_by.startswith("aes-kwp:") else None
    return {"key_id": key_id, "opened_by": opened_by}


def rekey_file(path: str | os.PathLike, *, recipients: Any = None, keyset: Keyset | None = None,
               identities: Any = None, old_keyset: Keyset | None = None,
               reencrypt: bool = False) -> dict:
    """Give a stream or model file a new envelope, for new recipients.

    The old envelope is opened with ``identities`` and/or ``old_keyset`` (``keyset``
    when neither is given: rotation within one keyset), and a new one is sealed for
    ``recipients`` and/or ``keyset``'s current primary.

    ``reencrypt=False``: the same data key is re-wrapped and only the header is
    rewritten (:func:`gpucrypt.stream.replace_envelope`,
    :func:`gpucrypt.models.replace_envelope`); fast whatever the file's size. This adds
    recipients and rotates key-encryption keys; it does **not** revoke anyone: whoever
    ever unwrapped the data key (from this file or any old copy) can still read the
    rekeyed file, write new content that its readers accept, and put a stanza of their
    own back into its envelope.

    ``reencrypt=True``: what revokes. A fresh data key and salt; every segment is
    decrypted, verified and encrypted again under them (same algorithm and segment
    size) into a temporary file beside the original, which then replaces it
    atomically (a symbolic link is followed, the file's permissions are kept). If any
    segment fails to verify, :class:`~gpucrypt.stream.AuthenticationError` is raised,
    the original is untouched and nothing else remains. Plaintext never reaches the
    disk, and either kind of file streams through memory a segment at a time (a model
    file keeps its table, metadata and ``encrypt_names``).

    The file is held under its ``flock`` from the first read to the rename, so rekeys and
    header rewrites of it from any process take turns, each reading what the one before
    wrote: a rekey waits for one under way (and for any program holding a flock on the
    file). Not serialised where the file system refuses flock (NFS for a file opened
    read-only).

    Returns ``{"key_id", "recipients", "previous_recipients", "reencrypted"}``.
    """
    new_items = gather(recipients, keyset)
    if identities is None and old_keyset is None:
        old = _identities_for(None, keyset)
    else:
        old = _identities_for(identities, old_keyset)
    # held from the first read to the rename: another rekey of this file (a rewrap that
    # read the old envelope, say) publishing after this one would put back the file it
    # read, undoing a revocation; one that waited reads this one's file instead
    # resolved once: the file locked is the one rewritten, whatever a link says meanwhile
    target = os.path.realpath(path)
    with audit.timed("file.rekey", path=os.fspath(path)) as ev, \
            held_exclusively(target, _not_rekeyable(path), required_as=path) as f:
        model = _starts_as_model(f)
        envelope, header, _ = _file_envelope(f, model)
        previous = describe_envelope(envelope)
        ev["key_ids"] = previous
        salt = _header_field(header, "salt")
        dek = open_file_envelope(envelope, old, salt)
        if reencrypt:  # fresh, as encrypt_file draws them: nothing of the old key survives
            new_dek, salt = generate_dek(), os.urandom(_format.SALT_SIZE)
        else:
            new_dek = dek
        new_envelope, labels = seal_envelope_with_labels(new_dek, new_items,
                                                         context=file_context(salt))
        key_id = _primary_key_id(new_items)
        if reencrypt:
            rewrite = _reencrypt_model if model else _reencrypt_stream
            rewrite(target, dek, new_dek, salt, new_envelope, key_id)
        elif model:
            from . import models

            models.replace_envelope(target, dek, new_envelope, key_id=key_id)
        else:
            stream.replace_envelope(target, dek, new_envelope, key_id=key_id)
        # only now, on disk: an error event keeps the file's state (key_ids) and no other.
        # status: the data key's afterwards (audit.FIELDS has no field of its own for it);
        # only "reencrypted" says that who held the old data key can no longer read it
        ev.update(key_id=key_id, recipients=labels,
                  status="reencrypted" if reencrypt else "rewrapped")
    return {"key_id": key_id, "recipients": labels, "previous_recipients": previous,
            "reencrypted": bool(reencrypt)}


def _reencrypt_stream(path: Any, dek: bytes, new_dek: bytes, salt: bytes, envelope: bytes,
                      key_id: str | None) -> None:
    """Replace the stream file ``path`` by its plaintext encrypted under ``new_dek`` and
    ``salt``: the reader verifies the header and the final segment when it opens and each
    segment before giving out its plaintext, so a bad segment raises before its bytes
    reach the new file, which is then dropped."""
    # resolved: a link stays a link and its file is rewritten (as replace_head does), not
    # the link replaced and its file left with the old data
    target = os.path.realpath(path)
    with stream.open(target, dek) as plaintext:
        old = plaintext.header
        with replacement_for(target) as sink:  # stream.encrypt commits it, or drops it on error
            stream.encrypt(plaintext, sink, new_dek, algorithm=old.algorithm,
                           segment_size=old.segment_size, key_id=key_id, envelope=envelope,
                           _salt=salt)


def _reencrypt_model(path: Any, dek: bytes, new_dek: bytes, salt: bytes, envelope: bytes,
                     key_id: str | None) -> None:
    """Replace the model file ``path`` by its tensors sealed under ``new_dek`` and ``salt``,
    a segment at a time (:func:`gpucrypt.files.models._reencrypt`): each is verified
    before it is sealed again, and a bad one leaves the original as it was."""
    from . import models

    # resolved: a link stays a link and its file is rewritten (as replace_head does), not
    # the link replaced and its file left with the old data
    target = os.path.realpath(path)
    with replacement_for(target) as sink:
        models._reencrypt(target, dek, sink, new_dek, key_id=key_id, envelope=envelope,
                          _salt=salt)
