"""drop_constant_masks: an SDPA mask computed from constants that keeps every score (ViT's
`arange >= 0`) is dropped in the graph the target lowers; a mask that reads an input
(BERT's padding mask) or that masks something stays; the function is unchanged."""

import dataclasses

import torch

from optc.compiler import capture, targets
from optc.compiler.codegen import lowering
from optc.compiler.codegen.constant_masks import drop_constant_masks, without_constant_factor

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default


def _masks(gm) -> list:
    return [n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None)
            for n in gm.graph.find_nodes(op="call_function", target=SDPA)]


def test_vits_mask_is_dropped_and_the_function_kept(vit_captured):
    _, captured = vit_captured
    gm = capture.graph_module(captured.programs["forward"])
    assert all(isinstance(m, torch.fx.Node) for m in _masks(gm))
    dropped, count = drop_constant_masks(gm)
    assert count == len(_masks(gm)) == 3 and _masks(dropped) == [None] * 3
    assert all(isinstance(m, torch.fx.Node) for m in _masks(gm))  # the program itself keeps them
    # The mask's own nodes are gone from the copy (dead once no SDPA reads them).
    assert len(dropped.graph.nodes) < len(gm.graph.nodes)
    args = captured.example_inputs["forward"]
    torch.testing.assert_close(dropped(*args[0], **args[1]), gm(*args[0], **args[1]), rtol=1e-5, atol=1e-5)


def test_a_mask_that_reads_an_input_stays(bert_captured, llama_captured):
    _, captured = bert_captured
    gm = capture.graph_module(captured.programs["forward"])
    assert _masks(gm) and drop_constant_masks(gm) == (gm, 0)
    _, lm = llama_captured  # a decoder's causal masks read cache_position
    for name in ("prefill", "decode"):
        gm = capture.graph_module(lm.programs[name])
        assert _masks(gm) and drop_constant_masks(gm) == (gm, 0), name


class _Attention(torch.nn.Module):
    def __init__(self, keep_all: bool):
        super().__init__()
        self.keep_all = keep_all

    def forward(self, q):
        n = q.shape[-2]
        i = torch.arange(n, device=q.device)
        # all true, or causal (masks the upper triangle), from constants alone
        mask = (i[None, :] >= 0) if self.keep_all else (i[None, :] <= i[:, None])
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask.expand(n, n))


def test_only_a_mask_that_keeps_everything_goes():
    q = torch.randn(1, 2, 6, 8)
    for keep_all, expected in ((True, 1), (False, 0)):
        gm = torch.export.export(_Attention(keep_all), (q,)).module()
        dropped, count = drop_constant_masks(gm)
        assert count == expected
        torch.testing.assert_close(dropped(q), gm(q))


class _Additive(torch.nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.register_buffer("zeros", torch.zeros(6, 6))

    def forward(self, q):
        n = q.shape[-2]
        if self.how == "buffer":  # all zero, but a buffer may be written: never evaluated
            mask = self.zeros
        elif self.how == "random":
            mask = torch.rand(n, n) * 0
        elif self.how == "uninitialised":
            mask = torch.empty(n, n) * 0
        else:  # an additive mask from constants: all zero, or -1 somewhere
            mask = torch.zeros(n, n) - (torch.arange(n)[None, :] > (n if self.how == "zeros" else 2)).float()
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask)


def test_additive_masks_and_what_is_never_evaluated():
    q = torch.randn(1, 2, 6, 8)
    for how, expected in (("zeros", 1), ("masks", 0), ("buffer", 0), ("random", 0), ("uninitialised", 0)):
        gm = torch.export.export(_Additive(how), (q,)).module()
        dropped, count = drop_constant_masks(gm)
        assert count == expected, how
        if how in ("zeros", "masks"):
            torch.testing.assert_close(dropped(q), gm(q))


class _Padded(torch.nn.Module):
    """A padding mask anded with a factor from constants, as transformers 5 builds BERT's."""

    def __init__(self, factor: str):
        super().__init__()
        self.factor = factor

    def forward(self, q, keys):
        n = q.shape[-2]
        i = torch.arange(n)
        rows = {"all true": i >= 0, "masks a row": i >= 1}[self.factor] if self.factor != "input" else keys[0] > 0
        mask = (keys[:, None, None, :] > 0) & rows[None, None, :, None]
        return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask.expand(2, 1, n, n))


def test_a_factor_that_keeps_every_score_is_left_out_of_a_mask():
    q, keys = torch.randn(2, 2, 6, 8), torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    for factor, narrowed in (("all true", True), ("masks a row", False), ("input", False)):
        gm = torch.export.export(_Padded(factor), (q, keys)).module()
        sdpa = next(iter(gm.graph.find_nodes(op="call_function", target=SDPA)))
        mask = sdpa.kwargs.get("attn_mask", sdpa.args[3] if len(sdpa.args) > 3 else None)
        kept = without_constant_factor(mask, (2, 2, 6, 6))
        assert (kept is not mask) == narrowed, factor
        if narrowed:  # the padding row alone: the same mask once broadcast to the scores
            assert tuple(kept.meta["val"].shape) == (2, 1, 1, 6)
        assert without_constant_factor(mask, (2, 2, 6, 7)) is mask  # a mask that does not fit those scores


def test_targets_drop_them_unless_switched_off(vit_captured):
    _, captured = vit_captured
    gm = capture.graph_module(captured.programs["forward"])
    cpu = targets.get("cpu")
    assert _masks(lowering.target_graph(gm, cpu, forward=True)) == [None] * 3
    kept = dataclasses.replace(cpu, drop_constant_masks=False, patch_gemm=False)  # no other rewrite either
    assert lowering.target_graph(gm, kept, forward=True) is gm
    assert not targets.with_overrides(cpu, ["drop_constant_masks=false"]).drop_constant_masks


def test_the_lowering_without_the_mask_passes_its_check(vit_captured):
    """Inductor (CPU) lowers tiny-vit without its mask and the check against the
    program, which keeps the mask, passes."""
    _, captured = vit_captured
    result = lowering.lower_and_verify(captured.programs["forward"], captured.example_inputs["forward"],
                                       targets.get("cpu"), "forward")
    assert result["ok"], result
    assert lowering.lowering_record(targets.get("cpu"))["drop_constant_masks"] is True
