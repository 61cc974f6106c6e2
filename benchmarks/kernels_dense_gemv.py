#!/usr/bin/env python
"""Decode GEMVs on the GPU: optc::gemv's kernel at every candidate tile against the
reduction Inductor generates for the same one-row linear (with the target's options:
coordinate descent, PDL where the target has it) and against cuBLAS, per weight shape.
Each timing is a CUDA graph over as many distinct weights as fill three times the L2,
so the weights come from HBM as in a decode step. Prints the best tiles per shape and
writes every row (us per call, the GEMV kernel's own device time, GB/s, error).

    python benchmarks/kernels_dense_gemv.py --target h200 --out $OUT/kernels_dense_gemv_h200.json
    python benchmarks/kernels_dense_gemv.py --shape 4096x4096 --shape 4096x14336 ...

Shapes are NxK (output rows x input channels); the defaults are the projections
codegen/decode_gemv rewrites in Llama-1B and Llama-3.1-8B (o and down).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys

import torch
import torch.nn.functional as F

from harness import envelope, write_result
from kernels_sparse_linear import Timer
from optc.compiler import targets
from optc.compiler.codegen.kernels.dense_gemv import GemvTile, dense_gemv
from optc.compiler.codegen.kernels.gemv_tiles import default_tile, gemv_tile

SHAPES = ("2048x2048", "2048x8192", "4096x4096", "4096x14336")


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="auto")
    ap.add_argument("--shape", action="append", default=[], help=f"NxK (default: {', '.join(SHAPES)})")
    ap.add_argument("--rep-ms", type=int, default=40)
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def candidates(n: int, k: int, sms: int) -> list[GemvTile]:
    """Power-of-two tiles of 1K-16K elements, 4 warps up to 4K elements and 8 from 4K
    (8 to 64 per thread); K split in 2 or 4 where the grid would have fewer than two
    programs per SM."""
    found = []
    for bn, bk, warps in itertools.product((1, 2, 4, 8, 16, 32), (128, 256, 512, 1024, 2048), (4, 8)):
        if not 1024 <= bn * bk <= 16384 or bk > max(128, 1 << (k - 1).bit_length()):
            continue
        if (warps == 4 and bn * bk > 4096) or (warps == 8 and bn * bk < 4096):
            continue
        programs = -(-n // bn)
        for split in (1, 2, 4) if programs < 2 * sms else (1,):
            if split * bk <= k:
                found.append(GemvTile(bn, bk, warps, split))
    return found


def main():
    args = parse_args()
    dev = torch.device("cuda")
    tgt = targets.get(args.target)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 * 2**20)
    timer = Timer(dev, rep_ms=args.rep_ms, profile_kernels=True)
    env = envelope("cuda")
    rows = []
    for shape in args.shape or SHAPES:
        n, k = map(int, shape.split("x"))
        copies = max(2, min(64, -(-3 * l2 // (2 * n * k))))
        gen = torch.Generator().manual_seed(0)
        ws = [torch.randn(n, k, generator=gen).to(dev, torch.bfloat16) * k ** -0.5 for _ in range(copies)]
        xs = [torch.randn(1, 1, k, generator=gen).to(dev, torch.bfloat16) for _ in range(copies)]
        refs = [F.linear(x.double(), w.double()) for x, w in zip(xs, ws)]
        gb = 2 * n * k / 1e9

        def record(name, us, kernel_us, outs):
            err = max(((o.double() - r).norm() / r.norm()).item() for o, r in zip(outs, refs))
            row = dict(shape=shape, variant=name, us=round(us, 3), kernel_us=round(kernel_us, 3),
                       tbs=round(gb / us * 1e3, 3), rel_err=err)
            rows.append(row)
            print(f"{shape:>11} {us:8.2f} us {row['tbs']:6.2f} TB/s  err {err:.1e}  {name}",
                  file=sys.stderr, flush=True)
            if args.out:
                write_result(args.out, dict(target=tgt.name, copies_per_shape="3 x L2", rows=rows), env)

        def gemv_kernel_us(match):
            return sum(t for name, t in (timer.last_kernels or {}).items() if match(name))

        torch._dynamo.reset()
        options = {**tgt.inductor, "triton.cudagraphs": False}
        step = torch.compile(lambda xs, ws: [F.linear(x, w) for x, w in zip(xs, ws)], options=options,
                             fullgraph=True, dynamic=False)
        us, _ = timer([lambda: step(xs, ws)])
        record("inductor", us / copies, gemv_kernel_us(lambda s: True) / copies, step(xs, ws))
        us, _ = timer([functools.partial(F.linear, x, w) for x, w in zip(xs, ws)])
        record("cublas", us, gemv_kernel_us(lambda s: True), [F.linear(x, w) for x, w in zip(xs, ws)])
        stored, default = gemv_tile(tgt.name, n, k), default_tile(tgt.name, n, k)
        for tile in dict.fromkeys([stored, default, *candidates(n, k, sms)]):
            calls = [functools.partial(dense_gemv, x, w, None, tile) for x, w in zip(xs, ws)]
            us, _ = timer(calls)
            tag = " (stored)" if tile == stored else " (default)" if tile == default else ""
            record(f"optc {tile}{tag}", us, gemv_kernel_us(lambda s: "dense_gemv" in s),
                   [c() for c in calls])
    print_best_tiles(rows, args.shape or SHAPES)


def print_best_tiles(rows: list[dict], shapes, width: int = 11) -> None:
    """Per shape, the five fastest rows and every named one (a baseline, a tagged tile)."""
    print(f"{'shape':>{width}} {'us':>8} {'TB/s':>6} {'kernel us':>9}  variant")
    for shape in shapes:
        mine = sorted((r for r in rows if r["shape"] == shape), key=lambda r: r["us"])
        named = [r for r in mine if not r["variant"].startswith("optc") or "(" in r["variant"]]
        for r in (mine[:5] + [r for r in named if r not in mine[:5]]):
            print(f"{shape:>{width}} {r['us']:>8.2f} {r['tbs']:>6.2f} {r['kernel_us']:>9.2f}  {r['variant']}")


if __name__ == "__main__":
    main()
