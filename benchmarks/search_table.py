"""Regenerate the README's search table from benchmarks/results/search_*.json.

    python benchmarks/search_table.py          # print it
    python benchmarks/search_table.py --write  # replace it in README.md

Each file is the JSON `optc search --json` printed on the device; latencies on the front
are measured (never estimated), quality losses are on the held-out split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- search:begin -->", "<!-- search:end -->"


def _config(config: dict) -> str:
    parts = [f"{p}.{k}={v:g}" if isinstance(v, float) else f"{p}.{k}={v}"
             for p, values in config.items() for k, v in values.items()
             if not (k in ("sparsity", "count") and v == 0) and not (k == "allocation" and "sparsity" in values
                                                                        and values["sparsity"] == 0)]
    return " ".join(parts) or "dense"


def _real_weights(model: str) -> bool:
    from optc.models import zoo

    return model in zoo.names() and zoo.get(model).real_weights


def table() -> str:
    out = []
    for path in sorted(RESULTS.glob("search_*.json")):
        d = json.loads(path.read_text())
        acc = d.get("cost_model", {})
        acc_text = (f"cost model, each trial estimated before it was measured (fitted on earlier trials only), "
                    f"{acc['n']} trials: Spearman {acc['spearman']:.2f}, "
                    f"error {100 * acc['mape']:.1f}%, {100 * acc['within_10pct']:.0f}% within 10%"
                    if acc.get("spearman") is not None else "cost model: too few measured trials to judge")
        weights = "" if _real_weights(d["model"]) else ", random weights: its quality losses are a random model's"
        out.append(f"**{d['model']}**{weights} on {d['device']} ({d['n_trials']} trials, {d['n_measured']} measured, "
                   f"{d['seconds']:.0f} s; quality limit {d['max_quality_loss']}; torch {d['torch']}; "
                   f"{d['date'][:10]}; `{path.relative_to(ROOT)}`); {acc_text}\n")
        argv = d.get("argv") or []
        if argv:
            out.append("`optc " + " ".join(a for a in argv[1:] if a != "--json") + "`\n")
        dense = (d.get("dense") or {}).get("latency_ms")
        out.append("| latency ms | vs dense | quality loss | configuration |\n|---|---|---|---|")
        for r in d["pareto"]:
            speed = f"{dense / r['latency_ms']:.2f}x" if dense else "-"
            mark = " (best under the limit)" if d.get("best") and r["trial"] == d["best"]["trial"] else ""
            out.append(f"| {r['latency_ms']:.3f} | {speed} | {r['quality_loss']:.4f} | {_config(r['config'])}{mark} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    text = table()
    if not args.write:
        print(text)
        return
    readme = ROOT / "README.md"
    body = readme.read_text()
    start, end = body.index(BEGIN) + len(BEGIN), body.index(END)
    readme.write_text(body[:start] + "\n" + text + "\n" + body[end:])


if __name__ == "__main__":
    main()
