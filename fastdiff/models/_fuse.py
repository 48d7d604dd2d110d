"""Fusing parameters for one matmul without a second copy: the fused tensor is the concatenation, and each
module's parameter becomes a view into it."""
from collections.abc import Sequence

import torch
from torch import Tensor, nn


@torch.no_grad()
def concat_as_views(modules: Sequence[nn.Module], name: str) -> Tensor:
    """torch.cat of the modules' parameter `name` along dim 0, each parameter then made a view of its rows of the
    result (requires_grad False): the same parameters and state-dict keys, no second copy, and `load_state_dict`
    afterwards still updates the concatenation. Convert dtype or device before, not after (the views would
    split from it)."""
    fused = torch.cat([getattr(m, name) for m in modules])
    start = 0
    for m in modules:
        rows = getattr(m, name).shape[0]
        setattr(m, name, nn.Parameter(fused[start:start + rows], requires_grad=False))
        start += rows
    return fused
