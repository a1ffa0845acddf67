"""The command line as safe and as convenient as age (issue 14): key options that cannot
apply together are refused, outputs leave nothing behind whatever signal arrives and never
replace a file that appeared meanwhile, key files others can read are refused,
passphrase-encrypted files, stdin/stdout pipes, ``rekey`` on model files, ``selftest``
sizes, and the help texts.

Signals, pipes and races need real processes: each such test starts ``gpucrypt`` with an
input pipe that the test holds open, waits until the process holds its output file
open (seen in ``/proc/PID/fd``), and only then acts, so the process is certainly mid-run.
Everything else calls :func:`gpucrypt.cli.main` in this process.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import shlex
import select
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from gpucrypt import keys, stream
from gpucrypt.cli import build_parser, main

VECTORS = Path(__file__).parent / "vectors" / "passphrase"
#: started with ``MODE ARGS...``: MODE "named" turns off unnamed (O_TMPFILE) outputs, to
#: test the fallback; small CPU batches make the output grow while the input still flows,
#: and passphrases cost scrypt 2**10. The signals the tests send start at their default
#: action, as in a shell: an ignored signal stays ignored across exec, so under ``nohup``
#: (SIGHUP ignored) the child would otherwise outlive its SIGHUP and the named fallback
#: would leave its handler uninstalled (it installs one only over the default action).
LAUNCHER = ("import signal, sys\n"
            "for name in ('SIGTERM', 'SIGHUP'):\n"
            "    signal.signal(getattr(signal, name), signal.SIG_DFL)\n"
            "from gpucrypt import pipeline\n"
            "from gpucrypt.files import _atomic\n"
            "from gpucrypt.keys import passphrase\n"
            "pipeline.CPU_BATCH_BYTES = 1 << 16\n"
            "passphrase.DEFAULT_LOG_N = passphrase.MIN_LOG_N = 10\n"
            "if sys.argv[1] == 'named':\n"
            "    _atomic._TMPFILE = 0\n"
            "from gpucrypt.cli import main\n"
            "sys.exit(main(sys.argv[2:]))\n")
ON_LINUX = sys.platform.startswith("linux")


def private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder with a 0600 raw key, a plaintext, and fast passphrases (scrypt 2**10)."""
    from gpucrypt.keys import passphrase

    monkeypatch.setattr(passphrase, "DEFAULT_LOG_N", 10)
    monkeypatch.setattr(passphrase, "MIN_LOG_N", 10)  # writers refuse 2**10 otherwise
    monkeypatch.delenv("GPUCRYPT_PASSPHRASE", raising=False)
    monkeypatch.chdir(tmp_path)
    private(tmp_path / "key", os.urandom(32))
    (tmp_path / "plain").write_bytes(os.urandom(10_000))
    private(tmp_path / "pw", b"correct horse battery staple\n")
    return tmp_path


# ------------------------------------------------------------------ 1. key sources
#: command -> the key options it takes (as the user writes them, with a value)
KEY_OPTIONS = {
    "encrypt": {"--key-file": ["--key-file", "key"], "--key-env": ["--key-env", "K"],
                "-r/--recipient": ["-r", "alice.pub"], "--keyset": ["--keyset", "ks.json"],
                "-p/--passphrase": ["-p"]},
    "decrypt": {"--key-file": ["--key-file", "key"], "--key-env": ["--key-env", "K"],
                "-i/--identity": ["-i", "alice"], "--keyset": ["--keyset", "ks.json"],
                "-p/--passphrase": ["-p"]},
}
KEY_OPTIONS["encrypt-model"] = KEY_OPTIONS["encrypt"]
KEY_OPTIONS["decrypt-model"] = KEY_OPTIONS["decrypt"]
#: the pairs that do apply together: both wrap the data key, or both are tried to open it
TOGETHER = {frozenset({"-r/--recipient", "--keyset"}), frozenset({"-i/--identity", "--keyset"})}
CONFLICTS = [(command, a, b) for command, options in KEY_OPTIONS.items()
             for a, b in itertools.combinations(options, 2) if frozenset({a, b}) not in TOGETHER]


@pytest.mark.parametrize("command, first, second", CONFLICTS,
                         ids=[f"{c}:{a}+{b}" for c, a, b in CONFLICTS])
def test_key_options_that_cannot_apply_together_are_refused(work, capsys, command, first, second):
    """Today ``encrypt --key-file k -r alice.pub`` exits 0 and ignores ``-r``."""
    options = KEY_OPTIONS[command]
    code, _, err = run(capsys, command, *options[first], *options[second], "plain", "out")
    assert code == 2, err
    assert f"{first} and {second} cannot be used together" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (work / "out").exists()


def test_key_options_that_apply_together_still_work(work, capsys):
    for args in (["keygen", "--public", "--out", "alice"], ["keygen", "--out", "ks.json"]):
        assert run(capsys, *args)[0] == 0
    code, _, err = run(capsys, "encrypt", "-r", "alice.pub", "--keyset", "ks.json", "plain", "sealed")
    assert code == 0, err
    code, _, err = run(capsys, "decrypt", "-i", "alice", "--keyset", "ks.json", "sealed", "back")
    assert code == 0, err
    assert (work / "back").read_bytes() == (work / "plain").read_bytes()


# ------------------------------------------------------------------ 2. outputs
def _writing(proc: subprocess.Popen, folder: Path) -> int | None:
    """The size of the file ``proc`` writes in ``folder`` (unnamed or not), None if none."""
    fds = f"/proc/{proc.pid}/fd"
    try:
        names = os.listdir(fds)
    except OSError:
        return None
    for fd in names:
        try:
            if os.readlink(os.path.join(fds, fd)).startswith(f"{folder}/"):
                return os.stat(os.path.join(fds, fd)).st_size
        except OSError:
            continue
    return None


def _wait_writing(proc: subprocess.Popen, folder: Path, at_least: int) -> None:
    # generous: five interpreters start at once, and CI runs this beside the whole suite
    # (one run under heavy load took 88 s); the deadline only bounds a hang
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        size = _writing(proc, folder)
        if size is not None and size >= at_least:
            return
        if proc.poll() is not None:
            pytest.fail(f"gpucrypt ended early ({proc.returncode}): {proc.stderr.read().decode()}")
        time.sleep(0.01)
    pytest.fail("gpucrypt never started writing its output")


def _start(mode: str, *argv, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, mode, *map(str, argv)], cwd=cwd,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def sealed_data(tmp_path_factory):
    """(key file, 2 MiB of plaintext, its stream file's bytes at 4 KiB segments)."""
    folder = tmp_path_factory.mktemp("sealed")
    key = private(folder / "key", os.urandom(32))
    plain = os.urandom(2 << 20)
    out = io.BytesIO()
    stream.encrypt(plain, out, key.read_bytes(), segment_size=4096, device="cpu")
    return key, plain, out.getvalue()


SIGNALS = [("unnamed", signal.SIGTERM), ("unnamed", signal.SIGHUP), ("unnamed", signal.SIGKILL),
           ("named", signal.SIGTERM), ("named", signal.SIGHUP)]


@pytest.mark.skipif(not ON_LINUX, reason="watches the processes through /proc (Linux)")
@pytest.mark.parametrize("operation", ["encrypt", "decrypt"])
def test_a_signal_mid_run_leaves_nothing_behind(tmp_path, sealed_data, operation):
    """SIGTERM, SIGHUP or SIGKILL while gpucrypt writes OUT (one process per case, all at
    once): no OUT, no temporary file, no plaintext on disk. ``named`` is the fallback where
    O_TMPFILE is missing: its signal handlers clean up (SIGKILL cannot be caught there, so
    nothing is claimed for it). Today a hidden ``.OUT.xxxx.gpucrypt-tmp`` stays."""
    key, plain, sealed = sealed_data
    # all but the end: no process can finish before it is signalled
    feed = plain if operation == "encrypt" else sealed
    size = ["--segment-size", "4KiB"] if operation == "encrypt" else []
    cases = []
    try:
        for mode, signum in SIGNALS:
            out = tmp_path / f"{mode}-{signal.Signals(signum).name}"
            out.mkdir()
            proc = _start(mode, operation, "--key-file", key, *size, "--threads", "1",
                          "-", out / "file", cwd=tmp_path)
            cases.append((mode, signum, out, proc))
            proc.stdin.write(feed[:len(feed) - 8192])
            proc.stdin.flush()
        for mode, signum, out, proc in cases:
            _wait_writing(proc, out, 64 << 10)  # batches (of plaintext, to decrypt) written
            proc.send_signal(signum)
        for mode, signum, out, proc in cases:
            assert proc.wait(timeout=60) == -signum, (mode, signum, proc.stderr.read())
            assert os.listdir(out) == [], (mode, signum)
    finally:
        for *_, proc in cases:
            proc.kill()
            proc.stdin.close()
            proc.stderr.close()
    probe = plain[100_000:100_064]  # from the part that was written out before the signal
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or probe not in path.read_bytes(), path


@pytest.mark.skipif(not ON_LINUX, reason="watches the processes through /proc (Linux)")
def test_two_writers_racing_for_one_new_output_one_wins(tmp_path, sealed_data):
    """Both start before OUT exists (both pass the early check); today both exit 0 and the
    first writer's file is silently replaced. Publishing is a link: exactly one wins, with
    unnamed files and with the named fallback."""
    key, _, _ = sealed_data
    data = [os.urandom(200_000), os.urandom(200_000)]
    races = {}
    try:
        for mode in ("unnamed", "named"):
            out = tmp_path / mode
            out.mkdir()
            races[mode] = out, [_start(mode, "encrypt", "--key-file", key, "--threads", "1",
                                       "--segment-size", "4KiB", "-", out / "file",
                                       cwd=tmp_path) for _ in data]
            for proc, chunk in zip(races[mode][1], data):
                proc.stdin.write(chunk)
                proc.stdin.flush()
        for out, procs in races.values():
            for proc in procs:
                _wait_writing(proc, out, 1)
        for out, procs in races.values():
            for proc in procs:
                proc.stdin.close()
        for mode, (out, procs) in races.items():
            codes = [proc.wait(timeout=60) for proc in procs]
            errors = [proc.stderr.read().decode() for proc in procs]
            assert sorted(codes) == [0, 1], (mode, errors)
            loser = errors[codes.index(1)]
            assert f"output exists: {out / 'file'}" in loser and loser.count("\n") == 1, loser
            back = io.BytesIO()
            stream.decrypt((out / "file").read_bytes(), back, key.read_bytes())
            assert back.getvalue() == data[codes.index(0)] and os.listdir(out) == ["file"]
    finally:
        for _, procs in races.values():
            for proc in procs:
                proc.kill()
                proc.stderr.close()


@pytest.mark.parametrize("unnamed", [True, False], ids=["unnamed", "named"])
def test_atomic_file_never_replaces_without_overwrite(tmp_path, monkeypatch, unnamed):
    """The library side of the race: publishing without ``overwrite`` is a link, so a file
    that appeared meanwhile stays and :class:`OutputExists` names the destination; an
    unnamed file has no entry in the folder before it is published."""
    from gpucrypt.files import _atomic

    if not unnamed:
        monkeypatch.setattr(_atomic, "_TMPFILE", 0)
    target = tmp_path / "out"
    late = _atomic.AtomicFile(target, overwrite=False)
    late.write(b"second")
    assert late.unnamed == (unnamed and bool(getattr(os, "O_TMPFILE", 0)))
    assert os.listdir(tmp_path) == ([] if late.unnamed else [os.path.basename(late._temp)])
    with _atomic.AtomicFile(target, overwrite=False) as first:
        first.write(b"first")
    with pytest.raises(_atomic.OutputExists) as err:
        late.commit()
    assert err.value.filename == str(target) and isinstance(err.value, FileExistsError)
    assert target.read_bytes() == b"first" and os.listdir(tmp_path) == ["out"]

    def write_by_name(name: str) -> None:  # a library writer that takes only a file name
        with open(name, "wb") as f:
            f.write(b"by name")

    _atomic.write_atomically_with(target, write_by_name, 0o640)
    assert target.read_bytes() == b"by name" and os.listdir(tmp_path) == ["out"]
    assert target.stat().st_mode & 0o777 == 0o640


