"""Compiles every optc kernel, with the tiles configs.py gives the H100, for sm_90 down
to a cubin, and prints {case: "ok" or the error} as JSON. Run as a script in a process
without TRITON_INTERPRET (test_compiles_for_hopper.py does): under the interpreter
triton.language is patched for interpretation and real compilation fails."""

from __future__ import annotations

import itertools
import json
import os
import sys

assert not os.environ.get("TRITON_INTERPRET"), "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from optc.compiler.codegen.kernels import (  # noqa: E402
    cats_mlp, configs, decode_attention, decode_qkv, dense_gemv, encoder_attention, gemv_tiles, linear_gelu,
    sparse_gemv, sparse_linear)

HOPPER = GPUTarget("cuda", 90, 32)


def _ints(*names):
    return {n: "i32" for n in names}


SPARSE_LINEAR_SIG = {
    "x_ptr": "*bf16", "w_ptr": "*bf16", "thr_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32",
    **_ints("M", "N", "K", "K_PER_SPLIT", "stride_xm", "stride_xk", "stride_wtile", "stride_wk", "stride_t",
            "stride_ym", "stride_wss", "stride_wsm")}
GEMV_SIG = {
    "x_ptr": "*bf16", "w_ptr": "*bf16", "thr_ptr": "*fp32", "b_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32",
    "idx_ptr": "*i32", "val_ptr": "*fp32", **_ints("N", "K", "stride_xk", "stride_wk", "stride_t", "stride_wss")}
CATS_SIG = {
    "x_ptr": "*bf16", "wg_ptr": "*bf16", "wu_ptr": "*bf16", "thr_ptr": "*fp32", "h_ptr": "*bf16",
    **_ints("M", "I", "H", "stride_xm", "stride_xk", "stride_wg", "stride_wu", "stride_t", "stride_hm")}
ATTENTION_SIG = {
    "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "m_ptr": "*i1", "o_ptr": "*bf16",
    "pm_ptr": "*fp32", "pl_ptr": "*fp32", "pa_ptr": "*fp32", **_ints("H", "S", "L", "D", "L_PER_SPLIT"),
    "scale": "fp64",  # what Inductor's launch of a user-defined kernel passes a Python float as
    **_ints("sqb", "sqh", "sqs", "sqd", "skb", "skh", "skl", "skd", "svb", "svh", "svl", "svd",
            "smb", "smh", "sms", "sml", "sob", "soh", "sos", "sod")}
ENCODER_ATTENTION_SIG = {
    "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "m_ptr": "*i1", "o_ptr": "*bf16",
    **_ints("H", "S", "L", "D"), "scale": "fp64",
    **_ints("sqb", "sqh", "sqs", "sqd", "skb", "skh", "skl", "skd", "svb", "svh", "svl", "svd",
            "smb", "smh", "sms", "sml", "sob", "soh", "sos", "sod")}
DENSE_GEMV_SIG = {
    "x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "ws_ptr": "*fp32",
    **_ints("N", "K", "K_PER_SPLIT", "stride_wn")}
QKV_SIG = {
    "x_ptr": "*bf16", "g_ptr": "*bf16", "wq_ptr": "*bf16", "wk_ptr": "*bf16", "wv_ptr": "*bf16",
    "cos_ptr": "*bf16", "sin_ptr": "*bf16", "out_ptr": "*bf16",
    "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "pos_ptr": "*i64",
    **_ints("cache_len", "stride_cache_h", "stride_cache_l", "K"),
    "eps": "fp64",  # a Python float, as Inductor's launch of a user-defined kernel passes it
    **_ints("Q_PAIRS", "K_PAIRS", "stride_q", "stride_k", "stride_v")}
LINEAR_GELU_SIG = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16",
                   **_ints("M", "N", "K", "stride_xm", "stride_wn")}


