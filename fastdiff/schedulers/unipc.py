"""UniPC: unified predictor-corrector, B(h) = e^h - 1 ("bh2"), order 2, data prediction.

Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models",
Algorithms 2-3 (UniP-p, UniC-p) in the x0 form; diffusers' UniPCMultistepScheduler(solver_type="bh2",
solver_order=2). After each model call the corrector UniC refines the sample the model just saw using that
output, then the predictor UniP steps on. The corrector needs the previous corrected sample and up to three
x0 estimates, more than one fused `StepCoeffs` holds, so this runs as plain tensor code (coefficients are
still host floats from the float64 schedule).

With lambda = -log(sigma) (ve sigma), h = lambda_t - lambda_s, and the vp alpha, sigma_vp:
    x_t = (sigma_vp_t / sigma_vp_s) x_s - alpha_t (e^-h - 1) m_s - alpha_t B(h) sum_k rho_k D_k
where D_k are divided differences of x0 estimates m and rho solves the order conditions of Algorithm 2.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from fastdiff.ops import check_step_inputs

from .guidance import combine_guidance
from .samplers import Callback, ModelFn, NoiseFn, _check, _model, x0_coeffs
from .schedule import Schedule


def _base(sched: Schedule, s: int, t: int) -> tuple[float, float, float, float]:
    """Step from sigma index s to t: (vp ratio, alpha_t, h, e^-h - 1 = B(h) for bh2)."""
    sig = sched.sigmas
    alpha_t = 1 / math.sqrt(1 + sig[t] ** 2)
    vp_ratio = sig[t] * alpha_t * math.sqrt(1 + sig[s] ** 2) / sig[s]
    h = math.log(sig[s] / sig[t]) if sig[t] > 0 else math.inf
    return vp_ratio, alpha_t, h, sig[t] / sig[s] - 1


def _predict(sched: Schedule, i: int, x: Tensor, m: list[Tensor], order: int) -> Tensor:
    """UniP: x at sigma_i -> sigma_{i+1}. m: x0 estimates, newest (at sigma_i) last."""
    vp_ratio, alpha_t, h, phi = _base(sched, i, i + 1)
    x_next = vp_ratio * x - (alpha_t * phi) * m[-1]
    if order == 2:  # rho = 1/2 for the one divided difference
        r = math.log(sched.sigmas[i] / sched.sigmas[i - 1]) / h
        x_next = x_next - (alpha_t * phi * 0.5 / r) * (m[-2] - m[-1])
    return x_next


def _correct(sched: Schedule, i: int, x_prev: Tensor, m: list[Tensor], m_now: Tensor, order: int) -> Tensor:
    """UniC: redo the step sigma_{i-1} -> sigma_i from the corrected x_prev, now also using m_now (at sigma_i)."""
    vp_ratio, alpha_t, h, phi = _base(sched, i - 1, i)
    x_c = vp_ratio * x_prev - (alpha_t * phi) * m[-1]
    if order == 1:
        return x_c - (alpha_t * phi * 0.5) * (m_now - m[-1])
    # order 2: solve [[1, 1], [r, 1]] rho = b, b_k = k! phi_{k+1}(-h) h^k / B(h) style terms of Algorithm 2
    hh = -h
    phi_k = phi / hh - 1
    b1 = phi_k / phi
    b2 = (phi_k / hh - 0.5) * 2 / phi
    r = math.log(sched.sigmas[i - 1] / sched.sigmas[i - 2]) / h
    rho0 = (b1 - b2) / (1 - r)
    rho1 = b1 - rho0
    return x_c - (alpha_t * phi) * ((rho0 / r) * (m[-2] - m[-1]) + rho1 * (m_now - m[-1]))


def sample_unipc(model_fn: ModelFn, x: Tensor, sched: Schedule, guidance_scale: Optional[float] = None,
                 noise_fn: Optional[NoiseFn] = None, callback: Optional[Callback] = None,
                 start_index: int = 0, end_index: Optional[int] = None) -> Tensor:
    """UniPC-bh2, order 2 (module docstring). Same signature as the other samplers; deterministic."""
    end = _check(sched, "unipc", start_index, end_index)
    cfg, n = sched.config, sched.steps
    dtype = x.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = x.to(acc)
    m: list[Tensor] = []  # x0 estimates of the last two steps, newest last
    x_prev: Optional[Tensor] = None  # corrected sample of the previous step
    prev_order = 0
    for i in range(start_index, end):
        x_in = x.to(dtype)
        out = _model(model_fn, x_in, sched, i)
        check_step_inputs(x_in, out, guidance_scale, None, None)
        out = combine_guidance(out.to(acc), guidance_scale)
        c_x, c_m = x0_coeffs(cfg.prediction_type, sched.sigmas[i], "vp")
        x0 = c_x * x + c_m * out
        if x_prev is not None:
            x = _correct(sched, i, x_prev, m, x0, prev_order)
        m = (m + [x0])[-2:]
        # warm up from first order, and drop to first order on the last step (lower_order_final), or when
        # landing on sigma 0 where the divided difference is undefined
        order = min(2, len(m))
        if (cfg.lower_order_final and i == n - 1) or sched.sigmas[i + 1] == 0:
            order = 1
        x_prev = x
        x = _predict(sched, i, x, m, order)
        prev_order = order
        if callback is not None:
            callback(i, x.to(dtype), x0.to(dtype))
    return x.to(dtype)
