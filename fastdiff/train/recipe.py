"""The recipes: model shapes and training settings of the default model ("default") and of the test-sized
stand-in ("tiny"), in one place so that the command line, the tests and the README agree.

Sizes of "default" (float16 weights as shipped): UNet 11.0 M parameters, VAE 1.7 M, text encoder 0.7 M
(a 596-token vocabulary), 26.8 MB in all. The UNet works on 4 x 16 x 16 latents of 128 x 128 images,
three levels (16, 8, 4 px) of 64/128/128 channels, two resnets and a cross-attending transformer per level,
32-wide heads; the text encoder is CLIP's architecture at width 128, three layers, 77 positions.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from fastdiff.models import CLIPTextConfig, UNetConfig, VAEConfig

from .data import CAPTION_WORDS, IMAGE_SIZE
from .vocab import MAX_LENGTH, build_vocab, learn_merges

# The noise schedule of Stable Diffusion 1.x/2.x (DDPM training table; sampled with DPM++ 2M by default).
# "trailing" spacing starts sampling at t = 999 (Lin et al. 2023), where training put the purest noise.
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DPMSolverMultistepScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
    "steps_offset": 1,
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "clip_sample": False,  # latents are not in [-1, 1]: DDPM and DDIM must not clip their x0 to it
}


@dataclass(frozen=True)
class StageConfig:
    """Optimisation settings of one training stage (AdamW, linear warm-up then a constant learning rate, so
    that the first k steps of a run are exactly a run of k steps)."""

    steps: int  # optimiser steps of the stage
    batch: int  # images per step
    lr: float  # peak learning rate
    warmup: int  # steps of linear warm-up from 0 to lr
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.99)  # AdamW's moment decays
    grad_clip: float = 1.0  # max global gradient norm (0: off)
    ema_decay: float = 0.0  # decay of the exported weight average (0: export the raw weights)
    save_every: int = 1000  # checkpoint every this many steps (and at the end)


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a trained model, given the seed."""

    name: str  # "default" or "tiny"
    vae: VAEConfig  # scaling_factor is measured after VAE training and replaced in the exported config
    unet: UNetConfig
    text_encoder: CLIPTextConfig
    vae_stage: StageConfig
    unet_stage: StageConfig
    kl_weight: float = 1e-6  # weight of the VAE posterior's KL divergence (per latent element) vs. L1 + MSE
    #   (per pixel); 1e-4 learnt colours more slowly in a CPU trial (1200 steps of batch 4: colour read right
    #   in 16% of reconstructions, against 29% with 1e-6; 65% after 3000 steps, position 100%, shape 91%)
    caption_dropout: float = 0.1  # fraction of captions replaced by "" so one model also predicts unconditionally
    seed: int = 0  # seeds the dataset and every random draw of training
    scheduler: dict = field(default_factory=lambda: dict(SCHEDULER_CONFIG))
    image_size: int = IMAGE_SIZE  # training images are image_size x image_size; latents are 8x smaller
    scale_images: int = 1024  # held-out images whose latents set the VAE's scaling_factor

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly; stored in checkpoints to refuse resuming a different recipe."""
        d = asdict(self)
        for part in ("vae", "unet", "text_encoder"):
            d[part] = getattr(self, part).to_dict()
        return d


def vocab_size() -> int:
    """Size of the caption-word vocabulary (vocab.py), which fixes the text encoder's embedding."""
    return len(build_vocab(learn_merges(CAPTION_WORDS)))


def _unet(channels: tuple[int, ...], layers: int, context: int, groups: int, head_width: int,
          image_size: int = IMAGE_SIZE) -> UNetConfig:
    levels = len(channels)
    return UNetConfig(sample_size=image_size // 8, block_out_channels=channels, layers_per_block=layers,
                      down_block_types=("CrossAttnDownBlock2D",) * levels,
                      up_block_types=("CrossAttnUpBlock2D",) * levels, cross_attention_dim=context,
                      attention_head_dim=tuple(c // head_width for c in channels), norm_num_groups=groups)


def _text(width: int, layers: int, heads: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size(), hidden_size=width, intermediate_size=4 * width,
                          num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=MAX_LENGTH)


def default_recipe() -> Recipe:
    return Recipe(
        name="default",
        vae=VAEConfig(block_out_channels=(32, 64, 64, 64), layers_per_block=2, sample_size=IMAGE_SIZE),
        unet=_unet((64, 128, 128), layers=2, context=128, groups=32, head_width=32),
        text_encoder=_text(128, layers=3, heads=2),
        vae_stage=StageConfig(steps=8000, batch=32, lr=3e-4, warmup=100),
        # 2376 steps is what 7 minutes of an H200 trained for the shipped model (a run of 8000 was cut by its
        # time limit; the constant learning rate makes that exactly a 2376-step run). It already reaches
        # 99-100% prompt adherence on every attribute (fastdiff/train/README.md).
        unet_stage=StageConfig(steps=2376, batch=256, lr=3e-4, warmup=200, weight_decay=0.01, ema_decay=0.999),
    )


def tiny_recipe() -> Recipe:
    """A few-second CPU stand-in with the same structure at 64 x 64 pixels (tests, smoke runs)."""
    return Recipe(
        name="tiny",
        vae=VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64),
        unet=_unet((16, 32), layers=1, context=16, groups=8, head_width=8, image_size=64),
        text_encoder=_text(16, layers=1, heads=2),
        vae_stage=StageConfig(steps=40, batch=4, lr=2e-3, warmup=2, save_every=20),
        unet_stage=StageConfig(steps=20, batch=8, lr=1e-3, warmup=2, ema_decay=0.9, save_every=10),
        image_size=64,
        scale_images=32,
    )


RECIPES = {"default": default_recipe, "tiny": tiny_recipe}


def get_recipe(name: str, **stage_overrides: Any) -> Recipe:
    """The recipe `name`; `vae_steps=`, `unet_batch=`, ... override one stage setting each."""
    if name not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    recipe = RECIPES[name]()
    for key, value in stage_overrides.items():
        stage, _, setting = key.partition("_")
        if stage not in ("vae", "unet") or setting not in StageConfig.__dataclass_fields__:
            raise ValueError(f"stage overrides are vae_<setting> or unet_<setting> with a StageConfig setting, "
                             f"got {key!r}")
        part = f"{stage}_stage"
        recipe = replace(recipe, **{part: replace(getattr(recipe, part), **{setting: value})})
    return recipe
