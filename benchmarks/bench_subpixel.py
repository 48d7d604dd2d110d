"""Nearest 2x upsampling + conv3x3 (SD's Upsample2D) against its sub-pixel form: one 2x2 convolution of the small
image with 4 * C outputs, then fastdiff's Triton shuffle of the four phases into place with the bias
(`fastdiff.kernels.subpixel`). channels_last, float16 on a GPU; the SD1.5 UNet's upsamplers at CFG batch 2 and 8
and the VAE decoder's at batch 1.

Providers:
  fastdiff   F.conv2d(x, subpixel_weight(w), padding=1) (cuDNN) + subpixel_shuffle: what the fast path runs.
  torch      F.conv2d(F.interpolate(x, scale_factor=2), w, bias, padding=1): the direct form (cuDNN).
  shuffle    subpixel_shuffle alone, on the 2x2 convolution's output: the kernel's own share.
FLOPs are the direct form's (2 * output pixels * C * 9 * C) for both, so TFLOP/s compares like with like; the
shuffle row reports GB/s (its input read once, its output written once).
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import ON_GPU, input_sets
from fastdiff.kernels.subpixel import subpixel_shuffle, subpixel_weight

# (name, x's shape): the upsampler's input; its conv keeps the channels
SHAPES = [("sd15-unet-8to16", (2, 1280, 8, 8)), ("sd15-unet-16to32", (2, 1280, 16, 16)),
          ("sd15-unet-32to64", (2, 640, 32, 32)), ("sd15-unet-32to64-cfg8", (8, 640, 32, 32)),
          ("sd15-vae-128to256", (1, 512, 128, 128)), ("sd15-vae-256to512", (1, 512, 256, 256))] if ON_GPU \
    else [("tiny", (2, 8, 5, 7))]
DTYPE = torch.float16 if ON_GPU else torch.float32
PROVIDERS = ["fastdiff", "torch", "shuffle"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name, shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_subpixel(benchmark, measure, provider, name, shape):
    device = "cuda" if ON_GPU else "cpu"
    n, c, h, w = shape
    weight = (torch.randn(c, c, 3, 3, device=device) / (9 * c) ** 0.5).to(DTYPE).to(memory_format=torch.channels_last)
    w4, bias = subpixel_weight(weight), torch.randn(c, device=device, dtype=DTYPE)
    numel = torch.Size(shape).numel()
    sets = [torch.randn(shape, device=device, dtype=DTYPE).to(memory_format=torch.channels_last)
            for _ in range(input_sets(numel * DTYPE.itemsize))]
    if provider == "shuffle":
        sets = [F.conv2d(x, w4, None, 1, 1) for x in sets]
        fn = lambda y: subpixel_shuffle(y, bias)  # noqa: E731
        nbytes = (sets[0].numel() + 4 * numel) * DTYPE.itemsize
    elif provider == "fastdiff":
        fn = lambda x: subpixel_shuffle(F.conv2d(x, w4, None, 1, 1), bias)  # noqa: E731
        nbytes = 0
    else:
        fn = lambda x: F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, 1, 1)  # noqa: E731
        nbytes = 0
    benchmark.group = f"subpixel {name} {DTYPE}"
    benchmark.extra_info.update(op="subpixel", shape=name, dims=list(shape), layout="channels_last", dtype=str(DTYPE),
                                provider=provider)
    flops = 0 if provider == "shuffle" else 2 * (n * 4 * h * w) * c * 9 * c
    measure(lambda i: (lambda: fn(sets[i])), len(sets), flops=flops, nbytes=nbytes, copy_same=provider == "shuffle")
