"""Raw stream ciphers against cryptography's Cipher(...).encryptor(), on every backend."""
from __future__ import annotations

import copy
import mmap
import os
import pickle
import struct

import numpy as np
import pytest
from cryptography.exceptions import AlreadyFinalized
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpucrypt import ciphers
from _vectors import load, unhex

LENGTHS = [0, 1, 15, 16, 17, 63, 64, 65, 4095, 4096, 5000]


def reference(kind: str, key: bytes, nonce: bytes):
    if kind == "chacha20":
        return Cipher(algorithms.ChaCha20(key, nonce), None).encryptor()
    return Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()


def ours(kind: str, key: bytes, nonce: bytes, device: str):
    cls = ciphers.ChaCha20 if kind == "chacha20" else ciphers.AESCTR
    return cls(key, nonce, device=device).encryptor()


KINDS = [("chacha20", 32), ("aes-ctr", 16), ("aes-ctr", 24), ("aes-ctr", 32)]


def one_message(kind: str, key_len: int, length: int, device: str, first_block: int):
    """(random data, cryptography's keystream XOR of it, our fresh context) under a random
    key and nonce; ChaCha20's block counter starts at ``first_block``."""
    key, nonce, data = os.urandom(key_len), os.urandom(16), os.urandom(length)
    if kind == "chacha20":
        nonce = struct.pack("<I", first_block) + nonce[4:]
    return data, reference(kind, key, nonce).update(data), ours(kind, key, nonce, device)


@pytest.mark.parametrize("kind,key_len", KINDS)
@pytest.mark.parametrize("length", LENGTHS)
def test_one_update_matches(device, kind, key_len, length):
    key, nonce, data = os.urandom(key_len), os.urandom(16), os.urandom(length)
    if kind == "chacha20":
        nonce = struct.pack("<I", 7) + nonce[4:]
    assert ours(kind, key, nonce, device).update(data) == reference(kind, key, nonce).update(data)


@pytest.mark.parametrize("kind,key_len", KINDS)
def test_many_odd_updates_equal_one(device, kind, key_len):
    data, expected, enc = one_message(kind, key_len, 700, device, first_block=1)
    cuts = [0, 1, 2, 17, 64, 65, 130, 300, 301, 700]
    out = b"".join(enc.update(data[a:b]) for a, b in zip(cuts, cuts[1:]))
    assert out == expected
    assert enc.finalize() == b""
    with pytest.raises(AlreadyFinalized):
        enc.update(b"x")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["chacha20", "aes-ctr"]), data=st.binary(max_size=1500),
       cuts=st.lists(st.integers(0, 1500), max_size=6), seed=st.binary(min_size=48, max_size=48))
def test_hypothesis_chunking_cpu(kind, data, cuts, seed):
    key, nonce = seed[:32], seed[32:]
    if kind == "chacha20":
        nonce = b"\x00\x00\x00\x00" + nonce[4:]
    enc = ours(kind, key, nonce, "cpu")
    points = sorted({0, len(data), *[c for c in cuts if c <= len(data)]})
    buf = bytearray(len(data))
    for a, b in zip(points, points[1:]):
        assert enc.update_into(data[a:b], memoryview(buf)[a:]) == b - a
    assert bytes(buf) == reference(kind, key, nonce).update(data)


def test_chacha20_refuses_counter_overflow_like_cryptography(device):
    key = os.urandom(32)
    nonce = struct.pack("<I", 0xFFFFFFFE) + os.urandom(12)
    enc = ours("chacha20", key, nonce, device)
    ref = reference("chacha20", key, nonce)
    assert enc.update(bytes(100)) == ref.update(bytes(100))
    assert enc.update(bytes(28)) == ref.update(bytes(28))  # exactly the last block
    with pytest.raises(ValueError, match="32-bit counter"):
        enc.update(b"\x00")
    with pytest.raises(ValueError, match="32-bit counter"):
        ref.update(b"\x00")


