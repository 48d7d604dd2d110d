"""Samplers as plain functions over tensors (k-diffusion style): no state outlives a call.

Every sampler has the same signature,

    sample_x(model_fn, x, sched, guidance_scale=None, noise_fn=None, callback=None, start_index=0, end_index=None) -> x

    model_fn(x_in, t) -> model_output   x_in: (B, ...) the model input, t: 0-dim float32 tensor on the
                                        schedule's device; model_output: x's dtype and device, (B, ...), or
                                        (2B, ...) = [uncond; cond] when guidance_scale is set (model_fn
                                        duplicates x_in itself)
    x                                   (B, ...) sample entering step `start_index` (randn * init_noise_sigma,
                                        or `add_noise(...)` for img2img), in the schedule's ve/vp form
    noise_fn(shape) -> Tensor           fresh standard normal noise (ancestral/SDE samplers), called exactly
                                        where diffusers' scheduler draws, so a shared generator gives the
                                        same images
    callback(i, x, x0)                  after step i with the new sample and that step's x0 estimate
    start_index, end_index              the steps run are [start_index, end_index) of the plan (end_index None: to
                                        its end); a range that stops early leaves x at the noise level step
                                        end_index starts from, every step computed as in the whole plan (SDXL's
                                        base -> refiner hand-off, `denoising_end_index`)

Each step is one linear form `StepCoeffs` (see fastdiff/kernels/scheduler_step.py) whose coefficients are
computed here on the host from the float64 schedule, and one `ops.scheduler_step` call that also does the
guidance combine. Only x0 clipping (`clip_sample`) is not linear; those steps run unfused. UniPC (unipc.py)
needs more history than one linear form holds and runs as plain tensor code.

The update rules are those of diffusers' same-named schedulers (same configs give the same numbers).
"""
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from fastdiff import ops
from fastdiff.ops import StepCoeffs, check_step_inputs

from .ddpm import posterior_coeffs
from .guidance import combine_guidance
from .schedule import Schedule

ModelFn = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[tuple], Tensor]
Callback = Callable[[int, Tensor, Tensor], None]


def x0_coeffs(prediction_type: str, sigma: float, space: str) -> tuple[float, float]:
    """(c_x, c_m) such that x0 = c_x * x + c_m * model_output for a sample x at ve noise level sigma.

    The model always sees the vp sample x_vp = alpha (x0 + sigma eps), alpha = 1 / sqrt(1 + sigma^2):
    epsilon: x0 = (x_vp - sigma alpha eps) / alpha;  v (Salimans & Ho 2022): x0 = alpha x_vp - sigma alpha v.
    A ve sample is x_vp / alpha, hence the extra factor alpha on c_x.
    """
    alpha = 1 / math.sqrt(1 + sigma * sigma)
    if prediction_type == "epsilon":
        c_x, c_m = 1 / alpha, -sigma
    elif prediction_type == "v_prediction":
        c_x, c_m = alpha, -sigma * alpha
    elif prediction_type == "sample":
        c_x, c_m = 0.0, 1.0
    else:
        raise ValueError(f"prediction_type must be one of epsilon, v_prediction, sample, got {prediction_type!r}")
    return (c_x * alpha if space == "ve" else c_x), c_m


def eps_coeffs(prediction_type: str, sigma: float) -> tuple[float, float]:
    """(e_x, e_m) such that eps = e_x * x + e_m * model_output for a vp sample x at ve noise level sigma."""
    alpha = 1 / math.sqrt(1 + sigma * sigma)
    if prediction_type == "epsilon":
        return 0.0, 1.0
    if prediction_type == "v_prediction":  # eps = alpha v + sigma_vp x
        return sigma * alpha, alpha
    if prediction_type == "sample":  # eps = (x - alpha x0) / sigma_vp
        return 1 / (sigma * alpha), -1 / sigma
    raise ValueError(f"prediction_type must be one of epsilon, v_prediction, sample, got {prediction_type!r}")


# ---- shared plumbing -------------------------------------------------------------------------------------

