"""Host-side half of ``gpucrypt bench``: the algorithms, the operations each library
offers for them, the check of every operation's output, and the wall-clock timing loop.

An *operation* is a zero-argument callable that encrypts (or decrypts) one message
of a fixed size and returns its output. Two *forms*:

- ``alloc``: the call returns a new result, as ``cryptography``'s and gpucrypt's
  ``encrypt()``/``decrypt()``, PyNaCl's functions and the stream ciphers' ``update()``
  do: the allocation is part of what a caller of that API pays;
- ``into``: the call writes into a buffer made once (``encrypt_into``/``decrypt_into``,
  ``update_into``, pycryptodome's ``output=``). PyNaCl has no such API, so
  XChaCha20-Poly1305's ``into`` table has no baseline.

Each message gets a fresh cipher object where the library needs one per nonce (what
a caller with a new nonce per message does); the key schedule is done once where
the library allows it (``cryptography``'s and gpucrypt's AEAD objects).

Checked before timed: the warm-up call's output of every operation, encryption
included, is compared with the reference (``cryptography``'s output; for
XChaCha20-Poly1305, HChaCha20 + ``cryptography``), so a wrong implementation stops
the run (:class:`WrongOutput`) instead of being timed.

Memory: one shared plaintext and one shared ``ciphertext || tag`` per algorithm and
size (``bytes``, with read-only NumPy views over them), and one output buffer per
thread shared by every implementation of the cell (they run one after another, never
together). A cell therefore holds about ``(2 + threads) x size``, plus one result of
an allocating call: the peak follows the largest size, not the sum of sizes.

Timing (:func:`time_host`): one warm-up call (checked), a calibration run of at least
5 ms (unless the warm-up itself took 0.1 s or more), then :data:`TARGET_REPETITIONS`
repetitions (more for budgets over 0.14 s, up to :data:`MAX_REPETITIONS`) of a loop
sized to fill the per-cell budget; the result is the median seconds per operation.
With ``threads`` > 1 every thread runs its own operation on its own buffers, started
together behind a barrier; a repetition lasts until the last thread finishes. A cell
whose repetitions spread widely (quartiles more than :data:`UNSTEADY_SPREAD` apart, for
any implementation) is run again, every implementation, up to
:data:`UNSTEADY_MAX_FACTOR` times the planned repetitions; one still unsteady after that
is reported as such (``Timing.unsteady``).
"""
from __future__ import annotations

import hmac
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

Operation = Callable[[], Any]
#: The call forms: returning a new result, or writing into a buffer made once.
FORMS = ("alloc", "into")

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
#: A cell whose repetitions' upper quartile is more than this fraction above their lower
#: quartile is unsteady (calls of 1 GiB that return a new buffer, say, whose page faults
#: cost 0.8 s or 3 s by the hypervisor's mood): every implementation of the cell then
#: runs more interleaved repetitions, up to UNSTEADY_MAX_FACTOR times those planned.
UNSTEADY_SPREAD = 0.25
UNSTEADY_MAX_FACTOR = 3


class NotAvailable(Exception):
    """An implementation cannot run an algorithm here; the message says why."""


class WrongOutput(RuntimeError):
    """An implementation's output differs from the reference: nothing of it is timed."""


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

    def baseline_for(self, form: str) -> str | None:
        """The baseline of ``form``'s table: None where the baseline library has no such
        call (PyNaCl, XChaCha20-Poly1305's, has no ``_into`` API)."""
        if form == "into" and self.baseline == "pynacl":
            return None
        return self.baseline


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

#: The largest message an AEAD row takes: 2**31 - 1 bytes, the most ``cryptography``'s AEAD
#: classes seal or open in one call (OverflowError beyond), and they make the reference
#: every row is checked against (XChaCha20-Poly1305's too, through ChaCha20Poly1305) and
#: are the baseline. The stream ciphers have no such limit (``update`` and
#: ``update_into`` took 2 GiB + 64 B under cryptography 50 and 51).
AEAD_MAX_SIZE = 2**31 - 1


