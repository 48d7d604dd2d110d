"""The kernels under torch.compile: once registered as `torch.library.triton_op`s (`prepare_compile`), inductor
traces into them (`wrap_triton`) and launches the Triton kernels from its own generated code.

On the CPU the tracing runs in a fresh process without TRITON_INTERPRET (the interpreter's kernels cannot
be traced; tests/conftest.py sets it for this process), on fake tensors, so no kernel runs. The GPU test
compiles with inductor and checks that no opaque call to the ops is left in the generated code.
"""
import os
import subprocess
import sys

import pytest
import torch

from fastdiff.kernels import _triton

# For each attention shape, the traced launch must carry the config its caller names (every candidate), or the
# default one.
_TRACE_CONFIGS = """
import torch
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._library.triton import get_triton_kernels_for_op
from torch.fx.experimental.proxy_tensor import make_fx
import importlib

attention = importlib.import_module("fastdiff.kernels.attention")
group_norm = importlib.import_module("fastdiff.kernels.group_norm")
importlib.import_module("fastdiff.kernels._triton").prepare_compile()
assert get_triton_kernels_for_op("fastdiff::triton_attention"), "attention is not a triton_op"
assert len(get_triton_kernels_for_op("fastdiff::triton_group_norm")) == 4, "group_norm is not a triton_op"


def kernel_calls(graph):
    return [n for n in graph.graph.nodes if "triton_kernel_wrapper" in str(n.target)]


for sq, skv, d, dtype in [(4096, 4096, 40, torch.float16), (4096, 77, 40, torch.float16), (256, 77, 160, torch.float16),
                          (1024, 77, 80, torch.bfloat16), (97, 1025, 111, torch.float16), (300, 48, 64, torch.float16),
                          (64, 30, 40, torch.float32), (1024, 77, 80, torch.float32)]:
    q = torch.empty(2, sq, 8, d, dtype=dtype).transpose(1, 2)  # (B, H, S, D) views of (B, S, H, D), as diffusers
    kv = torch.empty(2, skv, 8, d, dtype=dtype).transpose(1, 2)
    for config in [None, *attention.candidate_configs(dtype, skv, d)]:
        named = None if config is None else list(config)
        (call,) = kernel_calls(make_fx(lambda q, k, v: attention._attention_traced(q, k, v, None, named),
                                       tracing_mode="fake")(q, kv, kv))
        # the constexprs are the call's arguments; torch keeps warps and stages as the kernel's one config
        args = call.kwargs["kwargs"]
        (options,) = kernel_side_table.get_kernel(call.kwargs["kernel_idx"]).configs
        got = (args["BLOCK_M"], args["BLOCK_N"], options.num_warps, options.num_stages)
        expected = config or attention.default_config(dtype, skv, d)
        print(sq, skv, d, dtype, "named", config, "traced", got)
        assert got == tuple(expected), (got, expected)
        assert args["EVEN_N"] == (skv % expected.block_n == 0)

w = torch.empty(320, dtype=torch.float16)
for single_launch_max, launches in ((1 << 30, 1), (0, 2)):  # the single-launch path, then the split one
    group_norm.SINGLE_LAUNCH_MAX = single_launch_max
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.empty(2, 320, 16, 16, dtype=torch.float16).to(memory_format=layout)
        calls = kernel_calls(make_fx(lambda x, w, b: group_norm._group_norm_traced(x, 32, w, b, 1e-5, "silu"),
                                     tracing_mode="fake")(x, w, w.clone()))
        calls += kernel_calls(make_fx(lambda x, w, b, o: group_norm._group_norm_traced(x, 32, w, b, 1e-5, "silu", o),
                                      tracing_mode="fake")(x, w, w.clone(), torch.empty(2, 320, dtype=torch.float16)))
        assert len(calls) == 2 * launches, calls  # without, then with an offset
        for call in calls:
            args = call.kwargs["kwargs"]
            tensors = [v for v in args.values() if isinstance(v, torch.fx.Node)]
            assert len(tensors) == len(set(tensors)), f"aliased kernel arguments: {args}"
print("traced")
"""


def test_triton_ops_trace_with_the_config_their_caller_names():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _TRACE_CONFIGS], capture_output=True, text=True, env=env,
                            timeout=300)
    print(result.stdout[-3000:], result.stderr[-3000:])
    assert result.returncode == 0 and result.stdout.strip().endswith("traced")


@pytest.mark.gpu
@pytest.mark.parametrize("single_launch_max", [1 << 30, 0], ids=["single-launch", "split"])
def test_inductor_launches_the_kernels_itself_and_matches_eager(single_launch_max, monkeypatch, caplog):
    """fullgraph compile of attention and GroupNorm+SiLU at SD1.5 shapes: the generated code holds no call
    of the fastdiff ops (inductor inlined the Triton kernels), inductor could read what each kernel writes
    (otherwise it assumes every input is written and copies them), and the results equal eager's."""
    import importlib

    from torch._inductor.utils import run_and_get_code

    _triton.prepare_compile()  # traceable triton_ops, not the opaque ones registered on import

    from fastdiff.kernels import attention, group_norm

    monkeypatch.setattr(importlib.import_module("fastdiff.kernels.group_norm"), "SINGLE_LAUNCH_MAX",
                        single_launch_max)

    def block(x, weight, bias, q, k, v):
        return group_norm(x, 32, weight, bias, 1e-5, "silu") * 2.0, attention(q, k, v) + 1.0

    torch.manual_seed(0)
    x = torch.randn(2, 320, 64, 64, device="cuda", dtype=torch.float16)
    weight, bias = torch.randn(320, device="cuda", dtype=torch.float16), torch.randn(320, device="cuda",
                                                                                      dtype=torch.float16)
    q = torch.randn(2, 4096, 8, 40, device="cuda", dtype=torch.float16).transpose(1, 2)
    k, v = (torch.randn(2, 77, 8, 40, device="cuda", dtype=torch.float16).transpose(1, 2) for _ in range(2))
    expected = block(x, weight, bias, q, k, v)
    torch._dynamo.reset()
    with caplog.at_level("WARNING", logger="torch._higher_order_ops.triton_kernel_wrap"):
        got, code = run_and_get_code(torch.compile(block, fullgraph=True), x, weight, bias, q, k, v)
    code = "\n".join(code)
    unread = [r.getMessage() for r in caplog.records if "assuming every input is mutated" in r.getMessage()]
    print(f"kernels inductor could not analyse: {len(unread)}")
    opaque = [name for name in ("fastdiff.triton_attention", "fastdiff.triton_group_norm") if name in code]
    for name, a, b in zip(("group_norm", "attention"), got, expected):
        err = (a.float() - b.float()).abs()
        print(f"{name}: compiled vs eager max abs err {err.max().item():.3e}, mean {err.mean().item():.3e}")
    print(f"opaque op calls left in inductor's code: {opaque}")
    assert not opaque and not unread
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
