#!/usr/bin/env python
"""ViT-B/16's patch embedding alone: the convolution against codegen/patch_gemm's GEMM.

Times a 16 x 16 convolution with stride 16 (3 -> 768 channels on 224 x 224 images) as
exported, and the same program after `use_patch_gemms`, each eager and under
torch.compile (Inductor's defaults), at each batch size, interleaved call by call. On a GPU
each form is one CUDA graph replayed `--reps` times (bf16); on the CPU each call is timed
by the wall clock (fp32 and bf16). rel_err is the GEMM's output against the convolution's.

    python benchmarks/experiments/patch_embedding.py --out results/patch_embedding_cpu.json
    python benchmarks/experiments/patch_embedding.py --batch 1,64 --out $OUT/patch_embedding_h100.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness.py

import torch  # noqa: E402
from gemv_pdl_prefetch import time_graph  # noqa: E402
from harness import envelope, write_result  # noqa: E402

from optc.compiler.codegen.patch_gemm import use_patch_gemms  # noqa: E402


def _time_cpu(forms: dict, x, calls: int) -> dict:
    times = {name: [] for name in forms}
    for _ in range(calls):  # interleaved: a slow stretch of a shared machine hits every form
        for name, f in forms.items():
            t = time.perf_counter()
            f(x)
            times[name].append((time.perf_counter() - t) * 1e6)
    return {name: round(statistics.median(v), 1) for name, v in times.items()}


def _time_gpu(forms: dict, x, reps: int) -> dict:
    return {name: round(time_graph(lambda x, _w, _o, f=f: f(x), x, None, None, reps)[0], 2)
            for name, f in forms.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,8", help="comma list of batch sizes")
    ap.add_argument("--calls", type=int, default=30, help="CPU: timed calls of each form")
    ap.add_argument("--reps", type=int, default=200, help="GPU: replays of each form's CUDA graph")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = (torch.bfloat16,) if device == "cuda" else (torch.float32, torch.bfloat16)
    env = envelope(device)
    result = {"unit": "us per call", "shape": "3 -> 768 channels, 16 x 16 kernel, stride 16, 224 x 224", "rows": []}
    torch.manual_seed(0)
    for dtype in dtypes:
        conv = torch.nn.Conv2d(3, 768, 16, 16).to(device, dtype).eval().requires_grad_(False)
        for batch in (int(b) for b in args.batch.split(",")):
            x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
            program = torch.export.export(conv, (x,)).module()
            patched, count = use_patch_gemms(program)
            assert count == 1
            forms = {"conv eager": program, "gemm eager": patched,
                     "conv compiled": torch.compile(program), "gemm compiled": torch.compile(patched)}
            with torch.no_grad():
                ref, got = program(x).float(), forms["gemm compiled"](x).float()
                times = _time_gpu(forms, x, args.reps) if device == "cuda" else _time_cpu(forms, x, args.calls)
            row = {"dtype": str(dtype).removeprefix("torch."), "batch": batch, **times,
                   "rel_err": (got - ref).norm().item() / ref.norm().item()}
            result["rows"].append(row)
            print(row, flush=True)
            if args.out:
                write_result(args.out, result, env)


if __name__ == "__main__":
    main()
