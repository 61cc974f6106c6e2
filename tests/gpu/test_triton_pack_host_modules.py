"""The artifact's Triton pack carries the host module Triton builds with the C compiler
at a kernel's first launch (its launcher): recorded while a kernel is launched inside
triton_kernels.recording(), and after the pack is installed into an empty cache, the same
kernel loaded afresh (a new JITFunction over the same source, as a new process would)
finds both its binary and its launcher there and builds nothing."""

import pytest
import torch
import triton
import triton.language as tl

from bf16_checks import _needs_cuda  # noqa: F401 (fixture)

from optc.compiler.codegen import triton_kernels

pytestmark = pytest.mark.gpu


def _double(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2, mask=i < n)


def test_a_kernels_launcher_travels_in_the_pack(tmp_path, monkeypatch):
    from triton.runtime import build

    x = torch.randn(1000, device="cuda")
    y = torch.empty_like(x)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "compile"))
    with triton_kernels.recording() as groups:
        triton.jit(_double)[(8,)](x, y, x.numel(), BLOCK=128)
    launchers = [name for g in groups.values() if triton_kernels._is_module(g) for name in g]
    assert any(name.startswith("__triton_launcher") for name in launchers), sorted(groups)
    data, count = triton_kernels.pack(groups)
    assert count == 1

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "fresh"))
    assert triton_kernels.install(data) == 1

    def no_build(*args, **kwargs):
        raise AssertionError("Triton built a host module that the pack carries")

    monkeypatch.setattr(build, "_build", no_build)
    hits = []
    monkeypatch.setattr(triton.knobs.compilation, "listener", lambda **kw: hits.append(kw["cache_hit"]))
    y.zero_()
    triton.jit(_double)[(8,)](x, y, x.numel(), BLOCK=128)
    assert hits == [True]  # the kernel from the pack, not compiled
    torch.testing.assert_close(y, x * 2)
