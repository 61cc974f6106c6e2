#!/usr/bin/env python
"""An .optc artifact in a fresh process: how long `optc.load` takes, how long the first
generated token takes after it, and the decode speed of that same decoder. The first
token's time is split: the decoder built (its AOTInductor packages loaded, if any), the
decode step's capture as a CUDA graph (on a GPU the decode program is lowered, or read
from the kernel cache, in its warm-up calls), and the prefill program's first call. On
the CPU the decode program is lowered at the next call instead, which `second_token_s`
times. `phases_s` is the wall time inside each part of the load (load_phases.py: members
read and checked, JSON to schema, graph deserialised, state dict, unlifting). Says whether
the packages ran, whether the artifact's kernel cache was used (and how many of the
lowerings hit it), how much tuning Inductor still did (coordinate descent's benchmark
calls: a kernel tuned again at the load, see torch_fixes), and every warning the load
gave. Run it twice, in two processes, for the spread between processes.

    python benchmarks/load_to_first_token.py x.optc --out $OUT/load.json [--tokens 64] [--device cuda] [--no-packages]
        [--profile $OUT/load.prof]

`--profile` runs the load and the first two generate calls under cProfile (which slows
Python-heavy parts, so its times are not the figures above: the result says `profiled`),
writes the statistics there and the functions with the most cumulative and own time beside
them as text (PATH.txt).

The CUDA context is created before the clock starts (every process pays it, optc or not).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import sys
import time
import warnings

import torch

from harness import envelope, write_result
from load_phases import load_phases


def prompt_for(art, device: str) -> torch.Tensor:
    """Token ids of the shape the artifact's prefill program was exported for."""
    from optc.compiler.codegen.lowering import vocab_size

    program = art.programs["prefill"]
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name == "input_ids":
            # A prefill exported with a dynamic length takes any prompt: 16 tokens, as `optc bench`.
            shape = tuple(d if isinstance(d, int) else 16 for d in node.meta["val"].shape)
            break
    else:
        raise SystemExit("the artifact's prefill program has no input_ids input")
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size(program) or 256, shape, generator=gen).to(device)


def tuning_counts() -> dict:
    """Inductor's tuning work in this process, up to now: a load that runs every kernel
    with the configuration the compile tuned benchmarks nothing (coordesc_tuning_bench 0)."""
    from optc.compiler.torch_private import dynamo_counters

    inductor = dynamo_counters()["inductor"]
    return {k: int(v) for k, v in sorted(inductor.items()) if k.startswith("coordesc") or "autotune" in k}


def write_profile(profiler: cProfile.Profile, path: str, rows: int = 60) -> None:
    """The statistics to `path`, and the top `rows` functions by cumulative and by own time to path.txt."""
    profiler.dump_stats(path)
    text = io.StringIO()
    for order in ("cumulative", "tottime"):
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(rows)
    with open(path + ".txt", "w") as f:
        f.write(text.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-kernel-cache", action="store_true",
                    help="lower the portable programs here instead of reading the artifact's kernel cache")
    ap.add_argument("--no-packages", action="store_true",
                    help="lower the portable programs even where the artifact's AOTInductor packages fit")
    ap.add_argument("--profile", default=None, metavar="PATH",
                    help="profile the load and the first tokens with cProfile; statistics to PATH, "
                         "a summary to PATH.txt")
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        torch.cuda.init()
        torch.empty(1, device=args.device)

    import optc
    from optc.compiler.codegen.aoti import PackagedProgram

    profiler = cProfile.Profile() if args.profile else None
    with warnings.catch_warnings(record=True) as caught, profiler or contextlib.nullcontext(), \
            load_phases() as phases:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        art = optc.load(args.artifact, kernel_cache=not args.no_kernel_cache, packages=not args.no_packages)
        t_load = time.perf_counter() - t0
        prompt = prompt_for(art, args.device)
        t1 = time.perf_counter()
        dec = art.decoder(device=args.device)  # programs placed and unlifted, packages loaded
        t_build = time.perf_counter() - t1
        setup_before = dec.setup_s
        first = art.generate(prompt, 1)
        first.cpu()  # the token is on the host: the request is answered
        t_first = time.perf_counter() - t1
        t_capture = dec.setup_s - setup_before  # the decode step's CUDA graph, 0 on the CPU
        t2 = time.perf_counter()
        again = art.generate(prompt, 2)
        again.cpu()
        t_second = time.perf_counter() - t2
    if profiler is not None:
        write_profile(profiler, args.profile)
    packaged = {"prefill": isinstance(dec.prefill_fn, PackagedProgram),
                "decode": isinstance(dec.decode_fn, PackagedProgram)}
    timing = dec.measure_decode(prompt, args.tokens)
    result = dict(
        artifact=args.artifact,
        load_s=round(t_load, 3),
        first_token_s=round(t_first, 3),
        load_to_first_token_s=round(t_load + t_first, 3),
        first_token_parts_s={"decoder": round(t_build, 3), "decode_capture": round(t_capture, 3),
                             "prefill_first_call": round(t_first - t_build - t_capture, 3)},
        # Wall time inside the parts of the load and the decoder's build, up to the second token
        # (load_phases.py: they may overlap, and nested ones are listed apart).
        phases_s={k: round(v, 3) for k, v in sorted(phases.items(), key=lambda kv: -kv[1])},
        second_token_s=round(t_second, 3),
        packaged=packaged,
        same_first_token=bool(torch.equal(again[:, : first.shape[1]], first)),
        decode_ms_per_token=timing.median_ms,
        decode=timing.as_row("optc artifact", None),
        warnings=sorted({str(w.message)[:300] for w in caught}),
        manifest_lowering=art.manifest.get("lowering"),
        kernel_cache={**(art.kernel_cache_status or {}), "fx_graph_cache": art.kernel_cache_hits()},
        tuning=tuning_counts(),
        profiled=profiler is not None,  # the times above are then cProfile's, slower
    )
    print(f"load {t_load:.2f} s, first token {t_first:.2f} s (decoder {t_build:.2f} s, decode capture "
          f"{t_capture:.2f} s, prefill's first call {t_first - t_build - t_capture:.2f} s; load to first token "
          f"{t_load + t_first:.2f} s), second token {t_second:.2f} s; "
          f"packages {packaged}; kernel cache {result['kernel_cache']}; tuning {result['tuning']}; "
          f"decode {timing.median_ms:.3f} ms/token",
          file=sys.stderr)
    print("  inside: " + ", ".join(f"{k} {v:.2f} s" for k, v in result["phases_s"].items()), file=sys.stderr)
    for w in result["warnings"]:
        print(f"  warning: {w}", file=sys.stderr)
    if args.out:
        write_result(args.out, result, envelope(args.device))


if __name__ == "__main__":
    main()
