"""Finds a transformer's structure in a captured graph.

This is the single place in optc that knows what a transformer looks like; passes ask
it instead of pattern-matching on their own. It reads only the graph: the
`nn_module_stack` metadata torch.export keeps on every call node, the aten ops, the
tensor metadata (`meta["val"]`) and the data flow (through a networkx view).

Recognised: residual blocks (pre-norm as in Llama/ViT, post-norm as in BERT), each
attention (q/k/v/o projections, or one fused q/k/v projection as in Phi-3; head count,
KV groups, the SDPA node and its KV-cache writes), each MLP (gated or not, its
activation), norms, embeddings and the head.
A graph it cannot read yields an empty Anatomy with the reason, never an exception.
"""

from __future__ import annotations

import re

import networkx as nx
import torch
import torch.fx as fx

from optc.compiler.anatomy_types import MLP, Anatomy, Attention, Block, Linear
from optc.compiler.gqa import GROUPED_QUERY, kv_sources
from optc.compiler.residual_walk import Walk
from optc.compiler.rewrite import node_shape

__all__ = ["analyze", "module_path", "Anatomy", "Attention", "Block", "Linear", "MLP"]

aten = torch.ops.aten
_LINEAR = {aten.linear.default}
_SDPA = {aten.scaled_dot_product_attention.default}
_CACHE_WRITE = {aten.index_copy_.default, aten.index_put_.default, aten.copy_.default}
_NORM = {aten.layer_norm.default, aten.rms_norm.default}
ACTIVATIONS = {
    aten.silu.default: "silu",
    aten.gelu.default: "gelu",
    aten.relu.default: "relu",
    aten.sigmoid.default: "sigmoid",
    aten.tanh.default: "tanh",
}


class _Unreadable(Exception):
    """Raised inside analysis when the graph does not look like a transformer."""


def module_path(node: fx.Node) -> str:
    """The innermost module path of a node ('' for top-level or missing metadata)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _normalise(path)


def _normalise(path: str) -> str:
    # torch.export writes "model.layers.0" (or "L__self__.model..."); Dynamo graphs
    # re-exported by the torch.compile backend carry "L['self'].model.layers.0".
    return re.sub(r"^(L__self__|L\['self'\])\.?", "", path)


def _stack_paths(node: fx.Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [_normalise(v[0]) for v in stack.values()]


def _in_scope(node: fx.Node, scope: str) -> bool:
    return any(p == scope for p in _stack_paths(node))


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    # Compared as text: symbolic sizes (dynamic batch or sequence) must not be
    # evaluated here, where no shape environment holds them.
    sa, sb = node_shape(a), node_shape(b)
    return sa is not None and sb is not None and tuple(map(str, sa)) == tuple(map(str, sb))


def analyze(gm: fx.GraphModule) -> Anatomy:
    """Recognise the transformer structure of `gm`; never raises on odd graphs."""
    try:
        return _analyze(gm)
    except _Unreadable as exc:
        return Anatomy(reason=str(exc))


def _analyze(gm: fx.GraphModule) -> Anatomy:
    graph = gm.graph
    sdpas = [n for n in graph.nodes if n.op == "call_function" and n.target in _SDPA]
    linears = [_linear(n) for n in graph.nodes if n.op == "call_function" and n.target in _LINEAR]
    linears = [lin for lin in linears if lin is not None]
    anatomy = Anatomy(
        embeddings=sorted({module_path(n) for n in graph.nodes if n.target == aten.embedding.default}),
        norms=sorted({module_path(n) for n in graph.nodes if n.target in _NORM} | _rmsnorm_paths(graph)),
    )
    if not sdpas:
        anatomy.reason = (
            "no scaled_dot_product_attention node in the graph; optc recognises attention "
            "through SDPA (Hugging Face models: attn_implementation='sdpa')"
        )
        return anatomy
    walk = Walk(graph)
    dag = walk.dag
    blocks = []
    for i, (block_path, sdpa) in enumerate(_block_paths(graph, sdpas, linears)):
        block_linears = [lin for lin in linears if lin.path.startswith(block_path + ".")]
        attention = None
        if sdpa is not None:
            attention = _attention(_child_of(block_path, module_path(sdpa)), sdpa, block_linears, graph, dag)
        rest = [lin for lin in block_linears if attention is None or not lin.path.startswith(attention.path + ".")]
        mlp = _mlp(block_path, rest, dag) if rest else None
        parallel = _parallel(attention, mlp, dag)
        inp, mid, out = _residual_points(block_path, attention, mlp, walk, parallel)
        blocks.append(Block(i, block_path, attention, mlp, inp, mid, out, parallel=parallel))
    anatomy.blocks = blocks
    last = blocks[-1].output
    after = [lin for lin in linears if not any(lin.path.startswith(b.path + ".") for b in blocks)]
    after = [lin for lin in after if nx.has_path(dag, last, lin.node)]
    anatomy.head = after[-1] if after else None
    anatomy.prefix_tokens = _prefix_tokens(blocks[0].input, walk)
    return anatomy


def _prefix_tokens(stream: fx.Node, walk: Walk) -> int:
    """How many tokens computed from parameters alone (class, distillation, register
    tokens) the latest concatenation along the token dimension before the first block
    puts in front of the data's tokens; 0 when there is none (text encoders)."""
    cat = walk.latest_ancestor(stream, _token_concatenation)
    if cat is None:
        return 0
    count = 0
    for part in cat.args[0]:
        if any(a.op == "placeholder" for a in nx.ancestors(walk.dag, part)) or node_shape(part) is None:
            break
        count += int(node_shape(part)[1])
    return count


