"""Token merging (ToMe) kernels: bipartite matching and the size-weighted merge.

The sequence is [P protected tokens | the rest]; the rest alternates between set A
(even positions) and set B (odd positions):

    a_i = token P + 2*i   (i < NA = ceil((N - P) / 2))
    b_j = token P + 2*j + 1   (j < NB = floor((N - P) / 2))

A token's size s (fp32) is how many original tokens it stands for; padding has size 0.

token_match_kernel, grid (B, cdiv(NA, BLOCK_A)): for each a_i, the b_j it is most
similar to by cosine of the metric rows and that score, without materialising the
[NA, NB] score matrix (one [BLOCK_A, BLOCK_B] tile at a time, a running max/argmax).
A token's metric row is the sum over H heads of its keys (the cosine of the heads' mean;
summing here spares a launch of its own, which at batch 1 cost more than the match):

    keys[b, h, n, d]  at m_ptr + b*stride_mb + h*stride_mh + n*stride_mn + d*stride_md
    size[b, n]       at s_ptr + b*stride_sb + n*stride_sn
    best[b, i], idx[b, i]   at best_ptr / idx_ptr + b*NA + i   (fp32 / int64)

Score rules (one owner: the torch reference in ops.py follows them exactly):
    both real: cosine; a_i padding: PAD_SCORE (above any cosine, so padding goes first
    and its zero weight leaves its destination unchanged); a_i real, b_j padding: -inf
    (a real token never moves into a padding slot). Ties keep the smallest j.

token_select_kernel, grid (B,): ranks the a-tokens by best score (descending; ties keep
the smaller i, as a stable sort does) and writes src[b, rank] = i and dst[b, rank] = idx[b, i]
for the R best, and the others' i in ascending order to unm[b, :NA - R]. One program a batch
row, NA up to SELECT_MAX: one launch where torch's argsort, sort and gather took three.

token_merge_kernel, grid (B, cdiv(N_OUT, BLOCK_O), cdiv(C, BLOCK_C)), N_OUT = N - R: output
tokens [pid_o*BLOCK_O, +BLOCK_O) of batch b, channels [pid_c*BLOCK_C, +BLOCK_C), each o:

    o < P:            copy of token o
    o < P + NA - R:   copy of a_{unm[b, o - P]}
    else, j = o - P - (NA - R):
        y = (x[b_j] s[b_j] + sum over k with dst[b, k] == j of x[a_src[b,k]] s[a_src[b,k]])
            / (s[b_j] + sum of those s);  x[b_j] itself where that sum of sizes is 0

    x[b, n, c]  at x_ptr + b*stride_xb + n*stride_xn + c   (channels contiguous)
    y[b, o, c]  at y_ptr + (b*N_OUT + o)*C + c;   size_out[b, o] at so_ptr + b*N_OUT + o

A block holding destinations reads its batch's R (src, dst) pairs and source rows
BLOCK_R at a time and adds them with one dot of a [BLOCK_O, BLOCK_R] matrix (a source's
size where it merges into that row) by the source rows: deterministic, no atomics. Copies
(protected and unmerged tokens) are stored as loaded. A block of outputs per program,
not one output token: each program then streams its sources instead of chasing one
chain of dependent loads (benchmarks/NOTES.md, "Merged BERT-base, batch 32 x 128,
kernel by kernel").
"""

from __future__ import annotations

from typing import NamedTuple

import triton
import triton.language as tl

__all__ = ["token_match_kernel", "token_select_kernel", "token_merge_kernel", "MatchLaunch", "match_launch",
           "PAD_SCORE", "SOURCES_PER_DOT", "SELECT_MAX"]

PAD_SCORE = 2.0  # above any cosine
SOURCES_PER_DOT = 32  # the most (src, dst) pairs one dot of token_merge_kernel adds
SELECT_MAX = 1024  # the most a-tokens token_select_kernel ranks in its one program


@triton.jit
def _head_sum(m_base, rows, offs_d, mask, H, stride_mh, stride_mn, stride_md, HEADS_PER_TRIP: tl.constexpr):
    """[rows, D] fp32: the rows' keys summed over the H heads, HEADS_PER_TRIP loads issued
    together (one at a time, each waits for the one before it)."""
    ptrs = m_base + rows[:, None] * stride_mn + offs_d[None, :] * stride_md
    acc = tl.zeros(mask.shape, tl.float32)
    for h0 in range(0, H, HEADS_PER_TRIP):
        for t in tl.static_range(HEADS_PER_TRIP):
            acc += tl.load(ptrs + (h0 + t) * stride_mh, mask=mask & (h0 + t < H), other=0.0).to(tl.float32)
    return acc


