"""The rank side of tests/test_distributed.py: one function, run on every rank of a real
gloo process group by ``torch.multiprocessing.spawn``.

All scenarios share one spawn (starting torch processes is the expensive part): each
rank runs them in the same order, so that the collectives line up, and records each
one's outcome ("ok", or the traceback) in ``rank{N}.json`` for the test module to
report scenario by scenario. Scenarios stay in step even when an assertion fails,
because assertions come after the collectives of their scenario.
"""
from __future__ import annotations

import dataclasses
import datetime
import glob
import io
import json
import os
import pickle
import re
import shutil
import traceback
import warnings

import torch
import torch.distributed as dist

# the reference model and tensors, the same in every process (the test module's too)
EMBEDDING_SHAPE = (10, 6)     # 10 rows: uneven shards over 4 ranks (3, 3, 3, 1)
WIDE_SHAPE = (4, 9)           # sharded along dim 1


def reference() -> dict:
    """The full tensors of the saved state, name -> tensor (FSDP2 model names included)."""
    torch.manual_seed(1234)
    model = _model()
    state = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    state["embedding"] = torch.randn(*EMBEDDING_SHAPE)
    state["wide"] = torch.randn(*WIDE_SHAPE).to(torch.bfloat16)
    state["replicated"] = torch.arange(12, dtype=torch.int64).reshape(3, 4)
    return state


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))


def _placements(name: str):
    from torch.distributed.tensor import Replicate, Shard

    return [Shard(1)] if name == "wide" else [Replicate()] if name == "replicated" else [Shard(0)]


def _sharded(mesh, fill: float | None = None) -> dict:
    """The reference as DTensors on ``mesh`` (or, with ``fill``, same-shaped ones full of it)."""
    from torch.distributed.tensor import distribute_tensor

    out = {}
    for name, full in reference().items():
        if fill is not None:
            full = torch.full_like(full, fill)
        out[name] = distribute_tensor(full, mesh, _placements(name))
    return out


def _equal_to_reference(state: dict) -> None:
    ref = reference()
    for name, value in state.items():
        if name == "step":
            assert value == 41, value
            continue
        full = value.full_tensor() if hasattr(value, "full_tensor") else value
        assert torch.equal(full, ref[name]), name


def _flip(path: str, offset_from_end: int = 40) -> bytes:
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, os.SEEK_END)
        old = f.read(1)
        f.seek(-offset_from_end, os.SEEK_END)
        f.write(bytes([old[0] ^ 0x01]))
    return old


