"""optc's custom ops: activation-sparse linear and fused CATS gate/up.

Importing this module registers (and that is all it changes):

    optc::sparse_linear(Tensor x, Tensor weight_t, Tensor threshold, Tensor? bias) -> Tensor
    optc::cats_gate_up(Tensor x, Tensor w_gate, Tensor w_up, Tensor threshold) -> Tensor

They are ``torch.library.triton_op``s: torch.export keeps them as single nodes (an
exported program stays portable and serialisable), while Inductor traces through them
to the ``wrap_triton`` kernel launches. On CUDA they run the Triton kernels of
``kernels/``; on any other device (and when Inductor compiles for CPU) they run the
plain-torch references below, so an exported graph holding them runs on CPU.

Semantics (both ops; see kernels/README.md):
  * a threshold tensor has one element (per layer: TEAL, CATS) or one per channel
    (CHESS); a value is kept when ``|v| > t`` in fp32;
  * accumulation is fp32, the output has x's dtype; leading dims of x are kept.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from .kernels.cats_mlp import cats_gate_up as _cats_gate_up_triton
from .kernels.configs import MIN_SPARSE_WEIGHT, crossover_tokens
from .kernels.sparse_linear import sparse_linear as _sparse_linear_triton

__all__ = [
    "sparse_linear",
    "cats_gate_up",
    "sparse_linear_reference",
    "cats_gate_up_reference",
    "use_sparse_kernel",
]


def _threshold_vector(threshold: Tensor, dtype: torch.dtype) -> Tensor:
    # One element -> a 0-d tensor (broadcasts as per-layer); K elements -> [K].
    t = threshold.reshape(()) if threshold.numel() == 1 else threshold.reshape(-1)
    return t.to(dtype)


def sparse_linear_reference(
    x: Tensor,
    weight_t: Tensor,
    threshold: Tensor,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """(x * (|x| > t)) @ weight_t (+ bias) computed in fp32 (fp64 if x is fp64), cast
    to x.dtype. The keep mask is always decided in fp32, as the kernel decides it."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    keep = x.to(torch.float32).abs() > _threshold_vector(threshold, torch.float32)
    xs = torch.where(keep, x.to(compute_dtype), torch.zeros((), dtype=compute_dtype, device=x.device))
    y = xs @ weight_t.to(compute_dtype)
    if bias is not None:
        y = y + bias.to(compute_dtype)
    return y.to(x.dtype)


def cats_gate_up_reference(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    threshold: Tensor,
) -> Tensor:
    """where(|silu(x Wg^T)| > t, silu(x Wg^T) * (x Wu^T), 0) computed in fp32 (fp64 if
    x is fp64), cast to x.dtype. The mask is per token and channel."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    xc = x.to(compute_dtype)
    a = F.silu(xc @ w_gate.to(compute_dtype).t())
    keep = a.abs() > _threshold_vector(threshold, compute_dtype)
    h = torch.where(keep, a * (xc @ w_up.to(compute_dtype).t()), torch.zeros((), dtype=compute_dtype, device=x.device))
    return h.to(x.dtype)


@triton_op("optc::sparse_linear", mutates_args=())
def sparse_linear(x: Tensor, weight_t: Tensor, threshold: Tensor, bias: Optional[Tensor]) -> Tensor:
    if x.device.type != "cuda":
        return sparse_linear_reference(x, weight_t, threshold, bias)
    return _sparse_linear_triton(x, weight_t, threshold, bias)


@triton_op("optc::cats_gate_up", mutates_args=())
def cats_gate_up(x: Tensor, w_gate: Tensor, w_up: Tensor, threshold: Tensor) -> Tensor:
    if x.device.type != "cuda":
        return cats_gate_up_reference(x, w_gate, w_up, threshold)
    return _cats_gate_up_triton(x, w_gate, w_up, threshold)


# Fake (meta) implementations: shapes only, so export never touches Triton or specialises
# on the token count.
@sparse_linear.register_fake
def _sparse_linear_fake(x, weight_t, threshold, bias):
    torch._check(weight_t.dim() == 2, lambda: "weight_t must be [K, N]")
    torch._check(x.shape[-1] == weight_t.shape[0], lambda: "x's last dim must equal weight_t's rows")
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


@cats_gate_up.register_fake
def _cats_gate_up_fake(x, w_gate, w_up, threshold):
    torch._check(w_gate.dim() == 2 and w_gate.shape == w_up.shape, lambda: "w_gate/w_up must be [I, H]")
    torch._check(x.shape[-1] == w_gate.shape[1], lambda: "x's last dim must equal H")
    return x.new_empty((*x.shape[:-1], w_gate.shape[0]))


# CPU kernels: the references (fp32 math). Explicit so that eager CPU calls dispatch
# straight here rather than through the Triton-backed composite.
@sparse_linear.register_kernel("cpu")
def _sparse_linear_cpu(x, weight_t, threshold, bias):
    return sparse_linear_reference(x, weight_t, threshold, bias)


@cats_gate_up.register_kernel("cpu")
def _cats_gate_up_cpu(x, w_gate, w_up, threshold):
    return cats_gate_up_reference(x, w_gate, w_up, threshold)


def use_sparse_kernel(num_tokens: int, target: str, weight_elems: int | None = None) -> bool:
    """Whether optc::sparse_linear beats a dense GEMM at this many tokens (and, given
    ``weight_elems`` = K * N, at this weight size) on target. Both limits are per-target
    measured data in kernels/configs.py."""
    crossover = crossover_tokens(target)  # raises on an unknown target
    if weight_elems is not None and weight_elems < MIN_SPARSE_WEIGHT[target]:
        return False
    return 0 < num_tokens <= crossover
