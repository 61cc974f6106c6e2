"""A loaded artifact holds one copy of each weight its prefill and decode programs share:
the file stores it once (runtime/shared_weights.py), and placing the programs on a device
keeps one."""

import pytest
import torch

import optc
from optc.models import zoo


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    entry = zoo.get("tiny-llama")
    art = optc.compile(entry.load(), entry.example_inputs(), target="cpu", entry=entry, log=lambda msg: None,
                       verify=False)
    path = tmp_path_factory.mktemp("art") / "tiny.optc"
    art.save(path)
    prompt = entry.example_inputs()[0][:, :8]
    return path, prompt, art.generate(prompt, 6, compiled=False)


def _weights(module):
    return {n: t for n, t in [*module.named_parameters(), *module.named_buffers()] if "cache" not in n}


def test_programs_share_their_common_weights_and_decode_as_before(saved):
    path, prompt, expected = saved
    art = optc.load(path)
    read = {name: dict(ep.state_dict) for name, ep in art.programs.items()}
    # As read from disk, the two programs hold one tensor per weight (the KV cache apart).
    common = set(read["prefill"]) & set(read["decode"])
    weights = {n for n in common if "cache" not in n}
    assert weights and all(read["prefill"][n] is read["decode"][n] for n in weights)
    assert all(read["prefill"][n].data_ptr() != read["decode"][n].data_ptr() for n in common - weights)

    prefill = _weights(art.module("prefill", compiled=False))
    decode = _weights(art.module("decode", compiled=False))
    shared = [n for n in set(prefill) & set(decode) if prefill[n].data_ptr() == decode[n].data_ptr()]
    assert len(shared) >= len([n for n in common if "cache" not in n]) > 0
    assert torch.equal(art.generate(prompt, 6, compiled=False), expected)


def test_a_weight_that_differs_between_programs_is_not_shared(saved):
    path, _, _ = saved
    art = optc.load(path)
    name = next(n for n in art.programs["decode"].state_dict if n.endswith("weight") and "norm" not in n)
    with torch.no_grad():  # as a pass that rewrote one program's copy would leave it
        art.programs["decode"].state_dict[name] = torch.nn.Parameter(
            art.programs["decode"].state_dict[name] + 1, requires_grad=False)
    prefill = _weights(art.module("prefill", compiled=False))
    decode = _weights(art.module("decode", compiled=False))
    assert prefill[name].data_ptr() != decode[name].data_ptr()
    assert torch.equal(decode[name], prefill[name] + 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_the_programs_share_one_copy(saved):
    path, prompt, expected = saved
    art = optc.load(path)
    names = {n for n in set(art.programs["prefill"].state_dict) & set(art.programs["decode"].state_dict)
             if "cache" not in n}
    out = art.generate(prompt.cuda(), 6, compiled=False)
    prefill = _weights(art.module("prefill", device="cuda", compiled=False))
    decode = _weights(art.module("decode", device="cuda", compiled=False))
    assert names and all(prefill[n].data_ptr() == decode[n].data_ptr() for n in names & set(prefill))
    assert torch.equal(out.cpu(), expected)


def test_a_weight_both_programs_hold_as_read_is_placed_once(saved, monkeypatch):
    # Stored once, read as one tensor: placing the second program takes the first's copy
    # on the device without copying and comparing it again.
    from optc.runtime import loaded

    path, _, _ = saved
    art = optc.load(path)
    compared = []
    real = loaded._same_values
    monkeypatch.setattr(loaded, "_same_values", lambda a, b: compared.append(1) or real(a, b))
    prefill = dict(art.module("prefill", compiled=False).named_parameters())
    decode = dict(art.module("decode", compiled=False).named_parameters())
    assert compared == []
    common = set(prefill) & set(decode)
    assert common and all(prefill[n] is decode[n] for n in common)
