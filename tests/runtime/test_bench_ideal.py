"""A bench row that removed work is set against the ideal saving of that work
(runtime/bench.against_ideal): the share realised, and whether the pass pays."""

import pytest

from optc.compiler.search.cost_model import MIN_REMOVED, PAYS_SHARE, realised_share
from optc.runtime.bench import against_ideal, ideal_note


def _row(name, ms, nbytes):
    return {"name": name, "median_ms": ms, "work": {"bytes": nbytes, "flops": 0}}


def test_rows_are_set_against_the_dense_rows_ideal():
    rows = [{"name": "inductor-max", "median_ms": 1.4},
            _row("optc", 1.0, 1000), _row("optc skip", 0.82, 800), _row("optc prune", 0.97, 840),
            _row("optc slower", 1.1, 900), _row("optc target.x=true", 0.9, 1000)]
    against_ideal(rows, "bytes")
    by = {r["name"]: r for r in rows}
    assert by["optc skip"]["ideal_speedup"] == 1.25 and by["optc skip"]["realised"] == pytest.approx(0.9)
    assert by["optc skip"]["pays"] is True
    assert by["optc prune"]["realised"] == pytest.approx(0.03 / 0.16, rel=1e-3) and by["optc prune"]["pays"] is False
    assert by["optc slower"]["realised"] == pytest.approx(-1.0) and by["optc slower"]["pays"] is False
    for name in ("optc", "optc target.x=true", "inductor-max"):  # dense, no work removed, a baseline
        assert "realised" not in by[name]


def test_the_share_at_the_threshold_and_without_a_dense_row():
    assert realised_share(1.0, 1 - 0.2 * PAYS_SHARE, 100, 80) == pytest.approx(PAYS_SHARE)
    assert realised_share(1.0, 0.9, 100, 100) is None
    # A few activation bytes fewer (q/k/v merged into one GEMV: bench_llama1b_merge_combo_h100.json)
    # is a lowering variant, not a saving to realise.
    assert realised_share(1.282, 1.290, 2483347088, 2482887312) is None
    assert realised_share(1.0, 0.99, 1000, 1000 * (1 - MIN_REMOVED)) == pytest.approx(1.0)
    rows = [_row("optc skip", 0.8, 800)]
    against_ideal(rows, "bytes")
    assert "realised" not in rows[0]


def test_the_table_says_why_a_row_does_not_pay():
    rows = [_row("optc", 1.0, 1000), _row("optc skip", 0.82, 800), _row("optc prune", 0.97, 840),
            _row("optc slower", 1.1, 900)]
    against_ideal(rows, "bytes")
    notes = {r["name"]: ideal_note(r) for r in rows}
    assert notes["optc"] == ""
    assert notes["optc skip"] == "90% of 1.25x"
    assert notes["optc prune"] == f"19% of 1.19x: under the {100 * PAYS_SHARE:.0f}% that pays"
    assert notes["optc slower"] == "-100% of 1.11x: slower than dense optc"
