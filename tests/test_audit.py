"""Audit events: the JSON-lines contract of ``audit.event``, and no secret (key bytes raw,
hex or base64, passphrase, data key, plaintext) in the log under any path, failures
included."""
from __future__ import annotations

import base64
import errno
import io
import json
import logging
import os

import pytest

from gpucrypt import audit, keys
from gpucrypt.cli import main
from gpucrypt.files import keyed

FAST_N = 2**10


class _Capture(logging.Handler):
    """Everything logged under ``gpucrypt`` at any level, formatted as a handler would
    (message, arguments, exception text), plus each record's attributes."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []
        self.records: list[logging.LogRecord] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record):
        self.records.append(record)
        self.texts.append(self.format(record) + " " + repr(vars(record)))


@pytest.fixture
def captured():
    """A _Capture on ``gpucrypt`` and on the audit logger itself: audit.enable() stops the
    audit logger propagating (for the rest of the process), so a handler on its parent
    alone would see no event after any test that enabled a log. Propagation is off while
    the capture is on, so that each event is captured once whatever ran before."""
    logger, audit_logger = logging.getLogger("gpucrypt"), logging.getLogger(audit.LOGGER_NAME)
    handler, old_level, old_propagate = _Capture(), logger.level, audit_logger.propagate
    logger.addHandler(handler)
    audit_logger.addHandler(handler)
    audit_logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        audit_logger.removeHandler(handler)
        audit_logger.propagate = old_propagate
        logger.setLevel(old_level)


@pytest.fixture
def logging_state():
    """The audit logger (yielded), as the test leaves it undone afterwards: its handlers,
    level, propagation and ``disabled``; the root logger's handlers and level; every
    logger's ``disabled`` (a dictConfig disables them all). Later tests rely on them."""
    manager = logging.root.manager
    audit_logger, root = logging.getLogger(audit.LOGGER_NAME), logging.getLogger()
    saved = [(logger, logger.handlers[:], logger.level, logger.propagate, logger.disabled)
             for logger in (audit_logger, root)]
    disabled = {name: logger.disabled for name, logger in manager.loggerDict.items()
                if isinstance(logger, logging.Logger)}
    try:
        yield audit_logger
    finally:
        for logger, handlers, level, propagate, _ in saved:
            for handler in logger.handlers[:]:
                if handler not in handlers:
                    logger.removeHandler(handler)
                    handler.close()
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate
        for name, was in disabled.items():
            manager.loggerDict[name].disabled = was
        audit_logger.disabled = saved[0][4]


def _events(handler: _Capture) -> list[dict]:
    return [json.loads(r.getMessage()) for r in handler.records if r.name == audit.LOGGER_NAME]


# ---------------------------------------------------------------- the contract


def test_event_shape(captured):
    audit.event("file.encrypt", key_id="k1", bytes=10, recipients=["x25519:ab"], device="cpu")
    [event] = _events(captured)
    assert event["operation"] == "file.encrypt" and event["outcome"] == "ok"
    assert event["key_id"] == "k1" and event["bytes"] == 10 and event["recipients"] == ["x25519:ab"]
    assert event["ts"].endswith("Z")
    assert captured.records[0].levelno == logging.INFO
    assert captured.records[0].audit == event  # structured copy for handlers that want it


def test_events_say_which_process_and_user_acted_and_where(captured, tmp_path, monkeypatch):
    """Who acted (pid, effective uid) is on every line; a relative path is recorded
    absolute (it means nothing without the working directory); a URL as given."""
    monkeypatch.chdir(tmp_path)
    audit.event("file.encrypt", path="model.gcry")
    audit.event("file.decrypt", path="s3://bucket/model.gcry")
    first, second = _events(captured)
    assert first["pid"] == os.getpid() and first["uid"] == os.geteuid()
    assert first["path"] == str(tmp_path / "model.gcry")
    assert second["path"] == "s3://bucket/model.gcry"


@pytest.mark.parametrize("fields", [
    {"key_id": b"\x00" * 32}, {"key_id": bytearray(4)}, {"recipients": [b"ab"]},
    {"bytes": memoryview(b"x")}, {"nonce": "00"}, {"key": "ab"}, {"plaintext": "hi"},
])
def test_event_refuses_binary_and_unknown_fields(captured, fields):
    with pytest.raises(TypeError):
        audit.event("x", **fields)
    assert not captured.records


def test_event_outcome_values():
    with pytest.raises(ValueError):
        audit.event("x", outcome="maybe")


def test_timed_records_error_class_not_message(captured):
    with pytest.raises(ValueError):
        with audit.timed("tensor.encrypt", bytes=5) as extra:
            extra["device"] = "gpu"
            raise ValueError("secret-detail-123")
    [event] = _events(captured)
    assert event["outcome"] == "error" and event["error"] == "ValueError"
    assert event["device"] == "gpu" and event["duration_s"] >= 0
    assert "secret-detail-123" not in " ".join(captured.texts)


def test_silent_by_default(capsys):
    audit.event("x")
    assert capsys.readouterr() == ("", "")


def test_enable_to_file_and_stream(tmp_path):
    stream_ = io.StringIO()
    handlers = [audit.enable(stream_), audit.enable(tmp_path / "a.log")]
    try:
        audit.event("keyset.add", key_id="abc")
    finally:
        for h in handlers:
            logging.getLogger(audit.LOGGER_NAME).removeHandler(h)
            h.close()
    assert json.loads(stream_.getvalue())["key_id"] == "abc"
    assert json.loads((tmp_path / "a.log").read_text())["key_id"] == "abc"
    assert os.stat(tmp_path / "a.log").st_mode & 0o777 == 0o600


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs root to make a log owned by another user")
def test_a_log_another_user_shares_keeps_its_mode_and_a_planted_one_is_refused(tmp_path):
    """A log shared on purpose (another user's, 0660, in a folder of theirs) was made 0600:
    as root, taken from its owner's other readers; as anyone else, the chmod was EPERM and
    the log could not be used. But one that anyone may read, or in a folder anyone may
    write (planted in /tmp, say), is refused: its events would be read by its owner."""
    shared = tmp_path / "shared.log"
    shared.write_text("")
    os.chown(shared, 65534, 65534)
    os.chmod(shared, 0o660)
    handler = audit.enable(shared)
    try:
        audit.event("keyset.add", key_id="abc")
    finally:
        logging.getLogger(audit.LOGGER_NAME).removeHandler(handler)
        handler.close()
    assert os.stat(shared).st_mode & 0o777 == 0o660 and os.stat(shared).st_uid == 65534
    assert json.loads(shared.read_text())["key_id"] == "abc"
    for folder_mode, log_mode, why in ((0o1777, 0o600, "folder is writable by anyone"),
                                       (0o700, 0o664, "anyone may read or write it")):
        folder = tmp_path / f"f{folder_mode:o}-{log_mode:o}"
        folder.mkdir()
        folder.chmod(folder_mode)
        planted = folder / "audit.log"
        planted.write_text("")
        os.chown(planted, 65534, 65534)
        os.chmod(planted, log_mode)
        with pytest.raises(OSError, match=f"another user .uid 65534. and.*{why}"):
            audit.enable(planted)
        assert planted.read_text() == "" and os.stat(planted).st_mode & 0o777 == log_mode


def test_enable_a_path_twice_and_an_existing_file(tmp_path):
    """The log is 0600 even when the file existed with another mode, and enabling it again
    (two commands in one process) writes each event once."""
    path = tmp_path / "audit.log"
    path.write_text("")
    os.chmod(path, 0o644)
    logger = logging.getLogger(audit.LOGGER_NAME)
    handlers = [audit.enable(path), audit.enable(str(path))]
    try:
        assert os.stat(path).st_mode & 0o777 == 0o600
        audit.event("keyset.add", key_id="abc")
    finally:
        for h in set(handlers):
            logger.removeHandler(h)
            h.close()
    assert [json.loads(line)["key_id"] for line in path.read_text().splitlines()] == ["abc"]


def _remove_file_handlers() -> None:
    logger = logging.getLogger(audit.LOGGER_NAME)
    for handler in logger.handlers[:]:
        if isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
            handler.close()