class Material:
    """Key, nonce and the shared input buffers for one algorithm and message size.

    ``plaintext_bytes`` and ``sealed_bytes`` (``ciphertext || tag`` for AEADs, the
    ciphertext for stream ciphers, made on first use by the reference) are ``bytes``;
    ``plaintext`` and ``sealed`` are read-only ``uint8`` NumPy views of the same memory.
    Every implementation decrypts the very same bytes and is checked against them.
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
        self.plaintext_bytes = rng.bytes(size)
        self.plaintext = np.frombuffer(self.plaintext_bytes, dtype=np.uint8)  # read-only
        self._sealed: bytes | None = None

    @property
    def sealed_bytes(self) -> bytes:
        if self._sealed is None:
            self._sealed = _seal_reference(self)
        return self._sealed

    @property
    def sealed(self) -> np.ndarray:
        return np.frombuffer(self.sealed_bytes, dtype=np.uint8)

    def expected(self, operation: str) -> bytes:
        """What ``operation`` must output: the sealed bytes, or the plaintext."""
        return self.plaintext_bytes if operation == "decrypt" else self.sealed_bytes

    def output_size(self, operation: str) -> int:
        return len(self.expected(operation))


def _seal_reference(m: Material) -> bytes:
    alg = m.algorithm
    if alg.kind == "stream":
        return _cryptography_stream(alg, m.key, m.nonce, decrypt=False)().update(m.plaintext_bytes)
    if alg.family == "xchacha20-poly1305":
        from .._host_primitives import hchacha20  # same bytes as libsodium, no PyNaCl needed
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        subkey = hchacha20(m.key, m.nonce[:16])
        return ChaCha20Poly1305(subkey).encrypt(bytes(4) + m.nonce[16:], m.plaintext_bytes, m.aad)
    return _cryptography_aead(alg, m.key).encrypt(m.nonce, m.plaintext_bytes, m.aad)


def matches(output: Any, expected: bytes) -> bool:
    """Whether ``output`` (a buffer, or a tuple of buffers read one after another) holds
    exactly ``expected``; compared in place, without a copy of either."""
    parts = output if isinstance(output, tuple) else (output,)
    view, start = memoryview(expected), 0
    for part in parts:
        got = memoryview(part).cast("B") if not isinstance(part, (bytes, bytearray)) else part
        end = start + len(got)
        if end > len(view) or not hmac.compare_digest(got, view[start:end]):
            return False
        start = end
    return start == len(view)


def spoil(output: Any, expected: bytes) -> None:
    """Overwrite a writable ``output`` (as :func:`matches` reads it) with bytes that differ
    from ``expected`` in every position: implementations that share an output buffer must
    each be checked on bytes they wrote, not on what the one before left there."""
    parts = output if isinstance(output, tuple) else (output,)
    view, start = memoryview(expected), 0
    for part in parts:
        if isinstance(part, bytes):
            return  # an allocating form's own new bytes: nobody else writes them
        got = memoryview(part).cast("B")
        if got.readonly:
            return
        end = min(start + len(got), len(view))
        np.bitwise_not(np.frombuffer(view[start:end], dtype=np.uint8),
                       out=np.frombuffer(got, dtype=np.uint8)[:end - start])
        start = end


# --------------------------------------------------------------------------- libraries

def _cryptography_aead(alg: Algorithm, key: bytes):
    from cryptography.hazmat.primitives.ciphers import aead

    if alg.family == "chacha20-poly1305":
        return aead.ChaCha20Poly1305(key)
    if alg.family == "aes-gcm":
        return aead.AESGCM(key)
    raise NotAvailable(f"cryptography has no {alg.name}")


def _cryptography_stream(alg: Algorithm, key: bytes, iv: bytes, decrypt: bool):
    """A function making cryptography's context for one message (a fresh one per call, as
    a new nonce needs): the imports and choices here, outside the timed calls, where they
    added 0.7 us to a 64 B call of either side."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if alg.family == "chacha20":
        chacha = algorithms.ChaCha20

        def make():
            return Cipher(chacha(key, iv), None)
    else:
        aes, ctr = algorithms.AES, modes.CTR

        def make():
            return Cipher(aes(key), ctr(iv))
    return (lambda: make().decryptor()) if decrypt else (lambda: make().encryptor())