@pytest.mark.cudasim
def test_gpu_backend_keystream_refuses_counter_overflow(on_cudasim):
    """The GPU backend's own keystream call (the bench and backend users reach it without
    ChaCha20's position check) refuses to run past block 2**32 - 1 as the CPU backend
    does: its kernel counts in 64 bits and would go on into the keystream of the nonce
    whose first word is one higher."""
    if not on_cudasim:
        pytest.skip("only meaningful under numba's CUDA simulator")
    from _reference import require_gpu_backend

    require_gpu_backend()
    from gpucrypt.backends import get_backend

    key = os.urandom(32)
    iv = struct.pack("<I", 0xFFFFFFFF) + os.urandom(12)
    for backend in ("cpu", "gpu"):
        out = bytearray(64)  # the backends take memoryviews
        get_backend(backend).xor_keystream("chacha20", key, iv, 0, memoryview(bytes(64)),
                                           memoryview(out))  # the last block
        assert bytes(out) == reference("chacha20", key, iv).update(bytes(64))
        for position, size in ((0, 65), (64, 1), (1, 64)):
            with pytest.raises(ValueError, match="32-bit counter"):
                get_backend(backend).xor_keystream("chacha20", key, iv, position,
                                                   memoryview(bytes(size)),
                                                   memoryview(bytearray(size)))


def test_aes_ctr_carries_across_all_128_bits(device):
    key = os.urandom(16)
    for nonce in (b"\x00" * 8 + b"\xff" * 8, b"\x12" * 4 + b"\xff" * 12, b"\xff" * 16):
        data = os.urandom(100)
        assert ours("aes-ctr", key, nonce, device).update(data) == reference("aes-ctr", key, nonce).update(data)


def test_rfc7539_chacha20_vectors(device):
    records = load("ciphers", "ChaCha20", "rfc7539.txt")
    assert records
    for r in records:
        key, nonce = unhex(r["key"]), unhex(r["iv"]) if "iv" in r else unhex(r["nonce"])
        counter = int(r.get("initial_block_counter", r.get("counter", "0")))
        if len(nonce) == 12:
            nonce = struct.pack("<I", counter) + nonce
        pt, ct = unhex(r.get("plaintext")), unhex(r.get("ciphertext"))
        assert ours("chacha20", key, nonce, device).update(pt) == ct


@pytest.mark.parametrize("bits", [128, 192, 256])
def test_sp800_38a_ctr_vectors(device, bits):
    records = load("ciphers", "AES", "CTR", f"aes-{bits}-ctr.txt")
    assert records
    for r in records:
        key, iv, pt, ct = unhex(r["key"]), unhex(r["iv"]), unhex(r["plaintext"]), unhex(r["ciphertext"])
        assert ours("aes-ctr", key, iv, device).update(pt) == ct


def test_argument_errors():
    with pytest.raises(ValueError, match="16 bytes"):
        ciphers.ChaCha20(bytes(32), bytes(12))
    with pytest.raises(ValueError, match="key size"):
        ciphers.AESCTR(bytes(20), bytes(16))
    with pytest.raises(ValueError, match="nonce size"):
        ciphers.AESCTR(bytes(16), bytes(12))
    with pytest.raises(TypeError):
        ciphers.ChaCha20("k" * 32, bytes(16))
    enc = ciphers.AESCTR(bytes(16), bytes(16)).encryptor()
    with pytest.raises(ValueError, match="at least 5 bytes"):
        enc.update_into(b"12345", bytearray(4))


# "cpu" (and "auto" on a machine without a CUDA driver) hands out cryptography's own
# context; "auto" under the simulator keeps gpucrypt's StreamContext, with the CPU making
# the keystream. Both must be the same drop-in, allocating and _into calls mixed.
@pytest.mark.parametrize("where", ["cpu", "auto"])
@pytest.mark.parametrize("kind,key_len", KINDS)
def test_allocating_and_into_updates_mixed_match(where, kind, key_len):
    data, expected, enc = one_message(kind, key_len, 5000, where, first_block=3)
    got = bytearray(enc.update(data[:100]))
    buf = bytearray(1000)
    assert enc.update_into(memoryview(data)[100:1037], buf) == 937
    got += buf[:937]
    got += enc.update(np.frombuffer(data[1037:4000], dtype=np.uint8))
    got += enc.update(data[4000:])
    assert bytes(got) == expected
    assert enc.finalize() == b""
    with pytest.raises(AlreadyFinalized):
        enc.update(b"x")


