"""``gpucrypt bench``: gpucrypt's backends against the CPU libraries people use today,
measured in the same run on the same machine. (Package: ``run`` here, the CPU timings
in ``cpu``, the GPU ones in ``gpu``; may import the public classes and the backends,
and only the CLI imports it.)

Each *cell* is one algorithm, operation, call form, implementation and message size.
Its figure is the median over repetitions (the machines are noisy) of the seconds one
message takes, turned into GB/s (10**9 bytes of plaintext per second, summed over
``threads``) and into a ratio to the baseline measured in the same run:
``cryptography`` (OpenSSL) everywhere except XChaCha20-Poly1305, which
``cryptography`` lacks, where it is PyNaCl (libsodium). A ratio of 2.0 means twice
the baseline's throughput.

Forms (:data:`FORMS`): ``alloc`` tables compare calls that return a new result
(``encrypt()`` against ``encrypt()``, PyNaCl's functions, ``update()``), ``into``
tables calls that write into a buffer made once (``encrypt_into``, ``update_into``;
PyNaCl has none, so XChaCha20-Poly1305's ``into`` table has no baseline and no ratios).
Comparing a preallocated call with an allocating one would flatter the former.

Honesty: every operation's output is checked against the reference before it is
timed (:class:`WrongOutput` stops the run otherwise). Each table's baseline is
measured twice, interleaved with everything else; how far its two figures differ is
the *noise* of that size, printed in a row under the table (the largest over the sizes
heads it), and a ratio whose time ratio is within its size's noise of 1 is marked as
a tie (``=``): no measured difference. A cell whose own repetitions spread widely even after extra ones
is marked unsteady (``~``): the machine set its time (see
:data:`gpucrypt.bench.cpu.UNSTEADY_SPREAD`). The load average at the start and end is
printed and recorded. The AEADs are timed at up to :data:`AEAD_MAX_SIZE` bytes per
message (2**31 - 1: what ``cryptography``'s AEAD classes, the reference, take), the
stream ciphers at any size.

Implementations (:data:`IMPLEMENTATIONS`):

- ``cryptography``: its AEAD classes; ``Cipher(...).encryptor()`` for the stream ciphers;
- ``gpucrypt-cpu``: gpucrypt's public classes with ``device="cpu"``;
- ``gpucrypt-gpu`` / ``gpucrypt-gpu-hosttag``: the GPU backend's ``seal_batch`` /
  ``open_batch`` with ``tag="gpu"`` / ``tag="host"`` on device-resident data, timed
  with CUDA events (see :mod:`gpucrypt.bench.gpu`); also shown as a fraction of
  the device-to-device copy rate measured in the same run (``into`` tables only);
- ``gpucrypt-gpu+transfer``: the public classes with ``device="gpu"`` on host
  buffers, i.e. including both PCIe copies (only with ``include_transfer``);
- ``pycryptodome`` and ``pynacl`` when installed.

The stream ciphers' gpucrypt rows use :mod:`gpucrypt.ciphers`.

Public API: :func:`parse_size`, :func:`format_size`, :func:`parse_list`,
:class:`BenchConfig`, :func:`run`, :class:`BenchReport` (``to_json()``,
``render()``), :func:`plot`, :func:`environment`; for checking a configuration before
the run, :func:`offered`, :func:`without_rows`, :func:`why_no_rows`, :func:`gpu_rows_planned`,
:func:`device_resident_rows_planned`, :func:`aead_sizes_too_large`.
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .cpu import AEAD_MAX_SIZE, ALGORITHMS, FORMS, OPERATIONS, PYNACL_NO_INTO, \
    UNSTEADY_MAX_FACTOR, UNSTEADY_SPREAD, Algorithm, Material, NotAvailable, Timing, WrongOutput, \
    applicable, checked_call, host_operation, spoil, time_host, time_host_group

__all__ = ["ALGORITHMS", "OPERATIONS", "FORMS", "WrongOutput", "IMPLEMENTATIONS", "CPU_IMPLEMENTATIONS", "GPU_IMPLEMENTATIONS",
           "DEFAULT_SIZES", "SIZE_PRESETS", "DEFAULT_SECONDS", "BenchConfig", "Cell", "Unavailable",
           "BenchReport", "parse_size", "format_size", "parse_list", "run", "plot", "environment",
           "SCHEMA_VERSION", "offered", "without_rows", "why_no_rows", "gpu_rows_planned",
           "AEAD_MAX_SIZE", "aead_sizes_too_large", "device_resident_rows_planned"]

SCHEMA_VERSION = 2

#: Implementations timed on the host clock, on this machine's CPU.
CPU_IMPLEMENTATIONS = ("cryptography", "gpucrypt-cpu", "pycryptodome", "pynacl")
#: Implementations that need a GPU.
GPU_IMPLEMENTATIONS = ("gpucrypt-gpu", "gpucrypt-gpu-hosttag", "gpucrypt-gpu+transfer")
#: GPU rows whose data start and end in device memory (CUDA events)
DEVICE_RESIDENT = ("gpucrypt-gpu", "gpucrypt-gpu-hosttag")
IMPLEMENTATIONS = ("cryptography", "gpucrypt-cpu", "gpucrypt-gpu", "gpucrypt-gpu-hosttag",
                   "gpucrypt-gpu+transfer", "pycryptodome", "pynacl")

#: ``openssl speed``'s sizes and the bulk sizes.
SIZE_PRESETS = {
    "openssl": (16, 64, 256, 1024, 8192, 16384),
    "bulk": (1 << 20, 64 << 20, 1 << 30),
    "all": (16, 64, 256, 1024, 8192, 16384, 1 << 20, 64 << 20, 1 << 30),
}
#: The default run: small, medium and bulk. Without a GPU it took 1 min 16 s of wall
#: time and peaked at 306 MiB on a shared 2-core machine (2026-12-05).
DEFAULT_SIZES = (16, 1024, 16384, 1 << 20, 64 << 20)
#: Default measuring time per cell, in seconds.
DEFAULT_SECONDS = 0.15

_UNITS = {"": 1, "b": 1,
          "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
          "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
          "g": 1 << 30, "gib": 1 << 30, "gb": 10**9}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``16``, ``1KiB``/``1K`` (1024), ``1kB`` (1000), ``64MiB``, ``1GiB``, ``1GB``.

    Binary units (``KiB``, ``MiB``, ``GiB`` and the bare ``K``, ``M``, ``G``, as ``dd``
    reads them) and decimal ones (``kB``, ``MB``, ``GB``); case is ignored. Raises
    ``ValueError`` with the accepted forms for anything else, and for zero.
    """
    match = _SIZE_RE.match(text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"invalid size {text!r}: use a whole number of bytes with an optional unit "
                         f"(B, KiB, MiB, GiB; K, M, G are binary; kB, MB, GB are decimal)")
    value = int(match.group(1)) * _UNITS[unit]
    if value < 1:
        raise ValueError(f"invalid size {text!r}: must be at least 1 byte")
    return value