def test_output_errors_name_the_users_path(work, capsys):
    """Not the temporary file (".OUT.xxxx.gpucrypt-tmp") nor its folder."""
    (work / "afile").write_bytes(b"")
    for out in (work / "missing" / "out", work / "afile" / "out"):
        for command in ("encrypt", "decrypt"):
            code, _, err = run(capsys, command, "--key-file", "key", "plain", out)
            assert code == 1 and f"cannot write {out}:" in err and "gpucrypt-tmp" not in err, err
    assert sorted(os.listdir(work)) == ["afile", "key", "plain", "pw"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_a_read_only_folder_is_named(work, capsys):
    (work / "ro").mkdir(mode=0o500)
    code, _, err = run(capsys, "encrypt", "--key-file", "key", "plain", work / "ro" / "out")
    assert code == 1 and f"cannot write {work / 'ro' / 'out'}:" in err


def test_decrypting_a_model_file_says_what_to_use(work, capsys):
    """The message ended with an unrelated "(rekeying model files is not supported yet)"."""
    from gpucrypt import models

    np = pytest.importorskip("numpy")
    models.save_encrypted({"w": np.ones(64, np.uint8)}, work / "m.gc", (work / "key").read_bytes())
    code, _, err = run(capsys, "decrypt", "--key-file", "key", "m.gc", "out")
    assert code == 1 and "decrypt-model" in err and "rekey" not in err


# ------------------------------------------------------------------ 3. permissions
@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_secrets_others_can_read_are_refused(work, capsys):
    for args in (["keygen", "--public", "--out", "alice"], ["keygen", "--out", "ks.json"]):
        assert run(capsys, *args)[0] == 0
    assert run(capsys, "encrypt", "-r", "alice.pub", "plain", "for-alice")[0] == 0
    assert run(capsys, "encrypt", "--keyset", "ks.json", "plain", "for-ks")[0] == 0
    cases = {"key": ["encrypt", "--key-file", "key", "plain", "x"],
             "alice": ["decrypt", "-i", "alice", "for-alice", "x"],
             "ks.json": ["decrypt", "--keyset", "ks.json", "for-ks", "x"],
             "pw": ["encrypt", "-p", "--passphrase-file", "pw", "plain", "x"]}
    for name, argv in cases.items():
        (work / name).chmod(0o644)
        code, _, err = run(capsys, *argv)
        assert code == 2 and f"chmod 600 {name}" in err and "0644" in err, (name, err)
        assert not (work / "x").exists()
        code, _, err = run(capsys, *argv, "--unsafe-key-permissions")  # the risk accepted
        assert code == 0, err
        (work / "x").unlink()
        (work / name).chmod(0o600)
        assert run(capsys, *argv)[0] == 0
        (work / "x").unlink()


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_local_files_of_a_kek_reference_are_checked_too(work, capsys):
    """--kek file://KEYSET and its passphrase-source get --keyset's check, and a pkcs11:
    pin-source too, in every form the reader takes: file:PATH, file://PATH and a plain
    absolute path (the plain path was not checked)."""
    assert run(capsys, "keygen", "--out", "ks.json")[0] == 0
    (work / "pw").write_text("unused\n")
    (work / "pw").chmod(0o600)
    kek = f"file://{work / 'ks.json'}"
    assert run(capsys, "encrypt", "--kek", kek, "plain", "sealed")[0] == 0
    forms = (f"file:{work / 'pw'}", f"file://{work / 'pw'}", str(work / "pw"))
    for secret, uri in (("ks.json", kek),
                        *(("pw", f"{kek}?passphrase-source={form}") for form in forms)):
        (work / secret).chmod(0o640)
        for argv in (["encrypt", "--kek", uri, "plain", "x"], ["decrypt", "--kek", uri, "sealed", "x"]):
            code, _, err = run(capsys, *argv)
            assert code == 2 and f"chmod 600 {work / secret}" in err, (secret, argv, err)
            assert not (work / "x").exists()
        (work / secret).chmod(0o600)
    code, _, err = run(capsys, "decrypt", "--kek", kek, "sealed", "x")
    assert code == 0 and (work / "x").read_bytes() == (work / "plain").read_bytes(), err
    (work / "x").unlink()
    # refused before any token is touched (the module named does not even exist)
    hsm = f"pkcs11:token=t;object=o?module-path={work / 'no-module.so'}&pin-source="
    for form in forms:
        (work / "pw").chmod(0o644)
        for argv in (["encrypt", "--kek", hsm + form, "plain", "x"],
                     ["decrypt", "--kek", hsm + form, "sealed", "x"]):
            code, _, err = run(capsys, *argv)
            assert code == 2 and f"pin file {work / 'pw'} is accessible" in err, (argv, err)
            assert f"chmod 600 {work / 'pw'}" in err and not (work / "x").exists()
        (work / "pw").chmod(0o600)  # passes the check, to fail where the module is loaded
        code, _, err = run(capsys, "encrypt", "--kek", hsm + form, "plain", "x")
        assert code == 1 and "no-module.so does not exist" in err, err


# ------------------------------------------------------------------ 4. passphrases
def test_passphrase_round_trip_and_wrong_passphrase(work, capsys, monkeypatch):
    code, _, err = run(capsys, "encrypt", "-p", "--passphrase-file", "pw", "plain", "sealed")
    assert code == 0, err
    header = stream.read_header(work / "sealed")
    assert keys.describe_envelope(header.envelope) == ["scrypt"] and header.key_id is None
    from gpucrypt.keys import _envelope

    stanza = _envelope.decode(header.envelope)[0]  # the work factor is in the header (log2 N)
    assert stanza.kind == "scrypt" and stanza.recipient_id[16] == 10
    # decrypt notices the passphrase stanza by itself; -p says so explicitly
    for extra in ([], ["-p"]):
        code, _, err = run(capsys, "decrypt", *extra, "--passphrase-file", "pw", "sealed", "back",
                           "--force")
        assert code == 0, err
        assert (work / "back").read_bytes() == (work / "plain").read_bytes()
    monkeypatch.setenv("GPUCRYPT_PASSPHRASE", "not the passphrase")
    code, _, err = run(capsys, "decrypt", "sealed", "wrong")
    assert code == 1 and err.count("\n") == 1 and "wrong passphrase" in err, err
    assert not (work / "wrong").exists()
    # a raw key on a passphrase file fails, and -p on a raw-key file says what it needs
    assert run(capsys, "decrypt", "--key-file", "key", "sealed", "wrong")[0] == 1
    assert run(capsys, "encrypt", "--key-file", "key", "plain", "raw")[0] == 0
    code, _, err = run(capsys, "decrypt", "-p", "raw", "wrong")
    assert code == 1 and "not passphrase-encrypted" in err


CREME_NFC, CREME_NFD = "Cr\u00e8me br\u00fbl\u00e9e", "Cre\u0300me bru\u0302le\u0301e"


def test_a_passphrase_file_is_read_as_bytes(work, capsys, monkeypatch):
    """A byte order mark (Windows editors write one) is no part of the passphrase, and a
    line ending inside it is kept as written: only those that end the file are dropped.
    Whichever source the passphrase comes from, it is one text in NFC or NFD."""
    private(work / "bom", b"\xef\xbb\xbf" + CREME_NFC.encode() + b"\r\n")
    private(work / "lines", b"one\r\ntwo\rthree\r\n")
    for name, text in (("bom", CREME_NFC), ("lines", "one\r\ntwo\rthree")):
        code, _, err = run(capsys, "encrypt", "-p", "--passphrase-file", name, "plain", name + ".gc")
        assert code == 0, err
        envelope = stream.read_header(work / (name + ".gc")).envelope
        keys.open_envelope(envelope, keys.Passphrase(text))  # the passphrase it was sealed with
        code, _, err = run(capsys, "decrypt", "--passphrase-file", name, name + ".gc", name + ".out")
        assert code == 0, err
        assert (work / (name + ".out")).read_bytes() == (work / "plain").read_bytes()
    private(work / "nfd", CREME_NFD.encode() + b"\n")
    code, _, err = run(capsys, "decrypt", "--passphrase-file", "nfd", "bom.gc", "nfd.out")
    assert code == 0, err
    monkeypatch.setenv("GPUCRYPT_PASSPHRASE", CREME_NFD)
    code, _, err = run(capsys, "decrypt", "bom.gc", "env.out")
    assert code == 0, err


def test_files_sealed_from_an_earlier_reading_of_the_passphrase_still_open(work, capsys,
                                                                            monkeypatch):
    """gpucrypt read --passphrase-file as text: the byte order mark kept, every \\r\\n and
    \\r inside turned into \\n; and derived the passphrase as given, not in NFC. Files
    sealed so open with the same passphrase file (or text) as before."""
    earlier = {"bom": (b"\xef\xbb\xbfpw\r\n", "\ufeffpw"),
               "lines": (b"one\r\ntwo\rthree\r\n", "one\ntwo\nthree"),
               "nfd": (CREME_NFD.encode() + b"\n", CREME_NFD)}
    for name, (data, sealed_with) in earlier.items():
        private(work / name, data)
        dek = keys.generate_dek()
        envelope = _earlier_passphrase_envelope(sealed_with, dek)
        stream.encrypt((work / "plain").read_bytes(), work / (name + ".gc"), dek,
                       envelope=envelope)
        code, _, err = run(capsys, "decrypt", "--passphrase-file", name, name + ".gc",
                           name + ".out")
        assert code == 0, (name, err)
        assert (work / (name + ".out")).read_bytes() == (work / "plain").read_bytes()
    monkeypatch.setenv("GPUCRYPT_PASSPHRASE", CREME_NFD)
    code, _, err = run(capsys, "decrypt", "nfd.gc", "env.out")
    assert code == 0, err


def _earlier_passphrase_envelope(text: str, dek: bytes) -> bytes:
    """The envelope gpucrypt sealed for ``text`` before it normalised passphrases: scrypt
    over its UTF-8 as given (docs/KEYS.md's construction, with cryptography alone)."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    from gpucrypt.keys import _envelope

    salt = os.urandom(16)
    key = Scrypt(salt=b"gpucrypt-passphrase-v1\x00" + salt, length=32, n=2 ** 10, r=8,
                 p=1).derive(text.encode())
    body = ChaCha20Poly1305(key).encrypt(bytes(12), dek, None)
    return _envelope.encode([_envelope.Stanza("scrypt", salt + bytes([10]), body)])


def test_a_passphrase_for_a_file_it_cannot_open_names_what_would(work, capsys):
    """A passphrase file given for a recipient-wrapped or raw-key file: the message says
    what opens the file (not "no key given"), exit 1 as -p on a raw-key file; without any
    key option a wrapped file still names its recipients, a usage error (2)."""
    assert run(capsys, "keygen", "--public", "--out", "alice")[0] == 0
    assert run(capsys, "encrypt", "-r", "alice.pub", "plain", "wrapped")[0] == 0
    assert run(capsys, "encrypt", "--key-file", "key", "plain", "raw")[0] == 0
    fingerprint = keys.describe_envelope(stream.read_header(work / "wrapped").envelope)[0]
    code, _, err = run(capsys, "decrypt", "--passphrase-file", "pw", "wrapped", "back")
    _one_line(code, err, 1)
    assert f"wrapped for {fingerprint}, not for a passphrase: open it with -i FILE" in err, err
    code, _, err = run(capsys, "decrypt", "wrapped", "back")
    _one_line(code, err, 2)
    assert f"wrapped for {fingerprint}: open it with -i FILE" in err, err
    code, _, err = run(capsys, "decrypt", "--passphrase-file", "pw", "raw", "back")
    _one_line(code, err, 1)
    assert "not passphrase-encrypted (it was encrypted with a raw key): use --key-file" in err
    assert not (work / "back").exists()


def test_no_passphrase_without_a_terminal_is_a_usage_error(work, capsys):
    code, _, err = run(capsys, "encrypt", "-p", "plain", "sealed")
    assert code == 2 and "needs a passphrase" in err and not (work / "sealed").exists()


def _stream_with_work_factor(work: Path, log_n: int) -> Path:
    from gpucrypt.keys import _envelope

    stanza = _envelope.Stanza("scrypt", os.urandom(16) + bytes([log_n]), os.urandom(48))
    path = work / f"cost-{log_n}"
    stream.encrypt(b"data", path, os.urandom(32), envelope=_envelope.encode([stanza]))
    return path


def test_a_work_factor_above_the_bound_is_refused_before_any_work(work, capsys, monkeypatch):
    """A crafted header asking for scrypt N = 2**40: refused before the passphrase is asked
    for and before scrypt runs (it would need 1 TiB)."""
    from gpucrypt.keys import passphrase

    def no_scrypt(*a, **k):
        raise AssertionError("scrypt ran")

    monkeypatch.setattr(passphrase, "Scrypt", no_scrypt)
    path = _stream_with_work_factor(work, 40)
    code, _, err = run(capsys, "decrypt", path, "out")  # no passphrase given: not asked
    assert code == 1 and err.count("\n") == 1 and "2**40, above the limit 2**20" in err, err
    with pytest.raises(keys.NoMatchingRecipient, match="above the limit"):
        keys.open_envelope(stream.read_header(path).envelope, keys.Passphrase("x"))
    with pytest.raises(keys.NoMatchingRecipient, match="above the limit 2\\*\\*9"):
        keys.open_envelope(stream.read_header(_stream_with_work_factor(work, 10)).envelope,
                           keys.Passphrase("x", max_log_n=9))


def test_passphrase_known_answer_checked_with_cryptography_alone(work, capsys):
    """docs/KEYS.md's construction, recomputed with cryptography's Scrypt and
    ChaCha20-Poly1305, opens the recorded stanza; gpucrypt makes the same stanza from the
    same salt and reads the recorded file."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    v = json.loads((VECTORS / "scrypt.json").read_text())
    salt, dek = bytes.fromhex(v["salt"]), bytes.fromhex(v["dek"])
    key = Scrypt(salt=b"gpucrypt-passphrase-v1\x00" + salt, length=32, n=2 ** v["log_n"],
                 r=v["r"], p=v["p"]).derive(v["passphrase"].encode())
    assert ChaCha20Poly1305(key).decrypt(bytes(12), bytes.fromhex(v["stanza_body"]), None) == dek
    assert bytes.fromhex(v["stanza_id"]) == salt + bytes([v["log_n"]])
    envelope = bytes.fromhex(v["envelope"])
    stanza = keys.Passphrase(v["passphrase"], log_n=v["log_n"]).wrap(dek, _salt=salt)
    assert (stanza.recipient_id.hex(), stanza.body.hex()) == (v["stanza_id"], v["stanza_body"])
    assert keys.open_envelope(envelope, keys.Passphrase(v["passphrase"])) == dek
    assert stream.read_header(bytes.fromhex(v["stream"])).envelope == envelope
    (work / "kat").write_bytes(bytes.fromhex(v["stream"]))
    private(work / "katpw", v["passphrase"].encode())
    code, _, err = run(capsys, "decrypt", "--passphrase-file", "katpw", "kat", "kat.out")
    assert code == 0, err
    assert (work / "kat.out").read_bytes() == bytes.fromhex(v["plaintext"])


def test_a_passphrase_stands_alone_in_its_envelope(work):
    from gpucrypt.keys import _envelope

    alice = keys.Identity.generate()
    with pytest.raises(ValueError, match="no other recipient"):
        keys.seal_envelope(os.urandom(32), [keys.Passphrase("pw", log_n=10), alice.recipient])
    pw = keys.Passphrase("pw", log_n=10)
    mixed = _envelope.encode([pw.wrap(os.urandom(32)),
                              _envelope.decode(keys.seal_envelope(os.urandom(32), alice))[0]])
    with pytest.raises(keys.EnvelopeError, match="beside other stanzas"):
        keys.open_envelope(mixed, [pw, alice])
    with pytest.raises(keys.NoMatchingRecipient, match="encrypted with a passphrase"):
        keys.open_envelope(keys.seal_envelope(os.urandom(32), pw), alice)
    assert "pw" not in repr(pw)


def _converse(work: Path, answers: list[bytes], *argv: str, stdout_tty: bool = False,
              stdin: Any = None, launcher: str = LAUNCHER) -> tuple[int, bytes]:
    """Run ``gpucrypt ARGV`` with stdin and stderr (and stdout with ``stdout_tty``) a
    pseudo-terminal (a UTF-8 locale), type each answer after the next prompt, and return
    the exit code and what the terminal saw. ``stdin``: a file or descriptor to read
    instead (``< FILE``); the terminal is then the process's controlling terminal, as in
    a shell, so that prompts go to /dev/tty."""
    import pty

    master, slave = pty.openpty()
    if stdin is not None:  # stderr (the terminal) made the new session's terminal
        launcher = "import fcntl, termios\nfcntl.ioctl(2, termios.TIOCSCTTY, 0)\n" + launcher
    proc = subprocess.Popen([sys.executable, "-c", launcher, "unnamed", *argv], cwd=work,
                            stdin=slave if stdin is None else stdin,
                            stdout=slave if stdout_tty else subprocess.DEVNULL,
                            stderr=slave,
                            start_new_session=True, env={**os.environ, "LC_ALL": "C.UTF-8"})
    os.close(slave)
    seen = b""
    try:
        for answer in answers:
            prompts = seen.count(b": ")
            deadline = time.monotonic() + 60
            while seen.count(b": ") == prompts and time.monotonic() < deadline:
                if select.select([master], [], [], 0.1)[0]:
                    seen += os.read(master, 1024)
            os.write(master, answer + b"\n")
        code = proc.wait(timeout=60)
        while select.select([master], [], [], 0.1)[0]:
            try:
                seen += os.read(master, 1024)
            except OSError:
                break
    finally:
        proc.kill()
        os.close(master)
    return code, seen


@pytest.mark.skipif(not ON_LINUX, reason="a pseudo-terminal (Linux)")
def test_encrypt_asks_twice_on_a_terminal(work):
    """-p with stdin a terminal: the passphrase is asked twice, and must match."""
    def converse(answers: list[bytes]) -> tuple[int, bytes]:
        return _converse(work, answers, "encrypt", "-p", "plain", "-o", "sealed", "--force")

    code, seen = converse([b"s3cret words", b"s3cret words"])
    assert code == 0, seen
    assert b"passphrase for the file" in seen and b"again" in seen
    header = stream.read_header(work / "sealed")
    out = io.BytesIO()
    key = keys.open_envelope(header.envelope, keys.Passphrase("s3cret words"))
    stream.decrypt((work / "sealed").read_bytes(), out, key)
    assert out.getvalue() == (work / "plain").read_bytes()
    code, seen = converse([b"one", b"two"])
    assert code == 2 and b"the passphrases differ" in seen


@pytest.mark.skipif(not ON_LINUX, reason="a pseudo-terminal (Linux)")
def test_encrypt_refuses_its_input_and_output_before_asking_for_a_passphrase(work):
    """``encrypt -p`` asked twice for the passphrase, then said "output exists" (as for a
    missing IN, or ciphertext to a terminal): every such refusal comes first, with nothing
    typed, as in ``keygen`` and ``decrypt``; so for a sealed keyset's passphrase."""
    from gpucrypt.keys import Keyset

    (work / "sealed").write_bytes(b"there")
    Keyset.generate().save(work / "ks.json", "keyset words", scrypt_n=2**10)
    cases = [(["encrypt", "-p", "plain", "sealed"], "output exists"),
             (["encrypt", "-p", "nothere", "out"], "input file not found"),
             (["encrypt", "-p", "plain"], "refusing to write ciphertext to a terminal"),
             (["encrypt", "--keyset", "ks.json", "plain", "sealed"], "output exists"),
             (["encrypt", "-p", "plain", "nodir/out"], "cannot write"),
             (["encrypt", "-p", "plain", "/dev/stdout"], "to a terminal")]
    # encrypt-model too: a file OUT that exists, and a folder holding weights in the clear
    np = pytest.importorskip("numpy")
    from safetensors.numpy import save_file

    save_file({"w": np.arange(4, dtype=np.float32)}, str(work / "m.safetensors"))
    (work / "folder").mkdir()
    save_file({"w": np.arange(4, dtype=np.float32)}, str(work / "folder" / "m.safetensors"))
    (work / "folder" / "pytorch_model.bin").write_bytes(b"weights")
    (work / "notst.bin").write_bytes(b"not a safetensors file")
    cases += [(["encrypt-model", "-p", "m.safetensors", "sealed"], "output exists"),
              (["encrypt-model", "-p", "folder", "folder-enc"], "would be copied in the clear"),
              (["encrypt-model", "-p", "notst.bin", "o1"], "not a readable safetensors file"),
              # a missing folder above OUT is exit 1 (an I/O error), as for encrypt's OUT
              (["encrypt-model", "-p", "m.safetensors", "nodir/out"], "cannot write nodir/out"),
              (["encrypt-model", "-p", "folder", "nodir/out"], "cannot write nodir/out")]
    for argv, refusal in cases:
        code, seen = _converse(work, [], *argv, stdout_tty=True)  # nothing typed
        # IN's data, or OUT that cannot be written: exit 1; the rest are usage errors
        data_refused = any(word in refusal for word in ("clear", "safetensors", "cannot write"))
        assert code == (1 if data_refused else 2) and refusal.encode() in seen, (argv, seen)
        assert b"passphrase" not in seen, (argv, seen)
    assert (work / "sealed").read_bytes() == b"there" and not (work / "out").exists()


@pytest.mark.skipif(not ON_LINUX, reason="a pseudo-terminal (Linux)")
@pytest.mark.parametrize("plaintext, is_text", [
    (b"caf\xc3\xa9 ol\xc3\xa9\tcolumns\r\nmarker line\n", True),
    (b"marker\x00\x01\x02 binary", False),
    (b"marker text, then a title: \x1b]0;pwned\x07", False),
    (b"marker \xc2\x9b31m (a one-character CSI)", False),
    (b"marker \xff\xfe (not UTF-8)", False),
])
def test_decrypt_writes_to_a_terminal_only_text(work, capsys, plaintext, is_text):
    """``decrypt`` to a terminal wrote whatever the file held: binary garbled it, and a
    crafted file's escape sequences drove it (set its title, rewrote the screen). Text is
    written; anything else is refused before it reaches the terminal, unless --force."""
    (work / "p").write_bytes(plaintext)
    assert run(capsys, "encrypt", "--key-file", "key", "p", "sealed")[0] == 0
    code, seen = _converse(work, [], "decrypt", "--key-file", "key", "sealed", "-",
                           stdout_tty=True)
    if is_text:
        assert code == 0, seen
        assert plaintext.replace(b"\n", b"\r\n") in seen  # the terminal's own CR before LF
    else:
        assert code == 1 and b"refusing to write the plaintext to a terminal" in seen, seen
        assert b"marker" not in seen
        code, seen = _converse(work, [], "decrypt", "--key-file", "key", "sealed", "-",
                               "--force", stdout_tty=True)
        assert code == 0 and plaintext.split(b" ")[0] in seen, seen


@pytest.mark.skipif(not ON_LINUX, reason="a pseudo-terminal (Linux)")
def test_decrypt_to_a_terminal_holds_back_a_character_never_finished(work, capsys):
    """A plaintext ending inside a UTF-8 character reached the terminal and decrypt said
    nothing: its bytes ("\xc2", which the next program's "\x9b" would make a CSI) are held
    back until the character is whole, and at the end they are refused."""
    (work / "p").write_bytes(b"text before \xe2\x82")
    assert run(capsys, "encrypt", "--key-file", "key", "p", "sealed")[0] == 0
    code, seen = _converse(work, [], "decrypt", "--key-file", "key", "sealed", "-",
                           stdout_tty=True)
    assert code == 1 and b"refusing to write the plaintext to a terminal" in seen, seen
    assert b"text before" in seen and b"\xe2" not in seen


@pytest.mark.skipif(not ON_LINUX, reason="a pseudo-terminal (Linux)")
def test_the_progress_bar_is_for_large_inputs_and_never_on_a_prompt(work, capsys):
    """``gpucrypt decrypt < f.gc > f.out`` on a terminal drew "\\rdecrypt 8 B ..." onto the
    passphrase prompt's line: stdin had no size, so it got a bar. A stdin redirected from a
    file has its size (small: no bar); a pipe gets one only once 16 MiB passed (64 KiB
    here); and no bar is drawn before the prompt, not even with --progress."""
    import threading

    lowered = LAUNCHER.replace("from gpucrypt.cli import main\n", "from gpucrypt.cli import "
                               "files, main\nfiles._PROGRESS_MIN_BYTES = 1 << 16\n")
    assert run(capsys, "encrypt", "-p", "--passphrase-file", "pw", "plain", "f.gc")[0] == 0
    typed = [b"correct horse battery staple"]
    for extra in ([], ["--progress"]):
        with open(work / "f.gc", "rb") as f:
            code, seen = _converse(work, typed, "decrypt", "-o", "f.out", "--force", *extra,
                                   stdin=f, launcher=lowered)
        assert code == 0, seen
        before, prompt, after = seen.partition(b"passphrase for this file: ")
        assert prompt and b"\r" not in before and b"B/s" not in before, seen
        assert (b"B/s" in after) == bool(extra), seen
    assert (work / "f.out").read_bytes() == (work / "plain").read_bytes()

    def through_a_pipe(data: bytes) -> bytes:
        r, w = os.pipe()

        def feed():
            with open(w, "wb") as pipe:
                pipe.write(data)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            code, seen = _converse(work, [], "encrypt", "--key-file", "key", "-o", "p.gc",
                                   "--force", stdin=r, launcher=lowered)
        finally:
            os.close(r)
            feeder.join(timeout=10)
        assert code == 0, seen
        return seen

    assert b"B/s" not in through_a_pipe(os.urandom(10_000))      # small, size unknown
    assert b"B/s" in through_a_pipe(os.urandom(1 << 18))         # large once read


@pytest.mark.skipif(not ON_LINUX, reason="a pseudo-terminal (Linux)")
def test_a_passphrase_typed_in_nfc_then_nfd_is_confirmed(work):
    """Two typings of one text (a composed "è", then "e" and a combining accent) are the
    same passphrase: confirmed, and the file opens with either."""
    code, seen = _converse(work, [CREME_NFC.encode(), CREME_NFD.encode()], "encrypt", "-p",
                           "plain", "-o", "sealed")
    assert code == 0, seen
    envelope = stream.read_header(work / "sealed").envelope
    for text in (CREME_NFC, CREME_NFD):
        keys.open_envelope(envelope, keys.Passphrase(text))


# ------------------------------------------------------------------ 5. stdin and stdout
def test_pipes_as_with_age(work, capsys):
    """``gpucrypt encrypt -r alice.pub < in > out`` and ``gpucrypt decrypt -i alice.key < out``."""
    assert run(capsys, "keygen", "--public", "--out", "alice.key")[0] == 0
    cli = [sys.executable, "-c", LAUNCHER, "unnamed"]
    with open(work / "plain", "rb") as src, open(work / "sealed", "wb") as dst:
        subprocess.run(cli + ["encrypt", "-r", "alice.key.pub"], stdin=src, stdout=dst,
                       check=True, cwd=work)
    with open(work / "sealed", "rb") as src:
        back = subprocess.run(cli + ["decrypt", "-i", "alice.key"], stdin=src, check=True,
                              capture_output=True, cwd=work).stdout
    assert back == (work / "plain").read_bytes()


@pytest.mark.parametrize("how", ["IN named", "stdin"])
@pytest.mark.parametrize("command", ["encrypt", "decrypt"])
def test_a_stdout_that_is_the_input_file_is_refused(work, command, how):
    """``gpucrypt encrypt f >> f`` exited 0 with the file's own header encrypted into it
    (the output read back as input); ``< f >> f`` too. The file is left as it was."""
    cli = [sys.executable, "-c", LAUNCHER, "unnamed"]
    if command == "decrypt":
        stream.encrypt((work / "plain").read_bytes(), work / "sealed", (work / "key").read_bytes(),
                       device="cpu")
    name = "plain" if command == "encrypt" else "sealed"
    before = (work / name).read_bytes()
    with open(work / name, "ab") as dst, open(work / name, "rb") as src:
        done = subprocess.run(cli + [command, "--key-file", "key"] +
                              ([name] if how == "IN named" else []),
                              stdin=src if how == "stdin" else subprocess.DEVNULL, stdout=dst,
                              stderr=subprocess.PIPE, text=True, cwd=work)
    assert done.returncode == 2, done.stderr
    assert "the input is the output" in done.stderr
    assert (work / name).read_bytes() == before
    # a named OUT is a new file until it is published: encrypting IN over itself with
    # --force is safe (decrypting over it is refused: the next test)
    if command == "encrypt":
        code = subprocess.run(cli + [command, "--key-file", "key", name, name, "--force"],
                              cwd=work, capture_output=True).returncode
        assert code == 0


@pytest.mark.parametrize("command, how", [
    (command, how) for command in ("decrypt", "decrypt-model", "encrypt-model")
    for how in ("same name", "symbolic link", "hard link")] + [("decrypt", "stdin")])
def test_an_out_that_is_in_is_refused_even_with_force(work, capsys, command, how):
    """``gpucrypt decrypt --force s.gc s.gc`` exited 0 and left the plaintext where the
    only ciphertext was (the library refuses src == dst, but the command line handed it
    a new file to be renamed over IN, so it could not tell); decrypt-model and
    encrypt-model did the same, and ``decrypt --force - s.gc < s.gc`` too. Refused before
    any key is read, whatever OUT's name for IN, and IN is left as it was. A hard link to
    IN as OUT is not refused: the rename replaces that name, and IN keeps its bytes."""
    np = pytest.importorskip("numpy")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from gpucrypt import models

    key = (work / "key").read_bytes()
    if command == "decrypt":
        stream.encrypt((work / "plain").read_bytes(), work / "in", key, device="cpu")
    elif command == "decrypt-model":
        models.save_encrypted({"w": np.arange(10, dtype=np.float32)}, work / "in", key,
                              device="cpu")
    else:
        safetensors_numpy.save_file({"w": np.arange(10, dtype=np.float32)}, str(work / "in"))
    before = (work / "in").read_bytes()
    out = "in"
    if how == "hard link":
        os.link(work / "in", work / "out")
        out = "out"
    elif how == "symbolic link":
        os.symlink("in", work / "out")
        out = "out"
    if how == "hard link":
        code, _, err = run(capsys, command, "--key-file", "key", "in", out, "--force")
        assert code == 0, err
        assert (work / "in").read_bytes() == before and (work / "out").read_bytes() != before
        return
    # a key source that would fail if it were read: the refusal comes first
    if how == "stdin":
        with open(work / "in", "rb") as src:
            done = subprocess.run([sys.executable, "-c", LAUNCHER, "unnamed", command,
                                   "--key-env", "NO_SUCH_VARIABLE", "-", out, "--force"],
                                  stdin=src, capture_output=True, text=True, cwd=work)
        code, err = done.returncode, done.stderr
    else:
        code, _, err = run(capsys, command, "--key-env", "NO_SUCH_VARIABLE", "in", out, "--force")
    assert code == 2, err
    assert err.startswith(f"gpucrypt {command}: the input is the output (") and \
        "choose another OUT" in err, err
    assert (work / "in").read_bytes() == before
    assert sorted(os.listdir(work)) == sorted(["key", "plain", "pw", "in"] +
                                              ([] if out == "in" else ["out"]))
    # another OUT is written as before
    code, _, err = run(capsys, command, "--key-file", "key", "in", "elsewhere")
    assert code == 0, err


def test_an_out_that_is_in_through_a_bind_mount_is_refused(work, capsys):
    """The same file by two paths with one name (a bind mount; a case-insensitive file
    system does the same): comparing resolved paths let ``decrypt --force a/s.gc b/s.gc``
    replace the only ciphertext; one file with no other name is IN. Needs a bind mount:
    root in this test's mount namespace (unshare), as in CI's container."""
    import shutil

    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a private bind mount")
    (work / "a").mkdir()
    (work / "b").mkdir()
    key = (work / "key").read_bytes()
    stream.encrypt((work / "plain").read_bytes(), work / "a" / "s.gc", key, device="cpu")
    before = (work / "a" / "s.gc").read_bytes()
    script = ("mount --bind a b && "
              f"{sys.executable} -c {shlex.quote(LAUNCHER)} unnamed decrypt --key-file key "
              "--force a/s.gc b/s.gc")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          cwd=work, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "the input is the output" in done.stderr
    assert (work / "a" / "s.gc").read_bytes() == before


def test_options_may_come_between_in_and_out(work, capsys):
    """``encrypt IN --key-file K OUT`` said "unrecognized arguments: OUT"."""
    code, _, err = run(capsys, "encrypt", "plain", "--key-file", "key", "sealed")
    assert code == 0, err
    code, _, err = run(capsys, "decrypt", "sealed", "--key-file", "key", "back", "--device", "cpu")
    assert code == 0, err
    assert (work / "back").read_bytes() == (work / "plain").read_bytes()


def test_names_as_the_library_and_frameworks_spell_them(work, capsys):
    """--algorithm aes-gcm (the tensor API's name) is aes-256-gcm; --device cuda is gpu."""
    code, _, err = run(capsys, "encrypt", "--algorithm", "aes-gcm", "--key-file", "key",
                       "plain", "sealed")
    assert code == 0, err
    assert stream.read_header(work / "sealed").algorithm == "aes-256-gcm"
    code, _, err = run(capsys, "encrypt", "--device", "cuda", "--key-file", "key", "plain", "x")
    assert code == 0, err  # the GPU backend (numba's simulator here)
    # outside the simulator, on a machine without a GPU, the advice is the option's words
    environment = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    done = subprocess.run([sys.executable, "-c", LAUNCHER, "unnamed", "encrypt", "--device",
                           "cuda", "--key-file", "key", "plain", "y"], cwd=work, env=environment,
                          capture_output=True, text=True)
    if done.returncode != 0:  # else a real GPU ran it
        assert done.returncode == 2 and "device 'gpu' unavailable" in done.stderr, done.stderr
        assert "device='cpu'" not in done.stderr and "--device cpu" in done.stderr


def _run_on_non_blocking_stdin(work, args: list, data: bytes) -> None:
    """``gpucrypt *args`` with stdin a pipe left non-blocking (the file description the
    child shares) that runs dry after 100 bytes while the child reads it, then gets the
    rest of ``data``; it must succeed."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, "unnamed", *args],
                                stdin=r, stderr=subprocess.PIPE, cwd=work)
    finally:
        os.close(r)
    os.write(w, data[:100])
    time.sleep(0.5)  # the child is reading the empty pipe by now
    os.write(w, data[100:])
    os.close(w)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err


@pytest.mark.parametrize("progress", [[], ["--progress"]], ids=["plain", "progress"])
def test_encrypt_waits_for_a_non_blocking_stdin(work, progress):
    """stdin left non-blocking by whatever started gpucrypt: a read that finds the pipe
    empty is not the end of the input (the progress bar's reader turned it into one, and
    the ciphertext held only what had arrived, marked complete)."""
    data = (work / "plain").read_bytes()
    _run_on_non_blocking_stdin(work, ["encrypt", *progress, "--key-file", "key", "-", "sealed"],
                               data)
    out = io.BytesIO()
    stream.decrypt(str(work / "sealed"), out, (work / "key").read_bytes())
    assert out.getvalue() == data


@pytest.mark.parametrize("progress", [[], ["--progress"]], ids=["plain", "progress"])
def test_decrypt_waits_for_a_non_blocking_stdin(work, progress):
    """The same for decrypt: after the header, the rest was read with read1, which gives
    b"" (not None) for a non-blocking pipe with nothing in it yet: a good file was cut
    there and called "tampered or damaged" (exit 1)."""
    key = (work / "key").read_bytes()
    data = os.urandom(3 << 20)
    sealed = io.BytesIO()
    stream.encrypt(data, sealed, key, device="cpu")
    _run_on_non_blocking_stdin(work, ["decrypt", *progress, "--key-file", "key", "-o", "out"],
                               sealed.getvalue())
    assert (work / "out").read_bytes() == data


def test_a_fifo_out_swapped_for_a_link_to_a_file_after_its_check_is_not_written_through(
        work, capsys, monkeypatch):
    """OUT checked as a link to a FIFO (written in place) was then opened by name with
    open(path, "wb"): a link to a regular file swapped in between got the plaintext."""
    from gpucrypt.cli import _common

    assert run(capsys, "encrypt", "--key-file", "key", "plain", "sealed")[0] == 0
    os.mkfifo(work / "fifo")
    (work / "victim").write_bytes(b"the victim's own data")
    (work / "out").symlink_to("fifo")
    checked = _common.streamed_output

    def checked_then_swapped(path):
        answer = checked(path)
        os.unlink(work / "out")
        os.symlink("victim", work / "out")
        return answer

    monkeypatch.setattr(_common, "streamed_output", checked_then_swapped)
    code, _, err = run(capsys, "decrypt", "--key-file", "key", "sealed", "out")
    assert code == 1 and "cannot write out: it became a regular file" in err, err
    assert (work / "victim").read_bytes() == b"the victim's own data"


@pytest.mark.parametrize("out", ["plain/", "missing/", "sub/"])
def test_an_out_ending_in_a_slash_is_a_usage_error_before_any_work(work, capsys, out):
    """stat("file/") fails with ENOTDIR, which passed as "OUT does not exist": the whole
    input was decrypted, then "output exists ... it appeared while gpucrypt was writing"
    (exit 1) for a file that was there before, or "No such file or directory"."""
    assert run(capsys, "encrypt", "--key-file", "key", "plain", "sealed")[0] == 0
    (work / "sub").mkdir()
    before = (work / "plain").read_bytes()
    code, _, err = run(capsys, "decrypt", "--force", "--key-file", "key", "sealed", out)
    assert code == 2 and (f"output {out} ends in '/'" in err or
                          f"output is a directory: {out}" in err), err
    assert (work / "plain").read_bytes() == before and sorted(os.listdir(work / "sub")) == []


def test_an_output_that_is_a_symbolic_link_is_refused_with_what_to_do(work, capsys):
    """A link, even a dangling one, is neither replaced nor written through: a usage
    refusal (exit 2, as a folder OUT), said first, not "output exists ... give --force"
    (which --force then refused)."""
    assert run(capsys, "encrypt", "--key-file", "key", "plain", "sealed")[0] == 0
    (work / "target").write_bytes(b"kept")
    (work / "link").symlink_to(work / "target")
    (work / "dangling").symlink_to(work / "nowhere")
    for command, src in (("encrypt", "plain"), ("decrypt", "sealed")):
        for link in ("link", "dangling"):
            for force in ([], ["--force"]):
                code, _, err = run(capsys, command, *force, "--key-file", "key", src, link)
                assert code == 2 and f"cannot write {link}: it is a symbolic link" in err, err
                assert "give the file it points to as the output, or remove the link" in err
                assert "exists" not in err, err
    assert (work / "link").is_symlink() and (work / "target").read_bytes() == b"kept"
    assert not (work / "nowhere").exists()


def test_keygen_says_why_a_path_cannot_take_a_key_file_before_mentioning_force(work, capsys):
    """``keygen -o .`` said "exists; use --force", then with --force "it is a folder"; so
    for a device and a link. The real reason first, exit 2, with or without --force; and
    ``-o -`` (a file named "-", never stdout: no place for a private key) is refused."""
    (work / "folder").mkdir()
    (work / "link").symlink_to(work / "target")
    cases = [("folder", "is a folder: give the key file's path"),
             ("/dev/null", "is a character device"),
             ("link", "it is a symbolic link"),
             ("-", "-o - would write a file named '-'")]
    for out, reason in cases:
        for extra in ([], ["--force"], ["--public"], ["--public", "--force"]):
            code, _, err = run(capsys, "keygen", "-o", out, *extra)
            assert code == 2 and reason in err, (out, extra, err)
            assert "use --force" not in err, err
    assert os.listdir(work / "folder") == [] and not (work / "-").exists()
    assert not (work / "target").exists() and not (work / "-.pub").exists()
    code, _, err = run(capsys, "bench", "--json", "-")
    assert code == 2 and "--json - would write a file named '-'" in err, err
    assert not (work / "-").exists()


def test_keygen_refuses_kem_without_public(work, capsys):
    """``--kem`` is the key type of a --public pair: a keyset has none, and the README
    promises that an option that would be ignored is refused."""
    for kem in ("mlkem768-x25519", "x25519"):
        code, _, err = run(capsys, "keygen", "--kem", kem, "-o", "ks.json")
        assert code == 2 and "add --public" in err, err
        assert not (work / "ks.json").exists()
    assert run(capsys, "keygen", "--public", "--kem", "mlkem768-x25519", "-o", "pq")[0] == 0
    assert keys.Identity.load(work / "pq").kem == "mlkem768-x25519"
    assert run(capsys, "keygen", "--public", "-o", "classic")[0] == 0
    assert keys.Identity.load(work / "classic").kem == "x25519"


def test_output_option_and_its_conflict(work, capsys):
    assert run(capsys, "encrypt", "--key-file", "key", "plain", "-o", "sealed")[0] == 0
    assert run(capsys, "decrypt", "--key-file", "key", "-o", "back", "sealed")[0] == 0
    assert (work / "back").read_bytes() == (work / "plain").read_bytes()
    code, _, err = run(capsys, "decrypt", "--key-file", "key", "sealed", "one", "-o", "two")
    assert code == 2 and "OUT given twice" in err
    assert not (work / "one").exists() and not (work / "two").exists()


# ------------------------------------------------------------------ 6. rekey on model files
def _model_file_for(work, capsys, *recipients: str) -> None:
    """m.safetensors (two small tensors), alice's and bob's key pairs, and m.gc: the model
    encrypted for the public key files ``recipients``, in 4 KiB segments."""
    np = pytest.importorskip("numpy")
    from safetensors.numpy import save_file

    tensors = {"w": np.arange(3000, dtype=np.float32), "b": np.ones(7, dtype=np.int64)}
    save_file(tensors, str(work / "m.safetensors"))
    for name in ("alice", "bob"):
        assert run(capsys, "keygen", "--public", "--out", name)[0] == 0
    given = [arg for recipient in recipients for arg in ("-r", recipient)]
    code, _, err = run(capsys, "encrypt-model", *given, "--segment-size", "4KiB",
                       "m.safetensors", "m.gc")
    assert code == 0, err


def test_rekey_rewrites_a_model_files_header_only(work, capsys):
    from gpucrypt import models

    _model_file_for(work, capsys, "alice.pub")
    before = models.read_header(work / "m.gc")
    data_before = (work / "m.gc").read_bytes()[before.header_length:]
    code, out, err = run(capsys, "rekey", "m.gc", "-r", "bob.pub", "-i", "alice")
    assert code == 0 and "removed: " + keys.Recipient.load("alice.pub").fingerprint in out, err
    after = models.read_header(work / "m.gc")
    assert (work / "m.gc").read_bytes()[after.header_length:] == data_before  # data untouched
    assert keys.describe_envelope(after.envelope) == [keys.Recipient.load("bob.pub").fingerprint]
    code, _, err = run(capsys, "decrypt-model", "-i", "alice", "m.gc", "a.safetensors")
    assert code == 1 and "no recipient" in err
    code, _, err = run(capsys, "decrypt-model", "-i", "bob", "m.gc", "b.safetensors")
    assert code == 0, err
    assert (work / "b.safetensors").read_bytes() == (work / "m.safetensors").read_bytes()


# ------------------------------------------------------------------ 7. selftest and help
@pytest.mark.parametrize("size", ["-5", "0", "lots"])
def test_selftest_refuses_sizes_that_are_not_positive(capsys, size):
    code, _, err = run(capsys, "selftest", "--size", size)
    assert code == 2 and "Traceback" not in err


def test_selftest_takes_units(capsys, monkeypatch):
    from gpucrypt import backends

    monkeypatch.setattr(backends, "available_backends", lambda: ["cpu"])  # no simulated GPU
    assert build_parser(["selftest"]).parse_args(["selftest", "--size", "1GiB"]).size == 1 << 30
    code, out, _ = run(capsys, "selftest", "--size", "4KiB")
    assert code == 0 and out.count("4096 bytes: ok") == 3 and "FAILED" not in out


def test_selftest_reports_a_backend_that_fails_and_goes_on(capsys, monkeypatch):
    """A backend that refuses its own ciphertext (InvalidTag, the likeliest sign of a broken
    one) or fails outright is a FAILED line with the error, the other AEADs are still
    tried, and the exit status is 1: not a traceback that stops the report."""
    import gpucrypt
    from cryptography.exceptions import InvalidTag
    from gpucrypt import backends

    def refuses(self, nonce, data, aad):
        raise InvalidTag()

    def fails(self, nonce, data, aad):
        raise RuntimeError("kernel launch failed")

    monkeypatch.setattr(backends, "available_backends", lambda: ["cpu"])
    monkeypatch.setattr(gpucrypt.AESGCM, "decrypt", refuses)
    monkeypatch.setattr(gpucrypt.XChaCha20Poly1305, "encrypt", fails)
    code, out, err = run(capsys, "selftest", "--size", "4KiB")
    assert code == 1 and "Traceback" not in err
    lines = out.splitlines()
    assert len(lines) == 3 and "ChaCha20Poly1305   4096 bytes: ok" in lines[0]
    assert "AESGCM" in lines[1] and "FAILED" in lines[1] and "(InvalidTag)" in lines[1]
    assert "FAILED" in lines[2] and "RuntimeError: kernel launch failed" in lines[2]


@pytest.mark.skipif(not ON_LINUX, reason="peak RSS from /proc (Linux)")
def test_selftest_memory_follows_the_message_size_not_the_size(tmp_path):
    """24 MiB per AEAD in messages of 2 MiB: the process grows by a few messages' worth
    (11 MiB measured), not by the 96 MiB that holding the data, both ciphertexts and the
    plaintext whole took (at 1 GiB that was 5.3 GB; now 107 MiB peak RSS, measured)."""
    probe = ("import re, sys\n"
             "import gpucrypt.cli\n"
             "from gpucrypt.backends import available_backends\n"
             "available_backends()  # loaded before measuring: code, not data\n"
             "gpucrypt.cli.SELFTEST_MESSAGE_BYTES = 2 << 20\n"
             "def kib(field):\n"
             "    return int(re.search(field + r':\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
             "open('/proc/self/clear_refs', 'w').write('5')\n"
             "before = kib('VmRSS')\n"
             "code = gpucrypt.cli.main(['selftest', '--size', '24MiB'])\n"
             "print(code, (kib('VmHWM') - before) // 1024)\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}  # the CPU only
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=env, cwd=tmp_path, check=True)
    code, grown = map(int, done.stdout.split()[-2:])
    assert code == 0 and "in 12 messages: ok" in done.stdout, done.stdout
    assert grown < 24, f"selftest grew by {grown} MiB"


def test_help_texts(capsys):
    for command in ("info", "selftest", "decrypt"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = capsys.readouterr().out
        from gpucrypt.cli import SUBCOMMANDS

        assert " ".join(SUBCOMMANDS[command][1].split()) in " ".join(out.split()), command
        if command == "decrypt":
            assert "where to decrypt" in out and "where to encrypt" not in out


def test_a_command_parses_alone_as_under_the_top_level_parser(capsys):
    """``main`` builds only the command's parser when the command comes first: its usage,
    errors and defaults are those of the same command under :func:`build_parser`."""
    from gpucrypt.cli import _command_parser

    argv = ["--key-file", "k", "--threads", "2", "in", "-o", "out"]
    alone = vars(_command_parser("encrypt").parse_args(argv))
    under = vars(build_parser(["encrypt"]).parse_args(["encrypt", *argv]))
    assert {k: v for k, v in alone.items() if k != "func"} == \
        {k: v for k, v in under.items() if k != "func"}
    assert alone["command"] == "encrypt" and alone["func"] is under["func"]
    for argv, usage in ((["decrypt", "--no-such-option"], "usage: gpucrypt decrypt [-h]"),
                        (["--no-such-option", "decrypt"], "usage: gpucrypt [-h]")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith(usage), err
        assert "unrecognized arguments: --no-such-option" in err


def test_only_a_whole_process_run_freezes_the_heap(work):
    """``main()`` as the program (no argv: the console script, ``python -m gpucrypt``)
    freezes the objects of its start-up out of the garbage collector's sight; ``main(argv)``
    called from a caller's own process leaves its collector as it was."""
    code = ("import gc, sys\n"
            "from gpucrypt.cli import main\n"
            "assert main(['encrypt', '--key-file', 'key', '-f', 'plain', 'sealed']) == 0\n"
            "called = gc.get_freeze_count()\n"
            "sys.argv = ['gpucrypt', 'decrypt', '--key-file', 'key', '-f', 'sealed', 'back']\n"
            "assert main() == 0\n"
            "print(called, gc.get_freeze_count() > 0, gc.isenabled())\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "True", "True"]
    assert (work / "back").read_bytes() == (work / "plain").read_bytes()


# ------------------------------------------------------------------ 8. key files, passphrases, outputs
def _one_line(code: int, err: str, expected_code: int) -> None:
    assert code == expected_code, err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_a_passphrase_given_refuses_a_keyset_that_is_not_sealed(work, capsys, monkeypatch):
    """A sealed keyset swapped for someone's unsealed one: a passphrase the user gave
    (--passphrase-file or $GPUCRYPT_PASSPHRASE) makes every keyset load refuse the unsealed
    file, as Keyset.load refuses it, instead of wrapping data keys under it. An unsealed
    identity (it only unwraps) is read as it is beside it."""
    for args in (["keygen", "--out", "ks.json"], ["keygen", "--public", "--out", "alice"]):
        assert run(capsys, *args)[0] == 0
    assert run(capsys, "encrypt", "--keyset", "ks.json", "plain", "for-ks")[0] == 0
    assert run(capsys, "encrypt", "-r", "alice.pub", "plain", "for-alice")[0] == 0
    before = (work / "ks.json").read_bytes()
    commands = [["encrypt", "--keyset", "ks.json", "plain", "x"],
                ["decrypt", "--keyset", "ks.json", "for-ks", "x"],
                ["keys", "add", "ks.json"],
                ["rekey", "for-alice", "--keyset", "ks.json", "-i", "alice"],
                ["rekey", "for-ks", "--keyset", "ks.json"]]
    for given in (["--passphrase-file", "pw"], []):
        if not given:
            monkeypatch.setenv("GPUCRYPT_PASSPHRASE", "correct horse battery staple")
        for argv in commands:
            code, _, err = run(capsys, *argv, *given)
            _one_line(code, err, 1)
            assert "is not sealed, though a passphrase was given" in err, (argv, err)
            assert "GPUCRYPT_PASSPHRASE unset" in err
            assert not (work / "x").exists()
        if given:  # nothing sealed is read: the file would be ignored (refused, exit 2)
            code, _, err = run(capsys, "decrypt", "-i", "alice", "for-alice", "x", *given)
            _one_line(code, err, 2)
            assert "--passphrase-file would be ignored" in err and not (work / "x").exists()
        else:
            assert run(capsys, "decrypt", "-i", "alice", "for-alice", "x")[0] == 0
            os.remove(work / "x")
    assert (work / "ks.json").read_bytes() == before
    # the same keyset named by --kek file:// (beside a sealed identity's passphrase file, or
    # the variable): the passphrase reaches it too, and it is refused as --keyset refuses it
    reference = f"file://{work / 'ks.json'}"
    monkeypatch.delenv("GPUCRYPT_PASSPHRASE")
    assert run(capsys, "keygen", "--seal", "--passphrase-file", "pw", "--out", "sealed-ks")[0] == 0
    for given in (["--passphrase-file", "pw"], []):
        if not given:
            monkeypatch.setenv("GPUCRYPT_PASSPHRASE", "correct horse battery staple")
        for argv in (["encrypt", "--keyset", "sealed-ks", "--kek", reference, "plain", "x"],
                     ["encrypt", "--kek", reference, "plain", "x"],
                     ["encrypt", "--kek", "FILE" + reference[4:], "plain", "x"],
                     ["decrypt", "--kek", reference, "for-ks", "x"]):
            code, _, err = run(capsys, *argv, *given)
            _one_line(code, err, 1)
            assert "is not sealed, though a passphrase was given" in err, (argv, given, err)
            assert not (work / "x").exists()
    monkeypatch.delenv("GPUCRYPT_PASSPHRASE")
    assert run(capsys, "encrypt", "--keyset", "ks.json", "plain", "x")[0] == 0  # none given
    assert run(capsys, "decrypt", "--kek", reference, "for-ks", "y")[0] == 0


def test_keygen_refuses_an_existing_output_before_asking_for_a_passphrase(work, capsys, monkeypatch):
    """The passphrase is asked for (here: would be, and fail, no terminal and none given)
    only once the output is known to be writable: typed twice, it was then refused."""
    import gpucrypt.cli.keys as cli_keys

    asked = []
    monkeypatch.setattr(cli_keys, "_passphrase", lambda *a, **k: asked.append(a) or "pw")
    for args in (["--out", "ks.json"], ["--public", "--out", "alice"]):
        for name in ("ks.json", "alice.pub"):
            (work / name).write_text("{}")
        code, _, err = run(capsys, "keygen", "--seal", *args)
        _one_line(code, err, 2)
        assert "exists" in err and asked == []


def test_keygen_public_writes_both_halves_or_neither(work, capsys):
    """``keygen --public --force`` whose identity cannot be written (its path is a
    folder) leaves the recipient file as it found it: absent, or the earlier pair's,
    byte for byte; one whose recipient cannot be written leaves the earlier identity.
    Never a .pub beside an identity that is not its own. (A folder there is refused
    before anything is written, exit 2; a failure part-way, tested with Ctrl-C below,
    settles the pair the same way.)"""
    from gpucrypt.keys import Identity, Recipient

    (work / "alice").mkdir()
    code, _, err = run(capsys, "keygen", "--public", "--force", "--out", "alice")
    _one_line(code, err, 2)
    assert not (work / "alice.pub").exists()
    assert run(capsys, "keygen", "--public", "--out", "bob")[0] == 0
    earlier = (work / "bob.pub").read_bytes()
    (work / "bob").unlink()
    (work / "bob").mkdir()
    code, _, err = run(capsys, "keygen", "--public", "--force", "--out", "bob")
    _one_line(code, err, 2)
    assert (work / "bob.pub").read_bytes() == earlier
    (work / "bob").rmdir()
    assert run(capsys, "keygen", "--public", "--force", "--out", "bob")[0] == 0
    assert Recipient.load(work / "bob.pub").fingerprint == Identity.load(work / "bob").fingerprint
    # a recipient that cannot be written: the identity it would have replaced stays
    identity = (work / "bob").read_bytes()
    (work / "bob.pub").unlink()
    (work / "bob.pub").mkdir()
    code, _, err = run(capsys, "keygen", "--public", "--force", "--out", "bob")
    _one_line(code, err, 2)
    assert (work / "bob").read_bytes() == identity


@pytest.mark.parametrize("stopped_after", [1, 2])
def test_keygen_public_stopped_by_ctrl_c_leaves_a_matching_pair(work, capsys, monkeypatch,
                                                                stopped_after):
    """A Ctrl-C can come after a file was renamed into place (here: during the folder
    fsync that follows, of the .pub's publish or of the identity's): the pair on disk
    still matches, the earlier one or the new one."""
    from gpucrypt.files import _atomic
    from gpucrypt.keys import Identity, Recipient

    assert run(capsys, "keygen", "--public", "--out", "bob")[0] == 0
    earlier = Identity.load(work / "bob").fingerprint
    real, calls = _atomic.fsync_folder, []

    def interrupted(folder):
        calls.append(folder)
        real(folder)
        if len(calls) == stopped_after:
            raise KeyboardInterrupt
    monkeypatch.setattr(_atomic, "fsync_folder", interrupted)
    assert run(capsys, "keygen", "--public", "--force", "--out", "bob")[0] == 130
    identity = Identity.load(work / "bob").fingerprint
    assert Recipient.load(work / "bob.pub").fingerprint == identity
    assert (identity == earlier) == (stopped_after == 1)  # the identity is written second


def test_keygen_refuses_a_passphrase_without_seal(work, capsys, monkeypatch):
    code, _, err = run(capsys, "keygen", "--out", "ks.json", "--passphrase-file", "pw")
    _one_line(code, err, 2)
    assert "add --seal" in err and not (work / "ks.json").exists()
    monkeypatch.setenv("GPUCRYPT_PASSPHRASE", "correct horse battery staple")
    code, _, err = run(capsys, "keygen", "--out", "ks.json")
    _one_line(code, err, 2)
    assert "add --seal" in err and not (work / "ks.json").exists()


NOT_UTF8 = b"abc\xffdef"


def _no_trace_of(err: str) -> None:
    """Nothing of a codec error's text, which quotes a byte of the passphrase and where."""
    for leak in ("0xff", "\\xff", "\\udcff", "\udcff", "position", "codec", "ÿ"):
        assert leak not in err, err


def test_a_passphrase_that_is_not_utf8_is_one_line_exit_2(work, capsys, monkeypatch):
    private(work / "pwbin", NOT_UTF8 + b"\n")
    assert run(capsys, "encrypt", "-p", "--passphrase-file", "pw", "plain", "sealed")[0] == 0
    assert run(capsys, "keygen", "--out", "ks.json")[0] == 0
    cases = [["encrypt", "-p", "--passphrase-file", "pwbin", "plain", "x"],
             ["decrypt", "--passphrase-file", "pwbin", "sealed", "x"],
             ["keygen", "--seal", "--passphrase-file", "pwbin", "--out", "x"],
             ["keys", "add", "ks.json", "--passphrase-file", "pwbin"]]
    for argv in cases:
        code, _, err = run(capsys, *argv)
        _one_line(code, err, 2)
        assert "the passphrase in pwbin is not valid UTF-8" in err, err
        _no_trace_of(err)
    # os.environ holds an undecodable byte as a lone surrogate
    monkeypatch.setenv("GPUCRYPT_PASSPHRASE", NOT_UTF8.decode("utf-8", "surrogateescape"))
    for argv in (["encrypt", "-p", "plain", "x"], ["decrypt", "sealed", "x"],
                 ["keygen", "--seal", "--out", "x"], ["keys", "add", "ks.json"]):
        code, _, err = run(capsys, *argv)
        _one_line(code, err, 2)
        assert "the passphrase in $GPUCRYPT_PASSPHRASE is not valid UTF-8" in err, err
        _no_trace_of(err)
    assert not (work / "x").exists()
    # and the real thing: a process whose environment holds the byte
    env = {k.encode(): v.encode() for k, v in os.environ.items() if k != "GPUCRYPT_PASSPHRASE"}
    env[b"GPUCRYPT_PASSPHRASE"] = NOT_UTF8
    done = subprocess.run([sys.executable, "-c", LAUNCHER, "unnamed", "encrypt", "-p", "plain",
                           "x"], cwd=work, env=env, capture_output=True, timeout=120)
    err = done.stderr.decode("utf-8", "replace")
    _one_line(done.returncode, err, 2)
    _no_trace_of(err)


@pytest.mark.skipif(not ON_LINUX, reason="a pseudo-terminal (Linux)")
def test_a_typed_passphrase_that_is_not_utf8_is_one_line_exit_2(work):
    """Refused at once (not asked again): one line, exit 2, nothing written."""
    code, seen = _converse(work, [NOT_UTF8], "encrypt", "-p", "plain", "-o", "sealed")
    text = seen.decode("utf-8", "replace")
    assert code == 2 and "the passphrase typed is not valid UTF-8" in text, text
    assert "Traceback" not in text
    _no_trace_of(text.split("passphrase for the file: ", 1)[-1])
    assert not (work / "sealed").exists()


def test_a_tampered_passphrase_envelope_is_tampered_data(work, capsys):
    """Not "no key given" (exit 2) nor "not passphrase-encrypted": docs/FORMAT.md's exit 1."""
    assert run(capsys, "encrypt", "-p", "--passphrase-file", "pw", "plain", "sealed")[0] == 0
    data = bytearray((work / "sealed").read_bytes())
    data[data.find(b"GCEV")] ^= 0x41  # the envelope's magic
    (work / "tampered").write_bytes(bytes(data))
    for extra in ([], ["-p"]):
        code, _, err = run(capsys, "decrypt", *extra, "--passphrase-file", "pw", "tampered", "x")
        _one_line(code, err, 1)
        assert "tampered or damaged file: its envelope is malformed" in err, err
        assert not (work / "x").exists()


def test_key_files_that_are_missing_or_of_another_kind_are_usage_errors(work, capsys):
    """docs/FORMAT.md: a missing or malformed key file is exit 2, for -r, -i and --keyset as
    for --key-file; a key file of the right kind that is damaged is the data failing (1)."""
    assert run(capsys, "keygen", "--public", "--out", "alice")[0] == 0
    assert run(capsys, "encrypt", "-r", "alice.pub", "plain", "sealed")[0] == 0
    (work / "folder").mkdir()
    private(work / "deep", b"[" * 100_000 + b"]" * 100_000)
    cases = [["encrypt", "--key-file", "nothere", "plain", "x"],
             ["encrypt", "-r", "nothere.pub", "plain", "x"],
             ["encrypt", "-r", "plain", "plain", "x"],           # not JSON
             ["encrypt", "-r", "deep", "plain", "x"],            # JSON too deep to parse
             ["decrypt", "-i", "deep", "sealed", "x"],
             ["encrypt", "--keyset", "deep", "plain", "x"],
             ["encrypt", "-r", "folder", "plain", "x"],
             ["encrypt", "--keyset", "nothere.json", "plain", "x"],
             ["encrypt", "--keyset", "alice.pub", "plain", "x"],  # another kind of key file
             ["decrypt", "-i", "nothere", "sealed", "x"],
             ["decrypt", "-i", "alice.pub", "sealed", "x"],
             ["keys", "list", "nothere.json"],
             ["rekey", "sealed", "-r", "alice.pub", "-i", "nothere"]]
    for argv in cases:
        code, _, err = run(capsys, *argv)
        _one_line(code, err, 2)
    damaged = json.loads((work / "alice").read_text())
    damaged["private_key"] = "!!"
    private(work / "damaged", json.dumps(damaged).encode())
    code, _, err = run(capsys, "decrypt", "-i", "damaged", "sealed", "x")
    _one_line(code, err, 1)
    assert not (work / "x").exists()


class _FedOnce:
    """Feed ``data`` to the first reader of the FIFO ``fifo`` (a thread), as a shell's
    process substitution does; then open the FIFO again and again without blocking, so
    that a second reader gets end of file at once (as from ``<(cat FILE)`` once ``cat``
    is done) instead of waiting forever."""

    def __init__(self, fifo: Path, data: bytes):
        import threading

        self.fifo, self.data, self.stop = fifo, data, threading.Event()
        self.thread = threading.Thread(target=self._feed, daemon=True)

    def _feed(self) -> None:
        try:
            with open(self.fifo, "wb") as f:
                f.write(self.data)
        except BrokenPipeError:
            return
        while not self.stop.wait(0.01):
            try:
                os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:  # ENXIO: no reader now
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        try:  # a writer still waiting for its first reader (the command never read)
            os.close(os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK))
        except OSError:
            pass
        self.thread.join(timeout=10)


@pytest.mark.skipif(not ON_LINUX, reason="FIFOs and /dev/fd (Linux)")
def test_key_files_are_read_once_so_fifos_and_process_substitution_work(work, capsys):
    """``-i <(cat alice.key)``, ``--keyset <(...)`` and ``-r <(...)``: a FIFO gives its
    bytes once, and the command looked into each key file (sealed? a recipient?) before
    loading it, reading it twice ("not JSON", or a hang on a real FIFO)."""
    assert run(capsys, "keygen", "--public", "-o", "alice")[0] == 0
    assert run(capsys, "keygen", "--public", "-o", "bob", "--seal", "--passphrase-file",
               "pw")[0] == 0
    assert run(capsys, "keygen", "-o", "ks.json")[0] == 0
    fifo = work / "fifo"
    os.mkfifo(fifo)

    def through_fifo(source: str, *argv: str) -> None:
        with _FedOnce(fifo, (work / source).read_bytes()):
            code, _, err = run(capsys, *argv)
        assert code == 0, err

    plain = (work / "plain").read_bytes()
    through_fifo("alice.pub", "encrypt", "-r", "fifo", "plain", "a.gc")
    through_fifo("alice", "decrypt", "-i", "fifo", "a.gc", "a.out")
    assert (work / "a.out").read_bytes() == plain
    through_fifo("alice", "encrypt", "-r", "fifo", "plain", "a2.gc")  # an identity as -r
    assert run(capsys, "encrypt", "-r", "bob.pub", "plain", "b.gc")[0] == 0
    through_fifo("bob", "decrypt", "-i", "fifo", "--passphrase-file", "pw", "b.gc", "b.out")
    assert (work / "b.out").read_bytes() == plain
    through_fifo("ks.json", "encrypt", "--keyset", "fifo", "plain", "k.gc")
    through_fifo("ks.json", "decrypt", "--keyset", "fifo", "k.gc", "k.out")
    assert (work / "k.out").read_bytes() == plain
    # /dev/fd/N of a pipe, as bash's <(...) names it
    r, w = os.pipe()
    try:
        os.write(w, (work / "alice").read_bytes())
        os.close(w)
        code, _, err = run(capsys, "decrypt", "-i", f"/dev/fd/{r}", "a2.gc", "a2.out")
    finally:
        os.close(r)
    assert code == 0, err
    assert (work / "a2.out").read_bytes() == plain


def test_keys_list_shows_damaged_fields_and_a_closed_pipe_is_one_line(work, capsys):
    (work / "bad.json").write_text('{"format": "gpucrypt-keyset", "version": 1, "keys": '
                                   '[{"id": 5, "status": "primary"}, {"id": "a", "status": null, '
                                   '"algorithm": ["x"]}]}')
    code, out, err = run(capsys, "keys", "list", "bad.json")
    assert code == 0 and "Traceback" not in err, err
    assert out.splitlines()[1].split() == ["5", "primary", "?", "?"]
    assert out.splitlines()[2].split() == ["a", "None", "['x']", "?"]
    assert run(capsys, "keygen", "--out", "ks.json")[0] == 0
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is written: `keys list ks.json | true`
    try:
        done = subprocess.run([sys.executable, "-c", LAUNCHER, "unnamed", "keys", "list",
                               "ks.json"], cwd=work, stdout=write, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write)
    _one_line(done.returncode, done.stderr, 1)
    assert "output closed early (broken pipe)" in done.stderr
    assert "BrokenPipeError" not in done.stderr and "Exception ignored" not in done.stderr


def test_keys_list_escapes_a_files_control_characters(work, capsys):
    """keys list reads a keyset without its passphrase, so nothing it shows is
    authenticated: an id, a date, a status or a protection method holding a terminal's
    escape sequence (retitle the window, recolour, erase a line) or a line break reached the
    terminal as it was. Shown escaped now, as stanza labels are."""
    evil = "ab\x1b]0;pwned\x07\x1b[31mRED\r\nfake line\x9b"
    (work / "esc.json").write_text(json.dumps({
        "format": "gpucrypt-keyset", "version": 1,
        "keys": [{"id": evil, "algorithm": evil, "created": evil, "status": evil}],
        "protection": {"method": evil}}))
    code, out, err = run(capsys, "keys", "list", "esc.json")
    assert code == 0, err
    assert not any(c in out for c in "\x1b\x07\r\x9b"), out
    lines = out.splitlines()
    shown = "ab\\x1b]0;pwned\\x07\\x1b[31mRED\\r\\nfake line"
    assert len(lines) == 2 and lines[1].count(shown) == 4
    assert "sealed by ab\\x1b]0;pwned" in lines[0]


def test_rekey_refuses_a_file_with_other_hard_links(work, capsys):
    """Rekeying writes a new file in FILE's place: another hard link would keep the envelope
    a revoked recipient opens."""
    for name in ("alice", "bob"):
        assert run(capsys, "keygen", "--public", "--out", name)[0] == 0
    assert run(capsys, "encrypt", "-r", "alice.pub", "-r", "bob.pub", "plain", "sealed")[0] == 0
    os.link(work / "sealed", work / "shared")
    before = (work / "sealed").read_bytes()
    code, _, err = run(capsys, "rekey", "sealed", "-r", "alice.pub", "-i", "alice")
    _one_line(code, err, 2)
    assert "1 other hard link" in err and "--force" in err
    assert (work / "sealed").read_bytes() == before
    with warnings.catch_warnings(record=True) as caught:  # --force answered the library's
        warnings.simplefilter("always")                   # warning of the same: not repeated
        code, _, err = run(capsys, "rekey", "sealed", "-r", "alice.pub", "-i", "alice", "--force")
    assert code == 0, err
    assert [str(w.message) for w in caught] == []
    assert run(capsys, "decrypt", "-i", "bob", "sealed", "x")[0] == 1
    assert run(capsys, "decrypt", "-i", "bob", "shared", "x")[0] == 0  # what --force accepted


def _bobs_data_key(path) -> bytes:
    """The data key bob unwraps from ``path`` while he is a recipient (and may keep)."""
    from gpucrypt.keys.recipients import open_file_envelope

    header = stream.read_header(path)
    return open_file_envelope(header.envelope, keys.Identity.load("bob"), header.salt)


def test_rekey_warns_that_dropping_a_recipient_without_reencrypt_does_not_revoke(work, capsys):
    for name in ("alice", "bob", "carol"):
        assert run(capsys, "keygen", "--public", "--out", name)[0] == 0
    assert run(capsys, "encrypt", "-r", "alice.pub", "-r", "bob.pub", "plain", "sealed")[0] == 0
    bob_dek = _bobs_data_key(work / "sealed")
    code, out, err = run(capsys, "rekey", "sealed", "-r", "alice.pub", "-r", "bob.pub",
                         "-r", "carol.pub", "-i", "alice")
    assert code == 0 and err == "", err  # only added: nothing to warn of
    code, out, err = run(capsys, "rekey", "sealed", "-r", "alice.pub", "-i", "alice")
    _one_line(code, err, 0)
    assert "warning" in err and "--reencrypt" in err and "can still read sealed" in err
    assert "removed: " in out
    stream.decrypt(work / "sealed", work / "b", bob_dek)  # what the warning says
    assert (work / "b").read_bytes() == (work / "plain").read_bytes()


def test_rekey_within_a_keyset_is_no_revocation_to_warn_of(work, capsys):
    """keys add --primary, then rekey --keyset (KEYS.md's rotation): the stanza removed is
    the keyset's older key, whose holders hold the new one too: no warning. A recipient
    removed beside it still gets one."""
    assert run(capsys, "keygen", "--out", "ks.json")[0] == 0
    assert run(capsys, "keygen", "--public", "--out", "bob")[0] == 0
    assert run(capsys, "encrypt", "--keyset", "ks.json", "plain", "sealed")[0] == 0
    assert run(capsys, "encrypt", "--keyset", "ks.json", "-r", "bob.pub", "plain", "shared")[0] == 0
    assert run(capsys, "keys", "add", "ks.json", "--primary")[0] == 0
    code, out, err = run(capsys, "rekey", "sealed", "--keyset", "ks.json")
    assert code == 0 and err == "" and "removed: aes-kwp:" in out, (out, err)
    code, out, err = run(capsys, "rekey", "shared", "--keyset", "ks.json", "--old-keyset",
                         "ks.json")
    _one_line(code, err, 0)
    assert "can still read shared" in err and "x25519:" in out
    # the old key destroyed (a revocation: a leaked copy of the keyset still opens the
    # unchanged data key), or opened with another keyset file: warned of
    import shutil

    shutil.copy(work / "ks.json", work / "old.json")
    assert run(capsys, "encrypt", "--keyset", "ks.json", "plain", "third")[0] == 0
    old = next(k.id for k in keys.Keyset.load("ks.json") if k.status == "primary")
    assert run(capsys, "keys", "add", "ks.json", "--primary")[0] == 0
    assert run(capsys, "keys", "destroy", "ks.json", old, "--yes")[0] == 0
    code, out, err = run(capsys, "rekey", "third", "--keyset", "ks.json", "--old-keyset",
                         "old.json")
    _one_line(code, err, 0)
    assert "can still read third" in err and f"removed: aes-kwp:{old}" in out


def test_rekey_reencrypt_revokes(work, capsys):
    for name in ("alice", "bob"):
        assert run(capsys, "keygen", "--public", "--out", name)[0] == 0
    assert run(capsys, "encrypt", "-r", "alice.pub", "-r", "bob.pub", "--segment-size", "4KiB",
               "plain", "sealed")[0] == 0
    bob_dek = _bobs_data_key(work / "sealed")
    code, out, err = run(capsys, "rekey", "sealed", "-r", "alice.pub", "-i", "alice",
                         "--reencrypt")
    assert code == 0 and err == "", err
    assert "re-encrypted under a fresh data key" in out and "removed: " in out
    with pytest.raises(stream.AuthenticationError):
        stream.decrypt(work / "sealed", work / "b", bob_dek)
    assert run(capsys, "decrypt", "-i", "bob", "sealed", "b")[0] == 1
    assert run(capsys, "decrypt", "-i", "alice", "sealed", "a")[0] == 0
    assert (work / "a").read_bytes() == (work / "plain").read_bytes()


def test_rekey_reencrypt_refuses_a_file_with_other_hard_links(work, capsys):
    for name in ("alice", "bob"):
        assert run(capsys, "keygen", "--public", "--out", name)[0] == 0
    assert run(capsys, "encrypt", "-r", "alice.pub", "-r", "bob.pub", "plain", "sealed")[0] == 0
    os.link(work / "sealed", work / "shared")
    before = (work / "sealed").read_bytes()
    code, _, err = run(capsys, "rekey", "sealed", "-r", "alice.pub", "-i", "alice", "--reencrypt")
    _one_line(code, err, 2)
    assert "1 other hard link" in err and "--force" in err
    assert (work / "sealed").read_bytes() == before


def test_rekey_reencrypt_a_model_file(work, capsys):
    from gpucrypt import models

    _model_file_for(work, capsys, "alice.pub", "bob.pub")
    before = models.read_header(work / "m.gc")
    code, out, err = run(capsys, "rekey", "m.gc", "-r", "alice.pub", "-i", "alice", "--reencrypt")
    assert code == 0 and err == "", err
    assert models.read_header(work / "m.gc").salt != before.salt
    code, _, err = run(capsys, "decrypt-model", "-i", "bob", "m.gc", "b.safetensors")
    assert code == 1 and "no recipient" in err
    code, _, err = run(capsys, "decrypt-model", "-i", "alice", "m.gc", "a.safetensors")
    assert code == 0, err
    assert (work / "a.safetensors").read_bytes() == (work / "m.safetensors").read_bytes()


BENCH = ["bench", "--device", "cpu", "--algorithms", "chacha20", "--sizes", "16",
         "--seconds", "0.01", "--operations", "encrypt", "--forms", "alloc",
         "--implementations", "cryptography"]


def test_bench_outputs_are_refused_before_the_run_and_replaced_atomically(work, capsys):
    (work / "run.json").write_text("an earlier run\n")
    os.link(work / "run.json", work / "earlier.json")  # sees the old file, if it is kept
    for option, name in (("--json", "run.json"), ("--plot", "run.json")):
        code, out, err = run(capsys, *BENCH, option, name)
        _one_line(code, err, 2)
        assert "output exists: run.json (give --force" in err and out == ""  # nothing was run
    code, out, err = run(capsys, *BENCH, "--json", "missing/run.json")
    _one_line(code, err, 1)
    assert "cannot write missing/run.json" in err and out == ""
    code, _, err = run(capsys, *BENCH, "--json", "run.json", "--plot", "run.png", "--force")
    assert code == 0, err
    assert json.loads((work / "run.json").read_text())["cells"]
    assert (work / "run.png").read_bytes().startswith(b"\x89PNG")
    # a new file in its place (an interrupted run would have left the old one whole)
    assert (work / "earlier.json").read_text() == "an earlier run\n"
    assert os.stat(work / "run.json").st_mode & 0o777 == 0o644


def test_bench_json_goes_down_a_pipe_and_files_follow_the_umask(work, capsys):
    """--json into something that exists and is no file (a FIFO here; /dev/stdout in a
    shell pipeline) is written as it is, not refused as an existing output; a new file gets
    the mode the umask gives (0600 under umask 077)."""
    import threading

    os.mkfifo(work / "pipe")
    got = []
    reader = threading.Thread(target=lambda: got.append((work / "pipe").read_bytes()), daemon=True)
    reader.start()
    code, _, err = run(capsys, *BENCH, "--json", "pipe")
    reader.join(timeout=60)
    assert code == 0, err
    assert json.loads(got[0])["cells"]
    old = os.umask(0o077)
    try:
        code, _, err = run(capsys, *BENCH, "--json", "private.json")
    finally:
        os.umask(old)
    assert code == 0, err
    assert os.stat(work / "private.json").st_mode & 0o777 == 0o600


# --------------------------------------------------------------------------- outputs that are no file
# Device nodes are twins made in the test's folder (os.mknod: /dev/null is (1, 3), /dev/full
# (1, 7)), never the system's own: a bug here replaced the machine's /dev/null with a file.
def _device_twin(folder: Path, name: str, minor: int) -> Path:
    """A character device node ``folder/name`` with the numbers of /dev/null (minor 3) or
    /dev/full (minor 7); the test is skipped where nodes cannot be made (not root)."""
    import stat

    path = folder / name
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, minor))
    except (PermissionError, AttributeError, OSError) as exc:
        pytest.skip(f"cannot make a device node here ({exc}): needs root on Linux")
    return path


