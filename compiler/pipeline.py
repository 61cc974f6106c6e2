"""Named pipelines and the one pass runner.

The runner wraps every pass: it times it, counts nodes and parameters before and
after, lints the graph, can disable a pass by name (`PASS.enabled=false`), and
re-raises a failure with the passes that ran before it. A lossy pass plans once on
calibration data and applies the same plan to every program of the model (an LM's
prefill and decode graphs), so they stay consistent.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch.fx as fx

from optc.compiler import passes
from optc.compiler.anatomy import analyze
from optc.compiler.config import config_hash
from optc.compiler.rewrite import rebuild
from optc.errors import CompileError, InternalError, OptcError, UsageError


@dataclass(frozen=True)
class Step:
    name: str
    why: str


PIPELINES: dict[str, list[Step]] = {
    # Capture and lossless lowering only: the baseline every lossy result is compared with.
    "none": [],
    "default": [
        # Depth first: a removed block also removes its share of every later pass's work.
        Step("skip_layers", "drop the residual blocks (or halves) that matter least; off until count/layers is set"),
        # Width after depth: channels are scored on the blocks that remain; before the
        # thresholding pass, which calibrates on the pruned MLPs it will sparsify.
        Step("prune_mlp", "remove the least important MLP channels (narrower gate/up/down); off until ratio is set"),
        # Heads after channels: both are scored on the blocks that remain; before
        # share_kv_heads, which rewrites the decode attention this pass narrows.
        Step("prune_heads", "remove the least important attention heads (KV groups, with their cache); off until ratio is set"),
        # After the structural passes (they score channels and heads on every token);
        # before the thresholding pass, which then calibrates on the merged tokens.
        Step("merge_tokens", "merge similar tokens inside encoder blocks (ToMe); off until r or schedule is set"),
        # Before the thresholding pass, so the runner's end-to-end check of this lossless
        # rewrite is meaningful.
        Step("share_kv_heads", "one-token attention reads each KV head once instead of a copy per query head"),
        Step("sparsify_activations", "zero small activations so sparse decode kernels skip weight rows; off until sparsity is set"),
        # Last: it merges what the passes before it left, sparse ops included.
        Step("merge_projections", "one linear for the linears that read the same input (q/k/v, gate/up): fewer launches, same function"),
    ],
}


def resolve(pipeline: str, sets: dict[str, dict]) -> dict:
    """The full resolved config: the pipeline's steps with every pass's settings."""
    if pipeline not in PIPELINES:
        raise UsageError(f"unknown pipeline '{pipeline}'; known: {', '.join(PIPELINES)}")
    registry = passes.load_all()
    for name in sets:
        if name not in registry:
            raise UsageError(f"unknown pass '{name}' in --set; known passes: {', '.join(sorted(registry))}")
    step_names = [s.name for s in PIPELINES[pipeline]]
    missing = [name for name in sets if name not in step_names]
    if missing:
        raise UsageError(f"pass(es) {missing} are not in pipeline '{pipeline}' (steps: {step_names or 'none'})")
    configs = {
        s.name: registry[s.name].config_cls.from_dict(s.name, sets.get(s.name, {})).to_dict()
        for s in PIPELINES[pipeline]
    }
    config = {"pipeline": pipeline, "passes": configs}
    config["hash"] = config_hash(config)
    return config


def pass_config(name: str, values: dict):
    spec = passes.get(name)
    return spec.config_cls.from_dict(name, values)


def count(gm: fx.GraphModule) -> dict:
    return {
        "nodes": sum(1 for n in gm.graph.nodes if n.op == "call_function"),
        "params": sum(p.numel() for p in gm.parameters()),
    }


class PlanCache:
    """Plans and calibration statistics kept between runs of one captured model (a
    compile session): a plan is a function of the pass's settings and of the graph it
    plans on, which the settings of the passes applied before it determine."""

    def __init__(self):
        self.plans: dict = {}
        self.memos: dict = {}  # upstream key -> what calibration measured on that graph
        self.hits = 0

    # Calibration statistics hold activations (on the model's device): keep those of the
    # few most recent graph states, not of every configuration a search ever tried.
    MAX_MEMOS = 4

    def memo(self, upstream: str) -> dict:
        if upstream in self.memos:
            self.memos[upstream] = self.memos.pop(upstream)  # most recent last
        elif len(self.memos) >= self.MAX_MEMOS:
            self.memos.pop(next(iter(self.memos)))
        return self.memos.setdefault(upstream, {})


def run(gms: dict[str, fx.GraphModule], primary: str, config: dict, make_context, log=print,
        check_inputs: dict | None = None, cache: PlanCache | None = None) -> list[dict]:
    """Run the pipeline's passes over `gms` (program name -> GraphModule), in place.

    `primary` names the program calibration runs on; `make_context(gm)` builds the
    CalibrationContext lazily (only a lossy pass that is on needs data).
    `check_inputs` ({program: (args, kwargs)}, example inputs): each lossless pass is
    then checked against the program before it on fresh inputs shaped like these, and
    refused if it changed the function.
    `cache`: reuse plans and calibration statistics of earlier runs on the same capture.
    """
    history: list[str] = []
    upstream: list = []  # (pass, settings) of the passes that ran so far: what a plan depends on
    report: list[dict] = []
    discontinuous_after: str | None = None  # the thresholding pass applied so far, if any
    for step in PIPELINES[config["pipeline"]]:
        spec = passes.get(step.name)
        cfg = pass_config(step.name, config["passes"][step.name])
        entry = {"name": step.name, "lossy": spec.lossy, "applied": False, "reason": None, "seconds": 0.0}
        if not cfg.active():
            entry["reason"] = "disabled" if not cfg.enabled else "not configured (default settings change nothing)"
            report.append(entry)
            continue
        start = time.perf_counter()
        before = {name: count(gm) for name, gm in gms.items()}
        try:
            prepared = _prepare(step.name, spec, gms, check_inputs, discontinuous_after)
            anatomies = {name: analyze(gm) if spec.reads_anatomy else None for name, gm in gms.items()}
            plan = {}
            if spec.plan is not None:
                plan = _plan(step.name, spec, cfg, make_context, gms[primary], anatomies[primary], upstream, cache, log)
            results, checks = {}, {}
            for name, gm in gms.items():
                before_pass = rebuild(gm)[0] if check_inputs and name in check_inputs and not spec.lossy else None
                results[name] = spec.apply(gm, anatomies[name], cfg, plan)
                gm.graph.lint()
                gm.recompile()
                if before_pass is not None and results[name].applied:
                    if discontinuous_after:
                        checks[name] = {"skipped": f"{discontinuous_after} thresholds this program: rounding-level "
                                                   "differences flip decisions and cascade"}
                    else:
                        checks[name] = _check_lossless(step.name, before_pass, gm, check_inputs[name])
        except OptcError:
            raise
        except Exception as exc:
            # The first line only, so the message stays one line in logs and reports; a C++
            # error's native frames stay with the chained cause.
            first = (str(exc).strip().splitlines() or [""])[0]
            raise InternalError(
                f"pass {step.name} failed after [{', '.join(history)}]: {type(exc).__name__}: {first}"
            ) from exc
        applied = [r.applied for r in results.values()]
        not_applied = [(name, r.reason) for name, r in results.items() if not r.applied]
        reason = None
        if not_applied:  # one reason when nothing applied, else which program was left as it was and why
            reason = not_applied[0][1] if not any(applied) else "; ".join(f"{n}: {why}" for n, why in not_applied)
        entry.update(
            # A lossy pass must change every program alike (one plan); a lossless one may
            # rewrite only the programs where it pays (one-token decode, say).
            applied=all(applied) if spec.lossy else any(applied),
            reason=reason,
            seconds=round(time.perf_counter() - start, 3),
            plan=plan,
            programs={
                name: {"applied": results[name].applied, "before": before[name], "after": count(gms[name]),
                       **({"prepared": prepared[name]} if name in prepared else {}),
                       **results[name].details,
                       **({"lossless_check": checks[name]} if name in checks else {})}
                for name in gms
            },
        )
        said = ("applied" + (f" (not to {entry['reason']})" if entry["reason"] else "") if entry["applied"]
                else f"not applied: {entry['reason']}")
        log(f"[optc] {step.name}: {said} ({entry['seconds']} s)")
        history.append(step.name)
        upstream.append((step.name, cfg.to_dict()))
        report.append(entry)
        if spec.discontinuous and entry["applied"]:
            discontinuous_after = step.name
    return report


def _plan(name, spec, cfg, make_context, gm, anatomy, upstream, cache: PlanCache | None, log) -> dict:
    """The pass's plan, from the cache when the same settings planned on the same graph."""
    key = config_hash({"upstream": upstream})
    plan_key = (name, config_hash(cfg.to_dict()), key)
    if cache is not None and plan_key in cache.plans:
        cache.hits += 1
        log(f"[optc] {name}: plan reused from an earlier run of this session")
        return copy.deepcopy(cache.plans[plan_key])
    log(f"[optc] {name}: planning on calibration data ...")
    memo = cache.memo(key) if cache is not None else None
    plan = spec.plan(_LazyContext(make_context, gm, memo), anatomy, cfg)
    if cache is not None:
        cache.plans[plan_key] = copy.deepcopy(plan)
    return plan


