"""The linear + GELU kernel's tiles against cuBLAS's GEMM and Inductor's GELU after it, at
ViT-B/16's MLP shape (768 -> 3072) for a batch of 64 and of 1, bf16, each form replayed in
a CUDA graph; us per call. Writes JSON to --out.
    python benchmarks/experiments/linear_gelu_tiles.py --out linear_gelu_tiles_h100.json
"""

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from optc.compiler.codegen.kernels.linear_gelu import GemmTile, linear_gelu  # noqa: E402

TILES = [GemmTile(128, 256, 64, 8, 3), GemmTile(128, 128, 64, 8, 4), GemmTile(128, 128, 64, 4, 4),
         GemmTile(128, 256, 64, 8, 4), GemmTile(256, 128, 64, 8, 3), GemmTile(128, 128, 32, 4, 4),
         GemmTile(64, 128, 64, 4, 4), GemmTile(64, 256, 64, 8, 3), GemmTile(128, 64, 64, 4, 4)]


def graph_us(fn, reps=20) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / reps)
    return sorted(times)[2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import triton

    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "rows": {}}
    for rows in (64 * 197, 197):
        x = torch.randn(rows, 768, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(3072, 768, device="cuda", dtype=torch.bfloat16) * 0.03
        b = torch.randn(3072, device="cuda", dtype=torch.bfloat16) * 0.1
        compiled = torch.compile(lambda x: F.gelu(F.linear(x, w, b)))
        row = {"cublas linear": graph_us(lambda: F.linear(x, w, b)),
               "inductor linear + gelu": graph_us(lambda: compiled(x))}
        for t in TILES:
            try:
                row[f"optc m{t.block_m} n{t.block_n} k{t.block_k} w{t.num_warps} s{t.num_stages}"] = \
                    graph_us(lambda: linear_gelu(x, w, b, "none", t))
            except Exception as e:  # noqa: BLE001 - a tile that does not launch is a result
                row[f"optc m{t.block_m} n{t.block_n} k{t.block_k} w{t.num_warps} s{t.num_stages}"] = str(e)[:200]
        result["rows"][rows] = row
        print(rows, json.dumps(row, indent=1), flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
