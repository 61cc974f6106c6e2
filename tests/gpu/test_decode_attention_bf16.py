"""optc::decode_attention's kernel on the GPU in bf16, against SDPA in fp64 on the same
bf16 inputs: Llama-1B's decode step after share_kv_heads (4 rows of 64 over 256 cache
positions), whole and split over the keys, and the op compiled by Inductor in a graph
that computes its mask the way a decode step does."""

import pytest
import torch
import torch.nn.functional as F

from bf16_checks import _needs_cuda, assert_bf16_close, launched  # noqa: F401 (fixtures)

from optc.compiler.codegen import attention_ops  # noqa: F401  (registers optc::decode_attention)
from optc.compiler.codegen.kernels import decode_attention as k

pytestmark = pytest.mark.gpu
KERNELS = ("decode_attention_kernel",)  # read by test_kernels_covered.py


def _case(B, H, S, L, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g).to("cuda", torch.bfloat16) for n in (S, L, L)]


def _reference(q, k_, v, mask, scale):
    return F.scaled_dot_product_attention(q.double(), k_.double(), v.double(), attn_mask=mask, scale=scale)


@pytest.mark.parametrize("B,H,S,L,D,position", [(1, 8, 4, 256, 64, 40), (1, 8, 4, 256, 64, 255), (2, 4, 1, 300, 128, 77)])
@pytest.mark.parametrize("split", [1, 4])
def test_kernel_equals_sdpa(B, H, S, L, D, position, split, launched):
    q, k_, v = _case(B, H, S, L, D)
    mask = (torch.arange(L, device="cuda") <= position)[None, None, None, :]
    out = k.decode_attention(q, k_, v, mask, D ** -0.5, k.plan(S, L, D, split=split))
    assert launched == {"decode_attention_kernel"}
    assert_bf16_close(out, _reference(q, k_, v, mask, D ** -0.5))


def test_compiled_op_with_the_steps_mask():
    B, H, S, L, D = 1, 8, 4, 256, 64
    q, k_, v = _case(B, H, S, L, D, seed=1)
    position = torch.tensor([57], device="cuda")

    def step(q, k_, v, position):
        mask = (torch.arange(L, device="cuda")[None, :] <= position[:, None])[:, None, None, :]
        return torch.ops.optc.decode_attention(q, k_, v, mask, D ** -0.5)

    torch._dynamo.reset()
    out = torch.compile(step, fullgraph=True)(q, k_, v, position)
    mask = (torch.arange(L, device="cuda") <= 57)[None, None, None, :]
    assert_bf16_close(out, _reference(q, k_, v, mask, D ** -0.5))
