"""Fused sampling update: classifier-free guidance combine + one solver step, in one pass over memory.

Every solver fastdiff fuses (Euler, Euler ancestral, DDIM, DPM++ 2M, ...) is, for one step, a linear form
in the current sample, the (guided) model output, the previous step's denoised estimate and a noise tensor.
The solver-specific part is only the handful of scalar coefficients, which `fastdiff.schedulers` derives
on the host from the schedule (see `StepCoeffs`); the kernel is the same for all of them:

    m       = u + g * (c - u)          if guidance_scale g is given (model_output = [u; c], uncond first)
            = model_output             otherwise
    x0      = c_x * x + c_m * m                                     # prediction type -> denoised sample
    x_next  = a_x * x + a_0 * x0 + a_p * prev_x0 + a_n * noise      # the solver step

Returns (x_next, x0); x0 is what multistep solvers feed back as `prev_x0` on the next step.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import _triton
from ._triton import check_triton_device, triton

if triton is not None:
    import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class StepCoeffs(NamedTuple):
    """Scalar coefficients of one fused step (units: whatever space the sampler runs in)."""

    c_x: float  # x0 = c_x * x + c_m * m
    c_m: float
    a_x: float  # x_next = a_x * x + a_0 * x0 + a_p * prev_x0 + a_n * noise
    a_0: float
    a_p: float = 0.0
    a_n: float = 0.0


def check_step_inputs(x: Tensor, model_output: Tensor, guidance_scale: Optional[float],
                      prev_x0: Optional[Tensor], noise: Optional[Tensor]) -> None:
    """Shared validation for every backend: raise ValueError naming the bad value."""
    batch = x.shape[0]
    expected = (2 * batch, *x.shape[1:]) if guidance_scale is not None else tuple(x.shape)
    if tuple(model_output.shape) != expected:
        what = "(2B, ...) = [uncond; cond] because guidance_scale is set" if guidance_scale is not None else "x.shape"
        raise ValueError(f"model_output has shape {tuple(model_output.shape)}, expected {expected} {what}")
    for name, t in (("model_output", model_output), ("prev_x0", prev_x0), ("noise", noise)):
        if t is None:
            continue
        if name != "model_output" and tuple(t.shape) != tuple(x.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected x's shape {tuple(x.shape)}")
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, expected x's dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected x's device {x.device}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")


def scheduler_step_ref(x: Tensor, model_output: Tensor, coeffs: StepCoeffs,
                       guidance_scale: Optional[float] = None, prev_x0: Optional[Tensor] = None,
                       noise: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Plain-PyTorch twin of the fused step. x: (B, ...); model_output: (B, ...) or (2B, ...) with guidance.

    Computes in float32 (float64 stays float64) and returns tensors in x's dtype.
    """
    check_step_inputs(x, model_output, guidance_scale, prev_x0, noise)
    c = coeffs
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    m = model_output.to(acc)
    if guidance_scale is not None:
        uncond, cond = m.chunk(2)
        m = uncond + guidance_scale * (cond - uncond)
    x0 = c.c_x * xf + c.c_m * m
    x_next = c.a_x * xf + c.a_0 * x0
    if c.a_p != 0.0:
        if prev_x0 is None:
            raise ValueError(f"coefficient a_p={c.a_p} needs prev_x0, got None")
        x_next = x_next + c.a_p * prev_x0.to(acc)
    if c.a_n != 0.0:
        if noise is None:
            raise ValueError(f"coefficient a_n={c.a_n} needs noise, got None")
        x_next = x_next + c.a_n * noise.to(acc)
    return x_next.to(x.dtype), x0.to(x.dtype)


# 512 elements per program, 4 warps (4 elements a thread). On an H200 this was the best of ten configs, or
# within 0.1 us of it, at SD1.5's batch 1 and 8, SD2's 768 px and SDXL's 1024 px latents in both dtypes, and
# within 2% of the best at 16 and 64 SDXL latents. It replaced an autotuner over 1024- to 4096-element
# programs, whose timing of a 1.5 us kernel is launch noise: it had picked 2048-element programs at
# 1x4x64x64 (1.59 us against 1.26).
BLOCK = 512
NUM_WARPS = 4


