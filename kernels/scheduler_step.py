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
