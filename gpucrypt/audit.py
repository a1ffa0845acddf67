"""Structured audit events: one JSON object per line, through the standard ``logging`` module.

Events go to the logger ``gpucrypt.audit`` at level INFO. Nothing is emitted unless
the application configures logging for it (the library installs only a
``NullHandler``), and building an event costs nothing when the logger is disabled.
:func:`enable` is a one-line way to send the events to a file or stream.

Contract of :func:`event` (stable; :mod:`gpucrypt.keys` calls it)::

    event(operation: str, *, outcome: str = "ok", **fields) -> None

- ``operation``: what happened, dotted lower-case words (``"envelope.seal"``,
  ``"file.encrypt"``, ``"keyset.promote"``).
- ``outcome``: ``"ok"`` or ``"error"``.
- ``fields``: only the names in :data:`FIELDS`, each holding ``str``, ``int``,
  ``float``, ``bool``, ``None`` or a list of ``str``. Anything else (an unknown
  name, ``bytes``, a ``bytearray``, an array) raises ``TypeError`` before a line is
  written: an audit log must never be a place where key material, nonces or
  plaintext can land by accident, so the helper refuses binary values outright.

What is recorded: key ids, algorithm names, byte counts, the device, durations,
recipients' public fingerprints, file paths, and for failures the error's class
name (plus its message only for gpucrypt's own key-management errors, whose
messages are written to hold no secrets). Never: keys in any encoding,
passphrases, nonces paired with keys, plaintext, or arbitrary exception messages.

Every line also says who acted: ``pid`` (the process) and, on POSIX, ``uid`` (its
effective user id); a local ``path`` is recorded absolute (a relative one means nothing
without the working directory it was relative to). Each line looks like::

    {"ts": "2026-01-01T12:00:00.123Z", "operation": "file.encrypt", "outcome": "ok",
     "pid": 4242, "uid": 1000, "path": "/data/model.gcry",
     "key_id": "3f9c2a6d0b1e4f57", "algorithm": "chacha20-poly1305", "bytes": 4096,
     "device": "cpu", "duration_s": 0.0012, "recipients": ["x25519:1a2b..."]}
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from datetime import datetime, timezone
from typing import Any, Iterator

from ._errors import KeyManagementError

try:
    from fcntl import LOCK_EX, LOCK_UN, flock as _flock
except ImportError:  # not POSIX: appends are not locked (see _AuditFileHandler)
    _flock = None

__all__ = ["LOGGER_NAME", "FIELDS", "event", "timed", "device_chosen", "enable",
           "error_fields", "AuditLogError"]

LOGGER_NAME = "gpucrypt.audit"

#: Field names an event may carry, with what each holds.
FIELDS = {
    "key_id": "id of the key used (keyset key id, or a recipient fingerprint)",
    "key_ids": "list of key ids involved",
    "algorithm": "algorithm name, e.g. chacha20-poly1305, aes-256-kwp, hpke-x25519",
    "bytes": "payload size in bytes",
    "device": "where the work ran: cpu or gpu (a model load: cpu, cuda or cuda:N; a folder "
              "whose files ran on both: cpu+gpu); the device asked for (auto) only when the "
              "operation failed before one was chosen",
    "duration_s": "wall-clock seconds the operation took",
    "recipients": "list of recipient fingerprints (public) or key ids the data key is wrapped for",
    "path": "file path operated on",
    "provider": "the key provider that wrapped or unwrapped a data key: keyset, pkcs11, awskms",
    "key_ref": "the key reference (URI without its query: no module path, no PIN source)",
    "count": "number of items (stanzas, keys, tensors)",
    "status": "a key's status after the operation",
    "error": "for outcome=error: the error class, and for gpucrypt's key errors their message",
}

_logger = logging.getLogger(LOGGER_NAME)
_logger.addHandler(logging.NullHandler())

_SCALARS = (str, int, float, bool, type(None))


def _check(name: str, value: Any) -> Any:
    if name not in FIELDS:
        raise TypeError(f"audit.event: unknown field {name!r}; allowed: {sorted(FIELDS)}")
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"audit.event: field {name!r} must be str, int, float, bool, None or a "
                    f"list of str, not {type(value).__name__} (binary values are refused so "
                    f"that no key or plaintext can reach the log)")


def event(operation: str, *, outcome: str = "ok", **fields: Any) -> None:
    """Emit one audit event (see the module docstring for the contract)."""
    if not isinstance(operation, str):
        raise TypeError("audit.event: operation must be a str")
    if outcome not in ("ok", "error"):
        raise ValueError("audit.event: outcome must be 'ok' or 'error'")
    checked = {name: _check(name, value) for name, value in fields.items()}
    path = checked.get("path")
    if isinstance(path, str) and path and "://" not in path:  # a URL names its place itself
        checked["path"] = os.path.abspath(path)  # now: a held event is written later
    for held_operation, held in reversed(getattr(_holding, "stack", ())):
        if held_operation == operation:  # written later, by _release (see _held)
            held.append((operation, outcome, checked))
            return
    # A logger disabled under enable()'s handlers (dictConfig's disable_existing_loggers,
    # True by default, disables every logger it does not name) would leave a silent gap
    # in a log the application asked for: those handlers still get the event.
    own = _own_handlers() if _logger.disabled else []
    if not (_logger.isEnabledFor(logging.INFO) or own and _level_allows(logging.INFO)):
        return
    now = datetime.now(timezone.utc)
    record = {"ts": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
              "operation": operation, "outcome": outcome, "pid": os.getpid()}
    if hasattr(os, "geteuid"):
        record["uid"] = os.geteuid()
    record.update(checked)
    message = json.dumps(record, separators=(", ", ": "))
    if not own:
        _logger.info(message, extra={"audit": record})
        return
    log_record = _logger.makeRecord(_logger.name, logging.INFO, "(audit)", 0, message, (),
                                    None, extra={"audit": record})
    if not _logger.filter(log_record):  # the application's filters hold all the same
        return
    for handler in own:
        if log_record.levelno >= handler.level:
            handler.handle(log_record)


#: per thread, the operations whose events are being held back (:func:`_held`), innermost
#: last, each with the list its events go to
_holding = threading.local()


@contextlib.contextmanager
def _held(operation: str) -> Iterator[list]:
    """Hold back the ``operation`` events this thread emits in the block: each goes to the
    list yielded instead of the log, for :func:`_release` to write once the step that
    decides the work's outcome is done: a file sealed beside its target
    (:mod:`gpucrypt.fs`), whose ``encrypt_file`` logged "ok" before the move that
    publishes it, which may still fail (the caller told it failed, the log that it was
    done). Other operations' events are written as usual. If the block raises, what it
    held (those events record that failure) is written before the exception goes on."""
    stack = _holding.__dict__.setdefault("stack", [])
    held: list = []
    stack.append((operation, held))
    try:
        yield held
    except BaseException:
        stack.pop()
        _release(held)
        raise
    stack.pop()


def _release(held: list, error: str | None = None) -> None:
    """Write the events :func:`_held` held back, and empty ``held``: as they were, or with
    ``error`` (what made the later step fail: :func:`error_fields`, or words) as ``error``
    events."""
    events, held[:] = list(held), []
    for operation, outcome, fields in events:
        if error is not None:
            outcome, fields = "error", {**fields, "error": error}
        event(operation, outcome=outcome, **fields)


def _own_handlers() -> list[logging.Handler]:
    """The handlers :func:`enable` attached to the audit logger."""
    return [h for h in _logger.handlers if isinstance(h, _Raising)]


def _level_allows(level: int) -> bool:
    """Whether the audit logger takes ``level``, its ``disabled`` flag aside (the level
    and :func:`logging.disable` still hold: those an application sets on purpose)."""
    return _logger.manager.disable < level and level >= _logger.getEffectiveLevel()


def error_fields(exc: BaseException) -> str:
    """What an event may say about ``exc``: its class name, and the message only for
    gpucrypt's key-management errors (which never carry secrets)."""
    name = type(exc).__name__
    if isinstance(exc, KeyManagementError):
        return f"{name}: {exc}"
    return name


