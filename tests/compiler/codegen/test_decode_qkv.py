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


@pytest.mark.parametrize("position,written,tile,layout", [
    (4, True, QkvTile(1, 16, 1), "contiguous"),
    (4, True, QkvTile(2, 16, 1), "heads_second"),  # two pairs a program; caches [1, L, H, D] transposed
    (6, False, QkvTile(1, 16, 1), "contiguous"),   # past a cache of 6 positions
    (-1, False, QkvTile(2, 16, 1), "contiguous"),
])
def test_the_kernel_writes_k_and_v_into_the_caches_at_the_position(position, written, tile, layout):
    K, D, Hq, Hkv, L = 40, 8, 4, 2, 6
    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(1, 1, K, generator=gen), torch.randn(K, generator=gen)
    wq, wk, wv = (torch.randn(h * D, K, generator=gen) for h in (Hq, Hkv, Hkv))
    cos, sin = _rope_tables(D, float(max(position, 0)))
    if layout == "contiguous":
        k_cache, v_cache = torch.randn(1, Hkv, L, D, generator=gen), torch.randn(1, Hkv, L, D, generator=gen)
    else:
        k_cache, v_cache = (torch.randn(1, L, Hkv, D, generator=gen).transpose(1, 2) for _ in range(2))
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    out = decode_qkv(x, g, 1e-6, wq, wk, wv, cos, sin, D, tile, caches=(k_cache, v_cache, torch.tensor([position])))
    expected = _as_hf_computes(x, g, 1e-6, wq, wk, wv, cos, sin, D)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if written:
        expected_k[0, :, position] = expected[Hq * D:(Hq + Hkv) * D].view(Hkv, D)
        expected_v[0, :, position] = expected[(Hq + Hkv) * D:].view(Hkv, D)
    torch.testing.assert_close(k_cache, expected_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_cache, expected_v, atol=1e-5, rtol=1e-5)


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


def _cached_ops(gm):
    return sum(node.target == torch.ops.optc.decode_qkv_cached.default for node in gm.graph.nodes)


def test_with_the_cache_write_every_layer_writes_its_caches_in_the_op(tiny_llama_art, decode_with):
    art, entry = tiny_llama_art
    layers = entry.load().config.num_hidden_layers
    decode = art.module("decode", compiled=False)
    rewritten, n = use_decode_qkv(decode, write_cache=True)
    assert n == layers == _cached_ops(rewritten)
    assert not any(node.target == torch.ops.aten.index_copy_.default for node in rewritten.graph.nodes)
    ids, position = entry.example_inputs()[0][:, :1], torch.tensor([3])
    before = {name: buf.clone() for name, buf in decode.named_buffers()}
    expected = decode(input_ids=ids, cache_position=position)
    written = {name: buf.clone() for name, buf in decode.named_buffers()}
    for name, buf in decode.named_buffers():
        buf.copy_(before[name])
    got = rewritten(input_ids=ids, cache_position=position)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    for name, buf in decode.named_buffers():  # the caches (and the position counters) as the program left them
        torch.testing.assert_close(buf, written[name], atol=1e-5, rtol=1e-5)
    tokens, expected_tokens = decode_with(lambda m: use_decode_qkv(m, write_cache=True)[0])
    assert torch.equal(tokens, expected_tokens)


def test_a_node_between_the_two_cache_writes_keeps_them_in_the_graph(tiny_llama_art):
    art, _ = tiny_llama_art
    decode = art.module("decode", compiled=False)
    graph = decode.graph
    # The op takes the place of the first layer's k write; a read of the v cache (here of its
    # node; an alias of the same tensor would do) between that and the v write would see the
    # new value if the op wrote it.
    k_write, v_write = [n for n in graph.nodes if n.target == torch.ops.aten.index_copy_.default][:2]
    with graph.inserting_before(v_write):
        read = graph.call_function(torch.ops.aten.clone.default, (v_write.args[0],))
    try:
        rewritten, n = use_decode_qkv(decode, write_cache=True)
        assert n == _cached_ops(rewritten) + 1  # that layer gets the op without the writes
        writes = [node for node in rewritten.graph.nodes if node.target == torch.ops.aten.index_copy_.default]
        assert [w.args[0].target for w in writes] == [k_write.args[0].target, v_write.args[0].target]
    finally:
        graph.erase_node(read)


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
    monkeypatch.setattr(lowering, "use_decode_qkv", lambda gm, **kw: seen.append(gm) or use(gm, **kw))
    cpu = targets.get("cpu")
    assert lowering.target_graph(decode, cpu, forward=False) is decode
    rewritten = lowering.target_graph(decode, dataclasses.replace(cpu, decode_qkv=True), forward=False)
    assert seen == [decode] and any(n.target == torch.ops.optc.decode_qkv.default for n in rewritten.graph.nodes)
    assert _cached_ops(rewritten) == 0
    cached = lowering.target_graph(decode, dataclasses.replace(cpu, decode_qkv_cache=True), forward=False)
    assert _cached_ops(cached) == len(decode_qkv_matches(decode.graph)) > 0
