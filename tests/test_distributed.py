"""gpucrypt.distributed: encrypted torch.distributed.checkpoint (DCP) checkpoints.

One module-scoped run of 4 real gloo ranks (``tests/_dcp_worker.py``; forked, so that
the ranks share this process's imports) saves a sharded state dict (FSDP2 parameters,
DTensors sharded along either dimension, a replicated one, a Python value), loads it
back on 4 ranks, shows that a tampered file fails the load on every rank without
touching any rank's state (and that the ranks whose entries verified do not keep them
decrypted), reshards it onto 2 ranks and saves it again from there, and shows that
ranks sealing for different keysets, or passphrases, are refused before anything is
published, with every group of ranks named, the coordinator's too.
This process then loads both checkpoints into plain single-process state dicts
(4 -> 1 and 4 -> 2 -> 1) and runs the tamper cases on copies of the 2-rank one.

No GPU here: tensors are sealed and opened by the CPU backend. The GPU branch
(device tensors sealed on their own GPU) is gpucrypt.models' and is not exercised by
these tests, not even in the simulator (torch has no simulated CUDA tensors).
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pathlib
import pickle
import re
import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._extension import StreamTransformExtension
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

import _dcp_worker
from gpucrypt import keys
from gpucrypt.distributed import EncryptedReader, EncryptedWriter, EncryptionExtension
from gpucrypt.distributed.checkpoint import DATA_SUFFIX, METADATA_FORMAT, METADATA_VERSION
from gpucrypt.files._format import FormatError, TruncatedError
from gpucrypt.keys import NoMatchingRecipient

pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning",
    "ignore:Detected an existing checkpoint:UserWarning")

WORLD = 4
#: this process decrypts on the CPU (the ranks take device="auto"): "auto" would import
#: numba to probe for a GPU, seconds that the test says nothing with
CPU = "cpu"
SCENARIOS = ("save4", "load4", "tampered_load_changes_nothing",
             "failed_load_leaves_no_plaintext_staged", "reshard_to_two",
             "mixed_keys_are_refused", "a_stale_coordinator_is_not_singled_out",
             "passphrases_are_compared", "reshard_up_stages_only_its_parts",
             "public_key_saves_bind_every_rank")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run every rank scenario once per test session, even when pytest-xdist spreads this
    module over several workers (they share the session's folder, and a lock): (work
    folder, keyset, {rank: {scenario: outcome}})."""
    from filelock import FileLock  # torch's own dependency

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above every worker's own
    work = str(base / "dcp-ranks")
    with FileLock(str(base / "dcp-ranks.lock")):
        if not os.path.exists(os.path.join(work, "done")):
            shutil.rmtree(work, ignore_errors=True)
            os.makedirs(work)
            _run_ranks(work)
            open(os.path.join(work, "done"), "w").close()
    keyset = keys.Keyset.load(os.path.join(work, "keyset.json"))
    outcomes = {}
    for rank in range(WORLD):
        with open(os.path.join(work, f"rank{rank}.json")) as f:
            outcomes[rank] = json.load(f)
    return work, keyset, outcomes


def _run_ranks(work: str) -> None:
    keys.Keyset.generate().save(os.path.join(work, "keyset.json"))
    keys.Identity.generate().recipient.save(os.path.join(work, "alice.pub"))
    # imported here once, so that the forked ranks do not each import them again
    import torch.distributed.fsdp  # noqa: F401
    from gpucrypt.files import models

    models._check_device("auto")  # the GPU backend probe (numba) the readers' "auto" makes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() in a threaded process
        mp.start_processes(_dcp_worker.main, args=(WORLD, work), nprocs=WORLD,
                           start_method="fork")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_rank(ranks, scenario):
    _, _, outcomes = ranks
    failed = {rank: o.get(scenario, "did not run") for rank, o in outcomes.items()
              if o.get(scenario) != "ok"}
    assert not failed, "\n".join(f"rank {r}:\n{text}" for r, text in failed.items())


def _plain_state(fill: float = 0.0) -> dict:
    state = {name: torch.full_like(t, fill) for name, t in _dcp_worker.reference().items()}
    state["step"] = int(fill)
    return state


def _assert_reference(state: dict) -> None:
    for name, expected in _dcp_worker.reference().items():
        assert torch.equal(state[name], expected), name
    assert state["step"] == 41


@pytest.mark.parametrize("folder", ["ckpt4", "ckpt2"])
def test_single_process_loads_sharded_checkpoint(ranks, folder):
    """4 -> 1 and (4 -> 2) -> 1: plain full tensors in a process without a process group."""
    work, keyset, _ = ranks
    state = _plain_state()
    dcp.load(state, storage_reader=EncryptedReader(os.path.join(work, folder), keyset=keyset,
                                                   device=CPU))
    _assert_reference(state)


def _rank_file(folder: str, rank: int) -> str:
    """The name of a rank's data file (new to every save: ``__{rank}_{16 hex}.gcdistcp``)."""
    [name] = [n for n in os.listdir(folder)
              if re.fullmatch(rf"__{rank}_[0-9a-f]{{16}}{re.escape(DATA_SUFFIX)}", n)]
    return name


def test_checkpoint_holds_no_names_or_plaintext(ranks):
    work, _, _ = ranks
    folder = os.path.join(work, "ckpt4")
    files = sorted(os.listdir(folder))
    assert files == [".metadata"] + [_rank_file(folder, r) for r in range(WORLD)]
    embedding = _dcp_worker.reference()["embedding"].numpy().tobytes()
    for name in files:
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        for secret in (b"embedding", b"model.0.weight", embedding[:16]):
            assert secret not in data, (name, secret)


# ------------------------------------------------------------------ tamper cases


def _flip_at(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x80]))


def _truncate(path: str) -> None:
    os.truncate(path, os.path.getsize(path) - 10)


def _append(path: str) -> None:
    with open(path, "ab") as f:
        f.write(b"\x00" * 16)


def _swap(a: str, b: str) -> None:
    os.replace(a, a + ".x")
    os.replace(b, a)
    os.replace(a + ".x", b)


def _size(folder: str, name: str) -> int:
    return os.path.getsize(os.path.join(folder, name))


