"""Decode GEMVs read their input from a buffer (codegen/gemv_inputs): the rewrite finds
the down projections of a decode program, and only those, and changes nothing eagerly."""

import dataclasses

import torch

from optc.compiler import targets
from optc.compiler.codegen import lowering
from optc.compiler.codegen.gemv_inputs import gemv_inputs, realize_gemv_inputs
from optc.compiler.torch_private import inductor_realize_op


def test_the_decode_programs_down_projections_read_a_stored_vector_and_compute_the_same(tiny_llama_art, decode_with):
    art, entry = tiny_llama_art
    layers = entry.load().config.num_hidden_layers
    decode = art.module("decode", compiled=False)
    found = gemv_inputs(decode.graph)
    # One per layer: the down projection, fed by silu(gate) * up. The q/k/v, o and
    # gate/up projections read a normalised or attention vector and stay as they were.
    assert len(found) == layers
    rewritten, n = realize_gemv_inputs(decode)
    assert n == layers and rewritten is not decode
    realize = inductor_realize_op()
    assert sum(node.target == realize for node in rewritten.graph.nodes) == layers
    assert not any(node.target == realize for node in decode.graph.nodes)  # the original is untouched
    name, weight = next(iter(decode.named_parameters()))
    assert rewritten.get_parameter(name) is weight  # the same parameters (and caches), not copies
    got, expected = decode_with(lambda m: realize_gemv_inputs(m)[0])
    assert torch.equal(got, expected)


def test_prefill_rows_are_not_gemvs(tiny_llama_art):
    art, _ = tiny_llama_art
    assert gemv_inputs(art.module("prefill", compiled=False).graph) == []


def _graph(rows: int) -> torch.fx.GraphModule:
    """silu(x) -> linear with a bias, in the aten form capture produces, with shapes."""
    aten = torch.ops.aten
    g = torch.fx.Graph()
    x, w, b = g.placeholder("x"), g.placeholder("w"), g.placeholder("b")
    act = g.call_function(aten.silu.default, (x,))
    g.output(g.call_function(aten.linear.default, (act, w, b)))
    for node, shape in zip(g.nodes, [(1, rows, 8), (4, 8), (4,), (1, rows, 8), (1, rows, 4)]):
        node.meta["val"] = torch.empty(shape, device="meta")
    return torch.fx.GraphModule(torch.nn.Module(), g)


def test_a_one_row_linear_with_a_bias_adds_it_apart_and_reads_a_stored_input():
    gm = _graph(rows=1)
    rewritten, n = realize_gemv_inputs(gm)
    linears = [m for m in rewritten.graph.nodes if m.target == torch.ops.aten.linear.default]
    assert n == 2 and len(linears) == 1 and len(linears[0].args) == 2
    assert linears[0].args[0].target == inductor_realize_op()
    x, w, b = torch.randn(1, 1, 8), torch.randn(4, 8), torch.randn(4)
    torch.testing.assert_close(rewritten(x, w, b), gm(x, w, b))


def test_several_rows_are_left_alone():
    gm = _graph(rows=3)
    assert realize_gemv_inputs(gm) == (gm, 0)


def test_lower_applies_it_only_for_targets_that_ask(monkeypatch):
    rewritten = []
    realize = lowering.realize_gemv_inputs
    monkeypatch.setattr(lowering, "realize_gemv_inputs", lambda gm: rewritten.append(gm) or realize(gm))
    cpu = targets.get("cpu")
    assert not cpu.realize_gemv_inputs and targets.get("h200").realize_gemv_inputs
    asks = dataclasses.replace(cpu, realize_gemv_inputs=True)
    gm = _graph(rows=1)
    x, w, b = torch.randn(1, 1, 8), torch.randn(4, 8), torch.randn(4)
    for target in (cpu, asks):
        torch.testing.assert_close(lowering.lower(gm, target)(x, w, b), gm(x, w, b))
    assert rewritten == [gm]  # once: for the target that asks
