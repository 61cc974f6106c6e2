"""Tolerances and comparisons shared by the kernel tests (fp64 references)."""

import torch

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def rel_err(y, ref):
    ref = ref.double()
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_matches(out, ref, dtype):
    """out equals an fp64 reference within the dtype's tolerance; an all-zero reference
    (everything thresholded away) must give exact zeros."""
    if ref.norm() == 0:
        assert torch.equal(out, torch.zeros_like(out))
        return
    # An output in the dtype's subnormal range is rounded to a step of fixed size (fp16:
    # 2**-24), which no relative tolerance covers when every output is that small.
    step = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    err = (out.double() - ref.double()).norm().item()
    assert err < TOL[dtype] * ref.double().norm().item() + step * out.numel() ** 0.5, rel_err(out, ref)
