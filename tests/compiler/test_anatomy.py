import torch

from optc.compiler import anatomy, capture


def _analyze(captured, name):
    return anatomy.analyze(capture.graph_module(captured.programs[name]))


def test_llama_prefill_and_decode(llama_captured):
    _, captured = llama_captured
    for name in ("prefill", "decode"):
        a = _analyze(captured, name)
        assert a.reason is None and len(a.blocks) == 4
        b = a.blocks[2]
        assert b.path == "model.model.layers.2"
        att = b.attention
        assert (att.num_heads, att.num_kv_heads, att.head_dim) == (4, 2, 16)
        assert att.q.path.endswith("self_attn.q_proj") and att.o.path.endswith("self_attn.o_proj")
        assert len(att.cache_writes) == 2  # keys and values of the static cache
        assert b.mlp.gated and b.mlp.activation == "silu"
        assert b.mlp.gate.path.endswith("gate_proj") and b.mlp.down.path.endswith("down_proj")
        assert a.head.path.endswith("lm_head")
        assert a.embeddings == ["model.model.embed_tokens"]
        # The residual stream: block 2 starts where block 1 ends.
        assert a.blocks[2].input is a.blocks[1].output


def test_bert_post_norm_points(bert_captured):
    _, captured = bert_captured
    a = _analyze(captured, "forward")
    assert len(a.blocks) == 3
    b = a.blocks[1]
    assert not b.mlp.gated and b.mlp.activation == "gelu"
    assert b.attention.o.path.endswith("attention.output.dense")
    # Post-norm: the stream after each sub-block is its LayerNorm's output.
    assert b.mid.target == torch.ops.aten.layer_norm.default
    assert b.output.target == torch.ops.aten.layer_norm.default
    assert not b.attention.cache_writes


def test_vit(vit_captured):
    _, captured = vit_captured
    a = _analyze(captured, "forward")
    assert len(a.blocks) == 3 and a.head.path.endswith("classifier")
    assert a.blocks[0].attention.num_heads == 4


def test_unreadable_graph_gives_reason_not_crash():
    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.fc(x))

    captured = capture.capture(MLP(), (torch.randn(2, 4),))
    a = _analyze(captured, "forward")
    assert a.empty and "scaled_dot_product_attention" in a.reason
    assert a.summary()["n_blocks"] == 0
