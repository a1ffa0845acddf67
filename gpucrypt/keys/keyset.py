"""Keysets: ordered sets of symmetric key-encryption keys (KEKs) with one primary.

A keyset wraps new data keys under its primary key (AES key wrap with padding,
RFC 5649, in :mod:`~gpucrypt.keys.recipients`); older keys stay ``enabled`` so that
data wrapped under them still opens. ``disabled`` keys refuse until enabled again;
``destroyed`` keys keep their id and lose their material for good. The file format
(plain or sealed with a passphrase or a KEK) is in docs/KEYS.md and
:mod:`~gpucrypt.keys._document`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import secrets
import unicodedata
from typing import Any, Iterable, Iterator

from .. import audit
from .._buffers import bytes_arg
from .._errors import KeyNotFound, KeysetError, KeyUnavailable
from ._document import (DEFAULT_SCRYPT_N, FILE_VERSION, b64d, b64e, kept_secrets,
                        open_document, parse_document, printable_text, protection_method,
                        read_json, read_key_bytes, refuse_both_secrets, scrypt_n_to_write,
                        seal_document, utc_timestamp, write_key_file)
from ._material import HoldsKeyMaterial

__all__ = ["KeysetKey", "Keyset", "PRIMARY", "ENABLED", "DISABLED", "DESTROYED",
           "KEK_ALGORITHMS", "DEFAULT_KEK_ALGORITHM", "KEYSET_FORMAT"]

PRIMARY, ENABLED, DISABLED, DESTROYED = "primary", "enabled", "disabled", "destroyed"
_STATUSES = (PRIMARY, ENABLED, DISABLED, DESTROYED)

#: symmetric KEK algorithms a keyset can hold -> key size in bytes
KEK_ALGORITHMS = {"aes-256-kwp": 32}
DEFAULT_KEK_ALGORITHM = "aes-256-kwp"

KEYSET_FORMAT = "gpucrypt-keyset"


class KeysetKey(HoldsKeyMaterial):
    """One key of a keyset: ``id``, ``algorithm``, ``created`` (ISO 8601 UTC) and ``status``.

    The material is reachable only through :meth:`secret_bytes`, and never printed,
    pickled or copied.
    """

    __slots__ = ("id", "algorithm", "created", "status", "_material")
    _travel_instead = ("pickle a KeyReferences naming its keyset file instead (keyset=PATH), "
                       "and load it in the process that uses it")

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
        raise KeyUnavailable(f"key {printable_text(key.id)} is disabled in this keyset: enable "
                             f"it again (gpucrypt keys enable) to use it")
    if key.status == DESTROYED:
        raise KeyUnavailable(f"key {printable_text(key.id)} was destroyed: its material is "
                             f"gone, and data wrapped only under it cannot be recovered")


def _refuse_primary(key: KeysetKey) -> KeysetKey:
    """``key``, unless it is the primary (KeyUnavailable: the keyset would have none)."""
    if key.status == PRIMARY:
        raise KeyUnavailable(f"key {printable_text(key.id)} is the primary: promote another "
                             f"key first")
    return key


@contextlib.contextmanager
def _refusal_recorded(operation: str, **asked: Any) -> Iterator[None]:
    """Record a change the block refuses as an ``error`` event of ``operation``, naming
    what was asked for (``asked``), then let its error go on: an attempt to destroy,
    disable or promote a key is what an audit log is read for, refused or not. Only a
    ``str`` is recorded as asked (anything else, bytes a caller passed by mistake say, is
    recorded as None), and a ``key_id`` that is not one is refused with ``TypeError``, whose
    message, unlike a key error's, the event leaves out."""
    try:
        if not isinstance(asked.get("key_id", ""), str):
            raise TypeError(f"key_id must be a str (an id that `gpucrypt keys list` shows), "
                            f"not {type(asked['key_id']).__name__}")
        yield
    except Exception as exc:
        audit.event(operation, outcome="error", error=audit.error_fields(exc),
                    **{name: value if isinstance(value, str) else None
                       for name, value in asked.items()})
        raise


def _new_key_id() -> str:
    return secrets.token_hex(8)


