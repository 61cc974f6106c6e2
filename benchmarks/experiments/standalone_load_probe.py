#!/usr/bin/env python
"""Would a load without Dynamo be fast? Each program of a saved artifact is compiled by
Inductor's standalone_compile on the ExportedProgram's own graph (weights and state as
inputs, so the compiled artifact carries no weights), saved, and in a second fresh process
loaded with CompiledArtifact.load and called once: no tracing at load. Compare the times
with benchmarks/load_to_first_token.py on the same artifact.

    python benchmarks/experiments/standalone_load_probe.py ART.optc DIR compile --out a.json
    python benchmarks/experiments/standalone_load_probe.py ART.optc DIR load --out b.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

T0 = time.perf_counter()
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness.py
from harness import write_result  # noqa: E402


def program_inputs(ep, device) -> list:
    """The graph's flat inputs: the program's weights and state as stored, user inputs
    made at the example sizes (a symbolic size at its hint)."""
    state = {**ep.state_dict, **ep.constants}
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder"]
    args = []
    for spec, node in zip(ep.graph_signature.input_specs, placeholders):
        if spec.kind.name != "USER_INPUT":
            args.append(state[spec.target].to(device))
            continue
        val = node.meta["val"]
        shape = [s if isinstance(s, int) else s.node.hint for s in val.shape]
        make = torch.randn if val.dtype.is_floating_point else torch.zeros
        args.append(make(shape, dtype=val.dtype, device=device))
    return args


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("dir")
    p.add_argument("mode", choices=("compile", "load"))
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from torch._inductor import CompiledArtifact, standalone_compile

    import optc

    art = optc.load(args.artifact)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {"mode": args.mode, "artifact": args.artifact, "optc_load_s": round(time.perf_counter() - T0, 2)}
    for name, ep in art.programs.items():
        inputs = program_inputs(ep, device)
        where = os.path.join(args.dir, name)
        start = time.perf_counter()
        if args.mode == "compile":
            compiled = standalone_compile(ep.graph_module, inputs, dynamic_shapes="from_example_inputs")
            result[f"{name}_compile_s"] = round(time.perf_counter() - start, 2)
            shutil.rmtree(where, ignore_errors=True)
            compiled.save(path=where, format="unpacked")
            result[f"{name}_bytes"] = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(where) for f in fs)
        else:
            compiled = CompiledArtifact.load(path=where, format="unpacked")
            loaded = time.perf_counter()
            compiled(*inputs)
            if device == "cuda":
                torch.cuda.synchronize()
            result[f"{name}_load_s"] = round(loaded - start, 2)
            result[f"{name}_first_call_s"] = round(time.perf_counter() - loaded, 2)
    result["process_s"] = round(time.perf_counter() - T0, 2)
    write_result(args.out, result, device=device)
    print(result)


if __name__ == "__main__":
    main()
