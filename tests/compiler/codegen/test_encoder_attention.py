"""optc::encoder_attention's Triton kernel against SDPA (under the interpreter), and the
encoder_sdpa rewrite that puts it into an encoder's lowered copy where a mask would keep
SDPA off its flash kernels."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from pass_helpers import run_pass

from optc.compiler import capture, targets
from optc.compiler.codegen import lowering
from optc.compiler.codegen.encoder_sdpa import encoder_sdpa_nodes, use_encoder_attention
from optc.compiler.codegen.kernels.encoder_attention import EncoderAttentionConfig, encoder_attention, plan

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _qkv(B, H, S, D, dtype=torch.float32, seed=0):
    """q, k, v as an encoder's projections leave them: [B, S, H, D] viewed as [B, H, S, D]."""
    x = torch.randn(B, S, 3, H, D, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return tuple(x[:, :, i].transpose(1, 2) for i in range(3))


def _masks(B, S, seed=1):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.rand(B, 1, 1, S, generator=gen) > 0.3
    keys[..., 0] = True
    return {
        "padding": keys,  # BERT's key mask
        "per query": torch.rand(B, 1, S, S, generator=gen) > 0.2,  # materialised, rows differ
        "size bias": torch.randn(B, 1, 1, S, generator=gen).log_softmax(-1),  # merge_tokens' log(size)
        "additive padding": torch.where(keys, 0.0, torch.finfo(torch.float32).min),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,S,D,cfg", [
    (2, 3, 37, 16, None),                                  # the default launch, rows not a tile multiple
    (1, 2, 70, 24, EncoderAttentionConfig(16, 16, 4, 1)),  # a width that is no power of two, many trips
    (2, 2, 130, 64, None),                                 # two row blocks of 128
])
def test_the_kernel_computes_sdpa_with_each_mask(dtype, B, H, S, D, cfg, poison_empty):
    q, k, v = _qkv(B, H, S, D, dtype)
    for name, mask in _masks(B, S).items():
        m = mask if mask.dtype == torch.bool else mask.to(dtype)
        out = encoder_attention(q, k, v, m, 0.3, cfg)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m if m.dtype == torch.bool
                                             else m.float(), scale=0.3)
        assert out.dtype == dtype and out.shape == (B, H, S, D), name
        assert out.transpose(1, 2).is_contiguous(), name  # laid out as [B, S, H, D]
        torch.testing.assert_close(out.float(), ref, atol=2e-3 if dtype == torch.float16 else 2e-5, rtol=1e-3,
                                   msg=name)


def test_without_a_mask_and_a_row_that_sees_nothing_gives_zero():
    q, k, v = _qkv(1, 2, 20, 8)
    torch.testing.assert_close(encoder_attention(q, k, v, None), F.scaled_dot_product_attention(q, k, v))
    mask = torch.rand(1, 2, 20, 20, generator=torch.Generator().manual_seed(2)) > 0.5
    mask[0, 1, 3] = False  # SDPA's math path returns 0 for such a row
    out = encoder_attention(q, k, v, mask, None, EncoderAttentionConfig(16, 16, 4, 1))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert torch.equal(out[0, 1, 3], torch.zeros(8))


def test_a_row_masked_by_the_dtypes_minimum_averages_as_sdpa_does():
    """An additive mask of finfo.min (HF's, merge_tokens' padding) over a whole row stays
    finite: every key weighs the same there, as in SDPA, rather than the row giving 0."""
    q, k, v = _qkv(1, 2, 20, 8)
    mask = torch.zeros(1, 1, 20, 20)
    mask[0, 0, 5] = torch.finfo(torch.float32).min
    mask[0, 0, 6, 3:] = torch.finfo(torch.float32).min
    out = encoder_attention(q, k, v, mask, None, EncoderAttentionConfig(16, 16, 4, 1))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    torch.testing.assert_close(out[0, :, 5], v[0].mean(dim=1))


