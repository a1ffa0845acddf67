"""gpucrypt.models.safe_open: safetensors.safe_open's API over encrypted model files.

Every behaviour is compared with ``safetensors.safe_open`` on the very plaintext file
that ``gpucrypt encrypt-model`` encrypted (keys, metadata, tensors, slices, dtypes
including bfloat16 and float8). Segments are 4 KiB so that a tensor spans many; which
segments a slice decrypts is checked from outside: every segment it must not need is
corrupted, and the slice still loads, while a flipped byte in one it needs raises.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import safetensors
from safetensors.torch import save_file

from gpucrypt import models
from gpucrypt.cli import main as cli
from gpucrypt.files import _safe_open
from gpucrypt.files._safe_open import _normalise, touched_segments
from gpucrypt.stream import AuthenticationError, FormatError
from _outside_simulator import assert_gpu_call_refused_outside_simulator

SEG = 4096


def plain_tensors() -> dict:
    g = torch.Generator().manual_seed(3)
    big = torch.randn(64, 300, generator=g)                     # 76800 B: 19 segments
    return {
        "big": big,
        "cube": torch.randn(6, 20, 30, generator=g),            # 14400 B: 4 segments
        "bf16": big[:40].to(torch.bfloat16),                    # 24000 B
        "f16": torch.randn(33, 7, generator=g).to(torch.float16),
        "f8_e4m3": torch.randn(50, 90, generator=g).to(torch.float8_e4m3fn),
        "f8_e5m2": torch.randn(70, 70, generator=g).to(torch.float8_e5m2),
        "i64": torch.arange(-500, 500, dtype=torch.int64).reshape(10, 100),
        "mask": torch.rand(5000, generator=g) > 0.5,
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(plain safetensors path, encrypted path, key), converted by the command line."""
    d = tmp_path_factory.mktemp("safe_open")
    key = os.urandom(32)
    (d / "key").write_bytes(key)
    (d / "key").chmod(0o600)  # the CLI refuses key files others can read
    save_file(plain_tensors(), str(d / "plain.safetensors"), metadata={"format": "pt", "k": "v"})
    assert cli(["encrypt-model", "--key-file", str(d / "key"), "--segment-size", "4KiB",
                str(d / "plain.safetensors"), str(d / "model.gc")]) == 0
    return d / "plain.safetensors", d / "model.gc", key


def raw(t) -> bytes:
    if isinstance(t, np.ndarray):
        return t.tobytes()
    return t.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8).numpy().tobytes()


def same(got, want) -> None:
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
    assert raw(got) == raw(want)


def copy_with(path, target, flips) -> None:
    blob = bytearray(path.read_bytes())
    for offset in flips:
        blob[offset] ^= 0x40
    target.write_bytes(bytes(blob))


# ------------------------------------------------------------------ parity
def test_parity_with_safetensors(files):
    plain, enc, key = files
    with models.safe_open(enc, framework="pt", key=key) as f, \
            safetensors.safe_open(str(plain), framework="pt") as ref:
        assert f.keys() == ref.keys()
        assert f.metadata() == ref.metadata() == {"format": "pt", "k": "v"}
        assert sorted(f.offset_keys()) == f.keys()
        for name in ref.keys():
            same(f.get_tensor(name), ref.get_tensor(name))
            s, r = f.get_slice(name), ref.get_slice(name)
            assert s.get_shape() == r.get_shape() and s.get_dtype() == r.get_dtype(), name
            same(s[...], r[...])
        everything = f.get_tensors()
        assert list(everything) == f.offset_keys()
        for name, t in everything.items():
            same(t, ref.get_tensor(name))


@pytest.mark.parametrize("metadata", [None, {}], ids=["none", "empty"])
def test_metadata_none_and_empty_as_in_safetensors(tmp_path, metadata):
    """safetensors' metadata() is {} for ``"__metadata__":{}`` and None without one; this
    metadata() said None for both (the table dropped {}, and the reader tested it for
    truth)."""
    save_file({"w": torch.ones(3)}, str(tmp_path / "p"), metadata=metadata)
    key = os.urandom(32)
    (tmp_path / "key").write_bytes(key)
    (tmp_path / "key").chmod(0o600)  # the CLI refuses key files others can read
    assert cli(["encrypt-model", "--key-file", str(tmp_path / "key"), str(tmp_path / "p"),
                str(tmp_path / "e")]) == 0
    with models.safe_open(tmp_path / "e", "pt", key=key) as f, \
            safetensors.safe_open(str(tmp_path / "p"), "pt") as ref:
        assert ref.metadata() == metadata
        assert f.metadata() == metadata and type(f.metadata()) is type(metadata)


