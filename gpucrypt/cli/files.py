"""``gpucrypt encrypt [IN] [OUT]`` and ``gpucrypt decrypt [IN] [OUT]``: files in the stream format.

IN and OUT default to stdin and stdout (``-`` says so too), and ``-o OUT`` names OUT, as
with age: ``gpucrypt encrypt -r alice.pub < in > out``, ``gpucrypt decrypt -i alice.key
< out``. The key comes from exactly one of ``--key-file FILE`` (32 raw bytes, or 64 hex
digits and an optional newline), ``--key-env VAR`` (64 hex digits), ``-p`` (a
passphrase), or the recipient/identity/keyset options that :mod:`gpucrypt.cli.keys`
adds when it is installed (``-r`` and ``--keyset`` go together, as do ``-i`` and
``--keyset``). ``decrypt`` asks for the passphrase of a passphrase-encrypted file by itself.

Exit codes: 0 success; 1 the data failed (wrong key or tampered data, truncated
file, not a gpucrypt file, unsupported version) or an I/O error; 2 a usage problem
(bad or missing option, key options that cannot go together, missing input or key
file, a key file others can read, output exists without ``--force``, requested device
unavailable). Messages are one line on stderr, no traceback (raised as
:class:`gpucrypt.cli.CliError`).

Writing to a path is atomic (:func:`gpucrypt.cli._common.destination`): on Linux the
output is an unnamed file until it is complete, so no signal leaves anything behind
while it is written (replacing a file with ``--force`` names it beside OUT for the
moment of its rename: SIGTERM and SIGHUP remove that name, SIGKILL can leave it), and
``decrypt`` publishes it only after the whole file verified; without ``--force``
it never replaces a file, not even one that appeared while it ran ("output exists",
exit 1). Writing to stdout streams, and so does writing to an OUT that is a FIFO or a
character device (``-o /dev/null`` checks that a file decrypts): it is opened and
written in place, with or without ``--force``, never replaced by a file
(:func:`gpucrypt.cli._common.streamed_output`); any other OUT that is not a regular
file (a block device, a socket) is refused (exit 2). ``decrypt`` to such a stream
writes each batch of segments once it verified, so it may have written the verified
segments before a bad one when it fails (the exit code says so).

An OUT that is IN (its path, a symbolic link to it, or another path to a file with no
other name; a hard link is written as a name of its own) is refused by ``decrypt`` even
with ``--force`` (exit 2): the plaintext would take the place of the only ciphertext; write
elsewhere, then rename. A stdout that is the input file is refused by both commands
(:func:`gpucrypt.cli._common.refuse_input_as_output`); ``encrypt --force f f``
replaces a file by its encryption, as asked.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
import time
from typing import Any, Iterator

from ._common import (add_algorithm, add_device, add_force, add_input_output_and_keys,
                      add_key_management, audited, check_key_sources, check_output,
                      check_sealing_options, decrypt_key, destination, device_chosen,
                      encrypt_keys, key_read, output_path, parse_size, refuse_input_as_output,
                      run_reporting_errors)
from . import CliError

__all__ = ["add_encrypt", "add_decrypt"]

#: inputs at least this large get a progress bar when stderr is a terminal: a file (or a
#: stdin redirected from one) by its size, a pipe once this much of it has been read
_PROGRESS_MIN_BYTES = 16 << 20


def _common_arguments(parser: argparse.ArgumentParser, mode: str) -> None:
    add_input_output_and_keys(parser, "input file (default, or -: stdin)",
                              "output file (default, or -: stdout)", streams=True)
    add_device(parser, f"where to {mode} (default: auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU worker threads (default: the usable cores)")
    add_force(parser, "overwrite OUT if it exists; write to a terminal what is refused there "
                      "otherwise (ciphertext; plaintext that is binary or holds terminal "
                      "control characters)")
    parser.add_argument("--progress", action="store_true",
                        help="show a progress bar on stderr (default: when stderr is a "
                             "terminal and the input is 16 MiB or more: a file by its size, "
                             "a pipe once that much was read; never before a passphrase "
                             "prompt)")
    add_key_management(parser, mode)


def add_encrypt(parser: argparse.ArgumentParser) -> None:
    """Encrypt a file (or stdin) into the gpucrypt stream format."""
    from ..files.stream import DEFAULT_SEGMENT_SIZE

    _common_arguments(parser, "encrypt")
    add_algorithm(parser)
    parser.add_argument("--segment-size", type=parse_size, default=DEFAULT_SEGMENT_SIZE,
                        metavar="SIZE", help="plaintext bytes per segment, a power of two "
                                             "from 4KiB to 64MiB (default: 1MiB)")
    parser.set_defaults(func=_run_encrypt)


def add_decrypt(parser: argparse.ArgumentParser) -> None:
    """Decrypt a gpucrypt stream file (or stdin): a file OUT appears only once it all verified (to stdout or a pipe, each part is written once it verified)."""
    _common_arguments(parser, "decrypt")
    parser.set_defaults(func=_run_decrypt)


# --------------------------------------------------------------------------- I/O
class _Progress:
    """A binary reader that counts what passes through it and draws a bar on stderr.

    ``from_bytes``: draw nothing until that much was read (an input of unknown size is
    shown once it is known to be large). ``held``: draw nothing until :meth:`release`
    (decrypt reads the header before it may ask for a passphrase: no bar on the prompt's
    line). :meth:`finish` ends a bar only where one was drawn."""

    def __init__(self, fileobj, total: int | None, label: str, *, from_bytes: int = 0,
                 held: bool = False):
        self._file, self._total, self._label = fileobj, total, label
        self._from, self._held, self._shown = from_bytes, held, False
        self._done, self._start, self._drawn = 0, time.monotonic(), 0.0
        self._drawn_done = -1  # what the last line drawn showed read

    def release(self) -> None:
        self._held = False

    def fileno(self):
        return self._file.fileno()

    def tell(self):
        return self._file.tell()

    def seek(self, offset, whence=0):
        before = self._file.tell()
        after = self._file.seek(offset, whence)
        # the bar counts how far the input was read, not the bytes read: decrypt reads the
        # header, then rewinds and reads it again, and the last line said 10.0 of 9.9 KiB
        self._done += after - before
        return after

    def read(self, n=-1):
        data = self._file.read(n)
        self._count(len(data or b""))
        return data  # None too: a non-blocking input with no data yet, not its end

    def readinto(self, buf):
        n = self._file.readinto(buf)
        self._count(n or 0)
        return n

    def _count(self, n: int) -> None:
        self._done += n
        if self._held or self._done < self._from:
            return
        if n == 0 or (self._total and self._done >= self._total):
            # the end of the input (or a non-blocking read that found nothing: nothing new):
            # finish() draws the last line, once, with the whole run's speed; drawing it here
            # too printed the 100% line twice, at two speeds
            return
        now = time.monotonic()
        if now - self._drawn >= 0.2:
            self._drawn = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        self._shown, self._drawn_done = True, self._done
        rate = self._done / max(now - self._start, 1e-9)
        text = f"{self._label} {_human(self._done)}"
        if self._total:
            frac = min(self._done / self._total, 1.0)
            bar = "#" * int(frac * 30)
            text = f"{self._label} [{bar:<30}] {frac:6.1%} {_human(self._done)} / {_human(self._total)}"
        sys.stderr.write(f"\r{text}  {_human(rate)}/s ")
        sys.stderr.flush()

    def finish(self) -> None:
        if not self._shown and (self._held or self._done < self._from):
            return  # never drawn: no bar to end
        if self._drawn_done != self._done:  # else the last line drawn is the final one already
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
        if getattr(sys.stdin, "gpucrypt_closed", sys.stdin is None):
            from . import closed_stream_error

            raise closed_stream_error("stdin", "give the input file as IN, or redirect stdin")
        return sys.stdin.buffer, _stdin_size(sys.stdin.buffer), False
    try:
        f = open(args.input, "rb")
    except FileNotFoundError:
        raise CliError(f"input file not found: {args.input}", 2) from None
    except IsADirectoryError:
        raise CliError(f"input is a directory: {args.input}", 2) from None
    except OSError as exc:
        raise CliError(f"cannot read {args.input}: {exc.strerror}", 2) from None
    from ..files._atomic import regular_size

    # a FIFO or a process substitution (<(...)) has no size (st_size 0): unknown, as stdin's
    return f, regular_size(f.fileno()), True


def _stdin_size(reader) -> int | None:
    """What is left to read of a stdin redirected from a regular file (``< file``), None
    for a pipe, a terminal or anything else of unknown length."""
    try:
        fd = reader.fileno()
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        return max(st.st_size - os.lseek(fd, 0, os.SEEK_CUR), 0)
    except (AttributeError, OSError, ValueError):
        return None


def _with_progress(args, reader, size, label, held):
    """``(reader, bar)``: a bar when --progress asks for one, or stderr is a terminal and
    the input is large (by its size, or once that much was read when its size is unknown);
    ``held``: drawn only after :meth:`_Progress.release` (a prompt may come first)."""
    if args.progress:
        return _Progress(reader, size, label, held=held), True
    if not sys.stderr.isatty() or (size is not None and size < _PROGRESS_MIN_BYTES):
        return reader, False
    return _Progress(reader, size, label, held=held,
                     from_bytes=_PROGRESS_MIN_BYTES if size is None else 0), True


def _check_threads(args):
    if args.threads is not None and args.threads < 1:
        raise CliError("--threads must be at least 1", 2)


@contextlib.contextmanager
def _input(args, label: str, held: bool = False) -> Iterator[tuple[Any, bool]]:
    """``(reader, is_file, size)`` for IN (or stdin), with a progress bar when one is
    wanted (``held``: not drawn before :func:`_release_progress`); ``is_file`` says the
    reader is a file of ours that can be rewound (not a FIFO or a ``<(...)`` path);
    ``size``: what it holds, None where unknown (a pipe). On exit the bar is finished and
    the file closed."""
    reader, size, owned = _open_input(args)
    src, progress = _with_progress(args, reader, size, label, held)
    try:
        yield src, owned and reader.seekable(), size
    finally:
        if progress:
            src.finish()
        if owned:
            reader.close()


def _release_progress(src) -> None:
    """Let the bar of :func:`_input` (``held``) draw: the key is known, no prompt is left."""
    if isinstance(src, _Progress):
        src.release()


def _run_encrypt(args) -> int:
    from ..files import stream

    check_key_sources(args)
    _check_threads(args)
    check_sealing_options(args)
    # IN's and OUT's refusals (missing, a folder, OUT exists or its folder does not, the
    # output is the input, ciphertext to a terminal) come before the keys, as in decrypt
    # and keygen: a passphrase (typed twice with -p, or a sealed keyset's) is asked for
    # only when it can be used. A FIFO OUT alone is opened after the keys: its open waits
    # for a reader, and a missing key file is said at once (the checks that open nothing
    # come first all the same)
    check_output(args, binary_ciphertext=True)
    fifo = _is_fifo(output_path(args))
    # --audit-log: one event for the run, written once OUT is published (or failed)
    with audited(args, "file.encrypt", args.input) as event, contextlib.ExitStack() as stack:
        src, _, size = stack.enter_context(_input(args, "encrypt"))
        if not fifo:
            dst = stack.enter_context(destination(args, binary_ciphertext=True))
            refuse_input_as_output(args, src, dst)
        key, key_id, envelope = encrypt_keys(args)
        if fifo:
            dst = stack.enter_context(destination(args, binary_ciphertext=True))
        event.update(algorithm=args.algorithm, device=args.device)
        with device_chosen(args, event) as ran_on:
            run_reporting_errors(args, lambda: stream.encrypt(
                src, dst, key, algorithm=args.algorithm, segment_size=args.segment_size,
                device=args.device, key_id=key_id, envelope=envelope, threads=args.threads,
                _salt=getattr(args, "file_salt", None),  # the envelope is bound to it (--kek)
                _ran_on=ran_on))
        if size is not None:  # the input's size, checked unchanged by the stream
            event["bytes"] = size
    return 0


def _is_fifo(path: str) -> bool:
    try:
        return path != "-" and stat.S_ISFIFO(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _check_device(args) -> None:
    """A GPU that cannot run (``--device gpu``, or ``GPUCRYPT_DEVICE=gpu`` for ``--device
    auto``; or a ``GPUCRYPT_DEVICE`` that is no device) refused (through
    :func:`run_reporting_errors`: exit 2) before any key is read, as encrypt's
    :func:`check_sealing_options` does: found after the key, the refusal came once the data
    key was unwrapped (scrypt, or a KMS or HSM call the audit log records as
    ``envelope.open``), and a usage error records no ``file.decrypt`` event to go with it."""
    from ..backends import small_payloads_on_cpu

    run_reporting_errors(args, lambda: small_payloads_on_cpu(args.device))


def _run_decrypt(args) -> int:
    from ..files import stream

    check_key_sources(args)
    _check_threads(args)
    _check_device(args)
    refuse_input_as_output(args, replacing="its ciphertext with the plaintext")
    # --audit-log: one event for the run, written once OUT is published (or failed)
    with audited(args, "file.decrypt", args.input) as event:
        with destination(args, binary_ciphertext=False) as dst, \
                _input(args, "decrypt", held=True) as (src, is_file, _):
            refuse_input_as_output(args, src, dst)

            def header_then_decrypt():
                key_read(args)  # the header is the key's first use: a bad one is a failure
                header = stream.read_header(src)  # leaves src just after the header
                key = decrypt_key(args, header)  # may ask for a passphrase: the bar waits
                event.update(algorithm=header.algorithm, device=args.device)
                _release_progress(src)
                if is_file:  # a regular file: start again from its first byte
                    src.seek(0)
                    whole = src
                else:  # a pipe: put the header back in front of the rest, as it arrives
                    whole = stream._after_header(header, src)
                with device_chosen(args, event) as ran_on:
                    stream.decrypt(whole, dst, key, device=args.device, threads=args.threads,
                                   _ran_on=ran_on)

            run_reporting_errors(args, header_then_decrypt)
        size = _published_size(output_path(args))
        if size is not None:
            event["bytes"] = size
    return 0


def _published_size(path: str) -> int | None:
    """The size of a decrypted OUT that is a regular file (the plaintext's), else None
    (stdout, a FIFO, a device: what passed through them is not counted)."""
    from ..files._atomic import regular_size

    return None if path == "-" else regular_size(path)
