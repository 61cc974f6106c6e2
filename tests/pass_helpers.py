"""Helpers the pass tests share (a plain module: each test folder's conftest.py shadows
`import conftest`)."""

import torch

from optc.compiler import capture, pipeline
from optc.compiler.calibration import CalibrationContext


def run_pass(captured, name, sets, calib=None, task="causal-lm", **others):
    """Run the default pipeline with `name` set to `sets` (and `others`) on fresh copies
    of the captured programs; returns (graph modules, that pass's report entry)."""
    gms = {n: capture.graph_module(ep) for n, ep in captured.programs.items()}
    primary = "prefill" if "prefill" in gms else "forward"
    config = pipeline.resolve("default", {name: sets, **others})
    make = None if calib is None else (lambda gm: CalibrationContext(task, gm, calib))
    report = pipeline.run(gms, primary, config, make, log=lambda m: None)
    return gms, next(e for e in report if e["name"] == name)


def lm_calib(n=2, t=24):
    """LM calibration batches as program inputs: random ids of `t` tokens."""
    g = torch.Generator().manual_seed(5)
    return [((), {"input_ids": torch.randint(0, 256, (1, t), generator=g), "cache_position": torch.arange(t)})
            for _ in range(n)]
