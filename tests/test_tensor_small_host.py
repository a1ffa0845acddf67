"""One small host tensor takes a short path past the batch machinery
(``gpucrypt.tensors.api._encrypt_small_on_host`` / ``_decrypt_small_on_host``). It must
be indistinguishable from the batch path: the same serialised bytes for the same nonce,
the same kinds of results, and the same refusals, whichever path encrypted and whichever
decrypts."""
from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag

import gpucrypt
from gpucrypt import EncryptedTensor
from gpucrypt.tensors import api

torch = pytest.importorskip("torch")

ALGORITHMS = ("chacha20-poly1305", "xchacha20-poly1305", "aes-gcm")
NONCE = {"chacha20-poly1305": 12, "xchacha20-poly1305": 24, "aes-gcm": 12}


def tensors():
    rng = np.random.default_rng(7)
    yield "numpy uint8", rng.integers(0, 256, 4096, dtype=np.uint8)
    yield "numpy float32 2-D", rng.standard_normal((8, 3)).astype(np.float32)
    yield "numpy 0-d", np.array(3.5)
    yield "numpy empty", np.zeros((0, 4), dtype=np.int16)
    yield "torch bfloat16", torch.randn(5, 7).to(torch.bfloat16)
    yield "torch bool", torch.tensor([True, False, True])
    yield "torch requires_grad", torch.randn(6, requires_grad=True)
    # memory read by address or by buffer cast: an offset into a storage, no buffer format
    yield "numpy datetime64", np.arange(5).astype("datetime64[s]")
    yield "numpy big-endian", np.arange(6, dtype=">i4").reshape(2, 3)
    yield "torch row of a matrix", torch.arange(12.0).reshape(3, 4)[2]
    yield "torch empty", torch.zeros(0, 3)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_short_path_matches_the_batch_path(algorithm):
    key = os.urandom(32)
    for label, x in tensors():
        nonce = os.urandom(NONCE[algorithm])
        assert api._small_host_source(x) is not None, label  # the short path is taken
        short = gpucrypt.encrypt_tensor(x, key, algorithm=algorithm, nonce=nonce, name="w",
                                        aad=b"ctx", key_id="k1")
        batch = gpucrypt.encrypt_tensors({"w": x}, key, algorithm=algorithm, nonces=[nonce],
                                         aad=b"ctx", key_id="k1")["w"]
        assert short.to_bytes() == batch.to_bytes(), label
        assert type(short.ciphertext) is type(batch.ciphertext), label
        # either path decrypts what the other made, to the same kind of tensor
        for enc in (short, batch):
            one = gpucrypt.decrypt_tensor(enc, key)
            many = gpucrypt.decrypt_tensors({"w": enc}, key)["w"]
            for back in (one, many):
                assert type(back) is type(x) and back.dtype == x.dtype and back.shape == x.shape
                if isinstance(x, np.ndarray):
                    assert back.tobytes() == x.tobytes(), label
                else:
                    assert torch.equal(back, x.detach()), label


def _memory(x) -> bytes:
    """The bytes in a tensor's memory (for a 0-d or bool tensor too)."""
    if isinstance(x, np.ndarray):
        return x.tobytes()
    return x.detach().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same_tensors(copies: int):
    """``copies`` equal sets of :func:`tensors`, each its own memory."""
    sets = []
    for _ in range(copies):
        torch.manual_seed(3)
        sets.append(list(tensors()))
    return zip(*sets)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_short_path_in_place_matches_the_batch_path(algorithm):
    """In place, the short path leaves the batch path's ciphertext in the tensor and
    serialises to the same bytes. It keeps no byte view of the tensor until one is asked
    for: its open reads the tensor's own memory, a wrong tag leaves the ciphertext there,
    and the right one gives the tensor back."""
    key = os.urandom(32)
    for (label, a), (_, b), (_, c) in _same_tensors(3):
        original = _memory(a)
        nonce = os.urandom(NONCE[algorithm])
        short = gpucrypt.encrypt_tensor(a, key, algorithm=algorithm, nonce=nonce, name="w",
                                        inplace=True)
        assert short._ct is None, label  # no view made: the lazy form is what is tested here
        batch = gpucrypt.encrypt_tensors({"w": b}, key, algorithm=algorithm, nonces=[nonce],
                                         inplace=True)["w"]
        assert _memory(a) == _memory(b), label
        assert short.tag == batch.tag and short.to_bytes() == batch.to_bytes(), label

        enc = gpucrypt.encrypt_tensor(c, key, algorithm=algorithm, nonce=nonce, inplace=True)
        ciphertext, tag = _memory(c), enc.tag
        enc._tag = bytes([tag[0] ^ 1]) + tag[1:]
        with pytest.raises(InvalidTag):
            gpucrypt.decrypt_tensor(enc, key)
        assert _memory(c) == ciphertext and enc._ct is None, label
        enc._tag = tag
        assert gpucrypt.decrypt_tensor(enc, key) is c and _memory(c) == original, label


