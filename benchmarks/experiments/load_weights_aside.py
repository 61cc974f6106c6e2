#!/usr/bin/env python
"""`optc.load` in fresh processes, with the weights member read and checked on a thread
while the programs are deserialised (runtime/artifact.read_artifact, as shipped), and
read first as before (the thread's work done at submit, so the deserialising waits for
it). Timed from before `import optc`, as a script that loads an artifact sees it; the two
kinds of process alternate.

    python benchmarks/experiments/load_weights_aside.py ART.optc --runs 5 --out r.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the experiments beside this one
from experiments.load_import_aside import compare_loads  # noqa: E402

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


if __name__ == "__main__":
    compare_loads(_CHILD, ("aside", "before"), __doc__)
