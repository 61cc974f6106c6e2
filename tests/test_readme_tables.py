"""The README's result tables are exactly what benchmarks/readme_table.py makes of the
JSON files in benchmarks/results/ (so no number in the README is typed by hand)."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_are_generated_from_results():
    spec = importlib.util.spec_from_file_location("readme_table", ROOT / "benchmarks" / "readme_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (ROOT / "README.md").read_text()
    between = readme.split(mod.BEGIN, 1)[1].split(mod.END, 1)[0]
    assert between == f"\n{mod.tables()}\n", "README tables are stale: run python benchmarks/readme_table.py --write"
    for name in ("bench_llama1b_sparsify_h100.json", "smollm2_sparsify_cpu.json", "gemv_sweep_h100.json"):
        assert name in between
