"""Classifier-free guidance (Ho & Salimans 2022) and its rescale (Lin et al. 2023).

The fused samplers combine guidance inside `ops.scheduler_step`; these helpers are the unfused form, for
UniPC and for the pipeline when guidance_rescale > 0 (the rescale is not linear, so it cannot be fused).
"""
from typing import Optional

from torch import Tensor


def combine_guidance(model_output: Tensor, guidance_scale: Optional[float], guidance_rescale: float = 0.0) -> Tensor:
    """[uncond; cond] (2B, ...) -> uncond + g (cond - uncond), optionally rescaled: (B, ...).

    With guidance_scale None the output is returned unchanged (it is already (B, ...)).
    """
    if guidance_scale is None:
        if guidance_rescale:
            raise ValueError(f"guidance_rescale={guidance_rescale} needs a guidance_scale")
        return model_output
    if model_output.shape[0] % 2:
        raise ValueError(f"model_output must be (2B, ...) = [uncond; cond] with guidance, got batch "
                         f"{model_output.shape[0]}")
    uncond, cond = model_output.chunk(2)
    guided = uncond + guidance_scale * (cond - uncond)
    return rescale_guidance(guided, cond, guidance_rescale) if guidance_rescale else guided


def rescale_guidance(guided: Tensor, cond: Tensor, guidance_rescale: float) -> Tensor:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", sec. 3.4, eqs. 15-16.

    Scales the guided prediction to the per-sample standard deviation of the conditional one, then blends:
    phi * guided * std(cond) / std(guided) + (1 - phi) * guided. guided, cond: (B, ...).
    """
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
    dims = list(range(1, cond.dim()))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided
