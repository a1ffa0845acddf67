"""Host-side half of ``gpucrypt bench``: the algorithms, the operations each library
offers for them, and the wall-clock timing loop.

An *operation* is a zero-argument callable that encrypts (or decrypts) one message
of a fixed size on buffers it allocated once, so that only the cryptography is
timed: ``cryptography``'s ``encrypt_into``/``decrypt_into`` and
``update_into``, pycryptodome's ``output=`` arguments, gpucrypt's ``*_into``
methods. PyNaCl has no ``_into`` API, so its operations allocate their result, as
every PyNaCl caller's do. Each message gets a fresh cipher object (what a caller
with a new nonce per message does); the key schedule is done once where the
library allows it (``cryptography``'s and gpucrypt's AEAD objects).

Memory: one shared plaintext (and, for decryption, one shared ``ciphertext || tag``
made by ``cryptography`` or libsodium) per algorithm and size, plus one output
buffer per thread and implementation. A 1 GiB cell with two threads therefore
holds about 4 GiB.

Timing (:func:`time_host`): one warm-up call, a calibration run of at least 5 ms
(unless the warm-up itself took 0.1 s or more), then :data:`TARGET_REPETITIONS` repetitions (more for budgets over 0.14 s, up to
:data:`MAX_REPETITIONS`) of a loop sized to fill the per-cell budget; the result is the median seconds per operation. With ``threads``
> 1 every thread runs its own operation on its own buffers, started together
behind a barrier; a repetition lasts until the last thread finishes.
"""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

Operation = Callable[[], object]

#: Repetitions per cell when the budget allows; the median of these is reported.
TARGET_REPETITIONS = 7
#: Longer budgets buy more repetitions (one per this many seconds), up to MAX_REPETITIONS:
#: short repetitions let the median step over bursts of load on a shared machine.
REPETITION_SECONDS = 0.02
MAX_REPETITIONS = 31
#: Fewest repetitions per cell, even when one call is longer than the budget.
MIN_REPETITIONS = 3
#: Calibration runs at least this long before the loop size is chosen.
CALIBRATION_SECONDS = 0.005


class NotAvailable(Exception):
    """An implementation cannot run an algorithm here; the message says why."""


@dataclass(frozen=True)
class Algorithm:
    """One benchmarked algorithm.

    ``family`` is the name the gpucrypt backends use (``"aes-gcm"`` for both AES-GCM
    key sizes); ``nonce_size`` is the AEAD nonce, or 16 for the stream ciphers'
    ``cryptography``-style IV (ChaCha20: 32-bit little-endian counter || 96-bit
    nonce; AES-CTR: the initial counter block). ``baseline`` is the implementation
    every other one is compared with.
    """

    name: str
    kind: str            # "aead" | "stream"
    family: str
    key_size: int
    nonce_size: int
    baseline: str = "cryptography"


ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Algorithm("chacha20", "stream", "chacha20", 32, 16),
    Algorithm("aes-128-ctr", "stream", "aes-ctr", 16, 16),
    Algorithm("aes-256-ctr", "stream", "aes-ctr", 32, 16),
    Algorithm("chacha20-poly1305", "aead", "chacha20-poly1305", 32, 12),
    # cryptography has no XChaCha20-Poly1305: libsodium (PyNaCl) is the library people use.
    Algorithm("xchacha20-poly1305", "aead", "xchacha20-poly1305", 32, 24, baseline="pynacl"),
    Algorithm("aes-128-gcm", "aead", "aes-gcm", 16, 12),
    Algorithm("aes-256-gcm", "aead", "aes-gcm", 32, 12),
)}

OPERATIONS = ("encrypt", "decrypt")