def test_enable_refuses_a_link_and_what_is_not_a_file(tmp_path):
    """A link planted where the log goes would choose which file is chmod-ed and appended
    to (AtomicFile refuses links for the same reason); a FIFO would block the command."""
    victim = tmp_path / "victim.txt"
    victim.write_text("victim data\n")
    victim.chmod(0o644)
    (tmp_path / "audit.log").symlink_to(victim)
    os.mkfifo(tmp_path / "fifo")
    for target, why in (("audit.log", "symbolic link"), ("fifo", "not a regular file"),
                        (".", "Is a directory"), ("missing/x.log", "No such file")):
        with pytest.raises(OSError) as info:
            audit.enable(tmp_path / target)
        assert why in str(info.value), info.value
        assert os.path.abspath(info.value.filename) == os.path.abspath(tmp_path / target), info.value
    assert victim.read_text() == "victim data\n" and victim.stat().st_mode & 0o777 == 0o644
    assert not any(getattr(h, "baseFilename", "").startswith(str(tmp_path))
                   for h in logging.getLogger(audit.LOGGER_NAME).handlers)


def test_cli_audit_log_that_cannot_be_opened_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "victim.txt").write_text("victim data\n")
    (tmp_path / "audit.log").symlink_to(tmp_path / "victim.txt")
    try:
        for log, why in (("missing/x.log", "No such file"), (".", "Is a directory"),
                         ("audit.log", "symbolic link")):
            code = main(["keygen", "--out", "ks.json", "--audit-log", log])
            err = capsys.readouterr().err
            assert code == 1 and f"cannot open the audit log {log}: " in err and why in err, err
            assert err.count("\n") == 1 and "Traceback" not in err
            assert not (tmp_path / "ks.json").exists()  # nothing done that goes unrecorded
        # an empty name (an unset $VARIABLE) is no log left out: a usage error, nothing done
        for argv in (["keygen", "--out", "ks.json"], ["encrypt", "--key-file", "victim.txt",
                                                       "victim.txt", "out.gc"]):
            code = main([*argv, "--audit-log", ""])
            err = capsys.readouterr().err
            assert code == 2 and "--audit-log was given an empty name" in err, err
            assert not (tmp_path / "ks.json").exists() and not (tmp_path / "out.gc").exists()
    finally:
        _remove_file_handlers()
    assert (tmp_path / "victim.txt").read_text() == "victim data\n"


