"""Fused scheduler step (CFG combine + DPM++ 2M update): fastdiff's Triton kernel against the same update
written eagerly in torch, on SD latents (plus one large batch that shows the kernel's bandwidth).

Bytes = x, model_output (2B: uncond and cond) and prev_x0 read, x_next and x0 written: 6 * B*4*H*W elements.
"""
import math

import pytest
import torch

from conftest import ON_GPU, PROVIDERS, input_sets
from fastdiff.kernels.scheduler_step import StepCoeffs, scheduler_step

# DPM++ 2M at a mid-schedule step (sigma 3.0 -> 2.4, previous 3.8), eps model: only the values matter for speed.
_H = math.log(3.0 / 2.4)
_R = math.log(3.8 / 3.0) / _H
COEFFS = StepCoeffs(c_x=1.0, c_m=-3.0, a_x=2.4 / 3.0, a_0=-math.expm1(-_H) * (1 + 1 / (2 * _R)),
                    a_p=math.expm1(-_H) / (2 * _R))
GUIDANCE = 7.5
# (name, latent shape): SD1.5 512 px at batch 1 and 8, SD2 768 px, SDXL 1024 px, and a 64-image batch.
SHAPES = [("sd15-b1", (1, 4, 64, 64)), ("sd15-b8", (8, 4, 64, 64)), ("sd2-768-b1", (1, 4, 96, 96)),
          ("sdxl-b1", (1, 4, 128, 128)), ("large-b64", (64, 4, 128, 128))] if ON_GPU else [("tiny", (2, 4, 7, 9))]
DTYPES = [torch.float16, torch.float32] if ON_GPU else [torch.float32]


def torch_step(x, model_output, coeffs, guidance_scale, prev_x0):
    """The same update as eager PyTorch would write it, in the tensors' own dtype."""
    uncond, cond = model_output.chunk(2)
    x0 = coeffs.c_x * x + coeffs.c_m * (uncond + guidance_scale * (cond - uncond))
    return coeffs.a_x * x + coeffs.a_0 * x0 + coeffs.a_p * prev_x0, x0


PROVIDER_FNS = {"fastdiff": scheduler_step, "torch": torch_step}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_scheduler_step(benchmark, measure, provider, dtype, name, shape):
    device = "cuda" if ON_GPU else "cpu"
    numel = torch.Size(shape).numel()
    nbytes = 6 * numel * dtype.itemsize
    sets = [(torch.randn(shape, device=device, dtype=dtype),
             torch.randn((2 * shape[0], *shape[1:]), device=device, dtype=dtype),
             torch.randn(shape, device=device, dtype=dtype)) for _ in range(input_sets(nbytes * 2 // 3))]
    fn = PROVIDER_FNS[provider]
    benchmark.group = f"scheduler_step {name} {dtype}"
    benchmark.extra_info.update(op="scheduler_step", shape=name, dims=list(shape), dtype=str(dtype),
                                provider=provider)
    measure(lambda i: (lambda: fn(sets[i][0], sets[i][1], COEFFS, GUIDANCE, sets[i][2])), len(sets), nbytes=nbytes)
