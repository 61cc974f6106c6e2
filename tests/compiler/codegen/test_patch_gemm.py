"""patch_gemm: a convolution that tiles its input (ViT's patch embedding) runs as one GEMM
in the graph the target lowers; the program itself keeps its convolution; convolutions
that overlap, pad, dilate, group or leave a remainder are left alone; the lowered program
gives what the program gives."""

import dataclasses

import pytest
import torch

from optc.compiler import capture, targets
from optc.compiler.codegen import lowering
from optc.compiler.codegen.patch_gemm import patch_convolutions, use_patch_gemms

aten = torch.ops.aten
PATCHING = dataclasses.replace(targets.get("cpu"), patch_gemm=True)
NOT_PATCHING = dataclasses.replace(targets.get("cpu"), patch_gemm=False)


def _convolutions(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target))


def _gemms(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.target in (aten.mm.default, aten.addmm.default))


def test_vits_patch_embedding_becomes_a_gemm_in_a_copy(vit_captured):
    _, captured = vit_captured
    gm = capture.graph_module(captured.programs["forward"])
    patched, count = use_patch_gemms(gm)
    assert count == 1 and _convolutions(patched) == 0 and _gemms(patched) == 1
    assert _convolutions(gm) == 1  # the program keeps its convolution
    assert all(a is b for a, b in zip(patched.parameters(), gm.parameters()))
    args = captured.example_inputs["forward"]
    torch.testing.assert_close(patched(*args[0], **args[1]), gm(*args[0], **args[1]), rtol=1e-5, atol=1e-5)
    # Each inserted node carries its value, so the rewrites after this one read true shapes.
    gemm = next(n for n in patched.graph.nodes if n.target == aten.addmm.default)
    assert tuple(gemm.meta["val"].shape) == (2 * 4 * 4, 64)


class _Conv(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.conv = torch.nn.Conv2d(**{"in_channels": 4, "out_channels": 6, "kernel_size": 4, "stride": 4, **kw})

    def forward(self, x):
        return self.conv(x).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("kw, size, rewritten", [
    ({}, 16, True),
    ({"bias": False}, 16, True),
    ({"kernel_size": (2, 4), "stride": (2, 4)}, 16, True),
    ({"stride": 2}, 16, False),  # overlapping windows
    ({"padding": 1}, 16, False),
    ({"dilation": 2, "stride": 8}, 16, False),
    ({"groups": 2}, 16, False),
    ({}, 18, False),  # the convolution drops the last two rows and columns
])
def test_only_a_convolution_that_tiles_its_input(kw, size, rewritten):
    torch.manual_seed(0)
    model = _Conv(**kw).eval()
    x = torch.randn(3, 4, size, size)
    gm = torch.export.export(model, (x,)).module()
    patched, count = use_patch_gemms(gm)
    assert count == int(rewritten) and (patched is gm) == (not rewritten)
    torch.testing.assert_close(patched(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_symbolic_batch_is_rewritten_a_symbolic_image_is_not():
    model = _Conv().eval()
    batch, side = torch.export.Dim("batch", min=2), torch.export.Dim("side", min=2, max=8)
    ep = torch.export.export(model, (torch.randn(3, 4, 16, 16),), dynamic_shapes=({0: batch},))
    patched, count = use_patch_gemms(ep.module())
    assert count == 1
    for n in (2, 5):
        x = torch.randn(n, 4, 16, 16)
        torch.testing.assert_close(patched(x), model(x), rtol=1e-5, atol=1e-5)
    ep = torch.export.export(model, (torch.randn(3, 4, 16, 16),), dynamic_shapes=({2: 4 * side, 3: 4 * side},))
    assert patch_convolutions(ep.module().graph) == []


def test_lowered_and_verified_and_recorded(vit_captured):
    """Inductor (CPU) lowers the patched copy; the check against the program passes, and
    the lowering record names the rewrite, so a kernel cache recorded without it is not used."""
    _, captured = vit_captured
    ep = captured.programs["forward"]
    result = lowering.lower_and_verify(ep, captured.example_inputs["forward"], PATCHING, "forward")
    assert result["ok"], result
    assert lowering.lowering_record(PATCHING)["patch_gemm"] is True
    assert lowering.lowering_record(NOT_PATCHING)["patch_gemm"] is False
    assert _convolutions(lowering.target_graph(capture.graph_module(ep), PATCHING, forward=True)) == 0


def test_a_variant_may_switch_it():
    assert not targets.with_overrides(targets.get("cpu"), ["patch_gemm=false"]).patch_gemm
    assert targets.with_overrides(targets.get("a100"), ["patch_gemm=true"]).patch_gemm
    assert "patch_gemm=true" in targets.lowering_words(PATCHING)
    # Named only when on: what a device's history recorded before the switch existed still matches.
    assert "patch_gemm" not in targets.lowering_words(NOT_PATCHING)


def _deit():
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    cfg = DeiTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, num_labels=10)
    return DeiTForImageClassificationWithTeacher(cfg)


def _clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128)
    return CLIPVisionModel(cfg)  # its patch embedding has no bias


@pytest.mark.parametrize("build", [_deit, _clip_vision])
def test_other_vision_transformers(build):
    torch.manual_seed(0)
    model = build().eval().requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    captured = capture.capture(model, (x,))
    gm = capture.graph_module(captured.programs["forward"])
    patched, count = use_patch_gemms(gm)
    assert count == 1 and _convolutions(patched) == 0
    args = captured.example_inputs["forward"]
    torch.testing.assert_close(patched(*args[0], **args[1]), gm(*args[0], **args[1]), rtol=1e-5, atol=1e-5)
