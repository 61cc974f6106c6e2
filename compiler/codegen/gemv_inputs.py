"""Decode GEMVs read their input from memory, not from a recomputed expression.

On a GPU with coordinate-descent tuning on (every GPU target's lowering), Inductor
lowers a one-row matmul, a linear of a decode step, as a reduction, and inlines
the pointwise expression that produces its input vector into that reduction. Every
block of output rows then recomputes the expression over the whole vector: for a gated
MLP's down projection, silu(gate) * up over all intermediate channels, once per row
block, and the arithmetic rather than the weight bytes bounds the kernel
(benchmarks/NOTES.md, "Where the step's time goes"). Writing the vector to a buffer of
its own first costs one small pointwise kernel and leaves the GEMV streaming weights.

The rewrite is lossless in eager execution (the inserted op is the identity); under
Inductor it only changes where the value is rounded to the program's dtype (once when
stored, as eager does, instead of staying in fp32 inside the fused kernel).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.fx as fx

from optc.compiler.anatomy import ACTIVATIONS
from optc.compiler.rewrite import node_shape
from optc.compiler.torch_private import inductor_realize_op

aten = torch.ops.aten

VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
          aten.squeeze.dim, aten.squeeze.default, aten.flatten.using_ints}


def _computed_activation(node) -> bool:
    """Whether `node` (seen through views) is an activation, or a product with one
    operand an activation: the expressions worth computing once."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in VIEWS:
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target in ACTIVATIONS:
        return True
    return node.target == aten.mul.Tensor and any(
        isinstance(a, fx.Node) and a.op == "call_function" and a.target in ACTIVATIONS for a in node.args)


def one_row(node: fx.Node) -> bool:
    shape = node_shape(node)
    return shape is not None and len(shape) >= 1 and math.prod(shape[:-1]) == 1


def gemv_inputs(graph: fx.Graph) -> list[fx.Node]:
    """The linears of `graph` that multiply one row by a weight and take that row
    straight from an activation expression."""
    return [n for n in graph.nodes
            if n.op == "call_function" and n.target == aten.linear.default  # capture's form of every linear
            and isinstance(n.args[0], fx.Node) and one_row(n.args[0]) and _computed_activation(n.args[0])]


def biased_gemvs(graph: fx.Graph) -> list[fx.Node]:
    """The one-row linears of `graph` that add a bias."""
    return [n for n in graph.nodes
            if n.op == "call_function" and n.target == aten.linear.default and len(n.args) > 2
            and n.args[2] is not None and isinstance(n.args[0], fx.Node) and one_row(n.args[0])]


def _split_bias(graph: fx.Graph, lin: fx.Node) -> None:
    """linear(x, W, b) -> linear(x, W) + b. Inductor lowers a one-row linear as a
    reduction only without a bias (its addmm goes to GEMM templates or cuBLAS, which
    read a GEMV's weights at a fraction of the bandwidth: a pruned, bias-repaired down
    projection of llama-1b took 28 us for 25 MB); the add then fuses as its epilogue."""
    x, w, b = lin.args[:3]
    with graph.inserting_before(lin):
        product = graph.call_function(aten.linear.default, (x, w))
        biased = graph.call_function(aten.add.Tensor, (product, b))
    product.meta = dict(lin.meta)
    biased.meta = dict(lin.meta)
    lin.replace_all_uses_with(biased)
    graph.erase_node(lin)


def realize_gemv_inputs(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of `gm` (sharing its parameters) in which each such GEMV reads its input
    through the realizing op and adds its bias apart, and how many rewrites it made
    (inputs realized plus biases split). `gm` itself is left as it was: lowering checks
    compare the compiled copy against it."""
    if not gemv_inputs(gm.graph) and not biased_gemvs(gm.graph):
        return gm, 0  # most programs (prefill, forward): no copy
    graph = copy.deepcopy(gm.graph)  # keeps the graph's codegen (its input and output trees)
    biased = biased_gemvs(graph)
    for lin in biased:
        _split_bias(graph, lin)
    found = gemv_inputs(graph)
    realize = inductor_realize_op()
    for lin in found:
        x = lin.args[0]
        stride = list(torch.empty(node_shape(x), device="meta").stride())
        with graph.inserting_before(lin):
            stored = graph.call_function(realize, (x, stride))
        stored.meta = dict(x.meta)
        lin.replace_input_with(x, stored)
    rewritten = fx.GraphModule(gm, graph)
    rewritten.meta.update(gm.meta)
    return rewritten, len(found) + len(biased)