class Material:
    """Key, nonce and the shared input buffers for one algorithm and message size.

    ``plaintext`` is a read-only ``uint8`` array; ``sealed`` (``ciphertext || tag`` for
    AEADs, the ciphertext for stream ciphers) is made on first use by the baseline
    library, so every implementation decrypts the very same bytes (and a wrong one
    fails loudly instead of timing garbage).
    """

    def __init__(self, algorithm: Algorithm, size: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.algorithm = algorithm
        self.size = size
        self.key = rng.bytes(algorithm.key_size)
        nonce = rng.bytes(algorithm.nonce_size)
        if algorithm.name == "chacha20":
            nonce = bytes(4) + nonce[4:]  # block counter 0, as RFC 8439 starts a stream
        self.nonce = nonce
        self.aad = b""
        self.plaintext = np.frombuffer(rng.bytes(size), dtype=np.uint8)  # read-only
        self._sealed: np.ndarray | None = None
        self._plaintext_bytes: bytes | None = None

    @property
    def plaintext_bytes(self) -> bytes:
        """``plaintext`` as ``bytes`` (PyNaCl accepts nothing else); made once."""
        if self._plaintext_bytes is None:
            self._plaintext_bytes = self.plaintext.tobytes()
        return self._plaintext_bytes

    @property
    def sealed(self) -> np.ndarray:
        if self._sealed is None:
            self._sealed = _seal_reference(self)
            self._sealed.flags.writeable = False
        return self._sealed

    @property
    def sealed_bytes(self) -> bytes:
        return self.sealed.tobytes()


def _seal_reference(m: Material) -> np.ndarray:
    alg = m.algorithm
    if alg.kind == "stream":
        out = np.empty(m.size, dtype=np.uint8)
        _cryptography_stream(alg, m.key, m.nonce, decrypt=False).update_into(m.plaintext, out)
        return out
    if alg.family == "xchacha20-poly1305":
        from .._host_primitives import hchacha20  # same bytes as libsodium, no PyNaCl needed
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        subkey = hchacha20(m.key, m.nonce[:16])
        sealed = ChaCha20Poly1305(subkey).encrypt(bytes(4) + m.nonce[16:], m.plaintext, m.aad)
        return np.frombuffer(sealed, dtype=np.uint8).copy()
    out = np.empty(m.size + 16, dtype=np.uint8)
    _cryptography_aead(alg, m.key).encrypt_into(m.nonce, m.plaintext, m.aad, out)
    return out


# --------------------------------------------------------------------------- libraries

def _cryptography_aead(alg: Algorithm, key: bytes):
    from cryptography.hazmat.primitives.ciphers import aead

    if alg.family == "chacha20-poly1305":
        return aead.ChaCha20Poly1305(key)
    if alg.family == "aes-gcm":
        return aead.AESGCM(key)
    raise NotAvailable(f"cryptography has no {alg.name}")


def _cryptography_stream(alg: Algorithm, key: bytes, iv: bytes, decrypt: bool):
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if alg.family == "chacha20":
        cipher = Cipher(algorithms.ChaCha20(key, iv), None)
    else:
        cipher = Cipher(algorithms.AES(key), modes.CTR(iv))
    return cipher.decryptor() if decrypt else cipher.encryptor()


def _op_cryptography(m: Material, operation: str) -> Operation:
    alg, key, nonce, aad = m.algorithm, m.key, m.nonce, m.aad
    decrypt = operation == "decrypt"
    if alg.kind == "stream":
        src = m.sealed if decrypt else m.plaintext
        dst = np.empty(m.size, dtype=np.uint8)
        return lambda: _cryptography_stream(alg, key, nonce, decrypt).update_into(src, dst)
    cipher = _cryptography_aead(alg, key)
    if decrypt:
        src, dst = m.sealed, np.empty(m.size, dtype=np.uint8)
        return lambda: cipher.decrypt_into(nonce, src, aad, dst)
    src, dst = m.plaintext, np.empty(m.size + 16, dtype=np.uint8)
    return lambda: cipher.encrypt_into(nonce, src, aad, dst)


_GPUCRYPT_AEADS = {"chacha20-poly1305": "ChaCha20Poly1305", "xchacha20-poly1305": "XChaCha20Poly1305",
                   "aes-gcm": "AESGCM"}
_GPUCRYPT_STREAMS = {"chacha20": "ChaCha20", "aes-ctr": "AESCTR"}


def _gpucrypt_stream_context(alg: Algorithm, key: bytes, iv: bytes, device: str, decrypt: bool):
    """``gpucrypt.ciphers.ChaCha20``/``AESCTR``'s encryptor or decryptor, made the way
    ``Cipher(...).encryptor()`` is (a fresh context per message)."""
    from .. import ciphers

    cipher = getattr(ciphers, _GPUCRYPT_STREAMS[alg.family])(key, iv, device=device)
    return cipher.decryptor() if decrypt else cipher.encryptor()


def _op_gpucrypt(m: Material, operation: str, device: str) -> Operation:
    """gpucrypt's public classes on host buffers (``device="gpu"`` includes both PCIe copies)."""
    alg, key, nonce, aad = m.algorithm, m.key, m.nonce, m.aad
    decrypt = operation == "decrypt"
    if alg.kind == "stream":
        src = m.sealed if decrypt else m.plaintext
        dst = np.empty(m.size, dtype=np.uint8)
        return lambda: _gpucrypt_stream_context(alg, key, nonce, device, decrypt).update_into(src, dst)
    import gpucrypt

    cipher = getattr(gpucrypt, _GPUCRYPT_AEADS[alg.family])(key, device=device)
    if decrypt:
        src, dst = m.sealed, np.empty(m.size, dtype=np.uint8)
        return lambda: cipher.decrypt_into(nonce, src, aad, dst)
    src, dst = m.plaintext, np.empty(m.size + 16, dtype=np.uint8)
    return lambda: cipher.encrypt_into(nonce, src, aad, dst)


def _op_pycryptodome(m: Material, operation: str) -> Operation:
    try:
        from Crypto.Cipher import AES, ChaCha20, ChaCha20_Poly1305
    except ImportError:
        raise NotAvailable("pycryptodome is not installed (pip install pycryptodome)") from None
    alg, key, nonce, aad = m.algorithm, m.key, m.nonce, m.aad
    decrypt = operation == "decrypt"
    dst = memoryview(np.empty(m.size, dtype=np.uint8))  # it wants a writable memoryview
    if alg.kind == "stream":
        src = memoryview(m.sealed if decrypt else m.plaintext)
        if alg.family == "chacha20":
            counter = int.from_bytes(nonce[:4], "little")

            def make():
                c = ChaCha20.new(key=key, nonce=nonce[4:])
                if counter:
                    c.seek(64 * counter)
                return c
        else:
            def make():
                return AES.new(key, AES.MODE_CTR, nonce=b"", initial_value=nonce)
        if decrypt:
            return lambda: make().decrypt(src, output=dst)
        return lambda: make().encrypt(src, output=dst)

    if alg.family == "aes-gcm":
        def make():
            return AES.new(key, AES.MODE_GCM, nonce=nonce)
    else:  # pycryptodome picks XChaCha20 from the 24-byte nonce
        def make():
            return ChaCha20_Poly1305.new(key=key, nonce=nonce)
    if decrypt:
        ct, tag = memoryview(m.sealed[:-16]), m.sealed[-16:].tobytes()

        def open_one():
            c = make()
            c.update(aad)
            c.decrypt(ct, output=dst)
            c.verify(tag)
        return open_one
    src = memoryview(m.plaintext)
    tag_out = bytearray(16)

    def seal_one():
        c = make()
        c.update(aad)
        c.encrypt(src, output=dst)
        tag_out[:] = c.digest()
    return seal_one


def _op_pynacl(m: Material, operation: str) -> Operation:
    if m.algorithm.family != "xchacha20-poly1305":
        raise NotAvailable("benchmarked for XChaCha20-Poly1305 only")
    try:
        from nacl.bindings import (crypto_aead_xchacha20poly1305_ietf_decrypt,
                                   crypto_aead_xchacha20poly1305_ietf_encrypt)
    except ImportError:
        raise NotAvailable("PyNaCl is not installed (pip install pynacl)") from None
    key, nonce, aad = m.key, m.nonce, m.aad
    if operation == "decrypt":
        sealed = m.sealed_bytes
        return lambda: crypto_aead_xchacha20poly1305_ietf_decrypt(sealed, aad, nonce, key)
    plaintext = m.plaintext_bytes
    return lambda: crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, key)


