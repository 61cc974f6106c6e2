#!/usr/bin/env python
"""One-token sparse GEMV on the GPU: the compacting kernel (kernels/sparse_gemv.py)
over a grid of tiles, against the masked kernel (sparse_linear.py's BLOCK_M=1 tile), the
tensor-core tile (BLOCK_M=16, one token padded; Triton pipelines its loads over
num_stages) and cuBLAS dense, on the Llama-1B projections. The "ideal" row is cuBLAS on
a weight holding only the active rows: what reading exactly the needed bytes costs
through the best dense GEMV, i.e. the time a sparse kernel could reach with free
indexing. Timing as in kernels_sparse_linear.py (CUDA
graph over distinct weight copies spanning 2x L2, do_bench median). Prints the best tile
of each kernel per shape (timed at sparsity 0.5, the split-K sum included as an eager
torch kernel, which Inductor fuses away in a compiled graph) and a table; JSON to --out.

    python benchmarks/experiments/gemv_sweep.py --out $OUT/gemv_sweep.json [--budget-s 240] [--kinds masked,gemv,dot]
        [--kernel-time]   # kernels' own device time too: a fair comparison with cuBLAS inside a graph
        [--rank-by-kernel]  # also time every candidate tile by its own kernel's device time, and
                            # pick the best by it (in a decode step the split-K sum is fused away)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness.py and the scripts reused here

import torch  # noqa: E402

from harness import envelope, write_result  # noqa: E402
from kernels_sparse_linear import Setup, Timer, rel_err, row_dense, threshold_for  # noqa: E402
from optc.compiler.codegen import ops  # noqa: E402
from optc.compiler.codegen.kernels.configs import GemvConfig, LaunchConfig  # noqa: E402
from optc.compiler.codegen.kernels.sparse_linear import prepare_weight  # noqa: E402
from optc.compiler.codegen.kernels.sparse_linear import sparse_linear as sparse_host  # noqa: E402

SHAPES = [(2048, 8192), (8192, 2048), (2048, 2048), (2048, 512)]  # (K, N)


def time_sparse(su, timer, K, N, s, WTs, fn):
    g = torch.Generator(device=su.device).manual_seed(K + N + int(100 * s))
    xs = [torch.randn(1, K, device=su.device, generator=g).to(su.dtype) for _ in range(4)]
    thr = torch.tensor(threshold_for(s), device=su.device, dtype=torch.float32)
    err = rel_err(fn(xs[0], WTs[0], thr), ops.sparse_linear_reference(xs[0], WTs[0], thr, None))
    frac = sum((x.float().abs() > thr).float().mean().item() for x in xs) / 4
    us, _ = timer([lambda i=i: fn(xs[i % 4], WTs[i], thr) for i in range(len(WTs))])
    read = frac * K * N * 2
    return dict(us=round(us, 3), rows_read_frac=round(frac, 4), gbps=round(read / us / 1e3, 1), rel_err=err)


def row_ideal(su, timer, K, N, s):
    """cuBLAS on only the active rows at sparsity s: a dense [N, K_active] weight, in
    enough copies that they do not fit in L2 together (every call reads from HBM)."""
    k_active = max(1, round((1 - s) * K))
    n_copies = su.copies(k_active * N * 2)
    Ws = [torch.randn(N, k_active, device=su.device, dtype=su.dtype) for _ in range(n_copies)]
    xs = [torch.randn(1, k_active, device=su.device, dtype=su.dtype) for _ in range(4)]
    us, _ = timer([lambda i=i: torch.nn.functional.linear(xs[i % 4], Ws[i]) for i in range(n_copies)])
    read = k_active * N * 2
    return dict(kind="ideal", K=K, N=N, sparsity=s, us=round(us, 3), rows_read_frac=round(k_active / K, 4),
                gbps=round(read / us / 1e3, 1), rel_err=None, config="cuBLAS on the active rows only")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--rep-ms", type=float, default=25.0)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, few tiles (CPU: TRITON_INTERPRET=1)")
    ap.add_argument("--kinds", default="masked,gemv,dot", help="which kernels to sweep (comma-separated)")
    ap.add_argument("--kernel-time", action="store_true",
                    help="also record each kernel's own device time per call (torch.profiler, no launch gaps) "
                         "for the dense, default and ideal rows")
    ap.add_argument("--rank-by-kernel", action="store_true",
                    help="profile every candidate too and rank the tiles by the sparse kernel's own "
                         "device time (implies --kernel-time; slower per candidate)")
    ap.add_argument("--shapes", default=None,
                    help="KxN shapes to sweep, comma-separated (default: the four Llama-1B projections)")
    args = ap.parse_args()
    args.kernel_time = args.kernel_time or args.rank_by_kernel
    kinds = [k for k in args.kinds.split(",") if k]
    if not set(kinds) <= {"masked", "gemv", "dot"}:
        raise SystemExit(f"--kinds: unknown kind in {args.kinds!r}; known: masked, gemv, dot")
    su = Setup(smoke=args.smoke)
    shapes = [(96, 64), (64, 32)] if args.smoke else SHAPES
    if args.shapes:
        try:
            shapes = [tuple(int(v) for v in kn.lower().split("x")) for kn in args.shapes.split(",")]
        except ValueError:
            raise SystemExit(f"--shapes: expected KxN[,KxN...], e.g. 2048x8192; got {args.shapes!r}") from None
    timer = Timer(su.device, args.rep_ms)
    kernel_timer = Timer(su.device, args.rep_ms, profile_kernels=args.kernel_time)
    # block_k 256 stays in the grid although it was slower on every H100 tile (gemv_rank_by_kernel_h100.json).
    masked_grid = [(LaunchConfig(1, bn, bk, nw, 1), sk) for bn, bk, nw, sk in
                   itertools.product((32, 64, 128), (32, 64, 128, 256), (4, 8), (2, 4, 8))]
    dot_grid = [(LaunchConfig(16, bn, bk, nw, st), sk) for bn, bk, nw, st, sk in
                itertools.product((64, 128), (64, 128), (4, 8), (3, 4), (2, 4, 8))]
    if args.smoke:
        dot_grid = [(LaunchConfig(16, 16, 16, 1, 1), 2)]
    gemv_grid = [GemvConfig(bn, bk, nw, sl, sl, pf) for bn, bk, nw, sl, pf in
                 itertools.product((32, 64, 128, 256), (32, 64, 128), (4, 8),
                                   (16, 32) if args.smoke else (256, 512, 1024, 2048, 4096), (True, False))]
    rows, best = [], {}
    for K, N in shapes:
        n_copies = su.copies(K * N * 2)
        Ws = [torch.randn(N, K, device=su.device, dtype=su.dtype) * K ** -0.5 for _ in range(n_copies)]
        WTs = [prepare_weight(w) for w in Ws]
        dense = dict(row_dense(su, kernel_timer, K, N, 1, Ws, 4), kernels_us=kernel_timer.last_kernels)
        rows.append(dense)
        default = time_sparse(su, kernel_timer, K, N, 0.5, WTs, lambda x, wt, t: ops.sparse_linear(x, wt, t, None))
        rows.append(dict(kind="default", K=K, N=N, sparsity=0.5, dense_us=dense["us"], **default,
                         kernels_us=kernel_timer.last_kernels))
        for s in (0.25, 0.5, 0.7):
            rows.append(dict(row_ideal(su, kernel_timer, K, N, s), dense_us=dense["us"],
                             kernels_us=kernel_timer.last_kernels))
        grids = {"masked": masked_grid, "gemv": gemv_grid, "dot": dot_grid}
        for kind, grid in ((k, grids[k]) for k in kinds):
            cands, end = [], time.time() + args.budget_s / len(shapes) / len(kinds)
            for cfg in grid:
                if time.time() > end:
                    break
                if kind in ("masked", "dot"):
                    c, sk = cfg
                    if c.block_n > N or K // sk < c.block_k:
                        continue
                    fn = (lambda x, wt, t, c=c, sk=sk: sparse_host(x, wt, t, None, config=c, split_k=sk))
                    desc = dict(c.__dict__, split_k=sk)
                else:
                    if cfg.block_n > N or -(-K // cfg.min_slice) > 8 or cfg.min_slice > K:
                        continue
                    fn = (lambda x, wt, t, c=cfg: sparse_host(x, wt, t, None, gemv=c))
                    desc = cfg.__dict__
                ranked = args.rank_by_kernel
                try:
                    r = time_sparse(su, kernel_timer if ranked else timer, K, N, 0.5, WTs, fn)
                except Exception as e:  # noqa: BLE001 - a tile that does not compile is a data point
                    rows.append(dict(kind=f"{kind}_sweep", K=K, N=N, config=desc, error=str(e)[:200]))
                    continue
                kernels = kernel_timer.last_kernels if ranked else None
                rows.append(dict(kind=f"{kind}_sweep", K=K, N=N, sparsity=0.5, config=desc, **r, kernels_us=kernels))
                if r["rel_err"] < 1e-2:
                    name = "sparse_gemv_kernel" if kind == "gemv" else "sparse_linear_kernel"
                    score = kernels.get(name, r["us"]) if kernels else r["us"]
                    cands.append((score, fn, desc))
            if not cands:
                continue
            _, fn, desc = min(cands, key=lambda c: c[0])
            best[f"{kind} {K}x{N}"] = desc
            for s in (0.0, 0.25, 0.5, 0.7):
                r = time_sparse(su, kernel_timer, K, N, s, WTs, fn)
                rows.append(dict(kind=f"{kind}_best", K=K, N=N, sparsity=s, dense_us=dense["us"], config=desc, **r,
                                 kernels_us=kernel_timer.last_kernels))
        del Ws, WTs
        torch.cuda.empty_cache()
    if args.out:
        write_result(args.out, dict(best=best, rows=rows), envelope(su.device))
    print(f"{'kind':<11} {'K':>5} {'N':>5} {'s':>4} {'us':>8} {'dense':>8} {'x':>6} {'GB/s':>7} {'err':>8} config")
    for r in rows:
        if r["kind"] in ("default", "ideal", "masked_best", "gemv_best", "dot_best"):
            err = r["rel_err"] if r["rel_err"] is not None else float("nan")  # ideal rows: nothing to check
            print(f"{r['kind']:<11} {r['K']:>5} {r['N']:>5} {r['sparsity']:>4} {r['us']:>8.2f} {r['dense_us']:>8.2f} "
                  f"{r['dense_us'] / r['us']:>6.2f} {r['gbps']:>7.0f} {err:>8.1e} {r.get('config', '')}")
    print("best:", json.dumps(best))


if __name__ == "__main__":
    main()
