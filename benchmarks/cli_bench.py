"""The ``gpucrypt`` command line against ``age``, ``cp`` and a Python script, in one run.

Issue 12's "Done when" measures whole commands, as a user runs them. This script times
each row below as one process (start-up, reading the input and writing the output
included), all rows interleaved: repetition k of every row before repetition k + 1 of
any, so a noisy neighbour slows them alike. It reports the median wall, user and
system time per row and the peak resident memory over the repetitions.

Rows on a ``--size`` random file (default 1 GiB) in ``--dir`` (default /dev/shm):

- ``gpucrypt encrypt --threads T`` and ``gpucrypt decrypt --threads T`` for each T of
  ``--threads`` (default 1,2), key from ``--key-file`` (32 random bytes);
- ``age -r RECIPIENT`` and ``age -d -i IDENTITY`` (an identity made by ``age-keygen``);
- ``cp`` of the same file (the floor for reading and writing it);
- ``python script`` : one thread calling ``cryptography``'s ChaCha20Poly1305 on 1 MiB
  chunks, the short script a user would write instead of installing anything;
- ``python copy`` : no cipher, the floor of any program that reads the file into its
  own memory and writes it out (``cp`` copies inside the kernel, ``copy_file_range``):
  ``pread`` into a reused 8 MiB buffer then ``pwrite`` ("read"), or the input mapped
  8 MiB at a time (``mmap`` with ``MAP_POPULATE``, no read copy) and ``pwrite`` of the
  mapping ("mmap"). Their system time against cp's says how close to cp a program with
  a buffer of its own can come on this machine (issue 12 asks gpucrypt for <= 1.1x cp).

Rows on a 4 KiB file (start-up): ``gpucrypt encrypt``, the same Python script (one
chunk: it imports ``cryptography``, reads the key and the file, writes the sealed
bytes) and ``age -r``.

Before anything is timed, every row runs once and is checked: what an encrypt row
wrote differs from the input and decrypts back to it (SHA-256), what a decrypt row
wrote is the input. A failed check stops the benchmark.

How a row is timed: a small helper process (``python -I -S``, a few MiB) forks and execs
the command and reads its resource usage with ``os.wait4``: wall time from fork to
reaping, user and system CPU time of the command and its children, and ``ru_maxrss``.
The helper exists because Linux counts, in a process's ``ru_maxrss``, the peak of the
memory it ran in before ``exec``; Python's ``subprocess`` starts children with
``vfork``, so spawned from this script every reading would be at least this script's
own peak. Through the helper, the pages it hands over at fork still count: ``true`` reads
about 7 MiB here (recorded as ``rss_floor_mib``), so only readings well above that are the
command's own.

Usage::

    python benchmarks/cli_bench.py [--size 1GiB] [--repeat 7] [--threads 1,2]
                                   [--dir /dev/shm] [--json out.json]

Needs ``age`` and ``age-keygen`` on PATH (``apt-get install age``); see benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata

from gpucrypt.bench import _cpu_model
from gpucrypt.cli._common import parse_size

SMALL = 4096

#: forks and execs argv, waits with wait4, prints one JSON line (run as ``python -I -S``)
_HELPER = r"""
import json, os, sys, time
argv = sys.argv[1:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - start
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "user_s": ru.ru_utime,
                  "sys_s": ru.ru_stime, "maxrss_kib": ru.ru_maxrss}))
"""

#: the user's alternative: one thread, ``cryptography``, 1 MiB chunks (8-byte random
#: prefix || 4-byte chunk counter as the nonce; no end-of-file flag)
_SCRIPT = r"""
import os, sys
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

mode, key_file, src, dst = sys.argv[1:]
with open(key_file, "rb") as f:
    aead = ChaCha20Poly1305(f.read())
chunk = 1 << 20
with open(src, "rb") as fin, open(dst, "wb") as fout:
    if mode == "encrypt":
        prefix = os.urandom(8)
        fout.write(prefix)
    else:
        prefix, chunk = fin.read(8), chunk + 16
    counter = 0
    while block := fin.read(chunk):
        nonce = prefix + counter.to_bytes(4, "big")
        fout.write(aead.encrypt(nonce, block, None) if mode == "encrypt"
                   else aead.decrypt(nonce, block, None))
        counter += 1
