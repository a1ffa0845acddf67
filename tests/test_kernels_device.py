"""Every kernel with the device's integer typing and geometry, against `cryptography` (no GPU needed).

``tests/_device_typed.py`` compiles each kernel and its device functions with
``numba.njit`` (numba-cuda's integer typing: ``uint32 << uint32`` is ``uint64``, as on
a device, where the simulator wraps), runs 256 threads per block on several blocks
(grid-stride loops of more than one round, several warps, several Poly1305 tiles
per block), checks every array access (``boundscheck``) and every 16-byte load or
store (aligned, inside its array). Inputs cover counter wraps at 2**32, 2**64 and
2**128 and buffer offsets past 2**31 and 2**32 (a 4 GiB anonymous mapping, of which
only the touched pages exist).

One test per kernel module, so that each kernel is compiled once per test process
(njit compiles per process; pytest-xdist spreads tests over processes).
"""
from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

import _device_typed as dt
from _layout import pack_buffer
from gpucrypt.kernels import aes as ka
from gpucrypt.kernels import chacha20 as kc
from gpucrypt.kernels import ghash as kg
from gpucrypt.kernels import poly1305 as kp
from test_kernel_aes import ref_keystream
from test_kernel_chacha20 import libsodium_djb_xor, reference_xor

#: Offsets past 2**31 and 2**32 (and across both) in the big buffer; 16-byte aligned and not.
BIG_OFFSETS = (2**31 - 37, 2**31 + 512, 2**32 - 256, 2**32 - 5, 2**32 + 8192)
BIG_LENGTHS = (100, 64 * 5 + 16, 200, 4096 + 7, 1000)
BIG_SIZE = 2**32 + 2**20


