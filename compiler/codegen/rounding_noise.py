"""The rounding noise of a half-precision program: how far its output moves when every
value it holds or computes moves by one unit in the last place. The lowering check
(lowering.compare) accepts a lowering whose difference from the uncompiled program is of
this order, because a correct lowering only rounds differently."""

from __future__ import annotations

import torch

from optc.compiler.capture import is_state_buffer
from optc.compiler.rewrite import rebuild
from optc.compiler.torch_private import op_schema

_HALF = (torch.float16, torch.bfloat16)

# Buffers holding activation thresholds carry this prefix (sparsify_activations names
# them), so that verify() can find them in a thresholded program.
THRESHOLD_BUFFER_PREFIX = "sparsify_t_"


def reset_state(module: torch.nn.Module) -> None:
    """Zero a decoder's KV cache (buffers the program mutates), so two runs of a
    stateful program start from the same state."""
    for name, buf in module.named_buffers():
        if is_state_buffer(name):
            buf.zero_()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()
    return float("inf") if err != err else err  # NaN never passes


def flippable_weights(reference) -> list[torch.Tensor]:
    """The bf16/fp16 parameters and buffers rounding_noise may move by one ulp. Left
    alone: threshold buffers and any tensor holding an inf or NaN (a flipped inf is a
    NaN: a mask filled with -inf), and state buffers (the KV cache: reset_state zeroes
    it)."""
    return [t for name, t in _named_tensors(reference)
            if t.dtype in _HALF and t.numel() > 0 and not is_state_buffer(name)
            and not name.rsplit(".", 1)[-1].startswith(THRESHOLD_BUFFER_PREFIX)
            and bool(torch.isfinite(t).all())]


def rounding_noise(reference: torch.nn.Module, weights: list[torch.Tensor], ref_out: torch.Tensor,
                   args, kwargs, twin: torch.nn.Module | None = None) -> float:
    """How far the reference's output moves when every half-precision value it holds or
    computes moves by one unit in the last place: the lowest mantissa bit of each of
    `weights` (flippable_weights) is flipped in place (XOR, so flipping again restores it
    bit for bit) and `twin` (noisy_twin: the reference with each op's rounded result
    moved too; the reference itself if None) runs. A correct lowering only rounds
    differently (fused kernels keep fp32 intermediates, reductions reorder); its
    difference from the reference stays of this order however deep the program, while a
    wrong lowering lands far above it. Weights alone are not enough: an input whose
    output hinges on one activation's rounding (a token driving an outlier channel)
    barely moves when the weights move, yet any other rounding of that activation moves
    it as far as a lowering does."""
    if not weights and twin is None:
        return 0.0
    try:
        for t in weights:
            t.view(torch.int16).bitwise_xor_(1)
        reset_state(reference)
        flipped = (reference if twin is None else twin)(*args, **kwargs)
    finally:
        for t in weights:
            t.view(torch.int16).bitwise_xor_(1)
        reset_state(reference)
    return rel_err(flipped, ref_out)


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
    if not isinstance(value, torch.Tensor) or value.dtype not in _HALF or value.numel() == 0:
        return value
    if source is not None and (not isinstance(source, torch.Tensor) or source.dtype == value.dtype):
        return value
    moved = value.view(torch.int16).bitwise_xor(1).view(value.dtype)
    return torch.where(torch.isfinite(value), moved, value)


def _named_tensors(module):
    if not isinstance(module, torch.nn.Module):
        return
    seen = set()
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        if key not in seen:  # a weight held twice must be flipped once, not flipped back
            seen.add(key)
            yield name, t.data
