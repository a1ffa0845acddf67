#!/usr/bin/env bash
# One GPU session in ONE call of the device tool (at most 8 minutes): install from carried
# wheels, record the machine, run the GPU tests on the real device (no simulator), the
# device-typed kernel tests, `gpucrypt bench` at 1 GiB for every algorithm (with each
# GPU figure as a fraction of the device-to-device copy rate) and the tensor benchmark;
# every result lands under $OUT.
#
#   benchmarks/gpu_session.sh --prepare [WHEEL_DIR]      here, once (needs the network)
#   benchmarks/gpu_session.sh [WHEEL_DIR] [STEP...]      on the GPU machine (no network)
#   DRY_RUN=1 benchmarks/gpu_session.sh [STEP...]        anywhere: print the plan, run nothing
#
# The one call (the device budget is 15 minutes a session, the machine's start included,
# so the call is sized to leave room for one rerun of a failed part):
#   git rev-parse HEAD > .whl/COMMIT      # here, after the last commit: see below
#   run(command="bash benchmarks/gpu_session.sh .whl", carry=[".whl"], timeout_s=500)
# The device machine's copy of the tree can carry the git metadata of an older commit
# (seen 2026-12-04: every record there said the session's first commit, -dirty), so the
# commit is taken from WHEEL_DIR/COMMIT where present (GPUCRYPT_GIT_COMMIT for the bench).
#
# WHEEL_DIR defaults to .whl (git-ignored through .git/info/exclude; name it in the
# device tool's `carry`). STEPs, in the order given (default: all = install env warmup
# gpu-tests bench-device bench tensor profile phases):
#   install       pip install, offline, what the image lacks (cryptography >= 47 and its
#                 cffi/pycparser, a slim cryptography-vectors, pynacl, numba-cuda >= 0.30 if
#                 the image's is older), then this checkout, editable. Skipped when done
#                 earlier on the same (still warm) machine.
#   env           nvidia-smi, driver, versions, `gpucrypt info`         -> $OUT/env.txt
#   warmup        `gpucrypt warmup`: every kernel compiled for this GPU, timed (the later
#                 steps then load them from the cache)                   -> $OUT/env.txt
#   gpu-tests     GPUCRYPT_REQUIRE_GPU=1 pytest -m "gpu or cudasim" (every test that runs
#                 kernels, on the device; a GPU test that cannot run fails)   -> $OUT/pytest.log
#   device-typed  the device-typed kernel tests ($DEVICE_TYPED_TESTS)  -> $OUT/pytest.log
#                 (not in "all": they need no GPU, and CI runs them on the device build)
#   bench-device  the same rows with --device-time: the device's time alone, the calls
#                 queued behind a delay (encryption only)                -> $OUT/bench-gpu-device.json, bench.log
#   bench         gpucrypt bench --device gpu --sizes $SIZES --forms into (every algorithm,
#                 $OPERATIONS, GPU rows beside cryptography: device-resident ones as a
#                 fraction of the copy rate, +transfer (both PCIe copies) as a ratio to
#                 cryptography on the same host bytes)                 -> $OUT/bench-gpu.json, bench.log
#   tensor        benchmarks/tensor_bench.py --device cuda (state dicts) -> $OUT/tensor-bench.json, bench.log
#   cpu-tests     the rest of the suite (CI runs it anyway; not in "all")
#   profile       benchmarks/host_profile.py: host time per call (1 MiB raw and sealed, 256
#                 small tensors) and cProfile's top entries           -> $OUT/bench.log
#   phases        benchmarks/kernel_phases.py: device time of each launch of one seal (both
#                 AEADs, 1 MiB, 64 MiB, 1 GiB): where the MACs' fixed cost is -> $OUT/bench.log
#   files         benchmarks/stream_bench.py --model and benchmarks/model_scale_run.py
#                 (not in "all": a second call)                        -> $OUT/files-bench.json, bench.log
# Every step runs under `timeout`, and no step runs past the session's deadline
# (SESSION_LIMIT seconds after the start, 470 by default: the call's 500 s less the
# machine's answer); a failing step is recorded in $OUT/summary.txt and session.json and
# the next one still runs. The script exits 0 unless the install failed.
#
# $OUT comes back (8 files at most; "all" writes exactly 8: env.txt, summary.txt,
# session.json, pytest.log, bench.log, bench-gpu-device.json, bench-gpu.json,
# tensor-bench.json; pytest's own summary lines in pytest.log name every failure).
# Limits per step, in seconds, from the environment (the defaults of "all" add up to 665,
# past the session's 470: a step never runs past the session's end, so the last ones, the
# profile and the phases, are the ones cut short; on 2026-12-04 at 18:42 the steps before it took 12, 4, 16,
# 43, 67, 93 and 34 s, 269 s in all):
# T_INSTALL (45), env 30, T_WARMUP (60), T_TESTS (120), T_DEVICE_TYPED (45), T_BENCH_DEVICE (100),
# T_BENCH (100), T_TENSOR (90), T_PROFILE (60), T_PHASES (60),
# T_CPU_TESTS (200), T_FILES (180).
# Other knobs: SIZES (1MiB,1GiB), OPERATIONS (encrypt), BENCH_SECONDS (0.1 per cell),
# PYTEST_EXTRA (added to the pytest command lines, e.g. "-x" or "-k poly1305"), DEVICE_TYPED_TESTS
# (tests/test_kernels_device.py), TENSOR_MIB (1024), FILES_GIB (2). install.log goes into
# env.txt.
#
# What --prepare puts in WHEEL_DIR (about 18 MB; the tree that travels is capped at
# 64 MiB): pip download (Python 3.12, manylinux x86-64, no dependencies) of
# cryptography, cffi, pycparser, pynacl, numba-cuda, setuptools and wheel, and a
# cryptography-vectors wheel cut down to the ciphers/ files the tests read (the full
# one is 56 MB). torch, CuPy, JAX, numba, pytest, hypothesis, safetensors,
# pytest-timeout and matplotlib are in the machine's image already (see
# /work/.library/device/KINDS.md), so they are not carried; a CUDA torch wheel (~900 MB)
# could not travel anyway.
set -uo pipefail

