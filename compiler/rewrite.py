"""Small graph-surgery helpers shared by passes and calibration."""

from __future__ import annotations

import copy
import hashlib

import torch
import torch.fx as fx

from optc.compiler.torch_private import (OpOverload, buffer_slots, codegen_without_out_spec, graph_codegen,
                                         op_schema, set_graph_codegen, set_tensor_attr)


def rebuild(gm: fx.GraphModule, extra_outputs: list[fx.Node] | None = None):
    """A new GraphModule over a copy of `gm`'s graph that shares `gm`'s parameters and
    buffers (no tensor is copied). Returns (new_gm, node mapping old -> new).

    With `extra_outputs`, the copy returns (original output, [those nodes' values]),
    which is how calibration reads the residual stream without hooks.
    """
    graph = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, mapping)
    if extra_outputs:
        graph.output((out, [mapping[n] for n in extra_outputs]))
    else:
        graph.output(out)
        set_graph_codegen(graph, graph_codegen(gm.graph))  # keeps the program's keyword signature
    new = fx.GraphModule(gm, graph)
    if extra_outputs:
        # The copied codegen would flatten outputs with the original's output spec.
        set_graph_codegen(new.graph, codegen_without_out_spec(graph_codegen(gm.graph)))
        new.recompile()
    return new, mapping


def attr_value(gm: fx.GraphModule, target: str):
    """The tensor a get_attr node's `target` names (parameter, buffer or constant)."""
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def mutated_attr_names(module: torch.nn.Module) -> list[str]:
    """Tensor attributes that a GraphModule's graph writes in place (directly or through
    a view such as `aten.to`/`select` that aliases them). Empty for other modules.
    (A decoder's static KV cache is such state: the runtime ties it between programs,
    MLIR export turns it into function arguments.)"""
    names: set[str] = set()
    for mname, gm in module.named_modules(remove_duplicate=False):
        if not isinstance(gm, fx.GraphModule):
            continue
        prefix = f"{mname}." if mname else ""
        root: dict[fx.Node, str] = {}
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                if isinstance(attr_value(gm, node.target), torch.Tensor):
                    root[node] = node.target
                continue
            if node.op != "call_function" or not isinstance(node.target, OpOverload):
                continue
            schema = op_schema(node.target)
            out_sets = set()
            for ret in schema.returns:
                if ret.alias_info is not None:
                    out_sets |= set(ret.alias_info.before_set)
            for i, arg in enumerate(schema.arguments):
                if arg.alias_info is None:
                    continue
                val = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                if not isinstance(val, fx.Node) or val not in root:
                    continue
                if arg.alias_info.is_write:
                    names.add(prefix + root[val])
                if out_sets & set(arg.alias_info.before_set):
                    root[node] = root[val]
    return sorted(names)


def drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Erase get_attr nodes nothing reads and delete the parameters they named, so the
    re-exported program and the parameter count no longer include them. Buffers stay:
    a decoder's KV-cache buffers keep their names in every program, which is how the
    runtime ties the prefill and decode programs to one cache."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for name in [n for n, _ in gm.named_parameters()]:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            module = gm.get_submodule(owner) if owner else gm
            delattr(module, attr)


def eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Dead-code elimination that also drops the metadata asserts torch.export adds
    (`_assert_tensor_metadata`): they have side effects, so fx keeps them and with
    them the whole sub-graph they check, even when nothing else reads it."""
    import torch

    asserts = {torch.ops.aten._assert_tensor_metadata.default}
    # fx counts SDPA as impure (its dropout draws random numbers); at inference its
    # dropout_p is 0, so an unused attention is dead code like any other. The same
    # holds for a dropout exported with train=False (Phi-3's resid_attn_dropout): it is
    # the identity, and keeping it would keep a routed-around sub-block alive.
    pure_despite_tags = {torch.ops.aten.scaled_dot_product_attention.default}

    def impure(n: fx.Node) -> bool:
        if n.target == torch.ops.aten.dropout.default and len(n.args) > 2 and n.args[2] is False:
            return False
        return n.is_impure() and n.target not in pure_despite_tags

    changed = True
    while changed:
        gm.graph.eliminate_dead_code(is_impure_node=impure)
        changed = False
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in asserts:
                checked = node.args[0]
                if isinstance(checked, fx.Node) and set(checked.users) == {node}:
                    gm.graph.erase_node(node)
                    changed = True


def node_shape(node) -> tuple | None:
    """The shape in a node's tensor metadata (`meta["val"]`), or None."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def node_dtype(node) -> torch.dtype | None:
    """The dtype in a node's tensor metadata (`meta["val"]`), or None."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


class PlanTensors(str):
    """A JSON string (the content hash of named tensors) that carries the tensors
    themselves in this process: a plan stays JSON for the manifest, and what a pass
    computed on calibration data (thresholds, refit weights) reaches its graphs."""

    tensors: dict


def plan_tensors(tensors: dict) -> PlanTensors:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode() + tensors[key].detach().cpu().numpy().tobytes())
    out = PlanTensors("sha256:" + digest.hexdigest()[:16])
    out.tensors = tensors
    return out


def get_attr_nodes(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """The get_attr nodes of `gm` by target."""
    out: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            out.setdefault(node.target, []).append(node)
    return out


def set_param(gm: fx.GraphModule, getattrs: dict, name: str, value: torch.Tensor) -> None:
    """Replace (or add) the parameter `name` of `gm` by `value`; a new tensor, so other
    programs holding the old one are left as they are."""
    module, attr = _owner(gm, name)
    module.register_parameter(attr, torch.nn.Parameter(value.contiguous(), requires_grad=False))
    # Shape metadata like every get_attr of the program: later passes' anatomy reads it.
    for node in getattrs.get(name, []):
        node.meta["val"] = node.meta["val"].new_empty(value.shape) if "val" in node.meta else \
            torch.empty(value.shape, dtype=value.dtype, device="meta")


def add_to_linear_output(gm: fx.GraphModule, getattrs: dict, linear: fx.Node, weight: str, bias: str | None,
                         constant: torch.Tensor) -> None:
    """Add `constant` to the output of the `linear` node reading `weight`: folded into
    its bias, a new `<owner>.bias` parameter where it had none, so the graph keeps an
    ordinary linear that later passes read as such."""
    w = attr_value(gm, weight)
    constant = constant.to(w.device, torch.float32)
    if bias is not None:
        set_param(gm, getattrs, bias, (attr_value(gm, bias).float() + constant).to(w.dtype))
        return
    name = f"{weight.rpartition('.')[0]}.bias".lstrip(".")
    set_param(gm, getattrs, name, constant.to(w.dtype))
    with gm.graph.inserting_before(linear):
        node = gm.graph.get_attr(name)
    node.meta["val"] = getattrs[weight][0].meta["val"].new_empty(constant.shape)
    getattrs.setdefault(name, []).append(node)
    linear.args = (linear.args[0], linear.args[1], node)


def tensor_attributes(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers and plain tensor attributes (GraphModule constants) by dotted name.
    Parameters are left out: a cache is never a parameter."""
    out = {}
    for prefix, mod in module.named_modules(remove_duplicate=False):
        prefix = f"{prefix}." if prefix else ""
        for k, v in buffer_slots(mod).items():
            if v is not None:
                out[prefix + k] = v
        for k, v in vars(mod).items():
            if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
                out.setdefault(prefix + k, v)
    return out


