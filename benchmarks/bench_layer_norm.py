"""Residual add + LayerNorm, and LayerNorm alone, over the last dim: fastdiff's one-pass Triton kernel against
eager torch, on the shapes of SD1.5's transformer blocks at 512 px, CFG batch 2.

Ops and providers:
  add_layer_norm  `fastdiff`: add_layer_norm (reads x and r, writes s and LayerNorm(s)); `torch`: `s = x + r`
                  then F.layer_norm(s), what it replaces (two kernels: s is written, then read again);
                  `fastdiff_tile<n>`: the kernel with TILE = n elements per program, which is the measurement
                  that sets layer_norm.TILE.
  layer_norm      `fastdiff`: layer_norm; `torch`: F.layer_norm.
Bytes = x and r read once, s and y written once: 4 elements per element of x (LayerNorm alone: 2). Weight
and bias are negligible.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from conftest import ON_GPU, PROVIDERS, input_sets
from fastdiff.kernels.layer_norm import add_layer_norm, add_layer_norm_ref, layer_norm

ln_module = importlib.import_module("fastdiff.kernels.layer_norm")  # the package re-exports the functions

# (name, x's shape): CFG batch 2 at 512 px, (B, H*W, C) for each transformer level.
SHAPES = [("sd15-64x64", (2, 4096, 320)), ("sd15-32x32", (2, 1024, 640)), ("sd15-16x16", (2, 256, 1280)),
          ("sd15-8x8", (2, 64, 1280))] if ON_GPU else [("tiny", (2, 7, 96))]
DTYPE = torch.float16 if ON_GPU else torch.float32
FORCED_TILES = {"fastdiff_tile2048": 2048, "fastdiff_tile8192": 8192}  # layer_norm.TILE forced per variant


def torch_layer_norm(x, weight, bias):
    return F.layer_norm(x, x.shape[-1:], weight, bias, 1e-5)


def _inputs(shape, n_tensors, device):
    """Enough sets of `n_tensors` inputs of `shape` to stream from HBM, and the affine's weight and bias."""
    n_sets = input_sets(n_tensors * torch.Size(shape).numel() * DTYPE.itemsize)
    sets = [[torch.randn(shape, device=device, dtype=DTYPE) for _ in range(n_tensors)] for _ in range(n_sets)]
    weight, bias = (torch.randn(shape[-1], device=device, dtype=DTYPE) for _ in range(2))
    return sets, weight, bias


@pytest.mark.parametrize("provider", (*PROVIDERS, *FORCED_TILES))
@pytest.mark.parametrize("name, shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_add_layer_norm(benchmark, measure, monkeypatch, provider, name, shape):
    if provider in FORCED_TILES:
        monkeypatch.setattr(ln_module, "TILE", FORCED_TILES[provider])
    sets, weight, bias = _inputs(shape, 2, "cuda" if ON_GPU else "cpu")
    fn = add_layer_norm_ref if provider == "torch" else add_layer_norm
    benchmark.group = f"add_layer_norm {name} {DTYPE}"
    benchmark.extra_info.update(op="add_layer_norm", shape=name, dims=list(shape), dtype=str(DTYPE), provider=provider)
    # The copy of the same bytes is timed once per shape, not again for each forced tile.
    measure(lambda i: (lambda: fn(*sets[i], weight, bias)), len(sets),
            nbytes=4 * torch.Size(shape).numel() * DTYPE.itemsize, copy_same=provider not in FORCED_TILES)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name, shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_layer_norm(benchmark, measure, provider, name, shape):
    sets, weight, bias = _inputs(shape, 1, "cuda" if ON_GPU else "cpu")
    fn = torch_layer_norm if provider == "torch" else layer_norm
    benchmark.group = f"layer_norm {name} {DTYPE}"
    benchmark.extra_info.update(op="layer_norm", shape=name, dims=list(shape), dtype=str(DTYPE), provider=provider)
    measure(lambda i: (lambda: fn(*sets[i], weight, bias)), len(sets),
            nbytes=2 * torch.Size(shape).numel() * DTYPE.itemsize)
