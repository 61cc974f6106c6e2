"""prune_mlp: structured pruning of MLP intermediate channels.

Channel j of an MLP is one row of W_gate and W_up (and their biases) and one column of
W_down; removing it shrinks all three linears, so every kernel after this pass is a
plain dense one of smaller width. Which channels go (`plan`, on calibration data):
- score="activation" (FLAP's fluctuation): Var_tokens(x_j) * ||W_down[:, j]||^2, x the
  input of down_proj. A channel whose input barely moves only adds a constant, which
  the repair puts back; one that moves a lot through a large column matters.
- score="weight": ||W_down[:, j]||^2 * ||W_up[j]||^2 (* ||W_gate[j]||^2); no data needed.
- allocation="uniform" keeps the same fraction of every MLP; "global" ranks all
  channels together by their score standardised per layer (FLAP), so layers whose
  scores are concentrated in few channels keep more.
Kept widths are multiples of `align` (tensor-core tiles on GPUs), at least `align`.

Repair, folded into down_proj's bias (a new bias parameter where it had none: one op,
and later passes see an ordinary linear with a bias):
- "bias": the removed channels' mean contribution, mean(x_removed) @ W_down[:, removed]^T.
- "lstsq": the kept columns refit by least squares to the full output on the
  calibration activations (constant fitted alongside), with a ridge toward the original
  columns; kept only if it beats "bias" on calibration loss.
The plan reports the layer-local output error and the calibration loss of each repair
up to the chosen one, so the gain of each step is visible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from optc.compiler.anatomy import Anatomy
from optc.compiler.config import Choice, Float, PassConfig, knob
from optc.compiler.fused_mlp import split_fused_gate_up
from optc.compiler.passes import PassResult, register_pass
from optc.compiler.refit import rel_err, repair
from optc.compiler.rewrite import add_to_linear_output, attr_value, get_attr_nodes, plan_tensors, rebuild, set_param
from optc.errors import CompileError

SCORES = ("activation", "weight")
ALLOCATIONS = ("uniform", "global")
REPAIRS = ("bias", "none", "lstsq")
# lstsq's ridge (compiler/refit.py), relative to the mean diagonal of the kept inputs'
# Gram matrix; chosen on calibration windows the fit did not see (passes/README.md).
RIDGE = 1.0


@dataclass(frozen=True)
class PruneMlpConfig(PassConfig):
    ratio: float = knob(0.0, low=0.0, high=0.9, search=Float(0.0, 0.5, step=0.05),
                        doc="fraction of each MLP's intermediate channels removed (0 = off)")
    # Not searched: weight scores wrecked SmolLM2 even at small ratios (benchmarks/NOTES.md,
    # "Weight scores"): norms miss the channels that carry massive activations.
    score: str = knob("activation", choices=SCORES,
                      doc="channel importance: activation (FLAP fluctuation, calibration data) | weight (norms only)")
    allocation: str = knob("uniform", choices=ALLOCATIONS, search=Choice(ALLOCATIONS, when=("ratio", ">", 0)),
                           doc="uniform: same ratio per layer | global: rank all layers' channels together")
    # Not searched: the repairs cost the same latency, and the default falls back to the
    # cheaper repair whenever it loses on calibration loss.
    repair: str = knob("lstsq", choices=REPAIRS,
                       doc="bias: add the removed channels' mean output | lstsq: also refit down_proj | none")
    align: int = knob(0, low=0, high=4096,
                      doc="kept channels per MLP are a multiple of this; 0: the target's (64 on GPUs, 1 on cpu)")
    # lstsq refits on 32 x 128 tokens: on 4 x 128 (fewer tokens than kept channels) the
    # refit barely beats bias on held-out text (passes/README.md).
    calibration_samples: int = knob(32, low=1, high=256, doc="calibration sequences (or batches)")

    def active(self) -> bool:
        return self.enabled and self.ratio > 0


def _aligned(k: float, width: int, align: int) -> int:
    align = align or 1  # 0 unresolved (a pipeline run without a target): no step
    k = int(round(k / align)) * align
    return max(min(align, width), min(width, k))


def _scores(gm, mlp, x: torch.Tensor | None, score: str) -> torch.Tensor:
    down = attr_value(gm, mlp.down.weight).float()
    col = down.pow(2).sum(0)
    if score == "activation":
        return x.var(0, unbiased=False) * col
    for lin in (mlp.gate, mlp.up):
        if lin is not None:
            col = col * attr_value(gm, lin.weight).float().pow(2).sum(1)
    return col


def _kept_counts(scores: dict, cfg: PruneMlpConfig) -> dict:
    if cfg.allocation == "uniform":
        raw = {i: s.numel() * (1 - cfg.ratio) for i, s in scores.items()}
    else:
        z = {i: (s - s.mean()) / s.std().clamp_min(1e-12) for i, s in scores.items()}
        every = torch.cat(list(z.values())).sort().values
        drop = int(round(cfg.ratio * every.numel()))
        cut = every[drop - 1] if drop else -float("inf")
        raw = {i: int((zi > cut).sum()) for i, zi in z.items()}
    return {i: _aligned(raw[i], scores[i].numel(), cfg.align) for i in raw}


def plan_prune_mlp(ctx, anatomy: Anatomy, cfg: PruneMlpConfig) -> dict:
    if anatomy.empty:
        return {"blocks": {}, "reason": f"no residual blocks recognised: {anatomy.reason}"}
    mlps = {b.index: b.mlp for b in anatomy.blocks if b.mlp is not None}
    if not mlps:
        return {"blocks": {}, "reason": "no MLP left (skip_layers removed every MLP half)"}
    odd = [i for i, m in mlps.items() if m.up.out_features != m.down.in_features
           or (m.gated and m.gate.out_features != m.down.in_features)]
    if odd:
        return {"blocks": {}, "reason": f"blocks {odd}: up/gate widths differ from down_proj's input"}
    gm = next(iter(mlps.values())).down.node.graph.owning_module
    needs_data = cfg.score == "activation" or cfg.repair != "none"
    xs = {}
    if needs_data:  # a weight-scored plan without repair needs no calibration data at all
        values = ctx.stream_values([m.down.node.args[0] for m in mlps.values()], n=cfg.calibration_samples)
        xs = {i: torch.cat([v[k].float().flatten(0, -2) for v in values]) for k, i in enumerate(mlps)}
    scores = {i: _scores(gm, m, xs.get(i), cfg.score) for i, m in mlps.items()}
    counts = _kept_counts(scores, cfg)
    # Each repair is measured with those before it, so the plan shows what each step buys.
    ladder = {"none": ("none",), "bias": ("none", "bias"), "lstsq": ("none", "bias", "lstsq")}[cfg.repair]
    variants = {k: {} for k in ladder} if xs else {}
    blocks, errs, refit, removed = {}, {k: [] for k in variants}, {}, 0
    for i, m in mlps.items():
        width = scores[i].numel()
        if counts[i] >= width:
            continue
        kept = scores[i].topk(counts[i]).indices.sort().values
        blocks[str(i)] = {"width": width, "kept": kept.tolist()}
        removed += (width - counts[i]) * sum(lin.in_features + (lin.bias is not None) for lin in (m.gate, m.up) if lin)
        removed += (width - counts[i]) * m.down.out_features
        if not xs:
            continue
        w = attr_value(gm, m.down.weight).float().to(xs[i].device)
        kept = kept.to(xs[i].device)
        errs["none"].append(rel_err(xs[i], w, kept))
        for name in [k for k in variants if k != "none"]:
            wk, c = repair(xs[i], w, kept, name == "lstsq", RIDGE)
            errs[name].append(rel_err(xs[i], w, kept, wk, c))
            variants[name][str(i)] = c.tolist()
            if name == "lstsq":
                refit[str(i)] = wk
        if cfg.repair != "none":
            blocks[str(i)]["compensation"] = variants[cfg.repair][str(i)]
    if not blocks:
        return {"blocks": {}, "reason": f"ratio {cfg.ratio} rounds to no channel at align={cfg.align}"}
    width_total = sum(s.numel() for s in scores.values())
    plan = {
        "blocks": blocks,
        "repair": cfg.repair,
        "kept_channels": {str(i): counts[i] for i in mlps},
        "kept_fraction": round(sum(counts.values()) / width_total, 4),
        "params_removed": int(removed),
        "why": f"{cfg.score} scores, {cfg.allocation} allocation, widths multiples of {cfg.align}",
    }
    if cfg.repair == "lstsq":
        plan["refit"] = plan_tensors(refit)
    if xs:
        plan["local_rel_err"] = {k: round(sum(v) / len(v), 6) for k, v in errs.items() if v}
        losses = {"dense": ctx.calibration_loss(lambda g: g, n=cfg.calibration_samples)}
        for name, comp in variants.items():
            trial = {**plan, "repair": name, "blocks": {
                k: {"width": b["width"], "kept": b["kept"], "compensation": comp.get(k)} for k, b in blocks.items()}}
            losses[name] = ctx.calibration_loss(lambda g, t=trial: _pruned_copy(g, anatomy, t),
                                                n=cfg.calibration_samples)
        plan["calibration_loss"] = {k: round(v, 5) for k, v in losses.items()}
        if cfg.repair == "lstsq" and losses["lstsq"] > losses["bias"]:
            # Each MLP is refit alone on dense activations; the pruned model as a whole can
            # still lose. Keep what the calibration loss prefers, and say so.
            plan.pop("refit")
            plan.update(repair="bias", repair_note="lstsq lost to bias on calibration loss: bias used")
            for k, b in blocks.items():
                b["compensation"] = variants["bias"][k]
    return plan


def _pruned_copy(gm: fx.GraphModule, anatomy: Anatomy, plan: dict) -> fx.GraphModule:
    """A copy of `gm` with the plan applied; `gm`'s own parameters are left as they are
    (the copy's modules are its own; only tensors are shared)."""
    copy, _ = rebuild(gm)
    prune(copy, anatomy, plan)
    copy.recompile()  # the compensation is a new argument of down_proj's linear
    return copy


def _narrow_meta(start: list[fx.Node], stop: fx.Node, width: int, kept: int) -> None:
    """Intermediate activations (linear outputs, act, product) between gate/up and down
    are `kept` wide now: their metadata says so for the passes that read it."""
    seen, todo = set(), list(start)
    while todo:
        node = todo.pop()
        if node in seen or node is stop:
            continue
        seen.add(node)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() and val.shape[-1] == width:
            node.meta["val"] = val.new_empty((*val.shape[:-1], kept))
        todo.extend(node.users)


def prune(gm: fx.GraphModule, anatomy: Anatomy, plan: dict) -> int:
    """Slice the planned MLPs of `gm` (found by parameter name, so `anatomy` may belong
    to another program with the same parameters); returns how many were pruned."""
    getattrs = get_attr_nodes(gm)
    refit = getattr(plan.get("refit"), "tensors", None)
    if plan.get("repair") == "lstsq" and refit is None:
        raise CompileError("prune_mlp: this lstsq plan was read back from JSON without its refit weights; plan again")
    done = 0
    for block in anatomy.blocks:
        entry = plan["blocks"].get(str(block.index))
        if entry is None:
            continue
        mlp = block.mlp
        if mlp is None:
            raise CompileError(f"prune_mlp: the plan prunes block {block.index}'s MLP, which this program lacks")
        w_down = attr_value(gm, mlp.down.weight)
        if w_down.shape[1] != entry["width"]:
            raise CompileError(f"prune_mlp: block {block.index}'s MLP is {w_down.shape[1]} wide, the plan was "
                               f"made for {entry['width']}")
        kept = torch.tensor(entry["kept"], device=w_down.device)
        linears = [getattrs[lin.weight][0] for lin in (mlp.gate, mlp.up) if lin is not None]
        starts = [u for n in linears for u in n.users]
        for lin in (mlp.gate, mlp.up):
            if lin is None:
                continue
            set_param(gm, getattrs, lin.weight, attr_value(gm, lin.weight).detach()[kept])
            if lin.bias is not None:
                set_param(gm, getattrs, lin.bias, attr_value(gm, lin.bias).detach()[kept])
        new_down = refit[str(block.index)] if plan.get("repair") == "lstsq" else w_down.detach()[:, kept]
        set_param(gm, getattrs, mlp.down.weight, new_down.to(w_down.device, w_down.dtype))
        down_node = next(u for u in getattrs[mlp.down.weight][0].users)
        if entry.get("compensation") is not None:
            add_to_linear_output(gm, getattrs, down_node, mlp.down.weight, mlp.down.bias,
                                 torch.tensor(entry["compensation"], dtype=torch.float32))
        _narrow_meta(starts, down_node, entry["width"], len(entry["kept"]))
        done += 1
    return done


@register_pass("prune_mlp", PruneMlpConfig, lossy=True, plan=plan_prune_mlp, prepare=split_fused_gate_up)
def prune_mlp(gm: fx.GraphModule, anatomy: Anatomy, cfg: PruneMlpConfig, plan: dict) -> PassResult:
    """Remove the least important MLP intermediate channels (gate/up rows, down columns)."""
    if not plan.get("blocks"):
        return PassResult(False, plan.get("reason", "nothing selected"))
    if anatomy.empty:
        return PassResult(False, f"no residual blocks recognised: {anatomy.reason}")
    done = prune(gm, anatomy, plan)
    gm.recompile()
    return PassResult(True, details={"pruned_mlps": done, "kept_fraction": plan.get("kept_fraction")})
