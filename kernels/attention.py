"""Attention: softmax(q k^T * scale) v, non-causal.

Layouts: q (B, H, Sq, D), k and v (B, H, Skv, D) -> out (B, H, Sq, D).
"""
import math
from typing import Optional

import torch
from torch import Tensor


def attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """Plain-PyTorch twin: scores and softmax in float32 (float64 stays float64), output in q's dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale  # (B, H, Sq, Skv)
    return torch.matmul(scores.softmax(dim=-1), v.to(acc)).to(q.dtype)
