"""Residual + per-channel bias add, x + y + bias[None, :, None, None]: fastdiff's one-pass Triton kernel
against eager torch, on the shapes of SD1.5's ResNet blocks at 512 px (CFG batch 2), channels_last and
contiguous.

Providers:
  fastdiff            residual_add: reads x and y, writes the sum.
  torch               `y = y + bias.view(1, C, 1, 1)` then `x + y` (residual_add_ref): what it replaces, the
                      conv's separate bias pass (cuDNN's output plus the bias) and the block's residual add,
                      two kernels.
  torch_add           `x + y` alone: one eager pass over the same bytes, the floor of what torch offers.
  fastdiff_block<n>   the kernel with BLOCK = n elements per program, which is the measurement that sets
                      residual_add.BLOCK.
Bytes = x and y read once, the output written once: 3 elements per element of x, for every provider (torch's
two kernels move 5). The bias is negligible.
"""
import importlib

import pytest
import torch

from conftest import ON_GPU, input_sets
from fastdiff.kernels.residual_add import residual_add, residual_add_ref

ra_module = importlib.import_module("fastdiff.kernels.residual_add")  # the package re-exports the functions

# (name, x's shape): CFG batch 2 at 512 px, (B, C, H, W) of each ResNet level.
SHAPES = [("sd15-64x64", (2, 320, 64, 64)), ("sd15-32x32", (2, 640, 32, 32)), ("sd15-16x16", (2, 1280, 16, 16)),
          ("sd15-8x8", (2, 1280, 8, 8))] if ON_GPU else [("tiny", (2, 8, 5, 7))]
DTYPE = torch.float16 if ON_GPU else torch.float32
LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
FORCED_BLOCKS = {"fastdiff_block2048": 2048, "fastdiff_block4096": 4096}  # residual_add.BLOCK forced per variant
PROVIDERS = {"fastdiff": residual_add, "torch": residual_add_ref,
             "torch_add": lambda x, y, bias: x + y, **dict.fromkeys(FORCED_BLOCKS, residual_add)}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name, shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_residual_add(benchmark, measure, monkeypatch, provider, layout, name, shape):
    if provider in FORCED_BLOCKS:
        monkeypatch.setattr(ra_module, "BLOCK", FORCED_BLOCKS[provider])
    device = "cuda" if ON_GPU else "cpu"
    numel = torch.Size(shape).numel()
    # Enough (x, y) sets to stream from HBM: in the UNet y was just written by the conv and may sit in L2.
    sets = [[torch.randn(shape, device=device, dtype=DTYPE).to(memory_format=LAYOUTS[layout]) for _ in range(2)]
            for _ in range(input_sets(2 * numel * DTYPE.itemsize))]
    bias = torch.randn(shape[1], device=device, dtype=DTYPE)
    fn = PROVIDERS[provider]
    benchmark.group = f"residual_add {name} {layout} {DTYPE}"
    benchmark.extra_info.update(op="residual_add", shape=name, dims=list(shape), layout=layout, dtype=str(DTYPE),
                                provider=provider)
    # The copy of the same bytes is timed once per shape and layout, not again for each variant.
    measure(lambda i: (lambda: fn(*sets[i], bias)), len(sets), nbytes=3 * numel * DTYPE.itemsize,
            copy_same=provider == "fastdiff")