def _prepare(name: str, spec, gms: dict, check_inputs, discontinuous_after: str | None) -> dict:
    """Runs the pass's lossless preparation on every program; {program: what it did,
    with its end-to-end check} for the programs it changed."""
    if spec.prepare is None:
        return {}
    out = {}
    for prog, gm in gms.items():
        before = rebuild(gm)[0] if check_inputs and prog in check_inputs else None
        details = spec.prepare(gm)
        if not details:
            continue
        gm.graph.lint()
        gm.recompile()
        if before is not None and not discontinuous_after:
            details = {**details, "lossless_check": _check_lossless(f"{name} (its preparation)", before, gm,
                                                                     check_inputs[prog])}
        out[prog] = details
    return out


def _check_lossless(name: str, before: fx.GraphModule, after: fx.GraphModule, inputs) -> dict:
    from optc.compiler.codegen.lowering import compare, vocab_size

    result = compare(before, after, inputs, vocab_size(before))
    if not result["ok"]:
        raise CompileError(f"pass {name} is lossless but changed the function: relative error "
                           f"{result['max_rel_err']:.3g} > {result['tolerance']:g} on fresh random inputs")
    return {"max_rel_err": float(f"{result['max_rel_err']:.3g}"), "tolerance": result["tolerance"]}


class _LazyContext:
    """Builds the calibration context on first use: a plan that needs no data (layers
    given by index) never loads any."""

    def __init__(self, make_context, gm, memo: dict | None = None):
        self._make, self._gm, self._ctx, self._memo = make_context, gm, None, memo

    def __getattr__(self, name):
        if self._ctx is None:
            if self._make is None:
                raise UsageError("this pass needs calibration data and none was given")
            self._ctx = self._make(self._gm)
            if self._memo is not None:
                self._ctx.memo = self._memo
        return getattr(self._ctx, name)
