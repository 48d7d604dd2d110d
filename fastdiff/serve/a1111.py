"""The AUTOMATIC1111 web API's request and response formats, as pydantic models and pure functions.

    request = Txt2ImgRequest.model_validate(body)                # A1111's field names and defaults
    generation = to_generation(request, Limits())                # checked; RequestError names a bad field
    images = pipe(**generation.pipeline_kwargs())                # what a fastdiff Pipeline call needs
    body = response(request, generation, images, "model", "0123456789")

The request models mirror stable-diffusion-webui's generated ones (modules/api/models.py over the processing
classes of modules/processing.py): the same fields, defaults and null handling (null means the default), unknown
fields ignored. What fastdiff cannot do is refused, naming the field, wherever A1111 would have made a different
image from it: hires fix, face restoration, tiling, variation seeds, styles, scripts, inpainting masks and the
like. Fields that only concern A1111's disk output (save_images, do_not_save_samples, ...) are accepted and have
no effect: nothing is saved and no grid is returned.

Responses have A1111's shape: base64 PNGs carrying their infotext in a `parameters` text chunk (what A1111's PNG
Info reads), the request echoed as `parameters`, and `info`, the JSON of A1111's `Processed.js()`.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import math
import random
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Hashable, Mapping, Optional, Union

from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fastdiff import __version__
from fastdiff.request import SEED_MAX, SIZE_MULTIPLE
from fastdiff.schedulers.schedule import KARRAS_SAMPLERS

VERSION = f"fastdiff {__version__}"  # the infotext's "Version" and info's "version"
RANDOM_SEED_BOUND = 4294967294  # seed -1 draws from [0, RANDOM_SEED_BOUND), as A1111's get_fixed_seed
CLIP_SKIP_MAX = 12  # A1111's CLIP_stop_at_last_layers setting goes from 1 (the last layer) to 12

SamplerSpec = tuple[str, Optional[bool]]  # (fastdiff scheduler name, karras flag of the "Automatic" schedule)


# ---- samplers and schedule types --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Sampler:
    name: str  # A1111's
    scheduler: str  # fastdiff's
    karras: bool  # whether A1111's "Automatic" schedule type means Karras sigmas for this sampler
    aliases: tuple[str, ...]  # A1111's


# A1111's samplers (modules/sd_samplers_kdiffusion.py, sd_samplers_timesteps.py, sd_samplers_lcm.py) that fastdiff
# has, in A1111's order, and DDPM, which A1111 lacks. Since A1111 1.9 "Automatic" gives DPM++ 2M Karras sigmas.
# A1111's "Automatic" for DPM++ 2M SDE is its exponential schedule, which fastdiff lacks: it runs uniform sigmas.
_SAMPLERS = (
    _Sampler("DPM++ 2M", "dpmpp_2m", True, ("k_dpmpp_2m",)),
    _Sampler("DPM++ 2M SDE", "dpmpp_2m_sde", False, ("k_dpmpp_2m_sde",)),
    _Sampler("Euler a", "euler_a", False, ("k_euler_a", "k_euler_ancestral")),
    _Sampler("Euler", "euler", False, ("k_euler",)),
    _Sampler("Heun", "heun", False, ("k_heun",)),
    _Sampler("DDIM", "ddim", False, ("ddim",)),
    _Sampler("UniPC", "unipc", False, ("unipc",)),
    _Sampler("LCM", "lcm", False, ("k_lcm",)),
    _Sampler("DDPM", "ddpm", False, ("ddpm",)),
)
# Names from before A1111 1.9, a sampler with its Karras schedule; A1111 still accepts them.
_KARRAS_NAMES = {
    "DPM++ 2M Karras": "dpmpp_2m", "k_dpmpp_2m_ka": "dpmpp_2m",
    "DPM++ 2M SDE Karras": "dpmpp_2m_sde", "k_dpmpp_2m_sde_ka": "dpmpp_2m_sde",
}

SAMPLERS: dict[str, SamplerSpec] = {
    **{name: (s.scheduler, s.karras) for s in _SAMPLERS for name in (s.name, *s.aliases)},
    **{name: (scheduler, True) for name, scheduler in _KARRAS_NAMES.items()},
}
_A1111_NAMES = {s.scheduler: s.name for s in _SAMPLERS}  # fastdiff scheduler -> A1111's sampler name

AUTOMATIC, KARRAS = "Automatic", "Karras"  # the schedule types fastdiff has (labels of modules/sd_schedulers.py)
_SCHEDULE_TYPES = {"automatic": AUTOMATIC, "karras": KARRAS}  # A1111 accepts a schedule type's name or label


def sampler_list(known_samplers: Mapping[str, SamplerSpec] = SAMPLERS) -> list[dict[str, Any]]:
    """GET /sdapi/v1/samplers: A1111's SamplerItem list ({"name", "aliases", "options"}) of the samplers in
    `known_samplers`."""
    return [{"name": s.name, "aliases": [a for a in s.aliases if a in known_samplers],
             "options": {"scheduler": "karras"} if s.karras else {}}
            for s in _SAMPLERS if s.name in known_samplers]


def scheduler_list() -> list[dict[str, Any]]:
    """GET /sdapi/v1/schedulers: A1111's SchedulerItem list of the schedule types fastdiff has."""
    return [{"name": "automatic", "label": AUTOMATIC, "aliases": None, "default_rho": -1.0, "need_inner_model": False},
            {"name": "karras", "label": KARRAS, "aliases": None, "default_rho": 7.0, "need_inner_model": False}]