@pytest.fixture(scope="module")
def big_buffer():
    """uint8[2**32 + 1 MiB], C-contiguous, backed by an anonymous mapping (untouched pages cost nothing)."""
    region = mmap.mmap(-1, BIG_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = np.frombuffer(region, dtype=np.uint8)
    yield buf  # the mapping goes when the last view of it does


def assert_results_fit_their_type(kernels, called):
    """Every device function the kernels called returns ``uint32`` for 32-bit values (see
    ``_device_typed.WIDE_BY_DESIGN``), and the functions named in ``called`` were among them."""
    assert dt.widened_results(kernels) == []
    assert set(called) <= dt.compiled_device_functions(kernels)


def _fill(buf, offsets, lengths, rng):
    for off, n in zip(offsets, lengths):
        buf[off:off + n] = rng.integers(0, 256, n, dtype=np.uint8)
    return [buf[off:off + n].tobytes() for off, n in zip(offsets, lengths)]


def _aead_parts(rng, n, lengths=(0, 1, 15, 16, 17, 63, 64, 100, 511, 513, 2000, 5000)):
    return [(rng.bytes(int(rng.choice([0, 1, 13, 16, 17, 40, 300]))), rng.bytes(int(rng.choice(lengths))))
            for _ in range(n)]


# --------------------------------------------------------------------------- ChaCha20


def _chacha_expected(key, nonce12, position, data):
    """64-bit block counter (nonce word 0 as its high half): libsodium; below 2**38, also cryptography."""
    n0 = int.from_bytes(nonce12[:4], "little")
    counter64 = ((n0 << 32) + position // 64) % 2**64
    skip = position % 64
    out = libsodium_djb_xor(key, counter64, nonce12[4:], bytes(skip) + data)[skip:]
    if position + len(data) <= kc.COUNTER32_LIMIT:
        assert out == reference_xor(key, nonce12, position, data)
    return out


def _run_chacha(src, dst, keys, segments):
    table, unit_start = kc.pack_segments([s["src"] for s in segments], [s["dst"] for s in segments],
                                         [s["len"] for s in segments], [s["key"] for s in segments],
                                         np.stack([kc.nonce_words(s["nonce"]) for s in segments]),
                                         [s["pos"] for s in segments])
    dt.chacha20_xor(src, dst, np.stack([kc.key_words(k) for k in keys]), table, unit_start, len(segments))


def test_chacha20_device_typed(big_buffer):
    rng = np.random.default_rng(15)
    keys = [rng.bytes(32) for _ in range(3)]
    positions = [0, 64 * 7 + 5, (2**32 - 3) * 64 + 9,  # 32-bit counter word rolls into word 13
                 kc.COUNTER32_LIMIT - 64 * 70 - 3, 2**64 - 64 * 3 + 11, 2**63 + 12345]  # 2**64 wrap
    segments, cursor = [], 0
    for i in range(24):
        length = int(rng.choice([0, 1, 15, 16, 63, 64, 65, 127, 128, 1000, 4096 + 17]))
        cursor += int(rng.integers(0, 40)) if i % 2 else -cursor % 64  # aligned (128-bit path) and not
        pos = positions[i % len(positions)] + int(rng.integers(0, 2**12)) * (i % 2)
        pos = min(pos, 2**64 - 1 - length)
        segments.append({"src": cursor, "dst": cursor, "len": length, "key": i % 3, "nonce": rng.bytes(12),
                         "pos": pos})
        cursor += length
    cursor += -cursor % 64
    segments.append({"src": cursor, "dst": cursor, "len": 64 * 3 * dt.DEVICE_THREADS, "key": 1,
                     "nonce": rng.bytes(12), "pos": 64 * 5})  # a long aligned segment: several grid-stride rounds
    cursor += segments[-1]["len"]
    src = dt_aligned(rng.integers(0, 256, cursor + 64, dtype=np.uint8))
    expected = [_chacha_expected(keys[s["key"]], s["nonce"], s["pos"], src[s["src"]:s["src"] + s["len"]].tobytes())
                for s in segments]
    assert sum(-(-(s["pos"] % 64 + s["len"]) // 64) for s in segments) > 3 * dt.DEVICE_THREADS  # > 1 round
    for dst_shift in (0, 7):  # in place; out of place, destination misaligned against the source
        dst = src.copy() if dst_shift == 0 else dt_aligned(np.zeros(cursor + 64 + dst_shift, np.uint8))[dst_shift:]
        _run_chacha(src, dst, keys, segments)
        got = [dst[s["src"]:s["src"] + s["len"]].tobytes() for s in segments]
        assert got == expected, f"dst_shift={dst_shift}"

    originals = _fill(big_buffer, BIG_OFFSETS, BIG_LENGTHS, rng)
    nonce = rng.bytes(12)
    for shift in (0, 2**20 - 4096 - 64):  # in place; out of place, destination further up
        big_segments = [{"src": o, "dst": o + shift, "len": n, "key": 0, "nonce": nonce, "pos": 64 * (i + 1)}
                        for i, (o, n) in enumerate(zip(BIG_OFFSETS, BIG_LENGTHS)) if o + shift + n <= BIG_SIZE]
        for s, data in zip(big_segments, originals):
            big_buffer[s["src"]:s["src"] + s["len"]] = np.frombuffer(data, np.uint8)
        _run_chacha(big_buffer, big_buffer, keys, big_segments)
        for s, data in zip(big_segments, originals):
            want = _chacha_expected(keys[0], nonce, s["pos"], data)
            assert big_buffer[s["dst"]:s["dst"] + s["len"]].tobytes() == want, (s["src"], shift)
    assert_results_fit_their_type(dt.chacha20, ["chacha20_block", "_quarter_round", "_rotl", "find_segment"])


def dt_aligned(a: np.ndarray, align: int = 64) -> np.ndarray:
    """A copy of ``a`` whose element 0 is ``align``-byte aligned."""
    raw = np.zeros(a.size + align, a.dtype)
    shift = (-raw.ctypes.data) % align
    out = raw[shift:shift + a.size]
    out[:] = a
    return out


# --------------------------------------------------------------------------- AES-CTR


def _run_aes(src, dst, round_keys, rounds, segments):
    table, unit_start = ka.pack_segments([s["src"] for s in segments], [s["dst"] for s in segments],
                                         [s["len"] for s in segments], [s["key"] for s in segments],
                                         np.stack([ka.counter_block_words(s["ctr"]) for s in segments]),
                                         [s["pos"] for s in segments], inc32=[s["inc32"] for s in segments])
    dt.aes_ctr_xor(src, dst, round_keys, rounds, table, unit_start, len(segments))


def test_aes_ctr_device_typed(big_buffer):
    for key_bytes in (16, 24, 32):  # one test, so that one process compiles the kernel (not a parameter)
        _check_aes(key_bytes, big_buffer)


def _check_aes(key_bytes, big_buffer):
    rng = np.random.default_rng(key_bytes)
    keys = [rng.bytes(key_bytes) for _ in range(2)]
    round_keys = np.stack([ka.expand_key(k)[0] for k in keys])
    rounds = ka.ROUNDS_FOR_KEY_BYTES[key_bytes]
    counters = [rng.bytes(16),
                rng.bytes(12) + (2**32 - 5).to_bytes(4, "big"),  # inc32 wraps at 2**32
                rng.bytes(8) + (2**64 - 7).to_bytes(8, "big"),  # full rule carries into the upper 64 bits
                (2**128 - 9).to_bytes(16, "big")]  # full rule wraps at 2**128
    segments, cursor = [], 0
    for i in range(20):
        length = int(rng.choice([0, 1, 15, 16, 17, 31, 32, 33, 100, 1000, 2048 + 5]))
        cursor += int(rng.integers(0, 40)) if i % 2 else -cursor % 64
        pos = int(rng.choice([0, 16 * 3 + 5, int(rng.integers(0, 2**12))]))
        segments.append({"src": cursor, "dst": cursor, "len": length, "key": i % 2, "ctr": counters[i % 4],
                         "pos": pos, "inc32": bool((i // 4) % 2)})
        cursor += length
    segments.append({"src": cursor, "dst": cursor, "len": 16 * 1600, "key": 0, "ctr": counters[3], "pos": 2**63,
                     "inc32": False})  # a long aligned segment: several grid-stride rounds
    cursor += 16 * 1600
    src = dt_aligned(rng.integers(0, 256, cursor + 32, dtype=np.uint8))
    dst = src.copy()
    _run_aes(src, dst, round_keys, rounds, segments)
    assert_results_fit_their_type(dt.aes, ["_pick", "_round", "_final_word_le", "_counter_words", "bswap32"])
    for s in segments:
        data = src[s["src"]:s["src"] + s["len"]].tobytes()
        want = bytes(a ^ b for a, b in zip(data, ref_keystream(keys[s["key"]], s["ctr"], s["pos"], s["len"],
                                                                s["inc32"])))
        assert dst[s["src"]:s["src"] + s["len"]].tobytes() == want, (s["len"], s["pos"], s["inc32"])

    if key_bytes != 16:
        return
    originals = _fill(big_buffer, BIG_OFFSETS, BIG_LENGTHS, rng)
    big = [{"src": o, "dst": o, "len": n, "key": 1, "ctr": counters[1], "pos": 16 * i, "inc32": True}
           for i, (o, n) in enumerate(zip(BIG_OFFSETS, BIG_LENGTHS))]
    _run_aes(big_buffer, big_buffer, round_keys, rounds, big)
    for s, data in zip(big, originals):
        ks = ref_keystream(keys[1], s["ctr"], s["pos"], s["len"], True)
        assert big_buffer[s["src"]:s["src"] + s["len"]].tobytes() == bytes(a ^ b for a, b in zip(data, ks))


# --------------------------------------------------------------------------- GHASH (AES-GCM tags)


def _gcm_tags(aad_buf, aad_offsets, aads, ct_buf, ct_offsets, cts, key, nonces, chunk_blocks, one_key=False):
    n = len(cts)
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    h = np.frombuffer(ecb.update(bytes(16)) * n, np.uint8).reshape(n, 16).copy()
    ekj0 = np.frombuffer(b"".join(ecb.update(nonce + b"\0\0\0\1") for nonce in nonces), np.uint8).reshape(n, 16)
    table = kg.pack_messages(aad_offsets, [len(a) for a in aads], ct_offsets, [len(c) for c in cts],
                             chunk_blocks=chunk_blocks)
    tags = np.zeros((n, 16), np.uint8)
    dt.ghash_aead_tags(aad_buf, ct_buf, table, n, h, ekj0.copy(), tags, one_key=one_key)
    return [bytes(t) for t in tags], table.levels


def test_ghash_device_typed(big_buffer):
    rng = np.random.default_rng(128)
    key = rng.bytes(32)
    gcm = AESGCM(key)
    parts = _aead_parts(rng, 10)
    nonces = [rng.bytes(12) for _ in parts]
    sealed = [gcm.encrypt(nonce, pt, aad) for (aad, pt), nonce in zip(parts, nonces)]
    aads = [aad for aad, _ in parts]
    cts = [s[:-16] for s in sealed]
    for chunk_blocks, gaps in ((kg.DEFAULT_CHUNK_BLOCKS, False), (2, True), (4, False)):
        aad_buf, aad_offsets = pack_buffer(aads, rng, random_gaps=gaps)
        ct_buf, ct_offsets = pack_buffer(cts, rng, random_gaps=gaps)
        # One key for all: the table kernel (kernels/ghash.py: _ghash_blocks) and the mixed-key one.
        for one_key in (False, True):
            tags, levels = _gcm_tags(dt_aligned(aad_buf), aad_offsets, aads, dt_aligned(ct_buf), ct_offsets, cts,
                                     key, nonces, chunk_blocks, one_key)
            assert tags == [s[-16:] for s in sealed], (chunk_blocks, gaps, one_key)
            assert levels > 1 or chunk_blocks == kg.DEFAULT_CHUNK_BLOCKS
    assert_results_fit_their_type(dt.ghash, ["load_be32", "load_be32_partial", "load_block", "gf128_prime",
                                             "gf128_mul", "bswap32", "gf128_square", "gf128_reduce", "mul_x",
                                             "nibble_element", "table_lookup", "table_word", "table_block",
                                             "table_groups", "horner_field_tables"])

    # Ciphertexts at offsets past 2**31 and 2**32: the tag of whatever bytes lie there.
    originals = _fill(big_buffer, BIG_OFFSETS, BIG_LENGTHS, rng)
    big_aads = [rng.bytes(int(rng.integers(0, 40))) for _ in BIG_OFFSETS]
    big_nonces = [rng.bytes(12) for _ in BIG_OFFSETS]
    ctr = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    want = []
    for aad, ct, nonce in zip(big_aads, originals, big_nonces):
        # AES-GCM encrypts in CTR mode from inc32(J0): the plaintext that gives this ciphertext is ct ^ keystream.
        ks = b"".join(ctr.update(nonce + (2 + i).to_bytes(4, "big")) for i in range(-(-len(ct) // 16)))
        pt = bytes(a ^ b for a, b in zip(ct, ks))
        sealed_big = gcm.encrypt(nonce, pt, aad)
        assert sealed_big[:-16] == ct
        want.append(sealed_big[-16:])
    aad_buf, aad_offsets = pack_buffer(big_aads, rng)
    for chunk_blocks, one_key in ((kg.DEFAULT_CHUNK_BLOCKS, False), (2, False), (kg.DEFAULT_CHUNK_BLOCKS, True)):
        tags, _ = _gcm_tags(aad_buf, aad_offsets, big_aads, big_buffer, list(BIG_OFFSETS), originals, key,
                            big_nonces, chunk_blocks, one_key)
        assert tags == want, (chunk_blocks, one_key)


# --------------------------------------------------------------------------- Poly1305 (ChaCha20-Poly1305 tags)


def _one_time_key(key, nonce):
    return Cipher(algorithms.ChaCha20(key, b"\0\0\0\0" + nonce), None).encryptor().update(bytes(32))


def _poly_tags(aad_buf, aad_offsets, aads, ct_buf, ct_offsets, cts, otks, chunk_blocks, combine_width):
    n = len(cts)
    table = kp.pack_messages(aad_offsets, [len(a) for a in aads], ct_offsets, [len(c) for c in cts],
                             chunk_blocks=chunk_blocks, combine_width=combine_width)
    tags = np.zeros((n, 16), np.uint8)
    dt.poly1305_aead_tags(aad_buf, ct_buf, table, n, np.frombuffer(b"".join(otks), np.uint8).reshape(n, 32).copy(),
                          tags)
    return [bytes(t) for t in tags], table


def test_poly1305_device_typed(big_buffer):
    rng = np.random.default_rng(1305)
    key = rng.bytes(32)
    aead = ChaCha20Poly1305(key)
    parts = _aead_parts(rng, 12)
    nonces = [rng.bytes(12) for _ in parts]
    sealed = [aead.encrypt(nonce, pt, aad) for (aad, pt), nonce in zip(parts, nonces)]
    aads = [aad for aad, _ in parts]
    cts = [s[:-16] for s in sealed]
    otks = [_one_time_key(key, nonce) for nonce in nonces]
    for chunk_blocks, combine_width, gaps in ((kp.DEFAULT_CHUNK_BLOCKS, kp.DEFAULT_COMBINE_WIDTH, False),
                                              (1, 2, True), (2, 4, False)):
        aad_buf, aad_offsets = pack_buffer(aads, rng, random_gaps=gaps)
        ct_buf, ct_offsets = pack_buffer(cts, rng, random_gaps=gaps)
        tags, table = _poly_tags(dt_aligned(aad_buf), aad_offsets, aads, dt_aligned(ct_buf), ct_offsets, cts, otks,
                                 chunk_blocks, combine_width)
        assert tags == [s[-16:] for s in sealed], (chunk_blocks, combine_width, gaps)
        if chunk_blocks == 1:  # several tiles per block, several blocks, several combine levels
            assert table.group_totals[0] > 2 * dt.DEVICE_THREADS // kp.TILE_LANES and table.levels >= 2
    assert_results_fit_their_type(dt.poly1305, ["_bytes_word", "fe_carry", "fe_mul", "write_tag", "fe_from_block"])

    from cryptography.hazmat.primitives.poly1305 import Poly1305

    originals = _fill(big_buffer, BIG_OFFSETS, BIG_LENGTHS, rng)
    big_aads = [rng.bytes(int(rng.integers(0, 40))) for _ in BIG_OFFSETS]
    big_otks = [rng.bytes(32) for _ in BIG_OFFSETS]
    want = []
    for aad, ct, otk in zip(big_aads, originals, big_otks):
        mac_data = (aad + bytes(-len(aad) % 16) + ct + bytes(-len(ct) % 16)
                    + struct.pack("<QQ", len(aad), len(ct)))
        want.append(Poly1305.generate_tag(otk, mac_data))
    aad_buf, aad_offsets = pack_buffer(big_aads, rng)
    for chunk_blocks, combine_width in ((kp.DEFAULT_CHUNK_BLOCKS, kp.DEFAULT_COMBINE_WIDTH), (1, 2)):
        tags, _ = _poly_tags(aad_buf, aad_offsets, big_aads, big_buffer, list(BIG_OFFSETS), originals, big_otks,
                             chunk_blocks, combine_width)
        assert tags == want, (chunk_blocks, combine_width)


@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") != "0",
                    reason="numba-cuda's compiler needs the simulator off: this runs in "
                           "test_the_device_build_of_the_kernel_modules_too's own process")
def test_the_device_typed_route_types_integers_as_numba_cuda_does_for_sm90():
    """This module's instrument, checked: every device function the tests above compiled
    with njit (every signature they used) returns the type numba-cuda's own typing gives it
    for sm_90 (``compile_ptx``, no GPU needed). A twin typed otherwise would test other
    arithmetic than the device runs. Runs after the tests above, in their process."""
    from types import SimpleNamespace

    from numba import cuda
    from numba.cuda import dispatcher

    # compile_ptx asks for the current device's capability even when given cc: there is none
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=(9, 0))
    checked, differ = 0, []
    for kernels, mod in ((dt.chacha20, kc), (dt.aes, ka), (dt.ghash, kg), (dt.poly1305, kp)):
        for name, fn in sorted(kernels.device_functions.items()):
            device_function = getattr(mod, name, None)
            if not hasattr(device_function, "py_func"):
                continue  # a twin of the harness's own (an inline-PTX helper's)
            for args, compiled in fn.overloads.items():
                _, device_type = cuda.compile_ptx(device_function.py_func, args, device=True,
                                                  cc=(9, 0))
                checked += 1
                if str(device_type) != str(compiled.signature.return_type):
                    differ.append(f"{mod.__name__}.{name}{args}: njit "
                                  f"{compiled.signature.return_type}, numba-cuda {device_type}")
    assert checked >= 50 and not differ, (checked, differ)


def test_the_device_build_of_the_kernel_modules_too():
    """The tests above once more with numba's simulator off, in a fresh process.

    Without the simulator the kernel modules define their device build: inline PTX where
    the simulator has Python twins (``_device_typed`` replaces each with an njit twin).
    Under the simulator the tests above see the twins only, and missed a new inline-PTX
    function (GHASH's ``opaque_u32``) that only failed on a GPU machine. No GPU is needed.
    """
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env["NUMBA_ENABLE_CUDASIM"] = "0"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "not device_build"], capture_output=True, text=True, env=env, timeout=600,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert run.returncode == 0 and "\n5 passed" in run.stdout, \
        run.stdout[-4000:] + run.stderr[-2000:]
