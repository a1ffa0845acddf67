"""Loading known-answer vectors from the installed ``cryptography_vectors`` package.

The files are read where the package installed them, never copied into this
repository. Two layouts occur: NIST CAVP ``.rsp`` files (``[Keylen = 128]``
sections, ``Count = n`` records, a bare ``FAIL`` line for records that must not
verify) and OpenSSL/BoringSSL-style ``.txt`` files (``COUNT = n`` records,
``Result = CIPHERFINAL_ERROR`` for those that must not verify).
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Iterator

import cryptography_vectors


def vector_path(*parts: str) -> str:
    return os.path.join(os.path.dirname(cryptography_vectors.__file__), *parts)


def _records(lines: Iterator[str]) -> Iterator[dict]:
    section: dict[str, str] = {}
    record: dict | None = None
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            key, _, value = line[1:-1].partition("=")
            section[key.strip().lower()] = value.strip()
            continue
        if line.upper() == "FAIL":
            if record is not None:
                record["fail"] = True
            continue
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key, value = key.strip().lower(), value.strip()
        if key == "count":
            if record is not None:
                yield record
            record = {"section": dict(section), "fail": False}
        if record is None:
            continue
        if key == "result":
            record["fail"] = value.upper() != "OK" and value != ""
        else:
            record[key] = value
    if record is not None:
        yield record


@lru_cache(maxsize=None)
def load(*parts: str) -> tuple:
    """All records of one vector file, as dicts with lower-case keys and hex strings."""
    with open(vector_path(*parts)) as f:
        return tuple(_records(iter(f)))


def unhex(value: str | None) -> bytes:
    """Hex to bytes; BoringSSL's files also write some values as quoted ASCII strings."""
    value = value or ""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].encode()
    return bytes.fromhex(value)