def format_size(nbytes: int) -> str:
    """``16 B``, ``1 KiB``, ``64 MiB``, ``1 GiB``; sizes that are not whole units keep bytes."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def parse_list(text: str, choices: Sequence[str], what: str) -> tuple[str, ...]:
    """Comma-separated names from ``choices`` (``all`` for every one), in the order given."""
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise ValueError(f"no {what} given; choose from {', '.join(choices)}")
    if names == ["all"]:
        return tuple(choices)
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(choices)} or all")
    return tuple(dict.fromkeys(names))


def parse_sizes(text: str) -> tuple[int, ...]:
    """Sizes from a comma-separated list, or a preset name (``openssl``, ``bulk``, ``all``)."""
    key = text.strip().lower()
    if key in SIZE_PRESETS:
        return SIZE_PRESETS[key]
    sizes = [parse_size(t) for t in text.split(",") if t.strip()]
    if not sizes:
        raise ValueError("no sizes given")
    return tuple(dict.fromkeys(sizes))


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. ``device``: ``cpu`` (CPU libraries only), ``gpu`` (GPU rows plus the
    baseline) or ``auto`` (everything that can run here). The baseline of each algorithm is
    always measured, whatever ``implementations`` says, because every ratio needs it."""

    algorithms: tuple[str, ...] = tuple(ALGORITHMS)
    operations: tuple[str, ...] = OPERATIONS
    forms: tuple[str, ...] = FORMS
    implementations: tuple[str, ...] = IMPLEMENTATIONS
    sizes: tuple[int, ...] = DEFAULT_SIZES
    device: str = "auto"
    seconds: float = DEFAULT_SECONDS
    threads: int = 1
    include_transfer: bool = False
    simulator_smoke: bool = False
    device_time: bool = False


@dataclass
class Cell:
    """One measured cell: the JSON record. ``ratio`` is against ``baseline`` at the same
    algorithm, operation, form, size and thread count (None when there is no baseline,
    ``baseline`` then ""); ``fraction_of_copy`` is GB/s over the device-to-device copy
    rate, for the device-resident rows (:data:`DEVICE_RESIDENT`) of the ``into`` tables
    only, whose data stay in device memory as the copy's do (None elsewhere, and in the
    simulator). ``verified`` is always True in what :func:`run` reports: a cell exists
    only once its output was checked against the reference, and a wrong output stops
    the run (:class:`WrongOutput`) instead of making a cell; the field stays in the JSON
    record so that readers of earlier files find it, and a report made by hand with
    False in it says so in its header. ``spread`` (baseline cells): how far the baseline's
    second, interleaved measurement differs from its first, as a fraction. ``tie`` (other
    cells): the time ratio is within the noise of 1 at this size (None where there is no
    ratio). ``unsteady``: the cell's repetitions still spread widely after extra ones (see
    :data:`gpucrypt.bench.cpu.UNSTEADY_SPREAD`): the machine, not the code, set its time
    (None where not measured so: the device-timed GPU rows and simulator smoke rows)."""

    algorithm: str
    operation: str
    form: str
    implementation: str
    device: str
    size: int
    threads: int
    repetitions: int
    iterations: int
    median_seconds: float
    gbps: float
    ratio: float | None
    baseline: str
    fraction_of_copy: float | None
    timing: str
    note: str = ""
    verified: bool = True
    spread: float | None = None
    tie: bool | None = None
    unsteady: bool | None = None


@dataclass
class Unavailable:
    """An implementation that would make sense in a table but cannot run there, and why:
    the table of ``algorithm``, ``operation`` and ``form``, at every size (``sizes`` None)
    or at ``sizes`` only (refused during the run at some sizes: the simulator's 4 KiB
    limit, say; its row shows ``-`` there). A reason applies to its own table only:
    decryption's refusal of ``--device-time`` is no reason in the encryption tables.
    ``operation`` or ``form`` None (reports made by hand, or before they were recorded):
    every operation or form of the algorithm. The JSON's ``unavailable`` entries are
    these fields; ``operation``, ``form`` and ``sizes`` came after the others, which
    keep their meaning."""

    algorithm: str
    implementation: str
    reason: str
    operation: str | None = None
    form: str | None = None
    sizes: list[int] | None = None

    def in_table(self, algorithm: str, operation: str, form: str) -> bool:
        """Whether this applies to the table of ``algorithm``, ``operation`` and ``form``."""
        return (self.algorithm == algorithm and self.operation in (None, operation)
                and self.form in (None, form))


