"""Export a trained run to a diffusers-format Stable Diffusion folder, the format fastdiff's loader (and
diffusers' StableDiffusionPipeline) reads:

    model_index.json                 part -> [library, class]; "_fastdiff_training" records how it was made
    unet/          config.json + diffusion_pytorch_model.safetensors   (float16; the EMA weights)
    vae/           config.json + diffusion_pytorch_model.safetensors   (float16; scaling_factor measured)
    text_encoder/  config.json + model.safetensors                     (float16; the EMA weights)
    tokenizer/     vocab.json, merges.txt, special_tokens_map.json, tokenizer_config.json (which declares the
                   caption words as the known words, in caption order: fastdiff notes any other prompt word)
    scheduler/     scheduler_config.json                               (SD's scaled_linear betas, DPM++ 2M)

Weights are stored in float16 to halve the shipped size; loaders widen them to the dtype asked for.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from fastdiff.models import CLIPTextConfig, UNetConfig

from .data import BACKGROUNDS, CAPTION_WORDS, COLORS, POSITIONS, SHAPES, SIZE_WORDS
from .loop import checkpoint_path, stage_weights
from .vae import load_vae_folder, save_vae_folder
from .vocab import declare_known_words

MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.42.1",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
}


def caption_words_in_order() -> list[str]:
    """CAPTION_WORDS in the order a caption uses them: article, sizes, colours, shapes, positions, backgrounds."""
    order = ["a", *(w.strip() for w in SIZE_WORDS.values() if w), *COLORS, *SHAPES,
             *(w for phrase in POSITIONS for w in phrase.split()), "on", *BACKGROUNDS, "background"]
    words = list(dict.fromkeys(order))
    if sorted(words) != sorted(CAPTION_WORDS):
        raise AssertionError(f"caption order {words} does not hold exactly CAPTION_WORDS {CAPTION_WORDS}")
    return words


def _half(weights: dict) -> dict:
    return {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in weights.items()}


def export_model(out: Path, model_dir: Path) -> Path:
    """Write the run in `out` (vae/, tokenizer/, unet.pt) as a diffusers folder at `model_dir`, replacing it."""
    out, model_dir = Path(out), Path(model_dir)
    unet_checkpoint = checkpoint_path(out, "unet")
    if not unet_checkpoint.is_file():
        raise FileNotFoundError(f"no UNet checkpoint at {unet_checkpoint}: run the unet stage first "
                                f"(python -m fastdiff.train unet --out {out})")
    unet_weights, state = stage_weights(unet_checkpoint, "unet")
    text_weights, _ = stage_weights(unet_checkpoint, "text_encoder")
    recipe = state["recipe"]
    vae = load_vae_folder(out / "vae", torch.device("cpu"))
    vae_info = json.loads((out / "vae" / "config.json").read_text())["_fastdiff_train"]

    if model_dir.exists():
        shutil.rmtree(model_dir)
    for part in ("unet", "vae", "text_encoder", "scheduler"):
        (model_dir / part).mkdir(parents=True)
    unet_config = UNetConfig.from_dict(recipe["unet"])
    (model_dir / "unet" / "config.json").write_text(json.dumps(unet_config.to_dict(), indent=2))
    save_file(_half(unet_weights), model_dir / "unet" / "diffusion_pytorch_model.safetensors")
    text_config = CLIPTextConfig.from_dict(recipe["text_encoder"])
    (model_dir / "text_encoder" / "config.json").write_text(json.dumps(text_config.to_dict(), indent=2))
    save_file(_half(text_weights), model_dir / "text_encoder" / "model.safetensors")
    save_vae_folder(model_dir / "vae", vae, vae.config, vae_info, dtype=torch.float16)
    shutil.copytree(out / "tokenizer", model_dir / "tokenizer")
    declare_known_words(model_dir / "tokenizer", caption_words_in_order())
    (model_dir / "scheduler" / "scheduler_config.json").write_text(json.dumps(recipe["scheduler"], indent=2))
    training = {"recipe": recipe["name"], "seed": recipe["seed"], "vae_steps": vae_info["steps"],
                "unet_steps": state["step"], "vae_batch": vae_info["batch"],
                "unet_batch": recipe["unet_stage"]["batch"]}
    (model_dir / "model_index.json").write_text(json.dumps({**MODEL_INDEX, "_fastdiff_training": training},
                                                           indent=2))
    return model_dir


def folder_size(folder: Path) -> int:
    """Bytes of every file under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
