"""sparsify_activations: zero small activations so the kernels can skip weight rows.

Methods (one threshold decides `keep = |v| > t`, calibrated at the target sparsity):
- teal: the input of every linear in the blocks, one threshold per layer and input
  (q/k/v share one; gate/up share one; o and down have their own).
- cats: act(gate) of each gated MLP, one threshold per layer; a zero skips the matching
  row of W_up and W_down.
- chess: act(gate) per channel: t_c = tau / importance_c with importance_c =
  E|up_c| * ||W_down[:, c]|| (a zero in channel c costs about |act_c| * importance_c);
  and the inputs of q/k/v and o only where their measured error proxy is below the
  mean of the attention inputs' (selective sparsification).
allocation="greedy" spreads the target over units by a layer-local error proxy (see
sparsify_calibration) and keeps it only if it beats uniform on calibration loss.

Programs over many tokens (prefill, encoders) get dense masking `x * (|x| > t)` before
the linear; programs over few tokens (decode) get `optc::sparse_linear` on a transposed
weight copy and, for act(gate) units, `optc::cats_gate_up`, on the units whose weights
are large enough for the sparse ops to pay (`kernels=auto`; the rest stay masked and
dense). Both read the same threshold buffers (`sparsify_t_*`), so they compute the same
function and the artifact carries them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from optc.compiler.anatomy import Anatomy
from optc.compiler.codegen.lowering import THRESHOLD_BUFFER_PREFIX
from optc.compiler.fused_mlp import split_fused_gate_up
from optc.compiler.config import Choice, Float, PassConfig, knob
from optc.compiler.passes import PassResult, register_pass
from optc.compiler.passes import sparsify_calibration as cal
from optc.compiler.passes.sparsify_report import report_sparsity
from optc.compiler.rewrite import drop_unused_attributes, eliminate_dead_code, plan_tensors, rebuild
from optc.errors import CompileError

aten = torch.ops.aten
METHODS = ("cats", "teal", "chess")
PREFIX = THRESHOLD_BUFFER_PREFIX
KERNEL_CHOICES = ("auto", "sparse", "dense")


@dataclass(frozen=True)
class SparsifyActivationsConfig(PassConfig):
    method: str = knob("teal", choices=METHODS, search=Choice(METHODS, when=("sparsity", ">", 0)), doc="cats | teal | chess")
    sparsity: float = knob(0.0, low=0.0, high=0.95, search=Float(0.0, 0.7, step=0.05),
                           doc="target fraction of thresholded activations set to zero")
    allocation: str = knob("greedy", choices=("uniform", "greedy"), search=Choice(("uniform", "greedy"), when=("sparsity", ">", 0)),
                           doc="same sparsity in every unit, or per-unit sparsities by measured error")
    calibration_samples: int = knob(4, low=1, high=256, doc="calibration sequences (or batches)")
    kernels: str = knob("auto", choices=KERNEL_CHOICES,
                        doc="decode kernels: auto (optc's sparse ops only where measured to beat dense "
                            "on GPU targets: token count and weight size), sparse (wherever few tokens), "
                            "dense (threshold masks before dense linears only)")

    def active(self) -> bool:
        return self.enabled and self.sparsity > 0


def plan_sparsify_activations(ctx, anatomy: Anatomy, cfg: SparsifyActivationsConfig) -> dict:
    if anatomy.empty:
        return {"units": [], "reason": f"no residual blocks recognised: {anatomy.reason}"}
    units, skipped = cal.units_for(cfg.method, anatomy)
    if not units:
        return {"units": [], "reason": f"{cfg.method}: nothing to threshold ({'; '.join(skipped)})"}
    gm = ctx.calibration_program
    n = min(cfg.calibration_samples, len(ctx.inputs))
    stats = cal.collect(ctx, units, gm, n)
    proxies: dict = {}

    def proxy(u):
        if u.key not in proxies:
            proxies[u.key] = cal.ErrorProxy(gm, u, stats[u.key])
        return proxies[u.key]

    plan: dict = {"method": cfg.method, "target": cfg.sparsity, "kernels": cfg.kernels, "skipped_blocks": skipped}
    if cfg.method == "chess":
        attn = [u for u in units if u.kind in ("qkv", "o")]
        cost = {u.key: proxy(u)(cfg.sparsity) for u in attn}
        mean = sum(cost.values()) / max(1, len(cost))
        units = [u for u in units if u.key not in cost or cost[u.key] < mean]
        plan["attention"] = {"kept": sorted(k for k in cost if cost[k] < mean),
                             "error_proxy": {k: cal.sig(v) for k, v in cost.items()}, "mean": cal.sig(mean)}
    sparsities = {u.key: cfg.sparsity for u in units}
    allocation = {"requested": cfg.allocation, "used": "uniform"}
    if cfg.allocation == "greedy":
        for u in units:
            proxy(u)
        greedy = cal.greedy(units, proxies, cfg.sparsity)
        losses = {
            name: ctx.calibration_loss(lambda g, s=s: _masked_copy(g, units, _thresholds(units, stats, s)), n=n)
            for name, s in (("uniform", sparsities), ("greedy", greedy))
        }
        allocation["calibration_loss"] = {k: round(v, 5) for k, v in losses.items()}
        if losses["greedy"] <= losses["uniform"]:
            allocation["used"], sparsities = "greedy", greedy
    plan["allocation"] = allocation
    thresholds = _thresholds(units, stats, sparsities)
    rows, vectors, reach = [], {}, {}
    for u in units:
        st, t = stats[u.key], thresholds[u.key]
        reach[u.key] = cal.reached(st, t)
        row = {"key": u.key, "path": u.block.path, "kind": u.kind, "buffer": PREFIX + u.key.replace(".", "_"),
               "params": u.params, "sparsity": sparsities[u.key], "calibration_sparsity": round(reach[u.key], 4)}
        if u.per_channel:
            vectors[u.key] = t
            row["threshold"] = cal.summary(t)
        else:
            row["threshold"] = float(t[0])
        if u.key in proxies:
            row["error_proxy"] = cal.sig(proxies[u.key](sparsities[u.key]))
        rows.append(row)
    total = sum(u.params for u in units)
    plan["units"] = rows
    plan["calibration_sparsity"] = round(sum(reach[u.key] * u.params for u in units) / total, 4)
    plan["block_params"] = sum(lin.in_features * lin.out_features for b in anatomy.blocks
                               for half in b.halves for lin in getattr(b, half).linears)
    # What decode speed follows: the fraction of all block weight rows a token skips.
    plan["calibration_weights_skipped"] = round(sum(reach[u.key] * u.params for u in units) / plan["block_params"], 4)
    plan["calibration_tokens"] = int(next(iter(stats.values())).x.shape[0])
    if vectors:
        plan["channel_thresholds"] = plan_tensors(vectors)
    return plan


def _thresholds(units, stats, sparsities) -> dict[str, torch.Tensor]:
    return {u.key: cal.threshold_tensor(stats[u.key], cal.cutoff(stats[u.key], sparsities[u.key])) for u in units}


def _masked_copy(gm: fx.GraphModule, units, thresholds) -> fx.GraphModule:
    """A copy of `gm` (parameters shared) with every unit masked: what calibration runs."""
    copy, mapping = rebuild(gm)
    for u in units:
        _mask(copy, mapping[u.source], [mapping[c] for c in u.consumers], PREFIX + u.key.replace(".", "_"),
              thresholds[u.key])
    copy.recompile()
    return copy


def _buffer(gm: fx.GraphModule, name: str, value: torch.Tensor) -> None:
    if not hasattr(gm, name):
        like = next(iter(gm.parameters()), value)
        gm.register_buffer(name, value.detach().to(device=like.device, dtype=torch.float32, copy=True))


def _mask(gm: fx.GraphModule, source: fx.Node, consumers: list[fx.Node], name: str, value: torch.Tensor) -> None:
    """consumers read `source * (|source| > t)` instead of `source`."""
    _buffer(gm, name, value)
    g = gm.graph
    with g.inserting_after(source):
        t = g.get_attr(name)
    with g.inserting_after(t):
        mag = g.call_function(aten.abs.default, (source,))
    with g.inserting_after(mag):
        keep = g.call_function(aten.gt.Tensor, (mag, t))
    with g.inserting_after(keep):
        masked = g.call_function(aten.mul.Tensor, (source, keep))
    for node in (mag, keep, masked):
        node.meta["nn_module_stack"] = source.meta.get("nn_module_stack", {})
    if "val" in source.meta:
        masked.meta["val"] = source.meta["val"]
    for c in consumers:
        c.replace_input_with(source, masked)


def _tokens(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    dims = val.shape[:-1]
    if any(not isinstance(d, int) for d in dims):
        return None  # dynamic: treat as many tokens
    return math.prod(dims)


def few_tokens(tokens: int | None, weight_elems: int | None = None) -> bool:
    """Whether the sparse kernels beat dense at this token count (and weight size) on
    some GPU target (the pass does not know the target; on CPU the ops run the dense
    torch reference)."""
    from optc.compiler.codegen.kernels.configs import KNOWN_TARGETS
    from optc.compiler.codegen.ops import use_sparse_kernel

    return tokens is not None and any(use_sparse_kernel(tokens, t, weight_elems) for t in KNOWN_TARGETS)


def _pays(u: cal.Unit, tokens: int | None, kernels: str) -> bool:
    """Sparse kernels for this unit only if every weight it skips rows of is large
    enough to gain from them (kernels="auto"); otherwise the unit is masked and stays
    dense (Inductor fuses the mask into its own GEMV)."""
    if kernels != "auto":
        return kernels == "sparse" and few_tokens(tokens)
    if u.kind == "act":
        mlp = u.block.mlp
        weights = [mlp.down] + ([mlp.gate, mlp.up] if mlp.gated else [])
    else:
        weights = u.weights
    return all(few_tokens(tokens, lin.in_features * lin.out_features) for lin in weights)


def _transposed(gm: fx.GraphModule, weight: str) -> str:
    """A contiguous W^T registered beside W (as `<weight>_t`); returns its target."""
    name = weight + "_t"
    owner, _, attr = name.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    if not hasattr(module, attr):
        w = gm.get_parameter(weight)
        module.register_parameter(attr, torch.nn.Parameter(w.detach().t().contiguous(), requires_grad=False))
    return name


def _sparse_linear(gm: fx.GraphModule, lin_node: fx.Node, x: fx.Node, weight: str, tname: str) -> fx.Node:
    g = gm.graph
    bias = lin_node.args[2] if len(lin_node.args) > 2 else None
    with g.inserting_before(lin_node):
        wt = g.get_attr(_transposed(gm, weight))
        t = g.get_attr(tname)
        new = g.call_function(torch.ops.optc.sparse_linear.default, (x, wt, t, bias))
    new.meta.update({k: v for k, v in lin_node.meta.items() if k in ("val", "nn_module_stack", "stack_trace")})
    lin_node.replace_all_uses_with(new)
    g.erase_node(lin_node)
    return new


def _sparse(gm: fx.GraphModule, u: cal.Unit, tname: str) -> str:
    """Rewrite one unit with the optc ops; returns what it became."""
    if u.kind != "act":
        for lin in u.weights:
            _sparse_linear(gm, lin.node, lin.node.args[0], lin.weight, tname)
        return "sparse_linear"
    mlp, g = u.block.mlp, gm.graph
    if not mlp.gated:
        _sparse_linear(gm, mlp.down.node, mlp.down.node.args[0], mlp.down.weight, tname)
        return "sparse_linear"
    _buffer(gm, PREFIX + "zero", torch.zeros(1))
    h = u.consumers[0]
    x = mlp.gate.node.args[0]
    fusable = mlp.activation == "silu" and mlp.gate.bias is None and mlp.up.bias is None and mlp.up.node.args[0] is x
    if fusable:
        with g.inserting_before(h):
            wg, wu, t = g.get_attr(mlp.gate.weight), g.get_attr(mlp.up.weight), g.get_attr(tname)
            fused = g.call_function(torch.ops.optc.cats_gate_up.default, (x, wg, wu, t))
        fused.meta.update({k: v for k, v in h.meta.items() if k in ("val", "nn_module_stack")})
        h.replace_all_uses_with(fused)
        h = fused
    else:
        _mask(gm, u.source, u.consumers, tname, torch.zeros(1))  # buffer already holds t
    _sparse_linear(gm, mlp.down.node, h, mlp.down.weight, PREFIX + "zero")
    return "cats_gate_up" if fusable else "masked+sparse_linear"


@register_pass("sparsify_activations", SparsifyActivationsConfig, lossy=True, plan=plan_sparsify_activations,
               report=report_sparsity, discontinuous=True, prepare=split_fused_gate_up)
def sparsify_activations(gm: fx.GraphModule, anatomy: Anatomy, cfg: SparsifyActivationsConfig, plan: dict) -> PassResult:
    """Threshold small activations (TEAL, CATS, CHESS) so sparse kernels skip weight rows."""
    rows = plan.get("units", [])
    if not rows:
        return PassResult(False, plan.get("reason", "nothing to threshold"))
    units = {u.key: u for u in cal.units_for(plan["method"], anatomy)[0]}
    missing = [r["key"] for r in rows if r["key"] not in units or units[r["key"]].block.path != r["path"]]
    if missing:
        raise CompileError(f"sparsify_activations: this program lacks the planned units {missing[:4]}")
    vectors = getattr(plan.get("channel_thresholds"), "tensors", {})
    tokens = _tokens(units[rows[0]["key"]].source)
    done: dict[str, int] = {}
    for r in rows:
        u = units[r["key"]]
        if isinstance(r["threshold"], dict):
            if r["key"] not in vectors:
                raise CompileError("sparsify_activations: the plan's per-channel thresholds are not in this "
                                   "process (a plan read back from JSON); plan again")
            value = vectors[r["key"]]
        else:
            value = torch.tensor([r["threshold"]], dtype=torch.float32)
        if _pays(u, tokens, plan.get("kernels", "auto")):
            _buffer(gm, r["buffer"], value)
            how = _sparse(gm, u, r["buffer"])
        else:
            _mask(gm, u.source, u.consumers, r["buffer"], value)
            how = "masked"
        done[how] = done.get(how, 0) + 1
    eliminate_dead_code(gm)
    drop_unused_attributes(gm)
    gm.recompile()
    return PassResult(True, details={"rewritten": done, "units": len(rows)})
