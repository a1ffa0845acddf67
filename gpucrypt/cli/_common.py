"""What the file commands share (``encrypt``/``decrypt`` in :mod:`gpucrypt.cli.files`,
``encrypt-model``/``decrypt-model`` in :mod:`gpucrypt.cli.models`, and ``rekey``): sizes,
raw keys, IN/OUT and key options, which key options go together, key resolution, key
files' permissions, the output and the error mapping.

Keys: ``--key-file FILE`` (32 raw bytes, or 64 hex digits and an optional newline) or
``--key-env VAR`` (64 hex digits), else the key-management options (recipients,
identities, keysets, passphrases) of :mod:`gpucrypt.cli.keys` when it is installed.
:func:`check_key_sources` refuses options that cannot apply together (a raw key and a
recipient, say: one of them would be ignored); every command that takes keys calls it
first. Files holding secrets (key files, identities, keysets, passphrase files) that
group or others can access are refused, as ssh refuses such private keys
(:func:`check_private_file`), unless ``--unsafe-key-permissions`` accepts the risk.

Outputs to a path are :class:`gpucrypt.files._atomic.AtomicFile` objects: nothing is
at OUT until the whole file is written (and verified, to decrypt), no signal leaves a
temporary file behind on Linux while it is written (replacing a file with ``--force``
names it beside OUT for the moment of its rename: SIGTERM and SIGHUP remove that name,
SIGKILL can leave it), and without ``--force`` a file that appeared at OUT
meanwhile is never replaced. Every error is a :class:`gpucrypt.cli.CliError`: exit
code 1 when the data failed (wrong key, tampering, truncation, not our format) or on an
I/O error, 2 for usage problems.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import stat
import sys
from types import ModuleType
from typing import Any, Callable, Iterator

from . import CliError, is_audit_failure

__all__ = ["parse_size", "read_key_file", "parse_key", "add_input_output_and_keys",
           "add_force", "add_key_management", "add_unsafe_key_permissions", "check_key_sources",
           "check_private_file", "encrypt_keys", "decrypt_key", "check_output",
           "check_output_path", "link_refusal", "refuse_dash", "streamed_output", "file_kind",
           "StreamedOutput", "atomic_output", "destination", "output_path", "refuse_input_as_output",
           "run_reporting_errors"]

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """``"64KiB"`` -> 65536; binary units K/KiB, M/MiB, G/GiB, or plain bytes (zero and up;
    a negative size is not a size)."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 64KiB, 1MiB)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


# --------------------------------------------------------------------------- key sources
#: every option that says how a file's key is made or found (args attribute -> the option
#: as the user writes it); a new key option joins here and in :data:`KEY_SOURCES_TOGETHER`
KEY_SOURCES = {
    "key_file": "--key-file",
    "key_env": "--key-env",
    "recipient": "-r/--recipient",
    "identity": "-i/--identity",
    "keyset": "--keyset",
    "old_keyset": "--old-keyset",
    "passphrase": "-p/--passphrase",
    "kek": "--kek",
    "old_kek": "--old-kek",
}

#: the pairs that apply together: recipients and a keyset both wrap the data key
#: (encrypt, rekey); identities and keysets are all tried to open it (decrypt, rekey);
#: rekey opens with -i/--old-keyset and wraps for -r/--keyset. Every other pair would
#: silently drop one of the two (a raw key ignores -r; a passphrase file has no other
#: recipient), so it is a usage error.
KEY_SOURCES_TOGETHER = {frozenset(pair) for pair in (
    ("recipient", "keyset"), ("identity", "keyset"), ("recipient", "identity"),
    ("old_keyset", "recipient"), ("old_keyset", "keyset"), ("old_keyset", "identity"),
    # a key in an HSM or KMS (--kek) wraps beside -r/--keyset and opens beside -i/--keyset;
    # rekey opens with --old-kek beside -i/--old-keyset and wraps for any of the others
    ("kek", "recipient"), ("kek", "keyset"), ("kek", "identity"), ("kek", "old_keyset"),
    ("old_kek", "recipient"), ("old_kek", "keyset"), ("old_kek", "identity"),
    ("old_kek", "old_keyset"), ("old_kek", "kek"),
)}


