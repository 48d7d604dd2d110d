"""What every Triton kernel module shares: the optional import, interpreter mode, the device check."""
import functools
import os
from typing import Callable

import torch
from torch import Tensor

try:
    import triton
except ImportError:  # CPU-only installs without triton keep the `<op>_ref` twins
    triton = None

# TRITON_INTERPRET is read when a kernel is defined: set it before importing fastdiff to run on the CPU.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def check_triton_device(t: Tensor) -> None:
    """Triton kernels run on CUDA tensors, or on CPU tensors only under the interpreter."""
    if triton is None:
        raise RuntimeError("the Triton kernels need the triton package, which does not import here")
    if t.device.type != "cuda" and not INTERPRET:
        raise ValueError(f"Triton kernels need CUDA tensors, got a tensor on {t.device} "
                         "(set TRITON_INTERPRET=1 before importing fastdiff to run them on the CPU interpreter)")


def sm_count(device) -> int:
    """Streaming multiprocessors of `device` (1 for the CPU interpreter): sizes persistent grids."""
    return _sm_count(str(device))


@functools.lru_cache(maxsize=None)
def _sm_count(device: str) -> int:
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count if device.startswith("cuda") else 1


def register_op(name: str, launch: Callable, traced: Callable, fake: Callable):
    """Register a kernel's host function as the torch.library op that torch.compile calls.

    With compiled kernels this is a `torch.library.triton_op` over `traced` (the launch with each kernel
    wrapped by `torch.library.wrap_triton`): inductor traces into it, autotunes the kernels itself and
    launches them from its generated code, so a compiled graph neither pays the Python dispatcher and
    launcher (~100 us of host time per call) nor loses the buffers around the op to an opaque call.
    The interpreter's kernels (TRITON_INTERPRET=1, CPU tests) cannot be traced with fake tensors, so there
    `launch` becomes an opaque `custom_op` whose output layout comes from `fake`. Eager calls skip both and
    call `launch` directly.
    """
    if triton is None or INTERPRET:
        op = torch.library.custom_op(name, launch, mutates_args=())
        op.register_fake(fake)
        return op
    return torch.library.triton_op(name, traced, mutates_args=())