def _token_concatenation(node: fx.Node) -> bool:
    """A concatenation of [batch, tokens, hidden] parts along the token dimension."""
    if node.target != aten.cat.default:
        return False
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    shape = node_shape(node)
    return shape is not None and len(shape) == 3 and dim in (1, -2)


def _block_paths(graph: fx.Graph, sdpas: list, linears: list[Linear]) -> list[tuple[str, fx.Node | None]]:
    """(block path, its SDPA or None) in graph order. A block is an indexed module
    holding an attention; after skip_layers removed an attention half, its sibling
    (layers.3 beside layers.2) holding only MLP linears is a block too."""
    by_path: dict[str, fx.Node | None] = {}
    for sdpa in sdpas:
        path = _block_path(sdpa)
        if path is None:
            raise _Unreadable(f"attention node {sdpa.name} is not inside an indexed block (e.g. layers.3)")
        if path in by_path:
            raise _Unreadable(f"block {path} holds two attentions (cross-attention); such blocks are not recognised")
        by_path[path] = sdpa
    lists = {path.rpartition(".")[0] for path in by_path}
    first_seen = {path: sdpa for path, sdpa in by_path.items()}
    for lin in linears:
        for path in _stack_paths(lin.node):
            parent, _, index = path.rpartition(".")
            if parent in lists and index.isdigit() and path not in by_path:
                by_path[path] = None
                first_seen[path] = lin.node
    order = {n: i for i, n in enumerate(graph.nodes)}
    return sorted(by_path.items(), key=lambda item: order[first_seen[item[0]]])


def _rmsnorm_paths(graph: fx.Graph) -> set[str]:
    # Hugging Face RMSNorm is decomposed (pow, mean, rsqrt); find it by module name.
    return {
        module_path(n)
        for n in graph.nodes
        if n.op == "call_function" and re.search(r"norm", module_path(n).split(".")[-1], re.I)
    }


def _linear(node: fx.Node) -> Linear | None:
    weight = node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    shape = node_shape(weight)
    if shape is None or len(shape) != 2:
        return None
    return Linear(
        path=module_path(node),
        node=node,
        weight=weight.target,
        bias=bias.target if isinstance(bias, fx.Node) and bias.op == "get_attr" else None,
        in_features=shape[1],
        out_features=shape[0],
    )


def _block_path(node: fx.Node) -> str | None:
    """The deepest enclosing module whose name is an index into a list (layers.3)."""
    for path in reversed(_stack_paths(node)):
        if re.search(r"\.\d+$", path):
            return path
    return None