META = ".metadata"
# name: (change the folder, given {0: rank 0's file, 1: rank 1's}; the file the error must
# name, a rank or META; error type; words in its message (R1: rank 1's file's name))
TAMPER = {
    "flipped data byte, rank 0's file": (lambda d, r: _flip_at(f"{d}/{r[0]}", _size(d, r[0]) - 40),
                                          0, "AuthenticationError", "failed authentication"),
    "flipped data byte, rank 1's file": (lambda d, r: _flip_at(f"{d}/{r[1]}",
                                                               _size(d, r[1]) // 2 + 64),
                                          1, "AuthenticationError", "failed authentication"),
    "flipped header byte": (lambda d, r: _flip_at(f"{d}/{r[1]}", 120), 1, "AuthenticationError",
                            "header authentication failed"),
    "rank files swapped": (lambda d, r: _swap(f"{d}/{r[0]}", f"{d}/{r[1]}"), 0,
                           "AuthenticationError", "recorded as R1"),
    "truncated file": (lambda d, r: _truncate(f"{d}/{r[1]}"), 1, "TruncatedError", "truncated"),
    "bytes appended": (lambda d, r: _append(f"{d}/{r[0]}"), 0, "FormatError", "appended"),
    "data file missing": (lambda d, r: os.remove(f"{d}/{r[1]}"), 1, "FileNotFoundError",
                          "No such file"),
    "flipped metadata byte": (lambda d, r: _flip_at(f"{d}/{META}", _size(d, META) - 20),
                              META, "AssertionError", "failed authentication"),
    # every save names its data files anew: the other save's are not in this folder
    "metadata of another save": (lambda d, r: shutil.copyfile(f"{d}/../ckpt4/{META}",
                                                              f"{d}/{META}"),
                                 "__", "FileNotFoundError", "No such file"),
}


@pytest.fixture
def ckpt2_copy(ranks, tmp_path):
    work, keyset, _ = ranks
    copy = tmp_path / "ckpt2"
    shutil.copytree(os.path.join(work, "ckpt2"), copy)
    os.symlink(os.path.join(work, "ckpt4"), tmp_path / "ckpt4")
    return str(copy), keyset


def _failure(load) -> BaseException:
    """The one rank's error of a single-process DCP load that must fail."""
    with pytest.raises(CheckpointException) as info:
        load()
    (rank, (error, _)), = info.value.failures.items()
    assert rank == 0
    return error


@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_checkpoint_is_refused_and_state_untouched(ckpt2_copy, case):
    folder, keyset = ckpt2_copy
    change, culprit, kind, words = TAMPER[case]
    files = {rank: _rank_file(folder, rank) for rank in (0, 1)}
    culprit = files.get(culprit, culprit)
    words = words.replace("R1", files[1])
    change(folder, files)
    state = _plain_state(fill=5.0)
    error = _failure(lambda: dcp.load(
        state, storage_reader=EncryptedReader(folder, keyset=keyset, device=CPU)))
    assert type(error).__name__ == kind, repr(error)
    assert os.path.join(folder, culprit) in str(error) and words in str(error), str(error)
    for name, value in state.items():  # nothing was loaded, not even from the good files
        assert (value == 5) if name == "step" else bool((value.float() == 5.0).all()), name


def test_wrong_keyset_is_refused(ckpt2_copy):
    folder, _ = ckpt2_copy
    state = _plain_state(fill=5.0)
    error = _failure(lambda: dcp.load(
        state, storage_reader=EncryptedReader(folder, keyset=keys.Keyset.generate(), device=CPU)))
    # DCP reports a failed metadata read as an AssertionError that quotes gpucrypt's error
    assert f"{folder}/.metadata: no recipient in this file matches your key(s)" in str(error)
    assert bool((state["embedding"] == 5.0).all())
    # the typed error, as docs/DISTRIBUTED.md says: the reader's read_metadata, called directly
    with pytest.raises(NoMatchingRecipient, match=re.escape(f"{folder}/.metadata: no recipient")):
        EncryptedReader(folder, keyset=keys.Keyset.generate(), device=CPU).read_metadata()


def test_unrecorded_data_key_is_refused(ckpt2_copy, tmp_path):
    """A data file re-encrypted for the right keyset by someone else is still refused: its
    header is not the one the metadata recorded."""
    folder, keyset = ckpt2_copy
    other = tmp_path / "other"
    state = _plain_state(fill=1.0)
    state["step"] = 41
    dcp.save(state, storage_writer=EncryptedWriter(other, keyset=keyset))
    shutil.copyfile(other / _rank_file(other, 0), os.path.join(folder, _rank_file(folder, 0)))
    error = _failure(lambda: dcp.load(_plain_state(),
                                      storage_reader=EncryptedReader(folder, keyset=keyset,
                                                                     device=CPU)))
    assert type(error).__name__ == "AuthenticationError" and "another save" in str(error)


def _metadata_document(folder, identity) -> dict:
    """The decrypted .metadata of ``folder``: {"format", "version", "metadata", "files"}."""
    from gpucrypt.distributed.checkpoint import _MetadataUnpickler

    plain = io.BytesIO()
    keys.decrypt_file(os.path.join(folder, META), plain, identities=identity)
    return _MetadataUnpickler(io.BytesIO(plain.getvalue())).load()


def _forge_metadata(folder, document, recipient) -> None:
    """Seal ``document`` as ``folder``'s .metadata for ``recipient``: what anyone holding
    only the recipient's public key can do."""
    keys.encrypt_file(pickle.dumps(document, protocol=4), os.path.join(folder, META),
                      recipients=[recipient])


def test_metadata_pickled_by_python_3_13_loads(tmp_path):
    """Python 3.13 pickles a path as pathlib._local.PosixPath, which the metadata's
    unpickler refused (as a forgery): every checkpoint saved on 3.13 failed to load. The
    writer stores its path as a str now; a document holding 3.13's name (pickled here by
    hand: this Python has no such module) loads, on any Python."""
    alice = keys.Identity.generate()
    state = {"w": torch.arange(6.0)}
    dcp.save(state, storage_writer=EncryptedWriter(tmp_path, recipients=[alice.recipient]))
    document = _metadata_document(tmp_path, alice)
    assert document["metadata"].storage_meta.checkpoint_id == str(tmp_path)
    assert type(document["metadata"].storage_meta.checkpoint_id) is str
    document["metadata"].storage_meta.checkpoint_id = pathlib.PosixPath(tmp_path)
    pickled = pickle.dumps(document, protocol=4)
    as_313 = pickled.replace(b"\x8c\x07pathlib\x94", b"\x8c\x0epathlib._local\x94")
    assert as_313.count(b"pathlib._local") == 1
    keys.encrypt_file(as_313, os.path.join(tmp_path, META), recipients=[alice.recipient])
    out = {"w": torch.zeros(6)}
    dcp.load(out, storage_reader=EncryptedReader(tmp_path, identities=alice, device=CPU))
    assert torch.equal(out["w"], state["w"])


@pytest.mark.parametrize("where", ["parent", "absolute", "subfolder"])
def test_manifest_names_only_files_of_the_folder(tmp_path, where):
    """A .metadata sealed for a public key (anyone holding it can write one) whose
    manifest points at another file sealed for the same key, outside the checkpoint's
    folder: refused, naming the entry, before that file is opened."""
    from gpucrypt.distributed.checkpoint import EncryptedStorageInfo

    alice = keys.Identity.generate()
    elsewhere, folder = tmp_path / "elsewhere", tmp_path / "ckpt"
    dcp.save({"w": torch.arange(4.0) + 100},
             storage_writer=EncryptedWriter(elsewhere, recipients=[alice.recipient]))
    dcp.save({"w": torch.zeros(4)},
             storage_writer=EncryptedWriter(folder, recipients=[alice.recipient]))
    os.makedirs(folder / "sub")
    target = _rank_file(elsewhere, 0)
    name = {"parent": f"../elsewhere/{target}", "absolute": str(elsewhere / target),
            "subfolder": f"sub/{target}"}[where]
    shutil.copyfile(elsewhere / target, folder / "sub" / target)
    [info] = _metadata_document(elsewhere, alice)["metadata"].storage_data.values()
    identity = _metadata_document(elsewhere, alice)["files"][target]  # all public values
    document = _metadata_document(folder, alice)
    document["metadata"].storage_data = {index: EncryptedStorageInfo(name, info.entry)
                                         for index in document["metadata"].storage_data}
    document["files"] = {name: identity}
    _forge_metadata(folder, document, alice.recipient)
    state = {"w": torch.zeros(4)}
    error = _failure(lambda: dcp.load(state, storage_reader=EncryptedReader(
        folder, identities=alice, device=CPU)))
    assert f"its file list names {name!r}, which is not a data file" in str(error), str(error)
    assert not state["w"].any()
    with pytest.raises(FormatError, match=re.escape(f"{folder}/.metadata: malformed")):
        EncryptedReader(folder, identities=alice, device=CPU).read_metadata()


# ------------------------------------------------------------------ keys


def test_public_key_recipients_and_identities(tmp_path):
    alice, bob = keys.Identity.generate(), keys.Identity.generate("mlkem768-x25519")
    state = {"w": torch.randn(33, 7), "flags": torch.tensor([True, False]),
             "empty": torch.empty(0, 3), "meta": {"epoch": 3, "name": "run-1"}}
    dcp.save(state, storage_writer=EncryptedWriter(tmp_path,
                                                   recipients=[alice.recipient, bob.recipient],
                                                   device="cpu", algorithm="aes-256-gcm"))
    for identity in (alice, bob):
        out = {"w": torch.zeros(33, 7), "flags": torch.zeros(2, dtype=torch.bool),
               "empty": torch.empty(0, 3), "meta": {"epoch": 0, "name": ""}}
        dcp.load(out, storage_reader=EncryptedReader(tmp_path, identities=identity, device=CPU))
        assert torch.equal(out["w"], state["w"]) and torch.equal(out["flags"], state["flags"])
        assert out["meta"] == {"epoch": 3, "name": "run-1"}
    stranger = keys.Identity.generate()
    error = _failure(lambda: dcp.load({"w": torch.zeros(33, 7)},
                                      storage_reader=EncryptedReader(tmp_path, identities=stranger,
                                                                     device=CPU)))
    assert "no recipient in this file matches your key(s)" in str(error)


def test_writer_and_reader_refuse_to_pickle_keys(tmp_path):
    keyset = keys.Keyset.generate()
    for holder in (EncryptedWriter(tmp_path, keyset=keyset),
                   EncryptedReader(tmp_path, keyset=keyset, device=CPU),
                   EncryptionExtension(keyset=keyset),
                   EncryptedWriter(tmp_path, recipients=keys.Identity.generate().recipient)):
        with pytest.raises(TypeError, match="holds keys and cannot be pickled"):
            pickle.dumps(holder)


def test_async_save_with_the_thread_executor(tmp_path):
    keyset = keys.Keyset.generate()
    state = {"w": torch.randn(16, 4), "step": 2}
    dcp.async_save(state, storage_writer=EncryptedWriter(tmp_path, keyset=keyset,
                                                         device=CPU)).result()
    out = {"w": torch.zeros(16, 4), "step": 0}
    dcp.load(out, storage_reader=EncryptedReader(tmp_path, keyset=keyset, device=CPU))
    assert torch.equal(out["w"], state["w"]) and out["step"] == 2


def test_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="recipients= and/or keyset="):
        EncryptedWriter(tmp_path)
    with pytest.raises(ValueError, match="identities= and/or keyset="):
        EncryptedReader(tmp_path)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        EncryptedWriter(tmp_path, keyset=keys.Keyset.generate(), algorithm="rot13")
    with pytest.raises(ValueError, match="device must be"):
        EncryptedReader(tmp_path, keyset=keys.Keyset.generate(), device="tpu")