@pytest.mark.parametrize("where", ["cpu", "auto"])
def test_unusable_buffers_get_gpucrypt_messages(where):
    enc = ciphers.ChaCha20(bytes(32), bytes(16), device=where).encryptor()
    with pytest.raises(TypeError, match="bytes-like"):
        enc.update("text")
    with pytest.raises(ValueError, match="C-contiguous"):
        enc.update(np.zeros((4, 4), dtype=np.uint8)[:, ::2])
    with pytest.raises(TypeError, match="writable"):
        enc.update_into(b"ab", b"cd")
    # nothing was consumed by the refused calls: the keystream still starts at byte 0
    assert enc.update(bytes(64)) == reference("chacha20", bytes(32), bytes(16)).update(bytes(64))


# --- found by the second differential review (/tmp/review-aead) ---------------------------------

@pytest.mark.parametrize("where", ["cpu", "auto"])
@pytest.mark.parametrize("kind,key_len", KINDS)
def test_buffers_of_wider_items_are_their_bytes_on_every_path(where, kind, key_len):
    """One rule for data on every path: a float32 array, an 'I' memoryview or a 2-D array
    is read as its raw bytes (as the AEAD classes read data), where cryptography's
    context, which device="cpu" hands out, refused it and gpucrypt's own took it."""
    data, expected, enc = one_message(kind, key_len, 400, where, first_block=1)
    got = enc.update(np.frombuffer(data[:100], dtype=np.float32))
    got += enc.update(memoryview(data[100:200]).cast("I"))
    buf = np.zeros(25, dtype=np.float32)  # 100 bytes of output, in wider items too
    assert enc.update_into(np.frombuffer(data[200:300], dtype=np.uint8).reshape(10, 10), buf) == 100
    got += buf.tobytes()
    got += enc.update(np.frombuffer(data[300:], dtype=np.int8))
    assert got == expected


@pytest.mark.parametrize("kind,key_len", KINDS)
@pytest.mark.parametrize("cut", [0, 1, 63, 64, 65, 200])
def test_reset_nonce_matches_cryptography(device, kind, key_len, cut):
    """cryptography 50's reset_nonce (ChaCha20 and CTR contexts): the keystream of the new
    nonce from its start (ChaCha20: from the counter in its first 4 bytes), whatever was
    used of the old one, part of a block included; allocating and _into calls alike."""
    key, n1, n2, data = os.urandom(key_len), os.urandom(16), os.urandom(16), os.urandom(300)
    if kind == "chacha20":
        n2 = struct.pack("<I", 5) + n2[4:]
    ref, enc = reference(kind, key, n1), ours(kind, key, n1, device)
    assert enc.update(data[:cut]) == ref.update(data[:cut])
    ref.reset_nonce(n2)
    enc.reset_nonce(bytearray(n2))
    expected = ref.update(data)
    assert expected == reference(kind, key, n2).update(data)
    buf = bytearray(300)
    assert enc.update(data[:77]) + bytes(buf[:enc.update_into(data[77:], buf)]) == expected
    enc.reset_nonce(n1)  # back to the first nonce: its keystream from byte 0 again
    assert enc.update(data) == reference(kind, key, n1).update(data)


@pytest.mark.parametrize("where", ["cpu", "auto"])
def test_reset_nonce_errors_are_cryptographys(where):
    """The argument's type first (TypeError, BufferError), then a finalized context
    (AlreadyFinalized), then its length (ValueError); a ChaCha20 nonce near the end of
    its counter is refused past it, as cryptography refuses it."""
    for kind, key_len in (("chacha20", 32), ("aes-ctr", 16)):
        key, nonce = os.urandom(key_len), os.urandom(16)
        ref, enc = reference(kind, key, nonce), ours(kind, key, nonce, where)
        for bad, error in (("x" * 16, TypeError), (np.zeros(4, np.float32), TypeError),
                           (memoryview(bytearray(32))[::2], BufferError), (bytes(12), ValueError),
                           (bytes(17), ValueError)):
            with pytest.raises(error):
                ref.reset_nonce(bad)
            with pytest.raises(error):
                enc.reset_nonce(bad)
        assert enc.update(b"abc") == ref.update(b"abc")  # nothing changed by the refusals
        ref.finalize(), enc.finalize()
        for bad, error in ((bytes(3), AlreadyFinalized), ("x", TypeError), (nonce, AlreadyFinalized)):
            with pytest.raises(error):
                ref.reset_nonce(bad)
            with pytest.raises(error):
                enc.reset_nonce(bad)
    key, near_end = os.urandom(32), struct.pack("<I", 0xFFFFFFFF) + os.urandom(12)
    ref, enc = reference("chacha20", key, os.urandom(16)), ours("chacha20", key, os.urandom(16), where)
    enc.update(bytes(100)), ref.update(bytes(100))
    ref.reset_nonce(near_end), enc.reset_nonce(near_end)
    assert enc.update(bytes(64)) == ref.update(bytes(64))  # the last block, not block 2 of it
    with pytest.raises(ValueError, match="32-bit counter"):
        ref.update(b"\x00")
    with pytest.raises(ValueError, match="32-bit counter"):
        enc.update(b"\x00")


