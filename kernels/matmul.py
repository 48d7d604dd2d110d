"""x @ weight^T, written to (or added onto) a given output: the plain Linear without a bias, for the ops seam.

The fast implementation is not Triton but fastdiff._C's cuBLAS call without a workspace (csrc/matmul_cuda.cpp,
`fastdiff._ext.matmul`): torch's own GEMMs give cuBLAS a workspace and cuBLAS clears part of it before many
kernels, a memset node in every captured graph, around which the GPU idles. This file holds the contract both
follow and its plain-PyTorch twin.
"""
from typing import Optional

import torch
from torch import Tensor


def check_weight_shape(x: Tensor, weight: Tensor) -> None:
    """x (..., K) and an nn.Linear's weight (N, K), or ValueError naming the shapes (also `linear`'s check)."""
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"x must be (..., K) and weight (N, K), got shapes {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected (N, {x.shape[-1]}) for x's last dim "
                         f"{x.shape[-1]}")


def check_matmul_inputs(x: Tensor, weight: Tensor, out: Optional[Tensor], accumulate: bool) -> None:
    """Validation shared by every backend: x (..., K), weight (N, K) of x's dtype and device; out (..., N) like
    x's leading dims and contiguous (it is written as a flat (rows, N) view), or None (then accumulate must be
    False)."""
    check_weight_shape(x, weight)
    for name, t in (("weight", weight), ("out", out)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise ValueError(f"{name} is {t.dtype} on {t.device}, expected x's {x.dtype} on {x.device}")
    if out is None:
        if accumulate:
            raise ValueError("accumulate=True adds onto `out`, but out is None")
        return
    expected = (*x.shape[:-1], weight.shape[0])
    if tuple(out.shape) != expected:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {expected}")
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous, got strides {out.stride()} for shape {tuple(out.shape)}")


def matmul_ref(x: Tensor, weight: Tensor, out: Optional[Tensor] = None, accumulate: bool = False) -> Tensor:
    """Plain-PyTorch twin: x @ weight^T (F.linear without a bias). With `out` the product is written there, or
    added onto it when `accumulate` (one GEMM with C = out, as addmm_ computes it), and out is returned.
    x: (..., K); weight: (N, K); out: (..., N) contiguous, or None."""
    check_matmul_inputs(x, weight, out, accumulate)
    if out is None:
        return torch.nn.functional.linear(x, weight)
    flat = out.view(-1, weight.shape[0])
    x2 = x.reshape(-1, x.shape[-1])
    if accumulate:
        flat.addmm_(x2, weight.t())
    else:
        torch.mm(x2, weight.t(), out=flat)
    return out