def test_host_tensor_parts_are_the_adapters_answers():
    """The batch path's shortcut for host tensors describes each one exactly as its
    framework adapter does (name, dtype, shape, bytes), and leaves to the adapters what
    it cannot take as it is (non-contiguous, a NumPy subclass, a negated view)."""
    import math

    from gpucrypt.tensors import _frameworks as fw

    for label, x in tensors():
        adapter = fw.adapter_for(x)
        dtype, shape = adapter.dtype_name(x), adapter.shape(x)
        expected = (adapter.name, dtype, shape, math.prod(shape) * fw.dtype_itemsize(dtype))
        assert api._host_tensor_parts(x) == expected, label
    class Subclass(np.ndarray):
        pass

    for other in (np.arange(12.0).reshape(3, 4)[:, 1], np.eye(2).view(Subclass),
                  torch.arange(12.0).reshape(3, 4).t(), torch.randn(3, dtype=torch.cfloat).conj().imag):
        assert api._host_tensor_parts(other) is None


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_short_path_in_place_and_tamper(algorithm):
    key = os.urandom(32)
    x = torch.arange(1024, dtype=torch.float32)
    original = x.numpy().tobytes()
    enc = gpucrypt.encrypt_tensor(x, key, algorithm=algorithm, inplace=True)
    ciphertext = x.numpy().tobytes()  # as bytes: ciphertext read as floats holds NaNs
    assert ciphertext != original and enc.ciphertext.data_ptr() == x.data_ptr()
    bad = EncryptedTensor.from_bytes(enc.to_bytes())
    bad.shape = (512, 2)  # altered metadata: refused, nothing released
    with pytest.raises(InvalidTag) as info:
        gpucrypt.decrypt_tensor(bad, key)
    assert info.value.failed == [None]
    enc_tag = enc.tag
    enc._tag = bytes([enc_tag[0] ^ 1]) + enc_tag[1:]
    with pytest.raises(InvalidTag):
        gpucrypt.decrypt_tensor(enc, key)  # in place: the tensor keeps its ciphertext
    assert x.numpy().tobytes() == ciphertext
    for short_tag in (enc_tag[:15], enc_tag + b"\0"):
        enc._tag = short_tag
        with pytest.raises(InvalidTag):
            gpucrypt.decrypt_tensor(enc, key, inplace=False)
    enc._tag = enc_tag
    assert gpucrypt.decrypt_tensor(enc, key) is x and x.numpy().tobytes() == original
    with pytest.raises(ValueError, match="decrypted in place"):
        gpucrypt.decrypt_tensor(enc, key)


def test_short_path_refusals_are_the_batch_paths():
    key = os.urandom(32)
    x = np.arange(10, dtype=np.int8)
    with pytest.raises(ValueError, match="device must be"):
        gpucrypt.encrypt_tensor(x, key, device="tpu")
    with pytest.raises(ValueError, match="contiguous=True"):
        gpucrypt.encrypt_tensor(x[::2], key)  # not the short path's: the batch path says why
    readonly = np.frombuffer(bytes(16), dtype=np.uint8)
    with pytest.raises(ValueError, match="writable"):
        gpucrypt.encrypt_tensor(readonly, key, inplace=True)
    with pytest.raises(ValueError, match="32 bytes"):
        gpucrypt.encrypt_tensor(x, bytes(16))
    # a ciphertext of the wrong length is an edited ciphertext: InvalidTag on both paths,
    # as for any other edit (it was the backend's ValueError, "buffer must be 50 bytes",
    # which a batch raised for all its entries, naming none)
    for call in (gpucrypt.decrypt_tensor, lambda e, k: gpucrypt.decrypt_tensors([e], k)):
        enc = gpucrypt.encrypt_tensor(np.arange(100, dtype=np.uint8), key)
        enc._ciphertext = enc._ciphertext[:50].copy()
        with pytest.raises(InvalidTag) as info:
            call(enc, key)
        assert info.value.failed in ([None], ["0"])
    # the batch path's limit for one thread: larger tensors are not the short path's
    assert api._small_host_source(np.zeros(api._HOST_PARALLEL_BYTES, dtype=np.uint8)) is None


