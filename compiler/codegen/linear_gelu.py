"""An MLP's first linear and the GELU after it run as one kernel, optc::linear_gelu.

Without autotuning, Inductor computes a linear with cuBLAS and its GELU in a pointwise
kernel of its own, which reads and writes the whole activation again (the linear's output
is four times the hidden size); kernels/linear_gelu.py applies the bias and the GELU to the
accumulator before its one store. Merged encoders are always lowered that way (their
layers each have their own token count, so autotuning is off: lowering.load_lowering).

Rewritten: `gelu(linear(x, W, b))`, exact or tanh, where the linear's only reader is the
GELU and W is a static 2D weight. Like the other lowering rewrites it works on a copy
used for lowering; the lowering check compares it with the program itself (the fused
kernel does not round the linear's output to the activation dtype before the GELU, so it
differs from the program by that rounding). Targets ask for it with `linear_gelu`
(compiler/targets.py).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from optc.compiler.rewrite import node_dtype, node_shape, with_calls_replaced

aten = torch.ops.aten
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _approximate(gelu: fx.Node) -> str:
    return gelu.kwargs.get("approximate", gelu.args[1] if len(gelu.args) > 1 else "none")


def linear_gelu_pairs(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node]]:
    """(linear, gelu) for each GELU of `graph` whose input is a linear read by nothing else."""
    found = []
    for gelu in graph.nodes:
        if gelu.op != "call_function" or gelu.target != aten.gelu.default:
            continue
        linear = gelu.args[0]
        if not (isinstance(linear, fx.Node) and linear.target == aten.linear.default and len(linear.users) == 1):
            continue
        x, w = linear.args[0], linear.args[1]
        shape = node_shape(w)
        if shape is None or len(shape) != 2 or not all(isinstance(d, int) for d in shape):
            continue
        if node_dtype(x) in _DTYPES and node_dtype(x) == node_dtype(w) and _approximate(gelu) in ("none", "tanh"):
            found.append((linear, gelu))
    return found


def _calls(graph: fx.Graph) -> list[tuple[fx.Node, tuple]]:
    calls = []
    for linear, gelu in linear_gelu_pairs(graph):
        bias = linear.args[2] if len(linear.args) > 2 else linear.kwargs.get("bias")
        calls.append((gelu, (linear.args[0], linear.args[1], bias, _approximate(gelu))))
    return calls


def _linear_gelu_op():
    from optc.compiler.codegen import linear_gelu_ops  # noqa: F401  (registers optc::linear_gelu)
    return torch.ops.optc.linear_gelu.default


def use_linear_gelu(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of `gm` (sharing its parameters) whose linear + GELU pairs call
    optc::linear_gelu, and how many it rewrote; `gm` itself when there are none."""
    rewritten, count = with_calls_replaced(gm, _calls, _linear_gelu_op)
    if count:  # the linears the op took over are read by nothing now
        for node in list(rewritten.graph.nodes):
            if node.target == aten.linear.default and not node.users:
                rewritten.graph.erase_node(node)
        rewritten.recompile()
    return rewritten, count