def _read_fifo_in_background(fifo: Path) -> list:
    """Start a reader of ``fifo`` (a thread); what it read is in the returned list once
    the writer closed it."""
    import threading

    got: list = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    got.append(reader)
    return got


def _fifo_result(got: list) -> bytes:
    got[0].join(timeout=60)
    assert len(got) == 2, "the FIFO's reader never saw the writer close"
    return got[1]


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_a_device_output_is_written_in_place_never_replaced(work, capsys, force):
    """-o /dev/null checks that a file decrypts: a character device OUT is opened and
    written, with or without --force; with --force it used to be replaced by a regular
    file (as root, the machine's /dev/null), and without it refused as existing."""
    import stat

    null = _device_twin(work, "null", 3)
    assert run(capsys, "encrypt", "--key-file", "key", "plain", "sealed")[0] == 0
    for argv in (["encrypt", "--key-file", "key", "plain"],
                 ["decrypt", "--key-file", "key", "sealed"]):
        code, _, err = run(capsys, *argv, null, *force)
        assert code == 0, err
        mode = os.stat(null).st_mode
        assert stat.S_ISCHR(mode) and os.stat(null).st_rdev == os.makedev(1, 3), argv
    full = _device_twin(work, "full", 7)
    code, _, err = run(capsys, "decrypt", "--key-file", "key", "sealed", full, *force)
    _one_line(code, err, 1)
    assert f"cannot write {full}: No space left on device" in err  # which side, and why
    assert stat.S_ISCHR(os.stat(full).st_mode)


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_a_fifo_output_is_streamed_and_decrypt_sends_only_verified_segments(work, capsys, force):
    import stat

    plain = (work / "plain").read_bytes()
    assert run(capsys, "encrypt", "--key-file", "key", "--segment-size", "4KiB", "plain",
               "sealed")[0] == 0
    os.mkfifo(work / "pipe")
    got = _read_fifo_in_background(work / "pipe")
    code, _, err = run(capsys, "decrypt", "--key-file", "key", "sealed", "pipe", *force)
    assert code == 0, err
    assert _fifo_result(got) == plain and stat.S_ISFIFO(os.stat(work / "pipe").st_mode)
    tampered = bytearray((work / "sealed").read_bytes())
    tampered[-20] ^= 1  # in the last of the three segments
    (work / "tampered").write_bytes(tampered)
    got = _read_fifo_in_background(work / "pipe")
    code, _, err = run(capsys, "decrypt", "--key-file", "key", "tampered", "pipe", *force)
    _one_line(code, err, 1)
    sent = _fifo_result(got)
    assert sent == plain[:len(sent)] and len(sent) < len(plain) and len(sent) % 4096 == 0
    assert stat.S_ISFIFO(os.stat(work / "pipe").st_mode)


