"""Loading real Stable Diffusion 1.x / 2.x / XL checkpoints unchanged, from local files only.

    components = load_components("path/to/stable-diffusion-v1-5")            # diffusers folder
    components = load_components("path/to/sdxl-base-1.0", variant="fp16")   # SDXL: *.fp16.* weights, and
                                                                             # text_encoder_2, tokenizer_2, options
    components = load_components("v1-5-pruned-emaonly.safetensors")         # single file (CompVis/LDM)
    components = load_components("v2-1_768-ema-pruned.safetensors",
                                 config={"scheduler": {"prediction_type": "v_prediction"},
                                         "unet": {"sample_size": 96}})

Every problem (missing file, corrupt file, wrong keys or shapes, unknown format) raises `CheckpointError`
before any model is returned. Formats: `diffusers_folder` (keys already fastdiff's) and `ldm` (single
files, converted by the explicit key maps in `ldm_keys`).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

import torch

from .common import CheckpointError, Components, Overrides, PathLike
from .diffusers_folder import load_diffusers_folder
from .ldm import load_ldm_checkpoint

__all__ = ["CheckpointError", "Components", "load_components"]

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def load_components(path: PathLike, device: Union[None, str, torch.device] = None, dtype: Optional[torch.dtype] = None,
                    variant: Optional[str] = None, config: Union[None, PathLike, Mapping] = None) -> Components:
    """Load a Stable Diffusion model: a diffusers-format folder or a single-file LDM checkpoint.

    device: where the weights go (default: CPU). dtype: floating-point dtype of every weight (default
    float32, whatever the file stores). variant: diffusers folders only, e.g. "fp16" reads
    `diffusion_pytorch_model.fp16.safetensors`. config: settings that take precedence over the
    checkpoint's own (or, for single files, the ones inferred from tensor shapes): a diffusers folder, or
    per-part dicts such as `{"scheduler": {"prediction_type": "v_prediction"}}`; a single file cannot tell
    v-prediction (SD2 768-v) from epsilon (SD2 512-base), and epsilon is the default.
    """
    path = Path(path)
    device = torch.device(device) if device is not None else None
    overrides = Overrides.parse(config)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path} is a folder without model_index.json: expected a diffusers-format "
                                  f"Stable Diffusion folder (model_index.json, unet/, vae/, text_encoder/, "
                                  f"tokenizer/, scheduler/) or a single checkpoint file")
        return load_diffusers_folder(path, device, dtype, variant, overrides)
    if not path.exists():
        raise CheckpointError(f"no such file or folder: {path}")
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise CheckpointError(f"{path} has an unknown format: expected a diffusers folder or a single-file "
                              f"checkpoint ending in {', '.join(SINGLE_FILE_SUFFIXES)}")
    if variant is not None:
        raise CheckpointError(f"variant={variant!r} selects weight files inside a diffusers folder; "
                              f"{path} is a single file")
    return load_ldm_checkpoint(path, device, dtype, overrides)
