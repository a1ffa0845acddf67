"""What the file commands share (``encrypt``/``decrypt`` in :mod:`gpucrypt.cli.files`,
``encrypt-model``/``decrypt-model`` in :mod:`gpucrypt.cli.models`): sizes, raw keys,
IN/OUT and key options, key resolution, the output check and the error mapping.

Keys: ``--key-file FILE`` (32 raw bytes, or 64 hex digits and an optional newline) or
``--key-env VAR`` (64 hex digits), else the key-management options (recipients,
identities, keysets) of :mod:`gpucrypt.cli.keys` when it is installed. Every error is
a :class:`gpucrypt.cli.CliError`: exit code 1 when the data failed (wrong key,
tampering, truncation, not our format) or on an I/O error, 2 for usage problems.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from types import ModuleType
from typing import Any, Callable

from . import CliError

__all__ = ["parse_size", "read_key_file", "parse_key", "add_input_output_and_keys",
           "add_force", "add_key_management", "encrypt_keys", "decrypt_key", "check_output",
           "run_reporting_errors"]

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """``"64KiB"`` -> 65536; binary units K/KiB, M/MiB, G/GiB, or plain bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 64KiB, 1MiB)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


# --------------------------------------------------------------------------- raw keys
def read_key_file(path: str) -> bytes:
    """The 32-byte key in ``path``: 32 raw bytes, or 64 hex digits with an optional newline."""
    try:
        with open(path, "rb") as f:
            data = f.read(4097)
    except FileNotFoundError:
        raise CliError(f"key file not found: {path}", 2) from None
    except OSError as exc:
        raise CliError(f"cannot read the key file {path}: {exc.strerror}", 2) from None
    return parse_key(data, f"key file {path}")


def parse_key(data: bytes, what: str) -> bytes:
    """``data`` as a 32-byte key (32 raw bytes, or 64 hex digits and an optional newline);
    a usage CliError naming ``what`` otherwise."""
    if len(data) == 32:
        return data
    text = data.rstrip(b"\r\n")
    if len(text) == 64 and re.fullmatch(rb"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text.decode("ascii"))
    size = f"{len(data)} bytes" if len(data) <= 4096 else "more than 4096 bytes"
    raise CliError(f"{what} must hold 32 raw bytes or 64 hex digits (it has {size})", 2)


# --------------------------------------------------------------------------- arguments
def _key_management() -> ModuleType | None:
    """:mod:`gpucrypt.cli.keys`, or None when key management is not installed."""
    try:
        from . import keys as _cli_keys
    except ImportError:  # key management not installed: raw keys only
        return None
    return _cli_keys


def add_input_output_and_keys(parser: argparse.ArgumentParser, input_help: str,
                              output_help: str) -> None:
    """Add the positional ``IN`` and ``OUT`` and the exclusive ``--key-file``/``--key-env``."""
    parser.add_argument("input", metavar="IN", help=input_help)
    parser.add_argument("output", metavar="OUT", help=output_help)
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--key-file", metavar="FILE",
                      help="the 32-byte key: raw bytes, or 64 hex digits")
    keys.add_argument("--key-env", metavar="VAR",
                      help="environment variable holding the key as 64 hex digits")


def add_force(parser: argparse.ArgumentParser) -> None:
    """Add ``-f/--force`` (overwrite an existing OUT), read by :func:`check_output`."""
    parser.add_argument("-f", "--force", action="store_true", help="overwrite OUT if it exists")


def add_key_management(parser: argparse.ArgumentParser, mode: str) -> None:
    """Add the recipient/identity/keyset options for ``mode`` ("encrypt" or "decrypt")
    when :mod:`gpucrypt.cli.keys` is installed; nothing otherwise."""
    cli_keys = _key_management()
    if cli_keys is not None:
        cli_keys.add_key_arguments(parser, mode)


# --------------------------------------------------------------------------- key resolution
def _raw_key(args: Any) -> bytes | None:
    if args.key_file:
        return read_key_file(args.key_file)
    if args.key_env:
        value = os.environ.get(args.key_env)
        if value is None:
            raise CliError(f"environment variable {args.key_env} is not set", 2)
        text = value.strip()
        if not re.fullmatch(r"[0-9a-fA-F]{64}", text):  # never raw bytes: a password is not a key
            raise CliError(f"${args.key_env} must hold 64 hex digits (a 32-byte key)", 2)
        return bytes.fromhex(text)
    return None


def _no_key() -> CliError:
    return CliError("no key given: use --key-file FILE or --key-env VAR "
                    "(or the recipient/identity/keyset options)", 2)


def encrypt_keys(args: Any) -> tuple[bytes, str | None, bytes | None]:
    """``(key, key_id, envelope)`` to encrypt with: the raw key (no key id, no envelope),
    else a fresh data key wrapped for the recipients/keyset; usage CliError if none given."""
    key = _raw_key(args)
    if key is not None:
        return key, None, None
    cli_keys = _key_management()
    resolved = cli_keys.resolve_encrypt_keys(args) if cli_keys is not None else None
    if resolved is None:
        raise _no_key()
    return resolved


def decrypt_key(args: Any, header: Any) -> bytes:
    """The key to decrypt the file whose (unauthenticated) ``header`` is given: the raw key,
    else the data key unwrapped from its envelope; usage CliError if no key was given."""
    key = _raw_key(args)
    if key is not None:
        return key
    cli_keys = _key_management()
    key = cli_keys.resolve_decrypt_key(args, header) if cli_keys is not None else None
    if key is None:
        raise _no_key()
    return key


# --------------------------------------------------------------------------- output and errors
def check_output(args: Any, binary_ciphertext: bool):
    """Where to write: ``sys.stdout.buffer`` for ``-`` (refused for ciphertext on a terminal
    without ``--force``), else the path ``args.output``, refused when it is a folder or
    exists without ``--force``."""
    if args.output == "-":
        if binary_ciphertext and sys.stdout.isatty() and not args.force:
            raise CliError("refusing to write ciphertext to a terminal; redirect stdout "
                           "or give --force", 2)
        return sys.stdout.buffer
    if os.path.isdir(args.output):
        raise CliError(f"output is a directory: {args.output}", 2)
    if os.path.exists(args.output) and not args.force:
        raise CliError(f"output exists: {args.output} (give --force to overwrite it)", 2)
    return args.output


def run_reporting_errors(args: Any, work: Callable[[], Any]) -> int:
    """Run ``work()``, turning the library's errors into one-line CliErrors; 0 on success."""
    from ..backends import BackendUnavailable
    from ..files.stream import AuthenticationError, FormatError, TruncatedError, UnsupportedVersion

    try:
        work()
    except TruncatedError as exc:
        raise CliError(str(exc), 1) from None
    except AuthenticationError as exc:
        raise CliError(f"wrong key or tampered data: {exc}", 1) from None
    except UnsupportedVersion as exc:
        raise CliError(str(exc), 1) from None
    except FormatError as exc:
        raise CliError(f"{args.input}: {exc}", 1) from None
    except BackendUnavailable as exc:
        raise CliError(f"device {args.device!r} unavailable: {exc}", 2) from None
    except BrokenPipeError:
        raise CliError("output closed early (broken pipe)", 1) from None
    except (ValueError, OverflowError) as exc:  # e.g. a segment size out of range
        raise CliError(str(exc), 2) from None
    except OSError as exc:
        name = exc.filename or "I/O"
        raise CliError(f"{name}: {exc.strerror or exc}", 1) from None
    return 0
