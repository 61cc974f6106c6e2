"""Regenerate the result tables from benchmarks/results/*.json: the search fronts, the
speed table (the README's GPU) and the quality table in README.md, the results history
in docs/results.md.

    python benchmarks/readme_table.py          # print the tables
    python benchmarks/readme_table.py --write  # replace them in README.md and docs/results.md

Every number comes from a result file; ratios are against the baselines measured in
the same run on the same device.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from results_history import RESULTS, ROOT, table, tables

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"  # in docs/results.md
SEARCH_BEGIN, SEARCH_END = "<!-- search:begin -->", "<!-- search:end -->"  # in README.md
SPEED_BEGIN, SPEED_END = "<!-- speed:begin -->", "<!-- speed:end -->"  # in README.md
QUALITY_BEGIN, QUALITY_END = "<!-- quality:begin -->", "<!-- quality:end -->"  # in README.md
README_SPEED_DEVICE = "H200"  # the GPU the README's speed table is measured on


def _workload(d: dict) -> str:
    decode = d["unit"].startswith("ms/token")
    workload = f"decode, batch {d['batch']}" if decode else f"forward, batch {d['batch']}" + (
        f", seq {d['seq']}" if d.get("seq") else "")
    return workload + "; optc " + ("max-autotune" if "max-autotune" in d.get("optc_lowering", "") else "without autotune")


def newest_bench_runs() -> list[tuple[Path, dict]]:
    """The complete bench runs on the README's GPU against torch.compile, the newest one
    per model and workload (for decode: per batch; older runs of the same workload, and
    runs against eager only, such as a second process timed for stability, are kept in
    benchmarks/results)."""
    newest: dict[tuple, tuple[Path, dict]] = {}
    for path in sorted(RESULTS.glob("bench_*.json")):
        d = json.loads(path.read_text())
        if README_SPEED_DEVICE not in (d.get("device") or "") or d.get("partial") \
                or d.get("baseline") not in ("inductor", "inductor-max"):
            continue
        # the decode step is lowered one way now (never autotuned): its newest run stands
        # for the workload whatever lowering older runs used
        decode = d["unit"].startswith("ms/token")
        key = (d["model"], _workload(d).split(";")[0] if decode else _workload(d))
        if key not in newest or d["date"] > newest[key][1]["date"]:
            newest[key] = (path, d)
    return [newest[k] for k in sorted(newest)]


def speed_table() -> str:
    """README: every optc row of the newest complete bench run per model and workload on
    the README's GPU, against dense optc and the fastest baseline of the same process,
    beside the work the row removed (bytes per decode step; FLOPs per forward) and the
    share of that work's ideal saving the row realised (runtime/bench.against_ideal)."""
    from optc.runtime.bench import against_ideal

    out = ["| model | workload | variant | ms | vs dense optc | vs baseline | work removed | result |",
           "|---|---|---|---|---|---|---|---|"]
    for path, d in newest_bench_runs():
        decode = d["unit"].startswith("ms/token")
        workload = _workload(d)
        key = "bytes" if decode else "flops"
        against_ideal(d["rows"], key)  # older files predate the fields: the same figures
        dense = next((r for r in d["rows"] if r["name"] == "optc"), None)
        for r in d["rows"]:
            if not r["name"].startswith("optc"):
                continue
            removed = "-"
            if dense and r is not dense and r.get("work") and dense.get("work"):
                removed = f"{100 * (1 - r['work'][key] / dense['work'][key]):.1f}% of {key}"
                if "realised" in r:  # the time saved against what that work would save
                    removed += f", {100 * r['realised']:.0f}% realised" if r["realised"] >= 0 else ", slower than dense"
            if dense and r.get("lowering_overrides") and r["config"]["hash"] == dense["config"]["hash"] \
                    and _repeats_target(d, r["lowering_overrides"]):
                removed = "the dense row compiled again (its words are the target's own settings)"
            vs_dense = f"{dense['median_ms'] / r['median_ms']:.2f}x" if dense and r is not dense else "-"
            vs_base = f"{r['ratio_vs_baseline']:.2f}x vs {d['baseline']}" if r.get("ratio_vs_baseline") else "-"
            out.append(f"| {d['model']} | {workload} | {r['name']} | {r['median_ms']:.3f} | {vs_dense} | {vs_base} "
                       f"| {removed} | `{path.name}` |")
    return "\n".join(out)