def test_torch_views_by_address_follow_the_memory(monkeypatch):
    """The short path remembers byte views of torch memory by (address, length), a
    bounded number of them. Tensors freed and made again at the same addresses with
    other bytes, a matrix and its first row (one address, two lengths), and more tensors
    than are remembered all seal to cryptography's bytes and decrypt back."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    monkeypatch.setattr(api, "_TORCH_VIEWS", {})
    monkeypatch.setattr(api, "_TORCH_VIEWS_MAX", 4)
    key, nonce = os.urandom(32), os.urandom(12)
    reference = ChaCha20Poly1305(key)

    def check(x):
        enc = gpucrypt.encrypt_tensor(x, key, nonce=nonce)
        plain = x.numpy().tobytes()
        expected = reference.encrypt(nonce, plain, enc.associated_data())
        assert enc.ciphertext.numpy().tobytes() + enc.tag == expected
        assert gpucrypt.decrypt_tensor(enc, key).numpy().tobytes() == plain

    addresses = set()
    for i in range(24):  # each round's tensor is freed: torch hands its address out again
        x = torch.randint(0, 256, (1000 + 8 * (i % 6),), dtype=torch.uint8)
        addresses.add(x.data_ptr())
        check(x)
        assert len(api._TORCH_VIEWS) <= 4
    assert len(addresses) < 24  # addresses did come back, with other bytes behind them
    matrix = torch.randint(0, 256, (8, 8), dtype=torch.uint8)
    check(matrix[0])
    check(matrix)


def test_torch_views_from_several_threads_at_once(monkeypatch):
    """Threads encrypting small torch tensors at once, with a cache that keeps filling
    up and starting again: every ciphertext still opens to its own tensor's bytes."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(api, "_TORCH_VIEWS", {})
    monkeypatch.setattr(api, "_TORCH_VIEWS_MAX", 3)
    key = os.urandom(32)

    def work(seed):
        gen = torch.Generator().manual_seed(seed)
        for i in range(50):
            x = torch.randint(0, 256, (64 + i % 7,), dtype=torch.uint8, generator=gen)
            back = gpucrypt.decrypt_tensor(gpucrypt.encrypt_tensor(x, key), key)
            assert torch.equal(back, x)
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(8)))
    assert len(api._TORCH_VIEWS) <= 3


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_failed_open_into_the_ciphertexts_own_memory_keeps_it(framework):
    """``out=`` naming the in-place ciphertext's memory by another object (a view) is
    an open over the ciphertext itself: a wrong key must leave the ciphertext there,
    not zeros, so that the right key still opens it."""
    key = os.urandom(32)
    x = np.arange(1024, dtype=np.float32) if framework == "numpy" else torch.arange(1024.0)
    original = _memory(x)
    enc = gpucrypt.encrypt_tensor(x, key, inplace=True)
    ciphertext = _memory(x)
    alias = x.view() if framework == "numpy" else x.detach()
    with pytest.raises(InvalidTag):
        gpucrypt.decrypt_tensor(enc, os.urandom(32), out=alias)
    assert _memory(x) == ciphertext
    assert gpucrypt.decrypt_tensor(enc, key) is x and _memory(x) == original


