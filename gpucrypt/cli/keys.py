"""Command line for key management: ``keygen``, ``keys``, ``rekey``, and the key options
of ``encrypt``/``decrypt``.

``gpucrypt encrypt``/``decrypt`` belong to :mod:`gpucrypt.cli.files`; this module
gives them two hooks, so recipients and keysets work there without that module
knowing about envelopes:

- :func:`add_key_arguments(parser, mode) <add_key_arguments>` adds ``-r/--recipient FILE``
  (repeatable, encrypt), ``-i/--identity FILE`` (repeatable, decrypt), ``--keyset FILE``,
  ``--kek URI`` (repeatable: a key in an HSM or KMS, docs/KEYS.md "Key references"),
  ``-p/--passphrase`` and ``--passphrase-file FILE``;
- :func:`resolve_encrypt_keys(args) <resolve_encrypt_keys>` returns ``(dek, key_id, envelope)``
  to pass to ``stream.encrypt(src, dst, dek, key_id=key_id, envelope=envelope)``, and
  :func:`resolve_decrypt_key(args, header) <resolve_decrypt_key>` returns the data key for
  ``stream.decrypt`` given the header from ``stream.read_header``. Both return ``None``
  when none of these options was given (the caller then uses its own key options),
  and raise :class:`gpucrypt.cli.CliError` with a one-line message on failure.
  ``resolve_encrypt_keys`` also sets ``args.file_salt``: the salt the caller must give the
  file (``_salt=``), because the envelope is bound to it (``keys.file_context``).

Passphrase-encrypted files (``encrypt -p``, :class:`gpucrypt.keys.Passphrase`): the
passphrase comes from ``--passphrase-file``, then ``GPUCRYPT_PASSPHRASE``, then a prompt
on the terminal (twice to encrypt); ``decrypt`` sees the passphrase stanza in the header
and asks by itself, after checking its work factor against the limit.

Secrets are never printed. Passphrases for sealed keysets and identities come from the
same places. Files holding secrets that group or others can access are refused
(:func:`gpucrypt.cli._common.check_private_file`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
import warnings
from typing import Any, Iterator

from . import CliError
from ._common import (add_unsafe_key_permissions, check_key_sources, check_private_file,
                      refuse_dash)

__all__ = ["add_key_arguments", "resolve_encrypt_keys", "resolve_decrypt_key",
           "check_passphrase_file", "add_keygen", "add_keys", "add_rekey"]

PASSPHRASE_ENV = "GPUCRYPT_PASSPHRASE"


# --------------------------------------------------------------------------- passphrases


def _can_prompt() -> bool:
    """Whether a passphrase can be asked for: stdin is a terminal, or (stdin carrying the
    data, as in ``gpucrypt encrypt -p < in``) stderr is one and the terminal opens."""
    if sys.stdin.isatty():
        return True
    if not sys.stderr.isatty():
        return False
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | getattr(os, "O_NOCTTY", 0)))
    except OSError:
        return False
    return True


def _not_utf8(where: str) -> CliError:
    """The error for a passphrase that is not UTF-8 (which scrypt's input is, docs/KEYS.md).
    It names where the passphrase came from and nothing of it: the codec's own message
    quotes a byte of the passphrase and its position."""
    return CliError(f"the passphrase {where} is not valid UTF-8: give it as UTF-8 text", 2)


def _passphrase_given(args: Any) -> bool:
    """Whether the user gave a passphrase without being asked (``--passphrase-file`` or
    ``$GPUCRYPT_PASSPHRASE``): then a keyset the command reads must be sealed, as the
    library refuses an unsealed one given a passphrase (it may have been replaced)."""
    return bool(getattr(args, "passphrase_file", None) or os.environ.get(PASSPHRASE_ENV))


def _passphrase(args: Any, what: str, *, confirm: bool = False) -> str:
    """The passphrase from ``--passphrase-file``, ``$GPUCRYPT_PASSPHRASE`` or the prompt,
    as the user gave it: :mod:`gpucrypt.keys.passphrase` normalises it (Unicode NFC) where
    it derives a key, whichever source it came from."""
    path = getattr(args, "passphrase_file", None)
    if path:
        from ..keys import passphrase

        check_private_file(path, "passphrase file", args)
        try:
            with open(path, "rb") as f:  # bytes: no newline translation inside it
                text = passphrase.from_file_bytes(f.read())
        except OSError as exc:
            raise CliError(f"cannot read the passphrase file {path}: {exc.strerror}", 2) from None
        except UnicodeDecodeError:
            raise _not_utf8(f"in {path}") from None
        if not text:
            raise CliError("the passphrase file is empty", 2)
        return text
    if os.environ.get(PASSPHRASE_ENV):
        return _utf8(os.environ[PASSPHRASE_ENV], f"in ${PASSPHRASE_ENV}")
    if PASSPHRASE_ENV in os.environ:  # set, empty: not the same as unset (a prompt)
        raise CliError(f"${PASSPHRASE_ENV} is set but empty: set it to the passphrase, or unset "
                       f"it to be asked", 2)
    if not _can_prompt():
        raise CliError(f"{what} needs a passphrase: give --passphrase-file or set "
                       f"{PASSPHRASE_ENV}", 2)
    import getpass  # reads the terminal (/dev/tty), not stdin

    try:
        first = _utf8(getpass.getpass(f"passphrase for {what}: "), "typed")
        if confirm and _nfc(getpass.getpass("again: ")) != _nfc(first):
            raise CliError("the passphrases differ", 2)
    except UnicodeDecodeError:  # a terminal read strictly
        raise _not_utf8("typed") from None
    except EOFError:  # Ctrl-D at the prompt: the user gave none
        raise CliError(f"no passphrase given for {what} (end of input at the prompt): type "
                       f"one, or give --passphrase-file or set {PASSPHRASE_ENV}", 2) from None
    if not first:
        raise CliError("empty passphrase", 2)
    return first


def _nfc(text: str) -> str:
    """``text`` in Unicode NFC: two typings of one passphrase (a composed "é", or "e" and a
    combining accent) confirm each other, since both derive the same key."""
    import unicodedata

    return unicodedata.normalize("NFC", text)


def _utf8(text: str, where: str) -> str:
    """``text``, checked to have a UTF-8 form: ``os.environ`` (and a terminal read with
    ``surrogateescape``) keeps bytes it cannot decode as lone surrogates, which have none."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _not_utf8(where) from None
    return text


def _key_file_bytes(path: str, args: Any) -> bytes | None:
    """The bytes of the key file ``path``, read once per command and kept on ``args``
    (None when it cannot be read: loading it then says why): the command looks into a
    key file (how it is sealed, what it is) before loading it, and a FIFO or a process
    substitution (``-i <(...)``) gives its bytes only once."""
    kept = vars(args).setdefault("_key_file_bytes", {})
    if path not in kept:
        try:
            with open(path, "rb") as f:
                kept[path] = f.read()
        except OSError:
            kept[path] = None
    return kept[path]


def _document(path: str, args: Any) -> Any:
    """The key file's JSON document, None when it cannot be read as JSON (loading it then
    says why)."""
    import json

    raw = _key_file_bytes(path, args)
    try:
        return None if raw is None else json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # deep JSON: Recursion
        return None


def _protection(path: str, args: Any, unreadable: str | None = None) -> str | None:
    """How the key file is sealed (``"passphrase"``, ``"kek"``), None when it is not or
    is no key file; ``unreadable`` when it cannot be read as JSON (loading it then says
    why)."""
    document = _document(path, args)
    if document is None:
        return unreadable
    try:
        return document["protection"]["method"]
    except (TypeError, KeyError):
        return None


def check_passphrase_file(args: Any, given: list[str]) -> None:
    """Refuse ``--passphrase-file`` where nothing would read it, as every key option that
    would be ignored is refused (README: never silently ignored): it is the passphrase of
    ``-p``, or of a keyset (read strictly, :func:`_load_sealable`) or an identity sealed
    with a passphrase; ``decrypt`` without any other key option reads it for a
    passphrase-encrypted file (its header says so). ``given``: the key options given
    (:func:`gpucrypt.cli._common.check_key_sources`). A usage CliError (exit 2)."""
    if not getattr(args, "passphrase_file", None) or getattr(args, "passphrase", False):
        return
    if getattr(args, "keyset", None) or getattr(args, "old_keyset", None):
        return
    if any(uri[:5].lower() == "file:" for name in ("kek", "old_kek")
           for uri in getattr(args, name, None) or []):
        return  # a keyset named by a file: reference reads it (_key_references)
    decrypting = hasattr(args, "identity") and not hasattr(args, "recipient")
    if decrypting and not given:
        return
    # "?": an identity that cannot be read is left to loading, which says why
    if any(_protection(path, args, unreadable="?") in ("passphrase", "?")
           for path in getattr(args, "identity", None) or []):
        return
    from ._common import KEY_SOURCES

    options = ", ".join(KEY_SOURCES[name] for name in given) or "no key option"
    raise CliError(f"--passphrase-file would be ignored: it is the passphrase of -p, or of a "
                   f"keyset or identity sealed with a passphrase, and none is given here "
                   f"({options}); leave it out"
                   + (", or add -p to key the file with that passphrase"
                      if hasattr(args, "passphrase") and not decrypting else ""), 2)


def _load_sealable(cls: Any, path: str, args: Any):
    """``cls.load(path, passphrase)`` (a Keyset or an Identity), asking for the passphrase
    only when the file is sealed with one; errors as one-line CliErrors. Refused when group
    or others may access the file, or when it is sealed by a key-encryption key (which the
    command line has no way to take). For a keyset, a passphrase the user gave
    (:func:`_passphrase_given`) is passed whatever the file says, so that ``load`` refuses
    one that is not sealed: swapped for someone else's unsealed keyset, it would have new
    data keys wrapped under their key. An identity only unwraps (its public half is what
    others wrap to), so an unsealed one beside a sealed keyset, with the keyset's
    passphrase given, is read as it is."""
    kind = "keyset" if cls.__name__ == "Keyset" else "identity"
    document = _document(path, args)
    # a public .pub is 0644 and loading says what it is: "run chmod 600" would mislead
    if not (isinstance(document, dict) and document.get("format") == "gpucrypt-recipient"):
        check_private_file(path, kind, args)
    protection = _protection(path, args)
    if protection == "kek" and cls.__name__ == "Keyset":
        raise CliError(f"{path} is sealed by a key-encryption key, which the command line "
                       f"cannot take: use or edit it through the library "
                       f"(gpucrypt.keys.Keyset.load(path, kek=...), then save)", 1)
    strict = cls.__name__ == "Keyset" and _passphrase_given(args)
    passphrase = _passphrase(args, path) if protection == "passphrase" or strict else None
    # the bytes read above (read once): the keyset's origin, which its save checks the
    # file against, is their digest and the path
    return _keys_call(cls._load_bytes, path, _key_file_bytes(path, args), passphrase)


def _load_recipient(path: str, args: Any):
    from ..keys import Recipient

    return _keys_call(Recipient._load_bytes, path, _key_file_bytes(path, args))


def _load_keyset(path: str, args: Any):
    from ..keys import Keyset

    return _load_sealable(Keyset, path, args)


def _load_identity(path: str, args: Any):
    from ..keys import Identity

    return _load_sealable(Identity, path, args)


def _keys_call(func, *a, **kw):
    """Run a gpucrypt.keys call, turning its errors into one-line CLI errors."""
    from cryptography.exceptions import InvalidTag

    from ..keys import KeyManagementError
    from ..keys._document import UnreadableKeyFile

    from ..audit import AuditLogError

    try:
        return func(*a, **kw)
    except AuditLogError:  # not this call's failure: gpucrypt.cli reports it, naming the log
        raise
    except UnreadableKeyFile as exc:  # the wrong file named: as a missing --key-file
        raise CliError(str(exc), 2) from None
    except KeyManagementError as exc:
        raise CliError(str(exc), 1) from None
    except (InvalidTag, ValueError) as exc:  # the stream's format and authentication errors
        raise CliError(str(exc) or type(exc).__name__, 1) from None
    except OSError as exc:
        from ._common import named_io_error

        if exc.filename is not None:  # the library names the file (a full disk's too)
            raise CliError(named_io_error(exc), 1) from None
        raise CliError(f"I/O error: {exc.strerror or exc}", 1) from None


# --------------------------------------------------------------------------- encrypt/decrypt hooks


def add_key_arguments(parser: argparse.ArgumentParser, mode: str) -> None:
    """Add the recipient/identity/keyset options of ``encrypt`` (mode="encrypt") or
    ``decrypt`` (mode="decrypt") to ``parser``."""
    if mode not in ("encrypt", "decrypt"):
        raise ValueError("mode must be 'encrypt' or 'decrypt'")
    group = parser.add_argument_group("keys (envelope encryption, docs/KEYS.md)")
    if mode == "encrypt":
        group.add_argument("-r", "--recipient", action="append", default=[], metavar="FILE",
                           help="wrap the file's data key for this public key (recipient file "
                                "from 'gpucrypt keygen --public'); repeat for several")
        group.add_argument("--keyset", metavar="FILE",
                           help="wrap the data key under this keyset's primary key")
    else:
        group.add_argument("-i", "--identity", action="append", default=[], metavar="FILE",
                           help="private key file to open the envelope with; repeat for several")
        group.add_argument("--keyset", metavar="FILE",
                           help="open the envelope with this keyset's keys (found by key id)")
    _add_kek_argument(group, "--kek", "wrap the data key under this key (pkcs11:..., awskms://..., "
                      "file://...); repeat for several" if mode == "encrypt" else
                      "open the envelope with this key (pkcs11:..., awskms://..., file://...); "
                      "repeat for several")
    group.add_argument("-p", "--passphrase", action="store_true",
                       help="encrypt with a passphrase (scrypt; asked twice on the terminal, or "
                            "--passphrase-file / $GPUCRYPT_PASSPHRASE)" if mode == "encrypt" else
                       "the file is passphrase-encrypted (decrypt notices that by itself)")
    group.add_argument("--passphrase-file", metavar="FILE",
                       help=f"the passphrase of -p, or of a sealed keyset/identity (else "
                            f"${PASSPHRASE_ENV}, else a prompt); mode 0600")
    _add_audit_argument(group)


def _passphrase_log_n() -> int:
    from ..keys import passphrase

    return passphrase.DEFAULT_LOG_N


def _add_kek_argument(parser: Any, flag: str, help_text: str) -> None:
    parser.add_argument(flag, action="append", default=[], metavar="URI",
                        help=help_text + "; PINs come from the URI's pin-source or "
                                         "$GPUCRYPT_PKCS11_PIN, never from the command line")


def _key_references(uris: list[str], args: Any) -> list:
    """KeyReference objects for ``--kek`` URIs; a malformed URI is a usage error (exit 2).
    The local files they name (a ``file:`` keyset, a ``pin-source``/``passphrase-source``
    file, in any form the reader takes: ``file:PATH``, ``file://PATH`` or a plain absolute
    path) get the same permission check as ``--keyset`` and ``--key-file``."""
    from ..keys import KeyReference, KeysetError
    from ..keys.references import secret_source_path, with_passphrase_source

    try:
        refs = [KeyReference(uri) for uri in uris]
    except KeysetError as exc:
        raise CliError(str(exc), 2) from None
    if getattr(args, "passphrase_file", None) and not getattr(args, "passphrase", False):
        # the passphrase given goes to every keyset the command reads, a file: reference's
        # too (unless it names its own source): so an unsealed one put in the place of a
        # sealed keyset is refused here as --keyset refuses it
        source = "file:" + os.path.abspath(args.passphrase_file)
        refs = [with_passphrase_source(ref, source) for ref in refs]
    for ref in refs:
        if ref.scheme == "file":
            check_private_file(ref.attributes["path"], "keyset", args)
        for name, source in ref.query.items():
            path = secret_source_path(source) if name.endswith("-source") else None
            if path is not None:  # the same file the provider will read the secret from
                check_private_file(path, name.replace("-source", " file"), args)
    return refs


def _header_salt(header: Any) -> bytes:
    salt = header.get("salt") if isinstance(header, dict) else getattr(header, "salt", None)
    return salt or b""


def resolve_encrypt_keys(args: Any) -> tuple[bytes, str | None, bytes] | None:
    """``(dek, key_id, envelope)`` for ``stream.encrypt`` from the parsed options, or None
    when no ``-r``/``--keyset``/``--kek``/``-p`` was given."""
    from ..files._format import SALT_SIZE
    from ..keys import Passphrase, file_context, generate_dek
    from ..keys.recipients import seal_envelope_with_labels

    args.file_salt = None  # a passphrase stanza binds nothing: the stream draws its own salt
    if getattr(args, "passphrase", False):
        secret = _passphrase(args, "the file", confirm=True)
        dek = generate_dek()
        stanza = _keys_call(Passphrase, secret, log_n=_passphrase_log_n())
        envelope, args.audit_recipients = _keys_call(seal_envelope_with_labels, dek, stanza)
        return dek, None, envelope

    recipients = [_load_recipient(path, args) for path in getattr(args, "recipient", None) or []]
    keyset = _load_keyset(args.keyset, args) if getattr(args, "keyset", None) else None
    references = _key_references(getattr(args, "kek", None) or [], args)
    if not recipients and keyset is None and not references:
        return None
    items: list = recipients + ([keyset] if keyset is not None else []) + references
    dek, args.file_salt = generate_dek(), os.urandom(SALT_SIZE)  # the stream and model salt
    envelope, args.audit_recipients = _keys_call(seal_envelope_with_labels, dek, items,
                                                 context=file_context(args.file_salt))
    args.audit_key_id = keyset.primary.id if keyset is not None else None
    return dek, args.audit_key_id, envelope


def resolve_decrypt_key(args: Any, header: Any) -> bytes | None:
    """The data key of the file whose parsed ``header`` (from ``stream.read_header``) is
    given, unwrapped with the ``-i``/``--keyset`` options; None when neither was given."""
    from ..keys import EnvelopeError
    from ..keys.recipients import describe_envelope, open_data_key, open_file_envelope_with_label

    envelope = header.get("envelope") if isinstance(header, dict) else getattr(header, "envelope", None)
    if envelope and getattr(args, "audit_log", None) is not None:
        # who it is for, as decrypt_file records it (unauthenticated, as there)
        try:
            args.audit_recipients = describe_envelope(envelope)
        except EnvelopeError:
            pass  # malformed: refused below, in the words said for it
    stanza = _passphrase_stanza(envelope)
    if stanza is not None and not getattr(args, "identity", None) \
            and not getattr(args, "keyset", None) and not getattr(args, "kek", None):
        from ..keys import Passphrase, passphrase

        _keys_call(passphrase.work_factor, stanza)  # the limit, before asking or deriving
        secret = _keys_call(Passphrase, _passphrase(args, "this file"))
        dek = _keys_call(open_data_key, envelope, secret)
        args.audit_key_id = "scrypt"  # the stanza that opened, as decrypt_file's key_id
        return dek
    if getattr(args, "passphrase", False):
        raise CliError("this file is not passphrase-encrypted: it needs "
                       + ("the key it was encrypted with" if not envelope else "-i or --keyset"), 1)
    identities: list = [_load_identity(p, args) for p in getattr(args, "identity", None) or []]
    if getattr(args, "keyset", None):
        identities.append(_load_keyset(args.keyset, args))
    identities += _key_references(getattr(args, "kek", None) or [], args)
    if not identities:
        # a passphrase that cannot open this file is the wrong key for it (exit 1, as -p
        # on a raw-key file); no key at all is a usage error (2)
        given = bool(getattr(args, "passphrase_file", None))
        if envelope:
            from ..keys.recipients import describe_envelope

            raise CliError("this file's data key is wrapped for "
                           + ", ".join(_keys_call(describe_envelope, envelope))
                           + (", not for a passphrase" if given else "")
                           + ": open it with -i FILE (an identity), --keyset FILE or --kek URI",
                           1 if given else 2)
        if given:
            raise CliError("this file is not passphrase-encrypted (it was encrypted with a raw "
                           "key): use --key-file FILE or --key-env VAR", 1)
        return None
    if not envelope:
        raise CliError("this file carries no envelope (it was encrypted with a raw key): "
                       "-i/--keyset/--kek cannot open it", 1)
    dek, args.audit_key_id = _keys_call(open_file_envelope_with_label, envelope, identities,
                                        _header_salt(header))
    return dek


def _passphrase_stanza(envelope: bytes | None):
    """The envelope's ``scrypt`` stanza when it is a passphrase-encrypted file's, else None.
    An envelope that does not decode is tampered data (exit 1, docs/FORMAT.md), said here:
    passed over, the file would look keyless ("no key given", a usage error) or not
    passphrase-encrypted, though it may well be."""
    from ..keys import _envelope, passphrase

    if not envelope:
        return None
    try:
        stanzas = _envelope.decode(envelope)
    except ValueError as exc:
        raise CliError(f"tampered or damaged file: its envelope is malformed ({exc})",
                       1) from None
    return stanzas[0] if stanzas[0].kind == passphrase.STANZA_KIND else None


# --------------------------------------------------------------------------- keygen


def add_keygen(parser: argparse.ArgumentParser) -> None:
    """Generate a keyset of key-encryption keys, or with --public a recipient key pair."""
    parser.add_argument("-o", "--out", metavar="FILE",
                        help="where to write (default gpucrypt-keyset.json, or with --public "
                             "gpucrypt-identity.json and FILE.pub); written 0600")
    parser.add_argument("--public", action="store_true",
                        help="make a public-key pair: a private identity FILE and a public "
                             "recipient FILE.pub to share")
    parser.add_argument("--kem", choices=("x25519", "mlkem768-x25519"), default=None,
                        help="key type for --public: X25519, or the post-quantum hybrid "
                             "ML-KEM-768 + X25519 (default x25519)")
    parser.add_argument("--seal", action="store_true",
                        help="seal the secret file with a passphrase (scrypt)")
    parser.add_argument("--passphrase-file", metavar="FILE",
                        help=f"passphrase for --seal (else ${PASSPHRASE_ENV}, else a prompt)")
    parser.add_argument("-f", "--force", action="store_true", help="overwrite existing files")
    add_unsafe_key_permissions(parser)
    _add_audit_argument(parser)
    parser.set_defaults(func=_run_keygen)


def _refuse_overwrite(paths: list[str], force: bool, default: str) -> None:
    """Refuse (exit 2) a key file's path that is a symbolic link, a folder or not a
    regular file, with or without --force (said first: --force would not help), or an
    existing file without --force."""
    from ._common import file_kind, link_refusal

    for path in paths:
        try:
            mode = os.lstat(path).st_mode
        except (OSError, ValueError):
            continue
        if stat.S_ISLNK(mode):
            raise CliError(link_refusal(path), 2)
        if stat.S_ISDIR(mode):
            raise CliError(f"{path} is a folder: give the key file's path (in it, say "
                           f"{os.path.join(path, default)})", 2)
        if not stat.S_ISREG(mode):
            raise CliError(f"{path} is a {file_kind(mode)}: a key file is written as a "
                           f"regular file, with or without --force; give a file's path", 2)
        if not force:
            raise CliError(f"{path} exists; use --force to overwrite it", 2)


def _save_pair(identity: Any, out: str, passphrase: Any, force: bool) -> None:
    """Write ``identity`` to ``out`` and its recipient to ``out.pub``, both or neither
    (short of a crash between the two): a recipient left beside an identity that is not
    its own would have data encrypted to a key nobody holds. The recipient goes first;
    if anything stops the pair (an error, Ctrl-C, which can come after a file was
    already renamed into place) what is on disk decides: the new identity gets its
    recipient, else the recipient that was there comes back (or none)."""
    pub = out + ".pub"
    try:
        with open(pub, "rb") as f:
            earlier = f.read()
    except OSError:  # none there, or unreadable: then removed, never left unmatched
        earlier = None
    try:
        _keys_call(identity.recipient.save, pub, overwrite=force)
        # checked by _refuse_overwrite before the passphrase; one that appeared since is kept
        _keys_call(identity.save, out, passphrase, overwrite=force)
    except BaseException:
        _settle_pair(identity, out, pub, earlier)
        raise


def _settle_pair(identity: Any, out: str, pub: str, earlier: bytes | None) -> None:
    """After :func:`_save_pair` stopped part-way: make ``pub`` the public half of the
    identity now at ``out`` (the files' fingerprints say which were written), or say
    what to delete."""
    import json

    from ..files._atomic import write_atomically

    def holds_new(path: str) -> bool:
        try:
            with open(path, "rb") as f:
                doc = json.loads(f.read().decode("utf-8"))
            return doc.get("fingerprint") == identity.fingerprint
        except (OSError, ValueError, AttributeError, RecursionError):
            return False

    written, pub_written = holds_new(out), holds_new(pub)
    try:
        if written and not pub_written:
            identity.recipient.save(pub, overwrite=True)  # the identity's own half
        elif pub_written and not written:
            if earlier is None:
                os.remove(pub)
            else:
                write_atomically(pub, earlier, 0o644)
    except OSError as exc:
        print(f"gpucrypt: {pub} could not be {'written' if written else 'put back'} "
              f"({exc.strerror}): it is not the public half of {out}; delete it",
              file=sys.stderr)


def _run_keygen(args) -> int:
    from ..keys import Identity, Keyset

    if _passphrase_given(args) and not args.seal:  # else ignored: an unsealed file, which
        # every later command given the same passphrase would refuse
        raise CliError(f"a passphrase was given (--passphrase-file or ${PASSPHRASE_ENV}) but not "
                       f"--seal: add --seal to seal the new file with it, or leave the passphrase "
                       f"out", 2)
    if args.kem is not None and not args.public:  # else ignored: a keyset has no KEM
        raise CliError(f"--kem {args.kem} is the key type of a public-key pair: add --public, "
                       f"or leave --kem out for a keyset", 2)
    refuse_dash(args.out or "", "-o", "keygen writes key files, and stdout is no place "
                                      "for a private key")
    _enable_audit(args)
    default = "gpucrypt-identity.json" if args.public else "gpucrypt-keyset.json"
    out = args.out or default
    # before the passphrase: typed twice for nothing, an existing file would still refuse
    _refuse_overwrite([out, out + ".pub"] if args.public else [out], args.force, default)
    passphrase = _passphrase(args, "the new key file", confirm=True) if args.seal else None
    if args.public:
        identity = Identity.generate(args.kem or "x25519")
        _save_pair(identity, out, passphrase, args.force)
        print(f"identity (private, keep it secret): {out}")
        print(f"recipient (public, share it):       {out}.pub")
        print(f"fingerprint: {identity.fingerprint}")
        return 0
    keyset = Keyset.generate()
    _keys_call(keyset.save, out, passphrase, overwrite=args.force)
    print(f"keyset: {out} (primary key {keyset.primary.id})")
    return 0


# --------------------------------------------------------------------------- keys


def add_keys(parser: argparse.ArgumentParser) -> None:
    """Manage a keyset: list, add, promote, enable, disable, destroy keys."""
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    actions = {
        "list": "show the keys (ids, algorithm, created, status); no passphrase needed",
        "add": "add a fresh key (enabled; --primary makes it the primary)",
        "promote": "make KEY_ID the primary key (new data keys are wrapped under it)",
        "enable": "let a disabled key unwrap again",
        "disable": "stop KEY_ID from unwrapping (reversible)",
        "destroy": "delete KEY_ID's material for good (needs --yes)",
    }
    for action, help_text in actions.items():
        p = sub.add_parser(action, help=help_text)
        p.add_argument("keyset", metavar="KEYSET")
        if action not in ("list", "add"):
            p.add_argument("key_id", metavar="KEY_ID")
        if action == "list":
            p.add_argument("--json", action="store_true", help="print JSON")
        if action == "add":
            p.add_argument("--primary", action="store_true", help="make the new key the primary")
        if action == "destroy":
            p.add_argument("--yes", action="store_true", help="confirm: this cannot be undone")
        if action != "list":  # list reads no passphrase: given, it would be ignored
            p.add_argument("--passphrase-file", metavar="FILE",
                           help=f"passphrase of a sealed keyset (else ${PASSPHRASE_ENV}, else a "
                                f"prompt)")
        add_unsafe_key_permissions(p)
        _add_audit_argument(p)
    parser.set_defaults(func=_run_keys)


def _run_keys(args) -> int:
    from ..keys import Keyset

    _enable_audit(args)
    if args.keys_command == "list":
        info = _keys_call(Keyset.inspect, args.keyset)
        if args.json:
            import json

            print(json.dumps(info, indent=2))
            return 0
        from ..keys.recipients import printable_text

        def shown(value: Any) -> str:
            # str(): a damaged file's field may be a number, null, a list; escaped: nothing
            # of the file is authenticated here (no passphrase), and an id or date holding a
            # terminal's escape sequence would rewrite the screen
            return printable_text(str(value))

        protection = info["protection"]
        print(f"{args.keyset}: {len(info['keys'])} key(s), "
              f"{'sealed by ' + shown(protection) if protection else 'not sealed'}")
        for key in info["keys"]:
            print(f"  {shown(key.get('id', '?')):18s} {shown(key.get('status', '?')):9s} "
                  f"{shown(key.get('algorithm', '?')):12s} {shown(key.get('created', '?'))}")
        return 0
    if args.keys_command == "destroy" and not args.yes:
        raise CliError(f"destroying key {args.key_id} cannot be undone: data wrapped only under "
                       f"it becomes unreadable. Add --yes to confirm", 2)
    _refuse_unsavable_keyset(args)
    keyset = _load_keyset(args.keyset, args)
    if args.keys_command == "add":
        key = _keys_call(keyset.add, primary=args.primary)
        message = f"added key {key.id} ({key.status})"
    else:
        key = _keys_call(getattr(keyset, args.keys_command), args.key_id)
        message = f"key {key.id} is now {key.status}"
    _keys_call(_save_keyset, keyset, args.keyset)
    print(message)
    return 0


def _refuse_unsavable_keyset(args: Any) -> None:
    """A usage CliError, before the keyset is read or changed, when KEYSET is not a regular
    file: the command saves it back there (a FIFO's save waited for a writer forever)."""
    from ._common import file_kind

    try:
        mode = os.stat(args.keyset).st_mode
    except OSError:
        return  # missing or unreadable: loading says so
    if not stat.S_ISREG(mode):
        raise CliError(f"{args.keyset} is a {file_kind(mode)}: 'keys {args.keys_command}' "
                       f"saves the keyset back to its file, so it must be a regular file", 2)


def _save_keyset(keyset: Any, path: str) -> None:
    """``keyset.save(path)``; a file another program saved meanwhile is said for the command
    line: the library's advice (keep the object, save it elsewhere) is not the command's,
    whose change dies with the process and which wrapped nothing under a key it made."""
    from ..keys.keyset import KeysetChangedOnDisk

    try:
        keyset.save(path)
    except KeysetChangedOnDisk:
        raise CliError(f"{path} changed while this command ran (another command or program "
                       f"saved it): nothing was written and this change was dropped; run the "
                       f"command again", 1) from None


# --------------------------------------------------------------------------- rekey


def add_rekey(parser: argparse.ArgumentParser) -> None:
    """Give an encrypted file new recipients/keys (the header only; --reencrypt to revoke).

    Without --reencrypt the same data key is re-wrapped; with it the file is encrypted
    again under a fresh one, which is what revokes a recipient."""
    parser.add_argument("file", metavar="FILE",
                        help="a gpucrypt stream or model file with an envelope (its header is "
                             "rewritten, its data untouched, unless --reencrypt)")
    parser.add_argument("-r", "--recipient", action="append", default=[], metavar="FILE",
                        help="new recipient (public key file); repeat. Anyone left out loses "
                             "the envelope, but is revoked only with --reencrypt")
    parser.add_argument("--keyset", metavar="FILE",
                        help="wrap under this keyset's primary key (and, without -i/--old-keyset, "
                             "open with it too: rotation after 'keys promote')")
    parser.add_argument("-i", "--identity", action="append", default=[], metavar="FILE",
                        help="private key that opens the current envelope; repeat")
    parser.add_argument("--old-keyset", metavar="FILE",
                        help="keyset that opens the current envelope")
    _add_kek_argument(parser, "--kek", "wrap under this key (pkcs11:..., awskms://..., file://...); "
                                       "repeat")
    _add_kek_argument(parser, "--old-kek", "key that opens the current envelope; repeat")
    parser.add_argument("--passphrase-file", metavar="FILE",
                        help=f"passphrase of sealed keysets/identities (else ${PASSPHRASE_ENV})")
    parser.add_argument("--reencrypt", action="store_true",
                        help="encrypt the whole file again under a fresh data key (reads and "
                             "writes all of it): needed to revoke a recipient, since without it "
                             "whoever once unwrapped the data key can still read the file")
    parser.add_argument("--force", action="store_true",
                        help="rekey FILE even when it has other hard links (they keep the old "
                             "file)")
    add_unsafe_key_permissions(parser)
    _add_audit_argument(parser)
    parser.set_defaults(func=_run_rekey)


def _refuse_other_links(path: str, force: bool) -> None:
    """Refuse (without --force) a FILE with other hard links: rekeying (with or without
    --reencrypt) writes a new file in its place, so another name for the old file (a shared
    copy) would keep the old envelope and data key, and a recipient the rekey revokes could
    still open it there. (A symbolic link is followed instead: the file it points to is
    rewritten.)"""
    try:
        links = os.stat(path).st_nlink
    except OSError:
        return  # rekeying says what is wrong with it
    if links > 1 and not force:
        raise CliError(f"{path} has {links - 1} other hard link(s): rekey writes a new file in "
                       f"its place, and the other links would keep the old envelope (a revoked "
                       f"recipient could still open them). Remove the other links, or give "
                       f"--force to rekey this name only", 2)


def _check_rekey_file(path: str) -> None:
    """Refuse (exit 2) a FILE that is missing or is not a regular file: rekey rewrites
    the file's header into a new file that replaces it, which a folder cannot be, and a
    FIFO would be read forever (and replaced by a file). A symbolic link is followed."""
    from ._common import file_kind

    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise CliError(f"file not found: {path}", 2) from None
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}", 2) from None
    if not stat.S_ISREG(mode):
        raise CliError(f"{path} is a {file_kind(mode)}, not a file: rekey rewrites the "
                       f"header of an encrypted file; give the file's path", 2)


