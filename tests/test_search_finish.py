"""What `optc search` does after its trials, on fakes (no model): which configuration it
ships when the fastest fails, and the side-by-side timing of the shipped configuration
against dense."""

import json
from types import SimpleNamespace

import pytest

import optc.search_ship as ship
from optc.errors import CaptureError, CompileError
from optc.runtime.timing import Timing


def test_the_fastest_configuration_that_fails_to_compile_is_not_shipped(monkeypatch, tmp_path):
    """Trials are timed without the lowering check every artifact passes (and export only
    what they time); when the fastest candidate fails, the next fastest ships, and each
    failure is reported with its kind."""

    packages = []

    def compile_best(session, row, out_dir, study_name, log, package):
        packages.append(package)
        if row["trial"] == 2:
            raise CompileError("lowering changed the function")
        if row["trial"] == 4:
            raise CaptureError("the prefill program did not export")
        return {"artifact": str(out_dir / f"trial{row['trial']}.optc")}, f"programs of trial {row['trial']}"

    monkeypatch.setattr(ship, "compile_best", compile_best)
    rows = [{"trial": 2, "latency_ms": 0.7}, {"trial": 4, "latency_ms": 0.75}, {"trial": 0, "latency_ms": 0.9}]
    shipped, compiled, not_shipped, failure = ship.ship_fastest(None, rows, tmp_path, "s", log=lambda m: None,
                                                                package="none")
    assert packages == ["none"] * 3  # --package reaches every compile of a candidate
    assert shipped["trial"] == 0 and shipped["artifact"].endswith("trial0.optc") and failure is None
    assert compiled == "programs of trial 0"  # kept for the side-by-side timing, not compiled again
    assert [r["trial"] for r in not_shipped] == [2, 4]
    assert not_shipped[0]["error"] == "CompileError: lowering changed the function"
    assert not_shipped[1]["error"].startswith("CaptureError")
    shipped, _, not_shipped, failure = ship.ship_fastest(None, rows[:1], tmp_path, "s", log=lambda m: None)
    assert shipped is None and isinstance(failure, CompileError) and "none of the 1" in str(failure)


class RecordingSession:
    def __init__(self, fail=False):
        self.ran, self.fail = [], fail

    def resolve(self, settings):
        return {"settings": settings}

    def run(self, config, export_on_use=False):
        if self.fail:
            raise RuntimeError("out of memory")
        self.ran.append(config["settings"])
        return SimpleNamespace(settings=config["settings"])


def _timing(median, rounds):
    return Timing(median, median, median, 3, info={"round_medians_ms": rounds})


def test_the_shipped_configuration_is_timed_again_beside_dense():
    session, order = RecordingSession(), []

    def confirm(compiled):
        order.extend(c.settings for c in compiled)
        return [_timing(0.75, [0.8, 0.7, 0.75]), _timing(1.0, [1.0, 0.9, 1.1])]

    row = {"config": {"prune_mlp": {"ratio": 0.1}}, "passes": ["prune_mlp"]}
    shipped = ship.Shipped(row, SimpleNamespace(settings=row["config"]), [], None)
    dense = {"config": {"prune_mlp": {"ratio": 0.0}}, "passes": []}
    out = ship.confirm_against_dense(session, shipped, dense, confirm, log=lambda m: None)
    assert order == [row["config"], dense["config"]]
    assert session.ran == [dense["config"]]  # the shipped programs are timed as compiled, not compiled again
    assert out["best_ms"] == 0.75 and out["dense_ms"] == 1.0 and out["speedup_vs_dense"] == pytest.approx(4 / 3)
    assert out["round_medians_ms"] == {"best": [0.8, 0.7, 0.75], "dense": [1.0, 0.9, 1.1]}
    # nothing to compare for the dense model itself, or with --confirm-rounds 0
    dense_shipped = ship.Shipped(dense, None, [], None)
    assert ship.confirm_against_dense(session, dense_shipped, dense, confirm, log=lambda m: None) is None
    assert ship.confirm_against_dense(session, shipped, dense, None, log=lambda m: None) is None
    # a failure is recorded, not raised: the artifact is saved by then
    failed = ship.confirm_against_dense(RecordingSession(fail=True), shipped, dense, confirm, log=lambda m: None)
    assert failed == {"error": "RuntimeError: out of memory"}


def test_side_by_side_lowers_each_program_once_then_times_them_round_robin(monkeypatch):
    import optc.runtime.measure as measure_mod

    calls = []

    def fake_measure(art, target, workload, inputs, autotune, log):
        name = art.manifest["name"]
        calls.append(("lower", name))
        later = iter([2.0, 3.0])

        def remeasure():
            calls.append(("time", name))
            ms = next(later)
            return Timing(ms, ms, ms, 2, info={"samples_ms": [ms, ms]})

        return SimpleNamespace(timing=Timing(1.0, 1.0, 1.0, 2, info={"samples_ms": [1.0, 1.0]}), remeasure=remeasure)

    monkeypatch.setattr(measure_mod, "measure", fake_measure)
    import optc.search as search_mod

    run = ship.side_by_side(search_mod._measurer("cpu", None, None, log=None, autotune=False), rounds=3)
    compiled = [SimpleNamespace(programs={}, manifest={"name": n}, extra_files={}) for n in ("a", "b")]
    a, b = run(compiled)
    assert calls == [("lower", "a"), ("lower", "b")] + [("time", "a"), ("time", "b")] * 2
    assert a.info["round_medians_ms"] == [1.0, 2.0, 3.0] and a.n == 6 and a.median_ms == 2.0
    assert ship.side_by_side(None, rounds=0) is None