@contextlib.contextmanager
def timed(operation: str, **fields: Any) -> Iterator[dict]:
    """Time a block and emit one event when it ends, ``ok`` or ``error``.

    Yields a dict the block may fill with more fields (say ``bytes`` once known).
    On an exception the event records ``outcome="error"`` and :func:`error_fields`,
    then the exception propagates unchanged.
    """
    for name, value in fields.items():
        _check(name, value)  # refuse bad fields before the work starts
    extra: dict = {}
    start = time.perf_counter()
    try:
        yield extra
    except BaseException as exc:
        merged = {**fields, **extra, "error": error_fields(exc)}
        event(operation, outcome="error", duration_s=round(time.perf_counter() - start, 6),
              **merged)
        raise
    event(operation, outcome="ok", duration_s=round(time.perf_counter() - start, 6),
          **{**fields, **extra})


@contextlib.contextmanager
def device_chosen(fields: dict) -> Iterator[list]:
    """Yields a list for the work to append the device it chose to (the ``_ran_on``
    argument of gpucrypt's stream and model functions); once it holds one, ``fields`` (an
    event's, as :func:`timed` yields) records it as ``device``, whether the block then
    succeeds or fails (a tampered segment, after the device was chosen). Several pieces of
    work on several devices (a folder's files): "cpu+gpu"."""
    chosen: list = []
    try:
        yield chosen
    finally:
        if chosen:
            fields["device"] = "+".join(sorted(set(chosen)))


