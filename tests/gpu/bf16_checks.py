"""Comparisons for bf16 kernel outputs against fp64 references of the same bf16 inputs.

Why these tolerances: bf16 keeps 8 significant bits, so rounding one value costs up to
2**-9 (about 2e-3) of it. The kernels accumulate in fp32 and round once on the way out
(split-K partials are summed in fp32 first), so an output's error is about one bf16
rounding; the norm-relative error of a whole output stays near 2e-3. BF16_REL = 1e-2
leaves room for that and for an intermediate bf16 rounding (CATS rounds h), while a
wrong channel, row or tile costs far more than 1e-2 at these sizes."""

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