@triton.jit
def token_match_kernel(
    m_ptr, s_ptr, best_ptr, idx_ptr,
    N, D, NA, NB, P, H,
    stride_mb, stride_mh, stride_mn, stride_md, stride_sb, stride_sn,
    PAD: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    HEADS_PER_TRIP: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_a = tl.program_id(1)
    offs_i = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_d = tl.arange(0, BLOCK_D)
    in_a = offs_i < NA
    d_mask = offs_d < D
    rows_a = P + 2 * offs_i
    m_base = m_ptr + pid_b * stride_mb
    a = _head_sum(m_base, rows_a, offs_d, in_a[:, None] & d_mask[None, :], H, stride_mh, stride_mn, stride_md,
                  HEADS_PER_TRIP)
    # Normalised rows: the dot product of two is their cosine (a zero row stays zero).
    a = a / tl.maximum(tl.sqrt(tl.sum(a * a, axis=1)), 1e-12)[:, None]
    size_a = tl.load(s_ptr + pid_b * stride_sb + rows_a * stride_sn, mask=in_a, other=1.0)
    pad_a = size_a == 0.0

    best = tl.full((BLOCK_A,), float("-inf"), tl.float32)
    best_j = tl.zeros((BLOCK_A,), tl.int32)
    for j0 in range(0, NB, BLOCK_B):
        offs_j = j0 + tl.arange(0, BLOCK_B)
        in_b = offs_j < NB
        rows_b = P + 2 * offs_j + 1
        bm = _head_sum(m_base, rows_b, offs_d, in_b[:, None] & d_mask[None, :], H, stride_mh, stride_mn, stride_md,
                       HEADS_PER_TRIP)
        bm = bm / tl.maximum(tl.sqrt(tl.sum(bm * bm, axis=1)), 1e-12)[:, None]
        size_b = tl.load(s_ptr + pid_b * stride_sb + rows_b * stride_sn, mask=in_b, other=1.0)
        scores = tl.dot(a, tl.trans(bm), input_precision=PRECISION)
        scores = tl.where(pad_a[:, None], PAD, scores)
        scores = tl.where((~pad_a[:, None]) & (size_b[None, :] == 0.0), float("-inf"), scores)
        scores = tl.where(in_b[None, :], scores, float("-inf"))
        tile_best = tl.max(scores, axis=1)
        # The smallest j reaching the tile's max (the reference's tie rule).
        cand = tl.where(scores == tile_best[:, None], offs_j[None, :], NB + BLOCK_B)
        tile_j = tl.min(cand, axis=1)
        better = tile_best > best  # strictly: an earlier tile wins ties
        best_j = tl.where(better, tile_j, best_j)
        best = tl.where(better, tile_best, best)
    tl.store(best_ptr + pid_b * NA + offs_i, best, mask=in_a)
    tl.store(idx_ptr + pid_b * NA + offs_i, best_j.to(tl.int64), mask=in_a)


@triton.jit
def token_select_kernel(
    best_ptr, idx_ptr, unm_ptr, src_ptr, dst_ptr, NA, R,
    BLOCK: tl.constexpr, BLOCK_J: tl.constexpr,
):
    b = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    in_a = offs < NA
    score = tl.load(best_ptr + b * NA + offs, mask=in_a, other=float("-inf"))
    # rank = how many a-tokens sort before this one: a higher score, or the same and a smaller i.
    rank = tl.zeros((BLOCK,), tl.int32)
    for j0 in range(0, NA, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        in_j = offs_j < NA
        score_j = tl.load(best_ptr + b * NA + offs_j, mask=in_j, other=float("-inf"))
        ahead = (score_j[None, :] > score[:, None]) | (
            (score_j[None, :] == score[:, None]) & (offs_j[None, :] < offs[:, None]))
        rank += tl.sum((ahead & in_j[None, :]).to(tl.int32), axis=1)
    merged = in_a & (rank < R)
    kept = in_a & (rank >= R)
    partner = tl.load(idx_ptr + b * NA + offs, mask=merged, other=0)
    tl.store(src_ptr + b * R + rank, offs.to(tl.int64), mask=merged)
    tl.store(dst_ptr + b * R + rank, partner, mask=merged)
    kept_before = tl.cumsum(kept.to(tl.int32), axis=0) - 1
    tl.store(unm_ptr + b * (NA - R) + kept_before, offs.to(tl.int64), mask=kept)


@triton.jit
def token_merge_kernel(
    x_ptr, s_ptr, unm_ptr, src_ptr, dst_ptr, y_ptr, so_ptr,
    N_OUT, C, NA, R, P,
    stride_xb, stride_xn, stride_sb, stride_sn,
    BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0)
    pid_o = tl.program_id(1)
    pid_c = tl.program_id(2)
    n_unm = NA - R
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    o_in = offs_o < N_OUT
    c_in = offs_c < C
    io = o_in[:, None] & c_in[None, :]
    is_unm = (offs_o >= P) & (offs_o < P + n_unm)
    is_dst = (offs_o >= P + n_unm) & o_in
    j = tl.where(is_dst, offs_o - P - n_unm, -1)
    # The input row each output starts from: itself, an unmerged a_i, or b_j.
    unm_i = tl.load(unm_ptr + b * n_unm + (offs_o - P), mask=is_unm, other=0)
    row = tl.where(is_unm, P + 2 * unm_i, tl.where(is_dst, P + 2 * j + 1, offs_o))
    x_base = x_ptr + b * stride_xb
    x_rows = tl.load(x_base + row[:, None] * stride_xn + offs_c[None, :], mask=io, other=0.0).to(tl.float32)
    s_rows = tl.load(s_ptr + b * stride_sb + row * stride_sn, mask=o_in, other=0.0)
    acc = x_rows * s_rows[:, None]
    den = s_rows
    if pid_o * BLOCK_O + BLOCK_O > P + n_unm:  # the block holds destinations
        for k0 in range(0, R, BLOCK_R):
            offs_k = k0 + tl.arange(0, BLOCK_R)
            k_in = offs_k < R
            dst = tl.load(dst_ptr + b * R + offs_k, mask=k_in, other=-2)
            rows_src = P + 2 * tl.load(src_ptr + b * R + offs_k, mask=k_in, other=0)
            s_src = tl.load(s_ptr + b * stride_sb + rows_src * stride_sn, mask=k_in, other=0.0)
            x_src = tl.load(x_base + rows_src[:, None] * stride_xn + offs_c[None, :],
                            mask=k_in[:, None] & c_in[None, :], other=0.0).to(tl.float32)
            # [BLOCK_O, BLOCK_R]: a source's size where it merges into the row's b_j.
            w = tl.where(dst[None, :] == j[:, None], s_src[None, :], 0.0)
            acc += tl.dot(w, x_src, input_precision="ieee")
            den += tl.sum(w, axis=1)
    merged = is_dst[:, None] & (den[:, None] > 0.0)
    y = tl.where(merged, acc / tl.where(merged, den[:, None], 1.0), x_rows)  # copies stay exact
    tl.store(y_ptr + (b * N_OUT + offs_o[:, None]) * C + offs_c[None, :], y.to(y_ptr.dtype.element_ty), mask=io)
    tl.store(so_ptr + b * N_OUT + offs_o, den, mask=o_in & (pid_c == 0))


def _launcher(kernel):
    # Inductor traces launches through wrap_triton; under TRITON_INTERPRET=1 (CPU tensors,
    # eager only) the interpreted kernel is launched directly, as sparse_linear.py does.
    if type(kernel).__name__ == "InterpretedFunction":
        return kernel
    from torch.library import wrap_triton

    return wrap_triton(kernel)


def _pow2(n: int, low: int = 16) -> int:
    return max(low, triton.next_power_of_2(int(n)))


class MatchLaunch(NamedTuple):
    block_a: int
    block_b: int
    num_warps: int
    # tl.dot's input_precision for the cosines. tf32x3 (three tf32 products) keeps fp32's
    # partners and runs on the tensor cores; plain tf32 picks other partners than fp32 does.
    precision: str = "tf32x3"
    # Key loads of as many heads issued together: 4 was the fastest of 1, 2, 4 and 6 at every
    # measured shape but one, where it was within 0.1% of 2 (results/token_match_heads_h100.json).
    heads_per_trip: int = 4


# Programs of 16 rows of set A up to which the narrow tile keeps more of the GPU busy than
# the wide one costs (benchmarks/results/token_match_precision_h100.json).
_NARROW_PROGRAMS = 256


def match_launch(bsz: int, na: int) -> MatchLaunch:
    """The match tiling for a batch of `bsz` rows with `na` tokens in set A: small tiles and
    many programs where the batch alone would leave the GPU idle (batch 1)."""
    if bsz * triton.cdiv(na, 16) <= _NARROW_PROGRAMS:
        return MatchLaunch(16, 64, 4)
    return MatchLaunch(32, 64, 4)


def token_match(metric, size, protected: int, launch: MatchLaunch | None = None):
    """(best [B, NA] fp32, idx [B, NA] int64): each a_i's most similar b_j and the score.
    metric: [B, N, D], or keys [B, H, N, D] whose sum over heads is the metric."""
    import torch

    if metric.dim() == 3:
        metric = metric.unsqueeze(1)
    assert metric.dim() == 4 and size.shape == (metric.shape[0], metric.shape[2]), \
        "metric [B, N, D] or [B, H, N, D], size [B, N]"
    assert size.dtype == torch.float32, "sizes are fp32"
    bsz, heads, n, d = metric.shape
    na, nb = (n - protected + 1) // 2, (n - protected) // 2
    assert nb >= 1, "nothing to match"
    best = torch.empty((bsz, na), dtype=torch.float32, device=metric.device)
    idx = torch.empty((bsz, na), dtype=torch.int64, device=metric.device)
    launch = launch or match_launch(bsz, na)
    grid = (bsz, triton.cdiv(na, launch.block_a))
    _launcher(token_match_kernel)[grid](
        metric, size, best, idx, n, d, na, nb, protected, heads,
        metric.stride(0), metric.stride(1), metric.stride(2), metric.stride(3), size.stride(0), size.stride(1),
        PAD=PAD_SCORE, BLOCK_A=launch.block_a, BLOCK_B=launch.block_b, BLOCK_D=_pow2(d),
        PRECISION=launch.precision, HEADS_PER_TRIP=min(launch.heads_per_trip, heads), num_warps=launch.num_warps,
    )
    return best, idx


def token_select(best, idx, r: int):
    """(unm [B, NA - r], src [B, r], dst [B, r]) int64, as codegen/token_ops.py's _select."""
    import torch

    bsz, na = best.shape
    assert na <= SELECT_MAX, f"token_select ranks at most {SELECT_MAX} a-tokens in one program"
    best, idx = best.contiguous(), idx.contiguous()
    new = lambda k: torch.empty((bsz, k), dtype=torch.int64, device=best.device)
    unm, src, dst = new(na - r), new(r), new(r)
    block = _pow2(na)
    _launcher(token_select_kernel)[(bsz,)](
        best, idx, unm, src, dst, na, r, BLOCK=block, BLOCK_J=max(16, 4096 // block),
        num_warps=4 if block <= 256 else 8,
    )
    return unm, src, dst


def token_merge(x, size, unm, src, dst, protected: int):
    """(y [B, N - R, C], size_out [B, N - R] fp32); see the module docstring."""
    import torch

    assert x.dim() == 3 and size.shape == x.shape[:2], "x [B, N, C], size [B, N]"
    assert src.shape == dst.shape and src.shape[0] == x.shape[0], "src/dst [B, R]"
    if x.stride(2) != 1:
        x = x.contiguous()
    bsz, n, c = x.shape
    r = src.shape[1]
    na = (n - protected + 1) // 2
    assert unm.shape == (bsz, na - r), "unm [B, NA - R]"
    n_out = n - r
    unm, src, dst = unm.contiguous(), src.contiguous(), dst.contiguous()
    y = torch.empty((bsz, n_out, c), dtype=x.dtype, device=x.device)
    size_out = torch.empty((bsz, n_out), dtype=torch.float32, device=x.device)
    block_o, block_c = 16, min(_pow2(c), 128)
    grid = (bsz, triton.cdiv(n_out, block_o), triton.cdiv(c, block_c))
    _launcher(token_merge_kernel)[grid](
        x, size, unm, src, dst, y, size_out, n_out, c, na, r, protected,
        x.stride(0), x.stride(1), size.stride(0), size.stride(1),
        BLOCK_O=block_o, BLOCK_C=block_c, BLOCK_R=_pow2(min(r, SOURCES_PER_DOT), 16),
    )
    return y, size_out
