"""lowering.verify on a thresholded program: judged with every threshold at one end
of its range (no rounding-level decision flips), thresholds restored afterwards, and a
lowering that ignores the thresholds is caught."""

import pytest
import torch

from optc.compiler.codegen import lowering
from optc.errors import CompileError


class Thresholded(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(8, 16, generator=g), requires_grad=False)
        self.register_buffer(lowering.THRESHOLD_BUFFER_PREFIX + "layer", torch.tensor([0.7]))

    def forward(self, x):
        t = getattr(self, lowering.THRESHOLD_BUFFER_PREFIX + "layer")
        return torch.nn.functional.linear(x * (x.abs() > t), self.weight)


def _verify(reference, candidate):
    ep = torch.export.export(reference, (torch.randn(2, 16),))
    return lowering.verify(ep, candidate, reference, ((torch.randn(2, 16),), {}))


def test_a_faithful_lowering_passes_and_the_thresholds_come_back():
    ref = Thresholded()
    result = _verify(ref, torch.compile(ref, backend="inductor", fullgraph=True))
    assert result["ok"] and set(result["regimes"]) == {"all_kept", "all_dropped"}
    assert max(result["regimes"].values()) <= result["tolerance"]
    assert "at_calibrated_thresholds_rel_err" in result
    assert torch.equal(lowering.threshold_buffers(ref)[0], torch.tensor([0.7]))


def test_a_lowering_that_bakes_in_the_threshold_is_caught():
    ref = Thresholded()
    frozen_t = 0.7  # a candidate that ignores the buffer: wrong once the threshold moves

    def candidate(x):
        return torch.nn.functional.linear(x * (x.abs() > frozen_t), ref.weight)

    with pytest.raises(CompileError, match="every threshold at one end of its range"):
        _verify(ref, candidate)
    assert torch.equal(lowering.threshold_buffers(ref)[0], torch.tensor([0.7]))


def test_optc_compile_verifies_a_thresholded_model_at_both_ends(tmp_path):
    """tiny-llama with TEAL through optc.compile: both programs lowered by Inductor and
    checked at every threshold's two ends, the calibrated-threshold error reported."""
    import optc
    from optc.models import zoo

    entry = zoo.get("tiny-llama")
    art = optc.compile(entry.load(), entry.example_inputs(), target="cpu", entry=entry, log=lambda msg: None,
                       passes={"sparsify_activations.method": "teal", "sparsify_activations.sparsity": 0.5})
    for name in ("prefill", "decode"):
        v = art.manifest["verification"][name]
        assert v["ok"] and set(v["regimes"]) == {"all_kept", "all_dropped"}
        assert v["at_calibrated_thresholds_rel_err"] >= 0
    # the decode step is checked from the cache its prefill leaves, as it runs in use
    assert art.manifest["verification"]["decode"]["start_state"] == "prefilled"
    assert art.manifest["verification"]["prefill"]["start_state"] == "zeroed"
