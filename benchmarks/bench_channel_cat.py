"""Channel concatenation of channels_last maps, cat([h, skip], dim=1) (the SD1.5 UNet decoder's skips): fastdiff's
Triton kernel against torch.cat on the same inputs, float16 on a GPU, at CFG batch 2 and 8.

Providers:
  fastdiff   channel_cat: each program copies one (pixels x channels) tile of one input.
  torch      torch.cat([h, skip], dim=1) (channel_cat_ref).
Bytes = both inputs read once + the output written once.
"""
import pytest
import torch

from conftest import ON_GPU, input_sets
from fastdiff.kernels.channel_cat import channel_cat, channel_cat_ref

# (name, (N, C1, C2, H)): square maps
SHAPES = [("sd15-8x8", (2, 1280, 1280, 8)), ("sd15-16x16", (2, 1280, 640, 16)), ("sd15-32x32", (2, 1280, 640, 32)),
          ("sd15-64x64", (2, 640, 320, 64)), ("sd15-64x64-cfg8", (8, 640, 320, 64))] if ON_GPU \
    else [("tiny", (2, 70, 24, 5))]
DTYPE = torch.float16 if ON_GPU else torch.float32
PROVIDERS = {"fastdiff": channel_cat, "torch": channel_cat_ref}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name, dims", SHAPES, ids=[s[0] for s in SHAPES])
def test_channel_cat(benchmark, measure, provider, name, dims):
    device = "cuda" if ON_GPU else "cpu"
    n, c1, c2, hw = dims
    numel = n * (c1 + c2) * hw * hw
    sets = [[torch.randn(n, c, hw, hw, device=device, dtype=DTYPE).to(memory_format=torch.channels_last)
             for c in (c1, c2)] for _ in range(input_sets(numel * DTYPE.itemsize))]
    fn = PROVIDERS[provider]
    benchmark.group = f"channel_cat {name} {DTYPE}"
    benchmark.extra_info.update(op="channel_cat", shape=name, dims=list(dims), layout="channels_last",
                                dtype=str(DTYPE), provider=provider)
    measure(lambda i: (lambda: fn(*sets[i])), len(sets), nbytes=2 * numel * DTYPE.itemsize,
            copy_same=provider == "fastdiff")