def _check(sched: Schedule, name: str, start_index: int, end_index: Optional[int] = None) -> int:
    """The checked range's end: the steps run are [start_index, end)."""
    if sched.name != name:
        raise ValueError(f"schedule was made for {sched.name!r}, not {name!r}: use make_schedule({name!r}, ...)")
    if not 0 <= start_index <= sched.steps:
        raise ValueError(f"start_index must be in [0, {sched.steps}], got {start_index}")
    end = sched.steps if end_index is None else end_index
    if not start_index <= end <= sched.steps:
        raise ValueError(f"end_index must be in [start_index={start_index}, {sched.steps}], got {end_index}")
    return end


def _model(model_fn: ModelFn, x: Tensor, sched: Schedule, i: int) -> Tensor:
    scale = sched.input_scales[i]
    return model_fn(x if scale == 1.0 else x * scale, sched.model_timesteps[i])


def _noise(noise_fn: Optional[NoiseFn], x: Tensor, name: str) -> Tensor:
    if noise_fn is None:
        raise ValueError(f"{name} draws noise during sampling: pass noise_fn(shape) -> standard normal tensor")
    noise = noise_fn(tuple(x.shape))
    if tuple(noise.shape) != tuple(x.shape):
        raise ValueError(f"noise_fn returned shape {tuple(noise.shape)}, expected {tuple(x.shape)}")
    return noise.to(device=x.device, dtype=x.dtype)


def _clip(sched: Schedule) -> Optional[float]:
    return sched.config.clip_sample_range if sched.config.clip_sample else None


