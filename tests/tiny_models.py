"""Tiny random-weight Stable Diffusion models in diffusers format, the test-suite's stand-in for real
checkpoints (nothing can be downloaded). Shapes follow SD1 (768-style: conv proj_in, 8 heads,
quick_gelu text encoder) or SD2 (linear proj_in, head counts per block, gelu, pad token "!"), only small.

Every parameter is perturbed away from its initial value so that zero-initialised layers (conv_out,
proj_out) cannot hide a wrong computation.

`make_tiny_sd` saves a diffusers folder (for the pipeline tests); `tiny_unet`, `tiny_vae` and
`tiny_text_encoder` build fastdiff's own reference modules in memory (for the engine tests).
"""
from pathlib import Path

import torch
from safetensors.torch import save_file

from fastdiff.models import (AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, UNetConfig,
                             VAEConfig)

ASSETS = Path(__file__).resolve().parent.parent / "fastdiff" / "assets" / "clip"

# Tiny SD1-style (conv proj_in, one head count) and SD2-style (linear proj_in, heads per level, two transformer
# layers) UNets. Head dims 16 and 8/16: big enough for SDPA's fused kernels, small enough for two CPU cores.
TINY_UNETS = {
    "sd1": UNetConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=24,
                      attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "sd2": UNetConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=40,
                      attention_head_dim=(4, 4), use_linear_projection=True, transformer_layers_per_block=2,
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
}
# Two levels with an attention in the mid block and a 32-wide single head.
TINY_VAE = VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of a against ref, in float64."""
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def write_single_file(path: Path, sd: dict, nested: bool = True) -> Path:
    """sd as a single checkpoint file: .safetensors, else a torch.save'd .ckpt, either a Lightning checkpoint (the
    weights nested under "state_dict", with `nested`) or a bare state dict (as ComfyUI's and A1111's model savers
    write them)."""
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save({"state_dict": sd, "global_step": 470000, "epoch": 6} if nested else sd, path)
    return path


def randomise(module: torch.nn.Module, scale: float = 0.05) -> None:
    """Move every parameter away from its initial value (zero biases would hide a wrong fused bias), from the
    global generator (the suite's fixture seeds it)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def tiny_unet(kind: str = "sd1") -> UNet2DConditionModel:
    """fastdiff's reference UNet in a TINY_UNETS shape, float32, eval, no gradients, random weights."""
    unet = UNet2DConditionModel(TINY_UNETS[kind]).eval().requires_grad_(False)
    randomise(unet)
    return unet


def tiny_vae() -> AutoencoderKL:
    """fastdiff's reference VAE in the TINY_VAE shape, float32, eval, no gradients, random weights."""
    vae = AutoencoderKL(TINY_VAE).eval().requires_grad_(False)
    randomise(vae)
    return vae


def tiny_text_encoder(hidden_size: int = 24, vocab_size: int = 1000) -> CLIPTextModel:
    """fastdiff's reference CLIP text encoder, two layers of two heads, float32, eval, no gradients, random
    weights; hidden_size is the context width a UNet's cross_attention_dim must match."""
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=2)
    encoder = CLIPTextModel(config).eval().requires_grad_(False)
    randomise(encoder)
    return encoder


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


# (hidden, layers, heads, intermediate, act): head_dim 8 and 32, an MLP width that is not a multiple of D.
CLIP_CONFIGS = [
    (32, 2, 4, 64, "quick_gelu"),
    (64, 3, 2, 100, "gelu"),
]


def transformers_clip(hidden, layers, heads, intermediate, act):
    """A transformers CLIPTextModel with random, perturbed weights (the oracle)."""
    import transformers

    config = transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, hidden_act=act, max_position_embeddings=77,
        bos_token_id=998, eos_token_id=999, pad_token_id=1, attn_implementation="eager")
    model = transformers.CLIPTextModel(config).eval()
    # Fresh LayerNorms are (1, 0) and biases 0: perturb every parameter so each one matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def clip_from_transformers(theirs) -> CLIPTextModel:
    """fastdiff's CLIPTextModel from the oracle's config, loaded strictly from its weights."""
    ours = CLIPTextModel(CLIPTextConfig.from_dict(theirs.config.to_dict())).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours
