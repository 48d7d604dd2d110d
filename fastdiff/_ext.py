"""Loader for the compiled extension `fastdiff._C` (csrc/): its scheduler_step, matmul, CUDA graph surgery and
graphs that choose on the GPU.
A missing or broken build never breaks `import fastdiff`: it only makes the `cuda` backend unavailable, with
the reason kept for `fastdiff info`."""
from typing import Optional

import torch  # loads libtorch before _C, which links against it
from torch import Tensor

from fastdiff.kernels.matmul import check_matmul_inputs

try:
    from fastdiff import _C
    _load_error: Optional[str] = None
except Exception as e:  # ImportError, or an ABI mismatch surfacing as OSError/RuntimeError
    _C = None
    _load_error = f"{type(e).__name__}: {e}"

_availability: dict[tuple[str, str], tuple[bool, str]] = {}


def _check(device_type: str) -> tuple[bool, str]:
    if _C is None:
        return False, (f"fastdiff._C not built or failed to load ({_load_error}); rebuild with "
                       "`pip install -v --no-build-isolation -e .` to see why")
    if device_type == "cpu":
        threads = f"OpenMP, {torch.get_num_threads()} threads" if _C.with_openmp else "single-threaded build"
        return True, f"fastdiff._C C++ ({threads})"
    if device_type == "cuda":
        if not _C.with_cuda:
            return False, ("fastdiff._C was built without its CUDA part (torch without CUDA, no nvcc, "
                           "FASTDIFF_SKIP_CUDA_BUILD=1, or a failed CUDA build)")
        if not torch.cuda.is_available():
            return False, "torch sees no CUDA device"
        problem = _C.cuda_status()
        if problem:
            return False, f"fastdiff._C's CUDA kernels cannot run on this GPU: {problem}"
        return True, f"fastdiff._C CUDA ({torch.cuda.get_device_name()})"
    return False, f"fastdiff._C runs on cpu and cuda tensors, not {device_type}"


def _check_cuda(device_type: str, what: str) -> tuple[bool, str]:
    """_check, for a part of fastdiff._C (`what`) that runs on CUDA alone."""
    ok, why = _check(device_type)
    if ok and device_type != "cuda":
        return False, f"{what} runs on CUDA, not {device_type}"
    return ok, why


def _check_matmul(device_type: str) -> tuple[bool, str]:
    ok, why = _check_cuda(device_type, "fastdiff._C's matmul")
    if not ok:
        return ok, why
    if not _C.with_cublas:
        return False, "fastdiff._C was built without its GEMM (the CUDA toolkit had no cuBLAS headers)"
    return True, why + ", cuBLAS without a workspace"


def _check_graph(device_type: str) -> tuple[bool, str]:
    ok, why = _check_cuda(device_type, "CUDA graph surgery")
    if not ok:
        return ok, why
    try:
        torch.cuda.CUDAGraph(keep_graph=True)
    except TypeError:
        return False, f"torch {torch.__version__}'s CUDAGraph has no keep_graph (a graph to edit before instantiating)"
    return True, why + ", graph surgery"


def _check_choice(device_type: str) -> tuple[bool, str]:
    ok, why = _check_graph(device_type)
    if not ok:
        return ok, why
    if not _C.graph_choice_supported():
        return False, "fastdiff._C or the driver predates CUDA graphs' if/else conditional nodes (CUDA 12.8)"
    return True, why + ", conditional nodes"


_CHECKS = {"scheduler_step": _check, "matmul": _check_matmul, "graph": _check_graph, "choice": _check_choice}


def availability(device_type: str, op: str = "scheduler_step") -> tuple[bool, str]:
    """Whether `fastdiff._C` can run `op` (scheduler_step, matmul, graph or choice: `graph_if_equal_halves`) on
    `device_type`, and why (not)."""
    key = (device_type, op)
    if key not in _availability:  # the seam asks on every call; the answer never changes
        if op not in _CHECKS:
            raise ValueError(f"op must be one of {tuple(_CHECKS)}, got {op!r}")
        _availability[key] = _CHECKS[op](device_type)
    return _availability[key]


# Memsets up to this size become kernel nodes (`graph_memsets_to_kernels`); the ones seen in captures are 4 bytes.
MEMSET_KERNEL_MAX_BYTES = 1 << 16