def _child_of(parent: str, path: str) -> str:
    rest = path[len(parent) + 1 :].split(".")
    return f"{parent}.{rest[0]}"


_ROLE_NAMES = {
    "q": ("q_proj", "query", "q", "wq", "q_lin"),  # q_lin...out_lin: DistilBERT
    "k": ("k_proj", "key", "k", "wk", "k_lin"),
    "v": ("v_proj", "value", "v", "wv", "v_lin"),
    "o": ("o_proj", "out_proj", "dense", "o", "wo", "c_proj", "out_lin"),
}
_FUSED_QKV_NAMES = ("qkv_proj", "query_key_value", "Wqkv", "qkv", "wqkv", "c_attn")


def _named(inside: list[Linear], names: tuple) -> list[Linear]:
    return [lin for lin in inside if lin.path.split(".")[-1] in names]


def _roles(path: str, sdpa: fx.Node, inside: list[Linear], dag: nx.DiGraph) -> dict:
    """{q, k, v, o: Linear}: separate projections, or one fused projection feeding SDPA's
    query, key and value (all three roles then name the same Linear)."""
    roles = {}
    fused = _named(inside, _FUSED_QKV_NAMES)
    separate = all(len(_named(inside, _ROLE_NAMES[r])) == 1 for r in "qkv")
    if not separate and len(fused) == 1:
        qkv = fused[0]
        if not all(nx.has_path(dag, qkv.node, arg) for arg in sdpa.args[:3]):
            raise _Unreadable(f"attention {path}: {qkv.path} does not feed the query, key and value")
        roles = {"q": qkv, "k": qkv, "v": qkv}
    for role in ("o",) if roles else ("q", "k", "v", "o"):
        found = _named(inside, _ROLE_NAMES[role])
        if len(found) != 1:
            raise _Unreadable(f"attention {path}: cannot tell the {role} projection among {[x.path for x in inside]}")
        roles[role] = found[0]
    return roles


def _attention(path: str, sdpa: fx.Node, linears: list[Linear], graph: fx.Graph, dag: nx.DiGraph) -> Attention:
    inside = [lin for lin in linears if lin.path.startswith(path + ".")]
    roles = _roles(path, sdpa, inside, dag)
    q_shape = node_shape(sdpa.args[0])
    if q_shape is None or len(q_shape) != 4:
        raise _Unreadable(f"attention {path}: SDPA query has no 4-d shape metadata")
    num_heads, head_dim = q_shape[1], q_shape[3]
    if isinstance(num_heads, torch.SymInt) or isinstance(head_dim, torch.SymInt):
        raise _Unreadable(f"attention {path}: head count or head size is symbolic")
    if sdpa.meta.get(GROUPED_QUERY):
        # share_kv_heads folded the G query heads of each KV head into the query axis
        # of this one-token attention: [B, KV, G, D].
        num_heads = q_shape[1] * q_shape[2]
    if roles["q"] is roles["k"]:  # fused: H query heads, then KV key and KV value heads
        kv_dims = roles["q"].out_features - int(num_heads) * int(head_dim)
        if kv_dims <= 0 or kv_dims % (2 * int(head_dim)):
            raise _Unreadable(f"attention {path}: {roles['q'].path} has {roles['q'].out_features} outputs, "
                              f"not {num_heads} query heads plus key and value heads of {head_dim}")
        num_kv_heads = kv_dims // (2 * int(head_dim))
    else:
        num_kv_heads = roles["k"].out_features // int(head_dim)
    cache_writes = [
        n
        for n in graph.nodes
        if n.op == "call_function" and n.target in _CACHE_WRITE and _in_scope(n, path)
    ]
    return Attention(
        path=path,
        num_heads=int(num_heads),
        num_kv_heads=num_kv_heads,
        head_dim=int(head_dim),
        sdpa=sdpa,
        cache_writes=cache_writes,
        kv_sources=kv_sources(sdpa, int(num_heads), num_kv_heads),
        **roles,
    )


