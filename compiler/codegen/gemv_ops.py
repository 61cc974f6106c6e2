"""optc's one-row linear for decode steps.

Importing this module registers (and that is all it changes):

    optc::gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor

x [..., K] holding one row, weight [N, K]: F.linear(x, weight, bias), accumulated in
fp32 and returned in x's dtype. A `torch.library.triton_op` like attention_ops': on CUDA
it runs kernels/dense_gemv.py with the tile kernels/gemv_tiles.py stores for the
device's target and the weight's shape (never timed), anywhere else the fp32 reference.
The decode_gemv rewrite puts it into the lowered copy of a program only: exported
programs and artifacts keep aten's linear.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import triton_op

from .kernels.configs import target_for_device
from .kernels.dense_gemv import dense_gemv
from .kernels.gemv_tiles import gemv_tile

__all__ = ["gemv", "gemv_reference"]


def gemv_reference(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    compute = torch.promote_types(x.dtype, torch.float32)
    b = bias.to(compute) if bias is not None else None
    return F.linear(x.to(compute), weight.to(compute), b).to(x.dtype)


@triton_op("optc::gemv", mutates_args=())
def gemv(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    if x.device.type != "cuda":
        return gemv_reference(x, weight, bias)
    n, k = weight.shape
    return dense_gemv(x, weight, bias, gemv_tile(target_for_device(x.device), n, k))


@gemv.register_fake
def _gemv_fake(x, weight, bias):
    torch._check(weight.dim() == 2 and x.shape[-1] == weight.shape[1], lambda: "weight must be [N, K] for x [..., K]")
    torch._check(math.prod(x.shape[:-1]) == 1, lambda: "optc::gemv takes one row")
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@gemv.register_kernel("cpu")
def _gemv_cpu(x, weight, bias):
    return gemv_reference(x, weight, bias)
