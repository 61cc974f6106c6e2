#!/usr/bin/env python
"""Where a decode step's time goes: the GPU kernels of optc's decode CUDA graph, dense
and with passes, grouped by kernel name (torch.profiler over graph replays), and with
`--inductor-max` the same table for torch.compile(mode="max-autotune")'s decode step in
the same process, so the two steps compare kernel by kernel. optc is lowered without
max-autotune unless `--autotune` (minutes cheaper; the sparse kernels are not autotuned
by Inductor either way), so ms/token here is a diagnosis, not the benchmark (that is
`optc bench`).

    python benchmarks/decode_profile.py --model smollm2-135m --inductor-max --out $OUT/p.json \\
        --variant "" --variant "sparsify_activations.method=cats sparsify_activations.sparsity=0.5"

A variant's `target.FIELD=VALUE` words change the target's lowering fields for that
variant (`target.realize_gemv_inputs=false` profiles the step without
codegen/gemv_inputs' rewrite; `target.decode_attention=true` with optc's decode
attention kernel, codegen/decode_sdpa); `target.inductor.OPTION=VALUE` sets an
Inductor option of the target's lowering (`target.inductor.combo_kernels=true`), and
`target.decoder_inductor.OPTION=VALUE` one of its decoder programs' only.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import optc
from harness import envelope, write_result
from kernels_sparse_linear import profile_kernels
from optc.compiler import targets
from optc.compiler.codegen.lowering import lower
from optc.compiler.config import parse_sets
from optc.models.user import resolve
from optc.runtime.bench import decode_timer


def split_target_fields(words: list[str], target):
    """(the pass settings among `words`, `target` with its `target.FIELD=VALUE` and
    `target.inductor.OPTION=VALUE` words applied: compiler/targets.with_overrides)."""
    settings, lowering = targets.split_words(words)
    return parse_sets(settings), targets.with_overrides(target, lowering)


def profile_variant(model, entry, prompt, target, settings: dict, steps: int, autotune: bool = False,
                    top: int = 25) -> dict:
    art = optc.compile(model, (prompt,), target=target.name, pipeline_name="default",
                       passes=settings, entry=entry, verify=False)
    dec = decode_timer(art, lambda m: lower(m, target, autotune=autotune, decoder=True), str(prompt.device))
    dec.warm_up(prompt)
    ms = dec.measure_decode(prompt, 64).median_ms
    return dict(ms_per_token=ms, **kernel_table(dec, prompt, steps, top))


def kernel_table(dec, prompt, steps: int, top: int = 25) -> dict:
    """GPU kernels of `steps` decode-graph replays, grouped by name, per step."""
    # Prefill outside the profile: only the decode steps' graph replays are counted.
    # (decode_profile_llama1b_h100.json predates this and includes one prefill / steps.)
    dec.generate(prompt, 1)
    return profiled_steps(lambda: dec._decode_steps(steps), steps, top)


_PROFILER_WARM = []  # set once this process has run the profiler (profiled_steps)


def profiled_steps(run, steps: int, top: int = 25) -> dict:
    """The kernels of `run()` (`steps` decode steps) under the profiler, per step. The
    first profile of a process also records the profiler's own start-up (thousands of fill
    kernels on the H200, not the program's): it runs once, unread, before the first table."""
    if not _PROFILER_WARM:
        profile_kernels(run, steps, gaps={})
        _PROFILER_WARM.append(True)
    gaps: dict[str, float] = {}
    groups = profile_kernels(run, steps, gaps=gaps)
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
    total = sum(v[0] for _, v in ranked)
    by_gap = sorted(gaps.items(), key=lambda kv: -kv[1])
    return dict(kernel_us_per_step=round(total, 1),
                kernels_per_step=round(sum(v[1] for _, v in ranked), 1),
                # Device idle time per step, and the kernels it comes before (launch latency
                # in the graph, or the host between two replays for the step's first kernel).
                idle_us_per_step=round(sum(gaps.values()), 1),
                top=[dict(name=k, us_per_step=round(v[0], 1), calls_per_step=round(v[1], 1),
                          idle_before_us_per_step=round(gaps.get(k, 0.0), 1)) for k, v in ranked[:top]],
                top_idle=[dict(name=k, idle_before_us_per_step=round(us, 1),
                               calls_per_step=round(groups.get(k, (0, 0))[1], 1)) for k, us in by_gap[:top]])


def profile_inductor_max(model, prompt, steps: int) -> dict:
    """torch.compile(mode="max-autotune") of the static-cache decode step (the
    inductor-max baseline of `optc bench`), its kernels per step over `steps` steps."""
    from optc.runtime.baselines import static_cache_module

    B, T = prompt.shape
    module = static_cache_module(model, B, T + steps + 70)
    step = torch.compile(module, mode="max-autotune", fullgraph=False, dynamic=False)

    def run(n, start):
        tok = prompt[:, -1:]
        for i in range(n):
            torch.compiler.cudagraph_mark_step_begin()
            logits = step(input_ids=tok, cache_position=torch.tensor([start + i], device=prompt.device))
            tok = logits[:, -1, :].argmax(dim=-1, keepdim=True)

    with torch.no_grad():
        module(input_ids=prompt, cache_position=torch.arange(T, device=prompt.device))
        run(4, T)  # compile, autotune, graph capture
        torch.cuda.synchronize()
        start = time.perf_counter()
        run(64, T + 4)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3 / 64  # host loop included, as in the bench's baseline
        return dict(ms_per_token=ms, **profiled_steps(lambda: run(steps, T + 4), steps))


def report(label: str, r: dict, result: dict, out: str | None, env: dict, seconds: float | None = None,
           unit: str = "token") -> None:
    """Prints a variant's row (`unit`: what one step is, "token" or "forward") and writes the result."""
    took = f" ({seconds:.0f} s)" if seconds is not None else ""
    print(f"== {label}: {r['ms_per_' + unit]:.3f} ms/{unit}, kernels {r['kernel_us_per_step']} us/{unit}, "
          f"{r['kernels_per_step']} launches/{unit}{took}", file=sys.stderr, flush=True)
    for row in r["top"][:14]:
        print(f"   {row['us_per_step']:>8.1f} us {row['calls_per_step']:>6.1f}x  {row['name']}", file=sys.stderr)
    if out:
        write_result(out, result, env)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--inductor-max", action="store_true", help="also profile torch.compile max-autotune's step")
    ap.add_argument("--autotune", action="store_true", help="lower optc's step with max-autotune too")
    ap.add_argument("--top", type=int, default=25, help="kernels listed per variant, by time")
    args = ap.parse_args()
    target = targets.get("auto")
    entry, model, example = resolve(args.model, device=target.device, dtype=target.dtype)
    prompt = example[0][:, :16].contiguous()
    env = envelope(target.device)
    result = dict(model=args.model, optc_autotune=args.autotune, variants={})
    for text in args.variant or [""]:
        t0 = time.time()
        settings, variant_target = split_target_fields(text.split(), target)
        r = profile_variant(model, entry, prompt, variant_target, settings, args.steps, args.autotune,
                              args.top)
        result["variants"][text or "dense"] = r
        report(text or "dense", r, result, args.out, env, time.time() - t0)
    if args.inductor_max:
        r = result["inductor-max"] = profile_inductor_max(model, prompt, args.steps)
        report("inductor-max", r, result, args.out, env)


if __name__ == "__main__":
    main()
