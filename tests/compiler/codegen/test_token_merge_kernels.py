"""Token-merging kernels (kernels/token_merge.py) under the Triton interpreter against
the torch references of codegen/token_ops.py: matching (cosine, padding rules, ties
across tiles, keys summed over heads), the selection of the r best, the size-weighted
merge (several sources per destination, padding), and the destination map the unmerge reads."""

import pytest
import torch

from optc.compiler.codegen import token_ops as ops
from optc.compiler.codegen.kernels import token_merge as k


def _case(bsz=2, n=41, d=24, c=40, protected=1, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(bsz, n, d, generator=g).to(dtype)
    x = torch.randn(bsz, n, c, generator=g).to(dtype)
    size = torch.randint(1, 4, (bsz, n), generator=g).float()
    size[1, -9:] = 0  # row 1 ends in padding
    return metric, x, size


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("protected,n", [(0, 40), (1, 41), (2, 37)])
def test_match_equals_reference(dtype, protected, n, poison_empty):
    metric, _, size = _case(n=n, protected=protected, dtype=dtype)
    # A tie within a tile of B: the smaller j must win, as torch's argmax picks it.
    metric[0, protected + 2 * 3 + 1] = metric[0, protected + 2 * 16 + 1]
    metric[0, protected] = metric[0, protected + 2 * 16 + 1]
    best, idx = k.token_match(metric, size, protected)
    ref_best, ref_idx = ops.match_scores_reference(metric, size, protected)
    torch.testing.assert_close(best, ref_best, atol=1e-5, rtol=1e-5)
    assert torch.equal(idx, ref_idx)
    assert idx[0, 0] == 3
    pad_a = size[:, protected::2] == 0
    assert (best[pad_a] == k.PAD_SCORE).all()  # padding is merged first


@pytest.mark.parametrize("launch", [k.match_launch(1, 20), k.match_launch(64, 98)], ids=["narrow", "wide"])
def test_a_tie_across_tiles_of_b_keeps_the_smaller_j(launch):
    metric, _, size = _case(n=141)
    far = launch.block_b + 2  # in the second tile of B
    metric[0, 1 + 2 * 3 + 1] = metric[0, 1 + 2 * far + 1]
    metric[0, 1] = metric[0, 1 + 2 * far + 1]
    best, idx = k.token_match(metric, size, 1, launch)
    ref_best, ref_idx = ops.match_scores_reference(metric, size, 1)
    torch.testing.assert_close(best, ref_best, atol=1e-5, rtol=1e-5)
    assert torch.equal(idx, ref_idx) and idx[0, 0] == 3


def test_match_reads_strided_metric():
    metric, _, size = _case(n=33)
    strided = metric.transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, D] with stride_md = N
    best, idx = k.token_match(strided, size, 1)
    ref_best, ref_idx = ops.match_scores_reference(metric, size, 1)
    torch.testing.assert_close(best, ref_best, atol=1e-5, rtol=1e-5)
    assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("heads,per_trip", [(3, 4), (5, 2), (12, 4), (12, 1)])
def test_match_sums_keys_over_heads(heads, per_trip):
    # Keys [B, H, N, D], transposed from [B, N, H, D] as attention reads them: the metric is
    # their sum over heads, whose cosines are those of the heads' mean.
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(2, 41, heads, 24, generator=g).transpose(1, 2)
    _, _, size = _case()
    best, idx = k.token_match(keys, size, 1, k.match_launch(2, 20)._replace(heads_per_trip=per_trip))
    ref_best, ref_idx = ops.match_scores_reference(keys.mean(1), size, 1)
    torch.testing.assert_close(best, ref_best, atol=1e-5, rtol=1e-5)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(ops.match_scores_reference(keys, size, 1)[1], ref_idx)


@pytest.mark.parametrize("na,r", [(20, 0), (20, 7), (21, 21), (98, 13), (300, 100)])
def test_select_equals_a_stable_descending_sort(na, r, poison_empty):
    g = torch.Generator().manual_seed(na + r)
    best = torch.randint(-4, 5, (3, na), generator=g).float() / 4  # many ties
    best[0, :3] = float("-inf")  # a-tokens whose every partner is padding
    best[1, -2:] = k.PAD_SCORE
    idx = torch.randint(0, 50, (3, na), generator=g)
    unm, src, dst = k.token_select(best, idx, r)
    ref = ops._select(best, idx, r)
    for got, want in zip((unm, src, dst), ref):
        assert got.dtype == torch.int64 and torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("r", [1, 7, 18])
