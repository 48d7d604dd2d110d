"""Text-to-image (and image-to-image) sampling: prompt -> tokens -> context -> sampling loop -> VAE -> images.

    pipe = fastdiff.Pipeline.from_pretrained("path/to/model")     # diffusers folder or single .safetensors
    images = pipe("a photo of an astronaut riding a horse", steps=25, seed=0)

`fastdiff.generate(prompt, ...)` does the same with a cache of loaded pipelines.

SDXL runs through the same call, with diffusers' StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline
arguments as keywords (prompt_2, original_size, ..., aesthetic_score for the refiner). The base -> refiner hand-off:

    latents = base(prompt, 40, denoising_end=0.8, output_type="latent", seed=0)
    images = refiner(prompt, 40, image=torch.stack(latents), denoising_start=0.8, seed=0)
"""
from __future__ import annotations

import inspect
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from fastdiff import memory, schedulers
from fastdiff.engine import Engine, FastConfig, make_engine, prepare_engine
from fastdiff.loading import load_components
from fastdiff.loading.embeddings import read_embedding
from fastdiff.loading.lora import read_lora
from fastdiff.lora import LoraMerger
from fastdiff.prompts import tokenize_prompt, weigh
from fastdiff.request import (SDXL_ARGUMENTS, Prompt, Request, SDXLRequest, Size, check_request, check_sdxl_request,
                              check_size)

SCHEDULES_KEPT = 16  # sampling plans a Pipeline keeps (`Pipeline.schedule`)
# diffusers' defaults for the SDXL pipelines' model_index.json settings (`Pipeline.options`)
SDXL_OPTIONS = {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False}
AESTHETIC_SCORES = (6.0, 2.5)  # the refiner's default aesthetic_score and negative_aesthetic_score
Seed = Union[int, torch.Generator, None, Sequence[Union[int, torch.Generator]]]
Generators = Union[torch.Generator, list[torch.Generator]]  # one for the batch, or one per image