PY=${PYTHON:-python3}
PINS=(cryptography==50.0.2 cffi==2.0.0 pycparser pynacl==1.6.2 numba-cuda==0.30.4 setuptools wheel)
VECTORS=cryptography-vectors==50.0.2

prepare() {
    local dir=$1 tmp
    mkdir -p "$dir"
    grep -qxF "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >> .git/info/exclude
    local plat=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp
                --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64
                --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
                --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
    $PY -m pip download -q "${plat[@]}" -d "$dir" "${PINS[@]}" || return 1
    tmp=$(mktemp -d)
    $PY -m pip download -q "${plat[@]}" -d "$tmp" "$VECTORS" || return 1
    # keep ciphers/{AES/{CTR,GCM,ECB},ChaCha20,ChaCha20Poly1305} and the package itself;
    # RECORD is rewritten with the kept files' hashes
    $PY - "$tmp" "$dir" <<'EOF' || return 1
import base64, hashlib, pathlib, sys, zipfile
src = next(pathlib.Path(sys.argv[1]).glob("cryptography_vectors-*.whl"))
dst = pathlib.Path(sys.argv[2]) / src.name
keep = tuple("cryptography_vectors/ciphers/" + p for p in
             ("AES/CTR/", "AES/GCM/", "AES/ECB/", "ChaCha20/", "ChaCha20Poly1305/"))
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    record, record_name = [], None
    for info in zin.infolist():
        name = info.filename
        if name.endswith(".dist-info/RECORD"):
            record_name = name
            continue
        top = name.count("/") == 1 and name.startswith("cryptography_vectors/")
        if not (top or name.startswith(keep) or ".dist-info/" in name) or name.endswith("/"):
            continue
        data = zin.read(name)
        zout.writestr(info, data)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    zout.writestr(record_name, "\n".join(record + [f"{record_name},,"]) + "\n")
print(f"{dst.name}: {dst.stat().st_size / 1e6:.1f} MB (from {src.stat().st_size / 1e6:.1f} MB)")
EOF
    rm -rf "$tmp"
    ls -l "$dir"
    du -sh "$dir"
}

