"""Linear biases moved into the LayerNorm pass beside them (`FastConfig.fold_biases`) against the Linears keeping
their own, on SD1.5's transformer shapes at 512 px, CFG batch 2 and 16. Each side times the pair as the UNet runs
it, the matmul and the residual LayerNorm:

  to_out   torch:    F.linear(o, W, b) (cuBLAS's bias epilogue), then add_layer_norm(x, that)
           fastdiff: F.linear(o, W), then add_layer_norm(x, that, residual_bias=b)
  mlp_out  torch:    add_layer_norm(x, r) -> s, then s + F.linear(h, W2, b2) (eager add)
           fastdiff: add_layer_norm(x, r, stream_bias=b2) -> s + b2, then (s + b2).addmm_(h, W2^T) in place

FLOPs = 2 * M * K * N of the matmul. The in-place form accumulates into its input set on every replay, so W2 is
scaled down to keep the values finite over the timing.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import ON_GPU, PROVIDERS, input_sets
from fastdiff.kernels.layer_norm import add_layer_norm

_LEVELS = [("64x64", 4096, 320), ("32x32", 1024, 640), ("16x16", 256, 1280)]
SD_SHAPES = [(f"sd15-{level}-cfg{cfg}-{kind}", cfg * hw, k, c, kind)
             for cfg in (2, 16) for level, hw, c in _LEVELS for kind, k in (("to_out", c), ("mlp_out", 4 * c))]
SHAPES = SD_SHAPES if ON_GPU else [("tiny-to_out", 97, 40, 40, "to_out"), ("tiny-mlp_out", 97, 160, 40, "mlp_out")]
DTYPE = torch.float16 if ON_GPU else torch.float32


def to_out(folded, o, x, w, b, ln_w, ln_b):
    if folded:
        return add_layer_norm(x, F.linear(o, w), ln_w, ln_b, residual_bias=b)
    return add_layer_norm(x, F.linear(o, w, b), ln_w, ln_b)


def mlp_out(folded, h, x, r, w, b, ln_w, ln_b):
    if folded:
        s, _ = add_layer_norm(x, r, ln_w, ln_b, stream_bias=b)
        return s.addmm_(h, w.t())
    s, _ = add_layer_norm(x, r, ln_w, ln_b)
    return s + F.linear(h, w, b)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name, m, k, n, kind", SHAPES, ids=[s[0] for s in SHAPES])
def test_folded_bias(benchmark, measure, provider, name, m, k, n, kind):
    device = "cuda" if ON_GPU else "cpu"
    scale = 1e-3 if kind == "mlp_out" else 1.0
    w = (torch.randn(n, k, device=device) * scale / k**0.5).to(DTYPE)
    b, ln_w, ln_b = ((torch.randn(n, device=device) * 0.1).to(DTYPE) for _ in range(3))
    operands = 3 if kind == "mlp_out" else 2  # (h or o, x[, r])

    def make():
        return [torch.randn(m, k if i == 0 else n, device=device, dtype=DTYPE) for i in range(operands)]

    sets = [make() for _ in range(input_sets((m * k + (operands - 1) * m * n) * DTYPE.itemsize))]
    folded = provider == "fastdiff"
    fn = to_out if kind == "to_out" else mlp_out
    benchmark.group = f"folded_bias {name} {DTYPE}"
    benchmark.extra_info.update(op="folded_bias", shape=name, dims=[m, k, n], dtype=str(DTYPE), provider=provider)
    measure(lambda i: (lambda: fn(folded, *sets[i], w, b, ln_w, ln_b)), len(sets), flops=2 * m * k * n)


def test_folded_forms_match_the_linears_own_bias():
    """The two sides compute the same values (float32, CPU interpreter or GPU)."""
    device = "cuda" if ON_GPU else "cpu"
    gen = torch.Generator(device).manual_seed(0)
    o, h = (torch.randn(13, k, device=device, generator=gen) for k in (40, 160))
    x, r = (torch.randn(13, 40, device=device, generator=gen) for _ in range(2))
    w, w2 = torch.randn(40, 40, device=device, generator=gen), torch.randn(40, 160, device=device, generator=gen)
    b, ln_w, ln_b = (torch.randn(40, device=device, generator=gen) for _ in range(3))
    for got, want in zip(to_out(True, o, x, w, b, ln_w, ln_b), to_out(False, o, x, w, b, ln_w, ln_b)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mlp_out(True, h, x, r.clone(), w2, b, ln_w, ln_b),
                               mlp_out(False, h, x, r.clone(), w2, b, ln_w, ln_b), rtol=1e-5, atol=1e-4)