def applicable(implementation: str, alg: Algorithm) -> bool:
    """Whether ``implementation`` offers ``alg`` at all (rows that make no sense are omitted;
    rows that make sense but cannot run here are shown as "not available")."""
    if implementation == "cryptography":
        return alg.family != "xchacha20-poly1305"
    if implementation == "pynacl":
        return alg.family == "xchacha20-poly1305"
    if implementation == "gpucrypt-gpu-hosttag":
        return alg.kind == "aead"  # stream ciphers have no tag
    return True


def host_operation(implementation: str, m: Material, operation: str) -> Operation:
    """A fresh operation (own output buffer) of a host-timed implementation."""
    if implementation == "cryptography":
        return _op_cryptography(m, operation)
    if implementation == "gpucrypt-cpu":
        return _op_gpucrypt(m, operation, "cpu")
    if implementation == "gpucrypt-gpu+transfer":
        return _op_gpucrypt(m, operation, "gpu")
    if implementation == "pycryptodome":
        return _op_pycryptodome(m, operation)
    if implementation == "pynacl":
        return _op_pynacl(m, operation)
    raise ValueError(f"{implementation} is not timed on the host")


# --------------------------------------------------------------------------- timing

@dataclass(frozen=True)
class Timing:
    """``median_seconds`` per operation round (one operation per thread)."""

    repetitions: int
    iterations: int
    median_seconds: float


