#!/usr/bin/env python
"""Which launch of token_match_kernel is fastest at each shape merge_tokens meets.

The forward profile of merged ViT-B/16 at batch 1 (benchmarks/NOTES.md) spent more time
in token_match_kernel than in any other kernel: its grid is (batch, NA / BLOCK_A), so at
batch 1 two programs do all the work. This times every (BLOCK_A, BLOCK_B, num_warps) of a
small grid at the token counts of ViT-B/16 (r=13 schedule) and BERT-base, against the
match as Inductor compiles the torch reference (normalise, bmm, max), each replayed in a
CUDA graph. A launch whose partners differ from the reference's beyond fp32 ties is
reported as wrong and never picked.

`--launches heads` feeds the kernel what merge_tokens now gives it, the keys [B, 12, N, 64]
(summed over heads as they are read), at each count of head loads in flight, against
Inductor's compiled mean over heads and match.

    python benchmarks/experiments/token_match_launch.py --out $OUT/token_match_launch.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness.py

import torch  # noqa: E402
from gemv_pdl_prefetch import time_graph  # noqa: E402
from harness import write_result  # noqa: E402

from optc.compiler.codegen import token_ops  # noqa: E402
from optc.compiler.codegen.kernels import token_merge as k  # noqa: E402

SHAPES = ((1, 197), (1, 145), (1, 93), (1, 54), (64, 197), (64, 93), (1, 128), (32, 128), (32, 512))
PICKED = ((16, 64, 4), (32, 64, 4), (16, 32, 2))  # tilings the sweep at fp32 ("ieee") found best
LAUNCHES = [k.MatchLaunch(a, b, w, "ieee") for a, b, w in itertools.product((16, 32, 64), (16, 32, 64), (1, 2, 4))]
LAUNCHES += [k.MatchLaunch(a, b, w, p) for a, b, w in PICKED for p in ("tf32x3", "tf32")]
HEADS = 12  # ViT-B/16's and BERT-base's, of 64 channels
HEAD_LAUNCHES = [k.MatchLaunch(a, b, w, "tf32x3", t) for a, b, w in PICKED[:2] for t in (1, 2, 4, 6)]


def same_partners(metric, idx, ref_idx, protected=1) -> bool:
    """idx picks the reference's partner, or one whose fp64 score ties it within 1e-5."""
    m = (metric.double().sum(1) if metric.dim() == 4 else metric.double())[:, protected:]
    m = m / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)
    gap = (scores.gather(2, ref_idx[..., None]) - scores.gather(2, idx[..., None])).abs()
    return bool((gap[idx != ref_idx] < 1e-5).all())


def time_shape(bsz, n, launches, args) -> dict:
    g = torch.Generator().manual_seed(n)
    if args.launches == "heads":  # keys as attention reads them, transposed from the projection
        metric = torch.randn(bsz, n, HEADS, 64, generator=g).to("cuda", torch.bfloat16).transpose(1, 2)
    else:
        metric = torch.randn(bsz, n, 64, generator=g).to("cuda", torch.bfloat16)
    size = torch.ones(bsz, n, device="cuda")
    _, ref_idx = token_ops.match_scores_reference(metric, size, 1)
    default = k.match_launch(bsz, n // 2)
    row = {"batch": bsz, "tokens": n, "default": default._asdict(), "launches": []}
    for launch in launches:
        us, (_, idx) = time_graph(lambda m, s, _: k.token_match(m, s, 1, launch), metric, size, None, args.reps)
        row["launches"].append({"launch": launch._asdict(), "us": round(us, 2),
                                "correct": same_partners(metric, idx, ref_idx)})
    row["default_us"] = next(x["us"] for x in row["launches"] if k.MatchLaunch(**x["launch"]) == default)
    row["best"] = min((x for x in row["launches"] if x["correct"]), key=lambda x: x["us"])
    if not args.no_torch:
        # keys: the mean over heads as merge_tokens computed it before the kernel summed them
        ref = (lambda m, s, p: token_ops.match_scores_reference(m.mean(1), s, p)) if metric.dim() == 4 \
            else token_ops.match_scores_reference
        compiled = torch.compile(ref, dynamic=False)
        row["inductor_us"] = round(time_graph(lambda m, s, _: compiled(m, s, 1), metric, size, None, args.reps)[0], 2)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--no-torch", action="store_true", help="skip the compiled torch reference")
    ap.add_argument("--launches", choices=("all", "picked", "heads"), default="all",
                    help="picked: only the best fp32 tilings, at each input precision; heads: keys of 12 heads")
    args = ap.parse_args()
    torch._dynamo.config.recompile_limit = 64  # one compile of the reference per shape
    launches = {"all": LAUNCHES, "picked": [x for x in LAUNCHES if tuple(x[:3]) in PICKED],
                "heads": HEAD_LAUNCHES}[args.launches]
    rows = []
    for bsz, n in SHAPES:
        row = time_shape(bsz, n, launches, args)
        rows.append(row)
        best = row["best"]["launch"]
        print(f"B={bsz:3d} N={n:4d}  default {row['default_us']:7.2f} us  best {row['best']['us']:7.2f} us "
              f"({best['block_a']}x{best['block_b']} w{best['num_warps']} {best['precision']} "
              f"h{best['heads_per_trip']})  "
              f"inductor {row.get('inductor_us', float('nan')):7.2f} us", flush=True)
        write_result(args.out, {"experiment": "token_match_launch", "metric_dim": 64, "protected": 1,
                                "heads": HEADS if args.launches == "heads" else 1, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
