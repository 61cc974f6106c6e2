"""skip_layers: structure (what is gone), numerics (equal to the eager model with the
same blocks bypassed), KV-cache consistency, and the plan's selection."""

import pytest
import torch

from optc.compiler import capture, pipeline
from optc.compiler.calibration import CalibrationContext
from optc.errors import UsageError
from pass_helpers import assert_prefill_matches, eager_logits


def _run(captured, sets, calib=None, task="causal-lm"):
    gms = {n: capture.graph_module(ep) for n, ep in captured.programs.items()}
    primary = "prefill" if "prefill" in gms else "forward"
    config = pipeline.resolve("default", {"skip_layers": sets})
    make = None if calib is None else (lambda gm: CalibrationContext(task, gm, calib))
    report = pipeline.run(gms, primary, config, make, log=lambda m: None)
    return gms, report[0]


def _lm_calib(n=2, t=24):
    g = torch.Generator().manual_seed(5)
    return [((), {"input_ids": torch.randint(0, 256, (1, t), generator=g), "cache_position": torch.arange(t)}) for _ in range(n)]


def _bypass(model, index, part):
    layer = model.model.layers[index]
    if part == "block":
        return [layer.register_forward_hook(lambda mod, args, out: args[0])]
    sub = layer.self_attn if part == "attention" else layer.mlp
    if part == "attention":
        return [sub.register_forward_hook(lambda mod, args, out: (torch.zeros_like(out[0]),) + tuple(out[1:]))]
    return [sub.register_forward_hook(lambda mod, args, out: torch.zeros_like(out))]


@pytest.mark.parametrize("part", ["block", "attention", "mlp"])
def test_prefill_matches_eager_bypass(llama_captured, part):
    model, captured = llama_captured
    gms, entry = _run(captured, {"layers": [1, 2], "granularity": part})
    assert entry["applied"] and entry["plan"]["units"] == [[1, part], [2, part]]
    before = entry["programs"]["prefill"]["before"]["params"]
    after = entry["programs"]["prefill"]["after"]["params"]
    assert after < before
    ids = torch.randint(0, 256, (1, 20))
    hooks = _bypass(model, 1, part) + _bypass(model, 2, part)
    assert_prefill_matches(gms, eager_logits(model, ids, hooks), ids)


def test_decode_after_prefill_consistent(llama_captured):
    """Skipped attentions write no cache; the decode graph continues the prefill's
    cache exactly like recomputing the whole sequence."""
    _, captured = llama_captured
    gms, _ = _run(captured, {"layers": [0, 3], "granularity": "attention"})
    for name, gm in gms.items():
        assert not [n for n in gm.graph.nodes if "layers.0.self_attn" in str(n.meta.get("nn_module_stack", ""))
                    and n.target == torch.ops.aten.index_copy_.default]
    prefill, decode = gms["prefill"], gms["decode"]
    # Share the decode program's cache with the prefill program's.
    for bname, buf in prefill.named_buffers():
        if "cache" in bname and hasattr(decode, bname):
            decode.get_buffer(bname).copy_(buf)
    ids = torch.randint(0, 256, (1, 12))
    prefill(input_ids=ids[:, :11], cache_position=torch.arange(11))
    for bname, buf in prefill.named_buffers():
        if "cache" in bname and hasattr(decode, bname):
            decode.get_buffer(bname).copy_(buf)
    step = decode(input_ids=ids[:, 11:], cache_position=torch.tensor([11]))
    full = prefill(input_ids=ids, cache_position=torch.arange(12))
    assert torch.allclose(step[0, -1], full[0, -1], atol=1e-4)


def test_reexport_keeps_rewrite(llama_captured):
    _, captured = llama_captured
    gms, _ = _run(captured, {"layers": [2], "granularity": "block"})
    ep = capture.reexport(gms["prefill"], captured.example_inputs["prefill"], captured.dynamic_shapes["prefill"], what="t")
    assert not any(k.startswith("model.model.layers.2.") for k in ep.state_dict)
    ids = torch.randint(0, 256, (1, 9))
    kwargs = {"input_ids": ids, "cache_position": torch.arange(9)}
    assert torch.allclose(ep.module()(**kwargs), gms["prefill"](**kwargs), atol=1e-6)