def test_the_default_launch():
    assert plan(197, 64) == EncoderAttentionConfig(64, 64, 4, 2)  # the H100 sweep's best at ViT's counts
    assert plan(512, 64).block_m == 128 and plan(512, 128).block_m == 64


def test_the_op_on_cpu_is_sdpa_with_the_kernels_layout():
    from optc.compiler.codegen import attention_ops  # noqa: F401

    q, k, v = _qkv(2, 2, 20, 8)
    mask = _masks(2, 20)["padding"]
    out = torch.ops.optc.encoder_attention(q, k, v, mask, 0.25)
    assert out.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25))


# ------------------------------------------------------------------ the rewrite


def _sdpa_graph(rows=20, keys=20, mask_shape=(1, 1, 1, 20), mask_dtype=torch.bool, **kwargs):
    g = torch.fx.Graph()
    q, k, v, m = (g.placeholder(n) for n in "qkvm")
    g.output(g.call_function(SDPA, (q, k, v, m), kwargs))
    shapes = [(1, 2, rows, 8), (1, 2, keys, 8), (1, 2, keys, 8), mask_shape]
    for node, shape, dtype in zip(g.nodes, shapes, [torch.float32] * 3 + [mask_dtype]):
        node.meta["val"] = torch.empty(shape, dtype=dtype, device="meta")
    return torch.fx.GraphModule(torch.nn.Module(), g)


def test_only_what_the_kernel_computes_exactly_is_rewritten():
    assert len(encoder_sdpa_nodes(_sdpa_graph().graph)) == 1
    assert len(encoder_sdpa_nodes(_sdpa_graph(mask_dtype=torch.float32, scale=0.5).graph)) == 1
    assert len(encoder_sdpa_nodes(_sdpa_graph(mask_shape=(1, 2, 20, 20)).graph)) == 1
    assert len(encoder_sdpa_nodes(_sdpa_graph(rows=4, keys=4, mask_shape=(1, 1, 4, 4)).graph)) == 1  # short
    assert encoder_sdpa_nodes(_sdpa_graph(rows=1).graph) == []  # a decode step's shape
    assert encoder_sdpa_nodes(_sdpa_graph(dropout_p=0.1).graph) == []
    assert encoder_sdpa_nodes(_sdpa_graph(is_causal=True).graph) == []
    assert encoder_sdpa_nodes(_sdpa_graph(enable_gqa=True).graph) == []
    assert encoder_sdpa_nodes(_sdpa_graph(mask_shape=(1, 3, 20, 20)).graph) == []  # does not broadcast
    assert encoder_sdpa_nodes(_sdpa_graph(mask_dtype=torch.int64).graph) == []
    huge = _sdpa_graph()
    for node in list(huge.graph.nodes)[:4]:  # more (batch, head) pairs than the grid's axis takes
        node.meta["val"] = torch.empty((40000, *node.meta["val"].shape[1:]), dtype=node.meta["val"].dtype,
                                       device="meta")
    assert encoder_sdpa_nodes(huge.graph) == []
    unmasked = _sdpa_graph()
    sdpa = next(n for n in unmasked.graph.nodes if n.target == SDPA)
    sdpa.args = sdpa.args[:3]
    assert encoder_sdpa_nodes(unmasked.graph) == []  # SDPA keeps its flash kernel
    assert len(encoder_sdpa_nodes(unmasked.graph, unmasked=True)) == 1  # unless asked
    assert encoder_sdpa_nodes(_sdpa_graph().graph, masked=False, unmasked=True) == []  # masked ones: not asked


def _op():
    from optc.compiler.codegen import attention_ops  # noqa: F401  (registers it)

    return torch.ops.optc.encoder_attention.default


@pytest.fixture(scope="module")
def bert_padded(make_tiny_bert):
    model = make_tiny_bert()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 7:] = 0
    return capture.capture(model, (ids, mask))


