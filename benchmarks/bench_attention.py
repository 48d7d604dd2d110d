"""Attention: fastdiff's Triton kernel against torch's scaled_dot_product_attention (on an H100/H200 with
torch 2.11, cuDNN's fused flash-attention kernel for fp16) on Stable Diffusion's shapes, batch 2
(classifier-free guidance).

FLOPs = 4 * B * H * Sq * Skv * D (q k^T and p v); bytes = q, k, v read once and the output written once.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import ON_GPU, PROVIDERS, input_sets
from fastdiff.kernels.attention import attention

# (name, B, H, Sq, Skv, D). SD1.5 (8 heads) at 512 px: self- and cross-attention per UNet level; SD2 and
# SDXL use head_dim 64 (SDXL at 1024 px: 10 heads at 64x64 latents, 20 at 32x32).
SHAPES = [
    ("sd15-self-64x64", 2, 8, 4096, 4096, 40),
    ("sd15-cross-64x64", 2, 8, 4096, 77, 40),
    ("sd15-self-32x32", 2, 8, 1024, 1024, 80),
    ("sd15-cross-32x32", 2, 8, 1024, 77, 80),
    ("sd15-self-16x16", 2, 8, 256, 256, 160),
    ("sd15-cross-16x16", 2, 8, 256, 77, 160),
    ("sdxl-self-64x64", 2, 10, 4096, 4096, 64),
    ("sdxl-cross-64x64", 2, 10, 4096, 77, 64),
    ("sdxl-self-32x32", 2, 20, 1024, 1024, 64),
    ("sdxl-cross-32x32", 2, 20, 1024, 77, 64),
] if ON_GPU else [("tiny-cross", 1, 2, 97, 77, 40), ("tiny-self", 1, 2, 97, 150, 40)]

PROVIDER_FNS = {"fastdiff": attention, "torch": F.scaled_dot_product_attention}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name, batch, heads, seq_q, seq_kv, head_dim", SHAPES, ids=[s[0] for s in SHAPES])
def test_attention(benchmark, measure, provider, name, batch, heads, seq_q, seq_kv, head_dim):
    device, dtype = ("cuda", torch.float16) if ON_GPU else ("cpu", torch.float32)
    nbytes = 2 * batch * heads * (seq_q + seq_kv) * head_dim * dtype.itemsize
    sets = [[torch.randn(batch, heads, s, head_dim, device=device, dtype=dtype) for s in (seq_q, seq_kv, seq_kv)]
            for _ in range(input_sets(nbytes))]
    fn = PROVIDER_FNS[provider]
    benchmark.group = f"attention {name} {dtype}"
    benchmark.extra_info.update(op="attention", shape=name, dims=[batch, heads, seq_q, seq_kv, head_dim],
                                dtype=str(dtype), provider=provider)
    measure(lambda i: (lambda: fn(*sets[i])), len(sets),
            flops=4.0 * batch * heads * seq_q * seq_kv * head_dim, nbytes=nbytes, copy_same=seq_kv <= 128)