def check_key_sources(args: Any) -> list[str]:
    """The key options given (``args`` attributes, in :data:`KEY_SOURCES`' order); a usage
    CliError naming both options when two of them cannot apply together, or when
    ``--passphrase-file`` would be ignored (:func:`gpucrypt.cli.keys.check_passphrase_file`)."""
    given = [name for name in KEY_SOURCES if getattr(args, name, None)]
    for i, first in enumerate(given):
        for second in given[i + 1:]:
            if frozenset((first, second)) not in KEY_SOURCES_TOGETHER:
                raise CliError(f"{KEY_SOURCES[first]} and {KEY_SOURCES[second]} cannot be used "
                               f"together: one of them would be ignored; give one way to key "
                               f"the file", 2)
    cli_keys = _key_management()
    if cli_keys is not None:
        cli_keys.check_passphrase_file(args, given)
    return given


# --------------------------------------------------------------------------- key files
def add_unsafe_key_permissions(parser: argparse.ArgumentParser) -> None:
    """Add ``--unsafe-key-permissions``, read by :func:`check_private_file`."""
    parser.add_argument("--unsafe-key-permissions", action="store_true",
                        help="use key, keyset, identity and passphrase files that group or "
                             "others can access (refused by default, as ssh refuses such keys)")


def check_private_file(path: str, what: str, args: Any) -> None:
    """Refuse a regular file holding secrets (``what``: "key file", "identity", ...) that
    group or others may access, with the ``chmod`` that fixes it, unless the user gave
    ``--unsafe-key-permissions``. Other problems (a missing file) are left to the reader."""
    if os.name != "posix" or getattr(args, "unsafe_key_permissions", False):
        return
    try:
        st = os.stat(path)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077:
        raise CliError(f"{what} {path} is accessible by group or others (mode "
                       f"{stat.S_IMODE(st.st_mode):04o}): run 'chmod 600 {path}', or give "
                       f"--unsafe-key-permissions to use it anyway", 2)


# --------------------------------------------------------------------------- raw keys
def read_key_file(path: str, args: Any = None) -> bytes:
    """The 32-byte key in ``path``: 32 raw bytes, or 64 hex digits with an optional newline
    (refused when group or others may read it, see :func:`check_private_file`)."""
    check_private_file(path, "key file", args)
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
    hint = ""
    if len(data) in (33, 34) and data.endswith(b"\n"):  # `echo`, or an editor, added it
        hint = ("; a raw key file holds its 32 bytes and nothing else: this one ends in a "
                "newline (write it with 'head -c 32 /dev/urandom > FILE', or store the key "
                "as 64 hex digits)")
    raise CliError(f"{what} must hold 32 raw bytes or 64 hex digits (it has {size}){hint}", 2)


# --------------------------------------------------------------------------- arguments
def _key_management() -> ModuleType | None:
    """:mod:`gpucrypt.cli.keys`, or None when key management is not installed."""
    try:
        from . import keys as _cli_keys
    except ImportError:  # key management not installed: raw keys only
        return None
    return _cli_keys


def audited(args: Any, operation: str, path: str):
    """A block recording one audit event of a file command when ``--audit-log`` is given
    (:func:`gpucrypt.cli.keys.audited_command`); recording nothing otherwise. Yields a dict
    of fields for the event (``algorithm``, ``bytes``, ``device``)."""
    cli_keys = _key_management()
    if cli_keys is None or getattr(args, "audit_log", None) is None:
        return contextlib.nullcontext({})
    return cli_keys.audited_command(args, operation, path)


def device_chosen(args: Any, event: dict):
    """:func:`gpucrypt.audit.device_chosen` for the event :func:`audited` yields, when
    ``--audit-log`` is given; a list nothing reads otherwise (gpucrypt.audit, and the
    threading it loads, stay out of a command that records nothing)."""
    if getattr(args, "audit_log", None) is None:
        return contextlib.nullcontext([])
    from .. import audit

    return audit.device_chosen(event)


