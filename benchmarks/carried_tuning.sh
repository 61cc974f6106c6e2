#!/usr/bin/env bash
# Do compiles that start from one compile's kernel configurations (`--tuning-from`) decode at
# the same speed, where compiles that tune for themselves do not? MODEL is compiled once, then
# benched (dense optc) in fresh processes, each with empty Inductor and Triton
# caches: RUNS of them with --tuning-from the artifact, then OWN_RUNS (default RUNS) that tune
# for themselves; BASELINES (default none) are timed in each. Each process's bench JSON, log
# and tuning record (experiments/tuning_at_load.py: how many kernels coordinate descent tuned)
# land in OUT_DIR.
#   benchmarks/carried_tuning.sh MODEL TARGET OUT_DIR RUNS [OWN_RUNS [BASELINES]]
set -uo pipefail
model=$1 target=$2 out=$3 runs=$4 own_runs=${5:-$4} baselines=${6:-}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
fresh() {  # name, optc arguments...
  local name=$1; shift
  local caches start
  caches=$(mktemp -d) start=$(date +%s)
  TORCHINDUCTOR_CACHE_DIR=$caches/inductor TRITON_CACHE_DIR=$caches/triton OUT=$out/tuning_$name.json \
    python3 "$here/experiments/tuning_at_load.py" -m optc.cli "$@" > "$out/$name.log" 2>&1
  echo "$name exit $? after $(( $(date +%s) - start )) s: $(grep -h '^TUNING' "$out/$name.log" | cut -c1-120)"
  rm -rf "$caches"
}
fresh compile compile "$model" --target "$target" --package none -o "$out/tuned.optc"
bench=(bench "$model" --target "$target" --baselines "$baselines" --no-autotune --rounds 2 --tokens 64)
for i in $(seq 1 "$runs"); do
  fresh "carried_$i" "${bench[@]}" --tuning-from "$out/tuned.optc" --out "$out/bench_carried_tuning_$i.json"
done
for i in $(seq 1 "$own_runs"); do
  fresh "own_$i" "${bench[@]}" --out "$out/bench_own_tuning_$i.json"
done