def main(rank: int, world: int, work: str) -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # four ranks share two cores
    dist.init_process_group("gloo", init_method=f"file://{work}/rendezvous", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from gpucrypt import keys
    from gpucrypt.distributed import EncryptedReader, EncryptedWriter

    keyset = keys.Keyset.load(os.path.join(work, "keyset.json"))  # each rank its own copy
    ckpt4, ckpt2 = os.path.join(work, "ckpt4"), os.path.join(work, "ckpt2")
    outcomes: dict[str, str] = {}

    def scenario(name, body):
        try:
            body()
            outcomes[name] = "ok"
        except BaseException:  # noqa: BLE001 - recorded, reported by the test module
            outcomes[name] = traceback.format_exc()

    mesh4 = init_device_mesh("cpu", (world,))

    def fsdp_state(seed: int) -> tuple[torch.nn.Module, dict]:
        torch.manual_seed(seed)
        model = _model()
        fully_shard(model, mesh=mesh4)
        return model, {f"model.{k}": v for k, v in get_model_state_dict(model).items()}

    def save4():
        torch.manual_seed(1234)
        _, model_state = fsdp_state(1234)  # same seed as reference(): the same weights
        state = {**_sharded(mesh4), **model_state, "step": 41}
        dcp.save(state, storage_writer=EncryptedWriter(ckpt4, keyset=keyset, segment_size=4096))

    def load4():
        model, model_state = fsdp_state(99)  # other weights, overwritten by the load
        state = {**_sharded(mesh4, fill=0.0), **model_state, "step": 0}
        dcp.load(state, storage_reader=EncryptedReader(ckpt4, keyset=keyset))
        _equal_to_reference(state)
        assert all(torch.equal(p.full_tensor(), reference()[f"model.{n}"])
                   for n, p in model.state_dict().items())

    def with_flipped(victim: str, load) -> BaseException | None:
        """What ``load()`` raised on this rank (None: nothing) with a byte of the data file
        ``victim`` flipped by rank 0, the file put back afterwards."""
        if rank == 0:
            shutil.copyfile(victim, victim + ".orig")
            _flip(victim)
        dist.barrier()
        try:
            load()
            failed = None
        except BaseException as exc:  # noqa: BLE001 - DCP's CheckpointException
            failed = exc
        dist.barrier()
        if rank == 0:
            os.replace(victim + ".orig", victim)
        return failed

    def tampered_load_changes_nothing():
        [victim] = glob.glob(os.path.join(ckpt4, f"__{world - 1}_*.gcdistcp"))
        state = {**_sharded(mesh4, fill=7.0), "step": 7}
        failed = with_flipped(victim, lambda: dcp.load(
            state, storage_reader=EncryptedReader(ckpt4, keyset=keyset)))
        assert failed is not None, "a tampered checkpoint loaded"
        failures = failed.failures
        assert set(failures) == {world - 1}, failures  # only the rank that reads that file
        error = failures[world - 1][0]
        assert type(error).__name__ == "AuthenticationError" and victim in str(error), error
        for name, value in state.items():  # no rank's state was touched
            if name == "step":
                assert value == 7
            else:
                assert bool((value.to_local().float() == 7.0).all()), name

    def failed_load_leaves_no_plaintext_staged():
        """Ranks whose own entries verified hold them decrypted (staged for read_data)
        when another rank's file fails; DCP raises on them without calling the reader
        again. The staged plaintext is zeroed when the reader is reset (dcp.load's first
        call, or the user's), asked for metadata, or collected."""
        import gc

        [victim] = glob.glob(os.path.join(ckpt4, f"__{world - 1}_*.gcdistcp"))
        if rank == 0:
            shutil.copyfile(victim, victim + ".orig")
            _flip(victim)
        dist.barrier()
        held, failed = {}, []
        for how in ("reset", "read_metadata", "collected"):
            reader = EncryptedReader(ckpt4, keyset=keyset)
            state = {**_sharded(mesh4, fill=7.0), "step": 7}
            try:
                dcp.load(state, storage_reader=reader)
                failed.append(None)
            except BaseException as exc:  # noqa: BLE001 - DCP's CheckpointException
                failed.append(type(exc).__name__)
            tensors = list(reader._staged.values())
            had_plaintext = any(bool(t.any()) for t in tensors)
            if how == "reset":
                reader.reset()
            elif how == "read_metadata":
                reader.read_metadata()
            else:
                del reader
                gc.collect()  # the exception's traceback and its frames form a cycle
            # looked at now, while a reset or read reader still lives (it is collected,
            # and its finaliser runs, when the next round replaces it)
            held[how] = (len(tensors), had_plaintext, any(bool(t.any()) for t in tensors))
        dist.barrier()
        if rank == 0:
            os.replace(victim + ".orig", victim)
        assert failed == ["CheckpointException"] * 3, failed
        for how, (count, had_plaintext, left) in held.items():
            if rank != world - 1:  # this rank's entries verified: the test has something
                assert count and had_plaintext, f"{how}: nothing was staged on rank {rank}"
            assert not left, f"{how}: plaintext left staged"

    def reshard_to_two():
        group = dist.new_group([0, 1])  # every rank takes part in making the group
        if rank < 2:
            mesh2 = DeviceMesh.from_group(group, "cpu")
            state = {**_sharded(mesh2, fill=0.0), "step": 0}
            dcp.load(state, storage_reader=EncryptedReader(ckpt4, keyset=keyset),
                     process_group=group)
            _equal_to_reference(state)
            dcp.save(state, storage_writer=EncryptedWriter(ckpt2, keyset=keyset,
                                                           segment_size=4096),
                     process_group=group)
            again = {**_sharded(mesh2, fill=0.0), "step": 0}
            dcp.load(again, storage_reader=EncryptedReader(ckpt2, keyset=keyset),
                     process_group=group)
            _equal_to_reference(again)
        dist.barrier()

    def mixed_keys_are_refused():
        """Two ranks whose writers hold different keysets (one read a stale key file):
        published, no one key would open the checkpoint, and the previous one's files
        would be gone. The coordinator refuses before .metadata, naming the odd rank, and
        the previous checkpoint loads as it was."""
        group = dist.new_group([0, 1])  # every rank takes part in making the group
        failure, before, after, loaded = None, None, None, None
        if rank < 2:
            folder = os.path.join(work, "mixed")
            mesh2 = DeviceMesh.from_group(group, "cpu")
            dcp.save(_sharded(mesh2), storage_writer=EncryptedWriter(folder, keyset=keyset),
                     process_group=group)
            before = sorted(os.listdir(folder))
            stale = keyset if rank == 0 else keys.Keyset.generate()
            try:
                dcp.save(_sharded(mesh2, fill=3.0),
                         storage_writer=EncryptedWriter(folder, keyset=stale),
                         process_group=group)
            except BaseException as exc:  # noqa: BLE001 - DCP's CheckpointException
                failure = exc
            dist.barrier(group=group)
            after = sorted(os.listdir(folder))
            loaded = _sharded(mesh2, fill=0.0)
            try:
                dcp.load(loaded, storage_reader=EncryptedReader(folder, keyset=keyset),
                         process_group=group)
            except BaseException:  # noqa: BLE001 - on both ranks: asserted below
                loaded = None
        dist.barrier()
        if rank < 2:
            assert failure is not None, "a save sealed for two different keys was published"
            (who, (error, _)), = failure.failures.items()
            assert who == 0 and type(error).__name__ == "ValueError", repr(error)
            # each group of ranks with its keys, the coordinator's among them: no culprit
            found = re.search(r"different keys, so no one key would open it all: the "
                              r"coordinator's \.metadata and rank 0 for aes-kwp:(\w+); rank 1 "
                              r"for aes-kwp:(\w+)\. ", str(error))
            assert found and found.group(1) == keyset.primary.id != found.group(2), error
            assert after == before  # nothing published, the refused save's files removed
            assert loaded is not None, "the previous checkpoint no longer loads"
            _equal_to_reference(loaded)

    def _saved(folder, fill, writer_for, **save):
        """dcp.save of this rank's own tensor ``w{rank}`` full of ``fill`` (a plain tensor:
        each rank writes one data file), with the writer ``writer_for(folder)``; None, or
        what it raised (DCP's CheckpointException, raised on every rank)."""
        try:
            dcp.save({f"w{rank}": torch.full((4,), fill)}, storage_writer=writer_for(folder),
                     **save)
        except BaseException as exc:  # noqa: BLE001 - asserted by the caller
            return exc
        return None

    def _refusal(failure) -> str:
        """The coordinator's refusal in DCP's CheckpointException, as text."""
        assert failure is not None, "a save sealed for different keys was published"
        (who, (error, _)), = failure.failures.items()
        assert who == 0 and type(error).__name__ == "ValueError", repr(error)
        return str(error)

    def _loaded(folder, **reader):
        """The values of every rank's ``w{rank}`` loaded from ``folder``, or the failure."""
        state = {f"w{r}": torch.zeros(4) for r in range(world)}
        try:
            dcp.load(state, storage_reader=EncryptedReader(folder, **reader))
        except BaseException as exc:  # noqa: BLE001 - asserted by the caller
            return exc
        return sorted({float(v) for t in state.values() for v in t})

    def a_stale_coordinator_is_not_singled_out():
        """Only the coordinator read a stale key file: the refusal lists each group of
        ranks with its keys, the coordinator's among them, and blames no one (it said
        "the coordinator seals for X; rank 1 sealed ... for Y; rank 2 ..."). A rolling key
        rotation that reached the coordinator first (new primary, old key kept) is
        refused too, saying what to do."""
        folder = os.path.join(work, "stale-coordinator")
        if rank == 0:
            keys.Keyset.generate().save(os.path.join(work, "stale.json"))
            rotated = keys.Keyset.load(os.path.join(work, "keyset.json"))
            rotated.add(primary=True)
            rotated.save(os.path.join(work, "rotated.json"))
        dist.barrier()
        mine = {"good": keyset, "stale": keyset, "rotated": keyset}
        if rank == 0:
            mine.update((name, keys.Keyset.load(os.path.join(work, f"{name}.json")))
                        for name in ("stale", "rotated"))
        first = _saved(folder, 1.0, lambda f: EncryptedWriter(f, keyset=mine["good"]))
        before = sorted(os.listdir(folder))
        stale = _saved(folder, 2.0, lambda f: EncryptedWriter(f, keyset=mine["stale"]))
        rotation = _saved(folder, 3.0, lambda f: EncryptedWriter(f, keyset=mine["rotated"]))
        after = sorted(os.listdir(folder))
        loaded = _loaded(folder, keyset=keyset)
        assert first is None, first
        stale, rotation = _refusal(stale), _refusal(rotation)
        found = re.search(r"open it all: the coordinator's \.metadata and rank 0 for "
                          r"aes-kwp:(\w+); ranks 1-3 for aes-kwp:(\w+)\. ", stale)
        assert found and found.group(1) != found.group(2) == keyset.primary.id, stale
        assert "ranks 1-3 for aes-kwp:" in rotation and "key rotation" in rotation, rotation
        assert after == before and loaded == [1.0], (before, after, loaded)

    def passphrases_are_compared():
        """Ranks given different passphrases (a per-node variable differs): every
        passphrase's label is "scrypt", so the labels matched, the save was published and
        the previous checkpoint removed, and no passphrase opened the new one. Each rank
        opens the coordinator's .metadata envelope with its own passphrase and reports
        it; the coordinator refuses before publishing, listing who shares its passphrase.
        Also through plans DCP cached from an earlier save (enable_plan_caching), whose
        envelope the coordinator sealed then, with the passphrase of then."""
        from torch.distributed.checkpoint import DefaultSavePlanner

        from gpucrypt.keys import passphrase

        passphrase.MIN_LOG_N = 10  # this forked rank's own module: scrypt 2**10, fast
        folder = os.path.join(work, "passphrase")

        def sealed_with(secret):
            return lambda f: EncryptedWriter(f, recipients=keys.Passphrase(secret, log_n=10))

        def cached():
            return DefaultSavePlanner(enable_plan_caching=True)

        first = _saved(folder, 1.0, sealed_with("good"))
        before = sorted(os.listdir(folder))
        one = _saved(folder, 2.0, sealed_with("stale" if rank == 2 else "good"))
        coordinator = _saved(folder, 2.0, sealed_with("stale" if rank == 0 else "good"))
        after = sorted(os.listdir(folder))
        loaded = _loaded(folder, identities=keys.Passphrase("good"))
        # the second save's plans come from DCP's cache: their envelope is the first's
        runs = [_saved(folder, 4.0, sealed_with("good"), planner=cached()),
                _saved(folder, 5.0, sealed_with("good"), planner=cached()),
                _saved(folder, 6.0, sealed_with("new"), planner=cached())]  # every rank's
        changed = _loaded(folder, identities=keys.Passphrase("new"))
        late = _saved(folder, 7.0, sealed_with("stale" if rank == 3 else "new"),
                      planner=cached())
        kept = _loaded(folder, identities=keys.Passphrase("new"))
        assert first is None and runs == [None] * 3, (first, runs)
        one, coordinator, late = _refusal(one), _refusal(coordinator), _refusal(late)
        assert ("different passphrases, so no one passphrase would open it all: the "
                "coordinator's .metadata and ranks 0-1, 3 share one passphrase; rank 2 sealed "
                "with another (not necessarily one and the same). ") in one, one
        assert ("the coordinator's .metadata and rank 0 share one passphrase; ranks 1-3 sealed "
                "with another (not necessarily one and the same). ") in coordinator, coordinator
        assert ("the coordinator's .metadata and ranks 0-2 share one passphrase; rank 3 sealed "
                "with another (not necessarily one and the same). ") in late, late
        assert after == before and loaded == [1.0] and changed == kept == [6.0], \
            (before, after, loaded, changed, kept)

    def reshard_up_stages_only_its_parts():
        """ckpt2, saved by 2 ranks, loaded on 4: each saved chunk is spread over two ranks,
        and each rank staged every chunk it touched whole until read_data (twice its share
        here; n/k times it for a checkpoint saved on k ranks and loaded on n, in GPU memory
        with device="auto"). It stages only the parts it reads. A flipped byte in a chunk
        read in parts still fails the load, on the ranks that read it, before any rank's
        state is written, and they keep nothing of it staged."""

        class Staged(EncryptedReader):
            def prepare_local_plan(self, plan):
                plan = super().prepare_local_plan(plan)
                self.staged = dict(self._staged)
                return plan

        reader = Staged(ckpt2, keyset=keyset)
        state = _sharded(mesh4, fill=0.0)  # every tensor, no "step": tensors alone staged
        dcp.load(state, storage_reader=reader)
        _equal_to_reference({**state, "step": 41})
        mine = sum(value.to_local().nbytes for value in state.values())
        staged = sum(t.nbytes for t in reader.staged.values())
        # (file, entry, offsets, lengths): a part staged alone
        in_parts = [key for key in reader.staged if len(key) == 4]
        [victim] = glob.glob(os.path.join(ckpt2, "__1_*.gcdistcp"))
        reader, untouched = Staged(ckpt2, keyset=keyset), _sharded(mesh4, fill=7.0)
        failed = with_flipped(victim, lambda: dcp.load(untouched, storage_reader=reader))
        assert in_parts, "no chunk was read in parts: the scenario tests nothing"
        assert staged == mine, f"rank {rank} staged {staged} bytes for a share of {mine}"
        assert failed is not None, "a tampered checkpoint loaded"
        for error, _ in failed.failures.values():
            assert type(error).__name__ == "AuthenticationError" and victim in str(error), error
        if rank in failed.failures:
            assert not any(bool(t.any()) for t in reader._staged.values())
        for name, value in untouched.items():
            assert bool((value.to_local().float() == 7.0).all()), name

    def public_key_saves_bind_every_rank():
        """A save sealed for a public key (beside the keyset here) binds every rank's data
        file to it: each file's table holds the save id the coordinator sent in the plan,
        which .metadata records. With DCP's plan caching too, where the ranks' plans of the
        second save are those DCP cached from the first, with the first's id. Rank 1's file
        of the first save, named by the second save's .metadata (rewritten by rank 0, which
        holds the keyset and so knows the id) in place of its own, is refused."""
        from torch.distributed.checkpoint import DefaultSavePlanner

        class BoundCached(DefaultSavePlanner):  # a cache of its own (DCP's: by class name)
            def __init__(self):
                super().__init__(enable_plan_caching=True)

        alice = keys.Recipient.load(os.path.join(work, "alice.pub"))
        first, second = os.path.join(work, "bound1"), os.path.join(work, "bound2")

        def writer_for(folder):
            return EncryptedWriter(folder, recipients=[alice], keyset=keyset)

        saved = [_saved(folder, fill, writer_for, planner=BoundCached())
                 for folder, fill in ((first, 1.0), (second, 2.0))]
        # the plan each rank wrote the second save from: the first's, cached by DCP
        stale = DefaultSavePlanner._cached_final_save_plan[BoundCached.__name__].storage_data
        loaded = [_loaded(folder, keyset=keyset) for folder in (first, second)]
        documents = [_document(folder) for folder in (first, second)]
        tables = [{name: _table(os.path.join(folder, name)) for name in document["files"]}
                  for folder, document in zip((first, second), documents)]
        forging = None  # what rank 0 raised, asserted after the collectives
        if rank == 0:  # rank 1's file of the first save, in place of the second's
            try:
                [mine] = [n for n in documents[1]["files"] if n.startswith("__1_")]
                [theirs] = [n for n in documents[0]["files"] if n.startswith("__1_")]
                shutil.copyfile(os.path.join(first, theirs), os.path.join(second, theirs))
                forged = documents[1]
                forged["files"][theirs] = documents[0]["files"][theirs]
                del forged["files"][mine]
                storage = forged["metadata"].storage_data
                for index, info in list(storage.items()):
                    if info.relative_path == mine:
                        storage[index] = dataclasses.replace(info, relative_path=theirs)
                keys.encrypt_file(pickle.dumps(forged, protocol=4),
                                  os.path.join(second, ".metadata"), keyset=keyset)
            except BaseException as exc:  # noqa: BLE001 - asserted below
                forging = exc
        dist.barrier()
        spliced = _loaded(second, keyset=keyset)
        assert forging is None, repr(forging)
        assert saved == [None, None] and loaded == [[1.0], [2.0]], (saved, loaded)
        ids = [document["save"] for document in documents]
        assert ids[0] != ids[1] and None not in ids and stale.save_id == ids[0], (ids, stale)
        for save_id, files in zip(ids, tables):
            assert len(files) == world and all(t["dcp.save"] == save_id
                                               for t in files.values()), (save_id, files)
        assert set(spliced.failures) == set(range(world)), spliced  # every rank reads w1
        for error, _ in spliced.failures.values():
            assert "their save ids differ (a file of another save)" in str(error), error

    def _document(folder) -> dict:
        """The decrypted .metadata document of ``folder`` (opened with the keyset)."""
        from gpucrypt.distributed.checkpoint import _MetadataUnpickler

        plain = io.BytesIO()
        keys.decrypt_file(os.path.join(folder, ".metadata"), plain, keyset=keyset)
        return _MetadataUnpickler(io.BytesIO(plain.getvalue())).load()

    def _table(path) -> dict:
        """A data file's table metadata (opened with the keyset)."""
        from gpucrypt.files import models

        with models.safe_open(path, "pt", keyset=keyset) as f:
            return f.metadata()

    scenario("save4", save4)
    scenario("load4", load4)
    scenario("tampered_load_changes_nothing", tampered_load_changes_nothing)
    scenario("failed_load_leaves_no_plaintext_staged", failed_load_leaves_no_plaintext_staged)
    scenario("reshard_to_two", reshard_to_two)
    scenario("mixed_keys_are_refused", mixed_keys_are_refused)
    scenario("a_stale_coordinator_is_not_singled_out", a_stale_coordinator_is_not_singled_out)
    scenario("passphrases_are_compared", passphrases_are_compared)
    scenario("reshard_up_stages_only_its_parts", reshard_up_stages_only_its_parts)
    scenario("public_key_saves_bind_every_rank", public_key_saves_bind_every_rank)
    with open(os.path.join(work, f"rank{rank}.json"), "w") as f:
        json.dump(outcomes, f)
    dist.destroy_process_group()
