"""The noisy twin of a half-precision graph: the same graph, sharing its tensors, with
the result of every op that rounds moved by one unit in the last place. Running it tells
how far the program's output moves when its activations round differently, which is
what a correct lowering does (lowering.rounding_noise)."""

from __future__ import annotations

import torch

from optc.compiler.rewrite import rebuild
from optc.compiler.torch_private import op_schema

HALF = (torch.float16, torch.bfloat16)


def noisy_twin(reference) -> torch.nn.Module | None:
    """A copy of a GraphModule `reference` (sharing its tensors) whose every rounding op
    moves its half-precision result by one ulp (one_ulp) before any other op reads it;
    None for other modules, whose noise is their weights'. Views and in-place writes are
    left alone (their results are other tensors' memory, the KV cache included), and so
    are ops that do not round (copies, selections, sign changes): moving a copy would
    undo the move of what it copies."""
    if not isinstance(reference, torch.fx.GraphModule):
        return None
    twin, _ = rebuild(reference)
    for node in list(twin.graph.nodes):
        if node.op != "call_function":
            continue
        cast = _casts(node)
        if not (cast or _rounds(node)):
            continue
        with twin.graph.inserting_after(node):
            moved = twin.graph.call_function(one_ulp, (node, node.args[0]) if cast else (node,))
        node.replace_all_uses_with(moved, delete_user_cb=lambda user: user is not moved)
    twin.recompile()
    return twin


# Ops tagged pointwise or reduction whose result is one of their inputs' values, exactly.
_EXACT_OPS = {"abs", "alias", "amax", "amin", "clamp", "clamp_max", "clamp_min", "clone", "copy", "detach",
              "fill", "hardtanh", "lift_fresh_copy", "masked_fill", "max", "maximum", "min", "minimum",
              "neg", "positive", "relu", "sign", "where"}
# Untagged ops that round their result: products, normalisations, softmax, attention.
_ROUNDING_OPS = {"addmm", "addmv", "baddbmm", "bmm", "conv1d", "conv2d", "conv3d", "convolution", "dot",
                 "einsum", "group_norm", "layer_norm", "linear", "log_softmax", "matmul", "mm", "mv",
                 "native_group_norm", "native_layer_norm", "rms_norm", "softmax", "_fused_rms_norm",
                 "_log_softmax", "_softmax", "scaled_dot_product_attention", "_scaled_dot_product_attention_math",
                 "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"}


def _rounds(node: torch.fx.Node) -> bool:
    schema = op_schema(node.target)
    if schema is None or any(r.alias_info is not None for r in schema.returns):
        return False  # a Python function, a view, or an in-place write
    namespace, _, name = schema.name.partition("::")
    if namespace != "aten":
        return True  # optc's kernels and other custom ops compute their results
    if name in _EXACT_OPS:
        return False
    tags = getattr(node.target, "tags", ())
    return torch.Tag.pointwise in tags or torch.Tag.reduction in tags or name in _ROUNDING_OPS


def _casts(node: torch.fx.Node) -> bool:
    """A dtype conversion; one_ulp checks at run time that it changed the dtype."""
    schema = op_schema(node.target)
    return getattr(schema, "name", "") in ("aten::to", "aten::_to_copy") and isinstance(node.args[0], torch.fx.Node)


def one_ulp(value, source=None):
    """`value` with each finite half-precision element's lowest mantissa bit flipped (a
    new tensor, same strides); with `source`, only where `value` was converted from
    another dtype. Non-finite elements stay: a flipped inf is a NaN."""
    if isinstance(value, (tuple, list)):
        return type(value)(one_ulp(v) for v in value)
    if not isinstance(value, torch.Tensor) or value.dtype not in HALF or value.numel() == 0:
        return value
    if source is not None and (not isinstance(source, torch.Tensor) or source.dtype == value.dtype):
        return value
    moved = value.view(torch.int16).bitwise_xor(1).view(value.dtype)
    return torch.where(torch.isfinite(value), moved, value)