def _refuse_passphrase_file(path: str) -> None:
    """A file encrypted with a passphrase (its envelope's one scrypt stanza) has no
    recipients to change, and rekey takes no passphrase: the library said "open it with its
    passphrase", which this command cannot do."""
    from ..files._format import StreamError
    from ..files.keyed import _file_envelope, _is_model_file
    from ..keys import KeyManagementError, _envelope
    from ..keys.recipients import _SCRYPT

    try:
        envelope = _file_envelope(path, _is_model_file(path))[0]
        passphrase_only = bool(envelope) and _envelope.decode(envelope)[0].kind == _SCRYPT
    except (OSError, ValueError, StreamError, KeyManagementError):
        return  # rekey_file itself says what is wrong with the file
    if passphrase_only:
        raise CliError(f"{path} is encrypted with a passphrase, which rekey does not take: to "
                       f"give it recipients or a keyset, decrypt it with 'gpucrypt decrypt' "
                       f"(it asks for the passphrase) and encrypt the result with -r/--keyset", 1)


def _run_rekey(args) -> int:
    from ..files.keyed import rekey_file

    check_key_sources(args)
    _enable_audit(args)
    if not args.recipient and not args.keyset and not args.kek:
        raise CliError("say who the file is for: -r RECIPIENT (repeatable), --keyset and/or "
                       "--kek URI", 2)
    if not args.identity and not args.old_keyset and not args.keyset and not args.old_kek:
        raise CliError("say how to open the file: -i IDENTITY, --old-keyset and/or --old-kek URI", 2)
    _check_rekey_file(args.file)
    _refuse_passphrase_file(args.file)
    _refuse_other_links(args.file, args.force)
    recipients = [_load_recipient(p, args) for p in args.recipient]
    recipients += _key_references(args.kek, args)
    keyset = _load_keyset(args.keyset, args) if args.keyset else None
    identities = [_load_identity(p, args) for p in args.identity]
    identities += _key_references(args.old_kek, args)
    old_keyset = _load_keyset(args.old_keyset, args) if args.old_keyset else None
    with warnings.catch_warnings():
        # the library's warning of other hard links: _refuse_other_links said it, and
        # --force answered it (printed raw, it named a line of gpucrypt's own code)
        warnings.filterwarnings("ignore", message=r".* other hard link\(s\)", category=UserWarning)
        result = _keys_call(rekey_file, args.file, recipients=recipients or None, keyset=keyset,
                            identities=identities or None, old_keyset=old_keyset,
                            reencrypt=args.reencrypt)
    done = "re-encrypted under a fresh data key, wrapped" if args.reencrypt else \
        "data key now wrapped"
    print(f"{args.file}: {done} for {', '.join(result['recipients'])}")
    dropped = [r for r in result["previous_recipients"] if r not in result["recipients"]]
    if dropped:
        print(f"removed: {', '.join(dropped)}")
        # the same data key: a header rewrite revokes no one. Said unless every one removed
        # is a live key of the one keyset the file is now wrapped for (a rotation within
        # it: whoever holds the old key holds the new one); a disabled or destroyed key,
        # or another keyset's (--old-keyset), is a revocation, and the one to warn of
        in_keyset = {f"aes-kwp:{key.id}" for key in keyset if key.status in ("enabled", "primary")} \
            if keyset is not None and not args.old_keyset else set()
        if not args.reencrypt and not set(dropped) <= in_keyset:
            print(f"gpucrypt rekey: warning: the removed recipients can still read {args.file} "
                  f"if they ever unwrapped its data key; rekey with --reencrypt to revoke them",
                  file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- audit


def _add_audit_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--audit-log", metavar="FILE",
                        help="append audit events (JSON lines, no secrets) to FILE")


