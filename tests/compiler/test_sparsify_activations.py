"""sparsify_activations: structure (masking in prefill, optc ops in decode, thresholds as
buffers), numerics (decode continues prefill exactly; zero thresholds = dense model),
calibration sparsity near the target, held-out report, re-export, bad settings."""

import json

import pytest
import torch

from optc.compiler import capture, pipeline
from optc.compiler.calibration import CalibrationContext
from optc.compiler.passes import sparsify_activations as sa
from optc.compiler.passes import sparsify_report as sreport
from optc.errors import CompileError, UsageError

aten = torch.ops.aten
METHODS = ["teal", "cats", "chess"]
_CACHE: dict = {}


def _ids(n, t, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, t), generator=g) for _ in range(n)]


def _inputs(ids):
    return [((), {"input_ids": x, "cache_position": torch.arange(x.shape[1])}) for x in ids]


def _run(captured, sets, task="causal-lm", calib=None):
    gms = {n: capture.graph_module(ep) for n, ep in captured.programs.items()}
    primary = "prefill" if "prefill" in gms else "forward"
    # merge_projections off: these tests count and place the ops this pass puts in.
    config = pipeline.resolve("default", {"sparsify_activations": sets, "merge_projections": {"enabled": False}})
    calib = calib if calib is not None else _inputs(_ids(2, 24, 5))
    report = pipeline.run(gms, primary, config, lambda gm: CalibrationContext(task, gm, calib), log=lambda m: None)
    return gms, next(e for e in report if e["name"] == "sparsify_activations")


def _cached(captured, method, allocation="uniform", sparsity=0.5, kernels="sparse"):
    # kernels="sparse": the tiny test model is far under the weight size at which "auto"
    # picks the sparse ops, and these tests are about the ops being placed right.
    key = (method, allocation, sparsity, kernels)
    if key not in _CACHE:
        _CACHE[key] = _run(captured, {"method": method, "sparsity": sparsity, "allocation": allocation,
                                      "kernels": kernels})
    return _CACHE[key]


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _continue_with_decode(gms, ids):
    """Logits of the last token: decode after a prefill of the others, and full prefill."""
    prefill, decode = gms["prefill"], gms["decode"]
    t = ids.shape[1]
    prefill(input_ids=ids[:, : t - 1], cache_position=torch.arange(t - 1))
    for name, buf in prefill.named_buffers():
        if "cache" in name and hasattr(decode, name):
            decode.get_buffer(name).copy_(buf)
    step = decode(input_ids=ids[:, t - 1 :], cache_position=torch.tensor([t - 1]))
    full = prefill(input_ids=ids, cache_position=torch.arange(t))
    return step[0, -1], full[0, -1]


@pytest.mark.parametrize("method", METHODS)
def test_structure(llama_captured, method):
    _, captured = llama_captured
    gms, entry = _cached(captured, method)
    assert entry["applied"]
    plan = entry["plan"]
    prefill, decode = gms["prefill"], gms["decode"]
    # Prefill: one masking `|x| > t` per unit, reading a threshold buffer; no optc op.
    keeps = [n for n in prefill.graph.nodes if n.target == aten.gt.Tensor and n.args[1].op == "get_attr"]
    assert sorted(k.args[1].target for k in keeps) == sorted(r["buffer"] for r in plan["units"])
    assert not [t for t in _targets(prefill) if "optc" in str(t)]
    # Decode: the optc ops replace the block linears they cover.
    ops = _targets(decode)
    n_blocks = 4
    if method == "teal":
        assert ops.count(torch.ops.optc.sparse_linear.default) == 7 * n_blocks
        assert ops.count(aten.linear.default) == 1  # the LM head only
    else:
        assert ops.count(torch.ops.optc.cats_gate_up.default) == n_blocks
        assert ops.count(aten.silu.default) == 0
    # Thresholds are buffers of both programs with the same values.
    for r in plan["units"]:
        assert torch.equal(prefill.get_buffer(r["buffer"]), decode.get_buffer(r["buffer"]))
    if method == "chess":
        r = next(r for r in plan["units"] if r["kind"] == "act")
        assert prefill.get_buffer(r["buffer"]).shape == (128,) and r["threshold"]["channels"] == 128
    # Decode reads W^T copies; the original weights of rewritten linears are gone.
    names = dict(decode.named_parameters())
    assert "model.model.layers.0.mlp.down_proj.weight_t" in names
    assert "model.model.layers.0.mlp.down_proj.weight" not in names


@pytest.mark.parametrize("kernels", ["auto", "dense"])
def test_small_weights_stay_dense(llama_captured, kernels):
    """kernels=auto keeps the tiny model's linears dense (under the measured size at
    which the sparse ops pay), kernels=dense always does: masks only, same thresholds."""
    _, captured = llama_captured
    gms, entry = _cached(captured, "teal", kernels=kernels)
    decode = gms["decode"]
    assert not [t for t in _targets(decode) if "optc" in str(t)]
    keeps = [n for n in decode.graph.nodes if n.target == aten.gt.Tensor and n.args[1].op == "get_attr"]
    assert len(keeps) == len(entry["plan"]["units"]) > 0