def _step(x: Tensor, model_output: Tensor, c: StepCoeffs, guidance_scale: Optional[float],
          prev_x0: Optional[Tensor] = None, noise: Optional[Tensor] = None,
          clip: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """`ops.scheduler_step`, or with clip set the same linear form with x0 clamped to [-clip, clip] (unfused)."""
    if clip is None:
        return ops.scheduler_step(x, model_output, c, guidance_scale, prev_x0, noise)
    check_step_inputs(x, model_output, guidance_scale, prev_x0, noise)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    m = combine_guidance(model_output.to(acc), guidance_scale)
    x0 = (c.c_x * xf + c.c_m * m).clamp(-clip, clip)
    x_next = c.a_x * xf + c.a_0 * x0
    if c.a_p != 0.0:
        x_next = x_next + c.a_p * prev_x0.to(acc)
    if c.a_n != 0.0:
        x_next = x_next + c.a_n * noise.to(acc)
    return x_next.to(x.dtype), x0.to(x.dtype)


# ---- alpha_bar-indexed samplers (vp form, integer timesteps) ---------------------------------------------

def sample_ddpm(model_fn: ModelFn, x: Tensor, sched: Schedule, guidance_scale: Optional[float] = None,
                noise_fn: Optional[NoiseFn] = None, callback: Optional[Callback] = None,
                start_index: int = 0, end_index: Optional[int] = None) -> Tensor:
    """Ancestral sampling from the DDPM posterior at the predicted x0 (Ho et al. 2020, Algorithm 2).

    Across strided timesteps t -> s the posterior q(x_s | x_t, x0) of `ddpm.posterior_coeffs` is used,
    variance "fixed_small" (the posterior's) or "fixed_large" (beta); noise is added while t > 0.
    """
    end = _check(sched, "ddpm", start_index, end_index)
    cfg, abar, ts = sched.config, sched.alphas_cumprod, sched.timesteps
    for i in range(start_index, end):
        out = _model(model_fn, x, sched, i)
        abar_t = abar[int(ts[i])]
        abar_s = abar[int(ts[i + 1])] if i + 1 < sched.steps else 1.0
        c_x0, c_xt, var = posterior_coeffs(abar_t, abar_s)
        var = 1 - abar_t / abar_s if cfg.variance_type == "fixed_large" else max(var, 1e-20)
        noise = _noise(noise_fn, x, "ddpm") if ts[i] > 0 else None
        c = StepCoeffs(*x0_coeffs(cfg.prediction_type, sched.sigmas[i], "vp"), a_x=c_xt, a_0=c_x0,
                       a_n=math.sqrt(var) if noise is not None else 0.0)
        x, x0 = _step(x, out, c, guidance_scale, noise=noise, clip=_clip(sched))
        if callback is not None:
            callback(i, x, x0)
    return x


def _ddim_abar_prev(sched: Schedule, i: int) -> float:
    # diffusers' DDIM steps from t to t - T // steps whatever the spacing (for leading spacing, and trailing
    # spacing with steps dividing T, that is the next timestep); below 0 it lands on the final alpha_bar.
    cfg = sched.config
    prev_t = int(sched.timesteps[i]) - cfg.num_train_timesteps // sched.steps
    if prev_t >= 0:
        return sched.alphas_cumprod[prev_t]
    return 1.0 if cfg.set_alpha_to_one else sched.alphas_cumprod[0]


def sample_ddim(model_fn: ModelFn, x: Tensor, sched: Schedule, guidance_scale: Optional[float] = None,
                noise_fn: Optional[NoiseFn] = None, callback: Optional[Callback] = None,
                start_index: int = 0, end_index: Optional[int] = None) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12): x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - std^2) eps + std z,

    std = eta sqrt((1 - abar_s) / (1 - abar_t) (1 - abar_t / abar_s)) (eq. 16); eta = sched.eta. With
    clip_sample, x0 is clamped but eps stays the unclamped model's (diffusers' default).
    """
    end = _check(sched, "ddim", start_index, end_index)
    cfg, eta = sched.config, sched.eta
    clip = _clip(sched)
    for i in range(start_index, end):
        out = _model(model_fn, x, sched, i)
        sigma = sched.sigmas[i]
        abar_t, abar_s = sched.alphas_cumprod[int(sched.timesteps[i])], _ddim_abar_prev(sched, i)
        std = eta * math.sqrt((1 - abar_s) / (1 - abar_t) * (1 - abar_t / abar_s))
        direction = math.sqrt(1 - abar_s - std * std)  # coefficient of eps
        noise = _noise(noise_fn, x, "ddim with eta > 0") if eta > 0 else None
        c_x, c_m = x0_coeffs(cfg.prediction_type, sigma, "vp")
        if clip is None:  # eps = (x - sqrt(abar_t) x0) / sqrt(1 - abar_t) folds into the x and x0 terms
            a_x = direction / math.sqrt(1 - abar_t)
            c = StepCoeffs(c_x, c_m, a_x=a_x, a_0=math.sqrt(abar_s) - a_x * math.sqrt(abar_t),
                           a_n=std if noise is not None else 0.0)
            x, x0 = _step(x, out, c, guidance_scale, noise=noise)
        else:  # unfused: eps must come from the unclamped x0, so it is formed from x and the model output
            check_step_inputs(x, out, guidance_scale, None, noise)
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            xf, m = x.to(acc), combine_guidance(out.to(acc), guidance_scale)
            e_x, e_m = eps_coeffs(cfg.prediction_type, sigma)
            x0 = (c_x * xf + c_m * m).clamp(-clip, clip)
            x_next = math.sqrt(abar_s) * x0 + direction * (e_x * xf + e_m * m)
            if noise is not None:
                x_next = x_next + std * noise.to(acc)
            x, x0 = x_next.to(x.dtype), x0.to(x.dtype)
        if callback is not None:
            callback(i, x, x0)
    return x


def sample_lcm(model_fn: ModelFn, x: Tensor, sched: Schedule, guidance_scale: Optional[float] = None,
               noise_fn: Optional[NoiseFn] = None, callback: Optional[Callback] = None,
               start_index: int = 0, end_index: Optional[int] = None) -> Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023, Algorithm 1).

    Consistency function f(x, t) = c_skip(t) x + c_out(t) x0 with the boundary condition of Song et al. 2023
    (sigma_data = 0.5, t scaled by timestep_scaling); every step but the last re-noises f to the next
    timestep with fresh noise; the last returns f. Guidance-embedded LCMs take guidance_scale=None.
    """
    end = _check(sched, "lcm", start_index, end_index)
    cfg, abar, ts = sched.config, sched.alphas_cumprod, sched.timesteps
    for i in range(start_index, end):
        out = _model(model_fn, x, sched, i)
        scaled_t = ts[i] * cfg.timestep_scaling
        c_skip = 0.25 / (scaled_t ** 2 + 0.25)
        c_out = scaled_t / math.sqrt(scaled_t ** 2 + 0.25)
        c_x, c_m = x0_coeffs(cfg.prediction_type, sched.sigmas[i], "vp")
        if i + 1 < sched.steps:
            abar_s = abar[int(ts[i + 1])]
            noise = _noise(noise_fn, x, "lcm")
            c = StepCoeffs(c_x, c_m, a_x=math.sqrt(abar_s) * c_skip, a_0=math.sqrt(abar_s) * c_out,
                           a_n=math.sqrt(1 - abar_s))
        else:
            noise = None
            c = StepCoeffs(c_x, c_m, a_x=c_skip, a_0=c_out)
        x, x0 = _step(x, out, c, guidance_scale, noise=noise, clip=_clip(sched))
        if callback is not None:
            callback(i, x, x0)
    return x