class Pipeline:
    """The Stable Diffusion stack: `unet`, `vae`, `text_encoder`, `tokenizer` and the scheduler config, run by
    one `engine` (`fastdiff.engine`).

    SDXL (a UNet with addition_embed_type "text_time") also has `text_encoder_2` and `tokenizer_2`, and its
    refiner has those alone (text_encoder and tokenizer None). `options` are the SDXL pipelines' model_index.json
    settings (`SDXL_OPTIONS`, diffusers' defaults where missing): force_zeros_for_empty_prompt, and
    requires_aesthetics_score, which makes it a refiner (five time ids, an aesthetic score in place of the target
    size). SDXL's VAE overflows in float16: with its config's force_upcast it runs in float32 when the rest is
    float16 (`vae_dtype_for`), as diffusers' SDXL pipelines upcast it.

    fast: the CUDA fast path (`fastdiff.engine.FastEngine`: fused modules, channels_last, CUDA graphs). None (the
    default) takes it whenever the models are on a CUDA device; True or a `FastConfig` require it; False runs the
    models as written. The engine is built on the first call (converting the UNet and VAE in place: dtype,
    channels_last, fused projections as views of their parameters).

    A call first estimates its working memory (`fastdiff.memory`) and refuses, saying how many images fit, when it
    exceeds what the device has free, or `memory_limit` bytes when that is set.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict, source: str = "",
                 fast: Union[None, bool, FastConfig] = None, *, text_encoder_2=None, tokenizer_2=None,
                 options: Optional[dict] = None):
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = None if text_encoder is None else text_encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_encoder_2 = None if text_encoder_2 is None else text_encoder_2.eval().requires_grad_(False)
        self.tokenizer_2 = tokenizer_2
        self.scheduler_config = dict(scheduler_config)
        self.source = source
        self.options = self._check_family(options or {})
        self.vae.to(vae_dtype_for(self.vae.config, next(self.vae.parameters()).dtype, self.sdxl))
        if not (fast is None or isinstance(fast, (bool, FastConfig))):
            raise ValueError(f"fast must be None, True, False or a fastdiff.engine.FastConfig, got {fast!r}")
        graphs = fast is True or (isinstance(fast, FastConfig) and fast.cuda_graphs)
        if graphs and self.device.type != "cuda":
            raise ValueError(f"fast={fast!r} captures CUDA graphs, which needs the models on a CUDA device, they "
                             f"are on {self.device}; pass fast=None to use the fast path only where it applies")
        self.fast = fast
        prepare_engine(self.device, fast)  # the engine is built with the first image; its slow setup starts now
        self.memory_limit: Optional[int] = None  # bytes of working memory a call may use (None: what is free)
        self._engine: Optional[Engine] = None
        self._schedules: dict[tuple, schedulers.Schedule] = {}  # recent plans (`schedule`)
        models = {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        self._loras = LoraMerger({name: model for name, model in models.items() if model is not None})

    def _check_family(self, options: dict) -> dict:
        """The models must make one pipeline: SD1/SD2 (the first text encoder), SDXL (both, a UNet with an add
        embedding reading six time ids) or SDXL's refiner (the second alone, five time ids); each text encoder
        with its tokenizer. Returns `options` with SDXL's defaults filled in."""
        for encoder, tokenizer, name in ((self.text_encoder, self.tokenizer, "text_encoder"),
                                         (self.text_encoder_2, self.tokenizer_2, "text_encoder_2")):
            if (encoder is None) != (tokenizer is None):
                raise ValueError(f"{name} and its tokenizer come together, got {name} "
                                 f"{'None' if encoder is None else 'given'} and its tokenizer "
                                 f"{'None' if tokenizer is None else 'given'}")
        if not self.sdxl:
            if self.text_encoder is None or self.text_encoder_2 is not None or options:
                raise ValueError(f"a UNet without SDXL's add embedding (addition_embed_type "
                                 f"{self.unet.config.addition_embed_type!r}) makes an SD1/SD2 pipeline: it takes "
                                 f"text_encoder alone and no options, got text_encoder "
                                 f"{'None' if self.text_encoder is None else 'given'}, text_encoder_2 "
                                 f"{'None' if self.text_encoder_2 is None else 'given'} and options {options}")
            return {}
        unknown = sorted(set(options) - set(SDXL_OPTIONS))
        if unknown or self.text_encoder_2 is None:
            raise ValueError(f"an SDXL pipeline takes text_encoder_2 and options among {sorted(SDXL_OPTIONS)}, got "
                             f"text_encoder_2 {'None' if self.text_encoder_2 is None else 'given'} and options "
                             f"{options}")
        options = {**SDXL_OPTIONS, **options}
        config, projection = self.unet.config, self.text_encoder_2.config.projection_dim
        time_ids = 5 if options["requires_aesthetics_score"] else 6
        width = None if projection is None else projection + time_ids * config.addition_time_embed_dim
        if config.projection_class_embeddings_input_dim != width:
            raise ValueError(f"the UNet's add embedding reads {config.projection_class_embeddings_input_dim} values, "
                             f"expected text_encoder_2's projection ({projection}) and {time_ids} time ids of "
                             f"{config.addition_time_embed_dim} (requires_aesthetics_score "
                             f"{options['requires_aesthetics_score']})")
        return options

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], device=None, dtype=None,
                        fast: Union[None, bool, FastConfig] = None, **kwargs) -> "Pipeline":
        """Load a diffusers-format folder or a single-file (CompVis/LDM) checkpoint. Never touches the network.

        device: defaults to CUDA when available, else CPU. dtype: defaults to float16 on CUDA, float32 on CPU.
        fast: see the class docstring. Extra kwargs (`variant="fp16"`, `config=...`) go to
        `fastdiff.loading.load_components`.
        """
        device = _resolve_device(device)
        dtype = _resolve_dtype(dtype, device)
        prepare_engine(device, fast)  # the engine's slow setup overlaps the loading
        c = load_components(path, device=device, dtype=dtype, **kwargs)
        return cls(c.unet, c.vae, c.text_encoder, c.tokenizer, c.scheduler_config, source=c.source, fast=fast,
                   text_encoder_2=c.text_encoder_2, tokenizer_2=c.tokenizer_2, options=c.options)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        """The dtype the VAE decodes (and encodes) in: float32 for SDXL's upcast VAE, else the pipeline's."""
        return next(self.vae.parameters()).dtype

    @property
    def sdxl(self) -> bool:
        """Whether this is an SDXL pipeline (base or refiner): the UNet takes the added conditioning."""
        return self.unet.config.addition_embed_type == "text_time"

    @property
    def refiner(self) -> bool:
        """Whether this is SDXL's refiner: its time ids end with an aesthetic score, not the target size."""
        return self.sdxl and self.options["requires_aesthetics_score"]

    @property
    def engine(self) -> Engine:
        """What runs the models (built on first use): `FastEngine` on the fast path, else `Engine`."""
        if self._engine is None:
            self._engine = make_engine(self.unet, self.vae, self.text_encoder, self.fast, self.text_encoder_2)
        return self._engine

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def __repr__(self) -> str:
        return f"Pipeline(source={self.source!r}, device={self.device}, dtype={self.dtype})"

    # ---- adapters: LoRAs and textual-inversion embeddings ------------------------------------------------

    @property
    def loras(self) -> dict[str, float]:
        """The loaded LoRAs' names and weights, in load order."""
        return dict(self._loras.weights)

    def load_lora(self, path: Union[str, os.PathLike], weight: float = 1.0, name: Optional[str] = None) -> str:
        """Merge the LoRA file at `path` (kohya/A1111 or diffusers/PEFT format, SD1/SD2 or SDXL as this model is;
        `fastdiff.loading.lora`) into the UNet's and text encoders' weights at `weight`, in place: no graph is
        captured again. Returns its name (the file's stem unless `name` is given), which `set_lora_weights` takes.
        A file that does not fit this model is refused, naming it, before any weight changes."""
        layers = read_lora(path, self._loras.models)
        name = Path(path).stem if name is None else name
        self._loras.add(name, layers, weight)
        self._weights_changed()
        return name

    def set_lora_weights(self, weights: dict[str, float]) -> None:
        """Reweight loaded LoRAs by name (0 turns one off); switching between LoRAs is this call."""
        self._loras.set_weights(weights)
        self._weights_changed()

    def unload_loras(self) -> None:
        """Remove every LoRA: the weights return to the loaded ones bit for bit."""
        self._loras.clear()
        self._weights_changed()

    def load_textual_inversion(self, path: Union[str, os.PathLike], token: Optional[str] = None) -> str:
        """Load a textual-inversion embedding (`fastdiff.loading.embeddings`: diffusers' learned_embeds, A1111's
        .pt or .safetensors) and return the token that stands for it in prompts (`token`, else the diffusers
        file's token or the A1111 file's name). Its vectors become new rows of the text encoder's token table.
        SD1/SD2 only: SDXL's embeddings hold vectors for both text encoders."""
        if self.sdxl:
            raise ValueError(f"{path}: textual-inversion embeddings are supported for SD1/SD2 models, this is SDXL "
                             f"(two text encoders)")
        token, vectors = read_embedding(path, token)
        table = self.text_encoder.text_model.embeddings.token_embedding
        if vectors.shape[1] != table.embedding_dim:
            raise ValueError(f"{path}: its vectors are {vectors.shape[1]} wide, this model's text encoder takes "
                             f"{table.embedding_dim} (an embedding made for another model)")
        first = table.weight.shape[0]
        self.tokenizer.add_token(token, list(range(first, first + vectors.shape[0])))
        with torch.no_grad():  # the same Parameter object, which every engine's text encoder shares
            table.weight.data = torch.cat([table.weight.data, vectors.to(table.weight)])
        table.num_embeddings = table.weight.shape[0]
        return token

    def _weights_changed(self) -> None:
        if self._engine is not None:
            self._engine.weights_changed()

    # ---- the public call ---------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt: Prompt, steps: int = 25, *, negative_prompt: Optional[Prompt] = None,
                 guidance_scale: float = 7.5, height: Optional[int] = None, width: Optional[int] = None,
                 seed: Seed = None, scheduler: str = "dpmpp_2m", karras: Optional[bool] = False,
                 num_images: int = 1, output_type: str = "pil", latents: Optional[Tensor] = None,
                 image: Any = None, strength: float = 0.8, guidance_rescale: float = 0.0, eta: float = 0.0,
                 clip_skip: Optional[int] = None, callback: Optional[Callable[[int, Tensor, Tensor], None]] = None,
                 progress: bool = True, prompt_2: Optional[Prompt] = None, negative_prompt_2: Optional[Prompt] = None,
                 original_size: Optional[Size] = None, crops_coords_top_left: Optional[Size] = None,
                 target_size: Optional[Size] = None, negative_original_size: Optional[Size] = None,
                 negative_crops_coords_top_left: Optional[Size] = None, negative_target_size: Optional[Size] = None,
                 aesthetic_score: Optional[float] = None, negative_aesthetic_score: Optional[float] = None,
                 denoising_start: Optional[float] = None, denoising_end: Optional[float] = None) -> list:
        """Sample images for `prompt` (a string or a list of strings).

        guidance_scale: classifier-free guidance; <= 1 runs the conditional UNet alone. seed: an int or a
        torch.Generator, or a list of them, one per image, each image's noise then drawn from its own (an image
        is then the same whatever else is in the batch); noise is always drawn on the CPU, so a seed gives the
        same image on CPU and GPU.
        karras: Karras sigmas (None follows the checkpoint's scheduler config). latents: (B, 4, h, w) initial
        noise, scaled by the sampler's initial sigma as in diffusers. image (+ strength): img2img from a PIL
        image (or a list of them) or a float tensor (B, 3, H, W) in [0, 1], or latents (B, 4, h, w) as
        output_type="latent" returns them (stacked), used as they are, as diffusers does. callback(i, x, x0) after
        every step. output_type: "pil" (PIL images), "np" ((H, W, 3) float32 arrays in [0, 1]), "pt" ((3, H, W)
        float32 tensors in [0, 1] on the pipeline's device, as diffusers returns them) or "latent" (the final
        (4, h, w) latents, unscaled by the VAE factor). Returns a list of len(prompts) * num_images outputs,
        each prompt's images together.

        SDXL only, as diffusers' StableDiffusionXLPipeline and StableDiffusionXLImg2ImgPipeline take them:
        prompt_2, negative_prompt_2: the second text encoder's texts (default: prompt and negative_prompt).
        original_size, crops_coords_top_left (top, left), target_size: the size and crop conditioning, (height,
        width) in pixels (default: the image's size, (0, 0), the image's size); negative_*: the negative rows'
        (default: the positive ones'). The refiner takes aesthetic_score and negative_aesthetic_score (default
        6.0 and 2.5) in place of the target sizes. With force_zeros_for_empty_prompt (`options`) an empty negative
        prompt (and negative_prompt_2) gives zeros for its rows instead of the encoded "". denoising_end: stop
        after this fraction of the denoising (in (0, 1)), leaving noisy latents for a refiner; denoising_start:
        continue the denoising of `image`, the latents of such a run, from this fraction (strength and the noise
        are then not used). The cut is diffusers': the steps whose timestep is at or above round(T * (1 -
        fraction)) belong before it, in whole steps.
        """
        req = check_request(prompt, steps, negative_prompt=negative_prompt, guidance_scale=guidance_scale,
                            height=height, width=width, seed=seed, scheduler=scheduler, karras=karras,
                            num_images=num_images, output_type=output_type, strength=strength,
                            guidance_rescale=guidance_rescale, eta=eta, clip_skip=clip_skip)
        sdxl_args = dict(prompt_2=prompt_2, negative_prompt_2=negative_prompt_2, original_size=original_size,
                         crops_coords_top_left=crops_coords_top_left, target_size=target_size,
                         negative_original_size=negative_original_size,
                         negative_crops_coords_top_left=negative_crops_coords_top_left,
                         negative_target_size=negative_target_size, aesthetic_score=aesthetic_score,
                         negative_aesthetic_score=negative_aesthetic_score, denoising_start=denoising_start,
                         denoising_end=denoising_end)
        xl = self._check_sdxl_arguments(req, sdxl_args)
        init_image = _image_to_tensor(image) if image is not None else None
        req = self._validate(req, init_image)
        if xl.denoising_start is not None and (init_image is None or latents is not None):
            raise ValueError(f"denoising_start={xl.denoising_start} continues the denoising of `image` (the latents "
                             f"of a run with denoising_end), which draws no initial noise: give image, and no "
                             f"latents")
        self._check_memory(req)
        sched = self.schedule(req.scheduler, req.steps, karras=req.karras, eta=eta)
        if xl.denoising_start is not None:
            start = schedulers.denoising_start_index(sched, xl.denoising_start)
        else:
            start = schedulers.img2img_start_index(req.steps, req.strength) if init_image is not None else 0
        end = req.steps if xl.denoising_end is None else schedulers.denoising_end_index(sched, xl.denoising_end)
        if start >= end:
            cuts = _cuts(req, init_image, xl)
            raise ValueError(f"{' and '.join(cuts)} with steps={req.steps} leaves no step to run; raise steps or "
                             f"change {' or '.join(c.split('=')[0] for c in cuts)}")
        latent_shape = (req.batch, self.unet.config.in_channels,
                        req.height // self.vae_scale_factor, req.width // self.vae_scale_factor)
        if latents is not None and tuple(latents.shape) != latent_shape:
            raise ValueError(f"latents has shape {tuple(latents.shape)}, expected {latent_shape}")
        generator = _generators(seed)

        if self.sdxl:
            context, pooled = self.encode_prompt_xl(req.prompts, req.negative, req.num_images, req.cfg, clip_skip,
                                                    xl.prompts_2, xl.negative_2)
            added = dict(text_embeds=pooled, time_ids=self._time_ids(xl, req))
        else:
            context, added = self.encode_prompt(req.prompts, req.negative, req.num_images, req.cfg, clip_skip), {}
        # Latents stay float32 whatever the model dtype: the solver's arithmetic is cheap and precision-hungry.
        # Draw order matches diffusers (posterior sample first, then the noise), so one seed gives its images.
        x0 = self.encode_image(init_image, req.batch, generator) if init_image is not None else None
        if xl.denoising_start is not None:  # already noisy at the level step `start` starts from
            x = x0.contiguous()
        else:
            noise = latents if latents is not None else _randn(latent_shape, generator)
            noise = _upload(noise.to(torch.float32), self.device)
            x = noise * sched.init_noise_sigma if x0 is None else schedulers.add_noise(x0, noise, sched, start)

        fused_guidance = req.guidance_scale if req.cfg and req.guidance_rescale == 0.0 else None
        self._compile_ahead(x, context, added, req, sched, fused_guidance, start, end)
        model_fn = self._model_fn(context, added, req)
        bar = _progress(end - start, progress)

        def on_step(i: int, x: Tensor, x0: Tensor) -> None:
            bar.update(1)
            if callback is not None:
                callback(i, x, x0)

        def noise_fn(shape) -> Tensor:
            return _upload(_randn(tuple(shape), generator), self.device)  # drawn on the CPU: same numbers anywhere

        try:
            x = schedulers.sample(model_fn, x, sched, guidance_scale=fused_guidance, noise_fn=noise_fn,
                                  callback=on_step, start_index=start, end_index=end)
        finally:
            bar.close()
        if req.output_type == "latent":
            return list(x.unbind(0))
        return to_output(self.decode_latents(x), req.output_type)

    def _check_sdxl_arguments(self, req: Request, sdxl_args: dict) -> SDXLRequest:
        """SDXL's arguments checked (`check_sdxl_request`), and against this model: none for SD1/SD2, the
        aesthetic scores for the refiner alone, which has no target size."""
        given = [name for name, value in sdxl_args.items() if value is not None]
        if not self.sdxl and given:
            raise ValueError(f"{', '.join(given)}: SDXL arguments, and this is an SD1/SD2 model ({self.source})")
        xl = check_sdxl_request(req.prompts, req.negative, **sdxl_args)
        if self.refiner:
            kind, takes, refused = "SDXL refiner", "aesthetic scores", ("target_size", "negative_target_size")
        else:
            kind, takes, refused = "SDXL base", "target sizes", ("aesthetic_score", "negative_aesthetic_score")
        wrong = [name for name in refused if name in given]
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: this {kind} (requires_aesthetics_score "
                             f"{self.options['requires_aesthetics_score']}) takes {takes} instead")
        return xl

    # ---- the stages ----------------------------------------------------------------------------------------

    def schedule(self, scheduler: str, steps: int, karras: Optional[bool] = None, eta: float = 0.0
                 ) -> schedulers.Schedule:
        """`schedulers.make_schedule` for this pipeline's scheduler config and device, kept for the next image
        (the last SCHEDULES_KEPT plans): a plan depends on these arguments and the resolved config alone, and
        making one uploads its timesteps, a copy the host waits for (0.4-0.5 ms per image on an H200 machine)."""
        config = schedulers.SchedulerConfig.from_dict(self.scheduler_config, scheduler)  # read now: may change
        key = (scheduler, steps, karras, float(eta), config)
        sched = self._schedules.pop(key, None)  # popped and put back: the dict's order is the use order
        if sched is None:
            sched = schedulers.make_schedule(scheduler, steps, config, karras=karras, eta=eta, device=self.device)
            while len(self._schedules) >= SCHEDULES_KEPT:
                del self._schedules[next(iter(self._schedules))]
        self._schedules[key] = sched
        return sched

    def encode_prompt(self, prompts: list[str], negative: list[str], num_images: int, cfg: bool,
                      clip_skip: Optional[int] = None) -> Tensor:
        """Text -> context (B', 77 * chunks, D): B' = 2 * len(prompts) * num_images with guidance ([uncond; cond]).

        Prompts are read as AUTOMATIC1111 reads them (`fastdiff.prompts`): `(word:1.3)` emphasis, and any length, in
        chunks of 75 tokens, each encoded on its own and concatenated along the sequence; texts with fewer chunks
        are padded with chunks of the empty prompt (A1111's "pad prompt/negative prompt to be same length"). A
        plain prompt of up to 75 tokens is one chunk, exactly the tokenizer's ids. SD1/SD2: SDXL's is
        `encode_prompt_xl`."""
        if self.sdxl:
            raise ValueError("encode_prompt reads SD1/SD2's text encoder; this SDXL pipeline's is encode_prompt_xl")
        texts = (negative + prompts) if cfg else prompts
        chunked = self._tokenize(self.tokenizer, texts)
        ids, weights = _pad_chunks(self.tokenizer, chunked, max(len(rows) for rows, _ in chunked))
        hidden = self.engine.encode_text(ids.to(self.device), clip_skip)  # (len(texts) * chunks, 77, D)
        context = _weighted(hidden, weights).reshape(len(texts), -1, hidden.shape[-1])
        return context.repeat_interleave(num_images, dim=0)

    def encode_prompt_xl(self, prompts: list[str], negative: list[str], num_images: int, cfg: bool,
                         clip_skip: Optional[int] = None, prompts_2: Optional[list[str]] = None,
                         negative_2: Optional[list[str]] = None) -> tuple[Tensor, Tensor]:
        """SDXL: text -> (context (B', 77 * chunks, D1 + D2), pooled (B', P)), B' as in `encode_prompt`.

        The context is each text encoder's penultimate hidden states side by side (diffusers' SDXL reading; the
        refiner has the second encoder's alone), the texts read as `encode_prompt` reads them, each encoder's chunks
        weighted on their own (as A1111 does); every text has as many chunks as the longest of them on either
        encoder. pooled: the second encoder's projected output at the end of each text's first chunk, unweighted.
        The second encoder reads prompts_2 and negative_2 (default: prompts and negative). With the option
        force_zeros_for_empty_prompt, the rows of a negative prompt that is empty for both encoders are zeros."""
        if not self.sdxl:
            raise ValueError("encode_prompt_xl reads SDXL's text encoders; this SD1/SD2 pipeline's is encode_prompt")
        prompts_2 = prompts if prompts_2 is None else prompts_2
        negative_2 = negative if negative_2 is None else negative_2
        readings = [(self.tokenizer_2, (negative_2 + prompts_2) if cfg else prompts_2, True)]
        if self.text_encoder is not None:
            readings.insert(0, (self.tokenizer, (negative + prompts) if cfg else prompts, False))
        chunked = [self._tokenize(tokenizer, texts) for tokenizer, texts, _ in readings]
        chunks = max(len(rows) for per_text in chunked for rows, _ in per_text)
        parts = []
        for (tokenizer, texts, second), per_text in zip(readings, chunked):
            ids, weights = _pad_chunks(tokenizer, per_text, chunks)
            hidden, pooled_chunks = self.engine.encode_penultimate(ids.to(self.device), clip_skip, second)
            parts.append(_weighted(hidden, weights).reshape(len(texts), -1, hidden.shape[-1]))
            if second:
                pooled = pooled_chunks.reshape(len(texts), chunks, -1)[:, 0]  # (texts, P): the first chunk's
        context = torch.cat(parts, dim=-1)
        if cfg and self.options["force_zeros_for_empty_prompt"]:
            # SDXL learnt its unconditional prediction from zeroed embeddings, not from the encoded empty prompt
            empty = torch.tensor([n == "" and n2 == "" for n, n2 in zip(negative, negative_2)] + [False] * len(prompts),
                                 device=context.device)
            context = context.masked_fill(empty[:, None, None], 0.0)
            pooled = pooled.masked_fill(empty[:, None], 0.0)
        return context.repeat_interleave(num_images, dim=0), pooled.repeat_interleave(num_images, dim=0)

    def _tokenize(self, tokenizer, texts: list[str]) -> list[tuple[list[list[int]], list[list[float]]]]:
        """Each text's chunks of token ids and weights (`fastdiff.prompts.tokenize_prompt`)."""
        tokenizer.note_unknown_words(texts)
        return [tokenize_prompt(tokenizer, text) for text in texts]

    def _time_ids(self, xl: SDXLRequest, req: Request) -> Tensor:
        """SDXL's size and crop conditioning, one row per UNet row (the negative rows first with guidance):
        (B', 6) [original height, width, crop top, left, target height, width], the refiner's (B', 5) with the
        aesthetic score in place of the target size; float32 on the pipeline's device."""
        original = xl.original_size or (req.height, req.width)
        crops = xl.crops_coords_top_left or (0, 0)
        if self.refiner:
            last = (AESTHETIC_SCORES[0] if xl.aesthetic_score is None else xl.aesthetic_score,)
            negative_last = (AESTHETIC_SCORES[1] if xl.negative_aesthetic_score is None
                             else xl.negative_aesthetic_score,)
        else:
            last = xl.target_size or (req.height, req.width)
            negative_last = xl.negative_target_size or last
        row = (*original, *crops, *last)
        negative_row = (*(xl.negative_original_size or original), *(xl.negative_crops_coords_top_left or crops),
                        *negative_last)
        rows = [negative_row] * req.batch + [row] * req.batch if req.cfg else [row] * req.batch
        return torch.tensor(rows, dtype=torch.float32, device=self.device)

    def encode_image(self, image: Tensor, batch: int, generator: Generators) -> Tensor:
        """(N, 3, H, W) in [0, 1] -> scaled latents (batch, 4, h, w), a sample of the VAE posterior as in
        diffusers' img2img; N must be 1 or `batch`. Latents (N, 4, h, w) (as output_type="latent" gives them) are
        taken as they are, as diffusers takes them."""
        if image.shape[0] not in (1, batch):
            raise ValueError(f"image batch must be 1 or {batch} (prompts x num_images), got {image.shape[0]}")
        if image.shape[1] != 3:  # latents (their channels checked by `_validate`)
            z = image.to(self.device, torch.float32)
        else:
            mean, logvar = self.engine.encode_image((image * 2 - 1).to(self.device, self.vae_dtype))
            if isinstance(generator, list):  # one sample per image, each from its own generator
                mean, logvar = mean.expand(batch, *mean.shape[1:]), logvar.expand(batch, *logvar.shape[1:])
            eps = _randn(tuple(mean.shape), generator).to(self.device)
            z = (mean.float() + torch.exp(0.5 * logvar.float()) * eps) * self.vae.config.scaling_factor
        return z.expand(batch, *z.shape[1:]) if z.shape[0] == 1 else z

    def decode_latents(self, x: Tensor) -> Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, H, W) float32 in [0, 1], decoded in `vae_dtype`."""
        image = self.engine.decode((x / self.vae.config.scaling_factor).to(self.vae_dtype)).float()
        return (image / 2 + 0.5).clamp(0, 1)

    def _compile_ahead(self, x: Tensor, context: Tensor, added: dict, req: Request, sched: schedulers.Schedule,
                       guidance_scale: Optional[float], start: int, end: int) -> None:
        """Before the first image of a new shape: the engine compiles what sampling and decoding it will launch
        (`Engine.compile_ahead`), from a dry run of the loop on a stand-in model and stand-in noise and of the
        decoder. Nothing here touches `x` or the seed's generator."""
        decode = req.output_type != "latent"
        key = (tuple(x.shape), tuple(context.shape), req.cfg, req.scheduler, guidance_scale is None, start, end,
               decode)
        rows = 2 * x.shape[0] if guidance_scale is not None else x.shape[0]  # the model_fn's output batch

        def dry_run() -> None:
            model_out = torch.zeros((rows, *x.shape[1:]), device=x.device)
            schedulers.sample(lambda x_in, t: model_out, x, sched, guidance_scale=guidance_scale,
                              noise_fn=lambda shape: torch.zeros(tuple(shape), device=x.device), start_index=start,
                              end_index=end)
            if decode:
                self.decode_latents(x)

        self.engine.compile_ahead(key, x, context, dry_run, **added)

    def _model_fn(self, context: Tensor, added: dict, req: Request) -> Callable[[Tensor, Tensor], Tensor]:
        unet_fn = self.engine.denoiser(context, req.cfg, **added)
        if not (req.cfg and req.guidance_rescale > 0.0):
            return unet_fn

        def rescaled_fn(x_in: Tensor, t: Tensor) -> Tensor:
            # not linear: combine here instead of inside the fused step
            return schedulers.combine_guidance(unet_fn(x_in, t), req.guidance_scale, req.guidance_rescale)

        return rescaled_fn

    def _check_memory(self, req: Request) -> None:
        """The memory guard (`fastdiff.memory`): refuse, saying how many images fit, before allocating anything."""
        rows = req.batch * (2 if req.cfg else 1)  # the UNet's batch
        need = memory.estimate(self.unet.config, self.vae.config, self.dtype, req.batch, rows, req.height, req.width,
                               decode=False)
        if req.output_type != "latent":  # the decoder at its own dtype (SDXL's may be float32 beside a float16 UNet)
            decoding = memory.estimate(self.unet.config, self.vae.config, self.vae_dtype, req.batch, 0, req.height,
                                       req.width, decode=True)
            need = memory.Estimate(device=max(need.device, decoding.device), host=decoding.host)
        memory.check(need, req.batch, req.height, req.width, self.device, self.memory_limit)

    def _validate(self, req: Request, init_image: Optional[Tensor]) -> Request:
        """`req` with the model's default size filled in, checked against what only the model knows."""
        f = self.vae_scale_factor
        default = self.unet.config.sample_size * f
        image_size = None
        if init_image is not None:
            latent = init_image.shape[1] != 3
            if latent and init_image.shape[1] != self.unet.config.in_channels:
                raise ValueError(f"image latents have {init_image.shape[1]} channels, this model's have "
                                 f"{self.unet.config.in_channels}")
            image_size = tuple(n * (f if latent else 1) for n in init_image.shape[-2:])  # latents are 1/f of it
        height, width = image_size or (default, default)
        height = height if req.height is None else req.height
        width = width if req.width is None else req.width
        check_size("height", height, f)
        check_size("width", width, f)
        if image_size is not None and image_size != (height, width):
            what = "image latents stand for" if latent else "image is"
            raise ValueError(f"{what} {image_size[1]}x{image_size[0]} (WxH), expected {width}x{height}; resize it "
                             f"first")
        return replace(req, height=height, width=width)


