"""The transformers' linears with their epilogue: fastdiff's Triton matmul (the GEGLU gate or the residual add
in the kernel, `fastdiff.kernels.linear`) against torch (cuBLAS `F.linear`, then the epilogue as its own pass:
fastdiff's GEGLU kernel for the gate, an eager add for the residual), on SD1.5's shapes at 512 and 768 px.

FLOPs = 2 * M * K * N' (N' = the weight's rows). The GEGLU projection, the MLP's output Linear and proj_out at
each transformer level: at 512 px (64x64, 32x32 and 16x16 latents) with CFG batch 2 and 16 (batch 1 and 8
images), at 768 px (96x96, 48x48, 24x24) with CFG batch 2.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import ON_GPU, PROVIDERS, input_sets
from fastdiff.kernels.geglu import geglu
from fastdiff.kernels.linear import linear, linear_ref

# (name, rows M, K, weight rows N', epilogue)
_LEVELS = {512: [("64x64", 4096, 320), ("32x32", 1024, 640), ("16x16", 256, 1280)],
           768: [("96x96", 9216, 320), ("48x48", 2304, 640), ("24x24", 576, 1280)]}
_CFG_BATCHES = {512: (2, 16), 768: (2,)}
SD_SHAPES = [(f"sd15-{level}-cfg{cfg}-{kind}", cfg * hw, k, n, kind)
             for px, levels in _LEVELS.items() for cfg in _CFG_BATCHES[px] for level, hw, c in levels
             for kind, k, n in (("geglu", c, 8 * c), ("mlp_out", 4 * c, c), ("proj_out", c, c))]
SHAPES = SD_SHAPES if ON_GPU else [("tiny-geglu", 97, 40, 320, "geglu"), ("tiny-residual", 97, 40, 48, "residual")]
DTYPES = [torch.float16] if ON_GPU else [torch.float32]


def _torch(x, weight, bias, residual, geglu_):
    h = F.linear(x, weight, bias)
    if geglu_:
        return geglu(h) if ON_GPU else linear_ref(x, weight, bias, geglu=True)
    return residual + h


PROVIDER_FNS = {"fastdiff": linear, "torch": _torch}


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, m, k, n, kind", SHAPES, ids=[s[0] for s in SHAPES])
def test_linear(benchmark, measure, provider, dtype, name, m, k, n, kind):
    device = "cuda" if ON_GPU else "cpu"
    geglu_ = kind == "geglu"
    weight = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    bias = (torch.randn(n, device=device) * 0.1).to(dtype)
    out_n = n // 2 if geglu_ else n

    def make():
        x = torch.randn(m, k, device=device, dtype=dtype)
        return x, None if geglu_ else torch.randn(m, out_n, device=device, dtype=dtype)

    sets = [make() for _ in range(input_sets((m * k + m * out_n) * dtype.itemsize))]
    fn = PROVIDER_FNS[provider]
    benchmark.group = f"linear {name} {dtype}"
    benchmark.extra_info.update(op="linear", shape=name, dims=[m, k, n], dtype=str(dtype), provider=provider)
    measure(lambda i: (lambda: fn(sets[i][0], weight, bias, sets[i][1], geglu_)), len(sets), flops=2 * m * k * n)
