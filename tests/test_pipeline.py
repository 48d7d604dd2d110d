"""End to end on CPU in float32: fastdiff's sampling loop against diffusers' StableDiffusionPipeline with the
same tiny random model, the same initial latents and the same ancestral noise."""
import math

import numpy as np
import pytest
import torch

import fastdiff
from tiny_models import make_tiny_sd

STEPS = 10
PROMPT = "a red circle on the left on a white background"
NEGATIVE = "blurry"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(fastdiff pipeline, diffusers pipeline) per kind, built once."""
    out = {}
    for kind in ("sd1", "sd2"):
        folder = tmp_path_factory.mktemp(kind)
        oracle = make_tiny_sd(folder, kind)
        out[kind] = (fastdiff.Pipeline.from_pretrained(folder, device="cpu"), oracle)
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def diffusers_scheduler(name: str, karras: bool, config):
    from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                           EulerDiscreteScheduler, UniPCMultistepScheduler)

    cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
           "dpmpp_2m": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}[name]
    extra = {"use_karras_sigmas": True} if karras else {}
    return cls.from_config(config, **extra)


CASES = [("sd1", "ddim", False), ("sd1", "euler", False), ("sd1", "euler_a", False),
         ("sd1", "dpmpp_2m", False), ("sd1", "dpmpp_2m", True), ("sd1", "unipc", False),
         ("sd2", "dpmpp_2m", False), ("sd2", "euler", False)]


@pytest.mark.parametrize("kind, scheduler, karras", CASES)
def test_txt2img_matches_diffusers(tiny, kind, scheduler, karras):
    ours, oracle = tiny[kind]
    oracle.scheduler = diffusers_scheduler(scheduler, karras, oracle.scheduler.config)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    expected = oracle([PROMPT, "a blue square"], num_inference_steps=STEPS, guidance_scale=7.5,
                      negative_prompt=[NEGATIVE, NEGATIVE], latents=latents.clone(), output_type="np",
                      generator=torch.Generator().manual_seed(2)).images
    got = ours([PROMPT, "a blue square"], STEPS, guidance_scale=7.5, negative_prompt=NEGATIVE, latents=latents,
               scheduler=scheduler, karras=karras, seed=torch.Generator().manual_seed(2), output_type="np",
               progress=False)
    scores = [psnr(g, e) for g, e in zip(got, expected)]
    print(f"{kind} {scheduler} karras={karras}: PSNR {scores} dB")
    assert len(got) == 2 and got[0].shape == (64, 64, 3)
    assert min(scores) >= 40.0


@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m", "euler_a"])
def test_img2img_matches_diffusers(tiny, scheduler):
    from diffusers import StableDiffusionImg2ImgPipeline

    ours, oracle = tiny["sd1"]
    img2img = StableDiffusionImg2ImgPipeline(**oracle.components)
    img2img.scheduler = diffusers_scheduler(scheduler, False, oracle.scheduler.config)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    # diffusers draws the img2img noise from the generator; so does fastdiff (same order, same shape).
    expected = img2img(PROMPT, image=image, strength=0.6, num_inference_steps=STEPS, output_type="np",
                       generator=torch.Generator().manual_seed(4)).images
    got = ours(PROMPT, STEPS, image=image, strength=0.6, scheduler=scheduler,
               seed=torch.Generator().manual_seed(4), output_type="np", progress=False)
    score = psnr(got[0], expected[0])
    print(f"img2img {scheduler}: PSNR {score:.1f} dB")
    assert score >= 40.0