# ---- requests ---------------------------------------------------------------------------------------------------

class _ProcessingRequest(BaseModel):
    """The fields txt2img and img2img share, with A1111's defaults (StableDiffusionProcessing, api/models.py)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: Optional[list[str]] = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: Optional[str] = None
    scheduler: Optional[str] = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: Optional[bool] = None
    tiling: Optional[bool] = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: Optional[float] = None
    denoising_strength: float = 0.75
    s_min_uncond: Optional[float] = None
    s_churn: Optional[float] = None
    s_tmax: Optional[float] = None
    s_tmin: Optional[float] = None
    s_noise: Optional[float] = None
    override_settings: Optional[dict[str, Any]] = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: Optional[str] = None
    refiner_switch_at: Optional[float] = None
    disable_extra_networks: bool = False
    firstpass_image: Optional[str] = None
    comments: Optional[dict[str, Any]] = None
    sampler_index: str = "Euler"  # A1111 reads sampler_name, or this when sampler_name is null
    script_name: Optional[str] = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    force_task_id: Optional[str] = None
    infotext: Optional[str] = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """A1111's generated models make every field optional: a null field takes its default."""
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class Txt2ImgRequest(_ProcessingRequest):
    """POST /sdapi/v1/txt2img (A1111's StableDiffusionProcessingTxt2Img fields)."""

    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: Optional[str] = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: Optional[str] = None
    hr_sampler_name: Optional[str] = None
    hr_scheduler: Optional[str] = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_ProcessingRequest):
    """POST /sdapi/v1/img2img (A1111's StableDiffusionProcessingImg2Img fields). init_images: base64 images, with
    or without a data URL prefix ("data:image/png;base64,...")."""

    init_images: Optional[list[str]] = None
    resize_mode: int = 0
    image_cfg_scale: Optional[float] = None
    mask: Optional[str] = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: Optional[int] = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: Optional[float] = None
    latent_mask: Optional[str] = None
    include_init_images: bool = Field(default=False, exclude=True)  # A1111 leaves it out of the echoed parameters


GenerationRequest = Union[Txt2ImgRequest, Img2ImgRequest]

RESIZE_MODES = {0: "Just resize", 1: "Crop and resize"}  # A1111's img2img resize modes fastdiff does
# override_settings keys fastdiff honours: the checkpoint (Generation.model) and CLIP skip (Generation.clip_skip).
OVERRIDE_SETTINGS = ("sd_model_checkpoint", "CLIP_stop_at_last_layers")


# ---- checks -----------------------------------------------------------------------------------------------------

class RequestError(ValueError):
    """A request field fastdiff cannot use: `field` names it, the message says what was expected."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What one request may ask for."""

    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_images: int = 16  # batch_size * n_iter
    max_image_bytes: int = 16 * 2**20  # each init image: its file, and its RGB pixels (width * height * 3)
    max_prompt_chars: int = 20000  # prompt and negative_prompt, each