def test_model_commands_write_a_fifo_in_place(work, capsys):
    """decrypt-model puts each tensor where it goes (not in order): to a FIFO, the file is
    made whole and verified first, then sent; encrypt-model writes in order."""
    np = pytest.importorskip("numpy")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")

    safetensors_numpy.save_file({"b": np.arange(5000, dtype=np.float32),
                                 "a": np.ones((30, 7), dtype=np.int8)}, str(work / "m.st"))
    os.mkfifo(work / "pipe")
    got = _read_fifo_in_background(work / "pipe")
    code, _, err = run(capsys, "encrypt-model", "--key-file", "key", "m.st", "pipe")
    assert code == 0, err
    (work / "m.gcm").write_bytes(_fifo_result(got))
    got = _read_fifo_in_background(work / "pipe")
    code, _, err = run(capsys, "decrypt-model", "--key-file", "key", "m.gcm", "pipe", "--force")
    assert code == 0, err
    assert _fifo_result(got) == (work / "m.st").read_bytes()
    assert os.path.exists(work / "pipe") and not os.path.isfile(work / "pipe")


@pytest.mark.skipif(not ON_LINUX, reason="FIFOs and /dev/fd (Linux)")
def test_encrypt_model_refuses_an_in_that_is_a_fifo_at_once(work):
    """encrypt-model opened IN with a blocking open: a FIFO nobody writes to hung it (where
    decrypt-model refuses one at once), and ``<(cat m.safetensors)`` reached the
    safetensors package, which said "No such device". A safetensors file is read at any
    position, so IN must be a regular file: said at once, as a usage error. Run in a
    process of its own with a time limit, so that a regression fails instead of hanging."""
    np = pytest.importorskip("numpy")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")

    safetensors_numpy.save_file({"w": np.ones(8, dtype=np.float32)}, str(work / "m.st"))
    os.mkfifo(work / "in.fifo")
    r, w = os.pipe()  # bash's <(cat m.st): /dev/fd/N of a pipe with the bytes in it
    try:
        os.write(w, (work / "m.st").read_bytes())
        os.close(w)
        for given, out in (("in.fifo", "a.gc"), (f"/dev/fd/{r}", "b.gc")):
            done = subprocess.run([sys.executable, "-m", "gpucrypt", "encrypt-model",
                                   "--key-file", "key", given, out], cwd=work, pass_fds=(r,),
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 2, done.stderr
            assert f"IN {given} is a FIFO, not a regular file: a safetensors file is read at " \
                   f"any position" in done.stderr
            assert "save it to a file first" in done.stderr
            assert not (work / out).exists()
    finally:
        os.close(r)
    code = subprocess.run([sys.executable, "-m", "gpucrypt", "encrypt-model", "--key-file",
                           "key", "m.st", "c.gc"], cwd=work, timeout=60).returncode
    assert code == 0 and (work / "c.gc").exists()  # a regular IN still converts


def test_outputs_that_are_neither_file_nor_stream_are_refused_even_with_force(work, capsys):
    """A block device or a socket at OUT: refused (exit 2), never replaced."""
    import socket
    import stat

    made = []
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(work / "sock"))
        made.append(work / "sock")
        try:
            os.mknod(work / "block", 0o600 | stat.S_IFBLK, os.makedev(7, 200))
            made.append(work / "block")
        except (PermissionError, OSError):
            pass  # not root: the socket alone
        assert run(capsys, "encrypt", "--key-file", "key", "plain", "sealed")[0] == 0
        for node in made:
            for argv in (["encrypt", "--key-file", "key", "plain"],
                         ["decrypt", "--key-file", "key", "sealed"]):
                for force in ([], ["--force"]):
                    code, _, err = run(capsys, *argv, node, *force)
                    _one_line(code, err, 2)
                    assert "which gpucrypt does not write to" in err, err
                    assert not stat.S_ISREG(os.stat(node).st_mode)
    finally:
        server.close()