@contextlib.contextmanager
def audited_command(args: Any, operation: str, path: str) -> Iterator[dict]:
    """The audit event of one ``encrypt``/``decrypt``/``encrypt-model``/``decrypt-model``
    run given ``--audit-log``: the log is opened first (before any key is read), and one
    event is written when the block ends, once OUT is published or dropped, as the
    library's ``encrypt_file``/``decrypt_file``/``save_encrypted``/``load_encrypted``
    record theirs: ``path`` (None for stdin), ``key_id`` (encrypting: the keyset's
    primary; decrypting: the stanza that opened the data key, ``"scrypt"`` for a
    passphrase; none for a raw key), ``recipients`` (the envelope's stanzas) and what the
    block adds. A run refused before it read any key (IN missing, OUT refused:
    :func:`gpucrypt.cli._common.key_read`) records nothing, as a usage error uses no
    key. A failure after that is recorded by the library error the command
    reported (class name; the message only for key-management errors), not as the
    command line's own one-line error."""
    import time

    from .. import audit

    _enable_audit(args)
    fields: dict = {"path": None if path == "-" else path}
    start = time.perf_counter()
    try:
        yield fields
    except BaseException as exc:
        if not getattr(args, "audit_key_read", False) or \
                isinstance(exc, CliError) and exc.exit_code == 2:
            raise  # a usage error: it used no key (or the library's events say which it did)
        audit.event(operation, outcome="error", duration_s=round(time.perf_counter() - start, 6),
                    error=_failure(exc, audit), **fields, **_audit_key_fields(args))
        raise
    audit.event(operation, duration_s=round(time.perf_counter() - start, 6), **fields,
                **_audit_key_fields(args))