@pytest.mark.parametrize("where", ["cpu", "auto"])
def test_after_finalize_every_update_is_already_finalized(where):
    """update_into after finalize() is AlreadyFinalized before its buffer's size is
    looked at, on every context (gpucrypt's own checked the size first: ValueError)."""
    for kind, key_len in (("chacha20", 32), ("aes-ctr", 16)):
        key, nonce = os.urandom(key_len), os.urandom(16)
        for enc in (reference(kind, key, nonce), ours(kind, key, nonce, where)):
            enc.update(b"abc")
            enc.finalize()
            for call in (lambda: enc.update_into(b"abc", bytearray(1)),
                         lambda: enc.update_into(b"abc", bytearray(3)),
                         lambda: enc.update(b"abc"), lambda: enc.finalize()):
                with pytest.raises(AlreadyFinalized):
                    call()
            with pytest.raises(TypeError):  # the argument's type still comes first, as there
                enc.update_into("abc", bytearray(1))


@pytest.mark.parametrize("where", ["cpu", "auto"])
def test_keys_nonces_and_buffers_are_refused_as_cryptography_refuses_them(where):
    """A key or nonce of wider items is refused as in cryptography (its size counted by
    len() first: ValueError, else TypeError), a non-contiguous one or a non-contiguous
    buffer is a BufferError (and a ValueError, as gpucrypt said before); a 2-D uint8 key
    whose rows are its bytes is taken, as there."""
    from gpucrypt._buffers import NonContiguousBuffer

    def ref_chacha(k, n):
        return Cipher(algorithms.ChaCha20(k, n), None).encryptor()

    def ref_ctr(k, n):
        return Cipher(algorithms.AES(k), modes.CTR(n)).encryptor()

    cases = [(np.zeros(8, np.float32), bytes(16), ValueError),     # len 8: a 64-bit key
             (np.zeros(32, np.float32), bytes(16), TypeError),     # len 32, 128 bytes
             (np.zeros(32, np.int8), bytes(16), TypeError),
             (np.zeros((2, 16), np.uint8), bytes(16), ValueError),  # len 2
             (bytes(32), np.zeros(4, np.float32), ValueError),
             (bytes(32), np.zeros(16, np.float32), TypeError),
             (np.zeros(64, np.uint8)[::2], bytes(16), BufferError),
             (bytes(32), np.zeros(32, np.uint8)[::2], BufferError)]
    for ref, cls in ((ref_chacha, ciphers.ChaCha20), (ref_ctr, ciphers.AESCTR)):
        for key, nonce, error in cases:
            with pytest.raises(error):
                ref(key, nonce).update(b"x")
            with pytest.raises(error):
                cls(key, nonce, device=where).encryptor().update(b"x")
        rows = np.frombuffer(bytes(range(32)), dtype=np.uint8).reshape(32, 1)
        assert cls(rows, bytes(16), device=where).encryptor().update(bytes(40)) == \
            ref(bytes(range(32)), bytes(16)).update(bytes(40))
    enc = ciphers.ChaCha20(bytes(32), bytes(16), device=where).encryptor()
    ref = ref_chacha(bytes(32), bytes(16))
    for call in (lambda e: e.update(memoryview(bytearray(8))[::2]),
                 lambda e: e.update_into(b"abcd", memoryview(bytearray(8))[::2])):
        with pytest.raises(BufferError):
            call(ref)
        with pytest.raises(NonContiguousBuffer):
            call(enc)