# --------------------------------------------------------------------------- standard streams
def _shell(work: Path, redirect: str, *argv: str, stdout=subprocess.PIPE, stdin=None):
    """``gpucrypt ARGV REDIRECT`` run by sh (``>&-`` closes stdout, ``<&-`` stdin,
    ``2>&-`` stderr), as a user's shell would."""
    return subprocess.run(["sh", "-c", f'exec "$0" "$@" {redirect}', sys.executable, "-c",
                           LAUNCHER, "unnamed", *argv], cwd=work, stdin=stdin, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=120)


def test_a_stdout_that_fails_is_one_line_exit_1(work, capsys):
    """stdout on a full device (a /dev/full twin): one line, exit 1, no traceback, for
    every command that prints, whether it changed anything (keygen) or not."""
    full = _device_twin(work, "full", 7)
    assert run(capsys, "keygen", "--out", "ks.json")[0] == 0
    commands = [["info"], ["selftest", "--size", "64"], ["keys", "list", "ks.json"],
                ["keygen", "--out", "new.json"], BENCH,
                ["encrypt", "--key-file", "key", "plain"]]
    for argv in commands:
        with open(full, "w") as stdout:
            done = _shell(work, "", *argv, stdout=stdout)
        _one_line(done.returncode, done.stderr, 1)
        assert "cannot write to stdout (No space left on device)" in done.stderr or (
            argv[0] == "encrypt" and "cannot write stdout: No space left" in done.stderr), \
            (argv, done.stderr)
        assert "Exception ignored" not in done.stderr
    assert keys.Keyset.load(str(work / "new.json")).primary  # keygen's work was done


