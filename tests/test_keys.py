"""Keysets and key files (lifecycle, sealing, permissions, atomic writes, no secret in a
repr), files encrypted for recipients on top of gpucrypt.stream, rekeying, the CLI, and
the README scenario from docs/KEYS.md."""
from __future__ import annotations

import base64
import errno
import io
import json
import logging
import os
import re
import stat
import threading
import time
from pathlib import Path

import pytest

from gpucrypt import audit, keys, stream
from gpucrypt.cli import main
from gpucrypt.keys import (FileKeyProvider, Identity, Keyset, KeysetError, KeyNotFound,
                           KeyUnavailable, NoMatchingRecipient, Recipient)

FAST_N = 2**10  # scrypt work factor for tests; the default (2**17) is exercised by the CLI test
DOCS = Path(__file__).resolve().parents[1] / "docs" / "KEYS.md"


@pytest.fixture
def fast_scrypt(monkeypatch):
    """Lets the test write scrypt work factor FAST_N, below what writers accept otherwise."""
    monkeypatch.setattr(keys.passphrase, "MIN_LOG_N", FAST_N.bit_length() - 1)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _materials(ks: Keyset) -> list[bytes]:
    return [k.secret_bytes() for k in ks if k.usable]


# ---------------------------------------------------------------- keyset lifecycle


def test_generate_add_promote_disable_destroy():
    ks = Keyset.generate()
    first = ks.primary
    assert first.status == "primary" and first.algorithm == "aes-256-kwp"
    assert len(first.secret_bytes()) == 32 and re.fullmatch(r"[0-9a-f]{16}", first.id)
    second = ks.add()
    assert second.status == "enabled" and ks.primary is first
    ks.promote(second.id)
    assert ks.primary is second and first.status == "enabled"
    assert ks.get(first.id) is first
    ks.disable(first.id)
    with pytest.raises(KeyUnavailable, match=f"key {first.id} is disabled"):
        ks.get(first.id)
    with pytest.raises(KeyUnavailable, match="disabled"):
        ks.get_key(first.id)
    ks.enable(first.id)
    assert ks.get(first.id).secret_bytes()
    ks.destroy(first.id)
    with pytest.raises(KeyUnavailable, match=f"key {first.id} was destroyed"):
        ks.get(first.id)
    with pytest.raises(KeyUnavailable, match="destroyed"):
        ks.promote(first.id)
    with pytest.raises(KeyNotFound, match="no key 'nope'"):
        ks.get("nope")
    assert [k.id for k in ks] == [first.id, second.id]


def test_primary_cannot_be_disabled_or_destroyed():
    ks = Keyset.generate()
    for action in (ks.disable, ks.destroy):
        with pytest.raises(KeyUnavailable, match="promote another key first"):
            action(ks.primary.id)


def test_repr_never_shows_material():
    ks = Keyset.generate()
    ks.add()
    identity = Identity.generate()
    texts = [repr(ks), str(ks), repr(ks.primary), str(ks.primary), repr(identity), str(identity),
             repr(identity.recipient), repr(list(ks))]
    secrets = _materials(ks) + [identity._private_bytes]
    for secret in secrets:
        for form in (secret.hex(), base64.b64encode(secret).decode(), repr(secret)):
            assert not any(form in text for text in texts)
    assert ks.primary.id in repr(ks)


# ---------------------------------------------------------------- files


def test_save_load_plain_0600(tmp_path):
    ks = Keyset.generate()
    ks.add()
    path = tmp_path / "ks.json"
    ks.save(path)
    assert _mode(path) == 0o600
    back = Keyset.load(path)
    assert [k.metadata() for k in back] == [k.metadata() for k in ks]
    assert _materials(back) == _materials(ks)
    assert os.listdir(tmp_path) == ["ks.json"]  # no temporary file left behind
    doc = json.loads(path.read_text())
    assert doc["format"] == "gpucrypt-keyset" and doc["version"] == 1


def test_an_empty_keyset_is_not_saved(tmp_path):
    with pytest.raises(KeysetError, match="has no keys"):
        Keyset().save(tmp_path / "ks.json", unsealed=True)
    assert not (tmp_path / "ks.json").exists()


def test_save_replaces_atomically_and_keeps_0600(tmp_path):
    path = tmp_path / "ks.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    Keyset.generate().save(path, overwrite=True)
    assert _mode(path) == 0o600
    assert Keyset.load(path).primary


def test_a_new_key_file_never_replaces_another(tmp_path, fast_scrypt):
    """Keyset.generate().save(path) run twice (a README example run again) replaced the first
    keyset, and whatever was encrypted to it could no longer be read. A keyset or identity
    saves over the file it was read from or last saved to, or with overwrite=True."""
    from gpucrypt import keys

    path, who = tmp_path / "ks.json", tmp_path / "alice"
    first = Keyset.generate()
    first.save(path)
    identity = Identity.generate()
    identity.save(who)
    before, before_identity = path.read_bytes(), who.read_bytes()
    with pytest.raises(KeysetError, match="ks.json exists, and this keyset was not read from it"):
        Keyset.generate().save(path)
    with pytest.raises(KeysetError, match="alice exists, and this identity was not read"):
        Identity.generate().save(who)
    with pytest.raises(KeysetError, match="alice exists: a recipient file is written to a new"):
        identity.recipient.save(who)  # the private file mistaken for the .pub one
    assert path.read_bytes() == before and who.read_bytes() == before_identity
    first.add(primary=True)
    first.save(path)  # its own file: saved over
    loaded = Keyset.load(path)
    loaded.add()
    loaded.save(path)
    assert len(Keyset.load(path)) == 3
    identity.save(who, "a passphrase", scrypt_n=FAST_N)  # sealed in place, its own file
    Identity.load(who, "a passphrase").save(who, unsealed=True)  # and back, on purpose
    assert keys.Identity.load(who).fingerprint == identity.fingerprint
    Keyset.generate().save(path, overwrite=True)
    assert Keyset.load(path).primary.id != first.primary.id

    # a file it was read from that another identity has replaced since is not its own any more
    old = Identity.load(who)
    Identity.generate().save(who, overwrite=True)  # `keygen --public --force`, elsewhere
    replaced = who.read_bytes()
    with pytest.raises(KeysetError, match="changed since this identity was read from it"):
        old.save(who)
    assert who.read_bytes() == replaced


def test_destroyed_key_material_leaves_the_file(tmp_path):
    ks = Keyset.generate()
    doomed = ks.add()
    material = doomed.secret_bytes()
    ks.destroy(doomed.id)
    ks.save(tmp_path / "ks.json")
    text = (tmp_path / "ks.json").read_text()
    assert doomed.id in text and base64.b64encode(material).decode() not in text
    back = Keyset.load(tmp_path / "ks.json")
    with pytest.raises(KeyUnavailable, match="destroyed"):
        back.get(doomed.id)


def test_passphrase_sealing(fast_scrypt, tmp_path):
    ks = Keyset.generate()
    ks.add()
    path = tmp_path / "ks.json"
    ks.save(path, "correct horse", scrypt_n=FAST_N)
    text = path.read_text()
    assert _mode(path) == 0o600
    for secret in _materials(ks):
        assert base64.b64encode(secret).decode() not in text and secret.hex() not in text
    doc = json.loads(text)
    assert doc["protection"]["kdf"] == "scrypt" and doc["protection"]["n"] == FAST_N
    assert Keyset.inspect(path)["keys"][0]["id"] == ks.primary.id  # listable without passphrase
    back = Keyset.load(path, "correct horse")
    assert _materials(back) == _materials(ks)
    with pytest.raises(KeysetError, match="wrong passphrase"):
        Keyset.load(path, "wrong horse")
    with pytest.raises(KeysetError, match="sealed with a passphrase"):
        Keyset.load(path)
    # a loaded sealed keyset stays sealed when saved again
    back.add()
    back.save(path)
    assert "sealed" in json.loads(path.read_text())
    assert len(Keyset.load(path, "correct horse")) == 3


def test_sealed_metadata_is_authenticated(fast_scrypt, tmp_path):
    ks = Keyset.generate()
    old = ks.primary.id
    ks.add(primary=True)
    ks.disable(old)
    path = tmp_path / "ks.json"
    ks.save(path, "pw", scrypt_n=FAST_N)
    doc = json.loads(path.read_text())
    doc["keys"][0]["status"] = "enabled"  # try to re-enable a key without the passphrase
    path.write_text(json.dumps(doc))
    with pytest.raises(KeysetError, match="altered"):
        Keyset.load(path, "pw")


class _ScryptReached(Exception):
    pass


@pytest.mark.parametrize("n, r, p, accepted", [
    (2**30, 8, 1, False),    # 128 GiB
    (2**22, 32, 16, False),  # 16 GiB, and 16 passes
    (2**21, 8, 1, False),    # 2 GiB
    (2**20, 16, 1, False),   # 2 GiB
    (2**17, 8, 64, False),   # 128 MiB, but 64 passes: 64 times the default's work
    (2**22, 1, 2, False),    # 512 MiB, but r and p are not what gpucrypt writes
    (2, 2**22, 1, False),    # N * r * p = 2**23, but 128 * r * p is 512 MiB more (B)
    (2, 1, 2**22, False),    # the same through p
    (3 * 2**10, 8, 1, False),  # not a power of 2: no gpucrypt wrote it
    (2**20, 8, True, False),   # true is not 1 in a work factor
    (2**20, 8, 1, True),     # 1 GiB: the most a passphrase-encrypted file may ask
    (2**17, 8, 1, True),     # the default
    (2**10, 8, 1, True),     # weaker than writers take now: read, saved again stronger
])
def test_scrypt_parameters_bounded(fast_scrypt, tmp_path, monkeypatch, n, r, p, accepted):
    """A sealed file asking scrypt for anything but what gpucrypt writes (r = 8, p = 1,
    N a power of 2 up to 2**20) is refused before scrypt runs: its memory is
    128 * r * (N + p) bytes, so bounds on N and N * r * p alone let r or p ask gigabytes."""
    from gpucrypt.keys import _document

    path = tmp_path / "ks.json"
    Keyset.generate().save(path, "pw", scrypt_n=FAST_N)
    doc = json.loads(path.read_text())
    doc["protection"].update(n=n, r=r, p=p)
    path.write_text(json.dumps(doc))

    def scrypt(*args, **kwargs):
        raise _ScryptReached  # accepted: stop before any real work

    monkeypatch.setattr(_document, "Scrypt", scrypt)
    with pytest.raises(_ScryptReached if accepted else KeysetError,
                       match=None if accepted else "scrypt parameters are outside what "
                                                   "gpucrypt writes .*r = 8, p = 1"):
        Keyset.load(path, "pw")


@pytest.mark.parametrize("salt_size", [0, 3, 15, 17, 64])
def test_a_key_file_salt_of_another_length_is_refused_before_scrypt(fast_scrypt, tmp_path,
                                                                   monkeypatch, salt_size):
    """Every save writes a 16-byte salt; a key file's was read at any length (3 bytes reached
    scrypt), so a crafted file could choose a salt spelling another construction's input."""
    import base64

    from gpucrypt.keys import _document

    path = tmp_path / "ks.json"
    Keyset.generate().save(path, "pw", scrypt_n=FAST_N)
    doc = json.loads(path.read_text())
    doc["protection"]["salt"] = base64.b64encode(os.urandom(salt_size)).decode()
    path.write_text(json.dumps(doc))

    def scrypt(*args, **kwargs):
        raise _ScryptReached

    monkeypatch.setattr(_document, "Scrypt", scrypt)
    with pytest.raises(KeysetError, match=f"scrypt salt is {salt_size} bytes, not 16"):
        Keyset.load(path, "pw")


def test_writers_refuse_weak_or_unreadable_scrypt_work_factors(tmp_path):
    ks, identity = Keyset.generate(), Identity.generate()
    for n in (2, 2**14, 2**21, 3 * 2**15):
        with pytest.raises(ValueError, match="outside what gpucrypt writes|power of 2"):
            ks.save(tmp_path / "ks.json", "pw", scrypt_n=n)
        with pytest.raises(ValueError, match="outside what gpucrypt writes|power of 2"):
            identity.save(tmp_path / "id.json", "pw", scrypt_n=n)
    for log_n in (1, 14, 21):
        with pytest.raises(ValueError, match=f"2\\*\\*{log_n} is outside what gpucrypt writes"):
            keys.Passphrase("pw", log_n=log_n)
    assert not list(tmp_path.iterdir())


def test_a_weak_work_factor_read_from_a_file_is_not_kept(tmp_path, monkeypatch):
    from gpucrypt.keys import keyset as keyset_module

    floor, path = keys.passphrase.MIN_LOG_N, tmp_path / "ks.json"
    monkeypatch.setattr(keys.passphrase, "MIN_LOG_N", 10)
    Keyset.generate().save(path, "pw", scrypt_n=FAST_N)  # an old or a crafted file
    monkeypatch.setattr(keys.passphrase, "MIN_LOG_N", floor)
    monkeypatch.setattr(keyset_module, "DEFAULT_SCRYPT_N", 2**floor)  # the default, made cheap
    ks = Keyset.load(path, "pw")
    ks.add()
    ks.save(path)
    assert json.loads(path.read_text())["protection"]["n"] == 2**floor
    assert len(Keyset.load(path, "pw")) == 2


def test_a_passphrase_or_kek_refuses_a_file_that_is_not_sealed(fast_scrypt, tmp_path, monkeypatch):
    """Someone who can write the key file swaps in their own, unsealed: whoever loads it
    with a passphrase (or a KEK) is told, instead of wrapping new data keys for them."""
    from gpucrypt.keys.portable import KeyReferences

    attacker = Keyset.generate()
    attacker.save(tmp_path / "ks.json")
    Identity.generate().save(tmp_path / "id.json")
    (tmp_path / "pass").write_text("pw\n")
    monkeypatch.setenv("KS_PASSPHRASE", "pw")
    file_ref = f"file://{tmp_path / 'ks.json'}?passphrase-source=file:{tmp_path / 'pass'}"
    attempts = [
        (lambda: Keyset.load(tmp_path / "ks.json", "pw"), "passphrase"),
        (lambda: Keyset.load(tmp_path / "ks.json", kek=os.urandom(32)), "key-encryption key"),
        (lambda: Identity.load(tmp_path / "id.json", "pw"), "passphrase"),
        (lambda: FileKeyProvider(tmp_path / "ks.json", "pw").get_key(attacker.primary.id),
         "passphrase"),
        (lambda: keys.KeyReference(file_ref).resolve(), "passphrase"),
        (lambda: KeyReferences(keyset=tmp_path / "ks.json",
                               passphrase_env="KS_PASSPHRASE").resolve(), "passphrase"),
    ]
    for attempt, given in attempts:
        with pytest.raises(KeysetError, match=f"is not sealed, though a {given} was given: it "
                                              f"may have been replaced.*without one"):
            attempt()
    assert Keyset.load(tmp_path / "ks.json").primary.id == attacker.primary.id  # on purpose
    # identities only unwrap: an unsealed one beside a sealed keyset shares passphrase_env
    Keyset.generate().save(tmp_path / "sealed.json", passphrase="pw", scrypt_n=FAST_N)
    resolved = KeyReferences(keyset=tmp_path / "sealed.json", identities=[tmp_path / "id.json"],
                             passphrase_env="KS_PASSPHRASE").resolve()
    assert resolved.keyset is not None and len(resolved.identities) == 1


def test_a_passphrase_that_is_not_utf8_is_refused_without_quoting_it(fast_scrypt, tmp_path):
    """A str with lone surrogates (os.environ's form of undecodable bytes) has no UTF-8:
    a KeysetError that quotes nothing of it, not the codec's UnicodeEncodeError (which
    shows a character and its position) nor, opening a sealed file, "malformed protection
    block". Passphrases that are UTF-8, and bytes, derive as before."""
    bad = b"abc\xffdef".decode("utf-8", "surrogateescape")
    Keyset.generate().save(tmp_path / "ks.json", "pässword", scrypt_n=FAST_N)
    Identity.generate().save(tmp_path / "id.json", b"abc\xffdef", scrypt_n=FAST_N)
    attempts = [lambda: Keyset.load(tmp_path / "ks.json", bad),
                lambda: Identity.load(tmp_path / "id.json", bad),
                lambda: Keyset.generate().save(tmp_path / "new.json", bad, scrypt_n=FAST_N),
                lambda: keys.Passphrase(bad, log_n=10)]
    for attempt in attempts:
        with pytest.raises(KeysetError) as info:
            attempt()
        message = str(info.value)
        assert "the passphrase is not valid UTF-8" in message, message
        assert "position" not in message and "udcff" not in message and "\udcff" not in message
    assert not (tmp_path / "new.json").exists()
    assert len(Keyset.load(tmp_path / "ks.json", "pässword")) == 1
    assert len(Keyset.load(tmp_path / "ks.json", "pässword".encode())) == 1  # the same bytes
    assert Identity.load(tmp_path / "id.json", b"abc\xffdef").fingerprint


def test_an_empty_passphrase_or_a_kek_of_another_length_is_said_as_such(fast_scrypt,
                                                                       tmp_path):
    """Opening a sealed keyset or identity with an empty passphrase, or a KEK that is not
    32 bytes, said "malformed protection block" (the file blamed for the caller's secret),
    and a 16-byte KEK "wrong passphrase or key-encryption key"."""
    kek = os.urandom(32)
    Keyset.generate().save(tmp_path / "ks.json", "pw", scrypt_n=FAST_N)
    Keyset.generate().save(tmp_path / "kek.json", kek=kek, kek_id="prod")
    Identity.generate().save(tmp_path / "id.json", "pw", scrypt_n=FAST_N)
    for empty in ("", b""):
        for load, name in ((Keyset.load, "ks.json"), (Identity.load, "id.json")):
            with pytest.raises(KeysetError, match=f"{name}: the passphrase given is empty"):
                load(tmp_path / name, empty)
    for bad in (kek[:31], kek[:16], kek + b"\n", kek.hex().encode()):
        with pytest.raises(KeysetError, match=f"kek.json: a key-encryption key is 32 bytes, "
                                              f"not {len(bad)}: give the raw key"):
            Keyset.load(tmp_path / "kek.json", kek=bad)
    assert Keyset.load(tmp_path / "kek.json", kek=kek).primary


