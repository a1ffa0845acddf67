"""Passphrase-encrypted files: the data key wrapped under a key that scrypt derives from
a passphrase (the envelope's ``scrypt`` stanza), as ``age -p`` does.

Stanza (docs/KEYS.md, "Passphrases"): recipient id = 16-byte random salt || one byte
log2(N); body = ChaCha20-Poly1305(key, nonce = 12 zero bytes, no associated data) of the
data key, where key = scrypt(passphrase UTF-8, salt = ``b"gpucrypt-passphrase-v1\\x00"``
|| salt, N, r = 8, p = 1, 32 bytes). A passphrase given as text is normalised to Unicode
NFC first (:func:`forms`), so that "é" typed as one code point or as "e" and a combining
accent is the same passphrase; bytes are taken as given. The key encrypts one message only (the salt is
fresh for every file), so the fixed nonce never repeats under a key. The work factor
sits in the header, so a decryptor knows what it will cost before it starts: one that
asks for more than ``2**max_log_n`` is refused before any work is done (a crafted file
could otherwise make a decryptor spin and allocate gigabytes).

A passphrase-encrypted envelope holds that one stanza and nothing else (sealing refuses
other recipients beside a passphrase, opening refuses an envelope that mixes them): as
with age, only who knows the passphrase could have made the file.

May import: the ground floor and ``cryptography``. Used by :mod:`gpucrypt.keys.recipients`.
"""
from __future__ import annotations

import unicodedata
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .._errors import KeysetError, KeyUnavailable
from .._buffers import bytes_arg
from ._envelope import Stanza
from ._material import HoldsKeyMaterial

__all__ = ["Passphrase", "PassphraseText", "DEFAULT_LOG_N", "MIN_LOG_N", "MAX_LOG_N",
           "STANZA_KIND", "work_factor", "readable_log_n", "check_log_n", "forms",
           "from_file_bytes"]

STANZA_KIND = "scrypt"
#: scrypt's N = 2**17 (128 MiB with r = 8): about 1.4 s on one core here (docs/KEYS.md)
DEFAULT_LOG_N = 17
#: the most a decryptor accepts unless told otherwise: 2**20 (1 GiB with r = 8, some 10 s)
MAX_LOG_N = 20
#: the least a writer (this module, and sealed key files) accepts: 2**15 (32 MiB with r = 8).
#: Read at each call, so that tests, and only tests, may lower it for speed
#: (``monkeypatch.setattr(passphrase, "MIN_LOG_N", 10)``, as they lower DEFAULT_LOG_N).
MIN_LOG_N = 15
SALT_SIZE = 16
SCRYPT_R, SCRYPT_P = 8, 1
#: scrypt's salt is this label followed by the stanza's salt (no other use of gpucrypt's
#: scrypt can produce the same key)
SALT_LABEL = b"gpucrypt-passphrase-v1\x00"
_NONCE = bytes(12)


def encode(passphrase: Any) -> bytes:
    """The bytes scrypt derives from: a str's UTF-8, bytes as given. A str that has no UTF-8
    form (lone surrogates: how ``os.environ`` and ``surrogateescape`` carry bytes that are
    not UTF-8) is a :class:`KeysetError` that quotes nothing of it; the codec's own message
    would show one of its characters and where it sits."""
    if isinstance(passphrase, str):
        try:
            return passphrase.encode("utf-8")
        except UnicodeEncodeError:
            raise KeysetError("the passphrase is not valid UTF-8: give it as UTF-8 text, or "
                              "as bytes") from None
    if not isinstance(passphrase, (bytes, bytearray)):
        raise TypeError("a passphrase must be str or bytes")
    return bytes(passphrase)


class PassphraseText(HoldsKeyMaterial, str):
    """A passphrase read as text, with ``earlier``: the texts earlier gpucrypt versions read
    from the same source (:func:`from_file_bytes`), which files they sealed may have been
    derived from. :func:`forms` tries them after the passphrase itself, to open; nothing is
    ever sealed with them.

    It is the passphrase, as a ``str`` is: ``str()``, formatting and slicing give the
    secret (it is handed to what takes a passphrase as text). Its ``repr`` does not, and
    it refuses to be pickled or copied (``TypeError``, as :class:`Passphrase` does): a
    pickle would carry it in the clear, and a copy is one more holder."""

    _travel_instead = (
        "name where the passphrase is instead (an environment variable or a file, read in "
        "each process: KeyReferences(passphrase_env=VAR), or a file: key reference's "
        "passphrase-source)")

    def __new__(cls, text: str, earlier: Any = ()):
        self = super().__new__(cls, text)
        self.earlier = tuple(e for e in earlier if e != text)
        return self

    def __repr__(self) -> str:  # a secret: never shown
        return "PassphraseText(...)"


