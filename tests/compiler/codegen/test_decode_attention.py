"""optc::decode_attention's Triton kernel against SDPA (under the interpreter), and the
decode_sdpa rewrite that puts it into a decode program's lowered copy."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from optc.compiler import targets
from optc.compiler.codegen import decode_sdpa, lowering
from optc.compiler.codegen.decode_sdpa import decode_sdpa_nodes, use_decode_attention
from optc.compiler.codegen.kernels.decode_attention import decode_attention, plan


def _inputs(B, H, S, L, D, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=gen).to(dtype) for n in (S, L, L))
    return q, k, v


def _cache_mask(B, L, positions):
    """A decode step's mask: key l is visible to batch b up to its position."""
    return (torch.arange(L)[None, :] <= torch.tensor(positions)[:, None])[:, None, None, :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,S,L,D,split,block_l", [
    (1, 8, 4, 256, 64, 1, None),  # Llama-1B's decode step after share_kv_heads
    (2, 3, 1, 37, 24, 1, 16),     # one row, keys and width not tile multiples
    (2, 3, 5, 37, 24, 3, 16),     # split over the keys, partials combined
    (1, 2, 16, 64, 32, 2, 32),    # the most rows the kernel takes
])
def test_the_kernel_computes_sdpa_with_a_cache_mask(dtype, B, H, S, L, D, split, block_l, poison_empty):
    q, k, v = _inputs(B, H, S, L, D, dtype)
    mask = _cache_mask(B, L, [L // 3, L - 1][:B])
    cfg = plan(S, L, D, split=split, block_l=block_l)
    assert cfg.split == split
    out = decode_attention(q, k, v, mask, 0.3, cfg)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.3)
    assert out.dtype == dtype and out.shape == (B, H, S, D) and out.is_contiguous()  # as the op's fake says
    torch.testing.assert_close(out.float(), ref, atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3)


def test_without_a_mask_and_with_the_default_scale():
    q, k, v = _inputs(2, 2, 3, 40, 16)
    torch.testing.assert_close(decode_attention(q, k, v, None), F.scaled_dot_product_attention(q, k, v))


def test_a_mask_per_row_and_head_and_a_row_that_sees_nothing_gives_zero():
    q, k, v = _inputs(1, 2, 3, 20, 8)
    mask = torch.rand(1, 2, 3, 20, generator=torch.Generator().manual_seed(1)) > 0.5
    mask[0, 1, 2] = False  # SDPA's math path returns 0 for such a row
    for split in (1, 2):
        out = decode_attention(q, k, v, mask, None, plan(3, 20, 8, split=split, block_l=16))
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        assert torch.equal(out[0, 1, 2], torch.zeros(8))


def test_strided_inputs_are_read_through_their_strides():
    q, k, v = _inputs(1, 4, 1, 32, 16)
    k_t = k.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, L, D] with heads innermost but one
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    mask = _cache_mask(1, 32, [20])
    torch.testing.assert_close(decode_attention(q_t, k_t, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_cache_rows_past_the_last_visible_key_are_not_loaded(record_loads):
    B, H, S, L, D = 1, 1, 2, 64, 8
    q, k, v = _inputs(B, H, S, L, D)
    decode_attention(q, k, v, _cache_mask(B, L, [9]), None, plan(S, L, D, block_l=16))
    rows = record_loads.rows_read(k[0, 0])
    assert rows[:10].all() and not rows[10:].any()


# ------------------------------------------------------------------ the rewrite


def test_the_decode_programs_attention_is_rewritten_and_decodes_the_same_tokens(tiny_llama_art, decode_with):
    art, entry = tiny_llama_art
    layers = entry.load().config.num_hidden_layers
    decode = art.module("decode", compiled=False)
    rewritten, n = use_decode_attention(decode)
    assert n == layers
    op = torch.ops.optc.decode_attention.default
    assert sum(node.target == op for node in rewritten.graph.nodes) == layers
    assert not decode_sdpa_nodes(rewritten.graph) and not any(node.target == op for node in decode.graph.nodes)
    # The prefill program's length is dynamic: its row count is unknown, so it keeps SDPA.
    assert decode_sdpa_nodes(art.module("prefill", compiled=False).graph) == []
    got, expected = decode_with(lambda m: use_decode_attention(m)[0])
    assert torch.equal(got, expected)


def _sdpa_graph(rows: int = 1, keys: int = 16, **kwargs) -> torch.fx.GraphModule:
    aten = torch.ops.aten
    g = torch.fx.Graph()
    q, k, v, m = (g.placeholder(n) for n in "qkvm")
    g.output(g.call_function(aten.scaled_dot_product_attention.default, (q, k, v, m), kwargs))
    shapes = [(1, 2, rows, 8), (1, 2, keys, 8), (1, 2, keys, 8), (1, 1, 1, keys)]
    for node, shape, dtype in zip(g.nodes, shapes, [torch.float32] * 3 + [torch.bool]):
        node.meta["val"] = torch.empty(shape, dtype=dtype, device="meta")
    return torch.fx.GraphModule(torch.nn.Module(), g)


def test_only_what_the_kernel_computes_exactly_is_rewritten():
    assert len(decode_sdpa_nodes(_sdpa_graph().graph)) == 1
    assert len(decode_sdpa_nodes(_sdpa_graph(scale=0.5).graph)) == 1
    assert decode_sdpa_nodes(_sdpa_graph(dropout_p=0.1).graph) == []
    assert decode_sdpa_nodes(_sdpa_graph(is_causal=True).graph) == []
    assert decode_sdpa_nodes(_sdpa_graph(enable_gqa=True).graph) == []
    float_mask = _sdpa_graph()
    next(n for n in float_mask.graph.nodes if n.name == "m").meta["val"] = torch.empty(1, 1, 1, 16, device="meta")
    assert decode_sdpa_nodes(float_mask.graph) == []  # additive masks stay with SDPA


def test_only_decode_attention_over_a_measured_cache_length_is_rewritten():
    assert len(decode_sdpa_nodes(_sdpa_graph(rows=16, keys=decode_sdpa.MAX_KEYS).graph)) == 1
    assert decode_sdpa_nodes(_sdpa_graph(keys=decode_sdpa.MAX_KEYS + 1).graph) == []  # not timed
    assert decode_sdpa_nodes(_sdpa_graph(rows=16, keys=16).graph) == []  # an encoder's self-attention


def test_lower_applies_it_only_for_targets_that_ask(monkeypatch):
    rewritten = []
    use = lowering.use_decode_attention
    monkeypatch.setattr(lowering, "use_decode_attention", lambda gm: rewritten.append(gm) or use(gm))
    cpu = targets.get("cpu")
    asks = dataclasses.replace(cpu, decode_attention=True)
    gm = _sdpa_graph(scale=0.5)
    q, k, v = _inputs(1, 2, 1, 16, 8)[0], *_inputs(1, 2, 16, 16, 8)[1:]
    mask = _cache_mask(1, 16, [5])
    for target in (cpu, asks):
        torch.testing.assert_close(lowering.lower(gm, target)(q, k, v, mask), gm(q, k, v, mask))
    assert rewritten == [gm]


def test_the_default_launch_gives_a_program_a_bounded_share_of_a_long_cache():
    from optc.compiler.codegen.kernels.decode_attention import KEYS_PER_PROGRAM

    assert plan(4, KEYS_PER_PROGRAM, 64).split == 1  # the launch timed at Llama-1B's cache
    assert plan(4, 8 * KEYS_PER_PROGRAM, 64).split == 8
    assert plan(4, 8 * KEYS_PER_PROGRAM, 64, split=2).split == 2  # asked for
