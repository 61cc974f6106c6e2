"""optc::linear_gelu's kernel on the GPU in bf16, against gelu(linear) in fp64 on the same
bf16 inputs: ViT-B/16's MLP at batch 64 (the wide tile) and batch 1 (the narrow one), the
tanh form with a K that no tile divides, and the op compiled by Inductor with the second
linear after it, as the linear_gelu rewrite leaves an MLP."""

import pytest
import torch
import torch.nn.functional as F

from bf16_checks import _needs_cuda, assert_bf16_close, launched  # noqa: F401 (fixtures)

from optc.compiler.codegen import linear_gelu_ops  # noqa: F401  (registers optc::linear_gelu)
from optc.compiler.codegen.kernels.linear_gelu import gemm_tile, linear_gelu

pytestmark = pytest.mark.gpu
KERNELS = ("linear_gelu_kernel",)  # read by test_kernels_covered.py


def _case(rows, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to("cuda", torch.bfloat16)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to("cuda", torch.bfloat16)
    b = (torch.randn(n, generator=g) * 0.1).to("cuda", torch.bfloat16)
    return x, w, b


def _reference(x, w, b, approximate="none"):
    return F.gelu(F.linear(x.double(), w.double(), b.double()), approximate=approximate)


@pytest.mark.parametrize("rows", [64 * 197, 197, 5])
def test_vits_mlp_shapes(rows, launched):
    x, w, b = _case(rows, 768, 3072)
    out = linear_gelu(x, w, b)
    assert launched == {"linear_gelu_kernel"}
    assert gemm_tile(rows, 3072, x.device).block_n == (256 if rows > 197 else 128)
    assert_bf16_close(out, _reference(x, w, b))


def test_tanh_with_a_remainder_of_k(launched):
    x, w, b = _case(300, 200, 500, seed=1)
    out = linear_gelu(x, w, b, "tanh")
    assert launched == {"linear_gelu_kernel"}
    assert_bf16_close(out, _reference(x, w, b, "tanh"))


def test_compiled_op_before_the_second_linear():
    x, w, b = _case(2 * 197, 768, 3072, seed=2)
    w2 = (torch.randn(768, 3072, device="cuda") * 3072 ** -0.5).to(torch.bfloat16)
    torch._dynamo.reset()
    mlp = torch.compile(lambda x: F.linear(torch.ops.optc.linear_gelu(x, w, b, "none"), w2), fullgraph=True)
    out = mlp(x.view(2, 197, 768))
    assert_bf16_close(out, F.linear(_reference(x, w, b).to(torch.bfloat16).double(), w2.double()).view(2, 197, 768))
