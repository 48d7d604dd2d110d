"""Tiny random-weight SDXL models in diffusers format, the test-suite's stand-in for the published base and refiner
(nothing can be downloaded). Shapes follow SDXL's, only small:

    base     CLIP ViT-L-style text encoder (32 wide, quick_gelu) + OpenCLIP bigG-style CLIPTextModelWithProjection
             (48 wide, gelu, projection to 40, tokenizer_2 padding with "!"), so the context is 32 + 48 = 80 wide;
             a UNet of 3 levels without attention at the top one, addition_embed_type "text_time" with six time
             ids; force_zeros_for_empty_prompt.
    refiner  the second encoder alone (context 48 wide), a UNet of 4 levels with attention at the middle two and
             five time ids (the aesthetic score in place of the target size); requires_aesthetics_score.

Both share the VAE (4 levels: latents are 1/8 of the image, force_upcast, scaling_factor 0.13025) and the second
text encoder, as the published refiner does with the base's, and SDXL's EulerDiscreteScheduler config. Every
component is built from its own fixed seed, and every parameter is perturbed away from its initial value so that
zero-initialised layers (conv_out, proj_out) cannot hide a wrong computation. float32, CPU. The default image is
64x64 (unet sample_size 8): a whole 4-step image takes well under a second on two CPU cores.

    pipe = sdxl_components("base")          # diffusers' StableDiffusionXLPipeline, the oracle
    save_sdxl_folder(pipe, folder)          # what fastdiff.Pipeline.from_pretrained(folder) loads
"""
from pathlib import Path
from typing import Optional

import torch

from tiny_models import ASSETS, _perturb, _write_slow_tokenizer_files

KINDS = ("base", "refiner")
TEXT_DIMS = (32, 48)  # hidden widths of the two text encoders (SDXL: 768, 1280)
POOLED_DIM = 40  # the second encoder's projection_dim (SDXL: 1280), unlike its hidden width
TIME_DIM = 8  # addition_time_embed_dim (SDXL: 256)
SAMPLE_SIZE = 8  # latent size of the default image (SDXL: 128, a 1024x1024 image)
PAD_TOKEN_2 = "!"  # tokenizer_2's pad token, id 0 (OpenCLIP's), where CLIP pads with <|endoftext|>
# SDXL's scheduler/scheduler_config.json (stabilityai/stable-diffusion-xl-base-1.0)
SCHEDULER_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        interpolation_type="linear", num_train_timesteps=1000, prediction_type="epsilon",
                        sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1,
                        timestep_spacing="leading", trained_betas=None, use_karras_sigmas=False)
_SEEDS = {"text_encoder": 10, "text_encoder_2": 11, "vae": 12, "unet_base": 13, "unet_refiner": 14}


def _seeded(name: str, build):
    """build() under the component's own seed, then perturbed from a generator of that seed."""
    torch.manual_seed(_SEEDS[name])
    module = build()
    _perturb(module, _SEEDS[name])
    return module.eval()


def _text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_DIMS[0], intermediate_size=4 * TEXT_DIMS[0], num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0,
        eos_token_id=2, pad_token_id=1))


def _text_encoder_2():
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_DIMS[1], intermediate_size=4 * TEXT_DIMS[1], num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu", projection_dim=POOLED_DIM,
        bos_token_id=0, eos_token_id=2, pad_token_id=1))


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=1, norm_num_groups=8, sample_size=8 * SAMPLE_SIZE,
                         scaling_factor=0.13025, force_upcast=True)


def _unet(kind: str):
    from diffusers import UNet2DConditionModel

    common = dict(sample_size=SAMPLE_SIZE, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM)
    if kind == "base":
        # no attention at the top level, transformer depth per level (SDXL: (1, 2, 10)), head dims 10 and 16
        return UNet2DConditionModel(
            **common, block_out_channels=(32, 40, 64), attention_head_dim=(5, 4, 4),
            transformer_layers_per_block=(1, 1, 2), cross_attention_dim=sum(TEXT_DIMS),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            projection_class_embeddings_input_dim=POOLED_DIM + 6 * TIME_DIM)
    # the refiner: attention at the middle two levels (and the mid block), one depth for all, bigG's context
    return UNet2DConditionModel(
        **common, block_out_channels=(32, 32, 48, 48), attention_head_dim=(2, 2, 4, 4),
        transformer_layers_per_block=2, cross_attention_dim=TEXT_DIMS[1],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        projection_class_embeddings_input_dim=POOLED_DIM + 5 * TIME_DIM)


def _tokenizer(pad_token: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(ASSETS / "vocab.json"), str(ASSETS / "merges.txt"), pad_token=pad_token,
                         model_max_length=77)


def sdxl_components(kind: str = "base"):
    """A tiny random SDXL pipeline of diffusers, float32 on the CPU: kind "base" gives a StableDiffusionXLPipeline,
    "refiner" a StableDiffusionXLImg2ImgPipeline (no first text encoder or tokenizer). The same kind always gives
    the same weights, and the two kinds share the second text encoder's and the VAE's."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    parts = dict(vae=_seeded("vae", _vae), text_encoder_2=_seeded("text_encoder_2", _text_encoder_2),
                 tokenizer_2=_tokenizer(PAD_TOKEN_2), unet=_seeded(f"unet_{kind}", lambda: _unet(kind)),
                 scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG))
    if kind == "base":
        pipe = StableDiffusionXLPipeline(**parts, text_encoder=_seeded("text_encoder", _text_encoder),
                                         tokenizer=_tokenizer("<|endoftext|>"), force_zeros_for_empty_prompt=True,
                                         add_watermarker=False)
    else:
        pipe = StableDiffusionXLImg2ImgPipeline(**parts, text_encoder=None, tokenizer=None,
                                                requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                                add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_sdxl_folder(pipe, path, variant: Optional[str] = None) -> Path:
    """Write `pipe` as a diffusers folder (`save_pretrained`, weight files named for `variant`, e.g.
    `diffusion_pytorch_model.fp16.safetensors`), with the classic tokenizer files real SDXL folders ship
    (vocab.json, merges.txt, special_tokens_map.json) beside what transformers writes. Returns the folder."""
    path = Path(path)
    pipe.save_pretrained(path, variant=variant)
    for name, pad_token in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", PAD_TOKEN_2)):
        if getattr(pipe, name, None) is not None:
            _write_slow_tokenizer_files(path / name, pad_token=pad_token)
    return path
