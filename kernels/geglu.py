"""GEGLU's gate in one pass: value * GELU(gate) from the projection's output (..., 2N) = [value | gate].

Eager PyTorch runs it as two kernels (`gelu` on the gate half, then `mul`), which read the gate twice and
write and re-read an (..., N) intermediate; the fused kernel reads (..., 2N) once and writes (..., N) once.
GELU is the exact erf form, F.gelu's default: gelu(g) = g / 2 * (1 + erf(g / sqrt(2))).
"""
import torch
import torch.nn.functional as F
from torch import Tensor

from . import _triton
from ._triton import check_triton_device, triton

if triton is not None:
    import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_geglu_input(h: Tensor) -> None:
    """Shared validation for every backend: h must have a last dim that splits into value and gate halves."""
    if h.dim() == 0:
        raise ValueError("h must have a last dim holding [value | gate], got a 0-d tensor")
    if h.shape[-1] % 2:
        raise ValueError(f"h's last dim must be even (value and gate halves), got {h.shape[-1]}")


def geglu_ref(h: Tensor) -> Tensor:
    """Plain-PyTorch twin: value * F.gelu(gate), in h's dtype, exactly as fastdiff.models.unet.GEGLU computes
    it. h: (..., 2N) = [value | gate] -> (..., N)."""
    check_geglu_input(h)
    value, gate = h.chunk(2, dim=-1)
    return value * F.gelu(gate)


if triton is not None:

    # One pinned tile, no autotuning: 4 rows x 256 columns (256 divides SD's widths 1280, 2560 and 5120, so no
    # lane is masked), 4 warps. Timed on an H200 against the four other tiles the kernel used to autotune over
    # ((8, 256, 4), (16, 256, 8), (4, 512, 4), (8, 512, 8)) at SD1.5's four MLP shapes, CUDA-graph replay, fp16:
    # within 2.6% of the best tile at every shape (19.7 vs 19.3 us at 8192x1280, 10.2 vs 10.0, 5.65 vs 5.58,
    # and the best at 128x5120 by 14%). Autotuning compiled and timed all five per shape on a cold start.
    BLOCK_M, BLOCK_N, NUM_WARPS = 4, 256, 4

    # M not specialized: it only bounds the row mask, and a row count that is not a multiple of 16 (SDXL's
    # 832x1216 at CFG batch 2: 1,976) must not compile a variant of its own.
    @triton.jit(do_not_specialize=["M"])
    def _geglu_kernel(
        H,  # pointer to h, (M, 2N) contiguous: [value | gate] per row
        Out,  # pointer to the output, (M, N) contiguous
        M,  # rows: h's leading dims flattened
        N,  # output columns, half of h's last dim
        BLOCK_M: tl.constexpr,  # rows per program
        BLOCK_N: tl.constexpr,  # columns per program
    ):
        # One program per tile, column tiles fastest: neighbouring programs read neighbouring memory.
        pid = tl.program_id(0)
        tiles_n = tl.cdiv(N, BLOCK_N)
        rows = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        value_ptrs = H + rows[:, None].to(tl.int64) * (2 * N) + cols[None, :]
        value = tl.load(value_ptrs, mask=mask).to(tl.float32)
        gate = tl.load(value_ptrs + N, mask=mask).to(tl.float32)
        out = value * (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476)))  # 1/sqrt(2)
        tl.store(Out + rows[:, None].to(tl.int64) * N + cols[None, :], out.to(Out.dtype.element_ty), mask=mask)

    _geglu_launcher = _triton.Launcher(_geglu_kernel)  # repeat launches skip Triton's Python


def _geglu_launch(h: Tensor) -> Tensor:
    n = h.shape[-1] // 2
    out = torch.empty((*h.shape[:-1], n), dtype=h.dtype, device=h.device)
    m = h.numel() // h.shape[-1]
    _geglu_launcher[(_triton.cdiv(m, BLOCK_M) * _triton.cdiv(n, BLOCK_N),)](h, out, m, n, BLOCK_M=BLOCK_M,
                                                                            BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)
    return out


# Registered so torch.compile traces through it (fake tensors give the output shape) and keeps it in graphs;
# eager calls skip the dispatcher and launch directly, which saves tens of microseconds of host time.
_geglu_op = torch.library.custom_op("fastdiff::triton_geglu", mutates_args=())(_geglu_launch)


@_geglu_op.register_fake
def _(h):
    return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))


def geglu(h: Tensor) -> Tensor:
    """value * GELU(gate) with the Triton kernel: one read of h, one write of the output.

    h: (..., 2N) = [value | gate], any leading shape, float16, bfloat16 or float32, contiguous (a Linear's
    output is; strided rows are not supported). Exact erf GELU and the product in float32, rounded once to
    h's dtype. Returns (..., N), contiguous. Runs on CUDA tensors, or on the CPU under TRITON_INTERPRET=1.
    """
    check_geglu_input(h)
    if h.dtype not in DTYPES:
        raise ValueError(f"h has dtype {h.dtype}, expected one of {DTYPES}")
    if not h.is_contiguous():
        raise ValueError(f"h must be contiguous, got shape {tuple(h.shape)} with strides {h.stride()} "
                         "(call .contiguous() first)")
    check_triton_device(h)
    if h.numel() == 0:
        return h.new_empty((*h.shape[:-1], h.shape[-1] // 2))
    op = _geglu_op if torch.compiler.is_compiling() else _geglu_launch
    return op(h)
