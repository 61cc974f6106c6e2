"""optc::decode_qkv's Triton kernel against the graph's own arithmetic (under the
interpreter), and the decode_qkv rewrite that puts it into a decode program's lowered copy."""

import dataclasses

import pytest
import torch

from optc.compiler import targets
from optc.compiler.codegen import lowering
from optc.compiler.codegen.decode_qkv import decode_qkv_matches, use_decode_qkv
from optc.compiler.codegen.kernels.decode_qkv import QkvTile, decode_qkv


def _rope_tables(D, position, base=10000.0):
    freqs = position / base ** (torch.arange(0, D, 2).float() / D)
    emb = torch.cat([freqs, freqs])
    return emb.cos(), emb.sin()


def _as_hf_computes(x, g, eps, wq, wk, wv, cos, sin, D):
    """RMSNorm, projections and rotate_half rotary as HF Llama writes them, in fp32."""
    h = g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def heads(w, rotate):
        t = (h @ w.T).view(1, 1, -1, D).transpose(1, 2)
        if not rotate:
            return t.reshape(-1)
        rotated = torch.cat([-t[..., D // 2:], t[..., :D // 2]], dim=-1)
        return (t * cos + rotated * sin).reshape(-1)

    return torch.cat([heads(wq, True), heads(wk, True), heads(wv, False)])


@pytest.mark.parametrize("K,D,Hq,Hkv,tile", [
    (40, 8, 4, 2, QkvTile(1, 16, 1)),   # K not a tile multiple, GQA, one pair a program
    (40, 8, 4, 2, QkvTile(2, 16, 1)),   # two pairs a program
    (64, 16, 2, 2, QkvTile(8, 64, 1)),  # a whole head a program, one trip, q and k of one shape
])
def test_the_kernel_computes_norm_projections_and_rotary(K, D, Hq, Hkv, tile):
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(1, 1, K, generator=gen), torch.randn(K, generator=gen)
    wq, wk, wv = (torch.randn(h * D, K, generator=gen) for h in (Hq, Hkv, Hkv))
    cos, sin = _rope_tables(D, 5.0)
    out = decode_qkv(x, g, 1e-6, wq, wk, wv, cos.view(1, 1, 1, D), sin.view(1, 1, 1, D), D, tile)
    expected = _as_hf_computes(x, g, 1e-6, wq, wk, wv, cos, sin, D)
    assert out.shape == ((Hq + 2 * Hkv) * D,) and out.dtype == x.dtype
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_the_kernel_refuses_a_tile_that_splits_a_rotary_pair_across_programs():
    x, g, w = torch.randn(1, 1, 16), torch.randn(16), torch.randn(8, 16)
    cos, sin = _rope_tables(8, 1.0)
    with pytest.raises(AssertionError, match="block_p 3 must divide 4"):
        decode_qkv(x, g, 1e-6, w, w, w, cos, sin, 8, QkvTile(3, 16, 1))


# ------------------------------------------------------------------ the rewrite


def test_every_layer_of_the_decode_program_is_rewritten_and_decodes_the_same_tokens(tiny_llama_art, decode_with):
    art, entry = tiny_llama_art
    layers = entry.load().config.num_hidden_layers
    decode = art.module("decode", compiled=False)
    assert len(decode_qkv_matches(decode.graph)) == layers
    rewritten, n = use_decode_qkv(decode)
    assert n == layers
    op = torch.ops.optc.decode_qkv.default
    assert sum(node.target == op for node in rewritten.graph.nodes) == layers
    # The projections it computes are gone from the copy; the program keeps them.
    linears = [node for node in rewritten.graph.nodes if node.target == torch.ops.aten.linear.default]
    assert len(linears) == 4 * layers + 1  # o, gate, up, down a layer, and the LM head
    assert not any(node.target == op for node in decode.graph.nodes)
    # The prefill program takes several rows: it keeps Inductor's lowering.
    assert decode_qkv_matches(art.module("prefill", compiled=False).graph) == []
    got, expected = decode_with(lambda m: use_decode_qkv(m)[0])
    assert torch.equal(got, expected)


def test_the_rewritten_step_computes_the_programs_logits(tiny_llama_art):
    art, entry = tiny_llama_art
    decode = art.module("decode", compiled=False)
    rewritten, _ = use_decode_qkv(decode)
    ids, position = entry.example_inputs()[0][:, :1], torch.tensor([3])
    # Both read and write the same caches: run each from the same cache state.
    caches = {name: buf.clone() for name, buf in decode.named_buffers()}
    expected = decode(input_ids=ids, cache_position=position)
    for name, buf in decode.named_buffers():
        buf.copy_(caches[name])
    got = rewritten(input_ids=ids, cache_position=position)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_a_projection_with_a_bias_is_left_to_inductor(bias):
    from transformers import LlamaConfig, LlamaForCausalLM

    from optc.compiler import capture

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=bias)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    captured = capture.capture(model, (torch.zeros(1, 4, dtype=torch.long),), max_cache_len=32)
    decode = captured.programs["decode"].module()
    assert len(decode_qkv_matches(decode.graph)) == (0 if bias else 1)
    if bias:
        assert use_decode_qkv(decode) == (decode, 0)


def test_the_lowered_graph_has_it_only_for_targets_that_ask(monkeypatch, tiny_llama_art):
    art, _ = tiny_llama_art
    decode = art.module("decode", compiled=False)
    seen = []
    use = lowering.use_decode_qkv
    monkeypatch.setattr(lowering, "use_decode_qkv", lambda gm: seen.append(gm) or use(gm))
    cpu = targets.get("cpu")
    assert lowering.target_graph(decode, cpu, forward=False) is decode
    rewritten = lowering.target_graph(decode, dataclasses.replace(cpu, decode_qkv=True), forward=False)
    assert seen == [decode] and any(n.target == torch.ops.optc.decode_qkv.default for n in rewritten.graph.nodes)
