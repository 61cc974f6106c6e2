"""Decode GEMVs whose input is already in memory run optc::gemv with a stored tile.

Inductor lowers a one-row linear as a reduction tuned by coordinate descent in each
compile, which picks different tiles from one process to the next. optc::gemv
(codegen/gemv_ops.py) launches the tile kernels/gemv_tiles.py stores for the target.
Targets ask for it with `decode_gemv`; none does yet (kernels/dense_gemv.py says what
was measured).

Rewritten: a linear of one row whose input is a value that is written to memory
whatever the rewrite does (seen through views): a program input, the realising op of
gemv_inputs, SDPA's output, or an output of optc's ops (their Triton kernels write it; torch
ops an op's body runs after its kernel, such as a split launch's sum, may still fuse).
A linear whose input is computed in place (a norm, a rotary product) keeps Inductor's
reduction, into which that computation fuses. Like decode_sdpa, the rewrite works on a
copy used for lowering; the lowering check compares it with the program itself.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from optc.compiler.codegen.gemv_inputs import VIEWS, one_row
from optc.compiler.rewrite import node_dtype, node_shape, with_calls_replaced
from optc.compiler.torch_private import inductor_realize_op

aten = torch.ops.aten

# Ops that only rearrange a value already written (a copy of one is written too).
_THROUGH = VIEWS | {aten.transpose.int, aten.permute.default, aten.clone.default, aten.contiguous.default}
_UNFUSED = {aten.scaled_dot_product_attention.default, aten._scaled_dot_product_flash_attention.default,
            aten._scaled_dot_product_efficient_attention.default, aten._scaled_dot_product_cudnn_attention.default}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _written_anyway(node) -> bool:
    """Whether `node` (seen through views; a tuple's item through getitem) is a value
    Inductor writes to memory whatever its consumer."""
    while isinstance(node, fx.Node) and node.op == "call_function" and (
            node.target in _THROUGH or getattr(node.target, "__name__", "") == "getitem"):
        node = node.args[0]
    if not isinstance(node, fx.Node):
        return False
    if node.op == "placeholder":
        return True
    if node.op != "call_function":
        return False
    target = node.target
    return (target == inductor_realize_op() or target in _UNFUSED
            or getattr(target, "namespace", None) == "optc")


def decode_gemv_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The one-row linears of `graph` that optc::gemv computes, reading an input that
    is in memory anyway."""
    found = []
    for n in graph.nodes:
        if n.op != "call_function" or n.target != aten.linear.default:
            continue
        x, w = n.args[0], n.args[1]
        if not (isinstance(x, fx.Node) and isinstance(w, fx.Node) and one_row(x)):
            continue
        ws = node_shape(w)
        if ws is None or len(ws) != 2 or not all(isinstance(d, int) for d in ws):
            continue
        if node_dtype(x) in _DTYPES and node_dtype(x) == node_dtype(w) and _written_anyway(x):
            found.append(n)
    return found


def _calls(graph: fx.Graph) -> list[tuple[fx.Node, tuple]]:
    return [(lin, (*lin.args[:2], lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")))
            for lin in decode_gemv_nodes(graph)]


def _gemv_op():
    from optc.compiler.codegen import gemv_ops  # noqa: F401  (registers optc::gemv)
    return torch.ops.optc.gemv.default


def use_decode_gemv(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of `gm` (sharing its parameters) whose such GEMVs call optc::gemv, and how
    many it rewrote; `gm` itself when there are none."""
    return with_calls_replaced(gm, _calls, _gemv_op)
