#!/usr/bin/env bash
# Search a model on the GPU present, then time the chosen configuration against dense optc
# and the torch.compile baselines in one bench process. Results land in OUT_DIR.
#   benchmarks/search_then_bench.sh MODEL TARGET OUT_DIR SEARCH_SECONDS [optc search options...]
set -uo pipefail
model=$1 target=$2 out=$3 seconds=$4; shift 4
mkdir -p "$out"
python3 -m optc.cli search "$model" --target "$target" --time-limit "$seconds" --trials 1000 \
  -o "$out/search" --json "$@" > "$out/search.json" 2> "$out/search.log"
echo "search exit $?"
variant=$(python3 - "$out/search.json" <<'PY'
import json, sys
best = json.load(open(sys.argv[1])).get("best") or {}
print(" ".join(f"{p}.{k}={json.dumps(v)}" for p, vals in best.get("config", {}).items() for k, v in vals.items()))
PY
)
echo "best: ${variant:-none}"
[ -n "$variant" ] || exit 3
python3 -m optc.cli bench "$model" --target "$target" --baselines inductor-max --no-autotune --rounds 2 \
  --tokens 64 --variant "$variant" --out "$out/bench.json" --json > /dev/null 2> "$out/bench.log"
echo "bench exit $?"