def test_berts_padded_attention_is_rewritten_and_computes_the_same(bert_padded):
    OP = _op()
    gm = capture.graph_module(bert_padded.programs["forward"])
    rewritten, n = use_encoder_attention(gm)
    assert n == 3 and sum(node.target == OP for node in rewritten.graph.nodes) == 3
    assert not any(node.target == OP for node in gm.graph.nodes)  # the program keeps SDPA
    # The kernel reads the padding mask as one row a sequence ([B, 1, 1, L]): its factor
    # `query_index >= 0` keeps every score and is left out; SDPA read it as [B, 1, S, L].
    sdpa_masks = {tuple(n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None).meta["val"].shape)
                  for n in gm.graph.find_nodes(op="call_function", target=SDPA)}
    kernel_masks = {tuple(n.args[3].meta["val"].shape) for n in rewritten.graph.nodes if n.target == OP}
    assert sdpa_masks == {(2, 1, 20, 20)} and kernel_masks == {(2, 1, 1, 20)}
    args, kwargs = bert_padded.example_inputs["forward"]
    torch.testing.assert_close(rewritten(*args, **kwargs), gm(*args, **kwargs), rtol=1e-5, atol=1e-5)


def test_merged_tokens_attention_is_rewritten_after_the_constant_mask_goes(make_tiny_vit):
    model = make_tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    OP = _op()
    gms, entry = run_pass(capture.capture(model, (x,)), "merge_tokens", {"r": 1}, task="forward")
    assert entry["applied"], entry["reason"]
    target = dataclasses.replace(targets.get("cpu"), encoder_attention=True)
    graph = lowering.target_graph(gms["forward"], target, forward=True)
    ops = [node.target for node in graph.graph.nodes if node.target in (OP, SDPA)]
    # The first block's mask keeps every score and is dropped (SDPA, flash); the merged
    # blocks read the size bias (optc's kernel).
    assert ops == [SDPA, OP, OP]
    torch.testing.assert_close(graph(x), gms["forward"](x), rtol=1e-5, atol=1e-5)


def test_vits_unmasked_attention_is_rewritten_only_when_asked(make_tiny_vit):
    model = make_tiny_vit()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    captured = capture.capture(model, (x,))
    gm = capture.graph_module(captured.programs["forward"])
    OP = _op()
    cpu = targets.get("cpu")
    for overrides, expected in (([], [SDPA] * 3), (["encoder_attention=true"], [SDPA] * 3),
                                (["encoder_attention_unmasked=true"], [OP] * 3)):
        target = targets.with_overrides(cpu, overrides)
        graph = lowering.target_graph(gm, target, forward=True)  # the constant mask dropped first
        assert [n.target for n in graph.graph.nodes if n.target in (OP, SDPA)] == expected, overrides
        torch.testing.assert_close(graph(x), gm(x), rtol=1e-5, atol=1e-5)
    asks = targets.with_overrides(cpu, ["encoder_attention_unmasked=true"])
    assert "encoder_attention_unmasked=true" in targets.lowering_words(asks)
    result = lowering.lower_and_verify(captured.programs["forward"], captured.example_inputs["forward"],
                                       asks, "forward")
    assert result["ok"], result


def test_lower_applies_it_only_for_targets_that_ask(bert_padded):
    gm = capture.graph_module(bert_padded.programs["forward"])
    cpu = targets.get("cpu")
    assert lowering.target_graph(gm, cpu, forward=True) is gm
    asks = targets.with_overrides(cpu, ["encoder_attention=true"])
    assert asks.encoder_attention and lowering.target_graph(gm, asks, forward=True) is not gm
    assert lowering.target_graph(gm, asks, forward=False) is gm  # a decoder's prefill keeps SDPA
    result = lowering.lower_and_verify(bert_padded.programs["forward"], bert_padded.example_inputs["forward"],
                                       asks, "forward")
    assert result["ok"], result
    assert "encoder_attention=true" in targets.lowering_words(asks)
    assert "encoder_attention" not in targets.lowering_words(cpu)  # named only when on
