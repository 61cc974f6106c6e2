"""The result tables in README.md and docs/results.md are exactly what
benchmarks/readme_table.py makes of the JSON files in benchmarks/results/ (so no number
there is typed by hand)."""

import json
from pathlib import Path

import benchmark_scripts

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    return benchmark_scripts.load("readme_table")


def test_results_history_is_generated_from_results():
    mod = _generator()
    doc = (ROOT / "docs" / "results.md").read_text()
    between = doc.split(mod.BEGIN, 1)[1].split(mod.END, 1)[0]
    assert between == f"\n{mod.tables()}\n", "docs/results.md is stale: run python benchmarks/readme_table.py --write"
    for name in ("bench_llama1b_sparsify_h100.json", "smollm2_sparsify_cpu.json", "gemv_sweep_h100.json"):
        assert name in between


def test_readme_search_table_is_generated_from_results():
    mod = _generator()
    readme = (ROOT / "README.md").read_text()
    between = readme.split(mod.SEARCH_BEGIN, 1)[1].split(mod.SEARCH_END, 1)[0]
    assert between == f"\n{mod.table()}\n", "README is stale: run python benchmarks/readme_table.py --write"
    newest = max((json.loads(p.read_text())["date"], p.name)
                  for p in (ROOT / "benchmarks" / "results").glob("search_smollm2*_h200.json"))[1]
    assert newest in between  # each model's latest search
    # A shape-only model's search goes to the results history, not the user's README.
    assert "search_llama1b_costmodel_h200.json" not in between
    assert "search_llama1b_costmodel_h200.json" in (ROOT / "docs" / "results.md").read_text()


def test_readme_speed_and_quality_tables_are_generated_from_results():
    mod = _generator()
    readme = (ROOT / "README.md").read_text()
    for begin, end, make in ((mod.SPEED_BEGIN, mod.SPEED_END, mod.speed_table),
                             (mod.QUALITY_BEGIN, mod.QUALITY_END, mod.quality_table)):
        between = readme.split(begin, 1)[1].split(end, 1)[0]
        assert between == f"\n{make()}\n", "README is stale: run python benchmarks/readme_table.py --write"
        assert between.count("\n| ") >= 3  # a header and at least one measured row


def test_a_search_that_timed_its_shipped_configuration_again_shows_that_timing(tmp_path, monkeypatch):
    history = benchmark_scripts.load("results_history")
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    row = {"trial": 2, "config": {"prune_mlp": {"ratio": 0.1}}, "latency_ms": 0.73, "quality_loss": 0.03}
    result = {"model": "smollm2-135m", "max_quality_loss": 0.05, "date": "2026-12-05T12:00:00", "device": "GPU",
              "n_trials": 3, "n_measured": 3, "seconds": 10.0, "torch": "2.x", "cost_model": {},
              "dense": {"latency_ms": 0.8}, "pareto": [row],
              "best": {**row, "artifact": "/out/s-best-abc.optc"},
              "confirmed": {"best_ms": 0.76, "dense_ms": 0.771, "speedup_vs_dense": 0.771 / 0.76}}
    (results / "search_smollm2_x.json").write_text(json.dumps(result))
    monkeypatch.setattr(history, "RESULTS", results)
    monkeypatch.setattr(history, "ROOT", tmp_path)
    text = history.table()
    assert "| 0.730 | 1.10x | 0.0300 | prune_mlp.ratio=0.1 (best under the limit) |" in text
    assert "`s-best-abc.optc`" in text and "0.760 ms against 0.771, 1.014x" in text
    result["confirmed"] = {"error": "RuntimeError: out of memory"}
    (results / "search_smollm2_x.json").write_text(json.dumps(result))
    assert "again beside dense failed: RuntimeError: out of memory" in history.table()
    del result["confirmed"], result["best"]["artifact"]
    (results / "search_smollm2_x.json").write_text(json.dumps(result))
    text = history.table()
    assert "timed again" not in text and "(best under the limit; not compiled in this run)" in text


def test_forward_rows_whose_target_words_were_not_applied_say_so():
    history = benchmark_scripts.load("results_history")
    d = {"unit": "ms per forward", "date": "2026-12-06T14:34:32+00:00"}
    row = {"name": "optc target.merge_gemms=false", "lowering_overrides": ["merge_gemms=false"]}
    assert history._unapplied(d, row)
    assert not history._unapplied({**d, "date": "2026-12-06T17:18:58+00:00"}, row)  # measured since the fix
    assert not history._unapplied({**d, "unit": "ms/token (decode, prefill excluded)"}, row)  # decode always applied
    assert not history._unapplied(d, {"name": "optc"})
    doc = (ROOT / "docs" / "results.md").read_text()
    assert "| optc target.merge_gemms=false (words not applied: the default lowering again) | 0.647 |" in doc