@pytest.mark.parametrize("argument, error", [
    ({"device": "bogus"}, "device must be one of"), ({"device": "cuda:1"}, "names one GPU"),
    ({"threads": 0}, "threads must be a positive int"), ({"overwrite": "yes"}, "overwrite")])
def test_writer_arguments_are_checked_when_made(tmp_path, argument, error):
    """A wrong argument fails where the writer is made, not inside dcp.save, wrapped in
    DCP's CheckpointException on every rank (and not after a save wrote anything)."""
    with pytest.raises((ValueError, TypeError), match=error):
        EncryptedWriter(tmp_path / "ckpt", keyset=keys.Keyset.generate(), **argument)
    assert not (tmp_path / "ckpt").exists()


def test_reader_names_a_plain_dcp_checkpoint(tmp_path):
    """EncryptedReader pointed at DCP's own checkpoint says what it is and what reads it."""
    keyset = keys.Keyset.generate()
    plain, extension = tmp_path / "plain", tmp_path / "extension"
    dcp.save({"w": torch.ones(2)}, storage_writer=FileSystemWriter(plain))
    dcp.save({"w": torch.ones(2)}, storage_writer=FileSystemWriter(
        extension, _extensions=[EncryptionExtension(keyset=keyset)]))
    with pytest.raises(FormatError, match=r"\.metadata: this looks like a plain \(unencrypted\) "
                                          r"DCP checkpoint.*FileSystemReader\(path\)"):
        EncryptedReader(plain, keyset=keyset, device=CPU).read_metadata()
    with pytest.raises(FormatError, match=r"with gpucrypt's EncryptionExtension.*"
                                          r"FileSystemReader\(path, _extension_registry="):
        EncryptedReader(extension, keyset=keyset, device=CPU).read_metadata()
    error = _failure(lambda: dcp.load({"w": torch.zeros(2)}, storage_reader=EncryptedReader(
        plain, keyset=keyset, device=CPU)))
    assert "plain (unencrypted) DCP checkpoint" in str(error)


def test_metadata_unpickles_only_dcp_classes(tmp_path):
    """Even authenticated metadata may hold nothing but DCP's classes and plain values."""
    keyset = keys.Keyset.generate()
    dcp.save({"w": torch.ones(3)}, storage_writer=EncryptedWriter(tmp_path, keyset=keyset))
    marker = tmp_path / "ran"
    evil = {"format": METADATA_FORMAT, "version": METADATA_VERSION,
            "metadata": _Runs(f"touch {marker}"), "files": {}}
    keys.encrypt_file(pickle.dumps(evil), str(tmp_path / ".metadata"), keyset=keyset)
    error = _failure(lambda: dcp.load({"w": torch.zeros(3)},
                                      storage_reader=EncryptedReader(tmp_path, keyset=keyset,
                                                                     device=CPU)))
    assert "posix.system, which is not part of DCP's metadata" in str(error)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["os.system", "os"])
def test_metadata_allows_its_classes_by_exact_name(tmp_path, name):
    """Pickle protocol 4 follows a dotted name attribute by attribute: DCP's metadata module
    imports os, so ``os.system`` inside it is os.system. Only the metadata's own classes
    are allowed, by exact name; a .metadata forged with only the reader's public key (a
    stream sealed for that recipient) runs nothing."""
    alice = keys.Identity.generate()
    dcp.save({"w": torch.ones(2)}, storage_writer=EncryptedWriter(tmp_path,
                                                                  recipients=[alice.recipient]))
    marker = tmp_path / "ran"
    module, command = b"torch.distributed.checkpoint.metadata", f"touch {marker}".encode()
    payload = (b"\x80\x04\x8c" + bytes([len(module)]) + module            # PROTO 4, module
               + b"\x8c" + bytes([len(name)]) + name.encode() + b"\x93"  # name, STACK_GLOBAL
               + b"\x8c" + bytes([len(command)]) + command + b"\x85R.")  # (command,) REDUCE
    keys.encrypt_file(payload, str(tmp_path / ".metadata"), recipients=[alice.recipient])
    with pytest.raises(FormatError, match=re.escape(f"metadata.{name}, which is not part of DCP")):
        EncryptedReader(tmp_path, identities=alice, device=CPU).read_metadata()
    assert not marker.exists()


@dataclasses.dataclass
class _Note:
    """A type of the caller's own in a state dict: torch.load(weights_only=True) refuses it
    unless allowed with torch.serialization.add_safe_globals."""

    text: str


def test_non_tensor_values_are_unpickled_weights_only(tmp_path):
    """DCP's planner unpickles non-tensor values with torch.load(weights_only=False); the
    reader hands it only values that torch.load(weights_only=True) accepted, so a pickle
    sealed by someone holding only the reader's public key runs nothing, and the load
    fails before any value of the state dict is written."""
    alice = keys.Identity.generate()
    marker = tmp_path / "ran"
    forged, own = tmp_path / "forged", tmp_path / "own"
    dcp.save({"w": torch.ones(2), "step": _Runs(f"touch {marker}")},
             storage_writer=EncryptedWriter(forged, recipients=[alice.recipient]))
    state = {"w": torch.zeros(2), "step": 0}
    error = _failure(lambda: dcp.load(state, storage_reader=EncryptedReader(
        forged, identities=alice, device=CPU)))
    assert type(error).__name__ == "FormatError", repr(error)
    assert "'step' is a pickle that torch.load(weights_only=True) refuses" in str(error)
    assert "posix.system" in str(error) and "non_tensors='pickle'" in str(error)
    assert not marker.exists() and state["step"] == 0 and not state["w"].any()

    dcp.save({"w": torch.ones(2), "note": _Note("hi"), "step": 3},
             storage_writer=EncryptedWriter(own, recipients=[alice.recipient]))
    out = {"w": torch.zeros(2), "note": None, "step": 0}
    error = _failure(lambda: dcp.load(out, storage_reader=EncryptedReader(
        own, identities=alice, device=CPU)))
    assert "add_safe_globals" in str(error) and out["note"] is None
    with torch.serialization.safe_globals([_Note]):   # the user's own type, allowed
        dcp.load(out, storage_reader=EncryptedReader(own, identities=alice, device=CPU))
    assert out == {"w": out["w"], "note": _Note("hi"), "step": 3} and out["w"].all()
    out = {"w": torch.zeros(2), "note": None, "step": 0}
    dcp.load(out, storage_reader=EncryptedReader(own, identities=alice, device=CPU,
                                                 non_tensors="pickle"))
    assert out["note"] == _Note("hi") and out["step"] == 3

    out = {"w": torch.zeros(2), "step": 0}
    error = _failure(lambda: dcp.load(out, storage_reader=EncryptedReader(
        own, identities=alice, device=CPU, non_tensors="refuse")))
    assert "non_tensors='refuse': load a state dict of tensors only" in str(error)
    assert out["step"] == 0 and not out["w"].any()
    tensors_only = {"w": torch.zeros(2)}
    dcp.load(tensors_only, storage_reader=EncryptedReader(own, identities=alice, device=CPU,
                                                          non_tensors="refuse"))
    assert tensors_only["w"].all()
    with pytest.raises(ValueError, match="non_tensors must be one of"):
        EncryptedReader(own, identities=alice, non_tensors="yes")


def test_weights_only_refusal_names_the_type(tmp_path):
    """torch's refusal opens with a paragraph pushing weights_only=False: the error gives
    the specific reason instead (the refused global) and how to allow that very type."""
    keyset = keys.Keyset.generate()
    dcp.save({"w": torch.ones(2), "note": _Note("hi")},
             storage_writer=EncryptedWriter(tmp_path, keyset=keyset, device=CPU))
    out = {"w": torch.zeros(2), "note": None}
    error = _failure(lambda: dcp.load(out, storage_reader=EncryptedReader(
        tmp_path, keyset=keyset, device=CPU)))
    name = f"{_Note.__module__}._Note"
    assert f"refuses (Unsupported global: GLOBAL {name} was not an allowed global by " \
           f"default). If {name} is a type of your own, allow it with " \
           f"torch.serialization.add_safe_globals([{name}])" in str(error), str(error)
    assert "In PyTorch 2.6" not in str(error) and out["note"] is None


