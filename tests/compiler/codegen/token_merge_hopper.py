"""Compiles the token-merging kernels for sm_90 (bf16 tensors) to cubins, with the tiles
their launchers use, and prints {case: "ok" or the error} as JSON, and for the matching
kernel the bytes ptxas spills per thread ({case}-spills); run without TRITON_INTERPRET
(as hopper_compile.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"

import triton  # noqa: E402
from hopper_compile import HOPPER, compile_one  # noqa: E402

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
               dict(PAD=token_merge.PAD_SCORE, BLOCK_A=block_a, BLOCK_B=block_b,
                    BLOCK_D=token_merge.MATCH_CHANNELS), 4)
    for block_r in (16, 32):
        yield (f"token_merge-o16-c128-r{block_r}", token_merge.token_merge_kernel, MERGE_SIG,
               dict(BLOCK_O=16, BLOCK_C=128, BLOCK_R=block_r), 4)


def spill_stores(kernel, signature, constexprs, num_warps) -> int:
    """Bytes per thread ptxas spills to local memory (its -v report) for the kernel's PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    ptx = triton.compile(src, target=HOPPER, options={"num_warps": num_warps}).asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        report = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", path, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report))


if __name__ == "__main__":
    results = {}
    for case, *rest in cases():
        results[case] = compile_one(*rest)
        if case.startswith("token_match"):
            results[f"{case}-spills"] = spill_stores(*rest)
    json.dump(results, sys.stdout)
