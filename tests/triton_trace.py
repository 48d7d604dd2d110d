"""What torch.compile sees of a compiled (not interpreted) Triton op, checked on the CPU.

A fresh process without TRITON_INTERPRET (tests/conftest.py sets it for the pytest process) traces the op's
host function on fake tensors with `make_fx`, and hands Triton an sm_90 target so that inductor's analysis of a
kernel's IR runs without a GPU. Used by the kernels' tests: `assert_traces(script)` runs PREAMBLE + script.
"""
import os
import subprocess
import sys

PREAMBLE = '''
import importlib

import torch
import triton
from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors, kernel_side_table
from torch._library.triton import get_triton_kernels_for_op
from torch.fx.experimental.proxy_tensor import make_fx
from triton.backends.compiler import GPUTarget


class Sm90:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


triton.runtime.driver.set_active(Sm90())
importlib.import_module("fastdiff.kernels._triton").prepare_compile()  # every kernel a traceable triton_op


def kernels_writes(graph) -> list:
    """The buffers inductor's analysis finds written by each Triton kernel call in `graph` (a make_fx trace), in
    call order; each call's arguments must be distinct buffers. If the analysis failed, inductor would assume
    every input written and copy each one around the call."""
    found = []
    for call in [n for n in graph.graph.nodes if "triton_kernel_wrapper" in str(n.target)]:
        args = call.kwargs["kwargs"]
        nodes = {k: v for k, v in args.items() if isinstance(v, torch.fx.Node)}
        assert len(set(nodes.values())) == len(nodes), f"aliased kernel arguments: {args}"
        kernel = kernel_side_table.get_kernel(call.kwargs["kernel_idx"])
        real = {**args, **kernel_side_table.get_constant_args(call.kwargs["constant_args_idx"]),  # None pointers
                **{k: torch.empty(v.meta["val"].shape, dtype=v.meta["val"].dtype) for k, v in nodes.items()}}
        found.append({dep.name for dep in identify_accessed_tensors(kernel, real, {}).read_writes.writes})
    return found


def kernel_writes(graph) -> set:
    """kernels_writes of a trace with exactly one Triton kernel call."""
    (writes,) = kernels_writes(graph)
    return writes
'''


def assert_traces(script: str, timeout: int = 300) -> None:
    """Run PREAMBLE + script in a fresh process; it must finish without an error."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", PREAMBLE + script + '\nprint("traced")\n'], capture_output=True,
                            text=True, env=env, timeout=timeout)
    print(result.stdout[-3000:], result.stderr[-3000:])
    assert result.returncode == 0 and result.stdout.strip().endswith("traced")
