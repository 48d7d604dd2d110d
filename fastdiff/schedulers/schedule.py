"""Noise schedules: the training table alpha_bar_t, and the inference plan (`Schedule`) a sampler walks.

Two ways to write the same noisy sample, used by different samplers:

    vp ("variance preserving"):  x = alpha * x0 + sqrt(1 - alpha^2) * eps,  alpha^2 = alpha_bar_t
    ve ("variance exploding"):   x = x0 + sigma * eps,                     sigma^2 = (1 - alpha_bar_t) / alpha_bar_t

and x_vp = x_ve / sqrt(1 + sigma^2). A `Schedule` stores noise levels as ve sigmas for every sampler; DDPM, DDIM,
LCM, DPM-Solver and UniPC keep their sample in vp form (the model's input), Euler/Euler-ancestral/Heun in ve
form (the model then sees x / sqrt(1 + sigma^2)).

Timestep spacing, Karras sigmas and the sigma -> timestep inversion reproduce diffusers' set_timesteps of the
same-named scheduler (numpy, float64); see each helper for the per-scheduler conventions.
"""
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .config import SCHEDULERS, SchedulerConfig

VE_SAMPLERS = ("euler", "euler_a", "heun")  # the rest run in vp form
KARRAS_SAMPLERS = ("euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc")


def betas_for_config(config: SchedulerConfig) -> Tensor:
    """beta_t, (T,) float64.

    Evaluated in float32 exactly as diffusers does and then widened: that float32 table is the schedule every
    diffusers-format checkpoint is sampled with, so parity with diffusers starts from identical numbers.
    """
    T = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = torch.tensor(config.trained_betas, dtype=torch.float32)
    elif config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
    elif config.beta_schedule == "scaled_linear":  # linear in sqrt(beta): LDM / Stable Diffusion
        betas = torch.linspace(config.beta_start ** 0.5, config.beta_end ** 0.5, T, dtype=torch.float32) ** 2
    elif config.beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021, eq. 17, beta capped at 0.999
        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                             dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule must be one of linear, scaled_linear, squaredcos_cap_v2, "
                         f"got {config.beta_schedule!r}")
    return betas.double()


def alphas_cumprod_for_config(config: SchedulerConfig) -> Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), (T,) float64 (the product taken in float32, as diffusers)."""
    return torch.cumprod(1.0 - betas_for_config(config).float(), dim=0).double()


def spaced_timesteps(config: SchedulerConfig, steps: int, *, extra_point: bool = False,
                     rounded: bool = True) -> np.ndarray:
    """The `steps` inference timesteps, descending, float64 (diffusers' `timestep_spacing`).

    linspace: evenly spaced over [0, T-1]; leading: multiples of T // steps, plus steps_offset; trailing:
    evenly spaced down from T - 1 (Lin et al. 2023, Table 2). `extra_point` is DPM-Solver/UniPC's variant
    (spread steps + 1 points and drop the last); `rounded=False` is Euler/Heun's unrounded linspace.
    """
    T = config.num_train_timesteps
    n = steps + 1 if extra_point else steps
    if config.timestep_spacing == "linspace":
        t = np.linspace(0, T - 1, n)
        t = (t.round() if rounded else t)[::-1]
    elif config.timestep_spacing == "leading":
        t = (np.arange(n) * (T // n) + config.steps_offset)[::-1]
    else:  # trailing. np.arange as diffusers (ties then round alike); it can overshoot by one point
        t = np.round(np.arange(T, 0, -T / steps)) - 1
    return t[:steps].astype(np.float64)


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM), eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, table_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, interpolating log(sigma) in the (ascending) table."""
    log_table = np.log(table_sigmas)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_table, log_sigma, side="right") - 1, 0, len(log_table) - 2)
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def lcm_timesteps(config: SchedulerConfig, steps: int) -> np.ndarray:
    """LCM's steps: evenly skipping through its distillation grid of `original_inference_steps` timesteps."""
    k = config.num_train_timesteps // config.original_inference_steps
    grid = (np.arange(1, config.original_inference_steps + 1) * k - 1)[::-1]
    return grid[np.floor(np.linspace(0, len(grid), num=steps, endpoint=False)).astype(np.int64)].astype(np.float64)