def test_merge_equals_reference(dtype, r, poison_empty):
    metric, x, size = _case(dtype=dtype)
    unm, src, dst = ops.token_match_reference(metric, size, r, 1)
    y, size_out = k.token_merge(x, size, unm, src, dst, 1)
    ref_y, ref_size = ops.token_merge_reference(x, size, unm, src, dst, 1)
    assert y.shape == (2, 41 - r, 40) and y.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(y, ref_y, atol=tol, rtol=tol)
    copies = 1 + (41 - 1 + 1) // 2 - r  # the protected token and the unmerged a-tokens
    assert torch.equal(y[:, :copies], ref_y[:, :copies])  # copied, not averaged with themselves
    torch.testing.assert_close(size_out, ref_size)
    assert size_out.sum(1).tolist() == size.sum(1).tolist()  # sizes are conserved


def test_merge_many_sources_into_one_destination():
    # Every a-token's best match is b_0: all r sources merge into it, over two dots.
    bsz, n, c, r = 1, 81, 8, 36
    assert k.SOURCES_PER_DOT < r <= 2 * k.SOURCES_PER_DOT
    x = torch.randn(bsz, n, c)
    size = torch.ones(bsz, n)
    src = torch.arange(r)[None]
    dst = torch.zeros_like(src)
    unm = torch.arange(r, 40)[None]
    y, size_out = k.token_merge(x, size, unm, src, dst, 1)
    ref_y, _ = ops.token_merge_reference(x, size, unm, src, dst, 1)
    torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-5)
    expected = torch.cat([x[0, 2:3], x[0, 1:1 + 2 * r:2]]).mean(0)  # b_0 is token 2
    torch.testing.assert_close(y[0, 1 + 4], expected, atol=1e-5, rtol=1e-5)  # after 4 unmerged a-tokens
    assert size_out[0, 5] == r + 1


def test_padding_only_merge_keeps_destination():
    metric, x, size = _case()
    size[:, 1:] = 0  # everything but the protected token is padding
    unm, src, dst = ops.token_match_reference(metric, size, 5, 1)
    y, size_out = k.token_merge(x, size, unm, src, dst, 1)
    ref_y, ref_size = ops.token_merge_reference(x, size, unm, src, dst, 1)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref_y)
    assert (size_out[:, 1:] == 0).all()


@pytest.mark.parametrize("n", [40, 41])  # an odd and an even number of unprotected tokens
def test_the_dest_map_sends_every_token_to_its_output_position(n):
    metric, _, size = _case()
    metric, size = metric[:, :n], size[:, :n]
    unm, src, dst = ops.token_match_reference(metric, size, 7, 1)
    na = (n - 1 + 1) // 2
    expected = torch.empty(2, n, dtype=torch.long)
    for b in range(2):
        expected[b, 0] = 0
        for u, i in enumerate(unm[b].tolist()):
            expected[b, 1 + 2 * i] = 1 + u
        for i, j in zip(src[b].tolist(), dst[b].tolist()):
            expected[b, 1 + 2 * i] = 1 + (na - 7) + j
        for j in range((n - 1) // 2):
            expected[b, 2 + 2 * j] = 1 + (na - 7) + j
    assert torch.equal(torch.ops.optc.token_merge_dest(unm, src, dst, n, 1), expected)


def test_dest_map_and_unmerge():
    metric, x, size = _case()
    unm, src, dst = ops.token_match_reference(metric, size, 9, 1)
    y, _ = ops.token_merge_reference(x, size, unm, src, dst, 1)
    dest = torch.ops.optc.token_merge_dest(unm, src, dst, 41, 1)
    back = torch.ops.optc.token_unmerge(y, dest)
    assert back.shape == x.shape
    merged = torch.zeros(2, 41, dtype=torch.bool)
    rows = 1 + 2 * src
    merged.scatter_(1, rows, True)
    merged.scatter_(1, 2 + 2 * dst, True)
    # A token that took part in no merge comes back (x * size / size: to rounding); [CLS] is one.
    torch.testing.assert_close(back[~merged], x[~merged], atol=1e-6, rtol=1e-6)
    assert torch.equal(back[:, 0], x[:, 0])
    # A source and its destination come back as the same merged value.
    assert torch.equal(back.gather(1, rows[..., None].expand(-1, -1, 40)),
                       back.gather(1, (2 + 2 * dst)[..., None].expand(-1, -1, 40)))


def test_kernels_compile_for_sm90_bf16():
    """The interpreter accepts code Triton's compiler rejects: compile for Hopper too."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("token_merge_hopper.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(script.parent), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    # 3 match launches, 3 selection widths, 2 merge
    assert len(results) == 8 and all(v == "ok" for v in results.values()), results
