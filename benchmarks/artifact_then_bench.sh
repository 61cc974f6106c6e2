#!/usr/bin/env bash
# Compile a model to an artifact on the GPU present, then time the loaded artifact beside
# the same configuration compiled in the bench's process and the torch.compile baselines,
# in N fresh bench processes (the spread between processes). Results land in OUT_DIR.
#   benchmarks/artifact_then_bench.sh MODEL TARGET OUT_DIR N [optc compile options...]
set -uo pipefail
model=$1 target=$2 out=$3 runs=$4; shift 4
mkdir -p "$out"
start=$(date +%s)
python3 -m optc.cli compile "$model" --target "$target" --package none -o "$out/$model.optc" --json "$@" \
  > "$out/compile.json" 2> "$out/compile.log"
echo "compile exit $? after $(( $(date +%s) - start )) s"
for i in $(seq 1 "$runs"); do
  python3 -m optc.cli bench "$model" --target "$target" --baselines inductor-max --rounds 2 --tokens 64 \
    --artifact "$out/$model.optc" "$@" --out "$out/bench_$i.json" --json > /dev/null 2> "$out/bench_$i.log"
  echo "bench $i exit $?"
done