class KeysetChangedOnDisk(KeysetError):
    """A save refused because another program saved the keyset's file since this keyset
    read it; nothing was written (the command line words its own advice from it)."""


class Keyset(HoldsKeyMaterial):
    """An ordered set of symmetric key-encryption keys with one primary.

    ``Keyset.generate()`` makes one with a single primary key; :meth:`load` and
    :meth:`save` read and write the JSON file described in docs/KEYS.md. New data
    keys are wrapped under :attr:`primary`; unwrapping finds the key by the id the
    envelope records. A keyset is also a :class:`KeyProvider`. It cannot be pickled or
    copied (its keys, and the passphrase or KEK it was loaded with, would travel).

    Save before wrapping files under a new primary: a key made by :meth:`generate` or
    :meth:`add` exists only in this object until a :meth:`save` succeeds, and every file
    wrapped under it is lost with it if that save is refused and the object dropped.
    :attr:`unsaved_keys` names the keys in that state (``ks.primary.id in
    ks.unsaved_keys``: the primary is one of them).
    """

    _travel_instead = KeysetKey._travel_instead

    def __init__(self, keys: Iterable[KeysetKey] = ()):
        self._keys: dict[str, KeysetKey] = {}
        for key in keys:
            # before it is a dict key (a list is unhashable), and before any wrap
            problem = (key_id_problem(key.id) if isinstance(key.id, str)
                       else f"a {type(key.id).__name__}, not a str")
            if problem is not None:
                raise KeysetError(f"a key's id is {problem}, and {KEY_ID_RULE}")
            if key.id in self._keys:
                raise KeysetError(f"duplicate key id {printable_text(key.id)}")
            if key.status not in _STATUSES:
                raise KeysetError(f"key {printable_text(key.id)}: unknown status "
                                  f"{key.status!r}")
            _check_key(key)
            self._keys[key.id] = key
        primaries = [k for k in self._keys.values() if k.status == PRIMARY]
        if self._keys and len(primaries) != 1:
            raise KeysetError(f"a keyset has exactly one primary key, this one has {len(primaries)}")
        self._seal: dict | None = None  # how it was loaded, so save() keeps it sealed
        self._origin: tuple[str, bytes] | None = None  # (file, SHA-256) last read or written
        self._origin_verb = "saved to"  # or "read from": how _origin became its file
        #: ids of the keys added or changed since the keyset was read or last saved (all of
        #: a keyset made in memory): the ``keyset.save`` event lists them, so the log says
        #: which changes reached a file (each change's own event records it in memory)
        self._unsaved: set[str] = set(self._keys)
        #: ids of the keys whose material is in no file yet (made in memory, not saved since):
        #: what :attr:`unsaved_keys` shows; only a successful save or a load clears it
        self._in_memory: set[str] = set(self._keys)
        #: files this keyset was read from or saved to before its current one (realpath ->
        #: "read from" / "saved to"): a save there is refused unchecked, and says why
        self._earlier: dict[str, str] = {}

    def __repr__(self) -> str:
        primary = next((k.id for k in self._keys.values() if k.status == PRIMARY), None)
        return f"Keyset(primary={primary!r}, keys={list(self._keys)})"

    __str__ = __repr__

    @property
    def unsaved_keys(self) -> frozenset[str]:
        """Ids of the keys whose material is in no file yet: made by :meth:`generate`,
        :meth:`add` or the constructor since the keyset was loaded or last saved (to any
        path). Empty once a :meth:`save` succeeds; a failed save leaves it as it was.

        Why it matters: files wrapped under such a key (the primary, after
        ``add(primary=True)``) open only while this object lives, until it is saved. Check
        ``ks.primary.id in ks.unsaved_keys`` before wrapping, and save first."""
        return frozenset(self._in_memory)

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
        where = os.fspath(path)
        doc = read_json(path, KEYSET_FORMAT)
        keys = doc.get("keys")
        if not isinstance(keys, list):
            raise KeysetError(f"{where}: malformed keyset (no key list)")
        if not all(isinstance(entry, dict) for entry in keys):
            raise KeysetError(f"{where}: malformed key entry")
        return {"keys": [{k: v for k, v in entry.items() if k != "material"} for entry in keys],
                "protection": protection_method(doc, where)}

    @classmethod
    def load(cls, path: str | os.PathLike, passphrase: str | bytes | None = None, *,
             kek: bytes | None = None) -> "Keyset":
        """Read a keyset file; a sealed one needs its ``passphrase`` or ``kek``.

        Raises :class:`KeysetError` for a malformed file, a wrong passphrase/KEK, or a
        passphrase/KEK given for a file that is not sealed (it may have been replaced).
        """
        return cls._load_bytes(path, None, passphrase, kek=kek)

    @classmethod
    def _load_bytes(cls, path: str | os.PathLike, data: bytes | None,
                    passphrase: str | bytes | None = None, *,
                    kek: bytes | None = None) -> "Keyset":
        """:meth:`load` from ``data``, the bytes the caller already read from ``path``
        (None: read them here): the command line looks into a key file before loading it,
        and a FIFO or ``/dev/fd/N`` gives its bytes only once. What :meth:`save` checks
        the file against is ``path`` (resolved) and the digest of these bytes."""
        where = os.fspath(path)
        with audit.timed("keyset.load", path=where) as ev:
            raw = read_key_bytes(path) if data is None else data
            doc, digest = parse_document(raw, path, KEYSET_FORMAT)
            entries = doc.get("keys")
            if not isinstance(entries, list):
                raise KeysetError(f"{where}: malformed keyset (no key list)")
            for number, entry in enumerate(entries, 1):  # before any use of an id as a dict key
                _check_entry(entry, number, where)
            materials = open_document(doc, where, passphrase=passphrase, kek=kek)
            if not entries:  # after open_document: a damaged protection block is said first
                raise KeysetError(f"{where}: the keyset holds no keys, and a keyset has one "
                                  f"primary key (the file was damaged or edited: restore it "
                                  f"from a copy)")
            if materials is None:
                materials = {e["id"]: e.get("material") for e in entries if "material" in e}
            keys = [_key_from_entry(entry, materials, where) for entry in entries]
            try:
                keyset = cls(keys)
            except KeysetError as exc:  # two primaries, a duplicate id: say which file
                raise KeysetError(f"{where}: {exc} (the file was damaged or edited: restore "
                                  f"it from a copy)") from None
            keyset._unsaved.clear()  # as in the file
            keyset._in_memory.clear()
            if "protection" in doc:
                passphrase, kek = kept_secrets(passphrase, kek)  # the caller may wipe theirs
                keyset._seal = {"passphrase": passphrase, "kek": kek,
                                "kek_id": doc["protection"].get("kek_id"),
                                "scrypt_n": _scrypt_n_to_keep(doc["protection"].get("n"))}
            keyset._origin, keyset._origin_verb = (os.path.realpath(path), digest), "read from"
            ev["count"] = len(keys)
            ev["key_id"] = keyset.primary.id
        return keyset

    def save(self, path: str | os.PathLike, passphrase: str | bytes | None = None, *,
             kek: bytes | None = None, kek_id: str | None = None,
             scrypt_n: int | None = None, unsealed: bool = False,
             overwrite: bool = False) -> None:
        """Write the keyset to ``path`` (0600, atomically).

        ``path`` is the file this keyset was loaded from or last saved to, or a new one:
        an existing other file is left as it is (:class:`KeysetError`) unless
        ``overwrite=True`` (a ``Keyset.generate().save(path)`` run twice destroyed the
        first keyset, and every file encrypted to it).

        With ``passphrase`` (scrypt + ChaCha20-Poly1305) or ``kek`` (32 bytes, AES-256-GCM)
        the materials are sealed. ``ValueError``, before anything is done, for arguments
        that contradict each other: both a passphrase and a kek, ``unsealed=True`` with
        either, ``scrypt_n`` with no passphrase to apply to (given or remembered), ``kek_id``
        with no kek, a ``scrypt_n`` sealing refuses (0 included). A keyset loaded sealed
        stays sealed with the same secret unless another is given, or ``unsealed=True``
        asks for plain JSON; it keeps the file's scrypt work factor too, unless sealing
        would now refuse it (a weak one becomes the default). A secret given as a
        ``bytearray`` is kept as a copy: the caller may wipe its own.

        Raises :class:`KeysetError`, writing nothing, when ``path`` is the file this keyset
        was loaded from (or last saved to) and it has changed since: another program saved
        it in between, and writing would undo that change (``overwrite=True`` writes all the
        same, dropping it). On POSIX the check and the write are one step: saves of that
        file (from any process) hold an exclusive ``flock`` on it from the check until the
        new file has replaced it, so of two overlapping saves from one version the second
        is refused.

        If that save is refused, keep this object: its new keys (:attr:`unsaved_keys`) may
        already wrap files. Save it to a new path first, then merge the two keysets, or
        write over the file with ``overwrite=True`` once sure the other change may go.

        Raises :class:`KeysetError`, writing nothing, when ``path`` exists and is not a
        regular file (a folder, a FIFO, a device) or is a symbolic link to a file other
        than this keyset's own (a link to its own file, the one it was loaded through say,
        is written through, and stays a link), and for a keyset without a primary key
        (``Keyset().add()``: :meth:`promote` one first), which could not be loaded back.
        Its own file, unchanged since, written over keeps its owner and group where this
        process may set them (not in a folder others may write to), mode 0600 (or its
        own, if stricter); any other file written is the saver's, 0600
        (``overwrite=True`` over a file this keyset was not read from included). A save
        that fails changes nothing: the secret a sealed keyset is saved with next time is
        the one of its last successful save (or load).

        Audit: one ``keyset.save`` event, ``ok`` once the file is written or ``error`` (and
        nothing written, but for an exception raised in the moment after the rename:
        docs/KEYS.md) otherwise, whose ``key_ids`` are the keys added or changed since
        the keyset was read or last saved: a ``keyset.destroy`` is on disk when a later
        ``keyset.save`` that lists its key is ``ok``.
        """
        self._check_save_arguments(passphrase, kek, kek_id, scrypt_n, unsealed)
        with audit.timed("keyset.save", path=os.fspath(path),
                         key_ids=sorted(self._unsaved)) as ev:
            self._save(path, passphrase, kek, kek_id, scrypt_n, unsealed, overwrite, ev)
        self._unsaved.clear()
        self._in_memory.clear()

    def _check_save_arguments(self, passphrase, kek, kek_id, scrypt_n, unsealed) -> None:
        """ValueError for :meth:`save` arguments that contradict each other, before anything
        is done: each would otherwise be dropped without a word, and the file sealed (or
        not) other than the caller believes. ``scrypt_n`` and ``kek_id`` need a passphrase
        or a KEK to apply to: given, or the one this keyset remembers (a plain save). And a
        ``scrypt_n`` sealing refuses: 0 was taken as "the default" (``Identity.save``
        refused it), where out-of-range arguments are refused, not dropped."""
        refuse_both_secrets(passphrase, kek)
        if unsealed and (passphrase is not None or kek is not None):
            raise ValueError("unsealed=True writes the keys in the clear, and a passphrase or "
                             "kek seals them: give one or the other")
        remembered = (self._seal or {}) if passphrase is None and kek is None \
            and not unsealed else {}
        if scrypt_n is not None and passphrase is None \
                and remembered.get("passphrase") is None:
            raise ValueError("scrypt_n is the work factor of passphrase sealing, and this save "
                             "seals with no passphrase: give the passphrase too, or drop "
                             "scrypt_n")
        if kek_id is not None and kek is None and remembered.get("kek") is None:
            raise ValueError("kek_id labels the key-encryption key a file is sealed with, and "
                             "this save seals with none: give kek= too, or drop kek_id")
        if scrypt_n is not None:
            scrypt_n_to_write(scrypt_n)  # 0 is refused too, not taken as "the default"

    def _save(self, path, passphrase, kek, kek_id, scrypt_n, unsealed, overwrite,
              ev: dict) -> None:
        # a keyset file without exactly one primary key could not be loaded back: refused
        # before anything is written (the file would be there, unreadable, and the audit
        # would say error)
        if not self._keys:
            raise KeysetError("the keyset has no keys: add one (Keyset.generate) before saving")
        primary = next((k for k in self._keys.values() if k.status == PRIMARY), None)
        if primary is None:
            raise KeysetError(f"the keyset has no primary key ({', '.join(self._keys)}), and "
                              f"a keyset file without one cannot be loaded back: make one of "
                              f"them the primary (promote(key_id)) before saving")
        where, target = os.fspath(path), os.path.realpath(path)
        try:
            mode = os.stat(target).st_mode
        except OSError:
            mode = None
        if mode is not None and not stat.S_ISREG(mode):
            # before the changed-since check, whose open of a FIFO waits for a writer forever
            from ..files._atomic import file_kind

            raise KeysetError(f"{where} is a {file_kind(mode)}: a keyset is saved to a "
                              f"regular file; give a file's path (a keyset read from a pipe "
                              f"can be saved to a new file)")
        checked = self._origin is not None and self._origin[0] == target
        with (_locked_digest(target) if checked
              else contextlib.nullcontext((None, None))) as (now, held):
            # None: gone, nothing to undo; overwrite=True: the caller drops the other change
            # on purpose (the way out the refusal offers, as Identity.save's)
            if checked and not overwrite and now not in (None, self._origin[1]):
                raise KeysetChangedOnDisk(self._changed_message(where))
            data, method, seal = self._document(passphrase, kek, kek_id, scrypt_n, unsealed)
            # still locked: the check holds until replaced
            # its own file, still there (gone: another may be made meanwhile, not replaced),
            # written where it is: the file locked and checked, reached through the link it
            # was loaded by if any (a `current` link, a mounted secret); any other path that
            # is a link is refused, as outputs refuse them
            # its owner kept only there, unchanged since (not over a file overwrite=True
            # writes over: whoever owns that one need not hold keys made now)
            write_key_file(target if checked else path, data,
                           replace=overwrite or (checked and now is not None),
                           what="keyset", refusal=self._earlier_message(where, target),
                           keep=held if checked and now == self._origin[1] else None)
        # only now that the file holds it: a failed save must not change the secret the
        # next plain save() seals its own file with
        if seal is not None:
            self._seal = seal
        if self._origin is not None and self._origin[0] != target:
            self._earlier[self._origin[0]] = self._origin_verb
        self._earlier.pop(target, None)
        self._origin, self._origin_verb = (target, hashlib.sha256(data).digest()), "saved to"
        ev.update(count=len(self._keys), key_id=primary.id, status=method or "unsealed")

    def _changed_message(self, where: str) -> str:
        """Why a save over this keyset's own file, changed by someone else, is refused, and
        what to do. Not "load it again and redo the change": a key made since exists only
        in this object, and files may already be wrapped under it (rekey_file, encrypt_file)."""
        new = sorted(printable_text(key_id) for key_id in self._in_memory)
        held = (f"; its keys {', '.join(new)} are in no file yet" if new else "")
        return (f"{where} changed since this keyset was read from it (another command or "
                f"program saved it): nothing was written. Keep this keyset: it may hold keys "
                f"that files are already wrapped under{held}. Save it to a new path first, "
                f"then merge the two keysets deliberately, or save it over {where} with "
                f"overwrite=True if you are sure the other change may be lost")

    def _earlier_message(self, where: str, target: str) -> str | None:
        """What a refused save to ``target`` says when this keyset read or wrote that file
        before its current one (None: the default, "not read from it", is true)."""
        verb = self._earlier.get(target)
        if verb is None or self._origin is None:
            return None
        return (f"{where} exists: this keyset was {verb} it, then saved to {self._origin[0]}, "
                f"which is its file now, so whether someone else changed {where} since can no "
                f"longer be checked. Nothing was written: save to {self._origin[0]} (or a new "
                f"path), or pass overwrite=True if you are sure no one else has saved {where} "
                f"since (that writes over it unchecked)")

    def _document(self, passphrase, kek, kek_id, scrypt_n,
                  unsealed) -> tuple[bytes, str | None, dict | None]:
        """The file's bytes, how it is sealed (None: plain), and the seal for the next plain
        save to remember once the file is written (None: keep the one remembered)."""
        if passphrase is None and kek is None and not unsealed and self._seal is not None:
            passphrase, kek = self._seal["passphrase"], self._seal["kek"]
            kek_id = kek_id or self._seal["kek_id"]
            scrypt_n = self._seal["scrypt_n"] if scrypt_n is None else scrypt_n
        public = {"format": KEYSET_FORMAT, "version": FILE_VERSION,
                  "keys": [k.metadata() for k in self._keys.values()]}
        if passphrase is None and kek is None:
            for entry, key in zip(public["keys"], self._keys.values()):
                if key._material is not None:
                    entry["material"] = b64e(key._material)
            doc = public
            method, seal = None, None
        else:
            materials = {k.id: b64e(k._material) for k in self._keys.values()
                         if k._material is not None}
            if scrypt_n is None:
                scrypt_n = DEFAULT_SCRYPT_N
            doc = seal_document(public, materials, passphrase=passphrase, kek=kek, kek_id=kek_id,
                                 scrypt_n=scrypt_n)
            method = doc["protection"]["method"]
            passphrase, kek = kept_secrets(passphrase, kek)  # the caller may wipe theirs
            seal = {"passphrase": passphrase, "kek": kek, "kek_id": kek_id,
                    "scrypt_n": scrypt_n}
        return json.dumps(doc, indent=2).encode("utf-8") + b"\n", method, seal

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
            held = ", ".join(printable_text(held_id) for held_id in self._keys)
            raise KeyNotFound(f"no key {key_id!r} in this keyset (it holds "
                              f"{held or 'nothing'})") from None

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
        with _refusal_recorded("keyset.add", algorithm=algorithm):
            key = _fresh_key(algorithm, ENABLED)
        self._keys[key.id] = key
        self._unsaved.add(key.id)
        self._in_memory.add(key.id)
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
        """Make ``key_id`` (enabled or disabled) the primary; the old primary stays enabled.
        The event's ``key_ids`` are the new primary, then the key it demoted (if another)."""
        with _refusal_recorded("keyset.promote", key_id=key_id):
            key = self._find_not_destroyed(key_id)
        demoted = [other for other in self._keys.values()
                   if other.status == PRIMARY and other is not key]
        for other in demoted:
            other.status = ENABLED
            self._unsaved.add(other.id)
        key.status = PRIMARY
        self._unsaved.add(key.id)
        audit.event("keyset.promote", key_id=key.id, key_ids=[key.id, *(k.id for k in demoted)],
                    status=PRIMARY)
        return key

    def enable(self, key_id: str) -> KeysetKey:
        """Let a disabled key unwrap again."""
        with _refusal_recorded("keyset.enable", key_id=key_id):
            key = self._find_not_destroyed(key_id)
        if key.status == DISABLED:
            key.status = ENABLED
            self._unsaved.add(key.id)
        audit.event("keyset.enable", key_id=key.id, status=key.status)
        return key

    def disable(self, key_id: str) -> KeysetKey:
        """Stop a key from unwrapping (reversible). The primary cannot be disabled."""
        with _refusal_recorded("keyset.disable", key_id=key_id):
            key = _refuse_primary(self._find_not_destroyed(key_id))
        key.status = DISABLED
        self._unsaved.add(key.id)
        audit.event("keyset.disable", key_id=key.id, status=DISABLED)
        return key

    def destroy(self, key_id: str) -> KeysetKey:
        """Drop a key's material for good; its id stays, marked ``destroyed``."""
        with _refusal_recorded("keyset.destroy", key_id=key_id):
            key = _refuse_primary(self._find(key_id))
        key.status, key._material = DESTROYED, None
        self._unsaved.add(key.id)
        self._in_memory.discard(key.id)  # no material left to lose
        audit.event("keyset.destroy", key_id=key.id, status=DESTROYED)
        return key