@dataclass(frozen=True, eq=False)
class Schedule:
    """Everything a sampler needs, computed once on the host (float64); the loop then never syncs the device.

    n = number of steps. Step i evaluates the model at timesteps[i] on a sample at noise level sigmas[i] and
    moves it to sigmas[i + 1] (DDIM's own convention aside, see `sample_ddim`).
    """

    name: str  # the sampler this plan is for (one of SCHEDULERS)
    config: SchedulerConfig  # resolved settings: checkpoint config + that sampler's diffusers defaults
    timesteps: tuple[float, ...]  # (n,) model-facing timestep of each step
    sigmas: tuple[float, ...]  # (n + 1,) ve noise level entering each step; the last is where sampling ends
    alphas_cumprod: tuple[float, ...]  # (T,) the training table alpha_bar_t
    model_timesteps: Tensor  # (n,) float32 on the sampling device: timesteps as model_fn receives them
    init_noise_sigma: float  # a full-strength start is x = randn * init_noise_sigma
    input_scales: tuple[float, ...]  # (n,) model input at step i is x * input_scales[i]
    space: str  # "ve" or "vp": how the sampler's x relates to x0 and sigma (module docstring)
    eta: float = 0.0  # ddim only: 0 deterministic DDIM, 1 DDPM-like ancestral noise

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def make_schedule(name: str, steps: int, config: Union[Mapping[str, Any], SchedulerConfig, None] = None, *,
                  karras: Optional[bool] = None, eta: float = 0.0,
                  device: Union[str, torch.device] = "cpu") -> Schedule:
    """Plan `steps` steps of sampler `name` for a checkpoint's scheduler config (a scheduler_config.json dict).

    A `SchedulerConfig` is used as given (no per-sampler defaults). karras: Karras sigmas; None follows the
    config's use_karras_sigmas. eta: DDIM's noise (ddim only). device: where model_timesteps live.
    Timesteps and sigmas equal diffusers' same-named scheduler's set_timesteps for the same config.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {name!r}")
    cfg = config if isinstance(config, SchedulerConfig) else SchedulerConfig.from_dict(config, name)
    karras = cfg.use_karras_sigmas if karras is None else karras
    T = cfg.num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, num_train_timesteps={T}], got {steps}")
    if karras and name not in KARRAS_SAMPLERS:
        raise ValueError(f"karras sigmas apply to {KARRAS_SAMPLERS}, not {name!r}")
    if eta != 0.0 and name != "ddim":
        raise ValueError(f"eta is a DDIM parameter; it must be 0 for {name!r}, got {eta}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if name == "lcm" and steps > cfg.original_inference_steps:
        raise ValueError(f"lcm steps must be <= original_inference_steps={cfg.original_inference_steps}, got {steps}")

    abar = alphas_cumprod_for_config(cfg).numpy()
    table = np.sqrt((1 - abar) / abar)  # (T,) ve sigma of each training timestep, ascending

    if name in ("ddpm", "ddim", "lcm"):
        t = lcm_timesteps(cfg, steps) if name == "lcm" else spaced_timesteps(cfg, steps)
        sigmas = table[t.astype(np.int64)]
        last = 0.0
        if name == "ddim":  # DDIM's last step lands on alpha_bar = 1, or alpha_bar[0] (set_alpha_to_one=False)
            prev_t = int(t[-1]) - T // steps
            last = float(table[prev_t]) if prev_t >= 0 else (0.0 if cfg.set_alpha_to_one else float(table[0]))
    elif name in VE_SAMPLERS:
        t = spaced_timesteps(cfg, steps, rounded=False)
        sigmas = np.interp(t, np.arange(T), table)
        if karras:  # Euler/Heun take the Karras range from the spaced sigmas
            sigmas = karras_sigmas(_or(cfg.sigma_min, sigmas[-1]), _or(cfg.sigma_max, sigmas[0]), steps)
            t = sigma_to_t(sigmas, table)
        last = float(table[0]) if name == "euler" and cfg.final_sigmas_type == "sigma_min" else 0.0
    else:  # dpmpp_2m, dpmpp_2m_sde, unipc
        t = spaced_timesteps(cfg, steps, extra_point=True)
        sigmas = table[t.astype(np.int64)]
        if karras:  # DPM/UniPC take the Karras range from the whole table, and round the timesteps
            sigmas = karras_sigmas(_or(cfg.sigma_min, table[0]), _or(cfg.sigma_max, table[-1]), steps)
            t = sigma_to_t(sigmas, table)
            if name == "unipc" or cfg.beta_schedule != "squaredcos_cap_v2":
                t = t.round()
        last = 0.0
        if cfg.final_sigmas_type == "sigma_min":
            last = float(sigmas[-1]) if name == "unipc" and karras else float(table[0])

    sigmas = [float(s) for s in sigmas] + [last]
    space = "ve" if name in VE_SAMPLERS else "vp"
    if space == "ve":
        # diffusers' convention: sigma_max for linspace/trailing, sqrt(sigma_max^2 + 1) for leading
        init = sigmas[0] if cfg.timestep_spacing in ("linspace", "trailing") else math.sqrt(sigmas[0] ** 2 + 1)
        scales = tuple(1 / math.sqrt(s * s + 1) for s in sigmas[:-1])
    else:
        init, scales = 1.0, (1.0,) * steps
    timesteps = tuple(float(x) for x in t)
    return Schedule(name=name, config=cfg, timesteps=timesteps, sigmas=tuple(sigmas),
                    alphas_cumprod=tuple(float(a) for a in abar),
                    model_timesteps=torch.tensor(timesteps, dtype=torch.float32, device=device),
                    init_noise_sigma=init, input_scales=scales, space=space, eta=float(eta))


def _or(value: Optional[float], default: float) -> float:
    return float(default) if value is None else value


def add_noise(x0: Tensor, noise: Tensor, sched: Schedule, index: int) -> Tensor:
    """Noise a clean sample to the level step `index` starts from (img2img; diffusers' scheduler.add_noise).

    x0, noise: (B, ...) same shape. Returns x in the sampler's form (ve or vp).
    """
    if not 0 <= index < sched.steps:
        raise ValueError(f"index must be in [0, {sched.steps}), got {index}")
    if noise.shape != x0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected x0's shape {tuple(x0.shape)}")
    sigma = sched.sigmas[index]
    if sched.space == "ve":
        return x0 + sigma * noise
    alpha = 1 / math.sqrt(1 + sigma * sigma)
    return alpha * x0 + (sigma * alpha) * noise


def img2img_start_index(steps: int, strength: float) -> int:
    """First step to run for img2img at `strength` (diffusers' StableDiffusionImg2ImgPipeline.get_timesteps).

    strength 1 starts from pure noise (index 0); strength 0 runs no step (index == steps).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return max(steps - min(int(steps * strength), steps), 0)


def _cutoff(sched: Schedule, fraction: float) -> int:
    """The training timestep a denoising fraction stands for, as diffusers rounds it: fraction 0.8 of 1000 -> 200."""
    if not (isinstance(fraction, float) and 0.0 < fraction < 1.0):
        raise ValueError(f"a denoising fraction must be a float in (0, 1), got {fraction!r}")
    T = sched.config.num_train_timesteps
    return int(round(T - fraction * T))


def denoising_end_index(sched: Schedule, fraction: float) -> int:
    """The step at which to stop after `fraction` of the denoising (SDXL's base `denoising_end`): the steps whose
    timestep is at or above the cutoff run (diffusers' StableDiffusionXLPipeline). Counted in whole steps."""
    cutoff = _cutoff(sched, fraction)
    return sum(t >= cutoff for t in sched.timesteps)


def denoising_start_index(sched: Schedule, fraction: float) -> int:
    """The step at which to start with `fraction` of the denoising done (SDXL's refiner `denoising_start`): the
    steps whose timestep is below the cutoff run (diffusers' StableDiffusionXLImg2ImgPipeline.get_timesteps).
    With the same schedule and fraction it is `denoising_end_index`: the refiner takes over where the base stopped."""
    cutoff = _cutoff(sched, fraction)
    return sched.steps - sum(t < cutoff for t in sched.timesteps)
