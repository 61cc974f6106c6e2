"""optc's linear with GELU in its epilogue, for encoder MLPs.

Importing this module registers (and that is all it changes):

    optc::linear_gelu(Tensor x, Tensor weight, Tensor? bias, str approximate) -> Tensor

x [..., K], weight [N, K]: F.gelu(F.linear(x, weight, bias), approximate=approximate),
accumulated in fp32 and returned in x's dtype. A `torch.library.triton_op` like
gemv_ops': on CUDA it runs kernels/linear_gelu.py, anywhere else the reference. The
linear_gelu rewrite puts it into the lowered copy of a program only: exported programs and
artifacts keep aten's linear and gelu.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from .kernels.linear_gelu import linear_gelu as linear_gelu_kernel_launch

__all__ = ["linear_gelu", "linear_gelu_reference"]


def linear_gelu_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    compute = torch.promote_types(x.dtype, torch.float32)
    b = bias.to(compute) if bias is not None else None
    y = F.linear(x.to(compute), weight.to(compute), b)
    return F.gelu(y, approximate=approximate).to(x.dtype)


@triton_op("optc::linear_gelu", mutates_args=())
def linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    if x.device.type != "cuda":
        return linear_gelu_reference(x, weight, bias, approximate)
    return linear_gelu_kernel_launch(x, weight, bias, approximate)


@linear_gelu.register_fake
def _linear_gelu_fake(x, weight, bias, approximate):
    torch._check(weight.dim() == 2 and x.shape[-1] == weight.shape[1], lambda: "weight must be [N, K] for x [..., K]")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@linear_gelu.register_kernel("cpu")
def _linear_gelu_cpu(x, weight, bias, approximate):
    return linear_gelu_reference(x, weight, bias, approximate)