@contextlib.contextmanager
def _locked_digest(path: str) -> Iterator[tuple[bytes | None, os.stat_result | None]]:
    """Hold an exclusive ``flock`` on the file at ``path`` and yield the SHA-256 of its bytes
    as locked and the ``fstat`` of the file locked (the owner and mode a save over it
    keeps, :func:`~gpucrypt.keys._document.write_key_file`: those of the bytes checked,
    not of whatever is at ``path`` a moment later); ``(None, None)``, and no lock, when
    there is no file. Held until the block ends.

    Why the file itself, not its folder or a lock file beside it: it serialises exactly
    the saves of this keyset (other files in the folder do not wait), needs only the read
    access that loading needs anyway (not read access to the folder), and leaves nothing
    behind. But a save replaces the file by a rename, so a saver that waited on the old
    file would hold a lock nobody else asks for: after locking, the file at ``path`` must
    still be the one locked (same inode), else lock the new one. That saver then finds the
    bytes changed and is refused, which is the point.

    Where ``flock`` is missing (not POSIX) or refused (some network file systems) the
    digest is yielded unlocked: the check then catches saves that do not overlap, as it
    did before locking existed."""
    from ..files._atomic import held_exclusively

    def not_regular(kind: str) -> KeysetError:
        return KeysetError(f"{path} is a {kind}: a key file is saved to a regular file; give "
                           f"a file's path")

    with held_exclusively(path, not_regular) as f:
        if f is None:
            yield None, None
        else:
            yield hashlib.sha256(f.read()).digest(), os.fstat(f.fileno())


