#!/usr/bin/env python
"""Decode-step attention on the GPU: Inductor's SDPA against optc::decode_attention's
kernel at several launch configurations, each as a decode step runs it (a compiled
function of LAYERS attention calls with the step's mask computed from the position,
captured in one CUDA graph), at Llama-1B's shapes after share_kv_heads by default.
Prints a table; `--out` keeps the rows (us per layer, the kernels' own device time,
the error against SDPA in fp64).

    python benchmarks/kernels_decode_attention.py --out $OUT/decode_attention_h200.json
    python benchmarks/kernels_decode_attention.py --cache 2048 --position 40 --position 1500 --out ...
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import torch.nn.functional as F

from harness import envelope, write_result
from kernels_sparse_linear import Timer
from optc.compiler.codegen import attention_ops
from optc.compiler.codegen.kernels import decode_attention as k

LAYERS = 16


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=8, help="KV heads (programs per batch row)")
    ap.add_argument("--rows", type=int, default=4, help="query rows per KV head (G after share_kv_heads)")
    ap.add_argument("--cache", type=int, default=256, help="static cache length")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--position", type=int, action="append", default=[], help="decode positions (default 40, 200)")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def configs(S: int, L: int, D: int) -> list:
    """The default plan first, then splits x key blocks x warps (each one compile),
    including the default split and twice it (a long cache's default is past 4)."""
    found = [k.plan(S, L, D)]
    default = found[0].split
    for split in dict.fromkeys((1, 2, 4, default, 2 * default)):
        for block_l in (32, 64, 128):
            for warps in (4, 8):
                cfg = k.AttentionConfig(block_l=block_l, split=k.plan(S, L, D, split, block_l).split, num_warps=warps)
                if cfg not in found:
                    found.append(cfg)
    return found


def step_fn(attend, L: int, scale: float):
    """LAYERS attention calls over their own caches, the mask computed once from the position."""
    def step(qs, ks, vs, position):
        mask = (torch.arange(L, device=position.device)[None, :] <= position[:, None])[:, None, None, :]
        return [attend(q, k_, v, mask, scale) for q, k_, v in zip(qs, ks, vs)]
    return step


def main():
    args = parse_args()
    dev = torch.device("cuda")
    H, S, L, D = args.heads, args.rows, args.cache, args.dim
    gen = torch.Generator().manual_seed(0)
    qs, ks, vs = ([torch.randn(1, H, n, D, generator=gen).to(dev, torch.bfloat16) for _ in range(LAYERS)]
                  for n in (S, L, L))
    scale = D ** -0.5
    timer = Timer(dev, rep_ms=200, profile_kernels=True)
    env = envelope("cuda")
    sdpa = lambda q, k_, v, m, s: F.scaled_dot_product_attention(q, k_, v, attn_mask=m, scale=s)  # noqa: E731
    variants = {"inductor-sdpa": (sdpa, None)}
    for cfg in configs(S, L, D):
        variants[f"optc split={cfg.split} block_l={cfg.block_l} warps={cfg.num_warps}"] = (
            torch.ops.optc.decode_attention, cfg)
    # Each configuration compiles anew: the op's body reads the launch it is given here.
    torch._inductor.config.fx_graph_cache = False
    rows = []
    for name, (attend, cfg) in variants.items():
        torch._dynamo.reset()
        attention_ops._decode_attention_triton = functools.partial(k.decode_attention, config=cfg)
        step = torch.compile(step_fn(attend, L, scale), fullgraph=True, dynamic=False)
        for position in args.position or [40, 200]:
            pos = torch.tensor([position], device=dev)
            mask = (torch.arange(L, device=dev) <= position)[None, None, None, :]
            ref = [F.scaled_dot_product_attention(q.double(), k_.double(), v.double(), attn_mask=mask, scale=scale)
                   for q, k_, v in zip(qs, ks, vs)]
            out = step(qs, ks, vs, pos)
            err = max(((o.double() - r).norm() / r.norm()).item() for o, r in zip(out, ref))
            us, how = timer([lambda: step(qs, ks, vs, pos)])
            kernels = timer.last_kernels or {}
            rows.append(dict(variant=name, position=position, us_per_layer=round(us / LAYERS, 3),
                             kernel_us_per_layer=round(sum(kernels.values()) / LAYERS, 3),
                             kernels={n: round(t / LAYERS, 3) for n, t in kernels.items()}, rel_err=err, timing=how))
            print(f"{position:>5} {us / LAYERS:8.2f} us/layer  err {err:.1e}  {name}", file=sys.stderr, flush=True)
            if args.out:
                write_result(args.out, dict(shape=dict(kv_heads=H, rows=S, cache=L, dim=D, layers=LAYERS), rows=rows), env)
    print(f"{'position':>8} {'us/layer':>9} {'kernel us':>9}  variant")
    for r in sorted(rows, key=lambda r: (r["position"], r["us_per_layer"])):
        print(f"{r['position']:>8} {r['us_per_layer']:>9.2f} {r['kernel_us_per_layer']:>9.2f}  {r['variant']}")


if __name__ == "__main__":
    main()