def _op_cryptography(m: Material, operation: str, form: str, out: np.ndarray) -> Operation:
    alg, key, nonce = m.algorithm, m.key, m.nonce
    decrypt = operation == "decrypt"
    if alg.kind == "stream":
        if form == "alloc":
            src = m.sealed_bytes if decrypt else m.plaintext_bytes
            context = _cryptography_stream(alg, key, nonce, decrypt)
            return lambda: context().update(src)
        src = m.sealed if decrypt else m.plaintext
        context = _cryptography_stream(alg, key, nonce, decrypt)
        return lambda: (context().update_into(src, out), out)[1]
    return _aead_operation(_cryptography_aead(alg, key), m, operation, form, out)


def _aead_operation(cipher, m: Material, operation: str, form: str, out: np.ndarray) -> Operation:
    """An operation of an object with ``cryptography``'s AEAD interface."""
    nonce, aad = m.nonce, m.aad
    if form == "alloc":
        if operation == "decrypt":
            sealed = m.sealed_bytes
            return lambda: cipher.decrypt(nonce, sealed, aad)
        plaintext = m.plaintext_bytes
        return lambda: cipher.encrypt(nonce, plaintext, aad)
    if operation == "decrypt":
        sealed = m.sealed
        return lambda: (cipher.decrypt_into(nonce, sealed, aad, out), out)[1]
    plaintext = m.plaintext
    return lambda: (cipher.encrypt_into(nonce, plaintext, aad, out), out)[1]


_GPUCRYPT_AEADS = {"chacha20-poly1305": "ChaCha20Poly1305", "xchacha20-poly1305": "XChaCha20Poly1305",
                   "aes-gcm": "AESGCM"}
_GPUCRYPT_STREAMS = {"chacha20": "ChaCha20", "aes-ctr": "AESCTR"}


def _gpucrypt_stream_context(alg: Algorithm, key: bytes, iv: bytes, device: str, decrypt: bool):
    """A function making ``gpucrypt.ciphers.ChaCha20``/``AESCTR``'s encryptor or decryptor
    for one message, the way ``Cipher(...).encryptor()`` is (a fresh context per call;
    the import and the class looked up here, outside the timed calls)."""
    from .. import ciphers

    cls = getattr(ciphers, _GPUCRYPT_STREAMS[alg.family])
    if decrypt:
        return lambda: cls(key, iv, device=device).decryptor()
    return lambda: cls(key, iv, device=device).encryptor()


def _op_gpucrypt(m: Material, operation: str, form: str, out: np.ndarray, device: str) -> Operation:
    """gpucrypt's public classes on host buffers (``device="gpu"`` includes both PCIe copies)."""
    alg, key, nonce = m.algorithm, m.key, m.nonce
    decrypt = operation == "decrypt"
    if alg.kind == "stream":
        if form == "alloc":
            src = m.sealed_bytes if decrypt else m.plaintext_bytes
            context = _gpucrypt_stream_context(alg, key, nonce, device, decrypt)
            return lambda: context().update(src)
        src = m.sealed if decrypt else m.plaintext
        context = _gpucrypt_stream_context(alg, key, nonce, device, decrypt)
        return lambda: (context().update_into(src, out), out)[1]
    import gpucrypt

    cipher = getattr(gpucrypt, _GPUCRYPT_AEADS[alg.family])(key, device=device)
    return _aead_operation(cipher, m, operation, form, out)


