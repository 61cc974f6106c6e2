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


def mask_input(module, mask):
    """A hook multiplying `module`'s input by `mask` (what a pruned unit contributes: 0)."""
    return module.register_forward_pre_hook(lambda mod, args, m=mask: (args[0] * m,))


def eager_logits(model, ids, hooks):
    """The eager LM's logits with `hooks` in place; the hooks are removed afterwards."""
    try:
        return model(ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()


def assert_prefill_matches(gms, ref, ids):
    out = gms["prefill"](input_ids=ids, cache_position=torch.arange(ids.shape[1]))
    assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
