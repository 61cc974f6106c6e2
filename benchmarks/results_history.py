"""The tables of docs/results.md (the results history) and the search fronts, made from
benchmarks/results/*.json; benchmarks/readme_table.py writes them with the README's.
Every number comes from a result file; ratios are against the baselines measured in
the same run on the same device."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _source(d: dict, path: Path) -> str:
    """The closing part of a table's caption: the result file, and its note if any."""
    return f"`{path.relative_to(ROOT)}`)" + (f". {d['note']}." if d.get("note") else "")


def _result(name: str) -> tuple[Path, dict | None]:
    """A result file and its JSON (None when the file is not there)."""
    path = RESULTS / name
    return path, (json.loads(path.read_text()) if path.exists() else None)


def _row_at(rows: list, kind: str, k: int, n: int, s: float):
    """The row of `kind` for shape K->N at sparsity s, or None."""
    return next((r for r in rows if r["kind"] == kind and (r["K"], r["N"]) == (k, n)
                 and abs(r.get("sparsity", -1) - s) < 1e-6), None)


def _tokens(d: dict) -> str:
    """The tokens a decode result was timed over, as ", 64 tokens"; nothing for a forward result."""
    return f", {d['tokens']} tokens" if d.get("tokens") else ""


# Until this time a forward row's `target.FIELD=VALUE` words never reached its lowering
# (runtime/measure.py lowered the artifact's own target): such rows timed the default
# lowering again, whatever their name says.
FORWARD_TARGET_WORDS_SINCE = "2026-12-06T17:16"


def _unapplied(d: dict, row: dict) -> bool:
    """A forward row whose target words were not applied (FORWARD_TARGET_WORDS_SINCE)."""
    return bool(row.get("lowering_overrides")) and not d["unit"].startswith("ms/token") \
        and d["date"] < FORWARD_TARGET_WORDS_SINCE


def bench_tables() -> str:
    out = []
    for path in sorted(RESULTS.glob("bench_*.json")):
        d = json.loads(path.read_text())
        out.append(
            f"**{d['model']}** on {d['device']} ({d['unit']}{_tokens(d)}; "
            f"torch {d['torch']}, triton {d['triton']}, transformers {d['transformers']}; {d['date'][:10]}; "
            f"{_source(d, path)}\n"
        )
        out.append(f"| variant | median | p20 | p80 | vs {d['baseline'] or 'a baseline (none run)'} | vs dense optc |"
                   "\n|---|---|---|---|---|---|")
        dense = next((r["median_ms"] for r in d["rows"] if r["name"] == "optc"), None)
        for r in d["rows"]:
            ratio = f"{r['ratio_vs_baseline']:.2f}x" if r.get("ratio_vs_baseline") else "-"
            vs_dense = f"{dense / r['median_ms']:.2f}x" if dense and r["name"].startswith("optc ") else "-"
            name = r["name"] + (" (words not applied: the default lowering again)" if _unapplied(d, r) else "")
            out.append(f"| {name} | {r['median_ms']:.3f} | {r['p20_ms']:.3f} | {r['p80_ms']:.3f} | {ratio} "
                       f"| {vs_dense} |")
        out.append("")
    return "\n".join(out)


def cost_model_lines() -> list[str]:
    """The cost model's accuracy on measured configurations it was not fitted on."""
    out = []
    for path in sorted(RESULTS.glob("cost_model_accuracy_*.json")):
        d = json.loads(path.read_text())
        loo = d["leave_one_out"]
        cross = [f"{name}: Spearman {v['fitted_on_other_studies']['spearman']:.3f}, error "
                 f"{100 * v['fitted_on_other_studies']['mape']:.1f}%, "
                 f"{100 * v['fitted_on_other_studies']['within_10pct']:.0f}% within 10% "
                 f"({v['n']} configurations, fitted on the other {v['fitted_on_other_studies']['n_fit']})"
                 for name, v in d["studies"].items() if v.get("fitted_on_other_studies")]
        out.append(f"Cost model on {d['device_record']['device']}, {d['n']} measured configurations "
                   f"(`{path.relative_to(ROOT)}`): each predicted by a correction fitted on the others, "
                   f"Spearman {loo['spearman']:.3f}, error {100 * loo['mape']:.1f}%, "
                   f"{100 * loo['within_10pct']:.0f}% within 10%; uncorrected roofline "
                   f"{100 * d['roofline_only']['mape']:.1f}% error"
                   + ("; one study predicted from the other alone: " + "; ".join(cross) if cross else "") + ".\n")
    return out


