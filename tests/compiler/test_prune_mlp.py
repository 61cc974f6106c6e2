"""prune_mlp: structure (narrower gate/up/down, aligned widths, parameter count),
numerics (equal to the eager model with the same channels zeroed; decode continues
prefill; re-export), repair (bias and lstsq lower the calibration error), encoders."""

import pytest
import torch

from optc.compiler import capture
from optc.compiler.anatomy import analyze
from optc.compiler.passes.prune_mlp import PruneMlpConfig
from optc.errors import UsageError
from pass_helpers import assert_prefill_matches, eager_logits, lm_calib, mask_input, run_pass


def _run(captured, sets, calib=None, task="causal-lm"):
    return run_pass(captured, "prune_mlp", sets, calib, task)


_lm_calib = lm_calib


def _mlp_widths(gm):
    return [(gm.get_parameter(b.mlp.gate.weight).shape[0], gm.get_parameter(b.mlp.up.weight).shape[0],
             gm.get_parameter(b.mlp.down.weight).shape[1]) for b in analyze(gm).blocks]


def test_ratio_zero_changes_nothing(llama_captured):
    _, captured = llama_captured
    gms, entry = _run(captured, {})
    assert not entry["applied"] and "not configured" in entry["reason"]
    assert _mlp_widths(gms["prefill"]) == [(128, 128, 128)] * 4


def test_half_pruned_matches_eager_with_channels_zeroed(llama_captured):
    model, captured = llama_captured
    gms, entry = _run(captured, {"ratio": 0.5, "align": 1, "repair": "none"}, calib=_lm_calib())
    assert entry["applied"]
    for name in ("prefill", "decode"):
        assert _mlp_widths(gms[name]) == [(64, 64, 64)] * 4
        before, after = entry["programs"][name]["before"]["params"], entry["programs"][name]["after"]["params"]
        assert before - after == 4 * 3 * 64 * 64 == entry["plan"]["params_removed"]
        # Shape metadata follows (the anatomy of later passes reads it).
        mlps = [b.mlp for b in analyze(gms[name]).blocks]
        assert all(m.down.in_features == m.up.out_features == 64 for m in mlps)
        assert all(m.act_node.meta["val"].shape[-1] == 64 for m in mlps)
    hooks = []
    for i, layer in enumerate(model.model.layers):
        mask = torch.zeros(128)
        mask[entry["plan"]["blocks"][str(i)]["kept"]] = 1
        hooks.append(mask_input(layer.mlp.down_proj, mask))
    ids = torch.randint(0, 256, (1, 15))
    assert_prefill_matches(gms, eager_logits(model, ids, hooks), ids)


@pytest.mark.parametrize("repair", ["bias", "lstsq"])
def test_decode_continues_prefill_and_reexport(llama_captured, repair, decode_after_prefill):
    _, captured = llama_captured
    gms, _ = _run(captured, {"ratio": 0.5, "align": 1, "repair": repair}, calib=_lm_calib())
    prefill = gms["prefill"]
    ids = torch.randint(0, 256, (1, 12))
    step, full = decode_after_prefill(gms, ids)
    assert torch.allclose(step[0, -1], full[0, -1], atol=1e-4)
    kwargs = {"input_ids": ids[:, :9], "cache_position": torch.arange(9)}
    for name, gm in gms.items():  # re-traced at the new widths
        ep = capture.reexport(gm, captured.example_inputs[name], captured.dynamic_shapes[name], what=name)
        assert ep.state_dict["model.model.layers.0.mlp.down_proj.weight"].shape == (64, 64)
        assert ep.state_dict["model.model.layers.0.mlp.down_proj.bias"].shape == (64,)
        if name == "prefill":
            assert torch.allclose(ep.module()(**kwargs), prefill(**kwargs), atol=1e-6)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_widths_are_multiples_of_align(llama_captured, allocation):
    _, captured = llama_captured
    gms, entry = _run(captured, {"ratio": 0.3, "align": 16, "allocation": allocation}, calib=_lm_calib())
    widths = [w for w, _, _ in _mlp_widths(gms["prefill"])]
    assert all(w % 16 == 0 and 16 <= w <= 128 for w in widths)
    assert _mlp_widths(gms["decode"]) == [(w, w, w) for w in widths]
    assert 0.55 <= sum(widths) / (4 * 128) <= 0.85
    for block in entry["plan"]["blocks"].values():
        assert block["kept"] == sorted(set(block["kept"]))


