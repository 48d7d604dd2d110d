"""diffusers' StableDiffusionPipeline patched onto fastdiff's kernels (`fastdiff.integrations.diffusers`)
against the same pipeline unpatched, eager and with the UNet under torch.compile (default mode, and
mode="reduce-overhead" as extra information), side by side in one process.

GPU: the SD1.5 architecture with random weights (speed does not depend on the weights), float16, 512x512,
25 DPM++ 2M steps, classifier-free guidance 7.5 (the UNet runs on a batch of 2), decoded to pixels.
extra_info of each (mode, provider):
  ms       median wall time of one whole image (prompt to pixels, CUDA synchronised), ROUNDS runs after warm-up
  parity   ||latents - latents_fp32|| / ||latents_fp32||: the final latents of this case against the unpatched
           eager float32 pipeline (TF32 off), same prompt and initial noise
  graph_breaks, graphs, frames   compiled modes: dynamo's graph breaks, distinct graphs and compiled frames
           (a recompile adds a frame) over the whole case, warm-up included
`test_host_us_per_call` times the host alone: back-to-back eager calls of one attention layer and one ResNet
block at SD1.5's smallest level (GPU work ~ a few us), patched and unpatched; us per call.
CPU: a tiny random pipeline in float32, a few steps, one round each, compiled with backend "eager": checks
that the benchmark works, not how fast anything is.

    pytest benchmarks/bench_diffusers_patch.py --benchmark-only
"""
import statistics
import time
from pathlib import Path

import pytest
import torch

import fastdiff
from conftest import ON_GPU
from fastdiff.integrations.diffusers import patch, unpatch

CLIP_ASSETS = Path(fastdiff.__file__).resolve().parent / "assets" / "clip"
PROMPT = "a photograph of an astronaut riding a horse"
DEVICE, DTYPE = ("cuda", torch.float16) if ON_GPU else ("cpu", torch.float32)
SIZE, STEPS = (512, 25) if ON_GPU else (64, 2)
WARMUP, ROUNDS = (2, 5) if ON_GPU else (0, 1)  # the first compiled run compiles; the first patched one autotunes
COMPILE_BACKEND = "inductor" if ON_GPU else "eager"
MODES = {"eager": None, "compile": "default", "compile-reduce-overhead": "reduce-overhead"}  # torch.compile mode

# Stable Diffusion 1.5's architecture, and a tiny stand-in for the CPU (diffusers' / transformers' names).
UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2) if ON_GPU else \
    dict(sample_size=8, cross_attention_dim=32, attention_head_dim=2, block_out_channels=(32, 64), layers_per_block=1,
         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
         norm_num_groups=8)
VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512) if ON_GPU else \
    dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64)