def vae_dtype_for(vae_config, dtype: torch.dtype, sdxl: bool) -> torch.dtype:
    """The dtype a pipeline's VAE runs in when the rest runs in `dtype`: float32 for SDXL's VAE with force_upcast
    (its activations overflow float16: the decoded images turn to NaN) when `dtype` is float16, as diffusers'
    SDXL pipelines upcast it; else `dtype`. SD1/SD2 keep theirs, as diffusers' StableDiffusionPipeline does."""
    return torch.float32 if sdxl and vae_config.force_upcast and dtype == torch.float16 else dtype


def _pad_chunks(tokenizer, chunked: list[tuple[list[list[int]], list[list[float]]]], chunks: int
                ) -> tuple[Tensor, Tensor]:
    """Every text's chunks, padded to `chunks` with chunks of the empty prompt: ids (texts * chunks, 77) long and
    weights (texts * chunks, 77) float32, the texts' rows one after another."""
    empty_ids, empty_weights = tokenize_prompt(tokenizer, "")
    ids = [row for rows, _ in chunked for row in rows + empty_ids * (chunks - len(rows))]
    weights = [row for _, rows in chunked for row in rows + empty_weights * (chunks - len(rows))]
    return torch.tensor(ids), torch.tensor(weights)


def _weighted(hidden: Tensor, weights: Tensor) -> Tensor:
    """`fastdiff.prompts.weigh` where a weight differs from 1 (a plain prompt's states come back untouched)."""
    return weigh(hidden, weights.to(hidden.device)) if bool((weights != 1.0).any()) else hidden


