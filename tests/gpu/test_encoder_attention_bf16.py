"""optc::encoder_attention's kernel on the GPU in bf16, against SDPA in fp64 on the same
bf16 inputs: ViT-B/16's self-attention (197 tokens, 12 heads of 64) with BERT's padding
mask, merge_tokens' size bias, a per-query mask and none, and the op compiled by Inductor in a
graph that computes the size bias the way merge_tokens does."""

import pytest
import torch
import torch.nn.functional as F

from bf16_checks import _needs_cuda, assert_bf16_close, launched  # noqa: F401 (fixtures)

from optc.compiler.codegen import attention_ops  # noqa: F401  (registers optc::encoder_attention)
from optc.compiler.codegen.kernels import encoder_attention as k

pytestmark = pytest.mark.gpu
KERNELS = ("encoder_attention_kernel",)  # read by test_kernels_covered.py


def _qkv(B, H, S, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, S, 3, H, D, generator=g).to("cuda", torch.bfloat16)
    return [x[:, :, i].transpose(1, 2) for i in range(3)]


def _reference(q, k_, v, mask, scale):
    m = mask if mask is None or mask.dtype == torch.bool else mask.double()
    return F.scaled_dot_product_attention(q.double(), k_.double(), v.double(), attn_mask=m, scale=scale)


def _masks(B, S, seed=1):
    g = torch.Generator().manual_seed(seed)
    keys = torch.rand(B, 1, 1, S, generator=g) > 0.3
    keys[..., 0] = True
    size = torch.randint(0, 6, (B, S), generator=g).float()
    size[:, 0] = 1
    bias = torch.where(size > 0, size.log(), torch.finfo(torch.bfloat16).min)[:, None, None, :]
    return {"padding": keys.cuda(), "size bias": bias.to("cuda", torch.bfloat16),
            "per query": (torch.rand(B, 1, S, S, generator=g) > 0.2).cuda(), "none": None}


@pytest.mark.parametrize("B,H,S,D", [(4, 12, 197, 64), (2, 12, 93, 64), (2, 8, 130, 128)])
@pytest.mark.parametrize("mask_kind", ["padding", "size bias", "per query", "none"])
def test_kernel_equals_sdpa(B, H, S, D, mask_kind, launched):
    q, k_, v = _qkv(B, H, S, D)
    mask = _masks(B, S)[mask_kind]
    out = k.encoder_attention(q, k_, v, mask, D ** -0.5)
    assert launched == {"encoder_attention_kernel"}
    assert out.transpose(1, 2).is_contiguous()
    assert_bf16_close(out, _reference(q, k_, v, mask, D ** -0.5))


def test_compiled_op_with_the_size_bias_computed_in_the_graph():
    B, H, S, D = 4, 12, 145, 64
    q, k_, v = _qkv(B, H, S, D, seed=2)
    size = torch.randint(1, 6, (B, S), device="cuda").float()

    def attend(q, k_, v, size):
        bias = size.log().to(q.dtype)[:, None, None, :]
        out = torch.ops.optc.encoder_attention(q, k_, v, bias, D ** -0.5)
        return out.transpose(1, 2).reshape(B, S, H * D)

    torch._dynamo.reset()
    out = torch.compile(attend, fullgraph=True)(q, k_, v, size)
    bias = size.log().to(torch.bfloat16)[:, None, None, :]
    ref = _reference(q, k_, v, bias, D ** -0.5).transpose(1, 2).reshape(B, S, H * D)
    assert_bf16_close(out, ref)
