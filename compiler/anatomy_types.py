"""The anatomy's data model: a transformer's residual blocks, their attention and MLP,
as compiler/anatomy.py finds them in a captured graph. Passes read these; only the
anatomy builds them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx


@dataclass
class Linear:
    path: str  # module path, e.g. "model.layers.3.mlp.down_proj"
    node: fx.Node
    weight: str  # get_attr target of the weight
    bias: str | None
    in_features: int
    out_features: int


@dataclass
class Attention:
    path: str
    q: Linear  # q, k and v are one Linear when the model fuses them (fused_qkv)
    k: Linear
    v: Linear
    o: Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sdpa: fx.Node
    cache_writes: list[fx.Node] = field(default_factory=list)
    # Grouped-query attention written as repeat_kv (Llama): the K and V tensors before
    # they were copied once per query head, (k, v); None when SDPA reads them as they are.
    kv_sources: tuple[fx.Node, fx.Node] | None = None

    @property
    def causal(self) -> bool:
        """Causal attention (is_causal, SDPA's sixth argument) or one writing a KV cache."""
        return bool(self.cache_writes or self.sdpa.kwargs.get("is_causal")
                    or (len(self.sdpa.args) > 5 and self.sdpa.args[5]))

    @property
    def fused_qkv(self) -> bool:
        """One projection computes q, k and v (Phi-3's qkv_proj), split after it."""
        return self.q is self.k

    @property
    def linears(self) -> list[Linear]:
        """Each projection once: q, k, v, o, or the fused qkv and o."""
        return [self.q, self.o] if self.fused_qkv else [self.q, self.k, self.v, self.o]


@dataclass
class MLP:
    up: Linear
    down: Linear
    gate: Linear | None  # gated MLPs (SwiGLU): act(gate(x)) * up(x)
    activation: str
    act_node: fx.Node | None  # the activation output (of the gate when gated)

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def linears(self) -> list[Linear]:
        return [lin for lin in (self.gate, self.up, self.down) if lin is not None]


@dataclass
class Block:
    """A residual block. The residual stream enters at `input`, is `mid` after the
    attention sub-block and `output` after the MLP sub-block: skipping a sub-block
    means routing the stream around it (uses of its end replaced by its start).
    After skip_layers removed one half, the other remains: `attention` or `mlp` is
    None, and mid == output (no MLP) or input == mid (no attention).

    A parallel block (GPT-NeoX, Phi-2, GPT-J) computes attention and MLP side by side
    from its input and adds both to the stream: its halves are not separable points of
    the stream, so mid == output and the block is removed or kept whole."""

    index: int
    path: str
    attention: Attention | None
    mlp: MLP | None
    input: fx.Node
    mid: fx.Node
    output: fx.Node
    parallel: bool = False

    @property
    def halves(self) -> list[str]:
        """The sub-blocks still present: 'attention', 'mlp' or both."""
        return [name for name in ("attention", "mlp") if getattr(self, name) is not None]


@dataclass
class Anatomy:
    blocks: list[Block] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    head: Linear | None = None
    reason: str | None = None  # why the anatomy is empty, if it is
    # Learned tokens concatenated in front of the sequence before the first block (a
    # ViT's class token, DeiT's distillation token): positions 0..prefix_tokens-1.
    prefix_tokens: int = 0

    @property
    def empty(self) -> bool:
        return not self.blocks

    @property
    def causal(self) -> bool:
        """Some block's attention is causal or writes a KV cache: a decoder."""
        return any(b.attention is not None and b.attention.causal for b in self.blocks)

    def summary(self) -> dict:
        """A JSON-able description (what `optc inspect` prints)."""
        out: dict = {"n_blocks": len(self.blocks), "reason": self.reason}
        out["embeddings"] = self.embeddings
        out["norms"] = len(self.norms)
        out["head"] = self.head.path if self.head else None
        out["prefix_tokens"] = self.prefix_tokens
        out["blocks"] = [
            {
                "index": b.index,
                "path": b.path,
                "parallel": b.parallel,
                "attention": None if b.attention is None else {
                    "path": b.attention.path,
                    "q": b.attention.q.path,
                    "k": b.attention.k.path,
                    "v": b.attention.v.path,
                    "o": b.attention.o.path,
                    "fused_qkv": b.attention.fused_qkv,
                    "heads": b.attention.num_heads,
                    "kv_heads": b.attention.num_kv_heads,
                    "head_dim": b.attention.head_dim,
                    "kv_cache": bool(b.attention.cache_writes),
                    "kv_repeated": b.attention.kv_sources is not None,
                },
                "mlp": None if b.mlp is None else {
                    "gated": b.mlp.gated,
                    "activation": b.mlp.activation,
                    "linears": [lin.path for lin in b.mlp.linears],
                    "hidden": b.mlp.up.out_features,
                },
            }
            for b in self.blocks
        ]
        return out
