"""Key reference URIs: parsing and the canonical forms that envelopes record.

Three schemes (docs/KEYS.md, "Key references"):

- ``pkcs11:token=T;object=O[;type=secret-key|private|public][;id=%01%02]
  [?module-path=/path/lib.so&pin-source=env:VAR|file:/path&x-wrap=aes-gcm]`` (RFC 7512:
  path attributes separated by ``;``, query attributes by ``&``, values percent-encoded);
- ``awskms://arn:aws:kms:REGION:ACCOUNT:key/ID[?endpoint=URL&profile=NAME]``, or
  ``awskms:///alias/NAME?region=REGION[&endpoint=URL&profile=NAME]`` (also a bare key id);
- ``file:///path/to/keyset.json[?passphrase-source=env:VAR|file:/path]``.

A URI names a key and says how to reach it; it never holds a secret: ``pin-value`` and
anything named like it (``x-pin-value``) are refused, as are a ``&`` in a ``pkcs11:`` path
(a query typed without its ``?``) and an ``endpoint`` holding ``user:password@``, because
URIs land in shell history, process lists, task graphs and logs. PINs and passphrases come
from a *source* (an environment variable or a file) read by whichever process resolves
the reference.

This module only parses; it imports nothing from gpucrypt but the errors.
"""
from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, unquote_to_bytes, urlsplit

from .._errors import KeysetError

__all__ = ["KeyUri", "parse_key_uri", "pkcs11_id_text", "check_secret_source", "check_absolute",
           "check_kms_endpoint", "SCHEMES"]

SCHEMES = ("pkcs11", "awskms", "file")

#: RFC 7512 path attributes gpucrypt reads (others are refused, so a typo cannot widen a match)
_PKCS11_PATH = ("token", "object", "type", "id", "serial", "manufacturer", "model")
_PKCS11_QUERY = ("module-path", "pin-source")
#: ``x-`` (vendor) query attributes that change what the key does, not just how it is
#: reached: the canonical URI keeps them, so a pickled or copied reference wraps as the
#: original does, and two references that wrap differently are not equal. Other ``x-``
#: attributes, which gpucrypt does not read, are dropped (they could hold anything).
_PKCS11_BEHAVIOUR = {"x-wrap": ("aes-gcm",)}
_PKCS11_TYPES = ("secret-key", "private", "public")
_AWS_QUERY = ("region", "endpoint", "profile")
_FILE_QUERY = ("passphrase-source",)
_SECRET_ATTRIBUTES = ("pin-value", "pin", "passphrase", "password", "secret", "key")
#: one ``name=value`` attribute of a URI as written (the name still percent-encoded)
_ATTRIBUTE = re.compile(r"([^;&?/:=]*)=([^;&]*)")
#: the forms a ``*-source`` attribute may take (a PIN or passphrase is read from there)
_SOURCE_FORMS = ("env:", "file:", "/")

#: a ``user:password@`` typed into an ``awskms:`` or ``file:`` reference
#: (``awskms://AKIA...:SECRET@arn:...``, ``file://u:pw@localhost/...``): no reference reads
#: one, so it is refused, never quoted. Masked from the scheme to the last ``@`` anywhere
#: (an AWS secret key may hold ``/``, a password ``?`` or ``#``); an alias or a path
#: holding ``@`` is masked with it, which hides nothing secret
_USERINFO = re.compile(r"^(\s*(?:awskms|file):(?://)?).*@", re.IGNORECASE | re.DOTALL)
_ARN = re.compile(r"arn:aws[a-z-]*:kms:([a-z0-9-]+):\d{12}:(key|alias)/[A-Za-z0-9/_+=.@:-]+")


def _bad(uri: str, why: str) -> KeysetError:
    return KeysetError(f"key reference {_shown(uri)!r}: {why}")


def _shown(uri: str) -> str:
    """The URI as errors may quote it: the part before any query (a malformed query could
    hold something secret-looking the user pasted by mistake), secret attributes masked.
    A name is judged once percent-decoded (``pin%2Dvalue`` is ``pin-value``), and by each
    of its words (``x-pin``), so that no spelling of a secret's name gets its value shown;
    a ``user:password@`` in an ``awskms:`` or ``file:`` reference is masked whole."""
    def mask(match: re.Match) -> str:
        return f"{match.group(1)}=***" if _named_secret(match.group(1)) else match.group(0)

    return _ATTRIBUTE.sub(mask, _USERINFO.sub(r"\1***@", uri).split("?", 1)[0])