def _repeats_target(d: dict, words: list) -> bool:
    """Whether a row's lowering words only repeat its run's target settings (bench refuses
    such a row now; one older result file has one). Files from before bench recorded the
    target's lowering words are read with today's target definitions."""
    from optc.compiler import targets

    recorded = d.get("target_lowering")
    if recorded is not None:
        return set(words) <= set(recorded.split())
    try:
        target = targets.get(d["target"])
    except Exception:  # a target no longer defined: nothing to compare against
        return False
    return targets.changes_nothing(target, words)


def _newest_pruning_rows() -> list:
    """(path, result, row) of benchmarks/pruning_quality.py's rows, the newest run of each
    model, pass, ratio and configuration: a row's extra settings are resolved against
    today's defaults, so a run that set what is now the default and an older run of a
    default since changed give way to the newest run of the configuration a user gets."""
    from optc.compiler import pipeline
    from optc.compiler.config import parse_sets

    newest: dict = {}
    for path in sorted(RESULTS.glob("pruning_quality_*.json")):
        d = json.loads(path.read_text())  # a partial file holds the cases it finished
        for row in d["rows"]:
            settings = parse_sets(list(row.get("settings") or []))
            config = pipeline.resolve("default", {row["pass"]: {"ratio": row["ratio"], **settings.get(row["pass"], {})},
                                                  **{k: v for k, v in settings.items() if k != row["pass"]}})
            key = (d["model"], row["pass"], row["ratio"], json.dumps(config["passes"], sort_keys=True))
            if key not in newest or d["date"] > newest[key][1]["date"]:
                newest[key] = (path, d, row)
    return sorted(newest.values(), key=lambda r: (r[0].name, r[2]["pass"]))


def _newest_merge_runs() -> list:
    """(path, result) of benchmarks/merge_tokens_quality.py's plain runs, the newest per model
    (a rerun is a new file; runs with extra settings are named otherwise and not read)."""
    newest: dict = {}
    for path in sorted(RESULTS.glob("merge_tokens_*.json")):
        d = json.loads(path.read_text())
        if d["model"] not in newest or d["date"] > newest[d["model"]][1]["date"]:
            newest[d["model"]] = (path, d)
    return sorted(newest.values(), key=lambda r: r[0].name)


def quality_table() -> str:
    """README: the lossy passes' measured quality cost on held-out data (real weights)."""
    out = ["| model | pass | setting | metric | before | after | note | result |", "|---|---|---|---|---|---|---|---|"]
    for path, d, row in _newest_pruning_rows():
        ours, none = row["default"], row["repair_none"]
        extra = "".join(f"{x.split('.', 1)[1]}; " for x in row.get("settings") or []
                        if not x.split(".", 1)[1].startswith("repair="))  # the repair used is said next
        note = (f"{extra}repair {ours['repair_used']}; plain method {none['quality_after']:.4g}; "
                f"loss {100 * row['bar']['ratio_of_losses']:.0f}% of the plain method's")
        out.append(f"| {d['model']} | {row['pass']} | ratio {row['ratio']} | {ours['metric']} | "
                   f"{ours['quality_before']:.4g} | {ours['quality_after']:.4g} | {note} | `{path.name}` |")
    for path, d in _newest_merge_runs():
        for row in d["rows"]:
            out.append(f"| {d['model']} | merge_tokens | r={row['r']} ({row['tokens_out']} of "
                       f"{row['tokens_per_block'][0]} tokens left) | pooled cosine | 1 | {row['pooled_cosine']:.4f} | "
                       f"retrieval agreement {row['retrieval_agreement']:.2f} | `{path.name}` |")
    return "\n".join(out)


def _replace_between(path: Path, begin: str, end: str, text: str) -> None:
    head, rest = path.read_text().split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--write", action="store_true", help="replace the tables in docs/results.md and README.md")
    args = p.parse_args()
    history, search, speed, quality = tables(), table(), speed_table(), quality_table()
    if not args.write:
        print(search + "\n" + speed + "\n\n" + quality + "\n" + history)
        return
    _replace_between(ROOT / "docs" / "results.md", BEGIN, END, history)
    _replace_between(ROOT / "README.md", SEARCH_BEGIN, SEARCH_END, search)
    _replace_between(ROOT / "README.md", SPEED_BEGIN, SPEED_END, speed)
    _replace_between(ROOT / "README.md", QUALITY_BEGIN, QUALITY_END, quality)


if __name__ == "__main__":
    main()