def test_auto_uses_sparse_ops_on_large_enough_weights(llama_captured, monkeypatch):
    """kernels=auto by weight size: with the H100 minimum set to the tiny model's MLP
    weights (64 x 128), the MLP units get the sparse ops and attention stays masked."""
    from optc.compiler.codegen.kernels import configs

    monkeypatch.setitem(configs.MIN_SPARSE_WEIGHT, "h100", 64 * 128)
    _, captured = llama_captured
    gms, _ = _run(captured, {"method": "teal", "sparsity": 0.5, "allocation": "uniform", "kernels": "auto"})
    ops = _targets(gms["decode"])
    assert ops.count(torch.ops.optc.sparse_linear.default) == 3 * 4  # gate, up, down of 4 blocks
    assert ops.count(aten.linear.default) == 4 * 4 + 1  # q, k, v, o of 4 blocks + the LM head


@pytest.mark.parametrize("method", METHODS)
def test_decode_continues_prefill(llama_captured, method):
    """The runtime prefills with one program and decodes with the other."""
    model, captured = llama_captured
    gms, _ = _cached(captured, method)
    ids = _ids(1, 14, 11)[0]
    step, full = _continue_with_decode(gms, ids)
    assert torch.allclose(step, full, atol=1e-4), (step - full).abs().max()
    dense = model(ids, use_cache=False).logits[0, -1]
    assert (full - dense).abs().max() > 1e-3  # the thresholds do change the model


@pytest.mark.parametrize("method", METHODS)
def test_zero_thresholds_equal_dense(llama_captured, method):
    model, captured = llama_captured
    gms, entry = _run(captured, {"method": method, "sparsity": 1e-4, "allocation": "uniform"})
    assert entry["applied"] and all(r["calibration_sparsity"] == 0 for r in entry["plan"]["units"])
    ids = _ids(1, 10, 3)[0]
    dense = model(ids, use_cache=False).logits
    out = gms["prefill"](input_ids=ids, cache_position=torch.arange(10))
    assert torch.allclose(out, dense, atol=1e-5)
    step, full = _continue_with_decode(gms, ids)
    assert torch.allclose(step, dense[0, -1], atol=1e-4)


@pytest.mark.parametrize("method,allocation", [(m, "uniform") for m in METHODS] + [("teal", "greedy"), ("chess", "greedy")])
def test_calibration_sparsity_near_target(llama_captured, method, allocation):
    _, captured = llama_captured
    _, entry = _cached(captured, method, allocation)
    plan = entry["plan"]
    assert abs(plan["calibration_sparsity"] - 0.5) < 0.05
    for r in plan["units"]:
        assert abs(r["calibration_sparsity"] - r["sparsity"]) < 0.05
    if allocation == "greedy":
        alloc = plan["allocation"]
        losses = alloc["calibration_loss"]
        assert alloc["used"] == min(losses, key=losses.get)
        if alloc["used"] == "greedy":
            assert len({r["sparsity"] for r in plan["units"]}) > 1


def test_chess_keeps_attention_selectively(llama_captured):
    _, captured = llama_captured
    _, entry = _cached(captured, "chess")
    att = entry["plan"]["attention"]
    assert 0 < len(att["kept"]) < len(att["error_proxy"])
    assert all(att["error_proxy"][k] <= att["mean"] for k in att["kept"])
    kinds = {r["kind"] for r in entry["plan"]["units"]}
    assert "act" in kinds and kinds <= {"act", "qkv", "o"}


@pytest.mark.parametrize("method", ["teal", "cats"])
def test_report_heldout_sparsity(llama_captured, method):
    _, captured = llama_captured
    gms, entry = _cached(captured, method)
    # 32 tokens: every 4-token group lies inside a 16-token group, so the unions must grow.
    rep = sreport.report_sparsity(gms["prefill"], entry["plan"], _inputs(_ids(3, 32, 99)))
    assert 0.3 < rep["sparsity"] < 0.7 and 0.3 < rep["weighted_sparsity"] < 0.7
    assert set(rep["units"]) == {r["key"] for r in entry["plan"]["units"]}
    assert rep["n_inputs"] == 3
    rr = rep["rows_read"]
    assert rr["1"] == pytest.approx(1 - rep["weighted_sparsity"], abs=1e-3)
    # More tokens at once read at least the rows one token reads; 3 sequences: no 4-sequence group.
    assert rr["1"] <= rr["4_consecutive"] <= rr["16_consecutive"] <= 1.0
    assert "4_sequences" not in rr
    assert sreport.report_sparsity(gms["decode"], entry["plan"], [])["sparsity"] is None