def add_input_output_and_keys(parser: argparse.ArgumentParser, input_help: str,
                              output_help: str, *, streams: bool = False) -> None:
    """Add ``IN`` and ``OUT``, ``--key-file``/``--key-env`` (exclusive, as every key option:
    :func:`check_key_sources`) and ``--unsafe-key-permissions``. ``streams``: IN and OUT
    are optional (stdin and stdout), and ``-o OUT`` may name OUT instead
    (:func:`output_path` reads both)."""
    if streams:
        parser.add_argument("input", metavar="IN", nargs="?", default="-", help=input_help)
        parser.add_argument("output", metavar="OUT", nargs="?", default=None, help=output_help)
        parser.add_argument("-o", "--output", dest="output_option", metavar="OUT",
                            help="the output file (instead of the positional OUT)")
    else:
        parser.add_argument("input", metavar="IN", help=input_help)
        parser.add_argument("output", metavar="OUT", help=output_help)
    parser.add_argument("--key-file", metavar="FILE",
                        help="the 32-byte key: raw bytes, or 64 hex digits (mode 0600)")
    parser.add_argument("--key-env", metavar="VAR",
                        help="environment variable holding the key as 64 hex digits")
    add_unsafe_key_permissions(parser)


def output_path(args: Any) -> str:
    """OUT from the positional argument or ``-o``, ``-`` (stdout) when neither was given;
    a usage CliError when both were."""
    positional, option = args.output, getattr(args, "output_option", None)
    if positional is not None and option is not None:
        raise CliError(f"OUT given twice ({positional} and -o {option}): give one", 2)
    return option if option is not None else (positional if positional is not None else "-")


def add_device(parser: argparse.ArgumentParser, help: str) -> None:
    """``--device auto|cpu|gpu`` ("cuda", as frameworks spell it, is "gpu")."""
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        type=lambda name: "gpu" if name == "cuda" else name, help=help)


def add_algorithm(parser: argparse.ArgumentParser) -> None:
    """``--algorithm`` of the file formats ("aes-gcm", the tensor API's name, is aes-256-gcm)."""
    from ..files._format import ALGORITHM_ALIASES, ALGORITHMS

    parser.add_argument("--algorithm", choices=tuple(ALGORITHMS), default="chacha20-poly1305",
                        type=lambda name: ALGORITHM_ALIASES.get(name, name),
                        help="AEAD for the segments (default: chacha20-poly1305)")


def add_force(parser: argparse.ArgumentParser,
              help_text: str = "overwrite OUT if it exists") -> None:
    """Add ``-f/--force`` (overwrite an existing OUT), read by :func:`check_output`."""
    parser.add_argument("-f", "--force", action="store_true", help=help_text)


def add_key_management(parser: argparse.ArgumentParser, mode: str) -> None:
    """Add the recipient/identity/keyset options for ``mode`` ("encrypt" or "decrypt")
    when :mod:`gpucrypt.cli.keys` is installed; nothing otherwise."""
    cli_keys = _key_management()
    if cli_keys is not None:
        cli_keys.add_key_arguments(parser, mode)


# --------------------------------------------------------------------------- key resolution
def _raw_key(args: Any) -> bytes | None:
    if args.key_file:
        return read_key_file(args.key_file, args)
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
                    "(or -r/-i/--keyset, or -p for a passphrase)", 2)


def check_sealing_options(args: Any) -> None:
    """``--segment-size`` and a GPU that cannot run (``--device gpu``, or ``GPUCRYPT_DEVICE=gpu``
    for ``--device auto``; or a ``GPUCRYPT_DEVICE`` that is no device) refused (through
    :func:`run_reporting_errors`: exit 2) before any key is read: they were refused after
    the data key was sealed, a KMS or HSM call the audit log records, for a usage error."""
    def check():
        from ..files._format import check_segment_size

        check_segment_size(args.segment_size)
        from ..backends import small_payloads_on_cpu

        small_payloads_on_cpu(args.device)  # BackendUnavailable or ValueError, with the reason

    run_reporting_errors(args, check)


def key_read(args: Any) -> None:
    """Note that the command has begun to read its keys: from here on, a failure is an
    event of the audit log (``--audit-log``), where a refusal before it is a usage error
    that used no key."""
    args.audit_key_read = True


