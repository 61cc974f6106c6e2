"""lower(): the options it hands to torch.compile."""

import pytest
import torch

from optc.compiler import targets
from optc.compiler.codegen import lowering


@pytest.fixture
def captured(monkeypatch):
    seen = {}

    def fake_compile(gm, **kwargs):
        seen.update(kwargs)
        return gm

    monkeypatch.setattr(torch, "compile", fake_compile)
    return seen


@pytest.mark.parametrize("name", ["h100", "h200", "a100"])
def test_tuned_gpu_lowering_compiles_cold(captured, name):
    # Coordinate descent tuning is on for every GPU target, and a graph served from the
    # FX graph cache can come back without its tuned kernel configs.
    lowering.lower(torch.nn.Identity(), targets.get(name))
    assert captured["options"]["coordinate_descent_tuning"] is True
    assert captured["options"]["fx_graph_cache"] is False
    assert captured["options"]["triton.cudagraphs"] is False


def test_untuned_lowering_keeps_the_cache(captured):
    lowering.lower(torch.nn.Identity(), targets.get("cpu"))
    assert "fx_graph_cache" not in captured["options"]
    lowering.lower(torch.nn.Identity(), targets.get("cpu"), autotune=True)
    assert captured["options"]["fx_graph_cache"] is False
    assert captured["options"]["max_autotune"] is True


def test_targets_stay_unchanged(captured):
    before = dict(targets.get("h100").inductor)
    lowering.lower(torch.nn.Identity(), targets.get("h100"), autotune=True)
    assert targets.get("h100").inductor == before


def test_a_tuned_lowering_from_the_kernel_cache_keeps_its_tuning(captured, monkeypatch):
    # Only a lowering that both tunes and reads the FX graph cache needs torch_fixes'
    # backport (a cache hit would otherwise tune its kernels again).
    # Every tuned lowering keeps the mark on configurations that cross a pickle.
    calls, pickles = [], []
    monkeypatch.setattr(lowering, "static_autotuner_keeps_coordesc", lambda: calls.append(1) or True)
    monkeypatch.setattr(lowering, "config_pickles_keep_coordesc", lambda: pickles.append(1) or True)
    lowering.lower(torch.nn.Identity(), targets.get("h200"))
    assert calls == [] and pickles == [1]
    lowering.lower(torch.nn.Identity(), targets.get("cpu"), kernel_cache=True)
    assert calls == [] and pickles == [1]
    lowering.lower(torch.nn.Identity(), targets.get("h200"), kernel_cache=True)
    assert calls == [1] and pickles == [1, 1] and captured["options"]["fx_graph_cache"] is True


def test_every_tuned_lowering_keeps_a_stored_choice(captured, monkeypatch):
    # A cold compile after --tuning-from (or on a machine that tuned the kernel before)
    # keeps the configuration in the autotune cache instead of timing it against others.
    kept = []
    monkeypatch.setattr(lowering, "cached_choice_not_tuned_again", lambda: kept.append(1) or True)
    lowering.lower(torch.nn.Identity(), targets.get("cpu"))
    assert kept == []
    lowering.lower(torch.nn.Identity(), targets.get("h100"))
    assert kept == [1] and captured["options"]["fx_graph_cache"] is False
    lowering.lower(torch.nn.Identity(), targets.get("h100"), kernel_cache=True)
    assert kept == [1, 1]