def forms(passphrase: Any) -> list[bytes]:
    """The byte strings ``passphrase`` is derived from, in the order they are tried: first
    what sealing uses, a str's UTF-8 in Unicode NFC (bytes: as given); then, only to open
    files sealed before gpucrypt normalised, the str's UTF-8 as given when that differs, and
    a :class:`PassphraseText`'s earlier readings. Errors as :func:`encode`'s, and
    ``ValueError`` for an empty passphrase."""
    raw = encode(passphrase)  # its errors first: they quote nothing
    if not raw:
        raise ValueError("empty passphrase")
    if not isinstance(passphrase, str):
        return [raw]
    out = [unicodedata.normalize("NFC", passphrase).encode("utf-8"), raw]
    out += [encode(text) for text in getattr(passphrase, "earlier", ()) if text]
    return list(dict.fromkeys(out))


def from_file_bytes(data: bytes) -> PassphraseText:
    """The passphrase in a passphrase file's bytes: UTF-8 (``UnicodeDecodeError``
    otherwise), without a leading byte order mark, without the line endings that end it
    (any number of ``\\n`` and ``\\r``, as before), its other characters exactly as they
    are (``\\r\\n`` inside stays ``\\r\\n``). Empty if nothing else is left. Its
    :attr:`~PassphraseText.earlier` text is how gpucrypt read the file until it read
    bytes: a text-mode read, which kept the byte order mark and turned every ``\\r\\n``
    and ``\\r`` into ``\\n``."""
    text = bytes(data).decode("utf-8")
    earlier = text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")
    return PassphraseText(text.removeprefix("\ufeff").rstrip("\r\n"), (earlier,))


def readable_log_n(n: Any, r: Any = SCRYPT_R, p: Any = SCRYPT_P,
                   max_log_n: int = MAX_LOG_N) -> int | None:
    """log2(n) when a reader may run scrypt with ``(n, r, p)`` from a file, else None: r and
    p are what gpucrypt writes (:data:`SCRYPT_R`, :data:`SCRYPT_P`) and n is 2**1 to
    2**max_log_n. The one check for every file that names its own work factor (a ``scrypt``
    stanza, a sealed key file), made before any work: scrypt allocates 128 * r * N bytes
    and 128 * r * p more, so a bound on N alone, or on N * r * p, still let a crafted file
    ask for gigabytes (N = 2, r = 2**22: 1 GiB each). N below what writers take
    (:data:`MIN_LOG_N`) is read: an older file, cheap to derive, saved again stronger."""
    if not all(type(v) is int for v in (n, r, p)) or (r, p) != (SCRYPT_R, SCRYPT_P):
        return None
    if n < 2 or n & (n - 1) or n.bit_length() - 1 > max_log_n:
        return None
    return n.bit_length() - 1


def work_factor(stanza: Stanza, max_log_n: int = MAX_LOG_N) -> int:
    """log2(N) of a ``scrypt`` stanza, checked (malformed: :class:`KeysetError`; above
    ``max_log_n``: :class:`KeyUnavailable`) without deriving anything."""
    if stanza.kind != STANZA_KIND or len(stanza.recipient_id) != SALT_SIZE + 1:
        raise KeysetError("malformed passphrase stanza")
    log_n = stanza.recipient_id[SALT_SIZE]
    if log_n == 0:  # N = 1: no writer makes it (scrypt refuses it), so not "too costly"
        raise KeysetError("malformed passphrase stanza: it asks for scrypt work factor 2**0, "
                          "which no writer uses (the file was damaged or crafted)")
    if readable_log_n(1 << log_n, max_log_n=max_log_n) is None:
        raise KeyUnavailable(f"the file asks for scrypt work factor 2**{log_n}, above the limit "
                             f"2**{max_log_n}: refused before any work (a crafted file could "
                             f"make gpucrypt spin)")
    return log_n


