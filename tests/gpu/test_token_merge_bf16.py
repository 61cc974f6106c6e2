"""Token-merging kernels (token_match_kernel, token_select_kernel, token_merge_kernel) on the
GPU in bf16, against the torch references of codegen/token_ops.py on the same bf16 inputs:
ViT-B/16 and small padded shapes, both match tilings (match_launch's narrow and wide), keys
summed over heads."""

import pytest
import torch

from bf16_checks import _needs_cuda, assert_bf16_close, launched  # noqa: F401 (fixtures)

from optc.compiler.codegen import token_ops as ops
from optc.compiler.codegen.kernels import token_merge as k

pytestmark = pytest.mark.gpu
KERNELS = ("token_match_kernel", "token_select_kernel", "token_merge_kernel")  # read by test_kernels_covered.py

SHAPES = pytest.mark.parametrize("bsz, n, d, c, protected", [
    (4, 197, 64, 768, 1),   # ViT-B/16: [CLS] + 196 patches, NA = 98
    (2, 41, 24, 40, 1),     # NA = 21, row 1 ends in padding
    (3, 37, 130, 300, 2),   # D and C off the block sizes, two protected tokens
])


def _case(bsz, n, d, c, protected, seed=0):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(bsz, n, d, generator=g)
    x = torch.randn(bsz, n, c, generator=g)
    size = torch.randint(1, 4, (bsz, n), generator=g).float()
    size[-1, -9:] = 0  # the last row ends in padding
    return metric.to("cuda", torch.bfloat16), x.to("cuda", torch.bfloat16), size.cuda()


def _scores(metric, size, protected):
    """The full [B, NA, NB] score matrix of the reference's rules, in fp64."""
    m = metric[:, protected:].double()
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s = size[:, protected:]
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
    pad_a = (s[:, ::2] == 0)[:, :, None]
    scores = torch.where(pad_a, torch.full_like(scores, k.PAD_SCORE), scores)
    return torch.where(~pad_a & (s[:, 1::2] == 0)[:, None, :], torch.full_like(scores, float("-inf")), scores)


@SHAPES
@pytest.mark.parametrize("wide", [False, True], ids=["narrow tile", "wide tile"])
def test_match_equals_reference(bsz, n, d, c, protected, wide, launched):
    metric, _, size = _case(bsz, n, d, c, protected)
    # both tilings match_launch picks from: few programs (batch 1) and many (batch 64)
    launch = k.match_launch(1, 20) if not wide else k.match_launch(64, 98)
    assert launch.block_a == (32 if wide else 16)
    best, idx = k.token_match(metric, size, protected, launch)
    assert launched == {"token_match_kernel"}
    ref_best, ref_idx = ops.match_scores_reference(metric, size, protected)
    torch.testing.assert_close(best, ref_best, atol=1e-5, rtol=1e-5)
    # Same partner, or (summing in another order) one whose score ties it to fp32 rounding.
    scores = _scores(metric, size, protected)
    differ = idx != ref_idx
    gap = (scores.gather(2, ref_idx[..., None]) - scores.gather(2, idx[..., None]))[..., 0].abs()
    assert (gap[differ] < 1e-5).all() and differ.float().mean() < 0.01
    pad_a = size[:, protected::2] == 0
    assert (best[pad_a] == k.PAD_SCORE).all()  # padding is merged first


def test_match_sums_keys_over_heads(launched):
    # ViT-B/16's keys as attention reads them: [B, 12 heads, 197, 64], transposed from the projection.
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(2, 197, 12, 64, generator=g).to("cuda", torch.bfloat16).transpose(1, 2)
    size = torch.ones(2, 197, device="cuda")
    best, idx = k.token_match(keys, size, 1)
    assert launched == {"token_match_kernel"}
    ref_best, ref_idx = ops.match_scores_reference(keys, size, 1)
    torch.testing.assert_close(best, ref_best, atol=1e-5, rtol=1e-5)
    assert (idx != ref_idx).float().mean() < 0.01  # a near-tie may go the other way


@pytest.mark.parametrize("bsz, na, r", [(1, 98, 13), (64, 98, 8), (32, 256, 64), (2, 1024, 300)])
def test_select_equals_a_stable_descending_sort(bsz, na, r, launched):
    g = torch.Generator().manual_seed(na)
    best = (torch.randint(-8, 9, (bsz, na), generator=g).float() / 8).cuda()  # many ties
    idx = torch.randint(0, na, (bsz, na), generator=g).cuda()
    got = k.token_select(best, idx, r)
    assert launched == {"token_select_kernel"}
    for mine, want in zip(got, ops._select(best, idx, r)):
        assert torch.equal(mine, want)


@SHAPES
@pytest.mark.parametrize("r_frac", [0.1, 0.5])
def test_merge_equals_reference(bsz, n, d, c, protected, r_frac, launched):
    metric, x, size = _case(bsz, n, d, c, protected, seed=1)
    na = (n - protected + 1) // 2
    r = max(1, int(r_frac * na))
    unm, src, dst = ops.token_match_reference(metric, size, r, protected)
    y, size_out = k.token_merge(x, size, unm, src, dst, protected)
    assert launched == {"token_merge_kernel"}
    ref_y, ref_size = ops.token_merge_reference(x.float(), size, unm, src, dst, protected)  # fp32 out
    assert y.shape == (bsz, n - r, c)
    assert_bf16_close(y, ref_y)
    assert torch.equal(size_out, ref_size)  # sums of small integers: exact
    assert size_out.sum(1).tolist() == size.sum(1).tolist()


def test_registered_ops_launch_the_kernels(launched):
    """optc::token_match / token_merge with use_triton on CUDA: the path merge_tokens
    lowers to, against the reference path of the same ops."""
    metric, x, size = _case(4, 197, 64, 768, 1, seed=2)
    unm, src, dst = torch.ops.optc.token_match(metric, size, 16, 1, True)
    y, size_out = torch.ops.optc.token_merge(x, size, unm, src, dst, 1, True)
    assert launched == {"token_match_kernel", "token_select_kernel", "token_merge_kernel"}
    # A selection: every a-token is merged (src) or kept (unm), once; kept ones in order.
    assert torch.equal(torch.cat([unm, src], 1).sort(1).values, torch.arange(98, device="cuda").expand(4, -1))
    assert (unm.diff(dim=1) > 0).all() and src.shape == dst.shape == (4, 16)
    ref_y, ref_size = ops.token_merge_reference(x.float(), size, unm, src, dst, 1)
    assert_bf16_close(y, ref_y)
    assert torch.equal(size_out, ref_size)
