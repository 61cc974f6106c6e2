"""tests/gpu: optc's Triton kernels compiled and executed on a CUDA GPU, in bf16 (the
interpreter tests of tests/compiler/codegen cannot run bf16). Run them in their own
pytest process: `make test-gpu` (python -m pytest -m gpu tests/gpu).

Without CUDA every test here skips with the reason, so `make test` on a CPU machine
stays green. In a process where tests/compiler/codegen's conftest has already set
TRITON_INTERPRET=1 (the whole suite in one run), the kernels are interpreted on CPU
tensors only, so these tests skip and say how to run them instead.
"""

import os

import pytest


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
