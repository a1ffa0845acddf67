"""``gpucrypt bench`` on the CPU with tiny sizes and ~0.01 s per cell: arguments, the JSON
schema, the plot, errors, size units, and the GPU refusal/smoke paths of the simulator."""
from __future__ import annotations

import dataclasses
import json
import re
import os
import subprocess
import sys

import pytest

from gpucrypt import bench
from gpucrypt.bench.cpu import MAX_REPETITIONS, MIN_REPETITIONS, TARGET_REPETITIONS, plan_loop
from gpucrypt.cli import main

TINY = ["--seconds", "0.01", "--sizes", "16,64"]

CELL_FIELDS = {
    "algorithm": str, "operation": str, "form": str, "implementation": str, "device": str,
    "size": int, "threads": int, "repetitions": int, "iterations": int, "median_seconds": float,
    "gbps": float, "ratio": (float, type(None)), "baseline": str,
    "fraction_of_copy": (float, type(None)), "timing": str, "note": str, "verified": bool,
    "spread": (float, type(None)), "tie": (bool, type(None)), "unsteady": (bool, type(None)),
}
ENV_FIELDS = {"date": str, "cpu": str, "cpu_count": int, "cpu_usable": int, "platform": str,
              "python": str, "gpu": (str, type(None)), "driver": (str, type(None)),
              "cuda_driver_api": (str, type(None)), "libraries": dict, "git_commit": (str, type(None)),
              "load_average_start": float, "load_average_end": float, "peak_rss_mib": float}


def run_cli(capsys, *args):
    code = main(["bench", *args])
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("text, expected", [
    ("16", 16), ("16B", 16), ("1KiB", 1024), ("1K", 1024), ("1k", 1024), ("1kB", 1000),
    ("1KB", 1000), ("64MiB", 64 << 20), ("64m", 64 << 20), ("1MB", 10**6), ("1GiB", 1 << 30),
    ("1G", 1 << 30), ("1GB", 10**9), (" 8 kib ", 8192),
])
def test_parse_size_units(text, expected):
    assert bench.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "0", "0KiB", "1.5MiB", "-1", "1TiB", "KiB", "12XB", "1 2"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="size"):
        bench.parse_size(text)


def test_format_size_round_trips():
    for n in (16, 1000, 1024, 16384, 1 << 20, 64 << 20, 1 << 30, 1536):
        assert bench.parse_size(bench.format_size(n).replace(" ", "")) == n


def test_size_presets():
    assert bench.parse_sizes("openssl") == (16, 64, 256, 1024, 8192, 16384)
    assert bench.parse_sizes("bulk") == (1 << 20, 64 << 20, 1 << 30)
    assert bench.parse_sizes("16,1KiB,16") == (16, 1024)


def test_plan_loop_keeps_a_median():
    assert plan_loop(1e-6, 0.1) == (TARGET_REPETITIONS, int(0.1 / TARGET_REPETITIONS / 1e-6))
    reps, iters = plan_loop(1e-6, 1.0)  # a longer budget buys more, shorter repetitions
    assert TARGET_REPETITIONS < reps <= MAX_REPETITIONS and reps * iters * 1e-6 == pytest.approx(1.0, rel=0.01)
    assert plan_loop(10.0, 0.2) == (MIN_REPETITIONS, 1)  # slower than the budget: still 3
    reps, iters = plan_loop(0.05, 0.2)
    assert iters == 1 and MIN_REPETITIONS <= reps <= TARGET_REPETITIONS


