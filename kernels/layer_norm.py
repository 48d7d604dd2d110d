"""LayerNorm over the last dim, optionally fused with the residual add before it.

The UNet's transformer blocks run `x = x + branch(...)` and then LayerNorm the sum, twice per block (and
LayerNorm the block's input once). Eager PyTorch makes that two kernels: the add reads x and the branch's
output and writes the sum, then LayerNorm reads the sum again and writes its output. `add_layer_norm`
reads x and the residual once and writes both the sum (the residual stream, still needed by the next add)
and LayerNorm(sum): 4 tensors moved instead of 5.

The sum is rounded to x's dtype before it is normalized, exactly as eager `s = x + r; F.layer_norm(s)`
does, so the residual stream written out is the tensor that was normalized.

Two optional bias vectors move the neighbouring Linears' biases into this pass (`FastConfig.fold_biases`):
cuBLAS's GEMM with a bias epilogue took 10.1 against 6.5 us without one at SD1.5's 8192x320x320 on an H200
(46.4 against 30.3 us at 65536 rows), while adding a (C,) vector here costs nothing measurable.
  residual_bias  the bias of the Linear that made `residual` (attention's to_out), added into the sum:
                 s = x + (residual + residual_bias). With residual=None, s = x + residual_bias (proj_in's bias
                 on its own output).
  stream_bias    the bias of the Linear whose output is added to s next (the MLP's output Linear, run as an
                 in-place `addmm_` onto the stream): written out is s + stream_bias, normalized is s. Eager
                 calls without one add -0.0 (`_triton.constant_row`), which changes no value: both launch one
                 compiled variant.

`copies` writes both outputs that many times, stacked along dim 0: a UNet's shared sample parts into the
unconditional and conditional rows of classifier-free guidance right after this pass (before the first
cross-attention), and the copies are written here instead of by a torch.cat that reads them back.

One program holds BLOCK_M whole rows of BLOCK_N = next_power_of_2(C) columns in registers (SD's widths
320, 640, 1280; at most MAX_WIDTH). Mean and variance come from two passes over those registers, the second
over x - mean, so nothing cancels. There is no autotuning: rows per program and warps follow from the tile
size, so a cold start compiles one variant per (dtype, width, rows per program, residual or not).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.library import wrap_triton

from . import _triton
from ._triton import check_triton_device, triton

if triton is not None:
    import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TILE = 4096  # elements per program (BLOCK_M * BLOCK_N) when the width allows it
MAX_WIDTH = 8192  # widest row held in registers: 16 float32 values per thread and tensor at MAX_WARPS
MAX_WARPS = 16  # warps per program: one per 512 elements of the tile


def check_layer_norm_shapes(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                            bias: Optional[Tensor], residual_bias: Optional[Tensor] = None,
                            stream_bias: Optional[Tensor] = None) -> None:
    """Validation shared by every backend: x (..., C), residual x's shape, weight, bias and the two stream
    biases (C,)."""
    if x.dim() == 0:
        raise ValueError("x must have a last dim to normalize over, got a 0-d tensor")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, expected x's shape {tuple(x.shape)}")
    width = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias), ("residual_bias", residual_bias),
                    ("stream_bias", stream_bias)):
        if t is not None and tuple(t.shape) != (width,):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({width},)")


def layer_norm_ref(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   eps: float = 1e-5) -> Tensor:
    """Plain-PyTorch twin: F.layer_norm over the last dim, as nn.LayerNorm computes it. x: (..., C)."""
    check_layer_norm_shapes(x, None, weight, bias)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def _check_addend(x: Tensor, residual: Optional[Tensor], residual_bias: Optional[Tensor], copies: int = 1) -> None:
    if residual is None and residual_bias is None:
        raise ValueError("add_layer_norm needs something to add: residual, residual_bias or both (use layer_norm "
                         "for LayerNorm alone)")
    if not isinstance(copies, int) or isinstance(copies, bool) or copies < 1:
        raise ValueError(f"copies must be an int >= 1, got {copies!r}")
    if copies > 1 and x.dim() < 2:
        raise ValueError(f"copies > 1 stacks along dim 0, which x of shape {tuple(x.shape)} lacks (it is the width)")


def add_layer_norm_ref(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor] = None,
                       bias: Optional[Tensor] = None, eps: float = 1e-5, residual_bias: Optional[Tensor] = None,
                       stream_bias: Optional[Tensor] = None, copies: int = 1) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch twin: s = x + (residual + residual_bias) in x's dtype, then F.layer_norm(s), as
    fastdiff.models.unet.BasicTransformerBlock computes them (a missing term is left out). x, residual:
    (..., C); residual_bias, stream_bias: (C,) or None -> (s + stream_bias, LayerNorm(s)), each repeated
    `copies` times along dim 0 (torch.cat)."""
    check_layer_norm_shapes(x, residual, weight, bias, residual_bias, stream_bias)
    _check_addend(x, residual, residual_bias, copies)
    if residual is None:
        s = x + residual_bias
    else:
        s = x + (residual if residual_bias is None else residual + residual_bias)
    y = F.layer_norm(s, s.shape[-1:], weight, bias, eps)
    stored = s if stream_bias is None else s + stream_bias
    rows = copies * x.shape[0]
    return _triton.repeat_samples(stored, rows), _triton.repeat_samples(y, rows)