"""

#: the floor without a cipher (see the module docstring): ``read`` or ``mmap`` IN OUT
_COPY_SCRIPT = r"""
import mmap, os, sys

mode, src, dst = sys.argv[1:]
window = 8 << 20
fin, fout = os.open(src, os.O_RDONLY), os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
size = os.fstat(fin).st_size
buf = memoryview(mmap.mmap(-1, window))
for offset in range(0, size, window):
    n = min(window, size - offset)
    if mode == "read":
        view, got = buf[:n], 0
        while got < n:
            got += os.preadv(fin, [view[got:]], offset + got)
    else:
        mapped = mmap.mmap(fin, n, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                           prot=mmap.PROT_READ, offset=offset)
        view = memoryview(mapped)
    done = 0
    while done < n:
        done += os.pwrite(fout, view[done:], offset + done)
    if mode != "read":
        view.release()
        mapped.close()
"""


@dataclass
class Row:
    """One timed command. ``argv`` writes ``output``; ``opener`` (argv, with OUT for
    ``output`` and BACK for where to write) turns that output back into the input."""

    name: str
    group: str  # "bulk" (the --size file) or "small" (4 KiB)
    argv: list[str]
    output: str
    opener: list[str] | None = None
    runs: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        med = {k: statistics.median(r[k] for r in self.runs) for k in ("wall_s", "user_s", "sys_s")}
        return {"name": self.name, "group": self.group, "command": _display(self.argv),
                **{f"median_{k}": v for k, v in med.items()},
                "peak_rss_mib": max(r["maxrss_kib"] for r in self.runs) / 1024,
                "runs": self.runs}


_PLACEHOLDERS: dict[str, str] = {}


def _display(argv: list[str]) -> str:
    """The command with the temporary paths replaced by short names (KEY, IN, ...)."""
    return " ".join(_PLACEHOLDERS.get(a, os.path.basename(a) if os.sep in a else a) for a in argv)


def measure(argv: list[str]) -> dict:
    """Wall, user and system seconds and peak RSS (KiB) of one run of ``argv``."""
    done = subprocess.run([sys.executable, "-I", "-S", "-c", _HELPER, *argv],
                          capture_output=True, text=True)
    try:
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise SystemExit(f"could not time {_display(argv)}:\n{done.stderr}") from None
    rc = result.pop("rc")
    if rc != 0:
        raise SystemExit(f"{_display(argv)} failed (exit status {rc}):\n{done.stderr}")
    return result


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _unlink(*paths: str) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def check(row: Row, want: str, back: str) -> None:
    """Run ``row`` once (also its warm-up) and check that its output gives back the input."""
    _unlink(row.output)
    measure(row.argv)
    if row.opener:
        if _sha256(row.output) == want:
            raise SystemExit(f"check failed: {row.name} wrote the input unchanged")
        measure([back if a == "BACK" else row.output if a == "OUT" else a for a in row.opener])
        got = _sha256(back)
        _unlink(back)
    else:
        got = _sha256(row.output)
    if got != want:
        raise SystemExit(f"check failed: {row.name} ({row.group}): its output does not give back "
                         f"the input (SHA-256 {got[:16]}..., input {want[:16]}...)")
    _unlink(row.output)


def _write_random(path: str, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for done in range(0, size, 16 << 20):
            block = os.urandom(min(16 << 20, size - done))
            h.update(block)
            f.write(block)
    return h.hexdigest()


def _tool(name: str) -> str:
    """``name`` next to this Python (the virtualenv's console scripts), else on PATH."""
    found = shutil.which(name, path=os.pathsep.join([os.path.dirname(sys.executable),
                                                     os.environ.get("PATH", "")]))
    if not found:
        raise SystemExit(f"{name} not found: install it (benchmarks/README.md, 'Command line')")
    return found


def _git(where: str, *args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment() -> dict:
    """The machine, the versions, and the checkout whose ``gpucrypt`` the commands run."""
    package = subprocess.run([sys.executable, "-c", "import gpucrypt; print(gpucrypt.__file__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    where = os.path.dirname(package)
    status = _git(where, "status", "--porcelain", "--", ".")  # the package: edited or new files
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": _cpu_model(), "nproc": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "cryptography": metadata.version("cryptography"),
            "gpucrypt": metadata.version("gpucrypt"), "gpucrypt_package": where,
            "git_commit": _git(where, "rev-parse", "HEAD"),
            "git_dirty": None if status is None else bool(status),
            "age": subprocess.run([_tool("age"), "--version"], capture_output=True,
                                  text=True).stdout.strip(),
            "kernel": platform.release()}


def build_rows(work: str, threads: list[int]) -> tuple[list[Row], dict[str, str]]:
    """The rows, and the inputs they need made before the checks (name -> path)."""
    gpucrypt, age, python = _tool("gpucrypt"), _tool("age"), sys.executable
    p = {n: os.path.join(work, n) for n in
         ("key", "identity", "plain", "plain.gc", "plain.age", "small", "script.py",
          "copy.py")}
    _PLACEHOLDERS.update({p["key"]: "KEY", p["identity"]: "IDENTITY", p["plain"]: "IN",
                          p["plain.gc"]: "IN.gc", p["plain.age"]: "IN.age", p["small"]: "IN4K",
                          p["script.py"]: "script.py", p["copy.py"]: "copy.py", python: "python", gpucrypt: "gpucrypt",
                          age: "age"})
    recipient = subprocess.run([_tool("age-keygen"), "-y", p["identity"]], capture_output=True,
                               text=True, check=True).stdout.strip()
    _PLACEHOLDERS[recipient] = "RECIPIENT"
    key = ["--key-file", p["key"]]

    def out(name: str) -> str:
        path = os.path.join(work, name)
        _PLACEHOLDERS[path] = "OUT"
        return path

    gc_open = [gpucrypt, "decrypt", *key, "OUT", "BACK"]
    age_open = [age, "-d", "-i", p["identity"], "-o", "BACK", "OUT"]
    script_open = [python, p["script.py"], "decrypt", p["key"], "OUT", "BACK"]
    rows = [Row(f"gpucrypt encrypt --threads {t}", "bulk",
                [gpucrypt, "encrypt", *key, "--threads", str(t), "-f", p["plain"], o], o, gc_open)
            for t in threads for o in [out(f"enc-t{t}.gc")]]
    rows += [Row(f"gpucrypt decrypt --threads {t}", "bulk",
                 [gpucrypt, "decrypt", *key, "--threads", str(t), "-f", p["plain.gc"], o], o)
             for t in threads for o in [out(f"dec-t{t}")]]
    enc_age, dec_age, copy, enc_py = out("enc.age"), out("dec-age"), out("copy"), out("enc.py")
    small_gc, small_py, small_age = out("small.gc"), out("small.py"), out("small.age")
    copies = {mode: out(f"copy-{mode}") for mode in ("read", "mmap")}
    rows += [
        Row("age -r (encrypt)", "bulk", [age, "-r", recipient, "-o", enc_age, p["plain"]],
            enc_age, age_open),
        Row("age -d (decrypt)", "bulk", [age, "-d", "-i", p["identity"], "-o", dec_age,
                                         p["plain.age"]], dec_age),
        Row("cp", "bulk", ["cp", p["plain"], copy], copy),
        Row("python script, cryptography, 1 MiB chunks", "bulk",
            [python, p["script.py"], "encrypt", p["key"], p["plain"], enc_py], enc_py, script_open),
        *[Row(f"python copy, {mode} (no cipher)", "bulk",
              [python, p["copy.py"], mode, p["plain"], o], o) for mode, o in copies.items()],
        Row("gpucrypt encrypt", "small", [gpucrypt, "encrypt", *key, "-f", p["small"], small_gc],
            small_gc, gc_open),
        Row("python script, cryptography", "small",
            [python, p["script.py"], "encrypt", p["key"], p["small"], small_py], small_py,
            script_open),
        Row("age -r (encrypt)", "small", [age, "-r", recipient, "-o", small_age, p["small"]],
            small_age, age_open)]
    setup = {"gc": [gpucrypt, "encrypt", *key, "-f", p["plain"], p["plain.gc"]],
             "age": [age, "-r", recipient, "-o", p["plain.age"], p["plain"]]}
    return rows, setup


def ratios(rows: list[Row], size: int, threads: list[int]) -> list[dict]:
    """Issue 12's figures from the medians of this run (each with the issue's target)."""
    med = {(r.group, r.name): r.summary() for r in rows}

    def wall(group, name):
        return med[(group, name)]["median_wall_s"]

    lo, hi = min(threads), max(threads)
    enc, dec = f"gpucrypt encrypt --threads {hi}", f"gpucrypt decrypt --threads {hi}"
    out = []

    def add(name, value, target, meets, definition, unit="ratio"):
        out.append({"name": name, "value": value, "unit": unit, "target": target, "meets": meets,
                    "definition": definition})

    if hi != lo:
        for op in ("encrypt", "decrypt"):
            v = wall("bulk", f"gpucrypt {op} --threads {lo}") / wall("bulk", f"gpucrypt {op} --threads {hi}")
            add(f"{op}: --threads {hi} speed-up over --threads {lo}", v, ">= 1.7", v >= 1.7,
                f"wall(--threads {lo}) / wall(--threads {hi})")
    for op, age_row, ours in (("encrypt", "age -r (encrypt)", enc), ("decrypt", "age -d (decrypt)", dec)):
        v = wall("bulk", age_row) / wall("bulk", ours)
        add(f"{op}: gpucrypt --threads {hi} vs age", v, ">= 1.5", v >= 1.5,
            "wall(age) / wall(gpucrypt): above 1, gpucrypt is faster")
    gib = size / 2**30
    cp_sys = med[("bulk", "cp")]["median_sys_s"]
    for op, ours in (("encrypt", enc), ("decrypt", dec)):
        ours_sys = med[("bulk", ours)]["median_sys_s"]
        add(f"{op}: system time of gpucrypt --threads {hi} vs cp", ours_sys / cp_sys, "<= 1.1",
            ours_sys / cp_sys <= 1.1, f"sys(gpucrypt) / sys(cp) on the same file; sys per GiB: "
            f"gpucrypt {ours_sys / gib:.2f} s, cp {cp_sys / gib:.2f} s")
    for mode in ("read", "mmap"):
        floor_sys = med[("bulk", f"python copy, {mode} (no cipher)")]["median_sys_s"]
        add(f"floor: system time of copy ({mode}, no cipher) vs cp", floor_sys / cp_sys,
            "<= 1.1", floor_sys / cp_sys <= 1.1,
            f"sys(read the file into a buffer of one's own and write it) / sys(cp): what any "
            f"such program pays; sys per GiB: {floor_sys / gib:.2f} s, cp {cp_sys / gib:.2f} s")
    peak = max(s["peak_rss_mib"] for (g, n), s in med.items() if n.startswith("gpucrypt"))
    add("peak RSS of gpucrypt", peak, "< 128 MiB", peak < 128,
        "largest ru_maxrss of a gpucrypt process over all rows and repetitions", unit="MiB")
    v = wall("small", "gpucrypt encrypt") / wall("small", "python script, cryptography")
    add("4 KiB: gpucrypt encrypt / python script", v, "<= 1.3", v <= 1.3,
        "wall(gpucrypt encrypt) / wall(python script) on the 4 KiB file: below 1, gpucrypt is faster")
    return out


def print_report(doc: dict) -> None:
    env = doc["environment"]
    print(f"\n{doc['size'] / 2**20:.0f} MiB file and a 4 KiB file in {doc['dir']}, {doc['repeat']} "
          f"interleaved repetitions, medians; {env['cpu']}, {env['nproc']} cores; load average "
          f"{doc['load_average_start']:.2f} at the start, {doc['load_average_end']:.2f} at the end")
    head = f"{'file':5}  {'command':45} {'wall s':>8} {'user s':>8} {'sys s':>8} {'peak RSS MiB':>13}"
    print(head + "\n" + "-" * len(head))
    for r in doc["rows"]:
        size = "4 KiB" if r["group"] == "small" else "bulk"
        print(f"{size:5}  {r['name']:45} {r['median_wall_s']:8.3f} {r['median_user_s']:8.3f} "
              f"{r['median_sys_s']:8.3f} {r['peak_rss_mib']:13.1f}")
    print(f"(peak RSS includes the timing helper's memory at fork: `true` reads "
          f"{doc['rss_floor_mib']:.1f} MiB)\n")
    for q in doc["ratios"]:
        value = f"{q['value']:.0f} MiB" if q["unit"] == "MiB" else f"x{q['value']:.2f}"
        print(f"{q['name']:52} {value:>8}  issue 12: {q['target']:9} "
              f"{'met' if q['meets'] else 'NOT met'}   ({q['definition']})")


def _compile_bytecode() -> None:
    """Compile gpucrypt's modules to bytecode first, as an installed package ships them:
    with ``PYTHONDONTWRITEBYTECODE=1`` (set on these machines) a checkout would otherwise
    recompile every edited module on each start, and the 4 KiB row would time the
    compiler. The script row compiles nothing: it is one file, as a user's would be.
    ``-f``: a bytecode file whose source changed within the same second (and kept its
    size: a ``git stash``/``pop``) is taken as current otherwise, and every run then
    compiles that module."""
    import gpucrypt

    subprocess.run([sys.executable, "-m", "compileall", "-q", "-f",
                    os.path.dirname(gpucrypt.__file__)], check=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="bulk file size (default 1GiB)")
    parser.add_argument("--repeat", type=int, default=7, help="timed repetitions of every row (default 7)")
    parser.add_argument("--threads", default="1,2", help="gpucrypt --threads values (default 1,2)")
    parser.add_argument("--dir", default="/dev/shm", help="where the files go (default /dev/shm)")
    parser.add_argument("--json", help="write every run and the machine's description here")
    args = parser.parse_args(argv)
    threads = sorted({int(t) for t in args.threads.split(",")})
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    env = environment()
    _compile_bytecode()
    work = tempfile.mkdtemp(prefix="cli_bench-", dir=args.dir)
    try:
        # 0600: the CLI refuses key files that group or others can read, as ssh does
        with open(os.open(os.path.join(work, "key"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
            f.write(os.urandom(32))
        subprocess.run([_tool("age-keygen"), "-o", os.path.join(work, "identity")],
                       check=True, capture_output=True)
        for name, text in (("script.py", _SCRIPT), ("copy.py", _COPY_SCRIPT)):
            with open(os.path.join(work, name), "w", encoding="utf-8") as f:
                f.write(text)
        print(f"writing {args.size} random bytes to {work} ...", file=sys.stderr)
        want = {"bulk": _write_random(os.path.join(work, "plain"), args.size),
                "small": _write_random(os.path.join(work, "small"), SMALL)}
        rows, setup = build_rows(work, threads)
        for argv_ in setup.values():
            measure(argv_)
        back = os.path.join(work, "back")
        for row in rows:
            print(f"checking {row.name} ({row.group}) ...", file=sys.stderr)
            check(row, want[row.group], back)
        rss_floor = measure(["true"])["maxrss_kib"] / 1024
        load_start = os.getloadavg()[0]
        for k in range(args.repeat):
            print(f"repetition {k + 1}/{args.repeat} ...", file=sys.stderr)
            for row in rows:
                row.runs.append(measure(row.argv))
                _unlink(row.output)
        load_end = os.getloadavg()[0]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    doc = {"benchmark": "cli_bench", "size": args.size, "small_size": SMALL, "repeat": args.repeat,
           "threads": threads, "dir": args.dir, "environment": env, "rss_floor_mib": rss_floor,
           "load_average_start": load_start, "load_average_end": load_end,
           "rows": [r.summary() for r in rows], "ratios": ratios(rows, args.size, threads)}
    print_report(doc)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