class AuditLogError(OSError):
    """An audit event could not be written (a full disk, a closed stream): raised from
    :func:`event` (and so from the operation that emitted it), never passed over as
    logging's own handlers do (they print "--- Logging error ---" and go on), since a gap
    in an audit log is what it exists to rule out. ``operation`` and ``outcome``: the
    event that is missing (``error``: its error field, if it recorded a failure);
    ``filename``: the log (None for a stream); ``errno``: None
    where the write failed other than with ``OSError`` (a closed stream's ``ValueError``).

    An ``ok`` event is written once its work is done, so an error for one comes from an
    operation whose work stands (``Keyset.save`` raises with the file written,
    ``decrypt_file`` with the output written): the message says so (:attr:`consequence`)."""

    def __init__(self, exc: BaseException, record: logging.LogRecord, filename: str | None):
        audit = getattr(record, "audit", {})
        super().__init__(getattr(exc, "errno", None), getattr(exc, "strerror", None) or str(exc),
                         filename)
        self.operation = audit.get("operation")
        self.outcome = audit.get("outcome")
        self.error = audit.get("error")  # what a lost error event recorded, or None

    @property
    def consequence(self) -> str:
        """What the missing event leaves unrecorded: the work done, or its failure."""
        if self.outcome == "ok":
            return "it was done but is not recorded"
        return "it failed, and the failure is not recorded"

    def __str__(self) -> str:
        where = f"the audit log {self.filename}" if self.filename is not None \
            else "the audit log's stream"
        stands = ": its result stands" if self.outcome == "ok" else ""
        return (f"cannot write {where}: {self.strerror}. The event {self.operation!r} is missing "
                f"from it ({self.consequence}{stands}); note the event in the log by hand once "
                f"the log can be written")


class _Raising:
    """For the handlers :func:`enable` makes: a failed write raises (as
    :class:`AuditLogError`) instead of logging's default of printing a traceback on
    stderr and going on."""

    def handleError(self, record: logging.LogRecord) -> None:
        import sys

        exc = original = sys.exc_info()[1]  # called from the handler's except clause
        if isinstance(exc, AuditLogError):
            raise  # noqa: PLE0704 - re-raises the error being handled
        if isinstance(exc, ValueError) and getattr(self.stream, "closed", False):
            exc = ValueError(f"the stream is closed ({str(exc).rstrip('.')}): remove the handler "
                             f"(logging.getLogger({LOGGER_NAME!r}).removeHandler) before closing "
                             f"the stream, or give audit.enable one that stays open")
        if isinstance(exc, (OSError, ValueError)):  # ValueError: a closed stream, say
            raise AuditLogError(exc, record, getattr(self, "baseFilename", None)) from original
        raise  # noqa: PLE0704 - re-raises the error being handled


