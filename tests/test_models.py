"""gpucrypt.models: encrypted model files (docs/MODEL_FORMAT.md) and the encrypt-model /
decrypt-model command line.

The model is a small ``torch.nn`` network built here, plus bfloat16, 0-d and empty
tensors; segments are 4 KiB so that tensors span several segments. The GPU path runs
in numba's simulator on NumPy "device" arrays, on a handful of segments only.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import struct
import sys

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gpucrypt import models, pipeline, stream
from gpucrypt.cli import main as cli
from gpucrypt.stream import AuthenticationError, FormatError, TruncatedError, UnsupportedVersion

SEG = 4096
KEY = bytes(range(32))
ALGS = ("chacha20-poly1305", "xchacha20-poly1305", "aes-256-gcm")


def model_tensors() -> dict:
    """A real model's weights (float32), bfloat16 copies of some, a 0-d and an empty tensor."""
    torch.manual_seed(7)
    net = torch.nn.Sequential(torch.nn.Linear(48, 40), torch.nn.LayerNorm(40), torch.nn.ReLU(),
                              torch.nn.Linear(40, 10))
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    state["0.weight.bf16"] = state["0.weight"].to(torch.bfloat16)   # 3840 B: one short segment
    state["3.weight.bf16"] = state["3.weight"].to(torch.bfloat16)
    state["step"] = torch.tensor(1234, dtype=torch.int64)           # 0-d
    state["empty"] = torch.empty(0, 4)                               # no segment at all
    state["big"] = torch.randn(3, 1500)                              # 18000 B: 5 segments
    return state


def write_private(path, data: bytes) -> None:
    """A key file as the CLI accepts it: readable by its owner only."""
    path.write_bytes(data)
    path.chmod(0o600)


def raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_identical(got: dict, want: dict, ordered: bool = True) -> None:
    assert list(got) == list(want) if ordered else sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and tuple(got[name].shape) == tuple(t.shape), name
        assert raw(got[name]) == raw(t), name


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model.gcsafetensors"
    tensors = model_tensors()
    models.save_encrypted(tensors, path, KEY, {"arch": "mlp"}, segment_size=SEG, device="cpu")
    return path, tensors


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("encrypt_names", [False, True])
@pytest.mark.parametrize("algorithm", ALGS)
def test_round_trip_cpu(tmp_path, algorithm, encrypt_names):
    path = tmp_path / "m"
    tensors = model_tensors()
    header = models.save_encrypted(tensors, path, KEY, {"arch": "mlp", "note": "é"},
                                   algorithm=algorithm, encrypt_names=encrypt_names,
                                   segment_size=SEG, device="cpu", threads=2)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.path.getsize(path) == header.file_length
    got = models.load_encrypted(path, KEY, "cpu", threads=2)
    assert_identical(got, tensors)
    assert all(g.device.type == "cpu" for g in got.values())
    # every tensor is its own allocation (safetensors can save them; each frees alone)
    pointers = [g.data_ptr() for g in got.values() if g.numel()]
    assert len(set(pointers)) == len(pointers)
    verified = models.read_header(path, KEY)
    assert verified.verified and verified.metadata == {"arch": "mlp", "note": "é"}
    plain = models.read_header(path)
    assert not plain.verified
    if encrypt_names:
        assert plain.tensors is None and b"weight" not in path.read_bytes()
    else:
        assert [t.name for t in plain.tensors] == list(tensors)
        assert plain.tensors[list(tensors).index("big")].shape == (3, 1500)


def test_numpy_framework_and_one_thread(tmp_path):
    tensors = {"a": np.arange(3000, dtype=np.float32).reshape(30, 100),
               "b": np.array(7, dtype=np.uint8), "c": np.zeros((2, 0), np.int16)}
    models.save_encrypted(tensors, tmp_path / "m", KEY, segment_size=SEG, device="cpu")
    got = models.load_encrypted(tmp_path / "m", KEY, "cpu", framework="numpy", threads=1)
    for name, x in tensors.items():
        assert isinstance(got[name], np.ndarray) and got[name].dtype == x.dtype
        assert got[name].shape == x.shape and got[name].tobytes() == x.tobytes()


def test_fresh_salt_and_prefix_per_file(tmp_path):
    tensors = {"w": torch.ones(10)}
    for name in ("a", "b"):
        models.save_encrypted(tensors, tmp_path / name, KEY, segment_size=SEG, device="cpu")
    a, b = models.read_header(tmp_path / "a"), models.read_header(tmp_path / "b")
    assert a.salt != b.salt and a.nonce_prefix != b.nonce_prefix
    assert (tmp_path / "a").read_bytes()[a.header_length:] != (tmp_path / "b").read_bytes()[b.header_length:]


_REFERENCE_IDS = {"chacha20-poly1305": (1, 12), "xchacha20-poly1305": (2, 24), "aes-256-gcm": (3, 12)}


def _reference_open(algorithm: str, key: bytes, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
    """The AEAD from its reference library: libsodium for XChaCha20, else cryptography."""
    if algorithm == "xchacha20-poly1305":
        from nacl import bindings as sodium

        return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, aad, nonce, key)
    cls = ChaCha20Poly1305 if algorithm == "chacha20-poly1305" else AESGCM
    return cls(key).decrypt(nonce, sealed, aad)


