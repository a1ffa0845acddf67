"""``gpucrypt encrypt IN OUT`` and ``gpucrypt decrypt IN OUT``: files in the stream format.

``-`` for IN reads stdin, for OUT writes stdout. The key comes from ``--key-file FILE``
(32 raw bytes, or 64 hex digits and an optional newline) or ``--key-env VAR`` (64 hex
digits), or from the key-management options (recipients, identities, keysets) that
:mod:`gpucrypt._cli_keys` adds when it is installed.

Exit codes: 0 success; 1 the data failed (wrong key or tampered data, truncated
file, not a gpucrypt file, unsupported version) or an I/O error; 2 a usage problem
(bad or missing option, missing input or key file, output exists without
``--force``, requested device unavailable). Messages are one line on stderr, no
traceback (raised as :class:`gpucrypt.cli.CliError`).

Writing to a path is atomic and ``decrypt`` renames the output into place only after
the whole file verified. Writing to stdout streams: ``decrypt`` to stdout may have
written the verified segments before a bad one when it fails (the exit code says so).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Any

from .cli import CliError

__all__ = ["add_encrypt", "add_decrypt", "read_key_file", "parse_size"]

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gib": 1 << 30}
#: inputs at least this large get a progress bar when stderr is a terminal
_PROGRESS_MIN_BYTES = 16 << 20


def parse_size(text: str) -> int:
    """``"64KiB"`` -> 65536; binary units K/KiB, M/MiB, G/GiB, or plain bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 64KiB, 1MiB)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def read_key_file(path: str) -> bytes:
    """The 32-byte key in ``path``: 32 raw bytes, or 64 hex digits with an optional newline."""
    try:
        with open(path, "rb") as f:
            data = f.read(4097)
    except FileNotFoundError:
        raise CliError(f"key file not found: {path}", 2) from None
    except OSError as exc:
        raise CliError(f"cannot read the key file {path}: {exc.strerror}", 2) from None
    return _parse_key(data, f"key file {path}")


def _parse_key(data: bytes, what: str) -> bytes:
    if len(data) == 32:
        return data
    text = data.rstrip(b"\r\n")
    if len(text) == 64 and re.fullmatch(rb"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text.decode("ascii"))
    size = f"{len(data)} bytes" if len(data) <= 4096 else "more than 4096 bytes"
    raise CliError(f"{what} must hold 32 raw bytes or 64 hex digits (it has {size})", 2)


def _common_arguments(parser: argparse.ArgumentParser, mode: str) -> None:
    parser.add_argument("input", metavar="IN", help="input file, or - for stdin")
    parser.add_argument("output", metavar="OUT", help="output file, or - for stdout")
    keys = parser.add_mutually_exclusive_group()
    keys.add_argument("--key-file", metavar="FILE",
                      help="the 32-byte key: raw bytes, or 64 hex digits")
    keys.add_argument("--key-env", metavar="VAR",
                      help="environment variable holding the key as 64 hex digits")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="where to encrypt (default: auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU worker threads (default: the usable cores)")
    parser.add_argument("-f", "--force", action="store_true", help="overwrite OUT if it exists")
    parser.add_argument("--progress", action="store_true",
                        help="show a progress bar on stderr (default: when stderr is a "
                             "terminal and the input is large)")
    try:
        from . import _cli_keys
    except ImportError:  # key management not installed: raw keys only
        return
    _cli_keys.add_key_arguments(parser, mode)


def add_encrypt(parser: argparse.ArgumentParser) -> None:
    """Encrypt a file (or stdin) into the gpucrypt stream format."""
    from .stream import ALGORITHMS, DEFAULT_SEGMENT_SIZE

    _common_arguments(parser, "encrypt")
    parser.add_argument("--algorithm", choices=ALGORITHMS, default="chacha20-poly1305",
                        help="AEAD for the segments (default: chacha20-poly1305)")
    parser.add_argument("--segment-size", type=parse_size, default=DEFAULT_SEGMENT_SIZE,
                        metavar="SIZE", help="plaintext bytes per segment, a power of two "
                                             "from 4KiB to 64MiB (default: 1MiB)")
    parser.set_defaults(func=_run_encrypt)


def add_decrypt(parser: argparse.ArgumentParser) -> None:
    """Decrypt a gpucrypt stream file (or stdin); nothing is written to OUT unless it all verifies."""
    _common_arguments(parser, "decrypt")
    parser.set_defaults(func=_run_decrypt)


# --------------------------------------------------------------------------- keys
def _raw_key(args) -> bytes | None:
    if args.key_file:
        return read_key_file(args.key_file)
    if args.key_env:
        value = os.environ.get(args.key_env)
        if value is None:
            raise CliError(f"environment variable {args.key_env} is not set", 2)
        return _parse_key(value.encode("utf-8", "replace"), f"${args.key_env}")
    return None


def _no_key() -> CliError:
    return CliError("no key given: use --key-file FILE or --key-env VAR "
                    "(or the recipient/identity/keyset options)", 2)


