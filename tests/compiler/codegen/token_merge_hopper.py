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
             **_ints("N", "D", "NA", "NB", "P", "stride_mb", "stride_mn", "stride_md", "stride_sb", "stride_sn")}
MERGE_SIG = {"x_ptr": "*bf16", "s_ptr": "*fp32", "unm_ptr": "*i64", "src_ptr": "*i64", "dst_ptr": "*i64",
             "y_ptr": "*bf16", "so_ptr": "*fp32",
             **_ints("N_OUT", "C", "NA", "R", "P", "stride_xb", "stride_xn", "stride_sb", "stride_sn")}


def cases():
    for block_a, block_b in ((16, 16), (64, 32)):
        yield (f"token_match-a{block_a}-b{block_b}", token_merge.token_match_kernel, MATCH_SIG,
               # the channel block token_match launches for BERT-base's and ViT-B/16's 768
               dict(PAD=token_merge.PAD_SCORE, BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_D=token_merge._pow2(768)), 4)
    for block_r in (16, 32):
        yield (f"token_merge-o16-c128-r{block_r}", token_merge.token_merge_kernel, MERGE_SIG,
               dict(BLOCK_O=16, BLOCK_C=128, BLOCK_R=block_r), 4)


if __name__ == "__main__":
    json.dump({case: compile_one(*rest) for case, *rest in cases()}, sys.stdout)
