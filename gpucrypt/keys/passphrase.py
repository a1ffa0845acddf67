"""Passphrase-encrypted files: the data key wrapped under a key that scrypt derives from
a passphrase (the envelope's ``scrypt`` stanza), as ``age -p`` does.

Stanza (docs/KEYS.md, "Passphrases"): recipient id = 16-byte random salt || one byte
log2(N); body = ChaCha20-Poly1305(key, nonce = 12 zero bytes, no associated data) of the
data key, where key = scrypt(passphrase UTF-8, salt = ``b"gpucrypt-passphrase-v1\\x00"``
|| salt, N, r = 8, p = 1, 32 bytes). The key encrypts one message only (the salt is
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

from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .._errors import KeysetError, KeyUnavailable
from .._buffers import bytes_arg
from ._envelope import Stanza
from ._material import HoldsKeyMaterial

__all__ = ["Passphrase", "DEFAULT_LOG_N", "MIN_LOG_N", "MAX_LOG_N", "STANZA_KIND", "work_factor",
           "check_log_n"]

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


def _passphrase_bytes(passphrase: Any) -> bytes:
    passphrase = encode(passphrase)
    if not passphrase:
        raise ValueError("empty passphrase")
    return passphrase


def work_factor(stanza: Stanza, max_log_n: int = MAX_LOG_N) -> int:
    """log2(N) of a ``scrypt`` stanza, checked (malformed: :class:`KeysetError`; above
    ``max_log_n``: :class:`KeyUnavailable`) without deriving anything."""
    if stanza.kind != STANZA_KIND or len(stanza.recipient_id) != SALT_SIZE + 1:
        raise KeysetError("malformed passphrase stanza")
    log_n = stanza.recipient_id[SALT_SIZE]
    if not 1 <= log_n <= max_log_n:
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
    (:func:`check_log_n`). Never prints, pickles or copies the passphrase."""

    _travel_instead = ("name where the passphrase is instead (an environment variable, read "
                       "in each process: KeyReferences(passphrase_env=VAR), or a file: key "
                       "reference's passphrase-source), and make the Passphrase there")

    def __init__(self, passphrase: str | bytes, *, log_n: int = DEFAULT_LOG_N,
                 max_log_n: int = MAX_LOG_N):
        if not 1 <= int(max_log_n) <= 63:
            raise ValueError("max_log_n must be 1 to 63")
        self._secret = _passphrase_bytes(passphrase)
        self.log_n, self.max_log_n = check_log_n(int(log_n)), int(max_log_n)

    def __repr__(self) -> str:
        return f"Passphrase(log_n={self.log_n})"

    __str__ = __repr__

    def _key(self, salt: bytes, log_n: int) -> bytes:
        return Scrypt(salt=SALT_LABEL + salt, length=32, n=2 ** log_n, r=SCRYPT_R,
                      p=SCRYPT_P).derive(self._secret)

    def wrap(self, dek: bytes, *, _salt: bytes | None = None) -> Stanza:
        """The ``scrypt`` stanza wrapping ``dek`` (``_salt``: known-answer tests only)."""
        import os

        dek = bytes_arg(dek, "dek")  # checked before scrypt's work
        salt = os.urandom(SALT_SIZE) if _salt is None else bytes_arg(_salt, "_salt")
        if len(salt) != SALT_SIZE:
            raise ValueError(f"the salt must be {SALT_SIZE} bytes")
        body = ChaCha20Poly1305(self._key(salt, self.log_n)).encrypt(_NONCE, dek, None)
        return Stanza(STANZA_KIND, salt + bytes([self.log_n]), body)

    def unwrap(self, stanza: Stanza) -> bytes:
        """The data key in ``stanza``; :class:`KeyUnavailable` before any work when it asks
        for more than ``2**max_log_n``, :class:`KeysetError` for a wrong passphrase (or an
        altered stanza)."""
        from cryptography.exceptions import InvalidTag

        log_n = work_factor(stanza, self.max_log_n)
        key = self._key(stanza.recipient_id[:SALT_SIZE], log_n)
        try:
            return ChaCha20Poly1305(key).decrypt(_NONCE, stanza.body, None)
        except InvalidTag:
            raise KeysetError("wrong passphrase, or the file was altered") from None