def test_numpy_framework(files):
    plain, enc, key = files
    with models.safe_open(enc, framework="np", key=key) as f, \
            safetensors.safe_open(str(plain), framework="numpy") as ref:
        for name in ("big", "cube", "f16", "i64", "mask", "scalar", "empty"):
            same(f.get_tensor(name), ref.get_tensor(name))
            if name == "empty":  # safetensors' numpy slices refuse a dimension of size 0
                same(f.get_slice(name)[...], ref.get_tensor(name))
                continue
            index = () if name == "scalar" else slice(1, 3)
            same(f.get_slice(name)[index], ref.get_slice(name)[index])


SLICES = [0, -1, 3, slice(3, 9), slice(None, None, 5), (slice(None), slice(1, 5)),
          (Ellipsis, 7), (2, Ellipsis, slice(4, 29, 6)), (slice(1, 60, 7), slice(0, 300, 13)),
          (), slice(100, 200), (slice(2, 3), 0, 0)]


@pytest.mark.parametrize("name", ["big", "cube", "bf16", "f8_e4m3", "f8_e5m2", "i64"])
def test_slices_match_safetensors(files, name):
    plain, enc, key = files
    with models.safe_open(enc, "pt", key=key) as f, safetensors.safe_open(str(plain), "pt") as ref:
        s, r = f.get_slice(name), ref.get_slice(name)
        for index in SLICES:
            if isinstance(index, tuple) and len([i for i in index if i is not Ellipsis]) > \
                    len(s.get_shape()):
                continue
            got, want = s[index], r[index]
            same(got, want)
            assert got.is_contiguous()


def basic_index(shape):
    """Hypothesis: an int or a slice (positive step) per leading dimension, maybe '...'."""
    def one(n):
        ints = st.integers(-n, n - 1) if n else st.nothing()
        bounds = st.one_of(st.none(), st.integers(-n - 2, n + 2))
        return st.one_of(ints, st.builds(slice, bounds, bounds, st.one_of(st.none(),
                                                                         st.integers(1, n + 2))))
    return st.integers(0, len(shape)).flatmap(
        lambda k: st.tuples(*[one(n) for n in shape[:k]])).flatmap(
        lambda items: st.sampled_from([items, items + (Ellipsis,)]))


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_random_slices_match_safetensors(files, data):
    plain, enc, key = files
    name = data.draw(st.sampled_from(["big", "cube", "bf16", "f8_e5m2"]))
    with models.safe_open(enc, "pt", key=key) as f, safetensors.safe_open(str(plain), "pt") as ref:
        index = data.draw(basic_index(tuple(ref.get_slice(name).get_shape())))
        same(f.get_slice(name)[index], ref.get_slice(name)[index])


