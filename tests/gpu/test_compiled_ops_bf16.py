"""optc's registered ops (torch.library.triton_op) on CUDA in bf16 through
torch.compile, the path a compiled artifact takes: Inductor traces each op's body and
launches the Triton kernels from its own generated code (not through kernel[grid])."""

import math

import pytest
import torch

from bf16_checks import _needs_cuda, assert_bf16_close, launched  # noqa: F401 (fixtures)

from optc.compiler.codegen import ops, token_ops
from optc.compiler.codegen.kernels.sparse_linear import prepare_weight

pytestmark = pytest.mark.gpu


def _bf16(*shape, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to("cuda", torch.bfloat16)


def test_sparse_mlp_compiled():
    """A CATS MLP step: optc::cats_gate_up then optc::sparse_linear (the down
    projection at threshold 0), one token, compiled with fullgraph."""
    h, i = 576, 1536
    x = _bf16(1, h, seed=1)
    wg, wu = _bf16(i, h, scale=1 / math.sqrt(h), seed=2), _bf16(i, h, scale=1 / math.sqrt(h), seed=3)
    wdt = prepare_weight(_bf16(h, i, scale=1 / math.sqrt(i), seed=4))
    t, zero = torch.tensor(0.05, device="cuda"), torch.tensor(0.0, device="cuda")

    def mlp(x):
        hid = torch.ops.optc.cats_gate_up(x, wg, wu, t)
        return torch.ops.optc.sparse_linear(hid, wdt, zero, None) + x

    torch._dynamo.reset()
    y = torch.compile(mlp, fullgraph=True)(x)
    hid = ops.cats_gate_up_reference(x.double(), wg.double(), wu.double(), t).to(torch.bfloat16)
    assert_bf16_close(y, hid.double() @ wdt.double() + x.double())


def test_token_merge_compiled():
    bsz, n, d, c, r = 2, 197, 64, 768, 13
    metric, x = _bf16(bsz, n, d, seed=5), _bf16(bsz, n, c, seed=6)
    size = torch.ones(bsz, n, device="cuda")

    def merge(metric, x, size):
        unm, src, dst = torch.ops.optc.token_match(metric, size, r, 1, True)
        return torch.ops.optc.token_merge(x, size, unm, src, dst, 1, True), (unm, src, dst)

    torch._dynamo.reset()
    (y, size_out), (unm, src, dst) = torch.compile(merge, fullgraph=True)(metric, x, size)
    ref_y, ref_size = token_ops.token_merge_reference(x.float(), size, unm, src, dst, 1)
    assert y.shape == (bsz, n - r, c)
    assert_bf16_close(y, ref_y)
    assert torch.equal(size_out, ref_size)
