#!/usr/bin/env python
"""Does a tiled weight layout make the one-token sparse GEMV read like a dense one?

optc's weight_t is [K, N]: a program reads a BLOCK_N-wide strip (64 bytes at BLOCK_N=32)
of each active row, rows N*2 bytes apart, so the strips a program reads are scattered
over the whole weight. Tiled [N/BLOCK_N, K, BLOCK_N], a program's strip is one contiguous
region (K*BLOCK_N*2 bytes) in which it skips the inactive rows: the same bytes, read in
order. This script times the masked kernel on both layouts (same kernel, other strides)
against cuBLAS dense and cuBLAS on only the active rows ("ideal"), at one token, on the
Llama-1B MLP shapes, and checks every result against the fp32 reference.

    python benchmarks/experiments/layout_probe.py --out $OUT/layout_probe.json [--budget-s 150]
    TRITON_INTERPRET=1 python benchmarks/experiments/layout_probe.py --smoke     # CPU: correctness only
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness.py and the scripts reused here

import torch  # noqa: E402
import triton  # noqa: E402

from gemv_sweep import row_ideal  # noqa: E402
from harness import envelope, write_result  # noqa: E402
from kernels_sparse_linear import Setup, Timer, rel_err, row_dense, threshold_for  # noqa: E402
from optc.compiler.codegen import ops  # noqa: E402
from optc.compiler.codegen.kernels.sparse_linear import prepare_weight, sparse_linear_kernel  # noqa: E402


def tile(weight_t: torch.Tensor, bn: int) -> torch.Tensor:
    """[K, N] -> [N/bn, K, bn] contiguous."""
    K, N = weight_t.shape
    return weight_t.reshape(K, N // bn, bn).permute(1, 0, 2).contiguous()


def launch(x, w, thr, K, N, bn, bk, warps, split, tiled):
    k_per_split = triton.cdiv(triton.cdiv(K, split), bk) * bk
    split = triton.cdiv(K, k_per_split)
    ws = torch.empty((split, 1, N), device=x.device, dtype=torch.float32)
    y = torch.empty((1, N), device=x.device, dtype=x.dtype)
    stride_wtile, stride_wk = (K * bn, bn) if tiled else (bn, N)
    sparse_linear_kernel[(N // bn, split, 1)](
        x, w, thr, y, y, ws, 1, N, K, k_per_split, x.stride(0), x.stride(1), stride_wtile, stride_wk, 0,
        y.stride(0), ws.stride(0), ws.stride(1), HAS_BIAS=False, DIRECT_OUT=split == 1,
        FP32_DOT=x.dtype == torch.float32, BLOCK_M=1, BLOCK_N=bn, BLOCK_K=bk, EVEN_N=N % bn == 0,
        num_warps=warps, num_stages=1)
    return y if split == 1 else ws.sum(0).to(x.dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    su = Setup(smoke=args.smoke)
    timer = Timer(su.device, 25.0)
    shapes = [(64, 64)] if args.smoke else [(2048, 8192), (8192, 2048)]
    grid = [(16, 16, 1, 2), (32, 16, 1, 1)] if args.smoke else list(itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (2, 4, 8)))
    rows, t_end = [], time.time() + args.budget_s
    for K, N in shapes:
        n = su.copies(K * N * 2)
        Ws = [torch.randn(N, K, device=su.device, dtype=su.dtype) * K ** -0.5 for _ in range(n)]
        WTs = [prepare_weight(w) for w in Ws]
        dense = row_dense(su, timer, K, N, 1, Ws, 4)
        ideal = row_ideal(su, timer, K, N, 0.5)
        rows += [dense, ideal]
        g = torch.Generator(device=su.device).manual_seed(K)
        xs = [torch.randn(1, K, device=su.device, generator=g).to(su.dtype) for _ in range(4)]
        thr = torch.tensor(threshold_for(0.5), device=su.device, dtype=torch.float32)
        frac = sum((x.float().abs() > thr).float().mean().item() for x in xs) / 4
        ref = ops.sparse_linear_reference(xs[0], WTs[0], thr, None)
        cands = [("default", None)] + [(("tiled" if t else "rows"), c) for c in grid for t in (False, True)]
        for kind, cfg in cands:
            if time.time() > t_end and kind != "default":
                break
            if cfg is None:
                fn, ws_ = (lambda i: ops.sparse_linear(xs[i % 4], WTs[i], thr, None)), WTs
            else:
                bn, bk, warps, split = cfg
                if N % bn or K // split < bk:
                    continue
                ws_ = [tile(w, bn) for w in WTs] if kind == "tiled" else WTs
                fn = (lambda i, c=cfg, t=(kind == "tiled"), ws_=ws_:
                      launch(xs[i % 4], ws_[i], thr, K, N, *c, t))
            try:
                err = rel_err(fn(0), ref)
                us, _ = timer([lambda i=i: fn(i) for i in range(n)])
            except Exception as e:  # noqa: BLE001 - a tile that does not compile is a data point
                rows.append(dict(kind=kind, K=K, N=N, config=cfg, error=str(e)[:200]))
                continue
            rows.append(dict(kind=kind, K=K, N=N, sparsity=0.5, config=cfg, us=round(us, 3), rel_err=err,
                             gbps=round(frac * K * N * 2 / us / 1e3, 1), dense_us=dense["us"], ideal_us=ideal["us"]))
            if kind != "tiled":
                del ws_
        del Ws, WTs
    if args.out:
        write_result(args.out, dict(rows=rows), envelope(su.device))
    bad = [r for r in rows if "rel_err" in r and r["rel_err"] is not None and not r["rel_err"] < 1e-2]
    print(f"{'kind':<8} {'K':>5} {'N':>5} {'us':>8} {'dense':>8} {'ideal':>8} {'x dense':>8} {'GB/s':>6}  config")
    for K, N in shapes:
        for kind in ("default", "rows", "tiled"):
            best = sorted((r for r in rows if r.get("kind") == kind and r["K"] == K and r["N"] == N and "us" in r),
                          key=lambda r: r["us"])[:3 if kind != "default" else 1]
            for r in best:
                print(f"{kind:<8} {K:>5} {N:>5} {r['us']:>8.2f} {r['dense_us']:>8.2f} {r['ideal_us']:>8.2f} "
                      f"{r['dense_us'] / r['us']:>8.2f} {r['gbps']:>6.0f}  {r['config']}")
    print(f"{len(bad)} results off the reference" + (f": {bad[:3]}" if bad else ""))


if __name__ == "__main__":
    main()
