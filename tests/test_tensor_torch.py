"""gpucrypt.tensor with PyTorch (CPU tensors here; CUDA and CuPy under the ``gpu`` marker).

Every dtype torch offers round-trips bit for bit (bfloat16, float8, complex32 included:
they are viewed as bytes by torch itself), the ciphertext equals ``cryptography``'s AEAD
over the tensor's bytes and the documented associated data, and the README example
(docs/TENSOR_FORMAT.md) runs as written.
"""
from __future__ import annotations

import contextlib
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

import gpucrypt
from gpucrypt import EncryptedTensor

torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install 'gpucrypt[torch]')")

from _reference import (check_tensor_is_reference_aead, hand_metadata,  # noqa: E402
                        reference_seal, require_gpu_backend)
from _outside_simulator import assert_gpu_call_refused_outside_simulator  # noqa: E402

DTYPE_NAMES = ["bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
               "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
               "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
               "float8_e8m0fnu", "float4_e2m1fn_x2"]
DTYPES = [pytest.param(n, marks=pytest.mark.skipif(not hasattr(torch, n),
                                                   reason=f"torch {torch.__version__} has no {n}"))
          for n in DTYPE_NAMES]


def random_tensor(shape, dtype_name, device="cpu"):
    """Random bit patterns of any dtype (NaNs included), made through uint8."""
    dtype = getattr(torch, dtype_name)
    count = int(np.prod(shape, dtype=np.int64))
    if dtype == torch.bool:
        return (torch.rand(shape) > 0.5).to(device)
    raw = torch.randint(0, 256, (count * dtype.itemsize,), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape).to(device)


def as_bytes(t) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (2, 3, 4)])
def test_every_torch_dtype_roundtrips(dtype, shape):
    key = os.urandom(32)
    t = random_tensor(shape, dtype)
    enc = gpucrypt.encrypt_tensor(t, key)
    assert enc.dtype == dtype and enc.shape == shape and enc.framework == "torch"
    assert isinstance(enc.ciphertext, torch.Tensor) and enc.ciphertext.dtype == torch.uint8
    y = gpucrypt.decrypt_tensor(enc, key)
    assert isinstance(y, torch.Tensor) and y.dtype == t.dtype and tuple(y.shape) == shape
    assert y.device == t.device and as_bytes(y) == as_bytes(t)
    z = gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(enc.to_bytes()), key)
    assert isinstance(z, torch.Tensor) and z.dtype == t.dtype and as_bytes(z) == as_bytes(t)
    original = as_bytes(t)
    enc = gpucrypt.encrypt_tensor(t, key, inplace=True)
    assert gpucrypt.decrypt_tensor(enc, key) is t
    assert as_bytes(t) == original
    # a batch's results, which take their own route (read by address, made positionally)
    [enc] = gpucrypt.encrypt_tensors([t], key)
    assert isinstance(enc.ciphertext, torch.Tensor) and enc.ciphertext.dtype == torch.uint8
    assert as_bytes(enc.ciphertext) + enc.tag == ChaCha20Poly1305(key).encrypt(
        enc.nonce, original, enc.associated_data())
    [y] = gpucrypt.decrypt_tensors([EncryptedTensor.from_bytes(enc.to_bytes())], key)
    assert isinstance(y, torch.Tensor) and y.dtype == t.dtype and as_bytes(y) == original
    [enc] = gpucrypt.encrypt_tensors([t], key, inplace=True)
    [back] = gpucrypt.decrypt_tensors([enc], key)  # no view of the ciphertext made: by address
    assert back is t and as_bytes(t) == original
    [enc] = gpucrypt.encrypt_tensors([t], key, inplace=True)
    assert as_bytes(enc.ciphertext) + enc.tag == ChaCha20Poly1305(key).encrypt(
        enc.nonce, original, enc.associated_data())
    [back] = gpucrypt.decrypt_tensors([enc], key)
    assert back is t and as_bytes(t) == original


