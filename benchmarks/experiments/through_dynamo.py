#!/usr/bin/env python
"""Run a script or module with optc lowering programs as it did before codegen/direct.py:
Dynamo in front of Inductor for every program (`lowering.frontend` patched to say
"dynamo": `lower` then calls `torch.compile(fullgraph=True, dynamic=False)`), and an
artifact's kernel cache recorded that way accepted. For
before/after measurements in fresh processes, beside the same command run plainly:

    python benchmarks/experiments/through_dynamo.py benchmarks/load_to_first_token.py OLD.optc --device cpu --no-packages
    python benchmarks/experiments/through_dynamo.py -m optc.cli compile smollm2-135m --target cpu --package none -o x.optc

(the first on an artifact compiled through Dynamo: its kernel cache holds Dynamo's graphs).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from optc.compiler.codegen import lowering

if __name__ == "__main__":
    # Every program through torch.compile, and a kernel cache recorded that way (whose
    # record names no frontend) accepted.
    lowering.frontend = lambda cudagraphs: lowering.DYNAMO
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    if sys.argv[1] == "-m":
        sys.argv = [sys.argv[2], *sys.argv[3:]]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        sys.path.insert(0, str(Path(sys.argv[0]).resolve().parent))
        runpy.run_path(sys.argv[0], run_name="__main__")
