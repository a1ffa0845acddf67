"""The GPU backend's device-level API: batches, both tag paths, in-place rules, keystreams.

Runs on a real GPU where one exists and in numba's CUDA simulator otherwise
(NumPy arrays stand in for device memory there). Buffers go through ``dev`` and
``host`` (the backend's own copies), so the same bodies hold on both. Inputs stay
small: the simulator runs every CUDA thread in Python.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import aead as reference

from _reference import reference_seal, require_gpu_backend

pytestmark = pytest.mark.cudasim


@pytest.fixture(scope="module")
def gpu():
    return require_gpu_backend()


def dev(gpu, data):
    """A device copy of host bytes or a NumPy array (a NumPy copy under the simulator)."""
    return gpu.to_device(np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data)


def host(gpu, buf) -> np.ndarray:
    """The bytes of a device buffer, on the host."""
    return np.asarray(gpu.to_host(buf)).reshape(-1)


def _batch(algorithm, lengths, key_sizes=(32,)):
    nonce_len = {"chacha20-poly1305": 12, "xchacha20-poly1305": 24, "aes-gcm": 12}[algorithm]
    msgs = []
    for i, n in enumerate(lengths):
        key = os.urandom(key_sizes[i % len(key_sizes)])
        msgs.append((key, os.urandom(nonce_len), os.urandom(n), os.urandom(i % 20)))
    return msgs


CASES = [("chacha20-poly1305", (32,)), ("xchacha20-poly1305", (32,)), ("aes-gcm", (16, 24, 32))]


@pytest.mark.parametrize("algorithm,key_sizes", CASES)
@pytest.mark.parametrize("tag", ["gpu", "host"])
def test_seal_batch_matches_reference_on_both_tag_paths(gpu, algorithm, key_sizes, tag):
    """Mixed lengths and keys (and, for GCM, AES-128/192/256 in one batch), in place and not."""
    msgs = _batch(algorithm, [0, 1, 17, 64, 65, 300], key_sizes)
    srcs = [dev(gpu, m[2]) for m in msgs]
    dsts = [dev(gpu, np.zeros(len(m[2]) + 5, dtype=np.uint8)) if i % 2 else srcs[i]
            for i, m in enumerate(msgs)]
    tags = gpu.to_host(gpu.seal_batch(algorithm, [m[0] for m in msgs], [m[1] for m in msgs], srcs,
                                      [m[3] for m in msgs], dsts, tag=tag))
    for i, m in enumerate(msgs):
        expected = reference_seal(algorithm, m[0], m[1], m[2], m[3])
        assert host(gpu, dsts[i])[: len(m[2])].tobytes() + tags[i].tobytes() == expected
        if i % 2:  # out of place: the input is left unchanged, bytes past the message too
            assert host(gpu, srcs[i]).tobytes() == m[2]
            assert not host(gpu, dsts[i])[len(m[2]):].any()


@pytest.mark.parametrize("algorithm,key_sizes", CASES)
def test_open_batch_both_tag_paths_agree_and_release_nothing_on_failure(gpu, algorithm, key_sizes):
    msgs = _batch(algorithm, [0, 16, 33, 100], key_sizes)
    sealed = [reference_seal(algorithm, *m) for m in msgs]
    bad = {0, 1, 2}  # 0 is the empty message: its tag alone is altered
    verdicts = {}
    for tag in ("gpu", "host"):
        cts = [np.frombuffer(s[:-16], dtype=np.uint8).copy() for s in sealed]
        for i in bad:  # flip one ciphertext bit, or the tag for an empty message
            if len(cts[i]):
                cts[i][0] ^= 1
        tags = [s[-16:] if i not in bad or len(cts[i]) else bytes(16) for i, s in enumerate(sealed)]
        outs = [dev(gpu, np.full(len(c), 0x55, dtype=np.uint8)) for c in cts]
        ok = gpu.open_batch(algorithm, [m[0] for m in msgs], [m[1] for m in msgs],
                            [dev(gpu, c) for c in cts], tags, [m[3] for m in msgs], outs, tag=tag)
        verdicts[tag] = list(ok)
        for i, m in enumerate(msgs):
            out = host(gpu, outs[i])
            if i in bad:
                assert not ok[i] and not out.any(), "a failed message's output must be zeroed"
            else:
                assert ok[i] and out.tobytes() == m[2]
    assert verdicts["gpu"] == verdicts["host"] == [i not in bad for i in range(len(msgs))]


def test_in_place_open_failure_leaves_ciphertext(gpu):
    key, nonce, data = os.urandom(32), os.urandom(12), os.urandom(200)
    sealed = reference.ChaCha20Poly1305(key).encrypt(nonce, data, b"")
    ct = dev(gpu, sealed[:-16])
    wrong_tag = bytes(16)
    ok = gpu.open_batch("chacha20-poly1305", [key], [nonce], [ct], [wrong_tag], [b""], [ct])
    assert not ok[0] and host(gpu, ct).tobytes() == sealed[:-16]
    ok = gpu.open_batch("chacha20-poly1305", [key], [nonce], [ct], [sealed[-16:]], [b""], [ct])
    assert ok[0] and host(gpu, ct).tobytes() == data


def test_device_tags_feed_open_batch(gpu):
    """Tags stay on the device between seal and open (no host round trip needed)."""
    key, nonce = os.urandom(16), os.urandom(12)
    original = os.urandom(129)
    buf = dev(gpu, original)
    tags = gpu.seal_batch("aes-gcm", [key], [nonce], [buf], [b"a"], [buf])
    ok = gpu.open_batch("aes-gcm", [key], [nonce], [buf], tags, [b"a"], [buf])
    assert ok[0] and host(gpu, buf).tobytes() == original


def test_one_tag_not_in_a_list_is_a_type_error_saying_what_tags_are(gpu):
    """A one-message batch given its tag's bytes (not a list of one) raised AttributeError
    ("'bytes' object has no attribute 'copy_to_host'"), before any launch; the other
    wrong forms of tags say what is expected."""
    key, nonce = os.urandom(32), os.urandom(12)
    buf = dev(gpu, os.urandom(40))
    tags = gpu.seal_batch("chacha20-poly1305", [key], [nonce], [buf], [b""], [buf])
    tag = host(gpu, tags)[:16].tobytes()
    for given in (bytes(tag), bytearray(tag), memoryview(bytes(tag))):
        with pytest.raises(TypeError, match=r"tags must be a list of 1 16-byte tags.*uint8\[1, 16\]"):
            gpu.open_batch("chacha20-poly1305", [key], [nonce], [buf], given, [b""], [buf])
    assert gpu.open_batch("chacha20-poly1305", [key], [nonce], [buf], [tag], [b""], [buf])[0]


@pytest.mark.parametrize("algorithm,iv", [("chacha20", (5).to_bytes(4, "little") + bytes(12)),
                                          ("aes-ctr", b"\x00" * 8 + b"\xff" * 8)])
def test_keystream_on_device_arrays_at_any_position(gpu, algorithm, iv):
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    key = os.urandom(32)
    data = os.urandom(300)
    full = (Cipher(algorithms.ChaCha20(key, iv), None) if algorithm == "chacha20"
            else Cipher(algorithms.AES(key), modes.CTR(iv))).encryptor().update(bytes(400))
    for position in (0, 1, 63, 64, 100):
        buf = dev(gpu, data)
        gpu.xor_keystream_device(algorithm, key, iv, position, buf)
        expected = bytes(a ^ b for a, b in zip(data, full[position:position + len(data)]))
        assert host(gpu, buf).tobytes() == expected


def test_argument_errors(gpu):
    buf = dev(gpu, np.zeros(4, dtype=np.uint8))
    with pytest.raises(ValueError, match="algorithm"):
        gpu.seal_batch("rot13", [bytes(32)], [bytes(12)], [buf], [b""], [buf])
    with pytest.raises(ValueError, match="one entry per message"):
        gpu.seal_batch("aes-gcm", [bytes(16)], [bytes(12)] * 2, [buf], [b""], [buf])
    with pytest.raises(ValueError, match="message 0"):
        gpu.seal_batch("chacha20-poly1305", [bytes(16)], [bytes(12)], [buf], [b""], [buf])
    with pytest.raises(ValueError, match="destination"):
        gpu.seal_batch("aes-gcm", [bytes(16)], [bytes(12)], [buf], [b""],
                       [dev(gpu, np.zeros(2, np.uint8))])
    with pytest.raises(ValueError, match="contiguous"):
        gpu.as_device_bytes(dev(gpu, np.zeros(8, dtype=np.uint8))[::2])


@pytest.mark.parametrize("algorithm,nonce_len", [("chacha20-poly1305", 12), ("xchacha20-poly1305", 24),
                                                 ("aes-gcm", 8)])
def test_a_batch_plan_shows_no_key_material_in_its_repr(gpu, algorithm, nonce_len):
    """A plan is a local of every batch call (a traceback that shows locals prints it): its
    generated repr printed the keys, XChaCha20's subkeys and GCM's J0 blocks (GHASH under
    H for nonces of other lengths than 12, from which H can be solved for)."""
    from gpucrypt.backends import gpu as module
    from gpucrypt._host_primitives import gcm_j0, xchacha20_key_nonce

    key, nonce = bytes(range(32)), bytes(range(100, 100 + nonce_len))
    buf = dev(gpu, np.zeros(8, dtype=np.uint8))
    plan = gpu._plan(algorithm, [key], [nonce], [buf], [b""], [buf], "gpu")
    assert isinstance(plan, module._Plan)
    secrets = [key, key.hex()]
    if algorithm == "xchacha20-poly1305":
        secrets.append(xchacha20_key_nonce(key, nonce)[0])
    if algorithm == "aes-gcm":
        secrets.append(gcm_j0(key, nonce))
    text = repr(plan)
    assert not [s for s in secrets if (s if isinstance(s, str) else repr(s)[2:-1]) in text], text
    assert algorithm in text and "n=1" in text


class _ExportedArray:
    """A bare __cuda_array_interface__ (v3, explicit strides), as an exporter writes one;
    never dereferenced: only its description is read."""

    def __init__(self, shape, strides):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": "<f4", "data": (1 << 20, False),
                                         "version": 3, "strides": strides}


@pytest.mark.parametrize("shape, strides", [((4, 1), (4, 0)), ((1, 4), (0, 4)),
                                            ((4, 1), (4, 64)), ((3, 1, 2), (8, 0, 4))])
def test_an_axis_of_length_one_may_have_any_stride(shape, strides):
    """x[:, None] exported with stride 0 on its new axis is contiguous memory (NumPy's own
    flags say so, and the simulator's path took it), but was refused as not C-contiguous."""
    from gpucrypt.backends.gpu import _interface_of

    assert _interface_of(_ExportedArray(shape, strides)) == (1 << 20, 4 * int(np.prod(shape)))


@pytest.mark.parametrize("shape, strides", [((2, 3), (4, 8)), ((4, 1), (8, 4)), ((3, 2), (8, 8))])
def test_strides_that_skip_or_reorder_memory_are_refused(shape, strides):
    from gpucrypt.backends.gpu import _interface_of

    with pytest.raises(ValueError, match="not C-contiguous"):
        _interface_of(_ExportedArray(shape, strides))


@pytest.mark.parametrize("strides", [(12,), (12, 4, 99)])
def test_strides_that_do_not_match_the_shape_are_refused(strides):
    """zip() stopped at the shorter of shape and strides: a malformed interface with one
    stride too few or too many read as contiguous."""
    from gpucrypt.backends.gpu import _interface_of

    with pytest.raises(ValueError, match="malformed"):
        _interface_of(_ExportedArray((2, 3), strides))