def _encrypt_keys(args) -> tuple[bytes, str | None, bytes | None]:
    key = _raw_key(args)
    if key is not None:
        return key, None, None
    try:
        from . import _cli_keys
    except ImportError:
        raise _no_key() from None
    resolved = _cli_keys.resolve_encrypt_keys(args)
    if resolved is None:
        raise _no_key()
    return resolved


def _decrypt_key(args, header) -> bytes:
    key = _raw_key(args)
    if key is not None:
        return key
    try:
        from . import _cli_keys
    except ImportError:
        raise _no_key() from None
    key = _cli_keys.resolve_decrypt_key(args, header)
    if key is None:
        raise _no_key()
    return key


# --------------------------------------------------------------------------- I/O
class _Progress:
    """A binary reader that counts what passes through it and draws a bar on stderr."""

    def __init__(self, fileobj, total: int | None, label: str):
        self._file, self._total, self._label = fileobj, total, label
        self._done, self._start, self._drawn = 0, time.monotonic(), 0.0

    def fileno(self):
        return self._file.fileno()

    def tell(self):
        return self._file.tell()

    def seek(self, offset, whence=0):
        return self._file.seek(offset, whence)

    def read(self, n=-1):
        data = self._file.read(n)
        self._count(len(data))
        return data

    def readinto(self, buf):
        n = self._file.readinto(buf) or 0
        self._count(n)
        return n

    def _count(self, n: int) -> None:
        self._done += n
        now = time.monotonic()
        if now - self._drawn >= 0.2 or n == 0:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self._done / max(now - self._start, 1e-9)
        text = f"{self._label} {_human(self._done)}"
        if self._total:
            frac = min(self._done / self._total, 1.0)
            bar = "#" * int(frac * 30)
            text = f"{self._label} [{bar:<30}] {frac:6.1%} {_human(self._done)} / {_human(self._total)}"
        sys.stderr.write(f"\r{text}  {_human(rate)}/s ")
        sys.stderr.flush()

    def finish(self) -> None:
        self._draw(time.monotonic())
        sys.stderr.write("\n")
        sys.stderr.flush()


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _open_input(args):
    """(binary reader, size or None, needs closing)."""
    if args.input == "-":
        return sys.stdin.buffer, None, False
    try:
        f = open(args.input, "rb")
    except FileNotFoundError:
        raise CliError(f"input file not found: {args.input}", 2) from None
    except IsADirectoryError:
        raise CliError(f"input is a directory: {args.input}", 2) from None
    except OSError as exc:
        raise CliError(f"cannot read {args.input}: {exc.strerror}", 2) from None
    return f, os.fstat(f.fileno()).st_size, True


def _output(args, binary_ciphertext: bool):
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


def _with_progress(args, reader, size, label):
    show = args.progress or (sys.stderr.isatty() and (size is None or size >= _PROGRESS_MIN_BYTES))
    return (_Progress(reader, size, label), True) if show else (reader, False)


def _run(args, work) -> int:
    """Run ``work`` turning the library's errors into one-line CliErrors."""
    from .backends import BackendUnavailable
    from .stream import AuthenticationError, FormatError, TruncatedError, UnsupportedVersion

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


def _check_threads(args):
    if args.threads is not None and args.threads < 1:
        raise CliError("--threads must be at least 1", 2)


def _run_encrypt(args) -> int:
    from . import stream

    _check_threads(args)
    key, key_id, envelope = _encrypt_keys(args)
    dst = _output(args, binary_ciphertext=True)
    reader, size, owned = _open_input(args)
    src, progress = _with_progress(args, reader, size, "encrypt")
    try:
        _run(args, lambda: stream.encrypt(src, dst, key, algorithm=args.algorithm,
                                          segment_size=args.segment_size, device=args.device,
                                          key_id=key_id, envelope=envelope,
                                          threads=args.threads))
    finally:
        if progress:
            src.finish()
        if owned:
            reader.close()
    return 0


def _run_decrypt(args) -> int:
    import itertools

    from . import _format, stream

    _check_threads(args)
    dst = _output(args, binary_ciphertext=False)
    reader, size, owned = _open_input(args)
    src, progress = _with_progress(args, reader, size, "decrypt")
    try:
        state: dict[str, Any] = {}

        def header_then_decrypt():
            header = stream.read_header(src)  # leaves src just after the header
            key = _decrypt_key(args, header)
            if owned:  # a regular file: start again from its first byte
                src.seek(0)
                whole = src
            else:  # a pipe: put the header back in front of the rest
                rest = iter(lambda: src.read(1 << 20), b"")
                whole = itertools.chain([_format.encode_header(header)], rest)
            state["header"] = stream.decrypt(whole, dst, key, device=args.device,
                                             threads=args.threads)

        _run(args, header_then_decrypt)
    finally:
        if progress:
            src.finish()
        if owned:
            reader.close()
    return 0