def _failure(exc: BaseException, audit: Any) -> str:
    """The ``error`` field of a failed run: the library's error that ``exc`` reports (a
    CliError raised in its handler, or an audit event lost while it was being recorded,
    holds it as its context); the command line's own refusals (written for stderr, with
    no secret) with their message, as key-management errors are recorded."""
    if isinstance(exc, audit.AuditLogError) and exc.error is not None:
        return exc.error  # the failure the lost event was recording
    if isinstance(exc, CliError):
        if exc.__context__ is not None:
            return audit.error_fields(exc.__context__)
        return f"{type(exc).__name__}: {exc}"
    return audit.error_fields(exc)


def _audit_key_fields(args: Any) -> dict:
    """The keys' fields of a file command's event, as its key resolution noted them."""
    return {field: getattr(args, "audit_" + field) for field in ("key_id", "recipients")
            if getattr(args, "audit_" + field, None) is not None}


#: the arguments naming files a command reads or writes, which the audit log must not be
_FILE_ARGUMENTS = ("input", "output", "output_option", "out", "keyset", "file", "old_keyset",
                   "identity", "recipient", "key_file", "passphrase_file")


def _refuse_log_among_files(args: Any) -> None:
    """A usage CliError when ``--audit-log`` names a file the command reads or writes
    (OUT, IN, a key file, keygen's new files): with --force, OUT was renamed over the log
    (its lines lost) and the next event appended to OUT, corrupting it, exit 0."""
    log = os.path.abspath(args.audit_log)
    named: list[str] = []
    for name in _FILE_ARGUMENTS:
        value = getattr(args, name, None)
        named += value if isinstance(value, list) else [value] if isinstance(value, str) else []
    if getattr(args, "command", None) == "keygen":  # its files, named or by default
        out = args.out or ("gpucrypt-identity.json" if args.public else "gpucrypt-keyset.json")
        named += [out, out + ".pub"]
    named += _reference_files(args)
    real_log = os.path.realpath(log)
    for path in named:
        if path == "-":
            continue
        same = os.path.abspath(path) == log
        if not same:
            try:
                same = os.path.samefile(path, log)
            except (OSError, ValueError):
                pass
        # inside a folder IN or OUT (a checkpoint): a file the command reads or writes too,
        # which the folder's manifest then fails on (or lists)
        if same or os.path.isdir(path) and os.path.commonpath(
                (os.path.realpath(path), real_log)) == os.path.realpath(path):
            raise CliError(f"--audit-log {args.audit_log} is also a file this command reads or "
                           f"writes ({path}): give the log a file of its own", 2)