def _named_secret(name: str) -> bool:
    """Whether an attribute's name (as written: percent-encoded, any case) says it holds a
    secret: one of its words, once decoded, is ``pin``, ``passphrase``, ``password``,
    ``secret`` or ``key`` (``pin%2Dvalue``, ``x-pin-value``, ``X_Passphrase``)."""
    words = re.split(r"[-_.\s]", unquote(name).lower())
    return any(word in _SECRET_ATTRIBUTES for word in words)


def check_secret_source(name: str, source: str) -> None:
    """Refuse a ``*-source`` value (``name``) that is not ``env:VAR``, ``file:/path`` or an
    absolute path, without quoting it: what is there is most likely the secret itself,
    pasted where its source belongs."""
    if not source.startswith(_SOURCE_FORMS):
        raise KeysetError(f"{name} must be env:VAR, file:/path or an absolute path (the value "
                          f"given is not shown: it may be the secret itself; put the secret in "
                          f"a file or an environment variable and name that)")


def check_absolute(attribute: str, path: str, example: str) -> None:
    """KeysetError for ``attribute`` naming a relative ``path`` (``example``: the form to
    give instead). A reference is resolved in whichever process uses it (a Ray worker, a
    DCP rank), from whatever folder that process is in: a relative name there reads another
    file, or, for a module, loads and runs another library. The path is not quoted (a
    ``*-source`` value may be the secret itself)."""
    if not os.path.isabs(path):
        raise KeysetError(f"{attribute} names a relative path: give an absolute one ({example}): "
                          f"a reference is resolved in whichever process and folder uses it")


#: hosts an ``awskms`` endpoint may reach over plain http without resolving them: this
#: machine (a local emulator: moto, localstack)
_LOOPBACK_NAMES = ("localhost",)
#: set to 1 (in every process that uses the reference), plain http to any host is allowed:
#: an emulator on a private network (a compose service name), deliberately
ALLOW_HTTP_ENV = "GPUCRYPT_KMS_ALLOW_HTTP"


def check_kms_endpoint(endpoint: str) -> None:
    """KeysetError unless ``endpoint`` is ``https://HOST[:PORT][/PATH]``, or ``http://`` to
    the loopback (``localhost``, ``127.0.0.0/8``, ``::1``, ``::ffff:127.x.x.x``, or a name
    that resolves to those only, as ``localhost.localstack.cloud`` does), or to any host
    where ``$GPUCRYPT_KMS_ALLOW_HTTP`` is 1; with no ``user:password@``. KMS Encrypt and
    Decrypt carry the data key itself: over http to another host it crosses the network
    unencrypted (SigV4 signs requests, it does not encrypt them). Credentials in the URL
    would be copied into errors and audit records, and KMS reads none there. The endpoint
    is not quoted, for that reason."""
    parts = urlsplit(endpoint)
    try:
        host = parts.hostname
    except ValueError:  # an unbalanced [ in the host
        host = None
    if parts.scheme not in ("https", "http") or not host:
        raise KeysetError("endpoint must be a URL: https://HOST[:PORT] (http:// only to the "
                          "loopback, for a local emulator)")
    if "@" in parts.netloc:
        raise KeysetError("endpoint holds a user name or password (user:password@host), which "
                          "errors and audit records would show (endpoint not shown): remove "
                          "it; AWS credentials come from boto3's chain (environment, "
                          "AWS_PROFILE or profile=, a role), never from the URI")
    loopback = True if parts.scheme != "http" or os.environ.get(ALLOW_HTTP_ENV) == "1" \
        else _is_loopback(host)
    if not loopback:
        unresolved = " (its name did not resolve here)" if loopback is None else ""
        raise KeysetError(f"endpoint is plain http:// to a host not known to be this machine"
                          f"{unresolved} (not localhost, 127.0.0.0/8 or [::1], nor a name "
                          f"resolving to those only): KMS Encrypt and Decrypt carry the data "
                          f"key: use https, or set {ALLOW_HTTP_ENV}=1 for a local emulator "
                          f"(the data key crosses the network in the clear)")