def test_closed_standard_streams(work, capsys):
    """Python leaves None for a stream closed at start: each is a clear message or none."""
    done = _shell(work, ">&-", "encrypt", "--key-file", "key", "plain", "-o", "sealed")
    assert done.returncode == 0 and done.stderr == "", done.stderr  # stdout unused
    assert run(capsys, "decrypt", "--key-file", "key", "sealed", "back")[0] == 0
    assert (work / "back").read_bytes() == (work / "plain").read_bytes()
    done = _shell(work, "2>&-", "decrypt", "--key-file", "key", "sealed", "again")
    assert done.returncode == 0  # a closed stderr changes no success into a failure
    assert (work / "again").read_bytes() == (work / "plain").read_bytes()
    done = _shell(work, "<&-", "encrypt", "--key-file", "key", "-o", "x")
    _one_line(done.returncode, done.stderr, 2)
    assert "stdin is closed" in done.stderr and not (work / "x").exists()
    done = _shell(work, ">&-", "encrypt", "--key-file", "key", "plain")
    _one_line(done.returncode, done.stderr, 2)
    assert "stdout is closed" in done.stderr
    done = _shell(work, ">&-", "info")
    _one_line(done.returncode, done.stderr, 1)
    assert "cannot write to stdout (it was closed when gpucrypt started)" in done.stderr


def test_io_errors_say_which_side_failed(work, capsys, monkeypatch):
    """A failed read names IN or stdin, a failed write OUT or stdout (not "I/O: ...")."""
    import errno

    class Failing(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, buf):
            raise OSError(errno.EIO, "Input/output error")

    class Stdin:
        buffer = Failing()

        def isatty(self):
            return False

    monkeypatch.setattr(sys, "stdin", Stdin())
    code, _, err = run(capsys, "encrypt", "--key-file", "key", "-o", "x")
    _one_line(code, err, 1)
    assert "cannot read stdin: Input/output error" in err and not (work / "x").exists()
    if ON_LINUX:
        code, _, err = run(capsys, "encrypt", "--key-file", "key", "/proc/self/mem", "x")
        _one_line(code, err, 1)
        assert "cannot read /proc/self/mem: Input/output error" in err


