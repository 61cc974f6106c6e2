"""The decode program's lowering check starts from the state its prefill leaves after a
random prompt (lowering.prefilled_state), so it reads a filled KV cache: a lowering that
ignores the cache's contents is caught, which a check from a zeroed cache cannot see."""

import pytest
import torch

from optc.compiler import capture as cap
from optc.compiler.codegen import lowering
from optc.compiler.session import CompileSession
from optc.errors import CompileError, InternalError
from optc.models import zoo


@pytest.fixture(scope="module")
def decoder():
    entry = zoo.get("tiny-llama")
    session = CompileSession(entry.load(), entry.example_inputs(), target="cpu", entry=entry, log=lambda m: None)
    programs = session.run(session.resolve()).programs
    start = lowering.decode_start(programs, session.captured.example_inputs)
    decode = programs[cap.DECODE]
    return decode, cap.graph_module(decode), session.captured.example_inputs[cap.DECODE], start


def test_the_start_state_is_a_prefilled_cache(decoder):
    _, _, _, start = decoder
    state = start(0)
    keys = [t for name, t in state.items() if cap.KEY_CACHE_BUFFER.search(name)]
    lengths = [t for name, t in state.items() if cap.LENGTH_BUFFER.search(name)]
    assert keys and lengths
    filled = cap.PREFILL_LEN
    assert all(bool(k[..., :filled, :].abs().sum(-1).gt(0).all()) for k in keys)  # every prompt position written
    assert all(not bool(k[..., filled:, :].any()) for k in keys)  # and nothing after it
    assert all(int(n.flatten()[0]) == filled for n in lengths)
    first_key = next(name for name in state if cap.KEY_CACHE_BUFFER.search(name))
    assert not torch.equal(state[first_key], start(1)[first_key])  # another seed, another prompt


def test_a_faithful_decode_lowering_passes_from_the_prefilled_cache(decoder):
    ep, gm, inputs, start = decoder
    result = lowering.verify(ep, lambda *a, **k: gm(*a, **k), gm, inputs, start_state=start)
    assert result["ok"] and result["start_state"] == "prefilled"
    assert not any(bool(b.any()) for n, b in gm.named_buffers() if cap.is_state_buffer(n))  # left zeroed


def test_a_cache_the_state_lacks_starts_zeroed_and_one_of_another_shape_is_refused(decoder):
    """As a loaded decoder ties the two programs' caches by name: one the prefill lacks is
    never written before decode, so it starts zeroed; a same-named one of another shape
    means a pass narrowed the two programs differently."""
    _, gm, _, start = decoder
    state = start(0)
    first = next(name for name in state if cap.KEY_CACHE_BUFFER.search(name))
    lowering.reset_state(gm, {k: v for k, v in state.items() if k != first})
    buffers = dict(gm.named_buffers())
    assert not bool(buffers[first].any())
    assert any(bool(buffers[k].any()) for k in state if k != first)
    with pytest.raises(InternalError, match="the prefill and decode programs' caches differ"):
        lowering.reset_state(gm, {**state, first: state[first][..., :-1]})
    lowering.reset_state(gm)


def test_a_lowering_that_ignores_the_cache_is_caught(decoder):
    ep, gm, inputs, start = decoder

    def blind(*args, **kwargs):  # reads a zeroed cache whatever the prefill wrote
        lowering.reset_state(gm)
        return gm(*args, **kwargs)

    assert lowering.verify(ep, blind, gm, inputs)["ok"]  # from a zeroed cache it cannot be told apart
    with pytest.raises(CompileError, match="lowering changed the function"):
        lowering.verify(ep, blind, gm, inputs, start_state=start)
