"""Host time of one eager call: what a host-bound caller (a diffusers pipeline at batch 1) pays per op.

Shapes from SD1.5's 8x8 level, where the GPU work is a few microseconds, so the time per call is the
host's: fastdiff's ops (the public kernel functions, checks included) against torch's eager equivalents,
and fastdiff inside `Launcher.disabled()` (every call through Triton's own `kernel[grid](...)`), which
shows what the launcher saves. Each round times `ITERATIONS` back-to-back calls without synchronizing
(the GPU keeps up), so the figure is microseconds of host time per call. CUDA only: skipped elsewhere.
"""
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from conftest import ON_GPU
from fastdiff.kernels import _triton
from fastdiff.kernels.attention import attention
from fastdiff.kernels.geglu import geglu, geglu_ref
from fastdiff.kernels.group_norm import group_norm

pytestmark = pytest.mark.skipif(not ON_GPU, reason="host time of CUDA launches: needs a CUDA device")
ITERATIONS = 200


def _attention_case():
    q, k, v = (torch.randn(2, 8, s, 160, device="cuda", dtype=torch.float16) for s in (64, 64, 64))
    return {"torch": lambda: F.scaled_dot_product_attention(q, k, v), "fastdiff": lambda: attention(q, k, v)}


def _group_norm_case():
    x = torch.randn(2, 1280, 8, 8, device="cuda", dtype=torch.float16)
    w, b = torch.randn(1280, device="cuda", dtype=torch.float16), torch.randn(1280, device="cuda", dtype=torch.float16)
    return {"torch": lambda: F.silu(F.group_norm(x, 32, w, b)),
            "fastdiff": lambda: group_norm(x, 32, w, b, activation="silu")}


def _geglu_case():
    h = torch.randn(2, 64, 2 * 5120, device="cuda", dtype=torch.float16)
    return {"torch": lambda: geglu_ref(h), "fastdiff": lambda: geglu(h)}


CASES = {"attention 2x8x64x64 D160": _attention_case, "group_norm+silu 2x1280x8x8": _group_norm_case,
         "geglu 2x64x10240": _geglu_case}


@pytest.mark.parametrize("provider", ["torch", "fastdiff", "fastdiff_triton_launch"])
@pytest.mark.parametrize("case", list(CASES))
def test_host_overhead(benchmark, provider, case):
    calls = CASES[case]()
    fn = calls["torch" if provider == "torch" else "fastdiff"]
    with _triton.Launcher.disabled() if provider == "fastdiff_triton_launch" else nullcontext():
        fn()  # compile, autotune and record outside the timing
        torch.cuda.synchronize()
        benchmark.group = f"host time {case}"
        benchmark.pedantic(fn, iterations=ITERATIONS, rounds=15, warmup_rounds=2)
        torch.cuda.synchronize()
    us = benchmark.stats.stats.median * 1e6
    benchmark.extra_info.update(op="host_us_per_call", case=case, provider=provider, us=us)
    print(f"{case:32} {provider:24} {us:7.1f} us per call")