def view_key(t: torch.Tensor) -> tuple | None:
    """What makes two tensors the same view of the same memory; None where there is no
    memory to share (zero-size and meta tensors all have storage pointer 0)."""
    ptr = t.untyped_storage().data_ptr()
    if ptr == 0:
        return None
    return (t.device, ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def unify_aliases(module: torch.nn.Module) -> int:
    """Make tensors that are the same view of the same storage one object (the first by
    name), parameters among themselves and the other tensor attributes among
    themselves; returns how many were rebound.

    A program exported from a model holds its KV cache twice, as a buffer and as a
    lifted constant, and the two are one object; tied weights (an LM head that is the
    embedding) are one parameter under two names. Read back from a file each is two
    objects over one storage, and so are tied weights after torch.export's
    move_to_device_pass, which wraps each parameter anew (the KV cache's two forms share
    a storage on the device only because loaded._move_shared moves them first). Dynamo
    lifts one graph input per object, and of aliased parameters it keeps the last name,
    not the first, so these forms lower to other graphs with other Inductor cache keys,
    and a load would miss the kernel cache the compile recorded
    (codegen/kernel_cache.py). Rebinding a view to an equal view of the same memory
    changes nothing the program computes."""
    def unify(named, rebind) -> int:
        first: dict = {}
        rebound = 0
        for name, t in named:
            key = view_key(t)
            keep = first.setdefault(key, t) if key is not None else t
            if keep is not t:
                rebind(name, keep)
                rebound += 1
        return rebound

    def set_parameter(name: str, value: torch.nn.Parameter) -> None:
        owner, leaf = _owner(module, name)
        setattr(owner, leaf, value)

    return (unify(tensor_attributes(module).items(), lambda n, t: set_tensor_attribute(module, n, t))
            + unify(module.named_parameters(remove_duplicate=False), set_parameter))


def _owner(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    """(the submodule holding the dotted attribute `name`, the attribute's own name)."""
    owner_name, _, leaf = name.rpartition(".")
    return (module.get_submodule(owner_name) if owner_name else module), leaf


def set_tensor_attribute(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    """Rebind the tensor attribute `name` (dotted) of `module`: a buffer keeps its slot, a
    GraphModule constant is a plain attribute; nn.Module's checks are bypassed."""
    set_tensor_attr(*_owner(module, name), value)


def with_calls_replaced(gm: fx.GraphModule, calls, op) -> tuple[fx.GraphModule, int]:
    """A copy of `gm` (sharing its parameters) in which each node that `calls(graph)`
    returns, as (node, args) or (node, args, kwargs), is replaced by `op(*args, **kwargs)`
    with the node's metadata; and how many were replaced. `gm` itself, unchanged, when
    there are none. `op` is an operator, or a function that returns one, called only when
    there is something to replace (optc's ops register with their kernels, and importing
    those fixes Triton's interpreter mode for the process). The lowering's rewrites use it:
    the program stays as captured, so the check compares against it. A replaced node must
    not be an argument of another one (the arguments are read before anything is replaced)."""
    found = calls(gm.graph)  # one scan, of the program's graph; the copy's nodes by name
    if not found:
        return gm, 0
    if not isinstance(op, OpOverload):
        op = op()
    graph = copy.deepcopy(gm.graph)  # keeps the graph's codegen (its input and output trees)
    copied = {n.name: n for n in graph.nodes}
    for node, args, *kwargs in found:
        node = copied[node.name]
        with graph.inserting_before(node):
            new = graph.call_function(op, *fx.map_arg((tuple(args), kwargs[0] if kwargs else {}),
                                                      lambda a: copied[a.name]))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    rewritten = fx.GraphModule(gm, graph)
    rewritten.meta.update(gm.meta)
    return rewritten, len(found)