@pytest.mark.skipif(not ON_LINUX, reason="files of /proc (Linux)")
def test_an_input_whose_size_is_not_its_length_is_exit_1_with_what_to_do(work, capsys):
    """A file of /proc has size 0 and content: the data changed under the encryption
    (exit 1, not a usage error), and the message says what works instead."""
    code, _, err = run(capsys, "encrypt", "--key-file", "key", "/proc/self/status", "x")
    _one_line(code, err, 1)
    assert "copy it to a regular file first, or pipe it in" in err
    assert not (work / "x").exists()
    with open("/proc/self/status", "rb") as status:  # what the message advises: a pipe
        done = subprocess.run([sys.executable, "-c", LAUNCHER, "unnamed", "encrypt",
                               "--key-file", "key", "-o", "x"], cwd=work, input=status.read(),
                              capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_ctrl_d_at_the_passphrase_prompt_is_a_usage_error(work, capsys, monkeypatch):
    import getpass

    import gpucrypt.cli.keys as cli_keys

    def eof(prompt=""):
        raise EOFError

    monkeypatch.setattr(cli_keys, "_can_prompt", lambda: True)  # no terminal in tests
    monkeypatch.setattr(getpass, "getpass", eof)
    for argv in (["encrypt", "-p", "plain", "x"], ["keygen", "--seal", "--out", "ks.json"]):
        code, _, err = run(capsys, *argv)
        _one_line(code, err, 2)
        assert "no passphrase given" in err and "EOFError" not in err
    assert not (work / "x").exists() and not (work / "ks.json").exists()


# --------------------------------------------------------------------------- passphrase files
def test_a_passphrase_file_nothing_reads_is_refused(work, capsys, monkeypatch):
    """README: key options that cannot both apply are refused (exit 2), never silently
    ignored. --passphrase-file is the passphrase of -p, or of a sealed keyset or identity."""
    for args in (["keygen", "--public", "--out", "alice"],
                 ["keygen", "--public", "--seal", "--passphrase-file", "pw", "--out", "sealed-id"],
                 ["keygen", "--seal", "--passphrase-file", "pw", "--out", "sealed-ks"]):
        assert run(capsys, *args)[0] == 0
    assert run(capsys, "encrypt", "-r", "alice.pub", "plain", "for-alice")[0] == 0
    assert run(capsys, "encrypt", "-r", "sealed-id.pub", "plain", "for-sealed")[0] == 0
    pw = ["--passphrase-file", "pw"]
    refused = [["encrypt", "--key-file", "key", "plain", "x"],
               ["encrypt", "-r", "alice.pub", "plain", "x"],
               ["decrypt", "--key-file", "key", "for-alice", "x"],
               ["decrypt", "-i", "alice", "for-alice", "x"],
               ["rekey", "for-alice", "-r", "alice.pub", "-i", "alice"]]
    for argv in refused:
        code, _, err = run(capsys, *argv, *pw)
        _one_line(code, err, 2)
        assert "--passphrase-file would be ignored" in err, (argv, err)
        assert not (work / "x").exists()
    accepted = [["encrypt", "-p", "plain", "p.gc"],
                ["decrypt", "p.gc", "x1"],                            # the header says -p
                ["encrypt", "--keyset", "sealed-ks", "plain", "ks.gc"],
                ["decrypt", "-i", "sealed-id", "for-sealed", "x2"],
                ["decrypt", "-i", "alice", "--keyset", "sealed-ks", "for-alice", "x3"],
                ["keys", "add", "sealed-ks"]]
    for argv in accepted:
        code, _, err = run(capsys, *argv, *pw)
        assert code == 0, (argv, err)
    for name in ("x1", "x2", "x3"):
        assert (work / name).read_bytes() == (work / "plain").read_bytes()
    # keys list reads no passphrase (a sealed keyset's list is its public part): refused
    code, _, err = run(capsys, "keys", "list", "sealed-ks", *pw)
    assert code == 2 and "--passphrase-file" in err
    assert run(capsys, "keys", "list", "sealed-ks")[0] == 0


# --------------------------------------------------------------------------- rekey's FILE
def test_rekey_refuses_what_is_not_a_regular_file(work, capsys):
    """A folder was told it had other hard links (and with --force, exit 1), a FIFO was
    read forever, a missing FILE was exit 1: each is a usage error (exit 2)."""
    assert run(capsys, "keygen", "--public", "--out", "alice")[0] == 0
    (work / "folder").mkdir()
    for argv in (["folder"], ["folder", "--force"], ["missing.gc"]):
        code, _, err = run(capsys, "rekey", *argv, "-r", "alice.pub", "-i", "alice")
        _one_line(code, err, 2)
        assert ("is a directory, not a file" in err) or ("file not found: missing.gc" in err)
    os.mkfifo(work / "pipe")
    # a process of its own: without the check it would wait for a writer forever
    done = _shell(work, "", "rekey", "pipe", "-r", "alice.pub", "-i", "alice")
    _one_line(done.returncode, done.stderr, 2)
    assert "pipe is a FIFO, not a file" in done.stderr


# --------------------------------------------------------------------------- checkpoint folders
@pytest.fixture
def checkpoint(work):
    """A sharded checkpoint folder ``ckpt``: two shards, their index, a config."""
    np = pytest.importorskip("numpy")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")

    (work / "ckpt").mkdir()
    shards = {"model-00001-of-00002.safetensors": {"embed.weight": np.ones((4, 8), np.float32)},
              "model-00002-of-00002.safetensors": {"lm_head.weight": np.zeros(8, np.float32)}}
    for name, tensors in shards.items():
        safetensors_numpy.save_file(tensors, str(work / "ckpt" / name))
    index = {"metadata": {}, "weight_map": {t: name for name, ts in shards.items() for t in ts}}
    (work / "ckpt" / "model.safetensors.index.json").write_text(json.dumps(index))
    (work / "ckpt" / "config.json").write_text("{}")
    return work / "ckpt"


@pytest.mark.parametrize("command", ["encrypt-model", "decrypt-model"])
def test_a_checkpoint_out_that_is_a_symbolic_link_is_refused_before_any_work(
        work, capsys, checkpoint, monkeypatch, command):
    """OUT a link to an empty folder passed the check (isdir follows links), all the work
    was done, then rename() failed (ENOTDIR) with a message naming the temporary folder.
    Now refused at once, naming OUT; the library refuses it too."""
    from gpucrypt.files import checkpoints

    src = checkpoint
    if command == "decrypt-model":
        assert run(capsys, "encrypt-model", "--key-file", "key", checkpoint, "enc")[0] == 0
        src = work / "enc"
    (work / "empty").mkdir()
    os.symlink("empty", work / "link")
    work_done = []
    monkeypatch.setattr(checkpoints, "_write_folder", lambda *a: work_done.append(a))
    code, _, err = run(capsys, command, "--key-file", "key", src, "link")
    _one_line(code, err, 2)
    assert "output is a symbolic link: link" in err and "gpucrypt-tmp" not in err
    assert work_done == [] and os.listdir(work / "empty") == []
    monkeypatch.undo()
    with pytest.raises(FileExistsError, match=f"{work / 'link'} is a symbolic link"):
        checkpoints.encrypt_checkpoint(checkpoint, work / "link", (work / "key").read_bytes())
    assert os.listdir(work / "empty") == []
    assert not any("gpucrypt-tmp" in n for n in os.listdir(work))


@pytest.mark.parametrize("command", ["encrypt-model", "decrypt-model"])
@pytest.mark.parametrize("out, said", [
    ("{src}/sub", "OUT {src}/sub is inside IN {src}"),
    ("{src}", "OUT {src} is IN {src} itself"),
    (".", "IN {src} is inside OUT ."),
])
def test_a_checkpoint_out_inside_in_or_around_it_is_refused_before_any_key(
        work, capsys, checkpoint, command, out, said):
    """`encrypt-model ck/ ck/enc/` succeeded and left ck/ holding a subfolder, so that ck/
    could no longer be encrypted ("has subfolders"). OUT inside IN, IN itself, or holding
    IN is a usage error before any key is read (the key variable below is not set)."""
    src = "ckpt"
    if command == "decrypt-model":
        assert run(capsys, "encrypt-model", "--key-file", "key", checkpoint, "enc")[0] == 0
        src = "enc"
    before = sorted(os.listdir(work / src))
    out, said = out.format(src=src), said.format(src=src)
    code, _, err = run(capsys, command, "--key-env", "GPUCRYPT_TEST_UNSET", src, out)
    _one_line(code, err, 2)
    assert said in err and "GPUCRYPT_TEST_UNSET" not in err, err
    assert sorted(os.listdir(work / src)) == before


@pytest.mark.parametrize("operation", ["encrypt", "decrypt"])
@pytest.mark.parametrize("out, said", [
    ("{src}/sub", "the output {src}/sub is inside the checkpoint folder {src}"),
    ("{src}", "the output {src} is the checkpoint folder {src} itself"),
    (".", "the checkpoint folder {src} is inside the output ."),
])
def test_the_library_refuses_a_checkpoint_out_inside_in_or_around_it(
        work, capsys, checkpoint, operation, out, said):
    """The CLI refused OUT inside IN, but encrypt_checkpoint/decrypt_checkpoint wrote
    ck/sub/ and left ck/ holding a subfolder it could no longer be read with. The library
    refuses it too (ValueError), before any key is used: a keyset that cannot be
    opened is not reached."""
    from gpucrypt.files import checkpoints

    key = (work / "key").read_bytes()
    src = "ckpt"
    if operation == "decrypt":
        checkpoints.encrypt_checkpoint(checkpoint, work / "enc", key)
        src = "enc"
    before = sorted(os.listdir(work / src))
    out, said = out.format(src=src), said.format(src=src)
    with pytest.raises(ValueError, match=re.escape(said)):
        if operation == "encrypt":
            checkpoints.encrypt_checkpoint(src, out, key)
        else:
            checkpoints.decrypt_checkpoint(src, out, keyset=work / "no-such-keyset.json")
    assert sorted(os.listdir(work / src)) == before


@pytest.mark.parametrize("command", ["encrypt-model", "decrypt-model"])
@pytest.mark.parametrize("name", ["model.safetensors", "model.SafeTensors", "model.gguf"])
def test_a_checkpoint_out_named_like_a_weights_file_is_refused(work, capsys, checkpoint,
                                                               command, name):
    """`encrypt-model llama/ llama-enc/model.safetensors` made a folder named
    model.safetensors: a folder IN is written to a folder, and OUT named like a file is
    refused, saying so."""
    src = checkpoint
    if command == "decrypt-model":
        assert run(capsys, "encrypt-model", "--key-file", "key", checkpoint, "enc")[0] == 0
        src = work / "enc"
    (work / "out").mkdir()
    code, _, err = run(capsys, command, "--key-file", "key", src, f"out/{name}")
    _one_line(code, err, 2)
    assert "OUT must be a folder" in err and name in err, err
    assert os.listdir(work / "out") == []


def test_a_checkpoint_out_that_appears_meanwhile_is_named_not_the_temporary_folder(
        work, capsys, checkpoint, monkeypatch):
    """OUT filled by someone else while the folder was written: rename() fails and its
    error named the temporary folder, which is removed by then; now it names OUT."""
    from gpucrypt.files import checkpoints

    real = checkpoints._copy_others

    def copy_and_race(layout, temp, files=None):
        real(layout, temp, files)
        (work / "out").mkdir()
        (work / "out" / "theirs").write_text("x")

    monkeypatch.setattr(checkpoints, "_copy_others", copy_and_race)
    code, _, err = run(capsys, "encrypt-model", "--key-file", "key", checkpoint, "out")
    _one_line(code, err, 1)
    assert f"{work / 'out'}: " in err and "could not take its place" in err, err
    assert "gpucrypt-tmp" not in err
    assert sorted(os.listdir(work / "out")) == ["theirs"]
    assert not any("gpucrypt-tmp" in n for n in os.listdir(work))


def test_encrypt_names_on_a_checkpoint_with_an_index_warns_that_it_stays_readable(
        work, capsys, checkpoint):
    """--encrypt-names encrypts each model file's table, but the index (every tensor name
    and its shard) is copied as it is: one warning line on stderr says so, and what to do."""
    code, _, err = run(capsys, "encrypt-model", "--key-file", "key", "--encrypt-names",
                       checkpoint, "enc")
    assert code == 0 and err.count("\n") == 1, err
    assert ("warning: --encrypt-names hides the names in the model files only: "
            "model.safetensors.index.json is copied as it is") in err and "move it out" in err
    assert b"embed.weight" in (work / "enc" / "model.safetensors.index.json").read_bytes()
    code, _, err = run(capsys, "encrypt-model", "--key-file", "key", checkpoint, "plain-names")
    assert code == 0 and err == ""
    os.remove(checkpoint / "model.safetensors.index.json")
    code, _, err = run(capsys, "encrypt-model", "--key-file", "key", "--encrypt-names",
                       checkpoint, "no-index")
    assert code == 0 and err == ""
    code, out, _ = run(capsys, "encrypt-model", "--help")
    assert code == 0 and "every tensor name stays visible there" in " ".join(out.split())


def test_encrypt_model_of_an_encrypted_folder_says_so(work, capsys, checkpoint):
    """Its model files were "not a readable safetensors file (header too large)"."""
    assert run(capsys, "encrypt-model", "--key-file", "key", checkpoint, "enc")[0] == 0
    code, _, err = run(capsys, "encrypt-model", "--key-file", "key", "enc", "again")
    _one_line(code, err, 1)
    assert "model-00001-of-00002.safetensors is already a gpucrypt model file (encrypted)" in err
    assert not os.path.exists(work / "again")


# ------------------------------------------------------------------ messages that lead somewhere
def test_messages_name_the_option_that_would_work(work, capsys, monkeypatch):
    """Each said something true that left the user stuck: "run chmod 600" for a public
    .pub given as -i, "not a gpucrypt-keyset file" for an identity given as --keyset, "it
    has 33 bytes" for a key with a trailing newline, "needs a passphrase" for an empty
    $GPUCRYPT_PASSPHRASE, "open it with its passphrase" from rekey (which takes none)."""
    assert run(capsys, "keygen", "--public", "--out", "alice.key")[0] == 0
    assert run(capsys, "encrypt", "-r", "alice.key.pub", "plain", "sealed")[0] == 0

    def fails(*argv) -> str:
        code, _, err = run(capsys, *argv)
        assert code in (1, 2) and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    err = fails("decrypt", "-i", "alice.key.pub", "sealed", "out")
    assert "it is a recipient file, a public key" in err and "chmod" not in err
    assert "it is an identity file" in fails("decrypt", "--keyset", "alice.key", "sealed", "out")
    assert "-i IDENTITY or --keyset, not a raw key" in fails("decrypt", "--key-file", "key",
                                                               "sealed", "out")
    np = pytest.importorskip("numpy")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    safetensors_numpy.save_file({"w": np.ones(4, np.float32)}, str(work / "m.safetensors"))
    assert run(capsys, "encrypt-model", "-r", "alice.key.pub", "m.safetensors", "m.gc")[0] == 0
    assert "-i IDENTITY or --keyset, not a raw key" in fails("decrypt-model", "--key-file",
                                                               "key", "m.gc", "m.out")
    private(work / "key33", os.urandom(32) + b"\n")
    assert "ends in a newline" in fails("encrypt", "--key-file", "key33", "plain", "out")
    assert "passphrase file nope:" in fails("encrypt", "-p", "--passphrase-file", "nope",
                                            "plain", "out")
    assert "add -p to key the file" in fails("encrypt", "--passphrase-file", "pw",
                                             "--key-file", "key", "plain", "out")
    monkeypatch.setenv("GPUCRYPT_PASSPHRASE", "")
    assert "set but empty" in fails("encrypt", "-p", "plain", "out")
    monkeypatch.setenv("GPUCRYPT_PASSPHRASE", "correct horse battery staple")
    assert run(capsys, "encrypt", "-p", "plain", "by-passphrase")[0] == 0
    err = fails("rekey", "by-passphrase", "-r", "alice.key.pub", "-i", "alice.key")
    assert "encrypted with a passphrase, which rekey does not take" in err
    assert not (work / "out").exists()


def test_a_tampered_segment_is_not_called_a_wrong_key(work, capsys):
    """Once the header verified under the key, a failing segment is the data's fault."""
    assert run(capsys, "encrypt", "--key-file", "key", "--segment-size", "4KiB", "plain",
               "sealed")[0] == 0
    data = bytearray((work / "sealed").read_bytes())
    data[-3000] ^= 1
    (work / "sealed").write_bytes(bytes(data))
    code, _, err = run(capsys, "decrypt", "--key-file", "key", "sealed", "back")
    assert code == 1 and err.startswith("gpucrypt decrypt: tampered or damaged data: segment")
    assert "wrong key" not in err.split("segment")[0]


def test_selftest_asked_for_the_gpu_fails_where_none_runs(work):
    """GPUCRYPT_DEVICE=gpu gpucrypt selftest checked the CPU only and exited 0: a check
    that a GPU works passed on a machine with none."""
    environment = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    environment["GPUCRYPT_DEVICE"] = "gpu"
    done = subprocess.run([sys.executable, "-c", LAUNCHER, "unnamed", "selftest", "--size",
                           "4096"], cwd=work, env=environment, capture_output=True, text=True)
    if "gpu  ChaCha20Poly1305" in done.stdout:  # a real GPU here: it was checked
        assert done.returncode == 0, done.stdout
    else:
        assert done.returncode == 1, done.stdout
        assert "gpu  FAILED: GPUCRYPT_DEVICE=gpu, but the GPU backend cannot run here" \
            in done.stdout


def test_a_file_named_like_an_option_comes_after_double_dash(work, capsys):
    """``--`` ends the options, as everywhere: intermixed parsing (which lets options come
    between IN and OUT) dropped it, and "-- -plain" was an unrecognized argument."""
    (work / "-plain").write_bytes(b"a file whose name starts with a dash")
    code, _, err = run(capsys, "encrypt", "--key-file", "key", "--", "-plain", "-sealed")
    assert code == 0, err
    code, _, err = run(capsys, "decrypt", "--key-file", "key", "--", "-sealed", "back")
    assert code == 0, err
    assert (work / "back").read_bytes() == (work / "-plain").read_bytes()


def test_encrypt_model_of_a_pipe_says_why_without_a_traceback(work):
    """The already-encrypted check read the input with pread, which a pipe refuses (ESPIPE):
    an uncaught OSError where the input's own error was due."""
    done = subprocess.run(["bash", "-c", 'exec "$0" -c "$1" unnamed encrypt-model '
                           '--key-file key <(cat plain) out.gc', sys.executable, LAUNCHER],
                          cwd=work, capture_output=True, text=True)
    assert done.returncode in (1, 2), done.stderr
    assert "Traceback" not in done.stderr and "encrypt-model" in done.stderr


def test_keygen_and_bench_take_the_short_options_the_file_commands_do(work, capsys):
    """-o and -f, as encrypt and decrypt take them."""
    assert run(capsys, "keygen", "-o", "ks.json")[0] == 0
    first = (work / "ks.json").read_bytes()
    code, _, err = run(capsys, "keygen", "-o", "ks.json")
    assert code == 2 and "--force" in err
    assert run(capsys, "keygen", "-o", "ks.json", "-f")[0] == 0
    assert (work / "ks.json").read_bytes() != first
    from gpucrypt.cli import _command_parser

    assert _command_parser("bench").parse_args(["-f"]).force is True


def test_keys_add_racing_another_writer_says_to_run_it_again(work, capsys, monkeypatch):
    """keys add whose keyset file another command saved meanwhile: refused (exit 1, nothing
    written), and told as a command's failure, not with the library's advice to keep the
    object and save it elsewhere, which a finished command cannot follow."""
    from gpucrypt.keys import Keyset

    assert run(capsys, "keygen", "--out", "ks.json")[0] == 0
    real_add = Keyset.add

    def add_while_another_saves(self, *args, **kwargs):
        other = Keyset.load("ks.json")
        real_add(other)
        other.save("ks.json")
        return real_add(self, *args, **kwargs)
    monkeypatch.setattr(Keyset, "add", add_while_another_saves)
    code, _, err = run(capsys, "keys", "add", "ks.json")
    _one_line(code, err, 1)
    assert "changed while this command ran" in err and "run the command again" in err
    assert "overwrite=True" not in err and "new path" not in err
    assert len(list(Keyset.load("ks.json"))) == 2  # the other command's key, not this one's


def test_info_and_warmup_give_the_backends_advice_in_option_words(tmp_path):
    """`gpucrypt info` and `warmup` passed on the library's "use device='cpu'": the file
    commands say --device cpu, and so do these now. Run outside the simulator, where a
    machine without a GPU has advice to give."""
    from _outside_simulator import run_outside_simulator

    code = ("import contextlib, io, sys\n"
            "from gpucrypt.cli import main\n"
            "for command in ('info', 'warmup'):\n"
            "    out, err = io.StringIO(), io.StringIO()\n"
            "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
            "        rc = main([command])\n"
            "    print(command, rc, repr(out.getvalue() + err.getvalue()))\n")
    printed, has_gpu = run_outside_simulator(code, tmp_path)
    assert "device='" not in printed, printed
    if not has_gpu:  # the advice is there to check
        # the commands that take it named: info and warmup take no --device
        assert printed.count("use --device cpu (encrypt, decrypt, ") == 2, printed


def test_fifos_are_refused_or_waited_on_only_where_they_can_be(work, capsys):
    """`keys add` on a keyset FIFO read it once, then waited forever to check it before
    saving back; now refused at once (exit 2: the keyset is saved back to a regular file).
    `encrypt -r missing.pub IN -o FIFO` waited for the FIFO's reader before saying the key
    file was missing; the keys are resolved before OUT is opened."""
    import threading

    assert run(capsys, "keygen", "--out", "ks.json")[0] == 0
    os.mkfifo(work / "ks.fifo")
    def feed() -> None:
        with contextlib.suppress(BrokenPipeError):  # the refusal may close its end unread
            (work / "ks.fifo").write_bytes((work / "ks.json").read_bytes())

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    done = subprocess.run([sys.executable, "-c", LAUNCHER, "unnamed", "keys", "add", "ks.fifo"],
                          cwd=work, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "ks.fifo is a FIFO" in done.stderr, done.stderr
    with open(work / "ks.fifo", "rb"):  # let the feeder finish: nothing read it
        pass
    feeder.join(timeout=10)
    os.mkfifo(work / "out.fifo")
    done = subprocess.run([sys.executable, "-c", LAUNCHER, "unnamed", "encrypt", "-r",
                           "missing.pub", "plain", "-o", "out.fifo"],
                          cwd=work, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "missing.pub" in done.stderr, done.stderr


# ------------------------------------------------------------------ no GPU, GPUCRYPT_DEVICE
#: the probe's reason on a machine without a driver, in the library's words
NO_DRIVER = ("no CUDA driver library (libcuda) can be loaded: this machine has no NVIDIA GPU "
             "driver; use device='cpu', or install the driver")


@pytest.fixture
def no_gpu(monkeypatch):
    """The GPU backend refuses to start, with the probe's reason (the suite's own process
    has the simulator's GPU otherwise)."""
    from gpucrypt import backends

    monkeypatch.setitem(backends._reasons, "gpu", NO_DRIVER)
    monkeypatch.delitem(backends._instances, "gpu", raising=False)


def test_info_advises_device_cpu_only_for_the_commands_that_take_it(capsys, no_gpu):
    """`gpucrypt info` said "use --device cpu (encrypt, decrypt, encrypt-model,
    decrypt-model)", and decrypt-model has no --device: following the advice was an
    "unrecognized arguments" error. bench's --device chooses what to measure, not where a
    file is encrypted, so it is not named."""
    from gpucrypt.cli import SUBCOMMANDS, _command_parser

    code, out, _ = run(capsys, "info")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("backend gpu unavailable"))
    named = line.split("use --device cpu (", 1)[1].split(")", 1)[0].split(", ")
    taking = {name for name in SUBCOMMANDS if name != "bench"
              and "--device" in _command_parser(name)._option_string_actions}
    assert set(named) == taking and "decrypt-model" not in named, line


def test_gpucrypt_device_gpu_without_a_gpu_names_the_variable(work, capsys, monkeypatch, no_gpu):
    """GPUCRYPT_DEVICE=gpu where no GPU runs said "device 'auto' unavailable": the user
    gave no --device, and the variable that chose the GPU went unnamed. encrypt and decrypt
    refuse it before any key is read (as --device gpu)."""
    monkeypatch.setenv("GPUCRYPT_DEVICE", "gpu")
    code, _, err = run(capsys, "encrypt", "--key-env", "GPUCRYPT_TEST_UNSET", "plain", "sealed")
    _one_line(code, err, 2)
    assert "GPUCRYPT_DEVICE=gpu" in err and "unset GPUCRYPT_DEVICE" in err, err
    assert "GPUCRYPT_DEVICE=cpu" in err and "device 'auto'" not in err, err
    assert "device='cpu'" not in err and "GPUCRYPT_TEST_UNSET" not in err, err  # no key read
    monkeypatch.setenv("GPUCRYPT_DEVICE", "cpu")
    assert run(capsys, "encrypt", "--key-file", "key", "plain", "sealed")[0] == 0
    monkeypatch.setenv("GPUCRYPT_DEVICE", "cuda")
    code, _, err = run(capsys, "decrypt", "--key-file", "key", "sealed", "back")
    _one_line(code, err, 2)
    assert "GPUCRYPT_DEVICE=cuda" in err and "device 'auto'" not in err, err
    assert not (work / "back").exists()
    for setting in ("cuda", "gpu"):  # refused before the key: the unset variable is not read
        monkeypatch.setenv("GPUCRYPT_DEVICE", setting)
        code, _, err = run(capsys, "decrypt", "--key-env", "GPUCRYPT_TEST_UNSET", "sealed", "back")
        _one_line(code, err, 2)
        assert f"GPUCRYPT_DEVICE={setting}" in err and "GPUCRYPT_TEST_UNSET" not in err, err
    # --device cpu says where, whatever the environment asks for
    assert run(capsys, "decrypt", "--device", "cpu", "--key-file", "key", "sealed", "back")[0] == 0


def test_decrypt_model_says_gpucrypt_device_gpu_does_not_apply(work, capsys, monkeypatch):
    """GPUCRYPT_DEVICE=gpu decrypt-model ran on the CPU without a word: decrypt-model exports
    on the CPU's threads by design (its help says so), and now says so on stderr when the
    variable asks for the GPU; it still runs (the variable may be set for a whole session)."""
    np = pytest.importorskip("numpy")
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    safetensors_numpy.save_file({"w": np.arange(4, dtype=np.float32)}, str(work / "m.safetensors"))
    with pytest.raises(SystemExit):
        main(["decrypt-model", "--help"])
    assert "GPUCRYPT_DEVICE does not apply" in " ".join(capsys.readouterr().out.split())
    assert run(capsys, "encrypt-model", "--key-file", "key", "m.safetensors", "m.gc")[0] == 0
    monkeypatch.setenv("GPUCRYPT_DEVICE", "gpu")
    code, _, err = run(capsys, "decrypt-model", "--key-file", "key", "m.gc", "back.safetensors")
    assert code == 0, err
    assert "GPUCRYPT_DEVICE=gpu does not apply" in err and "CPU" in err, err
    monkeypatch.setenv("GPUCRYPT_DEVICE", "cpu")
    code, _, err = run(capsys, "decrypt-model", "--key-file", "key", "m.gc", "again.safetensors")
    assert code == 0 and err == "", err


# --------------------------------------------------------------------------- progress
@pytest.mark.parametrize("command", ["encrypt", "decrypt"])
def test_progress_draws_its_last_line_once(work, capsys, command):
    """--progress printed its "100.0%" line twice, at two different speeds: once when the
    input ended, once more when the bar finished; and decrypt's said "10.0 KiB / 9.9 KiB"
    (the header, read before the key and again after, was counted twice)."""
    assert run(capsys, "encrypt", "--key-file", "key", "plain", "sealed")[0] == 0
    src = "plain" if command == "encrypt" else "sealed"
    code, _, err = run(capsys, command, "--progress", "--key-file", "key", src, "out")
    assert code == 0, err
    assert err.count("100.0%") == 1, repr(err)
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    done, total = err.rsplit("100.0%", 1)[1].split(" / ", 1)  # "9.8 KiB / 9.8 KiB  2 MiB/s"
    assert done.strip() == " ".join(total.split()[:2]), repr(err)


def test_progress_of_an_input_of_unknown_size_ends_in_one_line(capsys):
    """A pipe's bar (no size, no percentage) drew its last figure three times: at the read
    that returned it, at the empty read that ended the input, and when it finished."""
    from gpucrypt.cli.files import _Progress

    bar = _Progress(io.BytesIO(bytes(10_000)), None, "encrypt")
    while bar.read(1 << 16):
        pass
    bar.finish()
    err = capsys.readouterr().err
    assert err.count("encrypt 9.8 KiB") == 1 and err.endswith("\n"), repr(err)


# ------------------------------------------------------------------ writes failing part-way
def _encrypted_model(work: Path, nbytes: int = 4096) -> Path:
    """``m.gcm``: a model file of one float32 tensor of ``nbytes`` bytes, under ``key``."""
    np = pytest.importorskip("numpy")
    pytest.importorskip("safetensors")
    from gpucrypt import models

    models.save_encrypted({"w": np.arange(nbytes // 4, dtype=np.float32)}, work / "m.gcm",
                          (work / "key").read_bytes())
    return work / "m.gcm"


@pytest.mark.skipif(not ON_LINUX, reason="FIFOs, and O_TMPFILE (Linux)")
@pytest.mark.parametrize("mode", ["unnamed", "named"])
def test_decrypt_model_to_a_fifo_leaves_no_plaintext_in_tmpdir_when_killed(work, mode):
    """decrypt-model to a FIFO makes the whole safetensors file before sending it (it is
    not written in order). It was a named file in a folder of $TMPDIR: SIGKILL while the
    FIFO's reader had not read left the decrypted model there. It is an unnamed file now
    (``O_TMPFILE``); where that is missing (``named``), its name is removed once it is
    whole, before the copy that waits on the reader."""
    _encrypted_model(work, 1 << 20)  # more than a pipe holds: the copy waits on the reader
    (work / "tmp").mkdir()
    os.mkfifo(work / "pipe")
    reader = os.open(work / "pipe", os.O_RDONLY | os.O_NONBLOCK)  # the writer's open returns
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, mode, "decrypt-model", "--key-file",
                             "key", "m.gcm", "pipe"], cwd=work, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=dict(os.environ, TMPDIR=str(work / "tmp")))
    try:
        poller = select.poll()
        poller.register(reader, select.POLLIN)
        deadline = time.monotonic() + 180
        while not any(events & select.POLLIN for _, events in poller.poll(100)):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"decrypt-model never sent the model ({proc.returncode}): "
                            f"{proc.stderr.read().decode()}")
        proc.kill()  # the copy began: the staged file is whole, and the reader has not read
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
        os.close(reader)
    assert os.listdir(work / "tmp") == []


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_decrypt_model_names_the_temporary_directory_when_staging_fails(work, capsys,
                                                                         monkeypatch):
    """To a character device or a FIFO, the model is made whole in the temporary
    directory first: a full $TMPDIR said "cannot write /dev/null: No space left on
    device", which sent the user to the side that cannot fail. It names that directory,
    and what it needs."""
    import errno
    import tempfile

    _encrypted_model(work, 64 << 10)
    (work / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work / "tmp"))
    real, calls = os.pwrite, []

    def fills_up(fd, data, offset):  # the staged file's writes: the workers' pwrite
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", fills_up)
    code, _, err = run(capsys, "decrypt-model", "--key-file", "key", "m.gcm", "/dev/null")
    _one_line(code, err, 1)
    assert f"cannot stage the decrypted model in {work / 'tmp'}: No space left on device" in err
    assert "TMPDIR" in err and "/dev/null" not in err and len(calls) > 1
    assert os.listdir(work / "tmp") == []