# ---- sigma-space samplers (k-diffusion family; ve form) --------------------------------------------------

def sample_euler(model_fn: ModelFn, x: Tensor, sched: Schedule, guidance_scale: Optional[float] = None,
                 noise_fn: Optional[NoiseFn] = None, callback: Optional[Callback] = None,
                 start_index: int = 0, end_index: Optional[int] = None) -> Tensor:
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0) / sigma.

    Karras et al. 2022 (EDM), Algorithm 2 with S_churn = 0; k-diffusion's sample_euler.
    """
    end = _check(sched, "euler", start_index, end_index)
    s, pt = sched.sigmas, sched.config.prediction_type
    for i in range(start_index, end):
        out = _model(model_fn, x, sched, i)
        r = s[i + 1] / s[i]  # x + (s[i+1] - s[i]) (x - x0) / s[i]
        x, x0 = _step(x, out, StepCoeffs(*x0_coeffs(pt, s[i], "ve"), a_x=r, a_0=1 - r), guidance_scale)
        if callback is not None:
            callback(i, x, x0)
    return x


def sample_euler_ancestral(model_fn: ModelFn, x: Tensor, sched: Schedule, guidance_scale: Optional[float] = None,
                           noise_fn: Optional[NoiseFn] = None, callback: Optional[Callback] = None,
                           start_index: int = 0, end_index: Optional[int] = None) -> Tensor:
    """Ancestral Euler: an Euler step down to sigma_down, then fresh noise of std sigma_up, with
    sigma_up^2 = s'^2 (s^2 - s'^2) / s^2 and sigma_down^2 = s'^2 - sigma_up^2 (k-diffusion's
    sample_euler_ancestral with eta = 1; the split follows the DDPM posterior variance).
    """
    end = _check(sched, "euler_a", start_index, end_index)
    s, pt = sched.sigmas, sched.config.prediction_type
    for i in range(start_index, end):
        out = _model(model_fn, x, sched, i)
        sigma_up = math.sqrt(s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2)
        r = math.sqrt(s[i + 1] ** 2 - sigma_up ** 2) / s[i]
        noise = _noise(noise_fn, x, "euler_a")
        c = StepCoeffs(*x0_coeffs(pt, s[i], "ve"), a_x=r, a_0=1 - r, a_n=sigma_up)
        x, x0 = _step(x, out, c, guidance_scale, noise=noise)
        if callback is not None:
            callback(i, x, x0)
    return x


def sample_heun(model_fn: ModelFn, x: Tensor, sched: Schedule, guidance_scale: Optional[float] = None,
                noise_fn: Optional[NoiseFn] = None, callback: Optional[Callback] = None,
                start_index: int = 0, end_index: Optional[int] = None) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1, S_churn = 0): an Euler step to x_e, a
    second model call at sigma', and the trapezoid x' = x + dt (d + d') / 2. The step to sigma = 0 is plain
    Euler. Two model calls per step except the last.

    Since x_e = x + dt d, the trapezoid is x' = (x + x_e) / 2 + dt / (2 sigma') (x_e - x0'): one more fused
    step, on x_e, with the pre-step x in the kernel's prev_x0 slot.
    """
    end = _check(sched, "heun", start_index, end_index)
    s, pt, clip = sched.sigmas, sched.config.prediction_type, _clip(sched)
    for i in range(start_index, end):
        out = _model(model_fn, x, sched, i)
        r = s[i + 1] / s[i]
        x_e, x0 = _step(x, out, StepCoeffs(*x0_coeffs(pt, s[i], "ve"), a_x=r, a_0=1 - r), guidance_scale,
                        clip=clip)
        if s[i + 1] > 0:
            out = _model(model_fn, x_e, sched, i + 1)
            k = (s[i + 1] - s[i]) / (2 * s[i + 1])
            c = StepCoeffs(*x0_coeffs(pt, s[i + 1], "ve"), a_x=0.5 + k, a_0=-k, a_p=0.5)
            x_e, _ = _step(x_e, out, c, guidance_scale, prev_x0=x, clip=clip)
        x = x_e
        if callback is not None:
            callback(i, x, x0)
    return x