def _is_loopback(host: str) -> bool | None:
    """Whether ``host`` (an address, or a name: resolved, all its addresses then) is the
    loopback; None for a name that did not resolve."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return _loopback_address(host)
    except ValueError:  # a name
        return _name_is_loopback(host.lower())


@functools.lru_cache(maxsize=64)
def _name_is_loopback(name: str) -> bool | None:
    """:func:`_is_loopback` of a host name, looked up once per process: references are
    parsed again in every Ray task and DCP rank that unpickles one, and a resolver that
    does not answer takes its whole timeout (10 s and more) each time."""
    try:
        found = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):  # not resolved (gaierror), or not a name IDNA encodes
        return None
    try:
        return bool(found) and all(_loopback_address(info[4][0]) for info in found)
    except ValueError:  # an address family ipaddress does not read
        return False


def _loopback_address(text: str) -> bool:
    """Whether the IP address ``text`` is the loopback (an IPv4-mapped one included); a
    ValueError where ``text`` is no address."""
    address = ipaddress.ip_address(text)
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


@dataclass(frozen=True)
class KeyUri:
    """A parsed key reference: ``scheme``, ``path`` attributes (what the key is) and
    ``query`` attributes (how to reach it). Values are decoded text."""

    scheme: str
    path: dict = field(default_factory=dict)
    query: dict = field(default_factory=dict)

    def canonical(self) -> str:
        """The URI rebuilt from its parts, attributes in a fixed order: every attribute
        gpucrypt reads (``x-wrap`` included), no other ``x-`` attribute."""
        if self.scheme == "pkcs11":
            text = "pkcs11:" + ";".join(f"{k}={v if k == 'id' else _pct(v)}"  # id: kept encoded
                                        for k, v in self._ordered(_PKCS11_PATH))
            extra = [(k, self.query[k]) for k in (*_PKCS11_QUERY, *_PKCS11_BEHAVIOUR)
                     if k in self.query]
        elif self.scheme == "awskms":
            key = self.path["key"]
            text = "awskms://" + (key if key.startswith("arn:") else "/" + key)
            extra = [(k, self.query[k]) for k in _AWS_QUERY if k in self.query]
        else:
            text = "file://" + quote(self.path["path"])
            extra = [(k, self.query[k]) for k in _FILE_QUERY if k in self.query]
        if extra:
            text += "?" + "&".join(f"{k}={_pct(v, safe='/:')}" for k, v in extra)
        return text

    def _ordered(self, names) -> list:
        return [(k, self.path[k]) for k in names if k in self.path]


def pkcs11_id_text(raw: bytes) -> str:
    """An RFC 7512 ``id`` value: every byte percent-encoded (``%01%A2``)."""
    return "".join(f"%{b:02X}" for b in raw)


def _pct(value: str, safe: str = "") -> str:
    return quote(value, safe=safe + "-._~")


def parse_key_uri(uri: str) -> KeyUri:
    """Parse ``uri``; :class:`~gpucrypt.keys.KeysetError` (a ``ValueError``) saying what is
    wrong and what a good one looks like."""
    if not isinstance(uri, str):
        raise TypeError(f"a key reference is a str, not {type(uri).__name__}")
    scheme, colon, _ = uri.partition(":")
    if not colon or scheme.lower() not in SCHEMES:
        raise KeysetError(f"key reference {_shown(uri)!r}: unknown scheme; use pkcs11:token=...;"
                        f"object=..., awskms://arn:... (or awskms:///alias/NAME?region=...), "
                        f"or file:///path/keyset.json")
    scheme = scheme.lower()
    rest = uri[len(scheme) + 1:]
    body, _, query_text = rest.partition("?")
    query = _attributes(uri, query_text, "&", query=True) if query_text else {}
    for name, value in query.items():
        if name.endswith("-source"):  # its value is checked to be a source, not a secret
            try:
                check_secret_source(name, value)
            except KeysetError as exc:
                raise _bad(uri, str(exc)) from None
        elif _named_secret(name):  # x- ones too, which would be accepted, then dropped
            shown = repr(name) if name in _KNOWN_QUERY else f"named like a secret ({_NOT_SHOWN})"
            raise _bad(uri, _secret_in_uri(f"query attribute {shown}"))
    if scheme == "pkcs11":
        return _pkcs11(uri, body, query)
    if scheme == "awskms":
        return _awskms(uri, body, query)
    return _file(uri, body, query)


#: query attribute names errors may quote: the ones gpucrypt knows, and nothing else of
#: a query (_shown leaves the query out: an item there may be a secret pasted by mistake,
#: "&Tr0ub4dor&3" or a base64 "&AKIA...==", which reads as a name)
_KNOWN_QUERY = frozenset((*_PKCS11_QUERY, *_PKCS11_BEHAVIOUR, *_AWS_QUERY, *_FILE_QUERY,
                          *_SECRET_ATTRIBUTES))
_NOT_SHOWN = "not shown: it may be a secret pasted by mistake"


def _secret_in_uri(what: str) -> str:
    return (f"{what} would put a secret in the URI; use pin-source=env:VAR or "
            f"pin-source=file:/path (passphrase-source= for file: references)")


def _attributes(uri: str, text: str, separator: str, encoded: tuple = (),
                query: bool = False) -> dict:
    """``text``'s ``name=value`` items; ``query``: they are a URI's query, whose items
    errors quote only by a name gpucrypt knows (:data:`_KNOWN_QUERY`)."""
    out: dict = {}
    for item in text.split(separator):
        if not item:
            continue
        name, eq, value = item.partition("=")
        name = name.strip().lower()
        if not eq or not name:
            if query:
                raise _bad(uri, f"a query item has no name=value form ({_NOT_SHOWN}); write "
                                f"name=value, separated by &")
            raise _bad(uri, f"attribute {name or item!r} has no value (write name=value)")
        if name in out:
            shown = repr(name) if not query or name in _KNOWN_QUERY else f"({_NOT_SHOWN})"
            raise _bad(uri, f"{'query ' if query else ''}attribute {shown} is given twice")
        out[name] = value if name in encoded else unquote(value)
    return out


def _only(uri: str, attrs: dict, allowed: tuple, where: str) -> None:
    for name in attrs:
        if name not in allowed and not name.startswith("x-"):
            shown = repr(name) if where != "query" or name in _KNOWN_QUERY else f"({_NOT_SHOWN})"
            raise _bad(uri, f"unknown {where} attribute {shown} (known: {', '.join(allowed)})")


def _pkcs11(uri: str, body: str, query: dict) -> KeyUri:
    if "&" in body:
        # RFC 7512 has no bare & in a path: this is a query typed with & for ?, whose items
        # would become part of a label (shown in errors, repr and audit records). Nothing
        # after the & is quoted: it may be a pin-value
        raise KeysetError(f"key reference {_shown(uri.split('&', 1)[0])!r}: a '&' in the path "
                          f"(what follows it is not shown: it may be a secret): query "
                          f"attributes follow a '?' (pkcs11:token=T;object=O?pin-source="
                          f"env:VAR), and a '&' in a label is written %26")
    path = _attributes(uri, body, ";", encoded=("id",))
    _only(uri, path, _PKCS11_PATH, "path")
    for name in path:  # only x- names are left to catch: _only refused the others
        if _named_secret(name):
            raise _bad(uri, _secret_in_uri(f"path attribute {name!r}"))
    if "id" in path:  # RFC 7512: an id is bytes, percent-encoded; kept so, in one spelling
        path["id"] = pkcs11_id_text(unquote_to_bytes(path["id"]))
    _only(uri, query, _PKCS11_QUERY, "query")
    if not path.get("token") or not (path.get("object") or path.get("id")):
        raise _bad(uri, "name the token and the key: pkcs11:token=LABEL;object=KEY_LABEL")
    if "type" in path and path["type"] not in _PKCS11_TYPES:
        raise _bad(uri, f"type must be one of {', '.join(_PKCS11_TYPES)}")
    if "module-path" in query:  # said here, in the driver, not on a worker
        try:
            check_absolute("module-path", query["module-path"], "module-path=/path/to/module.so")
        except KeysetError as exc:
            raise _bad(uri, str(exc)) from None
    for name, values in _PKCS11_BEHAVIOUR.items():  # said here, in the driver, not on a worker
        if name in query and query[name] not in values:
            raise _bad(uri, f"{name} may only be {' or '.join(values)}")
    return KeyUri("pkcs11", path, query)


def _awskms(uri: str, body: str, query: dict) -> KeyUri:
    _only(uri, query, _AWS_QUERY, "query")
    if "endpoint" in query:
        try:
            check_kms_endpoint(query["endpoint"])
        except KeysetError as exc:
            raise _bad(uri, str(exc)) from None
    if not body.startswith("//"):
        raise _bad(uri, "write awskms://arn:aws:kms:... or awskms:///alias/NAME?region=...")
    key = unquote(body[2:])
    if key.startswith("/"):
        key = key[1:]
    if not key:
        raise _bad(uri, "no key: write awskms://arn:aws:kms:... or awskms:///alias/NAME")
    if key.startswith("arn:"):
        match = _ARN.fullmatch(key)
        if match is None:
            raise _bad(uri, "not a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)")
        if query.get("region", match.group(1)) != match.group(1):
            raise _bad(uri, "region= differs from the ARN's region")
    elif not re.fullmatch(r"(alias/[A-Za-z0-9/_-]+|[0-9a-fA-F-]{36}|mrk-[0-9a-f]{32})", key):
        raise _bad(uri, "the key must be an ARN, alias/NAME or a key id")
    return KeyUri("awskms", {"key": key}, query)


def _file(uri: str, body: str, query: dict) -> KeyUri:
    _only(uri, query, _FILE_QUERY, "query")
    if body.startswith("//"):
        host, slash, rest = body[2:].partition("/")
        if host not in ("", "localhost"):
            raise _bad(uri, "only local files: file:///absolute/path")
        path = "/" + rest if slash else ""
    else:
        path = body
    path = unquote(path)
    if not path.startswith("/"):
        raise _bad(uri, "a file: reference needs an absolute path (file:///path/keyset.json)")
    return KeyUri("file", {"path": path}, query)
