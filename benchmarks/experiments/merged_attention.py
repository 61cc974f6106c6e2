#!/usr/bin/env python
"""What proportional attention costs after token merging, and how to make it cheaper.

merge_tokens adds log(size) to each key's scores through an additive [B, 1, 1, N] mask
(compiler/token_region.py). In ViT-B/16's merged forward at batch 64 the attention took
more time than the dense forward's although every level after the first has fewer tokens
(benchmarks/NOTES.md, "Where decode_qkv's gap was; merged ViT attention slower than
dense"). This times SDPA on ViT-B/16's shapes at the token counts of the r=13 schedule:

    no mask         plain SDPA (the floor; no proportional attention)
    mask            SDPA with the [B, 1, 1, N] additive bias, as merge_tokens emits it
    optc kernel     optc::encoder_attention: the flash loop reading the bias in tiles
    optc no mask    the same kernel with no mask (its floor, against SDPA's flash kernel)
    optc key row    (--mask padding) the kernel reading one row of the mask a sequence,
                    [B, 1, 1, N], as the encoder_sdpa rewrite hands it BERT's mask
    extra channel   no mask: the bias carried by one more head channel, q' = [q, 1, 0...],
                    k' = [k, log(size) / scale, 0...], v' = [v, 0...] padded to a multiple of
                    8 and the scale of the original head dim given explicitly, so that
                    q'.k' * scale = q.k * scale + log(size) exactly; the output's extra
                    channels are dropped

each eager (SDPA's own choice of kernel, then each kernel that takes the form, forced) and
under torch.compile (the concatenations included), over q/k/v laid out as
ViT's q/k/v projections leave them ([B, N, H, D] transposed). Each timing is a CUDA graph of one call
replayed `reps` times; rel_err is against the form's own (mask or no mask) in fp32. `--sweep` adds optc's kernel
at every candidate launch (kernels/encoder_attention.plan picks one). `--mask padding` times
BERT's padding mask instead (no channel form), e.g. at BERT-base's batch 32:

    python benchmarks/experiments/merged_attention.py --out $OUT/merged_attention.json
    python benchmarks/experiments/merged_attention.py --mask padding --batch 32 --tokens 128,512
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness.py

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from gemv_pdl_prefetch import time_graph  # noqa: E402
from harness import envelope, write_result  # noqa: E402

from optc.compiler.codegen import attention_ops  # noqa: E402,F401  (registers optc::encoder_attention)
from optc.compiler.codegen.kernels.encoder_attention import EncoderAttentionConfig, encoder_attention  # noqa: E402

BACKENDS = {"no mask": (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION),
            "mask": (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION),
            "extra channel": (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION), "optc kernel": (),
            "optc no mask": (), "optc key row": ()}
TOKENS = (197, 145, 93, 54)  # ViT-B/16 at r=13: the input, levels 4, 8 and 11


def mask_form(q, k, v, mask, size):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def extra_channel_form(q, k, v, mask, size):
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    pad = 8 - (d + 1) % 8 if (d + 1) % 8 else 0
    b, h, n, _ = q.shape
    one = q.new_ones(b, h, n, 1)
    zeros = q.new_zeros(b, h, n, pad)
    logs = (size.log() / scale).to(q.dtype)[:, None, :, None].expand(b, h, n, 1)
    q2 = torch.cat([q, one, zeros], dim=-1)
    k2 = torch.cat([k, logs, zeros], dim=-1)
    v2 = torch.cat([v, zeros, q.new_zeros(b, h, n, 1)], dim=-1)
    return F.scaled_dot_product_attention(q2, k2, v2, scale=scale)[..., :d]


def optc_form(q, k, v, mask, size):
    return torch.ops.optc.encoder_attention(q, k, v, mask, 1.0 / math.sqrt(q.shape[-1]))


def optc_key_row_form(q, k, v, mask, size):
    return optc_form(q, k, v, mask[:, :, :1], size)


def optc_plain_form(q, k, v, mask, size):
    return torch.ops.optc.encoder_attention(q, k, v, None, 1.0 / math.sqrt(q.shape[-1]))


def launch(config, q, k, v, mask, size):
    return encoder_attention(q, k, v, mask, 1.0 / math.sqrt(q.shape[-1]), config)


def launches(n):
    """Candidate launches of optc's kernel: rows a program, keys a trip, warps, stages."""
    return [EncoderAttentionConfig(m, bn, w, st) for m, bn, w, st in itertools.product(
        (64, 128), (32, 64, 128), (4, 8), (2, 3, 4)) if not (m == 64 and w == 8) and m <= max(64, 2 * n)]


