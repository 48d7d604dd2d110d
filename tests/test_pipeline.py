"""End to end on CPU in float32: fastdiff's sampling loop against diffusers' StableDiffusionPipeline with the
same tiny random model, the same initial latents and the same ancestral noise."""
import copy
import json
import math
import os
import subprocess
import sys

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
    # from the checkpoint's saved config, as ours: the previous case's scheduler would carry its options
    # (use_karras_sigmas=True) into every later case on this model
    oracle.scheduler = diffusers_scheduler(scheduler, karras, ours.scheduler_config)
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
    img2img.scheduler = diffusers_scheduler(scheduler, False, ours.scheduler_config)
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


@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_one_seed_per_image_matches_diffusers_list_of_generators_and_ignores_the_batch(tiny, img2img):
    from diffusers import StableDiffusionImg2ImgPipeline

    ours, oracle = tiny["sd1"]
    oracle = StableDiffusionImg2ImgPipeline(**oracle.components) if img2img else oracle
    oracle.scheduler = diffusers_scheduler("euler_a", False, ours.scheduler_config)  # draws noise every step
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    extra = dict(image=image, strength=0.6) if img2img else {}
    expected = oracle([PROMPT, "a blue square"], num_inference_steps=STEPS, output_type="np",
                      generator=[torch.Generator().manual_seed(s) for s in (7, 8)], **extra).images
    kw = dict(scheduler="euler_a", output_type="np", progress=False, **extra)
    got = ours([PROMPT, "a blue square"], STEPS, seed=[7, 8], **kw)
    alone = ours("a blue square", STEPS, seed=[8], **kw)
    print(f"per-image seeds {'img2img' if img2img else 'txt2img'}: PSNR {[psnr(g, e) for g, e in zip(got, expected)]}")
    assert min(psnr(g, e) for g, e in zip(got, expected)) >= 40.0
    assert psnr(alone[0], got[1]) >= 60.0, "an image's seed gives it whatever else is in the batch"


def test_generate_caches_loaded_pipelines(tiny, tmp_path, monkeypatch):
    from fastdiff import pipeline

    folder = tmp_path / "m"
    make_tiny_sd(folder, "sd1")
    loads = []
    original = pipeline.Pipeline.from_pretrained.__func__
    monkeypatch.setattr(pipeline.Pipeline, "from_pretrained",
                        classmethod(lambda cls, *a, **k: loads.append(a) or original(cls, *a, **k)))
    monkeypatch.setattr(pipeline, "_cache", {})
    first = fastdiff.generate("a", 2, model=str(folder), seed=0, device="cpu", output_type="np", progress=False)
    second = fastdiff.generate("a", 2, model=str(folder), seed=0, device="cpu", output_type="np", progress=False)
    assert len(loads) == 1
    assert np.array_equal(first[0], second[0])


@pytest.mark.parametrize("bad, message", [
    (dict(steps=0), "steps must be a positive int, got 0"),
    (dict(height=60), "height must be a positive multiple of 8, got 60"),
    (dict(scheduler="plms"), "scheduler must be one of"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(num_images=0), "num_images must be a positive int, got 0"),
    (dict(output_type="jpeg"), "output_type must be one of"),
    (dict(negative_prompt=["a", "b"]), "negative_prompt has 2 entries, expected 1 or 1"),
    (dict(seed=-1), "seed must be an int from 0 to 2**64 - 1"),
    (dict(seed=2**64), "seed must be an int from 0 to 2**64 - 1"),
    (dict(seed=[1, 2]), "seed has 2 entries, expected one per image (1) or a single seed"),
    (dict(seed=[-1]), "an entry of seed must be an int from 0 to 2**64 - 1"),
    (dict(latents=torch.zeros(1, 4, 4, 4)), "latents has shape (1, 4, 4, 4), expected (1, 4, 8, 8)"),
    (dict(image=torch.rand(1, 3, 64, 64), strength=0.01), "leaves no step to run"),
])
def test_bad_arguments_fail_before_any_model_work(tiny, bad, message, monkeypatch):
    ours, _ = tiny["sd1"]
    calls = []
    monkeypatch.setattr(ours, "encode_prompt", lambda *a, **k: calls.append(a))
    kwargs = dict(steps=3, progress=False) | bad
    with pytest.raises(ValueError) as e:
        ours("a prompt", kwargs.pop("steps"), **kwargs)
    assert message in str(e.value)
    assert calls == []