def test_a_sealed_file_loaded_without_its_passphrase_says_how_to_give_it(fast_scrypt, tmp_path):
    """The hint named the command line's sources (--passphrase-file, GPUCRYPT_PASSPHRASE,
    the prompt), which a library load never reads; the command line asks before loading."""
    Keyset.generate().save(tmp_path / "ks.json", "pw", scrypt_n=FAST_N)
    Identity.generate().save(tmp_path / "id.json", "pw", scrypt_n=FAST_N)
    for load, name in ((Keyset.load, "ks.json"), (Identity.load, "id.json")):
        with pytest.raises(KeysetError) as info:
            load(tmp_path / name)
        message = str(info.value)
        assert "--passphrase-file" not in message and "GPUCRYPT_PASSPHRASE" not in message
        assert "prompt" not in message, message
        # "sealed with a passphrase" is what Recipient.load recognises
        assert f"{name} is sealed with a passphrase, and none was given: pass it " \
               f"(load(path, passphrase)" in message, message
    with pytest.raises(KeysetError, match="is a sealed identity: use its .pub"):
        Recipient.load(tmp_path / "id.json")


def test_key_files_that_cannot_be_read_are_keyset_errors(tmp_path):
    """A folder or an unreadable file given as a key file: like a missing one, a KeysetError
    (UnreadableKeyFile, the command line's exit 2), not an OSError."""
    from gpucrypt.keys._document import UnreadableKeyFile

    for load in (Keyset.load, Identity.load, Recipient.load, Keyset.inspect):
        for name in ("missing.json", "."):
            with pytest.raises(UnreadableKeyFile):
                load(tmp_path / name)


def test_save_writes_a_keyset_whose_file_is_gone(tmp_path):
    """The file a keyset was loaded from deleted or moved away: the keyset in memory may
    be the only copy of its keys, so saving it there again writes it (nothing to undo)."""
    path = tmp_path / "ks.json"
    Keyset.generate().save(path)
    ks = Keyset.load(path)
    path.rename(tmp_path / "moved.json")
    ks.save(path)
    assert Keyset.load(path).primary.id == ks.primary.id


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_loading_reads_a_key_file_once(tmp_path):
    """A FIFO (``<(cat alice.key)``) gives its bytes once: Recipient.load of an identity
    file read it once to see what it is and again to load it."""
    identity = Identity.generate()
    identity.save(tmp_path / "alice")
    ks = Keyset.generate()
    ks.save(tmp_path / "ks.json")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def load_through_fifo(load, source: str):
        done = threading.Event()

        def feed():
            with open(fifo, "wb") as f:
                f.write((tmp_path / source).read_bytes())
            while not done.wait(0.01):  # a second reader: end of file, not a hang
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        try:
            return load(fifo)
        finally:
            done.set()
            feeder.join(timeout=10)

    assert load_through_fifo(Recipient.load, "alice") == identity.recipient
    assert load_through_fifo(Identity.load, "alice").fingerprint == identity.fingerprint
    assert load_through_fifo(Keyset.load, "ks.json").primary.id == ks.primary.id


def test_save_refuses_a_file_changed_since_it_was_loaded(tmp_path):
    """Two edits of one keyset at once (two `gpucrypt keys` runs, a service holding a loaded
    keyset): the later save is refused instead of dropping the other's change."""
    path = tmp_path / "ks.json"
    ks = Keyset.generate()
    old = ks.add()
    ks.save(path)
    a, b = Keyset.load(path), Keyset.load(path)
    new = a.add(primary=True)
    a.save(path)                                   # a rotates
    b.disable(old.id)
    rotated = path.read_bytes()
    with pytest.raises(KeysetError, match="changed since this keyset was read from it.*Save it "
                                          "to a new path first"):
        b.save(path)                               # b finishes last: refused, nothing written
    assert path.read_bytes() == rotated
    b = Keyset.load(path)
    b.disable(old.id)
    b.save(path)
    b.save(path)                                   # its own saves keep it current
    after = Keyset.load(path)
    assert after.primary.id == new.id
    assert [k.status for k in after if k.id == old.id] == ["disabled"]
    with pytest.raises(KeysetError, match="changed since"):
        a.save(path)                               # a is stale now


def test_a_refused_save_says_to_keep_the_keyset_its_files_are_wrapped_under(tmp_path):
    """Rotation wraps files under a new primary before the keyset is saved; when that save
    is then refused (someone else saved the file meanwhile), the advice was "load it again,
    then redo the change": a different key, and every file already rekeyed unreadable. The
    refusal says to keep this keyset and save it elsewhere first, naming the keys in no file."""
    path, data = tmp_path / "ks.json", tmp_path / "data"
    data.write_bytes(os.urandom(5000))
    Keyset.generate().save(path)
    keys.encrypt_file(data, tmp_path / "data.gc", keyset=Keyset.load(path))
    rotating = Keyset.load(path)
    other = Keyset.load(path)
    other.add()
    other.save(path)                               # another admin adds a spare key meanwhile
    new = rotating.add(primary=True)
    keys.rekey_file(tmp_path / "data.gc", keyset=rotating)   # wrapped under `new` only now
    saved_by_other = path.read_bytes()
    with pytest.raises(KeysetError) as refused:
        rotating.save(path)
    message = str(refused.value)
    assert "redo the change" not in message and "load it again" not in message, message
    assert re.search(f"files are already wrapped under; its keys {new.id} are in no file yet. "
                     f"Save it to a new path first, then merge", message), message
    assert "overwrite=True" in message and path.read_bytes() == saved_by_other
    rotating.save(tmp_path / "rotating.json")      # the advice, followed: the files still open
    keys.decrypt_file(tmp_path / "data.gc", tmp_path / "out",
                      keyset=Keyset.load(tmp_path / "rotating.json"))
    assert (tmp_path / "out").read_bytes() == data.read_bytes()
    rotating.save(path, overwrite=True)            # the other way out it offers: it works
    assert Keyset.load(path).primary.id == new.id


def test_unsaved_keys_names_the_keys_that_are_in_no_file_yet(tmp_path):
    """What a caller about to wrap files checks (``ks.primary.id in ks.unsaved_keys``): keys
    made in memory since the keyset was loaded or last saved, cleared by a save that
    succeeds (to any path) and by a load, and left as it was by a save that fails."""
    ks = Keyset.generate()
    assert ks.unsaved_keys == {ks.primary.id}
    ks.save(tmp_path / "ks.json")
    assert ks.unsaved_keys == frozenset()
    assert Keyset.load(tmp_path / "ks.json").unsaved_keys == frozenset()
    old = ks.primary.id
    new = ks.add(primary=True)
    spare = ks.add()
    assert ks.unsaved_keys == {new.id, spare.id} and ks.primary.id in ks.unsaved_keys
    ks.destroy(spare.id)                           # no material left to lose
    ks.disable(old)                                # a status change loses no key
    assert ks.unsaved_keys == {new.id}
    (tmp_path / "taken.json").write_text("{}")
    with pytest.raises(KeysetError, match="exists"):
        ks.save(tmp_path / "taken.json")
    assert ks.unsaved_keys == {new.id}             # the failed save wrote nothing
    ks.save(tmp_path / "backup.json")
    assert ks.unsaved_keys == frozenset()
    assert Keyset.load(tmp_path / "backup.json").primary.id == new.id
    with pytest.raises(AttributeError):
        ks.unsaved_keys = frozenset()              # read-only: only a save clears it
    assert "unsaved_keys" in (Keyset.__doc__ or "") and "unsaved_keys" in DOCS.read_text()


def test_a_failed_save_does_not_change_the_secret_the_keyset_is_saved_with(fast_scrypt,
                                                                           tmp_path):
    """save(other, passphrase B) refused (the file exists) remembered B all the same: the
    next plain save() sealed the keyset's own file with B, and with kek=K changed that
    file's protection to a KEK. The secret to keep is the one of the last save that wrote."""
    path, taken = tmp_path / "ks.json", tmp_path / "taken.json"
    Keyset.generate().save(path, "passphrase A", scrypt_n=FAST_N)
    taken.write_text("{}")
    ks = Keyset.load(path, "passphrase A")
    with pytest.raises(KeysetError, match="taken.json exists"):
        ks.save(taken, "passphrase B", scrypt_n=FAST_N)
    with pytest.raises(KeysetError, match="taken.json exists"):
        ks.save(taken, kek=os.urandom(32))
    ks.add()
    ks.save(path)
    assert Keyset.inspect(path)["protection"] == "passphrase"
    assert len(Keyset.load(path, "passphrase A")) == 2
    with pytest.raises(KeysetError, match="wrong passphrase"):
        Keyset.load(path, "passphrase B")
    # a save that wrote does change it, as documented (a keyset re-sealed on purpose)
    ks.save(path, "passphrase C", scrypt_n=FAST_N)
    ks.save(path)
    assert len(Keyset.load(path, "passphrase C")) == 2


def test_saving_back_after_a_backup_says_why_it_is_refused(tmp_path):
    """Load A, save a backup to B, save the change to A: refused, as A is no longer the file
    whose changes this keyset can check, but the message said "this keyset was not read
    from it", which is false. It says it was, then saved to B, and what to do."""
    a, b = tmp_path / "ks.json", tmp_path / "ks.backup.json"
    Keyset.generate().save(a)
    ks = Keyset.load(a)
    ks.save(b)
    ks.add(primary=True)
    before = a.read_bytes()
    with pytest.raises(KeysetError) as refused:
        ks.save(a)
    message = str(refused.value)
    assert "not read from it" not in message, message
    assert f"this keyset was read from it, then saved to {os.path.realpath(b)}" in message
    assert "overwrite=True if you are sure no one else has saved" in message
    assert a.read_bytes() == before
    ks.save(a, overwrite=True)                     # the user's informed choice
    assert Keyset.load(a).primary.id == ks.primary.id
    ks.add()
    with pytest.raises(KeysetError, match="was saved to it, then saved to .*ks.json"):
        ks.save(b)                                 # and the other way round
    Keyset.generate().save(tmp_path / "new.json")
    with pytest.raises(KeysetError, match="new.json exists, and this keyset was not read "
                                          "from it"):
        ks.save(tmp_path / "new.json")             # a file it never had: as before


@pytest.mark.skipif(os.name != "posix", reason="saves are locked with flock on POSIX only")
def test_overlapping_saves_of_one_file_refuse_the_second(tmp_path, monkeypatch):
    """The changed-since check and the write are one step: a save that starts while another
    save of the same version is still writing (a slow fsync) waits for it, then is refused.
    Both had passed the check and the later rename undid the other's change (here a
    destroyed key's material came back)."""
    from gpucrypt.keys import keyset as keyset_module

    path = tmp_path / "ks.json"
    ks = Keyset.generate()
    doomed = ks.add()
    ks.save(path)
    a, b = Keyset.load(path), Keyset.load(path)   # e.g. `keys add` and `keys destroy --yes`
    added = a.add()
    b.destroy(doomed.id)
    real, writing, failures = keyset_module.write_key_file, threading.Event(), []

    def slow_for_a(*args, **kwargs):
        if threading.current_thread().name == "saver-a":
            writing.set()
            time.sleep(0.5)  # after a's check, before its rename: b saves meanwhile
        return real(*args, **kwargs)

    def save_a():
        try:
            a.save(path)
        except BaseException as exc:  # reported below, not lost in the thread
            failures.append(exc)

    monkeypatch.setattr(keyset_module, "write_key_file", slow_for_a)
    saver = threading.Thread(target=save_a, name="saver-a")
    saver.start()
    try:
        assert writing.wait(10)
        with pytest.raises(KeysetError, match="changed since this keyset was read from it"):
            b.save(path)
    finally:
        saver.join(10)
    assert not failures and not saver.is_alive()
    after = Keyset.load(path)                      # the first save's change, whole
    assert added.id in [k.id for k in after]
    assert after._find(doomed.id).status == "enabled"
    assert after.get(doomed.id).secret_bytes() == ks.get(doomed.id).secret_bytes()
    assert sorted(os.listdir(tmp_path)) == ["ks.json"]  # no lock file left behind


def test_kek_sealing(tmp_path):
    kek = os.urandom(32)
    ks = Keyset.generate()
    path = tmp_path / "ks.json"
    ks.save(path, kek=kek, kek_id="hsm-7")
    doc = json.loads(path.read_text())
    assert doc["protection"] == {"method": "kek", "kek_id": "hsm-7", "aead": "aes-256-gcm",
                                 "nonce": doc["protection"]["nonce"]}
    assert _materials(Keyset.load(path, kek=kek)) == _materials(ks)
    with pytest.raises(KeysetError, match="wrong passphrase or key-encryption key"):
        Keyset.load(path, kek=os.urandom(32))
    with pytest.raises(KeysetError, match="hsm-7"):
        Keyset.load(path)


@pytest.mark.parametrize("content, message", [
    ("not json", "not JSON"),
    ("[" * 100_000 + "]" * 100_000, "not JSON"),  # deep enough for json's RecursionError
    ('{"format": "something-else"}', "not a gpucrypt-keyset file"),
    ('{"format": "gpucrypt-keyset", "version": 9, "keys": []}', "version 9 is not supported"),
    ('{"format": "gpucrypt-keyset", "version": 1, "keys": [{"id": "a"}]}', "malformed key entry"),
    # json.loads refuses an integer past 4300 digits with a plain ValueError (a traceback)
    ('{"format": "gpucrypt-keyset", "version": 1, "keys": [], "n": ' + "9" * 5000 + "}",
     "not JSON gpucrypt reads: a number in it is too long"),
])
def test_malformed_keyset_files(tmp_path, content, message):
    path = tmp_path / "ks.json"
    path.write_text(content)
    with pytest.raises(KeysetError, match=message):
        Keyset.load(path)


@pytest.mark.parametrize("fields, message", [
    ({"keys": ["oops"]}, "malformed key entry"),
    ({"keys": [], "protection": "x"}, "malformed protection block"),
    ({"keys": [], "protection": None}, "malformed protection block"),
])
def test_malformed_entries_and_protection_are_keyset_errors(tmp_path, capsys, fields, message):
    path = tmp_path / "ks.json"
    path.write_text(json.dumps({"format": "gpucrypt-keyset", "version": 1, **fields}))
    for read in (Keyset.inspect, Keyset.load):
        with pytest.raises(KeysetError, match=message):
            read(path)
    code, out, err = _cli(capsys, "keys", "list", path)
    assert code == 1 and err.count("\n") == 1 and message in err, err


def test_two_primaries_refused(tmp_path):
    ks = Keyset.generate()
    ks.add()
    ks.save(tmp_path / "ks.json")
    doc = json.loads((tmp_path / "ks.json").read_text())
    doc["keys"][1]["status"] = "primary"
    (tmp_path / "ks.json").write_text(json.dumps(doc))
    with pytest.raises(KeysetError, match="exactly one primary"):
        Keyset.load(tmp_path / "ks.json")


def test_a_keyset_without_a_primary_is_refused_before_it_is_written(tmp_path):
    """Keyset().add() has a key and no primary: save wrote the file, then raised KeyNotFound
    "this keyset is empty" (the audit said error, with the file written), and loading that
    file failed without naming it. Refused before writing now, saying what to do."""
    path = tmp_path / "ks.json"
    log = io.StringIO()
    handler = audit.enable(log)
    try:
        ks = Keyset()
        key = ks.add()
        with pytest.raises(KeysetError, match=f"has no primary key \\({key.id}\\).*promote"):
            ks.save(path)
        assert not path.exists()
        ks.promote(key.id)
        ks.save(path)
    finally:
        logging.getLogger(audit.LOGGER_NAME).removeHandler(handler)
    saves = [(e["outcome"], e.get("key_id")) for e in map(json.loads, log.getvalue().splitlines())
             if e["operation"] == "keyset.save"]
    assert saves == [("error", None), ("ok", key.id)]
    assert Keyset.load(path).primary.id == key.id


@pytest.mark.parametrize("edit, message", [
    (lambda keys_: keys_.clear(), "the keyset holds no keys"),
    (lambda keys_: keys_[0].update(status="enabled"), "exactly one primary key, this one has 0"),
    (lambda keys_: keys_.append(dict(keys_[0])), "duplicate key id"),
])
def test_a_keyset_file_with_no_primary_or_no_keys_is_a_keyset_error_naming_it(
        tmp_path, capsys, edit, message):
    """A file with "keys": [] raised KeyNotFound ("this keyset is empty"), not KeysetError,
    and one without a primary did not name the file."""
    path = tmp_path / "ks.json"
    Keyset.generate().save(path)
    doc = json.loads(path.read_text())
    edit(doc["keys"])
    path.write_text(json.dumps(doc))
    with pytest.raises(KeysetError, match=f"^{re.escape(str(path))}: .*{message}"):
        Keyset.load(path)
    code, out, err = _cli(capsys, "keys", "add", path)
    assert code == 1 and err.count("\n") == 1 and str(path) in err and message in err, err


