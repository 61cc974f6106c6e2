"""merge_tokens (ToMe) on tiny BERT, ViT, Hugging Face ViTModel, DistilBERT and DeiT
(distillation token): shapes, masks and padding, protected tokens, r=0 lossless,
unmerged positions, re-export, refusals."""

import pytest
import torch
from pass_helpers import run_pass

from optc.compiler import capture, pipeline
from optc.compiler.passes.merge_tokens import MergeTokensConfig
from optc.errors import UsageError

OPS = "optc.token_merge"


def _bert_inputs():
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 4:] = 0  # row 1: 4 real tokens, 8 padding
    return ids, mask


@pytest.fixture(scope="module")
def bert(make_tiny_bert):
    model = make_tiny_bert()
    inputs = _bert_inputs()
    return model, inputs, capture.capture(model, inputs)


@pytest.fixture(scope="module")
def deit():
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(0)
    cfg = DeiTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, num_labels=10, attn_implementation="sdpa")
    model = DeiTForImageClassificationWithTeacher(cfg).eval().requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    return model, x, capture.capture(model, (x,))


def _ops(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_r0_is_off_and_exactly_lossless(bert):
    model, inputs, captured = bert
    for sets in ({"r": 0}, {"schedule": [0, 0, 0]}):
        gms, entry = run_pass(captured, "merge_tokens", sets, task="forward")
        assert not entry["applied"] and "not configured" in entry["reason"]
        assert torch.equal(gms["forward"](*inputs), model(*inputs).last_hidden_state)
    assert "merge_tokens" in [s.name for s in pipeline.PIPELINES["default"]]  # there, off by default
    assert not MergeTokensConfig().active()


def test_bert_shapes_plan_and_padding_merges_first(bert):
    model, inputs, captured = bert
    gms, entry = run_pass(captured, "merge_tokens", {"r": 1}, task="forward")
    gm = gms["forward"]
    assert entry["applied"], entry["reason"]
    assert entry["plan"]["schedule"] == [1, 1, 1] and entry["plan"]["tokens"] == [12, 11, 10]
    assert entry["plan"]["protected"] == 1  # [CLS]
    assert _ops(gm).count(f"{OPS}.default") == 3
    out, ref = gm(*inputs), model(*inputs).last_hidden_state
    assert out.shape == ref.shape  # token-level output unmerged to every position
    # Row 1 has 8 padding tokens: every merge of that row takes a padding token (zero
    # weight), so its real tokens see exactly the unmerged model's attention.
    torch.testing.assert_close(out[1, :4], ref[1, :4], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[0], ref[0], atol=1e-3)  # row 0 has none: real tokens merged
    assert torch.isfinite(out).all()


def test_merged_programs_lower_without_per_shape_tuning(bert):
    from optc.compiler import targets
    from optc.compiler.codegen import lowering

    model, inputs, captured = bert
    h200 = targets.get("h200")
    merged = run_pass(captured, "merge_tokens", {"r": 1}, task="forward")[0]["forward"]
    dense = run_pass(captured, "merge_tokens", {"r": 0}, task="forward")[0]["forward"]
    assert lowering.load_lowering(h200, "forward", dense.graph) == {"autotune": True, "cudagraphs": True}
    plain = lowering.load_lowering(h200, "forward", merged.graph)
    assert plain == {"autotune": False, "cudagraphs": True, "shape_tuning": False}
    record = lowering.lowering_record(h200, **plain)
    assert "coordinate_descent_tuning" not in record["inductor_options"] and not record["shape_tuning"]
    assert "max_autotune" not in record["inductor_options"]


def test_padded_bert_with_token_outputs_lowers_through_inductor(bert):
    """Three merge levels, the padding mask and the unmerge map, lowered for the CPU as
    `optc compile` does: torch 2.13's Inductor once failed on the map's index arithmetic."""
    from optc.compiler import targets
    from optc.compiler.codegen import lowering

    model, inputs, captured = bert
    gm = run_pass(captured, "merge_tokens", {"r": 1}, task="forward")[0]["forward"]
    lowered = lowering.lower(gm, targets.get("cpu"))
    torch.testing.assert_close(lowered(*inputs), gm(*inputs), atol=1e-5, rtol=1e-5)


def test_unmerged_positions_share_their_token(bert):
    model, inputs, captured = bert
    gms, entry = run_pass(captured, "merge_tokens", {"schedule": [0, 0, 5]}, task="forward")
    out, ref = gms["forward"](*inputs)[0], model(*inputs).last_hidden_state[0]
    # Merged in the last block only: 12 positions hold 12 - 5 distinct values (each merged
    # position takes its token's value); a position alone in its token (unmerged, MLP per
    # token) keeps the unmerged model's value.
    assert torch.unique(out, dim=0).shape[0] == 7
    alone = (out[:, None, :] == out[None, :, :]).all(-1).sum(1) == 1
    assert alone[0] and int(alone.sum()) >= 2  # [CLS] is protected
    torch.testing.assert_close(out[alone], ref[alone], atol=1e-5, rtol=1e-5)


def test_outputs_merged_keeps_the_short_sequence(bert):
    _, inputs, captured = bert
    gms, entry = run_pass(captured, "merge_tokens", {"r": 2, "outputs": "merged"}, task="forward")
    assert entry["applied"] and gms["forward"](*inputs).shape == (2, 12 - 6, 64)
    assert "optc.token_unmerge.default" not in _ops(gms["forward"])


def test_reexport_is_static(bert):
    _, inputs, captured = bert
    gms, _ = run_pass(captured, "merge_tokens", {"r": 3}, task="forward")
    ep = capture.reexport(gms["forward"], (inputs, {}), None, what="merged")
    assert ep.module()(*inputs).shape == (2, 12, 64)


def test_vit_classifier_reads_the_class_token_directly(vit_captured):
    model, captured = vit_captured
    x = torch.randn(2, 3, 32, 32)
    gms, entry = run_pass(captured, "merge_tokens", {"r": 4}, task="forward")
    assert entry["applied"] and entry["plan"]["protected"] == 1  # the class token, from the anatomy
    assert entry["plan"]["tokens"] == [17, 13, 9] and entry["plan"]["tokens_out"] == 5
    assert entry["programs"]["forward"]["unmerged_uses"] == 0
    logits = gms["forward"](x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_hf_vitmodel_unmerges_hidden_states():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                               num_attention_heads=4, intermediate_size=128, attn_implementation="sdpa")).eval()
    x = torch.randn(2, 3, 32, 32)
    captured = capture.capture(model, (x,))
    gms, entry = run_pass(captured, "merge_tokens", {"r": 3}, task="forward")
    out, ref = gms["forward"](x), model(x).last_hidden_state
    assert entry["applied"] and out.shape == ref.shape == (2, 17, 64)
    assert torch.nn.functional.cosine_similarity(out[:, 0], ref[:, 0], dim=-1).min() > 0.5


