#!/usr/bin/env python
"""The first token of a loaded artifact with Dynamo in front of Inductor, as optc lowered
programs before codegen/direct.py: `lower` patched back to `torch.compile(fullgraph=True,
dynamic=False)` and its kernel cache accepted, then benchmarks/load_to_first_token.py as it is. Give it an artifact
compiled by that lowering (its kernel cache holds Dynamo's graphs); compare with
load_to_first_token.py on an artifact of the current lowering, in fresh processes.

    python benchmarks/experiments/first_token_dynamo.py OLD.optc --device cpu --no-packages --out r.json
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
import load_to_first_token  # noqa: E402
from optc.compiler.codegen import kernel_cache, lowering  # noqa: E402


def through_dynamo(gm, options):
    return torch.compile(gm, backend="inductor", options=options, fullgraph=True, dynamic=False)


if __name__ == "__main__":
    lowering.DirectLowering = through_dynamo
    kernel_cache.FRONTEND = None  # such an artifact's cache record names no frontend
    load_to_first_token.main()
