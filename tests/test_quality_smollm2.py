"""skip_layers on the real SmolLM2-135M: the quality cost is measured on the held-out
split and reported, and it behaves as removing blocks should."""

import math

import pytest

import optc
from optc.models import zoo


@pytest.mark.slow
def test_skip_layers_quality_reported_on_held_out_text():
    entry = zoo.get("smollm2-135m")
    model = entry.load()
    eval_batches = entry.evaluation_batches(4, 128)
    calib = entry.calibration_batches(2, 128)
    art = optc.compile(
        model, entry.example_inputs(seq_len=16), target="cpu", entry=entry, verify=False, evaluate=True,
        passes={"skip_layers.count": 2, "skip_layers.granularity": "block", "skip_layers.selection": "cosine"},
        calibration=calib, evaluation=eval_batches, log=lambda m: None,
    )
    q = art.manifest["quality"]
    assert q["metric"] == "perplexity" and q["split"] == "evaluation" and q["n"] == 4 * 127  # predicted tokens
    assert 8 < q["before"] < 40, q  # SmolLM2 on 128-token windows of pydoc text
    assert q["before"] < q["after"] < 4 * q["before"] and math.isfinite(q["after"]), q
    plan = art.manifest["passes"][0]["plan"]
    assert len(plan["units"]) == 2 and all(part == "block" for _, part in plan["units"])
    # Block 0 turns token embeddings into features every later block needs: the cosine
    # ranking never picks it on this model.
    assert [0, "block"] not in plan["units"]
    params = art.manifest["params"]
    assert params["after"] < params["before"] - 2 * 3_000_000
