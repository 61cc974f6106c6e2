"""What a study found: the Pareto front of (latency, quality loss), the single-pass
fronts beside it, the best configuration under the quality limit, the measured
configurations that saved less than cost_model.PAYS_SHARE of what their removed work would save,
the cost model's accuracy on configurations it was not fitted on, and a plot.

Only measured latencies define the front and the best configuration: an estimate
ranks candidates, a measurement decides.
"""

from __future__ import annotations

from optuna.trial import TrialState

from optc.compiler.search.cost_model import accuracy, mark_against_dense


def _rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.user_attrs.get("copy_of") is not None:
            continue
        rows.append({
            "trial": t.number, "config": t.user_attrs.get("settings", {}),
            "config_hash": t.user_attrs.get("config_hash"), "latency_ms": t.values[0],
            "quality_loss": t.values[1], "latency_source": t.user_attrs.get("latency_source"),
            "estimate_ms": t.user_attrs.get("estimate_ms"), "passes": t.user_attrs.get("active_passes", []),
            "quality": t.user_attrs.get("quality"),
            "work": {k: v for k, v in (t.user_attrs.get("features") or {}).items() if k in ("bytes", "flops")},
        })
    return rows


def pareto(rows: list[dict]) -> list[dict]:
    """The rows no other row beats on both latency and quality loss, fastest first."""
    front = [r for r in rows if not any(
        o["latency_ms"] <= r["latency_ms"] and o["quality_loss"] <= r["quality_loss"]
        and (o["latency_ms"] < r["latency_ms"] or o["quality_loss"] < r["quality_loss"]) for o in rows)]
    return sorted(front, key=lambda r: r["latency_ms"])


def summarise(study, max_quality_loss: float) -> dict:
    rows = _rows(study)
    measured = [r for r in rows if r["latency_source"] == "measured"]
    # what the search may ship, fastest first: the next one is compiled when one fails its checks
    candidates = sorted((r for r in measured if r["quality_loss"] <= max_quality_loss), key=lambda r: r["latency_ms"])
    dense = next((r for r in measured if not r["passes"]), None)
    kind = (study.user_attrs.get("optc") or {}).get("workload", {}).get("kind")
    not_paying = mark_against_dense(measured, dense, "bytes" if kind == "decode" else "flops", "latency_ms")
    single = {}
    for name in sorted({p for r in measured for p in r["passes"]}):
        single[name] = pareto([r for r in measured if r["passes"] in ([name], [])])
    trials = study.get_trials(deepcopy=False)
    return {
        "n_trials": sum(1 for t in trials if t.state.is_finished()),
        "states": {s.name.lower(): sum(1 for t in trials if t.state == s) for s in TrialState
                   if any(t.state == s for t in trials)},
        "n_measured": len(measured),
        "n_estimated": len(rows) - len(measured),
        "pareto": pareto(measured),
        "measured": [[r["latency_ms"], r["quality_loss"]] for r in measured],
        "single_pass_fronts": single,
        "dense": dense,
        "best": candidates[0] if candidates else None,
        "candidates": candidates,
        "not_paying": [{k: r[k] for k in ("trial", "config", "latency_ms", "realised")} for r in not_paying],
        "cost_model": cost_model_accuracy(study),
        "inapplicable": [{"trial": t.number, "config": t.user_attrs.get("settings"),
                          "reason": t.user_attrs["inapplicable"]}
                         for t in trials if "inapplicable" in t.user_attrs],
        "failed": [{"trial": t.number, "config": t.user_attrs.get("settings"),
                    "error": t.user_attrs["error"].strip().splitlines()[-1]}
                   for t in trials if "error" in t.user_attrs],
    }


def cost_model_accuracy(study) -> dict:
    """Accuracy of the estimates made before each measurement: the model had been
    fitted only on the trials measured before it, never on the one it predicted."""
    pairs = [(t.user_attrs["estimate_ms"], t.values[0])
             for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
             if t.user_attrs.get("latency_source") == "measured" and "estimate_ms" in t.user_attrs
             and t.user_attrs.get("copy_of") is None]
    if len(pairs) < 3:
        return {"n": len(pairs), "note": "fewer than 3 measured trials"}
    return accuracy([p for p, _ in pairs], [m for _, m in pairs])


def plot(summary: dict, path, title: str) -> None:
    """Latency against quality loss: every measured trial, the joint front, each
    single-pass front, the dense model and the limit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = summary.get("measured", [])
    ax.scatter([q for _, q in points], [ms for ms, _ in points], s=14, color="lightgrey", label="measured trials")
    for name, front in summary["single_pass_fronts"].items():
        ax.plot([r["quality_loss"] for r in front], [r["latency_ms"] for r in front], "--o", ms=4,
                label=f"{name} alone", alpha=0.8)
    joint = summary["pareto"]
    ax.plot([r["quality_loss"] for r in joint], [r["latency_ms"] for r in joint], "-s", color="black",
            label="joint front")
    if summary["dense"]:
        ax.scatter([summary["dense"]["quality_loss"]], [summary["dense"]["latency_ms"]], marker="*", s=180,
                   color="red", zorder=5, label="dense")
    if summary.get("limit") is not None:
        ax.axvline(summary["limit"], color="grey", lw=1, ls=":", label="quality limit")
    ax.set_xlabel("quality loss on the held-out split")
    ax.set_ylabel("latency, ms (measured)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
