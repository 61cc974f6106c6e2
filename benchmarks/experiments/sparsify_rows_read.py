#!/usr/bin/env python
"""How many weight rows a sparse kernel serving M tokens at once must read, on real
activations (SmolLM2-135M, held-out text), against the independent-token assumption
behind the kernel benchmark's multi-token rows (random activations: 1 - s^M).

Reads the JSON of `optc compile ... --eval --json` runs (their sparsify_activations
report holds `rows_read`) and writes one result file:

    for m in cats teal chess; do
      optc compile smollm2-135m --target cpu --set sparsify_activations.method=$m \\
          --set sparsify_activations.sparsity=0.5 --eval --no-verify --json > rr_$m.json
    done
    python benchmarks/experiments/sparsify_rows_read.py rr_*.json --out benchmarks/results/smollm2_rows_read_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness.py and the scripts reused here
from harness import write_result  # noqa: E402


def independent(units: dict, params: dict, m: int) -> float:
    """Rows read for m independent tokens if each unit's channels were zero at its
    held-out rate s_u, independently per token and channel: mean of 1 - s_u^m by weights."""
    total = sum(params[k] for k in units)
    return sum(params[k] * (1 - s ** m) for k, s in units.items()) / total


def row(doc: dict) -> dict:
    entry = next(p for p in doc["passes"] if p["name"] == "sparsify_activations")
    plan, cfg = entry["plan"], doc["config"]["passes"]["sparsify_activations"]
    rep = doc["quality"]["sparsify_activations"]
    params = {u["key"]: u["params"] for u in plan["units"]}
    return {
        "method": cfg["method"], "sparsity": cfg["sparsity"], "allocation_used": plan["allocation"]["used"],
        "ppl_before": doc["quality"]["before"], "ppl_after": doc["quality"]["after"],
        "heldout_sparsity": rep["weighted_sparsity"],
        "rows_read": rep["rows_read"],
        "rows_read_if_independent": {str(m): round(independent(rep["units"], params, m), 4) for m in (1, 4, 16)},
        "command": (f"optc compile smollm2-135m --target cpu --set sparsify_activations.method={cfg['method']} "
                    f"--set sparsify_activations.sparsity={cfg['sparsity']} --eval --no-verify --json"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="JSON outputs of optc compile --eval --json")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = [row(json.loads(Path(p).read_text())) for p in args.runs]
    result = {
        "model": "smollm2-135m",  # the runs read here were on the cpu target (their commands)
        "eval": "optc compile --eval defaults: 16 held-out sequences x 128 tokens of the evaluation half "
                "of pydoc_data.topics; thresholds calibrated on the other half",
        "definitions": {
            "rows_read.1": "fraction of the thresholded units' weight rows one token reads (weighted by weights)",
            "rows_read.M_consecutive": "rows of channels active for any of M consecutive tokens of a sequence "
                                       "(speculative decoding's verify step)",
            "rows_read.M_sequences": "rows of channels active for any of M sequences at the same position "
                                     "(batched decode)",
            "rows_read_if_independent": "the same if tokens and channels were independent at each unit's "
                                        "held-out rate (the kernel benchmark's random activations)",
        },
        "rows": rows,
    }
    write_result(args.out, result, device="cpu")
    for r in rows:
        print(r["method"], r["sparsity"], r["rows_read"], r["rows_read_if_independent"])


if __name__ == "__main__":
    main()