def validate(request: GenerationRequest, limits: Limits = Limits(),
             known_samplers: Mapping[str, SamplerSpec] = SAMPLERS) -> None:
    """Raise RequestError naming the first field fastdiff cannot honour, or whose value is out of range.

    Needs no model and decodes no image (init images are only counted and their base64 length checked).
    """
    _check_supported(request)
    for name in ("prompt", "negative_prompt"):
        if len(getattr(request, name)) > limits.max_prompt_chars:
            raise RequestError(name, f"at most {limits.max_prompt_chars} characters, got {len(getattr(request, name))}")
    for name, most in (("width", limits.max_width), ("height", limits.max_height)):
        value = getattr(request, name)
        if not (0 < value <= most and value % SIZE_MULTIPLE == 0):
            raise RequestError(name, f"must be a positive multiple of {SIZE_MULTIPLE} up to {most}, got {value}")
    if not 1 <= request.steps <= limits.max_steps:
        raise RequestError("steps", f"must be from 1 to {limits.max_steps}, got {request.steps}")
    if not (math.isfinite(request.cfg_scale) and request.cfg_scale >= 1.0):
        raise RequestError("cfg_scale", f"must be a finite number >= 1 (below 1 fastdiff runs without guidance, "
                                        f"as at 1), got {request.cfg_scale}")
    _check_counts(request, limits)
    images = request.batch_size * request.n_iter
    if not (request.seed == -1 or 0 <= request.seed <= SEED_MAX - (images - 1)):
        raise RequestError("seed", f"must be -1 (random) or an int from 0 to 2**64 - {images} (image i of the "
                                   f"request gets seed + i), got {request.seed}")
    strength = request.denoising_strength
    if not (math.isfinite(strength) and 0.0 <= strength <= 1.0):
        raise RequestError("denoising_strength", f"must be in [0, 1], got {strength}")
    if isinstance(request, Img2ImgRequest):
        if int(request.steps * strength) < 1:  # img2img runs int(steps * strength) of the steps
            raise RequestError("denoising_strength", f"{strength} with steps={request.steps} runs no step; "
                                                     f"raise denoising_strength or steps")
        _check_init_images(request, limits)
    _sampler(request, known_samplers)


def _check_supported(request: GenerationRequest) -> None:
    """Refuse the features fastdiff lacks wherever A1111 would have made a different image with them."""
    refused: list[tuple[str, bool, str]] = [
        ("restore_faces", bool(request.restore_faces), "face restoration is not available; send false"),
        ("tiling", bool(request.tiling), "tiling is not available; send false"),
        ("subseed_strength", request.subseed_strength != 0, "variation seeds are not available; send 0"),
        ("seed_resize_from_w", request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0
         and (request.seed_resize_from_w, request.seed_resize_from_h) != (request.width, request.height),
         "resizing the seed's noise is not available; send -1"),
        ("styles", bool(request.styles), "prompt styles are not available; send []"),
        ("script_name", bool(request.script_name), "scripts are not available; send null"),
        ("alwayson_scripts", bool(request.alwayson_scripts), "scripts are not available; send {}"),
        ("refiner_checkpoint", request.refiner_checkpoint not in (None, "", "None", "none"),
         "refiners are not available; send null"),
        ("infotext", bool(request.infotext), "reading parameters from an infotext is not available; send null"),
        ("s_churn", request.s_churn not in (None, 0.0), "must be 0"),
        ("s_noise", request.s_noise not in (None, 1.0), "must be 1"),
        ("s_min_uncond", request.s_min_uncond not in (None, 0.0), "must be 0"),
    ]
    if isinstance(request, Txt2ImgRequest):
        refused += [
            ("enable_hr", request.enable_hr, "hires fix is not available; send false"),
            ("firstphase_width", request.firstphase_width != 0, "hires fix is not available; send 0"),
            ("firstphase_height", request.firstphase_height != 0, "hires fix is not available; send 0"),
        ]
    else:
        refused += [
            ("mask", request.mask is not None, "inpainting is not available; send null"),
            ("initial_noise_multiplier", request.initial_noise_multiplier not in (None, 1.0), "must be 1"),
            ("resize_mode", request.resize_mode not in RESIZE_MODES,
             f"must be one of {RESIZE_MODES} (fastdiff's), got {request.resize_mode}"),
        ]
    for name, bad, message in refused:
        if bad:
            raise RequestError(name, message)
    settings = request.override_settings or {}
    for key in settings:
        if key not in OVERRIDE_SETTINGS:
            raise RequestError("override_settings", f"{key!r} is not available; fastdiff honours {OVERRIDE_SETTINGS}")
    if not isinstance(settings.get("sd_model_checkpoint", ""), str):
        raise RequestError("override_settings", "sd_model_checkpoint must be a string")
    skip = settings.get("CLIP_stop_at_last_layers", 1)
    if not (isinstance(skip, int) and not isinstance(skip, bool) and 1 <= skip <= CLIP_SKIP_MAX):
        raise RequestError("override_settings", f"CLIP_stop_at_last_layers must be an int from 1 to {CLIP_SKIP_MAX}, "
                                                f"got {skip!r}")