def encrypt_keys(args: Any) -> tuple[bytes, str | None, bytes | None]:
    """``(key, key_id, envelope)`` to encrypt with: the raw key (no key id, no envelope),
    else a fresh data key wrapped for the recipients/keyset; usage CliError if none given."""
    key_read(args)
    key = _raw_key(args)
    if key is not None:
        return key, None, None
    cli_keys = _key_management()
    resolved = cli_keys.resolve_encrypt_keys(args) if cli_keys is not None else None
    if resolved is None:
        raise _no_key()
    return resolved


def decrypt_key(args: Any, header: Any) -> bytes:
    """The key to decrypt the file whose (unauthenticated) ``header`` is given, or a
    function that reads it: the raw key, else the data key unwrapped from its envelope;
    usage CliError if no key was given. The function is called only for the envelope: a
    raw key needs no header before the real open, which checks it under the key."""
    key_read(args)
    key = _raw_key(args)
    if key is not None:
        # a file sealed for recipients or a keyset opened with a raw key: if its header fails,
        # the error says which options open it (run_reporting_errors reads the header then,
        # where only a function that reads it was given)
        args.raw_key_for_envelope = header if callable(header) else \
            bool(getattr(header, "envelope", None))
        return key
    cli_keys = _key_management()
    if cli_keys is None:
        raise _no_key()
    key = cli_keys.resolve_decrypt_key(args, header() if callable(header) else header)
    if key is None:
        raise _no_key()
    return key


# --------------------------------------------------------------------------- output and errors
def check_output(args: Any, binary_ciphertext: bool):
    """Where to write: ``sys.stdout.buffer`` for ``-`` (refused for ciphertext on a terminal
    without ``--force``, and when stdout was closed), else the path OUT
    (:func:`output_path`) as :func:`check_output_path` accepts it."""
    out = output_path(args)
    if out == "-":
        if getattr(sys.stdout, "gpucrypt_closed", sys.stdout is None):
            from . import closed_stream_error

            raise closed_stream_error("stdout", "give the output file as OUT or -o OUT")
        if binary_ciphertext and sys.stdout.isatty() and not args.force:
            raise CliError("refusing to write ciphertext to a terminal; redirect stdout, "
                           "give -o OUT, or give --force", 2)
        return sys.stdout.buffer
    return check_output_path(out, args.force)


