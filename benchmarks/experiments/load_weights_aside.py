#!/usr/bin/env python
"""`optc.load` in fresh processes, with the weights member read and checked on a thread
while the programs are deserialised (runtime/artifact.read_artifact, as shipped), and
read first as before (the thread's work done at submit, so the deserialising waits for
it). Timed from before `import optc`, as a script that loads an artifact sees it; the two
kinds of process alternate.

    python benchmarks/experiments/load_weights_aside.py ART.optc --runs 5 --out r.json
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
import sys, time
start = time.perf_counter()
import optc
from concurrent.futures import Future
from optc.runtime import artifact
if sys.argv[2] == "before":
    class Inline:  # runs each submitted call at once: read, then deserialise
        def __init__(self, *args, **kwargs): pass
        def __enter__(self): return self
        def __exit__(self, *exc): return False
        def submit(self, fn, *args):
            done = Future()
            done.set_result(fn(*args))
            return done
    artifact.ThreadPoolExecutor = Inline
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
    timed_load(args.artifact, "aside")  # page cache and bytecode warm for both kinds
    rows: dict[str, list[float]] = {"aside": [], "before": []}
    for _ in range(args.runs):
        for kind in ("aside", "before"):
            rows[kind].append(round(timed_load(args.artifact, kind), 3))
            print(f"{kind}: {rows[kind][-1]:.2f} s", file=sys.stderr)
    medians = {k: statistics.median(v) for k, v in rows.items()}
    print(f"median aside {medians['aside']:.2f} s, before {medians['before']:.2f} s", file=sys.stderr)
    write_result(args.out, {"artifact": args.artifact, "runs": args.runs, "seconds": rows,
                            "median_seconds": medians}, device=args.device)


if __name__ == "__main__":
    main()
