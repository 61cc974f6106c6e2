#!/usr/bin/env python
"""Where an encoder forward's time goes: the GPU kernels of optc's lowered forward
program, dense and with passes, grouped by kernel name (torch.profiler over calls), the
encoder counterpart of decode_profile.py. optc is lowered as `optc bench --no-autotune`
lowers it, so ms/forward here is a diagnosis, not the benchmark (that is `optc bench`).

    python benchmarks/forward_profile.py --model bert-base --batch 32 --seq 128 --out $OUT/p.json \\
        --variant "" --variant "merge_tokens.r=8" --variant "merge_tokens.r=8 merge_tokens.kernels=torch"
    python benchmarks/forward_profile.py --model bert-base --batch 1 --variant "" --inductor-max

Variants take pass settings and `target.FIELD=VALUE` words as in decode_profile.py. Each
row also says which attention kernels ran (`attention`: flash, cuDNN, memory-efficient
or the unfused math path, by its softmax), read from the kernel names.
"""

from __future__ import annotations

import argparse
import time

import torch

import optc
from decode_profile import profiled_steps, report, split_target_fields
from harness import envelope, write_result
from optc.compiler import targets
from optc.models.user import resolve
from optc.runtime.baselines import compiled_forward
from optc.runtime.bench import _encoder_inputs
from optc.runtime.measure import Workload, measure
from optc.runtime.timing import measure as time_calls

# Substrings of SDPA backends' kernel names (torch 2.11 on sm_90). Not a bare "cudnn": cuDNN
# runs convolutions too (ViT's patch embedding). SDPA's math path upcasts to fp32 and runs
# GEMMs and a softmax that Inductor names `_safe_softmax`.
ATTENTION_KERNELS = {"flash": ("flash_fwd", "flash::"),
                     "cudnn": ("cudnn_generated_fort_native_sdpa", "cudnn_attention", "sm90_xmma_fprop_attn",
                               "fmha_sm90"),
                     "mem_efficient": ("fmha_cutlassF", "attention_kernel_batched", "efficient_attention"),
                     "math": ("_safe_softmax",)}


def attention_backends(table: list[dict]) -> dict:
    """{backend: us per call of `run`} for the SDPA kernels among the profile's rows."""
    found: dict[str, float] = {}
    for row in table:
        name = row["name"].lower()
        for backend, needles in ATTENTION_KERNELS.items():
            if any(n.lower() in name for n in needles):
                found[backend] = round(found.get(backend, 0.0) + row["us_per_step"], 1)
    return found


def profile_variant(model, entry, inputs, target, settings: dict, calls: int) -> dict:
    art = optc.compile(model, inputs, target=target.name, pipeline_name="default", passes=settings,
                       entry=entry, verify=False)
    m = measure(art, target, Workload("forward", batch=int(inputs[0].shape[0])), inputs=inputs, autotune=False)
    run = lambda: [m.program(*inputs) for _ in range(calls)]  # noqa: E731
    table = profiled_steps(run, calls, top=40)
    return dict(ms_per_forward=m.timing.median_ms, attention=attention_backends(table["top"]),
                passes={p["name"]: p.get("plan") for p in art.manifest["passes"] if p.get("applied")}, **table)


def profile_inductor_max(model, inputs, calls: int) -> dict:
    """torch.compile(mode="max-autotune") of the model (optc bench's inductor-max
    baseline), its kernels per forward."""
    forward = compiled_forward(model, "max-autotune", inputs[0].device)
    with torch.no_grad():
        ms = time_calls(forward, [inputs]).median_ms  # compiles and autotunes in its warm-up
        run = lambda: [forward(*inputs) for _ in range(calls)]  # noqa: E731
        table = profiled_steps(run, calls, top=40)
    return dict(ms_per_forward=ms, attention=attention_backends(table["top"]), **table)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="bert-base")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=None, help="tokens per row (text encoders)")
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--out", default=None)
    ap.add_argument("--inductor-max", action="store_true", help="also profile torch.compile max-autotune's forward")
    args = ap.parse_args()
    target = targets.get("auto")
    entry, model, example = resolve(args.model, device=target.device, dtype=target.dtype)
    inputs = _encoder_inputs(entry, example, args.batch, args.seq, target.device)
    env = envelope(target.device)
    result = dict(model=args.model, batch=args.batch, seq=args.seq, unit="ms per forward", variants={})
    for text in args.variant or [""]:
        t0 = time.time()
        settings, variant_target = split_target_fields(text.split(), target)
        r = profile_variant(model, entry, inputs, variant_target, settings, args.calls)
        result["variants"][text or "dense"] = r
        report(text or "dense", r, result, None, env, time.time() - t0, unit="forward")
        if args.out:  # through the harness here, so that this script's provenance is checkable
            write_result(args.out, result, env)
        print(f"   attention kernels (us per forward): {r['attention'] or 'none recognised'}")
    if args.inductor_max:
        r = result["inductor-max"] = profile_inductor_max(model, inputs, args.calls)
        report("inductor-max", r, result, None, env, unit="forward")
        if args.out:
            write_result(args.out, result, env)


if __name__ == "__main__":
    main()
