"""prune_heads: structured pruning of attention heads.

A head is D rows of q (and, for a whole KV group, D rows of k and of v), D columns of o,
and, in a decoder, its slice of the KV cache; removing it leaves narrower dense linears,
a narrower SDPA and a smaller cache. With grouped-query attention (KV heads < heads)
`granularity="group"` removes whole KV groups (a KV head and its G query heads), so the
grouping stays valid and the cache shrinks; `"head"` removes the same number of query
heads from every group (the cache stays). Which go (`plan`, on calibration data):
- score="activation": the energy a unit adds to o's output on calibration tokens,
  mean ||W_o[:, unit] (x_unit - c)||^2 with x o's input, c its mean when the repair
  puts the mean back (FLAP's fluctuation, exact per unit), else 0.
- score="weight": ||W_o[:, unit]||^2 * ||W_v[unit's KV rows]||^2; no data needed.
- allocation="uniform" keeps the same count in every layer; "global" ranks all units
  together by their score standardised per layer (FLAP); "loss" prunes each layer alone
  at a few counts, measures the calibration loss each costs, and picks the counts that
  remove `ratio` of all heads at the least summed cost (a knapsack over layers): fewer
  heads go where removing them hurts most.
Kept widths (heads x head_dim) are multiples of `align`, at least one KV group a layer.
repair="bias" (FLAP) folds the removed heads' mean contribution into o's bias;
"lstsq" also refits o's kept columns to o's full output on the calibration activations
(compiler/refit.py, shared with prune_mlp), the dense model's (refit="layer") or those of
the model pruned and repaired below (refit="sequential"), kept only if it beats "bias" on
calibration loss.

Every tensor that carries the head count follows (compiler/head_coupling.py finds them,
compiler/head_narrow.py cuts them); where that cannot be proven the pass refuses.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.fx as fx

from optc.compiler.anatomy import Anatomy
from optc.compiler.config import Choice, Float, PassConfig, knob
from optc.compiler.head_coupling import Uncoupled, couple
from optc.compiler.head_narrow import Kept, narrow
from optc.compiler.head_units import HeadLayer, choose_heads, head_layers, o_weight, params_removed, unit_scores
from optc.compiler.passes import PassResult, register_pass
from optc.compiler.refit import rel_err, repair
from optc.compiler.rewrite import add_to_linear_output, attr_value, get_attr_nodes, plan_tensors, rebuild, set_param
from optc.errors import CompileError, UsageError

SCORES = ("activation", "weight")
ALLOCATIONS = ("uniform", "global", "loss")
REPAIRS = ("bias", "none", "lstsq")
GRANULARITIES = ("group", "head")
REFITS = ("layer", "sequential")
# lstsq's ridge (compiler/refit.py), relative to the mean diagonal of the kept heads'
# Gram matrix; chosen on calibration windows the fit did not see (passes/README.md).
RIDGE = 0.1


@dataclass(frozen=True)
class PruneHeadsConfig(PassConfig):
    ratio: float = knob(0.0, low=0.0, high=0.9, search=Float(0.0, 0.5, step=0.05),
                        doc="fraction of each attention's heads removed (0 = off)")
    # Not searched: weight scores wrecked SmolLM2 even at small ratios (benchmarks/NOTES.md,
    # "Weight scores"): norms miss the heads that carry massive activations.
    score: str = knob("activation", choices=SCORES,
                      doc="head importance: activation (o's output energy on calibration data) | weight (norms only)")
    # Default loss: uniform misses the held-out quality bar on SmolLM2 and MiniLM where
    # loss meets it (benchmarks/results/pruning_quality_*_heads_*_cpu.json).
    allocation: str = knob("loss", choices=ALLOCATIONS, search=Choice(ALLOCATIONS, when=("ratio", ">", 0)),
                           doc="loss: per-layer counts by measured calibration loss (each layer and count run "
                               "from that layer on) | uniform: same ratio per layer | global: rank all layers' "
                               "heads together")
    # Not searched: the repairs cost the same latency, and the default falls back to the
    # cheaper repair whenever it loses on calibration loss.
    repair: str = knob("lstsq", choices=REPAIRS,
                       doc="bias: add the removed heads' mean output to o_proj's bias | lstsq: also refit o_proj | none")
    granularity: str = knob("group", choices=GRANULARITIES,
                            doc="group: remove whole KV groups (smaller KV cache) | head: the same number of "
                                "query heads from every group")
    # Not searched, default layer: on SmolLM2 at 0.33 the sequential refit lost on held-out
    # text (38.70 against 30.23, no repair 34.39) and on calibration windows no plan reads
    # (42.14 against 34.15): fitting each o_proj to undo the error left below it learns the
    # calibration text better still (compiler/passes/README.md, prune_heads).
    refit: str = knob("layer", choices=REFITS,
                      doc="lstsq's inputs: layer: the dense model's activations | sequential: those of the model "
                          "pruned and repaired below each layer (one more pass over the calibration data)")
    align: int = knob(0, low=0, high=4096,
                      doc="kept heads x head_dim is a multiple of this; 0: the target's (64 on GPUs, 1 on cpu)")
    # The o_proj refit needs many more tokens than kept columns (passes/README.md).
    calibration_samples: int = knob(32, low=1, high=256, doc="calibration sequences (or batches)")
    sensitivity_samples: int = knob(8, low=1, high=256,
                                    doc="allocation=loss: calibration sequences each layer's cost is measured on")

    def active(self) -> bool:
        return self.enabled and self.ratio > 0


def _kept_counts(layers: list[HeadLayer], scores: dict, cfg: PruneHeadsConfig) -> dict:
    """Kept count per layer (groups, or query heads per group), aligned."""
    per_count = {ly.index: scores[ly.index].numel() // ly.count for ly in layers}  # units in one count
    if cfg.allocation in ("uniform", "loss"):  # loss: uniform's counts are its budget and a candidate
        raw = {ly.index: ly.count * (1 - cfg.ratio) for ly in layers}
    else:
        z = {i: (s - s.mean()) / s.std().clamp_min(1e-12) if s.numel() > 1 else s * 0 for i, s in scores.items()}
        every = torch.cat(list(z.values())).sort().values
        drop = int(round(cfg.ratio * every.numel()))
        cut = every[drop - 1] if drop else -float("inf")
        raw = {i: int((zi > cut).sum()) / per_count[i] for i, zi in z.items()}
    out = {}
    for ly in layers:
        m = ly.step(cfg.align)
        k = int(round(raw[ly.index] / m)) * m
        out[ly.index] = max(min(m, ly.count), min(ly.count, k))
    return out


def _loss_counts(ctx, gm, layers: list[HeadLayer], scores: dict, xs: dict, uniform: dict,
                 cfg: PruneHeadsConfig) -> tuple[dict, dict]:
    """allocation="loss": kept counts per layer, and what was measured to choose them.

    Each layer is pruned alone (with the configured repair, refit on its own dense
    inputs) at every aligned kept count from full width down to twice its share of the
    ratio, and the calibration loss of that model is measured on `sensitivity_samples`
    sequences (run from that layer's o_proj on: `CalibrationContext.losses_at`).
    Taking the per-layer increases as additive, dynamic programming over the layers
    finds the counts that remove `ratio` of all heads (or the reachable number nearest
    to it) at the least summed increase. Where uniform's counts remove that many,
    they are among the candidates, so the choice's summed increase is never above
    uniform's; the whole model's loss still can be (the increases are not exactly
    additive), which the plan's calibration losses show."""
    start = time.perf_counter()
    n = cfg.sensitivity_samples
    base = ctx.calibration_loss(lambda g: g, n=n)
    heads_per = {ly.index: ly.att.num_heads // ly.count for ly in layers}  # heads in one step of the count
    candidates, cuts = {}, []
    for ly in layers:
        m = ly.step(cfg.align)
        share = max(math.ceil(cfg.ratio * ly.count), m)
        lowest = max(min(m, ly.count), ly.count - 2 * share)
        candidates[ly.index] = sorted(({uniform[ly.index]} | {c for c in range(lowest, ly.count) if c % m == 0})
                                      - {ly.count})
        # Heads do not interact (head_coupling refuses models where they do), so pruning
        # one layer changes only its o_proj's output: measured from that node on.
        plans = [_single_layer_plan(gm, ly, *choose_heads(ly, scores[ly.index], c), xs.get(ly.index), cfg.repair)
                 for c in candidates[ly.index]]
        cuts.append((ly.att.o.node, [_o_output(gm, ly, plan) for plan in plans]))
    cost: dict[int, dict[int, float]] = {
        ly.index: {ly.count: 0.0, **{c: loss - base for c, loss in zip(candidates[ly.index], losses)}}
        for ly, losses in zip(layers, ctx.losses_at(cuts, n=n))}
    # best[r] = (summed increase, counts) over the layers so far, removing r heads.
    best: dict[int, tuple[float, dict]] = {0: (0.0, {})}
    for ly in layers:
        step: dict[int, tuple[float, dict]] = {}
        for removed, (total, counts) in best.items():
            for c, inc in cost[ly.index].items():
                r = removed + (ly.count - c) * heads_per[ly.index]
                if r not in step or total + inc < step[r][0]:
                    step[r] = (total + inc, {**counts, ly.index: c})
        best = step
    target = round(cfg.ratio * sum(ly.att.num_heads for ly in layers))
    removed = min(best, key=lambda r: (abs(r - target), best[r][0]))
    total, counts = best[removed]
    uniform_removed = sum((ly.count - uniform[ly.index]) * heads_per[ly.index] for ly in layers)
    record = {"used": "loss", "dense_calibration_loss": round(base, 5), "samples": n,
              "heads_removed": removed, "summed_increase": round(total, 5),
              "uniform": {"heads_removed": uniform_removed,
                          "summed_increase": round(sum(cost[ly.index][uniform[ly.index]] for ly in layers), 5)},
              "increase_by_kept_count": {str(i): {str(c): round(v, 5) for c, v in per.items()}
                                         for i, per in cost.items()},
              "seconds": round(time.perf_counter() - start, 1)}
    return counts, record


def _single_layer_plan(gm, ly: HeadLayer, kv: list[int], heads: list[int], x: torch.Tensor | None, repair_: str) -> dict:
    """A plan that prunes only `ly` to the given heads, repaired as configured."""
    att = ly.att
    entry = {"heads": att.num_heads, "kv_heads": att.num_kv_heads, "head_dim": att.head_dim,
             "kept_kv": kv, "kept_heads": heads, "compensation": None}
    plan = {"blocks": {str(ly.index): entry}, "repair": repair_}
    if repair_ != "none" and x is not None:
        w = o_weight(gm, ly).to(x.device)
        wk, c = repair(x, w, ly.columns(heads).to(x.device), repair_ == "lstsq", RIDGE)
        entry["compensation"] = c.tolist()
        if repair_ == "lstsq":
            plan["refit"] = plan_tensors({str(ly.index): wk})
    elif repair_ == "lstsq":
        plan["repair"] = "none"
    return plan


def _o_output(gm, ly: HeadLayer, plan: dict):
    """What `ly`'s o_proj computes from its dense input once `plan` prunes and repairs
    it: the kept columns (refit or not), its bias and the compensation."""
    entry = plan["blocks"][str(ly.index)]
    cols = ly.columns(entry["kept_heads"])
    refit = plan.get("refit")
    wk = refit.tensors[str(ly.index)] if refit is not None else o_weight(gm, ly)[:, cols]
    bias = attr_value(gm, ly.att.o.bias) if ly.att.o.bias else None
    c = torch.as_tensor(entry["compensation"]) if entry["compensation"] is not None else None

    def output(v: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(v[..., cols.to(v.device)], wk.to(v.device, v.dtype), bias)
        return y if c is None else y + c.to(v.device, v.dtype)

    return output


def plan_prune_heads(ctx, anatomy: Anatomy, cfg: PruneHeadsConfig) -> dict:
    if anatomy.empty:
        return {"blocks": {}, "reason": f"no residual blocks recognised: {anatomy.reason}"}
    attentions = [b.attention for b in anatomy.blocks if b.attention is not None]
    if not attentions:
        return {"blocks": {}, "reason": "no attention left (skip_layers removed every attention half)"}
    gm = attentions[0].o.node.graph.owning_module
    try:
        layers = head_layers(gm, anatomy, cfg.granularity)
    except Uncoupled as exc:
        return {"blocks": {}, "reason": f"cannot prove what carries the head count ({exc}): every tensor of a "
                                        "head is cut or none, so prune_heads leaves this model whole"}
    needs_data = cfg.score == "activation" or cfg.repair != "none"
    xs = {}
    if needs_data:  # a weight-scored plan without repair needs no calibration data at all
        values = ctx.stream_values([ly.att.o.node.args[0] for ly in layers], n=cfg.calibration_samples)
        xs = {ly.index: torch.cat([v[k].float().flatten(0, -2) for v in values]) for k, ly in enumerate(layers)}
    scores = {ly.index: unit_scores(gm, ly, xs.get(ly.index), cfg.score, cfg.repair != "none") for ly in layers}
    counts = _kept_counts(layers, scores, cfg)
    allocation = None
    if cfg.allocation == "loss":
        try:
            counts, allocation = _loss_counts(ctx, gm, layers, scores, xs, counts, cfg)
        except UsageError as exc:  # no calibration data: say which setting needs it
            raise UsageError(f"{exc}: prune_heads.allocation=loss measures calibration loss; give calibration "
                             "data, or set prune_heads.allocation=uniform") from None
    # Each repair is measured with those before it, so the plan shows what each step buys.
    ladder = {"none": ("none",), "bias": ("none", "bias"), "lstsq": ("none", "bias", "lstsq")}[cfg.repair]
    blocks, errs, removed = {}, {k: [] for k in ladder}, 0
    comps, refit = {k: {} for k in ladder}, {}
    for ly in layers:
        if counts[ly.index] >= ly.count:
            continue
        kv, heads = choose_heads(ly, scores[ly.index], counts[ly.index])
        att = ly.att
        blocks[str(ly.index)] = {"heads": att.num_heads, "kv_heads": att.num_kv_heads, "head_dim": att.head_dim,
                                 "kept_kv": kv, "kept_heads": heads}
        removed += params_removed(ly, kv, heads)
        if ly.index not in xs:
            continue
        x, w = xs[ly.index], o_weight(gm, ly).to(xs[ly.index].device)
        cols = ly.columns(heads).to(x.device)
        errs["none"].append(rel_err(x, w, cols))
        for name in ladder[1:]:
            if name == "lstsq" and cfg.refit == "sequential":
                continue  # fitted below, once every layer's kept heads are known
            wk, c = repair(x, w, cols, name == "lstsq", RIDGE)
            errs[name].append(rel_err(x, w, cols, wk, c))
            comps[name][str(ly.index)] = c.tolist()
            if name == "lstsq":
                refit[str(ly.index)] = wk
    if cfg.repair == "lstsq" and cfg.refit == "sequential" and xs and blocks:
        errs["lstsq"] = _sequential_refit(ctx, gm, [ly for ly in layers if str(ly.index) in blocks], blocks, xs,
                                          comps["lstsq"], refit, cfg)
    for k, b in blocks.items():
        if cfg.repair != "none" and k in comps[cfg.repair]:
            b["compensation"] = comps[cfg.repair][k]
    if not blocks:
        return {"blocks": {}, "reason": f"ratio {cfg.ratio} rounds to no head at align={cfg.align}"}
    total = sum(ly.att.num_heads for ly in layers)
    kept_heads = {str(ly.index): len(blocks[str(ly.index)]["kept_heads"]) if str(ly.index) in blocks
                  else ly.att.num_heads for ly in layers}
    plan = {
        "blocks": blocks,
        "repair": cfg.repair,
        "granularity": cfg.granularity,
        "kept_heads": kept_heads,
        "kept_fraction": round(sum(kept_heads.values()) / total, 4),
        "params_removed": int(removed),
        "why": f"{cfg.score} scores, {cfg.allocation} allocation, widths multiples of {cfg.align}",
    }
    if allocation is not None:
        plan["allocation"] = allocation
    if cfg.repair == "lstsq":
        plan["refit"] = plan_tensors(refit)
    if xs:
        plan["local_rel_err"] = {k: round(sum(v) / len(v), 6) for k, v in errs.items() if v}
        _calibration_losses(ctx, layers, plan, comps, ladder, cfg)
    return plan


def _sequential_refit(ctx, gm, layers: list[HeadLayer], blocks: dict, xs: dict, comps: dict, refit: dict,
                      cfg: PruneHeadsConfig) -> list[float]:
    """Refit each pruned o_proj, bottom up, on the inputs it gets in the model already
    pruned and repaired below it, to the dense model's output there (SparseGPT's and
    SlimGPT's order). Refit on dense inputs, each o_proj learns to fix its own cut on
    inputs it will not see once the layers below are pruned too; this one also absorbs
    what the layers below left wrong. It lowers the calibration error (tested) but, on
    SmolLM2, generalises worse than the per-layer refit (the knob's note). Fills `comps`
    and `refit`; returns each layer's relative error on its own inputs."""
    by_node = {ly.att.o.node: ly for ly in layers}
    errs = []

    def fit(node, values):
        ly = by_node[node]
        x = torch.cat([v.float().flatten(0, -2) for v in values])
        w = o_weight(gm, ly).to(x.device)
        cols = ly.columns(blocks[str(ly.index)]["kept_heads"]).to(x.device)
        y = xs[ly.index].to(x.device) @ w.T  # the dense model's o_proj output, before its bias
        wk, c = repair(x, w, cols, True, RIDGE, y=y)
        errs.append(rel_err(x, w, cols, wk, c, y=y))
        comps[str(ly.index)], refit[str(ly.index)] = c.tolist(), wk
        bias = attr_value(gm, ly.att.o.bias) if ly.att.o.bias else None
        # What the narrowed o_proj will compute (_apply): the kept columns refit, c added.
        return lambda v: torch.nn.functional.linear(v[..., cols], wk.to(v.dtype), bias) + c.to(v.dtype)

    ctx.sequential(list(by_node), fit, n=cfg.calibration_samples)
    return errs


def _calibration_losses(ctx, layers, plan: dict, comps: dict, ladder: tuple, cfg: PruneHeadsConfig) -> None:
    """The calibration loss dense and with each repair up to the chosen one, so the plan
    shows what each repair buys; an lstsq refit that loses to bias gives way to it."""
    couplings = {ly.index: ly.coupling for ly in layers if str(ly.index) in plan["blocks"]}
    losses = {"dense": ctx.calibration_loss(lambda g: g, n=cfg.calibration_samples)}
    for name in ladder:
        trial = {**plan, "repair": name, "blocks": {k: {**b, "compensation": comps[name].get(k) if name != "none"
                                                        else None} for k, b in plan["blocks"].items()}}
        losses[name] = ctx.calibration_loss(lambda g, t=trial: _pruned_copy(g, couplings, t),
                                            n=cfg.calibration_samples)
    plan["calibration_loss"] = {k: round(v, 5) for k, v in losses.items()}
    if cfg.repair == "lstsq" and losses["lstsq"] > losses["bias"]:
        # Each o_proj is refit alone on dense activations; the pruned model as a whole
        # can still lose. Keep what the calibration loss prefers, and say so.
        plan.pop("refit")
        plan.update(repair="bias", repair_note="lstsq lost to bias on calibration loss: bias used")
        for k, b in plan["blocks"].items():
            b["compensation"] = comps["bias"][k]


def _pruned_copy(gm: fx.GraphModule, couplings: dict, plan: dict) -> fx.GraphModule:
    """A copy of `gm` with the plan applied; `gm`'s own tensors are left as they are."""
    copy, mapping = rebuild(gm)
    _apply(copy, {i: c.moved(mapping) for i, c in couplings.items()}, plan)
    copy.recompile()
    return copy


def prune(gm: fx.GraphModule, anatomy: Anatomy, plan: dict) -> int:
    """Narrow the planned attentions of `gm` (blocks by index, checked against the plan's
    head counts); every block is coupled before any is cut, so a refusal changes nothing."""
    couplings = {}
    for block in anatomy.blocks:
        entry = plan["blocks"].get(str(block.index))
        if entry is None:
            continue
        att = block.attention
        if att is None:
            raise CompileError(f"prune_heads: the plan prunes block {block.index}'s attention, which this program lacks")
        if (att.num_heads, att.num_kv_heads, att.head_dim) != (entry["heads"], entry["kv_heads"], entry["head_dim"]):
            raise CompileError(f"prune_heads: block {block.index} has {att.num_heads} heads over "
                               f"{att.num_kv_heads} KV heads of {att.head_dim}; the plan was made for another shape")
        try:
            couplings[block.index] = couple(gm, att)
        except Uncoupled as exc:
            raise CompileError(f"prune_heads: block {block.index} of this program cannot be narrowed like the "
                               f"calibration program ({exc}); compile without prune_heads.ratio") from None
    return _apply(gm, couplings, plan)


def _apply(gm: fx.GraphModule, couplings: dict, plan: dict) -> int:
    getattrs = get_attr_nodes(gm)
    refit = getattr(plan.get("refit"), "tensors", None) if plan.get("repair") == "lstsq" else None
    if plan.get("repair") == "lstsq" and refit is None:
        raise CompileError("prune_heads: this lstsq plan was read back from JSON without its refit weights; plan again")
    for index, c in couplings.items():
        entry = plan["blocks"][str(index)]
        narrow(gm, c, Kept(c, entry["kept_kv"], entry["kept_heads"]), getattrs)
        o = c.attention.o
        if refit is not None:  # o's kept columns, in the order narrow keeps them (heads ascending)
            w = attr_value(gm, o.weight)
            set_param(gm, getattrs, o.weight, refit[str(index)].to(w.device, w.dtype))
        comp = entry.get("compensation")
        if comp is not None:
            add_to_linear_output(gm, getattrs, c.o_node, o.weight, o.bias, torch.as_tensor(comp, dtype=torch.float32))
    return len(couplings)


@register_pass("prune_heads", PruneHeadsConfig, lossy=True, plan=plan_prune_heads)
def prune_heads(gm: fx.GraphModule, anatomy: Anatomy, cfg: PruneHeadsConfig, plan: dict) -> PassResult:
    """Remove the least important attention heads (whole KV groups by default), KV cache included."""
    if not plan.get("blocks"):
        return PassResult(False, plan.get("reason", "nothing selected"))
    if anatomy.empty:
        return PassResult(False, f"no residual blocks recognised: {anatomy.reason}")
    done = prune(gm, anatomy, plan)
    gm.recompile()
    return PassResult(True, details={"pruned_attentions": done, "kept_fraction": plan.get("kept_fraction")})