def _op_pycryptodome(m: Material, operation: str, form: str, out: np.ndarray) -> Operation:
    try:
        from Crypto.Cipher import AES, ChaCha20, ChaCha20_Poly1305
    except ImportError:
        raise NotAvailable("pycryptodome is not installed (pip install pycryptodome)") from None
    alg, key, nonce, aad = m.algorithm, m.key, m.nonce, m.aad
    decrypt = operation == "decrypt"
    alloc = form == "alloc"
    dst = None if alloc else memoryview(out)[:m.size]  # it wants a writable memoryview
    if alg.kind == "stream":
        src = m.sealed_bytes if decrypt else m.plaintext_bytes
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
        if alloc:
            return (lambda: make().decrypt(src)) if decrypt else (lambda: make().encrypt(src))
        if decrypt:
            return lambda: (make().decrypt(src, output=dst), out)[1]
        return lambda: (make().encrypt(src, output=dst), out)[1]

    if alg.family == "aes-gcm":
        def make():
            return AES.new(key, AES.MODE_GCM, nonce=nonce)
    else:  # pycryptodome picks XChaCha20 from the 24-byte nonce
        def make():
            return ChaCha20_Poly1305.new(key=key, nonce=nonce)
    if decrypt:
        ct, tag = m.sealed_bytes[:-16], m.sealed_bytes[-16:]

        def open_one():
            c = make()
            c.update(aad)
            result = c.decrypt(ct) if alloc else (c.decrypt(ct, output=dst), out)[1]
            c.verify(tag)
            return result
        return open_one
    src = m.plaintext_bytes

    def seal_one():
        c = make()
        c.update(aad)
        if alloc:
            return c.encrypt(src), c.digest()
        c.encrypt(src, output=dst)
        out[m.size:] = np.frombuffer(c.digest(), dtype=np.uint8)
        return out
    return seal_one


#: why PyNaCl has no row in the ``_into`` tables (the run plans its rows by it too)
PYNACL_NO_INTO = "PyNaCl has no _into API (its calls allocate their result)"


def _op_pynacl(m: Material, operation: str, form: str, out: np.ndarray) -> Operation:
    if m.algorithm.family != "xchacha20-poly1305":
        raise NotAvailable("benchmarked for XChaCha20-Poly1305 only")
    if form == "into":
        raise NotAvailable(PYNACL_NO_INTO)
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


def host_operation(implementation: str, m: Material, operation: str, form: str = "into",
                   out: np.ndarray | None = None) -> Operation:
    """An operation of a host-timed implementation. ``into`` forms write into ``out`` (a
    writable ``uint8`` array of the output's size, made here when not given) and return it;
    ``alloc`` forms return what the call returned."""
    if out is None and form == "into":
        out = np.empty(m.output_size(operation), dtype=np.uint8)
    if implementation == "cryptography":
        return _op_cryptography(m, operation, form, out)
    if implementation == "gpucrypt-cpu":
        return _op_gpucrypt(m, operation, form, out, "cpu")
    if implementation == "gpucrypt-gpu+transfer":
        return _op_gpucrypt(m, operation, form, out, "gpu")
    if implementation == "pycryptodome":
        return _op_pycryptodome(m, operation, form, out)
    if implementation == "pynacl":
        return _op_pynacl(m, operation, form, out)
    raise ValueError(f"{implementation} is not timed on the host")


# --------------------------------------------------------------------------- timing

@dataclass(frozen=True)
class Timing:
    """``median_seconds`` per operation round (one operation per thread). ``spread``: the
    repetitions' upper quartile over their lower, minus one (None for one repetition)."""

    repetitions: int
    iterations: int
    median_seconds: float
    spread: float | None = None

    @property
    def unsteady(self) -> bool:
        return _too_spread(self.spread)


def _too_spread(spread: float | None) -> bool:
    return spread is not None and spread > UNSTEADY_SPREAD


def quartile_spread(samples: list[float]) -> float | None:
    """Upper quartile over lower quartile, minus one: how far the middle half of the
    repetitions spreads (one slow outlier among many does not count; a cell whose calls
    take either of two very different times does)."""
    if len(samples) < 2:
        return None
    low, _, high = statistics.quantiles(samples, n=4, method="inclusive")
    return high / low - 1.0 if low > 0 else None


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


def checked_call(name: str, op: Operation, expected: bytes | None) -> Any:
    """One call of ``op``, its output returned; with ``expected``, :class:`WrongOutput`
    unless the output holds exactly those bytes (checked right after the call: other
    implementations may write the same output buffer next). An output buffer of the
    operation's own is spoiled and written again before the check: fresh memory can hold
    the right answer already (a freed buffer's, from an earlier cell), and an operation
    that wrote nothing would pass."""
    output = op()
    if expected is not None and not isinstance(output, bytes):
        spoil(output, expected)
        output = op()
    if expected is not None and not matches(output, expected):
        raise WrongOutput(f"{name} produced bytes that differ from the reference: "
                          f"not timed (a bug in it, or in the benchmark)")
    return output


