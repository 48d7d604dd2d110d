"""Tiny random-weight Stable Diffusion models in diffusers format, the test-suite's stand-in for real
checkpoints (nothing can be downloaded). Shapes follow SD1 (768-style: conv proj_in, 8 heads,
quick_gelu text encoder) or SD2 (linear proj_in, head counts per block, gelu, pad token "!"), only small.

Every parameter is perturbed away from its initial value so that zero-initialised layers (conv_out,
proj_out) cannot hide a wrong computation.
"""
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent.parent / "fastdiff" / "assets" / "clip"


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


def make_tiny_sd(folder: Path, kind: str = "sd1", seed: int = 0, scheduler: str = "ddim"):
    """Save a tiny random StableDiffusionPipeline to `folder` and return it (float32, CPU, eval)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sd2 = kind == "sd2"
    if kind not in ("sd1", "sd2"):
        raise ValueError(f"kind must be 'sd1' or 'sd2', got {kind!r}")
    torch.manual_seed(seed)
    context_dim = 64 if sd2 else 32
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=context_dim,
        attention_head_dim=(2, 4) if sd2 else 8,
        use_linear_projection=sd2,
        upcast_attention=sd2,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408,
        hidden_size=context_dim,
        intermediate_size=2 * context_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu" if sd2 else "quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    ))
    tokenizer = CLIPTokenizer(str(ASSETS / "vocab.json"), str(ASSETS / "merges.txt"),
                              pad_token="!" if sd2 else "<|endoftext|>", model_max_length=77)
    for i, m in enumerate((unet, vae, text_encoder)):
        _perturb(m, seed + i)
    sched_cls = {"ddim": DDIMScheduler, "pndm": PNDMScheduler}[scheduler]
    sched = sched_cls(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                      prediction_type="v_prediction" if sd2 else "epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    _write_slow_tokenizer_files(Path(folder) / "tokenizer", pad_token="!" if sd2 else "<|endoftext|>")
    return pipe


def _write_slow_tokenizer_files(folder: Path, pad_token: str) -> None:
    """Real SD repos ship vocab.json + merges.txt + special_tokens_map.json; transformers 5 saves only
    tokenizer.json, so add the classic files to match what users have on disk."""
    import json
    import shutil

    shutil.copy(ASSETS / "vocab.json", folder / "vocab.json")
    shutil.copy(ASSETS / "merges.txt", folder / "merges.txt")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