def _scrypt_n_to_keep(n: Any) -> int:
    """The work factor a loaded file's next save uses: the file's, unless sealing would
    refuse it (weaker than writers take now): then the default."""
    try:
        return scrypt_n_to_write(n)
    except (TypeError, ValueError):
        return DEFAULT_SCRYPT_N


def _fresh_key(algorithm: str, status: str) -> KeysetKey:
    if algorithm not in KEK_ALGORITHMS:
        raise ValueError(f"unknown key algorithm {algorithm!r}; choose one of {sorted(KEK_ALGORITHMS)}")
    return KeysetKey(_new_key_id(), algorithm, utc_timestamp(), status,
                     os.urandom(KEK_ALGORITHMS[algorithm]))


_ENTRY_FIELDS = ("id", "algorithm", "created", "status")
#: a JSON value's kind, as the file's reader knows it (not Python's type names)
_JSON_KINDS = {dict: "an object", list: "a list", str: "a string", int: "a number",
               float: "a number", bool: "true or false", type(None): "null"}


#: the rule a key id keeps: an envelope's stanza names its key by the id's UTF-8, in 1 to
#: 255 bytes (gpucrypt.keys._envelope), and messages and `keys list` show it
KEY_ID_RULE = ("a key id is 1 to 255 bytes of UTF-8 without control characters (an "
               "envelope names its key by it; ids gpucrypt makes are 16 hex digits)")
