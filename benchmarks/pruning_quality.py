"""Issue 13's quality bar for structured pruning, through the CLI, with the passes'
default settings against the same pass with no repair:

    python benchmarks/pruning_quality.py OUT.json [--model smollm2-135m] [--case prune_mlp=0.25 ...]
        [--set prune_heads.allocation=loss ...]

Each case compiles `optc compile MODEL --target cpu --set PASS.ratio=R --eval --json`
twice, with the defaults and with `--set PASS.repair=none`, from a scratch directory
(the CLI is run as the user runs it), and records held-out quality before and after,
parameters before and after, the kept widths (and whether each is a multiple of the
target's alignment), the plan's calibration losses and the compile time. The bar: the
quality loss of the defaults (perplexity increase; 1 - cosine for encoders) is at most
half that of the plain baseline (activation scores, uniform allocation, no repair;
`repair_none` in the rows) on the same held-out windows. `--set` adds settings to the
first compile only (optc's method against the same plain baseline); the row records them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import envelope, write_result


def compile_json(model: str, sets: list[str]) -> tuple[dict, list[str], float]:
    # No AOTInductor packages: they change no figure here (the held-out quality is the
    # prefill graph's) and cost minutes per compile on the CPU.
    argv = [sys.executable, "-m", "optc.cli", "compile", model, "--target", "cpu", "--eval", "--json",
            "--package", "none"]
    for s in sets:
        argv += ["--set", s]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        proc = subprocess.run(argv + ["-o", str(Path(tmp) / "a.optc")], cwd=tmp, capture_output=True, text=True)
        wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout), argv[3:], wall


def summary(result: dict, pass_name: str, argv: list[str], wall: float) -> dict:
    entry = next(p for p in result["passes"] if p["name"] == pass_name)
    plan = entry.get("plan") or {}
    q = result["quality"]
    align = result["config"]["passes"][pass_name]["align"]
    if pass_name == "prune_mlp":
        widths = plan.get("kept_channels", {})
    else:
        head_dim = {b["head_dim"] for b in plan.get("blocks", {}).values()}
        widths = {k: v * next(iter(head_dim)) for k, v in plan.get("kept_heads", {}).items()} if head_dim else {}
    return {
        "command": "optc " + " ".join(argv),
        "applied": entry["applied"],
        "quality_before": q["before"],
        "quality_after": q["after"],
        "metric": q["metric"],
        "quality_loss": q["after"] - q["before"] if q["metric"] == "perplexity" else 1.0 - q["after"],
        "held_out": {k: q.get(k) for k in ("windows", "tokens", "samples", "n")},
        "params_before": result["params"]["before"],
        "params_after": result["params"]["after"],
        "kept_widths": widths,
        "align": align,
        "widths_aligned": all(w % align == 0 for w in widths.values()),
        "repair_used": plan.get("repair"),
        "repair_note": plan.get("repair_note"),
        "calibration_loss": plan.get("calibration_loss"),
        "local_rel_err": plan.get("local_rel_err"),
        "pass_seconds": entry.get("seconds"),
        "compile_seconds": result["seconds"],
        "wall_seconds": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--case", action="append", help="PASS=RATIO (default: prune_mlp=0.25 and prune_heads=0.33)")
    ap.add_argument("--set", action="append", default=[], dest="sets",
                    help="PASS.KEY=V for the first compile of the cases of that pass (repeatable)")
    args = ap.parse_args()
    cases = args.case or ["prune_mlp=0.25", "prune_heads=0.33"]
    rows: list = []
    env = envelope("cpu")
    for case in cases:
        name, _, ratio = case.partition("=")
        runs = {}
        settings = [x for x in args.sets if x.startswith(f"{name}.")]
        # The plain baseline whatever the defaults: activation scores, uniform allocation, no repair.
        plain = [f"{name}.repair=none", f"{name}.allocation=uniform"]
        for label, extra in (("default", settings), ("repair_none", plain)):
            result, argv, wall = compile_json(args.model, [f"{name}.ratio={ratio}", *extra])
            runs[label] = summary(result, name, argv, wall)
            print(f"{args.model} {case} {label}: {runs[label]['metric']} {runs[label]['quality_before']:.4g} -> "
                  f"{runs[label]['quality_after']:.4g} ({runs[label]['repair_used']}), "
                  f"{runs[label]['compile_seconds']} s", flush=True)
        d, n = runs["default"]["quality_loss"], runs["repair_none"]["quality_loss"]
        rows.append({"pass": name, "ratio": float(ratio), "settings": settings, **runs,
                     "bar": {"default_loss": d, "none_loss": n, "ratio_of_losses": d / n if n else None,
                             "met": d <= 0.5 * n}})
        # A run cut short keeps the cases it finished.
        write_result(args.out, {"model": args.model, "rows": rows,
                                **({"partial": True} if len(rows) < len(cases) else {})}, env)


if __name__ == "__main__":
    main()
