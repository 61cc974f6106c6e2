"""optc::gemv's Triton kernel against F.linear (under the interpreter), its stored tiles,
and the decode_gemv rewrite that puts it into a decode program's lowered copy."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from optc.compiler import targets
from optc.compiler.codegen import lowering
from optc.compiler.codegen.decode_gemv import decode_gemv_nodes, use_decode_gemv
from optc.compiler.codegen.decode_sdpa import use_decode_attention
from optc.compiler.codegen.gemv_inputs import realize_gemv_inputs
from optc.compiler.codegen.kernels.dense_gemv import GemvTile, dense_gemv
from optc.compiler.codegen.kernels.gemv_tiles import default_tile, gemv_tile


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N,K,tile", [
    (64, 128, GemvTile(block_n=8, block_k=32, num_warps=1)),           # whole tiles, one slice
    (37, 100, GemvTile(block_n=8, block_k=32, num_warps=1)),           # N and K not tile multiples
    (37, 100, GemvTile(block_n=4, block_k=16, num_warps=1, split=3)),  # K split, partials summed
    (5, 40, GemvTile(block_n=16, block_k=64, num_warps=1, split=4)),   # more split than chunks
])
@pytest.mark.parametrize("bias", [False, True])
def test_the_kernel_computes_linear(dtype, N, K, tile, bias, poison_empty):
    gen = torch.Generator().manual_seed(N * K)
    x = torch.randn(1, 1, K, generator=gen).to(dtype)
    w = torch.randn(N, K, generator=gen).to(dtype)
    b = torch.randn(N, generator=gen).to(dtype) if bias else None
    y = dense_gemv(x, w, b, tile)
    ref = F.linear(x.float(), w.float(), b.float() if bias else None)
    assert y.shape == (1, 1, N) and y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, atol=2e-2 if dtype == torch.float16 else 1e-4, rtol=1e-3)


def test_a_weight_with_padded_rows_is_read_through_its_stride():
    big = torch.randn(12, 48)
    w = big[:, :40]  # rows 48 apart
    x = torch.randn(40)
    torch.testing.assert_close(dense_gemv(x, w, None, GemvTile(4, 16, 1, 2)), w @ x)


def test_more_than_one_row_is_refused():
    with pytest.raises(AssertionError, match="one row"):
        dense_gemv(torch.randn(2, 8), torch.randn(4, 8), None, GemvTile(4, 8, 1))


@pytest.mark.parametrize("target", ["h100", "h200", "a100"])
@pytest.mark.parametrize("N,K", [(2048, 2048), (512, 2048), (2048, 8192), (8192, 2048), (128256, 2048), (7, 3)])
def test_every_tile_is_a_launchable_power_of_two_shape(target, N, K):
    tile = gemv_tile(target, N, K)
    for size in (tile.block_n, tile.block_k):
        assert size >= 1 and size & (size - 1) == 0
    assert tile.block_n * tile.block_k <= 16384 and tile.num_warps in (1, 2, 4, 8) and tile.split >= 1


def test_the_default_tile_fills_the_gpu_and_splits_only_a_short_grid():
    wide = default_tile("h200", 8192, 2048)
    assert -(-8192 // wide.block_n) >= 132 and wide.split == 1
    narrow = default_tile("h200", 64, 2048)
    assert narrow.split > 1


def test_the_decode_programs_o_and_down_projections_run_the_gemv_and_compute_the_same(tiny_llama_art, decode_with):
    art, entry = tiny_llama_art
    layers = entry.load().config.num_hidden_layers
    decode = art.module("decode", compiled=False)
    # The lowering's order: the down projections' inputs realised, attention on optc's kernel.
    prepared = use_decode_attention(realize_gemv_inputs(decode)[0])[0]
    found = decode_gemv_nodes(prepared.graph)
    # Two per layer: o (reads attention's output) and down (reads the realised silu(gate) * up).
    # q/k/v, gate/up and the LM head read a normalised vector and keep Inductor's reduction.
    assert len(found) == 2 * layers
    rewritten, n = use_decode_gemv(prepared)
    assert n == 2 * layers
    assert sum(node.target == torch.ops.optc.gemv.default for node in rewritten.graph.nodes) == 2 * layers
    assert not decode_gemv_nodes(rewritten.graph)
    name, weight = next(iter(decode.named_parameters()))
    assert rewritten.get_parameter(name) is weight  # shares the parameters
    got, expected = decode_with(lambda m: use_decode_gemv(use_decode_attention(realize_gemv_inputs(m)[0])[0])[0])
    assert torch.equal(got, expected)


def test_prefill_rows_are_not_rewritten(tiny_llama_art):
    art, _ = tiny_llama_art
    assert decode_gemv_nodes(art.module("prefill", compiled=False).graph) == []


def test_lower_applies_it_only_for_targets_that_ask(monkeypatch, tiny_llama_art):
    art, _ = tiny_llama_art
    decode = art.module("decode", compiled=False)
    cpu = targets.get("cpu")
    assert not cpu.decode_gemv
    asks = dataclasses.replace(cpu, realize_gemv_inputs=True, decode_gemv=True)
    assert lowering.target_graph(decode, cpu, forward=False) is decode
    compiled = lowering.target_graph(decode, asks, forward=False)
    assert any(node.target == torch.ops.optc.gemv.default for node in compiled.graph.nodes)
    assert targets.with_overrides(cpu, ["decode_gemv=true"]).decode_gemv