@pytest.mark.parametrize("kind", ["chacha20", "aes-ctr"])
def test_ciphers_and_their_contexts_refuse_pickle_and_copy(kind, device):
    """gpucrypt refuses to pickle or copy its ciphers and contexts: a pickle would carry
    the key in the clear, and a copied context would go on with the same keystream from
    the same position (two messages under one keystream). cryptography refuses it for
    its contexts only (test_only_the_contexts_of_cryptography_refuse_pickle)."""
    import copy
    import pickle

    key_len = 32
    cls = ciphers.ChaCha20 if kind == "chacha20" else ciphers.AESCTR
    cipher = cls(os.urandom(key_len), os.urandom(16), device=device)
    context = cipher.encryptor()
    context.update(b"x" * 10)
    for obj in (cipher, context):
        for attempt in (pickle.dumps, copy.copy, copy.deepcopy):
            with pytest.raises(TypeError, match="cannot pickle or copy"):
                attempt(obj)


# --- found by the third review (/tmp/review-misc) -----------------------------------------------

@pytest.fixture(params=["cpu", "auto", pytest.param("gpu", marks=pytest.mark.cudasim)])
def every_device(request) -> str:
    """Each device= a user may pass: "cpu" hands out cryptography's own context behind
    gpucrypt's checks, "auto" and "gpu" gpucrypt's StreamContext (its CPU fast path, and
    the kernels, in numba's simulator where there is no GPU)."""
    if request.param == "gpu":
        from _reference import require_gpu_backend

        require_gpu_backend()
    return request.param


@pytest.mark.parametrize("kind,key_len", [("chacha20", 32), ("aes-ctr", 16)])
def test_update_into_refuses_inexact_overlap_on_every_device(every_device, kind, key_len):
    """buf and data in the same memory from different starts gave OpenSSL's bytes (read
    and written front to back) on the CPU and other bytes on the GPU (all of data copied
    first): refused on every device, before a byte is written or the keystream moves.
    Exactly in place, the same start, is allowed and gives cryptography's bytes."""
    key, nonce = os.urandom(key_len), os.urandom(16)
    enc = ours(kind, key, nonce, every_device)
    memory = bytearray(os.urandom(700))
    view = memoryview(memory)
    array = np.frombuffer(bytearray(os.urandom(700)), dtype=np.uint8)
    owning = np.arange(700, dtype=np.uint16).view(np.uint8)
    pairs = [(view[a:a + n], view[b:b + n]) for a, b, n in
             ((0, 1, 128), (1, 0, 128), (0, 3, 100), (0, 64, 300), (64, 0, 300))]
    pairs += [(array[:100], array[50:150]), (array[50:150], array[:100]), (owning[1:], owning),
              (view[5:], memory)]  # (a bytearray into a later view of it is too short a buf)
    for data, buf in pairs:
        before = bytes(memory), array.tobytes(), owning.tobytes()
        with pytest.raises(ValueError, match="overlaps data"):
            enc.update_into(data, buf)
        assert (bytes(memory), array.tobytes(), owning.tobytes()) == before
    plain = os.urandom(300)
    inplace = bytearray(plain)
    at = memoryview(inplace)
    assert enc.update_into(at[:100], at) == 100  # the same start, buf the longer
    assert enc.update_into(at[100:], at[100:]) == 200
    assert bytes(inplace) == reference(kind, key, nonce).update(plain)  # from keystream byte 0