def test_a_keyset_save_that_fails_is_recorded_with_the_keys_it_did_not_write(tmp_path, capsys,
                                                                               monkeypatch):
    """``keys destroy`` whose save fails: the log must not leave the destruction looking
    done. The keyset.save event is an error listing the key; a save that works lists it ok."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPUCRYPT_PASSPHRASE", raising=False)
    log = tmp_path / "audit.jsonl"
    try:
        assert main(["keygen", "--out", "real.json"]) == 0
        assert main(["keys", "add", "real.json"]) == 0
        doomed = next(k.id for k in keys.Keyset.load("real.json") if k.status == "enabled")

        def disk_full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        with monkeypatch.context() as patched:  # the save fails as a full disk fails it
            patched.setattr(keys.keyset, "write_key_file", disk_full)
            assert main(["keys", "destroy", "real.json", doomed, "--yes",
                         "--audit-log", str(log)]) == 1
        assert main(["keys", "destroy", "real.json", doomed, "--yes", "--audit-log", str(log)]) == 0
    finally:
        _remove_file_handlers()
    capsys.readouterr()
    saves = [e for e in map(json.loads, log.read_text().splitlines())
             if e["operation"] == "keyset.save"]
    assert [(e["path"], e["outcome"], e["key_ids"]) for e in saves] == [
        (str(tmp_path / "real.json"), "error", [doomed]),
        (str(tmp_path / "real.json"), "ok", [doomed])]
    assert saves[0]["error"] == "OSError"


def _refused(keyset, operation):
    """Run ``keyset.<operation>`` on its refusal case; the id asked for and the error."""
    primary = keyset.primary.id
    destroyed = next(k.id for k in keyset if k.status == "destroyed")
    cases = {"promote": (keyset.promote, destroyed, keys.KeyUnavailable),
             "enable": (keyset.enable, "no-such-key", keys.KeyNotFound),
             "disable": (keyset.disable, primary, keys.KeyUnavailable),
             "destroy": (keyset.destroy, primary, keys.KeyUnavailable)}
    change, key_id, error = cases[operation]
    with pytest.raises(error) as info:
        change(key_id)
    return key_id, f"{error.__name__}: {info.value}"


@pytest.mark.parametrize("operation", ["promote", "enable", "disable", "destroy"])
def test_a_refused_key_change_is_recorded(captured, operation):
    """Only changes that were made were recorded: an attempt to destroy the primary, or
    a key that is not there, left nothing in the log. It is an error event naming the key
    asked for and why it was refused."""
    ks = keys.Keyset.generate()
    ks.destroy(ks.add().id)
    captured.records.clear()
    key_id, error = _refused(ks, operation)
    [event] = _events(captured)
    assert (event["operation"], event["outcome"], event["key_id"], event["error"]) == (
        f"keyset.{operation}", "error", key_id, error)


def test_a_refused_add_and_a_key_id_of_the_wrong_type_are_recorded(captured):
    """An unknown algorithm is recorded by name; a key id that is not a str (key material
    passed by mistake, say) is refused with TypeError, and neither it nor its repr reaches
    the log (a key error's message, which the event keeps, would have held its repr)."""
    ks = keys.Keyset.generate()
    secret = os.urandom(32)
    with pytest.raises(ValueError, match="unknown key algorithm"):
        ks.add("rot13")
    with pytest.raises(TypeError, match="key_id must be a str"):
        ks.destroy(secret)
    added, destroyed = _events(captured)[1:]
    assert (added["operation"], added["outcome"], added["algorithm"], added["error"]) == (
        "keyset.add", "error", "rot13", "ValueError")
    assert (destroyed["operation"], destroyed["outcome"], destroyed["key_id"],
            destroyed["error"]) == ("keyset.destroy", "error", None, "TypeError")
    _assert_no_secret(captured.texts, [secret], [])


def test_promote_records_the_key_it_demoted(captured):
    """The event named the new primary only: which key stopped wrapping new data keys
    had to be worked out from earlier events."""
    ks = keys.Keyset.generate()
    old, new = ks.primary.id, ks.add().id
    ks.promote(new)
    ks.promote(new)  # the primary already: nothing demoted
    promoted = [e for e in _events(captured) if e["operation"] == "keyset.promote"]
    assert [(e["key_id"], e["key_ids"]) for e in promoted] == [(new, [new, old]), (new, [new])]


# ---------------------------------------------------------------- a log that cannot be written
class _ShortWrites:
    """A log file's stream that the file system fills part-way: each write keeps only
    the first ``keep`` bytes (``keep=None``: every write fails with ENOSPC)."""

    def __init__(self, real, keep):
        self.real, self.keep = real, keep

    def write(self, data):
        if self.keep is None:
            import errno

            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real.write(data[:self.keep])

    def fileno(self):
        return self.real.fileno()

    def flush(self):
        self.real.flush()

    def close(self):
        self.real.close()


@pytest.mark.parametrize("keep", [None, 10], ids=["fails", "short"])
def test_a_failed_audit_write_raises_and_leaves_no_half_line(tmp_path, keep):
    """logging's handlers print "--- Logging error ---" and go on: the event was lost and
    a half line left to break the JSON-lines reader. An audit write that fails raises."""
    path = tmp_path / "audit.log"
    handler = audit.enable(path)
    try:
        audit.event("keyset.add", key_id="first")
        handler.stream = _ShortWrites(handler.stream, keep)
        with pytest.raises(audit.AuditLogError) as info:
            audit.event("keyset.promote", key_id="second")
        assert info.value.operation == "keyset.promote" and info.value.outcome == "ok"
        assert info.value.filename == str(path)
    finally:
        _remove_file_handlers()
    assert [json.loads(line)["key_id"] for line in path.read_text().splitlines()] == ["first"]
    assert path.read_text().endswith("}\n")


def test_a_failed_audit_write_to_a_stream_raises():
    class Full(io.StringIO):
        def write(self, text):
            import errno

            raise OSError(errno.ENOSPC, "No space left on device")

    logger = logging.getLogger(audit.LOGGER_NAME)
    handler = audit.enable(Full())
    try:
        with pytest.raises(audit.AuditLogError, match="No space left"):
            audit.event("keyset.add", key_id="abc")
    finally:
        logger.removeHandler(handler)


def test_a_closed_stream_raises_audit_log_error(tmp_path):
    """A closed stream raised a bare ValueError ("I/O operation on closed file"), which no
    caller of AuditLogError catches; now AuditLogError (errno None) saying what to do."""
    logger = logging.getLogger(audit.LOGGER_NAME)
    stream_ = io.StringIO()
    handler = audit.enable(stream_)
    stream_.close()
    try:
        with pytest.raises(audit.AuditLogError, match="the stream is closed") as info:
            audit.event("keyset.add", key_id="abc")
    finally:
        logger.removeHandler(handler)
    assert info.value.errno is None and info.value.filename is None
    assert "removeHandler" in str(info.value) and info.value.operation == "keyset.add"
    handler = audit.enable(tmp_path / "audit.log")
    handler.stream.close()  # a file handler's stream closed under it
    try:
        with pytest.raises(audit.AuditLogError, match="the stream is closed") as info:
            audit.event("keyset.add", key_id="abc")
    finally:
        handler.stream = None  # logging's close would flush the closed one
        _remove_file_handlers()
    assert info.value.filename == str(tmp_path / "audit.log")


class _FailsAt(io.StringIO):
    """A log stream that fills up at one operation's event."""

    def __init__(self, operation):
        super().__init__()
        self.operation = operation

    def write(self, text):
        if f'"operation": "{self.operation}"' in text:
            import errno

            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(text)


def test_an_event_lost_after_the_work_says_the_work_was_done(tmp_path):
    """An ok event is written once the work is done: Keyset.save raised with the file
    written, decrypt_file with the output written, and the error said only "No space left".
    Its message now says the work was done (an error event's: that the failure is not
    recorded)."""
    logger = logging.getLogger(audit.LOGGER_NAME)
    ks, other = keys.Keyset.generate(), keys.Keyset.generate()
    (tmp_path / "plain").write_bytes(os.urandom(1000))
    keys.encrypt_file(tmp_path / "plain", tmp_path / "sealed", keyset=ks)
    raised = {}
    for operation, run in (
            ("keyset.save", lambda: ks.save(tmp_path / "ks.json")),
            ("file.decrypt", lambda: keys.decrypt_file(tmp_path / "sealed", tmp_path / "out",
                                                       keyset=ks)),
            ("file.decrypt", lambda: keys.decrypt_file(tmp_path / "sealed", tmp_path / "out2",
                                                       keyset=other))):
        handler = audit.enable(_FailsAt(operation))
        try:
            with pytest.raises(audit.AuditLogError, match="No space left") as info:
                run()
        finally:
            logger.removeHandler(handler)
        raised.setdefault(operation, []).append(info.value)
    (saved,), (decrypted, refused) = raised["keyset.save"], raised["file.decrypt"]
    assert (tmp_path / "ks.json").exists() and (tmp_path / "out").read_bytes() == \
        (tmp_path / "plain").read_bytes()
    for exc, operation in ((saved, "keyset.save"), (decrypted, "file.decrypt")):
        assert exc.outcome == "ok" and exc.consequence == "it was done but is not recorded"
        assert f"The event {operation!r} is missing from it (it was done but is not recorded" \
            in str(exc), exc
    assert not (tmp_path / "out2").exists() and refused.outcome == "error"
    assert "(it failed, and the failure is not recorded)" in str(refused), refused


def _wait_until_waiting_for_a_lock_or_done(child) -> None:
    """Until ``child`` waits for a flock (Linux's /proc/locks marks a waiter "->") or has
    ended: either way, what it would have done inside the window it has done or tried."""
    import time

    deadline = time.monotonic() + 60
    while child.poll() is None and time.monotonic() < deadline:
        with open("/proc/locks") as f:
            if any("->" in line and f" {child.pid} " in line for line in f):
                return
        time.sleep(0.01)


@pytest.mark.skipif(audit._flock is None or not os.path.exists("/proc/locks"),
                    reason="needs flock, and Linux's /proc/locks to see the other writer wait")
def test_a_take_back_does_not_cut_another_processs_line(tmp_path, monkeypatch):
    """The take-back reads the log's end, then truncates it: a line another process
    appended in between was cut away with the half line. Every writer now holds the log's
    flock for its write and take-back. The other process is started inside that window
    (in os.pread, called between the two) and waits there until it has blocked or ended."""
    import subprocess
    import sys

    path = tmp_path / "audit.log"
    handler = audit.enable(path)
    real_pread, other = os.pread, []

    def pread(fd, n, offset):
        monkeypatch.setattr(os, "pread", real_pread)
        other.append(subprocess.Popen([sys.executable, "-c", "import sys; from gpucrypt import "
                                       "audit; audit.enable(sys.argv[1]); audit.event("
                                       "'keyset.add', key_id='other')", str(path)]))
        _wait_until_waiting_for_a_lock_or_done(other[0])
        return real_pread(fd, n, offset)

    try:
        audit.event("keyset.add", key_id="first")
        handler.stream = _ShortWrites(handler.stream, 10)
        monkeypatch.setattr(os, "pread", pread)
        with pytest.raises(audit.AuditLogError, match="only 10 of the event's"):
            audit.event("keyset.promote", key_id="second")
    finally:
        _remove_file_handlers()
        for child in other:
            child.wait(timeout=60)
    assert other and other[0].returncode == 0
    assert [json.loads(line)["key_id"] for line in path.read_text().splitlines()] == [
        "first", "other"]


@pytest.mark.skipif(audit._flock is None or not hasattr(os, "fork"), reason="needs flock and fork")
def test_a_forked_process_takes_the_log_lock_in_its_own_right(tmp_path):
    """A flock belongs to the open file, which a forked child shares: writing through the
    inherited descriptor, parent and child would each hold the lock at once. The child
    opens the log anew: while the parent holds its lock, the child's is refused."""
    import fcntl

    path = tmp_path / "audit.log"
    handler = audit.enable(path)
    to_parent, to_child = os.pipe(), os.pipe()
    try:
        audit.event("keyset.add", key_id="parent")
        pid = os.fork()
        if pid == 0:  # the child: exit 0 only if the parent's lock keeps it out
            code = 1
            try:
                audit.event("keyset.add", key_id="child")
                os.write(to_parent[1], b"x")
                os.read(to_child[0], 1)  # the parent holds its lock now
                try:
                    fcntl.flock(handler.stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    code = 0
            finally:
                os._exit(code)
        assert os.read(to_parent[0], 1) == b"x"
        fcntl.flock(handler.stream.fileno(), fcntl.LOCK_EX)
        try:
            os.write(to_child[1], b"x")
            status = os.waitpid(pid, 0)[1]
        finally:
            fcntl.flock(handler.stream.fileno(), fcntl.LOCK_UN)
    finally:
        _remove_file_handlers()
        for fd in (*to_parent, *to_child):
            os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [json.loads(line)["key_id"] for line in path.read_text().splitlines()] == [
        "parent", "child"]


def test_enable_refuses_a_log_that_cannot_be_locked(tmp_path, monkeypatch):
    """Writers take turns through flock: a file system without locks (ENOLCK) is refused
    when the log is opened, not at the first event."""
    import errno

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(audit, "_flock", no_locks)
    with pytest.raises(OSError, match="cannot be locked") as info:
        audit.enable(tmp_path / "audit.log")
    assert info.value.filename == str(tmp_path / "audit.log")
    assert not any(isinstance(h, logging.FileHandler)
                   for h in logging.getLogger(audit.LOGGER_NAME).handlers)


def test_enable_the_same_file_under_another_name_writes_each_event_once(tmp_path):
    """enable compared names: the log through a hard link or a directory reached through
    a symbolic link got a second handler, and every event was written twice. A link at
    the log's own name is still refused."""
    (tmp_path / "logs").mkdir()
    path = tmp_path / "logs" / "audit.log"
    (tmp_path / "via").symlink_to(tmp_path / "logs")
    try:
        first = audit.enable(path)
        os.link(path, tmp_path / "hard.log")
        assert audit.enable(tmp_path / "via" / "audit.log") is first
        assert audit.enable(tmp_path / "hard.log") is first
        (tmp_path / "soft.log").symlink_to(path)
        with pytest.raises(OSError, match="symbolic link"):
            audit.enable(tmp_path / "soft.log")
        audit.event("keyset.add", key_id="abc")
    finally:
        _remove_file_handlers()
    assert [json.loads(line)["key_id"] for line in path.read_text().splitlines()] == ["abc"]


def test_enable_from_several_threads_adds_one_handler(tmp_path, logging_state):
    """Threads enabling one log at once each found no handler for it and added one: every
    event was written once per thread."""
    import threading

    for round_ in range(5):
        path = tmp_path / f"audit-{round_}.log"
        barrier, handlers = threading.Barrier(4), []

        def enable():
            barrier.wait()
            handlers.append(audit.enable(path))

        threads = [threading.Thread(target=enable) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        audit.event("keyset.add", key_id=f"round-{round_}")
        assert len({id(h) for h in handlers}) == 1, f"round {round_}"
        assert len(path.read_text().splitlines()) == 1, f"round {round_}"


def test_enable_the_same_stream_twice_writes_each_event_once(capsys, logging_state):
    """A stream enabled twice (None, stderr, too) got a handler each time, and each event
    was written once per call."""
    stream_ = io.StringIO()
    assert audit.enable(stream_) is audit.enable(stream_)
    assert audit.enable() is audit.enable()  # the stderr capsys put in place
    audit.event("keyset.add", key_id="abc")
    assert len(stream_.getvalue().splitlines()) == 1
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_enable_takes_no_other_file_handler_for_its_own(tmp_path, logging_state):
    """A plain FileHandler on the audit logger (a logging configuration's) was returned as
    the log's handler: a link at the path written through, no 0600, a failed write passed
    over, and the logger's level left as it was (WARNING, from the root: no event)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("")
    victim.chmod(0o644)
    (tmp_path / "link.log").symlink_to(victim)
    logger = logging_state
    logger.setLevel(logging.NOTSET)
    logger.addHandler(logging.FileHandler(tmp_path / "link.log"))
    with pytest.raises(OSError, match="symbolic link"):
        audit.enable(tmp_path / "link.log")
    assert victim.stat().st_mode & 0o777 == 0o644
    path = tmp_path / "audit.log"
    path.write_text("")
    path.chmod(0o644)
    logger.addHandler(logging.FileHandler(path))
    handler = audit.enable(path)
    assert isinstance(handler, audit._AuditFileHandler)
    assert path.stat().st_mode & 0o777 == 0o600 and logger.getEffectiveLevel() == logging.INFO
    handler.stream = _ShortWrites(handler.stream, None)
    with pytest.raises(audit.AuditLogError):
        audit.event("keyset.add", key_id="abc")


@pytest.mark.parametrize("order", ["configured-first", "enabled-first"])
def test_a_logging_configuration_does_not_silence_an_enabled_log(tmp_path, logging_state, order):
    """dictConfig (disable_existing_loggers defaults to True) disables the audit logger,
    and every event after it, to a log enabled before or after, was dropped without a
    word. enable() enables the logger again; a logger disabled after it still writes to
    the handlers enable() attached."""
    import logging.config

    config = {"version": 1, "root": {"level": "WARNING"}}
    path = tmp_path / "audit.log"
    if order == "configured-first":
        logging.config.dictConfig(config)
        audit.enable(path)
    else:
        audit.enable(path)
        logging.config.dictConfig(config)
    ks = keys.Keyset.generate()
    ks.destroy(ks.add().id)
    assert [json.loads(line)["operation"] for line in path.read_text().splitlines()] == [
        "keyset.generate", "keyset.add", "keyset.destroy"]


def test_enable_keeps_audit_lines_out_of_the_applications_log(tmp_path, logging_state):
    """An application logging WARNING and up to its own log (often readable by more users
    than the audit log) got every audit line too: enable() set the audit logger to INFO
    and its records propagated to the root's handlers, whatever the root's level."""
    app_log = io.StringIO()
    logging.basicConfig(stream=app_log, level=logging.WARNING, force=True)
    audit.enable(tmp_path / "audit.log")
    keys.Keyset.generate()
    logging.getLogger("gpucrypt.app").warning("the application's own warning")
    assert app_log.getvalue().splitlines() == ["WARNING:gpucrypt.app:the application's own warning"]
    assert len((tmp_path / "audit.log").read_text().splitlines()) == 1


def test_a_disabled_loggers_events_still_pass_its_filters(tmp_path, logging_state):
    """Events delivered to enable()'s handlers past a disabled logger went round the
    logger's filters, which hold for an enabled one."""
    path = tmp_path / "audit.log"
    audit.enable(path)
    logging_state.addFilter(lambda record: "keyset.add" not in record.getMessage())
    logging_state.disabled = True  # as a dictConfig after enable() leaves it
    ks = keys.Keyset.generate()
    ks.add()
    assert [json.loads(line)["operation"] for line in path.read_text().splitlines()] == [
        "keyset.generate"]


def test_enable_turns_propagation_off_only_when_it_attaches_a_handler(tmp_path, logging_state):
    """An application that turned propagation back on keeps it through a second enable()
    of the same log (which attaches nothing)."""
    audit.enable(tmp_path / "audit.log")
    assert logging_state.propagate is False
    logging_state.propagate = True
    audit.enable(tmp_path / "audit.log")
    assert logging_state.propagate is True


def test_cli_refusals_before_any_key_is_read_are_not_recorded(tmp_path, monkeypatch, capsys):
    """decrypt recorded an existing OUT (a usage refusal, exit 2) as a failed file.decrypt
    where encrypt recorded nothing: a run refused before it read a key used none, and
    neither records it; a FIFO IN has no size to record (its st_size, 0, was)."""
    import threading

    monkeypatch.chdir(tmp_path)
    key = os.urandom(32)
    (tmp_path / "k").write_bytes(key)
    os.chmod(tmp_path / "k", 0o600)
    plaintext = os.urandom(300_000)
    (tmp_path / "in").write_bytes(plaintext)
    (tmp_path / "taken").write_bytes(b"x")
    log = tmp_path / "audit.jsonl"
    audited = ["--key-file", "k", "--audit-log", str(log)]
    try:
        assert main(["encrypt", *audited, "in", "enc"]) == 0
        assert main(["encrypt", *audited, "in", "taken"]) == 2
        assert main(["decrypt", *audited, "enc", "taken"]) == 2
        assert main(["decrypt", *audited, "missing", "out"]) == 2
        os.mkfifo(tmp_path / "fifo")
        feeder = threading.Thread(target=(tmp_path / "fifo").write_bytes, args=(plaintext,),
                                  daemon=True)
        feeder.start()
        try:
            assert main(["encrypt", *audited, "fifo", "from-fifo"]) == 0
        finally:
            feeder.join(timeout=30)
            if feeder.is_alive():  # never opened by the command: let the writer go
                os.close(os.open(tmp_path / "fifo", os.O_RDONLY | os.O_NONBLOCK))
        assert main(["decrypt", *audited, "from-fifo", "back"]) == 0
    finally:
        _remove_file_handlers()
    capsys.readouterr()
    assert (tmp_path / "back").read_bytes() == plaintext
    events = [(e["operation"], e["outcome"], os.path.basename(e["path"]), e.get("bytes"))
              for e in _log_events(log)]
    assert events == [("file.encrypt", "ok", "in", len(plaintext)),
                      ("file.encrypt", "ok", "fifo", None),
                      ("file.decrypt", "ok", "from-fifo", len(plaintext))], events


@pytest.mark.parametrize("command", ["keygen", "rekey", "encrypt", "decrypt"])
def test_cli_audit_log_that_cannot_be_written_is_one_line_exit_1(tmp_path, capsys, monkeypatch,
                                                                   command):
    """A full file system under --audit-log: the command said nothing (a logging traceback
    aside) and exited 0 with its event lost. Now: one line naming the log and the events
    lost, the first first (decrypt said "Input/output error" of the log, as an I/O error
    of its own, and named no event)."""
    monkeypatch.chdir(tmp_path)
    assert main(["keygen", "--public", "--out", "alice"]) == 0
    (tmp_path / "plain").write_bytes(os.urandom(1000))
    assert main(["encrypt", "-r", "alice.pub", "plain", "sealed"]) == 0
    capsys.readouterr()
    real_open = audit._AuditFileHandler._open
    monkeypatch.setattr(audit._AuditFileHandler, "_open",
                        lambda self: _ShortWrites(real_open(self), None))
    argv = {"keygen": ["keygen", "--out", "ks.json"],
            "rekey": ["rekey", "sealed", "-r", "alice.pub", "-i", "alice"],
            "encrypt": ["encrypt", "-r", "alice.pub", "plain", "ks.json"],
            "decrypt": ["decrypt", "-i", "alice", "sealed", "ks.json"]}[command]
    before = (tmp_path / "sealed").read_bytes()
    try:
        code = main([*argv, "--audit-log", "audit.log"])
    finally:
        _remove_file_handlers()
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert f"cannot write the audit log {tmp_path / 'audit.log'}: No space left" in err
    first = {"encrypt": "'envelope.seal' (it was done", "decrypt": "'envelope.open' (it was done"}
    if command in first:  # then the run's own event, its failure to write the first
        assert f"These events are missing from it: {first[command]}" in err, err
        assert f"'file.{command}' (it failed" in err, err
    assert "Logging error" not in err and "Traceback" not in err
    assert (tmp_path / "audit.log").read_text() == ""
    # the first event that failed stopped the work: nothing done goes unrecorded
    assert not (tmp_path / "ks.json").exists()
    assert (tmp_path / "sealed").read_bytes() == before


# ---------------------------------------------------------------- no secret, any path


def _forms(secret: bytes) -> list[str]:
    b64 = base64.b64encode(secret).decode()
    url = base64.urlsafe_b64encode(secret).decode()
    forms = {secret.hex(), secret.hex().upper(), b64, b64.rstrip("="), url, url.rstrip("="),
             repr(secret), secret.decode("latin-1")}
    return [f for f in forms if len(f) >= 8]


def _assert_no_secret(texts: list[str], secrets: list[bytes], words: list[str]) -> None:
    blob = "\n".join(texts)
    for secret in secrets:
        for form in _forms(secret):
            assert form not in blob, "a secret reached the log"
        assert secret not in blob.encode("utf-8", "surrogateescape")
    for word in words:
        assert word not in blob, "a passphrase or plaintext reached the log"


def _expect_failure(func, *a, **kw):
    with pytest.raises(Exception):
        func(*a, **kw)


def test_no_secret_in_log_on_any_path(captured, tmp_path, monkeypatch, capsys):
    secrets: list[bytes] = []
    real_dek = keys.generate_dek

    def recording_dek():
        dek = real_dek()
        secrets.append(dek)
        return dek

    monkeypatch.setattr(keys, "generate_dek", recording_dek)
    monkeypatch.setattr(keyed, "generate_dek", recording_dek)  # encrypt_file looks it up there
    monkeypatch.setattr(keys.passphrase, "MIN_LOG_N", FAST_N.bit_length() - 1)  # fast sealing
    passphrase = "pass-phrase-never-logged-42"
    plaintext_word = "PLAINTEXT-NEVER-LOGGED-7f3a"
    plaintext = (plaintext_word * 40).encode() + os.urandom(1000)
    secrets.append(plaintext[-1000:])

    # keysets: every change, every protection, wrong secrets, malformed files
    ks = keys.Keyset.generate()
    extra = ks.add()
    doomed = ks.add()
    secrets += [k.secret_bytes() for k in ks]
    ks.promote(extra.id)
    ks.disable(doomed.id)
    ks.enable(doomed.id)
    ks.disable(doomed.id)
    ks.destroy(doomed.id)
    _expect_failure(ks.get, doomed.id)
    _expect_failure(ks.disable, extra.id)
    ks.save(tmp_path / "plain.json")
    ks.save(tmp_path / "pw.json", passphrase, scrypt_n=FAST_N)
    kek = os.urandom(32)
    secrets.append(kek)
    ks.save(tmp_path / "kek.json", kek=kek, kek_id="kek-1")
    keys.Keyset.load(tmp_path / "plain.json")
    keys.Keyset.load(tmp_path / "pw.json", passphrase)
    keys.Keyset.load(tmp_path / "kek.json", kek=kek)
    _expect_failure(keys.Keyset.load, tmp_path / "pw.json", passphrase + "x")
    _expect_failure(keys.Keyset.load, tmp_path / "pw.json")
    _expect_failure(keys.Keyset.load, tmp_path / "kek.json", kek=os.urandom(32))
    (tmp_path / "bad.json").write_text('{"format": "gpucrypt-keyset", "version": 1, "keys": '
                                       '[{"id": "a", "algorithm": "aes-256-kwp", "created": "x", '
                                       '"status": "primary", "material": "!!"}]}')
    _expect_failure(keys.Keyset.load, tmp_path / "bad.json")

    # identities
    alice, bob = keys.Identity.generate(), keys.Identity.generate("mlkem768-x25519")
    secrets += [alice._private_bytes, bob._private_bytes]
    alice.save(tmp_path / "alice", passphrase, scrypt_n=FAST_N)
    keys.Identity.load(tmp_path / "alice", passphrase)
    _expect_failure(keys.Identity.load, tmp_path / "alice", "nope")

    # envelopes: ok, missing recipient, disabled key, tampered, malformed
    dek = keys.generate_dek()
    env = keys.seal_envelope(dek, [alice, bob, ks])
    keys.open_envelope(env, bob)
    keys.open_envelope(env, ks)
    _expect_failure(keys.open_envelope, env, keys.Identity.generate())
    tampered = bytearray(env)
    tampered[-3] ^= 1
    _expect_failure(keys.open_envelope, bytes(tampered), ks)
    _expect_failure(keys.open_envelope, env[:-1], ks)
    _expect_failure(keys.seal_envelope, b"short", alice)
    monkeypatch.setenv("GPUCRYPT_AUDIT_TEST_KEK", kek.hex())
    keys.open_envelope(keys.seal_envelope(dek, keys.WrappingKey("env", kek)),
                       keys.EnvKeyProvider("env", "GPUCRYPT_AUDIT_TEST_KEK"))
    monkeypatch.setenv("GPUCRYPT_AUDIT_TEST_KEK", "zz" + kek.hex()[2:])
    _expect_failure(keys.open_envelope, keys.seal_envelope(dek, keys.WrappingKey("env", kek)),
                    keys.EnvKeyProvider("env", "GPUCRYPT_AUDIT_TEST_KEK"))

    src = tmp_path / "model.bin"
    src.write_bytes(plaintext)
    enc = tmp_path / "model.gc"
    keys.encrypt_file(src, enc, recipients=[alice, bob], keyset=ks, segment_size=4096)
    keys.decrypt_file(enc, tmp_path / "out", identities=alice)
    _expect_failure(keys.decrypt_file, enc, tmp_path / "out2", identities=keys.Identity.generate())
    keys.rekey_file(enc, recipients=[alice], keyset=ks)
    _expect_failure(keys.decrypt_file, enc, tmp_path / "out3", identities=bob)
    blob = bytearray(enc.read_bytes())
    blob[-5] ^= 1  # a segment's tag
    (tmp_path / "bad.gc").write_bytes(bytes(blob))
    _expect_failure(keys.decrypt_file, tmp_path / "bad.gc", tmp_path / "out4", identities=alice)
    _expect_failure(keys.rekey_file, enc, recipients=[bob], identities=bob)

    # the CLI, with its own audit log file, on a keyset sealed with the passphrase (a
    # passphrase given refuses an unsealed one)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GPUCRYPT_PASSPHRASE", passphrase)
    monkeypatch.setattr(keys.keyset, "DEFAULT_SCRYPT_N", FAST_N)  # what the CLI seals with
    log = tmp_path / "cli-audit.jsonl"
    assert main(["keygen", "--seal", "--out", "cli.json", "--audit-log", str(log)]) == 0
    assert main(["keys", "add", "cli.json", "--primary", "--audit-log", str(log)]) == 0
    assert main(["keys", "destroy", "cli.json", "nope", "--yes", "--audit-log", str(log)]) == 1
    cli_ks = keys.Keyset.load("cli.json", passphrase)
    secrets += [k.secret_bytes() for k in cli_ks]
    logger = logging.getLogger(audit.LOGGER_NAME)
    for handler in logger.handlers[:]:
        if isinstance(handler, logging.FileHandler):
            logger.removeHandler(handler)
            handler.close()
    capsys.readouterr()

    events = _events(captured)
    operations = {e["operation"] for e in events}
    assert {"keyset.load", "keyset.save", "keyset.destroy", "envelope.seal", "envelope.open",
            "identity.generate"} <= operations
    assert any(e["outcome"] == "error" for e in events)
    assert {"file.encrypt", "file.decrypt", "file.rekey"} <= operations
    _assert_no_secret(captured.texts + [log.read_text()], secrets, [passphrase, plaintext_word])


def test_a_file_log_is_on_disk_before_the_operation_returns(tmp_path, monkeypatch):
    """Each event is fsynced: a crash or a power cut right after a key operation lost its
    record when the line was only in the page cache."""
    from gpucrypt import audit as audit_module

    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd")
                      else fd)
        return real_fsync(fd)

    monkeypatch.setattr(audit_module.os, "fsync", spy)
    log = tmp_path / "audit.log"
    handler = audit_module.enable(log)
    try:
        audit_module.event("keyset.save", key_ids=["k1"])
        assert synced and str(synced[-1]).endswith("audit.log")
        quick = audit_module.enable(tmp_path / "quick.log", durable=False)
        try:
            before = len(synced)
            audit_module.event("keyset.save", key_ids=["k2"])
            assert len(synced) == before + 1  # the durable log only
        finally:
            logging.getLogger(audit_module.LOGGER_NAME).removeHandler(quick)
            quick.close()
    finally:
        logging.getLogger(audit_module.LOGGER_NAME).removeHandler(handler)
        handler.close()


def test_an_event_whose_fsync_fails_is_taken_back_and_reported(tmp_path, monkeypatch):
    """The error says the event is missing from the log: it must be (it was in the file,
    not known to be on disk, and noting it by hand as the error says left it twice)."""
    from gpucrypt import audit as audit_module

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    log = tmp_path / "audit.log"
    handler = audit_module.enable(log)
    try:
        audit_module.event("keyset.save", key_ids=["before"])
        monkeypatch.setattr(audit_module.os, "fsync", failing_fsync)
        with pytest.raises(audit_module.AuditLogError, match="missing from it"):
            audit_module.event("keyset.save", key_ids=["lost"])
        lines = log.read_text().splitlines()
        assert len(lines) == 1 and "before" in lines[0]
    finally:
        logging.getLogger(audit_module.LOGGER_NAME).removeHandler(handler)
        handler.close()


def test_enabling_a_file_again_with_the_default_makes_it_durable(tmp_path):
    from gpucrypt import audit as audit_module

    quick = audit_module.enable(tmp_path / "a.log", durable=False)
    try:
        assert audit_module.enable(tmp_path / "a.log") is quick and quick.durable
    finally:
        logging.getLogger(audit_module.LOGGER_NAME).removeHandler(quick)
        quick.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="a forked writer")
def test_a_rotated_log_is_reopened_by_every_process_that_writes_it(tmp_path):
    """Renamed away (logrotate), the log's path is opened anew at the next event, in the
    process that renamed it and in a forked child that had written before: the child kept
    appending to the renamed file."""
    from gpucrypt import audit as audit_module

    log = tmp_path / "audit.log"
    handler = audit_module.enable(log)
    try:
        audit_module.event("keyset.save", key_ids=["parent.before"])
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: one event, wait for the rotation, one more
            code = 1
            try:
                audit_module.event("keyset.save", key_ids=["child.before"])
                os.write(ready_w, b"1")
                os.read(go_r, 1)
                audit_module.event("keyset.save", key_ids=["child.after"])
                code = 0
            finally:
                os._exit(code)
        os.read(ready_r, 1)
        os.rename(log, tmp_path / "audit.log.1")
        audit_module.event("keyset.save", key_ids=["parent.after"])
        os.write(go_w, b"1")
        assert os.waitpid(pid, 0)[1] == 0
        old = (tmp_path / "audit.log.1").read_text()
        new = log.read_text()
        assert "parent.before" in old and "child.before" in old
        assert "parent.after" in new and "child.after" in new
        assert "child.after" not in old
    finally:
        logging.getLogger(audit_module.LOGGER_NAME).removeHandler(handler)
        handler.close()


# ---------------------------------------------------------------- the file commands' --audit-log
def _log_events(log) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_cli_file_commands_record_what_they_did(tmp_path, monkeypatch, capsys):
    """``encrypt``/``decrypt``/``encrypt-model``/``decrypt-model --audit-log``: one event per
    run, as the library's encrypt_file/decrypt_file/save_encrypted/load_encrypted record
    theirs (the file, the keys, the bytes), failures by the library error the command
    reported; and no key, data key, passphrase or plaintext in the log."""
    np = pytest.importorskip("numpy")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPUCRYPT_PASSPHRASE", raising=False)
    monkeypatch.setattr(keys.passphrase, "DEFAULT_LOG_N", 15)  # the least -p may seal with
    deks: list[bytes] = []
    real_dek = keys.generate_dek

    def remembered_dek():
        deks.append(real_dek())
        return deks[-1]

    monkeypatch.setattr(keys, "generate_dek", remembered_dek)
    plaintext = b"the plaintext word zanzibar " * 1000
    (tmp_path / "in.bin").write_bytes(plaintext)
    raw_key = os.urandom(32)
    (tmp_path / "raw.key").write_bytes(raw_key)
    os.chmod(tmp_path / "raw.key", 0o600)
    (tmp_path / "pass.txt").write_text("correct horse zanzibar\n")
    os.chmod(tmp_path / "pass.txt", 0o600)
    safetensors_numpy.save_file({"w": np.arange(64, dtype=np.float32)}, str(tmp_path / "m.safetensors"))
    log = tmp_path / "audit.jsonl"
    try:
        assert main(["keygen", "--out", "ks.json"]) == 0
        assert main(["keygen", "--public", "--out", "other.json"]) == 0
        ks = keys.Keyset.load("ks.json")
        audited = ["--audit-log", str(log)]
        assert main(["encrypt", "--keyset", "ks.json", "in.bin", "enc.gc", *audited]) == 0
        assert main(["decrypt", "--keyset", "ks.json", "enc.gc", "back.bin", *audited]) == 0
        assert (tmp_path / "back.bin").read_bytes() == plaintext
        assert main(["decrypt", "-i", "other.json", "enc.gc", "no.bin", *audited]) == 1
        blob = bytearray((tmp_path / "enc.gc").read_bytes())
        blob[-5] ^= 1  # the last segment's tag
        (tmp_path / "bad.gc").write_bytes(bytes(blob))
        assert main(["decrypt", "--keyset", "ks.json", "bad.gc", "bad.bin", *audited]) == 1
        assert not (tmp_path / "bad.bin").exists()
        assert main(["encrypt", "--key-file", "raw.key", "in.bin", "raw.gc", *audited]) == 0
        assert main(["encrypt", "-p", "--passphrase-file", "pass.txt", "in.bin", "pw.gc",
                     *audited]) == 0
        assert main(["decrypt", "--passphrase-file", "pass.txt", "pw.gc", "pw.bin", *audited]) == 0
        assert main(["encrypt-model", "--keyset", "ks.json", "m.safetensors", "m.gcsafetensors",
                     *audited]) == 0
        assert main(["decrypt-model", "--keyset", "ks.json", "m.gcsafetensors", "m2.safetensors",
                     *audited]) == 0
        # a log that cannot be opened: said before any key is read, nothing written
        assert main(["encrypt", "--keyset", "ks.json", "in.bin", "never.gc",
                     "--audit-log", "missing/audit.log"]) == 1
        assert not (tmp_path / "never.gc").exists()
    finally:
        _remove_file_handlers()
    err = capsys.readouterr().err
    assert "cannot open the audit log missing/audit.log" in err
    events = [e for e in _log_events(log) if e["operation"].split(".")[0] in ("file", "model")]
    primary = ks.primary.id
    summary = [(e["operation"], e["outcome"], e["path"], e.get("key_id"), e.get("error"))
               for e in events]
    assert summary == [
        ("file.encrypt", "ok", str(tmp_path / "in.bin"), primary, None),
        ("file.decrypt", "ok", str(tmp_path / "enc.gc"), "aes-kwp:" + primary, None),
        ("file.decrypt", "error", str(tmp_path / "enc.gc"), None,
         f"NoMatchingRecipient: no recipient in this file matches your key(s); it is for "
         f"aes-kwp:{primary}"),
        ("file.decrypt", "error", str(tmp_path / "bad.gc"), "aes-kwp:" + primary,
         "AuthenticationError"),
        ("file.encrypt", "ok", str(tmp_path / "in.bin"), None, None),
        ("file.encrypt", "ok", str(tmp_path / "in.bin"), None, None),
        ("file.decrypt", "ok", str(tmp_path / "pw.gc"), "scrypt", None),
        ("model.encrypt", "ok", str(tmp_path / "m.gcsafetensors"), primary, None),
        ("model.decrypt", "ok", str(tmp_path / "m.gcsafetensors"), "aes-kwp:" + primary, None),
    ], summary
    for e in events[:2] + events[4:7]:
        assert e["bytes"] == len(plaintext) and e["algorithm"] == "chacha20-poly1305", e
    assert events[0]["recipients"] == events[1]["recipients"] == ["aes-kwp:" + primary]
    assert "recipients" not in events[4] and events[5]["recipients"] == ["scrypt"]
    assert all(e["pid"] == os.getpid() and e["duration_s"] >= 0 for e in events)
    _assert_no_secret([log.read_text()], [raw_key, *deks, *(k.secret_bytes() for k in ks)],
                      ["zanzibar"])


def test_cli_audit_log_may_not_be_a_file_the_command_reads_or_writes(tmp_path, monkeypatch,
                                                                      capsys):
    """OUT (or keygen's new file) named as the log, with --force: OUT was renamed over the
    log (its lines lost), the next event appended to OUT (a plaintext or keyset with a JSON
    line after it), exit 0. Refused as a usage error, nothing written."""
    monkeypatch.chdir(tmp_path)
    key = tmp_path / "k"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    (tmp_path / "in").write_bytes(b"plain")
    assert main(["encrypt", "--key-file", "k", "in", "enc"]) == 0
    (tmp_path / "audit.log").write_text("an earlier line\n")
    os.link(tmp_path / "audit.log", tmp_path / "alias.log")
    cases = [["decrypt", "--key-file", "k", "--force", "enc", "audit.log"],
             ["encrypt", "--key-file", "k", "--force", "in", "alias.log"],
             ["keygen", "--force", "--out", "audit.log"],
             ["encrypt", "--key-file", "audit.log", "in", "out"]]
    try:
        for argv in cases:
            code = main([*argv, "--audit-log", "audit.log"])
            err = capsys.readouterr().err
            assert code == 2 and "is also a file this command reads or writes" in err, (argv, err)
    finally:
        _remove_file_handlers()
    assert (tmp_path / "audit.log").read_text() == "an earlier line\n"
    assert not (tmp_path / "out").exists()


def test_cli_events_record_the_failure_not_the_usage_error(tmp_path, monkeypatch, capsys):
    """A usage error (exit 2: no key given, a segment size out of range) records nothing,
    and a segment size is refused before the keyset is loaded or a key sealed (a KMS call,
    audited); a header that fails is a failure recorded as such (decrypt recorded none,
    decrypt-model did); the command line's own refusal of a key (exit 1) with its words."""
    monkeypatch.chdir(tmp_path)
    assert main(["keygen", "--out", "ks.json"]) == 0
    key = tmp_path / "k"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    (tmp_path / "in").write_bytes(os.urandom(5000))
    assert main(["encrypt", "--key-file", "k", "in", "raw.gc"]) == 0
    log = tmp_path / "audit.jsonl"
    audited = ["--audit-log", str(log)]
    try:
        assert main(["encrypt", "--keyset", "ks.json", "--segment-size", "1", "in", "o1",
                     *audited]) == 2
        assert main(["decrypt", "raw.gc", "o2", *audited]) == 2  # no key given
        assert main(["decrypt", "--keyset", "ks.json", "in", "o3", *audited]) == 1
        assert main(["decrypt", "--keyset", "ks.json", "raw.gc", "o4", *audited]) == 1
    finally:
        _remove_file_handlers()
    err = capsys.readouterr().err
    assert "carries no envelope" in err
    events = [(e["operation"], e["outcome"], os.path.basename(e["path"]), e.get("error"))
              for e in _log_events(log) if e["operation"].startswith("file.")]
    assert events == [
        ("file.decrypt", "error", "in", "FormatError"),
        ("file.decrypt", "error", "raw.gc",
         "CliError: this file carries no envelope (it was encrypted with a raw key): "
         "-i/--keyset/--kek cannot open it"),
    ], events
    assert not any(e["operation"] == "envelope.seal" for e in _log_events(log))


def test_an_audit_log_given_to_one_main_call_is_not_written_by_the_next(tmp_path, monkeypatch,
                                                                        capsys):
    """main(argv) in a process (a test, an embedding program): call 1's --audit-log got the
    events of every later call, with or without its own log."""
    monkeypatch.chdir(tmp_path)
    key = tmp_path / "k"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    (tmp_path / "in").write_bytes(b"plain")
    assert main(["encrypt", "--key-file", "k", "in", "a.gc", "--audit-log", "a.log"]) == 0
    assert main(["encrypt", "--key-file", "k", "in", "b.gc", "--audit-log", "b.log"]) == 0
    assert main(["encrypt", "--key-file", "k", "in", "c.gc"]) == 0
    capsys.readouterr()
    assert [os.path.basename(e["path"]) for e in _log_events(tmp_path / "a.log")] == ["in"]
    assert len(_log_events(tmp_path / "b.log")) == 1
    assert not any(getattr(h, "baseFilename", "").startswith(str(tmp_path))
                   for h in logging.getLogger(audit.LOGGER_NAME).handlers)


def test_main_leaves_the_applications_audit_logger_as_it_found_it(tmp_path, monkeypatch, capsys,
                                                                 logging_state):
    """Detaching the call's handler left enable()'s propagate=False and level behind: an
    embedding application's root log silently stopped getting gpucrypt.audit events."""
    monkeypatch.chdir(tmp_path)
    key = tmp_path / "k"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    (tmp_path / "in").write_bytes(b"plain")
    logging_state.propagate, logging_state.level = True, logging.NOTSET
    assert main(["encrypt", "--key-file", "k", "in", "a.gc", "--audit-log", "a.log"]) == 0
    capsys.readouterr()
    assert logging_state.propagate is True and logging_state.level == logging.NOTSET
    assert len(_log_events(tmp_path / "a.log")) == 1


def test_a_lost_error_event_leaves_its_failure_in_the_runs_event(tmp_path, monkeypatch, capsys):
    """envelope.open failing (a wrong identity) whose own error event cannot be written:
    the run's file.decrypt event, written, said AuditLogError; the failure was the key."""
    monkeypatch.chdir(tmp_path)
    assert main(["keygen", "--public", "--out", "alice"]) == 0
    assert main(["keygen", "--public", "--out", "bob"]) == 0
    (tmp_path / "plain").write_bytes(os.urandom(1000))
    assert main(["encrypt", "-r", "alice.pub", "plain", "sealed"]) == 0
    capsys.readouterr()
    real_open, writes = audit._AuditFileHandler._open, []

    class _FirstWriteFails(_ShortWrites):
        def write(self, data):
            writes.append(data)
            self.keep = None if len(writes) == 1 else len(data)
            return super().write(data)

    monkeypatch.setattr(audit._AuditFileHandler, "_open",
                        lambda self: _FirstWriteFails(real_open(self), None))
    try:
        assert main(["decrypt", "-i", "bob", "sealed", "out", "--audit-log", "audit.log"]) == 1
    finally:
        _remove_file_handlers()
    err = capsys.readouterr().err
    assert "'envelope.open' (it failed" in err, err
    [written] = _log_events(tmp_path / "audit.log")
    assert written["operation"] == "file.decrypt" and written["error"].startswith(
        "NoMatchingRecipient"), written


def test_cli_audit_log_may_not_be_a_file_a_key_reference_or_a_folder_names(tmp_path, monkeypatch,
                                                                           capsys):
    """--kek file://KS (or its passphrase-source=file:PW) named as the log: the event was
    appended to the keyset (no longer JSON: its keys lost) or to the passphrase file; a
    log inside a checkpoint folder IN made the folder fail its manifest from then on."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GPUCRYPT_PASSPHRASE", raising=False)
    assert main(["keygen", "--out", "ks.json"]) == 0
    (tmp_path / "pw").write_text("correct horse\n")
    (tmp_path / "pw").chmod(0o600)
    (tmp_path / "in").write_bytes(b"plain")
    (tmp_path / "ck").mkdir()
    np = pytest.importorskip("numpy")
    pytest.importorskip("safetensors.numpy").save_file({"w": np.zeros(4, np.float32)},
                                                       str(tmp_path / "ck" / "model.safetensors"))
    keyset_before = (tmp_path / "ks.json").read_bytes()
    cases = [(["encrypt", "--kek", f"file://{tmp_path}/ks.json", "in", "o1"], "ks.json"),
             (["encrypt", "--kek", f"file://{tmp_path}/ks.json?passphrase-source=file:{tmp_path}/pw",
               "in", "o2"], "pw"),
             (["encrypt-model", "--keyset", "ks.json", "ck", "ck-enc"], "ck/audit.log")]
    try:
        for argv, log in cases:
            code = main([*argv, "--audit-log", log])
            err = capsys.readouterr().err
            assert code == 2 and "is also a file this command reads or writes" in err, (argv, err)
    finally:
        _remove_file_handlers()
    assert (tmp_path / "ks.json").read_bytes() == keyset_before
    assert (tmp_path / "pw").read_text() == "correct horse\n"
    assert not (tmp_path / "ck" / "audit.log").exists() and not (tmp_path / "o1").exists()


def test_a_dcp_load_records_the_path_of_its_metadata(captured, tmp_path):
    """The DCP reader opens .metadata itself (without waiting, so that a FIFO there is
    refused) and hands the open file on: its file.decrypt event recorded path null."""
    torch = pytest.importorskip("torch")
    import torch.distributed.checkpoint as dcp

    from gpucrypt.distributed import EncryptedReader, EncryptedWriter

    keyset = keys.Keyset.generate()
    dcp.save({"w": torch.ones(4)}, storage_writer=EncryptedWriter(tmp_path, keyset=keyset,
                                                                  device="cpu"))
    captured.records.clear()
    out = {"w": torch.zeros(4)}
    dcp.load(out, storage_reader=EncryptedReader(tmp_path, keyset=keyset, device="cpu"))
    assert torch.equal(out["w"], torch.ones(4))
    paths = [e.get("path") for e in _events(captured) if e["operation"] == "file.decrypt"]
    assert paths == [str(tmp_path / ".metadata")]


@pytest.mark.parametrize("device, ran", [("auto", "cpu"), ("cpu", "cpu"), ("gpu", "gpu")])
def test_file_events_record_the_device_that_ran(captured, tmp_path, device, ran):
    """The events recorded the device asked for ("auto"), not the one that ran the
    segments; the audit's own description says "cpu or gpu". (gpu: the simulator here.)"""
    if device == "gpu":
        from gpucrypt.backends import BackendUnavailable, get_backend
        try:
            get_backend("gpu")
        except BackendUnavailable as exc:
            pytest.skip(f"no GPU backend, not even the simulator: {exc}")
    alice = keys.Identity.generate()
    data = os.urandom(3000)
    keys.encrypt_file(data, tmp_path / "ct", recipients=[alice.recipient], device=device,
                      segment_size=4096)
    out = io.BytesIO()
    keys.decrypt_file(tmp_path / "ct", out, identities=[alice], device=device)
    assert out.getvalue() == data
    events = {e["operation"]: e for e in _events(captured)}
    assert events["file.encrypt"]["device"] == events["file.decrypt"]["device"] == ran


def test_model_and_command_line_events_record_the_device_that_ran(captured, tmp_path):
    """save_encrypted(recipients=...), load_encrypted(identity=...) and the command line's
    --audit-log recorded "auto"."""
    np = pytest.importorskip("numpy")
    from gpucrypt import models
    from gpucrypt.cli import main

    alice = keys.Identity.generate()
    models.save_encrypted({"w": np.arange(8, dtype=np.float32)}, tmp_path / "m.gc",
                          recipients=[alice.recipient])
    models.load_encrypted(tmp_path / "m.gc", identity=alice, framework="numpy")
    (tmp_path / "key").write_bytes(os.urandom(32))
    os.chmod(tmp_path / "key", 0o600)
    (tmp_path / "plain").write_bytes(b"x" * 100)
    log = tmp_path / "audit.log"
    for argv in (["encrypt", "--key-file", str(tmp_path / "key"), str(tmp_path / "plain"),
                  str(tmp_path / "ct")],
                 ["decrypt", "--key-file", str(tmp_path / "key"), str(tmp_path / "ct"),
                  str(tmp_path / "back")]):
        assert main([*argv, "--audit-log", str(log)]) == 0
    devices = [e["device"] for e in _events(captured) if e["operation"] in
               ("model.encrypt", "model.decrypt")]
    devices += [json.loads(line)["device"] for line in log.read_text().splitlines()]
    assert devices == ["cpu"] * 4


def test_a_failure_after_the_device_was_chosen_records_it(captured, tmp_path):
    """decrypt_file of a tampered segment recorded no device at all: the field was set
    only when the work succeeded."""
    alice = keys.Identity.generate()
    keys.encrypt_file(os.urandom(10_000), tmp_path / "ct", recipients=[alice.recipient],
                      segment_size=4096)
    raw = bytearray((tmp_path / "ct").read_bytes())
    raw[-40] ^= 1  # inside the last segment
    (tmp_path / "ct").write_bytes(bytes(raw))
    from gpucrypt.stream import AuthenticationError

    with pytest.raises(AuthenticationError):
        keys.decrypt_file(tmp_path / "ct", io.BytesIO(), identities=[alice])
    [event] = [e for e in _events(captured) if e["operation"] == "file.decrypt"]
    assert event["outcome"] == "error" and event["device"] == "cpu"


@pytest.mark.parametrize("device, environment", [("gpu", None), ("auto", "gpu"), ("auto", "tpu")],
                         ids=["device-gpu", "GPUCRYPT_DEVICE-gpu", "GPUCRYPT_DEVICE-unknown"])
def test_decrypt_refuses_a_device_that_cannot_run_before_any_key_is_read(
        tmp_path, monkeypatch, capsys, device, environment):
    """decrypt --device gpu where no GPU runs unwrapped the data key (the keyset loaded, the
    envelope opened: events of the log, a KMS or HSM call for --kek) and only then found no
    GPU, a usage error (exit 2) that records no file.decrypt event: the log held an
    envelope.open with no run to go with it. It is refused first, as encrypt refuses it."""
    from gpucrypt import backends

    monkeypatch.chdir(tmp_path)
    assert main(["keygen", "--out", "ks.json"]) == 0
    (tmp_path / "in").write_bytes(os.urandom(5000))
    assert main(["encrypt", "--keyset", "ks.json", "in", "sealed.gc"]) == 0
    capsys.readouterr()
    # the GPU backend refuses to start, with a driverless machine's reason (the suite's own
    # process has the simulator's GPU otherwise)
    monkeypatch.setitem(backends._reasons, "gpu", "no CUDA driver library (libcuda) can be "
                                                  "loaded: this machine has no NVIDIA GPU driver")
    monkeypatch.delitem(backends._instances, "gpu", raising=False)
    if environment is None:
        monkeypatch.delenv("GPUCRYPT_DEVICE", raising=False)
    else:
        monkeypatch.setenv("GPUCRYPT_DEVICE", environment)
    log = tmp_path / "audit.jsonl"
    try:
        code = main(["decrypt", "--keyset", "ks.json", "--device", device, "sealed.gc", "out",
                     "--audit-log", str(log)])
    finally:
        _remove_file_handlers()
    err = capsys.readouterr().err
    assert code == 2, err
    assert ("GPUCRYPT_DEVICE" if environment else "device 'gpu' unavailable") in err, err
    assert not (tmp_path / "out").exists()
    events = _log_events(log) if log.exists() else []
    assert events == [], events  # no keyset.load, no envelope.open: no key was read