@pytest.mark.parametrize("algorithm,key_len", [("chacha20-poly1305", 32), ("aes-gcm", 32),
                                               ("aes-gcm", 16), ("xchacha20-poly1305", 32)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float8_e4m3fn", "float32"])
def test_torch_ciphertext_is_the_reference_aead(algorithm, key_len, dtype):
    t = random_tensor((4, 5), dtype)
    check_tensor_is_reference_aead(t, framework="torch", dtype=dtype, shape=(4, 5),
                                   nbytes=t.numel() * t.element_size(), algorithm=algorithm,
                                   key=os.urandom(key_len), as_bytes=as_bytes)


def test_torch_metadata_tampering_fails():
    key = os.urandom(32)
    t = random_tensor((2, 4), "bfloat16")
    for field, value in [("dtype", "float16"), ("dtype", "int16"), ("shape", (4, 2)),
                         ("framework", "numpy"), ("algorithm", "xchacha20-poly1305"),
                         ("shape", ()), ("shape", (2**40,)), ("shape", (-2, -4)),
                         ("dtype", "float32"), ("dtype", "bool"), ("nbytes", 32)]:
        enc = gpucrypt.encrypt_tensor(t, key)
        setattr(enc, field, value)
        if field == "algorithm":
            enc.nonce = enc.nonce + bytes(12)
        with pytest.raises(InvalidTag):
            gpucrypt.decrypt_tensor(enc, key)


@pytest.mark.parametrize("count", [16, 2 * 1024 * 1024])   # 8 MiB: not the one-tensor path
@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_an_in_place_result_whose_framework_was_edited_fails(framework, count):
    """An in-place result records the framework of the tensor it was made from; edited,
    decryption fails (InvalidTag) and leaves the ciphertext where it is, whatever the
    size, and to_bytes() writes the bytes that are there, which then fail too. The
    memory is read as what it is (a NumPy array or a torch tensor), never as the edited
    framework's."""
    key = os.urandom(32)
    values = np.arange(count, dtype=np.float32)
    x = torch.from_numpy(values.copy()) if framework == "torch" else values.copy()
    memory = x.numpy() if framework == "torch" else x
    enc = gpucrypt.encrypt_tensor(x, key, inplace=True)
    sealed = memory.tobytes()
    enc.framework = "numpy" if framework == "torch" else "torch"
    with pytest.raises(InvalidTag):
        gpucrypt.decrypt_tensor(enc, key)
    with pytest.raises(InvalidTag) as info:
        gpucrypt.decrypt_tensors({"t": enc}, key)
    assert info.value.failed == ["t"] and memory.tobytes() == sealed
    blob = enc.to_bytes()
    assert sealed in blob and np.asarray(enc.ciphertext).tobytes() == sealed
    with pytest.raises(InvalidTag):
        gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(blob), key)
    enc.framework = framework  # put back: nothing was spent
    assert gpucrypt.decrypt_tensor(enc, key) is x and memory.tobytes() == values.tobytes()


def test_non_contiguous_and_lazy_views():
    key = os.urandom(32)
    t = torch.randn(4, 6)
    with pytest.raises(ValueError, match="contiguous"):
        gpucrypt.encrypt_tensor(t.T, key)
    enc = gpucrypt.encrypt_tensor(t.T, key, contiguous=True)
    assert torch.equal(gpucrypt.decrypt_tensor(enc, key), t.T)
    c = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(ValueError):
        gpucrypt.encrypt_tensor(c.conj(), key)      # memory holds c, the values are conj(c)
    enc = gpucrypt.encrypt_tensor(c.conj(), key, contiguous=True)
    assert torch.equal(gpucrypt.decrypt_tensor(enc, key), c.conj())


def _without_memory(kind: str):
    if kind == "wrapper":  # what DTensor, torchao's and FSDP2's tensors are made like
        from torch.testing._internal.two_tensor import TwoTensor

        return TwoTensor(torch.arange(8.0), torch.zeros(8))
    if kind == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            return torch.arange(8.0)
    return torch._efficientzerotensor(8)


class _DispatchingWithStorage(torch.Tensor):
    """A subclass with __torch_dispatch__ over memory of its own (made by _make_subclass):
    its address is its values'."""

    @staticmethod
    def __new__(cls, elem):
        return torch.Tensor._make_subclass(cls, elem)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        def plain(t):
            return t.as_subclass(torch.Tensor) if isinstance(t, cls) else t

        tree_map = torch.utils._pytree.tree_map
        return func(*tree_map(plain, args), **tree_map(plain, kwargs or {}))


def test_subclasses_with_memory_of_their_own_and_empty_ones_are_encrypted():
    """The refusal of tensors without memory of their own first took every subclass that
    dispatches to Python, and empty ones: one with storage of its own, and a 0-element
    wrapper, were refused though they round-trip."""
    key = os.urandom(32)
    values = torch.arange(64.0)
    x = _DispatchingWithStorage(values.clone())
    back = gpucrypt.decrypt_tensor(gpucrypt.encrypt_tensor(x, key), key)
    assert torch.equal(back.as_subclass(torch.Tensor), values)
    gpucrypt.encrypt_tensors({"x": x}, key, inplace=True)
    import ctypes  # (its own ops on it dispatch back to it)

    assert ctypes.string_at(x.data_ptr(), 256) != values.numpy().tobytes()
    from torch.testing._internal.two_tensor import TwoTensor

    empty = TwoTensor(torch.empty(0), torch.empty(0))
    assert gpucrypt.decrypt_tensor(gpucrypt.encrypt_tensor(empty, key), key).numel() == 0


@pytest.mark.parametrize("kind", ["wrapper", "fake", "zero"])
def test_tensors_without_memory_of_their_own_are_refused(kind):
    """Such tensors report a storage of the right size at data_ptr() 0: out of place
    their "ciphertext" was read from address 0 (the result could never be decrypted),
    in place the process died writing there, after sealing the batch's earlier entries.
    ValueError, naming what to encrypt instead, before anything is written."""
    key = os.urandom(32)
    x = _without_memory(kind)
    with pytest.raises(ValueError, match=r"no memory of its own.*to_local\(\)"):
        gpucrypt.encrypt_tensor(x, key)
    for inplace in (False, True):
        before = torch.arange(300.0)
        state = {"a": before.clone(), "x": x, "b": torch.ones(5)}
        with pytest.raises(ValueError, match="no memory of its own"):
            gpucrypt.encrypt_tensors(state, key, inplace=inplace)
        assert torch.equal(state["a"], before) and torch.equal(state["b"], torch.ones(5))
    enc = gpucrypt.encrypt_tensor(torch.arange(8.0), key)
    with pytest.raises(ValueError, match="no memory of its own"):
        gpucrypt.decrypt_tensor(enc, key, out=_without_memory(kind))


def test_layouts_without_one_block_of_values_are_value_errors():
    """A jagged nested tensor (AttributeError) and an MKLDNN one (NotImplementedError,
    RuntimeError) took the small tensors' fast path, past the adapter's refusal."""
    key = os.urandom(32)
    jagged = torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(4, 3)], layout=torch.jagged)
    for x in (jagged, torch.ones(4).to_mkldnn()):
        for encrypt in (lambda: gpucrypt.encrypt_tensor(x, key),
                        lambda: gpucrypt.encrypt_tensors({"x": x}, key, inplace=True)):
            with pytest.raises(ValueError, match="no single block of values"):
                encrypt()


def test_parameter_requiring_grad_inplace():
    key = os.urandom(32)
    layer = torch.nn.Linear(3, 2)
    before = layer.weight.detach().clone()
    enc = gpucrypt.encrypt_tensor(layer.weight, key, inplace=True)
    assert not torch.equal(layer.weight.detach(), before)
    gpucrypt.decrypt_tensor(enc, key, out=layer.weight)
    assert torch.equal(layer.weight.detach(), before) and layer.weight.requires_grad


