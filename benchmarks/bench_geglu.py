"""GEGLU's gate, value * GELU(gate) from the projection's output: fastdiff's one-pass Triton kernel against
eager torch (`gelu` then `mul`, two kernels), on the MLP shapes of SD1.5's transformers at 512 px.

Bytes = h (M, 2N) read once, the output (M, N) written once: 3 * M * N elements (the fused kernel's
minimum; eager torch moves 5 * M * N: it also writes and re-reads GELU(gate)).
"""
import pytest
import torch

from conftest import ON_GPU, PROVIDERS, input_sets
from fastdiff.kernels.geglu import geglu, geglu_ref

# (name, h's shape): CFG batch 2 at 512 px, (B, H*W, 2 * 4 * channels) for each resolution level.
SHAPES = [("sd15-64x64", (2, 4096, 2 * 1280)), ("sd15-32x32", (2, 1024, 2 * 2560)),
          ("sd15-16x16", (2, 256, 2 * 5120))] if ON_GPU else [("tiny", (2, 97, 2 * 40))]
DTYPES = [torch.float16, torch.bfloat16] if ON_GPU else [torch.float32]


# torch: geglu_ref, eager `value * F.gelu(gate)`, what fastdiff's GEGLU runs unfused and diffusers' GEGLU runs.
PROVIDER_FNS = {"fastdiff": geglu, "torch": geglu_ref}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_geglu(benchmark, measure, provider, dtype, name, shape):
    device = "cuda" if ON_GPU else "cpu"
    numel_in = torch.Size(shape).numel()
    nbytes = numel_in * 3 // 2 * dtype.itemsize
    sets = [torch.randn(shape, device=device, dtype=dtype) for _ in range(input_sets(numel_in * dtype.itemsize))]
    fn = PROVIDER_FNS[provider]
    benchmark.group = f"geglu {name} {dtype}"
    benchmark.extra_info.update(op="geglu", shape=name, dims=list(shape), dtype=str(dtype), provider=provider)
    measure(lambda i: (lambda: fn(sets[i])), len(sets), nbytes=nbytes)
