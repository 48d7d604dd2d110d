"""Noise schedules and samplers, as plain functions over tensors.

    sched = make_schedule("dpmpp_2m", 25, scheduler_config_dict, device="cuda")   # host float64 plan
    x = torch.randn(shape, generator=g) .to(device) * sched.init_noise_sigma
    x = sample(model_fn, x, sched, guidance_scale=7.5, noise_fn=noise_fn)

img2img: `start = img2img_start_index(steps, strength)`, `x = add_noise(x0, noise, sched, start)`, then
`sample(..., start_index=start)`. SDXL's base -> refiner hand-off: the base runs
`sample(..., end_index=denoising_end_index(sched, 0.8))`, the refiner continues from its latents with
`start_index=denoising_start_index(sched, 0.8)`. Files:

    config.py    SchedulerConfig: a checkpoint's scheduler_config.json resolved per sampler, as diffusers does
    schedule.py  training table alpha_bar_t, timestep spacing, Karras sigmas, `Schedule`, `add_noise`
    ddpm.py      DDPM forward process and posterior (training targets; the DDPM sampler's coefficients)
    samplers.py  ddpm, ddim, lcm, euler, euler_a, heun, dpmpp_2m, dpmpp_2m_sde: one fused step each
    unipc.py     UniPC-bh2 predictor-corrector
    guidance.py  classifier-free guidance combine and rescale
    api.py       what this package exports, loaded on first use (config.py's names need no torch)
"""
import importlib

from .config import SCHEDULERS, SchedulerConfig  # noqa: F401 (no torch: the console script reads the names at once)


def __getattr__(name: str):
    """Anything else the package exports: from api.py, which imports torch, on first use."""
    return getattr(importlib.import_module(f"{__name__}.api"), name)
