"""A generation request, checked before any model is loaded or any work starts.

`check_request` takes what `Pipeline.__call__` and `fastdiff.generate` take and answers a bad value with a
`ValueError` naming it and what was expected. It needs no model and imports no torch, so `generate` checks before
it loads a checkpoint and the console script before it imports torch. What only the model can answer (its default
size, its VAE factor, an init image's size) the Pipeline checks on top (`Pipeline._validate`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from fastdiff.schedulers.config import SCHEDULERS

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# A1111's extra-network tag for a LoRA in a prompt: <lora:NAME> or <lora:NAME:WEIGHT>
LORA_TAG = re.compile(r"<lora:([^:<>]*)(?::([^<>]*))?>")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")  # the LoRA files a tag's NAME finds
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes seeds in [0, 2**64)
SIZE_MULTIPLE = 8  # the VAE's downsampling factor in every Stable Diffusion model
Prompt = Union[str, Sequence[str]]
Size = tuple[int, int]  # two pixel counts: (height, width), or a crop's (top, left)


@dataclass
class Request:
    """A checked request. height/width None: the model's default size (or the init image's)."""

    prompts: list[str]
    negative: list[str]
    steps: int
    guidance_scale: float
    guidance_rescale: float
    height: Optional[int]
    width: Optional[int]
    scheduler: str
    karras: Optional[bool]
    num_images: int
    output_type: str
    strength: float

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images

    @property
    def cfg(self) -> bool:
        # diffusers' convention: guidance_scale <= 1 means a single conditional UNet pass.
        return self.guidance_scale > 1.0


def check_request(prompt: Prompt, steps: int = 25, *, negative_prompt: Optional[Prompt] = None,
                  guidance_scale: float = 7.5, height: Optional[int] = None, width: Optional[int] = None,
                  seed: Any = None, scheduler: str = "dpmpp_2m", karras: Optional[bool] = False, num_images: int = 1,
                  output_type: str = "pil", strength: float = 0.8, guidance_rescale: float = 0.0, eta: float = 0.0,
                  clip_skip: Optional[int] = None) -> Request:
    """Every argument that needs no model, checked; the first bad one raises ValueError naming it."""
    prompts = as_prompt_list(prompt, "prompt")
    negative = as_prompt_list("" if negative_prompt is None else negative_prompt, "negative_prompt")
    if len(negative) == 1 and len(prompts) > 1:
        negative = negative * len(prompts)
    if len(negative) != len(prompts):
        raise ValueError(f"negative_prompt has {len(negative)} entries, expected 1 or {len(prompts)} "
                         f"(one per prompt)")
    _check_positive_int("steps", steps)
    _check_number("guidance_scale", guidance_scale, 0.0, math.inf)
    _check_number("guidance_rescale", guidance_rescale, 0.0, 1.0)
    _check_number("strength", strength, 0.0, 1.0)
    _check_number("eta", eta, 0.0, math.inf)
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {list(SCHEDULERS)}, got {scheduler!r}")
    if karras not in (None, True, False):
        raise ValueError(f"karras must be True, False or None (the checkpoint's setting), got {karras!r}")
    _check_positive_int("num_images", num_images)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    for name, value in (("height", height), ("width", width)):
        if value is not None:
            check_size(name, value, SIZE_MULTIPLE)
    if clip_skip is not None and (not _is_int(clip_skip) or clip_skip < 0):
        raise ValueError(f"clip_skip must be None or an int >= 0 (layers to skip), got {clip_skip!r}")
    check_seed(seed, len(prompts) * num_images)
    return Request(prompts, negative, steps, float(guidance_scale), float(guidance_rescale), height, width,
                   scheduler, karras, num_images, output_type, float(strength))


@dataclass
class SDXLRequest:
    """SDXL's arguments, checked (`check_sdxl_request`). None: not given (the Pipeline fills in SDXL's defaults)."""

    prompts_2: list[str]  # the second text encoder's texts, one per prompt (default: the prompts)
    negative_2: list[str]  # its negative texts (default: the negative prompts)
    original_size: Optional[Size] = None  # size conditioning (default: the image's size)
    crops_coords_top_left: Optional[Size] = None  # crop conditioning (top, left) (default: (0, 0))
    target_size: Optional[Size] = None  # base only (default: the image's size)
    negative_original_size: Optional[Size] = None  # the negative rows' (default: original_size)
    negative_crops_coords_top_left: Optional[Size] = None  # (default: crops_coords_top_left)
    negative_target_size: Optional[Size] = None  # (default: target_size)
    aesthetic_score: Optional[float] = None  # refiner only (default: 6.0)
    negative_aesthetic_score: Optional[float] = None  # refiner only (default: 2.5)
    denoising_start: Optional[float] = None  # fraction of the denoising done before this call (refiner hand-off)
    denoising_end: Optional[float] = None  # fraction after which this call stops (base hand-off)


# `check_sdxl_request`'s arguments: what Pipeline.__call__ and generate() take for SDXL alone
SDXL_ARGUMENTS = ("prompt_2", "negative_prompt_2", "original_size", "crops_coords_top_left", "target_size",
                  "negative_original_size", "negative_crops_coords_top_left", "negative_target_size",
                  "aesthetic_score", "negative_aesthetic_score", "denoising_start", "denoising_end")


def check_sdxl_request(prompts: list[str], negative: list[str], prompt_2: Optional[Prompt] = None,
                       negative_prompt_2: Optional[Prompt] = None, original_size: Any = None,
                       crops_coords_top_left: Any = None, target_size: Any = None, negative_original_size: Any = None,
                       negative_crops_coords_top_left: Any = None, negative_target_size: Any = None,
                       aesthetic_score: Any = None, negative_aesthetic_score: Any = None, denoising_start: Any = None,
                       denoising_end: Any = None) -> SDXLRequest:
    """SDXL's arguments that need no model, checked against `check_request`'s prompts and negative prompts; the
    first bad one raises ValueError naming it. Whether the model takes them (an SDXL base or refiner) is the
    Pipeline's question."""
    prompts_2 = prompts if prompt_2 is None else _per_prompt(prompt_2, "prompt_2", len(prompts))
    negative_2 = negative if negative_prompt_2 is None else _per_prompt(negative_prompt_2, "negative_prompt_2",
                                                                        len(prompts))
    for name, value in (("original_size", original_size), ("target_size", target_size),
                        ("negative_original_size", negative_original_size),
                        ("negative_target_size", negative_target_size)):
        _check_pair(name, value, "(height, width), two positive ints", 1)
    for name, value in (("crops_coords_top_left", crops_coords_top_left),
                        ("negative_crops_coords_top_left", negative_crops_coords_top_left)):
        _check_pair(name, value, "(top, left), two ints >= 0", 0)
    for name, value in (("aesthetic_score", aesthetic_score), ("negative_aesthetic_score", negative_aesthetic_score)):
        if value is not None and not (_is_number(value) and math.isfinite(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is not None and not (_is_number(value) and 0.0 < value < 1.0):
            raise ValueError(f"{name} must be a fraction of the denoising strictly between 0 and 1, got {value!r}")
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start must be below denoising_end, got {denoising_start!r} and "
                         f"{denoising_end!r}")

    def pair(value: Any) -> Optional[Size]:
        return None if value is None else (int(value[0]), int(value[1]))

    def fraction(value: Any) -> Optional[float]:
        return None if value is None else float(value)

    return SDXLRequest(prompts_2, negative_2, pair(original_size), pair(crops_coords_top_left), pair(target_size),
                       pair(negative_original_size), pair(negative_crops_coords_top_left), pair(negative_target_size),
                       fraction(aesthetic_score), fraction(negative_aesthetic_score), fraction(denoising_start),
                       fraction(denoising_end))


def _per_prompt(value: Prompt, name: str, n: int) -> list[str]:
    texts = as_prompt_list(value, name)
    if len(texts) == 1:
        return texts * n
    if len(texts) != n:
        raise ValueError(f"{name} has {len(texts)} entries, expected 1 or {n} (one per prompt)")
    return texts


def _check_pair(name: str, value: Any, expected: str, low: int) -> None:
    if value is None:
        return
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) and v >= low for v in value)):
        raise ValueError(f"{name} must be {expected}, got {_short(value)}")


