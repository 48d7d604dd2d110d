"""Stage 2: the text-conditioned latent UNet and its text encoder, trained together; the VAE is frozen.

Each step (DDPM, Ho et al. 2020, with SD's latent setting, Rombach et al. 2022):

    z0 = scaling_factor * (mean + std * noise')      a posterior sample of the image's latent
    t ~ U{0, ..., T-1},  eps ~ N(0, I),  z_t = q_sample(z0, t, eps)
    loss = || UNet(z_t, t, TextEncoder(tokens)) - training_target(z0, eps, t) ||^2     (epsilon prediction)

with each caption replaced by "" with probability `caption_dropout`, so the same model predicts the
unconditional noise that classifier-free guidance (Ho & Salimans 2022) contrasts with the conditional one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from fastdiff.models import CLIPTextModel, CLIPTokenizer, UNet2DConditionModel
from fastdiff.schedulers import SchedulerConfig, alphas_cumprod_for_config, q_sample, training_target

from .data import CAPTION_WORDS, ShapesDataset, upload
from .loop import LossFn, StageResult, run_stage
from .recipe import Recipe
from .vae import load_vae_folder
from .vocab import write_tokenizer


def prepare_tokenizer(out: Path, recipe: Recipe) -> CLIPTokenizer:
    """out/tokenizer/ (written if missing; it depends only on the caption words), checked against the recipe."""
    folder = Path(out) / "tokenizer"
    if not (folder / "vocab.json").is_file():
        write_tokenizer(folder, CAPTION_WORDS)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    if len(tokenizer.vocab) != recipe.text_encoder.vocab_size:
        raise ValueError(f"{folder} has {len(tokenizer.vocab)} tokens but the recipe's text encoder expects "
                         f"{recipe.text_encoder.vocab_size}; delete the folder to rebuild it")
    return tokenizer


def unet_loss(unet: UNet2DConditionModel, text_encoder: CLIPTextModel, vae, tokenizer: CLIPTokenizer,
              dataset: ShapesDataset, recipe: Recipe, device: torch.device) -> LossFn:
    batch = recipe.unet_stage.batch
    scheduler = SchedulerConfig.from_dict(recipe.scheduler, "ddpm")
    alphas_cumprod = alphas_cumprod_for_config(scheduler).to(device)  # (T,) float64
    scale = vae.config.scaling_factor
    token_rows: dict[str, torch.Tensor] = {}  # caption -> (77,) ids: the ~800 captions are tokenized once each

    def tokens(caption: str) -> torch.Tensor:
        if caption not in token_rows:
            token_rows[caption] = tokenizer(caption)[0]
        return token_rows[caption]

    def loss_fn(step: int, generator: torch.Generator):
        with torch.no_grad():
            images, captions = dataset.batch(np.arange(step * batch, (step + 1) * batch), device)
            mean, logvar = vae.encode_distribution(images)  # (B, 4, h, w) each
            posterior_noise = upload(torch.randn(mean.shape, generator=generator), device)
            z0 = ((mean + (0.5 * logvar).exp() * posterior_noise) * scale).float()
        drop = torch.rand(batch, generator=generator) < recipe.caption_dropout  # (B,)
        ids = upload(torch.stack([tokens("" if d else c) for d, c in zip(drop.tolist(), captions)]), device)
        t = upload(torch.randint(0, scheduler.num_train_timesteps, (batch,), generator=generator), device)
        noise = upload(torch.randn(z0.shape, generator=generator), device)
        z_t = q_sample(z0, t, noise, alphas_cumprod)
        target = training_target(z0, noise, t, alphas_cumprod, scheduler.prediction_type)
        prediction = unet(z_t, t, text_encoder(ids))  # ids (B, 77) -> context (B, 77, D)
        return F.mse_loss(prediction.float(), target)

    return loss_fn


def train_unet(recipe: Recipe, out: Path, device: torch.device, time_limit: Optional[float] = None,
               progress: bool = True) -> StageResult:
    """Run (or resume) the UNet + text encoder stage in `out`, on the VAE the vae stage left in out/vae/."""
    out = Path(out)
    vae = load_vae_folder(out / "vae", device)
    tokenizer = prepare_tokenizer(out, recipe)
    torch.manual_seed(recipe.seed + 1)  # the initial weights, independent of the VAE's
    unet = UNet2DConditionModel(recipe.unet).to(device)
    text_encoder = CLIPTextModel(recipe.text_encoder).to(device)
    dataset = ShapesDataset(recipe.seed, recipe.image_size)
    loss_fn = unet_loss(unet, text_encoder, vae, tokenizer, dataset, recipe, device)
    return run_stage("unet", recipe, {"unet": unet, "text_encoder": text_encoder}, loss_fn, out, device,
                     time_limit, progress)