def cases():
    """(case id, kernel, signature, constexprs, num_warps or (num_warps, num_stages)); a case
    with num_stages compiles with its arguments 16-aligned, so its pipeline is built."""
    h100 = configs.sparse_linear_target("h100")
    for cfg in [c for _, c in h100.buckets] + [h100.large_gemv[1]]:
        for even_n in (True, False):
            for direct in (True, False):
                yield (f"sparse_linear-m{cfg.block_m}-n{cfg.block_n}-k{cfg.block_k}-even{int(even_n)}-direct{int(direct)}",
                       sparse_linear.sparse_linear_kernel, SPARSE_LINEAR_SIG,
                       dict(HAS_BIAS=direct, DIRECT_OUT=direct, FP32_DOT=False, BLOCK_M=cfg.block_m,
                            BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN_N=even_n), cfg.num_warps)
    for prefetch in (True, False):
        yield (f"sparse_gemv-prefetch{int(prefetch)}", sparse_gemv.sparse_gemv_kernel, GEMV_SIG,
               dict(HAS_BIAS=False, DIRECT_OUT=False, SLICE=2048, BLOCK_N=128, BLOCK_K=128, PREFETCH=prefetch), 4)
    for _, cfg in configs.cats_target("h100").buckets:
        yield (f"cats_gate_up-m{cfg.block_m}", cats_mlp.cats_gate_up_kernel, CATS_SIG,
               dict(FP32_DOT=False, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k), cfg.num_warps)

    # Llama-1B's decode step after share_kv_heads (4 rows of 64 over 256 keys), whole or split.
    for split in (1, 4):
        cfg = decode_attention.plan(4, 256, 64, split=split)
        yield (f"decode_attention-split{split}", decode_attention.decode_attention_kernel, ATTENTION_SIG,
               dict(HAS_MASK=True, PARTIAL=cfg.split > 1, FP32_DOT=False, BLOCK_S=16, BLOCK_L=cfg.block_l, BLOCK_D=64,
                    SCAN=decode_attention._scan(16, 256 // cfg.split)), cfg.num_warps)

    # Encoder self-attention: ViT-B/16's tokens and BERT's longest sequence, with a boolean
    # mask of a row a query or one row for all (BERT's padding row), or merged tokens' size
    # bias, one row for all (additive bf16), at head widths 64 and 128.
    for d, s in itertools.product((64, 128), (197, 512)):
        cfg = encoder_attention.plan(s, d)
        for kind, mask_type, rows in ((1, "*i1", True), (1, "*i1", False), (2, "*bf16", False)):
            yield (f"encoder_attention-d{d}-s{s}-mask{kind}{'-rows' if rows else ''}",
                   encoder_attention.encoder_attention_kernel,
                   {**ENCODER_ATTENTION_SIG, "m_ptr": mask_type},
                   dict(MASK=kind, MASK_ROWS=rows, FP32_DOT=False, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                        BLOCK_D=d), cfg.num_warps)

    # The GEMV with the tiles the H100 and H200 get for Llama-1B's o and down projections (the
    # shapes decode_gemv rewrites), and a split tile (a grid of fewer rows than SMs).
    for n, k in ((2048, 2048), (2048, 8192), (64, 2048)):
        tile = gemv_tiles.gemv_tile("h100", n, k)
        yield (f"dense_gemv-{n}x{k}-split{tile.split}", dense_gemv.dense_gemv_kernel, DENSE_GEMV_SIG,
               dict(HAS_BIAS=tile.split == 1, PARTIAL=tile.split > 1, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k),
               tile.num_warps)

    # Norm + q/k/v + rotary with the default tile for Llama-1B (head width 64) and Llama-3.1-8B
    # (128), and with the KV-cache write.
    for half, k in ((32, 2048), (64, 4096)):
        tile = decode_qkv.default_qkv_tile("h100", half, k)
        for write in (False, True):
            yield (f"decode_qkv-half{half}-k{k}" + ("-cache" if write else ""), decode_qkv.decode_qkv_kernel, QKV_SIG,
                   dict(HALF=half, BLOCK_P=tile.block_p, BLOCK_K=tile.block_k, WRITE_CACHE=write), tile.num_warps)

    # The linear + GELU GEMM with both tiles it launches on Hopper (ViT-B/16's MLP at batch 64
    # and at batch 1), exact and tanh, K a multiple of the tile's or not.
    for m in (64 * 197, 197):
        tile = linear_gelu.gemm_tile(m, 3072, torch.device("cuda"))  # a device object; no GPU is needed
        for act, even_k in ((linear_gelu.GELU, True), (linear_gelu.GELU_TANH, False)):
            yield (f"linear_gelu-m{tile.block_m}-n{tile.block_n}-act{act}-evenk{int(even_k)}",
                   linear_gelu.linear_gelu_kernel, LINEAR_GELU_SIG,
                   dict(HAS_BIAS=True, ACT=act, EVEN_K=even_k, IEEE=False, BLOCK_M=tile.block_m,
                        BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=tile.group_m),
                   (tile.num_warps, tile.num_stages))


def compile_one(kernel, signature, constexprs, launch) -> str:
    sig = {**signature, **{k: "constexpr" for k in constexprs}}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    num_warps, num_stages = launch if isinstance(launch, tuple) else (launch, None)
    options = {"num_warps": num_warps} | ({"num_stages": num_stages} if num_stages else {})
    if num_stages:
        # Pointers and integers 16-aligned, as Triton specialises them at launch: without that
        # the loads are not asynchronous and the stages' shared memory is not allocated.
        src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs,
                                        attrs={(i,): [["tt.divisibility", 16]] for i in range(len(signature))})
    try:
        compiled = triton.compile(src, target=HOPPER, options=options)
    except Exception as exc:  # noqa: BLE001 - the error is the result
        return f"{type(exc).__name__}: {exc}"[-2000:]
    return "ok" if compiled.asm.get("cubin") else "no cubin"


if __name__ == "__main__":
    json.dump({case: compile_one(*rest) for case, *rest in cases()}, sys.stdout)
