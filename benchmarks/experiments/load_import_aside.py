#!/usr/bin/env python
"""`optc.load` in fresh processes, with torch.export's deserialiser imported on a thread
while the members are read and hashed (runtime/load_aside.import_deserialiser_aside, as
shipped) and without (the thread started with nothing to do, the import left to the
first program's deserialisation). Timed from before `import optc`, as a script that
loads an artifact sees it; the two kinds of process alternate.

    python benchmarks/experiments/load_import_aside.py ART.optc --runs 5 --out r.json
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: harness.py
from harness import write_result  # noqa: E402

_CHILD = """
import sys, time, threading
import torch
start = time.perf_counter()
import optc
from optc.runtime import load_aside
if sys.argv[2] == "without":
    def idle():
        thread = threading.Thread(target=lambda: None)
        thread.start()
        return thread
    load_aside.import_deserialiser_aside = idle
optc.load(sys.argv[1])
print(time.perf_counter() - start)
"""


def timed_load(path: str, kind: str) -> float:
    out = subprocess.run([sys.executable, "-c", _CHILD, path, kind], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="the device the result envelope names")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    timed_load(args.artifact, "with")  # page cache and bytecode warm for both kinds
    rows: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(args.runs):
        for kind in ("with", "without"):
            rows[kind].append(round(timed_load(args.artifact, kind), 3))
            print(f"{kind}: {rows[kind][-1]:.2f} s", file=sys.stderr)
    medians = {k: statistics.median(v) for k, v in rows.items()}
    print(f"median with {medians['with']:.2f} s, without {medians['without']:.2f} s", file=sys.stderr)
    write_result(args.out, {"artifact": args.artifact, "runs": args.runs, "seconds": rows,
                            "median_seconds": medians}, device=args.device)


if __name__ == "__main__":
    main()