def test_failed_inplace_decrypt_leaves_ciphertext():
    key = os.urandom(32)
    t = random_tensor((64,), "float16")
    enc = gpucrypt.encrypt_tensor(t, key, inplace=True)
    cipher = as_bytes(t)
    with pytest.raises(InvalidTag):
        gpucrypt.decrypt_tensor(enc, os.urandom(32))
    assert as_bytes(t) == cipher


def test_state_dict_batch_names_and_failures():
    key = os.urandom(32)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    sd = model.state_dict()
    encs = gpucrypt.encrypt_tensors(sd, key)
    assert type(encs) is type(sd) and list(encs) == list(sd)
    encs["0.bias"]._tag = bytes(16)
    with pytest.raises(InvalidTag, match="0.bias") as info:
        gpucrypt.decrypt_tensors(encs, key)
    assert info.value.failed == ["0.bias"]


def test_readme_example_runs():
    """The example at the top of docs/TENSOR_FORMAT.md, run as written."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "TENSOR_FORMAT.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "TENSOR_FORMAT.md", "exec"), namespace)
    assert isinstance(namespace["encrypted"], dict)


# ------------------------------------------------------------------ real GPU only
@pytest.mark.gpu
def test_torch_cuda_roundtrip_inplace_and_batch():
    key = os.urandom(32)
    dev = "cuda"
    t = random_tensor((33, 17), "bfloat16", dev)
    enc = gpucrypt.encrypt_tensor(t, key)
    assert enc.on_device and enc.ciphertext.device.type == "cuda"
    aad = hand_metadata(algorithm="chacha20-poly1305", framework="torch", dtype="bfloat16",
                        shape=(33, 17), nbytes=t.numel() * 2)
    assert as_bytes(enc.ciphertext) + enc.tag == ChaCha20Poly1305(key).encrypt(enc.nonce,
                                                                               as_bytes(t), aad)
    y = gpucrypt.decrypt_tensor(enc, key)
    assert y.device == t.device and y.dtype == t.dtype and as_bytes(y) == as_bytes(t)
    original = as_bytes(t)
    enc = gpucrypt.encrypt_tensor(t, key, inplace=True, algorithm="aes-gcm")
    assert gpucrypt.decrypt_tensor(enc, key) is t and as_bytes(t) == original
    sd = torch.nn.Linear(64, 32).cuda().state_dict()
    ref = {n: v.clone() for n, v in sd.items()}
    encs = gpucrypt.encrypt_tensors(sd, key, inplace=True)
    blobs = {n: e.to_bytes() for n, e in encs.items()}
    gpucrypt.decrypt_tensors(encs, key)
    assert all(torch.equal(sd[n], ref[n]) for n in sd)
    host = gpucrypt.decrypt_tensors({n: EncryptedTensor.from_bytes(b) for n, b in blobs.items()},
                                    key, device="cpu")
    assert all(host[n].device.type == "cpu" and torch.equal(host[n], ref[n].cpu()) for n in sd)


def _launch_streams(monkeypatch) -> list:
    """Spy on the GPU backend's batch calls: the raw handle of each launch stream."""
    from gpucrypt.tensors._frameworks import stream_handle
    from gpucrypt.backends import get_backend

    gpu, seen = get_backend("gpu"), []
    for name in ("seal_batch", "open_batch"):
        real = getattr(gpu, name)

        def spy(*args, _real=real, **kw):
            seen.append(stream_handle(kw.get("stream")))
            return _real(*args, **kw)

        monkeypatch.setattr(gpu, name, spy)
    return seen


@pytest.mark.gpu
def test_torch_cuda_uses_the_given_stream(monkeypatch):
    key = os.urandom(32)
    s = torch.cuda.Stream()
    seen = _launch_streams(monkeypatch)
    with torch.cuda.stream(s):
        t = random_tensor((1 << 16,), "float32", "cuda")
        enc = gpucrypt.encrypt_tensor(t, key)
        y = gpucrypt.decrypt_tensor(enc, key)
    s.synchronize()
    assert as_bytes(y) == as_bytes(t)
    assert seen == [s.cuda_stream, s.cuda_stream]  # torch's current stream, both launches


def test_torch_allocation_stream_names_the_streams_device(monkeypatch):
    """A foreign stream handle (CuPy, numba, int) becomes a torch ExternalStream of the
    tensor's own device, made current only for the allocation; nothing for None or the
    host. (Fakes stand in for torch.cuda, which a CPU build cannot run.)"""
    from gpucrypt.tensors import _frameworks as fw

    calls = []
    monkeypatch.setattr(torch.cuda, "ExternalStream",
                        lambda handle, device=None: calls.append((handle, device)) or "external")
    monkeypatch.setattr(torch.cuda, "stream",
                        lambda s: calls.append(("current", s)) or contextlib.nullcontext())
    adapter = fw.BY_NAME["torch"]
    with adapter.allocation_stream(1234, ("cuda", 1)):
        pass
    assert calls == [(1234, torch.device("cuda", 1)), ("current", "external")]
    calls.clear()
    with adapter.allocation_stream(None, ("cuda", 1)), adapter.allocation_stream(1234, fw.HOST):
        pass
    assert calls == []