@pytest.mark.parametrize("inplace", [True, False])
def test_associated_data_beyond_one_openssl_call_is_composed(inplace, monkeypatch):
    """Associated data longer than OpenSSL's one call takes (2**31 - 1 bytes; lowered
    here) goes to the CPU backend, which composes the AEAD from its primitives, instead
    of to OpenSSL's one-shot call: the reference bytes, through the backend."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    from gpucrypt.backends import cpu

    monkeypatch.setattr(cpu, "OPENSSL_AEAD_MAX", 300)
    through_backend = []
    real = cpu._ChaCha20Poly1305.seal_detached

    def seal_detached(self, *args, **kwargs):
        through_backend.append(len(args[1]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cpu._ChaCha20Poly1305, "seal_detached", seal_detached)
    key, aad = os.urandom(32), os.urandom(400)
    x = torch.arange(1024.0)
    plain = _memory(x)
    enc = gpucrypt.encrypt_tensor(x, key, aad=aad, inplace=inplace)
    assert through_backend == [4096]
    ct = _memory(x) if inplace else enc.ciphertext.numpy().tobytes()
    assert ct + enc.tag == ChaCha20Poly1305(key).encrypt(enc.nonce, plain, enc.associated_data())
    back = gpucrypt.decrypt_tensor(enc, key)
    assert _memory(back) == plain


def test_a_tensor_whose_storage_shrank_is_refused_not_read_past():
    """A tensor whose storage was resized underneath it still reports its old size; read
    by address, its bytes would reach past the allocation. Encrypting it and decrypting
    an in-place result into it, by either path, are refused with a clear error."""
    key = os.urandom(32)
    x = torch.arange(1024.0)
    x.untyped_storage().resize_(16)
    with pytest.raises(ValueError, match="storage is smaller"):
        gpucrypt.encrypt_tensor(x, key)
    with pytest.raises(ValueError, match="storage is smaller"):
        gpucrypt.encrypt_tensors([x], key)
    for decrypt in (lambda e: gpucrypt.decrypt_tensor(e, key),
                    lambda e: gpucrypt.decrypt_tensors([e], key)):
        for viewed in (False, True):  # the ciphertext's torch view made before, or not
            y = torch.arange(1024.0)
            enc = gpucrypt.encrypt_tensor(y, key, inplace=True)
            if viewed:
                assert enc.ciphertext.data_ptr() == y.data_ptr()
            y.untyped_storage().resize_(16)
            with pytest.raises(ValueError, match="storage is smaller"):
                decrypt(enc)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_a_new_result_keeps_openssls_sealed_bytes_and_every_edit_fails(algorithm, framework):
    """A new (not in-place) result of the short path holds the bytes OpenSSL's one-shot
    seal returned, ciphertext || tag, and its decryption hands them back to OpenSSL as
    they are. Whatever was edited since (any metadata field, the user's associated data,
    the nonce, the tag kept beside them, the ciphertext through ``ciphertext``) must fail
    to verify, with no plaintext released; undone, it decrypts again."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

    key = os.urandom(32)
    x = np.arange(1024, dtype=np.float32) if framework == "numpy" else torch.arange(1024.0)
    plain = _memory(x)
    enc = gpucrypt.encrypt_tensor(x, key, algorithm=algorithm, aad=b"ctx", name="w")
    assert type(enc._ct) is bytes  # the form under test
    if algorithm != "xchacha20-poly1305":  # its subkey is another test's
        reference = (AESGCM if algorithm == "aes-gcm" else ChaCha20Poly1305)(key)
        assert enc._ct == reference.encrypt(enc.nonce, plain, enc.associated_data())
    sealed = enc._ct
    edits = {"shape": (512, 2), "dtype": "int32", "name": "v", "key_id": "k", "aad": b"cty",
             "nonce": bytes(len(enc.nonce)), "_tag": bytes(16)}  # _tag: the general path's
    for field, value in edits.items():
        kept = getattr(enc, field)
        setattr(enc, field, value)
        with pytest.raises(InvalidTag) as info:
            gpucrypt.decrypt_tensor(enc, key)
        assert info.value.failed == [None], field
        setattr(enc, field, kept)
        if field != "_tag":
            assert enc._ct is sealed, field  # the sealed bytes were tried, not an array
    assert _memory(gpucrypt.decrypt_tensor(enc, key)) == plain
    enc._ct = sealed
    tag = enc.tag
    for short in (b"", tag[8:], tag[:15]):  # a tag cut short is no tag, on any path
        enc._tag = short
        with pytest.raises(InvalidTag):
            gpucrypt.decrypt_tensor(enc, key)
        enc._ct = sealed
    enc._tag = tag
    with pytest.raises(InvalidTag):
        gpucrypt.decrypt_tensor(enc, os.urandom(32))
    assert _memory(gpucrypt.decrypt_tensor(enc, key)) == plain and enc._ct is sealed
    # the other readers take the sealed bytes as they are, with no array made of them
    serialised = enc.to_bytes()
    assert _memory(gpucrypt.decrypt_tensors({"w": enc}, key)["w"]) == plain
    assert _memory(gpucrypt.decrypt_tensor(EncryptedTensor.from_bytes(serialised), key)) == plain
    assert enc._ct is sealed
    # the ciphertext asked for: a writable array of its own, which decryption then reads
    ciphertext = enc.ciphertext
    flat = ciphertext if framework == "numpy" else ciphertext.numpy()
    assert flat.flags.writeable and flat.tobytes() + enc.tag == sealed
    assert enc.ciphertext is ciphertext
    flat[0] ^= 1
    with pytest.raises(InvalidTag):
        gpucrypt.decrypt_tensor(enc, key)
    flat[0] ^= 1
    assert _memory(gpucrypt.decrypt_tensor(enc, key)) == plain and enc.to_bytes() == serialised