if [[ ${1:-} == --prepare ]]; then
    prepare "${2:-.whl}"
    exit $?
fi

WHEELS=.whl
if [[ $# -gt 0 && -d $1 ]]; then WHEELS=$1; shift; fi
STEPS=("$@")
[[ ${#STEPS[@]} -eq 0 || ${STEPS[0]} == all ]] && STEPS=(install env warmup gpu-tests bench-device bench tensor profile phases)
OUT=${OUT:-$PWD/gpu-session-out}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
RECORD=$OUT/session.json
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false GPUCRYPT_REQUIRE_GPU=1
unset NUMBA_ENABLE_CUDASIM
START=$SECONDS
LIMIT=${SESSION_LIMIT:-470}
if [[ -s $WHEELS/COMMIT ]]; then
    GPUCRYPT_GIT_COMMIT="$(head -c 40 "$WHEELS/COMMIT")+tree"
else
    GPUCRYPT_GIT_COMMIT=$(git rev-parse HEAD 2>/dev/null)-unverified
fi
export GPUCRYPT_GIT_COMMIT
note() { echo "[$(date +%T) +$((SECONDS - START))s] $*" | tee -a "$SUMMARY"; }
: > "$RECORD.lines"

# step NAME LIMIT CMD...: run CMD under `timeout` (its own limit, cut to what is left of
# the session), record its status in summary.txt and session.json, never stop the script
step() {
    local name=$1 limit=$2 t0=$SECONDS rc left status
    shift 2
    left=$((LIMIT - (SECONDS - START) - 5))
    (( limit > left )) && limit=$left
    if (( limit < 10 )); then
        note "== $name: SKIPPED (${left}s left of the session's ${LIMIT}s)"
        echo "{\"step\": \"$name\", \"status\": \"skipped\", \"seconds\": 0}" >> "$RECORD.lines"
        return 125
    fi
    note "== $name (limit ${limit}s)"
    if [[ -n ${DRY_RUN:-} ]]; then
        echo "   would run: $(printf '%q ' "$@")"
        rc=0
    else
        timeout --signal=TERM --kill-after=10 "$limit" "$@"
        rc=$?
    fi
    case $rc in
        0) status=ok; note "   $name: ok ($((SECONDS - t0))s)" ;;
        124|137) status=timeout; note "   $name: TIMED OUT after $((SECONDS - t0))s (rc $rc)" ;;
        *) status=failed; note "   $name: FAILED rc=$rc ($((SECONDS - t0))s)" ;;
    esac
    echo "{\"step\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"limit\": $limit}" >> "$RECORD.lines"
    return $rc
}

do_install() {
    local marker=/tmp/gpucrypt-installed ok=0 req
    if [[ -f $marker ]] && $PY -c "import gpucrypt, cryptography_vectors, nacl" 2>/dev/null; then
        echo "already installed on this machine"; return 0
    fi
    [[ -d $WHEELS ]] || { echo "no wheel directory $WHEELS (see --prepare)"; return 1; }
    # one requirement at a time: what the image already satisfies is kept, and one
    # missing wheel does not stop the others
    $PY -m pip install -q --no-index --find-links "$WHEELS" "cryptography>=47" || { echo "!! cryptography"; ok=1; }
    # the rest only lose some tests or rows when missing: the image's numba-cuda may do,
    # so a failed upgrade is recorded, not fatal
    for req in cryptography-vectors "pynacl>=1.5" "numba-cuda>=0.30"; do
        $PY -m pip install -q --no-index --find-links "$WHEELS" "$req" || echo "!! $req (not installed; going on)"
    done
    $PY -m pip install -q --no-index --find-links "$WHEELS" --no-deps --no-build-isolation -e . ||
        $PY -m pip install -q --no-index --find-links "$WHEELS" --no-deps -e . || { echo "!! gpucrypt"; ok=1; }
    [[ $ok == 0 ]] && touch $marker
    return $ok
}

do_env() {
    set -x
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
    uname -a
    $PY --version
    $PY -m pip list 2>/dev/null | grep -iE "^(numba|cuda|cupy|torch |jax|cryptography|pynacl|cffi|numpy|pytest|hypothesis|safetensors|nvidia-cuda-nvrtc|nvidia-nvjitlink)"
    $PY -c "from numba import cuda; cuda.detect(); d = cuda.get_current_device(); print('cc', d.compute_capability, 'SMs', d.MULTIPROCESSOR_COUNT, 'L2', d.L2_CACHE_SIZE)"
    $PY -m gpucrypt info
    { set +x; } 2>/dev/null
}

pytest_args() {  # common pytest options; pytest-timeout is in the image, checked anyway
    local a=(-q -rfEs -p no:cacheprovider --durations=15)
    $PY -c "import pytest_timeout" 2>/dev/null && a+=(--timeout=240)
    echo "${a[@]}"
}

run_steps() {
    local s
    for s in "${STEPS[@]}"; do
        case $s in
            install) step install "${T_INSTALL:-45}" bash -c do_install >> "$OUT/env.txt" 2>&1 ||
                         { note "install failed: see env.txt"; finish; exit 1; } ;;
            env) step env 30 bash -c do_env >> "$OUT/env.txt" 2>&1 ;;
            warmup) step warmup "${T_WARMUP:-60}" $PY -m gpucrypt warmup >> "$OUT/env.txt" 2>&1 ;;
            gpu-tests)
                # shellcheck disable=SC2046,SC2086
                step gpu-tests "${T_TESTS:-120}" $PY -m pytest $(pytest_args) -m "gpu or cudasim" \
                    ${PYTEST_EXTRA:-} tests/ 2>&1 | tee -a "$OUT/pytest.log" | tail -40 ;;
            device-typed)
                if [[ -f ${DEVICE_TYPED_TESTS:-tests/test_kernels_device.py} ]]; then
                    # shellcheck disable=SC2046,SC2086
                    step device-typed "${T_DEVICE_TYPED:-45}" $PY -m pytest $(pytest_args) ${PYTEST_EXTRA:-} \
                        "${DEVICE_TYPED_TESTS:-tests/test_kernels_device.py}" 2>&1 | tee -a "$OUT/pytest.log" | tail -15
                else
                    note "== device-typed: no ${DEVICE_TYPED_TESTS:-tests/test_kernels_device.py} in this checkout"
                fi ;;
            cpu-tests)
                # shellcheck disable=SC2046,SC2086
                step cpu-tests "${T_CPU_TESTS:-200}" $PY -m pytest $(pytest_args) -m "not gpu and not cudasim" \
                    --ignore=tests/test_kernel_report.py ${PYTEST_EXTRA:-} tests/ 2>&1 | tee -a "$OUT/pytest.log" | tail -15 ;;
            bench)
                # the _into rows only (device-resident data) against cryptography: every
                # algorithm, every form, every implementation at 1 GiB ran past 110 s on an
                # H200 (2026-12-04), the CPU rows taking most of it
                step bench "${T_BENCH:-100}" $PY -m gpucrypt bench --device gpu --sizes "${SIZES:-1MiB,1GiB}" \
                    --forms into --operations "${OPERATIONS:-encrypt}" \
                    --implementations gpucrypt-gpu,gpucrypt-gpu-hosttag,gpucrypt-gpu+transfer,cryptography \
                    --seconds "${BENCH_SECONDS:-0.1}" --json "$OUT/bench-gpu.json" 2>&1 | tee -a "$OUT/bench.log" | tail -60 ;;
            bench-device)
                step bench-device "${T_BENCH_DEVICE:-100}" $PY -m gpucrypt bench --device gpu --device-time \
                    --sizes "${SIZES:-1MiB,1GiB}" --forms into --operations encrypt --implementations gpucrypt-gpu \
                    --seconds "${BENCH_SECONDS:-0.1}" --json "$OUT/bench-gpu-device.json" 2>&1 | tee -a "$OUT/bench.log" | tail -40 ;;
            tensor)
                # --calls 40: a small call costs milliseconds on the GPU path (host-side
                # launch overhead, measured 2026-12-04), and 200 a round ran past 55 s
                step tensor "${T_TENSOR:-90}" $PY benchmarks/tensor_bench.py --device cuda --mib "${TENSOR_MIB:-1024}" \
                    --reps 3 --calls 40 --json "$OUT/tensor-bench.json" 2>&1 | tee -a "$OUT/bench.log" | tail -15 ;;
            files) step files "${T_FILES:-180}" bash -c do_files 2>&1 | tee -a "$OUT/bench.log" | tail -25 ;;
            profile)
                step profile "${T_PROFILE:-60}" $PY benchmarks/host_profile.py --calls 50 2>&1 |
                    tee -a "$OUT/bench.log" | grep "per call" ;;
            phases)
                step phases "${T_PHASES:-60}" $PY benchmarks/kernel_phases.py --runs 5 2>&1 |
                    tee -a "$OUT/bench.log" | tail -40 ;;
            *) note "unknown step $s (install env warmup gpu-tests device-typed cpu-tests bench-device bench tensor profile phases files)" ;;
        esac
    done
}