def test_a_search_stopped_by_crashing_trials_writes_its_report_first(monkeypatch, tmp_path):
    """Three trials in a row that crash end the search (exit 1); what the study holds is
    reported first. Everything but the study, its storage and the report is a fake."""
    search_mod, study_mod = _fake_search(monkeypatch)

    def crashing_worker(*a, **k):
        raise CompileError("3 trials in a row failed; the last: RuntimeError: boom")

    monkeypatch.setattr(study_mod, "run_worker", crashing_worker)
    req = search_mod.SearchRequest(model="fake", target="cpu", trials=3, out_dir=str(tmp_path))
    with pytest.raises(CompileError, match="3 trials in a row failed"):
        search_mod.search(req, log=lambda m: None)
    report = json.loads((tmp_path / "fake-cpu.json").read_text())
    assert report["n_trials"] == 0 and report["best"] is None and report["confirmed"] is None


def test_a_stopped_search_reports_what_its_study_holds(monkeypatch, tmp_path):
    """Ctrl-C or SIGTERM during the trials: the report is written (nothing compiled), then
    the interrupt goes on up (the CLI exits 1)."""
    search_mod, study_mod = _fake_search(monkeypatch)

    def stopped_worker(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(study_mod, "run_worker", stopped_worker)
    said = []
    req = search_mod.SearchRequest(model="fake", target="cpu", trials=3, out_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        search_mod.search(req, log=said.append)
    report = json.loads((tmp_path / "fake-cpu.json").read_text())
    assert report["n_trials"] == 0 and report["best"] is None
    assert any("the same command resumes" in m for m in said)


def _fake_search(monkeypatch):
    """optc.search with everything but the study, its storage and the report faked (no
    model, space or cost model); returns (optc.search, its study module) to fake more."""
    import optc.compiler.search.space as space_mod
    import optc.compiler.search.study as study_mod
    import optc.search as search_mod

    session = SimpleNamespace(anatomy=None, model_name="fake", is_lm=True, task="causal-lm",
                              calibration_source=lambda: "none")
    monkeypatch.setattr(search_mod, "_session", lambda req, target, log: (session, None, None))
    monkeypatch.setattr(space_mod, "SearchSpace", lambda *a: SimpleNamespace(
        params={}, signature=lambda: {"fake": True}))
    monkeypatch.setattr(search_mod, "_workload", lambda *a: SimpleNamespace(to_dict=lambda: {"kind": "decode"}))
    monkeypatch.setattr(study_mod, "enqueue_seeds", lambda study, space: None)
    monkeypatch.setattr(search_mod, "_cost_model", lambda *a: SimpleNamespace(source="fake", history=[]))
    return search_mod, study_mod


def test_a_stopped_multi_worker_search_stops_its_workers_then_reports(monkeypatch, tmp_path):
    """--workers N stopped while its workers run: each worker is told to stop (SIGTERM,
    which fails its running trial for a retry), then the study is reported, nothing shipped."""
    import optc.search as search_mod
    from optc.compiler import targets

    class Worker:
        def __init__(self, argv, env):
            self.stopped, self.waits = False, 0

        def wait(self):
            self.waits += 1
            if not self.stopped:
                raise KeyboardInterrupt  # the parent is stopped while it waits
            return 1

        def terminate(self):
            self.stopped = True

    workers, reports = [], []
    monkeypatch.setattr(search_mod.subprocess, "Popen", lambda argv, env: workers.append(Worker(argv, env)) or
                        workers[-1])
    monkeypatch.setattr(search_mod, "search", lambda req, log: reports.append(req))
    req = search_mod.SearchRequest(model="tiny-llama", target="cpu", trials=4, workers=2, out_dir=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        search_mod._run_workers(req, targets.get("cpu"), "s", log=lambda m: None)
    assert len(workers) == 2 and all(w.stopped and w.waits >= 1 for w in workers)
    assert len(reports) == 1 and reports[0].trials == 0 and not reports[0].compile_best
    assert reports[0].confirm_rounds == 0 and reports[0].study == "s"


def test_the_report_says_when_the_shipped_configuration_lost_to_dense_side_by_side():
    from pathlib import Path

    import optc.search as search_mod

    results = Path(__file__).parents[1] / "benchmarks" / "results"
    for name, lost in (("search_smollm2_shipped_h200.json", True), ("search_smollm2_cpu.json", False)):
        result = json.loads((results / name).read_text())
        lines = []
        search_mod._print(result, lines.append)
        said = any("not faster than dense side by side" in line for line in lines)
        assert said == lost == (result["confirmed"]["speedup_vs_dense"] <= 1.0), name