class _AuditStreamHandler(_Raising, logging.StreamHandler):
    """A StreamHandler whose failed writes raise (:class:`_Raising`)."""


class _AuditFileHandler(_Raising, logging.FileHandler):
    """A FileHandler whose file is opened by :func:`_open_log`: every time logging opens
    it (first, again after a close, and again in a process forked from this one), not only
    when :func:`enable` is called.

    Each event is one ``write`` of its whole line to the raw file (no buffer between),
    appended (``O_APPEND``): a line never reaches the file in pieces that another
    writer's could come between, and a write the file system cut short (full) is taken
    back, so that no half line is left to break the JSON-lines reader. Then it raises,
    as any failed write does (:class:`AuditLogError`).

    The write and its take-back are done holding ``flock(LOCK_EX)`` on the log, which
    every writer of it takes (every handler, in every process): the take-back reads the
    log's end and truncates it, and a line another writer appended in between would be cut
    away with the half line. Why a lock and not a half line left in place, ended by a
    newline for readers to skip: a short write means the disk is full, so that newline
    would fail too, and the next writer's complete line (any process's, once there is
    room) would be glued to the half line and lost with it; under the lock no complete
    line is lost and every line parses. ``flock``, not ``fcntl``/``lockf`` record locks:
    those belong to the process and are dropped when it closes any descriptor of the file
    (as :meth:`_take_back` does). A flock belongs to the open file, which a forked child
    shares, so a child opens the log anew (:meth:`emit`) to take the lock in its own right."""

    def __init__(self, path: str, durable: bool = True):
        self.durable = durable
        super().__init__(path, mode="a", encoding="utf-8")

    def _open(self):
        self._pid = os.getpid()
        created = not os.path.lexists(self.baseFilename)
        stream = open(_open_log(self.baseFilename), "ab", buffering=0)
        if created and self.durable:  # a new file's name is in its folder, on disk too
            from .files._atomic import fsync_folder

            fsync_folder(os.path.dirname(self.baseFilename))
        return stream

    def _rotated(self) -> bool:
        """Whether the log's path no longer names the file this process has open: renamed
        away (rotated) or removed, by any process. The next event then opens the path anew,
        in every process that writes it (as logging's WatchedFileHandler does)."""
        try:
            now = os.stat(self.baseFilename)
        except FileNotFoundError:
            return True
        held = os.fstat(self.stream.fileno())
        return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + self.terminator).encode(self.encoding)
            if self.stream is not None and (self._pid != os.getpid() or self._rotated()):
                with contextlib.suppress(OSError):  # forked (see above), or rotated
                    self.stream.close()  # this process's descriptor only
                self.stream = None
            if self.stream is None:
                self.stream = self._open()
            fd = self.stream.fileno()
            if _flock is not None:
                _flock(fd, LOCK_EX)
            try:
                written = self.stream.write(line) or 0
                if written != len(line):
                    self._short_write(line, written)
                if self.durable:  # on disk before the operation it records returns: a crash
                    try:          # or power cut must not lose the record of what was done
                        os.fsync(fd)
                    except OSError:  # not known to be on disk: taken back, so that the
                        self._take_back(line)  # error's "missing from the log" is true
                        raise
            finally:
                if _flock is not None:
                    _flock(fd, LOCK_UN)
        except Exception:  # noqa: BLE001 - as logging's emit; handleError raises it
            self.handleError(record)

    def _short_write(self, line: bytes, written: int) -> None:
        """After a write of ``line`` that stopped at ``written`` bytes: write the rest, which
        either succeeds (a signal cut the write short) or fails with the write's own
        error (ENOSPC for a full disk, but EFBIG for a file-size limit, EDQUOT for a
        quota: a short write does not say which), raised as "only N of M bytes could be
        written: REASON" once what was written is taken back. Called holding the log's
        lock."""
        import errno

        rest, error = 0, None
        try:
            rest = self.stream.write(line[written:]) or 0
        except OSError as exc:
            error = exc
        if error is None and written + rest == len(line):
            return
        self._take_back(line[:written + rest])
        why = error.strerror if error is not None else "the rest stopped short too, " \
            "without an error"
        raise OSError(error.errno if error is not None else errno.EIO,
                      f"only {written} of the event's {len(line)} bytes could be written: "
                      f"{why}")

    def _take_back(self, written: bytes) -> None:
        """Remove ``written``, the start of a line a short write left at the end of the
        log, if the log still ends with it. Called holding the log's lock, so no writer
        that takes it (gpucrypt's, in any process) appends meanwhile; should a writer
        that does not have appended since, the half line stays rather than cutting that
        writer's line."""
        if not written:
            return
        fd = self.stream.fileno()  # write-only: the tail is read through a second one
        try:
            reader = os.open(self.baseFilename, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return  # the error being raised says the event is missing
        try:
            ours, theirs = os.fstat(fd), os.fstat(reader)
            end = ours.st_size
            if (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino) \
                    and end >= len(written) \
                    and os.pread(reader, len(written), end - len(written)) == written:
                os.ftruncate(fd, end - len(written))
        except OSError:
            pass
        finally:
            os.close(reader)


def _refuse_others_log(path: str, held: Any) -> None:
    """Another user's log is written as it is, with its own mode (a log shared on purpose:
    the chmod to 0600 was EPERM for its writers, or as root took it from its owner's
    other readers), unless anyone may read or write it or its folder (a log planted in a
    world-writable folder such as /tmp, to be read): then ``OSError``, nothing written."""
    import errno
    import os
    import stat

    folder = os.stat(os.path.dirname(os.path.abspath(path)))
    if held.st_mode & 0o007 or folder.st_mode & stat.S_IWOTH:
        where = "anyone may read or write it" if held.st_mode & 0o007 else \
            "its folder is writable by anyone"
        raise OSError(errno.EPERM, f"it belongs to another user (uid {held.st_uid}) and "
                      f"{where}: its events could be read or removed by others; give a log "
                      f"of your own (or its owner may make it 0660 in a folder of theirs)",
                      path)


def _open_log(path: str) -> int:
    """A descriptor appending to the audit log ``path``, created 0600 and an existing file of this
    user's made 0600 (another user's keeps its mode, unless anyone may read or write it or its
    folder: :func:`_refuse_others_log`). A symbolic link is refused, as
    :class:`gpucrypt.files._atomic.AtomicFile` refuses one: a link planted where the log goes
    would choose which file gets changed (and chmod-ed). So is anything but a regular file (a
    FIFO would block the command, a device take the lines), and a file that cannot be locked
    (writers take turns through ``flock``: :class:`_AuditFileHandler`), now rather than at the
    first event. ``OSError`` naming ``path``, saying what to do."""
    import errno
    import os
    import stat

    not_regular = OSError(errno.EINVAL, "not a regular file: give a file's path", path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK \
        | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)  # O_NONBLOCK: a FIFO without a reader fails, not waits
    except OSError as exc:
        if exc.errno == errno.ELOOP and os.path.islink(path):
            raise OSError(errno.ELOOP, "it is a symbolic link; audit logs are not written "
                          "through links: give the file it points to, or remove the link",
                          path) from None
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads
            raise not_regular from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise not_regular
        os.set_blocking(fd, True)
        held = os.fstat(fd)
        if held.st_uid == getattr(os, "geteuid", lambda: held.st_uid)():
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)  # an existing file keeps its mode otherwise
        else:
            _refuse_others_log(path, held)
        if _flock is not None:
            try:
                _flock(fd, LOCK_EX)
                _flock(fd, LOCK_UN)
            except OSError as exc:
                raise OSError(exc.errno, f"{exc.strerror}: it cannot be locked (writers of an "
                              f"audit log take turns through flock); put the log on a file "
                              f"system that has locks", path) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


