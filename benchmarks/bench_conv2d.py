"""2-D convolution with few output pixels: fastdiff's split-K implicit-GEMM Triton kernel against cuDNN
(F.conv2d), on SD1.5's 8x8-level convolutions at 512 px, channels_last float16.

At CFG batch 2 the 8x8 level's convolutions have M = 2 * 8 * 8 = 128 output pixels: cuDNN's output tiles give
a few dozen CTAs for 132 SMs, and the time goes to streaming the weights (1280 x 1280 x 3 x 3 float16 =
29.5 MB) with a fraction of the GPU. The kernel also splits the reduction over programs.

Providers:
  fastdiff                the kernel with the module's blocks and split policy (conv2d.choose_splits).
  torch                   F.conv2d (conv2d_ref): cuDNN.
  fastdiff_splits<n>      the kernel with n splits forced (at most the weight's K blocks): around the policy's
                          13 for 132 SMs, which is the measurement that sets PROGRAMS_PER_SM and
                          MIN_BLOCKS_PER_SPLIT.
  fastdiff_1per_sm        the policy with PROGRAMS_PER_SM = 1: half the splits, half the partials.
  fastdiff_n128           128 output channels per program (BLOCK_N = 128, 8 warps, 3 stages): half the reads
                          of x (each output channel tile reads all of x's K blocks), twice the splits.
Shapes (x, weight, stride, padding): the 8x8 level at CFG batch 2 (a ResNet conv, the up path's conv over the
concatenated skip with Cin 2560, the 1x1 shortcut 2560 -> 1280, the downsampler from 16x16 with stride 2) and
at CFG batch 8 (M = 512); the 16x16 level at batch 2 (M = 512) for comparison, where conv2d.prefers_split_k
hands the convolution to cuDNN.
FLOPs = 2 * M * Cout * K (K = KH * KW * Cin); bytes = weight + x read once, the output written once. Weights
and inputs rotate among enough sets to stream from HBM, as the UNet's distinct layers do.
"""
import importlib

import pytest
import torch

from conftest import ON_GPU, input_sets
from fastdiff.kernels.conv2d import conv2d, conv2d_ref, k_blocks, prefers_split_k

cv_module = importlib.import_module("fastdiff.kernels.conv2d")  # the package re-exports the functions

# (name, x's shape, weight's shape, stride, padding)
SHAPES = [
    ("sd15-8x8", (2, 1280, 8, 8), (1280, 1280, 3, 3), 1, 1),
    ("sd15-8x8-cin2560", (2, 2560, 8, 8), (1280, 2560, 3, 3), 1, 1),
    ("sd15-8x8-1x1-cin2560", (2, 2560, 8, 8), (1280, 2560, 1, 1), 1, 0),
    ("sd15-16x16-stride2", (2, 1280, 16, 16), (1280, 1280, 3, 3), 2, 1),
    ("sd15-8x8-batch8", (8, 1280, 8, 8), (1280, 1280, 3, 3), 1, 1),
    ("sd15-16x16", (2, 1280, 16, 16), (1280, 1280, 3, 3), 1, 1),
] if ON_GPU else [("tiny", (2, 32, 5, 7), (16, 32, 3, 3), 1, 1), ("tiny-stride2", (2, 32, 6, 6), (16, 32, 3, 3), 2, 1)]
DTYPE = torch.float16 if ON_GPU else torch.float32
FORCED_SPLITS = {"fastdiff_splits6": 6, "fastdiff_splits26": 26}  # capped at the weight's K blocks
FORCED_CONFIGS = {"fastdiff_1per_sm": dict(PROGRAMS_PER_SM=1),
                  "fastdiff_n128": dict(BLOCK_N=128, NUM_WARPS=8, STAGES=3)}  # module constants per variant
PROVIDERS = ["fastdiff", "torch", *FORCED_SPLITS, *FORCED_CONFIGS]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name, x_shape, w_shape, stride, padding", SHAPES, ids=[s[0] for s in SHAPES])
def test_conv2d(benchmark, measure, monkeypatch, provider, name, x_shape, w_shape, stride, padding):
    for constant, value in FORCED_CONFIGS.get(provider, {}).items():
        monkeypatch.setattr(cv_module, constant, value)
    device = "cuda" if ON_GPU else "cpu"
    x_numel, w_numel = torch.Size(x_shape).numel(), torch.Size(w_shape).numel()
    sets = [(torch.randn(x_shape, device=device, dtype=DTYPE).to(memory_format=torch.channels_last),
             (torch.randn(w_shape, device=device) / (w_numel / w_shape[0]) ** 0.5).to(DTYPE)
             .to(memory_format=torch.channels_last))
            for _ in range(input_sets((x_numel + w_numel) * DTYPE.itemsize))]
    x, w = sets[0]
    splits = min(FORCED_SPLITS[provider], k_blocks(w)) if provider in FORCED_SPLITS else None
    if provider == "torch":
        fn = conv2d_ref
    else:
        def fn(x, w, stride, padding):
            return conv2d(x, w, stride, padding, splits)
    out_shape = conv2d_ref(x[:1], w, stride, padding).shape
    pixels = x_shape[0] * out_shape[2] * out_shape[3]
    cout, reduction = w_shape[0], w_numel // w_shape[0]
    benchmark.group = f"conv2d {name} {DTYPE}"
    benchmark.extra_info.update(op="conv2d", shape=name, dims=[list(x_shape), list(w_shape)], stride=stride,
                                padding=padding, dtype=str(DTYPE), provider=provider, m=pixels, k=reduction,
                                splits=splits, prefers_split_k=prefers_split_k(x, w, stride, padding))
    # The copy of the same bytes is timed once per shape, not again for each variant.
    measure(lambda i: (lambda: fn(*sets[i], stride, padding)), len(sets), flops=2 * pixels * cout * reduction,
            nbytes=(x_numel + w_numel + pixels * cout) * DTYPE.itemsize, copy_same=provider == "fastdiff")