def plan_loop(seconds_per_call: float, budget: float) -> tuple[int, int]:
    """(repetitions, iterations per repetition) filling ``budget`` seconds.

    At least :data:`MIN_REPETITIONS` repetitions of one call, even when that exceeds the
    budget (a median of fewer is not a median).
    """
    per_call = max(seconds_per_call, 1e-9)
    target = max(TARGET_REPETITIONS, min(MAX_REPETITIONS, int(budget / REPETITION_SECONDS)))
    if per_call * target <= budget:
        return target, max(1, int(budget / target / per_call))
    return max(MIN_REPETITIONS, min(target, int(budget / per_call))), 1


def calibrate(op: Operation) -> float:
    """Seconds per call of ``op``, from a run of at least :data:`CALIBRATION_SECONDS`."""
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            op()
        elapsed = time.perf_counter() - start
        if elapsed >= CALIBRATION_SECONDS:
            return elapsed / n
        n *= 4 if elapsed * 8 < CALIBRATION_SECONDS else 2


def _timed_loop(op: Operation, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        op()
    return time.perf_counter() - start


def _timed_threads(ops: list[Operation], iterations: int) -> float:
    """Wall seconds for every op to run ``iterations`` times, each in its own thread."""
    barrier = threading.Barrier(len(ops) + 1)
    errors: list[BaseException] = []

    def work(op):
        barrier.wait()
        try:
            for _ in range(iterations):
                op()
        except BaseException as exc:  # surfaced in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(op,), daemon=True) for op in ops]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    return elapsed


def time_host(make_op: Callable[[], Operation], threads: int, budget: float) -> Timing:
    """Median wall seconds per round of ``threads`` concurrent operations.

    ``make_op`` is called once per thread, so each thread owns its buffers.
    """
    result = time_host_group({"op": make_op}, threads, budget)["op"]
    if isinstance(result, NotAvailable):
        raise result
    return result


def time_host_group(makers: dict[str, Callable[[], Operation]], threads: int,
                    budget: float) -> dict[str, "Timing | NotAvailable"]:
    """:func:`time_host` for several implementations of one cell, repetitions interleaved.

    Repetition k of every implementation runs before repetition k + 1 of any, so a
    change in the machine's load during the cell (other processes, clock boost)
    hits every implementation alike and the ratios between them stay fair. A maker
    that raises :class:`NotAvailable` gets that exception back instead of a Timing.
    """
    plans: dict[str, tuple[list[Operation], int, int, list[float]]] = {}
    results: dict[str, Timing | NotAvailable] = {}
    for name, make in makers.items():
        try:
            ops = [make() for _ in range(threads)]
        except NotAvailable as exc:
            results[name] = exc
            continue
        start = time.perf_counter()
        for op in ops:
            op()  # warm-up: page faults on fresh buffers, lazy library set-up
        warm_up = (time.perf_counter() - start) / len(ops)
        # a warm-up long enough to time (a slow library, a big message) is the calibration
        per_call = warm_up if warm_up >= 20 * CALIBRATION_SECONDS else calibrate(ops[0])
        repetitions, iterations = plan_loop(per_call, budget)
        plans[name] = (ops, repetitions, iterations, [])
    for k in range(max((p[1] for p in plans.values()), default=0)):
        for ops, repetitions, iterations, samples in plans.values():
            if k < repetitions:
                samples.append(_timed_loop(ops[0], iterations) if threads == 1
                               else _timed_threads(ops, iterations))
    for name, (ops, repetitions, iterations, samples) in plans.items():
        results[name] = Timing(repetitions, iterations, statistics.median(samples) / iterations)
    return {name: results[name] for name in makers}
