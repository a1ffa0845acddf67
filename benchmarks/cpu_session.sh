#!/usr/bin/env bash
# Every CPU benchmark that an open issue's "Done when" quotes, one after the other, on a
# quiet machine: run it when nothing else does (no test suite, no helper), since each
# script compares side by side in one run but a busy neighbour still widens the noise.
#
#   benchmarks/cpu_session.sh [TAG] [STEP...]
#
# TAG names the results, benchmarks/results/$(date +%F)-cpu-<vendor>-<family>-<step>-TAG.json
# (default: quiet; vendor and family from /proc/cpuinfo: amd-epyc, intel-xeon, ...). STEPs (default: all, in this order; about 17 minutes on 2 cores):
#   dcp      benchmarks/dcp_bench.py           issue 16 (2 gloo ranks, 256 MiB)   ~1 min
#   model    benchmarks/model_load_bench.py    issue 18 (1 GiB, tensorizer)       ~2 min
#   tensor   benchmarks/tensor_bench.py        issue 13 (state dicts, 4 KiB)      ~3 min
#   cli      benchmarks/cli_bench.py           issue 12 (1 GiB file, age, cp)     ~3 min
#   bench    gpucrypt bench --device cpu       issue 13 (64 B .. 1 GiB)           ~6 min
#   ceiling  benchmarks/in_place_ceiling.py    issue 13 (in place, cryptography)  ~2 min
# Then regenerate benchmarks/RESULTS.md: python benchmarks/make_results_md.py
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-quiet}; shift || true
steps=("$@"); [ ${#steps[@]} -gt 0 ] || steps=(dcp model tensor cli bench ceiling)
py=${PYTHON:-python}
# the machine in the name: the lent machines differ (AMD EPYC, Intel Xeon with VAES), and
# a ratio against OpenSSL means something only next to the CPU it was taken on; any other
# CPU (no "AMD/Intel <family>", grep finding nothing) is cpu-unknown, not a silent exit
cpu=$(sed -n 's/^model name[[:space:]]*: *//p' /proc/cpuinfo | head -1 | tr 'A-Z' 'a-z' |
      sed -E 's/\((r|tm)\)//g' | { grep -oE '(amd|intel) +[a-z]+' || true; } | head -1 | tr -s ' ' '-')
name() { echo "benchmarks/results/$(date +%F)-cpu-${cpu:-unknown}-$1-$tag.json"; }
for step in "${steps[@]}"; do
  echo "== $step (load $(cut -d' ' -f1-3 /proc/loadavg))"
  case $step in
    dcp)    $py benchmarks/dcp_bench.py --json "$(name dcp)" ;;
    model)  $py benchmarks/model_load_bench.py --dir /dev/shm/gpucrypt-mlb --json "$(name model-load)" ;;
    tensor) $py benchmarks/tensor_bench.py --device cpu --threads 1,2 --json "$(name tensor)" ;;
    cli)    $py benchmarks/cli_bench.py --json "$(name cli)" ;;
    ceiling) $py benchmarks/in_place_ceiling.py --json "$(name in-place-ceiling)" ;;
    bench)  $py -m gpucrypt bench --device cpu --sizes 64,1KiB,16KiB,1MiB,16MiB,256MiB,1GiB \
              --json "$(name issue13)" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
