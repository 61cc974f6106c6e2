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
    if not per_channel:
        return _gap_near_quantile(absa.flatten(), sparsity, margin / 100)
    for _ in range(1000):
        close = ((absa - t).abs() < margin).any(dim=0)  # per channel
        if not close.any():
            break
        t = torch.where(close, t + 3 * margin, t)
    else:
        raise AssertionError("could not separate the thresholds from the activations")
    return t.float()


def _gap_near_quantile(values, sparsity, margin):
    """One threshold for every channel: nudging it past each close activation walks it
    far from the quantile when there are many (a 1x8192 GEMV), so take the middle of the
    gap between sorted activations, at least 2 * margin wide, nearest the quantile."""
    v = values.double().sort().values
    if v.numel() < 2:  # nothing or one value: any threshold off it separates
        return torch.tensor(float(v[0]) / 2 if v.numel() else 0.0, device=values.device)
    k = min(int(sparsity * v.numel()), v.numel() - 2)
    wide = ((v[1:] - v[:-1]) >= 2 * margin).nonzero().flatten()
    assert wide.numel(), "no gap between the activations to put a threshold in"
    i = int(wide[(wide - k).abs().argmin()])
    return ((v[i] + v[i + 1]) / 2).float().reshape(())
