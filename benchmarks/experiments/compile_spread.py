#!/usr/bin/env python
"""How much does one compile of the same decode program differ from the next?

The same dense llama-1b decode program measured 1.36-1.53 ms/token across processes on
the H100, while interleaved rounds inside one process agree to 0.3% (benchmarks/NOTES.md).
This script separates the compile from the process: each ARM (pass settings plus
Inductor options) is lowered COMPILES times, each a fresh torch.compile with Inductor's
caches off, and all of them are then timed round-robin in one process. If the spread
between compiles of one arm is as large as across processes, the compile freezes the
difference (runtime autotuning such as coordinate descent picks kernel configs by
timing them); if an arm without runtime tuning has no spread, that is the cause.
`--profile` adds each compile's kernel table (decode_profile.kernel_table), so the
kernels that differ between a fast and a slow compile can be named.

    python benchmarks/experiments/compile_spread.py --out $OUT/compile_spread.json --compiles 3 \\
        --arm "cdt:" --arm "no-cdt:inductor.coordinate_descent_tuning=false" --profile

An ARM is "LABEL:SETTINGS"; SETTINGS are space-separated `PASS.KEY=VALUE` (as optc
--set) and `inductor.OPTION=VALUE` (torch.compile options on top of the target's).
The JSON is rewritten after every compile and every round (`"partial": true` until done).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path

# Every lowering below must be a cold compile: a cache hit would reuse an earlier
# compile's choices and hide the spread this script measures.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness.py and the scripts reused here

import torch  # noqa: E402

import optc  # noqa: E402
from torch._inductor.codecache import PyCodeCache  # noqa: E402

from optc.compiler import targets  # noqa: E402
from optc.compiler.codegen.lowering import lower  # noqa: E402
from optc.compiler.config import parse_sets, parse_value  # noqa: E402
from optc.models.user import resolve  # noqa: E402
from optc.runtime.bench import decode_timer  # noqa: E402
from optc.runtime.timing import device_probe  # noqa: E402
from decode_profile import kernel_table  # noqa: E402
from harness import envelope, write_result  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_arm(text: str) -> tuple[str, dict, dict]:
    """'LABEL:SETTINGS' -> (label, optc pass settings, Inductor options)."""
    label, sep, rest = text.partition(":")
    if not sep or not label:
        raise SystemExit(f"--arm {text!r}: expected LABEL:SETTINGS (SETTINGS may be empty)")
    sets, inductor = [], {}
    for item in shlex.split(rest):  # as --variant: quote a value with spaces
        key, eq, val = item.partition("=")
        if not eq:
            raise SystemExit(f"--arm {text!r}: {item!r} is not KEY=VALUE")
        if key.startswith("inductor."):
            inductor[key[len("inductor."):]] = parse_value(val)
        else:
            sets.append(item)
    return label, parse_sets(sets), inductor


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-1b")
    ap.add_argument("--arm", action="append", default=[], help="LABEL:SETTINGS (repeatable; default one dense arm)")
    ap.add_argument("--compiles", type=int, default=3, help="cold compiles per arm")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin timing rounds over all compiles")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--profile", action="store_true", help="also record each compile's kernel table")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.compiles < 1 or args.rounds < 1:
        raise SystemExit("--compiles and --rounds must be >= 1")
    arms = [parse_arm(a) for a in (args.arm or ["dense:"])]
    labels = [label for label, _, _ in arms]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"--arm labels must differ, got {labels}")
    target = targets.get("auto")
    entry, model, example = resolve(args.model, device=target.device, dtype=target.dtype)
    prompt = example[0][:, :16].contiguous()
    env = envelope(target.device)
    result = dict(model=args.model, probe=device_probe(target.device),
                  tokens=args.tokens, caches_disabled=os.environ.get("TORCHINDUCTOR_FORCE_DISABLE_CACHES") == "1",
                  partial=True, arms={})

    def write():
        if args.out:
            write_result(args.out, result, env)

    decoders = []
    for label, sets, inductor in arms:
        art = optc.compile(model, (prompt,), target=target.name, pipeline_name="default",
                           passes=sets, entry=entry, verify=False)
        tgt = dataclasses.replace(target, inductor={**target.inductor, **inductor})
        arm = result["arms"][label] = dict(passes=sets, inductor={**tgt.decoder_inductor, **tgt.inductor}, compiles=[],
                                           resolved=art.manifest.get("config"))
        for i in range(args.compiles):
            # Dynamo would otherwise reuse the first compile for the same graph (weights
            # are inputs to it). The earlier decoders replay their CUDA graphs and never
            # call their compiled step again; without CUDA (a smoke run) they recompile
            # when next called, so CPU timings here mean nothing.
            torch._dynamo.reset()
            # Inductor also keeps every generated kernel module in memory, keyed by its
            # source: a second compile of the same graph would get the first one's kernels
            # back, with the configs their runtime tuning already chose. Clearing it makes
            # each compile tune its own (the earlier decoders hold their modules).
            PyCodeCache.cache_clear()
            dec = decode_timer(art, lambda m, tgt=tgt: lower(m, tgt, decoder=True), str(prompt.device))
            t0 = time.perf_counter()
            dec.warm_up(prompt)
            row = dict(setup_s=round(time.perf_counter() - t0, 1), round_medians_ms=[])
            if args.profile and torch.cuda.is_available():
                row["kernels"] = kernel_table(dec, prompt, 16)
            arm["compiles"].append(row)
            decoders.append((label, i, dec, row))
            log(f"{label} compile {i + 1}/{args.compiles}: set up in {row['setup_s']} s")
            write()
    for r in range(args.rounds):
        for label, i, dec, row in decoders:
            row["round_medians_ms"].append(round(dec.measure_decode(prompt, args.tokens).median_ms, 4))
        log(f"round {r + 1}/{args.rounds} done")
        write()
    for label, arm in result["arms"].items():
        meds = sorted(sorted(c["round_medians_ms"])[len(c["round_medians_ms"]) // 2] for c in arm["compiles"])
        arm["median_per_compile_ms"] = meds
        arm["spread"] = round(meds[-1] / meds[0] - 1, 4)
    result["partial"] = False
    write()
    print(f"{'arm':<16} {'compile':>7} {'setup s':>8}  round medians (ms/token)")
    for label, i, _, row in decoders:
        print(f"{label:<16} {i + 1:>7} {row['setup_s']:>8}  {' '.join(f'{m:.4f}' for m in row['round_medians_ms'])}")
    for label, arm in result["arms"].items():
        print(f"{label}: per-compile medians {arm['median_per_compile_ms']}, max/min - 1 = {100 * arm['spread']:.1f}%")


if __name__ == "__main__":
    main()
