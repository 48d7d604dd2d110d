"""What `fastdiff serve` runs behind its HTTP routes: the models it may load, the LoRAs it may apply, one Pipeline at a
time, and the batcher that feeds it.

    service = Service(Catalog.discover(model=None, models_dir=None, lora_dir=None))
    body = service.generate(Txt2ImgRequest(prompt="a red circle", seed=1))   # A1111's response body

Concurrent requests whose settings allow it (the same model, LoRAs, size, steps, sampler, guidance, ...) run
through the UNet as one batch (`fastdiff.serve.batcher`), each image from its own seed, so an image does not depend
on what it was batched with. Names in requests (models, LoRAs) are looked up in the catalog made at start-up: no
path from a request reaches the filesystem.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from fastdiff.pipeline import to_output
from fastdiff.request import lora_files, lora_tags, lora_weight
from fastdiff.schedulers import img2img_start_index

from . import a1111
from .batcher import Batcher, Interrupted, Progress

DEFAULT_MODEL = "default"  # the catalog's name of the embedded default model
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class Catalog:
    """The models and LoRAs a server may load, by name, found once at start-up."""

    models: dict[str, Path]  # name -> diffusers folder or single-file checkpoint
    loras: dict[str, Path] = field(default_factory=dict)  # name (file stem) -> file
    default: str = DEFAULT_MODEL  # the model loaded first

    @classmethod
    def discover(cls, model: Optional[str] = None, models_dir: Optional[str] = None,
                 lora_dir: Optional[str] = None) -> "Catalog":
        """`model` (a path; the embedded default model when None) first, then the diffusers folders and .safetensors
        / .ckpt files directly in `models_dir`, then every LoRA file under `lora_dir` (subfolders too)."""
        from fastdiff.pipeline import default_model_path

        first = Path(model) if model is not None else Path(default_model_path())
        models = {DEFAULT_MODEL if model is None else first.stem: first}
        if models_dir is not None:
            for path in sorted(Path(models_dir).iterdir()):
                if (path / "model_index.json").is_file() or path.suffix in CHECKPOINT_SUFFIXES:
                    models.setdefault(path.stem, path)
        return cls(models, lora_files(lora_dir) if lora_dir is not None else {}, next(iter(models)))


@dataclass(frozen=True)
class _Load:
    """A batcher job that loads a model (`Service.preload`)."""

    model: str


@dataclass(frozen=True)
class Job:
    """One request as the batcher carries it."""

    generation: a1111.Generation
    model: str
    loras: tuple[tuple[str, float], ...]  # (name, weight), sorted


class Service:
    """The Pipeline of the current model behind A1111's API. device/dtype: as `Pipeline.from_pretrained`."""

    def __init__(self, catalog: Catalog, *, limits: a1111.Limits = a1111.Limits(), device=None, dtype=None,
                 max_queue: int = 64, max_batch: int = 8, queue_timeout_s: float = 600.0):
        self.catalog, self.limits = catalog, limits
        self.device, self.dtype = device, dtype
        self.current_model = catalog.default  # what a request without override_settings runs on
        self._pipe = None
        self._pipe_model: Optional[str] = None
        self.batcher = Batcher(self._run, max_queue=max_queue, max_batch=max_batch, queue_timeout_s=queue_timeout_s)

    # ---- requests ------------------------------------------------------------------------------------------------

    def generate(self, request: a1111.GenerationRequest, timeout_s: Optional[float] = None) -> dict[str, Any]:
        """A1111's response body for a txt2img or img2img request; RequestError for a bad field, QueueFull when
        the queue is full, TimeoutError when it waited too long."""
        prompt, tags = lora_tags(request.prompt)
        loras = tuple(sorted(self._lora(name, weight) for name, weight in tags))
        generation = a1111.to_generation(request.model_copy(update={"prompt": prompt}), self.limits)
        model = generation.model or self.current_model
        if model not in self.catalog.models:
            raise a1111.RequestError("override_settings", f"sd_model_checkpoint {model!r} is not one of the server's "
                                                          f"models: {', '.join(self.catalog.models)}")
        job = Job(generation, model, loras)
        future = self.batcher.submit((model, loras, generation.batch_key()), len(generation.seeds), job)
        images = future.result(timeout_s)
        return a1111.response(request, generation, images, model_name=model)

    def _lora(self, name: str, weight: str) -> tuple[str, float]:
        if name not in self.catalog.loras:
            known = ", ".join(self.catalog.loras) or "none (the server has no LoRA folder)"
            raise a1111.RequestError("prompt", f"<lora:{name}> names no LoRA of the server; its LoRAs: {known}")
        try:
            value = lora_weight(weight)
        except ValueError:
            raise a1111.RequestError("prompt", f"<lora:{name}:{weight}>: the weight must be a number") from None
        return name, value

    def set_model(self, name: str) -> None:
        """The model requests run on from now on (loaded by the next request that needs it)."""
        if name not in self.catalog.models:
            raise a1111.RequestError("sd_model_checkpoint", f"{name!r} is not one of the server's models: "
                                                            f"{', '.join(self.catalog.models)}")
        self.current_model = name

    def preload(self) -> None:
        """Load the current model now, not at the first request. Like every use of the model it runs on the
        batcher's worker thread: torch then computes on one thread only (on the CPU, another thread that has run
        torch's parallel ops keeps OpenMP workers of its own, and the worker's ops ran at half speed beside them)."""
        self.batcher.submit(("load", self.current_model), 1, _Load(self.current_model)).result()

    def close(self) -> None:
        self.batcher.close()

    # ---- the batcher's runner ------------------------------------------------------------------------------------

    def _run(self, jobs: list[Job], progress: Progress) -> list[list]:
        """One Pipeline call for jobs that share a batch key: their images in one batch, a seed per image. An
        interrupt stops it at the next step and returns the images decoded from where sampling got to, as A1111."""
        if isinstance(jobs[0], _Load):
            self._pipeline(jobs[0].model)
            return [None] * len(jobs)
        pipe = self._pipeline(jobs[0].model)
        self._apply_loras(pipe, dict(jobs[0].loras))
        kwargs = jobs[0].generation.pipeline_kwargs()
        for job in jobs[1:]:
            for name, value in job.generation.pipeline_kwargs().items():
                if isinstance(value, list):
                    kwargs[name] = kwargs[name] + value
        generation = jobs[0].generation
        start = img2img_start_index(generation.steps, generation.strength) if generation.is_img2img else 0
        reached = {"step": 0, "x": None}  # sampling's progress: steps done, the latents after the last one

        def on_step(i: int, x, x0) -> None:
            reached["step"], reached["x"] = reached["step"] + 1, x
            progress.update(reached["step"], generation.steps - start)

        try:
            images = pipe(**kwargs, callback=on_step, progress=False)
        except Interrupted:
            images = to_output(pipe.decode_latents(reached["x"]), "pil")
        sizes = [len(job.generation.seeds) for job in jobs]
        return [images[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(len(jobs))]

    def _pipeline(self, model: str):
        """The Pipeline of `model`, loading it in place of the one held (one model on the device at a time)."""
        if self._pipe_model != model:
            import torch

            from fastdiff.pipeline import Pipeline

            self._pipe = self._pipe_model = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self._pipe = Pipeline.from_pretrained(self.catalog.models[model], device=self.device, dtype=self.dtype)
            self._pipe_model = model
        return self._pipe

    def _apply_loras(self, pipe, weights: dict[str, float]) -> None:
        """The requested LoRAs at their weights, every other loaded one at 0 (kept merged-off, for a fast switch)."""
        for name in weights:
            if name not in pipe.loras:
                pipe.load_lora(self.catalog.loras[name], 0.0, name=name)
        wanted = {name: weights.get(name, 0.0) for name in pipe.loras}
        if wanted != pipe.loras:
            pipe.set_lora_weights(wanted)