@pytest.mark.gpu
def test_torch_cuda_explicit_side_stream(monkeypatch):
    """stream= names a side stream while the default one is current: the work and the
    outputs belong to it, the side stream waits for the inputs made on the default one
    (nothing here synchronises before the call), the inputs are recorded as used on the
    side stream (torch's caching allocator), and the results are right once it is
    synchronised."""
    key = os.urandom(32)
    side = torch.cuda.Stream()
    t = random_tensor((1 << 18,), "float16", "cuda")
    expected = as_bytes(t)
    b = t[:1000].clone()   # a copy queued on the default stream, not waited for
    seen = _launch_streams(monkeypatch)
    recorded, record = [], torch.Tensor.record_stream

    def record_stream(self, stream):
        recorded.append((self.data_ptr(), stream.cuda_stream))
        return record(self, stream)
    monkeypatch.setattr(torch.Tensor, "record_stream", record_stream)
    encs = gpucrypt.encrypt_tensors({"a": t, "b": b}, key, stream=side)
    assert {(t.data_ptr(), side.cuda_stream), (b.data_ptr(), side.cuda_stream)} <= set(recorded)
    back = gpucrypt.decrypt_tensors(encs, key, stream=side)
    side.synchronize()
    assert as_bytes(back["a"]) == expected and as_bytes(back["b"]) == expected[:2000]
    assert seen == [side.cuda_stream, side.cuda_stream]  # one batch each way, on side


@pytest.mark.gpu
def test_cupy_roundtrip():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    key = os.urandom(16)
    x = cupy.arange(1000, dtype=cupy.float32).reshape(10, 100)
    enc = gpucrypt.encrypt_tensor(x, key, algorithm="aes-gcm")
    aad = hand_metadata(algorithm="aes-gcm", framework="cupy", dtype="float32", shape=(10, 100),
                        nbytes=4000)
    assert cupy.asnumpy(enc.ciphertext).tobytes() + enc.tag == AESGCM(key).encrypt(
        enc.nonce, cupy.asnumpy(x).tobytes(), aad)
    y = gpucrypt.decrypt_tensor(enc, key)
    assert isinstance(y, cupy.ndarray) and bool((y == x).all())
    enc = gpucrypt.encrypt_tensor(x, key, algorithm="aes-gcm", inplace=True)
    assert gpucrypt.decrypt_tensor(enc, key) is x
    assert bool((x == cupy.arange(1000, dtype=cupy.float32).reshape(10, 100)).all())
    blob = gpucrypt.encrypt_tensor(x, key, algorithm="aes-gcm").to_bytes()
    host = gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(blob), key)   # CuPy-made, on the CPU
    assert isinstance(host, np.ndarray) and np.array_equal(host, cupy.asnumpy(x))


# ------------------------------------------------------------------ from a review of the API
def test_a_decrypt_batch_that_would_write_over_its_own_entries_is_refused():
    """One in-place result twice (two threads decrypting one memory at once: bytes that
    were neither released as verified), out= naming one tensor twice, or out= on another
    entry's in-place ciphertext: refused before anything is written, everything intact."""
    key = os.urandom(32)
    big = torch.arange(3 << 18, dtype=torch.int32)  # 3 MiB: large enough for the thread pool
    plain = big.clone()
    enc = gpucrypt.encrypt_tensor(big, key, inplace=True)
    ciphertext = big.clone()
    with pytest.raises(ValueError, match="would write where the other's"):
        gpucrypt.decrypt_tensors([enc, enc], key)
    assert torch.equal(big, ciphertext) and not enc._consumed[0]
    a, b = torch.arange(4.0), torch.arange(4.0) + 4
    ea = gpucrypt.encrypt_tensor(a, key, inplace=True)
    eb = gpucrypt.encrypt_tensor(b, key, inplace=True)
    b_ct = b.clone()
    with pytest.raises(ValueError, match="would write where the other's"):
        gpucrypt.decrypt_tensors([ea, eb], key, out=[b, None])  # a's plaintext over b's ct
    # as bytes: b holds ciphertext, whose float32 values are NaN now and then (NaN != NaN)
    assert torch.equal(b.view(torch.uint8), b_ct.view(torch.uint8))
    x, y = torch.arange(4.0), torch.arange(4.0) + 4
    ex, ey = gpucrypt.encrypt_tensor(x, key), gpucrypt.encrypt_tensor(y, key)
    target = torch.empty(4)
    with pytest.raises(ValueError, match="would write where the other's"):
        gpucrypt.decrypt_tensors([ex, ey], key, out=[target, target])
    # what stays allowed: one result decrypted twice into new tensors, each its own out=
    first, second = gpucrypt.decrypt_tensors([ex, ex], key)
    assert torch.equal(first, x) and torch.equal(second, x) and first.data_ptr() != second.data_ptr()
    outs = [torch.empty(4), torch.empty(4)]
    assert all(r is o for r, o in zip(gpucrypt.decrypt_tensors([ex, ey], key, out=outs), outs))
    assert torch.equal(outs[1], y)
    assert torch.equal(gpucrypt.decrypt_tensor(enc, key), plain)


def test_out_on_the_ciphertexts_own_memory_spends_the_result():
    """out= exactly on a result's own ciphertext memory, through another object
    (model.state_dict() and named_parameters() make new tensor objects on the model's
    memory, .numpy() another framework's): decrypted in place in effect, so the result is
    spent (its to_bytes() would otherwise carry the plaintext as ciphertext); out='s own
    checks still hold (a view of another dtype or shape is refused), and the results are
    the out= objects."""
    key = os.urandom(32)
    for outs_of in (lambda m: m.state_dict(), lambda m: dict(m.named_parameters()),
                    lambda m: {k: v.detach().numpy() for k, v in m.state_dict().items()}):
        model = torch.nn.Linear(64, 64)
        plain = {k: v.detach().clone() for k, v in model.state_dict().items()}
        encs = gpucrypt.encrypt_tensors(model.state_dict(), key, inplace=True)
        outs = outs_of(model)
        with torch.no_grad():
            back = gpucrypt.decrypt_tensors(encs, key, out=outs)
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, plain[name]) and back[name] is outs[name]
            with pytest.raises(ValueError, match="decrypted in place"):
                encs[name].to_bytes()
    x = torch.arange(12.0).reshape(3, 4)
    enc = gpucrypt.encrypt_tensor(x, key, inplace=True)
    ciphertext = x.clone()
    for wrong in (x.t(), x.view(torch.int32), x.view(torch.uint8)):
        with pytest.raises(ValueError):
            gpucrypt.decrypt_tensor(enc, key, out=wrong)
        assert torch.equal(x.view(torch.uint8), ciphertext.view(torch.uint8))


