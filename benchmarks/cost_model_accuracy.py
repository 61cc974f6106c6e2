"""The cost model's accuracy on configurations it was not fitted on, from the measured
trials of search studies (their journals keep each trial's features and latency).

    python benchmarks/cost_model_accuracy.py OUT.json STUDY.journal[:NAME] [...] --device-record REC.json

Reported: leave-one-out (fit on all other measured trials, predict the one left out),
the calibrated roofline with no correction, per-study splits, and across studies (each
study predicted by a correction fitted on the other studies' trials only: a later
study of the same model and device, fitted on nothing of its own).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import optuna
from optuna.trial import TrialState

from harness import write_result
from optc.compiler.search.cost_model import CostModel, accuracy


def measured_samples(journal: str, name: str | None) -> list[tuple[dict, float]]:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal))
    name = name or optuna.get_all_study_names(storage)[0]
    study = optuna.load_study(study_name=name, storage=storage)
    return [(t.user_attrs["features"], t.values[0]) for t in study.get_trials(states=(TrialState.COMPLETE,))
            if t.user_attrs.get("latency_source") == "measured" and t.user_attrs.get("copy_of") is None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("studies", nargs="+", help="journal file, optionally :STUDY_NAME")
    ap.add_argument("--device-record", required=True, help="the device's calibration record (device_db JSON)")
    args = ap.parse_args()
    record = json.loads(Path(args.device_record).read_text())
    c = record["constants"]
    base = CostModel(c["bandwidth_gbs"], c["tflops"], c["launch_us"], source=f"calibrated {record['key']['device']}")
    per_study, everything, by_study = {}, [], {}
    for spec in args.studies:
        journal, _, name = spec.partition(":")
        samples = measured_samples(journal, name or None)
        by_study[Path(journal).name] = samples
        per_study[Path(journal).name] = {
            "n": len(samples),
            "roofline_only": accuracy([base.estimate_ms(f) for f, _ in samples], [ms for _, ms in samples]),
            "leave_one_out": base.leave_one_out(samples) if len(samples) >= 4 else None,
        }
        everything += samples
    for study, samples in by_study.items():
        others = [x for other, xs in by_study.items() if other != study for x in xs]
        if others:
            fitted = base.unfitted().fit(others)
            per_study[study]["fitted_on_other_studies"] = {
                **accuracy([fitted.estimate_ms(f) for f, _ in samples], [ms for _, ms in samples]),
                "n_fit": len(others)}
    result = {
        "device_record": record["key"],  # the measured device; the envelope's is where this analysis ran
        "constants": c,
        "n": len(everything),
        "roofline_only": accuracy([base.estimate_ms(f) for f, _ in everything], [ms for _, ms in everything]),
        "leave_one_out": base.leave_one_out(everything),
        "studies": per_study,
    }
    write_result(args.out, result, device="cpu")
    loo = result["leave_one_out"]
    print(f"{result['n']} measured configurations; leave-one-out: Spearman {loo['spearman']:.3f}, "
          f"error {100 * loo['mape']:.1f}%, {100 * loo['within_10pct']:.0f}% within 10%")


if __name__ == "__main__":
    main()
