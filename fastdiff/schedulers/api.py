"""Everything `fastdiff.schedulers` exports, imported on first use (the package itself imports no torch)."""
from typing import Optional

from torch import Tensor

from .config import SCHEDULERS, SchedulerConfig  # noqa: F401 (exported)
from .ddpm import posterior_coeffs, q_posterior_mean_variance, q_sample, training_target
from .guidance import combine_guidance, rescale_guidance
from .samplers import (Callback, ModelFn, NoiseFn, sample_ddim, sample_ddpm, sample_dpmpp_2m,
                       sample_dpmpp_2m_sde, sample_euler, sample_euler_ancestral, sample_heun, sample_lcm,
                       x0_coeffs)
from .schedule import (Schedule, add_noise, alphas_cumprod_for_config, betas_for_config, denoising_end_index,
                       denoising_start_index, img2img_start_index, karras_sigmas, make_schedule)
from .unipc import sample_unipc

SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
    "lcm": sample_lcm,
}


def sample(model_fn: ModelFn, x: Tensor, sched: Schedule, guidance_scale: Optional[float] = None,
           noise_fn: Optional[NoiseFn] = None, callback: Optional[Callback] = None, start_index: int = 0,
           end_index: Optional[int] = None) -> Tensor:
    """Run the sampler `sched` was made for from step `start_index` to `end_index` (None: the end); see samplers.py
    for the arguments."""
    return SAMPLERS[sched.name](model_fn, x, sched, guidance_scale, noise_fn, callback, start_index, end_index)


__all__ = [
    "SCHEDULERS", "SAMPLERS", "SchedulerConfig", "Schedule", "make_schedule", "sample", "add_noise",
    "img2img_start_index", "denoising_start_index", "denoising_end_index", "karras_sigmas", "betas_for_config",
    "alphas_cumprod_for_config", "x0_coeffs",
    "q_sample", "q_posterior_mean_variance", "posterior_coeffs", "training_target",
    "combine_guidance", "rescale_guidance", "ModelFn", "NoiseFn", "Callback",
    *(f.__name__ for f in SAMPLERS.values()),
]
