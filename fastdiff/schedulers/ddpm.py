"""The DDPM forward process and its posterior (Ho et al. 2020, "Denoising Diffusion Probabilistic Models").

    q(x_t | x_0)          = N(sqrt(abar_t) x_0, (1 - abar_t) I)                                    eq. 4
    q(x_s | x_t, x_0)     = N(c_x0 x_0 + c_xt x_t, var),  s < t                                    eqs. 6-7
        c_x0 = sqrt(abar_s) beta / (1 - abar_t),   c_xt = sqrt(alpha) (1 - abar_s) / (1 - abar_t),
        var  = (1 - abar_s) / (1 - abar_t) beta,    alpha = abar_t / abar_s,  beta = 1 - alpha

with abar_t = alphas_cumprod[t]. For s = t - 1 this is the paper's one-step posterior; the DDPM sampler uses
the same formulas across the jump between two inference timesteps (as diffusers' DDPMScheduler does).
Training draws x_t with `q_sample` and regresses `training_target`.
"""
from typing import Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]


def _gather(alphas_cumprod: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """alphas_cumprod[t] as float64 of shape (B, 1, ..., 1), broadcastable against `like` (B, ...)."""
    if t.dim() != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(f"t must have shape ({like.shape[0]},) (one timestep per sample), got {tuple(t.shape)}")
    abar = alphas_cumprod.to(device=like.device, dtype=torch.float64)[t.to(like.device).long()]
    return abar.reshape(-1, *([1] * (like.dim() - 1)))


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (eq. 4).

    x0, noise: (B, ...); t: (B,) integer timesteps; alphas_cumprod: (T,). Returns (B, ...) in x0's dtype.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected x0's shape {tuple(x0.shape)}")
    abar = _gather(alphas_cumprod, t, x0)
    return (abar.sqrt().to(x0.dtype) * x0 + (1 - abar).sqrt().to(x0.dtype) * noise)


def training_target(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor, prediction_type: str) -> Tensor:
    """What a model of `prediction_type` should output for x_t = q_sample(x0, t, noise).

    epsilon: noise; sample: x0; v_prediction: v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0 (Salimans & Ho 2022, sec. 4).
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        abar = _gather(alphas_cumprod, t, x0)
        return abar.sqrt().to(x0.dtype) * noise - (1 - abar).sqrt().to(x0.dtype) * x0
    raise ValueError(f"prediction_type must be one of epsilon, v_prediction, sample, got {prediction_type!r}")


def posterior_coeffs(abar_t: Scalar, abar_s: Scalar) -> tuple[Scalar, Scalar, Scalar]:
    """(c_x0, c_xt, var) of q(x_s | x_t, x_0) for abar_t = alpha_bar at t and abar_s at the earlier s (module doc).

    Works on Python floats (the sampler's host-side coefficients) and on tensors alike.
    """
    alpha = abar_t / abar_s
    beta = 1 - alpha
    c_x0 = abar_s ** 0.5 * beta / (1 - abar_t)
    c_xt = alpha ** 0.5 * (1 - abar_s) / (1 - abar_t)
    var = (1 - abar_s) / (1 - abar_t) * beta
    return c_x0, c_xt, var


def q_posterior_mean_variance(x0: Tensor, x_t: Tensor, t: Tensor, alphas_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (B, ...) and variance (B, 1, ..., 1) of q(x_{t-1} | x_t, x_0); abar_{-1} = 1.

    x0, x_t: (B, ...); t: (B,) integer timesteps; alphas_cumprod: (T,).
    """
    abar_t = _gather(alphas_cumprod, t, x0)
    prev = t.to(x0.device).long() - 1
    abar_s = torch.where(prev.reshape(abar_t.shape) >= 0, _gather(alphas_cumprod, prev.clamp(min=0), x0),
                         torch.ones_like(abar_t))
    c_x0, c_xt, var = posterior_coeffs(abar_t, abar_s)
    return c_x0.to(x0.dtype) * x0 + c_xt.to(x0.dtype) * x_t, var.to(x0.dtype)