# session.json: the steps' statuses and times, the checkout, and the machine's GPU
finish() {
    $PY - "$RECORD" "$RECORD.lines" "$((SECONDS - START))" <<'PYEOF' || true
import json, os, subprocess, sys
record, lines, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
def out(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:
        return f"unavailable: {exc}"
steps = [json.loads(line) for line in open(lines) if line.strip()]
json.dump({"steps": steps, "seconds": seconds, "commit": os.environ.get("GPUCRYPT_GIT_COMMIT"),
           "changed_files": len(out("git", "status", "--porcelain").splitlines()),
           "gpu": out("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader")},
          open(record, "w"), indent=1)
PYEOF
    rm -f "$RECORD.lines"
}

do_files() {
    local tmp
    tmp=$(mktemp -d)
    local rc=0
    $PY benchmarks/stream_bench.py --size 1GiB --rounds 3 --model "$tmp" --json "$tmp/stream.json" || rc=1
    $PY benchmarks/model_scale_run.py --size "${FILES_GIB:-2}GiB" --dir "$tmp/scale" \
        --load-device cpu,cuda --json "$tmp/scale.json" || rc=1
    $PY -c 'import json, sys; json.dump({k: json.load(open(p)) for k, p in zip(("stream_bench", "model_scale_run"), sys.argv[2:]) if __import__("os").path.exists(p)}, open(sys.argv[1], "w"), indent=1)' \
        "$OUT/files-bench.json" "$tmp/stream.json" "$tmp/scale.json"
    rm -rf "$tmp"
    return $rc
}

export PY WHEELS OUT
export -f do_install do_env do_files
note "gpucrypt GPU session: steps ${STEPS[*]}; wheels $WHEELS; out $OUT; limit ${LIMIT}s; commit $GPUCRYPT_GIT_COMMIT"
run_steps
finish
note "done in $((SECONDS - START))s"
tail -20 "$SUMMARY"
exit 0