def test_align_can_leave_mlps_whole(llama_captured):
    _, captured = llama_captured
    _, entry = _run(captured, {"ratio": 0.2, "align": 64, "score": "weight", "repair": "none"})
    assert not entry["applied"] and "rounds to no channel" in entry["reason"]


def test_weight_score_without_repair_needs_no_data(llama_captured):
    _, captured = llama_captured
    gms, entry = _run(captured, {"ratio": 0.5, "align": 32, "score": "weight", "repair": "none"})
    assert entry["applied"] and _mlp_widths(gms["prefill"]) == [(64, 64, 64)] * 4
    with pytest.raises(UsageError, match="calibration data"):
        _run(captured, {"ratio": 0.5, "align": 32})


def test_repair_lowers_calibration_error(llama_captured):
    """On the calibration data, the output of each pruned program is closer to the
    dense model's with the bias repair than without, and closer still with lstsq."""
    _, captured = llama_captured
    calib = _lm_calib()
    dense = capture.graph_module(captured.programs["prefill"])
    errors = {}
    for repair in ("none", "bias", "lstsq"):
        gms, entry = _run(captured, {"ratio": 0.5, "align": 1, "repair": repair}, calib=calib)
        err = 0.0
        for _, kwargs in calib:
            ref, out = dense(**kwargs), gms["prefill"](**kwargs)
            err += ((out - ref).norm() / ref.norm()).item()
        errors[repair] = err
        # The plan measured the program it applies.
        ce = sum(torch.nn.functional.cross_entropy(gms["prefill"](**kw)[0, :-1], kw["input_ids"][0, 1:]).item()
                 for _, kw in calib) / len(calib)
        assert entry["plan"]["calibration_loss"][repair] == pytest.approx(ce, abs=1e-4)
    plan = entry["plan"]  # lstsq's plan measures the whole ladder
    assert plan["local_rel_err"]["lstsq"] < plan["local_rel_err"]["bias"] < plan["local_rel_err"]["none"]
    assert set(plan["calibration_loss"]) == {"dense", "none", "bias", "lstsq"}
    assert errors["lstsq"] < errors["bias"] < errors["none"], errors


@pytest.mark.parametrize("fixture", ["bert_captured", "vit_captured"])
def test_encoders_with_biases(request, fixture):
    model, captured = request.getfixturevalue(fixture)
    inputs = captured.example_inputs["forward"][0]
    gms, entry = _run(captured, {"ratio": 0.5, "align": 8}, calib=[(inputs, {})], task="forward")
    assert entry["applied"]
    gm = gms["forward"]
    for b in analyze(gm).blocks:
        assert gm.get_parameter(b.mlp.up.weight).shape == (64, 64) and gm.get_parameter(b.mlp.up.bias).shape == (64,)
        assert gm.get_parameter(b.mlp.down.weight).shape == (64, 64)
    # The mean is the best constant: the layer-local error always drops (end to end it
    # need not, on a tiny random model).
    assert entry["plan"]["local_rel_err"]["bias"] < entry["plan"]["local_rel_err"]["none"]
    dense = capture.graph_module(captured.programs["forward"])
    ref, out = _first(dense(*inputs)), _first(gm(*inputs))
    assert out.shape == ref.shape and torch.isfinite(out).all()
    ep = capture.reexport(gm, captured.example_inputs["forward"], captured.dynamic_shapes["forward"], what="f")
    assert torch.allclose(_first(ep.module()(*inputs)), out, atol=1e-5)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def test_search_space():
    space = PruneMlpConfig.search_space()
    assert space["ratio"].kind == "float" and (space["ratio"].low, space["ratio"].high) == (0.0, 0.5)
    assert space["allocation"].kind == "choice" and space["allocation"].when == ("ratio", ">", 0)
    assert "score" not in space and "repair" not in space  # weight scores wreck real LMs; repairs cost no latency
    assert not PruneMlpConfig().active() and PruneMlpConfig(ratio=0.1).active()
    assert not PruneMlpConfig(ratio=0.1, enabled=False).active()