def test_a_shallow_copy_is_spent_with_its_original():
    """A shallow copy names the same ciphertext memory as its original: decrypting it in
    place through either spends both (the copy's to_bytes() would otherwise serialise the
    plaintext), for in-place results and for a new result's own array (over 64 KiB, or
    from a batch, or from_bytes of a bytearray)."""
    import copy

    key = os.urandom(32)
    x = torch.arange(16.0)
    enc = gpucrypt.encrypt_tensor(x, key, inplace=True)
    twin = copy.copy(enc)
    assert gpucrypt.decrypt_tensor(twin, key) is x and torch.equal(x, torch.arange(16.0))
    for spent in (enc, twin):
        with pytest.raises(ValueError, match="decrypted in place"):
            spent.to_bytes()
    big = torch.arange(32 << 10, dtype=torch.float32)  # 128 KiB: an array, not OpenSSL's bytes
    for new in (gpucrypt.encrypt_tensor(big, key), gpucrypt.encrypt_tensors([big], key)[0],
                EncryptedTensor.from_bytes(bytearray(gpucrypt.encrypt_tensor(big, key).to_bytes()))):
        twin = copy.copy(new)
        assert torch.equal(torch.as_tensor(gpucrypt.decrypt_tensor(new, key, inplace=True)), big)
        with pytest.raises(ValueError, match="decrypted in place"):
            twin.to_bytes()
    deep = copy.deepcopy(gpucrypt.encrypt_tensor(x, key, inplace=True))  # memory of its own
    assert torch.equal(gpucrypt.decrypt_tensor(deep, key), torch.arange(16.0))


def test_nonce_sequences_refuse_copies_and_bad_counts():
    import copy
    import pickle

    seq = gpucrypt.NonceSequence(prefix=b"\x01")
    for attempt in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="same nonces again"):
            attempt(seq)
    for bad, error in ((1.5, TypeError), (True, TypeError), (-1, ValueError)):
        with pytest.raises(error):
            seq.take(bad)
    assert seq.take(np.int64(2)) == [b"\x01" + i.to_bytes(11, "big") for i in (0, 1)]
    assert seq.next() == b"\x01" + (2).to_bytes(11, "big")  # still counting, as an int


def test_forged_metadata_is_refused_by_from_bytes_or_fails_to_verify():
    """from_bytes parses bytes no tag has checked yet: names that are not what an
    encryption writes, or dimensions no framework has, are refused there; a result this
    process cannot make is decrypted into bytes all the same, so altered metadata is
    InvalidTag on every path, not a framework's error."""
    from gpucrypt.tensors.api import _FIXED

    key = os.urandom(32)
    blob = bytearray(gpucrypt.encrypt_tensor(np.zeros(0, dtype=np.float32), key).to_bytes())

    def forged(framework_code=None, dtype=None, shape=None):
        fields = list(_FIXED.unpack_from(blob))
        ndim, dtype_len = fields[4], fields[5]
        tail = blob[_FIXED.size:]
        old_shape, rest = tail[:8 * ndim], tail[8 * ndim:]
        old_dtype, rest = rest[:dtype_len], rest[dtype_len:]
        if framework_code is not None:
            fields[3] = framework_code
        new_dtype = old_dtype if dtype is None else dtype.encode()
        new_shape = old_shape if shape is None else struct.pack(f"<{len(shape)}Q", *shape)
        fields[4], fields[5] = len(new_shape) // 8, len(new_dtype)
        return bytes(_FIXED.pack(*fields) + new_shape + new_dtype + rest)

    from gpucrypt.tensors import _frameworks as fw

    torch_code = fw.FRAMEWORK_CODES["torch"]
    for bad, why in ((forged(torch_code, dtype="numpy:<f4"), "canonical"),
                     (forged(dtype="numpy:<f4"), "canonical"),
                     (forged(dtype="numpy:|b1", shape=(0,)), "canonical"),
                     (forged(shape=(0, 2**63)), "2\\*\\*63"),
                     (forged(torch_code, shape=(0, 2**64 - 1)), "2\\*\\*63")):
        with pytest.raises(ValueError, match=why):
            EncryptedTensor.from_bytes(bad)
    for bad in (forged(shape=(0, 2**62)), forged(torch_code, shape=(0, 2**62)),
                forged(torch_code, dtype="complex32", shape=(0,))):
        enc = EncryptedTensor.from_bytes(bad)
        for decrypt in (lambda e: gpucrypt.decrypt_tensor(e, key),
                        lambda e: gpucrypt.decrypt_tensors([e], key)[0]):
            with pytest.raises(InvalidTag):
                decrypt(enc)


def test_containers_come_back_as_they_went_in():
    import collections

    key = os.urandom(32)
    counter = collections.Counter({"a": torch.arange(3.0)})
    back = gpucrypt.decrypt_tensors(gpucrypt.encrypt_tensors(counter, key), key)
    assert type(back) is collections.Counter and list(back) == ["a"]
    assert torch.equal(back["a"], torch.arange(3.0))