def _check_counts(request: GenerationRequest, limits: Limits) -> None:
    for name in ("batch_size", "n_iter"):
        if getattr(request, name) < 1:
            raise RequestError(name, f"must be >= 1, got {getattr(request, name)}")
    if request.batch_size > limits.max_images:
        raise RequestError("batch_size", f"at most {limits.max_images} images per request, got {request.batch_size}")
    if request.batch_size * request.n_iter > limits.max_images:
        raise RequestError("n_iter", f"batch_size * n_iter = {request.batch_size * request.n_iter} images, at most "
                                     f"{limits.max_images} per request")


def _check_init_images(request: Img2ImgRequest, limits: Limits) -> None:
    images = request.init_images or []
    if len(images) not in (1, request.batch_size):
        raise RequestError("init_images", f"expected 1 image, or batch_size ({request.batch_size}), one per image "
                                          f"of a batch; got {len(images)}")
    for text in images:
        _base64_payload(text, limits, "init_images")


def _sampler(request: GenerationRequest, known_samplers: Mapping[str, SamplerSpec]
             ) -> tuple[str, str, Optional[bool], float]:
    """(A1111 sampler name, fastdiff scheduler, karras, fastdiff eta) for the request's sampler, schedule type
    and eta."""
    name = request.sampler_name or request.sampler_index
    found = next((spec for key, spec in known_samplers.items() if key.lower() == name.lower()), None)
    if found is None:
        names = [s.name for s in _SAMPLERS if s.name in known_samplers]
        raise RequestError("sampler_name", f"unknown sampler {name!r}; one of {names} (or their aliases)")
    scheduler, karras = found
    schedule_type = _SCHEDULE_TYPES.get((request.scheduler or AUTOMATIC).lower())
    if schedule_type is None:
        raise RequestError("scheduler", f"schedule type {request.scheduler!r} is not available; one of "
                                        f"{[AUTOMATIC, KARRAS]}")
    if schedule_type == KARRAS:
        karras = True
    if karras and scheduler not in KARRAS_SAMPLERS:
        raise RequestError("scheduler", f"{KARRAS} does not apply to sampler {name!r}; send {AUTOMATIC}")
    return _A1111_NAMES.get(scheduler, name), scheduler, karras, _eta(request.eta, scheduler, name)


def _eta(eta: Optional[float], scheduler: str, name: str) -> float:
    """fastdiff's eta for A1111's: DDIM's noise (A1111's default 0); the ancestral and SDE samplers always add
    full noise, A1111's default eta 1; the other samplers have no eta and A1111 ignores it."""
    if eta is not None and not (math.isfinite(eta) and eta >= 0.0):
        raise RequestError("eta", f"must be a finite number >= 0, got {eta}")
    if scheduler == "ddim":
        return 0.0 if eta is None else float(eta)
    if scheduler in ("euler_a", "dpmpp_2m_sde") and eta not in (None, 1.0):
        raise RequestError("eta", f"sampler {name!r} runs with eta 1 in fastdiff; send 1 or null, got {eta}")
    return 0.0


# ---- the generation ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Generation:
    """A checked request as fastdiff runs it: one entry per image in prompts, negative_prompts, seeds and (img2img)
    init_images, images in A1111's order (iteration by iteration, each a batch of batch_size)."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str  # fastdiff's
    karras: Optional[bool]  # None: the checkpoint's scheduler config decides
    eta: float  # fastdiff's (DDIM only)
    clip_skip: Optional[int]  # fastdiff's: layers skipped (A1111's CLIP_stop_at_last_layers - 1)
    sampler_name: str  # A1111's, for the infotext
    model: Optional[str] = None  # override_settings' sd_model_checkpoint; None: the server's current model
    init_images: tuple[Image.Image, ...] = ()  # img2img: RGB, width x height
    strength: Optional[float] = None  # img2img's denoising strength

    @property
    def is_img2img(self) -> bool:
        return bool(self.init_images)

    @property
    def schedule_type(self) -> str:
        """A1111's label of the schedule this runs: the infotext's "Schedule type"."""
        return KARRAS if self.karras else AUTOMATIC

    def batch_key(self) -> Hashable:
        """Generations with equal keys can share one Pipeline call (one UNet batch): every setting a call takes
        once for all its images."""
        return (self.model, self.width, self.height, self.steps, self.scheduler, self.karras, self.guidance_scale,
                self.is_img2img, self.strength, self.eta, self.clip_skip)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of `Pipeline.__call__` for this generation's images, a seed per image."""
        kwargs: dict[str, Any] = dict(
            prompt=list(self.prompts), steps=self.steps, negative_prompt=list(self.negative_prompts),
            guidance_scale=self.guidance_scale, height=self.height, width=self.width, seed=list(self.seeds),
            scheduler=self.scheduler, karras=self.karras, eta=self.eta, clip_skip=self.clip_skip)
        if self.is_img2img:
            kwargs.update(image=list(self.init_images), strength=self.strength)
        return kwargs


