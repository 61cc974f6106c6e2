"""skip_layers: remove whole residual blocks, or only their attention or MLP half.

Removing a (sub-)block routes the residual stream around it: every use of the stream
after the sub-block is replaced by the stream before it (anatomy's residual points),
its KV-cache writes are erased, and dead-code elimination drops the rest. This holds
for pre-norm (Llama, ViT) and post-norm (BERT) blocks alike.

Choosing what to remove (`plan`), by count:
- selection="loss" (default): greedy. Each round removes the candidate whose removal,
  together with those already chosen, costs the least calibration loss per parameter
  removed (LMs: next-token cross-entropy; encoders: 1 - cosine to the original
  output). A cosine pre-ranking picks which candidates are measured (see _by_loss).
  Measuring the loss of each removal beats ranking by the blocks' 1 - cos(input,
  output), which ignores how the rest of the network reacts.
- selection="cosine": the reference method, rank by 1 - cos(input, output) once.
With granularity="sublayer", attention and MLP halves are candidates separately and
`count` is a parameter budget of `count` average blocks, so removing four cheap
attention halves is not mistaken for removing four blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from optc.compiler.anatomy import Anatomy
from optc.compiler.config import Choice, Int, PassConfig, knob
from optc.compiler.passes import PassResult, register_pass
from optc.compiler.rewrite import drop_unused_attributes, eliminate_dead_code
from optc.errors import UsageError

PARTS = ("block", "attention", "mlp")


@dataclass(frozen=True)
class SkipLayersConfig(PassConfig):
    count: int = knob(0, low=0, high=256, search=Int(0, 12, bound="blocks"),
                      doc="how many blocks (or blocks' worth) to remove")
    layers: tuple = knob((), low=0, doc="remove exactly these block indices, e.g. [3,7]")
    granularity: str = knob(
        "sublayer", choices=("block", "attention", "mlp", "sublayer"),
        search=Choice(("block", "sublayer"), when=("count", ">", 0)), doc="what a removed unit is"
    )
    selection: str = knob("loss", choices=("loss", "cosine"), doc="how units are ranked")
    calibration_samples: int = knob(4, low=1, high=256, doc="calibration sequences (or batches)")
    rescore_top: int = knob(6, low=1, high=64, doc="candidates re-scored each greedy round")
    compensate: bool = knob(True, doc="add each removed unit's mean calibration output as a constant")

    def active(self) -> bool:
        return self.enabled and (self.count > 0 or bool(self.layers))


def _units(anatomy: Anatomy, cfg: SkipLayersConfig) -> list[tuple[int, str]]:
    """Candidate units; a half an earlier pass already removed is no candidate."""
    n = len(anatomy.blocks)
    if cfg.layers:
        bad = [i for i in cfg.layers if i >= n]
        if bad:
            raise UsageError(f"skip_layers.layers={list(cfg.layers)}: the model has blocks 0..{n - 1}, not {bad}")
        part = "block" if cfg.granularity == "sublayer" else cfg.granularity
        missing = [i for i in cfg.layers if part != "block" and part not in anatomy.blocks[i].halves]
        if missing:
            raise UsageError(f"skip_layers.layers={list(cfg.layers)}: blocks {missing} have no {part} half left")
        parallel = [i for i in cfg.layers if part != "block" and anatomy.blocks[i].parallel]
        if parallel:
            raise UsageError(f"skip_layers.layers={list(cfg.layers)}: blocks {parallel} compute attention and MLP "
                             "side by side, so only whole blocks are removed there; use skip_layers.granularity=block")
        return [(i, part) for i in cfg.layers]
    parts = ("attention", "mlp") if cfg.granularity == "sublayer" else (cfg.granularity,)
    units = []
    for i, block in enumerate(anatomy.blocks):
        if block.parallel:  # its halves are no points of the stream: the whole block is the unit
            units += [(i, "block")] if cfg.granularity in ("block", "sublayer") else []
            continue
        units += [(i, part) for part in parts if part == "block" or part in block.halves]
    return units


def _unit_params(gm: fx.GraphModule, anatomy: Anatomy, unit) -> int:
    block = anatomy.blocks[unit[0]]
    halves = block.halves if unit[1] == "block" else [unit[1]]
    return sum(gm.get_parameter(lin.weight).numel() for half in halves for lin in getattr(block, half).linears)


def plan_skip_layers(ctx, anatomy: Anatomy, cfg: SkipLayersConfig) -> dict:
    if anatomy.empty:
        return {"units": [], "reason": f"no residual blocks recognised: {anatomy.reason}"}
    candidates = _units(anatomy, cfg)
    if cfg.layers:
        return {"units": [list(u) for u in candidates], "why": "chosen by the user (skip_layers.layers)"}
    gm = ctx.calibration_program
    params = {u: _unit_params(gm, anatomy, u) for u in candidates}
    per_block = sum(params[u] for u in candidates) / len(anatomy.blocks)
    if cfg.count >= len(anatomy.blocks):
        raise UsageError(f"skip_layers.count={cfg.count} would remove every block ({len(anatomy.blocks)})")
    budget = cfg.count * per_block
    stats = ctx.stream_stats(anatomy, candidates, n=cfg.calibration_samples)
    cosine = {u: stats[u][0] for u in candidates}
    biases = {u: stats[u][1] for u in candidates} if cfg.compensate else {}
    if cfg.selection == "cosine":
        chosen, scores = _by_cosine(cosine, candidates, params, budget)
    else:
        chosen, scores = _by_loss(ctx, anatomy, candidates, params, budget, cfg, cosine, biases)
    return {
        "units": [list(u) for u in chosen],
        "compensation": {f"{i}.{p}": biases[(i, p)].tolist() for i, p in chosen if (i, p) in biases},
        "why": f"lowest calibration {'1 - cos(in, out)' if cfg.selection == 'cosine' else 'loss per parameter removed'}",
        "scores": scores,
        "params_removed": int(sum(params[u] for u in chosen)),
        "budget_params": int(budget),
    }


def _fill_budget(ranked, params, budget):
    chosen, removed = [], 0
    for unit in ranked:
        if removed >= budget * 0.98:
            break
        chosen.append(unit)
        removed += params[unit]
    return chosen


def _by_cosine(scores, candidates, params, budget):
    ranked = sorted(candidates, key=lambda u: scores[u])
    return _fill_budget(ranked, params, budget), {f"{i}.{p}": round(s, 5) for (i, p), s in scores.items()}


def _by_loss(ctx, anatomy, candidates, params, budget, cfg, cosine, biases):
    """Greedy removal by measured calibration loss per parameter removed.

    Measuring every candidate every round costs rounds x candidates forward passes, too
    many on a CPU. So the candidates are first ranked by the stream cosine (one pass);
    the first round measures the loss of the best `shortlist`, and each later round
    re-measures the `rescore_top` most promising of what is left (refilled from the
    cosine ranking), together with the units already chosen.

    The rounds do not depend on the budget, only where they stop does: the trail is kept
    in the calibration memo and extended on demand, so a search asking for 3, then 6,
    then 4 blocks pays for six rounds once, not thirteen.
    """
    n = cfg.calibration_samples
    key = ("skip_layers.greedy", tuple(candidates), n, cfg.rescore_top, cfg.compensate)
    greedy = ctx.memo.get(key)
    if greedy is None:
        by_cosine = sorted(candidates, key=lambda u: cosine[u] / params[u])
        greedy = ctx.memo[key] = {"base": ctx.calibration_loss(lambda gm: gm, n=n), "by_cosine": by_cosine,
                                  "pool": by_cosine[: max(2 * cfg.rescore_top, 12)], "chosen": [], "removed": [0],
                                  "trail": []}
    while greedy["removed"][-1] < budget * 0.98 and greedy["pool"]:
        _greedy_round(ctx, anatomy, greedy, params, cfg, biases)
    rounds = next((k for k, r in enumerate(greedy["removed"]) if r >= budget * 0.98), len(greedy["chosen"]))
    return greedy["chosen"][:rounds], {"baseline_loss": round(greedy["base"], 5), "rounds": greedy["trail"][:rounds]}


def _greedy_round(ctx, anatomy, greedy, params, cfg, biases) -> None:
    chosen, pool = greedy["chosen"], greedy["pool"]
    # Each candidate removed on top of the units chosen so far, measured from its own
    # block on in one pass per input (CalibrationContext.losses_at), not by a rebuilt copy.
    fixed = dict(_removed(anatomy, u, biases) for u in chosen)
    cuts = [(end, [fn], start) for end, (fn, start) in (_removed(anatomy, u, biases) for u in pool)]
    losses = ctx.losses_at(cuts, n=cfg.calibration_samples, fixed=fixed)
    costs = {u: (loss - greedy["base"]) / params[u] for u, (loss,) in zip(pool, losses)}
    ranked = sorted(costs, key=costs.__getitem__)
    best = ranked[0]
    chosen.append(best)
    greedy["removed"].append(greedy["removed"][-1] + params[best])
    greedy["trail"].append({"unit": f"{best[0]}.{best[1]}", "loss_per_mparam": round(costs[best] * 1e6, 5)})
    rest = ranked[1:] + [u for u in greedy["by_cosine"] if u not in costs and u not in chosen]
    greedy["pool"] = rest[: cfg.rescore_top]


def _removed(anatomy: Anatomy, unit, biases: dict) -> tuple:
    """What `remove_units` makes of the residual stream when it removes `unit`, computed
    instead of rewritten: (end, (function, start)), the end node's value becoming
    function(start's value). Several units of one block compose to remove_units' single
    reroute: the start of a block's MLP half is its mid, already replaced when its
    attention half is removed too."""
    block = anatomy.blocks[unit[0]]
    if unit[1] == "block" or set(block.halves) == {unit[1]}:
        end, start = block.output, block.input
    elif unit[1] == "attention":
        end, start = block.mid, block.input
    else:
        end, start = block.output, block.mid
    dtype = end.meta["val"].dtype
    bias = biases.get(unit)
    bias = None if bias is None else torch.as_tensor(bias, dtype=torch.float32)

    def value(x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype)
        return x if bias is None else x + bias.to(x.device, dtype)

    return end, (value, start)


def remove_units(gm: fx.GraphModule, anatomy: Anatomy, units, biases: dict | None = None) -> None:
    """Route the residual stream around each unit (plus its mean output when `biases`
    holds one: a removed MLP still contributes its average), erase cache writes, and
    drop dead code."""
    biases = biases or {}
    parts_by_block: dict[int, set] = {}
    bias_by_block: dict[int, torch.Tensor] = {}
    for index, part in units:
        parts_by_block.setdefault(index, set()).update(("attention", "mlp") if part == "block" else (part,))
        if (index, part) in biases:
            bias = torch.as_tensor(biases[(index, part)], dtype=torch.float32)
            bias_by_block[index] = bias_by_block.get(index, 0) + bias
    # Later blocks first: a later block's input node is an earlier block's output,
    # whose uses (including the ones just redirected) are then rerouted in turn.
    for index in sorted(parts_by_block, reverse=True):
        block = anatomy.blocks[index]
        parts = parts_by_block[index] & set(block.halves)
        bias = bias_by_block.get(index)
        if parts == set(block.halves):  # all that is left of the block
            _reroute(gm, block.output, block.input, bias, f"optc_skip_bias_{index}")
        elif parts == {"attention"}:
            _reroute(gm, block.mid, block.input, bias, f"optc_skip_bias_{index}_attention")
        else:
            _reroute(gm, block.output, block.mid, bias, f"optc_skip_bias_{index}_mlp")
        if "attention" in parts and block.attention is not None:
            for write in block.attention.cache_writes:
                write.replace_all_uses_with(write.args[0])
                gm.graph.erase_node(write)
    eliminate_dead_code(gm)
    drop_unused_attributes(gm)
    gm.recompile()


def _reroute(gm: fx.GraphModule, end: fx.Node, start: fx.Node, bias=None, bias_name: str = "") -> None:
    replacement = start
    new_nodes = []
    start_dtype = getattr(start.meta.get("val"), "dtype", None)
    end_dtype = getattr(end.meta.get("val"), "dtype", None)
    with gm.graph.inserting_after(end):
        if start_dtype is not None and end_dtype is not None and start_dtype != end_dtype:
            replacement = gm.graph.call_function(torch.ops.aten._to_copy.default, (start,), {"dtype": end_dtype})
            replacement.meta["val"] = end.meta["val"]
            new_nodes.append(replacement)
    if bias is not None:
        device = end.meta["val"].device if "val" in end.meta else "cpu"
        gm.register_buffer(bias_name, bias.to(device=device, dtype=end_dtype or torch.float32))
        with gm.graph.inserting_after(new_nodes[-1] if new_nodes else end):
            attr = gm.graph.get_attr(bias_name)
        with gm.graph.inserting_after(attr):
            replacement = gm.graph.call_function(torch.ops.aten.add.Tensor, (replacement, attr))
        replacement.meta["val"] = end.meta.get("val")
        new_nodes += [attr, replacement]
    end.replace_all_uses_with(replacement, delete_user_cb=lambda user: user not in new_nodes)


@register_pass("skip_layers", SkipLayersConfig, lossy=True, plan=plan_skip_layers)
def skip_layers(gm: fx.GraphModule, anatomy: Anatomy, cfg: SkipLayersConfig, plan: dict) -> PassResult:
    """Remove whole residual blocks, or their attention or MLP halves."""
    units = [tuple(u) for u in plan.get("units", [])]
    if not units:
        return PassResult(False, plan.get("reason", "nothing selected"))
    biases = {tuple(int(x) if x.isdigit() else x for x in key.split(".")): torch.tensor(vec)
              for key, vec in plan.get("compensation", {}).items()}
    remove_units(gm, anatomy, units, biases)
    return PassResult(True, details={"removed": [f"{i}.{p}" for i, p in units]})