def kernel_table() -> str:
    path, d = _result("kernels_sparse_linear_h100.json")
    if d is None:
        return ""
    rows = [r for r in d["rows"] if r.get("M") == 1]
    dense = {(r["K"], r["N"]): r for r in rows if r["kind"] == "dense_linear"}
    out = [
        f"**sparse_linear kernel, earlier tile** (before the sweep: 64x64, 4 warps, a separate reduce kernel), 1 token, bf16, on {d['device']} ({d['date'][:10]}; `{path.relative_to(ROOT)}`): "
        "µs per call, bandwidth on the bytes actually read, speed-up over cuBLAS dense\n",
        "| K->N | dense µs | s=0.25 | s=0.5 | s=0.7 |",
        "|---|---|---|---|---|",
    ]
    for (k, n), dr in sorted(dense.items()):
        cells = []
        for s in (0.25, 0.5, 0.7):
            r = _row_at(rows, "sparse_linear", k, n, s)
            cells.append(f"{r['us']:.1f} µs, {r['gbps'] / 1000:.2f} TB/s, {dr['us'] / r['us']:.2f}x" if r else "-")
        out.append(f"| {k}->{n} | {dr['us']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def sparsify_quality_table(path: Path) -> str:
    d = json.loads(path.read_text())
    out = [f"**{d['model']}** activation sparsity, held-out perplexity (dense "
           f"{d['rows'][0]['ppl_before']:.2f}; `{path.relative_to(ROOT)}`)\n",
           "| method | target | allocation | held-out sparsity | weight rows skipped | perplexity |",
           "|---|---|---|---|---|---|"]
    for r in d["rows"]:
        out.append(f"| {r['method']} | {r['sparsity']} | {r['allocation_used']} | {r['heldout_sparsity']:.3f} "
                   f"| {r['heldout_weights_skipped']:.3f} | {r['ppl_after']:.2f} |")
    return "\n".join(out) + "\n"


def gemv_table() -> str:
    path, d = _result("gemv_sweep_h100.json")
    if d is None:
        return ""
    rows = [r for r in d["rows"] if r["kind"] == "masked_best"]
    out = [f"**sparse_linear, one token, the tile optc uses** (masked, best of the sweep), bf16, on {d['device']} "
           f"({d['date'][:10]}; `{path.relative_to(ROOT)}`): µs per call (split-K sum included as an eager "
           "kernel), bandwidth on the bytes read, speed-up over cuBLAS dense\n",
           "| K->N | dense µs | s=0 | s=0.25 | s=0.5 | s=0.7 |", "|---|---|---|---|---|---|"]
    for k, n in dict.fromkeys((r["K"], r["N"]) for r in rows):
        cells = {r["sparsity"]: r for r in rows if (r["K"], r["N"]) == (k, n)}
        dense_us = next(iter(cells.values()))["dense_us"]
        out.append(f"| {k}->{n} | {dense_us:.1f} | " + " | ".join(
            f"{c['us']:.1f} µs, {c['gbps'] / 1000:.2f} TB/s, {dense_us / c['us']:.2f}x" for c in cells.values()) + " |")
    return "\n".join(out) + "\n"


def rows_read_table(path: Path) -> str:
    d = json.loads(path.read_text())
    out = [f"**{d['model']}** weight rows a sparse kernel must read for M tokens at once, real held-out "
           f"activations (in brackets: if tokens were independent, as in the kernel benchmark; "
           f"`{path.relative_to(ROOT)}`)\n",
           "| method | target | 1 token | 4 consecutive | 16 consecutive | 4 sequences | 16 sequences |",
           "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        rr, ind = r["rows_read"], r["rows_read_if_independent"]

        def cell(key, indep=None):  # a run with too few tokens or sequences lacks some keys
            text = f"{rr[key]:.3f}" if key in rr else "-"
            return f"{text} ({ind[indep]:.3f})" if indep and key in rr else text
        out.append(f"| {r['method']} | {r['sparsity']} | {cell('1')} | {cell('4_consecutive', '4')} "
                   f"| {cell('16_consecutive', '16')} | {cell('4_sequences')} | {cell('16_sequences')} |")
    return "\n".join(out) + "\n"


def quality_tables() -> str:
    out = []
    for path in sorted(RESULTS.glob("smollm2_*_cpu.json")):
        if "rows_read" in path.name:
            out.append(rows_read_table(path))
            continue
        if "sparsify" in path.name:
            out.append(sparsify_quality_table(path))
            continue
        d = json.loads(path.read_text())
        out.append(f"**{d['model']}** quality, held-out perplexity (`{path.relative_to(ROOT)}`)\n")
        out.append("| variant | removed | params | perplexity |\n|---|---|---|---|")
        for r in d["rows"]:
            removed = ", ".join(f"{i}.{p}" for i, p in r["removed"])
            out.append(f"| {r['variant']} | {removed} | {r['params_before'] / 1e6:.1f}M -> {r['params_after'] / 1e6:.1f}M "
                       f"| {r['ppl_before']:.2f} -> {r['ppl_after']:.2f} |")
        out.append("")
    return "\n".join(out)


def spread_tables() -> str:
    """experiments/compile_spread.py runs: every compile of every arm, timed round-robin in one process
    (a file may hold several such processes, run one after the other on one GPU)."""
    out = []
    for path in sorted(RESULTS.glob("spread_*.json")):
        d = json.loads(path.read_text())
        runs = d.get("processes") or [d]
        first = runs[0]
        where = f"{len(runs)} processes, one after the other on one GPU" if len(runs) > 1 else "one process"
        out.append(f"**{d['model']}** decode, each arm lowered {len(next(iter(first['arms'].values()))['compiles'])} "
                   f"time(s) cold and all timed round-robin in {where}, on {d['device']} (ms/token, "
                   f"{first['tokens']} tokens; torch {d['torch']}; {d['date'][:10]}; {_source(d, path)}\n")
        out.append("| process | arm | settings | compile | round medians | median |\n|---|---|---|---|---|---|")
        for proc, run in enumerate(runs, 1):
            for label, arm in run["arms"].items():
                settings = (" ".join(f"{p}.{k}={v}" for p, kv in arm["passes"].items() for k, v in kv.items())
                            or "the run's pipeline defaults")
                if arm.get("inductor") and "coordinate_descent_tuning" in arm["inductor"]:
                    settings += f"; coordinate descent {'on' if arm['inductor']['coordinate_descent_tuning'] else 'off'}"
                for i, c in enumerate(arm["compiles"]):
                    meds = c["round_medians_ms"]
                    out.append(f"| {proc} | {label} | {settings} | {i + 1} | {' '.join(f'{m:.3f}' for m in meds)} "
                               f"| {sorted(meds)[len(meds) // 2]:.3f} |")
        out.append("")
    return "\n".join(out)


def kernel_time_table() -> str:
    out = []
    for name in ("gemv_kernel_time_h100.json", "gemv_llama8b_shapes_h100.json"):
        path, d = _result(name)
        if d is not None:
            out.append(_kernel_time_table(path, d))
    return "\n".join(out)


def _kernel_time_table(path: Path, d: dict) -> str:
    rows = d["rows"]
    swept = any(r["kind"] == "masked_best" and r.get("kernels_us") for r in rows)
    out = [f"**Kernel device time, one token, s=0.5** (profiler time of each kernel, no launch gaps; optc's split-K "
           f"sum runs as a separate kernel here and is fused into its consumer in a compiled decode step), bf16, on "
           f"{d['device']} ({d['date'][:10]}; {_source(d, path)} Cells: µs per call; TB/s on the bytes read\n",
           "| K->N | cuBLAS dense | optc sparse_linear_kernel | + its sum and cast | ideal (cuBLAS, active rows only) "
           "| optc vs dense | optc vs ideal |" + (" best swept tile |" if swept else ""),
           "|---|---|---|---|---|---|---|" + ("---|" if swept else "")]
    for k, n in dict.fromkeys((r["K"], r["N"]) for r in rows if r["kind"] == "ideal"):
        dense = next(r for r in rows if r["kind"] == "dense_linear" and (r["K"], r["N"]) == (k, n))
        opt, ideal = _row_at(rows, "default", k, n, 0.5), _row_at(rows, "ideal", k, n, 0.5)
        dense_us, ideal_us = sum(dense["kernels_us"].values()), sum(ideal["kernels_us"].values())
        kern = opt["kernels_us"]["sparse_linear_kernel"]
        rest = sum(opt["kernels_us"].values()) - kern
        tbs = opt["rows_read_frac"] * k * n * 2 / kern / 1e6
        line = (f"| {k}->{n} | {dense_us:.1f} | {kern:.1f} ({tbs:.2f} TB/s) | {rest:.1f} | {ideal_us:.1f} "
                f"| {dense_us / kern:.2f}x | {ideal_us / kern:.2f}x |")
        best = _row_at(rows, "masked_best", k, n, 0.5)
        if swept and best and best.get("kernels_us"):
            c, b_us = best["config"], best["kernels_us"]["sparse_linear_kernel"]
            b_tbs = best["rows_read_frac"] * k * n * 2 / b_us / 1e6
            line += (f" {b_us:.1f} ({b_tbs:.2f} TB/s, {dense_us / b_us:.2f}x dense): {c['block_n']}x{c['block_k']}, "
                     f"{c['num_warps']} warps, split {c['split_k']} |")
        elif swept:
            line += " - |"
        out.append(line)
    return "\n".join(out) + "\n"


def ideal_table() -> str:
    path, d = _result("gemv_dot_h100.json")
    if d is None:
        return ""
    rows = d["rows"]
    out = [f"**One token at s=0.5: optc's masked tile, the tensor-core tile, and cuBLAS on only the active rows** "
           f"(`ideal`: what reading exactly the needed bytes costs through the best dense GEMV), bf16, on "
           f"{d['device']} ({d['date'][:10]}; `{path.relative_to(ROOT)}`): µs per call, speed-up over cuBLAS dense\n",
           "| K->N | dense µs | masked (optc) | tensor-core tile | ideal |", "|---|---|---|---|---|"]
    for k, n in dict.fromkeys((r["K"], r["N"]) for r in rows if r["kind"] == "ideal"):
        cells = []
        for kind in ("default", "dot_best", "ideal"):
            r = _row_at(rows, kind, k, n, 0.5)
            cells.append(f"{r['us']:.1f} µs, {r['dense_us'] / r['us']:.2f}x" if r else "-")
        out.append(f"| {k}->{n} | {_row_at(rows, 'ideal', k, n, 0.5)['dense_us']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _config(config: dict) -> str:
    parts = [f"{p}.{k}={v:g}" if isinstance(v, float) else f"{p}.{k}={v}"
             for p, values in config.items() for k, v in values.items()
             if not (k in ("sparsity", "count", "ratio", "r") and v == 0) and not (k == "allocation" and "sparsity" in values
                                                                        and values["sparsity"] == 0)]
    return " ".join(parts) or "dense"


def _real_weights(model: str) -> bool:
    from optc.models import zoo

    return model in zoo.names() and zoo.get(model).real_weights


def table(real_weights: bool = True) -> str:
    """Each model's latest search on each device: the README shows models with real
    weights (their quality losses mean something), docs/results.md the shape-only ones."""
    from optc.search_ship import lost_to_dense

    out = []
    latest: dict = {}  # (model, device) -> (date, path, result)
    for path in sorted(RESULTS.glob("search_*.json")):
        d = json.loads(path.read_text())
        if d["max_quality_loss"] > 1 or _real_weights(d["model"]) != real_weights:
            continue  # (a study run to label the cost model, not to choose: cost_model_lines() reports it)
        key = (d["model"], d["device"])
        if key not in latest or d["date"] > latest[key][0]:
            latest[key] = (d["date"], path, d)
    for _, path, d in sorted(latest.values(), key=lambda v: (v[2]["model"], v[2]["device"])):
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
            mark = ""
            if d.get("best") and r["trial"] == d["best"]["trial"]:
                mark = " (best under the limit)" if d["best"].get("artifact") else \
                    " (best under the limit; not compiled in this run)"
            out.append(f"| {r['latency_ms']:.3f} | {speed} | {r['quality_loss']:.4f} | {_config(r['config'])}{mark} |")
        confirmed = d.get("confirmed")
        if confirmed and "error" in confirmed:
            out.append(f"\nTiming the shipped configuration again beside dense failed: {confirmed['error'][:200]}")
        elif confirmed:
            out.append(f"\nShipped, `{Path(d['best']['artifact']).name}`, timed again beside dense in alternating "
                       f"rounds: {confirmed['best_ms']:.3f} ms against {confirmed['dense_ms']:.3f}, "
                       f"{confirmed['speedup_vs_dense']:.3f}x. {lost_to_dense(confirmed) or ''}".rstrip())
        out.append("")
    return "\n".join(out)


def tables() -> str:
    return ("\n".join(cost_model_lines()) + "\n" + table(real_weights=False) + "\n" + bench_tables() + "\n" + spread_tables() + "\n" + quality_tables() + "\n" + gemv_table() + "\n"
            + ideal_table() + "\n" + kernel_time_table() + "\n" + kernel_table())