def to_generation(request: GenerationRequest, limits: Limits = Limits(),
                  known_samplers: Mapping[str, SamplerSpec] = SAMPLERS,
                  rng: Optional[random.Random] = None) -> Generation:
    """Check `request` (`validate`) and resolve it: seeds (seed -1 draws a base seed with `rng`, by default the
    system's random source; image i gets base + i, as in A1111), sampler, and decoded, resized init images."""
    validate(request, limits, known_samplers)
    sampler_name, scheduler, karras, eta = _sampler(request, known_samplers)
    count = request.batch_size * request.n_iter
    base = request.seed if request.seed != -1 else (rng or random.SystemRandom()).randrange(RANDOM_SEED_BOUND)
    settings = request.override_settings or {}
    init_images: tuple[Image.Image, ...] = ()
    strength = None
    if isinstance(request, Img2ImgRequest):
        decoded = [_resize(decode_image(text, limits, "init_images"), request.resize_mode, request.width,
                           request.height) for text in request.init_images or []]
        init_images = tuple(decoded[i % request.batch_size % len(decoded)] for i in range(count))
        strength = request.denoising_strength
    return Generation(
        prompts=(request.prompt,) * count, negative_prompts=(request.negative_prompt,) * count,
        seeds=tuple(base + i for i in range(count)), steps=request.steps, guidance_scale=request.cfg_scale,
        width=request.width, height=request.height, scheduler=scheduler, karras=karras, eta=eta,
        clip_skip=settings.get("CLIP_stop_at_last_layers", 1) - 1 or None, sampler_name=sampler_name,
        model=settings.get("sd_model_checkpoint"), init_images=init_images, strength=strength)


def decode_image(b64: str, limits: Limits, field: str) -> Image.Image:
    """A base64 image (bare, or a data URL "data:image/png;base64,...") as an RGB PIL image, transparency over
    white as A1111 flattens it. RequestError naming `field` for bad base64, an unreadable image, or one over
    limits.max_image_bytes (its file, or its RGB pixels)."""
    text = _base64_payload(b64, limits, field)
    try:
        data = base64.b64decode("".join(text.split()), validate=True)
    except binascii.Error as e:
        raise RequestError(field, f"not valid base64 ({e})") from None
    if len(data) > limits.max_image_bytes:
        raise RequestError(field, f"an image of {len(data)} bytes, at most {limits.max_image_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
        pixels = image.width * image.height
    except Exception as e:  # untrusted bytes: PIL's format plugins fail in many ways
        raise RequestError(field, f"not a readable image ({type(e).__name__}: {e})") from None
    if pixels * 3 > limits.max_image_bytes:
        raise RequestError(field, f"a {image.width}x{image.height} image, over {limits.max_image_bytes} bytes of RGB")
    try:
        image.load()
    except Exception as e:
        raise RequestError(field, f"not a readable image ({type(e).__name__}: {e})") from None
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, "#ffffff")
        background.paste(image, mask=image)
        image = background
    return image.convert("RGB")


def _base64_payload(b64: str, limits: Limits, field: str) -> str:
    """The base64 text of an image field (a data URL's prefix removed), checked for size before decoding."""
    text = b64.strip()
    if text.startswith(("http://", "https://")):
        raise RequestError(field, "image URLs are not fetched; send the image as base64")
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise RequestError(field, "a data URL must be base64: data:image/png;base64,...")
    if len(text) * 3 // 4 > limits.max_image_bytes:  # base64 carries 3 bytes in 4 characters
        raise RequestError(field, f"an image over {limits.max_image_bytes} bytes")
    return text