def test_chacha20_refusals_near_the_counter_end_agree_on_every_device(every_device):
    """With 64 bytes of keystream left, one rule on every device: a finalized context or a
    short buffer is refused as such even where the call would also run past block
    2**32 - 1, and a refused call uses up none of the 64 bytes. cryptography 50 checks
    the overflow first and counts a short-buffer update_into's bytes (device="cpu",
    its own context, did both; "auto" counted them). The bytes are cryptography's, and
    none past the end are made."""
    key = os.urandom(32)
    nonce = struct.pack("<I", 0xFFFFFFFF) + os.urandom(12)
    ref = reference("chacha20", key, nonce)
    last_block = ref.update(bytes(64))
    enc = ours("chacha20", key, nonce, every_device)
    buf = bytearray(5)
    for data in (bytes(10), bytearray(10), memoryview(bytes(10)), np.zeros(10, np.uint8),
                 np.zeros((2, 5), np.uint8), np.zeros(5, np.uint16)):  # len() of the last two: 2, 5
        with pytest.raises(ValueError, match="at least 10 bytes"):
            enc.update_into(data, buf)
        assert buf == bytes(5)
    with pytest.raises(ValueError, match="at least 100 bytes"):  # too short, and past the end
        enc.update_into(bytes(100), bytearray(50))
    with pytest.raises(ValueError, match="at least 64 bytes"):  # len() 64, no bytes at all
        enc.update_into(bytes(64), np.zeros((64, 0), np.uint8))
    assert enc.update(bytes(60)) == last_block[:60]  # all 64 bytes were still there
    shared = memoryview(bytearray(200))
    with pytest.raises(ValueError, match="overlaps data"):  # overlapping, and past the end
        enc.update_into(shared[:100], shared[1:101])
    with pytest.raises(ValueError, match="32-bit counter"):
        enc.update_into(bytes(5), bytearray(5))
    out = bytearray(4)
    assert enc.update_into(bytes(4), out) == 4 and out == last_block[60:]
    for context in (ref, enc):  # here cryptography and the rule agree
        with pytest.raises(ValueError, match="32-bit counter"):
            context.update(b"\x00")

    enc = ours("chacha20", key, nonce, every_device)
    assert enc.update(bytes(10)) == last_block[:10]
    assert enc.finalize() == b""
    for call in (lambda: enc.update(bytes(60)), lambda: enc.update(np.zeros(15, np.float32)),
                 lambda: enc.update_into(bytes(60), bytearray(60)),
                 lambda: enc.update_into(bytes(100), bytearray(50)),
                 lambda: enc.update_into(np.zeros((10, 6), np.uint8), bytearray(60))):
        with pytest.raises(AlreadyFinalized):
            call()


# --- found by the fourth review (/tmp/review-aead) ----------------------------------------------

def _cryptography_cipher(kind: str, key, nonce) -> Cipher:
    """cryptography's Cipher over the very ``key`` and ``nonce`` objects (it keeps them)."""
    if kind == "chacha20":
        return Cipher(algorithms.ChaCha20(key, nonce), None)
    return Cipher(algorithms.AES(key), modes.CTR(nonce))


def _as_bytearray(raw: bytes) -> bytearray:
    return bytearray(raw)


def _as_array(raw: bytes) -> np.ndarray:
    return np.frombuffer(bytearray(raw), dtype=np.uint8)


@pytest.mark.parametrize("kind,key_len", [("chacha20", 32), ("aes-ctr", 16), ("aes-ctr", 32)])
@pytest.mark.parametrize("make", [_as_bytearray, _as_array], ids=["bytearray", "numpy"])
def test_a_key_and_nonce_changed_in_place_are_read_at_each_encryptor(every_device, kind,
                                                                     key_len, make):
    """cryptography's Cipher keeps the caller's key and nonce and reads them at each
    encryptor(): a nonce updated in place before each message gives each its own
    keystream. gpucrypt copied them once and gave every message the first nonce's
    keystream (a two-time pad), on every device. A context already made keeps what it
    was made with, there and here."""
    key, nonce = make(os.urandom(key_len)), make(bytes(4) + os.urandom(12))  # block 0
    ref = _cryptography_cipher(kind, key, nonce)
    cls = ciphers.ChaCha20 if kind == "chacha20" else ciphers.AESCTR
    cipher = cls(key, nonce, device=every_device)
    data = os.urandom(300)
    keystreams = set()
    for message in range(4):
        memoryview(nonce)[4:] = os.urandom(12)  # a fresh nonce for each message
        if message == 2:
            memoryview(key)[:] = os.urandom(key_len)  # and a new key
        expected = ref.encryptor().update(data)
        assert cipher.encryptor().update(data) == expected
        out = bytearray(300)
        assert cipher.decryptor().update_into(expected, out) == 300 and out == data
        keystreams.add(expected)
    assert len(keystreams) == 4

    ref_context, context = ref.encryptor(), cipher.encryptor()
    assert context.update(data[:100]) == ref_context.update(data[:100])
    memoryview(nonce)[4:] = os.urandom(12)
    memoryview(key)[:] = os.urandom(key_len)
    assert cipher.encryptor().update(data) == ref.encryptor().update(data)  # the new ones
    assert context.update(data[100:]) == ref_context.update(data[100:])  # still the old