def plain_form(q, k, v, mask, size):
    return F.scaled_dot_product_attention(q, k, v)


def forced(fn, backend, *args):
    with sdpa_kernel(backend):
        return fn(*args)


def inputs(batch, heads, n, d, device, dtype, kind, seed=0):
    """q, k, v as ViT's projections leave them, merged sizes, and the mask of `kind`:
    merge_tokens' size bias ([B, 1, 1, n], log(size) in the dtype), or BERT's padding mask
    as transformers 5 builds it ([B, 1, n, n] booleans, each row the keys' mask; a quarter
    of each sequence padding)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    qkv = torch.randn(batch, n, 3, heads, d, generator=g).to(device, dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    size = torch.randint(1, 8, (batch, n), generator=g).float().to(device)
    if kind == "size":
        return q, k, v, size.log().to(dtype)[:, None, None, :], size
    keys = torch.arange(n, device=device)[None, :] < n - n // 4
    mask = (keys[:, None, None, :] & torch.ones(1, 1, n, 1, dtype=torch.bool, device=device)).expand(batch, 1, n, n)
    return q, k, v, mask.contiguous(), size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma list of token counts")
    ap.add_argument("--sweep", action="store_true", help="also optc's kernel at every candidate launch")
    ap.add_argument("--mask", choices=("size", "padding"), default="size",
                    help="merge_tokens' size bias, or BERT's padding mask (no extra-channel form)")
    ap.add_argument("--out")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = envelope(device)
    tokens = [int(t) for t in args.tokens.split(",")]
    forms = {"no mask": plain_form, "mask": mask_form, "extra channel": extra_channel_form, "optc kernel": optc_form,
             "optc no mask": optc_plain_form}
    if args.mask == "padding":
        forms.pop("extra channel")
        forms["optc key row"] = optc_key_row_form
    rows = []
    for n in tokens:
        q, k, v, mask, size = inputs(args.batch, args.heads, n, args.head_dim, device, torch.bfloat16, args.mask)
        ref = mask_form(q.float(), k.float(), v.float(), mask if mask.dtype == torch.bool else mask.float(), size)
        ref_plain = plain_form(q.float(), k.float(), v.float(), None, size)
        for name, fn in forms.items():
            calls = [("eager", fn), ("compiled", torch.compile(fn, dynamic=False))]
            calls += [(f"eager {b.name.lower()}", functools.partial(forced, fn, b)) for b in BACKENDS[name]]
            if name == "optc kernel" and args.sweep:
                calls += [(f"launch m{c.block_m} n{c.block_n} w{c.num_warps} s{c.num_stages}",
                           functools.partial(launch, c)) for c in launches(n)]
            for how, call in calls:
                try:
                    out = call(q, k, v, mask, size).float()
                except RuntimeError as exc:  # a kernel that does not take this form
                    print(f"N={n:4d} {name:14s} {how}: {str(exc).splitlines()[0][:120]}", flush=True)
                    continue
                want = ref_plain if name in ("no mask", "optc no mask") else ref
                err = ((out - want).norm() / want.norm()).item()
                us = time_graph(lambda *_: call(q, k, v, mask, size), None, None, None, args.reps)[0] \
                    if device == "cuda" else float("nan")
                rows.append(dict(tokens=n, form=name, how=how, us=round(us, 2), rel_err=err))
                print(f"N={n:4d} {name:14s} {how:24s} {us:8.2f} us  err {err:.1e}", flush=True)
        if args.out:
            write_result(args.out, dict(batch=args.batch, heads=args.heads, head_dim=args.head_dim, mask=args.mask,
                                        dtype="bfloat16", rows=rows), env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