def test_deit_protects_class_and_distillation_tokens(deit):
    model, x, captured = deit
    gms, entry = run_pass(captured, "merge_tokens", {"r": 2}, task="forward")
    assert entry["applied"] and entry["plan"]["protected"] == 2
    assert entry["plan"]["tokens"] == [18, 16]
    assert entry["programs"]["forward"]["unmerged_uses"] == 0  # both heads read protected tokens
    assert gms["forward"](x).shape == (2, 10)
    gms, entry = run_pass(captured, "merge_tokens", {"r": 2, "protected": 1}, task="forward")
    assert entry["plan"]["protected"] == 1


def test_distilbert_with_padding():
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    model = DistilBertModel(DistilBertConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                             attn_implementation="sdpa")).eval()
    inputs = _bert_inputs()
    gms, entry = run_pass(capture.capture(model, inputs), "merge_tokens", {"r": 1}, task="forward")
    out, ref = gms["forward"](*inputs), model(*inputs).last_hidden_state
    assert entry["applied"] and out.shape == ref.shape
    torch.testing.assert_close(out[1, :4], ref[1, :4], atol=1e-5, rtol=1e-5)


def test_bf16_graph(make_tiny_vit):
    model = make_tiny_vit().to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    gms, entry = run_pass(capture.capture(model, (x,)), "merge_tokens", {"r": 4}, task="forward")
    out = gms["forward"](x)
    assert entry["applied"] and out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_decoder_is_refused(llama_captured):
    _, captured = llama_captured
    _, entry = run_pass(captured, "merge_tokens", {"r": 2})
    assert not entry["applied"] and "encoders" in entry["reason"]


