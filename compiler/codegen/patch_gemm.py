"""A convolution whose kernel tiles its input (a ViT's patch embedding) runs as one GEMM.

A 2D convolution with stride equal to its kernel, no padding, no dilation and one group
reads every input pixel once: it is a matrix product of the image cut into patches
[B * H' * W', C * kh * kw] with the kernel as a [C * kh * kw, O] matrix. cuDNN runs it as
an implicit-GEMM convolution over three input channels, with layout conversions around it,
many times the time of the GEMM's FLOPs: on the H100 a seventh of ViT-B/16's forward at
batch 1 (benchmarks/NOTES.md, "The patch embedding as a GEMM"). Here the copy lowered for
the target cuts the image into patches (one permuted copy of the input, which Inductor
fuses with whatever produced it) and calls one matmul; the output is the convolution's
[B, O, H', W'] as a permuted view, so that ViT's `flatten(2).transpose(1, 2)` reads the
GEMM's rows as they lie. The sums run in another order than cuDNN's, so the lowering check
compares the copy with the program itself, as for every lowering rewrite.

Targets ask for it with `patch_gemm` (compiler/targets.py).
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch.fx.operator_schemas import normalize_function

from optc.compiler.rewrite import node_shape
from optc.compiler.torch_private import detect_fake_mode, python_dispatcher

aten = torch.ops.aten
_CONVOLUTIONS = (aten.conv2d.default, aten.convolution.default)


def _patch_conv(node: fx.Node) -> tuple | None:
    """(input, weight, bias, (B, C, H, W), (O, kh, kw)) if `node` is a 2D convolution that
    tiles its input exactly (stride = kernel, no padding, dilation 1, one group, H and W
    multiples of the kernel, not transposed); else None. B may be symbolic."""
    if node.op != "call_function" or node.target not in _CONVOLUTIONS:
        return None
    norm = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    if norm is None:
        return None
    kw = norm.kwargs
    x, weight = kw["input"], kw["weight"]
    x_shape, w_shape = node_shape(x), node_shape(weight)
    if x_shape is None or w_shape is None or len(x_shape) != 4 or len(w_shape) != 4:
        return None
    if not all(isinstance(d, int) for d in (*x_shape[1:], *w_shape)):
        return None  # a symbolic image size or channel count: the patch grid is not known (a batch may be)
    kernel = tuple(w_shape[2:])
    stride, padding, dilation = (_pair(kw.get(k, default)) for k, default in
                                 (("stride", 1), ("padding", 0), ("dilation", 1)))
    if kw.get("transposed", False) or any(_pair(kw.get("output_padding", 0))) or kw.get("groups", 1) != 1:
        return None
    if stride != kernel or padding != (0, 0) or dilation != (1, 1) or w_shape[1] != x_shape[1]:
        return None
    if x_shape[2] % kernel[0] or x_shape[3] % kernel[1]:
        return None  # the convolution would drop the last rows or columns
    return x, weight, kw.get("bias"), tuple(x_shape), (w_shape[0], *kernel)


def _pair(value) -> tuple:
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    return value * 2 if len(value) == 1 else value


def _matches(graph: fx.Graph) -> list[tuple[fx.Node, tuple]]:
    """(convolution, _patch_conv's reading of it) for each one use_patch_gemms rewrites."""
    return [(n, m) for n in graph.nodes if (m := _patch_conv(n)) is not None]


def patch_convolutions(graph: fx.Graph) -> list[fx.Node]:
    """The convolutions of `graph` that use_patch_gemms rewrites."""
    return [n for n, _ in _matches(graph)]


def _insert_gemm(graph: fx.Graph, x, weight, bias, x_shape, w_shape) -> list[fx.Node]:
    """The nodes computing the convolution as a GEMM, in order, the last one its output."""
    (B, C, H, W), (O, kh, kw) = x_shape, w_shape
    # A symbolic batch is left to the reshapes to infer (-1); a static one is spelled out, since
    # -1 cannot be inferred for an empty batch.
    B = B if isinstance(B, int) else -1
    rows, cols = H // kh, W // kw
    inserted = []

    def call(op, args):
        inserted.append(graph.call_function(op, args))
        return inserted[-1]

    patches = call(aten.permute.default, (call(aten.reshape.default, (x, [B, C, rows, kh, cols, kw])),
                                          [0, 2, 4, 1, 3, 5]))
    patches = call(aten.reshape.default, (patches, [B * rows * cols if B >= 0 else -1, C * kh * kw]))
    matrix = call(aten.t.default, (call(aten.reshape.default, (weight, [O, C * kh * kw])),))
    out = call(aten.addmm.default, (bias, patches, matrix)) if bias is not None else \
        call(aten.mm.default, (patches, matrix))
    call(aten.permute.default, (call(aten.reshape.default, (out, [B, rows, cols, O])), [0, 3, 1, 2]))
    return inserted


def _describe(nodes: list[fx.Node], like: fx.Node) -> None:
    """Give the inserted `nodes` `like`'s metadata (its module path, source line) and each
    its own value, computed on the fake tensors the program was traced with: the rewrites
    after this one read shapes and strides from it."""
    fake_mode = detect_fake_mode([like.meta.get("val")])
    for node in nodes:
        node.meta = {k: v for k, v in like.meta.items() if k != "val"}
        if fake_mode is None or any(a.meta.get("val") is None for a in node.all_input_nodes):
            continue  # left without a value, as any node whose inputs have none
        with fake_mode, python_dispatcher():
            node.meta["val"] = node.target(*fx.map_arg(node.args, lambda a: a.meta["val"]))


def use_patch_gemms(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """A copy of `gm` (sharing its parameters) whose patch convolutions run as one GEMM
    each, and how many; `gm` itself when there are none."""
    if not patch_convolutions(gm.graph):
        return gm, 0
    graph = copy.deepcopy(gm.graph)  # keeps the graph's codegen (its input and output trees)
    found = _matches(graph)
    for node, (x, weight, bias, x_shape, w_shape) in found:
        with graph.inserting_before(node):
            inserted = _insert_gemm(graph, x, weight, bias, x_shape, w_shape)
        _describe(inserted, node)
        node.replace_all_uses_with(inserted[-1])
        graph.erase_node(node)
    rewritten = fx.GraphModule(gm, graph)
    rewritten.meta.update(gm.meta)
    return rewritten, len(found)
