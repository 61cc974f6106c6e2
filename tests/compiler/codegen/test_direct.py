"""Inductor without Dynamo on an exported program (codegen/direct.py): the same outputs
and in-place state writes as the uncompiled program, one compile per input signature,
the program's own input checks still run, and Dynamo traces nothing."""

import pytest
import torch
from torch._dynamo.utils import counters

from optc.compiler.codegen.direct import DirectLowering
from optc.compiler.codegen.lowering import lower
from optc.compiler.targets import get as get_target
from optc.compiler.torch_private import set_tensor_attr


class CacheWriter(torch.nn.Module):
    """A decode step in miniature: writes its input into a cache buffer at a position,
    and returns a function of the whole cache and a second output."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.register_buffer("cache", torch.zeros(4, 8))

    def forward(self, x, pos):
        self.cache.index_copy_(0, pos, self.proj(x))
        return {"out": self.cache.sum(0) * 2.0, "last": self.proj(x).relu()}


def _program():
    torch.manual_seed(0)
    model = CacheWriter()
    ep = torch.export.export(model, (torch.randn(1, 8), torch.tensor([0])))
    return ep.module(), ep.module()


def _frames():
    return sum(counters["frames"].values())


def test_direct_lowering_matches_the_program_and_writes_its_state():
    reference, program = _program()
    compiled = DirectLowering(program, {})
    before = _frames()
    for step in range(3):
        x, pos = torch.randn(1, 8), torch.tensor([step])
        want, got = reference(x, pos), compiled(x, pos)
        assert set(got) == {"out", "last"}
        torch.testing.assert_close(got["out"], want["out"])
        torch.testing.assert_close(got["last"], want["last"])
    torch.testing.assert_close(program.cache, reference.cache)  # the in-place writes landed
    assert program.cache.abs().sum() > 0
    assert _frames() == before, "Dynamo traced a frame"
    assert len(compiled._compiled) == 1


def test_one_compile_per_input_signature():
    _, program = _program()
    compiled = DirectLowering(program, {})
    compiled(torch.randn(1, 8), torch.tensor([0]))
    compiled(torch.randn(1, 8), torch.tensor([1]))
    assert len(compiled._compiled) == 1
    compiled(torch.randn(8, 1).t(), torch.tensor([2]))  # the same shape, other strides
    assert len(compiled._compiled) == 2
    with torch.no_grad():  # another grad mode: what it compiles differs
        out = compiled(torch.randn(1, 8), torch.tensor([3]))
    assert len(compiled._compiled) == 3 and not out["out"].requires_grad


def test_tensors_moved_or_tied_before_a_call_are_the_ones_it_uses():
    reference, program = _program()
    compiled = DirectLowering(program, {})
    compiled(torch.randn(1, 8), torch.tensor([0]))
    compiled.to(torch.float64)  # drops what was compiled for the float32 tensors
    x = torch.randn(1, 8, dtype=torch.float64)
    out = compiled(x, torch.tensor([1]))
    assert out["out"].dtype == torch.float64 and program.cache.dtype == torch.float64
    torch.testing.assert_close(program.cache[1], (x @ program.proj.weight.T + program.proj.bias)[0])

    _, fresh = _program()
    shared = torch.zeros(4, 8)
    compiled = DirectLowering(fresh, {})
    set_tensor_attr(fresh, "cache", shared)  # a tie made after lowering, before the first call
    compiled(torch.ones(1, 8), torch.tensor([2]))
    assert shared[2].abs().sum() > 0


def test_an_unknown_keyword_or_a_missing_input_gets_the_programs_own_error():
    _, program = _program()
    compiled = DirectLowering(program, {})
    with pytest.raises(ValueError):
        compiled(torch.randn(1, 8), torch.tensor([0]), z=1)
    with pytest.raises(ValueError):
        compiled(torch.randn(1, 8))


def test_the_programs_input_checks_still_run():
    _, program = _program()
    if not hasattr(program, "_guards_fn"):
        pytest.skip("this torch's unlifted programs carry no input checks")
    with pytest.raises(AssertionError, match="Guard failed"):
        DirectLowering(program, {})(torch.randn(2, 8), torch.tensor([0]))


def test_lower_takes_the_direct_path_on_the_cpu_and_state_dict_is_the_programs():
    _, program = _program()
    compiled = lower(program, get_target("cpu"))
    assert isinstance(compiled, DirectLowering)
    assert list(compiled.state_dict()) == ["gm." + k for k in program.state_dict()]