def test_config_and_search_space(bert):
    _, _, captured = bert
    with pytest.raises(UsageError, match="schedule"):
        run_pass(captured, "merge_tokens", {"schedule": [1, 2]}, task="forward")
    with pytest.raises(UsageError, match="merge_tokens.r"):
        pipeline.resolve("default", {"merge_tokens": {"r": -1}})
    space = MergeTokensConfig.search_space()
    assert set(space) == {"r", "kernels", "proportional_attention"} and space["kernels"].when == ("r", ">", 0)
    assert space["proportional_attention"].choices == (True, False)  # the default first
    _, entry = run_pass(captured, "merge_tokens", {"r": 100}, task="forward")  # clamped to half the rest
    assert entry["plan"]["schedule"] == [5, 3, 1]


def _merged_sdpas(gm):
    return [n for n in gm.graph.nodes if n.target == torch.ops.aten.scaled_dot_product_attention.default]


@pytest.mark.parametrize("model_name", ["vit", "bert", "deit"])
def test_size_bias_as_a_head_channel_matches_the_mask(model_name, make_tiny_vit, bert, deit):
    if model_name == "vit":
        model = make_tiny_vit()
        inputs = (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)
        captured = capture.capture(model, inputs)
    else:
        _, inputs, captured = bert if model_name == "bert" else (deit[0], (deit[1],), deit[2])
    outs = {}
    for how in ("mask", "channel"):
        gms, entry = run_pass(captured, "merge_tokens", {"r": 2, "size_bias": how}, task="forward")
        assert entry["applied"], entry["reason"]
        gm, out = gms["forward"], gms["forward"](*inputs)
        outs[how] = out[0] if isinstance(out, (tuple, list)) else out
        sdpas = _merged_sdpas(gm)
        width = {n: n.args[0].meta["val"].shape[-1] for n in sdpas}
        narrow = min(width.values())
        merged = sdpas[1:]  # the first block attends before any merge
        masks = [n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask") for n in merged]
        if how == "channel":  # every attention after the first merge: no mask, head dim + 8
            assert merged and all(m is None for m in masks) and all(width[n] == narrow + 8 for n in merged)
        else:
            assert all(m is not None for m in masks) and len(set(width.values())) == 1
    assert torch.isfinite(outs["channel"]).all()
    torch.testing.assert_close(outs["channel"], outs["mask"], atol=2e-5, rtol=2e-5)


def test_size_bias_channel_in_bf16(make_tiny_vit):
    model = make_tiny_vit().to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    captured = capture.capture(model, (x,))
    outs = [run_pass(captured, "merge_tokens", {"r": 4, "size_bias": how}, task="forward")[0]["forward"](x)
            for how in ("mask", "channel")]
    err = ((outs[1].float() - outs[0].float()).norm() / outs[0].float().norm()).item()
    assert err < 2e-2, err


def test_without_the_size_bias_unpadded_attention_has_no_mask(make_tiny_vit, bert, monkeypatch):
    """ViT (its mask keeps every score) without proportional attention: every merged
    attention runs unmasked, with the output of the zero bias it replaces; padded BERT keeps
    its mask, which still holds the padding."""
    model = make_tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    captured = capture.capture(model, (x,))
    gms, entry = run_pass(captured, "merge_tokens", {"r": 3, "proportional_attention": False}, task="forward")
    assert entry["applied"], entry["reason"]
    merged = _merged_sdpas(gms["forward"])[1:]
    assert merged and all((n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")) is None for n in merged)
    # the same merge with its zero bias as a mask, as when padding is possible
    from optc.compiler.passes import merge_tokens

    with monkeypatch.context() as m:
        m.setattr(merge_tokens, "keeps_every_score", lambda mask: False)
        masked, _ = run_pass(captured, "merge_tokens", {"r": 3, "proportional_attention": False}, task="forward")
    assert all(n.args[3] is not None for n in _merged_sdpas(masked["forward"])[1:])
    torch.testing.assert_close(gms["forward"](x), masked["forward"](x), atol=2e-5, rtol=2e-5)
    _, inputs, bert_captured = bert
    gms, entry = run_pass(bert_captured, "merge_tokens", {"r": 2, "proportional_attention": False}, task="forward")
    assert entry["applied"], entry["reason"]
    masks = [n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask") for n in _merged_sdpas(gms["forward"])[1:]]
    assert masks and all(m is not None for m in masks)
