"""What every checkpoint format shares: reading weight files, and building a model from a state dict.

Both loaders (diffusers folders, single-file LDM checkpoints) end in `build_model`, which checks the state
dict against the model's own keys and shapes BEFORE any weight is assigned, so a bad checkpoint raises a
`CheckpointError` listing every problem and never yields a half-loaded model.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from fastdiff.models.tokenizer import CLIPTokenizer

PathLike = Union[str, os.PathLike]
StateDict = dict[str, Tensor]

# How many keys an error message lists before it says "... and N more".
_MAX_LISTED = 12


class CheckpointError(ValueError):
    """A checkpoint that fastdiff cannot load: missing or corrupt file, wrong keys or shapes, unknown format."""


def list_keys(keys, limit: int = _MAX_LISTED) -> str:
    """`a, b, c ... and 40 more`: sorted, truncated so that a 1000-key mismatch stays readable."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def torch_load(path: Path) -> Any:
    """What a pickled weight file (`.bin`, `.ckpt`, `.pt`, `.pth`) holds, on the CPU, read by
    `torch.load(weights_only=True)`, which refuses pickled code."""
    try:
        try:
            # Memory-mapped: a "full-ema" .ckpt is 7 GB, half of it EMA copies that are never read.
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # torch's pre-1.6 file format cannot be mapped (or the file is damaged)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... depending on the damage
        raise CheckpointError(f"{path} could not be read by torch.load(weights_only=True) (truncated, corrupt, "
                              f"or it pickles more than tensors; convert it to .safetensors): {e}") from e
    return obj


def read_state_dict(path: Path) -> StateDict:
    """All tensors of one weight file on the CPU, as stored.

    `.safetensors` is read with safetensors; anything else (`.bin`, `.ckpt`, `.pt`, `.pth`) with
    `torch.load(weights_only=True)`, which refuses pickled code. A Lightning-style `{"state_dict": {...}}`
    wrapper is unwrapped.
    """
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    obj = torch_load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, expected a state dict (a mapping of tensors)")
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    return tensors


def build_model(model_cls: type, config, state_dict: StateDict, what: str,
                device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                file_keys: Optional[Mapping[str, str]] = None) -> nn.Module:
    """`model_cls(config)` holding exactly `state_dict`, in eval mode, without gradients.

    Every key and shape is checked before anything is assigned: missing keys, unexpected keys and shape
    mismatches are all reported in one `CheckpointError` (`what` names the checkpoint part in the message;
    `file_keys` maps a state-dict key to the key the file stores it under, when the two differ).
    Floating-point tensors are cast to `dtype` (default float32); integer buffers keep theirs.
    The model is built on the meta device and takes the state dict's tensors as its parameters, so a
    large model is never randomly initialised only to be overwritten.
    """
    dtype = dtype if dtype is not None else torch.float32
    with torch.device("meta"):
        model = model_cls(config)
    expected = model.state_dict()
    problems = []
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    if missing:
        problems.append(f"{len(missing)} missing keys: {list_keys(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {list_keys(unexpected)}")
    file_keys = file_keys or {}
    bad_shapes = [f"{k}{f' (file key {file_keys[k]})' if k in file_keys else ''}: "
                  f"checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if bad_shapes:
        problems.append(f"{len(bad_shapes)} shape mismatches: " + "; ".join(bad_shapes[:_MAX_LISTED])
                        + (f" ... and {len(bad_shapes) - _MAX_LISTED} more" if len(bad_shapes) > _MAX_LISTED else ""))
    if problems:
        raise CheckpointError(f"{what} does not match the model built from its config: " + "; ".join(problems))
    cast = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
            for k, v in state_dict.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    # A buffer computed in __init__ but kept out of the state dict would still be on the meta device.
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{model_cls.__name__} has tensors outside its state dict, which build_model cannot "
                           f"create on the meta device: {list_keys(left)}")
    return model.eval().requires_grad_(False)