def _mlp(block: str, rest: list[Linear], dag: nx.DiGraph) -> MLP:
    """The MLP among a block's linears other than the attention's."""
    if len(rest) not in (2, 3):
        raise _Unreadable(f"block {block}: expected 2 or 3 MLP linears, found {[x.path for x in rest]}")
    # The down projection is the one fed by the others.
    downs = [lin for lin in rest if all(o is lin or nx.has_path(dag, o.node, lin.node) for o in rest)]
    if len(downs) != 1:
        raise _Unreadable(f"block {block}: cannot tell the MLP down projection")
    down = downs[0]
    ups = [lin for lin in rest if lin is not down]
    acts = {}
    for lin in ups:
        act = _activation_after(lin.node, down.node)
        if act is not None:
            acts[id(lin)] = act
    if len(ups) == 1:
        act = acts.get(id(ups[0]))
        return MLP(up=ups[0], down=down, gate=None, activation=act[1] if act else "none", act_node=act[0] if act else None)
    gates = [lin for lin in ups if id(lin) in acts]
    if len(gates) != 1:
        raise _Unreadable(f"block {block}: gated MLP without exactly one activated branch")
    gate = gates[0]
    up = next(lin for lin in ups if lin is not gate)
    act_node, act_name = acts[id(gate)]
    return MLP(up=up, down=down, gate=gate, activation=act_name, act_node=act_node)


def _activation_after(start: fx.Node, stop: fx.Node):
    """The first activation op on the single-user chain from `start` (before `stop`)."""
    node = start
    for _ in range(8):
        if node.op == "call_function" and node.target in ACTIVATIONS:
            return node, ACTIVATIONS[node.target]
        users = list(node.users)
        if len(users) != 1 or users[0] is stop:
            return None
        node = users[0]
    return None


def _parallel(attention: Attention | None, mlp: MLP | None, dag: nx.DiGraph) -> bool:
    """Attention and MLP side by side on the block's input (GPT-NeoX, Phi-2):
    the MLP does not read the attention's output."""
    return attention is not None and mlp is not None and not nx.has_path(dag, attention.o.node, mlp.linears[0].node)


def _residual_points(block: str, attention: Attention | None, mlp: MLP | None, walk: Walk,
                     parallel: bool = False):
    """The residual stream at the block's input, between its sub-blocks and at its output
    (a block left with one half has mid == output, or input == mid; a parallel block's
    halves both end at its output, so mid == output).

    After a sub-block's last projection, every path to the graph output passes through
    a chain of post-dominators (the residual add, a post-norm, dtype casts). The stream
    point is the latest of them still inside the block and still feeding what comes
    next; found with networkx's dominator analysis rather than by matching op names.
    """
    mid = out = None
    if attention is not None and not parallel:
        mid = _stream_point(block, attention.o.node, walk, feeds=mlp.linears[0].node if mlp else None)
    if mlp is not None:
        out = _stream_point(block, mlp.down.node, walk, feeds=None)
    if parallel:
        if not nx.has_path(walk.dag, attention.o.node, out):
            raise _Unreadable(f"block {block}: attention and MLP side by side, but the attention's output does "
                              "not reach the block's output")
        mid = out
    first_in = (attention.q if attention is not None else mlp.linears[0]).node.args[0]
    ref = mid if mid is not None else out
    # The stream entering is the latest node before the block with the stream's shape.
    inp = walk.latest_ancestor(first_in, lambda n: not _in_scope(n, block) and _same_shape(n, ref))
    if inp is None:
        raise _Unreadable(f"block {block}: cannot find the residual stream entering it")
    return inp, mid if mid is not None else inp, out if out is not None else mid


def _stream_point(block, start, walk: Walk, feeds):
    if start not in walk.post_dominator:  # e.g. a block whose output a pass routed around
        raise _Unreadable(f"block {block}: {start.name} does not reach the program's output")
    chain, node = [], start  # the nodes every path from start to the output passes, in order
    while node is not walk.sink:
        node = walk.post_dominator[node]
        chain.append(node)
    best = None
    for node in chain:
        if not _in_scope(node, block):
            break
        if feeds is not None and not nx.has_path(walk.dag, node, feeds):
            break
        if _same_shape(node, start):
            best = node
    if best is None:
        raise _Unreadable(f"block {block}: no residual point after {start.name}")
    return best