if triton is not None:

    @triton.jit
    def _scheduler_step_kernel(
        X,  # pointer to x, n_elements, dense
        M,  # pointer to model_output: n_elements, or 2 * n_elements = [uncond; cond] with guidance
        Prev,  # pointer to prev_x0, or None
        Noise,  # pointer to noise, or None
        XNext,  # pointer to the output x_next
        X0,  # pointer to the output x0
        n_elements,  # elements of x
        guidance_scale,  # CFG weight g (unused without guidance)
        c_x, c_m,  # x0 = c_x * x + c_m * m
        a_x, a_0, a_p, a_n,  # x_next = a_x * x + a_0 * x0 + a_p * prev_x0 + a_n * noise
        GUIDANCE: tl.constexpr,  # model_output holds [uncond; cond]
        BLOCK: tl.constexpr,  # elements per program
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elements
        x = tl.load(X + offs, mask=mask).to(tl.float32)
        if GUIDANCE:
            uncond = tl.load(M + offs, mask=mask).to(tl.float32)
            cond = tl.load(M + n_elements + offs, mask=mask).to(tl.float32)
            m = uncond + guidance_scale * (cond - uncond)
        else:
            m = tl.load(M + offs, mask=mask).to(tl.float32)
        x0 = c_x * x + c_m * m
        x_next = a_x * x + a_0 * x0
        if Prev is not None:
            x_next += a_p * tl.load(Prev + offs, mask=mask).to(tl.float32)
        if Noise is not None:
            x_next += a_n * tl.load(Noise + offs, mask=mask).to(tl.float32)
        tl.store(XNext + offs, x_next.to(XNext.dtype.element_ty), mask=mask)
        tl.store(X0 + offs, x0.to(X0.dtype.element_ty), mask=mask)

    _scheduler_step_launcher = _triton.Launcher(_scheduler_step_kernel)  # repeat launches skip Triton's Python


def _same_dense_layout(tensors: list[Tensor]) -> bool:
    """True when every tensor is dense in one memory order with the batch outermost (contiguous, or all
    channels_last), so the kernel can walk them as flat arrays in step."""
    x = tensors[0]
    if x.is_contiguous():
        return all(t.is_contiguous() for t in tensors)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors)
    return False


def _scheduler_step_launch(x: Tensor, model_output: Tensor, c_x: float, c_m: float, a_x: float, a_0: float,
                       a_p: float, a_n: float, guidance_scale: Optional[float], prev_x0: Optional[Tensor],
                       noise: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    x_next = torch.empty_like(x)  # x's layout; the caller made every input share it
    x0 = torch.empty_like(x)
    n = x.numel()
    _scheduler_step_launcher[(_triton.cdiv(n, BLOCK),)](
        x, model_output, prev_x0, noise, x_next, x0, n,
        0.0 if guidance_scale is None else guidance_scale, c_x, c_m, a_x, a_0, a_p, a_n,
        GUIDANCE=guidance_scale is not None, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return x_next, x0


# Registered so torch.compile traces through it (fake tensors give the output layout) and keeps it in
# graphs; eager calls skip the dispatcher and launch directly, which saves tens of microseconds of host time.
_scheduler_step_op = torch.library.custom_op("fastdiff::triton_scheduler_step", mutates_args=())(_scheduler_step_launch)


@_scheduler_step_op.register_fake
def _(x, model_output, c_x, c_m, a_x, a_0, a_p, a_n, guidance_scale, prev_x0, noise):
    return torch.empty_like(x), torch.empty_like(x)


def scheduler_step(x: Tensor, model_output: Tensor, coeffs: StepCoeffs,
                   guidance_scale: Optional[float] = None, prev_x0: Optional[Tensor] = None,
                   noise: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The fused step with the Triton kernel: one read of every input, one write of x_next and x0.

    x: (B, ...) float16, bfloat16 or float32; model_output: (B, ...) or (2B, ...) = [uncond; cond] when
    guidance_scale is given; prev_x0, noise: x's shape, needed when a_p, a_n are non-zero. Float32
    arithmetic; returns (x_next, x0) in x's dtype and layout. Runs on CUDA tensors, or on the CPU under
    TRITON_INTERPRET=1.
    """
    check_step_inputs(x, model_output, guidance_scale, prev_x0, noise)
    if x.dtype not in DTYPES:
        raise ValueError(f"x has dtype {x.dtype}, expected one of {DTYPES}")
    c = coeffs
    if c.a_p != 0.0 and prev_x0 is None:
        raise ValueError(f"coefficient a_p={c.a_p} needs prev_x0, got None")
    if c.a_n != 0.0 and noise is None:
        raise ValueError(f"coefficient a_n={c.a_n} needs noise, got None")
    check_triton_device(x)
    # Inputs whose coefficient is zero are never read, as in scheduler_step_ref.
    prev_x0 = prev_x0 if c.a_p != 0.0 else None
    noise = noise if c.a_n != 0.0 else None
    inputs = [t for t in (x, model_output, prev_x0, noise) if t is not None]
    if not _same_dense_layout(inputs):
        x, model_output = x.contiguous(), model_output.contiguous()
        prev_x0 = None if prev_x0 is None else prev_x0.contiguous()
        noise = None if noise is None else noise.contiguous()
    if x.numel() == 0:
        return torch.empty_like(x), torch.empty_like(x)
    op = _scheduler_step_op if torch.compiler.is_compiling() else _scheduler_step_launch
    return op(x, model_output, float(c.c_x), float(c.c_m), float(c.a_x), float(c.a_0),
                              float(c.a_p), float(c.a_n), guidance_scale, prev_x0, noise)
