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
    def idle(*args):
        thread = threading.Thread(target=lambda: None)
        thread.start()
        return thread
    load_aside.import_deserialiser_aside = idle
optc.load(sys.argv[1])
print(time.perf_counter() - start)
"""


def timed_load(child: str, path: str, kind: str) -> float:
    out = subprocess.run([sys.executable, "-c", child, path, kind], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def compare_loads(child: str, kinds: tuple[str, str], doc: str) -> None:
    """The command line of a script timing `child` (python code run as `-c CHILD ARTIFACT
    KIND`, printing its seconds last) for each of two kinds, alternating."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="the device the result envelope names")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    timed_load(child, args.artifact, kinds[0])  # page cache and bytecode warm for both kinds
    rows: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.runs):
        for kind in kinds:
            rows[kind].append(round(timed_load(child, args.artifact, kind), 3))
            print(f"{kind}: {rows[kind][-1]:.2f} s", file=sys.stderr)
    medians = {k: statistics.median(v) for k, v in rows.items()}
    print("median " + ", ".join(f"{k} {v:.2f} s" for k, v in medians.items()), file=sys.stderr)
    write_result(args.out, {"artifact": args.artifact, "runs": args.runs, "seconds": rows,
                            "median_seconds": medians}, device=args.device)


if __name__ == "__main__":
    compare_loads(_CHILD, ("with", "without"), __doc__)
