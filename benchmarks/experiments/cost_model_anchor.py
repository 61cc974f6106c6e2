#!/usr/bin/env python
"""Would scaling the cost model's roofline by the first measured trials (the dense seed)
have estimated a study's later trials better? Replays the measured trials of journals whose
search started without a device history, in order, from the estimates the search recorded
(`estimate_ms`, the calibrated roofline until MIN_FIT trials were measured, then the
fitted model): unscaled is what the search estimated; scaled multiplies each estimate made
before MIN_FIT trials were measured by the geometric mean of measured / estimated over the
trials measured before it, as CostModel.fit now does. From MIN_FIT on both are the fit.

    python benchmarks/experiments/cost_model_anchor.py --out r.json STUDY.journal ...
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import optuna
from optuna.trial import TrialState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness.py
from harness import envelope, write_result  # noqa: E402

from optc.compiler.search.cost_model import MIN_FIT, accuracy  # noqa: E402


def measured(journal: str) -> list:
    """(recorded estimate, measured ms) of each measured trial, in trial order."""
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal))
    out = []
    for name in optuna.get_all_study_names(storage):
        trials = optuna.load_study(study_name=name, storage=storage).get_trials(states=(TrialState.COMPLETE,))
        out += [(t.user_attrs["estimate_ms"], t.values[0]) for t in sorted(trials, key=lambda t: t.number)
                if t.user_attrs.get("latency_source") == "measured" and t.user_attrs.get("copy_of") is None]
    return out


def replay(samples: list) -> dict:
    unscaled, scaled = [], []
    for i in range(1, len(samples)):
        estimate = samples[i][0]
        unscaled.append(estimate)
        if i < MIN_FIT:
            logs = [math.log(ms / est) for est, ms in samples[:i]]
            estimate *= math.exp(sum(logs) / len(logs))
        scaled.append(estimate)
    ms = [m for _, m in samples[1:]]
    return {"measured_trials": len(samples),
            "first_over_estimate": samples[0][1] / samples[0][0] if samples else None,
            "unscaled": accuracy(unscaled, ms), "scaled": accuracy(scaled, ms),
            "rows": [{"ms": m, "unscaled": u, "scaled": s} for m, u, s in zip(ms, unscaled, scaled)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("journals", nargs="+")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    studies = {}
    for journal in args.journals:
        studies[Path(journal).name] = r = replay(measured(journal))
        if not r["rows"]:
            print(f"{Path(journal).name}: fewer than two measured trials, nothing to replay")
            continue
        print(f"{Path(journal).name}: {r['measured_trials']} measured; the first at {r['first_over_estimate']:.2f} of "
              f"its estimate; the next {len(r['rows'])} off by {r['unscaled']['mape']:.1%} unscaled, "
              f"{r['scaled']['mape']:.1%} scaled")
    write_result(args.out, {"studies": studies}, envelope("cpu"))


if __name__ == "__main__":
    main()
