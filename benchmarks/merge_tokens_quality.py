#!/usr/bin/env python
"""Quality of merge_tokens on all-MiniLM-L6-v2 (real weights) for a few r, on the CPU.

Runs, for each r, the exact command

    optc compile minilm-l6 --target cpu --set merge_tokens.r=R --eval --json

and writes one result file with the held-out figures: the mean cosine of the pooled
embedding to the unmerged model's, and nearest-neighbour retrieval agreement among the
held-out samples (128-token windows of the evaluation half of pydoc_data.topics), with
the per-block token counts the pass planned.

    python benchmarks/merge_tokens_quality.py --r 2 4 8 12 16 \\
        --out benchmarks/results/merge_tokens_minilm_cpu.json

With `--variant "merge_tokens.KEY=VALUE ..."` (repeatable) each r also runs with those
settings added, beside the plain row (a file of such rows is not a README row: name it
other than merge_tokens_*.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from harness import write_result


def compile_r(r: int, settings: tuple[str, ...] = ()) -> dict:
    words = [f"merge_tokens.r={r}", *settings]
    sets = [x for w in words for x in ("--set", w)]
    cmd = ["optc", "compile", "minilm-l6", "--target", "cpu", *sets, "--eval", "--json"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "optc.cli", *cmd[1:]], capture_output=True, text=True, cwd="/tmp")
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    doc = json.loads(proc.stdout)
    entry = next(p for p in doc["passes"] if p["name"] == "merge_tokens")
    q = doc["quality"]
    return {
        "r": r, "settings": list(settings), "command": " ".join(cmd), "applied": entry["applied"],
        "reason": entry["reason"],
        "tokens_per_block": entry["plan"].get("tokens"), "tokens_out": entry["plan"].get("tokens_out"),
        "token_fraction": entry["plan"].get("token_fraction"),
        "pooled_cosine": q["after"], "retrieval_agreement": q.get("retrieval_agreement"),
        "halves_loss": q["halves"], "samples": q["samples"],
        "lowering_check": doc.get("verification", {}).get("forward"),
        "wall_s": round(time.perf_counter() - start, 1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--r", type=int, nargs="+", default=[2, 4, 8, 12, 16])
    ap.add_argument("--variant", action="append", default=[],
                    help="settings added to each r's compile, beside the plain one, e.g. "
                         "\"merge_tokens.proportional_attention=false\"")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for r in args.r:
        for settings in [(), *(tuple(v.split()) for v in args.variant)]:
            rows.append(compile_r(r, settings))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    result = {
        "what": "merge_tokens (ToMe) on minilm-l6: pooled-embedding cosine to the unmerged model and "
                "nearest-neighbour retrieval agreement, held-out split",
        "model": "minilm-l6",
        "definitions": {
            "pooled_cosine": "mean over held-out samples of cos(mean-pooled embedding, the unmerged model's)",
            "retrieval_agreement": "share of held-out samples whose nearest other sample (cosine of pooled "
                                   "embeddings) is the same as under the unmerged model",
        },
        "rows": rows,
    }
    print(write_result(args.out, result, device="cpu"))


if __name__ == "__main__":
    main()
