"""prune_heads: structure (narrower q/k/v/o, KV caches, head counts the anatomy reads,
parameter counts), numerics (equal to the eager model with the same heads' outputs
zeroed; decode continues prefill; re-export; generation from a saved artifact), q/k/v
biases (Qwen2), a fused q/k/v projection (Phi-3), encoders, refusals."""

import json

import pytest
import torch
import transformers

import optc
from optc.compiler import capture, pipeline
from optc.compiler.calibration import CalibrationContext
from optc.compiler.anatomy import analyze
from optc.compiler.passes.prune_heads import PruneHeadsConfig, prune
from optc.errors import CompileError, UsageError
from pass_helpers import eager_logits, lm_calib, mask_input, run_pass

SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
ARCHS = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),  # q/k/v biases
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {"pad_token_id": 0}),  # fused q/k/v
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, {}),  # q/k norms over all heads
}


def _lm(arch):
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    return model_cls(config_cls(**SIZES, **extra)).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def captured_lms():
    """Tiny decoders of other architectures, captured once for the module."""
    out = {}
    for arch in ("qwen2", "phi3"):
        model = _lm(arch)
        out[arch] = model, capture.capture(model, (torch.zeros(1, 8, dtype=torch.long),), max_cache_len=64)
    return out


def _run(captured, sets, calib=None, task="causal-lm", **others):
    return run_pass(captured, "prune_heads", sets, calib, task, **others)


_lm_calib = lm_calib


def _heads(gm):
    return [(b.attention.num_heads, b.attention.num_kv_heads) for b in analyze(gm).blocks]


def _cache_shapes(gm):
    return {name: tuple(t.shape) for name, t in gm.named_buffers() if "key_cache" in name or "value_cache" in name}


def _eager_with_heads_zeroed(model, o_projs, plan, ids):
    """The eager model's logits with the removed heads' outputs zeroed at o_proj's input."""
    hooks = []
    for i, o_proj in enumerate(o_projs):
        mask = torch.zeros(o_proj.in_features)
        for h in plan["blocks"][str(i)]["kept_heads"]:
            mask[h * 16:(h + 1) * 16] = 1
        hooks.append(mask_input(o_proj, mask))
    return eager_logits(model, ids, hooks)


def test_ratio_zero_changes_nothing(llama_captured):
    _, captured = llama_captured
    gms, entry = _run(captured, {})
    assert not entry["applied"] and "not configured" in entry["reason"]
    assert _heads(gms["decode"]) == [(4, 2)] * 4
    assert set(_cache_shapes(gms["decode"]).values()) == {(1, 2, 64, 16)}