def check_size(name: str, value: Any, multiple: int) -> None:
    if _is_int(value) and value > 0 and value % multiple == 0:
        return
    raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r}")


def check_seed(seed: Any, images: int) -> None:
    """None (random), an int in [0, 2**64) or a torch.Generator (checked further when it is used), or a list of one
    such int or Generator per image, each image then drawn from its own."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != images:
            raise ValueError(f"seed has {len(seed)} entries, expected one per image ({images}) or a single seed")
        for one in seed:
            _check_one_seed(one, "an entry of seed")
        return
    if seed is not None:
        _check_one_seed(seed, "seed")


def _check_one_seed(seed: Any, what: str) -> None:
    if type(seed).__name__ == "Generator":
        return
    if not _is_int(seed) or not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{what} must be an int from 0 to 2**64 - 1 or a torch.Generator, got {seed!r}")


def lora_files(folder: Union[str, PathLike]) -> dict[str, Path]:
    """The LoRA files under `folder` (its subfolders too, as A1111 looks) by the name a `<lora:NAME>` tag gives: the
    file's stem. ValueError when two files have one name."""
    found: dict[str, Path] = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix in LORA_SUFFIXES and path.is_file():
            if path.stem in found:
                raise ValueError(f"<lora:{path.stem}> would name two files in {str(folder)!r}: "
                                 f"{found[path.stem]} and {path}; rename one")
            found[path.stem] = path
    return found


def lora_weight(text: str) -> float:
    """A LoRA tag's (or --lora's) WEIGHT text as a number: "" is 1; ValueError unless it is a finite number."""
    value = float(text or "1")
    if not math.isfinite(value):
        raise ValueError(f"a LoRA weight must be a finite number, got {text!r}")
    return value


def lora_tags(prompt: str) -> tuple[str, list[tuple[str, str]]]:
    """A1111's `<lora:NAME:WEIGHT>` tags taken out of a prompt: (the prompt without them, [(NAME, WEIGHT text), ...]);
    WEIGHT is "" where the tag gives none (weight 1). Finding NAME and reading WEIGHT is the caller's."""
    return LORA_TAG.sub("", prompt), LORA_TAG.findall(prompt)


def as_prompt_list(prompt: Prompt, name: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {_short(prompt)}")
    return prompts


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive_int(name: str, value: Any) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_number(name: str, value: Any, low: float, high: float) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and low <= value <= high):
        expected = f"in [{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g}"
        raise ValueError(f"{name} must be a finite number {expected}, got {value!r}")


def _short(value: Any, chars: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= chars else text[:chars] + "..."