@pytest.mark.parametrize("encrypt_names", [False, True])
@pytest.mark.parametrize("algorithm", ALGS)
def test_independent_decoder(tmp_path, algorithm, encrypt_names):
    """Decode a file from docs/MODEL_FORMAT.md alone, with the reference libraries."""
    tensors = model_tensors()
    path = tmp_path / "m"
    models.save_encrypted(tensors, path, KEY, {"arch": "mlp"}, segment_size=SEG, device="cpu",
                          algorithm=algorithm, encrypt_names=encrypt_names)
    blob = path.read_bytes()
    magic, version, alg, log2, flags, salt, t_len, d_len = struct.unpack(">8sBBBB32sQQ", blob[:60])
    alg_id, nonce_len = _REFERENCE_IDS[algorithm]
    assert (magic, version, alg, flags) == (b"GPUCMODL", 1, alg_id, int(encrypt_names))
    prefix_len = nonce_len - 5  # then a 4-byte segment index and the last flag
    fixed = blob[:60 + prefix_len]
    prefix = blob[60:60 + prefix_len]
    pos = 60 + prefix_len
    (k_len,) = struct.unpack(">H", blob[pos:pos + 2]); pos += 2 + k_len
    (e_len,) = struct.unpack(">I", blob[pos:pos + 4]); pos += 4 + e_len
    stored = blob[pos:pos + t_len]; pos += t_len
    mac, header_end = blob[pos:pos + 32], pos + 32

    def hkdf(info):
        return HKDF(hashes.SHA256(), 32, salt, info + fixed).derive(KEY)

    assert hmac.compare_digest(mac, hmac.new(hkdf(b"gpucrypt model v1 header mac"),
                                             blob[:pos], hashlib.sha256).digest())
    table = (_reference_open(algorithm, hkdf(b"gpucrypt model v1 table key"), bytes(nonce_len),
                             stored, fixed) if encrypt_names else stored)
    assert (b"0.weight" in stored) != encrypt_names
    doc = json.loads(table)
    assert doc.pop("__metadata__") == {"arch": "mlp"}
    entries = sorted(doc.items(), key=lambda kv: kv[1]["data_offsets"])
    seg_key = hkdf(b"gpucrypt model v1 segment key")
    aad = fixed + hashlib.sha256(stored).digest()
    S, index, data = 1 << log2, 0, blob[header_end:header_end + d_len]
    n = sum(-(-(e["data_offsets"][1] - e["data_offsets"][0]) // S) for _, e in entries)
    assert len(blob) == header_end + d_len + 16 * n
    for name, e in entries:
        begin, end = e["data_offsets"]
        plain = b""
        for start in range(begin, end, S):
            ct = data[start:min(start + S, end)]
            tag = blob[header_end + d_len + 16 * index:][:16]
            nonce = prefix + struct.pack(">I", index) + (b"\x01" if index == n - 1 else b"\x00")
            plain += _reference_open(algorithm, seg_key, nonce, ct + tag, aad)
            index += 1
        assert plain == raw(tensors[name]), name
        assert e["dtype"] == str(tensors[name].dtype).removeprefix("torch.")
    assert index == n


def test_envelope_slot_with_keys_recipients(tmp_path):
    from gpucrypt.keys import Identity, generate_dek, open_envelope, seal_envelope

    identity = Identity.generate()
    dek = generate_dek()
    tensors = {"w": torch.randn(100)}
    models.save_encrypted(tensors, tmp_path / "m", dek, key_id="team-a", device="cpu",
                          envelope=seal_envelope(dek, [identity.recipient]))
    header = models.read_header(tmp_path / "m")
    assert header.key_id == "team-a"
    key = open_envelope(header.envelope, [identity])
    assert_identical(models.load_encrypted(tmp_path / "m", key, "cpu"), tensors)


def test_saved_for_recipients_and_a_keyset(tmp_path):
    """recipients=/keyset= instead of a key: a fresh data key per file, wrapped for each of
    them; load_encrypted, safe_open and decrypt-model open it with identity=/keyset=, and the
    keyed save and load are audited with the file's path."""
    import io
    import logging

    from gpucrypt import audit
    from gpucrypt.keys import Identity, Keyset, NoMatchingRecipient

    alice, keyset = Identity.generate(), Keyset.generate()
    tensors = model_tensors()
    log = io.StringIO()
    handler = audit.enable(log)
    try:
        first = models.save_encrypted(tensors, tmp_path / "a", recipients=[alice.recipient],
                                      keyset=keyset, device="cpu")
        second = models.save_encrypted(tensors, tmp_path / "b", recipients=alice.recipient,
                                       device="cpu")
        got = models.load_encrypted(tmp_path / "a", identity=alice, device="cpu")
    finally:
        logging.getLogger(audit.LOGGER_NAME).removeHandler(handler)
    assert_identical(got, tensors)
    assert first.key_id == keyset.primary.id and second.key_id is None
    assert first.salt != second.salt  # and a data key of its own: the other's envelope fails
    assert_identical(models.load_encrypted(tmp_path / "a", keyset=keyset, device="cpu"), tensors)
    assert_identical(models.load_encrypted(tmp_path / "b", None, "cpu", identity=[
        Identity.generate(), alice]), tensors)
    with models.safe_open(tmp_path / "a", "pt", keyset=keyset) as f:
        assert torch.equal(f.get_tensor("big"), tensors["big"])
    assert cli(["decrypt-model", str(tmp_path / "b"), str(tmp_path / "b.safetensors"),
                "-i", _saved_identity(tmp_path, alice)]) == 0
    from safetensors.torch import load_file

    assert_identical(load_file(tmp_path / "b.safetensors"), tensors, ordered=False)
    with pytest.raises(NoMatchingRecipient):
        models.load_encrypted(tmp_path / "b", keyset=keyset, device="cpu")
    events = [json.loads(line) for line in log.getvalue().splitlines()]
    saved, loaded = ([e for e in events if e["operation"] == op] for op in ("model.encrypt",
                                                                     "model.decrypt"))
    assert [e["path"] for e in saved] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert saved[0]["recipients"] == [alice.fingerprint, f"aes-kwp:{keyset.primary.id}"]
    assert saved[0]["key_id"] == keyset.primary.id
    assert [(e["path"], e["key_id"]) for e in loaded] == [(str(tmp_path / "a"), alice.fingerprint)]
    assert KEY.hex() not in log.getvalue()


def _saved_identity(tmp_path, identity) -> str:
    path = tmp_path / "id.key"
    identity.save(path)
    return str(path)


def test_keyed_argument_errors(tmp_path):
    """Either a key or recipients/keyset, refused before anything is sealed or written; an
    identity where a key opens the file, and a public key where the private one is needed,
    are said before the file is read."""
    from gpucrypt.keys import Identity, Keyset, NoMatchingRecipient

    t, alice = {"w": torch.ones(3)}, Identity.generate()
    for kw in ({"key": KEY}, {"key_id": "k"}, {"envelope": b"x"}, {"_salt": bytes(16)}):
        with pytest.raises(ValueError, match="not both"):
            models.save_encrypted(t, tmp_path / "m", recipients=alice.recipient, **kw)
    with pytest.raises(ValueError, match="no key given"):
        models.save_encrypted(t, tmp_path / "m")
    with pytest.raises(TypeError, match="load it first"):
        models.save_encrypted(t, tmp_path / "m", keyset=str(tmp_path / "ks.json"))
    import io
    import logging

    from gpucrypt import audit

    log = io.StringIO()
    handler = audit.enable(log)
    try:  # refused before the data key is sealed for the recipients (a KMS call, audited)
        for kw, exc, match in (({"segment_size": 1000}, ValueError, "power of two"),
                               ({"metadata": {"a": 1}}, TypeError, "metadata"),
                               ({"device": "tpu"}, ValueError, "device"),
                               ({"threads": 0}, ValueError, "threads")):
            with pytest.raises(exc, match=match):
                models.save_encrypted(t, tmp_path / "m", recipients=alice.recipient, **kw)
        # and so is an output path that cannot be written: a missing folder, a folder, a link
        links = tmp_path / "links"
        links.mkdir()
        (links / "m").symlink_to(tmp_path / "elsewhere")
        for path, exc in ((tmp_path / "missing" / "m", FileNotFoundError),
                          (links, IsADirectoryError), (links / "m", OSError)):
            with pytest.raises(exc):
                models.save_encrypted(t, path, recipients=alice.recipient)
        # and a tensor that cannot be saved
        with pytest.raises(TypeError, match="'w'"):
            models.save_encrypted({"w": object()}, tmp_path / "m", recipients=alice.recipient)
    finally:
        logging.getLogger(audit.LOGGER_NAME).removeHandler(handler)
    assert "envelope.seal" not in log.getvalue()
    assert log.getvalue().count('"model.encrypt", "outcome": "error"') == 4
    assert sorted(os.listdir(tmp_path)) == ["links"] and os.listdir(links) == ["m"]
    (links / "m").unlink()
    links.rmdir()
    models.save_encrypted(t, tmp_path / "raw", KEY, device="cpu")
    with pytest.raises(ValueError, match="no key given"):
        models.load_encrypted(tmp_path / "raw", device="cpu")
    with pytest.raises(ValueError, match="not both"):
        models.load_encrypted(tmp_path / "raw", KEY, "cpu", keyset=Keyset.generate())
    with pytest.raises(TypeError, match="public key"):
        models.load_encrypted(tmp_path / "nowhere", identity=alice.recipient, device="cpu")
    with pytest.raises(ValueError, match="framework"):
        models.load_encrypted(tmp_path / "nowhere", identity=alice, framework="jax")
    with pytest.raises(NoMatchingRecipient, match="open it with key="):
        models.load_encrypted(tmp_path / "raw", identity=alice, device="cpu")


def test_argument_errors(tmp_path):
    t = {"w": torch.ones(3)}
    with pytest.raises(ValueError, match="32 bytes"):
        models.save_encrypted(t, tmp_path / "m", b"short")
    with pytest.raises(ValueError, match="algorithm"):
        models.save_encrypted(t, tmp_path / "m", KEY, algorithm="rot13")
    with pytest.raises(ValueError, match="power of two"):
        models.save_encrypted(t, tmp_path / "m", KEY, segment_size=1000)
    with pytest.raises(TypeError, match="metadata"):
        models.save_encrypted(t, tmp_path / "m", KEY, {"a": 1})
    with pytest.raises(ValueError, match="__metadata__"):
        models.save_encrypted({"__metadata__": torch.ones(1)}, tmp_path / "m", KEY)
    with pytest.raises(TypeError, match="expected a tensor"):
        models.save_encrypted({"w": [1, 2, 3]}, tmp_path / "m", KEY)
    assert os.listdir(tmp_path) == []  # nothing left behind, not even a temporary file
    models.save_encrypted(t, tmp_path / "m", KEY, device="cpu")
    with pytest.raises(ValueError, match="framework"):
        models.load_encrypted(tmp_path / "m", KEY, "cpu", framework="jax")
    with pytest.raises(ValueError, match="device"):
        models.load_encrypted(tmp_path / "m", KEY, "tpu")
    with pytest.raises(ValueError, match="CuPy arrays live on the GPU"):
        models.load_encrypted(tmp_path / "m", KEY, "cpu", framework="cupy")


def test_non_contiguous_tensors_are_saved_as_their_values(tmp_path):
    x = torch.arange(20, dtype=torch.float32).reshape(4, 5)
    models.save_encrypted({"t": x.t()}, tmp_path / "m", KEY, device="cpu")
    assert torch.equal(models.load_encrypted(tmp_path / "m", KEY, "cpu")["t"], x.t())


# ------------------------------------------------------------------ damage
def header_length(path) -> int:
    return models.read_header(path).header_length


def flip(path, offset: int, bit: int = 0) -> None:
    blob = bytearray(path.read_bytes())
    blob[offset] ^= 1 << bit
    path.write_bytes(bytes(blob))


def load_fails(path, exc, match, key=KEY):
    result = None
    with pytest.raises(exc, match=match) as info:
        result = models.load_encrypted(path, key, "cpu")
    assert result is None
    return info.value


def test_load_a_subset_of_the_tensors(saved):
    """names= returns those tensors only, in the file's order; only their segments are
    read and verified (damage elsewhere does not stop them); unknown names are refused."""
    path, tensors = saved
    got = models.load_encrypted(path, KEY, "cpu", names=["step", "big", "empty"], threads=2)
    assert list(got) == [n for n in tensors if n in ("step", "big", "empty")]
    assert_identical(got, {n: tensors[n] for n in got})
    h = models.read_header(path, KEY)
    w = next(i for i in h.tensors if i.name == "0.weight")
    flip(path, h.header_length + w.begin + 5)  # inside a tensor not asked for
    assert_identical(models.load_encrypted(path, KEY, "cpu", names=["big"]), {"big": tensors["big"]})
    load_fails(path, AuthenticationError, "tensor '0.weight'")
    assert models.load_encrypted(path, KEY, "cpu", names=[]) == {}
    with pytest.raises(KeyError, match="no tensor 'nope'"):
        models.load_encrypted(path, KEY, "cpu", names=["big", "nope"])
    with pytest.raises(TypeError, match="not one str"):
        models.load_encrypted(path, KEY, "cpu", names="big")


def test_wrong_key(saved):
    err = load_fails(saved[0], AuthenticationError, "header authentication failed: wrong key",
                     key=bytes(32))
    assert err.segment is None


@pytest.mark.parametrize("where", ["algorithm", "flags", "salt", "data length", "prefix",
                                   "key id length", "table", "mac"])
def test_flipped_bit_in_header(saved, where):
    path, _ = saved
    h = models.read_header(path)
    offsets = {"algorithm": 9, "flags": 11, "salt": 20, "data length": 59, "prefix": 62,
               "key id length": 68, "table": h.header_length - 32 - 10,
               "mac": h.header_length - 1}
    flip(path, offsets[where])
    with pytest.raises(stream.StreamError) as info:
        models.load_encrypted(path, KEY, "cpu")
    # a header field changed: either the parser refuses it or the MAC does, never a segment
    assert isinstance(info.value, (AuthenticationError, FormatError))
    assert getattr(info.value, "segment", None) is None


def test_every_header_byte_is_authenticated(tmp_path):
    path = tmp_path / "m"
    models.save_encrypted({"w": torch.ones(8)}, path, KEY, {"k": "v"}, key_id="id",
                          envelope=b"env", device="cpu")
    original = path.read_bytes()
    for offset in range(header_length(path)):
        path.write_bytes(original[:offset] + bytes([original[offset] ^ 0x40]) + original[offset + 1:])
        with pytest.raises(stream.StreamError):
            models.load_encrypted(path, KEY, "cpu")


@pytest.mark.parametrize("encrypt_names", [False, True])
def test_renamed_tensor(tmp_path, encrypt_names):
    path = tmp_path / "m"
    models.save_encrypted({"layer.weight": torch.ones(4), "layer.bias": torch.zeros(4)}, path,
                          KEY, encrypt_names=encrypt_names, device="cpu")
    blob = path.read_bytes()
    if encrypt_names:  # a bit of the encrypted table (names are inside it)
        flip(path, header_length(path) - 32 - 20)
    else:
        assert blob.count(b"layer.weight") == 1
        path.write_bytes(blob.replace(b"layer.weight", b"layer.wEight"))
    load_fails(path, AuthenticationError, "header authentication failed")


@pytest.mark.parametrize("region", ["data", "tag"])
def test_flipped_bit_in_data_or_tag(saved, region):
    path, tensors = saved
    h = models.read_header(path)
    big = next(t for t in h.tensors if t.name == "big")
    first_big_segment = sum(-(-t.nbytes // SEG) for t in h.tensors if t.begin < big.begin)
    if region == "data":
        flip(path, h.header_length + big.begin + SEG + 5, 3)   # inside big's second segment
        index = first_big_segment + 1
    else:
        index = first_big_segment + 2
        flip(path, h.header_length + h.data_length + 16 * index + 15, 7)
    err = load_fails(path, AuthenticationError, r"segment \d+ \(tensor 'big'")
    assert err.segment == index


def test_swapped_tensors_data(tmp_path):
    """Two tensors of the same size: swap their ciphertext, and their tags along with it."""
    path = tmp_path / "m"
    a, b = torch.randn(SEG // 4), torch.randn(SEG // 4)
    models.save_encrypted({"a": a, "b": b}, path, KEY, segment_size=SEG, device="cpu")
    h = models.read_header(path)
    blob = bytearray(path.read_bytes())
    H, D = h.header_length, h.data_length
    blob[H:H + SEG], blob[H + SEG:H + 2 * SEG] = blob[H + SEG:H + 2 * SEG], blob[H:H + SEG]
    t = H + D
    blob[t:t + 16], blob[t + 16:t + 32] = blob[t + 16:t + 32], blob[t:t + 16]
    path.write_bytes(bytes(blob))
    load_fails(path, AuthenticationError, "segment 0")


def test_segment_spliced_from_another_file(tmp_path):
    tensors = {"w": torch.randn(SEG // 4)}
    for name in ("a", "b"):
        models.save_encrypted(tensors, tmp_path / name, KEY, segment_size=SEG, device="cpu")
    ha = header_length(tmp_path / "a")
    hb = header_length(tmp_path / "b")
    a, b = (tmp_path / "a").read_bytes(), (tmp_path / "b").read_bytes()
    (tmp_path / "a").write_bytes(a[:ha] + b[hb:])
    load_fails(tmp_path / "a", AuthenticationError, "segment 0")


@pytest.mark.parametrize("cut", [1, 16, 17, 1000, "header", "fixed"])
def test_truncated_file(saved, cut):
    path, _ = saved
    blob = path.read_bytes()
    h = header_length(path)
    end = {"header": h - 5, "fixed": 30}.get(cut, None)
    path.write_bytes(blob[:end] if end is not None else blob[:-cut])
    load_fails(path, TruncatedError, "truncated file")


def test_appended_bytes(saved):
    path, _ = saved
    path.write_bytes(path.read_bytes() + b"\x00" * 16)
    load_fails(path, FormatError, "after its last tag")


#: 200 bytes that start like nothing: a safetensors length would be 0x0706050403020100
GARBAGE = bytes(range(200))
#: starts like safetensors (8 bytes, then "{") but its little-endian length is far more
#: than the file's 200 bytes: what os.urandom(200) gave once in 256 runs
BRACE_AT_8 = b"\x9c\x31\xe0\x07\x5a\x11\xc4\x02{" + bytes(191)


@pytest.mark.parametrize("kind, match", [
    ("stream", "gpucrypt stream file, not a model file"),
    ("safetensors", "plain \\(unencrypted\\) safetensors file"),
    ("garbage", "wrong magic"),
    ("brace at 8", "wrong magic"),
    ("empty", "it is empty"),
    ("future", "unsupported gpucrypt model format version 2"),
])
def test_other_formats(tmp_path, kind, match):
    path = tmp_path / "f"
    if kind == "stream":
        stream.encrypt(b"hello", path, KEY)
    elif kind == "safetensors":
        from safetensors.torch import save_file

        save_file({"w": torch.ones(3)}, str(path))
    elif kind == "garbage":
        path.write_bytes(GARBAGE)
    elif kind == "brace at 8":
        path.write_bytes(BRACE_AT_8)
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        models.save_encrypted({"w": torch.ones(3)}, path, KEY, device="cpu")
        flip(path, 8, 1)  # version 1 -> 3
        match = "unsupported gpucrypt model format version 3"
    exc = UnsupportedVersion if kind == "future" else FormatError
    load_fails(path, exc, match)
    with pytest.raises(exc):
        models.read_header(path)


# ------------------------------------------------------------------ GPU path (simulator)
@pytest.fixture
def gpu_files(tmp_path, monkeypatch, on_cudasim):
    if not on_cudasim:
        pytest.skip("NumPy arrays stand in for device memory only in the simulator; "
                    "test_torch_cuda_load covers a real GPU")
    from gpucrypt.backends import get_backend

    get_backend("gpu")
    monkeypatch.setattr(models, "_GPU_BATCH_BYTES", SEG)  # two batches of the four segments
    tensors = {"w": np.arange(1600, dtype=np.float32).reshape(40, 40), "s": np.array(2.5),
               "e": np.zeros((0, 3), np.int32), "b": np.arange(7, dtype=np.int64)}
    path = tmp_path / "m"
    models.save_encrypted(tensors, path, KEY, segment_size=SEG, device="cpu")
    return path, tensors


def count_open_batch(monkeypatch):
    from gpucrypt.backends import get_backend

    gpu = get_backend("gpu")
    calls = []
    real = gpu.open_batch

    def spy(*args, **kw):
        calls.append(len(args[1]))
        return real(*args, **kw)

    monkeypatch.setattr(gpu, "open_batch", spy)
    return calls


@pytest.mark.cudasim
def test_gpu_load_in_place_in_batches(gpu_files, monkeypatch):
    path, tensors = gpu_files
    calls = count_open_batch(monkeypatch)
    got = models.load_encrypted(path, KEY, "cuda", framework="numpy")
    # w (6400 B) is segments of 4096 and 2304 B; s and b one short segment each; e none.
    # Batches hold up to 4096 B: [w0], then [w1, s, b] (both staging buffers used)
    assert calls == [1, 3]
    for name, x in tensors.items():
        assert got[name].dtype == x.dtype and got[name].shape == x.shape
        assert got[name].tobytes() == x.tobytes(), name


@pytest.mark.cudasim
def test_gpu_load_of_a_subset_reads_each_batch_from_one_file_range(gpu_files, monkeypatch):
    """w (two segments) and b, with s between them in the file: w's segments make one
    batch, b another (the gap cuts it), and s is neither read nor returned."""
    path, tensors = gpu_files
    monkeypatch.setattr(models, "_GPU_BATCH_BYTES", 2 * SEG)
    calls = count_open_batch(monkeypatch)
    got = models.load_encrypted(path, KEY, "cuda", framework="numpy", names=["b", "w"])
    assert list(got) == ["w", "b"] and calls == [2, 1]
    assert all(got[n].tobytes() == tensors[n].tobytes() for n in got)


@pytest.mark.cudasim
def test_gpu_load_detects_tampering(gpu_files):
    path, _ = gpu_files
    h = models.read_header(path)
    flip(path, h.header_length + SEG + 3)  # w's second segment
    result = None
    with pytest.raises(AuthenticationError, match="segment 1 \\(tensor 'w'") as info:
        result = models.load_encrypted(path, KEY, "cuda", framework="numpy")
    assert result is None and info.value.segment == 1


@pytest.mark.cudasim
def test_gpu_save_matches_cpu_load(gpu_files, tmp_path):
    _, tensors = gpu_files
    models.save_encrypted(tensors, tmp_path / "g", KEY, segment_size=SEG, device="gpu",
                          algorithm="aes-256-gcm")
    got = models.load_encrypted(tmp_path / "g", KEY, "cpu", framework="numpy")
    for name, x in tensors.items():
        assert got[name].tobytes() == x.tobytes(), name


@pytest.mark.cudasim
@pytest.mark.parametrize("device", ["auto", "gpu"])
def test_device_tensors_are_sealed_on_the_device(gpu_files, tmp_path, monkeypatch, device):
    """A tensor already on the GPU is sealed from its own memory: no host copy of its
    plaintext is made (``_host_bytes`` is what would make one), and "auto" picks the GPU."""
    from numba import cuda

    _, tensors = gpu_files
    on_device = {name: cuda.to_device(x) for name, x in tensors.items() if x.size}
    on_device["host"] = np.arange(300, dtype=np.uint8)  # mixed in one batch with device ones

    host_bytes = models._host_bytes

    def no_host_copy(x):
        assert isinstance(x, np.ndarray), "a device tensor's plaintext was copied to the host"
        return host_bytes(x)

    monkeypatch.setattr(models, "_host_bytes", no_host_copy)
    models.save_encrypted(on_device, tmp_path / "d", KEY, segment_size=SEG, device=device)
    got = models.load_encrypted(tmp_path / "d", KEY, "cpu", framework="numpy")
    assert list(got) == list(on_device)
    for name, x in on_device.items():
        want = x if isinstance(x, np.ndarray) else x.copy_to_host()
        assert got[name].dtype == want.dtype and got[name].shape == want.shape
        assert got[name].tobytes() == want.tobytes(), name


@pytest.mark.cudasim
def test_device_tensors_without_the_gpu_backend_are_refused_under_auto(gpu_files, tmp_path,
                                                                       monkeypatch):
    """"auto" fell back to the CPU silently where gpucrypt's GPU backend cannot run (no
    gpucrypt[gpu] beside a CUDA torch): every GPU tensor's plaintext was copied to the
    host. It is BackendUnavailable now, before anything is written; "cpu" says yes."""
    from numba import cuda

    from gpucrypt import backends

    _, tensors = gpu_files
    on_device = {"w": cuda.to_device(tensors["w"]), "host": np.arange(5, dtype=np.uint8)}
    monkeypatch.delitem(backends._instances, "gpu", raising=False)
    monkeypatch.setitem(backends._reasons, "gpu", "no module named numba.cuda (test)")
    copies = []
    host_bytes = models._host_bytes
    monkeypatch.setattr(models, "_host_bytes", lambda x: copies.append(x) or host_bytes(x))
    with pytest.raises(backends.BackendUnavailable,
                       match=r"(?s)on a GPU.*numba.cuda \(test\).*gpucrypt\[gpu\].*device='cpu'"):
        models.save_encrypted(on_device, tmp_path / "a", KEY, segment_size=SEG, device="auto")
    assert copies == [] and os.listdir(tmp_path) == [gpu_files[0].name]
    models.save_encrypted(on_device, tmp_path / "c", KEY, segment_size=SEG, device="cpu")
    assert models.load_encrypted(tmp_path / "c", KEY, "cpu",
                                 framework="numpy")["w"].tobytes() == tensors["w"].tobytes()


@pytest.mark.cudasim
def test_device_tensors_sealed_on_the_cpu_are_copied_a_tensor_at_a_time(gpu_files, tmp_path,
                                                                         monkeypatch):
    """device="cpu": each device tensor is copied to the host once (not once per segment)."""
    from numba import cuda

    _, tensors = gpu_files
    copies = []
    host_bytes = models._host_bytes
    monkeypatch.setattr(models, "_host_bytes", lambda x: copies.append(x) or host_bytes(x))
    on_device = {"w": cuda.to_device(tensors["w"]), "b": cuda.to_device(tensors["b"])}
    models.save_encrypted(on_device, tmp_path / "c", KEY, segment_size=SEG, device="cpu")
    assert [c is on_device[n] for c, n in zip(copies, ("w", "b"))] == [True, True]
    assert len(copies) == 2  # w has two segments, copied once
    got = models.load_encrypted(tmp_path / "c", KEY, "cpu", framework="numpy")
    assert got["w"].tobytes() == tensors["w"].tobytes()
    assert got["b"].tobytes() == tensors["b"].tobytes()


@pytest.mark.cudasim
def test_cli_encrypt_model_on_the_gpu_from_a_file(tmp_path):
    """encrypt-model --device gpu: segments read from the safetensors file into the
    staging buffer, sealed by the GPU backend (the simulator in CI), opened by the CPU."""
    from safetensors.numpy import save_file

    from gpucrypt.backends import get_backend

    get_backend("gpu")
    tensors = {"a": np.arange(1500, dtype=np.float32), "b": np.arange(9, dtype=np.int16)}
    save_file(tensors, str(tmp_path / "m.safetensors"))
    write_private(tmp_path / "key", KEY)
    assert cli(["encrypt-model", "--device", "gpu", "--segment-size", "4KiB", "--key-file",
                str(tmp_path / "key"), str(tmp_path / "m.safetensors"), str(tmp_path / "m.gc")]) == 0
    got = models.load_encrypted(tmp_path / "m.gc", KEY, "cpu", framework="numpy")
    assert all(got[n].tobytes() == tensors[n].tobytes() for n in tensors)


@pytest.mark.gpu
def test_torch_cuda_load(saved):
    path, tensors = saved
    got = models.load_encrypted(path, KEY, "cuda")
    assert all(g.is_cuda for g in got.values())
    assert_identical({k: v.cpu() for k, v in got.items()}, tensors)


# ------------------------------------------------------------------ command line
@pytest.fixture
def st_file(tmp_path):
    from safetensors.torch import save_file

    key = os.urandom(32)
    write_private(tmp_path / "key", key)
    tensors = model_tensors()
    tensors.pop("empty")
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    return tmp_path, tensors


@pytest.mark.parametrize("extra", [[], ["--encrypt-names", "--algorithm", "aes-256-gcm"]])
def test_cli_round_trip_is_byte_identical(st_file, extra):
    d, tensors = st_file
    assert cli(["encrypt-model", "--key-file", str(d / "key"), "--segment-size", "4KiB",
                "--device", "cpu", *extra, str(d / "m.safetensors"), str(d / "m.gc")]) == 0
    assert b"0.weight" not in (d / "m.gc").read_bytes() or not extra
    # safetensors hands the tensors over in its own order (sorted), which the file keeps
    assert_identical(models.load_encrypted(d / "m.gc", (d / "key").read_bytes(), "cpu"), tensors,
                     ordered=False)
    assert cli(["decrypt-model", "--key-file", str(d / "key"), str(d / "m.gc"),
                str(d / "back.safetensors")]) == 0
    assert (d / "back.safetensors").read_bytes() == (d / "m.safetensors").read_bytes()


def test_cli_model_conversions_work_a_batch_at_a_time(tmp_path):
    """encrypt-model and decrypt-model on a 96 MiB safetensors file stay within a few
    batches of memory: each child process reports its peak RSS over what it held before
    the command (Linux: writing 5 to clear_refs resets the peak to the current RSS)."""
    import subprocess
    import sys

    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    save_file({"a": rng.integers(0, 255, 64 << 20, dtype=np.uint8),
               "b": rng.standard_normal(4 << 20).astype(np.float64)},
              str(tmp_path / "big.safetensors"))
    write_private(tmp_path / "key", KEY)
    probe = (
        "import re, sys\n"
        "from gpucrypt.cli import main\n"
        "import gpucrypt.cli.models, gpucrypt.files.models, safetensors.numpy  # loaded lazily: not batches\n"
        "def kib(field):\n"
        "    return int(re.search(field + r':\\s+(\\d+)', open('/proc/self/status').read())[1])\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = kib('VmRSS')\n"
        "code = main(sys.argv[1:])\n"
        "print(code, (kib('VmHWM') - before) // 1024)\n")

    def grown_mib(*argv: str) -> int:
        done = subprocess.run([sys.executable, "-c", probe, *argv, "--key-file",
                               str(tmp_path / "key")], capture_output=True, text=True, check=True)
        code, grown = map(int, done.stdout.split())
        assert code == 0, done.stderr
        return grown

    grown = grown_mib("encrypt-model", "--device", "cpu", str(tmp_path / "big.safetensors"),
                      str(tmp_path / "big.gc"))
    assert grown < 40, f"encrypt-model grew by {grown} MiB for a 96 MiB model"
    grown = grown_mib("decrypt-model", str(tmp_path / "big.gc"), str(tmp_path / "back.safetensors"))
    assert grown < 40, f"decrypt-model grew by {grown} MiB for a 96 MiB model"
    assert (tmp_path / "back.safetensors").read_bytes() == \
        (tmp_path / "big.safetensors").read_bytes()


_ST_DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32,
              torch.uint32, torch.int64, torch.uint64, torch.float16, torch.bfloat16,
              torch.float32, torch.float64, torch.complex64, torch.float8_e4m3fn,
              torch.float8_e5m2, torch.float8_e8m0fnu, torch.float8_e4m3fnuz,
              torch.float8_e5m2fnuz]


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=12).filter(lambda n: n != "__metadata__"),
                       st.tuples(st.sampled_from(_ST_DTYPES),
                                 st.lists(st.integers(0, 3), max_size=3)),
                       max_size=8),
       st.one_of(st.none(), st.dictionaries(st.text(max_size=6), st.text(max_size=6),
                                            max_size=1)))
def test_safetensors_layout_is_what_the_package_writes(tmp_path_factory, spec, metadata):
    """Differential: the header and offsets export_safetensors writes are save_file's.
    (At most one metadata key: the package orders several by its hash map.)"""
    from safetensors.torch import save_file

    from gpucrypt.files._safetensors import safetensors_layout

    # safetensors 0.8 writes invalid JSON for metadata without tensors ('{},"__metadata__":{}}')
    assume(spec or metadata is None)
    tensors = {name: torch.zeros(shape, dtype=dtype) for name, (dtype, shape) in spec.items()}
    path = tmp_path_factory.mktemp("st") / "m.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    written = path.read_bytes()
    prefix, offsets = safetensors_layout(
        [(n, str(t.dtype)[6:], tuple(t.shape), t.numel() * t.element_size())
         for n, t in tensors.items()], metadata)
    assert written[:len(prefix)] == prefix
    header = json.loads(prefix[8:])
    assert offsets == {n: len(prefix) + e["data_offsets"][0] for n, e in header.items()
                       if n != "__metadata__"}


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fnuz, torch.float8_e5m2fnuz])
def test_fnuz_float8_round_trips_as_safetensors_writes_it(tmp_path, dtype):
    """safetensors 0.8 holds F8_E4M3FNUZ and F8_E5M2FNUZ: encrypt-model refused such a
    file ("gpucrypt cannot store"), safe_open's get_dtype() said "float8_e4m3fnuz", and
    export_safetensors of a model file saved from such tensors said "which a safetensors
    file cannot hold". Byte for byte what the package writes, both ways, placed among
    other dtypes (the data is ordered by the package's dtype order)."""
    import safetensors
    from safetensors.torch import save_file

    code = {torch.float8_e4m3fnuz: "F8_E4M3FNUZ", torch.float8_e5m2fnuz: "F8_E5M2FNUZ"}[dtype]
    bits = torch.arange(24, dtype=torch.uint8) * 11
    tensors = {"q": bits.view(dtype).reshape(4, 6),
               "zero_d": bits[:1].clone().view(dtype).reshape(()),
               "e8m0": bits[:5].clone().view(torch.float8_e8m0fnu),
               "half": torch.ones(3, dtype=torch.float16), "i8": bits[:7].clone().view(torch.int8)}
    plain = tmp_path / "m.safetensors"
    save_file(tensors, str(plain), metadata={"format": "pt"})
    write_private(tmp_path / "key", KEY)
    assert cli(["encrypt-model", "--key-file", str(tmp_path / "key"), "--segment-size", "4KiB",
                "--device", "cpu", str(plain), str(tmp_path / "m.gc")]) == 0
    assert cli(["decrypt-model", "--key-file", str(tmp_path / "key"), str(tmp_path / "m.gc"),
                str(tmp_path / "back.safetensors")]) == 0
    assert (tmp_path / "back.safetensors").read_bytes() == plain.read_bytes()
    with models.safe_open(tmp_path / "m.gc", "pt", key=KEY) as f, \
            safetensors.safe_open(str(plain), "pt") as want:
        assert f.get_slice("q").get_dtype() == want.get_slice("q").get_dtype() == code
        for name in want.keys():
            got = f.get_tensor(name)
            assert got.dtype == want.get_tensor(name).dtype
            assert raw(got) == raw(want.get_tensor(name)), name
    # tensors saved by the library export as the package saves them
    models.save_encrypted(tensors, tmp_path / "t.gc", KEY, {"format": "pt"}, device="cpu")
    models.export_safetensors(tmp_path / "t.gc", tmp_path / "t.safetensors", KEY)
    assert (tmp_path / "t.safetensors").read_bytes() == plain.read_bytes()


@pytest.mark.parametrize("segment", [0, 3, "last"])
def test_cpu_load_in_many_batches_on_threads(saved, monkeypatch, segment):
    """One segment per batch, two batches in flight on two threads: a round trip, and a
    bad segment anywhere is reported as that segment."""
    path, tensors = saved
    monkeypatch.setattr(pipeline, "CPU_BATCH_BYTES", SEG)
    assert_identical(models.load_encrypted(path, KEY, "cpu", threads=2), tensors)
    h = models.read_header(path)
    count = len(models._segments(h.tensors, SEG))
    index = count - 1 if segment == "last" else segment
    tag_offset = h.header_length + h.data_length + 16 * index
    flip(path, tag_offset + 7)
    result = None
    with pytest.raises(AuthenticationError, match=f"segment {index} ") as info:
        result = models.load_encrypted(path, KEY, "cpu", threads=2)
    assert result is None and info.value.segment == index


def test_cpu_save_seals_each_chacha20_segment_in_one_openssl_call(tmp_path, monkeypatch):
    """A ChaCha20-Poly1305 model file (what a DCP rank writes) is sealed segment by segment
    on the pipeline's threads through OpenSSL's one-shot AEAD, which releases the GIL,
    never through cryptography's ChaCha20 and Poly1305, which hold it (the threads took
    turns there, and a 2-rank DCP save spent 2.4x plain DCP's CPU time: issue 16); each
    segment is sealed with its tag after it, straight into the batch buffer. Opening takes
    the one-shot AEAD too (one call per segment, from ciphertext || tag), and gives the
    same tensors."""
    from gpucrypt.backends import cpu

    def composed(*args):
        raise AssertionError("the composed ChaCha20 + Poly1305 path was taken")

    calls = {"seal": [], "open": []}
    for op in calls:
        real = getattr(cpu._OpenSslAead, op)
        monkeypatch.setattr(cpu._ChaCha20Poly1305, op,
                            lambda self, nonce, data, *a, _op=op, _real=real:
                            calls[_op].append(len(data)) or _real(self, nonce, data, *a))
    monkeypatch.setattr(cpu._ChaCha20Poly1305, "_stream", composed)
    monkeypatch.setattr(pipeline, "CPU_BATCH_BYTES", 2 << 20)  # two batches, two threads each
    tensors = {"a": torch.arange(600_000, dtype=torch.float32), "b": torch.ones(170_000)}
    path = tmp_path / "m.gcmodel"
    models.save_encrypted(tensors, path, KEY, algorithm="chacha20-poly1305", threads=2)
    segments = [1 << 20, 1 << 20, 2_400_000 - (2 << 20), 680_000]
    assert sorted(calls["seal"]) == sorted(segments)
    assert_identical(models.load_encrypted(path, KEY, "cpu", threads=2), tensors)
    assert sorted(calls["open"]) == sorted(n + 16 for n in segments)


@pytest.mark.parametrize("algorithm", ALGS)
def test_cpu_open_leaves_no_unauthenticated_plaintext_in_place(tmp_path, monkeypatch, algorithm):
    """The CPU open decrypts each segment from ``ciphertext || tag`` straight into its place
    with OpenSSL's one-shot AEAD, which writes the plaintext before it checks the tag: a
    tampered segment's place must come back zeroed (not plaintext, not ciphertext), the
    good segments' places hold their plaintext, and the error names the segment."""
    data = np.random.default_rng(7).integers(0, 256, 9 * SEG, dtype=np.uint8)
    path = tmp_path / "m.gcmodel"
    models.save_encrypted({"x": data}, path, KEY, algorithm=algorithm, segment_size=SEG)
    header = models.read_header(path)
    flip(path, header.header_length + 4 * SEG + 100)  # segment 4 of 9
    monkeypatch.setattr(pipeline, "CPU_BATCH_BYTES", 3 * SEG)  # 3 batches, one on each side
    out = np.full(9 * SEG, 0xA5, dtype=np.uint8)
    with open(path, "rb", buffering=0) as f:
        h, segments, tags, seg_key, aad = models._prepare_open(f, KEY)
        with pytest.raises(AuthenticationError, match="segment 4"):
            models._open_on_cpu(f, h, segments, tags, seg_key, aad, 2,
                                lambda s, k: out[s.start:s.start + s.length])
    assert not out[4 * SEG:5 * SEG].any()  # the failed segment: zeros
    assert np.array_equal(out[:3 * SEG], data[:3 * SEG])  # the batch before it: opened
    assert np.array_equal(out[3 * SEG:4 * SEG], data[3 * SEG:4 * SEG])
    for i in range(5, 9):  # opened (verified) or, past the failure, never touched
        place, plain = out[i * SEG:(i + 1) * SEG], data[i * SEG:(i + 1) * SEG]
        assert np.array_equal(place, plain) or (place == 0xA5).all(), i


def test_save_to_a_file_object_writes_the_segments_in_order(tmp_path, monkeypatch):
    """Into a path the sealing workers write each segment at its place; into a caller's
    file object this thread writes them in order: both give files that load the same."""
    import io

    monkeypatch.setattr(pipeline, "CPU_BATCH_BYTES", 3 * SEG)  # several batches, two threads
    tensors = {"a": torch.randn(5 * SEG // 4), "b": torch.arange(7, dtype=torch.int16),
               "c": torch.randn(2 * SEG // 4 + 3)}
    buf = io.BytesIO()
    models.save_encrypted(tensors, buf, KEY, segment_size=SEG, threads=2)
    (tmp_path / "obj.gcmodel").write_bytes(buf.getvalue())
    models.save_encrypted(tensors, tmp_path / "path.gcmodel", KEY, segment_size=SEG, threads=2)
    assert len(buf.getvalue()) == os.path.getsize(tmp_path / "path.gcmodel")
    for name in ("obj.gcmodel", "path.gcmodel"):
        assert_identical(models.load_encrypted(tmp_path / name, KEY, "cpu"), tensors)


def test_export_writes_nothing_when_a_later_batch_fails(saved, tmp_path, monkeypatch):
    path, tensors = saved
    monkeypatch.setattr(pipeline, "CPU_BATCH_BYTES", SEG)  # earlier batches reach the file first
    h = models.read_header(path)
    flip(path, h.header_length + h.data_length - 5)  # the last segment
    with pytest.raises(AuthenticationError, match="failed authentication"):
        models.export_safetensors(path, tmp_path / "out.safetensors", KEY, threads=2)
    assert not (tmp_path / "out.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["model.gcsafetensors"])


@pytest.mark.parametrize("what", ["save_encrypted", "export_safetensors"])
def test_a_write_that_fails_part_way_names_the_destination(saved, tmp_path, monkeypatch, what):
    """The sealing and opening workers write with pwrite to the unpublished file's
    descriptor, so a full disk raised OSError(ENOSPC) naming no file (the command line
    guessed the side from the traceback; the library's callers had nothing): it names
    the destination now, as an open or publish error does, and nothing is published."""
    import errno

    path, tensors = saved
    real_pwrite, written = os.pwrite, []

    def full_past_three_segments(fd, data, offset):
        if offset >= 3 * SEG:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(offset)  # the first batches reach the file
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(pipeline, "CPU_BATCH_BYTES", SEG)  # several batches: it fails part-way
    monkeypatch.setattr(os, "pwrite", full_past_three_segments)
    out = tmp_path / "out"
    with pytest.raises(OSError) as info:
        if what == "save_encrypted":
            models.save_encrypted(tensors, out, KEY, segment_size=SEG, device="cpu", threads=2)
        else:
            models.export_safetensors(path, out, KEY, threads=2)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(out)
    assert written and os.listdir(tmp_path) == ["model.gcsafetensors"]


@pytest.mark.parametrize("batch_bytes", [SEG // 2, 2 * SEG])
def test_export_round_trip_matches_save_file(saved, tmp_path, monkeypatch, batch_bytes):
    """Many batches on two threads; with SEG // 2 every batch is one segment larger than
    the batch size."""
    from safetensors.torch import save_file

    path, tensors = saved
    monkeypatch.setattr(pipeline, "CPU_BATCH_BYTES", batch_bytes)
    models.export_safetensors(path, tmp_path / "out.safetensors", KEY, threads=2)
    save_file(tensors, str(tmp_path / "want.safetensors"), metadata={"arch": "mlp"})
    assert (tmp_path / "out.safetensors").read_bytes() == \
        (tmp_path / "want.safetensors").read_bytes()
    assert oct(os.stat(tmp_path / "out.safetensors").st_mode & 0o777) == "0o600"


def test_cli_refuses_sub_byte_safetensors_dtypes(tmp_path, capsys):
    """safetensors' F4 (two float4 values a byte; its shape counts values) has no byte-sized
    portable name: a one-line error naming the tensor, exit code 1, no output."""
    from safetensors.torch import save_file

    packed = torch.zeros(4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)
    save_file({"q": packed, "w": torch.ones(2)}, str(tmp_path / "f4.safetensors"))
    write_private(tmp_path / "key", KEY)
    assert cli(["encrypt-model", "--key-file", str(tmp_path / "key"),
                str(tmp_path / "f4.safetensors"), str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "tensor 'q' has safetensors dtype F4" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_stored_tensor_size_must_match_its_dtype_and_shape(tmp_path):
    from gpucrypt.files._safetensors import StoredTensor

    (tmp_path / "data").write_bytes(bytes(10))
    fd = os.open(tmp_path / "data", os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match="10 bytes stored for dtype float32"):
            models.save_encrypted({"w": StoredTensor("float32", (3,), fd, 0, 10)},
                                  tmp_path / "m", KEY, device="cpu")
        with pytest.raises(TruncatedError, match="the safetensors file changed while being read"):
            models.save_encrypted({"w": StoredTensor("float32", (4,), fd, 0, 16)},
                                  tmp_path / "m", KEY, device="cpu")
    finally:
        os.close(fd)
    assert not (tmp_path / "m").exists()


@pytest.mark.gpu
def test_cli_encrypted_model_loads_onto_the_gpu_in_one_call(st_file):
    """Issue 7's "done when", at test size: one command encrypts a safetensors file, one
    call puts its tensors on the GPU, bit-identical (model_scale_run.py does 4-10 GiB)."""
    d, tensors = st_file
    assert cli(["encrypt-model", "--key-file", str(d / "key"), "--segment-size", "4KiB",
                str(d / "m.safetensors"), str(d / "m.gc")]) == 0
    got = models.load_encrypted(d / "m.gc", (d / "key").read_bytes(), device="cuda")
    assert all(t.is_cuda for t in got.values())
    assert_identical({k: v.cpu() for k, v in got.items()}, tensors, ordered=False)


def test_stream_functions_name_a_model_file(saved):
    path, _ = saved
    with pytest.raises(FormatError, match="gpucrypt model file, not a stream file"):
        stream.read_header(path)


def test_cli_recipients(st_file, capsys):
    d, tensors = st_file
    assert cli(["keygen", "--public", "--out", str(d / "id.json")]) == 0
    assert cli(["encrypt-model", "-r", str(d / "id.json.pub"), str(d / "m.safetensors"),
                str(d / "m.gc")]) == 0
    assert models.read_header(d / "m.gc").envelope
    assert cli(["decrypt-model", "-i", str(d / "id.json"), str(d / "m.gc"),
                str(d / "back.safetensors")]) == 0
    assert (d / "back.safetensors").read_bytes() == (d / "m.safetensors").read_bytes()


@pytest.mark.parametrize("case, code, message", [
    ("wrong key", 1, "wrong key or tampered"),
    ("not a model", 1, "plain \\(unencrypted\\) safetensors"),
    ("not safetensors", 1, "garbage: not a readable safetensors file"),
    ("already encrypted", 1, "m.gc is already a gpucrypt model file \\(encrypted\\); "
                             "'gpucrypt decrypt-model'"),
    ("exists", 2, "--force"),
    ("no key", 2, "no key given"),
    ("missing input", 2, "input file not found"),
])
def test_cli_errors(st_file, capsys, case, code, message):
    d, _ = st_file
    key = ["--key-file", str(d / "key")]
    cli(["encrypt-model", *key, str(d / "m.safetensors"), str(d / "m.gc")])
    capsys.readouterr()
    write_private(d / "wrong", bytes(32))
    (d / "garbage").write_bytes(GARBAGE)
    argv = {
        "wrong key": ["decrypt-model", "--key-file", str(d / "wrong"), str(d / "m.gc"), str(d / "o")],
        "not a model": ["decrypt-model", *key, str(d / "m.safetensors"), str(d / "o")],
        "not safetensors": ["encrypt-model", *key, str(d / "garbage"), str(d / "o")],
        "already encrypted": ["encrypt-model", *key, str(d / "m.gc"), str(d / "o")],
        "exists": ["encrypt-model", *key, str(d / "m.safetensors"), str(d / "m.gc")],
        "no key": ["encrypt-model", str(d / "m.safetensors"), str(d / "o")],
        "missing input": ["decrypt-model", *key, str(d / "nope"), str(d / "o")],
    }[case]
    assert cli(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert __import__("re").search(message, err), err
    assert not (d / "o").exists()


# ------------------------------------------------------------------ hostile tables
def forged_file(path, table: bytes, data_length: int = 0, key: bytes = KEY):
    """A model file with ``table`` stored as it is, under a header MAC made with ``key``:
    what anyone holding the key (or sealing to a public-key recipient) can write."""
    from gpucrypt.files import _format

    salt, prefix = os.urandom(32), os.urandom(_format.prefix_size("chacha20-poly1305"))
    fixed = models._fixed_fields("chacha20-poly1305", SEG, False, salt, len(table),
                                 data_length, prefix)
    body = fixed + _format.variable_fields(None, None) + table
    mac = hmac.new(models._derive(key, salt, models._HEADER_MAC_INFO, fixed), body,
                   hashlib.sha256).digest()
    path.write_bytes(body + mac)
    return path


@pytest.mark.parametrize("dtype", ["numpy:|S0", "numpy:<U0", "numpy:|V0"])
def test_a_dtype_of_elements_of_no_bytes_is_a_format_error(tmp_path, dtype):
    """With 0-byte elements every size check passes at any shape: a file sealed for a
    public key (anyone holding it can write one) made load_encrypted allocate an array of
    the table's shape and hand back memory it never wrote (freed plaintext of this
    process), or MemoryError."""
    table = json.dumps({"a": {"dtype": dtype, "shape": [64], "data_offsets": [0, 0]}}).encode()
    path = forged_file(tmp_path / "zero.gc", table)
    for read in (models.read_header, lambda p: models.load_encrypted(p, KEY, "cpu",
                                                                       framework="numpy")):
        with pytest.raises(FormatError, match="unknown dtype"):
            read(path)


def test_a_table_string_no_utf8_holds_is_a_format_error(tmp_path):
    """A lone UTF-16 surrogate in a name ("\\ud800") was read, and broke only the export to
    safetensors (UnicodeEncodeError, decrypt-model exiting 2): no writer makes one."""
    table = b'{"\\ud800": {"dtype": "float32", "shape": [0], "data_offsets": [0, 0]}}'
    path = forged_file(tmp_path / "lone.gc", table)
    with pytest.raises(FormatError, match="malformed tensor table: not UTF-8 JSON"):
        models.read_header(path)


def test_a_deeply_nested_table_is_a_format_error(tmp_path, capsys):
    """Without a key the table is parsed unauthenticated (to find the envelope, by
    ``decrypt-model``, ``rekey``, checkpoint folders): JSON nested past the parser's limit
    raised RecursionError, and the command line printed a traceback. Now FormatError,
    exit 1 and one line; with a key the header MAC is checked first."""
    path = forged_file(tmp_path / "deep.gc", b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(FormatError, match="malformed tensor table: JSON nested too deeply"):
        models.read_header(path)
    with pytest.raises(FormatError, match="malformed tensor table: JSON nested too deeply"):
        models.read_header(path, KEY)  # a forger with the key
    _decrypt_model_refuses(tmp_path, capsys, path, tmp_path / "out",
                           "malformed tensor table: JSON nested too deeply")
    assert sorted(os.listdir(tmp_path)) == ["deep.gc", "key"]


def _decrypt_model_refuses(tmp_path, capsys, path, out, message: str) -> None:
    """``gpucrypt decrypt-model`` of ``path`` (under KEY) exits 1 with one line holding
    ``message``, and writes nothing at ``out``."""
    write_private(tmp_path / "key", KEY)
    capsys.readouterr()
    assert cli(["decrypt-model", "--key-file", str(tmp_path / "key"), str(path), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not os.path.exists(out)


def table(shape, dtype="uint8") -> bytes:
    import math

    nbytes = math.prod(shape) * {"uint8": 1, "float32": 4}[dtype]
    return json.dumps({"t": {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}},
                      sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize("shape, dtype", [
    ([0, 2**70], "float32"),          # a dimension no 64-bit size holds
    ([0, 2**63], "uint8"),            # just past it
    ([0, 2**61], "float32"),          # each dimension fits, the bytes (2**63) do not
    ([2**40, 0, 2**40], "uint8"),     # the nonzero dimensions' product is 2**80
])
def test_an_authenticated_table_with_a_shape_no_framework_holds_is_refused(tmp_path, capsys,
                                                                           shape, dtype):
    """An empty tensor's byte count (0) matches its offsets whatever its other
    dimensions: such a table passed, then NumPy raised a bare ValueError, torch a
    TypeError, and ``decrypt-model`` exited 0 writing a .safetensors file that
    safetensors refuses. Now every reader says "malformed tensor table" first."""
    path = forged_file(tmp_path / "m.gc", table(shape, dtype))
    match = f"malformed tensor table: entry 't' has shape \\[{shape[0]}, "
    with pytest.raises(FormatError, match=match):
        models.read_header(path, KEY)
    for framework in ("numpy", "torch"):
        with pytest.raises(FormatError, match=match):
            models.load_encrypted(path, KEY, "cpu", framework=framework)
    with pytest.raises(FormatError, match=match):
        models.safe_open(path, "np", key=KEY)
    _decrypt_model_refuses(tmp_path, capsys, path, tmp_path / "out.safetensors",
                           "malformed tensor table")


@pytest.mark.parametrize("shape, dtype", [([0, 2**63 - 1], "uint8"), ([2**61 - 1, 0], "float32")])
def test_empty_tensors_up_to_the_limit_still_load(tmp_path, shape, dtype):
    """The bound is NumPy's own (2**63 - 1 bytes of nonzero dimensions), not tighter."""
    path = forged_file(tmp_path / "m.gc", table(shape, dtype))
    assert models.read_header(path, KEY).tensors[0].shape == tuple(shape)
    for framework in ("numpy", "torch"):
        got = models.load_encrypted(path, KEY, "cpu", framework=framework)["t"]
        assert tuple(got.shape) == tuple(shape)


@pytest.mark.parametrize("shape, dtype", [((0, 2**63), "uint8"), ((0, 2**61), "float32")])
def test_a_stored_tensor_no_framework_holds_is_not_written(tmp_path, shape, dtype):
    """A StoredTensor's shape comes from a safetensors file: one no reader could load was
    written (its byte count is 0), giving a file every reader now refuses."""
    from gpucrypt.files._safetensors import StoredTensor

    (tmp_path / "data").write_bytes(b"")
    fd = os.open(tmp_path / "data", os.O_RDONLY)
    try:
        with pytest.raises(ValueError, match=r"has shape .*2\*\*63 - 1, so no framework could"):
            models.save_encrypted({"w": StoredTensor(dtype, shape, fd, 0, 0)},
                                  tmp_path / "m", KEY, device="cpu")
    finally:
        os.close(fd)
    assert os.listdir(tmp_path) == ["data"]


# ------------------------------------------------------------------ unauthenticated tables
def hostile_file(path, table: bytes, envelope: bytes | None = None):
    """What anyone can write with no key (and, with ``envelope``, a recipient's public
    key): a readable table of ``table`` bytes under a header MAC of zeros."""
    from gpucrypt.files import _format

    fixed = models._fixed_fields("chacha20-poly1305", SEG, False, os.urandom(32), len(table),
                                 0, os.urandom(_format.prefix_size("chacha20-poly1305")))
    path.write_bytes(fixed + _format.variable_fields(None, envelope) + table + bytes(32))
    return path


def empty_objects(nbytes: int) -> bytes:
    """``{"x":[{},{},...]}`` of at least ``nbytes``: /tmp/review-models/dos_table.py's
    table, which Python holds in about 30 times its size (100 MiB of it took 3 GB)."""
    return b'{"x":[' + b",".join([b"{}"] * (nbytes // 3 + 1)) + b"]}"


def record_calls(monkeypatch, name: str) -> list:
    """``models.<name>`` replaced by a wrapper that records the length of its first
    argument (a table, a list of tensors) at each call, in this list."""
    calls = []
    real = getattr(models, name)

    def recording(first, *rest):
        calls.append(len(first))
        return real(first, *rest)

    monkeypatch.setattr(models, name, recording)
    return calls


@pytest.fixture
def table_decodes(monkeypatch):
    """The sizes of the tables ``_decode_table`` is asked to parse, in call order."""
    return record_calls(monkeypatch, "_decode_table")


def test_read_header_without_a_key_refuses_a_table_over_16_mib(tmp_path, table_decodes):
    """A keyless read_header json-parsed up to 100 MiB of a table anyone can write; over
    MAX_UNVERIFIED_TABLE_BYTES it now refuses before parsing, saying to pass the key. A
    smaller table is decoded as before (the public API's promise: names without a key)."""
    big = hostile_file(tmp_path / "big.gc", empty_objects(16 << 20))  # the documented bound
    with pytest.raises(FormatError, match=r"over the 16777216 read without a key .*"
                                          r"read_header\(path, key\)"):
        models.read_header(big)
    assert table_decodes == []
    small = hostile_file(tmp_path / "small.gc", empty_objects(1000))
    with pytest.raises(FormatError, match="malformed tensor table: entry 'x'"):
        models.read_header(small)
    assert len(table_decodes) == 1


def test_finding_the_key_never_decodes_the_unauthenticated_table(tmp_path, capsys,
                                                                 table_decodes):
    """decrypt-model with a raw key read the header (table included) before the real open
    did; with -i, rekey and checkpoint folders read it for the envelope. None of them needs
    the table before the header MAC is checked, which this file fails (exit 1)."""
    from gpucrypt import keys
    from gpucrypt.files import checkpoints

    alice = keys.Identity.generate()
    alice.save(tmp_path / "alice")
    envelope = keys.seal_envelope(keys.generate_dek(), [alice])
    table = empty_objects(1 << 20)
    plain = hostile_file(tmp_path / "raw.gc", table)
    sealed = hostile_file(tmp_path / "sealed.gc", table, envelope)
    write_private(tmp_path / "key", KEY)
    for argv in (["--key-file", str(tmp_path / "key"), str(plain)],
                 ["-i", str(tmp_path / "alice"), str(sealed)]):
        capsys.readouterr()
        assert cli(["decrypt-model", *argv, str(tmp_path / "out")]) == 1
        assert "header authentication failed" in capsys.readouterr().err
    with pytest.raises(AuthenticationError, match="header authentication failed"):
        keys.rekey_file(sealed, recipients=[alice], identities=alice)
    (tmp_path / "folder").mkdir()
    os.replace(sealed, tmp_path / "folder" / "model.safetensors")
    with pytest.raises(FormatError, match="has no gpucrypt-checkpoint.json"):
        checkpoints.decrypt_checkpoint(tmp_path / "folder", tmp_path / "out", identity=alice)
    assert table_decodes == []
    assert not os.path.exists(tmp_path / "out")


def test_decrypt_model_of_a_dtype_safetensors_cannot_hold_says_what_to_use(tmp_path, capsys):
    """A valid file and key, but numpy:<U5 has no safetensors code: exit 1 (the data, not
    the usage: it was 2), one line saying what reads it, nothing written."""
    path = tmp_path / "u.gc"
    models.save_encrypted({"w": np.ones(3, np.float32), "u": np.array(["abcde"] * 4)}, path,
                          KEY, device="cpu")
    _decrypt_model_refuses(tmp_path, capsys, path, tmp_path / "out.safetensors",
                           "tensor 'u' has dtype numpy:<U5, which a safetensors file cannot "
                           "hold, so the model cannot be written as one; load it with "
                           "gpucrypt.models.load_encrypted(path, key, framework='numpy')")
    with pytest.raises(models.NotSafetensorsDtype, match="tensor 'u' has dtype numpy:<U5"):
        models.export_safetensors(path, tmp_path / "out.safetensors", KEY)
    assert not os.path.exists(tmp_path / "out.safetensors")
    assert models.load_encrypted(path, KEY, "cpu", framework="numpy")["u"][3] == "abcde"


def test_export_over_its_own_input_is_refused(saved, tmp_path):
    """export_safetensors(p, p) replaced the only ciphertext with the plaintext
    (stream.decrypt refuses src == dst; this reuses its check), also through a hard link."""
    path, _ = saved
    before = path.read_bytes()
    os.link(path, tmp_path / "other name")
    for out in (path, str(path), tmp_path / "other name"):
        with pytest.raises(ValueError, match="same file .*write to another path"):
            models.export_safetensors(path, out, KEY)
        assert path.read_bytes() == before
    models.export_safetensors(path, tmp_path / "plain.safetensors", KEY)  # elsewhere: as before
    assert path.read_bytes() == before


def test_metadata_keys_come_back_sorted_as_the_docs_say(tmp_path):
    """docs/MODEL_FORMAT.md and export_safetensors said several metadata keys "come back
    in the file's order"; the table is canonical JSON, so they come back sorted, and a
    safetensors file whose header had them in another order decrypts to the same
    metadata but other bytes (one key: the same bytes)."""
    import safetensors

    order = ["format", "alpha", "gamma", "beta"]
    header = {"__metadata__": {k: "v" + k for k in order},
              "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    plain = tmp_path / "m.safetensors"
    plain.write_bytes(struct.pack("<Q", len(text)) + text + np.ones(2, np.float32).tobytes())
    write_private(tmp_path / "key", KEY)
    assert cli(["encrypt-model", "--key-file", str(tmp_path / "key"), str(plain),
                str(tmp_path / "m.gc")]) == 0
    assert cli(["decrypt-model", "--key-file", str(tmp_path / "key"), str(tmp_path / "m.gc"),
                str(tmp_path / "back.safetensors")]) == 0
    back = (tmp_path / "back.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", back[:8])
    assert list(json.loads(back[8:8 + length])["__metadata__"]) == sorted(order)
    with safetensors.safe_open(str(tmp_path / "back.safetensors"), "np") as f:
        assert f.metadata() == header["__metadata__"]
    assert back != plain.read_bytes()


def test_reading_tensor_by_tensor_counts_the_file_segments_once(tmp_path, monkeypatch):
    """Each safe_open get_tensor/get_slice needs the whole file's segment count (the last
    segment's nonce flag), which ModelHeader.segment_count recounted over the whole table
    at every call: reading 16000 tensors one by one took 22 s, quadratic. The header counts
    once, so the number of table walks does not grow with the number of reads."""
    path, n = tmp_path / "many.gc", 40
    models.save_encrypted({f"t{i}": np.full(4, i, np.float32) for i in range(n)}, path, KEY,
                          segment_size=SEG, device="cpu")
    walks = record_calls(monkeypatch, "_segment_count")
    with models.safe_open(path, "np", key=KEY) as f:
        f.get_tensor("t0")
        after_one = len(walks)
        for name in f.keys():
            assert f.get_tensor(name)[0] == int(name[1:])
            assert f.get_slice(name)[1:3].tolist() == [int(name[1:])] * 2
    assert len(walks) == after_one, f"{len(walks) - after_one} table walks for {2 * n} reads"


def test_save_encrypted_names_the_entry_it_cannot_save(tmp_path):
    """A sparse tensor failed deep in the torch adapter ("unsupported memory format option"),
    and a nested dict or a step count without its entry's name."""
    torch = pytest.importorskip("torch")
    key = os.urandom(32)
    with pytest.raises(ValueError, match=r"tensor 'a': torch tensors with layout torch.sparse_coo"
                                         r".*to_dense"):
        models.save_encrypted({"a": torch.eye(3).to_sparse()}, tmp_path / "m.gc", key)
    with pytest.raises(TypeError, match=r"entry 'model' is a nested dict"):
        models.save_encrypted({"model": {"w": torch.ones(2)}}, tmp_path / "m.gc", key)
    with pytest.raises(TypeError, match=r"entry 'step': expected a tensor"):
        models.save_encrypted({"w": torch.ones(2), "step": 3}, tmp_path / "m.gc", key)
    assert not (tmp_path / "m.gc").exists()


# ------------------------------------------------------------------ what a reader is asked for
def test_an_unknown_name_prints_without_extra_quotes(saved):
    """load_encrypted(names=...) raised a plain KeyError, whose str() put the message
    inside a second pair of quotes; safe_open's unknown name printed it as it is."""
    path, _ = saved
    with pytest.raises(KeyError) as info:
        models.load_encrypted(path, KEY, "cpu", names=["big", "nope", "nope2"])
    assert str(info.value) == "no tensor 'nope' in this model file (and 1 more unknown names)"


#: dtypes a valid model file can hold that torch has no dtype for: NumPy's own (another
#: byte order, strings) and ml_dtypes' float8s that torch lacks; (NumPy or ml_dtypes name,
#: the name the table stores)
TORCHLESS_DTYPES = [(">f4", "numpy:>f4"), ("<U2", "numpy:<U2"), ("float8_e4m3", "float8_e4m3"),
                    ("float8_e3m4", "float8_e3m4"), ("float8_e4m3b11fnuz", "float8_e4m3b11fnuz")]


@pytest.mark.parametrize("dtype, stored", TORCHLESS_DTYPES)
def test_a_dtype_torch_lacks_is_refused_by_name_before_anything_is_decrypted(tmp_path, dtype,
                                                                            stored):
    """framework="torch" (the default) looked the dtype up in torch when it allocated the
    tensor and failed with a bare AttributeError ("module 'torch' has no attribute
    'numpy:>f4'"). Now a ValueError names the tensor and its dtype and says to read it
    with NumPy; the file's other tensors still load as torch tensors, one by one."""
    if not dtype.startswith(("<", ">")):
        ml_dtypes = pytest.importorskip("ml_dtypes", reason="the float8 dtypes come from ml_dtypes")
        np_dtype = np.dtype(getattr(ml_dtypes, dtype))
    else:
        np_dtype = np.dtype(dtype)
    if hasattr(torch, stored):
        pytest.skip(f"torch {torch.__version__} has {stored}: nothing to refuse")
    odd = np.arange(6).astype(np_dtype)
    path = tmp_path / "m.gc"
    models.save_encrypted({"w": np.arange(3, dtype=np.float32), "odd": odd}, path, KEY,
                          segment_size=SEG, device="cpu")
    assert [i.dtype for i in models.read_header(path, KEY).tensors] == ["float32", stored]
    refused = rf"tensor 'odd' has dtype {re.escape(stored)}, which torch .* framework='numpy'"
    for call in (lambda: models.load_encrypted(path, KEY, "cpu"),
                 lambda: models.load_encrypted(path, KEY, "cpu", framework="pt", names=["odd"])):
        with pytest.raises(ValueError, match=refused):
            call()
    with models.safe_open(path, "pt", key=KEY) as f:
        for call in (lambda: f.get_tensor("odd"), lambda: f.get_slice("odd")[1:3],
                     f.get_tensors):
            with pytest.raises(ValueError, match=refused):
                call()
        assert f.get_tensor("w").tolist() == [0.0, 1.0, 2.0]
    assert models.load_encrypted(path, KEY, "cpu", names=["w"])["w"].tolist() == [0.0, 1.0, 2.0]
    back = models.load_encrypted(path, KEY, "cpu", framework="numpy")["odd"]
    assert back.dtype == np_dtype and back.tobytes() == odd.tobytes()


def test_a_framework_that_cannot_be_imported_is_an_import_error(tmp_path, monkeypatch):
    """With torch not importable, framework="torch" (the default) and safe_open(path, "pt")
    returned NumPy arrays without a word (the tensor API's fallback, for a ciphertext made
    with a framework this machine lacks); safetensors raises. The tensor API keeps its
    fallback."""
    from gpucrypt import tensor

    path = tmp_path / "m.gc"
    models.save_encrypted({"w": np.arange(3, dtype=np.float32)}, path, KEY, device="cpu")
    sealed = tensor.encrypt_tensor(torch.arange(3, dtype=torch.float32), KEY)
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    missing = r"framework 'torch' \(the default\) cannot be imported .*install torch, or " \
              r"load NumPy arrays with framework='numpy'"
    with pytest.raises(ImportError, match=missing):
        models.load_encrypted(path, KEY, "cpu")
    with pytest.raises(ImportError, match=r"framework 'torch'.*install torch"):
        models.load_encrypted(path, KEY, "cpu", framework="pt")
    with pytest.raises(ImportError, match=r"framework 'torch'.*install torch"):
        models.safe_open(path, "pt", key=KEY)
    assert models.load_encrypted(path, KEY, "cpu", framework="numpy")["w"].tolist() == [0, 1, 2]
    with models.safe_open(path, "np", key=KEY) as f:
        assert isinstance(f.get_tensor("w"), np.ndarray)
    back = tensor.decrypt_tensor(sealed, KEY)
    assert isinstance(back, np.ndarray) and back.tolist() == [0, 1, 2]


# ------------------------------------------------------------------ empty metadata
@pytest.mark.parametrize("metadata", [{}, None, {"format": "pt"}])
def test_empty_metadata_is_kept_apart_from_none(tmp_path, metadata):
    """safetensors tells an empty ``__metadata__`` ({}) from none (None). The table
    dropped {} (``if metadata:``) and the reader could not tell them apart, so a file with
    ``"__metadata__":{}`` came back from encrypt-model/decrypt-model without it, not byte
    for byte, and safe_open's metadata() said None where safetensors says {}."""
    import safetensors
    from gpucrypt.files._atomic import AtomicFile
    from safetensors.numpy import save_file

    write_private(tmp_path / "key", KEY)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": np.ones(4, np.float32)}, str(plain), metadata=metadata)
    with safetensors.safe_open(str(plain), "np") as ref:
        assert ref.metadata() == metadata  # the package itself keeps them apart
    assert cli(["encrypt-model", "--key-file", str(tmp_path / "key"), str(plain),
                str(tmp_path / "m.gc")]) == 0
    for header in (models.read_header(tmp_path / "m.gc", KEY),
                   models.read_header(tmp_path / "m.gc")):  # readable table: no key needed
        assert header.stored_metadata == metadata
        assert header.metadata == (metadata or {})  # a dict, as it always was
    with models.safe_open(tmp_path / "m.gc", "np", key=KEY) as f:
        assert f.metadata() == metadata
    assert cli(["decrypt-model", "--key-file", str(tmp_path / "key"), str(tmp_path / "m.gc"),
                str(tmp_path / "back.safetensors")]) == 0
    assert (tmp_path / "back.safetensors").read_bytes() == plain.read_bytes()
    # save_encrypted's own header, and a re-encryption (rekey --reencrypt), keep it too
    header = models.save_encrypted({"w": np.ones(4, np.float32)}, tmp_path / "s.gc", KEY,
                                   metadata, encrypt_names=True, device="cpu")
    assert header.stored_metadata == metadata and header.metadata == (metadata or {})
    other = os.urandom(32)
    with AtomicFile(tmp_path / "r.gc") as sink:
        assert models._reencrypt(tmp_path / "s.gc", KEY, sink, other).stored_metadata == metadata
    assert models.read_header(tmp_path / "r.gc", other).stored_metadata == metadata


def test_a_table_without_metadata_from_an_earlier_version_reads_as_none(tmp_path):
    """An earlier gpucrypt wrote no ``__metadata__`` for None and for {} alike: such a file
    still has no metadata (None), and exports without it."""
    import safetensors

    table = b'{"w":{"data_offsets":[0,0],"dtype":"float32","shape":[0]}}'
    path = forged_file(tmp_path / "old.gc", table)
    for header in (models.read_header(path), models.read_header(path, KEY)):
        assert header.stored_metadata is None and header.metadata == {}
    with models.safe_open(path, "np", key=KEY) as f:
        assert f.metadata() is None
    models.export_safetensors(path, tmp_path / "old.safetensors", KEY)
    assert b"__metadata__" not in (tmp_path / "old.safetensors").read_bytes()
    with safetensors.safe_open(str(tmp_path / "old.safetensors"), "np") as ref:
        assert ref.metadata() is None


# ------------------------------------------------------------------ header without its key
def test_file_length_needs_the_table(tmp_path):
    """A header read without the key of a file with encrypt_names has no table, and its
    segment count is -1: file_length came out 16 bytes short per segment (10169 for a
    10233-byte file). It says to pass the key instead."""
    path = tmp_path / "m.gc"
    models.save_encrypted({"w": np.zeros(10000, np.uint8)}, path, KEY, encrypt_names=True,
                          segment_size=SEG, device="cpu")
    unread = models.read_header(path)
    assert unread.tensors is None
    with pytest.raises(ValueError, match=r"encrypted .*pass the key, read_header\(path, key\)"):
        unread.file_length
    assert models.read_header(path, KEY).file_length == os.path.getsize(path)
    models.save_encrypted({"w": np.zeros(10000, np.uint8)}, path, KEY, segment_size=SEG,
                          device="cpu")
    assert models.read_header(path).file_length == os.path.getsize(path)  # readable table