@pytest.mark.parametrize("granularity,heads,kv_rows", [("group", (2, 1), 16), ("head", (2, 2), 32)])
def test_llama_matches_eager_with_heads_zeroed(llama_captured, granularity, heads, kv_rows):
    model, captured = llama_captured
    sets = {"ratio": 0.5, "align": 1, "repair": "none", "granularity": granularity}
    gms, entry = _run(captured, sets, calib=_lm_calib())
    assert entry["applied"]
    for name in ("prefill", "decode"):
        gm = gms[name]
        assert _heads(gm) == [heads] * 4
        attn = "model.model.layers.0.self_attn"
        assert gm.get_parameter(f"{attn}.q_proj.weight").shape == (32, 64)
        assert gm.get_parameter(f"{attn}.k_proj.weight").shape == (kv_rows, 64)
        assert gm.get_parameter(f"{attn}.o_proj.weight").shape == (64, 32)
        # The cache keeps the KV heads that remain, under its own names.
        assert set(_cache_shapes(gm).values()) == {(1, kv_rows // 16, 64, 16)}
        before, after = entry["programs"][name]["before"]["params"], entry["programs"][name]["after"]["params"]
        assert before - after == entry["plan"]["params_removed"]
    ids = torch.randint(0, 256, (1, 15))
    ref = _eager_with_heads_zeroed(model, [ly.self_attn.o_proj for ly in model.model.layers], entry["plan"], ids)
    out = gms["prefill"](input_ids=ids, cache_position=torch.arange(15))
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()


@pytest.mark.parametrize("granularity", ["group", "head"])
def test_decode_continues_prefill_and_reexport(llama_captured, granularity, decode_after_prefill):
    _, captured = llama_captured
    gms, entry = _run(captured, {"ratio": 0.5, "align": 1, "granularity": granularity}, calib=_lm_calib())
    assert entry["plan"]["local_rel_err"]["bias"] < entry["plan"]["local_rel_err"]["none"]
    ids = torch.randint(0, 256, (1, 12))
    step, full = decode_after_prefill(gms, ids)
    assert torch.allclose(step[0, -1], full[0, -1], atol=1e-4)
    kwargs = {"input_ids": ids[:, :9], "cache_position": torch.arange(9)}
    kv = 1 if granularity == "group" else 2
    for name, gm in gms.items():  # re-traced at the new head counts
        ep = capture.reexport(gm, captured.example_inputs[name], captured.dynamic_shapes[name], what=name)
        assert ep.state_dict["model.model.layers.0.self_attn.o_proj.bias"].shape == (64,)  # the repair
        assert ep.constants["key_cache_0"].shape == (1, kv, 64, 16)
        if name == "prefill":
            assert torch.allclose(ep.module()(**kwargs), gms["prefill"](**kwargs), atol=1e-6)


def test_artifact_generates_over_the_narrow_cache(tmp_path, make_tiny_llama):
    """Through optc.compile, save and load: the runtime ties prefill and decode to one
    narrower cache, and greedy generation equals re-running the pruned prefill."""
    g = torch.Generator().manual_seed(3)
    calib = [(torch.randint(0, 256, (1, 24), generator=g),) for _ in range(2)]
    art = optc.compile(make_tiny_llama(layers=2), (torch.zeros(1, 8, dtype=torch.long),), target="cpu", verify=False,
                       max_cache_len=32, calibration=calib, log=lambda m: None,
                       passes={"prune_heads.ratio": 0.5, "prune_heads.align": 16})
    entry = next(p for p in art.manifest["passes"] if p["name"] == "prune_heads")
    assert entry["applied"] and art.manifest["params"]["after"] < art.manifest["params"]["before"]
    loaded = optc.load(art.save(tmp_path / "heads.optc"))
    assert loaded.programs["decode"].constants["value_cache_1"].shape == (1, 1, 32, 16)
    prompt = torch.randint(0, 256, (1, 6), generator=g)
    out = loaded.generate(prompt, 5, compiled=False)
    reference = capture.graph_module(loaded.programs["prefill"])  # its own cache
    seq = prompt
    for _ in range(5):
        logits = reference(input_ids=seq, cache_position=torch.arange(seq.shape[1]))
        seq = torch.cat([seq, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out.flatten()[-5:], seq.flatten()[-5:])


@pytest.mark.parametrize("arch,rows", [("qwen2", {"q_proj": 32, "k_proj": 16, "v_proj": 16}),
                                       ("phi3", {"qkv_proj": 64})])
def test_biases_and_fused_qkv(captured_lms, arch, rows, decode_after_prefill):
    model, captured = captured_lms[arch]
    gms, entry = _run(captured, {"ratio": 0.5, "align": 1, "repair": "none"}, calib=_lm_calib())
    assert entry["applied"]
    for gm in gms.values():
        attn = "model.model.layers.1.self_attn"
        for proj, n in rows.items():
            assert gm.get_parameter(f"{attn}.{proj}.weight").shape == (n, 64)
            if arch == "qwen2":
                assert gm.get_parameter(f"{attn}.{proj}.bias").shape == (n,)
        assert _heads(gm) == [(2, 1)] * 2
        att = analyze(gm).blocks[0].attention
        assert att.fused_qkv == (arch == "phi3")
    ids = torch.randint(0, 256, (1, 11))
    ref = _eager_with_heads_zeroed(model, [ly.self_attn.o_proj for ly in model.model.layers], entry["plan"], ids)
    out = gms["prefill"](input_ids=ids, cache_position=torch.arange(11))
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    step, full = decode_after_prefill(gms, ids)
    assert torch.allclose(step[0, -1], full[0, -1], atol=1e-4)


def test_with_prune_mlp(llama_captured, decode_after_prefill):
    _, captured = llama_captured
    gms, entry = _run(captured, {"ratio": 0.5, "align": 16}, calib=_lm_calib(), prune_mlp={"ratio": 0.5, "align": 16})
    assert entry["applied"]
    for gm in gms.values():
        blocks = analyze(gm).blocks
        assert [(b.attention.num_heads, b.attention.num_kv_heads, b.mlp.up.out_features) for b in blocks] == \
            [(2, 1, 64)] * 4
    step, full = decode_after_prefill(gms, torch.randint(0, 256, (1, 10)))
    assert torch.allclose(step[0, -1], full[0, -1], atol=1e-4) and torch.isfinite(full).all()


def test_after_skip_layers_removed_an_attention(llama_captured, decode_after_prefill):
    """The attentions that remain are pruned; skip_layers dropped the get_attr nodes of
    the cache buffers, which still alias what the graph writes and must follow."""
    _, captured = llama_captured
    gms, entry = _run(captured, {"ratio": 0.5, "align": 1}, calib=_lm_calib(),
                      skip_layers={"layers": [1], "granularity": "attention"})
    assert entry["applied"] and set(entry["plan"]["blocks"]) == {"0", "2", "3"}
    blocks = analyze(gms["decode"]).blocks
    assert blocks[1].attention is None and blocks[2].attention.num_kv_heads == 1
    assert _cache_shapes(gms["decode"])["key_cache_2"] == (1, 1, 64, 16)
    step, full = decode_after_prefill(gms, torch.randint(0, 256, (1, 10)))
    assert torch.allclose(step[0, -1], full[0, -1], atol=1e-4)


@pytest.mark.parametrize("fixture", ["bert_captured", "vit_captured"])
def test_encoders(request, fixture):
    _, captured = request.getfixturevalue(fixture)
    inputs = captured.example_inputs["forward"][0]
    gms, entry = _run(captured, {"ratio": 0.5, "align": 8, "allocation": "global"}, calib=[(inputs, {})],
                      task="forward")
    assert entry["applied"]
    gm = gms["forward"]
    kept = entry["plan"]["kept_heads"]
    assert sum(kept.values()) == 6 and min(kept.values()) >= 1  # global: layers keep different counts
    for b, heads in zip(analyze(gm).blocks, kept.values()):
        assert b.attention.num_heads == b.attention.num_kv_heads == heads
        assert gm.get_parameter(b.attention.v.bias).shape == (heads * 16,)
        assert gm.get_parameter(b.attention.o.weight).shape == (64, heads * 16)
    dense = capture.graph_module(captured.programs["forward"])
    ref, out = _first(dense(*inputs)), _first(gm(*inputs))
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.5
    ep = capture.reexport(gm, captured.example_inputs["forward"], captured.dynamic_shapes["forward"], what="f")
    assert torch.allclose(_first(ep.module()(*inputs)), out, atol=1e-5)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def test_global_allocation_leaves_some_layers_whole(llama_captured, decode_after_prefill):
    _, captured = llama_captured
    gms, entry = _run(captured, {"ratio": 0.25, "align": 1, "allocation": "global"}, calib=_lm_calib())
    kept = entry["plan"]["kept_heads"]
    assert sum(kept.values()) == 12 and max(kept.values()) == 4  # two of eight KV groups, wherever they are
    assert [h for h, _ in _heads(gms["decode"])] == list(kept.values())
    assert set(entry["plan"]["calibration_loss"]) == {"dense", "none", "bias", "lstsq"}  # the default repair's ladder
    step, full = decode_after_prefill(gms, torch.randint(0, 256, (1, 10)))
    assert torch.allclose(step[0, -1], full[0, -1], atol=1e-4)


def test_alignment_and_weight_score_without_data(llama_captured):
    _, captured = llama_captured
    # Kept widths (heads x 16) are multiples of 32: a whole KV group.
    weights_only = {"score": "weight", "repair": "none", "allocation": "uniform"}
    gms, entry = _run(captured, {"ratio": 0.3, "align": 32, **weights_only})
    assert entry["applied"] and "calibration_loss" not in entry["plan"]
    assert all(h * 16 % 32 == 0 for h, _ in _heads(gms["decode"]))
    _, entry = _run(captured, {"ratio": 0.3, "align": 128, **weights_only})
    assert not entry["applied"] and "rounds to no head" in entry["reason"]
    # The default allocation measures calibration loss: without data it says so.
    with pytest.raises(UsageError, match="allocation=uniform"):
        _run(captured, {"ratio": 0.3, "align": 32, "score": "weight", "repair": "none"})


def test_refuses_heads_coupled_through_a_norm():
    """Olmo-2 normalises q and k over all heads at once: removing heads would change the
    norm of the rest, so the pass refuses (naming the op) and changes nothing."""
    model = _lm("olmo2")
    captured = capture.capture(model, (torch.zeros(1, 8, dtype=torch.long),), max_cache_len=32)
    gms, entry = _run(captured, {"ratio": 0.5, "align": 1, "score": "weight", "repair": "none"})
    assert not entry["applied"] and "reduces over the heads" in entry["reason"]
    assert all(p["before"] == p["after"] for p in entry["programs"].values())


def test_search_space():
    space = PruneHeadsConfig.search_space()
    assert space["ratio"].kind == "float" and (space["ratio"].low, space["ratio"].high) == (0.0, 0.5)
    assert space["allocation"].kind == "choice" and space["allocation"].when == ("ratio", ">", 0)
    assert "score" not in space and "repair" not in space  # weight scores wreck real LMs; repairs cost no latency
    assert not PruneHeadsConfig().active() and PruneHeadsConfig(ratio=0.1).active()
    steps = [s.name for s in pipeline.PIPELINES["default"]]
    assert steps.index("prune_heads") == steps.index("prune_mlp") + 1


def test_lstsq_repair_lowers_the_calibration_error(llama_captured, decode_after_prefill):
    """The refit of o_proj's kept columns reproduces o's full output on the calibration
    activations better than the bias alone, which beats no repair; the refit weights
    reach both programs (decode continues prefill) and the re-export, not the JSON plan."""
    _, captured = llama_captured
    calib = _lm_calib(n=8, t=32)  # on fewer random tokens the loss (near ln 256) prefers bias
    dense = capture.graph_module(captured.programs["prefill"])
    errors = {}
    for repair in ("none", "bias", "lstsq"):
        gms, entry = _run(captured, {"ratio": 0.5, "align": 1, "repair": repair, "calibration_samples": 8},
                          calib=calib)
        errors[repair] = sum(((gms["prefill"](**kw) - dense(**kw)).norm() / dense(**kw).norm()).item()
                             for _, kw in calib)
    plan = entry["plan"]
    assert plan["repair"] == "lstsq" and set(plan["calibration_loss"]) == {"dense", "none", "bias", "lstsq"}
    assert plan["local_rel_err"]["lstsq"] < plan["local_rel_err"]["bias"] < plan["local_rel_err"]["none"]
    assert plan["calibration_loss"]["lstsq"] <= plan["calibration_loss"]["bias"]
    assert errors["lstsq"] < errors["none"], errors
    o = "model.model.layers.0.self_attn.o_proj"
    for gm in gms.values():  # the same refit weights in both programs
        assert gm.get_parameter(f"{o}.weight").shape == (64, 32)
        assert torch.equal(gm.get_parameter(f"{o}.weight"), plan["refit"].tensors["0"])
    step, full = decode_after_prefill(gms, torch.randint(0, 256, (1, 12)))
    assert torch.allclose(step[0, -1], full[0, -1], atol=1e-4)
    ep = capture.reexport(gms["prefill"], captured.example_inputs["prefill"], captured.dynamic_shapes["prefill"],
                          what="prefill")
    kwargs = {"input_ids": torch.randint(0, 256, (1, 9)), "cache_position": torch.arange(9)}
    assert torch.allclose(ep.module()(**kwargs), gms["prefill"](**kwargs), atol=1e-6)
    gm = capture.graph_module(captured.programs["prefill"])  # the refit weights are not in the JSON
    with pytest.raises(CompileError, match="plan again"):
        prune(gm, analyze(gm), json.loads(json.dumps(plan)))


def test_ratio_zero_with_lstsq_is_exactly_lossless(llama_captured):
    _, captured = llama_captured
    gms, entry = _run(captured, {"ratio": 0.0, "repair": "lstsq"}, calib=_lm_calib())
    assert not entry["applied"]
    dense = capture.graph_module(captured.programs["prefill"])
    kwargs = {"input_ids": torch.randint(0, 256, (1, 10)), "cache_position": torch.arange(10)}
    assert torch.equal(gms["prefill"](**kwargs), dense(**kwargs))


def test_sequential_run_sees_the_program_and_uses_the_replacements(llama_captured):
    """CalibrationContext.sequential, which the sequential refit runs on: with each o_proj
    replaced by itself the inputs it hands over are the program's own (stream_values);
    a replacement reaches the layers above it; the program's KV cache is left as it was."""
    _, captured = llama_captured
    gm = capture.graph_module(captured.programs["prefill"])
    calib = _lm_calib(n=3)
    ctx = CalibrationContext("causal-lm", gm, calib)
    os = [b.attention.o.node for b in analyze(gm).blocks]
    ref = ctx.stream_values([o.args[0] for o in os])
    state = {k: v.clone() for k, v in gm.named_buffers()}
    for scale in (1.0, 0.5):
        seen = []

        def fit(node, values, scale=scale):
            seen.append(values)
            w = gm.get_parameter(node.args[1].target)
            return lambda v: torch.nn.functional.linear(v, w) * scale

        ctx.sequential(os, fit)
        assert len(seen) == len(os) and all(len(v) == len(calib) for v in seen)
        same = [torch.allclose(seen[layer][i], ref[i][layer], atol=1e-6)
                for layer in range(len(os)) for i in range(len(calib))]
        # halving layer 0's o_proj output changes what every layer above it gets
        assert all(same) if scale == 1.0 else (all(same[:len(calib)]) and not any(same[len(calib):]))
    assert all(torch.equal(v, state[k]) for k, v in gm.named_buffers())


def test_sequential_refit_lowers_the_calibration_error(llama_captured):
    """Refitting each o_proj on the activations of the model pruned and repaired below it
    reproduces the dense model's outputs on the calibration data better than refitting each
    on the dense activations; the bottom layer's refit (same inputs) is the same in both."""
    _, captured = llama_captured
    calib = _lm_calib(n=8, t=32)
    dense = capture.graph_module(captured.programs["prefill"])
    errors, plans = {}, {}
    for refit in ("layer", "sequential"):
        gms, entry = _run(captured, {"ratio": 0.5, "align": 1, "repair": "lstsq", "refit": refit,
                                     "calibration_samples": 8}, calib=calib)
        plans[refit] = entry["plan"]
        errors[refit] = sum(((gms["prefill"](**kw) - dense(**kw)).norm() / dense(**kw).norm()).item()
                            for _, kw in calib)
    assert plans["layer"]["repair"] == plans["sequential"]["repair"] == "lstsq"
    assert torch.allclose(plans["layer"]["refit"].tensors["0"], plans["sequential"]["refit"].tensors["0"], atol=1e-5)
    assert not torch.allclose(plans["layer"]["refit"].tensors["3"], plans["sequential"]["refit"].tensors["3"])
    assert errors["sequential"] < errors["layer"], errors


@pytest.mark.parametrize("repair", ["none", "bias", "lstsq"])
def test_loss_allocation_measures_the_model_pruned_at_one_layer(llama_captured, monkeypatch, repair):
    """Each candidate's loss, measured from its layer's o_proj on (what the layer's pruned
    and repaired o_proj computes from the dense input), is the calibration loss of the
    whole program with that one layer pruned by the pass's own rewrite."""
    from optc.compiler.passes import prune_heads as ph

    plans, checked = [], []
    real_output, real_losses = ph._o_output, CalibrationContext.losses_at

    def record(gm, ly, plan):
        plans.append((ly, plan))
        return real_output(gm, ly, plan)

    def compare(ctx, cuts, n=None):
        got = real_losses(ctx, cuts, n)
        for (ly, plan), loss in zip(plans, [loss for per in got for loss in per], strict=True):
            full = ctx.calibration_loss(lambda g: ph._pruned_copy(g, {ly.index: ly.coupling}, plan), n=n)
            checked.append((loss, full))
        return got

    monkeypatch.setattr(ph, "_o_output", record)
    monkeypatch.setattr(CalibrationContext, "losses_at", compare)
    _, captured = llama_captured
    _run(captured, {"ratio": 0.25, "align": 1, "allocation": "loss", "sensitivity_samples": 2, "repair": repair},
         calib=_lm_calib(n=4, t=24))
    assert len(checked) == 4  # one candidate count (one of two KV groups) in each of the four layers
    for loss, full in checked:
        assert loss == pytest.approx(full, abs=1e-5)


def test_loss_allocation_picks_the_least_measured_cost(llama_captured, decode_after_prefill):
    """allocation=loss: every layer pruned alone at each candidate count is measured; the
    chosen counts remove `ratio` of the heads (where uniform rounds to none) and their
    summed measured increase is the least of every combination of candidates that does."""
    import itertools

    _, captured = llama_captured
    gms, entry = _run(captured, {"ratio": 0.25, "align": 1, "allocation": "loss", "sensitivity_samples": 2},
                      calib=_lm_calib())
    plan = entry["plan"]
    alloc = plan["allocation"]
    kept = plan["kept_heads"]
    assert alloc["uniform"]["heads_removed"] == 0  # 2 KV groups a layer: uniform at 0.25 rounds to none
    assert alloc["heads_removed"] == 4 and sum(kept.values()) == 12  # 2 of the 8 groups of 2 heads
    costs = {int(i): {int(c): v for c, v in per.items()} for i, per in alloc["increase_by_kept_count"].items()}
    assert all(set(per) == {1, 2} for per in costs.values())
    best = min(sum(costs[i][c] for i, c in zip(costs, combo))
               for combo in itertools.product(*[sorted(p) for p in costs.values()])
               if sum((2 - c) * 2 for c in combo) == 4)
    chosen = sum(costs[int(i)][h // 2] for i, h in kept.items())
    assert chosen == pytest.approx(best, abs=1e-5) and chosen == pytest.approx(alloc["summed_increase"], abs=1e-4)
    assert [h for h, _ in _heads(gms["decode"])] == list(kept.values())
    step, full = decode_after_prefill(gms, torch.randint(0, 256, (1, 10)))
    assert torch.allclose(step[0, -1], full[0, -1], atol=1e-4)
