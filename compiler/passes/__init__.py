"""The pass registry.

A pass is a frozen config dataclass plus up to two functions:

- `plan(ctx, anatomy, cfg) -> dict` (lossy passes): decide what to change once per
  model, on calibration data (which blocks to drop, which thresholds to use). The plan
  is JSON: it goes into the report and the artifact.
- `apply(gm, anatomy, cfg, plan) -> PassResult`: rewrite one program's graph. For a
  decoder LM it runs on the prefill and the decode program with the same plan, so the
  two stay consistent.
- `prepare(gm) -> dict` (optional): a lossless rewrite of each program run before its
  anatomy is read, only when the pass is active (e.g. splitting a fused gate/up
  projection so the pass sees gate and up); returns what it did ({} for nothing). The
  runner checks it end to end like a lossless pass.
- `reads_anatomy=False` (registration): the pass works on ops alone, the runner does not
  read the anatomy for it and passes None (merge_projections).
- `report(gm, plan, inputs) -> dict` (optional): measurements of the rewritten
  program on held-out inputs (e.g. the activation sparsity actually reached), added
  to the quality report by `optc compile --eval`.

`register_pass` refuses duplicate names; file, function and key share the name.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

from optc.errors import UsageError


@dataclass
class PassResult:
    """What one pass did to one graph (torch.fx's PassResult plus a reason)."""

    applied: bool
    reason: str | None = None
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PassSpec:
    name: str
    config_cls: type
    apply: Callable
    plan: Callable | None
    lossy: bool
    doc: str
    report: Callable | None = None
    # Thresholds make the programs discontinuous: after such a pass, rounding-level
    # differences flip decisions and cascade, so end-to-end equality checks of later
    # lossless passes say nothing (they check their own rewrites locally instead).
    discontinuous: bool = False
    prepare: Callable | None = None
    # False for a pass that works on ops alone: the runner then skips reading the
    # anatomy (seconds on a 30-block model) and passes None.
    reads_anatomy: bool = True


REGISTRY: dict[str, PassSpec] = {}

# Modules that define passes; imported on first registry lookup, not at package import.
_PASS_MODULES = ("skip_layers", "prune_mlp", "prune_heads", "share_kv_heads", "sparsify_activations", "merge_projections",
                "merge_tokens")


def register_pass(
    name: str, config_cls: type, *, lossy: bool, plan: Callable | None = None, report: Callable | None = None,
    discontinuous: bool = False, prepare: Callable | None = None, reads_anatomy: bool = True,
):
    def decorate(fn):
        if name in REGISTRY:
            raise ValueError(f"pass {name!r} is registered twice")
        if fn.__name__ != name:
            raise ValueError(f"pass function {fn.__name__!r} must be named like its key {name!r}")
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        REGISTRY[name] = PassSpec(name, config_cls, fn, plan, lossy, doc, report, discontinuous, prepare,
                                  reads_anatomy)
        return fn

    return decorate


def load_all() -> dict[str, PassSpec]:
    for module in _PASS_MODULES:
        importlib.import_module(f"{__name__}.{module}")
    return REGISTRY


def get(name: str) -> PassSpec:
    passes = load_all()
    if name not in passes:
        raise UsageError(f"unknown pass '{name}'; known passes: {', '.join(sorted(passes))}")
    return passes[name]