def _cuts(req: Request, init_image: Optional[Tensor], xl: SDXLRequest) -> list[str]:
    """The arguments that run fewer steps than `req.steps`, as `name=value`."""
    cuts = [f"denoising_start={xl.denoising_start}" if xl.denoising_start is not None else
            f"strength={req.strength}" if init_image is not None else None,
            None if xl.denoising_end is None else f"denoising_end={xl.denoising_end}"]
    return [c for c in cuts if c is not None]


# ---- module helpers ------------------------------------------------------------------------------------------

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _resolve_device(device) -> torch.device:
    """`device` as a torch.device this machine has (None: CUDA when available, else the CPU)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}") from None
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA device(s) (torch "
                         f"{torch.__version__}, CUDA {torch.version.cuda or 'none'}); use 'cpu'")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a CPU or CUDA device, got {device!r}")
    return resolved


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """`dtype` checked (None: float16 on CUDA, float32 on the CPU)."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of torch.float16, torch.bfloat16, torch.float32, got {dtype!r}")
    return dtype


def _generators(seed: Seed) -> Generators:
    """The generator(s) a seed (checked by check_request) stands for: one, or a list of one per image."""
    if isinstance(seed, (list, tuple)):
        return [_generator(one) for one in seed]
    return _generator(seed)