@pytest.mark.parametrize("kind,key_len", [("chacha20", 32), ("aes-ctr", 16)])
@pytest.mark.parametrize("changing", ["nonce", "key"])
def test_one_of_key_and_nonce_changed_in_place_beside_bytes_is_read_again(every_device, kind,
                                                                          key_len, changing):
    """The commonest form: a bytes key and one bytearray nonce updated per message (and the
    other way round). Reading again only when both were mutable brought the two-time pad
    back for it."""
    key, nonce = os.urandom(key_len), bytes(4) + os.urandom(12)
    if changing == "nonce":
        nonce = bytearray(nonce)
    else:
        key = bytearray(key)
    ref = _cryptography_cipher(kind, key, nonce)
    cipher = (ciphers.ChaCha20 if kind == "chacha20" else ciphers.AESCTR)(key, nonce,
                                                                         device=every_device)
    data, keystreams = os.urandom(200), set()
    for _ in range(3):
        if changing == "nonce":
            nonce[4:] = os.urandom(12)
        else:
            key[:] = os.urandom(key_len)
        expected = ref.encryptor().update(data)
        assert cipher.encryptor().update(data) == expected
        keystreams.add(expected)
    assert len(keystreams) == 3


def test_a_nonce_released_after_construction_is_a_type_error_at_encryptor():
    """As cryptography says of a buffer it cannot read (it said ValueError here)."""
    backing = bytearray(16)
    nonce = memoryview(backing)
    cipher = ciphers.ChaCha20(bytes(32), nonce, device="cpu")
    ref = _cryptography_cipher("chacha20", bytes(32), nonce)
    nonce.release()
    with pytest.raises(TypeError):
        ref.encryptor()
    with pytest.raises(TypeError, match="nonce cannot be read"):
        cipher.encryptor()


@pytest.mark.parametrize("where", ["cpu", "auto"])
def test_a_key_or_nonce_changed_to_a_size_it_may_not_have_is_refused_at_encryptor(where):
    """Read again at encryptor(), a key or nonce is checked again, with construction's
    ValueError (cryptography 50 raises InternalError or pyo3's PanicException there, or
    takes the first 16 bytes of a longer CTR nonce: see the module's docstring). Another
    valid size is taken as cryptography takes it (an AES-128 key grown to AES-256)."""
    for kind, key_len, bad_keys, bad_nonces in (("chacha20", 32, (16, 33), (12, 15, 17)),
                                                ("aes-ctr", 16, (0, 20), (0, 12, 17))):
        key, nonce = bytearray(key_len), bytearray(16)
        ref = _cryptography_cipher(kind, key, nonce)
        cls = ciphers.ChaCha20 if kind == "chacha20" else ciphers.AESCTR
        cipher = cls(key, nonce, device=where)
        for size in bad_nonces:
            nonce[:] = bytes(size)
            for make in (cipher.encryptor, cipher.decryptor):
                with pytest.raises(ValueError, match="[Nn]once"):
                    make()
        nonce[:] = bytes(16)
        for size in bad_keys:
            key[:] = bytes(size)
            with pytest.raises(ValueError, match="key size"):
                cipher.encryptor()
        key[:] = os.urandom(32)  # valid for both: ChaCha20's size, and AES-256
        assert cipher.encryptor().update(bytes(100)) == ref.encryptor().update(bytes(100))


def _released(buffer) -> memoryview:
    view = memoryview(buffer)
    view.release()
    return view


def _closed_mmap() -> mmap.mmap:
    memory = mmap.mmap(-1, 64)
    memory.close()
    return memory