@pytest.mark.parametrize("field, value, problem", [
    ("id", ["x"], "'id' is a list, not a string"),
    ("id", {"a": 1}, "'id' is an object, not a string"),
    ("id", 7, "'id' is a number, not a string"),
    ("status", None, "'status' is null, not a string"),
    ("created", None, None),  # deleted below: "no 'created'"
])
def test_a_key_entry_field_of_another_type_is_a_malformed_entry(tmp_path, capsys, field, value,
                                                                problem):
    """An unsealed keyset whose key id is not a string (a list: unhashable) failed with a
    TypeError, and `gpucrypt keys add` printed a traceback. A KeysetError naming the entry
    and the field now, and one line from the command line."""
    path = tmp_path / "ks.json"
    ks = Keyset.generate()
    ks.add()
    ks.save(path)
    doc = json.loads(path.read_text())
    if problem is None:
        del doc["keys"][1][field]
        problem = f"no {field!r}"
    else:
        doc["keys"][1][field] = value
    path.write_text(json.dumps(doc))
    expected = f"{path}: malformed key entry 2: {problem}"
    with pytest.raises(KeysetError) as info:
        Keyset.load(path)
    assert str(info.value).startswith(expected), info.value
    code, out, err = _cli(capsys, "keys", "add", path)
    assert code == 1 and err.count("\n") == 1 and expected in err, err


@pytest.mark.parametrize("kem", ["x25519", "mlkem768-x25519"])
def test_identity_and_recipient_files(fast_scrypt, tmp_path, kem):
    identity = Identity.generate(kem)
    identity.save(tmp_path / "id.json")
    identity.recipient.save(tmp_path / "id.json.pub")
    assert _mode(tmp_path / "id.json") == 0o600
    assert _mode(tmp_path / "id.json.pub") == 0o644
    assert "private" not in (tmp_path / "id.json.pub").read_text()
    back = Identity.load(tmp_path / "id.json")
    assert back.fingerprint == identity.fingerprint
    assert Recipient.load(tmp_path / "id.json.pub") == identity.recipient
    assert Recipient.load(tmp_path / "id.json") == identity.recipient  # public half of an identity
    identity.save(tmp_path / "sealed.json", "pw", scrypt_n=FAST_N)
    assert Identity.load(tmp_path / "sealed.json", "pw").fingerprint == identity.fingerprint
    with pytest.raises(KeysetError, match="wrong passphrase"):
        Identity.load(tmp_path / "sealed.json", "nope")


def test_recipient_file_with_wrong_fingerprint(tmp_path):
    identity = Identity.generate()
    doc = identity.recipient.to_json()
    doc["fingerprint"] = "x25519:" + "0" * 32
    (tmp_path / "r.pub").write_text(json.dumps(doc))
    with pytest.raises(KeysetError, match="fingerprint does not match"):
        Recipient.load(tmp_path / "r.pub")


@pytest.mark.parametrize("kem, problem", [
    (["x25519"], '"kem" is a list, not a string'),
    ({"x25519": 1}, '"kem" is an object, not a string'),
    (25519, '"kem" is a number, not a string'),
    (None, '"kem" is null, not a string'),
])
def test_a_key_file_whose_kem_is_not_a_string_is_a_keyset_error(tmp_path, capsys, kem, problem):
    """``kem not in _KEMS`` of a list or an object is a TypeError, "unhashable type", which
    loading did not catch: a traceback from Recipient.load, Identity.load and `encrypt -r`."""
    identity = Identity.generate()
    identity.save(tmp_path / "id.json")
    public, private = identity.recipient.to_json(), json.loads((tmp_path / "id.json").read_text())
    for doc in (public, private):
        doc["kem"] = kem
    (tmp_path / "r.pub").write_text(json.dumps(public))
    (tmp_path / "id.json").write_text(json.dumps(private))
    (tmp_path / "plain").write_bytes(b"data")
    with pytest.raises(KeysetError, match=f"r.pub: invalid public key \\({re.escape(problem)}"):
        Recipient.load(tmp_path / "r.pub")
    with pytest.raises(KeysetError, match=f"id.json: invalid private key \\({re.escape(problem)}"):
        Identity.load(tmp_path / "id.json")
    code, _, err = _cli(capsys, "encrypt", "-r", tmp_path / "r.pub", "-o", tmp_path / "out",
                        tmp_path / "plain")
    assert code == 1 and err.count("\n") == 1 and problem in err, err
    with pytest.raises(TypeError, match="kem must be a str"):  # the library's caller: a TypeError
        Recipient(["x25519"], bytes(32))
    with pytest.raises(TypeError, match="kem must be a str"):
        Identity({"x": 1}, bytes(32))