#: Unicode categories a key id may not hold: controls (a terminal's escape sequences, CR),
#: format characters (bidirectional overrides, which reorder what a terminal shows), line
#: and paragraph separators. Not "whatever str.isprintable() refuses": that includes the
#: characters a Unicode version has not assigned yet, so an id would load on one Python
#: and be refused on an older one
_NOT_IN_IDS = ("Cc", "Cf", "Zl", "Zp")


def key_id_problem(key_id: str) -> str | None:
    """What keeps the str ``key_id`` out of a keyset or an envelope (None: nothing): such
    an id loaded, then failed at the first wrap as a ValueError, or a UnicodeEncodeError
    for a lone surrogate; one with control characters loaded, and every message naming
    the key put them on the user's terminal. Quoted only escaped (it may come from a file)
    and only once it is known to be at most 255 bytes."""
    try:
        size = len(key_id.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate: JSON's "\ud800" reads as one
        return "not valid UTF-8 (it holds a lone surrogate)"
    if not 1 <= size <= 255:
        return "empty" if not size else f"{size} bytes of UTF-8"
    if any(unicodedata.category(c) in _NOT_IN_IDS for c in key_id):
        return f"{key_id!r}, which holds control characters"  # repr escapes them
    return None


def _check_entry(entry: Any, number: int, where: str) -> None:
    """KeysetError "malformed key entry", naming the entry (from 1) and the field, unless
    ``entry`` is an object whose fields are strings and whose id may go in an envelope: an
    id of another type (a list, from a damaged or edited file) would otherwise fail later
    as a TypeError, a traceback, and one too long or empty at the first wrap."""
    if not isinstance(entry, dict):
        problem = f"{_JSON_KINDS.get(type(entry), 'a value')}, not an object"
    else:
        field = next((f for f in _ENTRY_FIELDS if not isinstance(entry.get(f), str)), None)
        if field is None:
            id_problem = key_id_problem(entry["id"])
            if id_problem is None:
                return
            problem = f"its id is {id_problem}, and {KEY_ID_RULE}"
        else:
            problem = (f"no {field!r}" if field not in entry else
                       f"{field!r} is {_JSON_KINDS.get(type(entry[field]), 'a value')}, "
                       f"not a string")
    raise KeysetError(f"{where}: malformed key entry {number}: {problem} (the file was "
                      f"damaged or edited: restore it from a copy)")


def _check_key(key: KeysetKey) -> None:
    """KeysetError unless ``key`` (its id and status checked) could be saved and loaded
    back: a string ``created``, a known algorithm, and material of that algorithm's size
    unless destroyed (then none). What :func:`_key_from_entry` checks in a file, for a
    keyset made in memory: one built of such keys wrapped with whatever it held (a "rot13"
    key wrapped with AES-KWP), and saved a file that ``load`` refused. A bytes-like
    material is kept as ``bytes``, a copy: the caller may wipe theirs."""
    shown = printable_text(key.id)
    if not isinstance(key.algorithm, str) or key.algorithm not in KEK_ALGORITHMS:
        raise KeysetError(f"key {shown}: unknown algorithm {key.algorithm!r}; a keyset holds "
                          f"{sorted(KEK_ALGORITHMS)} keys")
    if not isinstance(key.created, str):
        raise KeysetError(f"key {shown}: created must be a str (an ISO 8601 UTC time), not "
                          f"{type(key.created).__name__}")
    if key.status == DESTROYED:
        if key._material is not None:
            raise KeysetError(f"key {shown} is destroyed, and holds material: a destroyed key "
                              f"has none (give material=None)")
        return
    size = KEK_ALGORITHMS[key.algorithm]
    if key._material is None:
        raise KeysetError(f"key {shown} has no material (only a destroyed key has none): give "
                          f"its {size} bytes")
    try:
        material = bytes_arg(key._material, "material")
    except TypeError:
        raise KeysetError(f"key {shown}: its material must be bytes ({size} of them), not "
                          f"{type(key._material).__name__}") from None
    if len(material) != size:
        raise KeysetError(f"key {shown}: its material is {len(material)} bytes, and a "
                          f"{key.algorithm} key is {size}")
    key._material = material


def _key_from_entry(entry: dict, materials: dict, where: str) -> KeysetKey:
    """The key ``entry`` (checked by _check_entry) describes, with its material."""
    key_id, algorithm, status = entry["id"], entry["algorithm"], entry["status"]
    shown = printable_text(key_id)  # checked by _check_entry; escaped all the same
    if algorithm not in KEK_ALGORITHMS:
        raise KeysetError(f"{where}: key {shown}: unknown algorithm {algorithm!r}")
    if status not in _STATUSES:
        raise KeysetError(f"{where}: key {shown}: unknown status {status!r}")
    material = None
    if status != DESTROYED:
        if materials.get(key_id) is None:
            raise KeysetError(f"{where}: key {shown} has no material")
        material = b64d(materials[key_id], f"{where}: key {shown}")
        if len(material) != KEK_ALGORITHMS[algorithm]:
            raise KeysetError(f"{where}: key {shown} has the wrong length for {algorithm}")
    return KeysetKey(key_id, algorithm, entry["created"], status, material)
