#!/usr/bin/env python
"""optc's linear + GELU kernel (codegen/kernels/linear_gelu.py) at ViT-B/16's MLP shape.

At 768 -> 3072 channels for a batch of 64 and of 1 (12608 and 197 rows), bf16, each form one
CUDA graph replayed `--reps` times, us per call: cuBLAS's linear alone; Inductor's linear +
GELU (cuBLAS and a pointwise kernel) and its max-autotune (Triton templates, with the GELU
as their epilogue where that times faster); the kernel with each tile of TILES; and the
kernel without its GELU at the tile it picks (its GEMM alone, against cuBLAS's). Needs CUDA.

    python benchmarks/experiments/linear_gelu_tiles.py --out $OUT/linear_gelu_tiles_h100.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from gemv_pdl_prefetch import time_graph  # noqa: E402
from harness import envelope, write_result  # noqa: E402

from optc.compiler.codegen.kernels.linear_gelu import (  # noqa: E402
    NO_ACTIVATION, GemmTile, gemm_tile, linear_act, linear_gelu)

TILES = [GemmTile(128, 256, 64, 8, 3), GemmTile(128, 128, 64, 8, 4), GemmTile(128, 128, 64, 4, 4),
         GemmTile(128, 256, 64, 8, 4), GemmTile(256, 128, 64, 8, 3), GemmTile(128, 128, 32, 4, 4),
         GemmTile(64, 128, 64, 4, 4), GemmTile(64, 256, 64, 8, 3), GemmTile(128, 64, 64, 4, 4)]


def _us(f, x, reps: int) -> float:
    return round(time_graph(lambda x, _w, _o: f(x), x, None, None, reps)[0], 2)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=200, help="replays of each form's CUDA graph")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("linear_gelu_tiles.py times CUDA kernels: run it on a GPU")
    env = envelope("cuda")
    result = {"unit": "us per call", "shape": "768 -> 3072 channels, bf16", "rows": []}
    torch.manual_seed(0)
    for rows in (64 * 197, 197):
        x = torch.randn(rows, 768, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(3072, 768, device="cuda", dtype=torch.bfloat16) * 768 ** -0.5
        b = torch.randn(3072, device="cuda", dtype=torch.bfloat16) * 0.1
        forms = {"cublas linear": lambda x: F.linear(x, w, b),
                 "inductor linear + gelu": torch.compile(lambda x: F.gelu(F.linear(x, w, b))),
                 "inductor max-autotune linear + gelu": torch.compile(lambda x: F.gelu(F.linear(x, w, b)),
                                                                      mode="max-autotune-no-cudagraphs")}
        for t in TILES:
            forms[f"optc m{t.block_m} n{t.block_n} k{t.block_k} w{t.num_warps} s{t.num_stages}"] = \
                lambda x, t=t: linear_gelu(x, w, b, "none", t)
        picked = gemm_tile(rows, 3072, x.device)
        forms["optc GEMM alone, the tile it picks"] = lambda x: linear_act(x, w, b, NO_ACTIVATION, picked)
        row = {"rows": rows}
        with torch.no_grad():
            for name, f in forms.items():
                try:
                    row[name] = _us(f, x, args.reps)
                except Exception as e:  # noqa: BLE001 - a form that does not run is a result
                    row[name] = f"{type(e).__name__}: {e}"[:200]
        result["rows"].append(row)
        print(row, flush=True)
        if args.out:
            write_result(args.out, result, env)


if __name__ == "__main__":
    main()
