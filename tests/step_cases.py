"""Fused-step coefficients of each solver at a plausible mid-schedule step, shared by the tests of every
scheduler_step backend (Triton kernel, fastdiff._C)."""
import math

from fastdiff.kernels.scheduler_step import StepCoeffs


def _solvers() -> dict[str, StepCoeffs]:
    # k-diffusion sigma space (x0 = x - sigma eps) and DDIM's alpha-bar space, at plausible mid-schedule steps.
    sigma, sigma_next, sigma_prev = 3.0, 2.4, 3.8
    euler_dt = (sigma_next - sigma) / sigma
    sigma_up = math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    down_dt = (math.sqrt(sigma_next**2 - sigma_up**2) - sigma) / sigma
    h = math.log(sigma / sigma_next)
    r = math.log(sigma_prev / sigma) / h
    ab, ab_prev = 0.30, 0.45  # alpha-bar at t and at the next (less noisy) t
    ddim_a_x = math.sqrt(1 - ab_prev) / math.sqrt(1 - ab)
    ddim_a_0 = math.sqrt(ab_prev) - ddim_a_x * math.sqrt(ab)
    return {
        "euler": StepCoeffs(1.0, -sigma, 1 + euler_dt, -euler_dt),
        "euler_ancestral": StepCoeffs(1.0, -sigma, 1 + down_dt, -down_dt, a_n=sigma_up),
        "ddim_eps": StepCoeffs(1 / math.sqrt(ab), -math.sqrt(1 - ab) / math.sqrt(ab), ddim_a_x, ddim_a_0),
        "ddim_v": StepCoeffs(math.sqrt(ab), -math.sqrt(1 - ab), ddim_a_x, ddim_a_0),
        "dpmpp_2m": StepCoeffs(1.0, -sigma, sigma_next / sigma, -math.expm1(-h) * (1 + 1 / (2 * r)),
                               a_p=math.expm1(-h) / (2 * r)),
        "dpmpp_2m_sde": StepCoeffs(1.0, -sigma, sigma_next / sigma * math.exp(-h), -math.expm1(-2 * h),
                                   a_p=-0.5 * math.expm1(-2 * h) / r, a_n=sigma_next * math.sqrt(-math.expm1(-2 * h))),
    }


SOLVERS = _solvers()
