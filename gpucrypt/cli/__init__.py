"""The ``gpucrypt`` command line.

Each subcommand lives in its own module and registers itself through
:data:`SUBCOMMANDS` (name -> "module:function", one-line description); the function
receives the argparse sub-parser, adds its arguments and sets ``func``. A run imports
only the module of the command it runs: ``--help``, no command and an unknown one list
every command from the table's descriptions, importing none. Errors the user can
fix are printed as one line on stderr, with exit code 2 for usage problems and 1
for failed operations; no tracebacks.

The top of the layering: may import everything below it, and nothing imports it.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import io
import sys
from typing import Iterable

#: subcommand -> ("module:function that configures its parser", one-line description);
#: the description is the function's docstring's first line (a test keeps them equal),
#: here so that listing the commands imports none of them
SUBCOMMANDS = {
    "encrypt": ("gpucrypt.cli.files:add_encrypt",
                "Encrypt a file (or stdin) into the gpucrypt stream format."),
    "decrypt": ("gpucrypt.cli.files:add_decrypt",
                "Decrypt a gpucrypt stream file (or stdin): a file OUT appears only once it "
                "all verified (to stdout or a pipe, each part is written once it verified)."),
    "info": ("gpucrypt.cli:_add_info",
             "Show versions, the backends that run here, and why the others do not."),
    "selftest": ("gpucrypt.cli:_add_selftest",
                 "Check every AEAD on every backend against cryptography (and libsodium)."),
    "warmup": ("gpucrypt.cli:_add_warmup",
               "Compile every GPU kernel now (numba's disk cache keeps them), so that no first call waits."),
    "keygen": ("gpucrypt.cli.keys:add_keygen",
               "Generate a keyset of key-encryption keys, or with --public a recipient key pair."),
    "keys": ("gpucrypt.cli.keys:add_keys",
             "Manage a keyset: list, add, promote, enable, disable, destroy keys."),
    "rekey": ("gpucrypt.cli.keys:add_rekey",
              "Give an encrypted file new recipients/keys (the header only; --reencrypt to "
              "revoke)."),
    "bench": ("gpucrypt.cli.bench:add_bench",
              "Measure gpucrypt against cryptography (OpenSSL), pycryptodome and libsodium on "
              "this machine."),
    "encrypt-model": ("gpucrypt.cli.models:add_encrypt_model",
                      "Encrypt a safetensors file into a gpucrypt model file (tensor data "
                      "encrypted)."),
    "decrypt-model": ("gpucrypt.cli.models:add_decrypt_model",
                      "Decrypt a gpucrypt model file back into a safetensors file."),
}


class CliError(Exception):
    """A problem the user can fix; printed without a traceback. ``exit_code`` says which kind."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _add_info(parser: argparse.ArgumentParser) -> None:
    """Show versions, the backends that run here, and why the others do not."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=_run_info)


def _run_info(args) -> int:
    import json

    from .._info import info

    report = info()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"gpucrypt {report['gpucrypt']} on Python {report['python']} ({report['platform']})")
    for name, version in report["libraries"].items():
        print(f"  {name:14s} {version or '-'}")
    print("backends available:")
    for name, details in report["backends"].items():
        extra = ", ".join(f"{k}={v}" for k, v in details.items() if k != "name")
        print(f"  {name}: {extra}")
    from ._common import in_option_words

    for name, reason in report["unavailable"].items():
        print(f"backend {name} unavailable: {in_option_words(reason, elsewhere=True)}")
    return 0


#: the selftest checks its bytes in messages of at most this size, so its memory stays
#: bounded (a few such buffers) whatever --size asks for
SELFTEST_MESSAGE_BYTES = 16 << 20


def _add_selftest(parser: argparse.ArgumentParser) -> None:
    """Check every AEAD on every backend against cryptography (and libsodium)."""
    from ._common import parse_size

    parser.add_argument("--size", type=parse_size, default=1 << 20, metavar="SIZE",
                        help=f"bytes to check per AEAD and backend, e.g. 4096, 64KiB, 1GiB "
                             f"(default 1MiB), in messages of at most "
                             f"{SELFTEST_MESSAGE_BYTES >> 20} MiB so that memory stays bounded")
    parser.set_defaults(func=_run_selftest)


def _run_selftest(args) -> int:
    """Encrypt and decrypt random data with every AEAD on every backend, checked against
    ``cryptography`` (and libsodium for XChaCha20-Poly1305 when PyNaCl is installed),
    ``--size`` bytes each, a message of at most :data:`SELFTEST_MESSAGE_BYTES` at a time."""
    import os

    from cryptography.hazmat.primitives.ciphers import aead as reference

    from .. import AESGCM, ChaCha20Poly1305, XChaCha20Poly1305
    from ..backends import available_backends

    if args.size <= 0:
        raise CliError(f"--size must be positive, not {args.size}", 2)
    aad = os.urandom(37)
    messages = -(-args.size // SELFTEST_MESSAGE_BYTES)
    how = "" if messages == 1 else f" in {messages} messages"
    failures = 0
    devices = available_backends()
    wanted = os.environ.get("GPUCRYPT_DEVICE", "").strip().lower()
    if wanted in ("gpu", "cuda") and "gpu" not in devices:  # asked to check the GPU: none is no pass
        from ..backends import unavailable_reasons

        print(f"gpu  FAILED: GPUCRYPT_DEVICE={wanted}, but the GPU backend cannot run here: "
              f"{unavailable_reasons().get('gpu', 'no reason given')}")
        failures += 1
    for device in devices:
        cases = [(ChaCha20Poly1305, 32, 12, reference.ChaCha20Poly1305),
                 (AESGCM, 32, 12, reference.AESGCM), (XChaCha20Poly1305, 32, 24, None)]
        for cls, key_len, nonce_len, ref_cls in cases:
            key = os.urandom(key_len)
            same = back = referenced = True
            error = ""
            for first in range(0, args.size, SELFTEST_MESSAGE_BYTES):
                data = os.urandom(min(SELFTEST_MESSAGE_BYTES, args.size - first))
                nonce = os.urandom(nonce_len)
                try:
                    sealed = cls(key, device=device).encrypt(nonce, data, aad)
                except Exception as exc:  # noqa: BLE001 - a broken backend is what this finds
                    same = back = False
                    error = type(exc).__name__ + (f": {exc}" if str(exc) else "")
                    break
                if ref_cls is not None:
                    expected = ref_cls(key).encrypt(nonce, data, aad)
                else:
                    expected = _libsodium_xchacha(key, nonce, data, aad)
                referenced = referenced and expected is not None
                same = same and (expected is None or sealed == expected)
                del expected
                try:
                    back = back and cls(key, device=device).decrypt(nonce, sealed, aad) == data
                except Exception as exc:  # noqa: BLE001 - InvalidTag for its own ciphertext, say
                    back = False
                    error = type(exc).__name__ + (f": {exc}" if str(exc) else "")
                    break
                del data, sealed
            ok = same and back
            failures += not ok
            ref_name = "libsodium" if ref_cls is None else "cryptography"
            note = "" if referenced else " (PyNaCl not installed: reference not checked)"
            if error:
                note += f" ({error})"
            print(f"{device:4s} {cls.__name__:18s} {args.size} bytes{how}: "
                  f"{'ok' if ok else 'FAILED'} (matches {ref_name}: {same}, round trip: {back}){note}")
    return 1 if failures else 0


def _add_warmup(parser: argparse.ArgumentParser) -> None:
    """Compile every GPU kernel now (numba's disk cache keeps them), so that no first call waits."""
    parser.set_defaults(func=_run_warmup)


def _run_warmup(args) -> int:
    """Seal and open a short and a long message with each AEAD on the GPU: the long one
    (40 KiB) needs every kernel (GHASH and Poly1305 combine levels included), with the
    argument types the backend launches them with, so each lands in numba's disk cache."""
    import os
    import time

    from .. import AESGCM, ChaCha20Poly1305
    from ..backends import BackendUnavailable, get_backend

    try:
        get_backend("gpu")
    except BackendUnavailable as exc:  # the file commands' --device cpu runs without one
        from ._common import in_option_words

        raise CliError(f"no GPU to compile for: {in_option_words(str(exc), elsewhere=True)}") \
            from exc
    from ..kernels._compile import KERNELS, ON_SIMULATOR, cache_dir, kernel_name

    if ON_SIMULATOR:
        print("the GPU backend is numba's CUDA simulator here (NUMBA_ENABLE_CUDASIM=1): nothing is compiled")
        return 0
    for cls, key_len in ((ChaCha20Poly1305, 32), (AESGCM, 16), (AESGCM, 32)):
        start = time.perf_counter()
        aead = cls(os.urandom(key_len), device="gpu")
        for size in (100, 40 << 10):
            nonce, data = os.urandom(12), os.urandom(size)
            if aead.decrypt(nonce, aead.encrypt(nonce, data, b"warmup"), b"warmup") != data:
                raise CliError(f"{cls.__name__} did not round-trip on the GPU; run `gpucrypt selftest`")
        print(f"{cls.__name__:18s} ({8 * key_len}-bit key): {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    _warm_two_key_gcm(get_backend("gpu"))
    print(f"{'AES-GCM, two keys':18s} (one batch): {time.perf_counter() - start:.1f} s")
    missing = [kernel_name(k) for k in KERNELS if not k.overloads]
    for k in KERNELS:
        print(f"  {kernel_name(k):32s} {len(k.overloads)} signature(s), cache {cache_dir(k) or 'none'}")
    if missing:
        raise CliError(f"kernels not compiled by the warm-up: {', '.join(missing)}")
    return 0


def _warm_two_key_gcm(gpu) -> None:
    """Seal one AES-GCM batch under two keys on ``gpu`` and check it against the CPU. One
    key per batch takes GHASH's table kernel; only a batch that mixes keys compiles the
    mixed-key kernel (``kernels/ghash.py``)."""
    import os

    import numpy as np

    from .. import AESGCM

    keys, nonces = [os.urandom(32), os.urandom(16)], [os.urandom(12), os.urandom(12)]
    plain = [os.urandom(100), os.urandom(300)]
    bufs = [gpu.to_device(np.frombuffer(p, dtype=np.uint8).copy()) for p in plain]
    tags = gpu.to_host(gpu.seal_batch("aes-gcm", keys, nonces, bufs, [b"warmup"] * 2, bufs))
    for key, nonce, p, buf, tag in zip(keys, nonces, plain, bufs, tags):
        sealed = gpu.to_host(buf).tobytes() + tag.tobytes()
        if AESGCM(key, device="cpu").decrypt(nonce, sealed, b"warmup") != p:
            raise CliError("an AES-GCM batch under two keys did not match the CPU on the GPU; "
                           "run `gpucrypt selftest`")


def _libsodium_xchacha(key, nonce, data, aad):
    try:
        from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_encrypt
    except ImportError:
        return None
    return crypto_aead_xchacha20poly1305_ietf_encrypt(data, aad, nonce, key)


def build_parser(configure: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The ``gpucrypt`` parser. The commands named in ``configure`` (default: all) get
    their arguments, which imports their modules; the others are bare sub-parsers, enough
    for the help and for argparse's choice of command. When ``configure`` names one
    command, the parser holds only that one (the parser of a command being run)."""
    wanted = SUBCOMMANDS if configure is None else set(configure)
    parser = argparse.ArgumentParser(prog="gpucrypt", description="GPU-accelerated bulk encryption")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Running one known command needs only its sub-parser (each costs about a
    # millisecond of a small file's run); help and errors list every command.
    listed = wanted if len(wanted) == 1 and wanted <= SUBCOMMANDS.keys() else SUBCOMMANDS
    for name, (_, summary) in SUBCOMMANDS.items():
        if name not in listed:
            continue
        sub_parser = sub.add_parser(name, help=summary, description=summary)
        if name in wanted:
            _configure(name, sub_parser)
    return parser


def _configure(name: str, parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` command ``name``'s arguments (importing the command's module)."""
    module_name, func_name = SUBCOMMANDS[name][0].split(":")
    getattr(importlib.import_module(module_name), func_name)(parser)


def _command(argv: list[str]) -> str | None:
    """The command argparse will run: the first argument that is not an option (the
    top-level options, ``-h`` and ``--version``, take no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _version() -> str:
    from .. import __version__

    return f"gpucrypt {__version__}"


def _command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of command ``name`` alone, as ``gpucrypt NAME`` (the prog, usage, help
    and errors of its sub-parser in :func:`build_parser`): one ArgumentParser to build,
    not two (each costs a small file's run about a millisecond, in gettext)."""
    parser = argparse.ArgumentParser(prog=f"gpucrypt {name}", description=SUBCOMMANDS[name][1])
    _configure(name, parser)
    parser.set_defaults(command=name)
    return parser


def _parse(argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The parser for ``argv`` and what it parsed: the command's own parser when the
    command comes first (no top-level option before it), else :func:`build_parser`'s."""
    if argv and argv[0] in SUBCOMMANDS:
        parser = _command_parser(argv[0])
        # intermixed: `encrypt IN --key-file K OUT` is how many type it (parse_args took
        # IN, then OUT was "unrecognized")
        if "--" in argv:  # intermixed parsing drops "--" (Python 3.11): "-- -name" is a file
            return parser, parser.parse_args(argv[1:])
        try:
            return parser, parser.parse_intermixed_args(argv[1:])
        except TypeError:  # a command of commands (`keys list ...`): argparse cannot intermix
            return parser, parser.parse_args(argv[1:])
    command = _command(argv)
    parser = build_parser(configure=[command] if command in SUBCOMMANDS else [])
    return parser, parser.parse_args(argv)


def _freeze_heap() -> None:
    """Move every object alive now out of the cyclic garbage collector's sight
    (``gc.freeze``): the modules and what they made live until the process exits, and
    each collection (the one at exit included) would walk them again, for nothing. About
    8% of a small file's whole run (instructions, callgrind). Only for a process that is
    this command: what is frozen is never collected."""
    import gc

    gc.freeze()


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: the process's arguments) and return the
    exit code. Without ``argv`` the process is this command (the console script, ``python
    -m gpucrypt``), and its heap is frozen once the command's modules are loaded
    (:func:`_freeze_heap`); a caller's own process is left as it is.

    While the command runs, a standard stream that was closed when the process started
    has a stand-in (:class:`_ClosedStream`) and stdout is watched (:class:`_Stdout`):
    writing to a stdout that fails (a full disk, a closed descriptor) is one line and
    exit 1, as is an audit log that cannot be written."""
    whole_process = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if whole_process:
        _freeze_heap()
    parser, args = _parse(argv)
    if whole_process:
        _freeze_heap()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    saved = sys.stdin, sys.stdout, sys.stderr
    sys.stdin = saved[0] if saved[0] is not None else _ClosedStream("stdin")
    sys.stderr = saved[2] if saved[2] is not None else _ClosedStream("stderr")
    sys.stdout = _Stdout(saved[1] if saved[1] is not None else _ClosedStream("stdout"))
    audit_before = _audit_logger_state()
    try:
        return _run(args)
    finally:
        sys.stdin, sys.stdout, sys.stderr = saved
        if not whole_process:
            _restore_audit_logger(audit_before)


def _audit_logger_state() -> tuple | None:
    """The audit logger's handlers, level, propagation and ``disabled`` flag; None where
    logging was never loaded (the command line does not load it for commands that write
    no log: 4 ms of start-up)."""
    logging = sys.modules.get("logging")
    if logging is None:
        return None
    logger = logging.getLogger("gpucrypt.audit")
    return logger.handlers[:], logger.level, logger.propagate, logger.disabled


def _restore_audit_logger(before: tuple | None) -> None:
    """An --audit-log of a ``main(argv)`` call is that call's: a later call in the process,
    given another log or none, must not write to it (nor fail when it fails), and the
    application's own logging is left as it was (``enable`` turns propagation off)."""
    logging = sys.modules.get("logging")
    if logging is None:
        return
    logger = logging.getLogger("gpucrypt.audit")
    handlers, level, propagate, disabled = before or ([], logging.NOTSET, True, False)
    for handler in logger.handlers[:]:
        if handler not in handlers:
            logger.removeHandler(handler)
            handler.close()
    logger.setLevel(level)
    logger.propagate, logger.disabled = propagate, disabled


def _run(args: argparse.Namespace) -> int:
    """Run the parsed command; its errors as one line on stderr and an exit code."""
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so that a reader gone early is a BrokenPipeError caught below
        return code
    except StdoutFailed as exc:
        _drop_stdout()
        print(f"gpucrypt {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except CliError as exc:
        print(f"gpucrypt {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `gpucrypt keys list ks.json | head -1`
        _drop_stdout()
        print(f"gpucrypt {args.command}: output closed early (broken pipe)", file=sys.stderr)
        return 1
    except OSError as exc:
        message = _audit_failure(exc)
        if message is None:
            raise
        print(f"gpucrypt {args.command}: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _audit_failure(exc: OSError) -> str | None:
    """The message for an audit log that could not be written (``--audit-log``), None
    for any other error. An event not recorded fails the command: the log is the
    record of what was done with the keys, and a silent gap in it is what an audit is
    there to rule out."""
    if not is_audit_failure(exc):
        return None
    # every event lost, the first first: the operation's own event (file.encrypt, say)
    # fails after an inner one (keyset.load) did, and its error holds that one as context
    lost, seen = [], exc
    while seen is not None:
        if is_audit_failure(seen):
            lost.append(seen)
        seen = seen.__context__
    lost.reverse()
    events = "; ".join(f"{e.operation!r} ({e.consequence})" for e in lost)
    message = (f"cannot write the audit log {exc.filename}: {exc.strerror}. "
               f"{'The event' if len(lost) == 1 else 'These events are'} missing from it: "
               f"{events}. Make room or repair the log's file system, then note "
               f"{'that event' if len(lost) == 1 else 'them'} in the log by hand")
    own = _own_failure(exc) if any(e.outcome == "error" for e in lost) else None
    # the failure the lost event was recording first: what failed, and why (OUT on the
    # same full disk, say), is what the user must know, and what the log is missing
    return message if own is None else f"{own}; and {message}"


def _own_failure(exc: BaseException) -> str | None:
    """The command's own failure that a lost audit event was recording, as its one-line
    message: the CliError (or the library's ``OSError``, or Ctrl-C) in ``exc``'s context
    chain that is neither an audit failure nor the log's own write error behind one."""
    seen, logs = exc, set()
    while seen is not None:
        if is_audit_failure(seen):
            logs.add(id(seen.__cause__))  # the log's own OSError, raised as this one
        elif id(seen) not in logs:
            if isinstance(seen, CliError):
                return str(seen)
            if isinstance(seen, KeyboardInterrupt):
                return "interrupted"
            if isinstance(seen, OSError) and seen.filename is not None:
                from ._common import named_io_error

                return named_io_error(seen)
        seen = seen.__context__
    return None


def is_audit_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is an audit event that could not be written (the command's own
    errors never are: they are reported as the log's, by :func:`_run`)."""
    audit = sys.modules.get("gpucrypt.audit")  # loaded if any event was written
    return audit is not None and isinstance(exc, audit.AuditLogError)


class StdoutFailed(CliError):
    """Writing the command's report to stdout failed (not a closed pipe, which
    :func:`_run` reports itself): exit 1, one line. What the command did (a key file
    written, a header rewritten) stays done: only what it printed is lost."""

    def __init__(self, exc: OSError):
        what = exc.strerror or str(exc)
        super().__init__(f"cannot write to stdout ({what}): the command ran, but what it "
                         f"printed is lost; redirect stdout to somewhere that takes it", 1)


class _Stdout:
    """``sys.stdout`` while a command runs: the real one, whose failing ``write`` or
    ``flush`` (``> /dev/full``: ENOSPC; a closed descriptor: EBADF) raises
    :class:`StdoutFailed` instead of an OSError that no command catches (a traceback,
    after keygen or rekey did their work). A closed pipe stays a BrokenPipeError, reported
    by :func:`_run`. ``gpucrypt_closed``: the process started with stdout closed."""

    def __init__(self, stream):
        self._stream = stream
        self.gpucrypt_closed = isinstance(stream, _ClosedStream)

    def write(self, text: str) -> int:
        if self.gpucrypt_closed:
            raise StdoutFailed(OSError(errno.EBADF, "it was closed when gpucrypt started"))
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise StdoutFailed(exc) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise StdoutFailed(exc) from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class _ClosedStream(io.TextIOBase):
    """A standard stream whose descriptor was closed when the process started (``<&-``,
    ``>&-``, ``2>&-``), for which Python leaves None in ``sys.stdin``/``stdout``/``stderr``:
    every ``isatty()`` and ``.buffer`` would fail on it, and ``print(file=None)`` prints
    to stdout. This one is no terminal and drops what is written to it (a closed stderr
    silences the messages, not the exit code); ``gpucrypt_closed`` tells the commands that
    read stdin or write stdout for data to refuse, naming the stream."""

    gpucrypt_closed = True

    def __init__(self, name: str):
        super().__init__()
        self._name = name

    @property
    def name(self) -> str:
        return f"<{self._name}: closed>"

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)


def closed_stream_error(name: str, instead: str) -> CliError:
    """The usage error for data to or from ``name`` ("stdin", "stdout") that was closed
    when the process started; ``instead``: what to give."""
    return CliError(f"{name} is closed (the process started without it, as with the shell's "
                    f"{'<&-' if name == 'stdin' else '>&-'}): {instead}", 2)


def _drop_stdout() -> None:
    """Point stdout at /dev/null, as Python's documentation advises after a broken pipe:
    the interpreter flushes stdout once more at exit, which would otherwise fail again and
    print a traceback-like "Exception ignored" message."""
    import os

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