def _resize(image: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """A1111's images.resize_image for resize modes 0 (stretch to the size) and 1 (scale to cover, then crop the
    centre), Lanczos as A1111 resamples without an img2img upscaler."""
    if mode == 0:
        return image.resize((width, height), resample=Image.Resampling.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    resized = image.resize((src_w, src_h), resample=Image.Resampling.LANCZOS)
    result = Image.new("RGB", (width, height))
    result.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return result


# ---- responses --------------------------------------------------------------------------------------------------

def infotext(generation: Generation, index: int, model_name: Optional[str] = None,
             model_hash: Optional[str] = None) -> str:
    """Image `index`'s generation parameters in A1111's infotext format (processing.create_infotext):

        prompt
        Negative prompt: ...
        Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 1, Size: 512x512, ...
    """
    params: dict[str, Any] = {
        "Steps": generation.steps,
        "Sampler": generation.sampler_name,
        "Schedule type": generation.schedule_type,
        "CFG scale": generation.guidance_scale,
        "Seed": generation.seeds[index],
        "Size": f"{generation.width}x{generation.height}",
        "Model hash": model_hash,
        "Model": model_name,
        "Denoising strength": generation.strength,
        "Clip skip": generation.clip_skip + 1 if generation.clip_skip else None,
        "Eta DDIM": generation.eta or None,
        "Version": VERSION,
    }
    text = ", ".join(f"{key}: {_quote(value)}" for key, value in params.items() if value is not None)
    negative = generation.negative_prompts[index]
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{generation.prompts[index]}{negative_line}\n{text}".strip()


def _quote(value: Any) -> str:
    """A1111's infotext quoting: a value with a comma, colon or newline as a JSON string."""
    text = str(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def png_with_infotext(image: Image.Image, infotext: str) -> bytes:
    """`image` as PNG bytes with `infotext` in a "parameters" text chunk, where A1111 writes it and its PNG Info
    reads it."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    with io.BytesIO() as out:
        image.save(out, format="PNG", pnginfo=info, compress_level=1)  # fast: the response waits for it
        return out.getvalue()


def response(request: GenerationRequest, generation: Generation, images: list[Image.Image],
             model_name: Optional[str] = None, model_hash: Optional[str] = None) -> dict[str, Any]:
    """The body of A1111's TextToImageResponse / ImageToImageResponse for `generation`'s `images` (all of them, in
    order): {"images": base64 PNGs (none when send_images is false), "parameters": the request, "info": the JSON
    string of A1111's Processed.js()}."""
    if len(images) != len(generation.seeds):
        raise ValueError(f"expected {len(generation.seeds)} images (one per seed), got {len(images)}")
    texts = [infotext(generation, i, model_name, model_hash) for i in range(len(images))]
    encoded = [base64.b64encode(png_with_infotext(image, text)).decode("ascii") for image, text in zip(images, texts)]
    parameters = request.model_dump()
    if isinstance(request, Img2ImgRequest) and not request.include_init_images:
        parameters.update(init_images=None, mask=None)
    images_total = len(generation.seeds)
    subseeds = [request.subseed + i if request.subseed != -1 else -1 for i in range(images_total)]
    extra: dict[str, Any] = {}
    if generation.karras:
        extra["Schedule type"] = KARRAS
    if generation.is_img2img:
        extra["Denoising strength"] = generation.strength
    if generation.eta:
        extra["Eta DDIM"] = generation.eta
    info = {
        "prompt": generation.prompts[0],
        "all_prompts": list(generation.prompts),
        "negative_prompt": generation.negative_prompts[0],
        "all_negative_prompts": list(generation.negative_prompts),
        "seed": generation.seeds[0],
        "all_seeds": list(generation.seeds),
        "subseed": subseeds[0],
        "all_subseeds": subseeds,
        "subseed_strength": request.subseed_strength,
        "width": generation.width,
        "height": generation.height,
        "sampler_name": generation.sampler_name,
        "cfg_scale": generation.guidance_scale,
        "steps": generation.steps,
        "batch_size": request.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model_name,
        "sd_model_hash": model_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": request.seed_resize_from_w,
        "seed_resize_from_h": request.seed_resize_from_h,
        "denoising_strength": request.denoising_strength,
        "extra_generation_params": extra,
        "index_of_first_image": 0,
        "infotexts": texts,
        "styles": request.styles or [],
        "job_timestamp": datetime.now().strftime("%Y%m%d%H%M%S"),
        "clip_skip": (generation.clip_skip or 0) + 1,
        "is_using_inpainting_conditioning": False,
        "version": VERSION,
    }
    return {"images": encoded if request.send_images else [], "parameters": parameters, "info": json.dumps(info)}
