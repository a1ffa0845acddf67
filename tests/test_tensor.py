"""gpucrypt.tensor on NumPy arrays (and numba device arrays in the simulator).

The reference is ``cryptography``'s AEADs (pynacl for XChaCha20-Poly1305) over the
tensor's bytes and associated data built here by hand from docs/TENSOR_FORMAT.md,
independently of gpucrypt's encoder. Bodies taking the ``device`` fixture run on the
CPU backend and on the GPU backend (numba's simulator here: inputs stay tiny).
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import struct

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gpucrypt
from _reference import hand_metadata, reference_seal, require_gpu_backend
from gpucrypt import pipeline
from gpucrypt import tensor as tensor_mod
from gpucrypt import EncryptedTensor, NonceSequence, TensorCipher

ALGORITHMS = [("chacha20-poly1305", 32), ("xchacha20-poly1305", 32), ("aes-gcm", 16),
              ("aes-gcm", 24), ("aes-gcm", 32)]
NUMPY_DTYPES = ["bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                "float16", "float32", "float64", "complex64", "complex128", "longdouble",
                ">f4", "<U3", "S4", "M8[ns]", "V8"]


def random_array(shape, dtype, rng=np.random.default_rng(1)) -> np.ndarray:
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if dt == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    raw = rng.integers(0, 256, size=count * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


def ct_bytes(enc: EncryptedTensor) -> bytes:
    ct = enc.ciphertext
    if hasattr(ct, "copy_to_host"):
        ct = ct.copy_to_host()
    return np.asarray(ct).tobytes()


# --------------------------------------------------------------------- byte identity
@pytest.mark.parametrize("algorithm,key_len", ALGORITHMS)
@pytest.mark.parametrize("shape", [(), (0,), (3, 5), (2, 1, 7)])
def test_ciphertext_matches_reference_aead(algorithm, key_len, shape):
    key = os.urandom(key_len)
    x = random_array(shape, "float32")
    enc = gpucrypt.encrypt_tensor(x, key, algorithm=algorithm, aad=b"layer-3", key_id=b"\x00k",
                                  name="w")
    aad = hand_metadata(algorithm=algorithm, framework="numpy", dtype="float32", shape=shape,
                        nbytes=x.nbytes, key_id=b"\x00k", name="w") + b"layer-3"
    assert enc.associated_data() == aad
    assert ct_bytes(enc) + enc.tag == reference_seal(algorithm, key, enc.nonce, x.tobytes(), aad)


@pytest.mark.parametrize("algorithm,key_len", ALGORITHMS[:3])
@pytest.mark.parametrize("shape", [(5, 13), (0,), (4, 0, 2)])
def test_gpu_ciphertext_matches_reference(algorithm, key_len, device, shape):
    """Host tensors through either backend, empty ones too (on the GPU an empty host tensor
    once found no staging buffer: seen on an H200, 2026-12-04)."""
    key = os.urandom(key_len)
    x = random_array(shape, "int16")
    enc = gpucrypt.encrypt_tensor(x, key, algorithm=algorithm, device=device, key_id="k")
    aad = hand_metadata(algorithm=algorithm, framework="numpy", dtype="int16", shape=shape,
                        nbytes=x.nbytes, key_id="k")
    assert ct_bytes(enc) + enc.tag == reference_seal(algorithm, key, enc.nonce, x.tobytes(), aad)
    for sealed in (enc, EncryptedTensor.from_bytes(enc.to_bytes())):
        y = gpucrypt.decrypt_tensor(sealed, key, device=device)
        assert isinstance(y, np.ndarray) and y.dtype == x.dtype and y.shape == x.shape
        assert np.array_equal(y, x)
    only_empty = {"a": random_array((0,), "float32"), "b": random_array((2, 0), "uint8")}
    back = gpucrypt.decrypt_tensors(gpucrypt.encrypt_tensors(only_empty, key, algorithm=algorithm,
                                                             device=device), key, device=device)
    assert [(v.dtype, v.shape) for v in back.values()] == [(v.dtype, v.shape) for v in only_empty.values()]


# --------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (4, 0, 2), (3, 4)])
def test_numpy_roundtrip_every_dtype(dtype, shape):
    key = os.urandom(32)
    x = random_array(shape, dtype)
    enc = gpucrypt.encrypt_tensor(x, key)
    y = gpucrypt.decrypt_tensor(enc, key)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert y.tobytes() == x.tobytes()
    z = gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(enc.to_bytes()), key)
    assert z.dtype == x.dtype and z.tobytes() == x.tobytes()


def test_large_shape_roundtrip_and_inplace():
    key = os.urandom(32)
    x = random_array((4, 256, 1024), "float32")   # 4 MiB
    orig = x.copy()
    enc = gpucrypt.encrypt_tensor(x, key, inplace=True)
    assert enc.ciphertext.ctypes.data == x.ctypes.data   # the tensor's own memory
    assert x.tobytes() != orig.tobytes()
    assert gpucrypt.decrypt_tensor(enc, key) is x
    assert x.tobytes() == orig.tobytes()


def test_structured_and_object_dtypes_refused():
    key = os.urandom(32)
    with pytest.raises(ValueError):
        gpucrypt.encrypt_tensor(np.zeros(2, dtype=[("a", "i4"), ("b", "f4")]), key)
    with pytest.raises(ValueError):
        gpucrypt.encrypt_tensor(np.array([1, "a"], dtype=object), key)
    with pytest.raises(TypeError):
        gpucrypt.encrypt_tensor([1, 2, 3], key)


def test_non_contiguous_refused_or_copied():
    key = os.urandom(32)
    x = random_array((4, 6), "int32")
    view = x[:, ::2]
    with pytest.raises(ValueError, match="contiguous"):
        gpucrypt.encrypt_tensor(view, key)
    with pytest.raises(ValueError):
        gpucrypt.encrypt_tensor(view, key, contiguous=True, inplace=True)
    enc = gpucrypt.encrypt_tensor(view, key, contiguous=True)
    assert gpucrypt.decrypt_tensor(enc, key).tobytes() == view.tobytes()


def test_out_parameter_and_shape_check():
    key = os.urandom(32)
    x = random_array((3, 4), "float64")
    enc = gpucrypt.encrypt_tensor(x, key)
    out = np.empty_like(x)
    assert gpucrypt.decrypt_tensor(enc, key, out=out) is out
    assert out.tobytes() == x.tobytes()
    with pytest.raises(ValueError):
        gpucrypt.decrypt_tensor(enc, key, out=np.empty((4, 3)))


def test_inplace_decrypt_of_deserialised_bytearray():
    key = os.urandom(32)
    x = random_array((8,), "uint32")
    blob = bytearray(gpucrypt.encrypt_tensor(x, key).to_bytes())
    enc = EncryptedTensor.from_bytes(blob)
    y = gpucrypt.decrypt_tensor(enc, key, inplace=True)
    assert np.array_equal(y, x)
    assert np.shares_memory(y, np.frombuffer(blob, dtype=np.uint8))
    with pytest.raises(ValueError, match="in place"):
        enc.ciphertext
    with pytest.raises(ValueError, match="writable"):
        gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(bytes(blob)), key, inplace=True)


# --------------------------------------------------------------------- tampering
def _fresh(algorithm="chacha20-poly1305", key=None, **kw):
    key = key or os.urandom(32)
    x = random_array((2, 6), "float32")
    return key, x, gpucrypt.encrypt_tensor(x, key, algorithm=algorithm, key_id="k1", name="w",
                                           aad=b"ctx", **kw)


@pytest.mark.parametrize("field,value", [
    ("dtype", "int32"), ("dtype", "uint32"), ("shape", (6, 2)), ("shape", (12,)),
    ("framework", "torch"), ("framework", "cupy"), ("algorithm", "aes-gcm"), ("key_id", "k2"),
    ("key_id", b"k1"), ("key_id", None), ("name", "v"), ("name", None), ("aad", b"ctX"),
    # edits that change the byte count, the ciphertext's staying as it was
    ("shape", (6,)), ("shape", (24,)), ("shape", ()), ("shape", (2, 0)), ("shape", (-2, -6)),
    ("shape", (2**40,)), ("shape", (2**31, 2**31)), ("dtype", "float64"), ("dtype", "int8"),
    ("dtype", "no-such-dtype"), ("nbytes", 24), ("nbytes", 96), ("framework", "no-such"),
])
def test_any_metadata_change_fails(field, value):
    key, x, enc = _fresh()
    setattr(enc, field, value)
    with pytest.raises(InvalidTag):
        gpucrypt.decrypt_tensor(enc, key, device="cpu")


@pytest.mark.parametrize("field,value", [("shape", (6,)), ("dtype", "float64"), ("nbytes", 96),
                                         ("shape", (2**40,)), ("shape", (2**40, 2**40))])
def test_byte_count_edits_fail_in_batches_before_anything_is_allocated(field, value, device,
                                                                       monkeypatch):
    """Recorded fields that no longer add up to the ciphertext's length (an edited shape
    asking for 4 TiB, say) fail like any other edit: InvalidTag naming the entry, in a
    batch beside good ones, in place and not, without allocating a result for it."""
    key = os.urandom(32)
    x, y = random_array((2, 6), "float32"), random_array((4,), "int16")
    plain_y = y.copy()
    encs = {"x": gpucrypt.encrypt_tensor(x, key, name="x", device=device),
            "y": gpucrypt.encrypt_tensor(y, key, name="y", inplace=True, device=device)}
    setattr(encs["x"], field, value)
    sizes = []
    real_empty = np.empty

    def empty(shape, *args, **kwargs):  # what NumPy is asked to allocate
        sizes.append(math.prod(shape) if isinstance(shape, (tuple, list)) else int(shape))
        return real_empty(shape, *args, **kwargs)

    monkeypatch.setattr(np, "empty", empty)
    with pytest.raises(InvalidTag) as info:
        gpucrypt.decrypt_tensors(encs, key, device=device)
    assert info.value.failed == ["x"]
    assert all(n < 1 << 20 for n in sizes)         # nothing of the edited size
    assert y.tobytes() == plain_y.tobytes()        # the good in-place entry is restored
    with pytest.raises(InvalidTag):
        gpucrypt.decrypt_tensor(encs["x"], key, device=device)
    assert all(n < 1 << 20 for n in sizes)
    # the refusal spent nothing: with the field put back the entry decrypts
    setattr(encs["x"], field, {"shape": (2, 6), "dtype": "float32", "nbytes": 48}[field])
    assert gpucrypt.decrypt_tensor(encs["x"], key, device=device).tobytes() == x.tobytes()


def test_a_ciphertext_of_another_length_fails_like_an_edited_one(device):
    """A ciphertext cut short, or grown, under an unchanged byte count is an edited
    ciphertext: InvalidTag naming the entry (the one-tensor and batch paths, CPU and GPU
    alike), never a read past its end. (from_bytes still refuses a serialised form of the
    wrong length with ValueError: that is parsing, before there is an EncryptedTensor.)"""
    key = os.urandom(32)
    for size in (50, 150):
        enc = gpucrypt.encrypt_tensor(np.arange(100, dtype=np.uint8), key, name="t", device=device)
        ct = np.asarray(gpucrypt.EncryptedTensor.from_bytes(enc.to_bytes()).ciphertext)
        enc._ciphertext = np.resize(ct, size)
        with pytest.raises(InvalidTag):
            gpucrypt.decrypt_tensor(enc, key, device=device)
        with pytest.raises(InvalidTag) as info:
            gpucrypt.decrypt_tensors({"t": enc}, key, device=device)
        assert info.value.failed == ["t"]


def test_ciphertext_tag_nonce_key_changes_fail(device):
    key, x, enc = _fresh()
    blob = enc.to_bytes()
    for tamper in ("ct", "tag", "nonce", "key"):
        e = EncryptedTensor.from_bytes(bytearray(blob))
        k = key
        if tamper == "ct":
            e.ciphertext[3] ^= 1
        elif tamper == "tag":
            e._tag = bytes([e.tag[0] ^ 0x80]) + e.tag[1:]
        elif tamper == "nonce":
            e.nonce = bytes([e.nonce[0] ^ 1]) + e.nonce[1:]
        else:
            k = bytes([key[0] ^ 1]) + key[1:]
        with pytest.raises(InvalidTag):
            gpucrypt.decrypt_tensor(e, k, device=device)


def test_every_bit_of_the_serialised_form_matters():
    key, x, enc = _fresh()
    blob = enc.to_bytes()
    for i in range(len(blob)):
        for bit in (0, 7):
            bad = bytearray(blob)
            bad[i] ^= 1 << bit
            try:
                e = EncryptedTensor.from_bytes(bytes(bad))
            except ValueError:
                continue
            with pytest.raises(InvalidTag):
                gpucrypt.decrypt_tensor(e, key)


@pytest.mark.parametrize("algorithm", ["chacha20-poly1305", "xchacha20-poly1305", "aes-gcm"])
def test_failed_inplace_decrypt_leaves_ciphertext(algorithm, device):
    key = os.urandom(32)
    x = random_array((3, 7), "float32")
    enc = gpucrypt.encrypt_tensor(x, key, algorithm=algorithm, inplace=True, device=device)
    snapshot = x.copy()
    enc._tag = bytes(16)
    with pytest.raises(InvalidTag):
        gpucrypt.decrypt_tensor(enc, key, device=device)
    assert x.tobytes() == snapshot.tobytes()
    enc.name = "other"   # another failure: metadata
    with pytest.raises(InvalidTag):
        gpucrypt.decrypt_tensor(enc, key, device=device)
    assert x.tobytes() == snapshot.tobytes()


def test_failed_decrypt_zeroes_out(device):
    key, x, enc = _fresh()
    out = np.full_like(x, 7.0)
    enc._tag = bytes(16)
    with pytest.raises(InvalidTag):
        gpucrypt.decrypt_tensor(enc, key, out=out, device=device)
    assert not out.any()


# --------------------------------------------------------------------- from_bytes
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=200))
def test_from_bytes_garbage_is_a_value_error(data):
    try:
        EncryptedTensor.from_bytes(data)
    except ValueError:
        pass


_VALID = gpucrypt.encrypt_tensor(np.arange(6, dtype=np.int16).reshape(2, 3), bytes(32),
                                 key_id="id", name="n", aad=b"a").to_bytes()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1,
                max_size=4), st.integers(0, len(_VALID)), st.binary(max_size=8))
def test_from_bytes_mutations_never_crash_or_pass(edits, cut, extra):
    data = bytearray(_VALID)
    for pos, val in edits:
        data[pos] = val
    data = bytes(data[:cut]) + extra if cut < len(_VALID) or extra else bytes(data)
    try:
        enc = EncryptedTensor.from_bytes(data)
    except ValueError:
        return
    if data == _VALID:
        return
    with pytest.raises(InvalidTag):
        gpucrypt.decrypt_tensor(enc, bytes(32))


def test_from_bytes_rejects_wrong_version_and_lengths():
    with pytest.raises(ValueError, match="version"):
        EncryptedTensor.from_bytes(_VALID[:6] + b"\x02" + _VALID[7:])
    with pytest.raises(ValueError, match="length"):
        EncryptedTensor.from_bytes(_VALID + b"\x00")
    with pytest.raises(ValueError):
        EncryptedTensor.from_bytes(_VALID[:-1])
    with pytest.raises(TypeError):
        EncryptedTensor.from_bytes(12)


# --------------------------------------------------------------------- batches
def test_batch_roundtrip_names_and_unique_nonces(device):
    key = os.urandom(32)
    tensors = {"a": random_array((3,), "float32"), "b": random_array((2, 2), "int64"),
               "c": random_array((), "uint8"), "d": random_array((0, 2), "float16")}
    encs = gpucrypt.encrypt_tensors(tensors, key, device=device)
    assert list(encs) == list(tensors)
    assert len({e.nonce for e in encs.values()}) == len(tensors)
    assert [e.name for e in encs.values()] == list(tensors)
    back = gpucrypt.decrypt_tensors(encs, key, device=device)
    for name, x in tensors.items():
        assert back[name].dtype == x.dtype and back[name].tobytes() == x.tobytes()
    as_list = gpucrypt.encrypt_tensors(list(tensors.values()), key, device=device)
    assert [e.name for e in as_list] == ["0", "1", "2", "3"]
    assert all(a.tobytes() == b.tobytes() for a, b in
               zip(gpucrypt.decrypt_tensors(as_list, key, device=device), tensors.values()))


def test_batch_swapped_entries_and_failures_are_named(device):
    key = os.urandom(32)
    tensors = {"a": random_array((4,), "float32"), "b": random_array((4,), "float32"),
               "c": random_array((4,), "float32")}
    encs = gpucrypt.encrypt_tensors(tensors, key, device=device)
    encs["a"], encs["b"] = encs["b"], encs["a"]
    with pytest.raises(InvalidTag) as info:
        gpucrypt.decrypt_tensors(encs, key, device=device)
    assert sorted(info.value.failed) == ["a", "b"]
    encs["a"], encs["b"] = encs["b"], encs["a"]
    encs["c"]._tag = bytes(16)
    with pytest.raises(InvalidTag, match="'c'") as info:
        gpucrypt.decrypt_tensors(encs, key, device=device)
    assert info.value.failed == ["c"]


def test_batch_inplace_restores_only_verified_tensors(device):
    key = os.urandom(32)
    tensors = [random_array((5,), "int32") for _ in range(3)]
    originals = [t.copy() for t in tensors]
    encs = gpucrypt.encrypt_tensors(tensors, key, inplace=True, device=device)
    cipher1 = tensors[1].copy()
    encs[1]._tag = bytes(16)
    with pytest.raises(InvalidTag):
        gpucrypt.decrypt_tensors(encs, key, device=device)
    assert tensors[1].tobytes() == cipher1.tobytes()
    assert np.array_equal(tensors[0], originals[0]) and np.array_equal(tensors[2], originals[2])


def _fail_on_call(monkeypatch, name: str, number: int, exc: BaseException) -> list:
    """Make ``tensor_mod.<name>`` raise ``exc`` on its ``number``-th call (1-based)."""
    real, calls = getattr(tensor_mod, name), []

    def wrapped(*args, **kwargs):
        calls.append(args)
        if len(calls) == number:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(tensor_mod, name, wrapped)
    return calls


def _on_two_threads(monkeypatch) -> None:
    """Small host batches on the thread pool (every tensor worth a thread)."""
    from gpucrypt.backends import cpu

    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)
    monkeypatch.setattr(tensor_mod, "_HOST_PARALLEL_BYTES", 1000)
    monkeypatch.setattr(tensor_mod, "_POOLED_TENSOR_BYTES_DEFAULT", 0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("stop", [KeyboardInterrupt(), RuntimeError("disk on fire")])
def test_an_in_place_batch_stopped_part_way_gives_its_tensors_back(monkeypatch, stop, threads):
    """An in-place encrypt batch that raises part way (an interrupt, a later tensor's
    error) returns no results, so the tensors it had encrypted are decrypted back: none
    is left holding ciphertext whose nonce and tag the caller never got."""
    if threads == 2:
        _on_two_threads(monkeypatch)
    tensors = {k: random_array((1000,), "float32") for k in "abc"}
    plain = {k: v.copy() for k, v in tensors.items()}
    calls = _fail_on_call(monkeypatch, "_host_seal", 2, stop)
    with pytest.raises(type(stop)) as info:
        gpucrypt.encrypt_tensors(tensors, os.urandom(32), inplace=True)
    assert len(calls) >= 2
    assert {k: v.tobytes() == plain[k].tobytes() for k, v in tensors.items()} == dict.fromkeys(
        "abc", True)
    assert not hasattr(info.value, "encrypted")
    assert any("decrypted back" in note for note in info.value.__notes__)


def test_a_tensor_that_cannot_be_given_back_is_attached_to_the_error(monkeypatch):
    """If taking the sealed tensors back is itself stopped (an interrupt again), the ones
    still encrypted come with the error, ``exc.encrypted`` (label -> EncryptedTensor):
    their nonce and tag are never lost."""
    key = os.urandom(32)
    tensors = {k: random_array((1000,), "float32") for k in "abc"}
    plain = {k: v.copy() for k, v in tensors.items()}
    _fail_on_call(monkeypatch, "_host_seal", 3, RuntimeError("disk on fire"))
    _fail_on_call(monkeypatch, "_host_open", 1, KeyboardInterrupt())
    with pytest.raises(RuntimeError, match="disk on fire") as info:
        gpucrypt.encrypt_tensors(tensors, key, inplace=True)
    monkeypatch.undo()
    stuck = info.value.encrypted
    assert sorted(stuck) == ["a", "b"] and tensors["c"].tobytes() == plain["c"].tobytes()
    assert all(tensors[k].tobytes() != plain[k].tobytes() for k in stuck)
    back = gpucrypt.decrypt_tensors(stuck, key)
    assert all(back[k] is tensors[k] and back[k].tobytes() == plain[k].tobytes() for k in stuck)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("stop", [KeyboardInterrupt(), RuntimeError("disk on fire")])
def test_a_batch_decrypt_stopped_part_way_spends_what_it_decrypted(monkeypatch, stop, threads):
    """A decrypt batch that raises part way (not InvalidTag): each entry already
    decrypted in place is spent at once, so it can no longer serialise its memory (the
    plaintext now) as its ciphertext; the others keep their ciphertext and decrypt
    later."""
    if threads == 2:
        _on_two_threads(monkeypatch)
    key = os.urandom(32)
    tensors = {k: random_array((1000,), "float32") for k in "abc"}
    plain = {k: v.copy() for k, v in tensors.items()}
    encs = gpucrypt.encrypt_tensors(tensors, key, inplace=True)
    _fail_on_call(monkeypatch, "_host_open", 2, stop)
    with pytest.raises(type(stop)):
        gpucrypt.decrypt_tensors(encs, key)
    monkeypatch.undo()
    done = [k for k in tensors if tensors[k].tobytes() == plain[k].tobytes()]
    assert done, "the first entry's open ran"
    for k in tensors:
        if k in done:
            with pytest.raises(ValueError, match="decrypted in place"):
                encs[k].to_bytes()
    rest = {k: encs[k] for k in tensors if k not in done}
    assert rest, "the failing open left its entry alone"
    back = gpucrypt.decrypt_tensors(rest, key)
    assert all(back[k].tobytes() == plain[k].tobytes() for k in rest)


def _stream_of_another_device():
    """What torch.cuda.Stream(device=1) says of its device, and nothing else."""
    import types

    return types.SimpleNamespace(device=types.SimpleNamespace(index=1))


@pytest.mark.cudasim
def test_a_mixed_batch_refused_by_its_gpu_half_touches_no_host_tensor(monkeypatch):
    """Host and device tensors in one in-place batch: the GPU half's refusals (here a
    stream of another device) come before any host tensor is encrypted or decrypted."""
    require_gpu_backend()
    from numba import cuda

    key = os.urandom(32)
    host = random_array((16,), "float32")
    plain = host.copy()
    batch = {"h": host, "d": cuda.to_device(random_array((8,), "float32"))}
    with monkeypatch.context() as patch:
        seals = _fail_on_call(patch, "_host_seal", 0, None)   # counts, never fails
        with pytest.raises(ValueError, match="stream of cuda:1"):
            gpucrypt.encrypt_tensors(batch, key, inplace=True, stream=_stream_of_another_device())
    assert not seals and host.tobytes() == plain.tobytes()  # not even sealed and taken back
    encs = gpucrypt.encrypt_tensors(batch, key, inplace=True)
    sealed = host.tobytes()
    with pytest.raises(ValueError, match="stream of cuda:1"):
        gpucrypt.decrypt_tensors(encs, key, stream=_stream_of_another_device())
    assert host.tobytes() == sealed
    assert encs["h"].to_bytes()  # not spent
    gpucrypt.decrypt_tensors(encs, key)
    assert host.tobytes() == plain.tobytes()
    # a stream of no kind the GPU backend knows: refused as early (the simulator, which
    # has no streams of its own, refuses the same objects a device does)
    with monkeypatch.context() as patch:
        seals = _fail_on_call(patch, "_host_seal", 0, None)
        with pytest.raises(TypeError, match="unsupported stream object"):
            gpucrypt.encrypt_tensors(batch, key, inplace=True, stream="bogus")
    assert not seals and host.tobytes() == plain.tobytes()


@pytest.mark.cudasim
def test_a_mixed_batch_whose_gpu_launch_fails_gives_its_host_tensors_back(monkeypatch):
    """The GPU half failing in its launch (CUDA out of memory, say) after the host half
    was encrypted in place: the host tensors are decrypted back."""
    require_gpu_backend()
    from numba import cuda

    def out_of_memory(self, batch):
        raise MemoryError("CUDA out of memory")

    key = os.urandom(32)
    host = random_array((16,), "float32")
    plain = host.copy()
    monkeypatch.setattr(pipeline.GpuRunner, "start", out_of_memory)
    with pytest.raises(MemoryError):
        gpucrypt.encrypt_tensors({"h": host, "d": cuda.to_device(random_array((8,), "float32"))},
                                 key, inplace=True)
    assert host.tobytes() == plain.tobytes()


@pytest.mark.cudasim
def test_gpu_batch_is_one_seal_and_one_open_call(monkeypatch):
    gpu = require_gpu_backend()
    calls = {"seal_batch": 0, "open_batch": 0}
    for name in calls:
        real = getattr(gpu, name)

        def counting(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(gpu, name, counting)
    tensors = {f"t{i}": random_array((i + 1, 3), "float32") for i in range(4)}
    encs = gpucrypt.encrypt_tensors(tensors, os.urandom(32), device="gpu")
    assert calls == {"seal_batch": 1, "open_batch": 0}
    key = os.urandom(32)
    encs = gpucrypt.encrypt_tensors(tensors, key, device="gpu")
    back = gpucrypt.decrypt_tensors(encs, key, device="gpu")
    assert calls == {"seal_batch": 2, "open_batch": 1}
    assert all(back[n].tobytes() == tensors[n].tobytes() for n in tensors)


@pytest.mark.cudasim
def test_outputs_are_allocated_for_the_callers_stream(monkeypatch):
    """Device outputs allocated here are allocated inside the framework's context for the
    caller-given stream (torch's and CuPy's allocators tie memory to a stream), and for
    None (the current stream) when none is given; in place, nothing is allocated."""
    require_gpu_backend()
    from numba import cuda

    from gpucrypt.tensors import _frameworks as fw

    seen = []
    adapter = fw.BY_NAME["numba"]

    @contextlib.contextmanager
    def allocation_stream(stream, place):
        assert place == ("cuda", 0)
        seen.append(("enter", stream))
        yield
        seen.append(("exit", stream))

    real_empty_bytes, real_empty = adapter.empty_bytes, adapter.empty
    monkeypatch.setattr(adapter, "allocation_stream", allocation_stream)
    monkeypatch.setattr(adapter, "empty_bytes", lambda *a: seen.append("empty_bytes") or real_empty_bytes(*a))
    monkeypatch.setattr(adapter, "empty", lambda *a: seen.append("empty") or real_empty(*a))
    key = os.urandom(32)
    x = random_array((3, 5), "float32")
    d = cuda.to_device(x)
    given = cuda.stream()   # a real one: a made-up handle would crash the driver on a GPU
    for stream in (given, None):
        seen.clear()
        y = gpucrypt.decrypt_tensor(gpucrypt.encrypt_tensor(d, key, stream=stream), key, stream=stream)
        assert y.copy_to_host().tobytes() == x.tobytes()
        assert seen == [("enter", stream), "empty_bytes", ("exit", stream),
                        ("enter", stream), "empty", ("exit", stream)]
    seen.clear()
    gpucrypt.decrypt_tensor(gpucrypt.encrypt_tensor(d, key, inplace=True, stream=given), key, stream=given)
    assert seen == []


@pytest.mark.parametrize("algorithm", ["chacha20-poly1305", "aes-gcm"])
def test_large_host_batches_run_on_threads(monkeypatch, algorithm):
    """A host batch over _HOST_PARALLEL_BYTES is split over a thread pool: the same
    bytes as one by one, the names still bound, and a tampered entry still named."""
    from gpucrypt.backends import cpu

    pools = []

    class CountingPool(pipeline.ThreadPoolExecutor):
        def __init__(self, n):
            pools.append(n)
            super().__init__(n)

    monkeypatch.setattr(pipeline, "ThreadPoolExecutor", CountingPool)
    monkeypatch.setattr(cpu, "usable_cores", lambda: 3)
    monkeypatch.setattr(tensor_mod, "_HOST_PARALLEL_BYTES", 1000)
    monkeypatch.setattr(tensor_mod, "_POOLED_TENSOR_BYTES", {})   # every tensor worth a thread
    monkeypatch.setattr(tensor_mod, "_POOLED_TENSOR_BYTES_DEFAULT", 0)
    key = os.urandom(32)
    tensors = {f"t{i}": random_array((i * 37 + 1,), "float32") for i in range(40)}
    seq = NonceSequence(12, prefix=b"p")
    encs = gpucrypt.encrypt_tensors(tensors, key, algorithm=algorithm, nonces=seq)
    assert pools == [2]   # 3 cores: two workers and the calling thread
    for name, enc in encs.items():
        meta = hand_metadata(algorithm=algorithm, framework="numpy", dtype="float32",
                             shape=tensors[name].shape, nbytes=tensors[name].nbytes, name=name)
        assert ct_bytes(enc) + enc.tag == reference_seal(algorithm, key, enc.nonce,
                                                         tensors[name].tobytes(), meta)
    back = gpucrypt.decrypt_tensors(encs, key)
    assert pools == [2, 2]
    assert all(back[n].tobytes() == tensors[n].tobytes() for n in tensors)
    bad = dict(encs)
    blob = encs["t17"].to_bytes()
    bad["t17"] = EncryptedTensor.from_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(InvalidTag) as err:
        gpucrypt.decrypt_tensors(bad, key)
    assert err.value.failed == ["t17"]


@pytest.mark.parametrize("algorithm", ["chacha20-poly1305", "xchacha20-poly1305"])
def test_one_large_host_tensor_uses_every_core_in_its_message(monkeypatch, algorithm):
    """A single host tensor over _HOST_PARALLEL_BYTES is one message on all cores (the
    CPU backend's threads=): the same bytes, and back. The seal's keystream runs on
    cores - 1 workers, this thread running the MAC behind them; the open runs the MAC
    here, piece by piece, ahead of cores - 1 workers decrypting."""
    from gpucrypt.backends import cpu

    monkeypatch.setattr(cpu, "usable_cores", lambda: 3)
    monkeypatch.setattr(cpu, "PARALLEL_MIN", 1000)
    monkeypatch.setattr(cpu, "_PARALLEL_CHUNK", 512)
    monkeypatch.setattr(tensor_mod, "_HOST_PARALLEL_BYTES", 1000)
    asked = []
    real = cpu._ChaCha20Poly1305._xor_parallel
    real_open = cpu._ChaCha20Poly1305._open_pipelined

    def spy(self, nonce, data, out, threads, done, last=None):
        asked.append(("keystream", threads))
        return real(self, nonce, data, out, threads, done, last)

    def spy_open(self, nonce, data, tag, aad, out, workers):
        asked.append(("open", workers))
        return real_open(self, nonce, data, tag, aad, out, workers)

    monkeypatch.setattr(cpu._ChaCha20Poly1305, "_xor_parallel", spy)
    monkeypatch.setattr(cpu._ChaCha20Poly1305, "_open_pipelined", spy_open)
    key = os.urandom(32)
    x = random_array((2500,), "float32")
    enc = gpucrypt.encrypt_tensor(x, key, algorithm=algorithm)
    meta = hand_metadata(algorithm=algorithm, framework="numpy", dtype="float32", shape=(2500,),
                         nbytes=x.nbytes)
    assert ct_bytes(enc) + enc.tag == reference_seal(algorithm, key, enc.nonce, x.tobytes(), meta)
    assert gpucrypt.decrypt_tensor(enc, key).tobytes() == x.tobytes()
    assert asked == [("keystream", 2), ("open", 2)]


def test_in_place_batch_refuses_shared_memory_before_touching_any():
    """Tied weights (two state-dict entries on one memory) cannot both be encrypted in
    place: refused up front, nothing changed; out of place they are fine."""
    torch = pytest.importorskip("torch")
    key = os.urandom(32)
    emb = torch.randn(64, 8)
    state = {"emb.weight": emb, "other": torch.randn(5), "head.weight": emb}
    before = {n: t.clone() for n, t in state.items()}
    with pytest.raises(ValueError, match="'emb.weight' and 'head.weight' share memory"):
        gpucrypt.encrypt_tensors(state, key, inplace=True)
    assert all(torch.equal(state[n], before[n]) for n in state)
    whole = random_array((100,), "float32")
    with pytest.raises(ValueError, match="share memory"):  # overlapping, not equal, views
        gpucrypt.encrypt_tensors([whole[:60], whole[50:]], key, inplace=True)
    back = gpucrypt.decrypt_tensors(gpucrypt.encrypt_tensors(state, key), key)
    assert all(torch.equal(back[n], before[n]) for n in state)


def test_in_place_batch_refuses_a_read_only_tensor_before_touching_any():
    key = os.urandom(32)
    good, frozen = random_array((64,), "float32"), random_array((64,), "float32")
    frozen.flags.writeable = False
    before = good.copy()
    with pytest.raises(ValueError, match="writable"):
        gpucrypt.encrypt_tensors({"good": good, "frozen": frozen}, key, inplace=True)
    assert good.tobytes() == before.tobytes()


def test_in_place_batch_decrypt_refuses_memory_it_cannot_use_before_touching_any():
    """An in-place result whose memory cannot take the plaintext any more (a NumPy array
    made read-only since, a torch tensor whose storage shrank) is refused before any
    tensor of the batch is decrypted: the others keep their ciphertext, and the batch
    decrypts once the memory is usable again."""
    key = os.urandom(32)
    first, frozen = random_array((4096,), "float32"), random_array((64,), "float32")
    before = {"first": first.copy(), "frozen": frozen.copy()}
    encs = gpucrypt.encrypt_tensors({"first": first, "frozen": frozen}, key, inplace=True)
    sealed = first.tobytes()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="'frozen' is read-only now"):
        gpucrypt.decrypt_tensors(encs, key)
    assert first.tobytes() == sealed   # not decrypted: no half-done batch
    frozen.flags.writeable = True
    back = gpucrypt.decrypt_tensors(encs, key)
    assert all(back[n] is x and x.tobytes() == before[n].tobytes()
               for n, x in (("first", first), ("frozen", frozen)))
    torch = pytest.importorskip("torch")
    a, b = torch.arange(2048.0), torch.arange(1024.0)
    encs = gpucrypt.encrypt_tensors({"a": a, "b": b}, key, inplace=True)
    sealed = a.numpy().tobytes()
    b.untyped_storage().resize_(16)
    with pytest.raises(ValueError, match="storage is smaller"):
        gpucrypt.decrypt_tensors(encs, key)
    assert a.numpy().tobytes() == sealed


def test_one_in_place_result_made_read_only_is_refused_even_when_viewed_before():
    """The small-tensor path reads an in-place result from its source as it is now: a
    ciphertext view made while the array was writable does not let it write into an
    array made read-only since."""
    key = os.urandom(32)
    x = random_array((256,), "float32")
    enc = gpucrypt.encrypt_tensor(x, key, inplace=True)
    assert enc.ciphertext.flags.writeable   # a view, made while x was writable
    sealed = x.tobytes()
    x.flags.writeable = False
    with pytest.raises(ValueError, match="the tensor is read-only now"):
        gpucrypt.decrypt_tensor(enc, key)
    assert x.tobytes() == sealed and not x.flags.writeable


def test_unusable_out_tensors_are_refused_before_any_tensor_is_decrypted():
    """out= memory that cannot take the plaintext (a read-only array; a torch tensor
    whose storage shrank, whose views would reach past the allocation) is refused
    before anything of the batch is decrypted."""
    key = os.urandom(32)
    first, second = random_array((4096,), "float32"), random_array((64,), "float32")
    encs = gpucrypt.encrypt_tensors({"first": first, "second": second}, key, inplace=True)
    sealed = first.tobytes()
    frozen = np.zeros_like(second)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        gpucrypt.decrypt_tensors(encs, key, out={"first": first, "second": frozen})
    assert first.tobytes() == sealed
    torch = pytest.importorskip("torch")
    t = torch.arange(1024.0)
    enc = gpucrypt.encrypt_tensor(t, key)
    shrunk = torch.empty(1024)
    shrunk.untyped_storage().resize_(16)
    for decrypt in (lambda: gpucrypt.decrypt_tensor(enc, key, out=shrunk),
                    lambda: gpucrypt.decrypt_tensors([enc], key, out=[shrunk])):
        with pytest.raises(ValueError, match="storage is smaller"):
            decrypt()


@pytest.mark.cudasim
def test_a_batch_on_two_gpus_is_refused_before_any_tensor_is_decrypted():
    """A decrypt batch whose GPU work would span two devices is refused in its planning:
    the host tensors decrypted before the GPU batch are left as they were. (The second
    device is a relabelled result: nothing runs on it.)"""
    require_gpu_backend()
    from numba import cuda

    key = os.urandom(32)
    x = random_array((64,), "float32")
    batch = gpucrypt.encrypt_tensors({"h": x}, key, inplace=True)
    sealed = x.tobytes()
    batch |= gpucrypt.encrypt_tensors({"a": cuda.to_device(x), "b": cuda.to_device(x)}, key)
    batch["b"]._place = ("cuda", batch["a"]._place[1] + 1)
    with pytest.raises(ValueError, match="several GPUs"):
        gpucrypt.decrypt_tensors(batch, key)
    assert x.tobytes() == sealed


@pytest.mark.cudasim
def test_decrypt_into_gpu_out_runs_on_the_gpu():
    """Host ciphertext into a device out=: decrypted on the GPU into that memory;
    device="cpu" cannot write device memory and says so."""
    require_gpu_backend()
    from numba import cuda

    key = os.urandom(32)
    x = random_array((6, 7), "float32")
    enc = gpucrypt.encrypt_tensor(x, key)
    out = cuda.device_array((6, 7), np.float32)
    with pytest.raises(ValueError, match="device='cpu' cannot write"):
        gpucrypt.decrypt_tensor(enc, key, out=out, device="cpu")
    assert gpucrypt.decrypt_tensor(enc, key, out=out) is out
    assert out.copy_to_host().tobytes() == x.tobytes()


def test_stream_handle():
    from gpucrypt.tensors._frameworks import stream_handle

    class Torchish:
        cuda_stream = 11

    class Cupyish:
        ptr = 12

    class Numbaish:
        handle = ctypes.c_void_p(13)

    assert [stream_handle(s) for s in (None, 5, Torchish(), Cupyish(), Numbaish())] == \
        [None, 5, 11, 12, 13]
    with pytest.raises(TypeError, match="unsupported stream object str"):
        stream_handle("default")


@pytest.mark.cudasim
def test_numba_device_arrays_in_simulator():
    require_gpu_backend()
    from numba import cuda

    key = os.urandom(32)
    x = random_array((4, 9), "float32")
    d = cuda.to_device(x)
    enc = gpucrypt.encrypt_tensor(d, key)
    assert enc.on_device and enc.framework == "numba"
    aad = hand_metadata(algorithm="chacha20-poly1305", framework="numba", dtype="float32",
                        shape=(4, 9), nbytes=x.nbytes)
    assert ct_bytes(enc) + enc.tag == reference_seal("chacha20-poly1305", key, enc.nonce,
                                                     x.tobytes(), aad)
    y = gpucrypt.decrypt_tensor(enc, key)
    assert y.copy_to_host().tobytes() == x.tobytes()
    host = gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(enc.to_bytes()), key)
    assert isinstance(host, np.ndarray) and host.tobytes() == x.tobytes()   # numba-made, CPU result
    enc = gpucrypt.encrypt_tensor(d, key, inplace=True)
    assert gpucrypt.decrypt_tensor(enc, key) is d
    assert d.copy_to_host().tobytes() == x.tobytes()


@pytest.mark.cudasim
@pytest.mark.parametrize("writer,reader", [("cpu", "gpu"), ("gpu", "cpu")])
def test_state_dict_written_on_one_backend_reads_on_the_other(writer, reader):
    require_gpu_backend()
    key = os.urandom(32)
    tensors = {"w": random_array((3, 5), "float32"), "b": random_array((5,), "float16")}
    blobs = {n: e.to_bytes() for n, e in gpucrypt.encrypt_tensors(tensors, key,
                                                                  device=writer).items()}
    back = gpucrypt.decrypt_tensors({n: EncryptedTensor.from_bytes(b) for n, b in blobs.items()},
                                    key, device=reader)
    assert all(back[n].dtype == tensors[n].dtype and back[n].tobytes() == tensors[n].tobytes()
               for n in tensors)


# --------------------------------------------------------------------- nonces
def test_nonce_sequence_counts_and_exhausts():
    seq = NonceSequence(12, prefix=b"\x01" * 8, start=2**32 - 3)
    assert seq.next() == b"\x01" * 8 + (2**32 - 3).to_bytes(4, "big")
    with pytest.raises(OverflowError):
        seq.take(3)                       # all or none
    assert seq.remaining == 2
    assert len(set(seq.take(2))) == 2
    with pytest.raises(OverflowError):
        seq.next()
    with pytest.raises(ValueError):
        NonceSequence(12, prefix=b"\x00" * 9)


def test_counter_cipher_is_deterministic_and_never_repeats():
    key = os.urandom(32)
    x = random_array((4,), "float32")
    a = TensorCipher(key, nonces="counter", prefix=b"node-7")
    b = TensorCipher(key, nonces="counter", prefix=b"node-7")
    ea, eb = a.encrypt(x), b.encrypt(x)
    assert ea.nonce == eb.nonce == b"node-7" + (0).to_bytes(6, "big")
    assert ct_bytes(ea) == ct_bytes(eb)
    batch = a.encrypt_many({"p": x, "q": x})
    assert [e.nonce[-1] for e in batch.values()] == [1, 2]
    assert a.decrypt(batch["q"]).tobytes() == x.tobytes()
    with pytest.raises(ValueError, match="prefix"):
        TensorCipher(key, nonces="counter")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_a_forked_child_never_hands_out_its_parents_counter_nonces():
    """fork() copies a NonceSequence's counter: parent and child would give the same
    prefix || counter under one key. In the child the copy (alone, or in a counter
    TensorCipher) refuses, saying what to do; a sequence made in the child works, and the
    parent goes on as before."""
    import json

    seq = NonceSequence(12, prefix=b"wr1")
    cipher = TensorCipher(bytes(32), nonces="counter", prefix=b"w")
    random_cipher = TensorCipher(bytes(32))
    x = random_array((4,), "float32")
    assert seq.next() == b"wr1" + bytes(9)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and never return into pytest
        try:
            report = []
            for take in (seq.next, lambda: seq.take(0), lambda: cipher.encrypt(x).nonce,
                         lambda: NonceSequence(12, prefix=b"child").next(),
                         lambda: random_cipher.encrypt(x).nonce):
                try:
                    report.append(take().hex())
                except RuntimeError as exc:
                    report.append(f"refused: {exc}")
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        report = json.loads(pipe.read())
    assert os.waitstatus_to_exitcode(status) == 0
    for refused in report[:3]:
        assert refused.startswith("refused: ") and "prefix of its own" in refused, report
    assert report[3] == (b"child" + bytes(7)).hex()   # made in the child: its own
    assert len(bytes.fromhex(report[4])) == 12        # random nonces need no counter
    assert seq.next() == b"wr1" + bytes(8) + b"\x01"  # the parent's go on
    assert cipher.encrypt(x).nonce == b"w" + bytes(11)


def test_a_tensor_cipher_cannot_be_copied_or_pickled():
    """It holds a key (as gpucrypt.aead's objects, whose refusal it shares), and a copy
    would count the random-nonce budget apart from its original."""
    import copy
    import pickle

    for cipher in (TensorCipher(bytes(32)), TensorCipher(bytes(32), nonces="counter", prefix=b"")):
        for make in (copy.copy, copy.deepcopy, pickle.dumps):
            with pytest.raises(TypeError, match="holds a key"):
                make(cipher)


def test_random_nonce_budget_is_enforced(monkeypatch):
    monkeypatch.setattr(tensor_mod, "RANDOM_NONCE_BUDGET", 3)
    cipher = TensorCipher(os.urandom(32))
    x = random_array((2,), "int8")
    cipher.encrypt_many([x, x])
    cipher.encrypt(x)
    with pytest.raises(OverflowError):
        cipher.encrypt(x)
    xcipher = TensorCipher(os.urandom(32), "xchacha20-poly1305")   # 192-bit: no such budget
    for _ in range(4):
        xcipher.encrypt(x)


def test_explicit_nonces_checked():
    key = os.urandom(32)
    x = random_array((2,), "int8")
    with pytest.raises(ValueError, match="different"):
        gpucrypt.encrypt_tensors([x, x], key, nonces=[bytes(12), bytes(12)])
    with pytest.raises(ValueError, match="12 bytes"):
        gpucrypt.encrypt_tensor(x, key, nonce=bytes(24))
    enc = gpucrypt.encrypt_tensor(x, key, algorithm="xchacha20-poly1305", nonce=bytes(24))
    assert enc.nonce == bytes(24)


def test_argument_errors():
    x = random_array((2,), "int8")
    with pytest.raises(ValueError):
        gpucrypt.encrypt_tensor(x, bytes(16))
    with pytest.raises(ValueError):
        gpucrypt.encrypt_tensor(x, bytes(32), algorithm="aes-ctr")
    with pytest.raises(TypeError):
        gpucrypt.encrypt_tensor(x, "key")
    with pytest.raises(TypeError):
        gpucrypt.encrypt_tensor(x, bytes(32), key_id=3)
    with pytest.raises(ValueError):
        gpucrypt.encrypt_tensor(x, bytes(32), device="tpu")
    with pytest.raises(TypeError):
        gpucrypt.encrypt_tensors({1: x}, bytes(32))
    assert "key" not in repr(TensorCipher(bytes(32)))


@pytest.mark.parametrize("algorithm", ["chacha20-poly1305", "aes-gcm"])
def test_small_host_tensors_stay_on_the_calling_thread(monkeypatch, algorithm):
    """In a host batch on several cores, tensors under _POOLED_TENSOR_BYTES run on the
    calling thread (on threads their Python work only fought over the GIL: a 2048-tensor
    16 KiB state dict took 1.5-1.9x as long on two threads as on one), the large ones on
    the workers; a batch of small tensors starts no pool at all. Same bytes either way."""
    import threading

    from gpucrypt.backends import cpu

    pools, ran_on, order, shared = [], {}, [], {}

    class CountingPool(pipeline.ThreadPoolExecutor):
        def __init__(self, n):
            pools.append(n)
            super().__init__(n)

    real = tensor_mod._encrypt_on_host

    worker_ran = threading.Event()

    def spy(job, *args):
        ran_on[job.label] = threading.get_ident()
        order.append(job.label)
        shared[job.label] = args[-1]  # shared_gil
        if ran_on[job.label] != me:
            worker_ran.set()
        elif job.label.startswith("s") and pools:  # a pool: let the worker take a tensor first
            worker_ran.wait(10)
        return real(job, *args)

    monkeypatch.setattr(pipeline, "ThreadPoolExecutor", CountingPool)
    monkeypatch.setattr(tensor_mod, "_encrypt_on_host", spy)
    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)
    monkeypatch.setattr(tensor_mod, "_HOST_PARALLEL_BYTES", 1000)
    monkeypatch.setattr(tensor_mod, "_POOLED_TENSOR_BYTES", {algorithm: 16000})
    key = os.urandom(32)
    small = {f"s{i}": random_array((100 + i,), "float32") for i in range(20)}
    large = {f"L{i}": random_array((4000 + i,), "float32") for i in range(6)}   # >= 16000 bytes
    me = threading.get_ident()
    for tensors, workers in ((small, []), ({**small, **large}, [1])):
        pools.clear()
        ran_on.clear()
        order.clear()
        worker_ran.clear()
        encs = gpucrypt.encrypt_tensors(tensors, key, algorithm=algorithm)
        assert pools == workers
        assert set(ran_on) == set(tensors)
        assert all(ran_on[n] == me for n in small)
        # this thread runs its small tensors first, then helps with what the worker left
        mine = [n for n in order if ran_on[n] == me]
        assert mine == sorted(mine, key=lambda n: n.startswith("L"))
        # the workers take the GIL-free forms, this thread the fastest one of its own
        assert all(shared[n] == (ran_on[n] != me) for n in tensors)
        assert any(ran_on[n] != me for n in tensors) == bool(workers)
        back = gpucrypt.decrypt_tensors(encs, key)
        assert all(back[n].tobytes() == tensors[n].tobytes() for n in tensors)


def test_host_batch_worker_error_names_its_tensor_and_stops_the_rest(monkeypatch):
    """A host batch on several threads (one shared queue, largest tensor first): an error
    in one tensor's work is raised once every worker stopped, naming the tensor, and the
    queue is emptied (the tensors after it are not started)."""
    from gpucrypt.backends import cpu

    monkeypatch.setattr(cpu, "usable_cores", lambda: 2)
    monkeypatch.setattr(tensor_mod, "_HOST_PARALLEL_BYTES", 1000)
    monkeypatch.setattr(tensor_mod, "_POOLED_TENSOR_BYTES_DEFAULT", 0)   # every tensor worth a thread
    real, started = tensor_mod._encrypt_on_host, []

    def failing(job, *args):
        started.append(job.label)
        if job.label == "t0":  # the largest: taken first
            raise RuntimeError("disk on fire")
        return real(job, *args)

    monkeypatch.setattr(tensor_mod, "_encrypt_on_host", failing)
    tensors = {f"t{i}": random_array((4000 - i,), "uint8") for i in range(30)}
    with pytest.raises(RuntimeError, match="disk on fire") as err:
        gpucrypt.encrypt_tensors(tensors, os.urandom(32))
    assert any("'t0'" in note for note in getattr(err.value, "__notes__", []))
    assert started[0] in ("t0", "t1") and len(started) < 30


def test_out_on_the_ciphertexts_own_memory_keeps_it_on_a_wrong_tag(device):
    """out= on an in-place result's own memory through another object is an in-place
    decrypt in effect, on every path: a wrong key leaves the ciphertext there (the GPU
    path zeroed a separate host out=, which here was the ciphertext itself), the right
    key then decrypts it, the result is the out= object, and it is spent."""
    if device == "gpu":
        require_gpu_backend()
    key = os.urandom(32)
    a = np.arange(4096, dtype=np.float32)
    plain = a.copy()
    enc = gpucrypt.encrypt_tensor(a, key, inplace=True)
    ciphertext = a.copy()
    run = None if device == "cpu" else "gpu"
    out = a[...]  # another object on the same memory
    with pytest.raises(InvalidTag):
        gpucrypt.decrypt_tensor(enc, os.urandom(32), out=out, device=run)
    assert a.view(np.uint8).tobytes() == ciphertext.view(np.uint8).tobytes()
    assert gpucrypt.decrypt_tensor(enc, key, out=out, device=run) is out
    assert np.array_equal(a, plain)
    with pytest.raises(ValueError, match="decrypted in place"):
        enc.to_bytes()


def test_dtypes_the_format_cannot_name_are_refused_before_encrypting():
    """ml_dtypes types outside the format's table (int4, float6, ...) and byte-swapped ones
    are spelled "<V1" by NumPy, which names plain void bytes: their ciphertext could never
    be decrypted back. Refused before encrypting, saying what to do; the table's own
    (bfloat16) and NumPy's (big-endian, void) still round-trip."""
    import ml_dtypes  # jax's dependency, installed with the test extra

    key = os.urandom(32)
    for dtype in (ml_dtypes.int4, ml_dtypes.float6_e2m3fn, np.dtype(ml_dtypes.bfloat16).newbyteorder()):
        with pytest.raises(ValueError, match="no name in gpucrypt's tensor format.*view"):
            gpucrypt.encrypt_tensor(np.zeros(4, dtype=dtype), key)
    for dtype in (ml_dtypes.bfloat16, ">f4", "V8"):
        x = np.frombuffer(os.urandom(32), dtype=dtype)
        back = gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(
            gpucrypt.encrypt_tensor(x, key).to_bytes()), key)
        assert back.dtype == x.dtype and back.tobytes() == x.tobytes()


def test_dtypes_of_elements_of_no_bytes_are_refused():
    """A dtype of 0-byte elements (numpy:|S0, <U0, |V0) passes every size check at any
    shape: a blob naming one (no key needed to make it) made decrypt_tensor allocate
    from its unchecked shape before the tag was checked. Refused when the blob is
    parsed, and when such an array (only void ones exist) is encrypted."""
    with pytest.raises(ValueError, match="elements of no bytes"):
        gpucrypt.encrypt_tensor(np.zeros(3, dtype="V0"), os.urandom(32))
    for dtype in ("numpy:|S0", "numpy:<U0", "numpy:|V0"):
        meta = hand_metadata(algorithm="chacha20-poly1305", framework="numpy", dtype=dtype,
                             shape=(2**40, 2**20), nbytes=0)
        blob = meta + struct.pack("<Q", 0) + bytes(12) + bytes(16)
        with pytest.raises(ValueError, match="invalid NumPy dtype string"):
            EncryptedTensor.from_bytes(blob)


# --------------------------------------------------------------------- edited nonces, aad
@pytest.mark.parametrize("algorithm", ["chacha20-poly1305", "xchacha20-poly1305", "aes-gcm"])
@pytest.mark.parametrize("edit", ["short", "long", "empty", "bytearray", "memoryview", "str aad",
                                  "bytearray aad"])
def test_an_edited_nonce_or_aad_fails_like_any_edit(algorithm, edit, device):
    """A nonce of another length or type, or an aad that is not bytes, is an edit: InvalidTag
    naming the entry (the one-tensor path and a batch, new and in-place results, CPU and
    GPU), not the cipher's ValueError ("Nonce must be 12 bytes") or TypeError, which in a
    batch stopped every entry; the batch's good entry is still decrypted back in place."""
    import copy

    key = os.urandom(32)
    for inplace in (False, True):
        x, y = random_array((2, 6), "float32"), random_array((3,), "int16")
        plain_y = y.copy()
        enc = gpucrypt.encrypt_tensor(x, key, algorithm=algorithm, name="x", device=device,
                                      inplace=inplace)
        good = gpucrypt.encrypt_tensor(y, key, name="y", inplace=True, device=device)
        bad = copy.copy(enc)
        if edit == "short":
            bad.nonce = enc.nonce[:-1]
        elif edit == "long":
            bad.nonce = enc.nonce + b"\0"
        elif edit == "empty":
            bad.nonce = b""
        elif edit == "bytearray":
            bad.nonce = bytearray(enc.nonce)
        elif edit == "memoryview":  # 12 or 24 bytes, but 3 or 6 items: len() is not its size
            bad.nonce = memoryview(enc.nonce).cast("I")
        elif edit == "str aad":
            bad.aad = "ctx"
        else:
            bad.aad = bytearray(enc.aad)
        with pytest.raises(InvalidTag) as info:
            gpucrypt.decrypt_tensor(bad, key, device=device)
        assert info.value.failed == [None]
        with pytest.raises(InvalidTag) as info:
            gpucrypt.decrypt_tensors({"x": bad, "y": good}, key, device=device)
        assert info.value.failed == ["x"]
        assert y.tobytes() == plain_y.tobytes()  # the good entry is back
        assert gpucrypt.decrypt_tensor(enc, key, device=device).tobytes() == x.tobytes()


# --------------------------------------------------------------------- NumPy subclasses
@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_numpy_subclasses_are_their_memory_and_masked_arrays_are_refused():
    """np.matrix (which stays 2-D through reshape(-1)) and np.memmap are encrypted as the
    ndarray over their memory: new, in place, in a batch and as out=, to cryptography's
    bytes; a masked array is refused, saying why (its mask would be dropped), as input
    and as out=, before anything is written."""
    key = os.urandom(32)
    m = np.matrix([[1, 2, 3], [4, 5, 6]], dtype=np.float32)
    plain = np.asarray(m).tobytes()
    enc = gpucrypt.encrypt_tensor(m, key)
    assert enc.shape == (2, 3) and enc.nbytes == 24
    assert ct_bytes(enc) + enc.tag == reference_seal("chacha20-poly1305", key, enc.nonce, plain,
                                                     enc.associated_data())
    assert gpucrypt.decrypt_tensor(enc, key).tobytes() == plain
    out = np.matrix(np.zeros((2, 3), dtype=np.float32))
    assert gpucrypt.decrypt_tensor(enc, key, out=out) is out and out.tobytes() == plain
    encs = gpucrypt.encrypt_tensors({"m": m}, key)
    assert gpucrypt.decrypt_tensors(encs, key)["m"].tobytes() == plain
    enc = gpucrypt.encrypt_tensor(m, key, inplace=True)
    assert m.tobytes() != plain
    assert gpucrypt.decrypt_tensor(enc, key) is m and m.tobytes() == plain

    masked = np.ma.array([1, 2, 3], mask=[0, 1, 0])
    for call in (lambda: gpucrypt.encrypt_tensor(masked, key),
                 lambda: gpucrypt.encrypt_tensors([masked], key, inplace=True),
                 lambda: gpucrypt.decrypt_tensor(gpucrypt.encrypt_tensor(masked.data, key), key,
                                                 out=masked)):
        with pytest.raises(TypeError, match="mask"):
            call()
    assert masked.data.tolist() == [1, 2, 3] and masked.mask.tolist() == [False, True, False]


def test_a_numpy_memmap_in_place_stays_a_memmap(tmp_path):
    key = os.urandom(32)
    mm = np.memmap(tmp_path / "m.bin", dtype=np.float32, mode="w+", shape=(4, 5))
    mm[:] = np.arange(20).reshape(4, 5)
    plain = mm.tobytes()
    enc = gpucrypt.encrypt_tensor(mm, key)
    assert gpucrypt.decrypt_tensor(enc, key).tobytes() == plain
    encs = gpucrypt.encrypt_tensors({"mm": mm}, key, inplace=True)
    assert mm.tobytes() != plain
    back = gpucrypt.decrypt_tensors(encs, key)["mm"]
    assert back is mm and mm.tobytes() == plain


# --------------------------------------------------------------------- refused entries' out=
def test_an_entry_refused_before_decryption_zeroes_its_out_like_a_bad_tag(device):
    """An entry filed under another name, or malformed (edited so that its fields cannot
    describe its ciphertext), fails with InvalidTag like a wrong tag, and its out= is
    zeroed like a wrong tag's (what it held, an earlier plaintext say, must not pass
    for this entry's): where out= has the recorded dtype and shape and is no entry's
    ciphertext. An out= that is its own ciphertext's memory keeps the ciphertext."""
    import copy

    key = os.urandom(32)
    a, b = np.arange(8, dtype=np.float32), np.arange(8, dtype=np.float32) + 100
    encs = gpucrypt.encrypt_tensors({"a": a, "b": b}, key, device=device)
    misfiled = {"a": encs["b"]}
    malformed = copy.copy(encs["a"])
    malformed.shape = (4,)  # 16 bytes recorded for 32 of ciphertext
    bad_tag = copy.copy(encs["a"])
    bad_tag._tag = bytes(16)
    for entries, shape in ((misfiled, (8,)), ({"a": malformed}, (4,)), ({"a": bad_tag}, (8,))):
        out = np.full(shape, 7.0, dtype=np.float32)
        with pytest.raises(InvalidTag) as info:
            gpucrypt.decrypt_tensors(entries, key, out={"a": out}, device=device)
        assert info.value.failed == ["a"]
        assert not out.any()
    # an out= of another dtype or shape is left as it is (it could not be this entry's)
    out = np.full(4, 7.0, dtype=np.float64)
    with pytest.raises(InvalidTag):
        gpucrypt.decrypt_tensors(misfiled, key, out={"a": out}, device=device)
    assert (out == 7).all()
    # an in-place result's own memory, through another object, misfiled: its ciphertext stays
    x = np.arange(8, dtype=np.float32)
    enc = gpucrypt.encrypt_tensors({"x": x}, key, inplace=True, device=device)["x"]
    ciphertext = x.tobytes()
    with pytest.raises(InvalidTag):
        gpucrypt.decrypt_tensors({"y": enc}, key, out={"y": x[...]}, device=device)
    assert x.tobytes() == ciphertext
    assert gpucrypt.decrypt_tensors({"x": enc}, key, device=device)["x"] is x
    assert np.array_equal(x, np.arange(8, dtype=np.float32))


def test_a_dicts_encryptions_decrypted_as_a_list_say_they_are_filed_under_other_names():
    """A dict's encryptions decrypted as a list fail (each name is authenticated, and a
    list's names are its indices), saying that the entries are filed under other names
    than they were encrypted with, not only "authentication failed"."""
    key = os.urandom(32)
    encs = gpucrypt.encrypt_tensors({"a": np.arange(3.0), "b": np.arange(4.0)}, key)
    with pytest.raises(InvalidTag, match=r"'a' is filed as '0'.*'b' is filed as '1'") as info:
        gpucrypt.decrypt_tensors(list(encs.values()), key)
    assert info.value.failed == ["0", "1"]
    with pytest.raises(InvalidTag, match="'b' is filed as 'a'"):
        gpucrypt.decrypt_tensors({"a": encs["b"]}, key)


def test_decrypt_tensor_checks_the_name_it_is_given(device):
    """encrypt_tensor(name=) authenticates a name that decrypt_tensor could not check: two
    single-tensor blobs swapped in storage decrypted, each in the other's place. With
    name= a ciphertext recording another name, or none, fails as a misfiled batch entry
    does, before anything is decrypted, naming both; without it nothing changes."""
    key = os.urandom(32)
    values = {"layer1.weight": random_array((4,), "float32"),
              "layer2.weight": random_array((4,), "float32")}
    store = {n: gpucrypt.encrypt_tensor(v, key, name=n).to_bytes() for n, v in values.items()}
    unnamed = gpucrypt.encrypt_tensor(values["layer1.weight"], key).to_bytes()
    for n, blob in store.items():  # the one-tensor path (no out=) and the general one
        got = gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(blob), key, name=n,
                                      device=device)
        assert got.tobytes() == values[n].tobytes()
        out = np.empty(4, np.float32)
        assert gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(blob), key, name=n, out=out,
                                       device=device) is out
        assert out.tobytes() == values[n].tobytes()
    for blob, recorded in ((store["layer2.weight"], "the name 'layer2.weight'"),
                           (unnamed, "no name")):
        for out in (None, np.ones(4, np.float32)):
            with pytest.raises(InvalidTag, match=f"name='layer1.weight' was asked for, but the "
                                                 f"ciphertext records {recorded}.*Nothing was "
                                                 f"decrypted") as info:
                gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(blob), key,
                                        name="layer1.weight", out=out, device=device)
            assert info.value.failed == ["layer1.weight"]
            if out is not None:  # as a wrong tag's: what it held cannot pass for the plaintext
                assert not out.any()
    # without name= the recorded name is not checked: the swapped blob decrypts, as itself
    swapped = EncryptedTensor.from_bytes(store["layer2.weight"])
    assert gpucrypt.decrypt_tensor(swapped, key, device=device).tobytes() == \
        values["layer2.weight"].tobytes()
    # in place: a mismatch leaves the ciphertext where it is, and the result usable
    x = random_array((4,), "float32")
    plain = x.tobytes()
    enc = gpucrypt.encrypt_tensor(x, key, inplace=True, name="w")
    sealed = x.tobytes()
    with pytest.raises(InvalidTag, match="name='v' was asked for"):
        gpucrypt.decrypt_tensor(enc, key, name="v", device=device)
    assert x.tobytes() == sealed
    assert gpucrypt.decrypt_tensor(enc, key, name="w", device=device) is x
    assert x.tobytes() == plain
    with pytest.raises(TypeError, match="tensor names must be str"):
        gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(unnamed), key, name=3)