def test_union_of_active_channels_over_tokens():
    unions = sreport._Unions(1)
    # 4 channels, 16 tokens; in sequence s token t uses channel (t + s) % 4 only. Four such
    # sequences as a batch of 3 and a batch of 1, then one of another length (ignored for
    # the across-sequences union: its group never completes).
    keep = torch.zeros(4, 16, 4, dtype=torch.bool)
    for seq in range(4):
        keep[seq, torch.arange(16), (torch.arange(16) + seq) % 4] = True
    unions.add(0, keep[:3])
    unions.add(0, keep[3:])
    unions.add(0, keep[:1, :8])
    got = unions.summary([10])
    # 4 consecutive tokens touch every channel; position t of the 4 sequences too; the
    # 8-token sequence adds two 4-token groups (all channels), no 16-token group.
    assert got == {"4_consecutive": 1.0, "16_consecutive": 1.0, "4_sequences": 1.0}
    same = sreport._Unions(1)
    same.add(0, keep[:1].expand(4, 16, 4))  # 4 copies of one sequence: one channel per position
    assert same.summary([10])["4_sequences"] == 0.25
    # Three sequences of 16 tokens and one of 8 form no group of 4 same-length sequences.
    mixed = sreport._Unions(1)
    mixed.add(0, keep[:3])
    mixed.add(0, keep[3:, :8])
    assert "4_sequences" not in mixed.summary([10])


@pytest.mark.parametrize("method", ["teal", "chess"])
def test_reexport_runs_on_cpu(llama_captured, method):
    _, captured = llama_captured
    gms, entry = _cached(captured, method)
    for name in ("prefill", "decode"):
        ep = capture.reexport(gms[name], captured.example_inputs[name], captured.dynamic_shapes[name], what="t")
        assert all(r["buffer"] in ep.state_dict for r in entry["plan"]["units"])
        args, kwargs = captured.example_inputs[name]
        exported = ep.module()
        for mod in (exported, gms[name]):  # decode reads the cache: same (empty) cache in both
            for bname, buf in mod.named_buffers():
                if "cache" in bname:
                    buf.zero_()
        torch.manual_seed(0)
        kwargs = {**kwargs, "input_ids": torch.randint(0, 256, kwargs["input_ids"].shape)}
        assert torch.allclose(exported(*args, **kwargs), gms[name](*args, **kwargs), atol=1e-5)
        if name == "decode":
            assert torch.ops.optc.sparse_linear.default in _targets(ep.graph_module)


def test_plan_is_json_and_needs_its_vectors(llama_captured):
    _, captured = llama_captured
    _, entry = _cached(captured, "chess")
    text = json.dumps(entry["plan"])
    assert json.loads(text)["channel_thresholds"].startswith("sha256:")
    gm = capture.graph_module(captured.programs["decode"])
    from optc.compiler.anatomy import analyze

    cfg = sa.SparsifyActivationsConfig(method="chess", sparsity=0.5)
    with pytest.raises(CompileError, match="per-channel thresholds"):
        sa.sparsify_activations(gm, analyze(gm), cfg, json.loads(text))


def test_encoder_is_masked(bert_captured):
    model, captured = bert_captured
    args, _ = captured.example_inputs["forward"]
    calib = [((torch.randint(0, 256, (2, 12)), torch.ones(2, 12, dtype=torch.long)), {}) for _ in range(2)]
    gms, entry = _run(captured, {"method": "teal", "sparsity": 0.3, "allocation": "uniform"}, task="forward", calib=calib)
    assert entry["applied"] and entry["programs"]["forward"]["rewritten"] == {"masked": 4 * 3}
    out, ref = gms["forward"](*args), model(*args).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(out.flatten(0, 1), ref.flatten(0, 1)).mean()
    assert cos > 0.9 and (out - ref).abs().max() > 1e-3


def test_bad_settings_name_the_key():
    with pytest.raises(UsageError, match="sparsify_activations.sparsity"):
        pipeline.resolve("default", {"sparsify_activations": {"sparsity": 1.5}})
    with pytest.raises(UsageError, match="sparsify_activations.method"):
        pipeline.resolve("default", {"sparsify_activations": {"method": "foo", "sparsity": 0.5}})
    with pytest.raises(UsageError, match="sparsify_activations.allocation"):
        pipeline.resolve("default", {"sparsify_activations": {"allocation": "best"}})


def test_off_by_default(llama_captured):
    _, captured = llama_captured
    gms, entry = _run(captured, {"method": "cats"})
    assert not entry["applied"] and "not configured" in entry["reason"]
    assert not [t for t in _targets(gms["decode"]) if "optc" in str(t)]
    space = sa.SparsifyActivationsConfig().search_space()
    assert space["sparsity"].kind == "float" and set(space["method"].choices) == set(METHODS)
    assert not space["method"].holds({"sparsity": 0.0}) and space["method"].holds({"sparsity": 0.5})