@dataclass
class BenchReport:
    environment: dict
    config: BenchConfig
    cells: list[Cell] = field(default_factory=list)
    unavailable: list[Unavailable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    copy_gbps: float | None = None
    gpu_device: str | None = None

    def noise(self, algorithm: str, operation: str, form: str, size: int | None = None) -> float | None:
        """The noise of a table (``size`` None: the largest over its sizes) or of one of
        its columns: how far the baseline's two interleaved measurements differ."""
        spreads = [c.spread for c in self.cells if (c.algorithm, c.operation, c.form) ==
                   (algorithm, operation, form) and c.spread is not None
                   and size in (None, c.size)]
        return max(spreads) if spreads else None

    def to_json(self) -> dict:
        """The ``--json`` document: schema version, environment, configuration, cells.
        The configuration's ``implementations`` are those the run planned a row for in
        some table (algorithm, operation, form), timed or said not available: what
        ``device``, ``include_transfer`` and the forms left of those asked, and every
        algorithm's baseline; not every one asked: a reader takes the list for what was
        run, and each one in it has cells or an ``unavailable`` entry. Each ``unavailable``
        entry is an :class:`Unavailable`: the algorithm, implementation and reason, and
        the table it applies to (``operation``, ``form``) with the ``sizes`` it was refused
        at (null: every size of the run). Every cell is ``verified`` (see :class:`Cell`)."""
        config = asdict(self.config)
        config["implementations"] = _planned(self.config)
        return {
            "schema": SCHEMA_VERSION,
            "tool": "gpucrypt bench",
            "environment": self.environment,
            "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
            "gpu": {"device": self.gpu_device, "copy_gbps": self.copy_gbps},
            "notes": list(self.notes),
            "unavailable": [asdict(u) for u in self.unavailable],
            "cells": [asdict(c) for c in self.cells],
        }

    def render(self) -> str:
        """The text table; see :func:`render_table`."""
        return render_table(self)


# --------------------------------------------------------------------------- environment

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """``HEAD`` of the checkout gpucrypt is imported from (with ``-dirty``), or None.

    ``GPUCRYPT_GIT_COMMIT``, where set, is taken instead: a copy of a working tree (the GPU
    machine's) can carry older git metadata than the tree it holds, so the commit is
    read where the tree was made (``benchmarks/gpu_session.sh``)."""
    if os.environ.get("GPUCRYPT_GIT_COMMIT"):
        return os.environ["GPUCRYPT_GIT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "describe", "--always", "--dirty", "--abbrev=40"],
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _gpu_details() -> dict:
    """GPU name, NVIDIA driver and CUDA driver API version, where a driver is present."""
    details: dict = {"gpu": None, "driver": None, "cuda_driver_api": None}
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as fh:
            match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", fh.readline())
            details["driver"] = match.group(1) if match else None
    except OSError:
        pass
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        details["gpu"] = "numba CUDA simulator"
        return details
    from ..backends._probe import _cuda_driver_loadable

    if not _cuda_driver_loadable():  # no driver, no GPU: spare the ~100 MiB of importing numba
        return details
    try:
        from numba import cuda

        if cuda.is_available():
            name = cuda.get_current_device().name
            details["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
            major, minor = cuda.cudadrv.driver.driver.get_version()
            details["cuda_driver_api"] = f"{major}.{minor}"
    except Exception:  # no driver, broken driver: the backend's reason says why
        pass
    return details


def environment() -> dict:
    """Where the numbers come from: CPU, cores, GPU, driver, library versions, commit, date."""
    libraries = {name: _version(name) for name in
                 ("gpucrypt", "cryptography", "numpy", "numba", "numba-cuda", "cupy-cuda13x",
                  "pycryptodome", "pynacl")}
    try:
        from cryptography.hazmat.backends.openssl.backend import backend as openssl

        libraries["openssl"] = openssl.openssl_version_text()
    except Exception:
        libraries["openssl"] = None
    from ..backends.cpu import usable_cores

    usable = usable_cores()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        **_gpu_details(),
        "libraries": libraries,
        "git_commit": _git_commit(),
        # 1-minute load averages when the run started (and ended, filled in by run()):
        # above the core count, other processes competed for the CPU during the run
        "load_average_start": _load_average(),
        "load_average_end": None,
        # the process's peak resident memory when the run ended (filled in by run()): a
        # run's memory follows its largest size, and this is the figure to check that by
        "peak_rss_mib": None,
    }


def _peak_rss_mib() -> float | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


# --------------------------------------------------------------------------- running

ProgressFn = Callable[[int, int, str], None]


def _gpu_session(config: BenchConfig):
    """The GPU session, or None with the reason recorded (as a note and per GPU row)."""
    from ..backends import BackendUnavailable

    from .gpu import GpuRefused, GpuSession

    try:
        return GpuSession(simulator_smoke=config.simulator_smoke, device_time=config.device_time), None
    except BackendUnavailable as exc:
        return None, f"no GPU found: {exc}"
    except GpuRefused as exc:
        return None, f"GPU not timed: {exc}"


def _plan(config: BenchConfig) -> list[str]:
    """Implementations to run, in display order, for ``config.device``; baseline first."""
    if config.device == "cpu":
        allowed = CPU_IMPLEMENTATIONS
    elif config.device == "gpu":
        allowed = GPU_IMPLEMENTATIONS
    else:
        allowed = IMPLEMENTATIONS
    chosen = [i for i in IMPLEMENTATIONS if i in config.implementations and i in allowed]
    if not config.include_transfer and "gpucrypt-gpu+transfer" in chosen:
        chosen.remove("gpucrypt-gpu+transfer")
    return chosen


#: why a device-resident row has no place in an allocating table (said there when the
#: run has the _into tables too)
_DEVICE_RESIDENT_INTO_ONLY = "device-resident rows write into device buffers: see the into tables"


def _row(impl: str, alg: Algorithm, operation: str, form: str,
         config: BenchConfig) -> tuple[bool, str | None]:
    """Whether the table of ``alg``, ``operation`` and ``form`` times ``impl``; where it
    does not, the reason the table gives (None: no row at all, nothing to say). Known
    before the run; what only the run finds (no GPU, a library not installed) is not."""
    from .gpu import device_time_refusal

    if not applicable(impl, alg):
        return False, None
    if impl == "pynacl" and form == "into":
        return False, PYNACL_NO_INTO
    if impl in DEVICE_RESIDENT:
        if form != "into":
            return False, _DEVICE_RESIDENT_INTO_ONLY if "into" in config.forms else None
        if config.device_time:
            refused = device_time_refusal(impl, alg, operation)
            if refused:
                return False, refused
    return True, None


def _tables(config: BenchConfig):
    """Each table of ``config``: ``(algorithm, operation, form, timed, said)``, ``timed`` the
    implementations it times (for ``config.device``; the baseline wherever it has a row),
    ``said`` those it shows as not available, with why."""
    implementations = _plan(config)
    for name in config.algorithms:
        alg = ALGORITHMS[name]
        impls = [i for i in implementations if applicable(i, alg)]
        if alg.baseline not in impls:
            impls.insert(0, alg.baseline)
        for operation in config.operations:
            for form in config.forms:
                timed, said = [], {}
                for impl in impls:
                    runs, reason = _row(impl, alg, operation, form, config)
                    if runs:
                        timed.append(impl)
                    elif reason:
                        said[impl] = reason
                yield alg, operation, form, timed, said


def _planned(config: BenchConfig) -> tuple[str, ...]:
    """The implementations with a row in some table of ``config``, timed or said not
    available, in :data:`IMPLEMENTATIONS` order."""
    seen = {i for *_, timed, said in _tables(config) for i in (*timed, *said)}
    return tuple(i for i in IMPLEMENTATIONS if i in seen)


def _timed(config: BenchConfig) -> set[str]:
    return {i for *_, timed, _ in _tables(config) for i in timed}


def offered(implementation: str, config: BenchConfig | None = None) -> tuple[tuple[str, str], ...]:
    """The ``(algorithm, form)`` tables ``implementation`` is timed in, for the operations
    and options of ``config`` (every algorithm and form, whatever it asks; PyNaCl:
    XChaCha20-Poly1305's allocating tables only; the device-resident rows: the ``into``
    tables only, and with ``device_time`` the encryptions of the AEADs only for
    ``gpucrypt-gpu``, none for ``gpucrypt-gpu-hosttag``)."""
    config = config or BenchConfig()
    every = replace(config, algorithms=tuple(ALGORITHMS), forms=FORMS, device="auto",
                    implementations=(implementation,))
    return tuple(dict.fromkeys((alg.name, form) for alg, _, form, timed, _ in _tables(every)
                               if implementation in timed))


def _tables_text(pairs) -> str:
    """``(algorithm, form)`` pairs in words: "xchacha20-poly1305, in the alloc tables"."""
    pairs = set(pairs)
    by_forms: dict[tuple[str, ...], list[str]] = {}
    for alg in ALGORITHMS:
        forms = tuple(f for f in FORMS if (alg, f) in pairs)
        if forms:
            by_forms.setdefault(forms, []).append(alg)
    parts = []
    for forms, algs in by_forms.items():
        where = "" if forms == FORMS else f"in the {forms[0]} tables"
        if len(algs) == len(ALGORITHMS):
            parts.append(where[3:] if where else "every table")
        else:
            parts.append(", ".join(algs) + (f", {where}" if where else ""))
    return "; ".join(parts)


def why_no_rows(implementation: str, config: BenchConfig) -> str:
    """Why the run of ``config`` times no row of ``implementation`` (whatever device it
    asks: the device's own refusals are the caller's), in words for a message."""
    if implementation == "gpucrypt-gpu+transfer" and not config.include_transfer:
        return f"{implementation} is timed only with include_transfer=True"
    # the allocating tables' pointer to the _into ones is no reason: theirs is
    said = {reason for *_, why in _tables(replace(config, device="auto"))
            for impl, reason in why.items()
            if impl == implementation and reason != _DEVICE_RESIDENT_INTO_ONLY}
    if said:
        return f"{implementation}: {'; '.join(sorted(said))}"
    offer = offered(implementation, config)
    if not offer:
        return f"{implementation} has no row with these options"
    return f"{implementation} offers only {_tables_text(offer)}"


def without_rows(config: BenchConfig) -> tuple[str, ...]:
    """The implementations of ``config.implementations`` that no table of ``config``
    times, whatever its device (for the algorithms, forms and operations asked, with its
    options): the run has no row for them (only the command line names them one by one;
    for ``all`` this is no news). :func:`why_no_rows` says why."""
    timed = _timed(replace(config, device="auto"))
    return tuple(i for i in config.implementations if i not in timed)


def gpu_rows_planned(config: BenchConfig) -> tuple[str, ...]:
    """The GPU implementations the run of ``config`` would time in at least one of its
    tables (where a GPU can be timed): none makes a ``device="gpu"`` run pointless."""
    timed = _timed(config)
    return tuple(i for i in GPU_IMPLEMENTATIONS if i in timed)


def device_resident_rows_planned(config: BenchConfig) -> tuple[str, ...]:
    """The device-resident implementations (:data:`DEVICE_RESIDENT`) the run of ``config``
    would time in at least one of its tables (where a GPU can be timed): the only rows
    ``device_time`` changes, so a run without one would ignore it."""
    timed = _timed(config)
    return tuple(i for i in DEVICE_RESIDENT if i in timed)


def aead_sizes_too_large(config: BenchConfig) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """``(sizes, algorithms)``: the sizes of ``config`` above :data:`AEAD_MAX_SIZE` and its
    AEADs, which cannot be timed at them (the reference and the baseline refuse them);
    two empty tuples where there is no such pair. The stream ciphers take any size."""
    sizes = tuple(s for s in config.sizes if s > AEAD_MAX_SIZE)
    aeads = tuple(a for a in config.algorithms if ALGORITHMS[a].kind == "aead")
    return (sizes, aeads) if sizes and aeads else ((), ())


def simulator_sizes_too_large(config: BenchConfig) -> bool:
    """Whether a ``device="gpu"`` run of ``config`` in numba's CUDA simulator
    (``simulator_smoke`` with ``NUMBA_ENABLE_CUDASIM=1``) would time no GPU row because
    every size asked is above what its smoke rows take (:data:`gpu.SIMULATOR_MAX_SIZE`):
    the run would time the baseline, then fail."""
    from .gpu import SIMULATOR_MAX_SIZE

    return (config.device == "gpu" and config.simulator_smoke
            and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
            and min(config.sizes) > SIMULATOR_MAX_SIZE)


#: why an AEAD has no row above AEAD_MAX_SIZE, in run()'s refusal
_AEAD_LIMIT_TEXT = ("cryptography's AEAD classes, which make the reference every row is "
                    "checked against and are the baseline, take at most 2**31 - 1 bytes "
                    "(2 GiB less one byte) per message")


def _no_gpu_row(config: BenchConfig) -> str:
    """Why a ``device="gpu"`` run of ``config`` would time no GPU row."""
    asked = [i for i in config.implementations if i in GPU_IMPLEMENTATIONS]
    if not asked:
        return (f"device='gpu' times the GPU rows, and none of the implementations asked "
                f"({', '.join(config.implementations)}) is a GPU one: add gpucrypt-gpu to them, "
                f"or use device='cpu'")
    return (f"device='gpu' times the GPU rows, and this run would time none "
            f"({'; '.join(why_no_rows(i, config) for i in asked)}): ask for tables they have, "
            f"or use device='cpu'")


def _say_unavailable(report: BenchReport, algorithm: str, implementation: str, reason: str,
                     operation: str, form: str, size: int | None = None) -> None:
    """Record that ``implementation`` cannot run in a table, at every size (``size`` None:
    known before the run) or at ``size`` (found when that size was measured)."""
    for u in report.unavailable:
        if (u.algorithm, u.implementation, u.reason, u.operation, u.form) == \
                (algorithm, implementation, reason, operation, form):
            if size is None:
                u.sizes = None
            elif u.sizes is not None and size not in u.sizes:
                u.sizes.append(size)
            return
    report.unavailable.append(Unavailable(algorithm, implementation, reason, operation, form,
                                          None if size is None else [size]))


def _whole_tables(report: BenchReport) -> None:
    """An entry refused at every size of the run is one of its table (``sizes`` None)."""
    for u in report.unavailable:
        if u.sizes is not None and set(report.config.sizes) <= set(u.sizes):
            u.sizes = None


def run(config: BenchConfig, progress: ProgressFn | None = None) -> BenchReport:
    """Measure every cell of ``config``; ``progress(done, total, label)`` after each one.

    Raises ``ValueError`` when ``device="gpu"`` and no table would time a GPU row (no GPU
    implementation asked, or none with a row for the algorithms, forms and operations
    asked, or, in the simulator, no size small enough for its smoke rows: the run would
    time the baseline alone), and when an AEAD is asked at a size above
    :data:`AEAD_MAX_SIZE` (:func:`aead_sizes_too_large`), before anything is timed; ``RuntimeError`` when ``device="gpu"``
    and the GPU cannot be timed (the message says why), or when it timed no GPU row after
    all (each row's reason said), and when any row computes wrong bytes
    (:class:`WrongOutput`, a ``RuntimeError``: every row's output, encryption and
    decryption, CPU and GPU, is checked before it is timed).
    """
    if config.device == "gpu" and not gpu_rows_planned(config):
        raise ValueError(_no_gpu_row(config))
    too_large, aeads = aead_sizes_too_large(config)
    if too_large:  # found only once every smaller size was timed, as an OverflowError
        raise ValueError(f"{', '.join(aeads)} cannot be timed at {format_size(too_large[0])}: "
                         f"{_AEAD_LIMIT_TEXT}; give sizes of at most {AEAD_MAX_SIZE} bytes, "
                         f"or the stream ciphers alone at larger ones")
    if simulator_sizes_too_large(config):
        from .gpu import SIMULATOR_MAX_SIZE

        raise ValueError(f"device='gpu' with simulator_smoke times the GPU rows in numba's CUDA "
                         f"simulator, whose smoke rows stop at {format_size(SIMULATOR_MAX_SIZE)}, "
                         f"and every size asked is larger: give a size of "
                         f"{format_size(SIMULATOR_MAX_SIZE)} or less")
    report = BenchReport(environment=environment(), config=config)
    cpu_name = report.environment["cpu"]
    tables = list(_tables(config))
    wants_gpu = any(i in GPU_IMPLEMENTATIONS for *_, timed, _ in tables for i in timed)
    session, gpu_reason = _gpu_session(config) if wants_gpu else (None, None)
    if wants_gpu and session is None:
        if config.device == "gpu":
            raise RuntimeError(gpu_reason)
        report.notes.append(f"{gpu_reason}; comparing the CPU implementations only")
    if session is not None:
        report.gpu_device = session.device_name
        if session.simulator:
            report.notes.append("GPU rows ran in numba's CUDA simulator: "
                                "simulator (not a measurement)")
        else:
            report.copy_gbps = session.copy_bandwidth(max(config.seconds, 0.05)) / 1e9
            report.notes.append(f"device-to-device copy on {session.device_name}: "
                                f"{report.copy_gbps:.1f} GB/s copied (read + write = twice that)")

    jobs: dict[tuple[str, str, str], list[str]] = {}  # what each table times; the rest is said
    for alg, operation, form, timed, said in tables:
        for impl, reason in said.items():  # without a GPU, that is the reason to say
            no_gpu = impl in GPU_IMPLEMENTATIONS and session is None and gpu_reason
            _say_unavailable(report, alg.name, impl, gpu_reason if no_gpu else reason,
                             operation, form)
        for impl in timed:
            if impl in GPU_IMPLEMENTATIONS and session is None:
                _say_unavailable(report, alg.name, impl, gpu_reason or "", operation, form)
        jobs[alg.name, operation, form] = [i for i in timed
                                           if session is not None or i not in GPU_IMPLEMENTATIONS]
    total = sum(len(impls) for impls in jobs.values()) * len(config.sizes)
    done = 0
    for size in config.sizes:
        for name in config.algorithms:
            if not any(jobs[name, o, f] for o in config.operations for f in config.forms):
                continue
            material = Material(ALGORITHMS[name], size)
            for operation in config.operations:
                for form in config.forms:
                    impls = jobs[name, operation, form]
                    if not impls:
                        continue
                    results = _measure_group(impls, material, operation, form, config, session,
                                             cpu_name)
                    for impl in impls:
                        result = results[impl]
                        if isinstance(result, str):
                            _say_unavailable(report, name, impl, result, operation, form, size)
                        else:
                            report.cells.append(result)
                        done += 1
                        if progress:
                            progress(done, total, f"{name} {operation} {form} "
                                                  f"{format_size(size)} {impl}")
            del material
    gpu_cells = any(c.implementation in GPU_IMPLEMENTATIONS for c in report.cells)
    if config.device == "gpu" and not gpu_cells:  # every GPU row refused at run time
        reasons = dict.fromkeys(f"{u.implementation}: {u.reason}" for u in report.unavailable
                                if u.implementation in GPU_IMPLEMENTATIONS)
        raise RuntimeError(f"no GPU row could be timed, and a GPU run of the baseline alone "
                           f"is no result: {'; '.join(reasons) or 'no reason given'}")
    if config.threads > 1:
        report.notes.append(f"CPU rows: {config.threads} threads, each encrypting its own messages; "
                            f"GB/s is the aggregate" + (
                                f". GPU rows: one host thread, so no ratio to the "
                                f"{config.threads}-thread baseline (--threads 1 gives them one)"
                                if gpu_cells else ""))
    _whole_tables(report)
    _fill_ratios(report)
    report.environment["load_average_end"] = _load_average()
    report.environment["peak_rss_mib"] = _peak_rss_mib()
    return report


#: the baseline's second, interleaved measurement (its spread is the table's noise)
_AGAIN = " (again)"


def _measure_group(impls: list[str], m: Material, operation: str, form: str, config: BenchConfig,
                   session, cpu_name: str) -> dict[str, "Cell | str"]:
    """A :class:`Cell` per implementation of one algorithm, operation, form and size, or the
    reason (str) it cannot run. The CPU libraries are timed together, repetitions
    interleaved (:func:`gpucrypt.bench.cpu.time_host_group`), the baseline twice; they
    share one output buffer per thread. GPU rows one after the other."""
    results: dict[str, Cell | str] = {}
    baseline = m.algorithm.baseline_for(form)
    on_cpu = [i for i in impls if i in CPU_IMPLEMENTATIONS]
    if baseline in on_cpu:
        on_cpu.append(baseline + _AGAIN)
    outs = [np.empty(m.output_size(operation), dtype=np.uint8) if form == "into" else None
            for _ in range(config.threads)]
    for out in outs:  # fresh memory may hold a right answer already (a freed buffer's)
        if out is not None:
            spoil(out, m.expected(operation))
    makers = {name: (lambda t, impl=name.removesuffix(_AGAIN):
                     host_operation(impl, m, operation, form, outs[t])) for name in on_cpu}
    # given the expected bytes, every warm-up output is checked before anything is timed
    timings = time_host_group(makers, config.threads, config.seconds, m.expected(operation))
    again = timings.pop(baseline + _AGAIN, None) if baseline else None
    for impl, timing in timings.items():
        if isinstance(timing, NotAvailable):
            results[impl] = str(timing)
            continue
        cell = _cell(impl, m, operation, form, timing, cpu_name, config.threads, "perf_counter")
        if impl == baseline and isinstance(again, Timing):
            cell.spread = abs(again.median_seconds / timing.median_seconds - 1.0)
        results[impl] = cell
    for impl in impls:
        if impl not in results:
            results[impl] = _measure_gpu(impl, m, operation, form, config, session)
    return results


def _measure_gpu(impl: str, m: Material, operation: str, form: str, config: BenchConfig,
                 session) -> "Cell | str":
    """A GPU row: device-resident (CUDA events) or through the public classes (+transfer)."""
    from .gpu import SIMULATOR_MAX_SIZE, GpuRefused

    try:
        # each branch checks the output against the reference before its figure: the
        # simulator's one call (checked_call), time_host's warm-up, time_cell's own check
        if impl == "gpucrypt-gpu+transfer":
            if session.simulator:
                if m.size > SIMULATOR_MAX_SIZE:
                    return f"simulator smoke runs stop at {SIMULATOR_MAX_SIZE} bytes"
                timing = _single_call(impl, host_operation(impl, m, operation, form),
                                      m.expected(operation))
            else:
                timing = time_host(lambda t: host_operation(impl, m, operation, form), 1,
                                   config.seconds, m.expected(operation))
            clock = "perf_counter"
        else:  # an _into table's (the run plans no other: _row)
            timing = session.time_cell(impl, m, operation, config.seconds)
            clock = "host clock (simulator)" if session.simulator else \
                "cuda events, queued ahead of the host (device time)" if config.device_time else "cuda events"
    except (NotAvailable, GpuRefused) as exc:
        return str(exc)
    return _cell(impl, m, operation, form, timing, session.device_name, 1, clock)


def _cell(impl: str, m: Material, operation: str, form: str, timing: Timing, device: str,
          threads: int, clock: str) -> Cell:
    """The cell of a timing whose output was checked against the reference (every one
    is, a simulator row's too: its figure is a label, its bytes are not; a wrong one
    raised :class:`WrongOutput` instead), so ``verified`` keeps its True."""
    note = device if device == _simulator_label() else ""
    return Cell(algorithm=m.algorithm.name, operation=operation, form=form, implementation=impl,
                device=device, size=m.size, threads=threads, repetitions=timing.repetitions,
                iterations=timing.iterations, median_seconds=timing.median_seconds,
                gbps=m.size * threads / timing.median_seconds / 1e9, ratio=None,
                baseline=m.algorithm.baseline_for(form) or "", fraction_of_copy=None,
                timing=clock, note=note,
                unsteady=timing.unsteady if timing.spread is not None and not note else None)


def _single_call(name: str, op, expected: bytes) -> Timing:
    """One call, its output checked (:class:`WrongOutput` otherwise), timed for the
    simulator's smoke rows, whose figures are labels, not measurements."""
    start = time.perf_counter()
    checked_call(name, op, expected)
    return Timing(1, 1, time.perf_counter() - start)


def _simulator_label() -> str:
    from .gpu import SIMULATOR_LABEL

    return SIMULATOR_LABEL


def is_tie(ratio: float, noise: float) -> bool:
    """Whether a throughput ``ratio`` (baseline time / ours) is within ``noise``, a relative
    spread of times, of x1.00: the time ratio is compared, so that a slower and a faster
    result the same fraction away from the baseline get the same verdict. (The tolerance:
    the ratio is the inverse of the time ratio the issue-13 verdicts compare, and a cell
    exactly at the bound must not come out on the other side of it through rounding.)"""
    return abs(1.0 / ratio - 1.0) <= noise + 1e-9


def _fill_ratios(report: BenchReport) -> None:
    # keyed by thread count too: a GPU row (one host thread) against a baseline's
    # aggregate over N threads would compare unlike with unlike; it gets no ratio
    base = {(c.algorithm, c.operation, c.form, c.size, c.threads): c.gbps for c in report.cells
            if c.implementation == c.baseline}
    for c in report.cells:
        b = base.get((c.algorithm, c.operation, c.form, c.size, c.threads))
        c.ratio = c.gbps / b if b else None
        if c.implementation == c.baseline:
            c.ratio = 1.0
        if c.note:  # simulator rows: a figure that is no measurement has no ratio either
            c.ratio = None
        if c.implementation in DEVICE_RESIDENT:  # data already in GPU memory against host
            c.ratio = None  # bytes: no like-for-like ratio (its copy fraction says it; the
            # +transfer row, both PCIe copies included, is the one to compare)
        if report.copy_gbps and c.implementation in DEVICE_RESIDENT and c.form == "into" \
                and not c.note:
            # device memory to device memory, as the copy: the +transfer row's figure is
            # set by its two PCIe copies, which no fraction of an HBM copy describes
            c.fraction_of_copy = c.gbps / report.copy_gbps
    for c in report.cells:
        # the column's noise, not the table's: a noisy 1 GiB column says nothing of 64 B
        noise = report.noise(c.algorithm, c.operation, c.form, c.size)
        if c.ratio is not None and c.implementation != c.baseline and noise is not None:
            # in time, as the noise is (|t_again / t_first - 1|): the throughput ratio's
            # 1/x would tie a slower gpucrypt further from x1.00 than a faster one
            c.tie = is_tie(c.ratio, noise)


# --------------------------------------------------------------------------- output

def _fmt_gbps(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 0.01:
        return f"{x:.2f}"
    return f"{x:.4f}"


def _fmt_ratio(r: float | None, tie: bool | None = None, unsteady: bool | None = None) -> str:
    if r is None:
        return "(no base)" + ("~" if unsteady else "")
    text = f"x{r:.2f}" if r < 10 else f"x{r:.1f}"
    return text + ("=" if tie else "") + ("~" if unsteady else "")


def _display_order(cells: list[Cell], baseline: str) -> list[str]:
    """The baseline first, then the others in :data:`IMPLEMENTATIONS` order."""
    present = {c.implementation for c in cells}
    return sorted(present, key=lambda i: (i != baseline, IMPLEMENTATIONS.index(i)))


_FORM_TITLES = {"alloc": "allocating (a new result per call)",
                "into": "_into (into a buffer made once)"}


def render_table(report: BenchReport) -> str:
    """One block per algorithm, operation and form: a row per implementation, a column per
    size, each cell ``GB/s xRATIO`` (ratio to the baseline, which shows x1.00; ``=`` marks
    a ratio within the table's noise of 1), under a line with the table's noise."""
    env = report.environment
    lines = [f"gpucrypt bench: {env['cpu']} ({env['cpu_usable']} usable cores), "
             f"GPU: {report.gpu_device or 'none'}; {env['date']}",
             f"load average (1 min): {env.get('load_average_start')} at the start, "
             f"{env.get('load_average_end')} at the end, on {env['cpu_usable']} usable cores"
             + (" (other work shared the CPU: expect noise)"
                if max(env.get('load_average_start') or 0, env.get('load_average_end') or 0)
                > env['cpu_usable'] else "")
             + (f"; peak RSS {env['peak_rss_mib']:.0f} MiB" if env.get("peak_rss_mib") else ""),
             f"GB/s = 10^9 plaintext bytes per second; xN = speed-up against the baseline measured in "
             f"this run (median of repetitions, {report.config.seconds:g} s per cell); "
             + _checked_text(report),
             "noise = how far the baseline's two interleaved measurements differ (the table's: "
             "largest over the sizes; each size's in the noise row); xN= : time ratio within its "
             "size's noise of x1.00, a tie; ~ : unsteady, its repetitions' quartiles more than "
             f"{100 * UNSTEADY_SPREAD:.0f}% apart even after {UNSTEADY_MAX_FACTOR}x the repetitions "
             "(the machine set that time, not the code)"]
    for note in report.notes:
        lines.append(f"note: {note}")
    sizes = list(report.config.sizes)
    heads = [format_size(s) for s in sizes]
    for alg_name in report.config.algorithms:
        alg = ALGORITHMS[alg_name]
        for operation in report.config.operations:
            for form in report.config.forms:
                cells = [c for c in report.cells
                         if (c.algorithm, c.operation, c.form) == (alg_name, operation, form)]
                missing = [u for u in report.unavailable if u.in_table(alg_name, operation, form)]
                if not cells and not missing:
                    continue
                baseline = alg.baseline_for(form)
                lines.append("")
                lines.append(_table_title(report, alg_name, operation, form, baseline))
                impls = _display_order(cells, baseline or "")
                width = max([len(i) for i in impls + [u.implementation for u in missing]] + [14]) + 2
                lines.append(" " * width + "".join(f"{h:>18}" for h in heads))
                lines += _table_rows(cells, impls, sizes, width)
                if baseline is not None:
                    lines.append(_noise_row(report, alg_name, operation, form, sizes, width))
                lines += _unavailable_lines(report, missing, {c.implementation for c in cells})
    return "\n".join(lines)


def _checked_text(report: BenchReport) -> str:
    """The header's claim about the checks, made only as far as the cells bear it out.
    :func:`run` makes no unchecked cell (a wrong output stops it), so its reports always
    get the first sentence; the second is for a report made by hand (:class:`Cell` is
    public), which is not to be told it was checked."""
    unchecked: dict[str, int] = {}
    for c in report.cells:
        if not c.verified:
            unchecked[c.implementation] = unchecked.get(c.implementation, 0) + 1
    if not unchecked:
        return "every row's output was checked against the reference before it was timed"
    names = ", ".join(f"{impl} ({n} cell{'s' if n > 1 else ''})" for impl, n in unchecked.items())
    return (f"output NOT checked against the reference: {names}; every other row's was "
            f"checked before it was timed")


def _table_title(report: BenchReport, algorithm: str, operation: str, form: str,
                 baseline: str | None) -> str:
    title = f"{algorithm} {operation}, {_FORM_TITLES[form]}"
    if baseline is None:
        return f"{title}  (no baseline: {ALGORITHMS[algorithm].baseline} has no such call)"
    noise = report.noise(algorithm, operation, form)
    noise_text = "noise not measured" if noise is None else f"noise up to {100 * noise:.1f}%"
    return f"{title}  (baseline: {baseline}; {noise_text})"


def _noise_row(report: BenchReport, algorithm: str, operation: str, form: str, sizes: list[int],
               width: int) -> str:
    texts = []
    for size in sizes:
        noise = report.noise(algorithm, operation, form, size)
        texts.append("-" if noise is None else f"{100 * noise:.1f}%")
    return f"{'(noise)':<{width}}" + "".join(f"{t:>18}" for t in texts)


def _table_rows(cells: list[Cell], impls: list[str], sizes: list[int], width: int) -> list[str]:
    lines = []
    for impl in impls:
        row = {c.size: c for c in cells if c.implementation == impl}
        texts = [("simulated" if row[s].note else
                  f"{_fmt_gbps(row[s].gbps)} {_fmt_ratio(row[s].ratio, row[s].tie, row[s].unsteady)}")
                 if s in row
                 else "-" for s in sizes]
        lines.append(f"{impl:<{width}}" + "".join(f"{t:>18}" for t in texts))
        if any(row[s].fraction_of_copy is not None for s in row):
            fr = [f"{100 * row[s].fraction_of_copy:.1f}% of copy"
                  if s in row and row[s].fraction_of_copy is not None else "-" for s in sizes]
            lines.append(f"{'':<{width}}" + "".join(f"{t:>18}" for t in fr))
        if any(row[s].note for s in row):
            lines.append(f"{'':<{width}}  ^ {next(row[s].note for s in row if row[s].note)}")
    return lines


def _unavailable_lines(report: BenchReport, missing: list[Unavailable],
                       shown: set[str]) -> list[str]:
    """'not available' lines of one table (``missing``: its entries, :meth:`Unavailable.in_table`):
    for the implementations missing from it, and for the sizes at which a row that is
    shown (``shown``) was refused, which it shows as ``-``."""
    by_reason: dict[tuple[str, str], list[str]] = {}
    for u in missing:
        if u.sizes is None and u.implementation in shown:
            continue  # a table-wide entry made by hand next to the row's own cells
        at = "" if u.sizes is None else " at " + ", ".join(format_size(s) for s in sorted(u.sizes))
        by_reason.setdefault((at, u.reason), []).append(u.implementation)
    lines = []
    for (at, reason), names in by_reason.items():
        if any(reason in note for note in report.notes):
            reason = "see the note above"
        lines.append(f"{', '.join(dict.fromkeys(names))}: not available{at}: {reason}")
    return lines


def plot(report: BenchReport, path: str | os.PathLike):
    """Throughput against size, a line per implementation, a panel per algorithm and operation.
    The simulator's rows are left out (their figures are labels, not measurements; the
    title says so), as the table shows no figure for them.

    Returns the figure, saved and closed (its axes can be inspected, not drawn to).

    Needs matplotlib (``pip install 'gpucrypt[plot]'``); raises ``ImportError`` saying so.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'gpucrypt[plot]'") from None
    measured = [c for c in report.cells if not c.note]
    panels = [(a, o) for a in report.config.algorithms for o in report.config.operations
              if any((c.algorithm, c.operation) == (a, o) for c in measured)]
    cols = 2 if len(panels) > 1 else 1
    rows = max(1, (len(panels) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (alg, op) in zip(axes.flat, panels):
        cells = [c for c in measured if (c.algorithm, c.operation) == (alg, op)]
        for form in report.config.forms:  # one panel, both forms: alloc dotted, into solid
            in_form = [c for c in cells if c.form == form]
            baseline = ALGORITHMS[alg].baseline_for(form)
            for impl in _display_order(in_form, baseline or "") if in_form else ():
                pts = sorted((c.size, c.gbps) for c in in_form if c.implementation == impl)
                ax.plot([p[0] for p in pts], [p[1] for p in pts],
                        marker="o" if form == "into" else "s", label=f"{impl} ({form})",
                        color=f"C{IMPLEMENTATIONS.index(impl)}",
                        linestyle=("--" if impl == baseline else "-") if form == "into" else ":")
        ax.set_xscale("log", base=2)
        sizes = sorted({c.size for c in cells})
        ax.set_xticks(sizes, [format_size(s).replace(" ", "") for s in sizes], fontsize="small")
        ax.minorticks_off()
        _gbps_axis(ax, [c.gbps for c in cells if c.gbps and c.gbps > 0])
        ax.set_title(f"{alg} {op}")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel("GB/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    env = report.environment
    title = f"gpucrypt bench: {env['cpu']} / GPU {report.gpu_device or 'none'} ({env['date'][:10]})"
    if len(measured) < len(report.cells):
        title += "\nthe simulator's GPU rows are left out: their figures are not measurements"
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 * (title.count("\n") + 1) / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


def _gbps_axis(ax, gbps: list) -> None:
    """The GB/s axis of a panel, labelled whatever its range. A log axis labels only powers
    of ten, so figures within one decade (2 to 5 GB/s: one size, or one machine's spread)
    got an axis without a single number: those are drawn on a linear axis, from zero;
    wider ranges on a log axis ticked at 1, 2 and 5 times each power of ten."""
    from matplotlib import ticker

    if gbps and max(gbps) < 10 * min(gbps):
        ax.set_ylim(0, max(gbps) * 1.1)
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_locator(ticker.NullLocator())
