"""AWS KMS key-encryption keys, through ``boto3`` (``pip install 'gpucrypt[aws]'``).

Wrapping is KMS ``Encrypt`` of the data key under a symmetric KMS key, unwrapping is
``Decrypt``; both carry the binding context (:func:`gpucrypt.keys.references.file_context`)
as the **encryption context**, so KMS refuses a wrapped key moved into another file's
header, and CloudTrail records which file each ``Decrypt`` was for. The stanza id is
``awskms://`` + the key's ARN (as ``Encrypt`` reports it), the body KMS's
``CiphertextBlob``. The data key is made locally (like every other stanza's), so one
file can be wrapped for KMS and other recipients at once; ``GenerateDataKey`` is not used.

Before each call gpucrypt asks ``DescribeKey`` for the key's state and refuses a key
that is not ``Enabled`` with one line saying so (KMS would refuse too, with
``DisabledException``; the check also covers emulators that do not). A role without
``kms:DescribeKey`` skips the check. Credentials and region come from boto3's usual
chain (environment, profile, instance or OIDC role); the URI may name ``region``,
``profile`` and ``endpoint`` (a VPC endpoint, or a local emulator): ``https://``, or plain
``http://`` to the loopback only unless ``$GPUCRYPT_KMS_ALLOW_HTTP`` is 1 (an emulator:
``Encrypt`` and ``Decrypt`` carry the data key), and no ``user:password@`` (see
:func:`gpucrypt.keys._uri.check_kms_endpoint`). The endpoint the client was made with is
checked the same way, wherever boto3 took it from (``AWS_ENDPOINT_URL_KMS``,
``AWS_ENDPOINT_URL``, ``endpoint_url`` in the profile).

Every request goes to the configured region and names the configured key (its ARN, alias
or key id), never a region or key taken from a stanza: a file's stanza ids are written by
whoever wrote the file, and a ``Decrypt`` sent where a stanza says would be made with the
reader's credentials on a key of the writer's choosing (a confused deputy: an attacker's
file, under the attacker's key, would open). KMS refuses a ``CiphertextBlob`` made under
another key than the one ``Decrypt`` names, and the key it reports having used must be
the stanza's.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from typing import Any, Iterator, Mapping

from .._errors import KeyNotFound, KeyProviderError, KeysetError, KeyUnavailable
from ._document import printable_text
from ._uri import _ARN, KeyUri, check_kms_endpoint

try:
    import boto3
    import botocore.config
    import botocore.exceptions as _bce
except ImportError as _exc:  # the caller (KeyReference) turns this into an install hint
    raise ImportError("boto3 is not installed: pip install 'gpucrypt[aws]'", name="boto3") from _exc

__all__ = ["AwsKmsKey", "STANZA_PREFIX"]

STANZA_PREFIX = "awskms://"

_CONFIG = botocore.config.Config(retries={"max_attempts": 2, "mode": "standard"},
                                 connect_timeout=5, read_timeout=30)
_UNREACHABLE = (_bce.EndpointConnectionError, _bce.ConnectTimeoutError, _bce.ReadTimeoutError,
                _bce.ConnectionClosedError)


_clients_lock = threading.Lock()
_clients: dict = {}  # (profile, region, endpoint, pid) -> boto3 client (thread-safe; ~0.3 s to make)


def _new_lock_in_child() -> None:
    # a fork while another thread holds the lock (making a client) would leave the
    # child's copy held for ever: no thread of the child will release it
    global _clients_lock
    _clients_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)

#: how long a DescribeKey answer (the key's ARN and state) is taken as current: long enough
#: that one open (owns(), then unwrap()) asks once, short enough that a key disabled since
#: is caught by the next file
_STATE_TTL = 5.0


def _client(profile: str | None, region: str | None, endpoint: str | None) -> Any:
    """One boto3 KMS client per profile, region and endpoint in this process. The endpoint
    it was made with (``client.meta.endpoint_url``) is checked as a URI's ``endpoint`` is
    (:func:`check_kms_endpoint`): boto3 also takes one from ``AWS_ENDPOINT_URL_KMS``,
    ``AWS_ENDPOINT_URL`` or the profile's ``endpoint_url``, and plain http there would send
    the data key in the clear as well. KeyProviderError for a refused one (not kept)."""
    slot = (profile, region, endpoint, os.getpid())
    with _clients_lock:
        if slot not in _clients:
            session = boto3.session.Session(profile_name=profile)
            client = session.client("kms", region_name=region, endpoint_url=endpoint,
                                    config=_CONFIG)
            try:
                check_kms_endpoint(client.meta.endpoint_url)
            except KeysetError as exc:
                where = ("the endpoint" if endpoint else
                         "the endpoint boto3 was configured with (AWS_ENDPOINT_URL_KMS, "
                         "AWS_ENDPOINT_URL or endpoint_url in the profile)")
                raise KeyProviderError(f"AWS KMS: refused {where}: {exc}") from None
            _clients[slot] = client
        return _clients[slot]


def _region_of(arn: str) -> str:
    """The region of a KMS key ARN; KeyNotFound for anything else (a stanza id from a
    damaged or forged file: no KMS key of ours, and no region to ask)."""
    match = _ARN.fullmatch(arn)
    if match is None:
        raise KeyNotFound(f"{arn[:100]!r} is not an AWS KMS key ARN "
                          f"(arn:aws:kms:REGION:ACCOUNT:key/ID)")
    return match.group(1)


class AwsKmsKey:
    """A symmetric AWS KMS key: ``key`` is an ARN, ``alias/NAME`` (or an alias ARN) or a key id.

    ``AwsKmsKey("alias/models", region="eu-west-1")``, or from a URI through
    :class:`gpucrypt.keys.KeyReference`. The boto3 client is made on first use.

    Which ``key-ref`` stanzas it owns (ids are ``awskms://`` + a key ARN, as ``wrap``
    records them): named by a key ARN, the stanza of that ARN only. Named by an alias or a
    key id, a stanza whose ARN is in the configured region (the alias ARN's account, the
    key id's key) and, when ``DescribeKey`` is allowed, the ARN the alias names now; when
    it is denied, any such ARN, and ``Decrypt`` (of the configured alias or id, in the
    configured region) tells: it refuses another key's ciphertext, and a key other than
    the stanza's reported as used is refused here.
    """

    provider = "awskms"

    def __init__(self, key: str, *, region: str | None = None, endpoint: str | None = None,
                 profile: str | None = None):
        if key.startswith("arn:") and _ARN.fullmatch(key) is None:
            raise KeysetError(f"{key!r} is not an AWS KMS key ARN "
                              f"(arn:aws:kms:REGION:ACCOUNT:key/ID)")
        if endpoint is not None:  # a URI's is checked when parsed; this is for the API
            check_kms_endpoint(endpoint)
        self.key, self.endpoint, self.profile = key, endpoint, profile
        self.region = _region_of(key) if key.startswith("arn:") else region
        self._exact = key.startswith("arn:") and ":key/" in key  # names one key, for ever
        # DescribeKey of self.key: (time.monotonic() of the answer, its KeyMetadata); and
        # whether the role may not call it (then not asked again by this object)
        self._described: tuple[float, dict] | None = None
        self._describe_denied = False

    @classmethod
    def from_uri(cls, uri: KeyUri) -> "AwsKmsKey":
        return cls(uri.path["key"], region=uri.query.get("region"),
                   endpoint=uri.query.get("endpoint"), profile=uri.query.get("profile"))

    def __repr__(self) -> str:
        return f"AwsKmsKey({self.key!r})"

    # --- the client and its errors
    def _client(self) -> Any:
        """The client for the configured region: the only one this key sends anything to."""
        with self._errors("connect", self.key):
            return _client(self.profile, self.region, self.endpoint)

    def _where(self) -> str:
        return self.endpoint or f"region {self.region or '(default)'}"

    @contextlib.contextmanager
    def _errors(self, operation: str, key: str) -> Iterator[None]:
        """Turn boto3's errors into gpucrypt's, each one line naming the key and what to do."""
        try:
            yield
        except _UNREACHABLE as exc:
            raise KeyProviderError(f"AWS KMS at {self._where()} could not be reached ({exc}): "
                                   f"check the endpoint/region and the network") from None
        except (_bce.NoCredentialsError, _bce.PartialCredentialsError):
            raise KeyProviderError("AWS KMS: no AWS credentials found (set AWS_PROFILE, or "
                                   "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run with a "
                                   "role)") from None
        except _bce.NoRegionError:
            raise _NoRegion(f"AWS KMS key {key}: no region; add ?region=... to the key "
                            f"URI or set AWS_REGION") from None
        except _bce.ProfileNotFound:
            raise KeyProviderError(f"AWS KMS: the profile {self.profile!r} is not "
                                   f"configured") from None
        except _bce.ClientError as exc:
            raise _client_error(exc, operation, key) from None
        except _bce.BotoCoreError as exc:
            raise KeyProviderError(f"AWS KMS {operation} failed for {key}: "
                                   f"{type(exc).__name__}") from None

    def _describe(self) -> dict | None:
        """``DescribeKey`` of the configured key, in the configured region: its metadata
        (an answer younger than ``_STATE_TTL`` is reused), or None when the role may not
        call it (``AccessDeniedException``, remembered: not asked again)."""
        if self._describe_denied:
            return None
        if self._described is not None and time.monotonic() - self._described[0] < _STATE_TTL:
            return self._described[1]
        with self._errors("DescribeKey", self.key):
            try:
                meta = self._client().describe_key(KeyId=self.key)["KeyMetadata"]
            except _bce.ClientError as exc:
                if _code(exc) != "AccessDeniedException":
                    raise
                self._describe_denied = True
                return None
        self._described = (time.monotonic(), meta)
        return meta

    def _check_enabled(self) -> None:
        """KeyUnavailable unless the configured key is Enabled. Skipped when the caller may
        not DescribeKey."""
        meta = self._describe()
        if meta is None:
            return
        state = meta.get("KeyState", "Enabled")
        if state != "Enabled":
            raise KeyUnavailable(f"AWS KMS key {meta['Arn']} is {state.lower()}: enable it "
                                 f"(aws kms enable-key --key-id {meta['KeyId']}) to use it")

    def _region(self) -> str | None:
        """The configured region, else boto3's default (the client's). With neither, this
        key can open nothing: KeyUnavailable, which a reader notes (saying why) before it
        tries the other identities; any other failure (a profile not configured) is raised
        as it is."""
        if self.region:
            return self.region
        try:
            return self._client().meta.region_name
        except _NoRegion as exc:
            raise KeyUnavailable(str(exc)) from None

    # --- ExternalKey
    def wrap(self, dek: bytes, context: Mapping[str, str]) -> tuple[str, bytes]:
        client = self._client()
        self._check_enabled()
        with self._errors("Encrypt", self.key):
            answer = client.encrypt(KeyId=self.key, Plaintext=dek,
                                    EncryptionContext=dict(context))
        return STANZA_PREFIX + answer["KeyId"], bytes(answer["CiphertextBlob"])

    def owns(self, stanza_id: str) -> bool:
        arn = stanza_id[len(STANZA_PREFIX):]
        if not stanza_id.startswith(STANZA_PREFIX) or _ARN.fullmatch(arn) is None \
                or ":key/" not in arn:
            return False  # wrap() records key ARNs only: anything else is damaged, or not KMS's
        if self._exact:
            return arn == self.key
        # an alias or a bare key id: plain from the ids where they differ (another region,
        # account or key id), else as DescribeKey says (one call, reused; see _describe)
        _, _, _, region, account, resource = arn.split(":", 5)
        if region != self._region():
            return False  # an alias or key id names a key of its own region
        if self.key.startswith("arn:") and account != self.key.split(":", 5)[4]:
            return False  # an alias ARN names a key of its own account
        if not self.key.startswith(("arn:", "alias/")) and resource != "key/" + self.key:
            return False  # a key id is the end of its key's ARN
        try:
            meta = self._describe()
        except KeyUnavailable:
            return True  # refused for another reason than access: unwrap() says why
        return meta is None or meta["Arn"] == arn

    def unwrap(self, stanza_id: str, body: bytes, context: Mapping[str, str]) -> bytes:
        if not self.owns(stanza_id):
            raise KeyNotFound(f"{printable_text(stanza_id)} is not the AWS KMS key {self.key}")
        arn = stanza_id[len(STANZA_PREFIX):]
        self._check_enabled()
        with self._errors("Decrypt", self.key):
            answer = self._client().decrypt(CiphertextBlob=body, KeyId=self.key,
                                            EncryptionContext=dict(context))
        if answer.get("KeyId") != arn:
            raise KeyUnavailable(f"AWS KMS unwrapped the stanza of {printable_text(arn)} with "
                                 f"the key {answer.get('KeyId')}: the envelope names another key "
                                 f"than the one that wrapped it (altered or forged); not used")
        return bytes(answer["Plaintext"])


class _NoRegion(KeyProviderError):
    """No region in the key's URI, its profile or the environment."""


