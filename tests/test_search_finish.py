"""What `optc search` does after its trials, on fakes (no model): which configuration it
ships when the fastest fails its lowering check, and the side-by-side timing of the
shipped configuration against dense."""

from types import SimpleNamespace

import optc.search as search_mod
from optc.errors import CompileError


def test_the_fastest_configuration_that_fails_its_lowering_check_is_not_shipped(monkeypatch, tmp_path):
    """Trials are timed without the lowering check every artifact passes; when the
    fastest candidate fails it, the next fastest ships, and the failure is reported."""
    def compile_best(session, row, out_dir, study_name, log):
        if row["trial"] == 2:
            raise CompileError("lowering changed the function")
        return {"artifact": str(out_dir / f"trial{row['trial']}.optc")}

    monkeypatch.setattr(search_mod, "_compile_best", compile_best)
    rows = [{"trial": 2, "latency_ms": 0.7}, {"trial": 4, "latency_ms": 0.8}, {"trial": 0, "latency_ms": 0.9}]
    shipped, not_shipped, failure = search_mod._ship_fastest(None, rows, tmp_path, "s", log=lambda m: None)
    assert shipped["trial"] == 4 and shipped["artifact"].endswith("trial4.optc") and failure is None
    assert [r["trial"] for r in not_shipped] == [2] and "lowering changed" in not_shipped[0]["error"]
    shipped, not_shipped, failure = search_mod._ship_fastest(None, rows[:1], tmp_path, "s", log=lambda m: None)
    assert shipped is None and isinstance(failure, CompileError) and "none of the 1" in str(failure)


class RecordingSession:
    def __init__(self):
        self.ran = []

    def resolve(self, settings):
        return {"settings": settings}

    def run(self, config, export_on_use=False):
        self.ran.append(config["settings"])
        return SimpleNamespace(settings=config["settings"])


def test_the_shipped_configuration_is_timed_again_beside_dense_in_alternating_rounds():
    session, order = RecordingSession(), []

    def confirm(compiled):  # what _confirmer returns: each program's round medians
        order.extend(c.settings for c in compiled)
        return [[0.8, 0.7, 0.75], [1.0, 0.9, 1.1]]

    shipped = {"config": {"prune_mlp": {"ratio": 0.1}}, "passes": ["prune_mlp"]}
    dense = {"config": {"prune_mlp": {"ratio": 0.0}}, "passes": []}
    out = search_mod.confirm_against_dense(session, shipped, dense, confirm, log=lambda m: None)
    assert order == [shipped["config"], dense["config"]]
    assert out["best_ms"] == 0.75 and out["dense_ms"] == 1.0 and abs(out["speedup_vs_dense"] - 1 / 0.75) < 1e-9
    assert out["round_medians_ms"] == {"best": [0.8, 0.7, 0.75], "dense": [1.0, 0.9, 1.1]}
    # nothing to confirm for the dense model itself, or with --confirm-rounds 0
    assert search_mod.confirm_against_dense(session, dense, dense, confirm, log=lambda m: None) is None
    assert search_mod.confirm_against_dense(session, shipped, dense, None, log=lambda m: None) is None


def test_the_confirmer_times_each_program_once_per_round_after_lowering_each_once(monkeypatch):
    import optc.runtime.measure as measure_mod

    calls = []

    def fake_measure(art, target, workload, inputs, autotune, log):
        name = art.manifest["name"]
        calls.append(("lower", name))
        ms = iter([1.0, 2.0, 3.0])

        def remeasure():
            calls.append(("time", name))
            return SimpleNamespace(median_ms=next(ms))

        return SimpleNamespace(remeasure=remeasure)

    monkeypatch.setattr(measure_mod, "measure", fake_measure)
    run = search_mod._confirmer("cpu", None, None, log=None, autotune=False, rounds=3)
    compiled = [SimpleNamespace(programs={}, manifest={"name": n}) for n in ("a", "b")]
    assert run(compiled) == [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]]
    assert calls[:2] == [("lower", "a"), ("lower", "b")]
    assert calls[2:] == [("time", "a"), ("time", "b")] * 3
    assert search_mod._confirmer("cpu", None, None, log=None, autotune=False, rounds=0) is None