@pytest.mark.parametrize("selection", ["loss", "cosine"])
def test_count_selects_by_calibration(llama_captured, selection):
    _, captured = llama_captured
    gms, entry = _run(captured, {"count": 1, "selection": selection, "granularity": "block"}, calib=_lm_calib())
    plan = entry["plan"]
    assert len(plan["units"]) == 1 and plan["params_removed"] >= 0.98 * plan["budget_params"]
    assert plan["scores"]


def test_sublayer_budget_in_block_equivalents(llama_captured):
    _, captured = llama_captured
    _, entry = _run(captured, {"count": 1, "granularity": "sublayer"}, calib=_lm_calib())
    plan = entry["plan"]
    assert plan["params_removed"] >= 0.98 * plan["budget_params"]
    assert all(part in ("attention", "mlp") for _, part in plan["units"])


def test_encoder_post_norm(bert_captured):
    model, captured = bert_captured
    gms, entry = _run(captured, {"layers": [1], "granularity": "block"}, task="forward")
    ids, mask = captured.example_inputs["forward"][0]
    h = model.encoder.layer[1].register_forward_hook(lambda mod, args, out: (args[0],) if isinstance(out, tuple) else args[0])
    try:
        ref = model(ids, mask).last_hidden_state
    finally:
        h.remove()
    assert torch.allclose(gms["forward"](ids, mask), ref, atol=1e-5)


def test_bad_requests(llama_captured):
    _, captured = llama_captured
    with pytest.raises(UsageError, match="blocks 0..3"):
        _run(captured, {"layers": [9]})
    with pytest.raises(UsageError, match="every block"):
        _run(captured, {"count": 4}, calib=_lm_calib())
    with pytest.raises(UsageError, match="calibration data"):
        _run(captured, {"count": 1})


def test_not_configured_is_reported(llama_captured):
    _, captured = llama_captured
    _, entry = _run(captured, {})
    assert not entry["applied"] and "not configured" in entry["reason"]
    _, entry = _run(captured, {"enabled": False, "count": 1})
    assert entry["reason"] == "disabled"


def test_compensation_adds_mean_output(llama_captured):
    """With compensation (default) a removed unit leaves its mean calibration output
    behind as a constant: the graph equals the eager model whose unit returns that mean."""
    model, captured = llama_captured
    gms, entry = _run(captured, {"count": 1, "granularity": "block", "selection": "cosine"}, calib=_lm_calib())
    (index, part), = [tuple(u) for u in entry["plan"]["units"]]
    bias = torch.tensor(entry["plan"]["compensation"][f"{index}.{part}"])
    assert bias.shape == (64,) and bias.abs().sum() > 0
    assert any(name.startswith("optc_skip_bias") for name, _ in gms["prefill"].named_buffers())
    ids = torch.randint(0, 256, (1, 14))
    hook = model.model.layers[index].register_forward_hook(lambda mod, args, out: args[0] + bias)
    try:
        ref = model(ids, use_cache=False).logits
    finally:
        hook.remove()
    out = gms["prefill"](input_ids=ids, cache_position=torch.arange(14))
    assert torch.allclose(out, ref, atol=1e-5)
    _, plain = _run(captured, {"count": 1, "granularity": "block", "selection": "cosine", "compensate": False}, calib=_lm_calib())
    assert "compensation" not in plain["plan"] or not plain["plan"]["compensation"]


