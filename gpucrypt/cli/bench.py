"""``gpucrypt bench``: the command line over :mod:`gpucrypt.bench`.

Usage errors (unknown algorithm, bad size, an option the run would ignore, ...) exit 2
with one line on stderr; a GPU that was asked for but cannot be timed exits 1 with the
reason.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time

from . import CliError
from ._common import (StreamedOutput, atomic_output, check_output_path, in_option_words,
                      refuse_dash, run_reporting_errors, streamed_output)

#: the largest message size a run takes (1 TiB): larger ones fit in no machine's memory,
#: and far larger ones overflowed where the buffers are made (an OverflowError traceback)
MAX_SIZE = 1 << 40
#: the longest measuring time per cell (a day): a larger figure is a slip, not a plan
#: (inf overflowed in the timing loop, 1e300 would run for ever)
MAX_SECONDS = 86400.0
#: the options that only time the GPU, refused with --device cpu (which would ignore them)
_GPU_OPTIONS = (("device_time", "--device-time"), ("include_transfer", "--include-transfer"),
                ("simulator_smoke", "--simulator-smoke"))


def add_bench(parser: argparse.ArgumentParser) -> None:
    """Measure gpucrypt against cryptography (OpenSSL), pycryptodome and libsodium on this machine."""
    from .. import bench

    parser.description = (
        "Measure gpucrypt's backends against the CPU libraries people use today, in the same "
        "run: GB/s per algorithm, operation and message size, and the speed-up against the "
        "baseline (cryptography; PyNaCl/libsodium for XChaCha20-Poly1305). Figures are medians "
        "of repetitions.")
    parser.add_argument("--algorithms", default="all", metavar="LIST",
                        help=f"comma-separated, or all: {', '.join(bench.ALGORITHMS)}")
    parser.add_argument("--operations", default="all", metavar="LIST",
                        help="encrypt, decrypt, or both (all)")
    parser.add_argument("--forms", default="all", metavar="LIST",
                        help="alloc (calls returning a new result: encrypt() against encrypt()), "
                             "into (calls writing into a buffer made once: encrypt_into), or both (all)")
    parser.add_argument("--implementations", default="all", metavar="LIST",
                        help=f"comma-separated, or all: {', '.join(bench.IMPLEMENTATIONS)} "
                             f"(each algorithm's baseline is always measured)")
    default_sizes = ",".join(bench.format_size(s).replace(" ", "") for s in bench.DEFAULT_SIZES)
    parser.add_argument("--sizes", default=default_sizes, metavar="LIST",
                        help=f"message sizes, e.g. 16,1KiB,1MiB,1GiB (K/KiB binary, kB decimal), or a "
                             f"preset: {', '.join(bench.SIZE_PRESETS)} (default {default_sizes})")
    parser.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                        help="cpu: CPU libraries only; gpu: GPU rows plus the baseline; "
                             "auto: everything that runs here (default)")
    parser.add_argument("--seconds", type=float, default=bench.DEFAULT_SECONDS, metavar="S",
                        help=f"measuring time per cell (default {bench.DEFAULT_SECONDS}); at least 3 "
                             f"repetitions are run however long they take")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="CPU threads, each running its own messages; aggregate GB/s (default 1)")
    parser.add_argument("--include-transfer", action="store_true",
                        help="also time gpucrypt on the GPU for data in host memory "
                             "(host-to-device + device-to-host copies included); naming "
                             "gpucrypt-gpu+transfer in --implementations does too")
    parser.add_argument("--device-time", action="store_true",
                        help="GPU rows: time the device alone, with the calls queued behind a delay "
                             "so that the host's cost per call is left out (encryption rows only)")
    parser.add_argument("--json", metavar="FILE", help="write one record per cell plus the environment")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="draw GB/s against size per implementation (needs matplotlib)")
    parser.add_argument("-f", "--force", action="store_true",
                        help="overwrite the --json and --plot files if they exist")
    parser.add_argument("--progress", action="store_true",
                        help="show a progress bar on stderr even when it is not a terminal")
    parser.add_argument("--simulator-smoke", action="store_true",
                        help="under NUMBA_ENABLE_CUDASIM=1, run the GPU rows anyway as a functional "
                             "smoke test (sizes up to 4 KiB; figures are not measurements)")
    parser.set_defaults(func=run_bench)


def _config(args):
    from .. import bench

    try:
        algorithms = bench.parse_list(args.algorithms, tuple(bench.ALGORITHMS), "algorithm")
        operations = bench.parse_list(args.operations, bench.OPERATIONS, "operation")
        forms = bench.parse_list(args.forms, bench.FORMS, "form")
        implementations = bench.parse_list(args.implementations, bench.IMPLEMENTATIONS, "implementation")
        sizes = bench.parse_sizes(args.sizes)
    except ValueError as exc:
        raise CliError(str(exc), exit_code=2) from None
    too_large = [s for s in sizes if s > MAX_SIZE]
    if too_large:
        raise CliError(f"--sizes: {too_large[0]} bytes is more than the benchmark takes "
                       f"({bench.format_size(MAX_SIZE)}); give smaller sizes", exit_code=2)
    too_large, aeads = bench.aead_sizes_too_large(
        bench.BenchConfig(algorithms=algorithms, sizes=sizes))
    if too_large:
        # found by the run only once every smaller size was timed: an OverflowError traceback
        # when the reference was made, after minutes of measuring
        streams = [a for a in bench.ALGORITHMS if bench.ALGORITHMS[a].kind == "stream"]
        raise CliError(f"--sizes: {', '.join(aeads)} cannot be timed at "
                       f"{bench.format_size(too_large[0])}: cryptography's AEAD classes, which "
                       f"make the reference every row is checked against and are the "
                       f"baseline, take at most {bench.AEAD_MAX_SIZE} bytes (2**31 - 1) per "
                       f"message; give sizes of at most {bench.AEAD_MAX_SIZE}, or time the "
                       f"larger ones with the stream ciphers alone (--algorithms "
                       f"{','.join(streams)})", exit_code=2)
    if not (args.seconds > 0 and math.isfinite(args.seconds) and args.seconds <= MAX_SECONDS):
        raise CliError(f"--seconds must be positive, finite and at most {MAX_SECONDS:.0f} "
                       f"(a day per cell), not {args.seconds}", exit_code=2)
    if args.threads < 1:
        raise CliError(f"--threads must be at least 1, not {args.threads}", exit_code=2)
    # naming the transfer row asks for it: left out without --include-transfer, it was
    # dropped without a word
    named = _named(args)
    include_transfer = args.include_transfer or (named and "gpucrypt-gpu+transfer" in implementations)
    config = bench.BenchConfig(algorithms=algorithms, operations=operations, forms=forms,
                               implementations=implementations, sizes=sizes, device=args.device,
                               seconds=args.seconds, threads=args.threads,
                               include_transfer=include_transfer,
                               simulator_smoke=args.simulator_smoke, device_time=args.device_time)
    # first: another device would not give a row to an implementation without one, and
    # the device's refusals below advise one (said at the end, for a run that runs)
    rowless, why = _rowless(config) if named else ((), "")
    if args.device == "cpu":
        _refuse_gpu_only(args, implementations, rowless)
    elif args.device == "gpu":
        _refuse_cpu_only(args, implementations, algorithms, rowless)
    if args.simulator_smoke and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        # without the simulator the option changed nothing: a real GPU was timed as usual
        raise CliError("--simulator-smoke runs the GPU rows in numba's CUDA simulator, which is "
                       "not on: set NUMBA_ENABLE_CUDASIM=1 in the environment, or leave the "
                       "option out", exit_code=2)
    if args.device == "gpu":
        _refuse_no_gpu_row(args, config)
    if args.device != "cpu":  # --device cpu refused these options already, with its reason
        _refuse_options_without_rows(args, config)
    if bench.simulator_sizes_too_large(config):
        from ..bench.gpu import SIMULATOR_MAX_SIZE

        limit = bench.format_size(SIMULATOR_MAX_SIZE)
        raise CliError(f"--device gpu with --simulator-smoke times the GPU rows in numba's CUDA "
                       f"simulator, whose smoke rows stop at {limit}, and every size in --sizes "
                       f"is larger: give a size of {limit} or less (--sizes "
                       f"{limit.replace(' ', '')})", exit_code=2)
    if rowless:
        print(f"gpucrypt bench: note: {', '.join(rowless)}: no row for {_asked_text(config)} "
              f"({why})", file=sys.stderr)
    return config


def _named(args) -> bool:
    """Whether --implementations names implementations one by one: ``all`` means those
    that run on the device asked, and leaving some out is no news then."""
    return args.implementations.strip().lower() != "all"


def _asked_text(config) -> str:
    """The tables asked, in words: "aes-128-gcm in the into tables with --device-time"."""
    return (", ".join(config.algorithms)
            + (f" in the {config.forms[0]} tables" if len(config.forms) == 1 else "")
            + (f" ({config.operations[0]} only)" if len(config.operations) == 1
               and config.device_time else "")
            + (" with --device-time" if config.device_time else ""))


def _rowless(config) -> tuple[tuple[str, ...], str]:
    """Named implementations that no table asked would time, on any device (the
    algorithms, forms and operations asked, with the options given), and why: refused
    when none of those named has a row (the run would time the baseline alone, or
    nothing); otherwise the caller says which are left out (a note on stderr)."""
    from .. import bench

    rowless = bench.without_rows(config)
    if not rowless:
        return (), ""
    why = "; ".join(bench.why_no_rows(i, config) for i in rowless)
    if len(rowless) == len(config.implementations):
        raise CliError(f"no implementation named has a row for {_asked_text(config)} ({why}): "
                       f"ask for a table they have (--algorithms, --forms), or name another "
                       f"implementation", exit_code=2)
    return rowless, why


def _refuse_gpu_only(args, implementations, rowless=()) -> None:
    """With ``--device cpu``: refuse the options and the implementations that only time
    the GPU, which the run would otherwise leave out without a word (exit 2). ``all``
    implementations is not naming them: it means those that run on the device asked.
    ``rowless`` (said already, no device gives them a row) are left out of the advice."""
    from .. import bench

    named = _named(args)
    gpu_only = [flag for name, flag in _GPU_OPTIONS if getattr(args, name)]
    gpu_only += [i for i in implementations
                 if named and i in bench.GPU_IMPLEMENTATIONS and i not in rowless]
    if gpu_only:
        raise CliError(f"--device cpu runs no GPU row, so {', '.join(gpu_only)} would be "
                       f"ignored: leave {'it' if len(gpu_only) == 1 else 'them'} out, or use "
                       f"--device gpu or auto", exit_code=2)


def _refuse_cpu_only(args, implementations, algorithms, rowless=()) -> None:
    """With ``--device gpu``: refuse named CPU implementations, which the run left out
    without a word (exit 2), as ``--device cpu`` refuses the GPU ones. An algorithm's
    baseline (cryptography, pynacl) may be named: it is measured anyway. ``rowless``
    (said already) are left out: ``--device auto``, which the refusal advises, would not
    time them either."""
    from .. import bench

    if not _named(args):
        return
    baselines = {bench.ALGORITHMS[a].baseline for a in algorithms}
    cpu_only = [i for i in implementations if i in bench.CPU_IMPLEMENTATIONS
                and i not in baselines and i not in rowless]
    if cpu_only:
        them = "it" if len(cpu_only) == 1 else "them"
        raise CliError(f"--device gpu runs the GPU rows and each algorithm's baseline only, so "
                       f"{', '.join(cpu_only)} would be ignored: leave {them} out, or use "
                       f"--device auto to time {them} too", exit_code=2)


def _refuse_no_gpu_row(args, config) -> None:
    """With ``--device gpu``: refuse a run no table of which would time a GPU row (it
    timed the baseline alone and exit 0): none named, or none with a row for the
    algorithms, forms and operations asked (the device-resident rows are in the _into
    tables only, and with --device-time time the AEADs' encryption only)."""
    from .. import bench

    if bench.gpu_rows_planned(config):
        return
    asked = [i for i in config.implementations if i in bench.GPU_IMPLEMENTATIONS
             and (config.include_transfer or i != "gpucrypt-gpu+transfer")]
    if not asked:
        raise CliError(f"--device gpu times the GPU rows, and --implementations "
                       f"{args.implementations} names none: add gpucrypt-gpu, or use --device cpu",
                       exit_code=2)
    ways = ["ask for a table they have (--algorithms, --forms, --operations)"]
    if config.device_time:
        ways.append("leave --device-time out")
    if not config.include_transfer:
        ways.append("add --include-transfer (gpucrypt-gpu+transfer has a row in every table)")
    raise CliError(f"--device gpu times the GPU rows, and none has a row for {_asked_text(config)} "
                   f"({'; '.join(bench.why_no_rows(i, config) for i in asked)}): "
                   f"{', '.join(ways)}, or use --device cpu", exit_code=2)


def _refuse_options_without_rows(args, config) -> None:
    """Refuse (exit 2) a GPU option that no row of the run would use, as ``--device cpu``
    refuses them all: accepted, it was ignored without a word (and the JSON said
    ``device_time: true`` of a run timed on the host clock alone). ``--include-transfer``
    adds the gpucrypt-gpu+transfer row, which named implementations may leave out;
    ``--device-time`` changes the device-resident rows only (gpucrypt-gpu,
    gpucrypt-gpu-hosttag: the +transfer row is timed on the host clock with or without
    it); ``--simulator-smoke`` the GPU rows only."""
    from .. import bench

    if config.include_transfer and "gpucrypt-gpu+transfer" not in config.implementations:
        raise CliError(f"--include-transfer adds the gpucrypt-gpu+transfer row, and "
                       f"--implementations {args.implementations} leaves it out, so the option "
                       f"would be ignored: add gpucrypt-gpu+transfer to --implementations (naming "
                       f"it is enough), or leave --include-transfer out", exit_code=2)
    if config.simulator_smoke and not bench.gpu_rows_planned(config):
        why = _gpu_rows_text(args, config, bench.GPU_IMPLEMENTATIONS)
        raise CliError(f"--simulator-smoke runs the GPU rows in numba's CUDA simulator, and no "
                       f"table asked has a GPU row ({why}), so the option would be ignored: "
                       f"leave it out, or ask for a GPU row", exit_code=2)
    if config.device_time and not bench.device_resident_rows_planned(config):
        why = _gpu_rows_text(args, config, bench.DEVICE_RESIDENT)
        raise CliError(f"--device-time times the device-resident rows (gpucrypt-gpu, in the into "
                       f"tables, the AEADs' encryption only) on the device's clock, and no table "
                       f"asked has one ({why}), so the option would be ignored: leave it out, or "
                       f"ask for such a row (--implementations gpucrypt-gpu, --forms into, "
                       f"--operations encrypt)", exit_code=2)


def _gpu_rows_text(args, config, kinds) -> str:
    """Why the run of ``config`` times none of ``kinds``: none asked, or each one's reason."""
    from .. import bench

    asked = [i for i in config.implementations if i in kinds
             and (config.include_transfer or i != "gpucrypt-gpu+transfer")]
    if not asked:
        return f"--implementations {args.implementations} names none"
    return "; ".join(bench.why_no_rows(i, config) for i in asked)


def _check_plot(path: str) -> None:
    """Refuse, before the run, a --plot name matplotlib cannot draw to: it takes the
    image format from the name's extension, and given none it appends ".png" to the
    name (the file written is then not the one named). Needs matplotlib."""
    try:
        import matplotlib  # noqa: F401 - first: a submodule loaded already would hide its absence
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install 'gpucrypt[plot]'", exit_code=2) from None
    formats = FigureCanvasBase.get_supported_filetypes()
    extension = os.path.splitext(path)[1][1:].lower()
    if extension not in formats:
        what = f".{extension} is not an image format matplotlib writes" if extension else \
            "it has no extension"
        raise CliError(f"--plot {path}: the image format comes from the name's extension, and "
                       f"{what}; end the name with one of "
                       f"{', '.join('.' + f for f in sorted(formats))}", exit_code=2)


def _same_file(first: str, second: str) -> bool:
    """Whether two output names are one file (the same path through links, or two names
    of one existing file)."""
    if os.path.realpath(first) == os.path.realpath(second):
        return True
    try:
        return os.path.samefile(first, second)
    except OSError:  # one of them does not exist yet
        return False


class _ProgressBar:
    """A one-line bar on stderr, redrawn in place; shown when the run is expected to take
    more than a couple of seconds and stderr is a terminal (or ``--progress``)."""

    WIDTH = 30

    def __init__(self, forced: bool, expected_seconds: float):
        self.enabled = forced or (sys.stderr.isatty() and expected_seconds > 2)
        self.started = time.monotonic()

    def __call__(self, done: int, total: int, label: str) -> None:
        if not self.enabled:
            return
        filled = int(self.WIDTH * done / max(total, 1))
        elapsed = time.monotonic() - self.started
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{total} "
                         f"{elapsed:5.1f}s {label[:60]:<60}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def run_bench(args) -> int:
    from .. import bench

    config = _config(args)
    # The outputs are checked and opened before the run, which may take minutes: an
    # existing file (without --force) or a folder that cannot be written is said now, not
    # after. They appear complete or not at all (an interrupted run leaves an earlier
    # run's file as it was), with the mode a new file gets under the umask: results are
    # meant to be shared as the user shares files. A FIFO or a character device (a pipe,
    # /dev/stdout) is written to as it is, as the file commands do (_common.streamed_output).
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        refuse_dash(path or "", option, "the table is what goes to stdout")
    outputs = {name: check_output_path(path, args.force)
               for name, path in (("json", args.json), ("plot", args.plot)) if path}
    if args.json and args.plot and _same_file(args.json, args.plot):
        raise CliError(f"--json and --plot name the same file ({args.json}): one would "
                       f"overwrite the other; give two names", exit_code=2)
    if args.plot:
        _check_plot(args.plot)
    with contextlib.ExitStack() as stack:
        files = {name: stack.enter_context(StreamedOutput(path) if streamed_output(path) else
                                           atomic_output(path, args.force, _shared_mode()))
                 for name, path in outputs.items()}
        expected = (len(config.algorithms) * len(config.operations) * len(config.forms)
                    * len(config.sizes) * 3 * config.seconds)
        bar = _ProgressBar(args.progress, expected)
        try:
            report = bench.run(config, progress=bar)
        except RuntimeError as exc:  # no GPU to time, or a row's output was wrong (WrongOutput)
            raise CliError(in_option_words(str(exc)), exit_code=1) from None
        except MemoryError:
            raise CliError(f"out of memory for the sizes asked (the largest is "
                           f"{bench.format_size(max(config.sizes))}, a few buffers of it are "
                           f"needed): give smaller --sizes", exit_code=1) from None
        finally:
            bar.close()
        _in_cli_words(report)
        # the files first: a stdout that fails (full, closed) must not cost the results
        run_reporting_errors(args, lambda: _write_outputs(report, files, outputs))
    print(report.render())
    return 0


def _in_cli_words(report) -> None:
    """The backends' reasons (no GPU: "use device='cpu'") in this command's words, in the
    table's notes and the JSON's alike."""
    report.notes[:] = [in_option_words(note) for note in report.notes]
    for missing in report.unavailable:
        missing.reason = in_option_words(missing.reason)


def _shared_mode() -> int:
    """The mode ``open()`` gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _write_outputs(report, files: dict, outputs: dict) -> None:
    """Fill and publish the --json and --plot files (``files``: AtomicFiles by name)."""
    from .. import bench

    if "json" in files:
        files["json"].write(json.dumps(report.to_json(), indent=1).encode("utf-8") + b"\n")
        files["json"].commit()
    if "plot" in files:
        # matplotlib takes the image format from the file name's extension, which the
        # unpublished file's name lacks: the picture is drawn under the user's name in a
        # private folder, then copied in
        with tempfile.TemporaryDirectory() as folder:
            drawn = os.path.join(folder, os.path.basename(outputs["plot"]))
            bench.plot(report, drawn)
            with open(drawn, "rb") as f:
                files["plot"].write(f.read())
        files["plot"].commit()