def _generator(seed: Union[int, torch.Generator, None]) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        if seed.device.type != "cpu":
            raise ValueError(f"seed generator must be a CPU torch.Generator (noise is drawn on the CPU so "
                             f"CPU and GPU give the same image), got one on {seed.device}")
        return seed
    if seed is None:
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, ()).item()))
    return torch.Generator().manual_seed(seed)  # an int in range: check_request checked it


def _randn(shape: tuple, generator: Generators) -> Tensor:
    """Standard normal float32 noise of `shape`: from one generator, or row i from generator i."""
    if isinstance(generator, list):
        return torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generator])
    return torch.randn(shape, generator=generator, dtype=torch.float32)


def _upload(t: Tensor, device: torch.device) -> Tensor:
    """t moved to `device`. A CPU tensor goes to CUDA from pinned memory without blocking: a plain copy from
    pageable memory would make the host wait for the GPU work queued before it (at the initial noise, the text
    encoder: about 1 ms of a batch-1 image on an H200 that the host could spend launching the loop)."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="sampling", unit="step")


def _image_to_tensor(image: Any) -> Tensor:
    """PIL image(s) or a float tensor (B, 3, H, W) in [0, 1] -> float32 tensor (B, 3, H, W) in [0, 1]; latents
    (B, 4, h, w) as they are, in float32."""
    if isinstance(image, Tensor):
        if image.ndim != 4 or image.shape[1] not in (3, 4) or not image.is_floating_point():
            raise ValueError(f"image tensor must be float (B, 3, H, W) in [0, 1], or latents (B, 4, h, w), got "
                             f"{image.dtype} {tuple(image.shape)}")
        return image.float()
    images = image if isinstance(image, (list, tuple)) else [image]
    try:
        arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
    except AttributeError:
        raise ValueError(f"image must be a PIL image, a list of them, or a tensor (B, 3, H, W), "
                         f"got {type(image).__name__}") from None
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"images must all have one size, got {[a.shape[1::-1] for a in arrays]}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def to_output(images: Tensor, output_type: str) -> list:
    """(B, 3, H, W) float in [0, 1] -> a list in the requested type."""
    if output_type == "pt":  # on the pipeline's device, as diffusers' "pt" (`.cpu()` is the caller's choice)
        return list(images.unbind(0))
    arrays = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return list(arrays)
    from PIL import Image

    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arrays]


# ---- generate(): the one-call entry point -----------------------------------------------------------------

_cache: dict[tuple, Pipeline] = {}
_MODEL_FREE_KWARGS = ("strength", "guidance_rescale", "eta", "clip_skip")  # what check_request also checks
_CALL_KWARGS = set(inspect.signature(Pipeline.__call__).parameters) - {"self", "prompt", "steps"}


def generate(prompt: Prompt, steps: int = 25, *, model: Union[None, str, os.PathLike, Pipeline] = None,
             negative_prompt: Optional[Prompt] = None, guidance_scale: float = 7.5, height: Optional[int] = None,
             width: Optional[int] = None, seed: Seed = None, scheduler: str = "dpmpp_2m",
             karras: Optional[bool] = False, num_images: int = 1, device=None, dtype=None,
             output_type: str = "pil", **kw) -> list:
    """Sample images with a model path (diffusers folder or single file) or a loaded Pipeline.

    Loaded pipelines are cached per (path, device, dtype), so a second call does not reload. Other keyword
    arguments (latents, image, strength, guidance_rescale, eta, clip_skip, callback, progress, and SDXL's) go to
    `Pipeline.__call__`.
    """
    unknown = sorted(set(kw) - _CALL_KWARGS)
    if unknown:
        raise TypeError(f"generate() got unexpected keyword argument(s) {', '.join(unknown)}; it takes "
                        f"Pipeline.__call__'s: {', '.join(sorted(_CALL_KWARGS))}")
    if kw.get("image") is not None:
        _image_to_tensor(kw["image"])  # a wrong kind of image answers before the model loads
    req = check_request(prompt, steps, negative_prompt=negative_prompt, guidance_scale=guidance_scale, height=height,
                        width=width, seed=seed, scheduler=scheduler, karras=karras, num_images=num_images,
                        output_type=output_type, **{k: v for k, v in kw.items() if k in _MODEL_FREE_KWARGS})
    check_sdxl_request(req.prompts, req.negative, **{k: v for k, v in kw.items() if k in SDXL_ARGUMENTS})
    pipe = model if isinstance(model, Pipeline) else load_cached(model, device, dtype)
    return pipe(prompt, steps, negative_prompt=negative_prompt, guidance_scale=guidance_scale, height=height,
                width=width, seed=seed, scheduler=scheduler, karras=karras, num_images=num_images,
                output_type=output_type, **kw)


def load_cached(model: Union[None, str, os.PathLike], device=None, dtype=None) -> Pipeline:
    """The cached Pipeline for `model` (None: the embedded default model)."""
    path = default_model_path() if model is None else os.path.abspath(os.fspath(model))
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    key = (path, str(device), dtype)
    if key not in _cache:
        _cache[key] = Pipeline.from_pretrained(path, device=device, dtype=dtype)
    return _cache[key]


def default_model_path() -> str:
    """The embedded default model shipped in fastdiff/assets/default/."""
    path = os.path.join(os.path.dirname(__file__), "assets", "default")
    if not os.path.isfile(os.path.join(path, "model_index.json")):
        raise FileNotFoundError(
            f"no model given and no embedded default model at {path}: this build of fastdiff does not ship "
            f"one yet. Pass a Stable Diffusion checkpoint: a diffusers folder or a single .safetensors/.ckpt "
            f"file (model=... / --model PATH)")
    return path
