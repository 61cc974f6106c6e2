"""The search space, assembled from the pass configs' declared spaces.

Nothing here names a pass: every step of the pipeline whose config declares a
`Space` on a key joins the search under the parameter name `PASS.KEY`. Bounds that
depend on the model ("blocks") are resolved from its anatomy; conditional keys are
suggested only when their condition holds, so a trial never carries a setting that
changes nothing. Settings the user fixed (`--set`) are left out of the space.
"""

from __future__ import annotations

import json
from dataclasses import replace

from optc.compiler import passes, pipeline
from optc.compiler.config import Space, config_hash
from optc.errors import UsageError

# Settings each pass is tried at alone among the first trials (fractions of its range).
SEED_POINTS = (0.25, 0.5, 1.0)


def resolve_bound(space: Space, anatomy) -> Space:
    """The space with its model-dependent bound applied."""
    if space.bound is None:
        return space
    if space.bound == "blocks":
        most = len(anatomy.blocks) - 1 if anatomy is not None else 0
    elif space.bound == "encoder":  # nothing to search on a decoder
        most = space.low if anatomy is None or anatomy.causal else space.high
    else:
        raise ValueError(f"unknown search bound {space.bound!r}")
    return replace(space, high=max(space.low, min(space.high, most)))


class SearchSpace:
    def __init__(self, anatomy, pipeline_name: str = "default", fixed: dict | None = None):
        self.pipeline_name = pipeline_name
        self.fixed = {name: dict(values) for name, values in (fixed or {}).items()}
        resolved = pipeline.resolve(pipeline_name, self.fixed)["passes"]  # unknown passes or keys: refused (exit 2)
        registry = passes.load_all()
        self.params: dict[str, tuple[str, str, Space]] = {}  # "pass.key" -> (pass, key, space)
        for step in pipeline.PIPELINES[pipeline_name]:
            if "enabled" in self.fixed.get(step.name, {}) and not resolved[step.name]["enabled"]:
                continue  # a pass fixed off ("false", 0: as its config reads them): none of its keys changes a trial
            for key, space in registry[step.name].config_cls.search_space().items():
                if key in self.fixed.get(step.name, {}):
                    continue
                space = resolve_bound(space, anatomy)
                if space.kind != "choice" and space.high <= space.low:
                    continue  # nothing to choose on this model (no blocks to skip, say)
                self.params[f"{step.name}.{key}"] = (step.name, key, space)
        # A key conditional on one with nothing to search, or fixed where the condition
        # fails (prune_heads.repair with ratio fixed at 0), changes nothing.
        self.params = {p: v for p, v in self.params.items() if v[2].when is None
                       or f"{v[0]}.{v[2].when[0]}" in self.params
                       or (v[2].when[0] in self.fixed.get(v[0], {}) and v[2].holds(self.fixed[v[0]]))}
        # Conditions read keys suggested before them: unconditional keys go first.
        self.params = dict(sorted(self.params.items(), key=lambda item: item[1][2].when is not None))
        if not self.params:
            raise UsageError(f"pipeline '{pipeline_name}' has nothing to search on this model "
                             "(no pass declares a search space, or --set fixed every key)")

    def suggest(self, trial) -> dict:
        """Settings {pass: {key: value}} for an Optuna trial (fixed ones included)."""
        settings = {name: dict(values) for name, values in self.fixed.items()}
        for param, (pass_name, key, space) in self.params.items():
            current = settings.setdefault(pass_name, {})
            if not space.holds(current):
                continue
            current[key] = _suggest(trial, param, space)
        return {name: values for name, values in settings.items() if values}

    def seeds(self) -> list[dict]:
        """The first trials, as Optuna params: the dense model (every unconditional key
        at its low end), the dense model with each other value of an unconditional
        choice (merge_projections.ops: a lossless setting that pays on some models and
        workloads only, so one early measurement decides it), then each pass alone at a
        few settings of its first unconditional numeric key."""
        base = {param: (space.choices[0] if space.kind == "choice" else space.low)
                for param, (_, _, space) in self.params.items() if space.when is None}
        out: list[dict] = [dict(base)]
        for param, (_, _, space) in self.params.items():
            if space.when is None and space.kind == "choice":
                out += [{**base, param: choice} for choice in space.choices[1:]]
        ladders = []  # per pass: its first unconditional numeric key at each seed point
        seen_pass = set()
        for param, (pass_name, key, space) in self.params.items():
            if pass_name in seen_pass or space.when is not None or space.kind == "choice":
                continue
            seen_pass.add(pass_name)
            values = [int(round(space.low + f * (space.high - space.low))) if space.kind == "int"
                      else _on_step(space.low + f * (space.high - space.low), space) for f in SEED_POINTS]
            ladders.append([{**base, param: v} for v in values if v != space.low])
        # Round-robin over the passes, mildest first: a search cut short has seen every pass.
        for rung in range(max((len(ladder) for ladder in ladders), default=0)):
            for ladder in ladders:
                if rung < len(ladder) and ladder[rung] not in out:
                    out.append(ladder[rung])
        return out

    def signature(self) -> dict:
        """What a study's trials mean: the same signature or a refusal to mix."""
        return {"pipeline": self.pipeline_name, "fixed": self.fixed,
                "params": {p: s.to_dict() for p, (_, _, s) in self.params.items()}}

    def signature_hash(self) -> str:
        return config_hash(json.loads(json.dumps(self.signature())))


def _on_step(value: float, space: Space) -> float:
    if space.step:
        value = space.low + round((value - space.low) / space.step) * space.step
    return round(min(max(value, space.low), space.high), 10)


def _suggest(trial, name: str, space: Space):
    if space.kind == "int":
        return trial.suggest_int(name, int(space.low), int(space.high), step=int(space.step or 1))
    if space.kind == "float":
        return trial.suggest_float(name, space.low, space.high, step=space.step, log=space.log)
    return trial.suggest_categorical(name, list(space.choices))


def active_passes(settings: dict) -> list[str]:
    """The passes whose settings change the model (what a trial 'is')."""
    out = []
    for name, values in settings.items():
        cfg = passes.get(name).config_cls.from_dict(name, values)
        if cfg.active() and passes.get(name).lossy:
            out.append(name)
    return sorted(out)