def test_bytes_io_values_load_by_default(tmp_path):
    """io.BytesIO, a value DCP takes and plain DCP loads back, is a plain container of
    bytes: the reader loads it by default, without leaving it allowed for the process's
    other torch.load calls, and without removing the caller's own allowance."""
    keyset = keys.Keyset.generate()
    dcp.save({"w": torch.ones(2), "rng": io.BytesIO(b"rng-state")},
             storage_writer=EncryptedWriter(tmp_path, keyset=keyset, device=CPU))
    out = {"w": torch.zeros(2), "rng": io.BytesIO()}
    dcp.load(out, storage_reader=EncryptedReader(tmp_path, keyset=keyset, device=CPU))
    assert out["rng"].getvalue() == b"rng-state" and out["w"].all()
    assert io.BytesIO not in torch.serialization.get_safe_globals()
    with torch.serialization.safe_globals([io.BytesIO]):
        dcp.load(out, storage_reader=EncryptedReader(tmp_path, keyset=keyset, device=CPU))
        assert io.BytesIO in torch.serialization.get_safe_globals()


def test_a_failed_save_leaves_the_previous_checkpoint_whole(tmp_path):
    """Every save writes its data files under names of its own and publishes .metadata
    last: a save that fails before its .metadata leaves the previous checkpoint as it
    was. The next save that succeeds removes the data files no .metadata refers to (the
    failed save's, the previous one's), and nothing else."""
    keyset = keys.Keyset.generate()

    def save(value):
        dcp.save({"w": torch.full((4,), value), "step": int(value)},
                 storage_writer=EncryptedWriter(tmp_path, keyset=keyset, device=CPU))

    def loaded():
        state = {"w": torch.zeros(4), "step": 0}
        dcp.load(state, storage_reader=EncryptedReader(tmp_path, keyset=keyset, device=CPU))
        return state["w"].tolist(), state["step"]

    def data_files():
        return sorted(n for n in os.listdir(tmp_path) if n.endswith(DATA_SUFFIX))

    save(1.0)
    first = data_files()
    (tmp_path / "notes.txt").write_text("not the writer's")
    # publishing the new .metadata fails for real: a symbolic link is never replaced
    os.replace(tmp_path / META, tmp_path / "metadata.1")
    os.symlink("metadata.1", tmp_path / META)
    with pytest.raises(CheckpointException, match="symbolic link"):
        save(2.0)
    assert loaded() == ([1.0] * 4, 1)  # the previous checkpoint, whole
    os.replace(tmp_path / "metadata.1", tmp_path / META)
    assert len(data_files()) == 2  # the first save's and the failed save's

    save(3.0)
    assert loaded() == ([3.0] * 4, 3)
    [last] = data_files()
    assert sorted(os.listdir(tmp_path)) == sorted([META, "notes.txt", last]) and [last] != first


class _KeptOpen(io.BytesIO):
    """DCP hands a transform a stream whose close() only flushes; so does this one."""

    def close(self):
        pass


class _Runs:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.cudasim
def test_sealed_by_the_gpu_backend_opens_on_the_cpu(tmp_path):
    """``device="gpu"`` reaches the model files' GPU sealing (numba's simulator where there
    is no GPU; host tensors, staged by the pipeline's GPU runner): the files it writes
    load on the CPU, byte for byte."""
    keyset = keys.Keyset.generate()
    state = {"w": torch.randn(8, 8), "step": 3}
    dcp.save(state, storage_writer=EncryptedWriter(tmp_path, keyset=keyset, device="gpu"))
    out = {"w": torch.zeros(8, 8), "step": 0}
    dcp.load(out, storage_reader=EncryptedReader(tmp_path, keyset=keyset, device=CPU))
    assert torch.equal(out["w"], state["w"]) and out["step"] == 3


# ------------------------------------------------------------------ the extension form