if triton is not None:

    # Not specialized: copies (1 nearly always, 2 or the guidance rows once per UNet call) and M (the rows: a new
    # size or batch), which only mask rows; N's divisibility gives every row's alignment. Neither may compile a
    # variant of its own.
    @triton.jit(do_not_specialize=["M", "copies"])
    def _layer_norm_kernel(
        X,  # pointer to x, (M, N) contiguous
        R,  # pointer to the residual, (M, N) contiguous, or None
        RB,  # pointer to the residual's bias (N,), added into the sum, or None
        SB,  # pointer to the stream bias (N,), added to the stored sum only, or None
        S,  # pointer to the output s = x + residual + residual bias (+ stream bias), (M, N), or None without
        #   HAS_RESIDUAL
        Y,  # pointer to the output LayerNorm(s) (or LayerNorm(x)), (M, N)
        W,  # pointer to weight (N,), or None
        B,  # pointer to bias (N,), or None
        M,  # rows: x's leading dims flattened
        N,  # columns: the normalized width C
        eps,  # added to the variance
        copies,  # outputs written this many times, copy k at rows k * M.. (only with HAS_RESIDUAL)
        HAS_RESIDUAL: tl.constexpr,  # add the residual and/or its bias first and write the sum to S
        BLOCK_M: tl.constexpr,  # rows per program
        BLOCK_N: tl.constexpr,  # next_power_of_2(N): whole rows in registers
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_N)
        mask_n = cols < N
        mask = (rows < M)[:, None] & mask_n[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0)
        copy_step = tl.cast(M, tl.int64) * N  # elements from one copy of an output to the next
        if HAS_RESIDUAL:
            # Round the sum to the dtype, as eager `x + r` does: the stored residual stream is what is normalized.
            r = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # the addend: residual + its bias
            if R is not None:
                r += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
            if RB is not None:
                r += tl.load(RB + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            s = (x.to(tl.float32) + r).to(S.dtype.element_ty)
            stored = s
            if SB is not None:  # the next Linear's bias rides in the stored stream, not in what is normalized
                stream_bias = tl.load(SB + cols, mask=mask_n, other=0.0).to(tl.float32)
                stored = (s.to(tl.float32) + stream_bias[None, :]).to(S.dtype.element_ty)
            ptrs = S + offs
            for _ in range(copies):
                tl.store(ptrs, stored, mask=mask)
                ptrs += copy_step
            x = s
        x = x.to(tl.float32)
        eps = tl.cast(eps, tl.float32)  # torch.compile passes Python floats as float64: keep the statistics float32
        count = tl.cast(N, tl.float32)
        mean = tl.sum(x, 1) / count  # padded columns hold zeros
        d = tl.where(mask_n[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / count + eps)
        y = d * rstd[:, None]
        if W is not None:
            y *= tl.load(W + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if B is not None:
            y += tl.load(B + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y = y.to(Y.dtype.element_ty)
        if HAS_RESIDUAL:
            ptrs = Y + offs
            for _ in range(copies):
                tl.store(ptrs, y, mask=mask)
                ptrs += copy_step
        else:
            tl.store(Y + offs, y, mask=mask)

    _layer_norm_launcher = _triton.Launcher(_layer_norm_kernel)  # repeat launches skip Triton's Python


def _rows_per_program(rows: int, block_n: int, device) -> int:
    """TILE // block_n rows per program, fewer when that would leave SMs without a program (SD's 2x64x1280:
    128 rows, one per program)."""
    per_sm = _triton.cdiv(rows, _triton.sm_count(device))
    return max(1, min(TILE // block_n, 1 << (per_sm.bit_length() - 1)))


def _layer_norm_run(kernel, x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                    eps: float, residual_bias: Optional[Tensor] = None, stream_bias: Optional[Tensor] = None,
                    add: bool = False, copies: int = 1) -> tuple[Optional[Tensor], Tensor]:
    """Launch `kernel` (the Launcher, or the kernel wrapped by wrap_triton while torch.compile traces);
    returns (s or None, y). add: the add_layer_norm form (the sum s written out), `copies` times."""
    width = x.shape[-1]
    rows = x.numel() // width
    shape = (copies * x.shape[0], *x.shape[1:])
    s = x.new_empty(shape) if add else None
    y = x.new_empty(shape)
    block_n = _triton.next_power_of_2(width)

    def launch(block_m: int) -> None:
        num_warps = min(MAX_WARPS, max(1, block_m * block_n // 512))  # 16 values per thread and tensor
        kernel[(_triton.cdiv(rows, block_m),)](x, residual, residual_bias, stream_bias, s, y, weight, bias, rows,
                                               width, eps, copies, HAS_RESIDUAL=add, BLOCK_M=block_m,
                                               BLOCK_N=block_n, num_warps=num_warps)

    launch(_rows_per_program(rows, block_n, x.device))
    _triton.compile_later(launch, (1 << i for i in range(max(1, TILE // block_n).bit_length())))  # other row counts
    return s, y


def _layer_norm_launch(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    return _layer_norm_run(_layer_norm_launcher, x, None, weight, bias, eps)[1]


def _layer_norm_traced(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    return _layer_norm_run(wrap_triton(_layer_norm_kernel), x, None, weight, bias, eps)[1]


def _add_layer_norm_launch(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                           eps: float, residual_bias: Optional[Tensor], stream_bias: Optional[Tensor],
                           copies: int) -> tuple[Tensor, Tensor]:
    if stream_bias is None:  # -0.0 added changes no value, and the calls with a stream bias share the variant
        stream_bias = _triton.constant_row(-0.0, x.shape[-1], x)
    return _layer_norm_run(_layer_norm_launcher, x, residual, weight, bias, eps, residual_bias, stream_bias, add=True,
                           copies=copies)


def _add_layer_norm_traced(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                           eps: float, residual_bias: Optional[Tensor], stream_bias: Optional[Tensor],
                           copies: int) -> tuple[Tensor, Tensor]:
    return _layer_norm_run(wrap_triton(_layer_norm_kernel), x, residual, weight, bias, eps, residual_bias,
                           stream_bias, add=True, copies=copies)


# The ops torch.compile puts in its graphs (see _triton.CompileOp); eager calls launch directly.
_layer_norm_op = _triton.CompileOp("fastdiff::triton_layer_norm", _layer_norm_launch, _layer_norm_traced,
                                   fake=lambda x, weight, bias, eps: torch.empty_like(x))
_add_layer_norm_op = _triton.CompileOp(
    "fastdiff::triton_add_layer_norm", _add_layer_norm_launch, _add_layer_norm_traced,
    fake=lambda x, residual, weight, bias, eps, residual_bias, stream_bias, copies: tuple(
        x.new_empty((copies * x.shape[0], *x.shape[1:])) for _ in range(2)))


def check_layer_norm_inputs(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
                            eps: float, residual_bias: Optional[Tensor] = None,
                            stream_bias: Optional[Tensor] = None) -> None:
    """Raise ValueError naming the bad value when the Triton kernel cannot compute this LayerNorm."""
    check_layer_norm_shapes(x, residual, weight, bias, residual_bias, stream_bias)
    if x.dtype not in DTYPES:
        raise ValueError(f"x has dtype {x.dtype}, expected one of {DTYPES}")
    if x.shape[-1] > MAX_WIDTH:
        raise ValueError(f"x's last dim is {x.shape[-1]}, over the kernel's limit {MAX_WIDTH}")
    for name, t in (("x", x), ("residual", residual)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got shape {tuple(t.shape)} with strides {t.stride()} "
                             "(call .contiguous() first)")
    _triton.check_like(x, residual=residual, weight=weight, bias=bias, residual_bias=residual_bias,
                       stream_bias=stream_bias)
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    check_triton_device(x)


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5) -> Tensor:
    """LayerNorm over the last dim with the Triton kernel: one read of x, one write.

    x: (..., C), contiguous, float16, bfloat16 or float32, C <= MAX_WIDTH; weight, bias: (C,) in x's dtype,
    or None. Statistics in float32. Returns (..., C) in x's dtype, contiguous. Runs on CUDA tensors, or on
    the CPU under TRITON_INTERPRET=1.
    """
    check_layer_norm_inputs(x, None, weight, bias, eps)
    weight, bias = (None if t is None else t.contiguous() for t in (weight, bias))
    if x.numel() == 0:
        return torch.empty_like(x)
    op = _layer_norm_op if torch.compiler.is_compiling() else _layer_norm_launch
    return op(x, weight, bias, float(eps))


def add_layer_norm(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, residual_bias: Optional[Tensor] = None,
                   stream_bias: Optional[Tensor] = None, copies: int = 1) -> tuple[Tensor, Tensor]:
    """s = x + residual and LayerNorm(s) over the last dim with one Triton kernel: reads x and residual once,
    writes s and LayerNorm(s) (each `copies` times, stacked along dim 0).

    x, residual: (..., C), same shape and dtype (float16, bfloat16 or float32), contiguous, C <= MAX_WIDTH;
    weight, bias: (C,) in x's dtype, or None. residual_bias (C,) or None: added to the residual (the bias its
    Linear left out); residual may be None when it is given, and s = x + residual_bias. stream_bias (C,) or
    None: added to the s written out, not to the s normalized (the next Linear's bias, see the module
    docstring). s is rounded to the dtype before it is normalized, as eager `s = x + residual;
    F.layer_norm(s)` does; statistics in float32. Returns (s + stream_bias, LayerNorm(s)), both (..., C) in
    x's dtype, contiguous, with copies * x.shape[0] rows in dim 0: [s; s; ...] and [y; y; ...]. Runs on CUDA
    tensors, or on the CPU under TRITON_INTERPRET=1.
    """
    check_layer_norm_inputs(x, residual, weight, bias, eps, residual_bias, stream_bias)
    _check_addend(x, residual, residual_bias, copies)
    weight, bias, residual_bias, stream_bias = (None if t is None else t.contiguous()
                                                for t in (weight, bias, residual_bias, stream_bias))
    if x.numel() == 0:
        return tuple(x.new_empty((copies * x.shape[0], *x.shape[1:])) for _ in range(2))
    op = _add_layer_norm_op if torch.compiler.is_compiling() else _add_layer_norm_launch
    return op(x, residual, weight, bias, float(eps), residual_bias, stream_bias, copies)
