#!/usr/bin/env bash
# The artifact's load as a fresh machine sees it: compile MODEL with empty Inductor and Triton
# caches, then load it N times, each in a fresh process with empty caches of its own and no
# TRITON_CACHE_DIR (only the artifact's kernel cache), counting Inductor's tuning
# (experiments/tuning_at_load.py) and timing the load to the first token
# (load_to_first_token.py). With --over-cache, a second compile runs
# over the first one's caches (its kernels start from the cached choices) and its artifact is
# loaded the same way. Results land in OUT_DIR.
#   benchmarks/load_on_a_fresh_machine.sh MODEL TARGET OUT_DIR N [--over-cache]
set -uo pipefail
model=$1 target=$2 out=$3 runs=$4 over=${5:-}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
caches=$(mktemp -d)
# A user's `pip install` leaves the packages byte-compiled; an image built with
# PYTHONDONTWRITEBYTECODE=1 has none, and every fresh process then compiles the sources of
# what it imports (seconds of a load, benchmarks/NOTES.md). Compile them once, as pip would.
if python3 -c 'import sys; sys.exit(not sys.dont_write_bytecode)'; then
  site=$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
  python3 -m compileall -q -j 0 "$site" > /dev/null 2>&1
  echo "byte-compiled $site (PYTHONDONTWRITEBYTECODE is set here)"
fi
compile() {  # name
  start=$(date +%s)
  TORCHINDUCTOR_CACHE_DIR=$caches/inductor TRITON_CACHE_DIR=$caches/triton OUT=$out/tuning_compile_$1.json \
    python3 "$here/experiments/tuning_at_load.py" -m optc.cli compile "$model" --target "$target" --package none \
    -o "$out/$1.optc" > "$out/compile_$1.log" 2>&1
  echo "compile $1 exit $? after $(( $(date +%s) - start )) s"
}
load() {  # artifact name, run
  # As on a user's fresh machine: TRITON_CACHE_DIR unset (Inductor then sets it to a directory of its own
  # cache, where the artifact's Triton kernels must be written), Triton's home and Inductor's cache empty.
  fresh=$(mktemp -d)
  env -u TRITON_CACHE_DIR TRITON_HOME=$fresh/home TORCHINDUCTOR_CACHE_DIR=$fresh/inductor OUT=$out/tuning_load_$1_$2.json \
    python3 "$here/experiments/tuning_at_load.py" "$here/load_to_first_token.py" "$out/$1.optc" --tokens 64 \
    --out "$out/load_to_first_token_$1_$2.json" > "$out/load_$1_$2.log" 2>&1
  echo "load $1 $2 exit $?: $(grep -h '^load' "$out/load_$1_$2.log" | cut -c1-160)"
  rm -rf "$fresh"
}
compile cold
for i in $(seq 1 "$runs"); do load cold "$i"; done
if [ "$over" = "--over-cache" ]; then
  compile over_cache
  for i in $(seq 1 "$runs"); do load over_cache "$i"; done
fi
rm -rf "$caches"