def _code(exc: Any) -> str:
    """A botocore ClientError's error code (``AccessDeniedException``, ...)."""
    return exc.response.get("Error", {}).get("Code", "")


def _client_error(exc: Any, operation: str, key: str) -> Exception:
    code = _code(exc)
    if code == "InvalidCiphertextException":
        return KeyUnavailable(f"AWS KMS refused to unwrap the data key under {key}: the encryption "
                              f"context does not match this file (the wrapped key was made for "
                              f"another file) or the wrapped key was altered")
    if code in ("DisabledException", "KMSInvalidStateException"):
        return KeyUnavailable(f"AWS KMS key {key} is disabled or pending deletion: enable it "
                              f"(aws kms enable-key) to use it")
    if code in ("NotFoundException", "IncorrectKeyException"):
        return KeyNotFound(f"AWS KMS has no key {key} usable for this ({code})")
    if code == "AccessDeniedException":
        return KeyUnavailable(f"AWS KMS denied {operation} on {key}: check the key policy and "
                              f"the role's permissions")
    if code in ("UnrecognizedClientException", "InvalidSignatureException",
                "ExpiredTokenException"):
        return KeyProviderError(f"AWS KMS rejected the credentials ({code}): refresh them")
    return KeyProviderError(f"AWS KMS {operation} failed for {key} ({code or 'error'})")