def test_unsteady_cells_get_more_interleaved_repetitions(monkeypatch):
    """A cell where one implementation's repetitions take either of two very different
    times (page faults of a fresh 1 GiB result in a VM, say) runs every implementation
    again, interleaved, up to UNSTEADY_MAX_FACTOR times the planned repetitions, and is
    then reported unsteady; a steady cell runs exactly what was planned."""
    from gpucrypt.bench import cpu as bench_cpu

    times = {"steady": iter([1.0] * 100), "bimodal": iter([1.0, 3.0, 1.0, 3.0] * 25)}
    order = []
    monkeypatch.setattr(bench_cpu, "plan_loop", lambda per_call, budget: (4, 1))
    monkeypatch.setattr(bench_cpu, "calibrate", lambda op: 1.0)
    monkeypatch.setattr(bench_cpu, "_timed_loop", lambda op, n: op())

    def maker(name):
        def make(thread):
            return lambda: order.append(name) or next(times[name])
        return make

    timings = bench_cpu.time_host_group({"steady": maker("steady"), "bimodal": maker("bimodal")}, 1, 0.1)
    planned = 4 * bench_cpu.UNSTEADY_MAX_FACTOR
    assert [t.repetitions for t in timings.values()] == [planned, planned]
    assert not timings["steady"].unsteady and timings["bimodal"].unsteady
    timed = order[2:]  # after the two warm-up calls
    # interleaved throughout, each round starting with the next implementation
    assert timed == ["steady", "bimodal", "bimodal", "steady"] * (planned // 2)
    times = {"steady": iter([1.0] * 100), "bimodal": iter([1.0] * 100)}
    order.clear()
    timings = bench_cpu.time_host_group({"steady": maker("steady"), "bimodal": maker("bimodal")}, 1, 0.1)
    assert [t.repetitions for t in timings.values()] == [4, 4]
    assert not any(t.unsteady for t in timings.values())


def test_each_implementations_repetitions_are_spread_over_the_whole_run(monkeypatch):
    """Implementations whose calibrations plan different repetition counts keep their own
    counts (the time budget), and the fewer ones are spread from the first rounds to the
    last: run back to back they all came first, so the last rounds timed one side alone
    (load arriving then would hit one side only)."""
    from gpucrypt.bench import cpu as bench_cpu

    order = []
    monkeypatch.setattr(bench_cpu, "plan_loop", lambda per_call, budget: (10 if per_call < 1.5 else 3, 1))
    monkeypatch.setattr(bench_cpu, "calibrate", lambda op: op.per_call)
    monkeypatch.setattr(bench_cpu, "_timed_loop", lambda op, n: op() or 1.0)

    def maker(name, per_call):
        def make(thread):
            def op():
                order.append(name)
            op.per_call = per_call
            return op
        return make

    timings = bench_cpu.time_host_group({"fast": maker("fast", 1.0), "slow": maker("slow", 2.0)}, 1, 0.1)
    assert [t.repetitions for t in timings.values()] == [10, 3]
    timed = order[2:]  # after the two warm-up calls
    slow = [i for i, name in enumerate(timed) if name == "slow"]
    assert len(timed) == 13 and len(slow) == 3
    assert slow[0] > 1 and slow[-1] >= len(timed) - 2  # not all first: the last round too


# --------------------------------------------------------------------------- a real (tiny) run

@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """One tiny CPU run of every algorithm, with --json and --plot."""
    tmp = tmp_path_factory.mktemp("bench")
    json_path, png_path = tmp / "run.json", tmp / "run.png"
    code = main(["bench", "--device", "cpu", "--seconds", "0.002", "--sizes", "16,64",
                 "--json", str(json_path), "--plot", str(png_path)])
    assert code == 0
    return json.loads(json_path.read_text()), png_path


def test_json_schema(cpu_run):
    doc, _ = cpu_run
    assert doc["schema"] == bench.SCHEMA_VERSION
    for name, kind in ENV_FIELDS.items():
        assert isinstance(doc["environment"][name], kind), name
    assert doc["environment"]["libraries"]["cryptography"]
    assert doc["config"]["sizes"] == [16, 64]
    # what the run planned: --device cpu left the GPU rows out, so the record does too
    assert doc["config"]["implementations"] == list(bench.CPU_IMPLEMENTATIONS)
    assert doc["cells"]
    for cell in doc["cells"]:
        assert set(cell) == set(CELL_FIELDS)
        for name, kind in CELL_FIELDS.items():
            assert isinstance(cell[name], kind), (name, cell)
        assert cell["operation"] in ("encrypt", "decrypt") and cell["form"] in ("alloc", "into")
        assert cell["size"] in (16, 64)
        assert cell["verified"]  # every CPU row's output was checked before it was timed
        assert cell["repetitions"] >= MIN_REPETITIONS and cell["iterations"] >= 1
        assert cell["median_seconds"] > 0
        assert cell["gbps"] == pytest.approx(cell["size"] * cell["threads"] / cell["median_seconds"] / 1e9)
        assert cell["fraction_of_copy"] is None  # no GPU rows in a --device cpu run


def test_every_cell_has_its_baseline_and_ratio(cpu_run):
    doc, _ = cpu_run
    cells = doc["cells"]
    base = {(c["algorithm"], c["operation"], c["form"], c["size"]): c for c in cells
            if c["implementation"] == c["baseline"]}
    # the baseline is measured for every algorithm, operation, form and size, except
    # XChaCha20-Poly1305's _into tables: PyNaCl, its baseline, has no _into API
    assert len(base) == (len(bench.ALGORITHMS) * 2 - 1) * 2 * 2
    for key, c in base.items():
        assert c["ratio"] == 1.0 and c["tie"] is None
        assert c["spread"] is not None and c["spread"] >= 0  # measured twice, interleaved
        expected = "pynacl" if key[0] == "xchacha20-poly1305" else "cryptography"
        assert c["implementation"] == expected
    for c in cells:
        b = base.get((c["algorithm"], c["operation"], c["form"], c["size"]))
        if b is None:
            assert c["algorithm"] == "xchacha20-poly1305" and c["form"] == "into"
            assert c["ratio"] is None and c["baseline"] == "" and c["tie"] is None
            continue
        assert c["ratio"] == pytest.approx(c["gbps"] / b["gbps"])
        if c is not b:  # a tie exactly when the time ratio is within its size's noise of 1
            assert c["tie"] == (abs(1 / c["ratio"] - 1) <= b["spread"])
        assert isinstance(c["unsteady"], bool)  # every CPU cell says whether it was steady


@pytest.mark.parametrize("seconds, tie", [(1.25, False), (0.75, False), (1.2, True), (0.8, True)])
def test_tie_is_judged_on_times_like_the_noise(seconds, tie):
    """The noise is a spread of times, so a tie compares the time ratio with it: gpucrypt 25%
    slower or 25% faster than the baseline, with 22% noise, is no tie either way (on the
    throughput ratio 1/1.25 = x0.80 would be one), and 20% either way is one; RESULTS.md
    marks the recorded cells by the same rule."""
    def cell(implementation, secs, spread=None):
        return bench.Cell("aes-256-gcm", "encrypt", "into", implementation, "cpu", 1 << 20, 1, 7, 1, secs,
                          (1 << 20) / secs / 1e9, None, "cryptography", None, "perf_counter", spread=spread)
    report = bench.BenchReport(environment={}, config=bench.BenchConfig(sizes=(1 << 20,)))
    report.cells = [cell("cryptography", 1.0, spread=0.22), cell("gpucrypt-cpu", seconds)]
    bench._fill_ratios(report)
    assert report.cells[1].tie is tie
    cells = [dataclasses.asdict(c) for c in report.cells]
    assert _results_md()._marks(cells[1], cells) == ("=" if tie else "")


def test_a_one_thread_gpu_row_gets_no_ratio_to_an_n_thread_baseline():
    """With --threads 4 the +transfer row (one host thread, same seconds per message as one
    CPU thread) came out x0.25 against the baseline's 4-thread aggregate: unlike with
    unlike. It gets no ratio (the run's note says why); a 1-thread baseline gives one."""
    def cell(implementation, threads):
        return bench.Cell("aes-128-gcm", "encrypt", "into", implementation, "x", 1 << 20, threads,
                          7, 1, 1e-4, (1 << 20) * threads / 1e-4 / 1e9, None, "cryptography",
                          None, "t", spread=0.01 if implementation == "cryptography" else None)
    config = bench.BenchConfig(sizes=(1 << 20,), threads=4, include_transfer=True)
    report = bench.BenchReport(environment={}, config=config)
    report.cells = [cell("cryptography", 4), cell("gpucrypt-gpu+transfer", 1)]
    bench._fill_ratios(report)
    assert report.cells[1].ratio is None and report.cells[1].tie is None
    report.cells = [cell("cryptography", 1), cell("gpucrypt-gpu+transfer", 1)]
    bench._fill_ratios(report)
    assert report.cells[1].ratio == pytest.approx(1.0) and report.cells[1].tie is True


class _PretendGpu:
    """A GPU session for the run's logic where no GPU is: every device-resident row
    takes 1 us (a real one's figure comes from CUDA events), or is refused with
    ``refuse``. Not a measurement of anything."""

    simulator = False
    device_name = "pretend GPU"

    def __init__(self, refuse=None):
        self.refuse = refuse

    def copy_bandwidth(self, budget):
        return 1e12

    def time_cell(self, implementation, m, operation, budget):
        from gpucrypt.bench.cpu import Timing
        from gpucrypt.bench.gpu import GpuRefused

        if self.refuse:
            raise GpuRefused(self.refuse)
        return Timing(3, 1, 1e-6)


def _pretend_gpu(monkeypatch, refuse=None):
    monkeypatch.setattr(bench, "_gpu_session", lambda config: (_PretendGpu(refuse), None))


def test_the_threads_note_says_why_gpu_rows_have_no_ratio(capsys, monkeypatch):
    """The note is about GPU rows: a run with none (--device cpu) printed it too."""
    code, out, err = run_cli(capsys, *ONE_CELL, "--threads", "2")
    assert code == 0, err
    assert "CPU rows: 2 threads" in out and "GPU rows" not in out
    _pretend_gpu(monkeypatch)
    args = [a for a in ONE_CELL]
    args[args.index("--device") + 1] = "gpu"
    args[args.index("--forms") + 1] = "into"
    args[args.index("--implementations") + 1] = "gpucrypt-gpu"
    code, out, err = run_cli(capsys, *args, "--threads", "2")
    assert code == 0, err
    assert "GPU rows: one host thread, so no ratio to the 2-thread baseline" in out


def test_a_cell_exactly_at_the_noise_bound_is_a_tie_as_the_verdicts_say():
    """1.1 s against 1.0 s with 10% noise: the issue-13 verdict compares the times (within
    the noise); the tie mark works back from the throughput ratio, whose rounding put
    1/ratio - 1 a hair above 0.10 (no mark for the same cell)."""
    base_s, ours_s = 1.0e-6, 1.1e-6
    ratio = (1024 / ours_s) / (1024 / base_s)  # the throughput ratio, as _fill_ratios makes it
    assert ours_s / base_s <= 1 + 0.10 and bench.is_tie(ratio, 0.10)


def test_allocating_rows_against_allocating_baselines(cpu_run):
    """PyNaCl allocates: it is XChaCha20-Poly1305's baseline in the allocating tables only,
    next to gpucrypt's allocating calls; both forms are measured for every algorithm."""
    doc, _ = cpu_run
    x = [c for c in doc["cells"] if c["algorithm"] == "xchacha20-poly1305"]
    assert {c["form"] for c in x if c["implementation"] == "pynacl"} == {"alloc"}
    assert {c["form"] for c in x if c["implementation"] == "gpucrypt-cpu"} == {"alloc", "into"}
    reasons = {u["reason"] for u in doc["unavailable"] if u["implementation"] == "pynacl"}
    assert any("_into API" in r for r in reasons)
    for alg in bench.ALGORITHMS:
        forms = {c["form"] for c in doc["cells"] if c["algorithm"] == alg}
        assert forms == {"alloc", "into"}, alg


def test_gpucrypt_cpu_rows_present(cpu_run):
    doc, _ = cpu_run
    measured = {(c["algorithm"], c["implementation"]) for c in doc["cells"]}
    missing = {(u["algorithm"], u["implementation"]): u["reason"] for u in doc["unavailable"]}
    for alg in bench.ALGORITHMS:
        # either measured, or listed with the reason it could not run
        assert (alg, "gpucrypt-cpu") in measured or missing.get((alg, "gpucrypt-cpu"))
        assert (alg, "gpucrypt-cpu") in measured or bench.ALGORITHMS[alg].kind == "stream"
    assert not any(i in bench.GPU_IMPLEMENTATIONS for _, i in measured)


def test_plot_written(cpu_run):
    import matplotlib  # noqa: F401  (in the test extra: a missing one is a broken install)
    _, png = cpu_run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000


def test_table_output(capsys):
    code, out, _ = run_cli(capsys, "--device", "cpu", *TINY, "--algorithms", "aes-128-gcm",
                           "--operations", "encrypt")
    assert code == 0
    assert "aes-128-gcm encrypt, allocating" in out and "aes-128-gcm encrypt, _into" in out
    assert out.count("baseline: cryptography; noise ") == 2  # one noise figure per table
    assert "load average (1 min): " in out
    row = next(line for line in out.splitlines() if line.startswith("cryptography"))
    assert row.count("x1.00") == 2  # one per size
    assert "decrypt" not in out


def test_the_header_claims_the_checks_only_for_checked_rows():
    """The header said every row was checked while the simulator's +transfer rows were
    not: it now names the rows whose output was not checked."""
    def cell(implementation, verified):
        return bench.Cell("chacha20", "encrypt", "into", implementation, "x", 64, 1, 1, 1, 1e-6,
                          0.064, None, "cryptography", None, "t", verified=verified)
    report = bench.BenchReport(environment={"cpu": "a CPU", "cpu_usable": 2, "date": "today"},
                               config=bench.BenchConfig(algorithms=("chacha20",), sizes=(64,)))
    report.cells = [cell("cryptography", True), cell("gpucrypt-gpu+transfer", False)]
    text = report.render()
    assert "every row's output was checked" not in text
    assert "output NOT checked against the reference: gpucrypt-gpu+transfer (1 cell)" in text
    report.cells[1].verified = True
    assert "every row's output was checked against the reference" in report.render()


def test_threads_aggregate(tmp_path, capsys):
    """CPU rows at --threads 2 are aggregates with a ratio to the 2-thread baseline (a
    lookup of a 1-thread baseline left them without one)."""
    path = tmp_path / "t.json"
    code, _, _ = run_cli(capsys, "--device", "cpu", *TINY, "--algorithms", "chacha20-poly1305",
                         "--implementations", "cryptography,gpucrypt-cpu", "--threads", "2",
                         "--operations", "encrypt", "--json", str(path))
    assert code == 0
    cells = json.loads(path.read_text())["cells"]
    assert cells and all(c["threads"] == 2 for c in cells)
    for c in cells:
        assert c["gbps"] == pytest.approx(2 * c["size"] / c["median_seconds"] / 1e9)
    ours = [c for c in cells if c["implementation"] == "gpucrypt-cpu"]
    assert len(ours) == 4  # two sizes, two forms
    for c in ours:
        assert c["ratio"] is not None, c
        base = next(b for b in cells if b["implementation"] == "cryptography"
                    and (b["form"], b["size"]) == (c["form"], c["size"]))
        assert c["ratio"] == pytest.approx(c["gbps"] / base["gbps"])


def test_sizes_with_units_reach_the_json(tmp_path, capsys):
    path = tmp_path / "s.json"
    code, _, _ = run_cli(capsys, "--device", "cpu", "--seconds", "0.01", "--sizes", "1K,1kB",
                         "--algorithms", "aes-256-gcm", "--operations", "decrypt", "--forms", "into",
                         "--implementations", "gpucrypt-cpu", "--json", str(path))
    assert code == 0
    doc = json.loads(path.read_text())
    assert doc["config"]["sizes"] == [1024, 1000] and doc["config"]["forms"] == ["into"]
    # the baseline comes along even when not asked for: every ratio needs it
    assert {c["implementation"] for c in doc["cells"]} == {"cryptography", "gpucrypt-cpu"}
    assert {c["form"] for c in doc["cells"]} == {"into"}


def test_wrong_output_is_never_timed(monkeypatch, capsys):
    """An implementation whose encryption is wrong (one flipped bit) stops the run with
    the reason, before anything is timed: exit 1, one line."""
    import gpucrypt

    real = gpucrypt.ChaCha20Poly1305.encrypt

    def flipped(self, nonce, data, aad):
        out = bytearray(real(self, nonce, data, aad))
        out[0] ^= 1
        return bytes(out)

    monkeypatch.setattr(gpucrypt.ChaCha20Poly1305, "encrypt", flipped)
    code, out, err = run_cli(capsys, "--device", "cpu", *TINY, "--algorithms", "chacha20-poly1305",
                             "--operations", "encrypt", "--forms", "alloc")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "gpucrypt-cpu produced bytes that differ from the reference" in err


@pytest.mark.parametrize("operation", ["encrypt", "decrypt"])
def test_an_into_form_that_writes_nothing_is_never_timed(operation, monkeypatch, capsys):
    """The CPU rows of an ``into`` table share one output buffer per thread, and the
    baseline runs first: an implementation that writes nothing (or half) must not pass
    its check on the baseline's bytes left there."""
    import gpucrypt

    method = f"{operation}_into"
    real = getattr(gpucrypt.ChaCha20Poly1305, method)

    def half(self, nonce, data, aad, buf):
        n = real(self, nonce, data, aad, bytearray(len(memoryview(buf).cast("B"))))
        return n  # the bytes went elsewhere: buf keeps whatever it held

    monkeypatch.setattr(gpucrypt.ChaCha20Poly1305, method, half)
    code, out, err = run_cli(capsys, "--device", "cpu", *TINY, "--algorithms", "chacha20-poly1305",
                             "--operations", operation, "--forms", "into")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "gpucrypt-cpu produced bytes that differ from the reference" in err


@pytest.mark.cudasim
@pytest.mark.parametrize("operation", ["encrypt", "decrypt"])
def test_a_gpu_row_whose_timed_call_writes_wrong_bytes_is_never_timed(operation, on_cudasim,
                                                                      monkeypatch):
    """The GPU rows check the very call they time, output included: a decryption whose
    verdict is right but whose plaintext is wrong, or an encryption into the timed buffer
    that differs from the checked batch, is refused."""
    if not on_cudasim:
        pytest.skip("only meaningful under numba's CUDA simulator")
    from _reference import require_gpu_backend

    require_gpu_backend()
    from gpucrypt.backends.gpu import GpuBackend
    from gpucrypt.bench.cpu import ALGORITHMS, Material
    from gpucrypt.bench.gpu import GpuSession

    name = "open_batch" if operation == "decrypt" else "seal_batch"
    real = getattr(GpuBackend, name)

    def spoiled(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        dsts = args[6] if operation == "decrypt" else args[5]  # (family, keys, nonces, srcs, [tags,] aads, dsts)
        if len(dsts) == 1:  # the timed call's (the checked batch has every view)
            dsts[0][...] = 0xAA
        return result

    monkeypatch.setattr(GpuBackend, name, spoiled)
    session = GpuSession(simulator_smoke=True)
    with pytest.raises(RuntimeError, match="timed .* call's output differs"):
        session.time_cell("gpucrypt-gpu", Material(ALGORITHMS["chacha20-poly1305"], 1024),
                          operation, 0.01)


def test_peak_memory_follows_the_largest_size():
    """A cell holds the plaintext, the sealed reference, one shared output buffer and one
    allocated result: about four times the size (under six with the transients of making
    the data), whatever the number of implementations (here three rows, the baseline
    twice) and of sizes before it. The default run (64 MiB at most) stays under 512 MiB."""
    import tracemalloc

    import gc

    size = 4 << 20
    # XChaCha20-Poly1305 brings rows that cannot run (PyNaCl's _into): their exceptions must
    # not keep a cell's buffers alive (the garbage collector is off: nothing cleans up after)
    config = bench.BenchConfig(algorithms=("aes-128-gcm", "xchacha20-poly1305"),
                               sizes=(size // 4, size), seconds=0.001, device="cpu")
    bench.run(dataclasses.replace(config, sizes=(16,)))  # imports and one-time set-up first
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        report = bench.run(config)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
        gc.enable()
    assert len(report.cells) == 16 + 12  # AES-GCM 2 rows x 8 cells; XChaCha20: no PyNaCl _into
    assert 3 * size < peak < 6 * size


def test_progress_bar_only_when_asked(capsys):
    args = ["--device", "cpu", *TINY, "--algorithms", "aes-128-gcm", "--implementations", "cryptography"]
    _, _, err = run_cli(capsys, *args)
    assert err == ""  # stderr is not a terminal here
    _, _, err = run_cli(capsys, *args, "--progress")
    assert "[" in err and "aes-128-gcm" in err


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("args, message", [
    (["--algorithms", "rot13"], "unknown algorithm rot13"),
    (["--algorithms", "aes-128-gcm,des"], "unknown algorithm des"),
    (["--sizes", "16,12XB"], "invalid size '12XB'"),
    (["--sizes", "0"], "at least 1 byte"),
    (["--operations", "sign"], "unknown operation sign"),
    (["--implementations", "openssl-cli"], "unknown implementation openssl-cli"),
    (["--seconds", "0"], "--seconds must be positive"),
    (["--threads", "0"], "--threads must be at least 1"),
])
def test_usage_errors_exit_2_one_line(capsys, args, message):
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and message in err and err.startswith("gpucrypt bench: ")


def test_usage_error_no_traceback_in_a_real_process():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    # what the console script does (``python -m gpucrypt.cli`` would load cli.py twice)
    launcher = "import sys; from gpucrypt.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", launcher, "bench", "--sizes", "1PiB"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "invalid size '1PiB'" in proc.stderr


def test_plot_without_matplotlib(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, _, err = run_cli(capsys, *TINY, "--plot", str(tmp_path / "x.png"))
    assert code == 2 and err.count("\n") == 1 and "pip install 'gpucrypt[plot]'" in err
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- GPU reasons

def test_no_gpu_says_why(monkeypatch, tmp_path, capsys):
    import gpucrypt.backends as backends

    def no_gpu(name):
        if name == "gpu":
            raise backends.BackendUnavailable("no NVIDIA driver here (test)")
        return original(name)

    original = backends.get_backend
    monkeypatch.setattr(backends, "get_backend", no_gpu)
    path = tmp_path / "n.json"
    code, out, _ = run_cli(capsys, *TINY, "--algorithms", "chacha20-poly1305", "--json", str(path))
    assert code == 0
    assert "no GPU found: no NVIDIA driver here (test)" in out
    doc = json.loads(path.read_text())
    reasons = {u["implementation"]: u["reason"] for u in doc["unavailable"]}
    assert "no NVIDIA driver here (test)" in reasons["gpucrypt-gpu"]
    assert {c["implementation"] for c in doc["cells"]} >= {"cryptography", "gpucrypt-cpu"}
    # asking for the GPU explicitly is an error with the same reason
    code, _, err = run_cli(capsys, *TINY, "--device", "gpu")
    assert code == 1 and err.count("\n") == 1 and "no NVIDIA driver here (test)" in err


@pytest.mark.cudasim
def test_simulator_is_refused_without_smoke(on_cudasim, capsys):
    if not on_cudasim:
        pytest.skip("only meaningful under numba's CUDA simulator")
    code, out, _ = run_cli(capsys, *TINY, "--algorithms", "chacha20-poly1305", "--operations", "encrypt")
    assert code == 0
    assert "simulator" in out and "gpucrypt-gpu " not in out.replace("gpucrypt-gpu,", "")
    code, _, err = run_cli(capsys, *TINY, "--device", "gpu")
    assert code == 1 and err.count("\n") == 1 and "NUMBA_ENABLE_CUDASIM" in err


@pytest.mark.cudasim
def test_simulator_smoke_rows_are_labelled(on_cudasim, tmp_path, capsys):
    if not on_cudasim:
        pytest.skip("only meaningful under numba's CUDA simulator")
    from _reference import require_gpu_backend

    require_gpu_backend()
    path = tmp_path / "sim.json"
    code, out, _ = run_cli(capsys, "--device", "gpu", "--simulator-smoke", "--seconds", "0.01",
                           "--sizes", "64", "--algorithms", "chacha20-poly1305",
                           "--operations", "encrypt", "--include-transfer", "--json", str(path))
    assert code == 0
    doc = json.loads(path.read_text())
    gpu_cells = [c for c in doc["cells"] if c["implementation"] in bench.GPU_IMPLEMENTATIONS]
    assert {c["implementation"] for c in gpu_cells} == set(bench.GPU_IMPLEMENTATIONS)
    for c in gpu_cells:
        assert c["device"] == c["note"] == "simulator (not a measurement)"
        assert c["ratio"] is None and c["fraction_of_copy"] is None
    # a simulated figure is a label, but its bytes were checked: verified says so (it
    # said False for every simulator row, under a header claiming every row was checked)
    assert all(c["verified"] for c in doc["cells"])
    assert "simulator (not a measurement)" in out
    assert "every row's output was checked against the reference" in out


@pytest.mark.cudasim
@pytest.mark.parametrize("form, method", [("alloc", "encrypt"), ("into", "encrypt_into")])
def test_a_simulated_transfer_row_with_wrong_output_is_never_reported(on_cudasim, monkeypatch,
                                                                     capsys, form, method):
    """The simulator's +transfer rows were timed without a check: wrong bytes came out as
    a row like any other."""
    if not on_cudasim:
        pytest.skip("only meaningful under numba's CUDA simulator")
    from _reference import require_gpu_backend

    require_gpu_backend()
    import gpucrypt

    real = getattr(gpucrypt.ChaCha20Poly1305, method)

    def flipped(self, *args):
        result = real(self, *args)
        if method == "encrypt":
            return bytes([result[0] ^ 1]) + result[1:]
        args[-1][0] ^= 1  # the output buffer
        return result

    monkeypatch.setattr(gpucrypt.ChaCha20Poly1305, method, flipped)
    code, out, err = run_cli(capsys, "--device", "gpu", "--simulator-smoke", "--seconds", "0.01",
                             "--sizes", "64", "--algorithms", "chacha20-poly1305",
                             "--operations", "encrypt", "--forms", form,
                             "--implementations", "gpucrypt-gpu+transfer")
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert "gpucrypt-gpu+transfer produced bytes that differ from the reference" in err


# --------------------------------------------------------------------------- RESULTS.md

def _benchmarks_module(name: str):
    """A script of benchmarks/, imported from its file (benchmarks/ is no package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results_md():
    return _benchmarks_module("make_results_md")


def test_results_page_of_a_forms_run(cpu_run):
    """RESULTS.md and the README render a schema-2 run: both forms, each table's noise, and
    issue 13's verdicts, which weigh a miss against the table's noise."""
    md = _results_md()
    doc, _ = cpu_run
    text = "\n".join(md.render_run("tiny", doc))
    assert "| aes-128-gcm | encrypt | alloc |" in text and "| aes-128-gcm | encrypt | into |" in text
    assert "Issue 13" in text and "noise" in text
    assert "| xchacha20-poly1305 | encrypt | alloc |" in md.readme_forms_section("tiny", doc)

    def cells(seconds, spread):
        base = dict(algorithm="aes-256-gcm", operation="encrypt", form="into", size=1024,
                    baseline="cryptography", ratio=1.0, tie=None)
        return [dict(base, implementation="cryptography", median_seconds=1.0, spread=spread),
                dict(base, implementation="gpucrypt-cpu", median_seconds=seconds, ratio=1 / seconds,
                     spread=None)]
    assert md.acceptance_issue13(cells(1.04, 0.01))[-1].endswith("holds")
    assert md.acceptance_issue13(cells(1.2, 0.3))[-1].endswith("within the noise")
    assert md.acceptance_issue13(cells(1.2, 0.05))[-1].endswith("NOT MET")
    assert "real noise was larger" in md.acceptance_issue13(cells(0.8, 0.05))[-1]


def _issue13_cell(implementation, size, seconds, spread=None, unsteady=False):
    return dict(algorithm="aes-256-gcm", operation="encrypt", form="into", implementation=implementation,
                baseline="cryptography", size=size, median_seconds=seconds, ratio=1.0, spread=spread,
                unsteady=unsteady, tie=None)


@pytest.mark.parametrize("big_seconds, big_spread, big_unsteady", [
    (1.5, 0.01, True),    # the worst cell is unsteady
    (1.10, 0.12, False),  # the worst cell sits in a noisy column
])
def test_issue13_judges_every_cell_against_its_own_column(big_seconds, big_spread, big_unsteady):
    """A steady miss at 1 KiB, beyond its own column's noise, makes the table NOT MET, however
    the worst cell (elsewhere) is excused; the 64 B check is excused only by the 64 B column's
    noise, not by a noisy column at another size."""
    md = _results_md()
    cell = _issue13_cell
    rows = [cell("cryptography", 1024, 1.0e-6, spread=0.005), cell("gpucrypt-cpu", 1024, 1.30e-6),
            cell("cryptography", 1 << 30, 1.0, spread=big_spread),
            cell("gpucrypt-cpu", 1 << 30, big_seconds, unsteady=big_unsteady)]
    line = md.acceptance_issue13(rows)[-1]
    assert line.endswith("NOT MET") and "NOT MET at 1 KiB (x1.300)" in line
    # the 1 KiB cell alone within its noise: the table takes the worse verdict of the two
    rows[1] = cell("gpucrypt-cpu", 1024, 1.004e-6)
    assert md.acceptance_issue13(rows)[-1].endswith("unsteady (rerun)" if big_unsteady else "within the noise")
    small = [cell("cryptography", 64, 0.5e-6, spread=0.01), cell("gpucrypt-cpu", 64, 1.5e-6),
             cell("cryptography", 1 << 30, 1.0, spread=1.5), cell("gpucrypt-cpu", 1 << 30, 1.0)]
    assert md.acceptance_issue13(small)[-1].endswith("64 B: +1.00 us per call against 0.50 us: NOT MET")


def test_tensor_page_gives_issue13_verdicts_to_cpu_runs_only():
    """Issue 13's criteria are for the CPU paths: a GPU tensor run shows its ratios without a
    verdict, and the same figures from a CPU run get one."""
    md = _results_md()
    doc = {"device": "cuda", "threads": [16], "device_name": "a GPU", "torch": "2", "commit": "c" * 40,
           "load_average_start": 0.5, "load_average_end": 0.6,
           "cases": [dict(case=case, algorithm="aes-gcm", threads=16, tensors=n, bytes=1 << 20,
                          encrypt_gbps=gbps, decrypt_gbps=gbps, roundtrip_identical=True)
                     for case, n, gbps in (("single", 1, 100.0), ("model", 300, 25.0))],
           "model_over_single": {"aes-gcm": {"encrypt": 0.25, "decrypt": 0.5}},
           "small": [dict(what="encrypt_tensor (torch)", algorithm="aes-gcm", us_per_call=2000.0,
                          over_cryptography=800.0)]}
    gpu = "\n".join(md.render_tensor_threads_run("gpu", doc))
    assert "encrypt x4.00, decrypt x2.00" in gpu and "| 2000.0 | x800.0 |" in gpu
    assert "NOT MET" not in gpu and "holds" not in gpu
    cpu = "\n".join(md.render_tensor_threads_run("cpu", dict(doc, device="cpu")))
    assert "encrypt x4.00, decrypt x2.00 (asked: <= x1.1): NOT MET" in cpu
    assert "worst here x800.0: NOT MET" in cpu


def test_gpu_session_plan_and_host_profile_refuses_the_simulator(tmp_path):
    """The one GPU call's plan (DRY_RUN) runs every step of "all" in order, the host profile last;
    the profile script itself refuses the simulator, whose path is not the device's."""
    root = os.path.join(os.path.dirname(__file__), os.pardir)
    env = dict(os.environ, DRY_RUN="1", OUT=str(tmp_path / "out"))
    plan = subprocess.run(["bash", os.path.join(root, "benchmarks", "gpu_session.sh")], env=env,
                          capture_output=True, text=True, timeout=60, cwd=root)
    assert plan.returncode == 0, plan.stderr
    steps = re.findall(r"== (\S+) \(limit", (tmp_path / "out" / "summary.txt").read_text())
    assert steps == ["install", "env", "warmup", "gpu-tests", "bench-device", "bench", "tensor", "profile",
                     "phases"]
    assert "benchmarks/host_profile.py --calls 50" in (tmp_path / "out" / "bench.log").read_text()
    for script in ("host_profile.py", "kernel_phases.py"):
        done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", script)],
                              env=dict(os.environ, NUMBA_ENABLE_CUDASIM="1"), capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2 and "simulator" in done.stdout, script


@pytest.mark.cudasim
def test_kernel_phases_times_every_launch_of_a_seal():
    """kernel_phases.py's hook sees every launch of one seal, in order, with events around it,
    and leaves the kernel modules' launcher as it found it (run here in the simulator, whose
    events time nothing: the device's figures come from gpu_session.sh's phases step)."""
    import importlib.util

    import numpy as np
    from numba import cuda

    from _reference import require_gpu_backend
    from gpucrypt.kernels import _launch, aes, chacha20, ghash, poly1305

    gpu = require_gpu_backend()
    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "kernel_phases.py")
    spec = importlib.util.spec_from_file_location("kernel_phases", path)
    phases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(phases)
    assert phases.parse_size("64MiB") == 64 << 20 and phases.parse_size("100") == 100
    modules = (aes, chacha20, ghash, poly1305)
    records, undo = phases.timed_launches(cuda, modules)
    try:
        data = np.frombuffer(os.urandom(200), np.uint8).copy()
        gpu.seal_batch("chacha20-poly1305", [os.urandom(32)], [os.urandom(12)], [data], [b""], [data])
        names = [r[0] for r in records]
        assert names[:4] == ["_chacha20_xor_kernel", "_chacha20_xor_kernel", "_poly1305_powers",
                             "_poly1305_aead_partial"], names
        records.clear()
        gpu.seal_batch("aes-gcm", [os.urandom(16)], [os.urandom(12)], [data], [b""], [data])
        names = [r[0] for r in records]
        assert names[:2] == ["_aes_ctr_xor_kernel", "_aes_ctr_xor_kernel"] and \
            any("ghash" in n for n in names), names
    finally:
        undo()
    assert all(m.launch is _launch.launch for m in modules)


# --------------------------------------------------------------------------- benchmarks/ scripts

class _StubBenchmark:
    """What pytest-benchmark's fixture offers ``_suite.run_cell``: records whether it timed."""

    def __init__(self):
        self.extra_info, self.group, self.timed = {}, None, False

    def __call__(self, op):
        self.timed = True
        op()
        self.stats = type("S", (), {"stats": type("M", (), {"median": 1e-6})})


@pytest.mark.parametrize("form, method", [("into", "encrypt_into"), ("alloc", "encrypt")])
def test_suite_refuses_a_wrong_output_before_timing(monkeypatch, form, method):
    """``pytest benchmarks/`` checks each operation's output against the reference before it
    times it, as the command does: a gpucrypt that writes zeros is never timed."""
    import numpy as np

    import gpucrypt
    from gpucrypt.bench.cpu import WrongOutput

    suite = _benchmarks_module("_suite")

    def broken(self, nonce, data, aad, out=None):
        if out is None:
            return bytes(len(data) + 16)
        np.frombuffer(memoryview(out).cast("B"), dtype=np.uint8)[:] = 0
        return len(out)
    monkeypatch.setattr(gpucrypt.AESGCM, method, broken)
    stub = _StubBenchmark()
    with pytest.raises(WrongOutput):
        suite.run_cell(stub, "aes-256-gcm", "encrypt", "gpucrypt-cpu", 1024, form)
    assert not stub.timed
    monkeypatch.undo()
    suite.run_cell(stub, "aes-256-gcm", "encrypt", "gpucrypt-cpu", 1024, form)
    assert stub.timed and stub.extra_info["baseline"] == "cryptography"
    # XChaCha20-Poly1305's allocating table has PyNaCl's allocating call as its baseline,
    # and PyNaCl's output is checked before it is timed too
    nacl = _StubBenchmark()
    suite.run_cell(nacl, "xchacha20-poly1305", "encrypt", "pynacl", 64, "alloc")
    assert nacl.timed and nacl.extra_info["baseline"] == "pynacl"
    import nacl.bindings
    monkeypatch.setattr(nacl.bindings, "crypto_aead_xchacha20poly1305_ietf_encrypt",
                        lambda message, aad, nonce, key: bytes(len(message) + 16))
    nacl = _StubBenchmark()
    with pytest.raises(WrongOutput):
        suite.run_cell(nacl, "xchacha20-poly1305", "encrypt", "pynacl", 64, "alloc")
    assert not nacl.timed


def test_tensor_bench_checks_the_timed_calls_against_cryptography():
    """tensor_bench.py refuses to time a gpucrypt whose in-place batches and small calls are
    self-consistent (each decrypts what it encrypted) but not the cipher: here one that
    uses a different key than it was given, under the nonce it records."""
    torch = pytest.importorskip("torch")
    import types

    import gpucrypt

    tb = _benchmarks_module("tensor_bench")

    def other_key(call):
        return lambda data, key, *args, **kwargs: call(data, bytes([key[0] ^ 1]) + key[1:], *args, **kwargs)
    fake = types.SimpleNamespace(**{name: other_key(getattr(gpucrypt, name)) for name in (
        "encrypt_tensors", "decrypt_tensors", "encrypt_tensor", "decrypt_tensor")})
    clock = tb._Clock(torch, "cpu")
    for lib, refused in ((gpucrypt, False), (fake, True)):
        for kind in ("single", "model"):
            cases = {(kind, a): tb.state_dict(torch, kind, 64 << 10, "cpu") for a in tb.ALGORITHMS}
            if refused:
                with pytest.raises(SystemExit, match="differ from cryptography's"):
                    tb.time_batches(torch, lib, clock, cases, reps=1)
            else:
                assert all(r["roundtrip_identical"] for r in tb.time_batches(torch, lib, clock, cases, reps=1))
        if refused:
            with pytest.raises(SystemExit, match="differ from cryptography's"):
                tb.time_small(torch, lib, "cpu", calls=2, reps=1)
        else:
            assert tb.time_small(torch, lib, "cpu", calls=2, reps=1)


def test_cpu_session_names_an_unknown_cpu(tmp_path):
    """cpu_session.sh on a CPU that is neither AMD nor Intel files its results under
    cpu-unknown instead of exiting silently (``set -e`` and a grep that finds nothing)."""
    root = os.path.join(os.path.dirname(__file__), os.pardir)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: Neoverse-V2\n")
    (tmp_path / "benchmarks").mkdir()
    with open(os.path.join(root, "benchmarks", "cpu_session.sh")) as f:
        script = f.read().replace("/proc/cpuinfo", str(cpuinfo))
    (tmp_path / "benchmarks" / "cpu_session.sh").write_text(script)
    done = subprocess.run(["bash", str(tmp_path / "benchmarks" / "cpu_session.sh"), "t", "dcp"],
                          env=dict(os.environ, PYTHON="echo"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert re.search(r"--json benchmarks/results/\S+-cpu-unknown-dcp-t\.json", done.stdout)


# --------------------------------------------------------------------------- options checked before the run
ONE_CELL = ["--device", "cpu", "--algorithms", "chacha20", "--sizes", "16", "--seconds", "0.01",
            "--operations", "encrypt", "--forms", "alloc", "--implementations", "cryptography"]


def _refused_before_the_run(code, out, err, *words):
    assert code == 2 and out == "", err  # no table: nothing ran
    assert err.count("\n") == 1 and err.startswith("gpucrypt bench: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err


@pytest.mark.parametrize("seconds", ["inf", "nan", "1e300"])
def test_seconds_must_be_finite(capsys, monkeypatch, seconds):
    """inf ended in an OverflowError traceback (1e300 would run for ever)."""
    def never(config, progress=None):
        raise AssertionError(f"ran with --seconds {config.seconds}")

    monkeypatch.setattr(bench, "run", never)
    code, out, err = run_cli(capsys, *ONE_CELL, "--seconds", seconds)
    _refused_before_the_run(code, out, err, "--seconds must be positive, finite")


def test_sizes_have_an_upper_bound(capsys):
    """99999999999999GiB ended in an OverflowError traceback."""
    code, out, err = run_cli(capsys, *ONE_CELL, "--sizes", "16,99999999999999GiB")
    _refused_before_the_run(code, out, err, "more than the benchmark takes", "smaller sizes")


def test_out_of_memory_is_one_line_exit_1(capsys, monkeypatch):
    """A size larger than memory ended in a MemoryError traceback."""
    def no_room(config, progress=None):
        raise MemoryError

    monkeypatch.setattr(bench, "run", no_room)
    code, out, err = run_cli(capsys, *ONE_CELL)
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert "out of memory for the sizes asked" in err and "smaller --sizes" in err


@pytest.mark.parametrize("name, words", [
    ("x.weird", [".weird is not an image format", ".png"]),
    ("plotnodot", ["it has no extension", ".png"]),
])
def test_a_plot_name_matplotlib_cannot_draw_to_is_refused_before_the_run(tmp_path, capsys,
                                                                         name, words):
    """x.weird was refused only after the run; plotnodot failed naming a temporary path
    (matplotlib appended .png to the name)."""
    pytest.importorskip("matplotlib")
    code, out, err = run_cli(capsys, *ONE_CELL, "--plot", str(tmp_path / name))
    _refused_before_the_run(code, out, err, *words)
    assert "tmp" not in err.replace(str(tmp_path), "") and os.listdir(tmp_path) == []


@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_json_and_plot_naming_one_file_are_refused(tmp_path, capsys, force):
    """Exit 1 for a wrong reason, and with --force the JSON silently replaced by the plot."""
    pytest.importorskip("matplotlib")
    same = str(tmp_path / "same.png")
    code, out, err = run_cli(capsys, *ONE_CELL, "--json", same, "--plot", same, *force)
    _refused_before_the_run(code, out, err, "--json and --plot name the same file")
    assert os.listdir(tmp_path) == []
    os.symlink("same.png", tmp_path / "link.png")  # one file through a link, existing
    (tmp_path / "same.png").write_bytes(b"an earlier plot")
    code, out, err = run_cli(capsys, *ONE_CELL, "--json", same, "--plot",
                             str(tmp_path / "link.png"), "--force")
    assert code == 2 and out == "" and (tmp_path / "same.png").read_bytes() == b"an earlier plot"


@pytest.mark.parametrize("extra, words", [
    # (an _into table: the device-resident rows have none in the allocating ones)
    (["--implementations", "cryptography,gpucrypt-gpu", "--forms", "into"], ["gpucrypt-gpu"]),
    (["--device-time"], ["--device-time"]),
    (["--include-transfer"], ["--include-transfer"]),
    (["--simulator-smoke"], ["--simulator-smoke"]),
])
def test_gpu_only_options_with_device_cpu_are_refused(capsys, extra, words):
    """They were dropped without a word (the row missing, the option ignored)."""
    args = [a for a in ONE_CELL]
    if extra[0] == "--implementations":
        i = args.index("--implementations")
        del args[i:i + 2]
    code, out, err = run_cli(capsys, *args, *extra)
    _refused_before_the_run(code, out, err, "--device cpu runs no GPU row", *words)


@pytest.mark.parametrize("implementations, transfer", [
    ("cryptography,gpucrypt-gpu+transfer", True), ("all", False), ("cryptography,gpucrypt-gpu", False)])
def test_naming_the_transfer_row_runs_it(implementations, transfer):
    """Named without --include-transfer, the row was left out without a word."""
    from gpucrypt import bench
    from gpucrypt.cli import build_parser
    from gpucrypt.cli.bench import _config

    args = build_parser().parse_args(["bench", "--implementations", implementations])
    config = _config(args)
    assert config.include_transfer is transfer
    assert ("gpucrypt-gpu+transfer" in bench._plan(config)) is transfer


def test_all_implementations_with_device_cpu_still_runs(capsys):
    args = [a for a in ONE_CELL]
    i = args.index("--implementations")
    args[i + 1] = "all"
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "gpucrypt-cpu" in out, err


def test_outputs_are_written_before_a_failing_stdout(tmp_path, capsys, monkeypatch):
    """The table printed first: a full (or closed) stdout threw the --json results away."""
    import errno

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    path = tmp_path / "run.json"
    monkeypatch.setattr(sys, "stdout", Full())
    code = main(["bench", *ONE_CELL, "--json", str(path)])
    err = capsys.readouterr().err
    assert code == 1 and "cannot write to stdout (No space left on device)" in err, err
    assert json.loads(path.read_text())["cells"]


@pytest.mark.parametrize("implementations, algorithms, named", [
    ("gpucrypt-cpu", "aes-128-gcm", "gpucrypt-cpu"),
    ("gpucrypt-cpu,gpucrypt-gpu", "aes-128-gcm", "gpucrypt-cpu"),
    ("pycryptodome,gpucrypt-gpu", "xchacha20-poly1305", "pycryptodome"),  # not its baseline
])
def test_cpu_implementations_with_device_gpu_are_refused(capsys, monkeypatch, implementations,
                                                         algorithms, named):
    """With no GPU they made a baseline-only table and exit 0, the named row dropped
    without a word (as --device cpu refuses the GPU ones)."""
    monkeypatch.setattr(bench, "run", lambda config, progress=None: pytest.fail("it ran"))
    code, out, err = run_cli(capsys, "--device", "gpu", "--implementations", implementations,
                             "--algorithms", algorithms, "--sizes", "16", "--seconds", "0.01")
    _refused_before_the_run(code, out, err, "--device gpu runs the GPU rows", named,
                            "--device auto")


def test_device_auto_is_advised_only_for_implementations_it_would_time(capsys, monkeypatch):
    """PyNaCl named with AES-GCM: --device gpu advised --device auto "to time it too",
    which then refused it (PyNaCl has no row for AES-GCM on any device). Now the
    implementation without a row is said first, and left out of the device's advice;
    the same for a GPU row without one under --device cpu."""
    monkeypatch.setattr(bench, "run", lambda config, progress=None: pytest.fail("it ran"))
    code, out, err = run_cli(capsys, "--device", "gpu", "--implementations", "pynacl",
                             "--algorithms", "aes-128-gcm", "--sizes", "16", "--seconds", "0.01")
    _refused_before_the_run(code, out, err, "no implementation named has a row for aes-128-gcm",
                            "pynacl offers only xchacha20-poly1305")
    assert "--device auto" not in err
    monkeypatch.undo()  # bench.run is real again
    _pretend_gpu(monkeypatch)
    code, out, err = run_cli(capsys, "--device", "gpu", "--implementations", "pynacl,gpucrypt-gpu",
                             "--algorithms", "aes-128-gcm", "--forms", "into", "--operations",
                             "encrypt", "--sizes", "16", "--seconds", "0.01")
    assert code == 0 and "gpucrypt-gpu" in out, err
    assert err == ("gpucrypt bench: note: pynacl: no row for aes-128-gcm in the into tables "
                   "(pynacl offers only xchacha20-poly1305, in the alloc tables)\n")
    code, out, err = run_cli(capsys, *ONE_CELL[:-1], "cryptography,gpucrypt-gpu-hosttag")
    assert code == 0 and "--device gpu or auto" not in err, err
    assert "gpucrypt-gpu-hosttag: no row for chacha20" in err
    # cryptography, no baseline of XChaCha20-Poly1305, has no row for it on any device
    code, out, err = run_cli(capsys, "--device", "gpu", "--implementations",
                             "cryptography,gpucrypt-gpu", "--algorithms", "xchacha20-poly1305",
                             "--forms", "into", "--operations", "encrypt", "--sizes", "16",
                             "--seconds", "0.01")
    assert code == 0 and "--device auto" not in err, err
    assert err.startswith("gpucrypt bench: note: cryptography: no row for xchacha20-poly1305")


@pytest.mark.parametrize("extra, words", [
    # the device-resident rows write into device buffers: the _into tables only
    (["--forms", "alloc"], ["none has a row for aes-128-gcm in the alloc tables",
                            "gpucrypt-gpu offers only the into tables", "--include-transfer"]),
    (["--forms", "alloc", "--implementations", "cryptography,gpucrypt-gpu"],
     ["gpucrypt-gpu offers only the into tables"]),
    # device time: no AEAD decryption, no host-tag path
    (["--forms", "into", "--device-time", "--operations", "decrypt"],
     ["decryption waits for its verdicts", "host-tag path", "leave --device-time out"]),
])
def test_a_device_gpu_run_whose_gpu_rows_have_no_table_asked_is_refused(capsys, monkeypatch,
                                                                       extra, words):
    """The check looked at the algorithms only: with --forms alloc, or --device-time and
    decryption, every GPU row was refused during the run, which timed the baseline alone
    and exit 0. The library's run() refuses too, before any GPU is looked for."""
    monkeypatch.setattr(bench, "run", lambda config, progress=None: pytest.fail("it ran"))
    code, out, err = run_cli(capsys, "--device", "gpu", "--algorithms", "aes-128-gcm",
                             "--sizes", "16", "--seconds", "0.01", *extra)
    _refused_before_the_run(code, out, err, "--device gpu times the GPU rows", *words)
    monkeypatch.undo()
    monkeypatch.setattr(bench, "_gpu_session", lambda config: pytest.fail("a GPU was looked for"))
    from gpucrypt.cli import build_parser

    # --device-time is set on the library's config: the command line refuses it with --device
    # auto too where no row would use it (test_gpu_options_no_row_would_use_are_refused)
    args = build_parser().parse_args(["bench", "--device", "auto", "--algorithms", "aes-128-gcm",
                                      *(e for e in extra if e != "--device-time")])
    config = dataclasses.replace(_cli_config(args), device="gpu",
                                 device_time="--device-time" in extra)
    assert bench.gpu_rows_planned(config) == ()
    with pytest.raises(ValueError, match="this run would time none"):
        bench.run(config)


def _cli_config(args):
    from gpucrypt.cli.bench import _config

    return _config(args)


def test_a_device_gpu_run_that_timed_no_gpu_row_fails(capsys, monkeypatch):
    """A GPU row refused only during the run (the simulator's 4 KiB limit, a host that
    never got ahead in device time): the run timed the baseline alone and exit 0."""
    _pretend_gpu(monkeypatch, refuse="refused for the test")
    code, out, err = run_cli(capsys, "--device", "gpu", "--implementations", "gpucrypt-gpu",
                             "--algorithms", "aes-128-gcm", "--forms", "into", "--operations",
                             "encrypt", "--sizes", "16", "--seconds", "0.01")
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert "no GPU row could be timed" in err and "gpucrypt-gpu: refused for the test" in err
    # --device auto goes on without them, as before
    code, out, err = run_cli(capsys, "--implementations", "cryptography,gpucrypt-gpu",
                             "--algorithms", "aes-128-gcm", "--forms", "into", "--operations",
                             "encrypt", "--sizes", "16", "--seconds", "0.01")
    assert code == 0 and "gpucrypt-gpu: not available: refused for the test" in out, err


def test_a_device_gpu_run_without_a_gpu_row_is_refused(capsys, monkeypatch):
    """Naming only the baseline timed the baseline alone and exit 0 (the library's run()
    refuses too, for callers of the Python API)."""
    real_run = bench.run
    monkeypatch.setattr(bench, "run", lambda config, progress=None: pytest.fail("it ran"))
    code, out, err = run_cli(capsys, "--device", "gpu", "--implementations", "cryptography",
                             "--algorithms", "aes-128-gcm", "--sizes", "16", "--seconds", "0.01")
    _refused_before_the_run(code, out, err, "names none", "add gpucrypt-gpu", "--device cpu")
    config = bench.BenchConfig(algorithms=("aes-128-gcm",), implementations=("cryptography",),
                               device="gpu", sizes=(16,), seconds=0.01)
    with pytest.raises(ValueError, match="add gpucrypt-gpu"):
        real_run(config)
    # the transfer row asked without include_transfer: that is the reason, not that it
    # is no GPU implementation
    config = dataclasses.replace(config, implementations=("gpucrypt-gpu+transfer",))
    with pytest.raises(ValueError, match="gpucrypt-gpu\\+transfer is timed only with "
                                         "include_transfer=True") as raised:
        real_run(config)
    assert "is a GPU one" not in str(raised.value)


def test_simulator_smoke_without_the_simulator_is_refused(capsys, monkeypatch):
    """Without NUMBA_ENABLE_CUDASIM=1 the option was ignored (a real GPU timed as usual)."""
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    monkeypatch.setattr(bench, "run", lambda config, progress=None: pytest.fail("it ran"))
    args = [a for a in ONE_CELL]
    args[args.index("--device") + 1] = "auto"
    code, out, err = run_cli(capsys, *args, "--simulator-smoke")
    _refused_before_the_run(code, out, err, "--simulator-smoke", "NUMBA_ENABLE_CUDASIM=1")


def test_simulator_smoke_with_every_size_above_its_limit_is_refused(capsys, monkeypatch):
    """``--device gpu --simulator-smoke`` with every size above the simulator's 4 KiB
    limit timed the baseline, then exit 1 ("simulator smoke runs stop at 4096 bytes"):
    refused before the run (exit 2), as the library's run() refuses it. One size within
    the limit runs, as does --device auto (its GPU rows said unavailable)."""
    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")
    real_run = bench.run
    ran = []
    monkeypatch.setattr(bench, "run", lambda config, progress=None: ran.append(config)
                        or pytest.fail("it ran"))
    asked = ["--device", "gpu", "--simulator-smoke", "--algorithms", "aes-128-gcm", "--forms",
             "into", "--operations", "encrypt", "--seconds", "0.01"]
    for sizes in ("16KiB", "4097,64KiB"):
        code, out, err = run_cli(capsys, *asked, "--sizes", sizes)
        _refused_before_the_run(code, out, err, "--simulator-smoke", "4 KiB or less",
                                "--sizes 4KiB")
    config = bench.BenchConfig(algorithms=("aes-128-gcm",), forms=("into",),
                               operations=("encrypt",), device="gpu", sizes=(16384,),
                               seconds=0.01, simulator_smoke=True)
    with pytest.raises(ValueError, match="4 KiB or less"):
        real_run(config)
    # within the limit, or not on the GPU alone: not refused
    assert not ran
    for config in (dataclasses.replace(config, sizes=(4096, 16384)),
                   dataclasses.replace(config, device="auto"),
                   dataclasses.replace(config, simulator_smoke=False)):
        assert not bench.simulator_sizes_too_large(config)
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM")  # a real GPU takes any size
    assert not bench.simulator_sizes_too_large(dataclasses.replace(config, sizes=(16384,)))


def test_a_named_implementation_without_a_row_is_said(capsys, monkeypatch):
    """PyNaCl offers XChaCha20-Poly1305 only: named for AES-GCM it was dropped without a
    word. Refused when no implementation named has a row; a note when some do."""
    real_run = bench.run
    monkeypatch.setattr(bench, "run", lambda config, progress=None: pytest.fail("it ran"))
    code, out, err = run_cli(capsys, "--implementations", "pynacl", "--algorithms", "aes-128-gcm",
                             "--sizes", "16", "--seconds", "0.01")
    _refused_before_the_run(code, out, err, "no implementation named has a row for aes-128-gcm",
                            "pynacl offers only xchacha20-poly1305", "--algorithms")
    monkeypatch.setattr(bench, "run", real_run)
    code, out, err = run_cli(capsys, "--device", "cpu", "--implementations", "gpucrypt-cpu,pynacl",
                             "--algorithms", "aes-128-gcm", "--sizes", "16", "--seconds", "0.01",
                             "--operations", "encrypt", "--forms", "into")
    assert code == 0 and "gpucrypt-cpu" in out, err
    assert err == ("gpucrypt bench: note: pynacl: no row for aes-128-gcm in the into tables "
                   "(pynacl offers only xchacha20-poly1305, in the alloc tables)\n")


@pytest.mark.parametrize("implementations, forms, words", [
    ("pynacl", "into", ["xchacha20-poly1305 in the into tables", "PyNaCl has no _into API"]),
    ("gpucrypt-gpu", "alloc", ["gpucrypt-gpu offers only the into tables"]),
])
def test_a_named_implementation_without_a_row_in_the_forms_asked_is_refused(
        capsys, monkeypatch, implementations, forms, words):
    """The check looked at the algorithms only: PyNaCl (allocating calls only) named for
    XChaCha20-Poly1305's _into tables timed nothing at all and exit 0."""
    monkeypatch.setattr(bench, "run", lambda config, progress=None: pytest.fail("it ran"))
    code, out, err = run_cli(capsys, "--implementations", implementations, "--algorithms",
                             "xchacha20-poly1305", "--forms", forms, "--sizes", "16",
                             "--seconds", "0.01")
    _refused_before_the_run(code, out, err, "no implementation named has a row", *words)


def test_a_named_implementation_without_a_row_in_the_forms_asked_is_said(capsys):
    code, out, err = run_cli(capsys, "--device", "cpu", "--implementations", "pynacl,gpucrypt-cpu",
                             "--algorithms", "xchacha20-poly1305", "--forms", "into",
                             "--operations", "encrypt", "--sizes", "16", "--seconds", "0.01")
    assert code == 0 and "gpucrypt-cpu" in out, err
    assert err.startswith("gpucrypt bench: note: pynacl: no row for xchacha20-poly1305 in the "
                          "into tables") and "PyNaCl has no _into API" in err


def test_the_json_lists_the_implementations_planned():
    """gpucrypt-gpu+transfer was listed without include_transfer, as if it had run."""
    doc = bench.BenchReport(environment={}, config=bench.BenchConfig()).to_json()
    assert "gpucrypt-gpu+transfer" not in doc["config"]["implementations"]
    config = bench.BenchConfig(include_transfer=True)
    assert "gpucrypt-gpu+transfer" in bench.BenchReport({}, config).to_json()["config"]["implementations"]
    # --device gpu: the GPU rows and the baseline (measured whatever was named)
    config = bench.BenchConfig(algorithms=("aes-128-gcm",), implementations=("gpucrypt-gpu",),
                               device="gpu")
    assert bench.BenchReport({}, config).to_json()["config"]["implementations"] == \
        ["cryptography", "gpucrypt-gpu"]


@pytest.mark.parametrize("changes, listed", [
    # cryptography has no XChaCha20-Poly1305: no cell, no "unavailable" entry
    (dict(algorithms=("xchacha20-poly1305",), forms=("into",)),
     ["gpucrypt-cpu", "pycryptodome", "pynacl"]),
    # PyNaCl has no AES-GCM
    (dict(algorithms=("aes-128-gcm",), implementations=("gpucrypt-cpu", "pynacl")),
     ["cryptography", "gpucrypt-cpu"]),
])
def test_the_json_lists_the_implementations_with_a_row(tmp_path, capsys, changes, listed):
    """The list held implementations with no cell and no "unavailable" entry, so a reader
    took them for run; it is the cells' and the entries' implementations now."""
    config = bench.BenchConfig(device="cpu", operations=("encrypt",), sizes=(16,), seconds=0.01,
                               **changes)
    doc = bench.run(config).to_json()
    assert doc["config"]["implementations"] == listed
    with_a_row = {c["implementation"] for c in doc["cells"]}
    with_a_row |= {u["implementation"] for u in doc["unavailable"]}
    assert set(listed) == with_a_row


def test_the_json_leaves_device_resident_rows_out_of_an_alloc_run():
    config = bench.BenchConfig(forms=("alloc",))
    assert not {"gpucrypt-gpu", "gpucrypt-gpu-hosttag"} & \
        set(bench.BenchReport({}, config).to_json()["config"]["implementations"])
    config = bench.BenchConfig(algorithms=("chacha20",))  # the host-tag path: AEADs only
    listed = bench.BenchReport({}, config).to_json()["config"]["implementations"]
    assert "gpucrypt-gpu-hosttag" not in listed and "gpucrypt-gpu" in listed


def test_the_plot_leaves_the_simulators_figures_out(monkeypatch, tmp_path):
    """--simulator-smoke's figures were drawn as lines among the measured ones."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    from gpucrypt.bench.gpu import SIMULATOR_LABEL

    drawn = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: drawn.append(k.get("label")) or real(self, *a, **k))

    def cell(implementation, size, note=""):
        return bench.Cell("chacha20", "encrypt", "into", implementation, note or "a CPU", size, 1,
                          3, 1, 1e-6, size / 1e-6 / 1e9, None, "cryptography", None, "t", note=note)
    config = bench.BenchConfig(algorithms=("chacha20",), operations=("encrypt",), forms=("into",),
                               sizes=(16, 64))
    report = bench.BenchReport({"cpu": "a CPU", "date": "2026-12-05"}, config)
    report.cells = [cell(i, size, note) for size in (16, 64) for i, note in
                    (("cryptography", ""), ("gpucrypt-gpu", SIMULATOR_LABEL))]
    bench.plot(report, tmp_path / "p.png")
    assert drawn == ["cryptography (into)"]


def test_no_gpu_is_said_in_the_commands_words(tmp_path):
    """The backend's reason ends "use device='cpu'", the Python API's words: the command
    says --device cpu, in the error, the table's note and the JSON alike. A real process
    on a machine without a GPU driver (no simulator)."""
    from gpucrypt.backends._probe import _cuda_driver_loadable

    if _cuda_driver_loadable():
        pytest.skip("a GPU driver is present: the no-GPU reason cannot come up here")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    launcher = "import sys; from gpucrypt.cli import main; sys.exit(main())"
    one = ["--algorithms", "chacha20", "--sizes", "16", "--seconds", "0.01", "--operations",
           "encrypt", "--forms", "into"]
    proc = subprocess.run([sys.executable, "-c", launcher, "bench", "--device", "gpu", *one],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and "no GPU found" in proc.stderr, proc.stderr
    assert "--device cpu" in proc.stderr and "device='cpu'" not in proc.stderr
    path = tmp_path / "n.json"
    proc = subprocess.run([sys.executable, "-c", launcher, "bench", *one, "--implementations",
                           "cryptography,gpucrypt-gpu", "--json", str(path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "use --device cpu" in proc.stdout and "device='cpu'" not in proc.stdout
    assert "device='cpu'" not in path.read_text() and "--device cpu" in path.read_text()


def _labelled_ticks(axis) -> list[str]:
    """The tick labels an axis shows: those of its ticks (major and minor) inside its view."""
    low, high = sorted(axis.get_view_interval())
    shown = []
    for locs, labels in ((axis.get_majorticklocs(), axis.get_majorticklabels()),
                         (axis.get_minorticklocs(), axis.get_minorticklabels())):
        shown += [label.get_text() for loc, label in zip(locs, labels)
                  if low <= loc <= high and label.get_visible() and label.get_text()]
    return shown


@pytest.mark.parametrize("gbps, scale", [((2.0, 3.0, 4.5), "linear"),
                                         ((0.02, 0.4, 20.0), "log")])
def test_the_plot_labels_its_gbps_axis_whatever_the_range(tmp_path, gbps, scale):
    """`bench --sizes 64 --plot` drew a GB/s axis without a single number: a log axis labels
    powers of ten only, and figures within one decade (2 to 4.5 GB/s) span none. Such a
    range is drawn on a linear axis; a wider one on a log axis ticked at 1, 2 and 5."""
    pytest.importorskip("matplotlib")

    def cell(implementation, size, rate):
        return bench.Cell("chacha20", "encrypt", "into", implementation, "a CPU", size, 1, 3, 1,
                          size / rate / 1e9, rate, None, "cryptography", None, "t")
    sizes = (64,) if scale == "linear" else (16, 64, 1 << 20)
    config = bench.BenchConfig(algorithms=("chacha20",), operations=("encrypt",),
                               forms=("into",), sizes=sizes)
    report = bench.BenchReport({"cpu": "a CPU", "date": "2026-12-05"}, config)
    implementations = ("cryptography", "gpucrypt-cpu", "pycryptodome")
    report.cells = [cell(impl, size, rate) for size in sizes
                    for impl, rate in zip(implementations, gbps)]
    figure = bench.plot(report, tmp_path / "p.png")
    axes = figure.axes[0]
    labels = _labelled_ticks(axes.yaxis)
    assert len(labels) >= 3, labels
    assert all(label.replace(".", "", 1).isdigit() for label in labels), labels  # 0.5, 2, 20
    assert axes.get_yscale() == scale


# --------------------------------------------------------------------------- review fixes

def test_aead_sizes_above_what_cryptography_seals_are_refused_before_the_run(capsys, monkeypatch):
    """--sizes 3GiB with an AEAD: every smaller size was measured, then the reference
    (cryptography's AEAD classes, which take 2**31 - 1 bytes at most) ended the run in an
    OverflowError traceback. Refused first; the stream ciphers take such sizes."""
    from gpucrypt.cli import build_parser

    real_run = bench.run
    monkeypatch.setattr(bench, "run", lambda config, progress=None: pytest.fail("it ran"))
    code, out, err = run_cli(capsys, *ONE_CELL[:2], "--algorithms", "aes-128-gcm", "--sizes",
                             "16,3GiB", "--seconds", "0.01")
    _refused_before_the_run(code, out, err, "aes-128-gcm cannot be timed at 3 GiB",
                            "at most 2147483647 bytes",
                            "--algorithms chacha20,aes-128-ctr,aes-256-ctr")
    code, out, err = run_cli(capsys, *ONE_CELL[:2], "--sizes", "2GiB", "--seconds", "0.01")
    _refused_before_the_run(code, out, err, "chacha20-poly1305, xchacha20-poly1305, aes-128-gcm, "
                                            "aes-256-gcm cannot be timed at 2 GiB")
    for algorithms, sizes in (("aes-128-gcm", "2147483647"), ("chacha20,aes-256-ctr", "3GiB")):
        args = build_parser().parse_args(["bench", "--algorithms", algorithms, "--sizes", sizes])
        assert max(_cli_config(args).sizes) == bench.parse_size(sizes)  # taken
    # the library refuses too, before it makes any message
    monkeypatch.setattr(bench, "Material", lambda *a, **k: pytest.fail("a message was made"))
    config = bench.BenchConfig(algorithms=("chacha20", "xchacha20-poly1305"), sizes=(16, 3 << 30),
                               device="cpu")
    with pytest.raises(ValueError, match="xchacha20-poly1305 cannot be timed at 3 GiB"):
        real_run(config)


@pytest.mark.parametrize("extra, words", [
    # no device-resident row at all: only the host clock runs
    (["--implementations", "gpucrypt-cpu", "--device-time"],
     ["--device-time", "--implementations gpucrypt-cpu names none"]),
    # only the +transfer row, which is timed on the host clock with or without it
    (["--device", "gpu", "--forms", "alloc", "--include-transfer", "--device-time"],
     ["--device-time", "gpucrypt-gpu offers only the into tables"]),
    # device-resident rows asked, none with a device-time row
    (["--operations", "decrypt", "--device-time"],
     ["--device-time", "decryption waits for its verdicts", "host-tag path"]),
    (["--implementations", "cryptography,gpucrypt-cpu", "--include-transfer"],
     ["--include-transfer", "--implementations cryptography,gpucrypt-cpu leaves it out",
      "add gpucrypt-gpu+transfer"]),
    (["--implementations", "gpucrypt-cpu", "--simulator-smoke"],
     ["--simulator-smoke", "--implementations gpucrypt-cpu names none"]),
])
def test_gpu_options_no_row_would_use_are_refused(capsys, monkeypatch, extra, words):
    """Only --device cpu refused them: with no row that uses them the run ignored them
    (exit 0; the JSON said device_time true of a run timed on the host clock alone)."""
    from gpucrypt.cli import build_parser

    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "1")  # --simulator-smoke's own condition
    monkeypatch.setattr(bench, "run", lambda config, progress=None: pytest.fail("it ran"))
    code, out, err = run_cli(capsys, "--algorithms", "aes-128-gcm", "--sizes", "16",
                             "--seconds", "0.01", *extra)
    _refused_before_the_run(code, out, err, "would be ignored", *words)
    # where a row uses them they are taken
    for taken in (["--device-time", "--implementations", "gpucrypt-gpu", "--forms", "into"],
                  ["--device-time", "--operations", "decrypt", "--algorithms", "chacha20"],
                  ["--include-transfer"], ["--simulator-smoke", "--device", "gpu"],
                  ["--include-transfer", "--implementations", "gpucrypt-gpu+transfer"]):
        args = build_parser().parse_args(["bench", "--algorithms", "aes-128-gcm", "--sizes",
                                          "16", *taken])
        _cli_config(args)


class _RefusedAtSomeSizes(_PretendGpu):
    """A pretend GPU whose device-resident rows are refused at 64 B only."""

    def time_cell(self, implementation, m, operation, budget):
        from gpucrypt.bench.gpu import GpuRefused

        if m.size == 64:
            raise GpuRefused("refused at 64 B for the test")
        return super().time_cell(implementation, m, operation, budget)


def _table_blocks(out: str) -> dict[str, str]:
    """The text tables of a run, by their titles' first words ("aes-128-gcm decrypt, _into")."""
    return {block.split("  ")[0].split(" (")[0]: block for block in out.split("\n\n")[1:]}


def test_unavailable_reasons_are_said_in_their_own_tables_and_sizes(tmp_path, capsys,
                                                                    monkeypatch):
    """Reasons were kept per algorithm: with --device-time the encryption tables said
    decryption's refusal ("waits for its verdicts"), and a row refused at some sizes only
    showed "-" there with no reason; the JSON's entries said neither table nor sizes."""
    monkeypatch.setattr(bench, "_gpu_session", lambda config: (_RefusedAtSomeSizes(), None))
    path = tmp_path / "u.json"
    code, out, err = run_cli(capsys, "--algorithms", "aes-128-gcm", "--sizes", "16,64",
                             "--seconds", "0.01", "--implementations", "cryptography,gpucrypt-gpu",
                             "--device-time", "--json", str(path))
    assert code == 0, err
    tables = _table_blocks(out)
    assert set(tables) == {f"aes-128-gcm {o}, {f}" for o in ("encrypt", "decrypt")
                           for f in ("allocating", "_into")}, list(tables)
    waits = "gpucrypt-gpu: not available: decryption waits for its verdicts"
    assert waits in tables["aes-128-gcm decrypt, _into"]
    for title in ("aes-128-gcm encrypt, allocating", "aes-128-gcm encrypt, _into",
                  "aes-128-gcm decrypt, allocating"):
        assert "waits for its verdicts" not in tables[title], tables[title]
    into = tables["aes-128-gcm encrypt, _into"]
    row = next(line for line in into.splitlines() if line.startswith("gpucrypt-gpu "))
    assert row.split()[-1] == "-", row  # refused at 64 B, timed at 16 B
    assert "gpucrypt-gpu: not available at 64 B: refused at 64 B for the test" in into, into
    assert "refused at 64 B" not in out.replace(into, "")
    doc = json.loads(path.read_text())
    entries = {(u["implementation"], u["operation"], u["form"]): (u["sizes"], u["reason"])
               for u in doc["unavailable"]}
    assert all(u["algorithm"] == "aes-128-gcm" for u in doc["unavailable"])
    sizes, reason = entries.pop(("gpucrypt-gpu", "decrypt", "into"))
    assert sizes is None and reason.startswith("decryption waits for its verdicts"), reason
    assert entries == {
        ("gpucrypt-gpu", "encrypt", "alloc"): (None, bench._DEVICE_RESIDENT_INTO_ONLY),
        ("gpucrypt-gpu", "decrypt", "alloc"): (None, bench._DEVICE_RESIDENT_INTO_ONLY),
        ("gpucrypt-gpu", "encrypt", "into"): ([64], "refused at 64 B for the test"),
    }, entries


def test_a_row_refused_at_every_size_is_said_for_its_table():
    """Refused at each size in turn, a row is refused in its whole table: one entry, sizes
    null, and the line without sizes."""
    report = bench.BenchReport(environment={}, config=bench.BenchConfig(sizes=(16, 64)))
    for size in (16, 64):
        bench._say_unavailable(report, "chacha20", "gpucrypt-gpu", "no", "encrypt", "into", size)
    bench._whole_tables(report)
    assert [(u.operation, u.form, u.sizes) for u in report.unavailable] == \
        [("encrypt", "into", None)]
    lines = bench._unavailable_lines(report, report.unavailable, set())
    assert lines == ["gpucrypt-gpu: not available: no"]


def test_the_fraction_of_copy_is_for_device_resident_rows_in_into_tables():
    """The +transfer row (host buffers, both PCIe copies) got a fraction of the
    device-to-device copy rate, in the allocating tables too."""
    def cell(impl, form, gbps):
        return bench.Cell("aes-128-gcm", "encrypt", form, impl, "GPU", 1 << 20, 1, 7, 10,
                          (1 << 20) / gbps / 1e9, gbps, None, "cryptography", None, "t")
    config = bench.BenchConfig(algorithms=("aes-128-gcm",), operations=("encrypt",),
                               sizes=(1 << 20,), include_transfer=True)
    report = bench.BenchReport(environment={}, config=config, copy_gbps=1500.0, cells=[
        cell(impl, form, 15.0) for form in ("alloc", "into")
        for impl in ("cryptography", "gpucrypt-gpu+transfer")] + [
        cell("gpucrypt-gpu", "into", 150.0), cell("gpucrypt-gpu-hosttag", "into", 75.0)])
    bench._fill_ratios(report)
    fractions = {(c.implementation, c.form): c.fraction_of_copy for c in report.cells
                 if c.fraction_of_copy is not None}
    assert fractions == {("gpucrypt-gpu", "into"): pytest.approx(0.1),
                         ("gpucrypt-gpu-hosttag", "into"): pytest.approx(0.05)}, fractions
    rows = bench._table_rows([c for c in report.cells if c.form == "into"],
                             ["cryptography", "gpucrypt-gpu", "gpucrypt-gpu-hosttag",
                              "gpucrypt-gpu+transfer"], [1 << 20], 24)
    assert [line.split()[0] for line in rows] == ["cryptography", "gpucrypt-gpu", "10.0%",
                                                  "gpucrypt-gpu-hosttag", "5.0%",
                                                  "gpucrypt-gpu+transfer"], rows