def check_log_n(log_n: int) -> int:
    """``log_n`` if a writer may use 2**log_n as scrypt's N (:data:`MIN_LOG_N` to
    :data:`MAX_LOG_N`), else ``ValueError``: below, a passphrase is cheap to guess; above,
    readers refuse the file unless told otherwise."""
    if not MIN_LOG_N <= log_n <= MAX_LOG_N:
        raise ValueError(f"scrypt work factor 2**{log_n} is outside what gpucrypt writes "
                         f"(2**{MIN_LOG_N} to 2**{MAX_LOG_N}: below, a passphrase is cheap to "
                         f"guess; above, readers refuse the file): use the default "
                         f"2**{DEFAULT_LOG_N}")
    return log_n


class Passphrase(HoldsKeyMaterial):
    """A passphrase, as a recipient (``seal_envelope(dek, Passphrase(p))``: a ``scrypt``
    stanza with a fresh salt and work factor ``2**log_n``) and as an identity
    (``open_envelope(env, Passphrase(p))``: refuses stanzas asking for more than
    ``2**max_log_n``). ``log_n`` is :data:`MIN_LOG_N` to :data:`MAX_LOG_N`
    (:func:`check_log_n`). Text is sealed in Unicode NFC, and opens files sealed with
    it as given too (:func:`forms`). Never prints, pickles or copies the passphrase."""

    _travel_instead = ("name where the passphrase is instead (an environment variable, read "
                       "in each process: KeyReferences(passphrase_env=VAR), or a file: key "
                       "reference's passphrase-source), and make the Passphrase there")

    def __init__(self, passphrase: str | bytes, *, log_n: int = DEFAULT_LOG_N,
                 max_log_n: int = MAX_LOG_N):
        if not 1 <= int(max_log_n) <= 63:
            raise ValueError("max_log_n must be 1 to 63")
        self._secrets = forms(passphrase)  # [0] seals; all open
        self.log_n, self.max_log_n = check_log_n(int(log_n)), int(max_log_n)

    def __repr__(self) -> str:
        return f"Passphrase(log_n={self.log_n})"

    __str__ = __repr__

    def sealing_form(self) -> "Passphrase":
        """This passphrase in the one form it seals with, without those that only open
        (:func:`forms`): whether a file opens under it tells whether this passphrase
        sealed it, not an earlier reading of it (a passphrase file's)."""
        return Passphrase(self._secrets[0], log_n=self.log_n, max_log_n=self.max_log_n)

    @staticmethod
    def _key(secret: bytes, salt: bytes, log_n: int) -> bytes:
        return Scrypt(salt=SALT_LABEL + salt, length=32, n=2 ** log_n, r=SCRYPT_R,
                      p=SCRYPT_P).derive(secret)

    def wrap(self, dek: bytes, *, _salt: bytes | None = None) -> Stanza:
        """The ``scrypt`` stanza wrapping ``dek`` (``_salt``: known-answer tests only)."""
        import os

        dek = bytes_arg(dek, "dek")  # checked before scrypt's work
        salt = os.urandom(SALT_SIZE) if _salt is None else bytes_arg(_salt, "_salt")
        if len(salt) != SALT_SIZE:
            raise ValueError(f"the salt must be {SALT_SIZE} bytes")
        body = ChaCha20Poly1305(self._key(self._secrets[0], salt, self.log_n)).encrypt(_NONCE, dek, None)
        return Stanza(STANZA_KIND, salt + bytes([self.log_n]), body)

    def unwrap(self, stanza: Stanza) -> bytes:
        """The data key in ``stanza``; :class:`KeyUnavailable` before any work when it asks
        for more than ``2**max_log_n``, :class:`KeysetError` for a wrong passphrase (or an
        altered stanza) once each of the passphrase's :func:`forms` has failed."""
        from cryptography.exceptions import InvalidTag

        log_n = work_factor(stanza, self.max_log_n)
        # The NFC form first (what sealing has used since passphrases were normalised);
        # then, only when the passphrase has other forms (text not in NFC, a passphrase
        # file's earlier reading: forms()) and the first failed, each of those, for files
        # sealed before: one more scrypt each, paid by those passphrases alone.
        for secret in self._secrets:
            key = self._key(secret, stanza.recipient_id[:SALT_SIZE], log_n)
            try:
                return ChaCha20Poly1305(key).decrypt(_NONCE, stanza.body, None)
            except InvalidTag:
                continue
        raise KeysetError("wrong passphrase, or the file was altered")
