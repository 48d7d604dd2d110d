"""Stage 1: the VAE, trained to reconstruct dataset images through its posterior.

    loss = |x' - x| + (x' - x)^2 + kl_weight * KL(q(z|x) || N(0, I)),   x' = decode(mean + std * noise)

(each term a mean over its elements; images in [-1, 1]). The small KL term keeps the latents near unit scale
and the decoder tolerant of small latent errors, which the diffusion model will make. No perceptual or
adversarial loss: flat colours and straight or circular edges need none.

When the stage ends, the latents' scale is measured (`scaling_factor` = 1 / std of the posterior means over
`recipe.scale_images` held-out images, as for SD's 0.18215), the analyser reads a quarter as many
reconstructions (what no diffusion model on these latents can beat), and the VAE is written as a diffusers
`vae/` folder, which the UNet stage and the export read.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import save_file

from fastdiff import ops
from fastdiff.loading.common import build_model, read_state_dict
from fastdiff.models import AutoencoderKL, VAEConfig

from .analyse import ATTRIBUTES, analyse, score
from .data import ShapesDataset, upload
from .loop import LossFn, StageResult, run_stage
from .recipe import Recipe

SCALE_OFFSET = 1 << 40  # held-out images (scaling_factor, reconstruction check) are dataset indices from here on
WEIGHTS = "diffusion_pytorch_model.safetensors"


def vae_loss(vae: AutoencoderKL, dataset: ShapesDataset, recipe: Recipe, device: torch.device) -> LossFn:
    batch = recipe.vae_stage.batch

    def loss_fn(step: int, generator: torch.Generator):
        images, _ = dataset.batch(np.arange(step * batch, (step + 1) * batch), device)  # (B, 3, H, W) in [-1, 1]
        mean, logvar = vae.encode_distribution(images)  # (B, 4, H/8, W/8) each
        noise = upload(torch.randn(mean.shape, generator=generator), device)
        recon = vae.decode(mean + (0.5 * logvar).exp() * noise).float()
        mean, logvar = mean.float(), logvar.float()
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).mean()
        error = recon - images
        return error.abs().mean() + error.square().mean() + recipe.kl_weight * kl

    return loss_fn


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, dataset: ShapesDataset, device: torch.device, images: int,
                           batch: int = 128) -> float:
    """1 / std of the posterior means (every element) of `images` held-out dataset images, in float32."""
    vae.eval()
    latents = []
    for start in range(0, images, batch):
        indices = np.arange(SCALE_OFFSET + start, SCALE_OFFSET + min(start + batch, images))
        latents.append(vae.encode(dataset.batch(indices, device)[0]).float())
    return float(1.0 / torch.cat(latents).std())


@torch.no_grad()
def reconstruction_accuracy(vae: AutoencoderKL, dataset: ShapesDataset, device: torch.device, images: int = 256,
                            batch: int = 64) -> dict[str, float]:
    """The analyser's per-attribute accuracy on decode(encode(x)) of held-out images, and "l1" their mean
    absolute error in [0, 255] pixel units: the ceiling of the whole model's prompt adherence."""
    vae.eval()
    analyses, scenes, errors = [], [], []
    for start in range(0, images, batch):
        indices = np.arange(SCALE_OFFSET + start, SCALE_OFFSET + min(start + batch, images))
        x, _ = dataset.batch(indices, device)
        recon = ((vae(x).float().clamp(-1, 1) + 1) * 127.5).round()
        errors.append((recon - (x + 1) * 127.5).abs().mean().item())
        analyses += [analyse(im) for im in recon.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()]
        s = dataset.scenes(indices)
        scenes += [s[i] for i in range(len(s))]
    result = {a: float(np.mean([score(x, s)[a] for x, s in zip(analyses, scenes)])) for a in ATTRIBUTES}
    return {**result, "l1": float(np.mean(errors))}


def save_vae_folder(folder: Path, vae: AutoencoderKL, config: VAEConfig, info: dict,
                    dtype: torch.dtype = torch.float32) -> None:
    """A diffusers `vae/` folder: config.json (with `info` under "_fastdiff_train", a key loaders skip) and
    the weights as safetensors in `dtype`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**config.to_dict(), "_fastdiff_train": info}, indent=2))
    save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in vae.state_dict().items()}, folder / WEIGHTS)


def load_vae_folder(folder: Path, device: torch.device) -> AutoencoderKL:
    """The VAE a `save_vae_folder` wrote, float32 on `device`, in eval mode without gradients."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no trained VAE at {folder}: run the vae stage first "
                                f"(python -m fastdiff.train vae --out {folder.parent})")
    config = VAEConfig.from_dict(json.loads((folder / "config.json").read_text()))
    return build_model(AutoencoderKL, config, read_state_dict(folder / WEIGHTS), str(folder / WEIGHTS), device)


def train_vae(recipe: Recipe, out: Path, device: torch.device, time_limit: Optional[float] = None,
              progress: bool = True) -> StageResult:
    """Run (or resume) the VAE stage in `out`; when it stops, write out/vae/ with the measured scaling_factor
    and, under "_fastdiff_train" in its config, the analyser's accuracy on reconstructions."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)  # the initial weights
    vae = AutoencoderKL(recipe.vae).to(device)
    dataset = ShapesDataset(recipe.seed, recipe.image_size)
    result = run_stage("vae", recipe, {"vae": vae}, vae_loss(vae, dataset, recipe, device), out, device,
                       time_limit, progress)
    # Reference ops for the measurements too: on CUDA, `auto` would first spend a minute autotuning Triton.
    with ops.use_backend("reference"):
        scale = measure_scaling_factor(vae, dataset, device, recipe.scale_images)
        reconstruction = reconstruction_accuracy(vae, dataset, device, recipe.scale_images // 4)
    info = {"recipe": recipe.name, "seed": recipe.seed, "steps": result.steps_done, "batch": recipe.vae_stage.batch,
            "finished": result.finished, "loss": result.last_loss, "reconstruction": reconstruction}
    save_vae_folder(out / "vae", vae, replace(recipe.vae, scaling_factor=scale), info)
    return result
