"""optc's token-merging ops (ToMe), for the merge_tokens pass.

Importing this module registers (and that is all it changes):

    optc::token_match(Tensor metric, Tensor size, int r, int protected, bool use_triton)
        -> (Tensor unm, Tensor src, Tensor dst)      metric [B, N, D], or keys [B, H, N, D]
    optc::token_merge(Tensor x, Tensor size, Tensor unm, Tensor src, Tensor dst,
                      int protected, bool use_triton) -> (Tensor y, Tensor size_out)
    optc::token_merge_dest(Tensor unm, Tensor src, Tensor dst, int n, int protected) -> Tensor
    optc::token_unmerge(Tensor x, Tensor source) -> Tensor

Sets, sizes and the score rules are those of kernels/token_merge.py. `token_match` picks
the r a-tokens whose best match scores highest (`src`, their partners `dst`) and lists
the others in ascending order (`unm`), comparing tokens by the cosine of their metric rows
(of keys: their sum over heads, which has the heads' mean's cosine); `token_merge` averages
each source into its partner weighted by size. `token_merge_dest` maps every input token to
its output position; `token_unmerge` gives each original position its merged token's value
(source: [B, N0], an output position per original token).

Like ops.py's, these are `torch.library.triton_op`s: export keeps one node each, and
Inductor traces the body. On CUDA with `use_triton` the body launches the Triton kernels;
otherwise (any other device, or `use_triton=False`) it is the torch reference below, which
Inductor then compiles into kernels of its own: `merge_tokens.kernels` chooses per model.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op

from .kernels import token_merge as _k

__all__ = ["match_scores_reference", "token_match_reference", "token_merge_reference", "dest_reference",
           "unmerge_reference"]


def _sets(n: int, protected: int) -> tuple[int, int]:
    return (n - protected + 1) // 2, (n - protected) // 2


def match_scores_reference(metric: Tensor, size: Tensor, protected: int) -> tuple[Tensor, Tensor]:
    """(best, idx) of every a-token, as token_match_kernel computes them, in fp32."""
    m = metric.float().sum(1) if metric.dim() == 4 else metric.float()  # keys: summed over heads
    m = m[:, protected:]
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    s = size[:, protected:]
    a, b, sa, sb = m[:, ::2], m[:, 1::2], s[:, ::2], s[:, 1::2]
    scores = a @ b.transpose(1, 2)
    pad_a = (sa == 0)[:, :, None]
    scores = torch.where(pad_a, torch.full_like(scores, _k.PAD_SCORE), scores)
    scores = torch.where(~pad_a & (sb == 0)[:, None, :], torch.full_like(scores, float("-inf")), scores)
    return scores.amax(-1), scores.argmax(-1)  # argmax: the first maximal index


def _select(best: Tensor, idx: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor]:
    order = torch.argsort(best, dim=1, descending=True, stable=True)
    src = order[:, :r]
    unm = torch.sort(order[:, r:], dim=1).values  # keep the tokens' order
    return unm, src, idx.gather(1, src)


def token_match_reference(metric: Tensor, size: Tensor, r: int, protected: int):
    best, idx = match_scores_reference(metric, size, protected)
    return _select(best, idx, r)


def token_merge_reference(x: Tensor, size: Tensor, unm: Tensor, src: Tensor, dst: Tensor, protected: int):
    c = x.shape[-1]
    xf = x.float()
    rx, rs = xf[:, protected:], size[:, protected:]
    ax, bx, as_, bs = rx[:, ::2], rx[:, 1::2], rs[:, ::2], rs[:, 1::2]
    unm_x = ax.gather(1, unm[..., None].expand(-1, -1, c))
    src_x = ax.gather(1, src[..., None].expand(-1, -1, c))
    src_s = as_.gather(1, src)
    num = (bx * bs[..., None]).scatter_add(1, dst[..., None].expand(-1, -1, c), src_x * src_s[..., None])
    den = bs.scatter_add(1, dst, src_s)
    dst_x = torch.where(den[..., None] > 0, num / torch.where(den > 0, den, 1.0)[..., None], bx)
    y = torch.cat([xf[:, :protected], unm_x, dst_x], dim=1).to(x.dtype)
    return y, torch.cat([size[:, :protected], as_.gather(1, unm), den], dim=1)


def dest_reference(unm: Tensor, src: Tensor, dst: Tensor, n: int, protected: int) -> Tensor:
    bsz, r = src.shape
    na, _ = _sets(n, protected)
    n_unm = na - r
    dev = unm.device
    # Each a-token's output position (unm and src together list every a-token once):
    # the unmerged in order after the protected tokens, the merged onto their b partner.
    # int32: Inductor scatters int64 values through ATen's kernel on a GPU (no 64-bit
    # atomics), a launch of its own that nothing fuses with.
    pos = torch.arange(n, device=dev, dtype=torch.int32)
    a_dest = torch.zeros((bsz, na), dtype=torch.int32, device=dev).scatter(
        1, torch.cat([unm, src], 1),
        torch.cat([(protected + pos[:n_unm]).expand(bsz, -1), (protected + n_unm + dst).to(torch.int32)], 1))
    # Then every input position at once: a gather and selects that fuse into one kernel.
    # No clamp(min=0) of a position: Inductor makes it max(0, index), and torch 2.13 then
    # fails to simplify the gather's index on the CPU ("vr must not be None for symbol q1").
    rel = torch.where(pos < protected, 0, pos - protected)
    from_a = a_dest.gather(1, (rel // 2).clamp(max=na - 1).to(torch.int64).expand(bsz, -1))
    from_b = protected + n_unm + (rel - 1) // 2  # read only at odd rel, where rel - 1 >= 0
    return torch.where(pos < protected, pos, torch.where(rel % 2 == 0, from_a, from_b)).to(torch.int64)


def unmerge_reference(x: Tensor, source: Tensor) -> Tensor:
    bsz, n = x.shape[:2]
    flat = x.reshape(bsz, n, -1)
    out = flat.gather(1, source[..., None].expand(-1, -1, flat.shape[-1]))
    return out.reshape(bsz, source.shape[1], *x.shape[2:])


@triton_op("optc::token_match", mutates_args=())
def token_match(metric: Tensor, size: Tensor, r: int, protected: int,
                use_triton: bool) -> tuple[Tensor, Tensor, Tensor]:
    if metric.device.type == "cuda" and use_triton:
        best, idx = _k.token_match(metric, size, protected)
        if best.shape[1] <= _k.SELECT_MAX:
            return _k.token_select(best, idx, r)
        return _select(best, idx, r)
    return token_match_reference(metric, size, r, protected)


@triton_op("optc::token_merge", mutates_args=())
def token_merge(x: Tensor, size: Tensor, unm: Tensor, src: Tensor, dst: Tensor, protected: int,
                use_triton: bool) -> tuple[Tensor, Tensor]:
    if x.device.type == "cuda" and use_triton:
        return _k.token_merge(x, size, unm, src, dst, protected)
    return token_merge_reference(x, size, unm, src, dst, protected)


@triton_op("optc::token_merge_dest", mutates_args=())
def token_merge_dest(unm: Tensor, src: Tensor, dst: Tensor, n: int, protected: int) -> Tensor:
    return dest_reference(unm, src, dst, n, protected)


@triton_op("optc::token_unmerge", mutates_args=())
def token_unmerge(x: Tensor, source: Tensor) -> Tensor:
    return unmerge_reference(x, source)


# Fake implementations: shapes only.
@token_match.register_fake
def _match_fake(metric, size, r, protected, use_triton):
    bsz, n = metric.shape[0], metric.shape[-2]
    na, nb = _sets(n, protected)
    torch._check(0 <= r <= min(na, nb), lambda: f"r={r} exceeds the {nb} tokens of set B")
    new = lambda k: metric.new_empty((bsz, k), dtype=torch.int64)
    return new(na - r), new(r), new(r)


@token_merge.register_fake
def _merge_fake(x, size, unm, src, dst, protected, use_triton):
    bsz, n, c = x.shape
    r = src.shape[1]
    return x.new_empty((bsz, n - r, c)), size.new_empty((bsz, n - r))


@token_merge_dest.register_fake
def _dest_fake(unm, src, dst, n, protected):
    return src.new_empty((src.shape[0], n))


@token_unmerge.register_fake
def _unmerge_fake(x, source):
    return x.new_empty((x.shape[0], source.shape[1], *x.shape[2:]))


# CPU kernels: the references, so eager CPU calls dispatch straight here.
@token_match.register_kernel("cpu")
def _match_cpu(metric, size, r, protected, use_triton):
    return token_match_reference(metric, size, r, protected)


@token_merge.register_kernel("cpu")
def _merge_cpu(x, size, unm, src, dst, protected, use_triton):
    return token_merge_reference(x, size, unm, src, dst, protected)