#: X25519 points of small order (RFC 7748 section 6.1 and libsodium's blocklist): all of them
#: give an all-zero shared secret, whatever the private key
_LOW_ORDER_X25519 = [bytes(32), (1).to_bytes(32, "little"), *map(bytes.fromhex, (
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"))]


def test_a_low_order_x25519_recipient_is_refused_when_loaded(tmp_path, capsys):
    """age refuses such keys; gpucrypt loaded one, then sealing failed with cryptography's
    "Error computing shared key.", naming no recipient (on the command line, with several
    -r, which one was left to guess). Refused at load now, naming the file."""
    from cryptography.hazmat.primitives.asymmetric import mlkem

    hybrid_public = mlkem.MLKEM768PrivateKey.generate().public_key().public_bytes_raw()
    for point in _LOW_ORDER_X25519:
        with pytest.raises(ValueError, match="low-order point"):
            Recipient("x25519", point)
        with pytest.raises(ValueError, match="low-order point"):  # the hybrid's X25519 half
            Recipient("mlkem768-x25519", hybrid_public + point)
    Identity.generate().recipient.save(tmp_path / "good.pub")
    (tmp_path / "bad.pub").write_text(json.dumps({
        "format": "gpucrypt-recipient", "version": 1, "kem": "x25519",
        "public_key": base64.b64encode(bytes(32)).decode()}))
    with pytest.raises(KeysetError, match="bad.pub: invalid public key \\(the X25519 public key "
                                          "is a low-order point"):
        Recipient.load(tmp_path / "bad.pub")
    (tmp_path / "plain").write_bytes(b"data")
    code, _, err = _cli(capsys, "encrypt", "-r", tmp_path / "good.pub", "-r", tmp_path / "bad.pub",
                        "-o", tmp_path / "out", tmp_path / "plain")
    assert code == 1 and err.count("\n") == 1 and "bad.pub" in err and "low-order" in err, err
    assert not (tmp_path / "out").exists()


def test_a_recipient_that_cannot_be_wrapped_for_is_named(monkeypatch):
    """Should the HPKE seal still fail for a recipient (here: one whose key object was
    swapped after the checks), the error names it by fingerprint."""
    from cryptography.hazmat.primitives.asymmetric import x25519

    good, bad = Identity.generate().recipient, Identity.generate().recipient
    bad._public_key = x25519.X25519PublicKey.from_public_bytes(bytes(32))
    with pytest.raises(keys.EnvelopeError, match=f"cannot wrap the data key for recipient "
                                                 f"{bad.fingerprint}"):
        keys.seal_envelope(keys.generate_dek(), [good, bad])


@pytest.mark.parametrize("key_id, problem", [
    ("", "empty"),
    ("k" * 256, "256 bytes of UTF-8"),
    ("\u00e9" * 128, "256 bytes of UTF-8"),  # 128 characters, 2 bytes each
    ("\ud800", "not valid UTF-8 \\(it holds a lone surrogate\\)"),
])
def test_a_key_id_that_cannot_name_a_stanza_is_refused_at_load(tmp_path, key_id, problem):
    """An envelope names a keyset key by its id's UTF-8, 1 to 255 bytes: a file with an
    empty, longer or surrogate id loaded, then its first wrap failed with a ValueError or a
    UnicodeEncodeError (a traceback on the command line)."""
    from gpucrypt.keys import KeysetKey, WrappingKey

    path = tmp_path / "ks.json"
    path.write_text(json.dumps({"format": "gpucrypt-keyset", "version": 1, "keys": [
        {"id": key_id, "algorithm": "aes-256-kwp", "created": "2024-01-01T00:00:00Z",
         "status": "primary", "material": base64.b64encode(os.urandom(32)).decode()}]}))
    with pytest.raises(KeysetError, match=f"malformed key entry 1: its id is {problem}, and a "
                                          f"key id is 1 to 255 bytes of UTF-8"):
        Keyset.load(path)
    with pytest.raises(KeysetError, match=f"id is {problem}, and a key id is 1 to 255 bytes"):
        Keyset([KeysetKey(key_id, "aes-256-kwp", "2024-01-01T00:00:00Z", "primary",
                          os.urandom(32))])
    with pytest.raises(ValueError, match=f"key_id is {problem}: a key id is 1 to 255 bytes"):
        WrappingKey(key_id, os.urandom(32))


_TERMINAL_ESCAPE = "\x1b]0;pwned\x07\rgpucrypt: all good"  # retitle the window, fake a line


@pytest.mark.parametrize("key_id", [
    _TERMINAL_ESCAPE,
    "tab\there",                  # Cc
    "csi\x9b31m",                 # a C1 control: CSI, on terminals that take 8-bit ones
    "abc\u202edcba",              # Cf: a right-to-left override, reorders what is shown
    "line\u2028separator",        # Zl
])
def test_a_key_id_with_control_characters_is_refused_at_load_and_shown_escaped(tmp_path, key_id):
    """A keyset read without its passphrase (or not sealed) is unauthenticated, and ids
    gpucrypt makes are hex: an id holding a terminal's escape sequence loaded, and every
    message naming its key (an unknown status, "it holds ..." of a key not found: `keys
    add`, `keys promote` on the command line) put the sequence on the user's terminal.
    Refused at load now, the error showing the id escaped."""
    from gpucrypt.keys import KeysetKey, WrappingKey

    material = base64.b64encode(os.urandom(32)).decode()
    entries = [{"id": "0123456789abcdef", "algorithm": "aes-256-kwp",
                "created": "2026-01-01T00:00:00Z", "status": "primary", "material": material},
               {"id": key_id, "algorithm": "aes-256-kwp", "created": "2026-01-01T00:00:00Z",
                "status": "enabled", "material": material}]
    for status in ("enabled", "bogus"):  # a valid file, and one whose entry is refused
        entries[1]["status"] = status
        path = tmp_path / f"{status}.json"
        path.write_text(json.dumps({"format": "gpucrypt-keyset", "version": 1,
                                    "keys": entries}))
        with pytest.raises(KeysetError) as refused:
            Keyset.load(path)
        message = str(refused.value)
        assert message.isprintable(), message
        assert (f"malformed key entry 2: its id is {key_id!r}, which holds control "
                f"characters") in message
        assert "without control characters" in message
    with pytest.raises(KeysetError, match="which holds control characters") as refused:
        Keyset([KeysetKey(key_id, "aes-256-kwp", "2026-01-01T00:00:00Z", "primary",
                          os.urandom(32))])
    assert str(refused.value).isprintable()
    with pytest.raises(ValueError, match="which holds control characters") as refused:
        WrappingKey(key_id, os.urandom(32))
    assert str(refused.value).isprintable()


def test_a_key_id_that_prints_loads_whatever_its_script(tmp_path):
    """Only what a terminal acts on is refused in ids: letters of any script, symbols and
    spaces load (a rule on str.isprintable() would refuse characters a newer Unicode
    assigned: an id loading on one Python and refused on an older one)."""
    key_id = "clé Ключ 鍵 🔑-01"
    path = tmp_path / "ks.json"
    path.write_text(json.dumps({"format": "gpucrypt-keyset", "version": 1, "keys": [
        {"id": key_id, "algorithm": "aes-256-kwp", "created": "2024-01-01T00:00:00Z",
         "status": "primary", "material": base64.b64encode(os.urandom(32)).decode()}]}))
    ks, dek = Keyset.load(path), keys.generate_dek()
    assert ks.primary.id == key_id
    assert keys.open_envelope(keys.seal_envelope(dek, ks), ks) == dek


def test_messages_naming_a_key_show_its_id_escaped():
    """Every message naming a keyset key shows its id escaped: ids with control characters
    are refused when a keyset is made or loaded, but an id can still be set on a key object
    (or the keyset's table) afterwards, and a message must not depend on that."""
    from gpucrypt.keys import KeysetKey

    primary, other = (KeysetKey(key_id, "aes-256-kwp", "2026-01-01T00:00:00Z", status,
                                os.urandom(32))
                      for key_id, status in (("0123456789abcdef", "primary"),
                                             ("fedcba9876543210", "enabled")))
    ks = Keyset([primary, other])
    ks.disable(other.id)
    primary.id = other.id = _TERMINAL_ESCAPE  # set after the keyset checked them
    ks._keys[_TERMINAL_ESCAPE] = ks._keys.pop("fedcba9876543210")
    shown = "\\x1b]0;pwned\\x07\\rgpucrypt: all good"
    for attempt, said in ((lambda: ks.disable("0123456789abcdef"), "is the primary"),
                          (lambda: ks.get(_TERMINAL_ESCAPE), "is disabled"),
                          (lambda: ks.promote("nope"), "no key 'nope' in this keyset")):
        with pytest.raises((KeyNotFound, keys.KeyUnavailable), match=said) as refused:
            attempt()
        assert str(refused.value).isprintable(), str(refused.value)
        assert shown in str(refused.value)


def test_a_key_id_of_255_bytes_loads_and_wraps(tmp_path):
    path = tmp_path / "ks.json"
    key_id = "\u00e9" * 127 + "k"  # 255 bytes
    path.write_text(json.dumps({"format": "gpucrypt-keyset", "version": 1, "keys": [
        {"id": key_id, "algorithm": "aes-256-kwp", "created": "2024-01-01T00:00:00Z",
         "status": "primary", "material": base64.b64encode(os.urandom(32)).decode()}]}))
    ks, dek = Keyset.load(path), keys.generate_dek()
    assert keys.open_envelope(keys.seal_envelope(dek, ks), ks) == dek


def test_file_key_provider(fast_scrypt, tmp_path):
    ks = Keyset.generate()
    ks.save(tmp_path / "ks.json", "pw", scrypt_n=FAST_N)
    provider = FileKeyProvider(tmp_path / "ks.json", "pw")
    dek = keys.generate_dek()
    assert keys.open_envelope(keys.seal_envelope(dek, ks), provider) == dek


# ---------------------------------------------------------------- files on gpucrypt.stream



def test_encrypt_decrypt_file_every_wrapping(tmp_path, device):
    data = os.urandom(5000)  # two 4 KiB segments: small enough for the simulator
    src = tmp_path / "model.bin"
    src.write_bytes(data)
    alice, bob, ks = Identity.generate(), Identity.generate("mlkem768-x25519"), Keyset.generate()
    info = keys.encrypt_file(src, tmp_path / "model.gc", recipients=[alice.recipient, bob.recipient],
                             keyset=ks, segment_size=4096, device=device)
    header = stream.read_header(tmp_path / "model.gc")
    assert header.key_id == ks.primary.id == info["key_id"]
    assert keys.describe_envelope(header.envelope) == [alice.fingerprint, bob.fingerprint,
                                                       f"aes-kwp:{ks.primary.id}"]
    for n, who in enumerate((dict(identities=alice), dict(identities=[bob]), dict(keyset=ks))):
        out = tmp_path / f"out{n}"
        keys.decrypt_file(tmp_path / "model.gc", out, device=device, **who)
        assert out.read_bytes() == data


def test_decrypt_file_failures_release_nothing(tmp_path):
    src = tmp_path / "m.bin"
    src.write_bytes(os.urandom(3000))
    alice, ks = Identity.generate(), Keyset.generate()
    enc = tmp_path / "m.gc"
    keys.encrypt_file(src, enc, recipients=alice, keyset=ks, segment_size=4096)
    out = tmp_path / "out"
    # a missing recipient
    with pytest.raises(NoMatchingRecipient, match=r"no recipient in this file matches your key\(s\)"):
        keys.decrypt_file(enc, out, identities=Identity.generate())
    # a disabled key, then a destroyed one
    old = ks.primary.id
    ks.add(primary=True)
    ks.disable(old)
    with pytest.raises(NoMatchingRecipient, match="disabled"):
        keys.decrypt_file(enc, out, keyset=ks)
    ks.destroy(old)
    with pytest.raises(NoMatchingRecipient, match="destroyed"):
        keys.decrypt_file(enc, out, keyset=ks)
    # a tampered key id in the header: the header MAC (under the data key) catches it
    blob = bytearray(enc.read_bytes())
    header = stream.read_header(enc)
    kid_at = blob.index(header.key_id.encode())
    blob[kid_at] ^= 0x01
    (tmp_path / "bad.gc").write_bytes(bytes(blob))
    with pytest.raises(stream.AuthenticationError):
        keys.decrypt_file(tmp_path / "bad.gc", out, identities=alice)
    # a tampered wrapped key inside the envelope
    blob = bytearray(enc.read_bytes())
    env_at = blob.index(header.envelope)
    blob[env_at + 30] ^= 0x01  # inside alice's HPKE stanza body
    (tmp_path / "bad2.gc").write_bytes(bytes(blob))
    with pytest.raises(NoMatchingRecipient, match="failed to authenticate"):
        keys.decrypt_file(tmp_path / "bad2.gc", out, identities=alice)
    assert not out.exists()


@pytest.mark.parametrize("dek_size", [16, 48])
def test_a_data_key_of_another_length_is_a_bad_envelope(tmp_path, capsys, dek_size, fast_scrypt):
    """Anyone with a recipient's public key can wrap a 16- or 48-byte "data key" for it
    (envelopes take 16 to 64 bytes): a plain ValueError, exit 2 "key must be 32 bytes"
    before, blaming the user's key; safe_open took a 16-byte key. Now EnvelopeError, the
    file's fault (exit 1), from every reader."""
    import numpy as np

    from gpucrypt import models
    from gpucrypt.keys import EnvelopeError, file_context

    alice = Identity.generate()
    alice.save(tmp_path / "alice.key")
    salt = os.urandom(32)
    envelope = keys.seal_envelope(os.urandom(dek_size), [alice.recipient],
                                  context=file_context(salt))
    stream.encrypt(b"hello", tmp_path / "f.gc", os.urandom(32), envelope=envelope, _salt=salt,
                   device="cpu")
    with pytest.raises(EnvelopeError, match=f"{dek_size}-byte data key, not 32"):
        keys.decrypt_file(tmp_path / "f.gc", tmp_path / "out", identities=alice)
    code, _, err = _cli(capsys, "decrypt", "-i", tmp_path / "alice.key", tmp_path / "f.gc",
                        tmp_path / "out")
    assert code == 1 and f"{dek_size}-byte data key" in err, err
    models.save_encrypted({"w": np.arange(4, dtype=np.float32)}, tmp_path / "m.gc",
                          os.urandom(32), envelope=envelope, device="cpu")
    with pytest.raises(EnvelopeError, match=f"{dek_size}-byte data key"):
        models.safe_open(tmp_path / "m.gc", "np", identity=alice)
    # a passphrase file: the command line's own passphrase path
    (tmp_path / "pw").write_text("correct horse\n")
    (tmp_path / "pw").chmod(0o600)
    envelope = keys.seal_envelope(os.urandom(dek_size), keys.Passphrase("correct horse", log_n=10),
                                  context=file_context(salt))
    stream.encrypt(b"hello", tmp_path / "p.gc", os.urandom(32), envelope=envelope, _salt=salt,
                   device="cpu")
    code, _, err = _cli(capsys, "decrypt", "--passphrase-file", tmp_path / "pw",
                        tmp_path / "p.gc", tmp_path / "out")
    assert code == 1 and f"{dek_size}-byte data key" in err, err
    assert not (tmp_path / "out").exists()


def test_raw_key_file_has_no_envelope(tmp_path):
    stream.encrypt(b"hello", tmp_path / "raw.gc", os.urandom(32))
    with pytest.raises(NoMatchingRecipient, match="no envelope"):
        keys.decrypt_file(tmp_path / "raw.gc", tmp_path / "out", identities=Identity.generate())


def test_decrypt_file_reads_a_non_seekable_reader_once_past_its_end(tmp_path):
    """The rest of a non-seekable input after its header: an object with read() alone was
    asked again after it said b"" (a check meant for read1's b""), and one that raises
    there (a consumed HTTP body) failed, as would a terminal wanting a second Ctrl-D."""
    alice = Identity.generate()
    data = os.urandom(50_000)
    (tmp_path / "p").write_bytes(data)
    keys.encrypt_file(tmp_path / "p", tmp_path / "c", recipients=[alice])

    class ReadOnce:
        def __init__(self, blob):
            self.body, self.ended = io.BytesIO(blob), False

        def seekable(self):
            return False

        def read(self, n=-1):
            if self.ended:
                raise ValueError("read after the end of the body")
            chunk = self.body.read(n)
            self.ended = not chunk
            return chunk

    keys.decrypt_file(ReadOnce((tmp_path / "c").read_bytes()), tmp_path / "out",
                      identities=alice)
    assert (tmp_path / "out").read_bytes() == data


def test_rekey_rotates_and_drops_a_recipient_from_the_envelope(tmp_path):
    """A header-only rekey: the new envelope has no stanza for bob, so his identity no longer
    opens the file. It does not revoke bob had he kept the data key: see
    test_rekey_without_reencrypt_does_not_revoke_a_data_key_holder."""
    data = os.urandom(6000)
    (tmp_path / "m").write_bytes(data)
    alice, bob, ks = Identity.generate(), Identity.generate(), Keyset.generate()
    enc = tmp_path / "m.gc"
    keys.encrypt_file(tmp_path / "m", enc, recipients=[alice, bob], keyset=ks, segment_size=4096)
    segments_before = enc.read_bytes()[stream.read_header(enc).header_length:]
    old = ks.primary.id
    new = ks.add(primary=True).id
    result = keys.rekey_file(enc, recipients=[alice], keyset=ks)
    assert result["key_id"] == new
    assert result["previous_recipients"] == [alice.fingerprint, bob.fingerprint, f"aes-kwp:{old}"]
    assert result["recipients"] == [alice.fingerprint, f"aes-kwp:{new}"]
    assert enc.read_bytes()[stream.read_header(enc).header_length:] == segments_before
    ks.disable(old)
    keys.decrypt_file(enc, tmp_path / "a", identities=alice)
    keys.decrypt_file(enc, tmp_path / "k", keyset=ks)
    assert (tmp_path / "a").read_bytes() == data == (tmp_path / "k").read_bytes()
    with pytest.raises(NoMatchingRecipient):
        keys.decrypt_file(enc, tmp_path / "b", identities=bob)
    # nor can bob's identity rekey him back in: nothing in the file opens for it (with the
    # data key, kept from before, he could: the test below)
    with pytest.raises(NoMatchingRecipient):
        keys.rekey_file(enc, recipients=[bob], identities=bob)
    assert keys.describe_envelope(stream.read_header(enc).envelope) == result["recipients"]


def _bob_keeps_the_data_key(tmp_path, size: int = 10_000):
    """A stream file for alice, bob and a keyset (three 4 KiB segments), and the data key
    bob unwrapped while he was a recipient."""
    from gpucrypt.keys.recipients import open_file_envelope

    data = os.urandom(size)
    (tmp_path / "m").write_bytes(data)
    alice, bob, ks = Identity.generate(), Identity.generate(), Keyset.generate()
    enc = tmp_path / "m.gc"
    keys.encrypt_file(tmp_path / "m", enc, recipients=[alice, bob], keyset=ks, segment_size=4096)
    header = stream.read_header(enc)
    return data, enc, alice, bob, ks, open_file_envelope(header.envelope, bob, header.salt)


def test_rekey_without_reencrypt_does_not_revoke_a_data_key_holder(tmp_path):
    """The limit of a header-only rekey, as documented: the segments stay under the same
    data key, so bob, who unwrapped it before, still reads the rekeyed file, and (with
    write access to it) puts himself back into its envelope, which every reader accepts."""
    from gpucrypt.keys import _envelope

    data, enc, alice, bob, ks, bob_dek = _bob_keeps_the_data_key(tmp_path)
    keys.rekey_file(enc, recipients=[alice], keyset=ks)
    stream.decrypt(enc, tmp_path / "b", bob_dek)
    assert (tmp_path / "b").read_bytes() == data
    now = stream.read_header(enc).envelope
    his = _envelope.decode(keys.seal_envelope(bob_dek, bob.recipient))
    stream.replace_envelope(enc, bob_dek, _envelope.encode(_envelope.decode(now) + his))
    keys.decrypt_file(enc, tmp_path / "b2", identities=bob)
    keys.decrypt_file(enc, tmp_path / "k", keyset=ks)
    assert (tmp_path / "b2").read_bytes() == data == (tmp_path / "k").read_bytes()


def test_rekey_reencrypt_revokes_a_data_key_holder(tmp_path):
    """reencrypt=True: a fresh data key and salt, every segment encrypted again; the data key
    bob kept opens nothing of the new file, and cannot put him back in."""
    log = io.StringIO()
    handler = audit.enable(log)
    data, enc, alice, bob, ks, bob_dek = _bob_keeps_the_data_key(tmp_path)
    before = stream.read_header(enc)
    enc.chmod(0o640)
    try:
        result = keys.rekey_file(enc, recipients=[alice], keyset=ks, reencrypt=True)
    finally:
        logging.getLogger(audit.LOGGER_NAME).removeHandler(handler)
    assert result["reencrypted"] is True
    assert result["recipients"] == [alice.fingerprint, f"aes-kwp:{ks.primary.id}"]
    after = stream.read_header(enc)
    assert (after.algorithm, after.segment_size) == (before.algorithm, before.segment_size)
    assert after.salt != before.salt and _mode(enc) == 0o640
    for attempt in (lambda: stream.decrypt(enc, tmp_path / "b", bob_dek),
                    lambda: stream.open(enc, bob_dek),
                    lambda: stream.replace_envelope(enc, bob_dek, after.envelope)):
        with pytest.raises(stream.AuthenticationError):
            attempt()
    with pytest.raises(NoMatchingRecipient):
        keys.decrypt_file(enc, tmp_path / "b", identities=bob)
    assert not (tmp_path / "b").exists()
    keys.decrypt_file(enc, tmp_path / "a", identities=alice)
    keys.decrypt_file(enc, tmp_path / "k", keyset=ks)
    assert (tmp_path / "a").read_bytes() == data == (tmp_path / "k").read_bytes()
    (rekey,) = [e for e in map(json.loads, log.getvalue().splitlines())
                if e["operation"] == "file.rekey"]
    assert rekey["outcome"] == "ok" and rekey["status"] == "reencrypted"


@pytest.mark.skipif(os.name != "posix", reason="rekeys are locked with flock on POSIX only")
@pytest.mark.parametrize("rewrap_by", ["rekey_file", "replace_envelope"])
def test_a_rekey_that_overlaps_a_revocation_waits_for_it_and_cannot_undo_it(tmp_path,
                                                                            monkeypatch,
                                                                            rewrap_by):
    """A header-only rekey (adding carol; or the envelope rewritten by the public
    stream.replace_envelope) read the file, then a re-encrypting one revoked bob while the
    first was copying its new file: the first published after it a copy of the file it had
    read, with the old data key and bob's stanza, and both said ok. Now the revocation
    waits for the rewrite holding the file and then reads what that one wrote."""
    from gpucrypt.files import _atomic

    data, enc, alice, bob, ks, bob_dek = _bob_keeps_the_data_key(tmp_path)
    carol = Identity.generate()
    at_commit, go = threading.Event(), threading.Event()
    commit = _atomic.AtomicFile.commit

    def slow_commit(self):  # the rewrap's copy, as long as the file is large
        if threading.current_thread().name == "rewrap":
            at_commit.set()
            go.wait(10)
        commit(self)

    monkeypatch.setattr(_atomic.AtomicFile, "commit", slow_commit)
    errors = []

    def run(**how):
        try:
            if threading.current_thread().name == "rewrap" and rewrap_by == "replace_envelope":
                stream.replace_envelope(enc, bob_dek, stream.read_header(enc).envelope)
            else:
                keys.rekey_file(enc, keyset=ks, **how)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    rewrap = threading.Thread(target=run, name="rewrap",
                              kwargs=dict(recipients=[alice, bob, carol]))
    revoke = threading.Thread(target=run, name="revoke",
                              kwargs=dict(recipients=[alice], reencrypt=True))
    rewrap.start()
    assert at_commit.wait(10)
    revoke.start()
    revoke.join(0.5)
    assert revoke.is_alive()  # waits for the rewrap, which holds the file
    go.set()
    rewrap.join(10)
    revoke.join(10)
    assert not errors and not rewrap.is_alive() and not revoke.is_alive()
    with pytest.raises(NoMatchingRecipient):  # the revocation came last, and holds
        keys.decrypt_file(enc, tmp_path / "b", identities=bob)
    with pytest.raises(stream.AuthenticationError):
        stream.decrypt(enc, tmp_path / "b", bob_dek)
    keys.decrypt_file(enc, tmp_path / "a", identities=alice)
    assert (tmp_path / "a").read_bytes() == data


def test_rekey_reencrypt_through_a_symbolic_link_rewrites_its_file(tmp_path):
    data, enc, alice, bob, ks, bob_dek = _bob_keeps_the_data_key(tmp_path, 100)
    (tmp_path / "link").symlink_to(enc.name)
    keys.rekey_file(tmp_path / "link", recipients=[alice], identities=alice, reencrypt=True)
    assert (tmp_path / "link").is_symlink()
    with pytest.raises(stream.AuthenticationError):
        stream.decrypt(enc, tmp_path / "b", bob_dek)
    keys.decrypt_file(enc, tmp_path / "a", identities=alice)
    assert (tmp_path / "a").read_bytes() == data


@pytest.mark.parametrize("temporary", ["unnamed", "named"])
def test_rekey_reencrypt_leaves_the_original_when_a_segment_fails(tmp_path, monkeypatch,
                                                                 temporary):
    """A tampered middle segment (the reader checks the final one when it opens, the others
    as it reaches them): the error, the original byte for byte, and no temporary file,
    with the unnamed (O_TMPFILE) output and with the named fallback."""
    from gpucrypt.files import _atomic

    if temporary == "named":
        monkeypatch.setattr(_atomic, "_TMPFILE", 0)
    data, enc, alice, bob, ks, bob_dek = _bob_keeps_the_data_key(tmp_path)
    raw = bytearray(enc.read_bytes())
    header = stream.read_header(enc)
    raw[header.header_length + (4096 + 16) + 100] ^= 1  # inside segment 1 of 3
    enc.write_bytes(bytes(raw))
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(stream.AuthenticationError) as failed:
        keys.rekey_file(enc, recipients=[alice], keyset=ks, reencrypt=True)
    assert failed.value.segment == 1
    assert enc.read_bytes() == bytes(raw)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_a_failed_rekey_logs_the_file_as_it_stays(tmp_path):
    """The error event of a rekey that failed (a tampered segment) said status reencrypted
    and the new recipients alone, a state never reached: it names the envelope the file
    keeps (key_ids) and nothing of the one that was not written."""
    data, enc, alice, bob, ks, bob_dek = _bob_keeps_the_data_key(tmp_path)
    raw = bytearray(enc.read_bytes())
    raw[stream.read_header(enc).header_length + (4096 + 16) + 100] ^= 1
    enc.write_bytes(bytes(raw))
    log = io.StringIO()
    handler = audit.enable(log)
    try:
        with pytest.raises(stream.AuthenticationError):
            keys.rekey_file(enc, recipients=[alice], keyset=ks, reencrypt=True)
    finally:
        logging.getLogger(audit.LOGGER_NAME).removeHandler(handler)
    (event,) = [e for e in map(json.loads, log.getvalue().splitlines())
                if e["operation"] == "file.rekey"]
    assert event["outcome"] == "error"
    assert sorted(event["key_ids"]) == sorted([alice.fingerprint, bob.fingerprint,
                                               f"aes-kwp:{ks.primary.id}"])
    assert not {"status", "recipients", "key_id"} & set(event)


@pytest.mark.parametrize("algorithm, encrypt_names", [("aes-256-gcm", True),
                                                      ("chacha20-poly1305", False),
                                                      ("xchacha20-poly1305", True)])
def test_rekey_reencrypt_model_file(tmp_path, algorithm, encrypt_names):
    """A model file is sealed again with its algorithm, segment size, encrypted names and
    metadata; the data key bob kept no longer opens it. Tensors of several segments, one
    that ends on a segment boundary, an empty one, and names out of sorted order."""
    import numpy as np

    from gpucrypt import models
    from gpucrypt.keys.recipients import open_file_envelope

    alice, bob = Identity.generate(), Identity.generate()
    tensors = {"w": np.arange(3000, dtype=np.float32), "b": np.ones(7, dtype=np.int64),
               "e": np.zeros(0, dtype=np.uint8), "a": np.arange(2048, dtype=np.int32)}
    dek = keys.generate_dek()
    path = tmp_path / "m.gc"
    models.save_encrypted(tensors, path, dek, {"arch": "tiny"}, algorithm=algorithm,
                          encrypt_names=encrypt_names, segment_size=4096,
                          envelope=keys.seal_envelope(dek, [alice, bob]))
    before = models.read_header(path)
    bob_dek = open_file_envelope(before.envelope, bob, before.salt)
    result = keys.rekey_file(path, recipients=[alice], identities=alice, reencrypt=True)
    assert result["reencrypted"] is True and result["recipients"] == [alice.fingerprint]
    with pytest.raises(stream.AuthenticationError):
        models.load_encrypted(path, bob_dek, device="cpu", framework="numpy")
    after = models.read_header(path)
    assert after.names_encrypted is encrypt_names and after.salt != before.salt
    assert after.nonce_prefix != before.nonce_prefix
    key = open_file_envelope(after.envelope, alice, after.salt)
    verified = models.read_header(path, key)
    assert (verified.algorithm, verified.segment_size) == (algorithm, 4096)
    assert verified.metadata == {"arch": "tiny"}
    assert verified.tensors == models.read_header(path, key).tensors
    assert [(t.name, t.begin, t.end) for t in verified.tensors] == \
        [("w", 0, 12000), ("b", 12000, 12056), ("e", 12056, 12056), ("a", 12056, 20248)]
    back = models.load_encrypted(path, key, device="cpu", framework="numpy")
    assert list(back) == list(tensors)
    for name, x in tensors.items():
        assert back[name].dtype == x.dtype and np.array_equal(back[name], x)


@pytest.mark.parametrize("temporary", ["unnamed", "named"])
def test_rekey_reencrypt_model_leaves_the_original_when_a_segment_fails(tmp_path, monkeypatch,
                                                                       temporary):
    """A flipped bit in the last segment of the first tensor (segment 2 of 5): the error
    names it, the original stays byte for byte, no temporary file remains."""
    import numpy as np

    from gpucrypt import models
    from gpucrypt.files import _atomic

    if temporary == "named":
        monkeypatch.setattr(_atomic, "_TMPFILE", 0)
    alice = Identity.generate()
    dek = keys.generate_dek()
    path = tmp_path / "m.gc"
    models.save_encrypted({"w": np.arange(3000, dtype=np.float32), "b": np.ones(1500)}, path,
                          dek, segment_size=4096, envelope=keys.seal_envelope(dek, [alice]))
    header = models.read_header(path)
    raw = bytearray(path.read_bytes())
    raw[header.header_length + 2 * 4096 + 5] ^= 1
    path.write_bytes(bytes(raw))
    listing = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(stream.AuthenticationError) as failed:
        keys.rekey_file(path, recipients=[alice], identities=alice, reencrypt=True)
    assert failed.value.segment == 2 and "'w'" in str(failed.value)
    assert path.read_bytes() == bytes(raw)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing


_REKEY_PEAK = """
import sys
from gpucrypt import keys
from gpucrypt.keys import Identity

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

alice = Identity.load(sys.argv[2])
with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) starts again from here
    f.write("5")
before = status("VmRSS")
keys.rekey_file(sys.argv[1], recipients=[alice], identities=alice, reencrypt=True)
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"),
                    reason="measures the peak through /proc/self/status (Linux)")
def test_rekey_reencrypt_model_streams_in_bounded_memory(tmp_path):
    """Re-encrypting a 160 MiB model raises the process's peak memory by a few batches,
    not by the model's size (it was decrypted whole into host memory first)."""
    import subprocess
    import sys

    import numpy as np

    from gpucrypt import models
    from gpucrypt.keys.recipients import open_file_envelope

    alice = Identity.generate()
    dek = keys.generate_dek()
    path = tmp_path / "m.gc"
    size = 160 << 20
    models.save_encrypted({"a": np.zeros(size // 2, dtype=np.uint8),
                           "b": np.zeros(size // 2, dtype=np.uint8)}, path, dek,
                          device="cpu", envelope=keys.seal_envelope(dek, [alice]))
    alice.save(tmp_path / "alice")
    done = subprocess.run([sys.executable, "-c", _REKEY_PEAK, str(path), str(tmp_path / "alice")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    grown_kib = int(done.stdout.split()[-1])
    assert grown_kib < (64 << 10), f"peak memory grew by {grown_kib >> 10} MiB"
    after = models.read_header(path)
    key = open_file_envelope(after.envelope, alice, after.salt)
    with models.safe_open(path, "np", key=key) as f:
        assert not f.get_slice("b")[size // 2 - 10:].any()


def test_decrypt_file_names_the_stanza_that_opened_not_the_headers_claim(tmp_path):
    """Anyone with alice's public key can make a file whose header claims the owner's keyset
    key id (MACed under a data key of their choosing) and whose envelope names that key
    first: decrypt_file and its audit event name alice's stanza, which opened it."""
    from gpucrypt.keys import _envelope
    from gpucrypt.keys.recipients import Stanza

    alice, ops = Identity.generate(), Keyset.generate()
    dek = keys.generate_dek()
    decoy = Stanza("aes-kwp", ops.primary.id.encode(), os.urandom(40))
    envelope = _envelope.encode([decoy] + _envelope.decode(keys.seal_envelope(dek, alice.recipient)))
    stream.encrypt(b"attacker content", tmp_path / "f.gc", dek, key_id=ops.primary.id,
                   envelope=envelope)
    log = io.StringIO()
    handler = audit.enable(log)
    try:
        result = keys.decrypt_file(tmp_path / "f.gc", tmp_path / "o", identities=alice,
                                   keyset=ops)
        genuine = tmp_path / "g.gc"
        (tmp_path / "g").write_bytes(b"genuine")
        keys.encrypt_file(tmp_path / "g", genuine, recipients=[alice], keyset=ops)
        by_keyset = keys.decrypt_file(genuine, tmp_path / "g2", keyset=ops)
    finally:
        logging.getLogger(audit.LOGGER_NAME).removeHandler(handler)
    assert result == {"key_id": None, "opened_by": alice.fingerprint}
    assert by_keyset == {"key_id": ops.primary.id, "opened_by": f"aes-kwp:{ops.primary.id}"}
    decrypted = [e for e in map(json.loads, log.getvalue().splitlines())
                 if e["operation"] == "file.decrypt"]
    assert [e["key_id"] for e in decrypted] == [alice.fingerprint, f"aes-kwp:{ops.primary.id}"]


# ---------------------------------------------------------------- CLI


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_keygen_and_keys(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = _cli(capsys, "keygen", "--out", "ks.json")
    assert code == 0 and _mode("ks.json") == 0o600
    primary = Keyset.load("ks.json").primary
    assert primary.id in out and base64.b64encode(primary.secret_bytes()).decode() not in out
    assert _cli(capsys, "keygen", "--out", "ks.json")[0] == 2  # no overwrite without --force
    code, out, _ = _cli(capsys, "keys", "add", "ks.json", "--primary")
    new_id = re.search(r"added key ([0-9a-f]{16})", out).group(1)
    assert Keyset.load("ks.json").primary.id == new_id
    assert _cli(capsys, "keys", "disable", "ks.json", primary.id)[0] == 0
    code, out, _ = _cli(capsys, "keys", "list", "ks.json")
    assert re.search(rf"{primary.id}\s+disabled", out) and re.search(rf"{new_id}\s+primary", out)
    code, _, err = _cli(capsys, "keys", "destroy", "ks.json", primary.id)
    assert code == 2 and "--yes" in err
    assert _cli(capsys, "keys", "destroy", "ks.json", primary.id, "--yes")[0] == 0
    code, out, _ = _cli(capsys, "keys", "list", "ks.json", "--json")
    assert {k["id"]: k["status"] for k in json.loads(out)["keys"]} == {primary.id: "destroyed",
                                                                        new_id: "primary"}
    code, _, err = _cli(capsys, "keys", "disable", "ks.json", new_id)
    assert code == 1 and "promote another key first" in err
    code, _, err = _cli(capsys, "keys", "promote", "ks.json", "nope")
    assert code == 1 and "no key 'nope'" in err


def test_cli_keygen_public_and_sealed(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = _cli(capsys, "keygen", "--public", "--out", "alice", "--kem", "mlkem768-x25519")
    assert code == 0 and _mode("alice") == 0o600 and _mode("alice.pub") == 0o644
    assert Recipient.load("alice.pub").fingerprint in out
    (tmp_path / "pw").write_text("s3cret passphrase\n")
    (tmp_path / "pw").chmod(0o600)  # the CLI refuses passphrase files others can read
    code, _, _ = _cli(capsys, "keygen", "--seal", "--passphrase-file", "pw", "--out", "sealed.json")
    assert code == 0 and "sealed" in json.loads(Path("sealed.json").read_text())
    assert json.loads(Path("sealed.json").read_text())["protection"]["n"] == 2**17  # the default
    monkeypatch.delenv("GPUCRYPT_PASSPHRASE", raising=False)
    code, _, err = _cli(capsys, "keys", "add", "sealed.json")
    assert code == 2 and "needs a passphrase" in err
    monkeypatch.setenv("GPUCRYPT_PASSPHRASE", "wrong")
    code, _, err = _cli(capsys, "keys", "add", "sealed.json")
    assert code == 1 and "wrong passphrase" in err
    assert _cli(capsys, "keys", "add", "sealed.json", "--passphrase-file", "pw")[0] == 0
    assert len(Keyset.load("sealed.json", "s3cret passphrase")) == 2


def test_cli_says_a_kek_sealed_keyset_is_for_the_library(tmp_path, capsys, monkeypatch):
    path = tmp_path / "ks.json"
    Keyset.generate().save(path, kek=os.urandom(32), kek_id="hsm-7")
    before = path.read_bytes()
    for passphrase in ("anything", None):  # not asked for, and not used
        if passphrase:
            monkeypatch.setenv("GPUCRYPT_PASSPHRASE", passphrase)
        else:
            monkeypatch.delenv("GPUCRYPT_PASSPHRASE", raising=False)
        code, _, err = _cli(capsys, "keys", "add", path)
        assert code == 1 and "sealed by a key-encryption key" in err, err
        assert "Keyset.load(path, kek=...)" in err and "passphrase" not in err, err
    assert path.read_bytes() == before


def test_cli_encrypt_decrypt_rekey(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = os.urandom(5000)
    Path("model.bin").write_bytes(data)
    for name in ("alice", "bob"):
        assert _cli(capsys, "keygen", "--public", "--out", name)[0] == 0
    assert _cli(capsys, "keygen", "--out", "ks.json")[0] == 0
    code, _, err = _cli(capsys, "encrypt", "model.bin", "model.gc", "-r", "alice.pub", "-r", "bob.pub",
                        "--keyset", "ks.json", "--segment-size", "4096")
    assert code == 0, err
    for opts in (["-i", "alice"], ["-i", "bob"], ["--keyset", "ks.json"]):
        code, _, err = _cli(capsys, "decrypt", "model.gc", "out", "--force", *opts)
        assert code == 0, err
        assert Path("out").read_bytes() == data
    # rotate the keyset, revoke bob
    assert _cli(capsys, "keys", "add", "ks.json", "--primary")[0] == 0
    code, out, err = _cli(capsys, "rekey", "model.gc", "-r", "alice.pub", "--keyset", "ks.json",
                          "--audit-log", "audit.jsonl")
    assert code == 0, err
    assert "removed: " + Recipient.load("bob.pub").fingerprint in out
    code, _, err = _cli(capsys, "decrypt", "model.gc", "out2", "-i", "bob")
    assert code == 1 and "no recipient in this file matches your key(s)" in err
    assert not Path("out2").exists()
    assert _cli(capsys, "decrypt", "model.gc", "out3", "-i", "alice")[0] == 0
    events = [json.loads(line) for line in Path("audit.jsonl").read_text().splitlines()]
    assert any(e["operation"] == "file.rekey" and e["outcome"] == "ok" for e in events)
    assert _mode("audit.jsonl") == 0o600


# ---------------------------------------------------------------- the README scenario


def _readme_snippet() -> str:
    text = DOCS.read_text()
    match = re.search(r"<!-- readme-scenario:begin -->\s*```python\n(.*?)```\s*<!-- readme-scenario:end -->",
                      text, re.S)
    assert match, "docs/KEYS.md lost its README scenario block"
    return match.group(1)


def test_readme_scenario(tmp_path, monkeypatch, capsys):
    """Share a model with two recipients, rotate the KEK, revoke one, prove it from the log:
    runs the exact snippet docs/KEYS.md gives the README."""
    import tempfile

    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: str(tmp_path))
    import logging

    logger = logging.getLogger(audit.LOGGER_NAME)
    handlers_before = list(logger.handlers)
    namespace: dict = {}
    try:
        exec(compile(_readme_snippet(), str(DOCS), "exec"), namespace)
    finally:
        for handler in logger.handlers[:]:
            if handler not in handlers_before:
                logger.removeHandler(handler)
    out = capsys.readouterr().out
    alice, bob = namespace["alice"], namespace["bob"]
    assert "bob: no recipient in this file matches your key(s)" in out
    events = [json.loads(line) for line in namespace["log"].getvalue().splitlines()]
    files = [e for e in events if e["operation"].startswith("file.")]
    assert [(e["operation"], e["outcome"]) for e in files] == [
        ("file.encrypt", "ok"), ("file.rekey", "ok"), ("file.rekey", "ok"),
        ("file.decrypt", "ok"), ("file.decrypt", "error")]
    encrypt, rotate, revoke, ok, refused = files
    assert alice.fingerprint in encrypt["recipients"] and bob.fingerprint in encrypt["recipients"]
    assert rotate["key_id"] != encrypt["key_id"]                    # the KEK rotated
    assert f"aes-kwp:{encrypt['key_id']}" not in rotate["recipients"]
    assert bob.fingerprint in revoke["key_ids"] and bob.fingerprint not in revoke["recipients"]
    assert alice.fingerprint in revoke["recipients"]
    assert "NoMatchingRecipient" in refused["error"]
    assert any(e["operation"] == "keyset.disable" for e in events)


def test_key_material_given_as_an_int_is_refused_not_taken_as_zero_bytes():
    """bytes(16) is 16 zero bytes, of exactly a key's size: every place that takes key
    material (or a data key to wrap) refuses an int instead of using a key of zeros."""
    from gpucrypt.keys import CallableKeyProvider, Passphrase, WrappingKey

    with pytest.raises(TypeError, match="key must be bytes-like"):
        WrappingKey("kek", key=16)
    with pytest.raises(TypeError, match="returned for 'any' must be bytes-like"):
        CallableKeyProvider(lambda key_id: 32).get_key("any")
    with pytest.raises(TypeError, match="public_bytes must be bytes-like"):
        Recipient("x25519", 32)
    with pytest.raises(TypeError, match="private_bytes must be bytes-like"):
        Identity("x25519", 32)
    with pytest.raises(TypeError, match="dek must be bytes-like"):
        Passphrase("a passphrase").wrap(32)  # refused before scrypt's work
    assert WrappingKey("kek", key=bytearray(16))._key == bytes(16)   # bytes-like still works


def test_a_keyset_sealed_with_an_int_kek_is_refused(tmp_path):
    with pytest.raises(TypeError, match="kek must be bytes-like"):
        Keyset.generate().save(tmp_path / "keys.json", kek=32, kek_id="k")
    assert not (tmp_path / "keys.json").exists()


# ---------------------------------------------------------------- what travels, what does not


@pytest.mark.parametrize("kem", ["x25519", "mlkem768-x25519"])
def test_a_recipient_pickles_and_copies_as_its_public_key(kem):
    """KeyReferences takes a Recipient as a reference that travels (it is public), but it
    did not pickle (cryptography's public-key objects do not): a gpucrypt filesystem made
    with one could not be shipped to workers."""
    import copy
    import pickle

    from gpucrypt.keys.portable import KeyReferences

    alice = Identity.generate(kem)
    for back in (pickle.loads(pickle.dumps(alice.recipient)), copy.copy(alice.recipient),
                 copy.deepcopy(alice.recipient)):
        assert back == alice.recipient and back.kem == kem
        assert back.public_bytes == alice.recipient.public_bytes
        dek = keys.generate_dek()
        assert keys.open_envelope(keys.seal_envelope(dek, back), alice) == dek  # still wraps
    refs = KeyReferences(recipients=alice.recipient)
    blob = pickle.dumps(refs)
    assert alice._private_bytes not in blob
    worker = pickle.loads(blob)
    assert worker == refs
    dek = keys.generate_dek()
    assert keys.open_envelope(keys.seal_envelope(dek, worker.resolve().wrappers()), alice) == dek


def test_objects_holding_key_material_refuse_pickle_and_copy(fast_scrypt, tmp_path):
    """A pickle carried keys, private keys and passphrases in the clear (a keyset loaded
    sealed carried its passphrase too); an Identity refused only by accident (its
    cryptography object), and copy.copy took it. Each refuses now, saying what to pickle
    instead, as gpucrypt.aead's objects do."""
    import copy
    import pickle

    from gpucrypt.keys import EnvKeyProvider, Passphrase, WrappingKey

    path = tmp_path / "ks.json"
    Keyset.generate().save(path, "sealing-pass-xyz", scrypt_n=FAST_N)
    sealed = Keyset.load(path, "sealing-pass-xyz")
    used = FileKeyProvider(path, "sealing-pass-xyz")
    used.get_key(sealed.primary.id)
    holders = {"Keyset": Keyset.generate(), "sealed-loaded Keyset": sealed,
               "KeysetKey": sealed.primary, "WrappingKey": WrappingKey("w", os.urandom(32)),
               "Passphrase": Passphrase("correct horse battery", log_n=FAST_N.bit_length() - 1),
               "Identity": Identity.generate(),
               "hybrid Identity": Identity.generate("mlkem768-x25519"),
               "FileKeyProvider with a passphrase": FileKeyProvider(path, "sealing-pass-xyz"),
               "used FileKeyProvider": used,
               "PassphraseText": keys.passphrase.from_file_bytes(b"sealing-pass-xyz\r\n")}
    for name, holder in holders.items():
        for attempt in (pickle.dumps, copy.copy, copy.deepcopy):
            with pytest.raises(TypeError, match=r"it holds key material, which a pickle "
                                                r"would carry in the clear; "
                                                r".*(KeyReferences|name where)"):
                attempt(holder)
    over_keyset = WrappingKey.from_provider(sealed, sealed.primary.id)
    for attempt in (pickle.dumps, copy.deepcopy):  # (a shallow copy shares the same keyset)
        with pytest.raises(TypeError, match="cannot pickle or copy 'Keyset' object"):
            attempt(over_keyset)
    # what holds no secret still travels: a WrappingKey over a provider of names, a
    # FileKeyProvider of a path alone (loaded again where it is unpickled)
    by_env = pickle.loads(pickle.dumps(WrappingKey.from_provider(EnvKeyProvider("k", "VAR"), "k")))
    assert by_env.key_id == "k" and by_env._key is None
    assert (by_env._provider.key_id, by_env._provider.variable) == ("k", "VAR")
    plain_path = tmp_path / "plain.json"
    Keyset.generate().save(plain_path)
    assert pickle.loads(pickle.dumps(FileKeyProvider(plain_path))).keyset.primary.id == \
        Keyset.load(plain_path).primary.id


def test_a_passphrase_read_from_a_file_is_not_pickled_but_is_its_text():
    """PassphraseText (a passphrase file's reading, with its earlier readings) pickled and
    copied with the passphrase in the clear, where Passphrase refused. It refuses too now;
    it stays a str whose str() is the passphrase (what takes a passphrase as text gets
    it), and its repr shows nothing."""
    import copy
    import pickle

    text = keys.passphrase.from_file_bytes(b"\xef\xbb\xbfpass-words-q7\r\n")
    for attempt in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match="cannot pickle or copy 'PassphraseText' object.*"
                                            "name where the passphrase is instead"):
            attempt(text)
    assert "pass-words-q7" not in repr(text)
    assert str(text) == text == "pass-words-q7" and isinstance(text, str)
    assert keys.passphrase.forms(text)[0] == b"pass-words-q7"


def test_save_refuses_arguments_that_contradict_each_other(fast_scrypt, tmp_path):
    """Keyset.save(path, passphrase, kek=K) sealed with the passphrase and dropped K without
    a word (the file then did not load with K); unsealed=True beside a secret, scrypt_n or
    kek_id with nothing they apply to, were dropped the same way. Each is a ValueError now,
    before anything is written; so is a load, or a FileKeyProvider, given both secrets."""
    kek, path = os.urandom(32), tmp_path / "ks.json"
    ks = Keyset.generate()
    refused = [
        (lambda: ks.save(path, "pw", kek=kek), "not both"),
        (lambda: ks.save(path, "pw", unsealed=True), "unsealed=True"),
        (lambda: ks.save(path, kek=kek, unsealed=True), "unsealed=True"),
        (lambda: ks.save(path, scrypt_n=FAST_N), "scrypt_n is the work factor"),
        (lambda: ks.save(path, kek=kek, scrypt_n=FAST_N), "scrypt_n is the work factor"),
        (lambda: ks.save(path, "pw", kek_id="hsm-7"), "kek_id labels"),
        (lambda: ks.save(path, kek_id="hsm-7"), "kek_id labels"),
        (lambda: Identity.generate().save(tmp_path / "id.json", scrypt_n=FAST_N),
         "scrypt_n is the work factor"),
        # 0 is not "the default" (Identity.save refused it, Keyset.save wrote 2**17)
        (lambda: ks.save(path, "pw", scrypt_n=0), "scrypt_n must be a power of 2, not 0"),
        (lambda: Identity.generate().save(tmp_path / "id.json", "pw", scrypt_n=0),
         "scrypt_n must be a power of 2, not 0"),
    ]
    for attempt, message in refused:
        with pytest.raises(ValueError, match=message):
            attempt()
        assert not list(tmp_path.iterdir())
    ks.save(path, "pw", scrypt_n=FAST_N)
    with pytest.raises(ValueError, match="not both"):
        Keyset.load(path, "pw", kek=kek)
    with pytest.raises(ValueError, match="not both"):
        FileKeyProvider(path, "pw", kek=kek)
    # what a loaded keyset remembers counts: its passphrase takes scrypt_n, its KEK kek_id
    sealed = Keyset.load(path, "pw")
    with pytest.raises(ValueError, match="not 0"):  # nor with the remembered passphrase
        sealed.save(path, scrypt_n=0)
    sealed.save(path, scrypt_n=2 * FAST_N)
    assert json.loads(path.read_text())["protection"]["n"] == 2 * FAST_N
    with pytest.raises(ValueError, match="kek_id labels"):
        sealed.save(path, kek_id="hsm-7")
    with pytest.raises(ValueError, match="scrypt_n is the work factor"):
        sealed.save(path, unsealed=True, scrypt_n=FAST_N)
    ks.save(tmp_path / "kek.json", kek=kek)
    by_kek = Keyset.load(tmp_path / "kek.json", kek=kek)
    by_kek.save(tmp_path / "kek.json", kek_id="hsm-8")
    assert json.loads((tmp_path / "kek.json").read_text())["protection"]["kek_id"] == "hsm-8"
    with pytest.raises(ValueError, match="scrypt_n is the work factor"):
        by_kek.save(tmp_path / "kek.json", scrypt_n=FAST_N)


def test_data_key_cache_is_safe_from_many_threads(tmp_path, monkeypatch):
    """A filesystem's reader threads share one ResolvedKeys. At a full cache two threads
    evicting at once took the same oldest entry (KeyError), or one iterated while another
    inserted (RuntimeError). A cache of one or two entries is full at once, so eight
    threads over 64 envelopes evict all the time, and a tiny switch interval interleaves
    them finely: without the lock most rounds fail, and four rounds all passing by luck
    was never seen (each round takes a fraction of a second)."""
    import sys

    from gpucrypt.keys import portable

    keyset = Keyset.generate()
    keyset.save(tmp_path / "ks.json")
    deks = [keys.generate_dek() for _ in range(64)]
    envelopes = [keys.seal_envelope(dek, keyset) for dek in deks]
    failures: list[str] = []

    def read(resolved, offset: int) -> None:
        for i in range(2000):
            n = (i + offset) % len(envelopes)
            try:
                if resolved.data_key(envelopes[n]) != deks[n]:
                    failures.append(f"envelope {n}: another data key")
            except Exception as exc:  # collected: a thread's exception would be lost
                failures.append(repr(exc))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for cache_size in (1, 2, 1, 2):
            monkeypatch.setattr(portable, "_DATA_KEY_CACHE", cache_size)
            resolved = portable.KeyReferences(keyset=str(tmp_path / "ks.json")).resolve()
            threads = [threading.Thread(target=read, args=(resolved, 7 * k)) for k in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert len(resolved._data_keys) <= cache_size  # still bounded
            if failures:
                break
    finally:
        sys.setswitchinterval(interval)
    assert not failures, (len(failures), failures[:3])


# ------------------------------------------------------- forged envelopes and key providers


def _stanza_repeated(envelope: bytes, times: int) -> bytes:
    """``envelope`` (of one stanza) with that stanza written ``times`` times: bytes
    _envelope.encode refuses to make."""
    assert envelope[5] == 1
    return envelope[:5] + bytes([times]) + envelope[6:] * times


def test_an_envelope_with_a_stanza_twice_is_malformed():
    from gpucrypt.keys import EnvelopeError, _envelope

    dek, wk = keys.generate_dek(), keys.WrappingKey("k", os.urandom(32))
    once = keys.seal_envelope(dek, wk)
    twice = _stanza_repeated(once, 2)
    for call in (lambda: keys.open_envelope(twice, wk), lambda: keys.describe_envelope(twice)):
        with pytest.raises(EnvelopeError, match="^malformed envelope: two aes-kwp stanzas for "
                                                "the same recipient id$"):
            call()
    # the same id with another body (a forged copy) is the same recipient twice too
    [stanza] = _envelope.decode(once)
    forged = _envelope.Stanza(stanza.kind, stanza.recipient_id, os.urandom(40))
    with pytest.raises(ValueError, match="two aes-kwp stanzas"):  # no writer makes one
        _envelope.encode([stanza, forged])
    # the same id bytes under another stanza type are another recipient
    other = _envelope.Stanza("key-ref", stanza.recipient_id, os.urandom(40))
    assert _envelope.decode(_envelope.encode([stanza, other])) == [stanza, other]
    assert keys.open_envelope(_envelope.encode([other, stanza]), wk) == dek


class _CountingProvider:
    """An external key (registered as awskms's, by the fixture below) owning every stanza
    id under its prefix, as a PKCS#11 key whose URI names no token serial, or a KMS alias
    the caller may not describe: 255 forged ids are 255 distinct stanzas it owns. Records
    each unwrap as (stanza id, context); unwraps the body b"good:" + data key."""

    calls: list = []
    prefix = "awskms://arn:aws:kms:eu-west-1:111122223333:key/"

    @classmethod
    def from_uri(cls, parsed):
        return cls()

    def owns(self, stanza_id: str) -> bool:
        return stanza_id.startswith(self.prefix)

    def wrap(self, dek: bytes, context) -> tuple[str, bytes]:
        return self.prefix + "k", b"good:" + dek

    def unwrap(self, stanza_id: str, body: bytes, context) -> bytes:
        self.calls.append((stanza_id, tuple(sorted(context.items()))))
        if body.startswith(b"good:"):
            return body[5:]
        raise KeyUnavailable("the provider refused to unwrap (InvalidCiphertext)")


@pytest.fixture
def counting_provider(monkeypatch):
    import sys
    import types

    from gpucrypt.keys import references

    module = types.ModuleType("gpucrypt_test_counting_provider")
    module.Provider = _CountingProvider
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(references.PROVIDERS, "awskms", f"{module.__name__}:Provider")
    _CountingProvider.calls = []
    return _CountingProvider


def test_a_forged_envelope_costs_the_key_provider_one_call_per_stanza_and_context(
        counting_provider):
    """Nothing authenticates an envelope before a stanza opens (the header MAC needs the
    data key), so whoever can write a file can fill its envelope with stanzas naming the
    reader's HSM or KMS key. Each (key, stanza) is asked once per context, the same stanza
    written twice is malformed (no call at all), and one key reference is asked at most
    MAX_PROVIDER_UNWRAPS stanzas in one open: with the file context, then without."""
    from gpucrypt.keys import EnvelopeError, _envelope
    from gpucrypt.keys.recipients import MAX_PROVIDER_UNWRAPS, open_file_envelope

    prefix, salt = counting_provider.prefix, os.urandom(16)
    ref = keys.KeyReference(prefix + "k")
    same = [ref, keys.KeyReference(ref.uri), ref]  # one key, given three times

    def forged(n: int, good: bytes | None = None) -> bytes:
        stanzas = [_envelope.Stanza("key-ref", f"{prefix}{i}".encode(), os.urandom(100))
                   for i in range(n)]
        if good is not None:
            stanzas.append(_envelope.Stanza("key-ref", (prefix + "k").encode(), b"good:" + good))
        return _envelope.encode(stanzas)

    # 255 copies of one stanza: malformed, the provider never asked
    with pytest.raises(EnvelopeError, match="two key-ref stanzas"):
        open_file_envelope(_stanza_repeated(forged(1), 255), same, salt)
    assert counting_provider.calls == []
    # a few distinct stanzas: each asked once with the file context, once without
    with pytest.raises(keys.NoMatchingRecipient, match="refused to unwrap"):
        open_file_envelope(forged(3), same, salt)
    asked = counting_provider.calls
    assert len(asked) == 6 and len(set(asked)) == 6, asked
    assert {len(context) for _, context in asked} == {0, 1}
    # 255 distinct stanzas it owns: at most MAX_PROVIDER_UNWRAPS of them, per context
    asked.clear()
    with pytest.raises(keys.NoMatchingRecipient, match="the others were not tried"):
        open_file_envelope(forged(255), same, salt)
    assert len(asked) == 2 * MAX_PROVIDER_UNWRAPS and len(set(asked)) == len(asked), asked
    # what gpucrypt writes opens as before, a forged stanza or two in front of it included
    dek = keys.generate_dek()
    asked.clear()
    assert keys.open_envelope(keys.seal_envelope(dek, same), same) == dek
    assert len(asked) == 1
    assert keys.open_envelope(forged(MAX_PROVIDER_UNWRAPS - 1, good=dek), same) == dek


def test_seal_envelope_writes_each_recipient_once(counting_provider, tmp_path):
    """The same recipient given twice, or given as itself and as what it stands for, is
    wrapped once: no writer makes an envelope the reader refuses as malformed."""
    from gpucrypt.keys import _envelope

    identity, keyset = Identity.generate(), Keyset.generate()
    wk = keys.WrappingKey("ops", os.urandom(32))
    keyset.save(tmp_path / "ks.json")
    file_ref = keys.KeyReference(f"file://{tmp_path / 'ks.json'}")
    kms = keys.KeyReference(counting_provider.prefix + "k")
    dek = keys.generate_dek()
    envelope = keys.seal_envelope(dek, [identity.recipient, identity, identity.recipient,
                                        keyset, keyset.primary, file_ref, file_ref, wk, wk,
                                        kms, keys.KeyReference(kms.uri)])
    stanzas = _envelope.decode(envelope)  # no stanza twice: decodes
    assert [s.kind for s in stanzas] == ["hpke-x25519", "aes-kwp", "aes-kwp", "key-ref"]
    for opener in (identity, keyset, wk, kms):
        assert keys.open_envelope(envelope, opener) == dek
    with pytest.raises(ValueError, match="no other recipient"):
        passphrase = keys.Passphrase("pw", log_n=keys.passphrase.MAX_LOG_N)
        keys.seal_envelope(dek, [passphrase, passphrase])


# ------------------------------------------------------------------------------ passphrases

NFC = "Cr\u00e8me br\u00fbl\u00e9e 2024"  # "Crème brûlée 2024", composed
NFD = "Cre\u0300me bru\u0302le\u0301e 2024"  # the same text, decomposed


def _scrypt_stanza(secret: bytes, dek: bytes, log_n: int = 10):
    """A passphrase stanza made by hand (docs/KEYS.md) from the bytes ``secret``: what
    gpucrypt wrote before it normalised passphrases, given that text."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    from gpucrypt.keys import _envelope

    salt = os.urandom(16)
    key = Scrypt(salt=b"gpucrypt-passphrase-v1\x00" + salt, length=32, n=2 ** log_n, r=8,
                 p=1).derive(secret)
    body = ChaCha20Poly1305(key).encrypt(bytes(12), dek, None)
    return _envelope.encode([_envelope.Stanza("scrypt", salt + bytes([log_n]), body)])


def _counting_scrypt(monkeypatch) -> list:
    from gpucrypt.keys import passphrase

    derived, real = [], passphrase.Scrypt

    class Counted:
        def __init__(self, **kwargs):
            self._scrypt = real(**kwargs)

        def derive(self, key_material):
            derived.append(bytes(key_material))
            return self._scrypt.derive(key_material)

    monkeypatch.setattr(passphrase, "Scrypt", Counted)
    return derived


def _open_by_hand(envelope: bytes, secret: bytes) -> bytes:
    """docs/KEYS.md's construction, with cryptography alone, over the bytes ``secret``."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    from gpucrypt.keys import _envelope

    [stanza] = _envelope.decode(envelope)
    key = Scrypt(salt=b"gpucrypt-passphrase-v1\x00" + stanza.recipient_id[:16], length=32,
                 n=2 ** stanza.recipient_id[16], r=8, p=1).derive(secret)
    return ChaCha20Poly1305(key).decrypt(bytes(12), stanza.body, None)


def test_a_passphrase_is_the_same_in_nfc_and_nfd(fast_scrypt, monkeypatch):
    """Unicode has two spellings of "è" (one code point, or "e" and a combining accent),
    and keyboards, terminals and file systems differ in which they produce: both are one
    passphrase, sealed as NFC (docs/KEYS.md), and an NFC passphrase costs one scrypt."""
    assert NFC != NFD and NFC.encode() != NFD.encode()
    derived = _counting_scrypt(monkeypatch)
    for sealed_with, opened_with in ((NFC, NFD), (NFD, NFC), (NFD, NFD)):
        dek = keys.generate_dek()
        envelope = keys.seal_envelope(dek, keys.Passphrase(sealed_with, log_n=10))
        assert derived[-1] == NFC.encode()
        derived.clear()
        assert keys.open_envelope(envelope, keys.Passphrase(opened_with)) == dek
        assert derived == [NFC.encode()]  # the NFC form opened it: no second scrypt
        assert _open_by_hand(envelope, NFC.encode()) == dek  # scrypt over the NFC bytes
    # bytes are a passphrase as given (the caller chose them): not normalised
    envelope = keys.seal_envelope(keys.generate_dek(), keys.Passphrase(NFD.encode(), log_n=10))
    with pytest.raises(keys.NoMatchingRecipient, match="wrong passphrase"):
        keys.open_envelope(envelope, keys.Passphrase(NFC.encode()))


def test_a_file_sealed_with_a_passphrase_not_in_nfc_still_opens(monkeypatch):
    """Before passphrases were normalised, the text was derived as given: such a file opens
    with the same text, the retry as given costing a second scrypt only to a passphrase not
    in NFC whose NFC form failed; a wrong passphrase in NFC costs one."""
    dek = keys.generate_dek()
    old = _scrypt_stanza(NFD.encode(), dek)
    derived = _counting_scrypt(monkeypatch)
    assert keys.open_envelope(old, keys.Passphrase(NFD)) == dek
    assert derived == [NFC.encode(), NFD.encode()]
    derived.clear()
    with pytest.raises(keys.NoMatchingRecipient, match="wrong passphrase"):
        keys.open_envelope(old, keys.Passphrase("Creme brulee 2024"))
    assert len(derived) == 1
    # and ASCII (in NFC already) files are what they were
    assert keys.open_envelope(_scrypt_stanza(b"plain words", dek),
                              keys.Passphrase("plain words")) == dek


@pytest.mark.parametrize("data, text, earlier", [
    (b"pw\n", "pw", "pw"),
    (b"pw", "pw", "pw"),
    (b"pw\r\n", "pw", "pw"),  # text mode turned \r\n into \n, then stripped it
    (b"pw\n\n\r\n", "pw", "pw"),  # every line ending at the end, as before
    (b"pw\r", "pw", "pw"),
    (b"\xef\xbb\xbfpw\r\n", "pw", "\ufeffpw"),  # a byte order mark is no part of it
    (b"one\r\ntwo\rthree\n", "one\r\ntwo\rthree", "one\ntwo\nthree"),  # inside: as written
    (b"  spaced  \n", "  spaced  ", "  spaced  "),
    (b"\n", "", ""),
])
def test_a_passphrase_file_is_its_bytes_less_the_line_ending_and_byte_order_mark(
        data, text, earlier):
    from gpucrypt.keys import passphrase

    read = passphrase.from_file_bytes(data)
    assert read == text and type(read) is passphrase.PassphraseText
    # earlier: the text-mode read of gpucrypt before, which files it sealed were made from
    assert read.earlier == (() if earlier == text else (earlier,))
    assert repr(read) == "PassphraseText(...)"
    if text:
        assert passphrase.forms(read) == list(dict.fromkeys([text.encode(), earlier.encode()]))
    with pytest.raises(UnicodeDecodeError):
        passphrase.from_file_bytes(b"\xff" + data)


def test_a_sealed_keyset_opens_with_its_passphrase_in_either_spelling(tmp_path, fast_scrypt):
    """Sealed key files (keysets, identities) derive from the passphrase too: sealed with
    the NFD spelling, a keyset opened only with NFD; and one sealed from a passphrase
    file's earlier (text-mode) reading did not open once the file was read as bytes."""
    from gpucrypt.keys import passphrase

    ks = Keyset.generate()
    ks.save(tmp_path / "nfd.json", NFD)
    assert Keyset.load(tmp_path / "nfd.json", NFC).primary.id == ks.primary.id
    assert Keyset.load(tmp_path / "nfd.json", NFD).primary.id == ks.primary.id
    with_bom = "\ufeffpass\r\nword\r\n".encode()  # a byte order mark and a CRLF inside
    earlier = passphrase.from_file_bytes(with_bom).earlier[0]  # the text-mode reading
    ks.save(tmp_path / "earlier.json", earlier)  # as a keyset was sealed before
    assert Keyset.load(tmp_path / "earlier.json",
                       passphrase.from_file_bytes(with_bom)).primary.id == ks.primary.id
    with pytest.raises(KeysetError):
        Keyset.load(tmp_path / "earlier.json", "pass\r\nword")


def test_rekey_reencrypt_a_model_with_a_dtype_torch_lacks(tmp_path):
    """float8_e3m4 is ml_dtypes', not torch's: loading the model in torch failed with a raw
    AttributeError, and such a file could not be re-encrypted (so no one revoked on it).
    NumPy holds it; the bytes come back the same."""
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="the float8 kinds torch lacks are ml_dtypes'")
    import numpy as np

    from gpucrypt import models
    from gpucrypt.keys.recipients import open_file_envelope

    alice = Identity.generate()
    x = np.arange(10).astype(ml_dtypes.float8_e3m4)
    dek = keys.generate_dek()
    path = tmp_path / "m.gc"
    models.save_encrypted({"a": x}, path, dek, envelope=keys.seal_envelope(dek, [alice]))
    assert keys.rekey_file(path, recipients=[alice], identities=alice,
                           reencrypt=True)["reencrypted"]
    after = models.read_header(path)
    back = models.load_encrypted(path, open_file_envelope(after.envelope, alice, after.salt),
                                 device="cpu", framework="numpy")
    assert back["a"].dtype == x.dtype and back["a"].tobytes() == x.tobytes()


def test_paths_and_bytes_where_key_objects_go_say_what_to_load(tmp_path):
    """recipients=os.urandom(32) said "cannot wrap a data key for a int" (the bytes were
    iterated), and keyset="ks.json" or identities="alice" "cannot ... with a str"."""
    src = tmp_path / "plain"
    src.write_bytes(b"data")
    with pytest.raises(TypeError, match="recipients must be key objects, not bytes.*WrappingKey"):
        keys.encrypt_file(src, tmp_path / "out", recipients=os.urandom(32))
    with pytest.raises(TypeError, match=r"keyset= takes a Keyset, not a str: .*Keyset.load\('ks.json'\)"):
        keys.encrypt_file(src, tmp_path / "out", keyset="ks.json")
    sealed = tmp_path / "sealed"
    keys.encrypt_file(src, sealed, keyset=Keyset.generate())
    with pytest.raises(TypeError, match=r"with a str: .*load the file first"):
        keys.decrypt_file(sealed, tmp_path / "out", identities="alice")
    with pytest.raises(TypeError, match=r"keyset= takes a Keyset"):
        keys.decrypt_file(sealed, tmp_path / "out", keyset=tmp_path / "ks.json")
    assert not (tmp_path / "out").exists()


def test_stream_open_with_an_identity_or_a_keyset(tmp_path):
    """Random access to a file sealed for recipients: stream.open unwraps its data key with
    identity=/keyset= as decrypt_file does, and says what to pass otherwise."""
    data = os.urandom(3 * 4096 + 5)
    alice, ks = keys.Identity.generate(), keys.Keyset.generate()
    (tmp_path / "p").write_bytes(data)
    keys.encrypt_file(tmp_path / "p", tmp_path / "e", recipients=alice.recipient, keyset=ks,
                      segment_size=4096, device="cpu")
    for kw in ({"identity": alice}, {"keyset": ks}, {"identity": [keys.Identity.generate(), alice]}):
        with stream.open(tmp_path / "e", **kw) as f:
            f.seek(4090)
            assert f.read(20) == data[4090:4110]
    with pytest.raises(keys.NoMatchingRecipient):
        stream.open(tmp_path / "e", identity=keys.Identity.generate())
    with pytest.raises(ValueError, match="no key given"):
        stream.open(tmp_path / "e")
    log = io.StringIO()
    handler = audit.enable(log)
    try:  # which file was opened, by which stanza (as decrypt_file's file.decrypt says)
        stream.open(tmp_path / "e", identity=alice).close()
    finally:
        logging.getLogger(audit.LOGGER_NAME).removeHandler(handler)
    opened = [json.loads(line) for line in log.getvalue().splitlines()
              if json.loads(line)["operation"] == "file.open"]
    assert [(e["path"], e["key_id"]) for e in opened] == [(str(tmp_path / "e"), alice.fingerprint)]
    # a header that fails after its key was unwrapped is recorded as an error, not ok
    raw = bytearray((tmp_path / "e").read_bytes())
    raw[stream.read_header(bytes(raw)).header_length - 1] ^= 1  # the header MAC's last byte
    (tmp_path / "bad").write_bytes(bytes(raw))
    log = io.StringIO()
    handler = audit.enable(log)
    try:
        with pytest.raises(stream.AuthenticationError):
            stream.open(tmp_path / "bad", identity=alice)
    finally:
        logging.getLogger(audit.LOGGER_NAME).removeHandler(handler)
    opened = [json.loads(line) for line in log.getvalue().splitlines()
              if json.loads(line)["operation"] == "file.open"]
    assert [(e["outcome"], e["error"]) for e in opened] == [("error", "AuthenticationError")]
    with pytest.raises(ValueError, match="not both"):
        stream.open(tmp_path / "e", bytes(32), keyset=ks)
    stream.encrypt(data, str(tmp_path / "raw"), bytes(32), device="cpu")
    with pytest.raises(keys.NoMatchingRecipient, match="raw key.*open it with key="):
        stream.open(tmp_path / "raw", keyset=ks)


def test_file_functions_refuse_options_they_do_not_pass_on(tmp_path):
    """encrypt_file/decrypt_file make the data key, its id and envelope themselves: a key=,
    key_id= or envelope= given, or a misspelt option, is a TypeError naming their own
    options, before any key is sealed or opened, and nothing is written."""
    (tmp_path / "p").write_bytes(b"x" * 100)
    ks = keys.Keyset.generate()
    log = io.StringIO()
    handler = audit.enable(log)
    try:
        for kw, match in (({"key": bytes(32)}, "gpucrypt.stream.encrypt\\(src, dst, key\\)"),
                          ({"key_id": "x"}, "makes the file's data key"),
                          ({"envelope": b""}, "makes the file's data key"),
                          ({"algoritm": "aes-256-gcm"}, "'algoritm'.*algorithm, segment_size")):
            with pytest.raises(TypeError, match=match):
                keys.encrypt_file(tmp_path / "p", tmp_path / "e", keyset=ks, **kw)
        keys.encrypt_file(tmp_path / "p", tmp_path / "e2", keyset=ks, device="cpu")
        for kw, match in (({"key": bytes(32)}, "gpucrypt.stream.decrypt\\(src, dst, key\\)"),
                          ({"segment_size": 4096}, "'segment_size'.*device, threads")):
            with pytest.raises(TypeError, match=match):
                keys.decrypt_file(tmp_path / "e2", tmp_path / "o", keyset=ks, **kw)
    finally:
        logging.getLogger(audit.LOGGER_NAME).removeHandler(handler)
    assert sorted(os.listdir(tmp_path)) == ["e2", "p"]
    operations = [json.loads(line)["operation"] for line in log.getvalue().splitlines()]
    assert operations == ["envelope.seal", "file.encrypt"]  # the one call that ran


def test_a_keyset_is_not_saved_to_a_fifo(tmp_path):
    """Saving to a FIFO (say one it was read from) opened it to check for changes and
    waited forever for a writer: refused at once, naming what it is."""
    os.mkfifo(tmp_path / "ks.fifo")
    with pytest.raises(keys.KeysetError, match="is a FIFO: a keyset is saved to a regular file"):
        keys.Keyset.generate().save(tmp_path / "ks.fifo")
    # an identity loaded from a FIFO and saved back there checked it first: waited forever
    identity = keys.Identity.generate()
    identity.save(tmp_path / "id")
    os.mkfifo(tmp_path / "id.fifo")
    feeder = threading.Thread(target=lambda: (tmp_path / "id.fifo").write_bytes(
        (tmp_path / "id").read_bytes()), daemon=True)
    feeder.start()
    loaded = keys.Identity.load(tmp_path / "id.fifo")
    feeder.join(timeout=10)
    raised = []

    def save():  # in a thread: before the fix it waited forever
        try:
            loaded.save(tmp_path / "id.fifo", overwrite=True)
        except keys.KeysetError as exc:
            raised.append(exc)
    saver = threading.Thread(target=save, daemon=True)
    saver.start()
    saver.join(timeout=30)
    assert not saver.is_alive(), "Identity.save to a FIFO is waiting for a writer"
    assert len(raised) == 1 and "is a FIFO: a key file is saved to a regular file" in str(raised[0])


def test_a_passphrases_sealing_form_opens_only_what_it_seals():
    """``Passphrase.sealing_form()``: the one form a passphrase seals with (NFC text), at its
    work factors, without the forms that only open files of earlier versions (a text not
    in NFC as given, a passphrase file's earlier reading): DCP asks it whether a rank's
    passphrase sealed ``.metadata``, where any form opening it would pass a rank whose
    earlier reading is another rank's passphrase."""
    from gpucrypt.keys.passphrase import Passphrase, PassphraseText

    text = "cafe\u0301 pass"  # not NFC: sealing uses "caf\u00e9 pass"
    earlier = Passphrase(PassphraseText("old reading"), log_n=15)
    dek = os.urandom(32)
    by_earlier = earlier.wrap(dek)
    by_raw = Passphrase(text.encode("utf-8"), log_n=15).wrap(dek)  # before NFC, as given
    now = Passphrase(PassphraseText(text, ("old reading",)), log_n=15, max_log_n=16)
    assert now.unwrap(by_earlier) == dek and now.unwrap(by_raw) == dek  # every form opens
    sealing = now.sealing_form()
    assert (sealing.log_n, sealing.max_log_n) == (15, 16)
    for stanza in (by_earlier, by_raw):
        with pytest.raises(KeysetError, match="wrong passphrase"):
            sealing.unwrap(stanza)
    assert sealing.unwrap(now.wrap(dek)) == dek
    assert Passphrase("caf\u00e9 pass").unwrap(sealing.wrap(dek)) == dek


# ---------------------------------------------------------------- key files: the review of b783300


def test_a_wiped_kek_or_passphrase_buffer_changes_nothing(fast_scrypt, tmp_path):
    """A KEK or passphrase given as a bytearray was remembered by reference: a caller that
    wiped it after the call (the one way Python has to drop a secret) made the next plain
    save() seal every key under zeros, which anyone can guess, and a FileKeyProvider's
    first load fail. Each is a copy now."""
    real_kek, real_pw = os.urandom(32), b"correct horse"
    by_kek, by_pw = tmp_path / "kek.json", tmp_path / "pw.json"
    Keyset.generate().save(by_kek, kek=real_kek)
    Keyset.generate().save(by_pw, real_pw, scrypt_n=FAST_N)

    def wiped(secret: bytes):  # a bytearray of it, and what wipes it
        buffer = bytearray(secret)
        return buffer, lambda: buffer.__setitem__(slice(None), bytes(len(buffer)))

    for path, load in ((by_kek, lambda s: Keyset.load(by_kek, kek=s)),
                       (by_pw, lambda s: Keyset.load(by_pw, s))):
        buffer, wipe = wiped(real_kek if path == by_kek else real_pw)
        ks = load(buffer)  # loaded with the buffer, which is then wiped
        wipe()
        ks.add(primary=True)
        ks.save(path)
        assert len(load(real_kek if path == by_kek else real_pw)) == 2
        with pytest.raises(KeysetError, match="wrong passphrase or key-encryption key"):
            load(bytes(32) if path == by_kek else bytes(len(real_pw)))
    for path, secret in ((tmp_path / "kek2.json", {"kek": None}),
                         (tmp_path / "pw2.json", {"passphrase": None})):
        buffer, wipe = wiped(real_kek if "kek" in secret else real_pw)
        ks = Keyset.generate()
        if "kek" in secret:
            ks.save(path, kek=buffer)  # saved with the buffer, which is then wiped
        else:
            ks.save(path, buffer, scrypt_n=FAST_N)
        wipe()
        ks.add()
        ks.save(path)
        assert len(Keyset.load(path, kek=real_kek) if "kek" in secret
                   else Keyset.load(path, real_pw)) == 2
    buffer, wipe = wiped(real_kek)
    provider = FileKeyProvider(by_kek, kek=buffer)  # loads at its first use, after the wipe
    wipe()
    assert provider.get_key(Keyset.load(by_kek, kek=real_kek).primary.id)
    who = tmp_path / "alice"
    Identity.generate().save(who, real_pw, scrypt_n=FAST_N)
    buffer, wipe = wiped(real_pw)
    identity = Identity.load(who, buffer)
    wipe()
    identity.save(who)
    assert Identity.load(who, real_pw).fingerprint == identity.fingerprint


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0,
                    reason="gives a key file another user's owner: needs root")
def test_saving_over_a_key_file_keeps_its_owner_and_group(tmp_path, fast_scrypt):
    """`sudo gpucrypt keys add` on a service's keyset (svc:svc 0600) left a root-owned file
    the service could no longer read: an outage at the rotation. The owner and group are
    kept now, as data files rewritten in place keep theirs; the mode is 0600 again, or the
    old one where stricter (a group's or others' access is not carried over)."""
    uid, gid = 4242, 4343  # any ids but root's
    path, who = tmp_path / "ks.json", tmp_path / "alice"
    Keyset.generate().save(path)
    Identity.generate().save(who)
    for old_mode, new_mode in ((0o600, 0o600), (0o400, 0o400), (0o640, 0o600)):
        os.chown(path, uid, gid)
        os.chmod(path, old_mode)
        ks = Keyset.load(path)
        ks.add(primary=True)
        ks.save(path)
        st = os.stat(path)
        assert (st.st_uid, st.st_gid, _mode(path)) == (uid, gid, new_mode), old_mode
    os.chown(who, uid, gid)
    Identity.load(who).save(who, "pw", scrypt_n=FAST_N)  # sealed in place
    assert (os.stat(who).st_uid, os.stat(who).st_gid, _mode(who)) == (uid, gid, 0o600)
    Keyset.generate().save(tmp_path / "new.json")
    assert os.stat(tmp_path / "new.json").st_uid == 0  # a new file is the saver's


@pytest.mark.skipif(os.name != "posix" or os.geteuid() != 0,
                    reason="plants key files owned by another user: needs root")
def test_new_keys_saved_over_another_users_file_are_the_savers(tmp_path, fast_scrypt):
    """A save kept the owner of any file it wrote over, so a user who planted ks.json or
    id.json in a shared folder received the new private keys of root's
    `save(overwrite=True)` or `keygen --force`. The owner is kept now only for a key
    object's own file, unchanged since it was read (taken from the file locked and
    checked, not from whatever is at the path a moment later), and never in a folder
    others may write to: there a file's owner is whoever made it first."""
    from gpucrypt.keys import keyset as keyset_module

    planter = (4242, 4343)
    path, who, alice = tmp_path / "ks.json", tmp_path / "id.json", tmp_path / "alice.json"
    for planted in (path, who, tmp_path / "id.json.pub", alice):
        planted.write_text("planted\n")
        os.chown(planted, *planter)
        os.chmod(planted, 0o400)
    Keyset.generate().save(path, overwrite=True)
    Identity.generate().save(alice, overwrite=True)
    assert main(["keygen", "--public", "-o", str(who), "--force"]) == 0
    for written in (path, who, alice):
        st = os.stat(written)
        assert (st.st_uid, st.st_gid, _mode(written)) == (0, 0, 0o600), written

    # its own file, swapped for another user's after the check: the checked file's owner
    os.chown(path, *planter)
    ks = Keyset.load(path)
    ks.add(primary=True)
    real = keyset_module.write_key_file
    swapped = tmp_path / "swapped"

    def swap_then_write(*args, **kwargs):
        swapped.write_text("someone else's\n")
        os.chown(swapped, 5151, 5252)
        os.replace(swapped, path)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(keyset_module, "write_key_file", swap_then_write)
        ks.save(path)
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == planter

    # a folder anyone may write to (a /tmp): even its own file is not handed to its owner
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    mine = shared / "ks.json"
    Keyset.generate().save(mine)
    os.chown(mine, *planter)
    os.chmod(mine, 0o400)
    ks = Keyset.load(mine)
    ks.add(primary=True)
    ks.save(mine)
    st = os.stat(mine)
    assert (st.st_uid, st.st_gid, _mode(mine)) == (0, 0, 0o400)  # a stricter mode is kept


@pytest.mark.parametrize("refusal", [errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP])
def test_a_key_file_on_a_file_system_without_modes_is_saved_over_its_own(tmp_path,
                                                                           monkeypatch, refusal):
    """FAT and exFAT refuse chmod (fusefat: ENOSYS; the kernel's: EPERM): keeping a
    stricter mode failed the save of a keyset or identity over its own file (`keys add`:
    "gpucrypt keys: : Function not implemented"), as writing a new one never did. The
    mode is kept where it can be, skipped where it cannot; other errors still raise."""
    path, who = tmp_path / "ks.json", tmp_path / "id.json"
    Keyset.generate().save(path)
    Identity.generate().save(who)
    os.chmod(path, 0o400)
    os.chmod(who, 0o400)

    fchmod = os.fchmod

    def no_modes(fd, mode):  # the mode a new file has is taken; changing it is refused
        if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
            raise OSError(refusal, os.strerror(refusal))
        fchmod(fd, mode)

    monkeypatch.setattr(os, "fchmod", no_modes)
    ks = Keyset.load(path)
    ks.add(primary=True)
    ks.save(path)
    assert [k.id for k in Keyset.load(path)] == [k.id for k in ks]
    Identity.load(who).save(who)
    os.chmod(path, 0o400)  # (left 0600 by the save above)
    refusal = errno.EIO  # no_modes' refusal now: not one of a file system without modes
    with pytest.raises(OSError, match="Input/output error"):
        ks.save(path)


def test_only_a_key_files_own_save_keeps_its_stricter_mode(tmp_path):
    """The mode rule, for any user: a keyset or identity saved over its own file keeps a
    mode stricter than 0600 (0400 stays 0400) and drops the rest (0640 becomes 0600); new
    keys written with overwrite=True over a file they were not read from get a new 0600
    file, as a data file written with --force does."""
    path, who = tmp_path / "ks.json", tmp_path / "id.json"
    Keyset.generate().save(path)
    Identity.generate().save(who)
    for old_mode, new_mode in ((0o400, 0o400), (0o640, 0o600)):
        os.chmod(path, old_mode)
        ks = Keyset.load(path)
        ks.add(primary=True)
        ks.save(path)
        assert _mode(path) == new_mode, old_mode
        os.chmod(who, old_mode)
        Identity.load(who).save(who)
        assert _mode(who) == new_mode, old_mode
    os.chmod(path, 0o400)
    os.chmod(who, 0o400)
    Keyset.generate().save(path, overwrite=True)
    Identity.generate().save(who, overwrite=True)
    assert (_mode(path), _mode(who)) == (0o600, 0o600)
    stale, stale_identity = Keyset.load(path), Identity.load(who)
    Keyset.generate().save(path, overwrite=True)  # its own file, changed by another save
    Identity.generate().save(who, overwrite=True)
    os.chmod(path, 0o400)
    os.chmod(who, 0o400)
    stale.save(path, overwrite=True)
    stale_identity.save(who, overwrite=True)
    assert (_mode(path), _mode(who)) == (0o600, 0o600)


def test_an_identity_loaded_sealed_is_saved_sealed_again(fast_scrypt, tmp_path):
    """Identity.load(p, pw).save(p) wrote the private key in the clear over its sealed file,
    where a keyset in the same place stays sealed. An identity keeps its seal now (the
    passphrase and work factor); unsealed=True writes it in the clear, on purpose only."""
    who = tmp_path / "alice"
    Identity.generate().save(who, "a passphrase", scrypt_n=2 * FAST_N)
    loaded = Identity.load(who, "a passphrase")
    loaded.save(who)
    doc = json.loads(who.read_text())
    assert "private_key" not in doc and doc["protection"]["n"] == 2 * FAST_N
    assert Identity.load(who, "a passphrase").fingerprint == loaded.fingerprint
    loaded.save(who, scrypt_n=FAST_N)  # the remembered passphrase takes a work factor
    assert json.loads(who.read_text())["protection"]["n"] == FAST_N
    with pytest.raises(ValueError, match="unsealed=True writes the private key in the clear"):
        loaded.save(who, "a passphrase", unsealed=True)
    with pytest.raises(ValueError, match="scrypt_n is the work factor"):
        loaded.save(who, unsealed=True, scrypt_n=FAST_N)
    with pytest.raises(ValueError, match="power of 2"):
        loaded.save(who, scrypt_n=0)
    loaded.save(who, unsealed=True)
    assert "private_key" in json.loads(who.read_text())
    fresh = Identity.generate()
    fresh.save(tmp_path / "bob", "another", scrypt_n=FAST_N)
    fresh.save(tmp_path / "bob")  # sealed by its last save: sealed again
    assert "protection" in json.loads((tmp_path / "bob").read_text())


def test_a_non_canonical_x25519_key_is_refused(tmp_path):
    """An X25519 key with bit 255 set, or u at least 2**255 - 19, is the same point as its
    canonical encoding (RFC 7748 reduces it) under another fingerprint: sealing to it
    worked, and no one could open the file (HPKE binds the encoding). Refused, as a
    low-order point is, for the plain and the hybrid recipient."""
    from cryptography.hazmat.primitives.asymmetric import mlkem

    canonical = Identity.generate().recipient.public_bytes
    flipped = canonical[:31] + bytes([canonical[31] | 0x80])
    nine = (9).to_bytes(32, "little")  # the base point, canonical
    nine_again = (9 + 2**255 - 19).to_bytes(32, "little")  # the same point, bit 255 clear
    Recipient("x25519", nine)
    hybrid_public = mlkem.MLKEM768PrivateKey.generate().public_key().public_bytes_raw()
    for alias in (flipped, nine_again):
        with pytest.raises(ValueError, match="X25519 public key is not in canonical form"):
            Recipient("x25519", alias)
        with pytest.raises(ValueError, match="X25519 public key is not in canonical form"):
            Recipient("mlkem768-x25519", hybrid_public + alias)
    (tmp_path / "r.pub").write_text(json.dumps({
        "format": "gpucrypt-recipient", "version": 1, "kem": "x25519",
        "public_key": base64.b64encode(flipped).decode()}))
    with pytest.raises(KeysetError, match="r.pub: invalid public key \\(the X25519 public key "
                                          "is not in canonical form"):
        Recipient.load(tmp_path / "r.pub")


_KEYSET_HEAD = '{"format": "gpucrypt-keyset", "version": 1, '
_ENTRY = ('{"id": "00112233aabbccdd", "algorithm": "aes-256-kwp", "created": "x", '
          '"status": "primary", "material": "' + base64.b64encode(bytes(range(32))).decode()
          + '"}')


@pytest.mark.parametrize("content, message", [
    (_KEYSET_HEAD + '"keys": [' + _ENTRY[:-1] + ', "status": "disabled"}]}',
     "the member 'status' appears twice in one object"),
    (_KEYSET_HEAD + '"keys": [], "keys": [' + _ENTRY + ']}', "the member 'keys' appears twice"),
    ('{"format": "gpucrypt-keyset", "format": "gpucrypt-keyset", "version": 1, "keys": []}',
     "the member 'format' appears twice"),
    (_KEYSET_HEAD + '"keys": [' + _ENTRY + '], "n": NaN}', "it holds NaN, which JSON does not"),
    (_KEYSET_HEAD + '"keys": [' + _ENTRY + '], "n": -Infinity}', "it holds -Infinity"),
    ('{"format": "gpucrypt-keyset", "version": true, "keys": [' + _ENTRY + ']}',
     "version true is not supported"),
    ('{"format": "gpucrypt-keyset", "version": 1.0, "keys": [' + _ENTRY + ']}',
     "version 1.0 is not supported"),
    ('{"format": "gpucrypt-keyset", "version": "' + "1" * 200 + '", "keys": []}',
     'version "' + "1" * 63 + '... is not supported'),
])
def test_a_key_file_has_one_meaning(tmp_path, capsys, content, message):
    """Duplicate member names loaded (the last one winning, where a person, a diff or a
    first-wins reader sees the first: with the seal intact, as it authenticates what was
    parsed), and so did NaN, Infinity and "version": true or 1.0. Each is refused now, as
    a file gpucrypt does not read, naming why."""
    from gpucrypt.keys._document import UnreadableKeyFile

    path = tmp_path / "ks.json"
    path.write_text(content)
    for read in (Keyset.load, Keyset.inspect):
        with pytest.raises(UnreadableKeyFile, match=re.escape(message)):
            read(path)
    code, _, err = _cli(capsys, "keys", "list", path)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_a_sealed_key_file_with_a_member_twice_is_refused(fast_scrypt, tmp_path):
    """A duplicate inserted before the real member left a sealed keyset's seal intact (the
    last member won, and the seal covers what was parsed) while every first-wins reader
    saw the forged status; and an identity with two private keys loaded the second."""
    from gpucrypt.keys._document import UnreadableKeyFile

    path, who = tmp_path / "ks.json", tmp_path / "alice"
    ks = Keyset.generate()
    ks.save(path, "pw", scrypt_n=FAST_N)
    text = path.read_text()
    path.write_text(text.replace('"status": "primary"',
                                 '"status": "disabled", "status": "primary"', 1))
    with pytest.raises(UnreadableKeyFile, match="the member 'status' appears twice"):
        Keyset.load(path, "pw")
    Identity.generate().save(who)
    doc = who.read_text()
    other = base64.b64encode(os.urandom(32)).decode()
    who.write_text(doc.replace('"private_key"', f'"private_key": "{other}", "private_key"', 1))
    with pytest.raises(UnreadableKeyFile, match="the member 'private_key' appears twice"):
        Identity.load(who)


class _SameName(str):
    """A member name that json.dumps writes once for each time it is a key of a dict: two
    of them with the same text make one object with that member twice."""
    __hash__ = object.__hash__

    def __eq__(self, other):
        return self is other

    def __ne__(self, other):
        return self is not other


def test_the_sealed_part_is_read_as_strictly_as_the_file(fast_scrypt, tmp_path):
    """The sealed part, once opened, was parsed by a plain json.loads, where the file
    around it is read strictly: a member twice in it (the last one winning) loaded. Made
    here by sealing such bytes, as whoever held the secret could: refused, naming why."""
    from gpucrypt.keys._document import seal_document

    key = Keyset.generate().primary
    kek, other = os.urandom(32), base64.b64encode(os.urandom(32)).decode()
    public = {"format": "gpucrypt-keyset", "version": 1, "keys": [key.metadata()]}
    secret = {_SameName(key.id): other,
              _SameName(key.id): base64.b64encode(key.secret_bytes()).decode()}
    path = tmp_path / "ks.json"
    path.write_text(json.dumps(seal_document(public, secret, kek=kek)))
    assert path.read_text().count(key.id) == 1  # in the public part: the secret is sealed
    with pytest.raises(KeysetError, match=f"sealed part is not JSON gpucrypt reads "
                                          f"\\(the member '{key.id}' appears twice"):
        Keyset.load(path, kek=kek)

    who = tmp_path / "alice"
    Identity.generate().save(who)
    public = json.loads(who.read_text())
    real = public.pop("private_key")
    secret = {_SameName("private_key"): other, _SameName("private_key"): real}
    who.write_text(json.dumps(seal_document(public, secret, passphrase="pw",
                                            scrypt_n=FAST_N)))
    with pytest.raises(KeysetError, match="the member 'private_key' appears twice"):
        Identity.load(who, "pw")


def test_a_member_twice_among_many_is_found_at_once(tmp_path):
    """The duplicate was found with names.count() for each name, quadratic: a crafted
    0.77 MB .pub file someone sends kept `encrypt -r` busy for 30 s (a 2 MB one, minutes),
    and the member's name was echoed whole, however long. One pass with a set now, and
    the name is shortened. (Tens of seconds here would be the quadratic search back.)"""
    from gpucrypt.keys._document import UnreadableKeyFile

    long_name = "n" * 100_000
    members = "".join(f'"m{i}": 0, ' for i in range(50_000))
    pub = tmp_path / "bob.pub"
    pub.write_text('{"format": "gpucrypt-recipient", "version": 1, "kem": "x25519", '
                   + members + f'"{long_name}": 0, "{long_name}": 1}}')
    for read in (Recipient.load, lambda p: Keyset.inspect(p)):
        with pytest.raises(UnreadableKeyFile, match="appears twice") as caught:
            read(pub)
        message = str(caught.value)
        assert "'" + "n" * 64 + "...'" in message and len(message) < 400 + len(str(pub))


@pytest.mark.parametrize("found", [["gpucrypt-keyset"], {"a": 1}, 1, None])
def test_a_format_that_is_not_a_string_is_an_unreadable_key_file(tmp_path, capsys, found):
    """A list or an object as "format" was a TypeError ("unhashable type"), a traceback
    from `keys list` and `--keyset` (exit 1), missed by callers catching
    KeyManagementError. It is the documented UnreadableKeyFile (exit 2) now."""
    from gpucrypt.keys._document import UnreadableKeyFile

    path = tmp_path / "k.json"
    path.write_text(json.dumps({"format": found, "version": 1, "keys": []}))
    for read, kind in ((Keyset.load, "keyset"), (Keyset.inspect, "keyset"),
                       (Identity.load, "identity"), (Recipient.load, "recipient")):
        with pytest.raises(UnreadableKeyFile, match=f"k.json: not a gpucrypt-{kind} file$"):
            read(path)
    code, _, err = _cli(capsys, "keys", "list", path)
    assert code == 2 and err.count("\n") == 1 and "not a gpucrypt-keyset file" in err, err


def test_a_key_file_loaded_through_a_symbolic_link_is_saved_back_to_its_file(tmp_path, capsys,
                                                                            fast_scrypt):
    """A keyset loaded through a link (a `current` link, a mounted secret) could not be
    saved back: an OSError, not the KeysetError documented. Its own file is written through
    the link now (the link stays a link); a link at any other path is still refused,
    as outputs refuse links, with a KeysetError."""
    real, link = tmp_path / "keyset-v1.json", tmp_path / "keyset.json"
    Keyset.generate().save(real)
    link.symlink_to("keyset-v1.json")
    ks = Keyset.load(link)
    ks.add(primary=True)
    ks.save(link)
    assert link.is_symlink() and Keyset.load(real).primary.id == ks.primary.id
    assert _cli(capsys, "keys", "add", link, "--primary")[0] == 0
    assert link.is_symlink() and len(Keyset.load(real)) == 3
    who, who_link = tmp_path / "alice", tmp_path / "alice-current"
    Identity.generate().save(who)
    who_link.symlink_to("alice")
    identity = Identity.load(who_link)
    identity.save(who_link, "pw", scrypt_n=FAST_N)
    assert who_link.is_symlink() and "protection" in json.loads(who.read_text())
    # a link to a file the object was not read from: refused, nothing written
    elsewhere, other = tmp_path / "someone-else.json", tmp_path / "other.json"
    Keyset.generate().save(elsewhere)
    other.symlink_to("someone-else.json")
    before = elsewhere.read_bytes()
    for save in (lambda: Keyset.generate().save(other, overwrite=True),
                 lambda: ks.save(other, overwrite=True),
                 lambda: identity.save(other, overwrite=True)):
        with pytest.raises(KeysetError, match="other.json: it is a symbolic link"):
            save()
    assert elsewhere.read_bytes() == before and other.is_symlink()


def test_a_keyset_is_not_made_of_keys_it_could_not_save():
    """Keyset(...) took any algorithm and material: a key with no material failed its first
    wrap with an AssertionError, a "rot13" key wrapped with AES-KWP, and save() wrote files
    that load() refused. The constructor checks what load checks now."""
    from gpucrypt.keys import KeysetKey

    def key(algorithm="aes-256-kwp", status="primary", material=bytes(range(32)),
            created="2026-01-01T00:00:00Z"):
        return KeysetKey("00112233aabbccdd", algorithm, created, status, material)

    for bad, message in ((key(algorithm="rot13"), "unknown algorithm 'rot13'"),
                         (key(algorithm=["aes-256-kwp"]), "unknown algorithm"),
                         (key(material=None), "has no material"),
                         (key(material=b"12345"), "its material is 5 bytes"),
                         (key(material="0" * 32), "must be bytes (32 of them), not str"),
                         (key(status="destroyed"), "destroyed, and holds material"),
                         (key(created=2026), "created must be a str (an ISO 8601 UTC time)")):
        with pytest.raises(KeysetError, match=re.escape(message)):
            Keyset([bad])
    buffer = bytearray(range(32))
    ks = Keyset([key(material=buffer), KeysetKey("gone", "aes-256-kwp", "x", "destroyed", None)])
    buffer[:] = bytes(32)  # the caller's copy, wiped: the keyset's is its own
    assert ks.primary.secret_bytes() == bytes(range(32))


def test_malformed_key_material_is_said_as_what_it_is(tmp_path):
    """A scrypt stanza asking for 2**0 was said to be "above the limit", and an ML-KEM key
    of the right length that fails FIPS 203's modulus check was said to have the wrong
    length (cryptography's message). Each says what is wrong now."""
    from gpucrypt.keys import _envelope
    from gpucrypt.keys.passphrase import Passphrase

    envelope = _envelope.encode([_envelope.Stanza("scrypt", os.urandom(16) + b"\x00",
                                                  os.urandom(48))])
    with pytest.raises(NoMatchingRecipient, match="malformed passphrase stanza") as raised:
        keys.open_envelope(envelope, Passphrase("pw"))
    assert "above the limit" not in str(raised.value)
    recipient = Identity.generate("mlkem768-x25519").recipient
    public = bytearray(recipient.public_bytes)
    public[0], public[1] = 0xFF, public[1] | 0x0F  # a 12-bit coefficient of 4095 > q
    doc = recipient.to_json()
    doc["public_key"] = base64.b64encode(bytes(public)).decode()
    del doc["fingerprint"]
    (tmp_path / "r.pub").write_text(json.dumps(doc))
    with pytest.raises(KeysetError, match="r.pub: invalid public key \\(the ML-KEM-768 public "
                                          "key is invalid, a coefficient out of range") as raised:
        Recipient.load(tmp_path / "r.pub")
    assert "bytes long" not in str(raised.value)