def test_extension_with_stock_writer_and_reader(tmp_path):
    keyset = keys.Keyset.generate()
    state = {"w": torch.randn(64, 40), "b": torch.arange(7, dtype=torch.bfloat16), "step": 9}
    ext = EncryptionExtension(keyset=keyset, segment_size=4096)  # several segments per item
    dcp.save(state, storage_writer=FileSystemWriter(tmp_path, _extensions=[ext]))
    with open(tmp_path / "__0_0.distcp", "rb") as f:
        assert state["w"].numpy().tobytes()[:32] not in f.read()

    out = {"w": torch.zeros(64, 40), "b": torch.zeros(7, dtype=torch.bfloat16), "step": 0}
    reader_side = EncryptionExtension(keyset=keyset)  # a reader needs only its keys
    dcp.load(out, storage_reader=FileSystemReader(tmp_path,
                                                  _extension_registry=reader_side.registry()))
    assert torch.equal(out["w"], state["w"]) and torch.equal(out["b"], state["b"])
    assert out["step"] == 9

    error = _failure(lambda: dcp.load(out, storage_reader=FileSystemReader(tmp_path)))
    assert "Unknown extension" in str(error)  # DCP's own registry does not know it
    error = _failure(lambda: dcp.load(out, storage_reader=FileSystemReader(
        tmp_path,
        _extension_registry=EncryptionExtension(keyset=keys.Keyset.generate()).registry())))
    assert "no recipient in this file matches your key(s)" in str(error)

    data = tmp_path / "__0_0.distcp"
    _flip_at(str(data), os.path.getsize(data) // 2)
    error = _failure(lambda: dcp.load(out, storage_reader=FileSystemReader(
        tmp_path, _extension_registry=reader_side.registry())))
    assert type(error).__name__ == "AuthenticationError"


def test_extension_stream_is_random_access(tmp_path):
    """Each item is a gpucrypt stream: a reader opens only the segments it reads."""
    from gpucrypt import stream

    keyset = keys.Keyset.generate()
    ext = EncryptionExtension(keyset=keyset, segment_size=4096)
    raw = _KeptOpen()
    payload = os.urandom(3 * 4096 + 100)
    with ext.transform_to(raw) as sink:
        sink.write(payload[:10])
        sink.write(payload[10:])
    sealed = raw.getvalue()
    header = stream.read_header(sealed)
    key = keys.open_envelope(header.envelope, keyset)
    assert stream.decrypt(sealed, io.BytesIO(), key) == header
    # tamper segment 0: a read of segment 2 still succeeds, a read of segment 0 fails
    broken = bytearray(sealed)
    broken[header.header_length + 5] ^= 1
    reader = ext.transform_from(io.BytesIO(bytes(broken)))
    reader.seek(2 * 4096)
    assert reader.read(50) == payload[2 * 4096:2 * 4096 + 50]
    reader.seek(0)
    with pytest.raises(stream.AuthenticationError, match="segment 0"):
        reader.read(10)


def test_extension_completes_an_item_only_on_an_explicit_close():
    """An item cut short is never sealed as complete: a ``with`` block left by an
    exception, or a writer dropped unclosed (DCP's ``_write_item`` when serialisation
    fails), leaves a stream without its final segment, which the reader refuses; the
    explicit ``close()`` DCP makes after a successful write seals it whole."""
    import gc

    from gpucrypt import stream

    keyset = keys.Keyset.generate()
    ext = EncryptionExtension(keyset=keyset, segment_size=4096)
    reader_side = EncryptionExtension(keyset=keyset)
    payload = os.urandom(3 * 4096 + 100)

    def refused(sealed: bytes) -> None:
        key = keys.open_envelope(stream.read_header(sealed).envelope, keyset)
        with pytest.raises(stream.TruncatedError):
            stream.decrypt(sealed, io.BytesIO(), key)
        with pytest.raises(stream.TruncatedError):
            reader_side.transform_from(io.BytesIO(sealed)).readall()

    for cut in (100, 5000):  # inside the first segment; after a whole one was sealed
        raw = _KeptOpen()
        with pytest.raises(RuntimeError):
            with ext.transform_to(raw) as sink:
                sink.write(payload[:cut])
                raise RuntimeError("torch.save failed half way")
        assert sink.closed
        refused(raw.getvalue())

    raw = _KeptOpen()

    def write_item():
        sink = ext.transform_to(raw)
        sink.write(payload[:9000])
        raise RuntimeError("serialisation failed")

    try:
        write_item()
    except RuntimeError:
        pass
    gc.collect()  # the writer, held by the exception's frames until now, is collected
    refused(raw.getvalue())

    raw = _KeptOpen()
    sink = ext.transform_to(raw)
    sink.write(payload[:9000])
    sink.close()
    assert reader_side.transform_from(io.BytesIO(raw.getvalue())).readall() == payload[:9000]


class _Framing(StreamTransformExtension):
    """A transform that, like a compressor, writes a frame even for an empty item: placed
    after gpucrypt's (compress, then encrypt), it feeds gpucrypt's writer every item."""

    @staticmethod
    def registry_name() -> str:
        return "test.framing"

    @staticmethod
    def from_descriptor(version: str) -> "_Framing":
        return _Framing()

    def get_descriptor(self) -> str:
        return "test.framing/1"

    def transform_to(self, output):
        class Writer(io.RawIOBase):
            def writable(self):
                return True

            def write(self, data):
                return output.write(data)

            def close(self):
                if not self.closed:
                    output.write(b"FRAME-END")
                    output.close()
                super().close()

        return Writer()

    def transform_from(self, input):  # noqa: A002 - DCP's name
        raise NotImplementedError("this test only saves")


@pytest.mark.parametrize("framed", [False, True], ids=["alone", "behind-another-extension"])
def test_extension_refuses_a_writer_that_bypasses_it(tmp_path, framed):
    """With serialization_format=SAFETENSORS DCP writes tensors with safetensors.save
    straight into the file, past every extension: the save fails before any tensor is
    written, and nothing under the folder holds the plaintext."""
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    marker = b"TOPSECRETMARKER!"
    state = {"w": torch.arange(64, dtype=torch.float32), "step": 3,
             "tag": torch.frombuffer(bytearray(marker), dtype=torch.uint8)}
    ext = EncryptionExtension(keyset=keys.Keyset.generate())
    writer = FileSystemWriter(tmp_path, _extensions=[ext, _Framing()] if framed else [ext],
                              serialization_format=SerializationFormat.SAFETENSORS)
    with pytest.raises(CheckpointException) as info:
        dcp.save(state, storage_writer=writer)
    (error, _), = info.value.failures.values()
    assert "serialization_format=SerializationFormat.SAFETENSORS" in str(error), str(error)
    assert "EncryptedWriter" in str(error)
    floats = state["w"].numpy().tobytes()
    for file in (f for f in tmp_path.rglob("*") if f.is_file()):
        data = file.read_bytes()
        assert marker not in data and floats[:32] not in data and b'"w"' not in data, file


def test_extension_refuses_an_item_closed_unwritten():
    """The second wall, for a caller whose format the extension cannot see: DCP closes an
    item without writing it only when it writes the item's bytes itself. Such an item is
    refused and left incomplete; an empty item that was written (zero bytes) is sealed."""
    keyset = keys.Keyset.generate()
    ext, reader_side = EncryptionExtension(keyset=keyset), EncryptionExtension(keyset=keyset)
    raw = _KeptOpen()
    sink = ext.transform_to(raw)
    with pytest.raises(ValueError, match="closed without being written.*SAFETENSORS"):
        sink.close()
    assert sink.closed
    with pytest.raises(TruncatedError):
        reader_side.transform_from(io.BytesIO(raw.getvalue())).readall()

    raw = _KeptOpen()
    sink = ext.transform_to(raw)
    sink.write(b"")
    sink.close()
    assert reader_side.transform_from(io.BytesIO(raw.getvalue())).readall() == b""


def test_auto_device_follows_the_targets():
    """device="auto" decrypts an entry on the GPU only for CUDA targets (and a usable GPU):
    CPU targets (offloaded parameters, optimizer state) are not staged in GPU memory."""
    from gpucrypt.distributed.checkpoint import _auto_device

    cpu, cuda, cuda1 = torch.device("cpu"), torch.device("cuda"), torch.device("cuda", 1)
    assert _auto_device([cpu], gpu_usable=True) == "cpu"
    assert _auto_device([cpu, cpu], gpu_usable=True) == "cpu"
    assert _auto_device([cuda], gpu_usable=True) == "cuda"
    assert _auto_device([cuda1, cuda1], gpu_usable=True) == "cuda:1"
    assert _auto_device([cuda1, torch.device("cuda", 0)], gpu_usable=True) == "cuda:1"
    assert _auto_device([cuda1, cpu], gpu_usable=True) == "cpu"  # the host gets it anyway
    assert _auto_device([torch.device("meta")], gpu_usable=True) == "cpu"
    assert _auto_device([], gpu_usable=True) == "cpu"  # a non-tensor value: unpickled here
    assert _auto_device(None, gpu_usable=True) == "cuda"  # targets not seen: as for GPU ones
    for targets in ([cpu], [cuda1], [], None):
        assert _auto_device(targets, gpu_usable=False) == "cpu"


class _DevicesSeen(EncryptedReader):
    """An EncryptedReader that records the planner each decryption had and the devices
    each data file's entries were decrypted on."""

    def _open_entries(self, items, planner, skip=()):
        self.planners.append(planner)
        return super()._open_entries(items, planner, skip)

    def _open_file(self, name, by_device):
        self.devices.update(by_device)
        return super()._open_file(name, by_device)


def test_auto_sees_the_targets_before_the_plan_is_gathered(tmp_path):
    """prepare_local_plan, which decrypts before DCP gathers the plans, has the load's own
    planner (DCP hands a reader its planner only in read_data), so "auto" decides by the
    targets' devices: CPU tensors here, decrypted on the CPU, the pickle too."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    keyset = keys.Keyset.generate()
    state = {"a": torch.arange(6.0), "b": torch.ones(2, 3, dtype=torch.bfloat16), "step": 4}
    dcp.save(state, storage_writer=EncryptedWriter(tmp_path, keyset=keyset, device=CPU))
    reader = _DevicesSeen(tmp_path, keyset=keyset, device="auto")
    reader.planners, reader.devices = [], {}
    planner = DefaultLoadPlanner()
    out = {"a": torch.zeros(6), "b": torch.zeros(2, 3, dtype=torch.bfloat16), "step": 0}
    dcp.load(out, storage_reader=reader, planner=planner)
    assert torch.equal(out["a"], state["a"]) and torch.equal(out["b"], state["b"])
    assert out["step"] == 4
    assert reader.planners[0] is planner  # prepare_local_plan's: every entry, decided by it
    assert list(reader.devices) == ["cpu"] and len(reader.devices["cpu"]) == 3


class _StagingSeen(EncryptedReader):
    """An EncryptedReader that keeps a reference to what it staged, to look at it after."""

    def prepare_local_plan(self, plan):
        plan = super().prepare_local_plan(plan)
        self.seen = list(self._staged.values())
        return plan


def test_a_load_failing_while_copying_zeroes_what_was_staged(tmp_path):
    """An error of the planner in the middle of read_data (after some tensors were
    copied into place): the decrypted entries it had not yet copied are zeroed, not left
    in the traceback's frame."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class Failing(DefaultLoadPlanner):
        def commit_tensor(self, read_item, tensor):
            raise RuntimeError("the planner failed while loading")

    keyset = keys.Keyset.generate()
    state = {"a": torch.arange(1, 65, dtype=torch.float32), "b": torch.ones(8, 8)}
    dcp.save(state, storage_writer=EncryptedWriter(tmp_path, keyset=keyset))
    reader = _StagingSeen(tmp_path, keyset=keyset, device=CPU)
    error = _failure(lambda: dcp.load({"a": torch.zeros(64), "b": torch.zeros(8, 8)},
                                      storage_reader=reader, planner=Failing()))
    assert "the planner failed" in str(error)
    assert len(reader.seen) == 2 and not any(bool(t.any()) for t in reader.seen)


# ------------------------------------------------------------------ review findings


def _fifo_in_place(folder, which: str) -> str:
    """Replace the checkpoint's ``.metadata`` or its data file by a FIFO; its path."""
    name = META if which == "metadata" else _rank_file(folder, 0)
    path = os.path.join(folder, name)
    os.remove(path)
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("which", ["metadata", "data"])
def test_a_fifo_in_place_of_a_checkpoint_file_is_refused_at_once(tmp_path, which):
    """A FIFO put in place of a checkpoint file (by whoever can write to its folder) is
    refused when opened, naming it once: a blocking open of .metadata waited for a
    writer forever, and with it every rank's load."""
    import threading

    keyset = keys.Keyset.generate()
    dcp.save({"w": torch.ones(3)}, storage_writer=EncryptedWriter(tmp_path, keyset=keyset))
    path = _fifo_in_place(tmp_path, which)
    outcome = []

    def load():
        try:
            dcp.load({"w": torch.zeros(3)},
                     storage_reader=EncryptedReader(tmp_path, keyset=keyset, device=CPU))
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            outcome.append(exc)

    loading = threading.Thread(target=load, daemon=True)
    loading.start()
    loading.join(timeout=10)
    hung = loading.is_alive()
    for _ in range(100):  # let a hung open go: a writer opens the FIFO and closes it at once
        if not loading.is_alive():
            break
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader has it open at this instant
            pass
        loading.join(timeout=0.1)
    assert not hung, f"the load waited on the FIFO at {path}"
    [error] = outcome
    assert isinstance(error, CheckpointException), repr(error)
    message = str(error)
    assert "this is a FIFO, not a regular file" in message, message
    assert message.count(path) == 1, message  # was "PATH: PATH is a FIFO"


def test_load_bumps_the_autograd_version_of_its_targets(tmp_path):
    """Loading writes into the caller's tensors in place; like DCP's own reader (copy_),
    it tells autograd so, and a backward through values saved before the load fails
    instead of computing with the loaded ones (the memcpy fast path did not)."""
    keyset = keys.Keyset.generate()
    dcp.save({"w": torch.full((3,), 2.0)},
             storage_writer=EncryptedWriter(tmp_path, keyset=keyset, device=CPU))
    w = torch.nn.Parameter(torch.ones(3))
    loss = (w * w).sum()  # saves w for backward
    version = w._version
    dcp.load({"w": w}, storage_reader=EncryptedReader(tmp_path, keyset=keyset, device=CPU))
    assert torch.equal(w.detach(), torch.full((3,), 2.0))
    assert w._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_plain_shards_left_beside_an_encrypted_save_are_warned_of(tmp_path):
    """An encrypted save into a folder holding a plain DCP checkpoint says that its data
    files, which hold plaintext, are still there (it does not remove what it did not
    write); one holding EncryptionExtension's sealed files is not warned of."""
    keyset = keys.Keyset.generate()
    plain, sealed = tmp_path / "plain", tmp_path / "sealed"
    dcp.save({"w": torch.full((4,), 1234.5)}, storage_writer=FileSystemWriter(plain))
    with pytest.warns(UserWarning, match=r"plain \(unencrypted\) checkpoint: __0_0\.distcp\. "
                                         r"They hold its tensors in plaintext and were not "
                                         r"removed"):
        dcp.save({"w": torch.full((4,), 1234.5)},
                 storage_writer=EncryptedWriter(plain, keyset=keyset, device=CPU))
    assert (plain / "__0_0.distcp").exists()

    dcp.save({"w": torch.ones(4)}, storage_writer=FileSystemWriter(
        sealed, _extensions=[EncryptionExtension(keyset=keyset)]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dcp.save({"w": torch.ones(4)},
                 storage_writer=EncryptedWriter(sealed, keyset=keyset, device=CPU))
    assert not [w for w in caught if "plaintext" in str(w.message)], caught
    assert (sealed / "__0_0.distcp").exists()


def test_keys_that_are_no_model_file_names_save_and_load(tmp_path):
    """State-dict keys DCP saves but a model file cannot name an entry by (over 64 KiB of
    UTF-8 with or without the chunk's offsets, a lone surrogate) are stored under an
    entry name of their own; the metadata maps each key to it."""
    from gpucrypt.files.models import MAX_NAME_BYTES

    keyset = keys.Keyset.generate()
    state = {"b" * 70000: torch.arange(2.0), "c" * (MAX_NAME_BYTES - 1): torch.arange(3.0),
             "w\udc80": torch.arange(4.0), "<item 0>": torch.arange(5.0), "ok": torch.arange(6.0),
             "x" * 70000 + "-step": 7}
    dcp.save(state, storage_writer=EncryptedWriter(tmp_path, keyset=keyset, device=CPU))
    out = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in state.items()}
    dcp.load(out, storage_reader=EncryptedReader(tmp_path, keyset=keyset, device=CPU))
    for name, value in state.items():
        assert (torch.equal(out[name], value) if isinstance(value, torch.Tensor)
                else out[name] == value), name[:20]


@pytest.fixture
def audit_events():
    """The audit events emitted during the test (the audit logger at INFO, one handler)."""
    from gpucrypt import audit

    logger, events = logging.getLogger(audit.LOGGER_NAME), []
    handler, old_level = logging.Handler(logging.INFO), logger.level
    handler.emit = lambda record: events.append(record.audit)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield events
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_a_coordinator_without_a_data_file_seals_one_envelope(tmp_path, audit_events):
    """A coordinator that writes no data file (nothing of the state dict is its own) still
    knows whom .metadata is sealed for, to hold the ranks to it: it sealed a throwaway
    envelope to learn that (one more KMS call or scrypt, one more envelope.seal event with
    no file behind it). .metadata's own envelope, sealed before the ranks write, serves."""
    keyset = keys.Keyset.generate()
    audit_events.clear()
    dcp.save({}, storage_writer=EncryptedWriter(tmp_path, keyset=keyset, device=CPU))
    assert [e["operation"] for e in audit_events].count("envelope.seal") == 1, audit_events
    [written] = [e for e in audit_events if e["operation"] == "file.encrypt"]
    assert written["path"] == str(tmp_path / META), written
    assert written["recipients"] == [f"aes-kwp:{keyset.primary.id}"], written
    assert not [n for n in os.listdir(tmp_path) if n.endswith(DATA_SUFFIX)]
    EncryptedReader(tmp_path, keyset=keyset, device=CPU).read_metadata()


def test_a_passphrase_save_derives_one_key_per_file(tmp_path, monkeypatch):
    """What telling the ranks' passphrases apart costs the coordinator of a single
    process: nothing (it seals .metadata itself), one scrypt per file as before. Ranks
    other than the coordinator pay one more each, all at once (tests/_dcp_worker.py)."""
    from gpucrypt.keys import passphrase

    monkeypatch.setattr(passphrase, "MIN_LOG_N", 10)  # scrypt 2**10: fast
    derived, real = [], keys.Passphrase._key
    monkeypatch.setattr(keys.Passphrase, "_key",
                        staticmethod(lambda *args: derived.append(args[2]) or real(*args)))
    dcp.save({"w": torch.ones(4)}, storage_writer=EncryptedWriter(
        tmp_path, recipients=keys.Passphrase("pw", log_n=10), device=CPU))
    assert derived == [10, 10]  # the data file's envelope and .metadata's
    out = {"w": torch.zeros(4)}
    dcp.load(out, storage_reader=EncryptedReader(tmp_path, identities=keys.Passphrase("pw"),
                                                 device=CPU))
    assert torch.equal(out["w"], torch.ones(4))


def test_a_keyset_saves_plans_are_dcps_own(tmp_path):
    """Every plan carried gpucrypt's _StoragePlan, which only a passphrase save needs (its
    .metadata envelope): a rank still running the gpucrypt before it could not unpickle
    even a keyset save's plan. Keys, recipients and KMS references send DCP's own."""
    from torch.distributed.checkpoint.filesystem import _StoragePrefix
    from torch.distributed.checkpoint.planner import SavePlan

    from gpucrypt.distributed.checkpoint import _StoragePlan

    for recipients, kind in (({"keyset": keys.Keyset.generate()}, _StoragePrefix),
                             ({"recipients": keys.Passphrase("words")}, _StoragePlan)):
        writer = EncryptedWriter(tmp_path, device=CPU, **recipients)
        writer.set_up_storage_writer(True, rank=0, use_collectives=True)
        plans = writer.prepare_global_plan([SavePlan([]), SavePlan([])])
        assert [type(plan.storage_data) for plan in plans] == [kind, kind]


def test_a_rank_that_reports_no_labels_is_refused_by_name(tmp_path):
    """A rank on a gpucrypt from before the check sends write results without the labels
    its file is sealed for: the coordinator failed with AttributeError. It refuses the
    save, saying to give every rank this version."""
    from torch.distributed.checkpoint.storage import WriteResult

    from gpucrypt.distributed.checkpoint import (EncryptedStorageInfo, _FileIdentity,
                                                 _WrittenItem)

    keyset = keys.Keyset.generate()
    writer = EncryptedWriter(tmp_path, keyset=keyset, device=CPU)
    labels = [f"aes-kwp:{keyset.primary.id}"]
    identity = _FileIdentity(10, bytes(32), bytes(32))
    current = _WrittenItem(EncryptedStorageInfo("__0_a.gcdistcp", "w"), identity, tuple(labels))
    earlier = object.__new__(_WrittenItem)  # as unpickled from the earlier version's record
    object.__setattr__(earlier, "info", EncryptedStorageInfo("__1_b.gcdistcp", "v"))
    object.__setattr__(earlier, "file", identity)
    with pytest.raises(ValueError, match="rank 1 for nothing reported .an earlier gpucrypt"):
        writer._check_sealed_alike([[WriteResult(index=None, size_in_bytes=10,
                                                  storage_data=current)],
                                     [WriteResult(index=None, size_in_bytes=10,
                                                  storage_data=earlier)]], {}, labels, b"")


# ------------------------------------------------------------------ binding (second review)


def _public_identity(path) -> tuple:
    """(length, header MAC, SHA-256 of the header) of a data file: all in its plain header,
    which anyone who can read the folder can see."""
    import hashlib

    from gpucrypt.files import models

    with open(path, "rb") as f:
        header = models._parse(f)
        f.seek(0)
        raw = f.read(header.header_length)
    return (os.path.getsize(path), header.header_mac, hashlib.sha256(raw).digest())


def _three_and_a_step(step: int) -> dict:
    return {"a": torch.full((8,), 10.0 * step + 1), "b": torch.full((8,), 10.0 * step + 2),
            "c": torch.full((8,), 10.0 * step + 3), "step": step}


def _zeroed() -> dict:
    return {"a": torch.zeros(8), "b": torch.zeros(8), "c": torch.zeros(8), "step": 0}


def _assert_untouched(state: dict) -> None:
    assert state["step"] == 0 and not any(state[k].any() for k in "abc"), state



def _two_public_key_saves(tmp_path, alice):
    """Steps 1 and 2 saved for ``alice`` in folders ``older`` and ``ckpt``, rank 0's data
    file of step 1 copied beside step 2's: (older, ckpt, step 2's file, step 1's file)."""
    older, folder = tmp_path / "older", tmp_path / "ckpt"
    for path, step in ((older, 1), (folder, 2)):
        dcp.save(_three_and_a_step(step),
                 storage_writer=EncryptedWriter(path, recipients=[alice.recipient], device=CPU))
    mine, theirs = _rank_file(folder, 0), _rank_file(older, 0)
    shutil.copyfile(older / theirs, folder / theirs)
    return older, folder, mine, theirs

def test_a_metadata_forged_with_public_keys_cannot_recombine_files(tmp_path):
    """Someone holding only the recipient's public key (and write access to the folder)
    wrote a .metadata that points 'a' at the genuine entry of 'b' and the other way round,
    and 'c' at a data file of an earlier save, all of the same shape, pinning the files by
    their public header values: the load succeeded with the secret tensors recombined. The
    files' tables bind them to their save, which the forger cannot name: refused, nothing
    loaded."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    from gpucrypt.distributed.checkpoint import EncryptedStorageInfo

    alice = keys.Identity.generate()
    older, folder, mine, theirs = _two_public_key_saves(tmp_path, alice)
    # the forger's Metadata: DCP's own planner, from the model's known shapes
    planner = DefaultSavePlanner()
    planner.set_up_planner(_zeroed(), is_coordinator=True)
    _, metadata = planner.create_global_plan([planner.create_local_plan()])
    points = {"a": (mine, "b@0"), "b": (mine, "a@0"), "c": (theirs, "c@0"), "step": (mine, "step")}
    metadata.storage_data = {MetadataIndex(k, None if k == "step" else [0]):
                             EncryptedStorageInfo(*where) for k, where in points.items()}
    _forge_metadata(folder, {"format": METADATA_FORMAT, "version": METADATA_VERSION,
                             "metadata": metadata,
                             "files": {name: _public_identity(folder / name)
                                       for name in (mine, theirs)}}, alice.recipient)
    state = _zeroed()
    with pytest.warns(UserWarning, match="binds its data files to no save"):
        error = _failure(lambda: dcp.load(state, storage_reader=EncryptedReader(
            folder, identities=alice, device=CPU)))
    assert type(error).__name__ == "AuthenticationError", repr(error)
    assert "belongs to another save than the checkpoint's metadata: its save binds its " \
           "files to it, and the metadata binds none" in str(error), str(error)
    _assert_untouched(state)


def _resealed(folder, identity, change) -> None:
    """Rewrite ``folder``'s .metadata after ``change(document)``: what someone who can open
    it could do, so the save id is known to them (the strongest case for these checks)."""
    document = _metadata_document(folder, identity)
    change(document)
    _forge_metadata(folder, document, identity.recipient)


def test_an_item_is_bound_to_its_entry(tmp_path):
    """A .metadata that keeps the save's id and files but reads 'a' from the entry of 'b'
    (same shape) and 'b' from that of 'a': refused, as each file records the items its
    entries hold."""
    from gpucrypt.distributed.checkpoint import EncryptedStorageInfo

    alice = keys.Identity.generate()
    dcp.save(_three_and_a_step(2),
             storage_writer=EncryptedWriter(tmp_path, recipients=[alice.recipient], device=CPU))

    def swap(document):
        storage = document["metadata"].storage_data
        a, b = (next(i for i in storage if i.fqn == k) for k in "ab")
        storage[a], storage[b] = (EncryptedStorageInfo(storage[x].relative_path,
                                                       storage[y].entry)
                                  for x, y in ((a, b), (b, a)))

    _resealed(tmp_path, alice, swap)
    state = _zeroed()
    error = _failure(lambda: dcp.load(state, storage_reader=EncryptedReader(
        tmp_path, identities=alice, device=CPU)))
    assert type(error).__name__ == "AuthenticationError", repr(error)
    assert "the checkpoint's metadata reads 'a' at (0,) from the entry 'b@0', which was " \
           "saved for another item" in str(error), str(error)
    _assert_untouched(state)


def test_a_data_file_is_bound_to_its_save(tmp_path):
    """A .metadata that keeps its save's id but names the data file of another save under
    the same keys in place of its own (same items, same entries): refused, the file's
    table holding its own save's id."""
    alice = keys.Identity.generate()
    older, folder, _, theirs = _two_public_key_saves(tmp_path, alice)
    recorded = _metadata_document(older, alice)

    def other_file(document):
        document["metadata"].storage_data = recorded["metadata"].storage_data
        document["files"] = recorded["files"]

    kept = _metadata_document(folder, alice).get("save")
    _resealed(folder, alice, other_file)
    state = _zeroed()
    error = _failure(lambda: dcp.load(state, storage_reader=EncryptedReader(
        folder, identities=alice, device=CPU)))
    assert f"{folder / theirs}: this data file belongs to another save than the " \
           f"checkpoint's metadata: their save ids differ" in str(error), str(error)
    _assert_untouched(state)
    assert _metadata_document(folder, alice)["save"] == kept != recorded["save"]


def _file_renamed_in(name: str, renamed: str):
    """A ``_resealed`` edit of ``.metadata``: the data file ``name`` listed as ``renamed``."""
    from gpucrypt.distributed.checkpoint import EncryptedStorageInfo

    def rename(document):
        document["files"] = {renamed: document["files"][name]}
        storage = document["metadata"].storage_data
        for index, info in storage.items():
            storage[index] = EncryptedStorageInfo(renamed, info.entry)
    return rename


def test_a_data_file_is_bound_to_its_name(tmp_path):
    """A data file renamed, and listed under its new name with its own header values:
    refused, its table holding the name it was saved under."""
    alice = keys.Identity.generate()
    dcp.save(_three_and_a_step(2),
             storage_writer=EncryptedWriter(tmp_path, recipients=[alice.recipient], device=CPU))
    name = _rank_file(tmp_path, 0)
    renamed = f"__0_{'0' * 16}{DATA_SUFFIX}"
    assert renamed != name
    os.replace(tmp_path / name, tmp_path / renamed)

    _resealed(tmp_path, alice, _file_renamed_in(name, renamed))
    state = _zeroed()
    error = _failure(lambda: dcp.load(state, storage_reader=EncryptedReader(
        tmp_path, identities=alice, device=CPU)))
    assert f"this data file was saved as {name!r}, not under the name" in str(error), str(error)
    _assert_untouched(state)


def test_a_public_key_cannot_name_files_of_a_symmetric_save(tmp_path):
    """A save sealed for a keyset alone binds its files to no save id (only the keyset's
    holders can write its .metadata). Someone holding a public key of a reader that also
    holds the keyset wrote a .metadata for that public key naming those files: refused,
    as no save of this version that a public key opens binds nothing."""
    keyset, alice = keys.Keyset.generate(), keys.Identity.generate()
    dcp.save(_three_and_a_step(2), storage_writer=EncryptedWriter(tmp_path, keyset=keyset,
                                                                  device=CPU))
    recorded = EncryptedReader(tmp_path, keyset=keyset, device=CPU).read_metadata()
    name = _rank_file(tmp_path, 0)
    planner = DefaultSavePlanner()
    planner.set_up_planner(_zeroed(), is_coordinator=True)
    _, metadata = planner.create_global_plan([planner.create_local_plan()])
    metadata.storage_data = recorded.storage_data  # guessable: fqn@offsets
    _forge_metadata(tmp_path, {"format": METADATA_FORMAT, "version": METADATA_VERSION,
                               "metadata": metadata,
                               "files": {name: _public_identity(tmp_path / name)}},
                    alice.recipient)
    state = _zeroed()
    with pytest.warns(UserWarning, match="opened with a public key, binds its data files "
                                         "to no save"):
        error = _failure(lambda: dcp.load(state, storage_reader=EncryptedReader(
            tmp_path, identities=alice, keyset=keyset, device=CPU)))
    assert "the checkpoint's metadata, opened with a public key, binds none" in str(error), \
        str(error)
    _assert_untouched(state)


def _as_earlier_versions_wrote(monkeypatch) -> None:
    """Make EncryptedWriter write what the gpucrypt before save binding wrote: data files
    whose table holds their name alone, and a .metadata without a save id (plans were
    DCP's own for every save but a passphrase's)."""
    from gpucrypt.distributed import checkpoint
    from gpucrypt.files import models

    real = models.save_encrypted

    def save_encrypted(tensors, path, key, metadata, **options):
        return real(tensors, path, key, {"dcp.file": metadata["dcp.file"]}, **options)

    monkeypatch.setattr(models, "save_encrypted", save_encrypted)
    monkeypatch.setattr(checkpoint, "_binds_files", lambda recipients: False)


def test_checkpoints_of_earlier_versions_still_load(tmp_path, monkeypatch):
    """A checkpoint from before save binding (no save id, no record of the items) loads,
    its files still held to their names: for a keyset without a word; for public-key
    recipients with a warning to save it again, as anyone holding those public keys could
    have recombined its files."""
    keyset, alice = keys.Keyset.generate(), keys.Identity.generate()
    sealed = {"keyset": {"keyset": keyset}, "public": {"recipients": [alice.recipient]}}
    with monkeypatch.context() as patched:
        _as_earlier_versions_wrote(patched)
        for how, recipients in sealed.items():
            dcp.save(_three_and_a_step(2),
                     storage_writer=EncryptedWriter(tmp_path / how, device=CPU, **recipients))
    for how in sealed:  # written as before: no save id anywhere
        folder = tmp_path / how
        table = _table(folder / _rank_file(folder, 0), keyset=keyset, identity=alice)
        assert table == {"dcp.file": _rank_file(folder, 0)}, table
    state = _zeroed()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dcp.load(state, storage_reader=EncryptedReader(tmp_path / "keyset", keyset=keyset,
                                                       device=CPU))
    assert not [w for w in caught if "bind" in str(w.message)], caught  # none for a keyset's
    assert state["step"] == 2 and state["c"].tolist() == [23.0] * 8
    state = _zeroed()
    with pytest.warns(UserWarning, match=r"opened with a public key, binds its data files to "
                                         r"no save: an earlier gpucrypt saved it .* Save it "
                                         r"again with this version to bind them"):
        dcp.load(state, storage_reader=EncryptedReader(tmp_path / "public", identities=alice,
                                                       device=CPU))
    assert state["step"] == 2 and state["a"].tolist() == [21.0] * 8
    # its files are held to their names as before: renamed, refused
    folder, name = tmp_path / "public", _rank_file(tmp_path / "public", 0)
    renamed = f"__0_{'0' * 16}{DATA_SUFFIX}"
    os.replace(folder / name, folder / renamed)

    _resealed(folder, alice, _file_renamed_in(name, renamed))
    with pytest.warns(UserWarning, match="binds its data files to no save"):
        error = _failure(lambda: dcp.load(_zeroed(), storage_reader=EncryptedReader(
            folder, identities=alice, device=CPU)))
    assert f"this data file was saved as {name!r}" in str(error), str(error)


def _table(path, *, keyset=None, identity=None) -> dict:
    """The metadata of a data file's table, opened with whichever of ``keyset`` and
    ``identity`` it is sealed for."""
    from gpucrypt.files import models

    with models.safe_open(path, "pt", keyset=keyset, identity=identity) as f:
        return f.metadata()


class _CachingPlanner(DefaultSavePlanner):
    """DCP's planner with plan caching, its cache (kept in DCP's planner class, under the
    planner's class name) apart from any other test's."""

    def __init__(self):
        super().__init__(enable_plan_caching=True)


def test_every_save_binds_its_files_anew_with_plan_caching(tmp_path):
    """With DCP's plan caching, a rank whose plan did not change writes from the plan DCP
    cached from an earlier save, which carries that save's id: it writes this save's, as
    the coordinator scattered it, so that saves from one cached plan do not share an id
    (one's files would load under the other's .metadata)."""
    from torch.distributed.checkpoint.planner import SavePlanner

    alice = keys.Identity.generate()
    folders = [tmp_path / "first", tmp_path / "second"]
    try:
        for folder in folders:
            dcp.save(_three_and_a_step(2), planner=_CachingPlanner(),
                     storage_writer=EncryptedWriter(folder, recipients=[alice.recipient],
                                                    device=CPU))
        cached = SavePlanner._cached_final_save_plan[_CachingPlanner.__name__]
    finally:
        for cache in (SavePlanner._cached_save_plan, SavePlanner._cached_all_plans,
                      SavePlanner._cached_global_plan, SavePlanner._cached_metadata,
                      SavePlanner._cached_final_save_plan):
            cache.pop(_CachingPlanner.__name__, None)
    first, second = (_metadata_document(folder, alice)["save"] for folder in folders)
    assert first != second and cached.storage_data.save_id == first  # the second's was stale
    for folder in folders:
        table = _table(folder / _rank_file(folder, 0), identity=alice)
        assert table["dcp.save"] == _metadata_document(folder, alice)["save"], table
        state = _zeroed()
        dcp.load(state, storage_reader=EncryptedReader(folder, identities=alice, device=CPU))
        assert state["step"] == 2 and state["b"].tolist() == [22.0] * 8


def test_a_rank_that_binds_no_save_is_refused_by_name(tmp_path):
    """A save sealed for a public key binds every data file to it: a rank on a gpucrypt
    from before (its record has no save id), or one that wrote an earlier save's id, would
    publish files the reader refuses, and the previous checkpoint would be gone. The
    coordinator refuses the save, naming the ranks and why."""
    from torch.distributed.checkpoint.storage import WriteResult

    from gpucrypt.distributed.checkpoint import (EncryptedStorageInfo, _FileIdentity,
                                                 _WrittenItem)

    alice = keys.Identity.generate()
    writer = EncryptedWriter(tmp_path, recipients=[alice.recipient], device=CPU)
    identity = _FileIdentity(10, bytes(32), bytes(32))

    def written(rank, save_id):
        return [WriteResult(index=None, size_in_bytes=10, storage_data=_WrittenItem(
            EncryptedStorageInfo(f"__{rank}_{rank:016x}{DATA_SUFFIX}", "w"), identity,
            ("x25519:00",), None, save_id))]

    earlier = object.__new__(_WrittenItem)  # as unpickled from the earlier version's record
    for field in ("info", "file", "sealed_for", "passphrase_check"):
        object.__setattr__(earlier, field, getattr(written(1, None)[0].storage_data, field))
    now, then = "a" * 32, "b" * 32
    results = [written(0, now), [WriteResult(index=None, size_in_bytes=10, storage_data=earlier)],
               written(2, then), written(3, now)]
    with pytest.raises(ValueError, match=r"did not all bind their data files to this save, so "
                                         r"its reader would refuse them: rank 1 bound theirs "
                                         r"to no save \(a gpucrypt from before .*\); rank 2 "
                                         r"bound theirs to an earlier save"):
        writer._check_bound_alike(results, {}, now)
    writer._check_bound_alike([written(0, now), written(1, now)], {}, now)  # alike: no error


class _Rebuilt:
    """A value whose class cannot be rebuilt in the loading process (it changed since)."""

    broken = False

    def __init__(self, value):
        self.value = value

    def __setstate__(self, state):
        if _Rebuilt.broken:
            raise RuntimeError("cannot rebuild _Rebuilt here")
        self.__dict__.update(state)


def test_a_value_that_fails_to_unpickle_fails_before_anything_is_written(tmp_path,
                                                                         monkeypatch):
    """non_tensors="pickle": DCP's planner unpickled the values in read_data, after this
    rank (and others) had copied tensors into the state dict, so a value that failed to
    rebuild left the load half done. The reader unpickles them in prepare_local_plan too."""
    keyset = keys.Keyset.generate()
    dcp.save({"a": torch.ones(4), "z": _Rebuilt(1)},
             storage_writer=EncryptedWriter(tmp_path, keyset=keyset, device=CPU))
    monkeypatch.setattr(_Rebuilt, "broken", True)
    state = {"a": torch.zeros(4), "z": None}
    error = _failure(lambda: dcp.load(state, storage_reader=EncryptedReader(
        tmp_path, keyset=keyset, device=CPU, non_tensors="pickle")))
    assert type(error).__name__ == "FormatError", repr(error)
    assert "the non-tensor value 'z' cannot be unpickled here (RuntimeError: cannot rebuild " \
           "_Rebuilt here); nothing was loaded" in str(error), str(error)
    assert not state["a"].any() and state["z"] is None
    monkeypatch.setattr(_Rebuilt, "broken", False)
    dcp.load(state, storage_reader=EncryptedReader(tmp_path, keyset=keyset, device=CPU,
                                                   non_tensors="pickle"))
    assert state["a"].all() and state["z"].value == 1