@pytest.mark.parametrize("part", ["attention", "mlp"])
def test_anatomy_reads_blocks_left_with_one_half(llama_captured, part):
    """After a half is removed the block is still read (the other half, its stream
    points), so later passes keep applying to it: no silent stop."""
    from optc.compiler import anatomy

    _, captured = llama_captured
    gms, _ = _run(captured, {"layers": [1, 2], "granularity": part})
    for name, gm in gms.items():
        a = anatomy.analyze(gm)
        assert a.reason is None and len(a.blocks) == 4, (name, a.reason)
        kept = "mlp" if part == "attention" else "attention"
        assert [b.halves for b in a.blocks] == [["attention", "mlp"], [kept], [kept], ["attention", "mlp"]]
        for b in a.blocks[1:3]:
            assert (b.input is b.mid) if part == "attention" else (b.mid is b.output)
            assert b.input is a.blocks[b.index - 1].output  # the stream still runs block to block
        assert a.summary()["blocks"][1][part] is None
    # The passes after skip_layers apply to what is left, on every program.
    config = pipeline.resolve("default", {"skip_layers": {"layers": [1, 2], "granularity": part},
                                          "prune_mlp": {"ratio": 0.5, "align": 1},
                                          "sparsify_activations": {"sparsity": 0.5, "method": "teal"}})
    gms = {n: capture.graph_module(ep) for n, ep in captured.programs.items()}
    report = pipeline.run(gms, "prefill", config, lambda gm: CalibrationContext("causal-lm", gm, _lm_calib()),
                          log=lambda m: None)
    by_name = {e["name"]: e for e in report}
    assert by_name["share_kv_heads"]["applied"], by_name["share_kv_heads"]["reason"]
    shared = by_name["share_kv_heads"]["programs"]["decode"]["attentions_rewritten"]
    assert shared == (2 if part == "attention" else 4)
    pruned = by_name["prune_mlp"]
    assert pruned["applied"] and sorted(pruned["plan"]["blocks"]) == (["0", "1", "2", "3"] if part == "attention"
                                                                      else ["0", "3"])
    sparse = by_name["sparsify_activations"]
    assert sparse["applied"], sparse["reason"]
    units = {u["key"] for u in sparse["plan"]["units"]}
    assert ("1.qkv" in units) == (part == "mlp") and ("1.down" in units) == (part == "attention")


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_greedy_losses_equal_the_programs_remove_units_builds(llama_captured, bert_captured, family):
    """A greedy round measures each candidate on top of the units chosen so far from its
    own block on (losses_at with the chosen units fixed): the loss equals that of the
    program remove_units rewrites with them all, compensation included, for units of the
    same block (both halves: one reroute) and of others."""
    from optc.compiler.anatomy import analyze
    from optc.compiler.passes.skip_layers import _removed, remove_units

    _, captured = llama_captured if family == "llama" else bert_captured
    name = "prefill" if family == "llama" else "forward"
    gm = capture.graph_module(captured.programs[name])
    if family == "llama":
        calib, task = _lm_calib(n=2, t=16), "causal-lm"
    else:
        g = torch.Generator().manual_seed(2)
        calib = [((torch.randint(0, 256, (2, 12), generator=g), torch.ones(2, 12, dtype=torch.long)), {})
                 for _ in range(2)]
        task = "forward"
    ctx = CalibrationContext(task, gm, calib)
    anatomy = analyze(gm)
    width = anatomy.blocks[0].output.meta["val"].shape[-1]
    biases = {(i, p): torch.full((width,), 0.01 * (i + 1)) for i in range(len(anatomy.blocks))
              for p in ("attention", "mlp")}
    chosen = [(1, "attention")]
    pool = [(1, "mlp"), (0, "attention"), (2, "mlp"), (0, "mlp")]
    fixed = dict(_removed(anatomy, u, biases) for u in chosen)
    cuts = [(end, [fn], start) for end, (fn, start) in (_removed(anatomy, u, biases) for u in pool)]
    got = [loss for (loss,) in ctx.losses_at(cuts, fixed=fixed)]

    def rewritten(units):
        def transform(g):
            copy = capture.graph_module(captured.programs[name])
            remove_units(copy, analyze(copy), units, biases)
            return copy
        return transform

    want = [ctx.calibration_loss(rewritten(chosen + [u])) for u in pool]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-8)
    assert len({f"{v:.4g}" for v in got}) == len(pool)  # four different programs