TEXT = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12) if ON_GPU else \
    dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def build_pipeline():
    """A random-weight StableDiffusionPipeline in float32 on DEVICE, its layers initialised there."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    with torch.device(DEVICE):
        unet = UNet2DConditionModel(**UNET)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            latent_channels=4, **VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                                    hidden_act="quick_gelu", bos_token_id=49406,
                                                    eos_token_id=49407, pad_token_id=1, **TEXT))
    tokenizer = CLIPTokenizer(str(CLIP_ASSETS / "vocab.json"), str(CLIP_ASSETS / "merges.txt"),
                              pad_token="<|endoftext|>", model_max_length=77)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, noise: torch.Tensor) -> torch.Tensor:
    """One image from `noise` (1, 4, SIZE/8, SIZE/8); returns the final latents (before the VAE)."""
    final = {}

    def keep_last(pipe, step, timestep, kwargs):
        if step == STEPS - 1:
            final["latents"] = kwargs["latents"]
        return kwargs

    pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
         latents=noise.to(pipe.unet.dtype), output_type="pt", callback_on_step_end=keep_last)
    if ON_GPU:
        torch.cuda.synchronize()
    return final["latents"]


@pytest.fixture(scope="module")
def sd15():
    """(float16 pipeline, initial noise, float32 reference latents): the reference is the unpatched eager
    pipeline in float32 with TF32 off, run once."""
    pipe = build_pipeline()
    noise = torch.randn(1, 4, SIZE // 8, SIZE // 8, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    with torch.no_grad():
        reference = generate(pipe, noise).float()
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    return pipe.to(DTYPE), noise, reference


@pytest.mark.parametrize("provider", ["unpatched", "patched"])
@pytest.mark.parametrize("mode", list(MODES))
def test_diffusers_pipeline(benchmark, sd15, mode, provider):
    import diffusers
    from torch._dynamo.utils import counters

    pipe, noise, reference = sd15
    unet = pipe.unet
    if provider == "patched":
        patch(pipe)
    if MODES[mode] is not None:
        torch._dynamo.reset()  # a graph compiled for the other provider must not be reused
        counters.clear()
        options = dict(mode=MODES[mode]) if ON_GPU else {}  # the CPU's "eager" backend takes no mode
        pipe.unet = torch.compile(unet, backend=COMPILE_BACKEND, **options)
    try:
        with torch.no_grad():
            latents = []
            benchmark.pedantic(lambda: latents.append(generate(pipe, noise)), rounds=ROUNDS, iterations=1,
                               warmup_rounds=WARMUP)
    finally:
        pipe.unet = unet
        unpatch(pipe)
    final = latents[-1].float()
    parity = ((final - reference).norm() / reference.norm()).item()
    benchmark.group = f"diffusers SD pipeline {SIZE}x{SIZE} {STEPS} steps {DTYPE} {mode}"
    benchmark.extra_info.update(
        op="diffusers_pipeline", model="SD1.5" if ON_GPU else "tiny", mode=mode, provider=provider,
        dtype=str(DTYPE), size=SIZE, steps=STEPS,
        ms=statistics.median(benchmark.stats.stats.data) * 1e3, parity=parity,
        reference_std=reference.std().item(), finite=bool(torch.isfinite(final).all()),
        diffusers=diffusers.__version__)
    if MODES[mode] is not None:
        benchmark.extra_info.update(graph_breaks=sum(counters["graph_break"].values()),
                                    graph_break_reasons=sorted(counters["graph_break"])[:5],
                                    graphs=counters["stats"]["unique_graphs"], frames=counters["frames"]["ok"])
    assert torch.isfinite(final).all(), f"{mode} {provider}: non-finite final latents"


def _host_us(fn, calls: int) -> float:
    """Microseconds of host time per call of fn(): calls back-to-back, one synchronisation at the end."""
    fn()
    if ON_GPU:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    if ON_GPU:
        torch.cuda.synchronize()
    return elapsed / calls * 1e6


@pytest.mark.parametrize("provider", ["unpatched", "patched"])
def test_host_us_per_call(benchmark, sd15, provider):
    """Host cost of one attention layer (self-attention, the transformer's attn1) and one ResNet block at
    the UNet's 8x8 level, whose GPU work is a few microseconds: the loop runs at the host's pace."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    pipe = sd15[0]
    unet = pipe.unet
    attn = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    resnet = next(m for m in unet.mid_block.modules() if isinstance(m, ResnetBlock2D))
    assert isinstance(attn, Attention)
    side = SIZE // 64  # the mid block's latent side: 8 at 512x512
    channels = resnet.in_channels
    hidden = torch.randn(2, side * side, channels, device=DEVICE, dtype=DTYPE)
    x = torch.randn(2, channels, side, side, device=DEVICE, dtype=DTYPE)
    temb = torch.randn(2, unet.config.block_out_channels[0] * 4, device=DEVICE, dtype=DTYPE)
    calls = 300 if ON_GPU else 3
    if provider == "patched":
        patch(unet)
    try:
        with torch.no_grad():
            us = {"attention": _host_us(lambda: attn(hidden), calls),
                  "resnet": _host_us(lambda: resnet(x, temb), calls)}
            benchmark.pedantic(lambda: attn(hidden), rounds=1, iterations=1)
    finally:
        unpatch(unet)
    benchmark.group = "host us per call"
    benchmark.extra_info.update(op="host_us_per_call", provider=provider, channels=channels, side=side, **us)
