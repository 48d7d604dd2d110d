"""GroupNorm + SiLU: fastdiff's Triton kernels against eager torch (F.silu(F.group_norm(...))) on the SD1.5
UNet's and VAE's shapes, 32 groups, in both memory layouts.

Providers: `fastdiff` takes the strategy the module picks (group_norm.SINGLE_LAUNCH_MAX); `fastdiff_single`
and `fastdiff_split` force the single launch and the split statistics/apply launches on every shape, which
is the measurement that sets SINGLE_LAUNCH_MAX; `torch` is the eager pair of ops.
The `offset` case (op group_norm_silu_offset, the UNet's shapes) times the UNet ResNet block's norm2:
fastdiff's GroupNorm+SiLU of x plus a per-(sample, channel) offset, against what it replaces in torch,
F.silu(F.group_norm(x + offset[:, :, None, None])): three ops.
Bytes = x read once + y written once (weight, bias and offset are negligible).
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from conftest import ON_GPU, PROVIDERS, input_sets
from fastdiff.kernels.group_norm import group_norm

gn_module = importlib.import_module("fastdiff.kernels.group_norm")  # the package re-exports the function

# UNet levels at batch 2 (CFG) with 64x64 latents; the VAE decoder at 512 px: its mid block and first up
# block (1x512x64x64: groups of 16 x 4096 = 64K elements, twice SINGLE_LAUNCH_MAX), its largest levels.
SHAPES = [(2, 320, 64, 64), (2, 640, 32, 32), (2, 1280, 16, 16), (1, 512, 64, 64), (1, 128, 512, 512),
          (1, 512, 128, 128)] if ON_GPU else [(2, 96, 7, 9)]
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
UNET_SHAPES = SHAPES[:3] if ON_GPU else SHAPES
FORCED_LIMITS = {"fastdiff_single": 2**62, "fastdiff_split": 0}  # SINGLE_LAUNCH_MAX forcing each strategy


def torch_group_norm_silu(x, groups, weight, bias):
    return F.silu(F.group_norm(x, groups, weight, bias, 1e-5))


def fastdiff_group_norm_silu(x, groups, weight, bias):
    return group_norm(x, groups, weight, bias, 1e-5, "silu")


PROVIDER_FNS = {"fastdiff": fastdiff_group_norm_silu, "torch": torch_group_norm_silu,
                **dict.fromkeys(FORCED_LIMITS, fastdiff_group_norm_silu)}


def torch_offset_group_norm_silu(x, offset, groups, weight, bias):
    return F.silu(F.group_norm(x + offset[:, :, None, None], groups, weight, bias, 1e-5))


def fastdiff_offset_group_norm_silu(x, offset, groups, weight, bias):
    return group_norm(x, groups, weight, bias, 1e-5, "silu", offset)


OFFSET_FNS = {"fastdiff": fastdiff_offset_group_norm_silu, "torch": torch_offset_group_norm_silu}


@pytest.mark.parametrize("provider", (*PROVIDERS, *FORCED_LIMITS))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_silu(benchmark, measure, monkeypatch, provider, layout, shape):
    if provider in FORCED_LIMITS:
        monkeypatch.setattr(gn_module, "SINGLE_LAUNCH_MAX", FORCED_LIMITS[provider])
    device, dtype = ("cuda", torch.float16) if ON_GPU else ("cpu", torch.float32)
    numel = torch.Size(shape).numel()
    nbytes = 2 * numel * dtype.itemsize
    sets = [torch.randn(shape, device=device, dtype=dtype).to(memory_format=LAYOUTS[layout])
            for _ in range(input_sets(nbytes // 2))]
    weight = torch.randn(shape[1], device=device, dtype=dtype)
    bias = torch.randn(shape[1], device=device, dtype=dtype)
    fn = PROVIDER_FNS[provider]
    name = "x".join(map(str, shape))
    benchmark.group = f"group_norm+silu {name} {layout} {dtype}"
    benchmark.extra_info.update(op="group_norm_silu", shape=name, layout=layout, dtype=str(dtype), provider=provider)
    # The copy of the same bytes is timed once per shape and layout, not again for each forced strategy.
    measure(lambda i: (lambda: fn(sets[i], 32, weight, bias)), len(sets), nbytes=nbytes,
            copy_same=provider not in FORCED_LIMITS)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", UNET_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_silu_offset(benchmark, measure, provider, layout, shape):
    device, dtype = ("cuda", torch.float16) if ON_GPU else ("cpu", torch.float32)
    numel = torch.Size(shape).numel()
    nbytes = 2 * numel * dtype.itemsize
    sets = [(torch.randn(shape, device=device, dtype=dtype).to(memory_format=LAYOUTS[layout]),
             torch.randn(shape[:2], device=device, dtype=dtype)) for _ in range(input_sets(nbytes // 2))]
    weight = torch.randn(shape[1], device=device, dtype=dtype)
    bias = torch.randn(shape[1], device=device, dtype=dtype)
    fn = OFFSET_FNS[provider]
    name = "x".join(map(str, shape))
    benchmark.group = f"group_norm+silu of x + offset {name} {layout} {dtype}"
    benchmark.extra_info.update(op="group_norm_silu_offset", shape=name, layout=layout, dtype=str(dtype),
                                provider=provider)
    measure(lambda i: (lambda: fn(*sets[i], 32, weight, bias)), len(sets), nbytes=nbytes)