@pytest.mark.parametrize("framework", ["numpy", "torch"])
@pytest.mark.parametrize("size", [0, 4096])
def test_a_new_result_decrypts_in_its_own_ciphertext(framework, size):
    """inplace=True on a new result decrypts in its ciphertext's array, which is made of
    the sealed bytes then: an empty one too (an empty copy of its own has stride 0,
    which torch's views refuse)."""
    key = os.urandom(32)
    x = np.arange(size // 4, dtype=np.float32) if framework == "numpy" else \
        torch.arange(size // 4, dtype=torch.float32)
    enc = gpucrypt.encrypt_tensor(x, key)
    assert type(enc._ct) is bytes
    for decrypt in (lambda e: gpucrypt.decrypt_tensor(e, key, inplace=True),
                    lambda e: gpucrypt.decrypt_tensors([e], key, inplace=True)[0]):
        back = decrypt(gpucrypt.encrypt_tensor(x, key))
        assert _memory(back) == _memory(x) and back.shape == x.shape


def test_a_new_torch_result_is_a_cpu_tensor_whatever_the_default_device():
    """``torch.set_default_device`` changes where ``torch.empty`` allocates; a host
    ciphertext decrypts into host memory all the same ('meta' here: its tensors have no
    memory, and writing one's address as host memory crashed the process)."""
    key = os.urandom(32)
    x = torch.arange(1024.0)
    encs = [gpucrypt.encrypt_tensor(x, key), gpucrypt.encrypt_tensor(x.clone(), key, inplace=True)]
    torch.set_default_device("meta")
    try:
        backs = [gpucrypt.decrypt_tensor(encs[0], key),
                 gpucrypt.decrypt_tensor(encs[1], key, inplace=False),
                 gpucrypt.decrypt_tensors([encs[0]], key)[0]]
    finally:
        torch.set_default_device(None)
    for back in backs:
        assert back.device.type == "cpu" and torch.equal(back, x)


#: recorded fields edited to values of the wrong type: no encryption records such values
WRONG_TYPES = [("name", 5), ("name", b"w"), ("name", "\udc80"), ("name", "n" * 70000),
               ("key_id", 5), ("key_id", ["k"]), ("dtype", 5), ("dtype", ["float32"]),
               ("framework", ["numpy"]), ("algorithm", 5), ("algorithm", ["aes-gcm"]),
               ("shape", "ab"), ("shape", None), ("shape", (2.0, 4.0)), ("nbytes", "32"),
               ("nbytes", None), ("nbytes", 32.0), ("aad", "str"), ("nonce", None)]


@pytest.mark.parametrize("field,value", WRONG_TYPES, ids=[f"{f}={v!r:.12}" for f, v in WRONG_TYPES])
@pytest.mark.parametrize("framework", ["numpy", "torch"])
@pytest.mark.parametrize("inplace", [False, True])
def test_fields_edited_to_the_wrong_type_fail_as_any_edit_does(field, value, framework, inplace):
    """Any edit to a recorded field fails with InvalidTag, whichever path decrypts; edits
    of the wrong type raised AttributeError, TypeError or UnicodeEncodeError (the short
    path compared the byte count, and both encoded the name and key id, unchecked).
    Nothing is decrypted: an in-place tensor keeps its ciphertext, and undone the edit
    decrypts."""
    key = os.urandom(32)
    x = np.arange(8, dtype=np.float32) if framework == "numpy" else torch.arange(8.0)
    plain = _memory(x)
    for decrypt in (lambda e: gpucrypt.decrypt_tensor(e, key),
                    lambda e: gpucrypt.decrypt_tensors([e], key)[0]):
        t = x.copy() if framework == "numpy" else x.clone()
        enc = gpucrypt.encrypt_tensor(t, key, inplace=inplace)
        ciphertext = _memory(t)
        kept = getattr(enc, field)
        setattr(enc, field, value)
        with pytest.raises(InvalidTag):
            decrypt(enc)
        assert _memory(t) == ciphertext  # in place: nothing written
        setattr(enc, field, kept)
        assert _memory(decrypt(enc)) == plain


#: recorded fields edited (an algorithm's among them, to another algorithm): the entry
#: still names an algorithm to check the key against
EDITED = [("name", 5), ("name", "other"), ("nbytes", "32"), ("nbytes", 64), ("shape", (5,)),
          ("dtype", 3), ("key_id", 3.5), ("framework", ["numpy"]), ("aad", "str"),
          ("nonce", None), ("algorithm", "xchacha20-poly1305")]


@pytest.mark.parametrize("field,value", EDITED, ids=[f"{f}={v!r:.12}" for f, v in EDITED])
@pytest.mark.parametrize("framework", ["numpy", "torch"])
@pytest.mark.parametrize("inplace", [False, True])
def test_the_key_is_checked_first_whatever_field_was_edited(field, value, framework, inplace):
    """The key's own errors are the caller's to fix, whatever the entry holds: TypeError
    for a key that is not bytes-like, ValueError for a wrong length for the entry's
    algorithm, whichever path decrypts. They depended on the edited field (an edited name
    raised TypeError, an edited byte count InvalidTag, for one wrong key), and a key of a
    wrong length gave InvalidTag for any edit. A right key then fails the edit, InvalidTag;
    nothing is written."""
    key = os.urandom(32)
    x = np.arange(8, dtype=np.float32) if framework == "numpy" else torch.arange(8.0)
    for decrypt in (gpucrypt.decrypt_tensor,  # the short path, where it can
                    lambda e, k: gpucrypt.decrypt_tensors([e], k)[0],  # the batch path
                    lambda e, k: gpucrypt.decrypt_tensor(e, k, out=x * 0)):
        t = x.copy() if framework == "numpy" else x.clone()
        enc = gpucrypt.encrypt_tensor(t, key, inplace=inplace)
        ciphertext = _memory(t)
        setattr(enc, field, value)
        with pytest.raises(TypeError, match="^key must be bytes-like"):
            decrypt(enc, 12345)
        with pytest.raises(ValueError, match="key must be 32 bytes"):
            decrypt(enc, b"k" * 5)
        with pytest.raises(InvalidTag):
            decrypt(enc, key)
        assert _memory(t) == ciphertext


@pytest.mark.parametrize("algorithm", [5, ["aes-gcm"], "bogus", None])
def test_an_entry_naming_no_algorithm_is_malformed_whatever_the_key_length(algorithm):
    """An algorithm edited to no algorithm has no key length: the entry fails as any edit
    does, InvalidTag, for a key of any length, on either path (a key that is not
    bytes-like is still TypeError)."""
    key = os.urandom(32)
    enc = gpucrypt.encrypt_tensor(torch.arange(8.0), key)
    enc.algorithm = algorithm
    for decrypt in (gpucrypt.decrypt_tensor, lambda e, k: gpucrypt.decrypt_tensors([e], k)[0]):
        for k in (key, key[:5], key + key):
            with pytest.raises(InvalidTag):
                decrypt(enc, k)
        with pytest.raises(TypeError, match="^key must be bytes-like"):
            decrypt(enc, 12345)
