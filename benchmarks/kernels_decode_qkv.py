#!/usr/bin/env python
"""A decode step's RMSNorm + q/k/v projections + rotary on the GPU: optc::decode_qkv's
kernel at every candidate tile against what Inductor generates for the same function
(HF Llama's form, with the target's options: coordinate descent, PDL where the target
has it), compiled once for one layer and called a layer at a time, as in a decode step;
also compiled over all layers at once, where Inductor's kernels each cover several
independent layers (a bound no step reaches). Each timing is a CUDA graph over as many
distinct layers' weights as fill three times the L2, so the weights come from HBM as in
a decode step. Prints the best tiles per shape and writes every row (us per layer, the
kernels' own device time, TB/s of weight bytes, error against fp64).

    python benchmarks/kernels_decode_qkv.py --target h200 --out $OUT/kernels_decode_qkv_h200.json

Shapes are K/Hq/Hkv/D (hidden width, query heads, KV heads, head width); the defaults
are Llama-1B's and Llama-3.1-8B's.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys

import torch
import triton

from harness import envelope, write_result
from kernels_dense_gemv import print_best_tiles
from kernels_sparse_linear import Timer
from optc.compiler import targets
from optc.compiler.codegen.kernels.decode_qkv import QkvTile, decode_qkv, default_qkv_tile

SHAPES = ("2048/32/8/64", "4096/32/8/128")
EPS = 1e-5


def parse_args(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="auto")
    ap.add_argument("--shape", action="append", default=[], help=f"K/Hq/Hkv/D (default: {', '.join(SHAPES)})")
    ap.add_argument("--rep-ms", type=int, default=40)
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def candidates(half: int, k: int) -> list[QkvTile]:
    """Pairs a program dividing D/2, 128-1024 channels a trip, 2K-16K weight elements a
    trip, 4 warps up to 4K elements and 8 from 4K; and one trip over all of K (1, 2 or 4
    pairs, 4 or 8 warps): a program's whole weight slice in flight at once, the form the
    GEMV probe found fastest on the o projection (experiments/gemv_pdl_prefetch.py)."""
    found = []
    whole = triton.next_power_of_2(k)
    for bp, warps in itertools.product((1, 2, 4), (4, 8)):
        if half % bp == 0 and 2 * bp * whole <= 32768:
            found.append(QkvTile(bp, whole, warps))
    for bp, bk, warps in itertools.product((1, 2, 4, 8, 16), (128, 256, 512, 1024), (4, 8)):
        elems = 2 * bp * bk
        if half % bp or bk > k or not 1024 <= elems <= 16384:
            continue
        if (warps == 4 and elems > 4096) or (warps == 8 and elems < 4096):
            continue
        found.append(QkvTile(bp, bk, warps))
    return list(dict.fromkeys(found))  # a one-trip tile may also be a looped one (K <= 1024)


def make_layers(K: int, Hq: int, Hkv: int, D: int, copies: int, device) -> list[dict]:
    """`copies` layers of distinct bf16 inputs and q/k/v weights (x, g, wq, wk, wv), with
    the cos and sin of one position (cos, sin; shared)."""
    gen = torch.Generator().manual_seed(0)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=gen) * scale).to(device, torch.bfloat16)

    layers = [dict(x=rnd(1, 1, K), g=rnd(K), wq=rnd(Hq * D, K, scale=K ** -0.5), wk=rnd(Hkv * D, K, scale=K ** -0.5),
                   wv=rnd(Hkv * D, K, scale=K ** -0.5)) for _ in range(copies)]
    freqs = 37.0 / 10000 ** (torch.arange(0, D, 2).double() / D)
    emb = torch.cat([freqs, freqs])
    cos, sin = (t.to(device, torch.bfloat16).view(1, 1, 1, D) for t in (emb.cos(), emb.sin()))
    for layer in layers:
        layer.update(cos=cos, sin=sin)
    return layers


def hf_form(x, g, wq, wk, wv, cos, sin, D):
    """HF Llama's RMSNorm, projections and rotate_half rotary for one token, in x's dtype."""
    x32 = x.float()
    h = g * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)

    def heads(w, rotate):
        t = (h @ w.T).view(1, 1, -1, D).transpose(1, 2)
        if not rotate:
            return t
        return t * cos + torch.cat([-t[..., D // 2:], t[..., :D // 2]], dim=-1) * sin

    return heads(wq, True), heads(wk, True), heads(wv, False)


def main():
    args = parse_args()
    dev = torch.device("cuda")
    tgt = targets.get(args.target)
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 50 * 2**20)
    timer = Timer(dev, rep_ms=args.rep_ms, profile_kernels=True)
    env = envelope("cuda")
    rows = []
    for shape in args.shape or SHAPES:
        K, Hq, Hkv, D = map(int, shape.split("/"))
        rows_per_layer = (Hq + 2 * Hkv) * D
        copies = max(2, min(64, -(-3 * l2 // (2 * rows_per_layer * K))))
        layers = make_layers(K, Hq, Hkv, D, copies, dev)
        cos, sin = layers[0]["cos"], layers[0]["sin"]
        refs = [torch.cat([t.reshape(-1) for t in hf_form(
            *(L[n].double() for n in ("x", "g", "wq", "wk", "wv")), cos.double(), sin.double(), D)])
            for L in layers]
        gb = 2 * rows_per_layer * K / 1e9

        def record(name, us, kernel_us, outs):
            err = max(((o.double().reshape(-1) - r).norm() / r.norm()).item() for o, r in zip(outs, refs))
            row = dict(shape=shape, variant=name, us=round(us, 3), kernel_us=round(kernel_us, 3),
                       tbs=round(gb / us * 1e3, 3), rel_err=err)
            rows.append(row)
            print(f"{shape:>14} {us:8.2f} us {row['tbs']:6.2f} TB/s  err {err:.1e}  {name}",
                  file=sys.stderr, flush=True)
            if args.out:
                write_result(args.out, dict(target=tgt.name, copies_per_shape="3 x L2", rows=rows), env)

        def kernel_us(match):
            return sum(t for name, t in (timer.last_kernels or {}).items() if match(name))

        torch._dynamo.reset()
        options = {**tgt.inductor, **tgt.decoder_inductor, "triton.cudagraphs": False}

        def all_layers(layers):
            # q, k and v as the graph leaves them (no concatenation the op does not pay for)
            return [hf_form(L["x"], L["g"], L["wq"], L["wk"], L["wv"], cos, sin, D) for L in layers]

        step = torch.compile(all_layers, options=options, fullgraph=True, dynamic=False)
        us, _ = timer([lambda: step(layers)])
        # A lower bound no decode step reaches: Inductor's kernels here each cover several
        # independent layers, where a step must finish layer i before layer i + 1.
        record("inductor (all layers in one program)", us / copies, kernel_us(lambda s: True) / copies,
               [torch.cat([t.reshape(-1) for t in qkv]) for qkv in step(layers)])
        torch._dynamo.reset()
        one = torch.compile(hf_form, options=options, fullgraph=True, dynamic=False)
        calls = [functools.partial(one, L["x"], L["g"], L["wq"], L["wk"], L["wv"], cos, sin, D) for L in layers]
        us, _ = timer(calls)
        record("inductor (one call a layer)", us, kernel_us(lambda s: True),
               [torch.cat([t.reshape(-1) for t in c()]) for c in calls])
        default = default_qkv_tile(tgt.name, D // 2, K)
        for tile in dict.fromkeys([default, *candidates(D // 2, K)]):
            calls = [functools.partial(decode_qkv, L["x"], L["g"], EPS, L["wq"], L["wk"], L["wv"], cos, sin, D, tile)
                     for L in layers]
            us, _ = timer(calls)
            record(f"optc {tile}{' (default)' if tile == default else ''}", us,
                   kernel_us(lambda s: "decode_qkv" in s), [c() for c in calls])
    print_best_tiles(rows, args.shape or SHAPES, width=14)


if __name__ == "__main__":
    main()