#: held by :func:`enable` from looking for a handler to adding one: two threads enabling
#: the same log at once would each find none and add one, and write every event twice
_enable_lock = threading.Lock()


def _new_enable_lock() -> None:
    global _enable_lock
    _enable_lock = threading.Lock()  # a child forked while a thread held it would hang


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_enable_lock)


def enable(target: Any = None, level: int = logging.INFO, *,
           durable: bool = True) -> logging.Handler:
    """Send audit events, one JSON line each, to ``target``: a path (appended to, mode
    0600, an existing file's mode included; a symbolic link or anything but a regular file
    is refused with ``OSError``), a text stream, or ``None`` for stderr. An event
    that cannot be written raises :class:`AuditLogError` from :func:`event` (and so from
    the operation that emitted it); in a file, each event is one write, and a short one
    (a full disk) is taken back, leaving no half line, under a lock every writer of the log
    takes (``flock(LOCK_EX)``), so no other writer's line is cut away with it.
    Returns the handler (remove it with ``logging.getLogger(LOGGER_NAME).removeHandler(h)``);
    enabling a file that already has one returns that one, so no event is written twice:
    the same name, or the same file under another (a hard link, a directory reached
    through a symbolic link); so does enabling the same stream object again (``None``:
    the ``sys.stderr`` of the moment). Safe to call from several threads at once.
    ``durable`` (a file): each event is fsynced before the
    operation that emitted it returns (a few milliseconds each on a disk; key operations
    are few), so a crash loses no record of what was done; False leaves that to the OS.

    The audit logger is set to ``level`` (unless it takes lower already) and stops
    propagating: its events no longer reach the root logger's handlers, whose file (an
    application's log, often readable by more users) would otherwise get every audit line
    too, its level notwithstanding. An application that wants them there as well sets
    ``logging.getLogger(LOGGER_NAME).propagate = True`` after enabling. (Turned off only
    when a handler is attached: removing it later leaves propagation off, and enabling a
    log already attached leaves the setting as the application made it.) The logger is
    also enabled again if a logging configuration disabled it (``dictConfig`` does by
    default), and one disabled afterwards still writes to the handlers this function
    attached, through the logger's filters: an enabled log has no silent gap."""
    import sys

    with _enable_lock:
        if target is None:
            target = sys.stderr
        to_file = isinstance(target, (str, os.PathLike))
        if to_file:
            path = os.path.abspath(os.fspath(target))  # as FileHandler.baseFilename holds it
            handler = _file_handler_for(path)
            if handler is not None:
                # one handler per file: durable if any caller asked for it
                handler.durable = handler.durable or durable
        else:
            handler = next((h for h in _logger.handlers if isinstance(h, _AuditStreamHandler)
                            and h.stream is target), None)
        if handler is None:
            handler = _AuditFileHandler(path, durable) if to_file else _AuditStreamHandler(target)
            handler.setFormatter(logging.Formatter("%(message)s"))
            handler.setLevel(level)
            _logger.propagate = False  # before the handler: no event reaches root in between
            _logger.addHandler(handler)
        if _logger.level == logging.NOTSET or _logger.level > level:
            _logger.setLevel(level)
        _logger.disabled = False
        return handler


def _file_handler_for(path: str) -> _AuditFileHandler | None:
    """The handler :func:`enable` made that already writes ``path``: by name, or by the
    file's identity (``st_dev``, ``st_ino``) when it exists. ``lstat``: a link at ``path``
    itself is not the file, and is refused when opened. Another ``FileHandler`` (one a
    logging configuration added) is not taken for it: it would refuse no link, make no
    file 0600 and let a failed write pass."""
    try:
        st = os.lstat(path)
        identity = (st.st_dev, st.st_ino)
    except OSError:
        identity = None
    for handler in _logger.handlers:
        if not isinstance(handler, _AuditFileHandler):
            continue
        if handler.baseFilename == path:
            return handler
        try:
            stream = handler.stream
            theirs = os.fstat(stream.fileno()) if stream is not None \
                else os.stat(handler.baseFilename)
        except (OSError, ValueError, AttributeError):  # closed, or not a real file
            continue
        if identity == (theirs.st_dev, theirs.st_ino):
            return handler
    return None