def test_tensors_without_one_block_of_values_are_refused_with_what_to_do():
    import warnings

    key = os.urandom(32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors are a prototype
        nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    for x in (torch.eye(3).to_sparse_csr(), torch.eye(3).to_sparse(), nested):
        for call in (lambda: gpucrypt.encrypt_tensor(x, key),
                     lambda: gpucrypt.encrypt_tensors([x], key)):
            with pytest.raises(ValueError, match="no single block of values.*to_dense"):
                call()


def test_a_gpu_decrypt_without_cuda_torch_says_so():
    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA: the refusal is for CPU-only builds")
    key = os.urandom(32)
    enc = gpucrypt.encrypt_tensor(torch.arange(4.0), key)
    with pytest.raises(ValueError, match="this torch has no CUDA device.*give a host out="):
        gpucrypt.decrypt_tensor(enc, key, device="gpu")


def test_out_of_memory_is_reported_as_it_is(monkeypatch):
    """torch's OutOfMemoryError is a RuntimeError, which a framework also raises for a
    tensor it cannot make (decrypted into bytes then, and reported as a ValueError): a
    memory shortage is not that, and comes out as itself, on both paths."""
    from gpucrypt.tensors import _frameworks as fw
    from gpucrypt.tensors import api

    key = os.urandom(32)
    enc = gpucrypt.encrypt_tensor(torch.arange(8.0), key)

    class Exhausted:
        def new_empty(self, *shape):
            raise torch.OutOfMemoryError("out of memory (simulated)")

    monkeypatch.setitem(api._TORCH_CPU_EMPTY, torch.float32, Exhausted())
    with pytest.raises(torch.OutOfMemoryError):
        gpucrypt.decrypt_tensor(enc, key)
    monkeypatch.undo()  # the batch path's own allocation next, not the one-tensor path's
    calls = []

    def empty(self, dtype, shape, place):
        calls.append(shape)
        raise torch.OutOfMemoryError("out of memory (simulated)")

    monkeypatch.setattr(fw.TorchAdapter, "empty", empty)
    with pytest.raises(torch.OutOfMemoryError):
        gpucrypt.decrypt_tensors([enc], key)
    assert calls, "the batch path's allocation was not reached"


# ----------------------------------------------------------------------------- read-only memory
_READ_ONLY_CHILD = r'''
import ctypes, mmap, os, sys, warnings
import numpy as np
import torch
import gpucrypt

warnings.simplefilter("ignore")  # torch warns that it makes tensors over read-only arrays
key, path = os.urandom(32), sys.argv[1]


def refused(call):
    try:
        call()
    except ValueError as exc:
        assert "read-only" in str(exc), exc
    else:
        raise AssertionError("not refused")


np.arange(4096, dtype=np.float32).tofile(path)  # 16 KiB, four pages
ro = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="r"))
plain = ro.clone()
for x in (ro, ro[1000:1010]):  # in place: the one-tensor path, batches, a host tensor on the GPU
    refused(lambda: gpucrypt.encrypt_tensor(x, key, inplace=True))
    refused(lambda: gpucrypt.encrypt_tensors({"w": x}, key, inplace=True))
    refused(lambda: gpucrypt.encrypt_tensors([x], key, inplace=True, device="gpu"))
# a batch's tensors are probed together: writable ones whose storage NumPy saw (so no
# longer resizable, and probed) around the read-only one; none is touched
others = [torch.arange(1000 * i, 1000 * i + 600, dtype=torch.float32) for i in range(700)]
[t.numpy() for t in others]
kept = [t.clone() for t in others]
for batch in ({**{f"a{i}": t for i, t in enumerate(others[:600])}, "ro": ro,
               **{f"b{i}": t for i, t in enumerate(others[600:])}}, others[:5] + [ro]):
    try:
        gpucrypt.encrypt_tensors(batch, key, inplace=True)
    except ValueError as exc:
        assert "read-only" in str(exc) and ("'ro'" in str(exc) or "'5'" in str(exc)), exc
    else:
        raise AssertionError("not refused")
    assert all(torch.equal(a, b) for a, b in zip(others, kept))
enc = gpucrypt.encrypt_tensor(plain, key)
refused(lambda: gpucrypt.decrypt_tensor(enc, key, out=ro))
refused(lambda: gpucrypt.decrypt_tensors([enc], key, out=[ro]))
assert torch.equal(ro, plain) and gpucrypt.encrypt_tensor(ro, key).nbytes == ro.nbytes

# memory mapped read-only after it was encrypted in place: the in-place decrypt is refused
# (one tensor and a batch), and goes through once the memory is writable again
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
area = mmap.mmap(-1, 1 << 16)
for batch in (False, True):
    t = torch.frombuffer(area, dtype=torch.float32)
    t.copy_(torch.arange(t.numel(), dtype=torch.float32))
    before = t.clone()
    enc = gpucrypt.encrypt_tensors([t], key, inplace=True)[0] if batch else \
        gpucrypt.encrypt_tensor(t, key, inplace=True)
    assert libc.mprotect(t.data_ptr(), len(area), mmap.PROT_READ) == 0
    decrypt = (lambda: gpucrypt.decrypt_tensors([enc], key)) if batch else \
        (lambda: gpucrypt.decrypt_tensor(enc, key))
    refused(decrypt)
    assert libc.mprotect(t.data_ptr(), len(area), mmap.PROT_READ | mmap.PROT_WRITE) == 0
    decrypt()
    assert torch.equal(t, before)
    del t
print("ok")
'''


def test_torch_tensors_over_read_only_mappings_are_refused_not_written(tmp_path):
    """torch has no read-only flag, so a tensor over a read-only file mapping
    (torch.from_numpy of np.memmap mode "r") was written in place, or as out=, and the
    process died (SIGSEGV). Refused now with ValueError before anything is written, on
    every path that writes host memory; a mapping made read-only after an in-place
    encrypt is refused by the in-place decrypt. (In a child process: without the check
    it dies.)"""
    import subprocess
    import sys

    child = subprocess.run([sys.executable, "-c", _READ_ONLY_CHILD, str(tmp_path / "ro.bin")],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0 and child.stdout.strip() == "ok", (child.returncode, child.stderr)


def test_torch_tensors_over_memory_torch_was_handed_are_still_written_in_place():
    """Tensors whose memory torch did not allocate (from_numpy, frombuffer of a
    bytearray) are asked whether their memory can be written; writable, they are
    encrypted in place and out= as before."""
    key = os.urandom(32)
    for t in (torch.from_numpy(np.arange(1024, dtype=np.float32)),
              torch.frombuffer(bytearray(os.urandom(64)), dtype=torch.int16)):
        plain = t.clone()
        for encrypted in (lambda: gpucrypt.encrypt_tensor(t, key, inplace=True),
                          lambda: gpucrypt.encrypt_tensors([t], key, inplace=True)[0]):
            enc = encrypted()
            assert not torch.equal(t, plain)
            assert gpucrypt.decrypt_tensor(enc, key) is t and torch.equal(t, plain)
        t.zero_()
        assert gpucrypt.decrypt_tensor(gpucrypt.encrypt_tensor(plain, key), key, out=t) is t
        assert torch.equal(t, plain)


# ----------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("path", ["one", "batch"])
def test_in_place_writes_bump_autograd_versions_so_backward_refuses(path):
    """Encrypting or decrypting in place, and decrypting into out=, changes a tensor's
    values as torch's own in-place ops do, and tells autograd so: a backward pass that
    saved the tensor before raises ("modified by an inplace operation") instead of
    computing gradients from ciphertext."""
    key = os.urandom(32)
    one = path == "one"

    def encrypt(t):
        return gpucrypt.encrypt_tensor(t, key, inplace=True) if one else \
            gpucrypt.encrypt_tensors([t], key, inplace=True)[0]

    def decrypt(enc, out=None):
        if one:
            return gpucrypt.decrypt_tensor(enc, key, out=out)
        return gpucrypt.decrypt_tensors([enc], key, out=None if out is None else [out])[0]

    w = torch.randn(1024, requires_grad=True)
    for write in ("encrypt", "decrypt in place", "out="):
        h = w * 1.0
        if write == "encrypt":
            loss = (h * h).sum()  # saves h
            encrypt(h)
        elif write == "decrypt in place":
            enc = encrypt(h)
            loss = (h * h).sum()
            assert decrypt(enc) is h
        else:
            enc = gpucrypt.encrypt_tensor(torch.randn(1024), key)
            loss = (h * h).sum()
            assert decrypt(enc, out=h) is h
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
    # tensors made under inference_mode have no version counter: still fine
    with torch.inference_mode():
        t = torch.arange(8.0)
    assert torch.equal(decrypt(encrypt(t)), torch.arange(8.0))


def test_decrypting_on_a_gpu_where_none_runs_is_backend_unavailable(tmp_path):
    """decrypt_tensor(..., device="gpu") said ValueError ("this torch has no CUDA device")
    where encrypt_tensor(..., device="gpu") says BackendUnavailable: a fallback catching the
    one missed the other. Outside the simulator, on a machine without a GPU."""
    assert_gpu_call_refused_outside_simulator(
        "import torch, gpucrypt\n"
        "enc = gpucrypt.encrypt_tensor(torch.ones(4), b'k' * 32)",
        "gpucrypt.decrypt_tensor(enc, b'k' * 32, device='gpu')", tmp_path)


def test_pickling_an_in_place_result_writes_its_ciphertext_alone():
    """An in-place result's ciphertext is the caller's tensor; pickled (pickle, torch.save)
    as it was, a view wrote its whole storage: the plaintext of the tensors beside it (q
    of a fused qkv, a flat parameter's other entries) and the tensor's Python attributes.
    Exactly its ciphertext's bytes are pickled now, and what comes back is an ordinary
    out-of-place result; the original is still in place."""
    import io
    import pickle

    key = os.urandom(32)
    secret = b"PLAINTEXT-BESIDE" * 64

    def storage(head: bytes):
        return torch.frombuffer(bytearray(head + secret), dtype=torch.uint8).clone()

    def pickled(obj) -> list[bytes]:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return [pickle.dumps(obj), buf.getvalue()]

    qkv = storage(bytes(range(256)))
    q = qkv[:256]
    q.note = "PLAINTEXT-ATTRIBUTE"  # a Python attribute on the tensor
    enc = gpucrypt.encrypt_tensor(q, key, inplace=True, name="q")
    for blob in pickled(enc):
        assert secret not in blob and b"PLAINTEXT-ATTRIBUTE" not in blob
    again = pickle.loads(pickle.dumps(enc))
    assert not again.inplace and again.ciphertext.nbytes == 256
    assert again.ciphertext.untyped_storage().nbytes() == 256
    assert torch.equal(gpucrypt.decrypt_tensor(again, key), torch.arange(256, dtype=torch.uint8))
    assert gpucrypt.decrypt_tensor(enc, key) is q and torch.equal(q, torch.arange(256, dtype=torch.uint8))
    # a state dict of views of one flat buffer, whose end is in no entry
    flat = storage(bytes(512))
    encs = gpucrypt.encrypt_tensors({"w": flat[:256], "b": flat[256:512]}, key, inplace=True)
    for blob in pickled(encs):
        assert secret not in blob
    back = gpucrypt.decrypt_tensors(torch.load(io.BytesIO(pickled(encs)[1]), weights_only=False), key)
    assert all(torch.equal(v, torch.zeros(256, dtype=torch.uint8)) for v in back.values())
    assert encs["w"].inplace and gpucrypt.decrypt_tensors(encs, key)["w"] is not None


@pytest.mark.parametrize("make", [lambda: torch.zeros(0), lambda: torch.zeros(3, 0),
                                  lambda: torch.arange(16.0)[4:12]],
                         ids=["empty", "empty 2-D", "view of a larger storage"])
def test_a_copy_of_an_in_place_result_decrypts_in_place(make):
    """A deep copy or a pickle of an in-place result holds its ciphertext alone, in memory
    of its own, and decrypts in place into it. NumPy copies an empty array with stride 0,
    which torch keeps and its views as another dtype refuse: a copy of an empty tensor's
    result (and a copy of such a copy) raised RuntimeError there."""
    import copy
    import pickle

    key = os.urandom(32)
    x = make()
    enc = gpucrypt.encrypt_tensor(x.clone(), key, inplace=True)
    copies = [copy.deepcopy(enc), pickle.loads(pickle.dumps(enc))]
    again = copy.deepcopy(enc)
    assert torch.equal(gpucrypt.decrypt_tensor(again, key), x)  # its ciphertext is read now
    copies.append(copy.deepcopy(again))
    for c in copies:
        assert not c.inplace and c.ciphertext.untyped_storage().nbytes() == x.nbytes
        back = gpucrypt.decrypt_tensor(c, key, inplace=True)
        assert back.shape == x.shape and torch.equal(back, x)
    assert torch.equal(gpucrypt.decrypt_tensor(enc, key), x)  # the original: still in place


def _shrunk(t, nbytes=16):
    """``t`` with its storage resized underneath it to ``nbytes``: its shape still says
    more (the storage of a view is its base's)."""
    t.untyped_storage().resize_(nbytes)
    return t


def test_a_tensor_whose_storage_shrank_is_refused_on_every_route(device):
    """device="gpu" and contiguous=True take the adapters' route, through torch's own
    views and copy, which do not check that the storage still holds the tensor: they read
    past the allocation (and, in place on "gpu", wrote past it: heap corruption, abort).
    Refused as the by-address route refuses it, before any tensor of the batch is read or
    written; the check follows the layout, so strided views of a whole storage still go."""
    key = os.urandom(32)
    for call in (lambda x, **kw: gpucrypt.encrypt_tensor(x, key, device=device, **kw),
                 lambda x, **kw: gpucrypt.encrypt_tensors([x], key, device=device, **kw)):
        with pytest.raises(ValueError, match="storage is smaller than the tensor"):
            call(_shrunk(torch.arange(64.0)))
        with pytest.raises(ValueError, match="storage is smaller than the tensor"):
            call(_shrunk(torch.arange(64.0).reshape(8, 8).t()), contiguous=True)
        # 16 elements, 64 bytes, spread over 244: a check of the byte count would pass it
        with pytest.raises(ValueError, match="storage is smaller than the tensor"):
            call(_shrunk(torch.arange(64.0)[::4], 128), contiguous=True)
    good = torch.arange(8.0)
    with pytest.raises(ValueError, match="storage is smaller than the tensor"):
        gpucrypt.encrypt_tensors({"good": good, "bad": _shrunk(torch.arange(64.0))}, key,
                                 inplace=True, device=device)
    assert torch.equal(good, torch.arange(8.0))
    for x in (torch.arange(64.0)[::3], torch.arange(64.0).reshape(8, 8).t()[2:, 1:5],
              torch.ones(1).expand(40)):  # skipping, offset, and repeating (stride 0) views
        enc = gpucrypt.encrypt_tensor(x, key, device=device, contiguous=True)
        assert torch.equal(gpucrypt.decrypt_tensor(enc, key), x)


@pytest.mark.cudasim
@pytest.mark.parametrize("made_by", ["torch", "cupy"])
def test_a_gpu_decrypt_queues_on_the_stream_of_the_framework_it_writes(monkeypatch, made_by):
    """Host ciphertext decrypted into a numba device out=: the launch stream is numba's,
    the framework of the memory written on the device. It was asked of the framework that
    made the ciphertext: torch's "not compiled with CUDA" on a CPU-only torch, CuPy
    imported for a CuPy-made blob (and, where they run, a stream not ordered with out=)."""
    require_gpu_backend()
    from numba import cuda

    from gpucrypt.tensors import _frameworks as fw

    asked = []
    for name, adapter in fw.BY_NAME.items():
        def spy(place, _name=name, _real=adapter.current_stream):
            asked.append(_name)
            return _real(place)

        monkeypatch.setattr(adapter, "current_stream", spy)
    key = os.urandom(32)
    x = torch.arange(10, dtype=torch.int32)
    if made_by == "torch":
        enc = gpucrypt.encrypt_tensor(x, key)
    else:  # as a machine with CuPy writes it (none here, perhaps): from the format itself
        nonce = os.urandom(12)
        meta = hand_metadata(algorithm="chacha20-poly1305", framework="cupy", dtype="int32",
                             shape=(10,), nbytes=40)
        enc = EncryptedTensor.from_bytes(meta + struct.pack("<Q", 0) + nonce + reference_seal(
            "chacha20-poly1305", key, nonce, as_bytes(x), meta))
    assert enc.framework == made_by
    out = cuda.to_device(np.zeros(10, np.int32))
    assert gpucrypt.decrypt_tensor(enc, key, out=out) is out
    assert out.copy_to_host().tobytes() == as_bytes(x)
    assert asked == ["numba"]


@pytest.mark.parametrize("restride,undo", [
    (lambda x: x.t_(), lambda x: x.t_()),
    (lambda x: x.as_strided_((4, 3), (1, 4)), lambda x: x.as_strided_((3, 4), (4, 1)))],
    ids=["t_", "as_strided_"])
def test_an_in_place_result_whose_tensor_was_restrided_since_says_so(device, restride, undo):
    """A tensor encrypted in place, then transposed in place: the same memory, read in
    another order (through a copy), failed as InvalidTag ("a wrong key, or ... changed").
    Refused saying why, nothing decrypted, and decrypted once the change is undone."""
    key = os.urandom(32)
    x = torch.arange(12.0).reshape(3, 4)
    plain = as_bytes(x)
    enc = gpucrypt.encrypt_tensor(x, key, inplace=True)
    sealed = as_bytes(x)
    restride(x)
    for decrypt in (lambda: gpucrypt.decrypt_tensor(enc, key, device=device),
                    lambda: gpucrypt.decrypt_tensors([enc], key, device=device)):
        with pytest.raises(ValueError, match="encrypted in place, and is no longer C-contiguous"
                                             ".*Undo that change.*nothing was decrypted"):
            decrypt()
    undo(x)
    assert as_bytes(x) == sealed  # still the ciphertext, and the result not spent
    assert gpucrypt.decrypt_tensor(enc, key, device=device) is x
    assert as_bytes(x) == plain