@pytest.mark.parametrize("code", ["ENOSPC", "EFBIG"])
def test_a_read_of_in_that_fails_like_a_write_names_in(work, capsys, monkeypatch, code):
    """Naming a failed write's destination first went by errno: a read of IN failing
    with ENOSPC or EFBIG (a FUSE source, a read-through cache on a full disk) said
    "cannot write OUT", OUT's disk being fine (a second review). Told by where it was
    raised now: IN's error names IN."""
    import errno

    (work / "big").write_bytes(os.urandom(3 << 20))
    assert main(["encrypt", "--key-file", "key", "big", "big.gc"]) == 0
    real, number = os.preadv, getattr(errno, code)

    def fails_past_1mib(fd, buffers, offset, *args):
        if offset >= 1 << 20:
            raise OSError(number, os.strerror(number))
        return real(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "preadv", fails_past_1mib)
    capsys.readouterr()
    code_, _, err = run(capsys, "decrypt", "--key-file", "key", "big.gc", "out")
    _one_line(code_, err, 1)
    assert f"cannot read big.gc: {os.strerror(number)}" in err and "cannot write" not in err
    assert not (work / "out").exists()
    # an error that names IN (a stat, a re-open) was judged by its errno: "cannot write IN"
    from types import SimpleNamespace

    from gpucrypt.cli._common import _io_error

    named = OSError(number, os.strerror(number), "big.gc")
    assert _io_error(SimpleNamespace(input="big.gc", output="out"), named) == \
        f"cannot read big.gc: {os.strerror(number)}"


@pytest.mark.parametrize("what", ["folder", "named file"])
def test_a_second_ctrl_c_cannot_stop_the_clean_up(tmp_path, monkeypatch, what):
    """Ctrl-C pressed again while the first one's clean-up ran (it seemed slow: unlinking
    large shards takes a while) cut rmtree short, and the checkpoint's temporary folder
    stayed, decrypted shards in it, with no message; a named temporary file could stay
    the same way. The clean-up runs to its end now, and that Ctrl-C is raised after it."""
    from gpucrypt.files import _atomic

    monkeypatch.setattr(_atomic, "_TMPFILE", 0)  # a named temporary file
    # Python's own handler, as in a terminal (a shell's background job starts ignoring it)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    real_unlink, pressed = os.unlink, []

    def unlink(*args, **kwargs):
        if not pressed:  # Ctrl-C again, as the first one's clean-up starts removing
            pressed.append(True)
            signal.raise_signal(signal.SIGINT)
        return real_unlink(*args, **kwargs)

    try:
        with pytest.raises(KeyboardInterrupt):
            if what == "folder":
                with _atomic.TemporaryFolder(tmp_path / "out") as temp:
                    for i in range(20):
                        (Path(temp) / f"model-{i:05d}.safetensors").write_bytes(b"plaintext")
                    monkeypatch.setattr(os, "unlink", unlink)
                    raise KeyboardInterrupt  # the first Ctrl-C
            else:
                with _atomic.AtomicFile(tmp_path / "out") as f:
                    f.write(b"plaintext")
                    monkeypatch.setattr(os, "unlink", unlink)
                    raise KeyboardInterrupt
    finally:
        signal.signal(signal.SIGINT, previous)
    assert pressed and os.listdir(tmp_path) == []
    assert not _atomic._LIVE  # nothing left for a signal handler to remove


def _limited(work: Path, limit: int, *argv: str) -> subprocess.CompletedProcess:
    """``gpucrypt ARGV`` in a child whose files cannot grow past ``limit`` bytes
    (RLIMIT_FSIZE; Python ignores SIGXFSZ): a write past it fails part-way with EFBIG, as
    a full disk's fails with ENOSPC."""
    import resource

    def limit_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-c", LAUNCHER, "unnamed", *argv], cwd=work,
                          capture_output=True, text=True, timeout=120, preexec_fn=limit_files)


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE (POSIX)")
@pytest.mark.parametrize("command", ["keygen", "keygen --public", "keys add", "rekey",
                                     "rekey --reencrypt"])
def test_key_commands_name_the_file_a_failed_write_was_for(work, capsys, command):
    """A write that failed part-way (a full disk, a file-size limit) named no file, and
    ``rekey``, ``keys`` and ``keygen`` printed ": File too large": the library names the
    file now, and the message says it could not be written."""
    for args in (["keygen", "-o", "ks.json"], ["keygen", "--public", "-o", "alice"]):
        assert run(capsys, *args)[0] == 0
    assert run(capsys, "encrypt", "--keyset", "ks.json", "plain", "s.gc")[0] == 0
    before = {name: (work / name).read_bytes() for name in ("ks.json", "s.gc")}
    argv, written = {
        "keygen": (["keygen", "-o", "new.json"], "new.json"),
        "keygen --public": (["keygen", "--public", "-o", "new"], "new"),
        "keys add": (["keys", "add", "ks.json"], "ks.json"),
        "rekey": (["rekey", "--keyset", "ks.json", "-r", "alice.pub", "s.gc"], "s.gc"),
        "rekey --reencrypt": (["rekey", "--keyset", "ks.json", "-r", "alice.pub",
                               "--reencrypt", "s.gc"], "s.gc"),
    }[command]
    limit = 100 if command.startswith("keygen") else os.path.getsize(work / written)
    done = _limited(work, limit, *argv)
    _one_line(done.returncode, done.stderr, 1)
    assert re.search(rf"cannot write \S*{re.escape(written)}\S*: File too large", done.stderr), \
        done.stderr
    assert {name: (work / name).read_bytes() for name in before} == before
    assert not any(name.startswith("new") or "gpucrypt-tmp" in name for name in os.listdir(work))


@pytest.mark.parametrize("command", ["encrypt-model", "decrypt-model"])
def test_checkpoint_folder_errors_name_out_not_the_temporary_folder(work, capsys, checkpoint,
                                                                     monkeypatch, command):
    """docs/FORMAT.md: errors name OUT, never a temporary file. A checkpoint folder's did
    not: a read-only folder named the temporary folder that could not be made, and a
    failure inside it (its folder removed part-way, a full disk) the temporary folder's
    file, gone by then. They name OUT, the file's own name said after the reason."""
    import errno
    import shutil

    from gpucrypt.files import checkpoints

    src = checkpoint
    if command == "decrypt-model":
        assert run(capsys, "encrypt-model", "--key-file", "key", checkpoint, "enc")[0] == 0
        src = work / "enc"
    out = work / "out"
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):  # as mkdir(2) says it on a read-only folder
        if str(path).endswith(".gpucrypt-tmp"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_mkdir(path, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(os, "mkdir", read_only)
        code, _, err = run(capsys, command, "--key-file", "key", src, out)
    _one_line(code, err, 1)
    assert f"cannot write {out}: Read-only file system" in err and "gpucrypt-tmp" not in err

    real_copy = checkpoints._copy_others

    def folder_removed(layout, temp, files=None):  # OUT's folder removed part-way
        shutil.rmtree(temp)
        return real_copy(layout, temp, files)

    with monkeypatch.context() as patched:
        patched.setattr(checkpoints, "_copy_others", folder_removed)
        code, _, err = run(capsys, command, "--key-file", "key", src, out)
    _one_line(code, err, 1)
    assert re.search(rf"cannot write {re.escape(str(out))}: No such file or directory \(writing "
                     rf"\S+ in it\)", err) and "gpucrypt-tmp" not in err, err

    def full(fd, data, offset):  # a shard's workers' writes
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patched:
        patched.setattr(os, "pwrite", full)
        code, _, err = run(capsys, command, "--key-file", "key", src, out)
    _one_line(code, err, 1)
    assert re.search(rf"cannot write {re.escape(str(out))}: No space left on device \(writing "
                     rf"model-0000\d-of-00002.safetensors in it\)", err), err
    assert not out.exists() and not any("gpucrypt-tmp" in n for n in os.listdir(work))


@pytest.mark.parametrize("command, src", [
    ("encrypt", "plain"), ("decrypt", "sealed"), ("encrypt-model", "m.safetensors"),
    ("encrypt-model", "ckpt"), ("decrypt-model", "m.gcm"), ("decrypt-model", "enc")])
def test_a_missing_out_folder_is_exit_1_for_every_command(work, capsys, checkpoint, command, src):
    """docs/FORMAT.md: exit 1 for an I/O error, OUT's folder missing among them; the model
    commands said 2 for a checkpoint folder and for encrypt-model's file (decrypt-model
    answered 1 or 2 for the same missing folder, as IN was a file or a folder)."""
    np = pytest.importorskip("numpy")
    from safetensors.numpy import save_file

    assert run(capsys, "encrypt", "--key-file", "key", "plain", "sealed")[0] == 0
    save_file({"w": np.arange(4, dtype=np.float32)}, str(work / "m.safetensors"))
    assert run(capsys, "encrypt-model", "--key-file", "key", "m.safetensors", "m.gcm")[0] == 0
    assert run(capsys, "encrypt-model", "--key-file", "key", checkpoint, "enc")[0] == 0
    code, _, err = run(capsys, command, "--key-file", "key", src, "nodir/out")
    _one_line(code, err, 1)
    assert "cannot write nodir/out" in err and not (work / "nodir").exists()


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_FSIZE (POSIX)")
def test_when_out_and_the_audit_log_both_fail_both_are_said(work):
    """OUT and --audit-log on one full file system: only the log's failure was said, so
    the user knew the encryption failed but not why, nor on which file, and was asked to
    note that failure in the log by hand. The command's own error comes first now; and a
    short write of the event gives its real reason (a file-size limit here, EFBIG), where
    it said "(the file system is full?)"."""
    limit = 4096
    (work / "audit.log").write_text(json.dumps({"pad": "x" * (limit - 120)}) + "\n")
    (work / "audit.log").chmod(0o600)
    (work / "out").write_bytes(b"OLD")
    done = _limited(work, limit, "encrypt", "-f", "--key-file", "key", "--audit-log",
                    "audit.log", "plain", "out")
    _one_line(done.returncode, done.stderr, 1)
    err = done.stderr
    assert err.startswith("gpucrypt encrypt: cannot write out: File too large; and cannot "
                          "write the audit log "), err
    assert re.search(r"only \d+ of the event's \d+ bytes could be written: File too large\. "
                     r"The event missing from it: 'file.encrypt' \(it failed", err), err
    assert "full?" not in err
    assert (work / "out").read_bytes() == b"OLD"
    assert (work / "audit.log").read_text().endswith("}\n")  # the half line taken back
