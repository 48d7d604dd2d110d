"""GroupNorm with an optional fused SiLU.

x: (N, C, *spatial), contiguous or channels_last; statistics in float32; output in x's dtype and layout.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = (None, "silu")


def group_norm_ref(x: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5, activation: Optional[str] = None) -> Tensor:
    """Plain-PyTorch twin: F.group_norm in float32 (float64 stays float64), then the activation."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = None if weight is None else weight.to(acc)
    b = None if bias is None else bias.to(acc)
    y = F.group_norm(x.to(acc), num_groups, w, b, eps)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)
