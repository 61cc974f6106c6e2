"""optc::gemv's kernel on the GPU in bf16, against F.linear in fp64 on the same bf16
inputs: Llama-1B's o and down projections with the target's stored tile, a split
launch with a bias, and the op compiled by Inductor with a residual add after it, as
the decode_gemv rewrite leaves it in a decode step."""

import pytest
import torch
import torch.nn.functional as F

from bf16_checks import _needs_cuda, assert_bf16_close, launched  # noqa: F401 (fixtures)

from optc.compiler.codegen import gemv_ops  # noqa: F401  (registers optc::gemv)
from optc.compiler.codegen.kernels.configs import target_for_device
from optc.compiler.codegen.kernels.dense_gemv import GemvTile, dense_gemv
from optc.compiler.codegen.kernels.gemv_tiles import gemv_tile

pytestmark = pytest.mark.gpu
KERNELS = ("dense_gemv_kernel",)  # read by test_kernels_covered.py


def _case(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, K, generator=g).to("cuda", torch.bfloat16)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to("cuda", torch.bfloat16)
    b = torch.randn(N, generator=g).to("cuda", torch.bfloat16)
    return x, w, b


@pytest.mark.parametrize("N,K", [(2048, 2048), (2048, 8192), (512, 2048), (100, 300)])
def test_kernel_with_the_stored_tile_equals_linear(N, K, launched):
    x, w, _ = _case(N, K)
    out = dense_gemv(x, w, None, gemv_tile(target_for_device(x.device), N, K))
    assert launched == {"dense_gemv_kernel"}
    assert_bf16_close(out, F.linear(x.double(), w.double()))


def test_split_launch_with_a_bias(launched):
    x, w, b = _case(300, 1000, seed=1)
    out = dense_gemv(x, w, b, GemvTile(block_n=4, block_k=128, num_warps=4, split=3))
    assert launched == {"dense_gemv_kernel"}
    assert_bf16_close(out, F.linear(x.double(), w.double(), b.double()))


def test_compiled_op_with_a_residual_add():
    x, w, _ = _case(2048, 2048, seed=2)
    residual = torch.randn(1, 1, 2048, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    out = torch.compile(lambda x, w, r: torch.ops.optc.gemv(x, w, None) + r, fullgraph=True)(x, w, residual)
    assert_bf16_close(out, F.linear(x.double(), w.double()) + residual.double())
