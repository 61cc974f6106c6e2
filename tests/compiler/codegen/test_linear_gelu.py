"""linear_gelu: an MLP's first linear and its GELU as one kernel. The Triton kernel against
F.gelu(F.linear) under the interpreter; the rewrite, which takes only a linear read by a GELU
alone, in a copy of the program; the lowered copy passes the check against the program."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from optc.compiler import capture, targets
from optc.compiler.codegen import lowering
from optc.compiler.codegen.kernels.linear_gelu import NO_ACTIVATION, GemmTile, gemm_tile, linear_act, linear_gelu
from optc.compiler.codegen.linear_gelu import linear_gelu_pairs, use_linear_gelu

aten = torch.ops.aten
FUSING = dataclasses.replace(targets.get("cpu"), linear_gelu=True)
SMALL = GemmTile(16, 32, 16, num_warps=1, num_stages=1, group_m=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 24, 32, 64), (37, 20, 40, 33), (1, 5, 48, 16)])  # (batch, rows, K, N)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_the_kernel_computes_gelu_of_linear(dtype, shape, approximate, bias, poison_empty):
    batch, rows, k, n = shape
    gen = torch.Generator().manual_seed(batch * rows + k * n)
    x = torch.randn(batch, rows, k, generator=gen).to(dtype)
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    y = linear_gelu(x, w, b, approximate, SMALL)
    ref = F.gelu(F.linear(x.float(), w.float(), b.float() if bias else None), approximate=approximate)
    assert y.shape == (batch, rows, n) and y.dtype == dtype
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.float(), ref, **tol)


def test_without_an_activation_it_is_the_linear():  # how the GEMM alone is timed
    x, w, b = torch.randn(37, 40), torch.randn(33, 40), torch.randn(33)
    torch.testing.assert_close(linear_act(x, w, b, NO_ACTIVATION, SMALL), F.linear(x, w, b), atol=1e-5, rtol=1e-5)


def test_strided_input_and_weight_are_read_through_their_strides():
    x = torch.randn(10, 48)[:, :40]  # rows 48 apart
    w = torch.randn(24, 56)[:, 8:48]
    torch.testing.assert_close(linear_gelu(x, w, None, "none", SMALL), F.gelu(x @ w.T), atol=1e-5, rtol=1e-5)


def test_no_rows_give_an_empty_output():
    assert linear_gelu(torch.randn(0, 16), torch.randn(8, 16), None).shape == (0, 8)


def test_the_wide_tile_only_where_it_fills_the_gpu_twice():
    cuda = torch.device("cuda")
    assert gemm_tile(64 * 197, 3072, cuda).block_n == 256  # ViT-B/16's MLP at batch 64
    assert gemm_tile(197, 3072, cuda).block_m == 64       # at batch 1: 12 wide tiles for 132 SMs
    assert gemm_tile(16, 8, torch.device("cpu")).block_m == 16


def test_the_op_on_cpu_is_its_reference():
    from optc.compiler.codegen import linear_gelu_ops  # noqa: F401

    x, w, b = torch.randn(3, 5, 16), torch.randn(8, 16), torch.randn(8)
    torch.testing.assert_close(torch.ops.optc.linear_gelu(x, w, b, "tanh"),
                               F.gelu(F.linear(x, w, b), approximate="tanh"))


def test_vits_mlps_are_rewritten_in_a_copy(vit_captured):
    _, captured = vit_captured
    gm = capture.graph_module(captured.programs["forward"])
    gelus = sum(1 for n in gm.graph.nodes if n.target == aten.gelu.default)
    fused, count = use_linear_gelu(gm)
    assert count == gelus > 0
    assert not any(n.target == aten.gelu.default for n in fused.graph.nodes)
    assert sum(1 for n in fused.graph.nodes if n.target == aten.linear.default) == \
        sum(1 for n in gm.graph.nodes if n.target == aten.linear.default) - count  # the fused linears are gone
    assert sum(1 for n in gm.graph.nodes if n.target == aten.gelu.default) == gelus  # the program keeps its own
    args = captured.example_inputs["forward"]
    torch.testing.assert_close(fused(*args[0], **args[1]), gm(*args[0], **args[1]), rtol=1e-5, atol=1e-5)


class _Mlp(torch.nn.Module):
    def __init__(self, also_read: bool, approximate: str = "none"):
        super().__init__()
        self.fc, self.also_read, self.approximate = torch.nn.Linear(8, 16), also_read, approximate

    def forward(self, x):
        h = self.fc(x)
        y = F.gelu(h, approximate=self.approximate)
        return y + h if self.also_read else y


@pytest.mark.parametrize("also_read, approximate, rewritten", [
    (False, "none", True), (False, "tanh", True),
    (True, "none", False),  # the linear's output is needed apart from the GELU
])
def test_only_a_linear_read_by_its_gelu_alone(also_read, approximate, rewritten):
    model = _Mlp(also_read, approximate).eval()
    x = torch.randn(4, 8)
    gm = torch.export.export(model, (x,)).module()
    assert len(linear_gelu_pairs(gm.graph)) == int(rewritten)
    fused, count = use_linear_gelu(gm)
    assert count == int(rewritten) and (fused is gm) == (not rewritten)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_lowered_and_verified_and_recorded(bert_captured):
    """Inductor (CPU) lowers the fused copy of tiny BERT; the check against the program
    passes, and the lowering record and a bench variant's words name the switch."""
    _, captured = bert_captured
    ep = captured.programs["forward"]
    result = lowering.lower_and_verify(ep, captured.example_inputs["forward"], FUSING, "forward")
    assert result["ok"], result
    assert lowering.lowering_record(FUSING)["linear_gelu"] is True
    graph = lowering.target_graph(capture.graph_module(ep), FUSING, forward=True)
    assert any(n.target == torch.ops.optc.linear_gelu.default for n in graph.graph.nodes)
    assert targets.with_overrides(targets.get("h100"), ["linear_gelu=true"]).linear_gelu
    assert "linear_gelu" not in targets.lowering_words(targets.get("h100"))  # named only when on