@pytest.mark.parametrize("size", [16, 1 << 20])  # the small path and the general one
def test_a_wrong_key_on_an_unnamed_tensor_says_what_can_be_wrong(size):
    """It said "authentication failed for 1 of 1 tensor(s): None"."""
    x = np.arange(size // 4, dtype=np.float32)
    enc = gpucrypt.encrypt_tensor(x, os.urandom(32))
    with pytest.raises(InvalidTag, match=r"1 of 1 tensor\(s\): an unnamed tensor \(a wrong "
                                         r"key, or the ciphertext, tag or recorded metadata"):
        gpucrypt.decrypt_tensor(enc, os.urandom(32))
    named = gpucrypt.encrypt_tensors({"w": x}, b"k" * 32)
    with pytest.raises(InvalidTag, match=r"1 of 1 tensor\(s\): 'w' \(a wrong key"):
        gpucrypt.decrypt_tensors(named, os.urandom(32))
    tagged = gpucrypt.encrypt_tensor(x, b"k" * 32, key_id="weights-2025")  # the key meant
    with pytest.raises(InvalidTag, match=r"encrypted under key id 'weights-2025'"):
        gpucrypt.decrypt_tensor(tagged, os.urandom(32))
    tagged = gpucrypt.encrypt_tensors({"w": x}, b"k" * 32, key_id="weights-2025")
    with pytest.raises(InvalidTag, match=r"'w' \(a wrong key.*key id 'weights-2025'"):
        gpucrypt.decrypt_tensors(tagged, os.urandom(32))


def test_a_state_dict_entry_that_is_no_tensor_is_named():
    """A real state dict holds a step count or extra state beside its tensors."""
    with pytest.raises(TypeError, match=r"entry 'step': expected a tensor .* not int; encrypt "
                                        r"the tensors"):
        gpucrypt.encrypt_tensors({"w": np.ones(3), "step": 5}, os.urandom(32))
    # an optimizer's state: its tensors must not be "stored as without encryption"
    with pytest.raises(TypeError, match=r"entry 'state' is a nested dict: .* flatten it first.*"
                                        r"none of its tensors is stored in the clear"):
        gpucrypt.encrypt_tensors({"state": {"0": {"exp_avg": np.ones(3)}}}, os.urandom(32))


def test_stored_bytes_and_immutable_outs_are_refused_saying_what_to_do():
    """Two errors that said only what was wrong: the bytes to_bytes() made, given where an
    EncryptedTensor goes ("expected an EncryptedTensor, not bytes"), and a JAX out=
    ("out must be a writable C-contiguous tensor", which a JAX array may well be)."""
    import jax.numpy as jnp

    key = os.urandom(32)
    x = random_array((4,), "float32")
    blob = gpucrypt.encrypt_tensor(x, key).to_bytes()
    for data in (blob, bytearray(blob), memoryview(blob)):
        with pytest.raises(TypeError, match=r"not \w+; parse stored bytes with "
                                            r"gpucrypt\.EncryptedTensor\.from_bytes first$"):
            gpucrypt.decrypt_tensor(data, key)
        with pytest.raises(TypeError, match=r"entry 'a': expected an EncryptedTensor, not \w+; "
                                            r"parse stored bytes with gpucrypt\.EncryptedTensor"
                                            r"\.from_bytes first \(\{name: EncryptedTensor"):
            gpucrypt.decrypt_tensors({"a": data}, key)
    with pytest.raises(TypeError, match="expected an EncryptedTensor, not ndarray$"):
        gpucrypt.decrypt_tensor(x, key)  # no advice about bytes for what is no bytes
    enc = gpucrypt.encrypt_tensor(x, key)
    for call in (lambda out: gpucrypt.decrypt_tensor(enc, key, out=out),
                 lambda out: gpucrypt.decrypt_tensors([enc], key, out=[out])):
        with pytest.raises(ValueError, match="jax arrays are immutable: leave out= unset"):
            call(jnp.zeros(4, jnp.float32))
    assert gpucrypt.decrypt_tensor(enc, key).tobytes() == x.tobytes()


# --------------------------------------------------------------------- GPU staging
@pytest.mark.cudasim
def test_a_gpu_decrypt_of_host_ciphertext_leaves_no_plaintext_in_its_staging_buffers(monkeypatch):
    """Host ciphertext decrypted on the GPU goes through pinned host and device staging
    buffers: once the plaintext is in the result, neither holds it any more."""
    from gpucrypt.backends import get_backend

    require_gpu_backend()
    gpu = get_backend("gpu")
    staged = []
    real_pinned, real_device_array = gpu.pinned, gpu.device_array

    def pinned(n):
        staged.append(real_pinned(n))
        return staged[-1]

    def device_array(n, **kw):
        staged.append(real_device_array(n, **kw))
        return staged[-1]

    monkeypatch.setattr(gpu, "pinned", pinned)
    monkeypatch.setattr(gpu, "device_array", device_array)
    key = os.urandom(32)
    secret = np.frombuffer(b"TOPSECRETPLAINTEXT" * 8, dtype=np.uint8).copy()

    def held(buffer):
        data = buffer.copy_to_host() if hasattr(buffer, "copy_to_host") else np.asarray(buffer)
        return b"TOPSECRET" in data.tobytes()

    enc = gpucrypt.encrypt_tensor(secret, key)
    for decrypt in (lambda: gpucrypt.decrypt_tensor(enc, key, device="gpu"),
                    lambda: gpucrypt.decrypt_tensors([enc], key, out=[np.empty_like(secret)],
                                                     device="gpu")[0]):
        staged.clear()
        assert decrypt().tobytes() == secret.tobytes()
        assert len(staged) == 2 and not any(held(b) for b in staged)


@pytest.mark.parametrize("name, size", [("aes-128-gcm", 16), ("aes-192-gcm", 24),
                                        ("aes-256-gcm", 32)])
def test_aes_gcm_by_its_key_size_is_aes_gcm_with_exactly_that_key(name, size):
    """The file formats and OpenSSL name AES-GCM by its key size; the tensor API took only
    "aes-gcm". The sized name insists on its size: a 16-byte key never runs as AES-256."""
    x = np.arange(100, dtype=np.float32)
    key = os.urandom(size)
    enc = gpucrypt.encrypt_tensor(x, key, algorithm=name)
    assert enc.algorithm == "aes-gcm"
    assert np.array_equal(gpucrypt.decrypt_tensor(enc, key), x)
    assert gpucrypt.encrypt_tensors({"x": x}, key, algorithm=name)["x"].algorithm == "aes-gcm"
    assert TensorCipher(key, algorithm=name).encrypt(x).algorithm == "aes-gcm"
    other = 32 if size != 32 else 16
    for call in (lambda: gpucrypt.encrypt_tensor(x, os.urandom(other), algorithm=name),
                 lambda: gpucrypt.encrypt_tensors([x], os.urandom(other), algorithm=name),
                 lambda: TensorCipher(os.urandom(other), algorithm=name)):
        with pytest.raises(ValueError, match=f"{name} takes a {size}-byte key, not {other}"):
            call()


def test_a_tensor_cipher_says_what_it_chooses_itself():
    """TensorCipher(key).encrypt(x, nonce=n) said "encrypt_tensor() got multiple values for
    keyword argument 'nonce'"; and no nonce of its sequence is spent on the refusal."""
    cipher = TensorCipher(os.urandom(32), nonces="counter", prefix=bytes(4))
    x = np.arange(4.0)
    with pytest.raises(TypeError, match=r"TensorCipher.encrypt chooses nonce itself.*"
                                        r"encrypt_tensor\(\.\.\., nonce=\)"):
        cipher.encrypt(x, nonce=os.urandom(12))
    with pytest.raises(TypeError, match=r"TensorCipher.encrypt_many chooses algorithm, nonces"):
        cipher.encrypt_many([x], nonces=None, algorithm="aes-gcm")
    assert cipher.messages == 0
    assert cipher.encrypt(x).nonce == bytes(4) + (0).to_bytes(8, "big")


def test_a_refused_tensor_cipher_call_spends_no_nonce():
    """TensorCipher took its nonces before encrypt_tensor(s) checked their arguments, so
    calls refused for a non-contiguous array or a non-tensor spent counter nonces and
    counted as messages; they are taken once the arguments are checked."""
    cipher = TensorCipher(os.urandom(32), nonces="counter", prefix=b"p")
    x = random_array((4, 4), "float32")
    for call in (lambda: cipher.encrypt(x.T), lambda: cipher.encrypt([1, 2]),
                 lambda: cipher.encrypt_many([x, x.T]), lambda: cipher.encrypt_many({"a": "b"})):
        with pytest.raises((ValueError, TypeError)):
            call()
    assert cipher.messages == 0
    assert cipher.encrypt(x).nonce == b"p" + bytes(11)
    assert [e.nonce for e in cipher.encrypt_many([x, x])] == [b"p" + i.to_bytes(11, "big")
                                                              for i in (1, 2)]
    assert cipher.messages == 3


def test_inplace_with_a_non_contiguous_array_says_what_in_place_needs():
    """It offered contiguous=True, with which the call then failed for in place."""
    x = random_array((4, 4), "float32")
    with pytest.raises(ValueError, match="inplace=True needs a C-contiguous tensor"):
        gpucrypt.encrypt_tensor(x.T, bytes(32), inplace=True)


def test_an_unnamed_entry_among_named_ones_is_misfiled():
    """encrypt_tensor's results carry no name: one put in the place of an entry of a batch
    encrypt_tensors made (the same key) decrypted as that entry. Among named entries it is
    misfiled; a batch of unnamed entries alone still decrypts."""
    key = os.urandom(32)
    x, other = random_array((3,), "float32"), random_array((3,), "int8")
    batch = gpucrypt.encrypt_tensors({"w": x, "b": x}, key)
    stray = gpucrypt.encrypt_tensor(other, key)
    for container in ({"w": stray, "b": batch["b"]},
                      [stray, gpucrypt.encrypt_tensors([x, x], key)[1]]):
        with pytest.raises(InvalidTag, match="encrypted under another name: None is filed as"
                           ".*no recorded name.*decrypted on its own, with decrypt_tensor"):
            gpucrypt.decrypt_tensors(container, key)
    back = gpucrypt.decrypt_tensors([stray, gpucrypt.encrypt_tensor(x, key)], key)
    assert back[0].tobytes() == other.tobytes() and back[1].tobytes() == x.tobytes()


def test_a_spent_in_place_ciphertext_cannot_be_pickled():
    """After an in-place decrypt its memory holds the plaintext again: to_bytes() and
    .ciphertext refuse it, and so do pickle and copy now (a pickle wrote the plaintext
    out). One that is not spent pickles and decrypts as before."""
    import copy
    import pickle

    key = os.urandom(32)
    x = random_array((64,), "float32")
    enc = gpucrypt.encrypt_tensor(x.copy(), key)
    again = pickle.loads(pickle.dumps(enc))
    assert gpucrypt.decrypt_tensor(again, key).tobytes() == x.tobytes()
    buf = x.copy()
    spent = gpucrypt.encrypt_tensor(buf, key, inplace=True)
    gpucrypt.decrypt_tensor(spent, key, inplace=True)
    for make in (pickle.dumps, copy.copy):
        with pytest.raises(ValueError, match="decrypted in place"):
            make(spent)


def test_a_gpu_result_copies_with_its_tag():
    """A result sealed on the GPU holds its batch's device tags until its tag is read:
    copy and deepcopy failed on them ("cannot pickle 'module' object"); they take the
    tag, read once, and the copies decrypt."""
    import copy

    require_gpu_backend()
    from numba import cuda

    key = os.urandom(32)
    x = random_array((16,), "float32")
    enc = gpucrypt.encrypt_tensor(cuda.to_device(x), key, device="gpu")
    for make in (copy.copy, copy.deepcopy):
        back = gpucrypt.decrypt_tensor(make(enc), key)
        assert back.copy_to_host().tobytes() == x.tobytes()


def test_a_call_the_gpu_half_refuses_spends_no_nonce():
    """The GPU half's refusals (here a stream of no known kind) came after the nonces were
    drawn: a TensorCipher counted the refused call and its counter moved on."""
    require_gpu_backend()
    cipher = TensorCipher(os.urandom(32), nonces="counter", prefix=b"g")
    x = random_array((8,), "float32")
    with pytest.raises(TypeError):
        cipher.encrypt(x, device="gpu", stream=object())
    assert cipher.messages == 0
    assert cipher.encrypt(x, device="gpu").nonce == b"g" + bytes(11)


def test_a_retried_batch_names_every_entry_already_decrypted_in_place():
    """After an in-place batch fails on one entry, the others are decrypted (spent); a
    retry said only "this EncryptedTensor was decrypted in place", of possibly hundreds.
    It names them now, all at once (``exc.spent``), before anything is decrypted."""
    key = os.urandom(32)
    arrays = {f"layer{i}": random_array((8,), "float32") for i in range(30)}
    encs = gpucrypt.encrypt_tensors({k: v.copy() for k, v in arrays.items()}, key, inplace=True)
    good = encs["layer7"]._tag
    encs["layer7"]._tag = bytes(16)
    with pytest.raises(InvalidTag):
        gpucrypt.decrypt_tensors(encs, key)
    encs["layer7"]._tag = good
    spent = [k for k in arrays if k != "layer7"]
    with pytest.raises(ValueError, match=r"29 of 30 entries were decrypted in place already: "
                                         r"'layer0', 'layer1', .* and 9 more") as info:
        gpucrypt.decrypt_tensors(encs, key)
    assert info.value.spent == spent
    with pytest.raises(ValueError, match=r"1 of 2 entries .*: '1'\. Their memory holds"):
        gpucrypt.decrypt_tensors([encs["layer7"], encs["layer3"]], key)  # a list: by index
    back = gpucrypt.decrypt_tensors({"layer7": encs["layer7"]}, key)
    assert back["layer7"].tobytes() == arrays["layer7"].tobytes()
    with pytest.raises(ValueError, match="^this EncryptedTensor was decrypted in place"):
        gpucrypt.decrypt_tensor(encs["layer7"], key)  # one tensor: "this" says which


@pytest.mark.cudasim
def test_a_deep_copy_of_an_in_place_device_result_is_its_ciphertext_alone():
    """A deep copy (as a pickle) of an in-place result holds exactly its ciphertext, in a
    buffer of its own on its device, not a copy of the caller's tensor (whose view's
    storage reaches beyond it): an ordinary out-of-place result."""
    import copy

    require_gpu_backend()
    from numba import cuda

    key = os.urandom(32)
    data = cuda.to_device(np.arange(64, dtype=np.uint8))
    enc = gpucrypt.encrypt_tensor(data[:16], key, inplace=True)
    deep = copy.deepcopy(enc)
    assert not deep.inplace and deep.ciphertext.size == 16 and deep.on_device
    assert gpucrypt.decrypt_tensor(deep, key).copy_to_host().tobytes() == bytes(range(16))
    assert gpucrypt.decrypt_tensor(enc, key).copy_to_host().tobytes() == bytes(range(16))


def test_a_pickle_loads_where_the_class_has_no_home_slot():
    """Pickles go between versions of gpucrypt. a9b6888 wrote a ``_home`` entry (a device
    object of this process, None in every pickle) that the class before it, which has no
    such slot, could not load: AttributeError. It is left out; a pickle without it (this
    version's, or an older one's) loads and decrypts here."""
    import io
    import pickle

    class Previous:  # EncryptedTensor's slots before a9b6888
        __slots__ = ("framework", "dtype", "shape", "nbytes", "algorithm", "key_id", "name",
                     "aad", "nonce", "_ct", "_place", "_tag", "_tags", "_tag_row", "_source",
                     "_consumed", "_adopt")

    class PreviousReader(pickle.Unpickler):
        def find_class(self, module, name):
            return Previous if name == "EncryptedTensor" else super().find_class(module, name)

    key = os.urandom(32)
    x = random_array((16,), "float32")
    encs = [gpucrypt.encrypt_tensor(x.copy(), key), gpucrypt.encrypt_tensor(x.copy(), key, inplace=True),
            *gpucrypt.encrypt_tensors({"a": x, "b": x * 2}, key).values()]
    for enc in encs:
        blob = pickle.dumps(enc)
        old = PreviousReader(io.BytesIO(blob)).load()
        assert type(old) is Previous and old.nonce == enc.nonce and old._tag == enc.tag
        back = pickle.loads(blob)
        assert gpucrypt.decrypt_tensor(back, key).tobytes() == \
            gpucrypt.decrypt_tensor(enc, key, inplace=False).tobytes()
