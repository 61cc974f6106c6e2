"""Put the measured trials of earlier search studies into a device's history (the
samples a new study's cost model starts fitted on), for a device whose record is given.

    python benchmarks/seed_device_history.py REC.json STUDY.journal [...]

The samples land beside the record (device_db.history_file), each with the study's
workload, lowering and model; trials whose study recorded no such signature are skipped.
A sample already there (same model, features and ms) is not added twice.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import optuna
from optuna.trial import TrialState

from optc.compiler.search import device_db


def study_samples(journal: str) -> list[dict]:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(journal))
    out = []
    for name in optuna.get_all_study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage)
        sig = study.user_attrs.get("optc", {})
        if "workload" not in sig or "lowering" not in sig:
            continue  # a study that does not say how its trials were lowered matches no search's
        for t in study.get_trials(states=(TrialState.COMPLETE,)):
            if t.user_attrs.get("latency_source") == "measured" and t.user_attrs.get("copy_of") is None:
                out.append({"workload": sig["workload"], "lowering": sig["lowering"],
                            "features": t.user_attrs["features"], "ms": t.values[0], "model": sig.get("model"),
                            "study": name})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("record", help="the device's calibration record (device_db JSON)")
    ap.add_argument("journals", nargs="+")
    args = ap.parse_args()
    record = json.loads(Path(args.record).read_text())
    path = device_db.history_file(record["key"])  # where the search reads this device's history
    seen = set()
    if path.exists():
        seen = {(s.get("model"), json.dumps(s["features"], sort_keys=True), s["ms"])
                for s in map(json.loads, path.read_text().splitlines())}
    added = 0
    with open(path, "a", encoding="utf-8") as f:
        for journal in args.journals:
            for s in study_samples(journal):
                key = (s["model"], json.dumps(s["features"], sort_keys=True), s["ms"])
                if key not in seen:
                    seen.add(key)
                    f.write(json.dumps(s, sort_keys=True) + "\n")
                    added += 1
    print(f"{added} samples added to {path}")


if __name__ == "__main__":
    main()