def streamed_output(path: str) -> bool:
    """Whether the output ``path`` is written in place, as a stream (stdout's way): it
    exists and is a FIFO or a character device (``/dev/null``, a terminal), a symbolic
    link followed (``/dev/stdout``). Such a node cannot take a file renamed over it, and
    must not: publishing an AtomicFile there replaced it with a regular file, and as root
    ``-o /dev/null -f`` replaced the machine's /dev/null."""
    from ..files._atomic import streamed_path  # the library's own test (open_output)

    return streamed_path(path)


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words, for messages."""
    from ..files._atomic import file_kind as kind

    return kind(mode)


def _streamed_mode(mode: int) -> bool:
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def check_output_path(out: str, force: bool) -> str:
    """``out``, unless it is a folder, or exists and ``force`` is off, or exists and is
    neither a regular file nor streamed (a block device, a socket: refused even with
    ``force``); usage CliErrors. A FIFO or a character device (:func:`streamed_output`)
    is accepted with or without ``force``: it is written in place, never replaced."""
    try:
        mode = os.stat(out).st_mode  # one look: the tests below are of this one answer
    except (OSError, ValueError):  # missing, or a dangling link (refused below)
        mode = None
    if mode is not None and _streamed_mode(mode):
        return out  # /dev/stdout, a link to a FIFO: written in place, as itself
    if os.path.islink(out):  # before "exists": --force would not help
        raise CliError(link_refusal(out), 2)
    if out.endswith(("/", os.sep)):  # stat("file/") is ENOTDIR: it passed as "missing"
        raise CliError(f"output {out} ends in '/', which names a folder: give a file's path "
                       f"(a folder's, with the file's name after the '/')", 2)
    if mode is None:
        return out
    if stat.S_ISDIR(mode):
        raise CliError(f"output is a directory: {out}", 2)
    if not stat.S_ISREG(mode):
        raise CliError(f"output {out} is a {file_kind(mode)}, which gpucrypt does not write "
                       f"to, with or without --force: give a file's path (a FIFO or a "
                       f"character device such as /dev/null is written to as a stream)", 2)
    if not force:
        raise CliError(f"output exists: {out} (give --force to overwrite it)", 2)
    return out


def link_refusal(path: str) -> str:
    """Why an output ``path`` that is a symbolic link is refused (exit 2, with or without
    --force): publishing would rename over the link, and writing through it would let a
    planted link choose where the data go (:class:`gpucrypt.files._atomic.AtomicFile`)."""
    try:
        target = f" (to {os.readlink(path)})"
    except OSError:
        target = ""
    return (f"cannot write {path}: it is a symbolic link{target}; gpucrypt does not write "
            f"through links, with or without --force: give the file it points to as the "
            f"output, or remove the link first")


def refuse_dash(path: str, option: str, what: str) -> None:
    """A usage CliError for ``-`` given as ``option`` where it would not be stdout but a
    file named "-" (``keygen -o``, ``bench --json``)."""
    if path == "-":
        raise CliError(f"{option} - would write a file named '-': {what}; give a file's path "
                       f"(./- for a file of that name)", 2)


def atomic_output(path: str, force: bool, mode: int = 0o600):
    """An :class:`~gpucrypt.files._atomic.AtomicFile` for ``path`` (replacing a file only
    with ``force``), made now so that a missing or read-only folder is reported, naming
    ``path``, before any work: a CliError (exit 1)."""
    from ..files._atomic import AtomicFile

    try:
        return AtomicFile(path, mode, overwrite=force)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}", 1) from None


class StreamedOutput:
    """An output written in place (:func:`streamed_output`), with an AtomicFile's
    ``write``/``commit``: opened now (a FIFO waits here for its reader, before any work),
    closed when committed or when the block ends. ``file``: the open binary file, for a
    library that takes a file object. A failed close (the last buffered bytes not
    written) is a CliError naming the path, unless the block is already failing (its own
    error is the one to report)."""

    def __init__(self, path: str):
        self.path = path
        from ..files._atomic import open_streamed

        try:
            self.file = open(open_streamed(path), "wb")
        except OSError as exc:
            raise CliError(f"cannot write {path}: {exc.strerror or exc}", 1) from None
        self.write = self.file.write

    def commit(self) -> None:
        self._close(report=True)

    def _close(self, report: bool) -> None:
        try:
            self.file.close()  # closes even when its flush fails
        except OSError as exc:
            if report:
                raise CliError(f"cannot write {self.path}: {exc.strerror or exc}", 1) from None

    def __enter__(self) -> "StreamedOutput":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close(report=exc_type is None)


@contextlib.contextmanager
def destination(args: Any, binary_ciphertext: bool) -> Iterator[Any]:
    """What to give the library as ``dst``: stdout, or for a path an
    :class:`~gpucrypt.files._atomic.AtomicFile` made now (so that a missing or read-only
    folder is reported, naming OUT, before any input is read), published when the work
    commits it and dropped if the block raises. Without ``--force`` it never replaces a
    file: one that appeared at OUT while we wrote makes the commit fail ("output
    exists", exit 1, reported by :func:`run_reporting_errors`). A FIFO or character
    device at OUT is opened and written in place as stdout is (:class:`StreamedOutput`):
    ``decrypt`` then writes each batch of segments once it verified, so a failure can
    leave the verified segments before it written there, as on stdout."""
    target = check_output(args, binary_ciphertext)
    if not isinstance(target, str):
        yield from _guarded(target, args, binary_ciphertext)
        return
    if streamed_output(target):
        with StreamedOutput(target) as out:
            if binary_ciphertext and out.file.isatty() and not args.force:
                raise CliError(f"refusing to write binary output to a terminal ({target}); give "
                               f"another OUT, or give --force", 2)
            yield from _guarded(out.file, args, binary_ciphertext)
        return
    with atomic_output(target, bool(args.force)) as out:
        yield out


def _guarded(file: Any, args: Any, binary_ciphertext: bool) -> Iterator[Any]:
    """Yields ``file``, or for plaintext to a terminal without ``--force`` a
    :class:`TerminalText` over it, finished when the block ends without an error."""
    if binary_ciphertext or args.force or not file.isatty():
        yield file
        return
    text = TerminalText(file)
    yield text
    text.finish()


#: what a terminal must not be sent from a decrypted file: C0 controls but tab, line feed
#: and carriage return (ESC starts the escape sequences), DEL, and the C1 controls (U+009B
#: is a one-character CSI to some terminals)
_TERMINAL_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _not_text() -> CliError:
    return CliError("refusing to write the plaintext to a terminal: it is binary, or it holds "
                    "terminal control characters (escape sequences) that would drive the "
                    "terminal; redirect stdout (> FILE, | less), give an OUT file, or give "
                    "--force to write it anyway", 1)


class TerminalText:
    """A terminal as ``decrypt``'s output, written to as long as the plaintext is text:
    the first write holding bytes that are no UTF-8, or control characters (see
    _TERMINAL_CONTROLS), raises CliError before any of it reaches the terminal. Binary
    data garbles a terminal, and a crafted file's plaintext could drive it with escape
    sequences (rewrite what is on the screen, set its title, on some terminals more).
    What was written before, all verified plaintext, stays. A character split between two
    writes is held back until it is whole; one never finished is refused at the end
    (:meth:`finish`). rage refuses unprintable plaintext the same way; ``--force`` writes
    anything."""

    def __init__(self, file: Any):
        import codecs

        self._file = file
        # a character may be split between two writes: its first bytes are held back (not
        # written: "\xc2" then the next program's "\x9b" would make a CSI) until it is whole
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._held = b""

    def write(self, data: Any) -> int:
        given = bytes(data)
        try:
            text = self._decoder.decode(given)
        except UnicodeDecodeError:
            text = None
        if text is None or _TERMINAL_CONTROLS.search(text):
            raise _not_text()
        from ..files._atomic import write_all  # loaded by then: the output is a gpucrypt one

        whole = self._held + given
        self._held = self._decoder.getstate()[0]
        write_all(self._file, memoryview(whole)[:len(whole) - len(self._held)])
        return len(given)

    def finish(self) -> None:
        """At the end of the plaintext: a character begun and never finished is no text."""
        try:
            self._decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise _not_text() from None

    def __getattr__(self, name: str) -> Any:  # fileno, flush, isatty, ...: the terminal's
        return getattr(self._file, name)


def refuse_input_as_output(args: Any, reader: Any = None, dst: Any = None, *,
                           replacing: str | None = None) -> None:
    """A usage CliError (exit 2) when the output is the input file, in two cases:

    - ``reader`` and ``dst`` (the open input and output) are one regular file: stdout is
      the input (``gpucrypt encrypt f >> f``, or ``< f >> f``), so the output would be read
      back as input (it exited 0 with the file's own header encrypted into it);
    - ``replacing`` (what publishing OUT would replace, in words) is given and OUT names
      IN itself (:func:`_replaces_input`). OUT is written to a new file, so IN is read whole,
      but it is then renamed over IN: ``decrypt --force s.gc s.gc`` exited 0 leaving the
      plaintext where the only ciphertext was. The library refuses ``src == dst``
      (:func:`gpucrypt.files.stream._refuse_same_file`), but it is handed the new file
      and cannot see that it will take IN's place, so the command line checks the paths.
      ``encrypt`` passes no ``replacing``: ``encrypt --force f f``, replacing a file by its
      encryption, is what it documents.

    Call it with ``replacing`` before OUT is made, so that the refusal comes before
    "output exists" and before any key or passphrase is asked for."""
    out = output_path(args) if replacing is not None else "-"
    if out != "-" and _replaces_input(args.input, out):
        which = f"({out})" if out == args.input else \
            "(stdin reads the file OUT names, its only name)" if args.input == "-" else \
            f"({out} leads to {args.input})"
        raise CliError(f"the input is the output {which}: writing it would replace "
                       f"{replacing}; choose another OUT (and rename it over IN "
                       f"afterwards if that is what you want)", 2)
    try:
        written, read = os.fstat(dst.fileno()), os.fstat(reader.fileno())
    except (AttributeError, OSError, ValueError):  # no descriptor: not a file of the system
        return
    if stat.S_ISREG(written.st_mode) and (written.st_dev, written.st_ino) == \
            (read.st_dev, read.st_ino):
        name = "the file stdin reads" if args.input == "-" else args.input
        raise CliError(f"the input is the output: stdout is {name}; write to another "
                       f"file, or give it as OUT (written to a new file, then renamed "
                       f"into place)", 2)


def _replaces_input(source: str, out: str) -> bool:
    """Whether publishing OUT (a new file renamed over the place ``out`` leads to) would
    take the input's last name: ``out`` leads (symbolic links followed) to the regular
    file ``source`` names (or stdin reads), and that file has no other name, or ``out`` is
    IN's own path. A hard link to IN elsewhere is not: the rename replaces that name only,
    and IN keeps its bytes. A FIFO or a character device is never replaced either: it is
    written as a stream."""
    try:
        read = os.fstat(0) if source == "-" else os.stat(source)
        written = os.stat(out)
    except (OSError, ValueError):  # OUT does not exist yet (or IN is missing: said later)
        return False
    if not stat.S_ISREG(read.st_mode) or \
            (read.st_dev, read.st_ino) != (written.st_dev, written.st_ino):
        return False
    # the same file: replacing OUT's name loses it unless IN keeps a name of its own (the
    # paths differ once links are resolved, and the file has another name: a hard link;
    # a bind mount or a case-insensitive file system give one file two paths, one name)
    return read.st_nlink == 1 or (source != "-" and
                                  os.path.realpath(source) == os.path.realpath(out))


#: names of the functions (the library's and ours) whose OSErrors are the input's, and
#: those whose OSErrors are the output's: the library reads and writes descriptors itself
#: (pread and pwrite in its workers), so its errors name no file, and where one was raised
#: is what tells which side failed (:func:`_failed_side`)
_READING = frozenset({"read_at", "fill", "read", "readinto", "_check_unchanged",
                      "_read_exact", "_read_into", "read_header"})
_WRITING = frozenset({"pwrite_all", "write_all", "write", "commit", "flush",
                      "_write_position", "start_writeback"})
#: errnos that only a write gives: the side when no frame tells
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EPIPE})


def _failed_side(exc: OSError) -> str | None:
    """"input" or "output": the side of the transfer whose OSError ``exc`` is, judged by
    the innermost reading or writing function it was raised in (or by its errno); None
    when neither tells."""
    names = []
    tb = exc.__traceback__
    while tb is not None:
        names.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    for name in reversed(names):
        if name in _READING:
            return "input"
        if name in _WRITING:
            return "output"
    return "output" if exc.errno in _WRITE_ERRNOS else None


def _io_error(args: Any, exc: OSError) -> str:
    """The one-line message for an I/O error of a file command: the file it names ("cannot
    write OUT" when that is OUT, or a write's error: :func:`named_io_error`), else which
    side failed, IN (or stdin) or OUT (or stdout)."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename:
        out = output_path(args) if hasattr(args, "output") else "-"
        if out != "-" and _same_path(exc.filename, out):
            return f"cannot write {exc.filename}: {reason}"
        given = getattr(args, "input", None)
        # IN's, whatever its errno: ENOSPC from a FUSE source or a read-through cache on a
        # full disk is not a write's (named_io_error judges other files by errno)
        if isinstance(given, str) and given != "-" and _same_path(exc.filename, given):
            return f"cannot read {exc.filename}: {reason}"
        return named_io_error(exc)
    side = _failed_side(exc)
    if side == "input" and getattr(args, "input", None) is not None:
        name = "stdin" if args.input == "-" else args.input
        return f"cannot read {name}: {reason}"
    if side == "output" and hasattr(args, "output"):
        out = output_path(args)
        return f"cannot write {'stdout' if out == '-' else out}: {reason}"
    return f"I/O error: {reason}"


def named_io_error(exc: OSError) -> str:
    """The one-line message for an ``OSError`` naming a file: "cannot write FILE: reason"
    for the errors only a write gives (a full disk, a quota, a file-size limit, a
    read-only file system), else "FILE: reason"."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in _WRITE_ERRNOS or exc.errno == errno.EROFS:
        return f"cannot write {exc.filename}: {reason}"
    return f"{exc.filename}: {reason}"


def _same_path(name: Any, path: str) -> bool:
    """Whether the file name an error gives is ``path`` (either may be relative)."""
    try:
        return os.path.abspath(os.fsdecode(name)) == os.path.abspath(path)
    except (TypeError, ValueError):
        return False


def _input_changed(exc: ValueError) -> bool:
    """Whether ``exc`` is the stream's "the input file grew/shrank while it was being
    encrypted" (a ValueError of gpucrypt.files.stream, told by its words: there is no
    class for it). The data changed under the encryption, which is exit 1 (the data
    failed), not a usage error."""
    text = str(exc)
    return text.startswith("the input file ") and "while it was being encrypted" in text


def _sealed_for_others(args: Any) -> bool:
    """Whether the file a raw key failed to open carries an envelope (see decrypt_key)."""
    probe = getattr(args, "raw_key_for_envelope", False)
    if not callable(probe):
        return bool(probe)
    from ..files._format import StreamError

    try:
        return bool(getattr(probe(), "envelope", None))
    except (OSError, ValueError, StreamError):  # the header itself is what failed
        return False


#: the commands whose ``--device`` (:func:`add_device`) says where the cipher runs, named
#: where the advice is given elsewhere (``info``, ``warmup``). ``decrypt-model`` has none:
#: it exports on the CPU's threads; ``bench --device`` chooses what to measure, not where
#: a file is encrypted. A test checks this against the commands' parsers.
DEVICE_COMMANDS = ("encrypt", "decrypt", "encrypt-model")


def in_option_words(advice: str, elsewhere: bool = False) -> str:
    """The library's advice about the backend, in the command line's words: its Python
    ``device='cpu'`` is the option ``--device cpu`` here (``elsewhere``: of the commands
    that take it, :data:`DEVICE_COMMANDS`, for one that does not, such as ``info``)."""
    return advice.replace("device='cpu'", "--device cpu" + (
        f" ({', '.join(DEVICE_COMMANDS)})" if elsewhere else ""))


def run_reporting_errors(args: Any, work: Callable[[], Any]) -> int:
    """Run ``work()``, turning the library's errors into one-line CliErrors; 0 on success."""
    from ..backends import BackendUnavailable
    from ..files._atomic import OutputExists
    from ..files.stream import AuthenticationError, FormatError, TruncatedError, UnsupportedVersion

    try:
        work()
    except TruncatedError as exc:
        raise CliError(str(exc), 1) from None
    except AuthenticationError as exc:
        if exc.segment is not None:  # the header verified: the key is right
            raise CliError(f"tampered or damaged data: {exc}", 1) from None
        hint = ("; this file is sealed for recipients or a keyset (its header holds their "
                "wrapped keys): open it with -i IDENTITY or --keyset, not a raw key"
                if _sealed_for_others(args) else "")
        raise CliError(f"wrong key or tampered data: {exc}{hint}", 1) from None
    except UnsupportedVersion as exc:
        raise CliError(str(exc), 1) from None
    except FormatError as exc:
        raise CliError(f"{'stdin' if args.input == '-' else args.input}: {exc}", 1) from None
    except BackendUnavailable as exc:
        if exc.environment is not None:  # GPUCRYPT_DEVICE chose it: --device said auto
            raise CliError(in_option_words(str(exc)), 2) from None
        raise CliError(f"device {args.device!r} unavailable: {in_option_words(str(exc))}",
                       2) from None
    except BrokenPipeError:
        raise CliError("output closed early (broken pipe)", 1) from None
    except OutputExists as exc:  # the AtomicFile's publishing without --force
        raise CliError(f"output exists: {exc.filename} (it appeared while gpucrypt was "
                       f"writing and was left as it is; give --force to overwrite it)",
                       1) from None
    except (ValueError, OverflowError) as exc:  # e.g. a segment size out of range
        if isinstance(exc, ValueError) and _input_changed(exc):
            # a file of /proc, say, whose size (0) is not its length, or one being written
            name = "stdin" if args.input == "-" else args.input
            raise CliError(f"{name}: {str(exc).split(';')[0]}, or its size is not its "
                           f"length (as for files in /proc): copy it to a regular file "
                           f"first, or pipe it in (cat FILE | gpucrypt encrypt ...)",
                           1) from None
        raise CliError(str(exc), 2) from None
    except OSError as exc:
        if is_audit_failure(exc):  # the log's failure, not the work's: gpucrypt.cli says so
            raise
        raise CliError(_io_error(args, exc), 1) from None
    return 0
