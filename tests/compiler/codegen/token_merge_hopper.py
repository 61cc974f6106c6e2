"""Compiles the token-merging kernels for sm_90 (bf16 tensors) to cubins and prints
{case: "ok" or the error} as JSON; run without TRITON_INTERPRET (as hopper_compile.py)."""

from __future__ import annotations

import json
import os
import sys

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"

from hopper_compile import compile_one  # noqa: E402

from optc.compiler.codegen.kernels import token_merge  # noqa: E402


def _ints(*names):
    return {n: "i32" for n in names}


MATCH_SIG = {"m_ptr": "*bf16", "s_ptr": "*fp32", "best_ptr": "*fp32", "idx_ptr": "*i64",
             **_ints("N", "D", "NA", "NB", "P", "H", "stride_mb", "stride_mh", "stride_mn", "stride_md", "stride_sb",
                     "stride_sn")}
SELECT_SIG = {"best_ptr": "*fp32", "idx_ptr": "*i64", "unm_ptr": "*i64", "src_ptr": "*i64", "dst_ptr": "*i64",
              **_ints("NA", "R")}
MERGE_SIG = {"x_ptr": "*bf16", "s_ptr": "*fp32", "unm_ptr": "*i64", "src_ptr": "*i64", "dst_ptr": "*i64",
             "y_ptr": "*bf16", "so_ptr": "*fp32",
             **_ints("N_OUT", "C", "NA", "R", "P", "stride_xb", "stride_xn", "stride_sb", "stride_sn")}


def cases():
    # every tiling match_launch picks, at the head dim of BERT-base's and ViT-B/16's metric
    launches = {token_merge.match_launch(bsz, na) for bsz, na in ((1, 20), (1, 98), (64, 98))}
    launches.add(token_merge.match_launch(1, 98)._replace(heads_per_trip=1))  # one head a trip, as the experiment times
    for launch in sorted(launches):
        yield (f"token_match-a{launch.block_a}-b{launch.block_b}-w{launch.num_warps}-h{launch.heads_per_trip}",
               token_merge.token_match_kernel,
               MATCH_SIG, dict(PAD=token_merge.PAD_SCORE, BLOCK_A=launch.block_a, BLOCK_B=launch.block_b,
                               BLOCK_D=token_merge._pow2(64), PRECISION=launch.precision,
                               HEADS_PER_TRIP=launch.heads_per_trip), launch.num_warps)
    for block in (128, 256, 1024):  # ViT-B/16's 98 a-tokens, BERT's 256 at seq 512, the most it ranks
        yield (f"token_select-{block}", token_merge.token_select_kernel, SELECT_SIG,
               dict(BLOCK=block, BLOCK_J=max(16, 4096 // block)), 4 if block <= 256 else 8)
    for block_r in (16, 32):
        yield (f"token_merge-o16-c128-r{block_r}", token_merge.token_merge_kernel, MERGE_SIG,
               dict(BLOCK_O=16, BLOCK_C=128, BLOCK_R=block_r), 4)


if __name__ == "__main__":
    json.dump({case: compile_one(*rest) for case, *rest in cases()}, sys.stdout)
