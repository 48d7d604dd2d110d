"""What every Triton kernel module shares: the optional import, interpreter mode, the device check."""
import functools
import os

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


def jit_function(kernel):
    """The @triton.jit function under a kernel's @triton.autotune / @triton.heuristics wrappers (tools that
    compile a kernel for a GPU they do not run on need it; not under the interpreter)."""
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def sm_count(device) -> int:
    """Streaming multiprocessors of `device` (1 for the CPU interpreter): sizes persistent grids."""
    return _sm_count(str(device))


@functools.lru_cache(maxsize=None)
def _sm_count(device: str) -> int:
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count if device.startswith("cuda") else 1
