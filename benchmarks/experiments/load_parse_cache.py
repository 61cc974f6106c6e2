#!/usr/bin/env python
"""What `optc.load` of an artifact costs with and without the parse caches around
torch.export.load (compiler/torch_private.py: export_load_type_hints_cached,
export_load_sympify_cached and export_load_schema_converters), in alternating fresh processes.

    python benchmarks/experiments/load_parse_cache.py ART.optc --runs 2 --out r.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness.py
from harness import write_result  # noqa: E402

# One load in a fresh process; "none" leaves torch.export.load as it is, "type_hints"
# keeps only the oldest cache, "both" the two parse caches, "all" is what optc.load does.
CHILD = """
import contextlib, json, sys, time
from optc.runtime import artifact
which = sys.argv[2]
if which != "all":
    artifact.export_load_schema_converters = contextlib.nullcontext
if which in ("none", "type_hints"):
    artifact.export_load_sympify_cached = contextlib.nullcontext
if which == "none":
    artifact.export_load_type_hints_cached = contextlib.nullcontext
import optc
start = time.perf_counter()
optc.load(sys.argv[1])
print(json.dumps({"load_s": round(time.perf_counter() - start, 3)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    arms = ("both", "all")
    loads = {arm: [] for arm in arms}
    for _ in range(args.runs):
        for arm in arms:  # alternating, so drift over the runs lands on both arms
            out = subprocess.run([sys.executable, "-c", CHILD, args.artifact, arm], capture_output=True, text=True,
                                 check=True)
            loads[arm].append(json.loads(out.stdout.strip().splitlines()[-1])["load_s"])
            print(f"{arm}: {loads[arm][-1]} s", file=sys.stderr)
    write_result(args.out, {"artifact": args.artifact, "runs": args.runs, "load_s": loads,
                            "arms": {"both": "the two parse caches (optc.load before the schema converters)",
                                     "all": "optc.load as it is"}}, device="cpu")


if __name__ == "__main__":
    main()
