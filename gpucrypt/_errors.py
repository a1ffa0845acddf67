"""Key-management errors, on the ground floor so that both :mod:`gpucrypt.keys` (which
raises them) and :mod:`gpucrypt.audit` (which logs their messages) can import them
without importing each other.

Users reach them as ``gpucrypt.keys.KeyManagementError`` and so on: the same class
objects. This module imports nothing from gpucrypt.
"""
from __future__ import annotations

__all__ = ["KeyManagementError", "KeysetError", "KeyNotFound", "KeyUnavailable",
           "NoMatchingRecipient", "EnvelopeError", "KeyProviderError"]


class KeyManagementError(Exception):
    """Base of gpucrypt's key errors. Messages name key ids and files, never secrets."""


class KeysetError(KeyManagementError, ValueError):
    """A keyset, identity or recipient file is malformed, or its passphrase/KEK is wrong."""


class KeyNotFound(KeyManagementError, LookupError):
    """No key with this id."""


class KeyUnavailable(KeyManagementError):
    """The key exists but may not be used: disabled, or destroyed."""


class NoMatchingRecipient(KeyManagementError):
    """None of the given identities opens any stanza of the envelope."""


class EnvelopeError(KeyManagementError, ValueError):
    """The envelope is malformed, or a data key cannot be wrapped as asked."""


class KeyProviderError(KeyManagementError):
    """A key provider (a PKCS#11 token, a cloud KMS) could not be used at all: its module
    or endpoint is unreachable, the login failed, credentials are missing. Unlike
    :class:`KeyUnavailable` it says nothing about the key itself, so opening an envelope
    stops at it instead of trying the next stanza."""