def _reference_files(args: Any) -> list[str]:
    """The local files ``--kek``/``--old-kek`` references name: a ``file:`` keyset, and the
    secret sources (``passphrase-source``, ``pin-source``) of any reference."""
    from ..keys import KeyReference, KeysetError
    from ..keys.references import secret_source_path

    paths = []
    for uri in (getattr(args, "kek", None) or []) + (getattr(args, "old_kek", None) or []):
        try:
            ref = KeyReference(uri)
        except KeysetError:
            continue  # refused as malformed where it is read, in its own words
        if ref.scheme == "file":
            paths.append(ref.attributes["path"])
        paths += [path for name, source in ref.query.items() if name.endswith("-source")
                  for path in [secret_source_path(source)] if path is not None]
    return paths


def _enable_audit(args) -> None:
    if getattr(args, "audit_log", None) is not None:
        if not args.audit_log:  # an unset $VARIABLE, say: not a log left out
            raise CliError("--audit-log was given an empty name: give the log file's path", 2)
        _refuse_log_among_files(args)
        from .. import audit

        try:
            audit.enable(args.audit_log)
        except OSError as exc:  # before any key is touched: nothing done goes unrecorded
            raise CliError(f"cannot open the audit log {args.audit_log}: "
                           f"{exc.strerror or exc}", 1) from None
