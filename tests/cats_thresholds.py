"""The CATS kernels' test thresholds, shared by the interpreter tests (CPU) and the bf16
tests on the GPU."""

import torch
import torch.nn.functional as F


def silu_gate(x, w_gate):
    return F.silu(x.double().reshape(-1, x.shape[-1]) @ w_gate.double().t())


def separated_threshold(x, w_gate, sparsity, per_channel, seed=0):
    """A threshold near the sparsity-quantile of |silu(gate)| that no activation lies
    within a margin of: the kernel (fp32 sums in its own order) and the fp64 reference
    must agree on every kept channel, or a flipped channel fails the comparison."""
    absa = silu_gate(x, w_gate).abs()
    device = absa.device
    q = torch.quantile(absa.flatten().float()[:2**20], sparsity).item() if absa.numel() else 0.0
    n = w_gate.shape[0]
    if per_channel:
        g = torch.Generator(device=device).manual_seed(seed)
        t = torch.rand(n, generator=g, device=device, dtype=torch.float64) * 2 * q
    else:
        t = torch.full((1,), q, dtype=torch.float64, device=device)
    margin = 1e-3 * max(absa.max().item() if absa.numel() else 0.0, 1e-3)
    for _ in range(1000):
        close = ((absa - t).abs() < margin).any(dim=0)  # per channel (or the one value)
        if not close.any():
            break
        t = torch.where(close, t + 3 * margin, t) if per_channel else t + 3 * margin
    else:
        raise AssertionError("could not separate the threshold from the activations")
    return t.float() if per_channel else t.float().reshape(())