# ------------------------------------------------------------------ segments a slice touches
def expected_segments(shape, itemsize, index, segment=SEG) -> list[int]:
    """Brute force: the segments (within the tensor) that hold a selected element."""
    numbers = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)[index]
    starts = np.asarray(numbers).reshape(-1) * itemsize
    return sorted(set((starts // segment).tolist())
                  | set(((starts + itemsize - 1) // segment).tolist()))


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_touched_segments_are_exactly_the_selected_bytes(data):
    shape = tuple(data.draw(st.lists(st.integers(0, 12), min_size=0, max_size=4)))
    itemsize = data.draw(st.sampled_from([1, 2, 4, 8]))
    segment = data.draw(st.sampled_from([8, 64, 256]))
    index = data.draw(basic_index(shape))
    ranges, _ = _normalise(index, shape)
    assert touched_segments(ranges, shape, itemsize, segment) == \
        expected_segments(shape, itemsize, index, segment)


def test_many_runs_are_merged_into_spans(monkeypatch):
    """Past _MAX_RUNS runs, the innermost strided dimension becomes one span: more
    segments, never fewer, and the same for a selection that fits."""
    shape, index = (40, 50), (slice(None, None, 3), slice(1, 50, 9))
    ranges, _ = _normalise(index, shape)
    exact = expected_segments(shape, 4, index, 64)
    assert touched_segments(ranges, shape, 4, 64) == exact
    monkeypatch.setattr(_safe_open, "_MAX_RUNS", 5)
    merged = touched_segments(ranges, shape, 4, 64)
    assert set(exact) < set(merged)


@pytest.mark.parametrize("index", [slice(10, 12), (slice(0, 20), slice(0, 3)), (5, slice(7, 9))])
def test_slice_decrypts_only_the_segments_it_touches(files, tmp_path, index):
    """Every segment of 'big' the slice does not need is corrupted: it still loads (and
    equals the plaintext); a flipped byte in one it needs raises."""
    plain, enc, key = files
    header = models.read_header(enc, key)
    info = next(i for i in header.tensors if i.name == "big")
    base = header.header_length + info.begin
    count = -(-info.nbytes // SEG)
    needed = expected_segments(info.shape, 4, index)
    assert 0 < len(needed) < count
    others = [j for j in range(count) if j not in needed]
    copy_with(enc, tmp_path / "damaged", [base + j * SEG + 17 for j in others])
    with models.safe_open(tmp_path / "damaged", "pt", key=key) as f, \
            safetensors.safe_open(str(plain), "pt") as ref:
        same(f.get_slice("big")[index], ref.get_slice("big")[index])
        with pytest.raises(AuthenticationError, match="tensor 'big'"):
            f.get_tensor("big")
        same(f.get_tensor("cube"), ref.get_tensor("cube"))  # other tensors are unaffected
    copy_with(enc, tmp_path / "hit", [base + needed[-1] * SEG + 5])
    with models.safe_open(tmp_path / "hit", "pt", key=key) as f:
        with pytest.raises(AuthenticationError, match="tensor 'big'"):
            f.get_slice("big")[index]
        same(f.get_tensor("bf16"), plain_tensors()["bf16"])


def test_flipped_tag_raises_for_the_slice_that_reads_its_segment(files, tmp_path):
    plain, enc, key = files
    header = models.read_header(enc, key)
    segs = models._segments(header.tensors, header.segment_size)
    target = next(s for s in segs if header.tensors[s.tensor].name == "cube" and s.start == SEG)
    tag_at = header.header_length + header.data_length + 16 * target.index
    copy_with(enc, tmp_path / "t", [tag_at + 3])
    with models.safe_open(tmp_path / "t", "pt", key=key) as f:
        with pytest.raises(AuthenticationError) as info:
            f.get_slice("cube")[1]  # elements 600..1199: bytes 2400..4799, segments 0 and 1
        assert info.value.segment == target.index
        same(f.get_slice("cube")[0, :2], plain_tensors()["cube"][0, :2])  # segment 0 only


# ------------------------------------------------------------------ keys and errors
def test_keys_from_an_envelope(tmp_path):
    from gpucrypt.keys import Identity, Keyset, NoMatchingRecipient, generate_dek, seal_envelope

    identity, keyset = Identity.generate(), Keyset.generate()
    dek = generate_dek()
    tensors = {"w": torch.randn(3, 5)}
    models.save_encrypted(tensors, tmp_path / "m", dek, device="cpu",
                          envelope=seal_envelope(dek, [identity.recipient, keyset]))
    import io
    import json
    import logging

    from gpucrypt import audit

    log = io.StringIO()
    handler = audit.enable(log)
    try:
        for kw in ({"identity": identity}, {"keyset": keyset},
                   {"identity": [Identity.generate(), identity]}):
            with models.safe_open(tmp_path / "m", "pt", **kw) as f:
                same(f.get_tensor("w"), tensors["w"])
    finally:
        logging.getLogger(audit.LOGGER_NAME).removeHandler(handler)
    opened = [json.loads(line) for line in log.getvalue().splitlines()]
    assert [(e["path"], e["key_id"]) for e in opened if e["operation"] == "model.open"] == [
        (str(tmp_path / "m"), label) for label in (identity.fingerprint,
                                                    f"aes-kwp:{keyset.primary.id}",
                                                    identity.fingerprint)]
    with pytest.raises(NoMatchingRecipient):
        models.safe_open(tmp_path / "m", "pt", identity=Identity.generate())
    with pytest.raises(ValueError, match="not both"):
        models.safe_open(tmp_path / "m", "pt", key=dek, keyset=keyset)
    with pytest.raises(ValueError, match="no key given"):
        models.safe_open(tmp_path / "m", "pt")
    models.save_encrypted(tensors, tmp_path / "raw", dek, device="cpu")
    with pytest.raises(NoMatchingRecipient, match="open it with key="):
        models.safe_open(tmp_path / "raw", "pt", keyset=keyset)


def test_wrong_key_fails_at_open(files):
    _, enc, key = files
    with pytest.raises(AuthenticationError, match="header authentication failed"):
        models.safe_open(enc, "pt", key=bytes(32))


def test_errors_are_safetensors_own_class(files):
    """Code written for safetensors catches SafetensorError: the same mistakes raise it
    here too (and the built-in kinds the rest of gpucrypt raises)."""
    plain, enc, key = files
    SafetensorError = safetensors.SafetensorError
    for opener, path, kw in ((safetensors.safe_open, str(plain), {}),
                             (models.safe_open, enc, {"key": key})):
        with pytest.raises(SafetensorError):
            opener(path, "no-such-framework", **kw)
        f = opener(path, "pt", **kw)
        with pytest.raises(SafetensorError, match="nope"):
            f.get_tensor("nope")
        with pytest.raises(SafetensorError, match="nope"):
            f.get_slice("nope")
    with pytest.raises(KeyError) as info:
        models.safe_open(enc, "pt", key=key).get_tensor("nope")
    assert str(info.value) == "no tensor 'nope' in this model file"
    f = models.safe_open(enc, "pt", key=key)
    f.close()
    with pytest.raises(SafetensorError, match="closed"):
        f.get_tensor("big")


def _raised_without_waiting(fifo, call) -> BaseException | None:
    """What ``call()`` raised (None if it returned), run in a thread. A FIFO's blocking
    open waits for a writer forever: if the call is still running after 10 s, the writer
    side is opened and closed (the waiting open then returns, and reads the end) and the
    test fails, so that a regression fails here instead of hanging the suite."""
    raised = []

    def target():
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            raised.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a reader waits: this opens
        thread.join(10)
        pytest.fail("the call waited on the FIFO for a writer instead of refusing it")
    return raised[0] if raised else None


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_fifo_or_a_folder_is_refused_at_once_as_load_encrypted_refuses_it(tmp_path):
    """safe_open opened the path with a plain blocking open: on a FIFO it waited for a
    writer forever, and a folder raised a bare IsADirectoryError, where load_encrypted and
    export_safetensors say at once, in a FormatError, that it is no regular file."""
    fifo = tmp_path / "model.gc"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "FIFO"), (tmp_path, "directory")):
        got = _raised_without_waiting(fifo, lambda: models.safe_open(path, "np", key=bytes(32)))
        want = _raised_without_waiting(fifo, lambda: models.load_encrypted(
            path, bytes(32), "cpu", framework="numpy"))
        assert isinstance(got, FormatError), repr(got)
        assert str(got) == str(want) == f"{path} is a {kind}, not a regular file: give the " \
                                         f"path of the model file itself"


def test_argument_errors(files):
    _, enc, key = files
    with pytest.raises(ValueError, match="framework must be one of"):
        models.safe_open(enc, "tf", key=key)
    with pytest.raises(ValueError, match="device must be"):
        models.safe_open(enc, "pt", device="tpu", key=key)
    f = models.safe_open(enc, "pt", key=key)
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        f.get_tensor("nope")
    s = f.get_slice("big")
    with pytest.raises(IndexError, match="out of bounds for dimension 0 with size 64"):
        s[64]
    with pytest.raises(IndexError, match="too many indices"):
        s[1, 2, 3]
    with pytest.raises(ValueError, match="positive"):
        s[::-1]
    with pytest.raises(TypeError, match="ints, slices and"):
        s[[0, 1]]
    assert len(s) == 64
    f.close()
    with pytest.raises(ValueError, match="closed"):
        f.get_tensor("big")
    with pytest.raises(ValueError, match="closed"):
        s[0]


@pytest.mark.parametrize("device", ["mps", "CPU", "cuda:x", "auto", "gpu", -1, True])
def test_a_device_safe_open_does_not_take_is_refused_in_its_own_words(files, device):
    """safe_open(device="mps") said "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"
    (load_encrypted's words), yet safe_open refuses 'auto': the message lists only what
    it takes, and says what to do instead."""
    _, enc, key = files
    with pytest.raises(ValueError) as info:
        models.safe_open(enc, "pt", device=device, key=key)
    message = str(info.value)
    assert message.startswith("device must be 'cpu', 'cuda', 'cuda:N' or a CUDA device "
                              f"number N, not {device!r}: "), message
    assert ("give 'cpu' or 'cuda'" if device in ("auto", "gpu") else "move the tensors") \
        in message


def test_a_shard_from_an_older_save_of_its_folder_is_refused(tmp_path):
    """safe_open on the shards of a checkpoint folder (what per-shard loaders do) returned
    the old weights of a shard copied in from an older save of the same folder under the
    same key, which load_checkpoint refuses by the folder's manifest. The manifest beside
    the file is checked too; a file under another key, or not listed, is refused as well.
    Without the manifest the file stands alone (what the docs say safe_open cannot see)."""
    import json
    import shutil

    from gpucrypt.files import checkpoints

    key = os.urandom(32)
    shard = "model-00001-of-00002.safetensors"

    def save(version: str, value: float) -> None:
        plain = tmp_path / version
        plain.mkdir()
        save_file({"a": torch.full((4,), value)}, str(plain / shard))
        save_file({"b": torch.full((4,), value)}, str(plain / "model-00002-of-00002.safetensors"))
        (plain / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": shard, "b": "model-00002-of-00002.safetensors"}}))
        checkpoints.encrypt_checkpoint(plain, tmp_path / f"{version}-enc", key, device="cpu")

    save("v1", 1.0)
    save("v2", 2.0)
    new = tmp_path / "v2-enc"
    with models.safe_open(new / shard, "pt", key=key) as f:  # the folder's own file
        assert f.get_tensor("a").tolist() == [2.0] * 4
    shutil.copy(tmp_path / "v1-enc" / shard, new / shard)
    with pytest.raises(AuthenticationError, match=f"{shard} is not the file its folder was "
                       f"encrypted with: the folder's gpucrypt-checkpoint.json lists it under "
                       f"another encryption .*load_checkpoint or gpucrypt.hf"):
        models.safe_open(new / shard, "pt", key=key)
    # the other ways of opening one model file check it too
    with pytest.raises(AuthenticationError, match=f"{shard} is not the file its folder"):
        models.load_encrypted(new / shard, key, "cpu")
    with pytest.raises(AuthenticationError, match=f"{shard} is not the file its folder"):
        models.export_safetensors(new / shard, tmp_path / "exported.safetensors", key)
    assert not (tmp_path / "exported.safetensors").exists()
    with pytest.raises(AuthenticationError, match=f"{shard} is not the file"):
        checkpoints.load_checkpoint(new, key=key)  # as before
    # a file the manifest does not list (one under another key: the next test)
    shutil.copy(new / shard, new / "extra.safetensors")
    with pytest.raises(AuthenticationError, match="lists it not at all"):
        models.safe_open(new / "extra.safetensors", "pt", key=key)
    # outside the folder both open on their own, with their own weights
    os.rename(new / shard, tmp_path / "moved.safetensors")
    with models.safe_open(tmp_path / "moved.safetensors", "pt", key=key) as f:
        assert f.get_tensor("a").tolist() == [1.0] * 4
    os.rename(new / "gpucrypt-checkpoint.json", tmp_path / "manifest.json")
    with models.safe_open(new / "extra.safetensors", "pt", key=key) as f:  # no manifest
        assert f.get_tensor("a").tolist() == [1.0] * 4


def test_a_manifest_that_says_nothing_of_the_file_leaves_it_standing_alone(tmp_path):
    """A file whose own header verifies, beside a manifest that does not verify under its
    key, cannot be read, or is of another version: the manifest says nothing about it, so
    it opens on its own, as with no manifest there (safe_open had refused it, naming a
    folder problem for a file that had none)."""
    from gpucrypt.files import checkpoints

    plain = tmp_path / "plain"
    plain.mkdir()
    save_file({"a": torch.ones(4)}, str(plain / "model.safetensors"))
    checkpoints.encrypt_checkpoint(plain, tmp_path / "enc", os.urandom(32), device="cpu")
    own = os.urandom(32)
    path = tmp_path / "enc" / "model.safetensors"
    models.save_encrypted({"a": torch.zeros(4)}, path, own)
    manifest = tmp_path / "enc" / "gpucrypt-checkpoint.json"
    for state in ("another key", "malformed", "a later version", "a folder", "a dangling link"):
        if state == "malformed":
            manifest.write_text("{not json")
        elif state == "a later version":
            manifest.write_text('{"format": "gpucrypt-checkpoint-manifest", "version": 99, "files": {}}')
        elif state == "a folder":
            manifest.unlink()
            manifest.mkdir()
        elif state == "a dangling link":
            manifest.rmdir()
            manifest.symlink_to(tmp_path / "nowhere")
        with models.safe_open(path, "pt", key=own) as f:
            assert f.get_tensor("a").tolist() == [0.0] * 4, state
        assert models.load_encrypted(path, own, "cpu")["a"].tolist() == [0.0] * 4


@pytest.mark.gpu
def test_torch_cuda_slices(files):
    plain, enc, key = files
    with models.safe_open(enc, "pt", device="cuda:0", key=key) as f, \
            safetensors.safe_open(str(plain), "pt") as ref:
        got = f.get_slice("bf16")[3:9, ::4]
        assert got.is_cuda
        same(got.cpu(), ref.get_slice("bf16")[3:9, ::4])
        same(f.get_tensor("f8_e4m3").cpu(), ref.get_tensor("f8_e4m3"))


def test_a_forged_table_cannot_make_the_reader_list_billions_of_segments(tmp_path):
    """Whoever can seal a model file for a reader (a recipient's public key is enough)
    can write a 200-byte file whose table claims one 2**44-byte tensor in 4 KiB segments:
    the file's expected length is counted, not listed, so it is refused as truncated at
    once (the list of 2**32 segments exhausted memory first); one that claims more than
    the format's 2**32 is not a file gpucrypt wrote. Run under a 1 GiB address space in a
    subprocess."""
    for n, error in ((1 << 44, "TruncatedError truncated file"),
                     (1 << 45, "FormatError the file's table asks for more than")):
        _open_forged(tmp_path, n, error)


def _open_forged(tmp_path, n: int, error: str) -> None:
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import hashlib, hmac, json, os, resource
        from gpucrypt.files import _format, models as m
        key, salt, n = os.urandom(32), os.urandom(32), {n}
        table = json.dumps({{"w": {{"data_offsets": [0, n], "dtype": "uint8", "shape": [n]}}}},
                           sort_keys=True, separators=(",", ":")).encode()
        prefix = os.urandom(_format.prefix_size("chacha20-poly1305"))
        fixed = m._fixed_fields("chacha20-poly1305", 4096, False, salt, len(table), n, prefix)
        body = fixed + _format.variable_fields(None, None) + table
        mac = hmac.new(m._derive(key, salt, m._HEADER_MAC_INFO, fixed), body,
                       hashlib.sha256).digest()
        path = {str(tmp_path / "forged.gc")!r}
        with open(path, "wb") as f:
            f.write(body + mac)
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        try:
            m.safe_open(path, "np", key=key)
        except BaseException as exc:
            print(type(exc).__name__, exc)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.startswith(error), (done.stdout, done.stderr)


def test_a_cuda_device_where_no_gpu_runs_is_refused_when_opened(tmp_path):
    """safe_open(..., device="cuda") opened on a machine without a GPU and failed only at
    the first get_tensor. Outside the simulator (a subprocess), where no GPU runs."""
    assert_gpu_call_refused_outside_simulator(
        "import os, numpy as np\n"
        "from gpucrypt import models\n"
        "key = os.urandom(32)\n"
        "models.save_encrypted({'w': np.ones(4, np.float32)}, 'm.gc', key, device='cpu')",
        "models.safe_open('m.gc', 'pt', device='cuda', key=key)", tmp_path)
