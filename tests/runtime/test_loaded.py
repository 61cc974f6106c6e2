"""Artifact in memory: the decoder is built once, and loading uses what the manifest
recorded."""

import pytest
import torch

import optc
from optc.compiler.codegen import lowering
from optc.models import zoo


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    entry = zoo.get("tiny-llama")
    art = optc.compile(entry.load(), entry.example_inputs(seq_len=8), target="cpu", pipeline_name="none",
                       max_cache_len=32, verify=False, log=lambda m: None)
    return art.save(tmp_path_factory.mktemp("art") / "tiny.optc")


def test_second_generate_reuses_the_decoder(saved, monkeypatch):
    from torch._dynamo.utils import counters

    lowered = []

    def lower(gm, target, **options):  # counted; dynamo without Inductor keeps the test short
        lowered.append(gm)
        return torch.compile(gm, backend="eager", fullgraph=True, dynamic=False)

    monkeypatch.setattr(lowering, "lower", lower)
    art = optc.load(saved)
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    first = art.generate(prompt, 4)
    assert len(lowered) == 2  # prefill and decode, once
    graphs = counters["stats"]["unique_graphs"]
    second = art.generate(prompt, 4)
    assert len(lowered) == 2 and counters["stats"]["unique_graphs"] == graphs  # nothing lowered nor traced again
    assert torch.equal(first, second)
    assert art.decoder() is art.decoder(device="cpu")
    assert art.decoder(compiled=False) is not art.decoder()  # the uncompiled one is its own