@pytest.mark.parametrize("bad, message", [
    (dict(height=65, width=64), "height must be a positive multiple of 8, got 65"),
    (dict(seed=2**64), "seed must be an int from 0 to 2**64 - 1"),
    (dict(guidance_scale=-2.0), "guidance_scale must be a finite number >= 0, got -2.0"),
    (dict(strength=1.5), "strength must be a finite number in [0, 1], got 1.5"),
    (dict(eta=-1.0), "eta must be a finite number >= 0, got -1.0"),
    (dict(clip_skip=-1), "clip_skip must be None or an int >= 0"),
    (dict(karras="yes"), "karras must be True, False or None"),
    (dict(prompt=["a", 3]), "prompt must be a string or a non-empty list of strings, got ['a', 3]"),
    (dict(device="tpu:0"), "device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got 'tpu:0'"),
    (dict(dtype=torch.int8), "dtype must be one of torch.float16, torch.bfloat16, torch.float32, got torch.int8"),
    (dict(image="photo.png"), "image must be a PIL image, a list of them, or a tensor (B, 3, H, W), got str"),
    (dict(stepz=3), "generate() got unexpected keyword argument(s) stepz; it takes Pipeline.__call__'s:"),
])
def test_generate_checks_arguments_before_loading(tmp_path, bad, message, monkeypatch):
    from fastdiff import pipeline

    monkeypatch.setattr(pipeline.Pipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    monkeypatch.setattr(pipeline, "_cache", {})
    kwargs = dict(prompt="a", steps=2, model=str(tmp_path), progress=False) | bad
    with pytest.raises((ValueError, TypeError)) as e:
        fastdiff.generate(kwargs.pop("prompt"), kwargs.pop("steps"), **kwargs)
    assert message in str(e.value)


@pytest.mark.parametrize("limit, num_images, message", [
    (None, 10**7, "10000000 image(s) of 64x64 need about"),
    (10**6, 64, "64 image(s) of 64x64 need about"),
    (1000, 1, "not one fits at this size; ask for fewer or smaller images, or raise the memory limit"),
])
def test_the_memory_guard_refuses_before_any_model_work(tiny, limit, num_images, message, monkeypatch):
    ours, _ = tiny["sd1"]
    monkeypatch.setattr(ours, "memory_limit", limit)
    monkeypatch.setattr(ours, "encode_prompt", lambda *a, **k: pytest.fail("started work"))
    with pytest.raises(ValueError, match="at most|not one") as e:
        ours("a prompt", 2, num_images=num_images, progress=False)
    assert message in str(e.value)


def test_output_types(tiny):
    ours, _ = tiny["sd1"]
    kw = dict(seed=3, progress=False, scheduler="euler")
    pil = ours("a", 2, **kw)[0]
    arr = ours("a", 2, output_type="np", **kw)[0]
    pt = ours("a", 2, output_type="pt", **kw)[0]
    lat = ours("a", 2, output_type="latent", **kw)[0]
    assert pil.size == (64, 64) and arr.shape == (64, 64, 3) and pt.shape == (3, 64, 64) and lat.shape == (4, 8, 8)
    assert np.abs(np.asarray(pil) / 255.0 - arr).max() <= 0.5 / 255 + 1e-6
    assert np.allclose(pt.permute(1, 2, 0).numpy(), arr)
    assert pt.device == ours.device and lat.device == ours.device  # tensors stay where they were made


@pytest.mark.gpu
def test_sampling_loop_has_no_host_sync_and_matches_cpu(tmp_path):
    """The loop runs with CUDA sync debugging set to error; the same seed gives the CPU image on the GPU."""
    folder = tmp_path / "m"
    make_tiny_sd(folder, "sd1")
    cpu = fastdiff.Pipeline.from_pretrained(folder, device="cpu")
    gpu = fastdiff.Pipeline.from_pretrained(folder, device="cuda", dtype=torch.float32)
    kw = dict(seed=5, scheduler="euler_a", output_type="latent", progress=False)
    steps_seen = []

    def strict(i, x, x0):
        steps_seen.append(i)
        if i == 0:
            torch.cuda.set_sync_debug_mode("error")  # from now on any host sync raises

    try:
        on_gpu = gpu("a red circle", 6, callback=strict, **kw)[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    on_cpu = cpu("a red circle", 6, **kw)[0]
    err = ((on_gpu.cpu() - on_cpu).norm() / on_cpu.norm()).item()
    print(f"GPU vs CPU latents rel err {err:.2e}")
    assert steps_seen == list(range(6))
    assert err < 1e-2  # TF32 convolutions (cuDNN's default) and kernel reduction order, not different noise


@pytest.mark.parametrize("extra", [dict(guidance_rescale=0.7)])
def test_guidance_rescale_matches_diffusers(tiny, extra):
    ours, oracle = tiny["sd1"]
    oracle.scheduler = diffusers_scheduler("dpmpp_2m", False, ours.scheduler_config)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    expected = oracle(PROMPT, num_inference_steps=STEPS, latents=latents.clone(), output_type="np", **extra).images
    got = ours(PROMPT, STEPS, latents=latents, scheduler="dpmpp_2m", output_type="np", progress=False, **extra)
    score = psnr(got[0], expected[0])
    print(f"{extra}: PSNR {score:.1f} dB")
    assert score >= 40.0


def test_clip_skip_reaches_the_text_encoder(tiny):
    """diffusers' own clip_skip path cannot serve as the oracle here (it reads text_encoder.text_model, which
    transformers 5 removed); the encoder's clip_skip itself is checked against diffusers' rule in test_clip."""
    ours, _ = tiny["sd1"]
    ids = ours.tokenizer(["", PROMPT])
    expected = ours.text_encoder(ids, clip_skip=1)
    got = ours.encode_prompt([PROMPT], [""], num_images=1, cfg=True, clip_skip=1)
    assert torch.equal(got, expected)
    assert not torch.equal(got, ours.encode_prompt([PROMPT], [""], num_images=1, cfg=True))


def test_schedules_are_kept_per_request_and_follow_the_config(tiny, monkeypatch):
    """A plan is made once per (sampler, steps, karras, eta, resolved config) and reused by later images; a changed
    scheduler config makes a new one; at most SCHEDULES_KEPT are held."""
    import fastdiff.pipeline as P
    from fastdiff import schedulers

    ours, _ = tiny["sd1"]
    pipe = copy.copy(ours)  # own caches and config, same modules
    pipe._schedules, pipe.scheduler_config = {}, dict(ours.scheduler_config)
    made = []
    real = schedulers.make_schedule
    monkeypatch.setattr(schedulers, "make_schedule", lambda *a, **k: made.append(a[:2]) or real(*a, **k))
    first = pipe.schedule("dpmpp_2m", 5)
    assert pipe.schedule("dpmpp_2m", 5) is first and len(made) == 1
    fresh = real("dpmpp_2m", 5, pipe.scheduler_config, device=pipe.device)
    assert first.timesteps == fresh.timesteps and first.sigmas == fresh.sigmas
    assert pipe.schedule("euler", 5) is not first and pipe.schedule("dpmpp_2m", 6).steps == 6
    pipe.scheduler_config["timestep_spacing"] = "trailing"
    assert pipe.schedule("dpmpp_2m", 5).timesteps != first.timesteps and len(made) == 4
    for steps in range(1, 2 * P.SCHEDULES_KEPT):
        pipe.schedule("ddim", steps)
    assert len(pipe._schedules) == P.SCHEDULES_KEPT
    assert "trailing" not in ours.scheduler_config.values()  # the shared pipeline is untouched


def test_inference_does_not_import_the_training_code():
    """The CLI module and a generation with the embedded default model import nothing of fastdiff.train (its
    data, analysis and training loop are for `fastdiff train` alone): in a fresh interpreter, as a user's."""
    code = ("import json, sys\n"
            "import fastdiff.cli, fastdiff\n"
            "out = fastdiff.generate('a red circle on the left on a white background', 2, seed=0, device='cpu',\n"
            "                        output_type='latent', progress=False)\n"
            "print(json.dumps({'shape': list(out[0].shape),\n"
            "                  'train': sorted(m for m in sys.modules if m.startswith('fastdiff.train'))}))\n")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    print(result.stdout, result.stderr)
    assert result.returncode == 0
    report = json.loads(result.stdout.splitlines()[-1])
    assert len(report["shape"]) == 3  # the latents of one image: the generation ran
    assert report["train"] == []
