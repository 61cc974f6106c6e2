#!/usr/bin/env python
"""How sensitive is a decode step to rounding, from the state the lowering check starts
it in? For each seed: a random token at the example position, its output's relative move
when every half-precision weight and rounded activation moves by one ulp (the check's
noise, lowering.rounding_noise with the noisy twin), from a zeroed cache and from the cache
the prefill program leaves after a random prompt (lowering.prefilled_state). No lowering
is involved: the noise is the uncompiled program's own.

    python benchmarks/experiments/decode_check_noise.py smollm2-135m --seeds 16 --out r.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness.py
from harness import envelope, write_result  # noqa: E402

from optc.compiler import capture as cap  # noqa: E402
from optc.compiler.codegen import lowering  # noqa: E402
from optc.compiler.session import CompileSession  # noqa: E402
from optc.models.user import resolve  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    entry, model, example = resolve(args.model, device="cpu", dtype=dtype)
    session = CompileSession(model, example, target="cpu", entry=entry, log=lambda m: None)
    programs = session.run(session.resolve()).programs  # the default pipeline, unlowered
    decode = programs[cap.DECODE]
    gm, inputs, vocab = cap.graph_module(decode), session.captured.example_inputs[cap.DECODE], lowering.vocab_size(decode)
    start = lowering.decode_start(programs, session.captured.example_inputs)
    noise = lowering.noise_of(gm)
    rows = []
    for seed in range(args.seeds):
        step_args, step_kwargs = lowering.random_like_inputs(inputs, vocab, seed=1234 + seed)
        row = {"seed": seed}
        for label, state in (("zeroed", None), ("prefilled", start(4321 + seed))):
            with torch.no_grad():
                lowering.reset_state(gm, state)
                ref = gm(*step_args, **step_kwargs)
                row[label] = noise(ref, step_args, step_kwargs, state)
        lowering.reset_state(gm)
        rows.append(row)
        print(f"seed {seed}: noise from a zeroed cache {row['zeroed']:.4f}, from a prefilled one {row['prefilled']:.4f}",
              flush=True)
    summary = {label: {"median": statistics.median(r[label] for r in rows), "max": max(r[label] for r in rows),
                       "share_above_cap": sum(r[label] > lowering.NOISE_TOLERANCE_CAP for r in rows) / len(rows)}
               for label in ("zeroed", "prefilled")}
    write_result(args.out, {"model": args.model, "dtype": args.dtype, "program": "decode",
                            "noise_cap": lowering.NOISE_TOLERANCE_CAP, "summary": summary, "rows": rows},
                 envelope("cpu"))
    print(summary)


if __name__ == "__main__":
    main()