@dataclass
class Components:
    """Everything a Stable Diffusion pipeline is built from, loaded and checked."""

    unet: nn.Module  # fastdiff.models.unet.UNet2DConditionModel, eval mode, no gradients
    vae: nn.Module  # fastdiff.models.vae.AutoencoderKL
    text_encoder: Optional[nn.Module]  # fastdiff.models.clip.CLIPTextModel; None for the SDXL refiner
    tokenizer: Optional[CLIPTokenizer]  # None exactly when text_encoder is
    scheduler_config: dict  # diffusers scheduler_config.json dict (betas, prediction_type, ...)
    source: str  # what was loaded, for logs and repr: format, path, weight files or inferred settings
    text_encoder_2: Optional[nn.Module] = None  # SDXL's OpenCLIP ViT-bigG, a CLIPTextModel with text_projection
    tokenizer_2: Optional[CLIPTokenizer] = None  # its tokenizer (pads with "!", id 0, unlike CLIP's)
    options: dict = field(default_factory=dict)  # model_index.json's pipeline settings: SDXL's
    #   force_zeros_for_empty_prompt (base: true) and requires_aesthetics_score (refiner: true)


# The parts a `config=` override can set, and where a diffusers folder keeps their configs.
CONFIG_FILES = {
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text_encoder": "text_encoder/config.json",
    "text_encoder_2": "text_encoder_2/config.json",  # SDXL's second text encoder
    "scheduler": "scheduler/scheduler_config.json",
}


@dataclass
class Overrides:
    """Settings that take precedence over the checkpoint's own configs (or, for single files, the ones
    inferred from tensor shapes)."""

    settings: dict[str, dict] = field(default_factory=dict)  # part (a CONFIG_FILES key) -> settings to merge
    tokenizer_folder: Optional[Path] = None  # a tokenizer/ folder replacing the checkpoint's (or the default)

    @classmethod
    def parse(cls, config: Union[None, PathLike, Mapping]) -> "Overrides":
        """`config` is None, a diffusers folder (its unet/config.json, ..., tokenizer/ are used, as
        diffusers' `from_single_file(config=...)` does), or a dict `{"unet": {...}, "scheduler": {...}}`
        of settings per part, e.g. `{"scheduler": {"prediction_type": "v_prediction"}}`."""
        if config is None:
            return cls()
        if isinstance(config, Mapping):
            unknown = sorted(set(config) - set(CONFIG_FILES))
            if unknown:
                raise CheckpointError(f"config= keys must be among {sorted(CONFIG_FILES)}, got {unknown}")
            bad = [k for k, v in config.items() if not isinstance(v, Mapping)]
            if bad:
                raise CheckpointError(f"config= values must be dicts of settings, got {bad} as "
                                      f"{[type(config[k]).__name__ for k in bad]}")
            return cls({k: dict(v) for k, v in config.items()})
        folder = Path(config)
        if not folder.is_dir():
            raise CheckpointError(f"config= must be a diffusers folder or a dict of settings per part; "
                                  f"{folder} is not a folder")
        settings = {part: read_json(folder / name) for part, name in CONFIG_FILES.items() if (folder / name).is_file()}
        tokenizer = folder / "tokenizer"
        if not settings and not tokenizer.is_dir():
            raise CheckpointError(f"config folder {folder} holds none of {sorted(CONFIG_FILES.values())} "
                                  f"and no tokenizer/")
        return cls(settings, tokenizer if tokenizer.is_dir() else None)

    def apply(self, part: str, base: Mapping) -> dict:
        return {**base, **self.settings.get(part, {})}


def make_config(config_cls: type, settings: Mapping, what: str):
    """`config_cls.from_dict(settings)`, with its complaint re-raised as a CheckpointError naming `what`."""
    try:
        return config_cls.from_dict(dict(settings))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{what}: {e}") from e


def load_tokenizer(folder: Path, what: str):
    """CLIPTokenizer.from_pretrained(folder), with a missing folder or file named in a CheckpointError."""
    if not folder.is_dir():
        raise CheckpointError(f"missing folder {folder} ({what})")
    try:
        return CLIPTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:  # missing files, bad JSON, a pad token not in the vocab
        raise CheckpointError(f"{what} {folder} could not be read: {e}") from e