@pytest.mark.parametrize("finalized", [False, True], ids=["open", "finalized"])
def test_released_views_and_closed_mmaps_are_type_errors_as_in_cryptography(every_device,
                                                                            finalized):
    """update_into's fast-path test ran len() on the arguments inside the try whose
    ValueError means ChaCha20's counter overflow: a released view or a closed mmap was
    ValueError, or AlreadyFinalized on a finalized context, where cryptography raises
    TypeError (the argument's type comes first, as for any other unusable buffer)."""
    key, nonce = os.urandom(32), os.urandom(16)
    calls = [lambda c: c.update_into(_released(bytes(64)), bytearray(64)),
             lambda c: c.update_into(bytes(64), _released(bytearray(64))),
             lambda c: c.update_into(_closed_mmap(), bytearray(64)),
             lambda c: c.update_into(bytes(64), _closed_mmap()),
             lambda c: c.update(_released(bytes(64))),
             lambda c: c.update(_closed_mmap())]
    ref, enc = reference("chacha20", key, nonce), ours("chacha20", key, nonce, every_device)
    if finalized:
        ref.finalize(), enc.finalize()
    for call in calls:
        for context in (ref, enc):
            with pytest.raises(TypeError):
                call(context)
    if not finalized:  # and nothing of the keystream was used by the refusals
        assert enc.update(bytes(64)) == ref.update(bytes(64))


def test_an_empty_strided_view_is_empty_data_as_in_cryptography(every_device):
    """memoryview(bytearray(4))[4::2] has no bytes but is not C-contiguous by CPython's
    flag: cryptography takes it as empty, gpucrypt's own context (device="auto" and
    "gpu") refused it as non-contiguous."""
    key, nonce = os.urandom(32), os.urandom(16)
    ref, enc = reference("chacha20", key, nonce), ours("chacha20", key, nonce, every_device)
    for context in (ref, enc):
        assert context.update(memoryview(bytearray(4))[4::2]) == b""
        assert context.update(memoryview(bytes(4))[4::2]) == b""
        assert context.update_into(memoryview(bytearray(4))[4::2], bytearray(0)) == 0
        assert context.update_into(b"", memoryview(bytearray(4))[4::2]) == 0
    assert enc.update(bytes(64)) == ref.update(bytes(64))  # from keystream byte 0


def test_only_the_contexts_of_cryptography_refuse_pickle():
    """The module said its ciphers refuse pickle and copy "as cryptography's ciphers and
    contexts do"; cryptography's Cipher and algorithm objects pickle and copy (key and
    all), only its contexts refuse. gpucrypt's ciphers keep refusing (a pickle would
    carry the key in the clear), and the module's docstring lists it as a deliberate
    difference."""
    key, nonce = os.urandom(32), os.urandom(16)
    for obj in (Cipher(algorithms.ChaCha20(key, nonce), None),
                Cipher(algorithms.AES(key), modes.CTR(nonce)), algorithms.ChaCha20(key, nonce)):
        for attempt in (lambda o: pickle.loads(pickle.dumps(o)), copy.copy, copy.deepcopy):
            assert type(attempt(obj)) is type(obj)
    with pytest.raises(TypeError):
        pickle.dumps(Cipher(algorithms.ChaCha20(key, nonce), None).encryptor())
    for cls in (ciphers.ChaCha20, ciphers.AESCTR):
        for attempt in (pickle.dumps, copy.copy, copy.deepcopy):
            with pytest.raises(TypeError, match="cannot pickle or copy"):
                attempt(cls(key, nonce, device="cpu"))
    differences = " ".join(ciphers.__doc__.split())
    assert "``ChaCha20``/``AESCTR`` objects refuse pickle and copy" in differences
    assert "contexts only" in " ".join(ciphers._Unpicklable.__doc__.split())


@pytest.mark.parametrize("key_len", [0, 15, 17, 33, 48, 64])
def test_aes_ctr_key_sizes_are_refused_in_cryptographys_words(key_len):
    """Every AES-CTR key size cryptography refuses is ValueError with its message: AES
    itself takes 64 bytes (for XTS) and CTR then refuses them, in other words."""
    def message(make):
        with pytest.raises(ValueError) as caught:
            make().encryptor().update(b"x")
        return str(caught.value)

    key = bytes(key_len)
    assert message(lambda: ciphers.AESCTR(key, bytes(16), device="cpu")) == \
        message(lambda: Cipher(algorithms.AES(key), modes.CTR(bytes(16))))