def graph_memsets_to_kernels(graph: "torch.cuda.CUDAGraph", max_bytes: int = MEMSET_KERNEL_MAX_BYTES) -> int:
    """Replace the small memset nodes of a captured graph by kernel nodes that write the same bytes, with the same
    dependencies (csrc/graph.h), and return how many were replaced. In a replayed graph a memset node idles the GPU
    for microseconds around it; the ones in fastdiff's UNet graphs are cuDNN's 4-byte workspace counters.

    graph: captured with `torch.cuda.CUDAGraph(keep_graph=True)` and not yet instantiated; call
    `graph.instantiate()` after this."""
    ok, why = availability("cuda", "graph")
    if not ok:
        raise RuntimeError("fastdiff._C graph surgery is not available: " + why)
    if not isinstance(graph, torch.cuda.CUDAGraph):
        raise ValueError(f"graph must be a torch.cuda.CUDAGraph, got {type(graph).__name__}")
    try:
        raw = graph.raw_cuda_graph()
    except RuntimeError as e:  # no keep_graph, or nothing captured
        raise ValueError(f"graph must be captured with keep_graph=True and not yet instantiated: {e}") from None
    replaced, _ = _C.graph_memsets_to_kernels(raw, max_bytes)
    return replaced


def graph_if_equal_halves(x: Tensor, equal: "torch.cuda.CUDAGraph", unequal: "torch.cuda.CUDAGraph"):
    """One graph, launched by its `replay()`, that replays `equal` where the two halves of x (its rows) are bitwise
    equal at that moment and `unequal` otherwise: a kernel compares them and sets the condition of an if/else
    conditional node whose bodies are clones of the two (csrc/graph.h). The choice is the GPU's: no host
    synchronisation. Both graphs are captured with keep_graph=True and not instantiated; keep them (and the memory
    pool they were captured in) alive as long as this one. x: contiguous or channels_last, an even number of rows,
    its address and half its bytes multiples of 16."""
    ok, why = availability("cuda", "choice")
    if not ok:
        raise RuntimeError("fastdiff._C graph_if_equal_halves is not available: " + why)
    return _C.graph_if_equal_halves(x, equal.raw_cuda_graph(), unequal.raw_cuda_graph())


def matmul(x: Tensor, weight: Tensor, out: Optional[Tensor] = None, accumulate: bool = False) -> Tensor:
    """x @ weight^T through fastdiff._C's cuBLAS call without a workspace; same contract as `matmul_ref`
    (`fastdiff.kernels.matmul`). float16/bfloat16 CUDA tensors; x is used as a flat (rows, K) matrix, copied
    only when it is not contiguous."""
    check_matmul_inputs(x, weight, out, accumulate)
    ok, why = availability(x.device.type, "matmul")
    if not ok:
        raise RuntimeError("fastdiff._C matmul is not available: " + why)
    if out is None:
        out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    reduced = (torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction if x.dtype == torch.float16
               else torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction)
    _C.matmul_nt(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), out.view(-1, weight.shape[0]),
                 accumulate, bool(reduced))
    return out


def scheduler_step(x: Tensor, model_output: Tensor, coeffs, guidance_scale: Optional[float] = None,
                   prev_x0: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Fused CFG combine + solver step in fastdiff._C; same contract as `scheduler_step_ref`.

    x: (B, ...); model_output: (2B, ...) = [uncond; cond] with guidance_scale, else (B, ...); prev_x0 and
    noise: (B, ...) or None; coeffs: a `StepCoeffs`. All of x's dtype (float16/bfloat16/float32/float64)
    and device (cpu or cuda). The kernels walk flat memory: contiguous tensors, or all channels_last, go in
    as they are; any other operand is first copied into x's layout (contiguous when x is strided).
    Returns (x_next, x0) shaped, typed and laid out like x.
    """
    if _C is None:
        raise RuntimeError("fastdiff._C scheduler_step is not available: " + availability(x.device.type)[1])
    layout = torch.contiguous_format
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        layout = torch.channels_last
    return _C.scheduler_step(x.contiguous(memory_format=layout), model_output.contiguous(memory_format=layout),
                             coeffs, guidance_scale,
                             None if prev_x0 is None else prev_x0.contiguous(memory_format=layout),
                             None if noise is None else noise.contiguous(memory_format=layout))