def time_host(make_op: Callable[[int], Operation], threads: int, budget: float,
              expected: bytes | None = None) -> Timing:
    """Median wall seconds per round of ``threads`` concurrent operations.

    ``make_op(i)`` makes thread ``i``'s operation, so each thread owns its buffers;
    ``expected``: what every warm-up call must output (:func:`time_host_group`).
    """
    result = time_host_group({"op": make_op}, threads, budget, expected)["op"]
    if isinstance(result, NotAvailable):
        raise result
    return result


def time_host_group(makers: dict[str, Callable[[int], Operation]], threads: int,
                    budget: float, expected: bytes | None = None) -> dict[str, "Timing | NotAvailable"]:
    """:func:`time_host` for several implementations of one cell, repetitions interleaved.

    Repetition k of every implementation runs before repetition k + 1 of any, so a
    change in the machine's load during the cell (other processes, clock boost)
    hits every implementation alike and the ratios between them stay fair; and each
    round starts with the next implementation, so that no one of them always runs
    first (or right after another). A maker
    that raises :class:`NotAvailable` gets that exception back instead of a Timing.
    With ``expected``, each operation's warm-up output is checked first (right after
    it ran: implementations may share output buffers) and :class:`WrongOutput` raised
    for one that differs.
    """
    plans: dict[str, tuple[list[Operation], int, int, list[float]]] = {}
    results: dict[str, Timing | NotAvailable] = {}
    for name, make in makers.items():
        try:
            ops = [make(i) for i in range(threads)]
        except NotAvailable as exc:
            # a new exception, the message only: the caught one's traceback and context (an
            # ImportError, say) lead to frames that hold this cell's buffers and this very
            # dict, a cycle that kept every cell's memory until the garbage collector ran
            results[name] = NotAvailable(str(exc))
            continue
        start = time.perf_counter()
        shared = []  # output buffers the next implementation may write (and be checked on) too
        for op in ops:
            output = checked_call(name, op, expected)  # warm-up: page faults, lazy set-up
            if not isinstance(output, bytes):  # an allocating form's result is dropped at once
                shared.append(output)
            del output
        warm_up = (time.perf_counter() - start) / len(ops)
        # a warm-up long enough to time (a slow library, a big message) is the calibration
        per_call = warm_up if warm_up >= 20 * CALIBRATION_SECONDS else calibrate(ops[0])
        if expected is not None:  # after the calibration's calls, the last to write them
            for output in shared:
                spoil(output, expected)
        del shared
        repetitions, iterations = plan_loop(per_call, budget)
        plans[name] = (ops, repetitions, iterations, [])
    # as many rounds as the most repetitions planned; each implementation runs its own
    # planned count, spread evenly over them (first round to last): run back to back,
    # a slower one's few would all come first and the later rounds time the other side
    # alone (load arriving then hits one side only), and run in every round it would
    # overrun its time budget several times over
    rounds = max((plan[1] for plan in plans.values()), default=0)
    k, lots = 0, 1  # lots: how many times the planned repetitions are run
    names = list(plans)
    while k < rounds * lots:
        # each round starts with the next implementation: a cost that falls on whichever
        # call comes first in a round (a 1 GiB result's page faults right after the last
        # round's frees, seen here at 3-4x) falls on each of them in turn
        for name in names[k % len(names):] + names[:k % len(names)]:
            ops, planned, iterations, samples = plans[name]
            if (k + 1) * planned // rounds == k * planned // rounds:
                continue  # not one of this implementation's rounds
            samples.append(_timed_loop(ops[0], iterations) if threads == 1
                           else _timed_threads(ops, iterations))
        k += 1
        if k == rounds * lots and lots < UNSTEADY_MAX_FACTOR and any(
                _too_spread(quartile_spread(plan[3])) for plan in plans.values()):
            lots += 1  # every implementation again, interleaved: the ratios stay fair
    for name, (ops, repetitions, iterations, samples) in plans.items():
        results[name] = Timing(len(samples), iterations, statistics.median(samples) / iterations,
                               quartile_spread(samples))
    return {name: results[name] for name in makers}