def _dpm_first_order(sched: Schedule, i: int, has_prev: bool) -> bool:
    # diffusers' DPMSolverMultistep: first order on the first step, and on the last one when stepping to
    # sigma 0 (or lower_order_final with < 15 steps, or euler_at_final)
    if not has_prev:
        return True
    cfg, n = sched.config, sched.steps
    return i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                           or cfg.final_sigmas_type == "zero")


def _dpm_coeffs(sched: Schedule, i: int, has_prev: bool, sde: bool) -> StepCoeffs:
    """One DPM-Solver++ step (Lu et al. 2022, "DPM-Solver++", Algorithm 2 "2M"; its SDE variant sec. 5).

    With lambda = log(alpha / sigma_vp) = -log(sigma) and h = lambda' - lambda, e^-h = sigma' / sigma:
      2M:     x' = (sigma_vp' / sigma_vp) x + alpha' (1 - e^-h) D
      2M SDE: x' = (sigma_vp' / sigma_vp) e^-h x + alpha' (1 - e^-2h) D + sigma_vp' sqrt(1 - e^-2h) z
    D = x0 (first order) or x0 + (x0 - x0_prev) / (2 r), r = h_prev / h (second order, midpoint).
    """
    s = sched.sigmas
    c_x, c_m = x0_coeffs(sched.config.prediction_type, s[i], "vp")
    alpha_t = 1 / math.sqrt(1 + s[i + 1] ** 2)
    vp_ratio = (s[i + 1] * alpha_t) * math.sqrt(1 + s[i] ** 2) / s[i]
    e_h = s[i + 1] / s[i]
    if sde:
        a_x, amp, a_n = vp_ratio * e_h, alpha_t * (1 - e_h ** 2), s[i + 1] * alpha_t * math.sqrt(1 - e_h ** 2)
    else:
        a_x, amp, a_n = vp_ratio, alpha_t * (1 - e_h), 0.0
    if _dpm_first_order(sched, i, has_prev):
        return StepCoeffs(c_x, c_m, a_x=a_x, a_0=amp, a_n=a_n)
    r = math.log(s[i - 1] / s[i]) / math.log(s[i] / s[i + 1])
    return StepCoeffs(c_x, c_m, a_x=a_x, a_0=amp * (1 + 0.5 / r), a_p=-amp * 0.5 / r, a_n=a_n)


def sample_dpmpp_2m(model_fn: ModelFn, x: Tensor, sched: Schedule, guidance_scale: Optional[float] = None,
                    noise_fn: Optional[NoiseFn] = None, callback: Optional[Callback] = None,
                    start_index: int = 0, end_index: Optional[int] = None) -> Tensor:
    """DPM-Solver++(2M), multistep second order in data prediction (Lu et al. 2022, Algorithm 2); see `_dpm_coeffs`."""
    end = _check(sched, "dpmpp_2m", start_index, end_index)
    prev_x0 = None
    for i in range(start_index, end):
        out = _model(model_fn, x, sched, i)
        c = _dpm_coeffs(sched, i, prev_x0 is not None, sde=False)
        x, prev_x0 = _step(x, out, c, guidance_scale, prev_x0=prev_x0 if c.a_p else None)
        if callback is not None:
            callback(i, x, prev_x0)
    return x


def sample_dpmpp_2m_sde(model_fn: ModelFn, x: Tensor, sched: Schedule, guidance_scale: Optional[float] = None,
                        noise_fn: Optional[NoiseFn] = None, callback: Optional[Callback] = None,
                        start_index: int = 0, end_index: Optional[int] = None) -> Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, sec. 5; diffusers' algorithm_type="sde-dpmsolver++"), noise every step."""
    end = _check(sched, "dpmpp_2m_sde", start_index, end_index)
    prev_x0 = None
    for i in range(start_index, end):
        out = _model(model_fn, x, sched, i)
        c = _dpm_coeffs(sched, i, prev_x0 is not None, sde=True)
        noise = _noise(noise_fn, x, "dpmpp_2m_sde")
        x, prev_x0 = _step(x, out, c, guidance_scale, prev_x0=prev_x0 if c.a_p else None, noise=noise)
        if callback is not None:
            callback(i, x, prev_x0)
    return x
