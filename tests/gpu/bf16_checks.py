"""What the tests of tests/gpu share: the skip without CUDA, the `launched` fixture, and
comparisons for bf16 kernel outputs against fp64 references of the same bf16 inputs.

Why these tolerances: bf16 keeps 8 significant bits, so rounding one value costs up to
2**-9 (about 2e-3) of it. The kernels accumulate in fp32 and round once on the way out
(split-K partials are summed in fp32 first), so an output's error is about one bf16
rounding; the norm-relative error of a whole output stays near 2e-3. BF16_REL = 1e-2
leaves room for that and for an intermediate bf16 rounding (CATS rounds h), while a
wrong channel, row or tile costs far more than 1e-2 at these sizes."""

import os

import pytest
import torch

BF16_REL = 1e-2


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_bf16_close(y: torch.Tensor, ref: torch.Tensor, rel: float = BF16_REL) -> None:
    """y (bf16, CUDA) against an fp64 reference: finite, norm-relative error under rel,
    and no single element off by more than 4 bf16 roundings of the largest output."""
    assert y.dtype == torch.bfloat16 and y.is_cuda, (y.dtype, y.device)
    assert y.shape == ref.shape, (tuple(y.shape), tuple(ref.shape))
    assert torch.isfinite(y).all()
    if ref.norm() == 0:
        assert torch.equal(y, torch.zeros_like(y))
        return
    assert rel_err(y, ref) < rel, rel_err(y, ref)
    worst = (y.double() - ref.double()).abs().max().item()
    assert worst <= 4 * 2**-9 * ref.abs().max().item(), worst


# -- fixtures (each test module imports them: a tests/gpu/conftest.py would shadow the
# `from conftest import ...` that tests elsewhere use for the tiny models) -------------
#
# Run these tests in their own pytest process: `make test-gpu` (python -m pytest -m gpu
# tests/gpu). Without CUDA every test skips with the reason, so `make test` on a CPU
# machine stays green. In a process where tests/compiler/codegen's conftest has already
# set TRITON_INTERPRET=1 (the whole suite in one run) the kernels are interpreted on CPU
# tensors only, so these tests skip and say how to run them instead.


def _why_not() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "CUDA is not available (tests/gpu runs on a GPU: make test-gpu)"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return ("TRITON_INTERPRET=1 in this process (set by tests/compiler/codegen/conftest.py): "
                "run tests/gpu in its own process, make test-gpu")
    return None


@pytest.fixture(autouse=True)
def _needs_cuda(request):
    if request.node.get_closest_marker("gpu") is not None:
        reason = _why_not()
        if reason:
            pytest.skip(reason)


@pytest.fixture
def launched(monkeypatch):
    """Names of the @triton.jit kernels launched during the test (through kernel[grid]
    or wrap_triton in eager mode), so a test can show it ran the path it means to: a
    tile choice that silently moves to another kernel would otherwise still pass."""
    from triton.runtime.jit import JITFunction

    names = set()
    real_run = JITFunction.run

    def run(self, *args, **kwargs):
        names.add(getattr(self, "__name__", None) or self.fn.__name__)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", run)
    return names
