"""End to end: fastdiff's CUDA fast path against diffusers eager and diffusers + torch.compile, whole images,
side by side in one process.

GPU (the default list; FASTDIFF_E2E_CASES narrows it): SD1.5 and SD2.1-base architectures with random weights
(speed does not depend on the weights), float16, 512x512, 25 DPM++ 2M steps, classifier-free guidance 7.5,
decoded to pixels. sd21v, SD2.1-768 (SD2.1-base's UNet and text tower, v-prediction), makes 768x768 images. sdxl,
SDXL base (its UNet, CLIP ViT-L and OpenCLIP bigG text encoders, the SD VAE with SDXL's scaling), makes 1024x1024
images with 25 DPM++ 2M steps on leading timesteps, guidance 7.5, the VAE decoding in float32 (force_upcast) in
both systems as diffusers' SDXL pipeline runs it; sdxl_turbo, the same architecture as SDXL-Turbo runs it, makes
512x512 images with 4 Euler ancestral steps on trailing timesteps, without guidance. A case may name another size
(height x width). Systems:
  fastdiff            Pipeline(fast=None): channels_last, fused q/k/v, self-attention per head dim and batch
                      (FastConfig's "auto"), Triton cross-attention and GroupNorm+SiLU, the UNet call
                      replayed from a CUDA graph
  fastdiff_unfused_geglu  the same with FastConfig(fuse_geglu=False): GEGLU's gelu and mul as two eager
                      kernels (what the fused kernel, on by default, saves)
  fastdiff_compile    the same with fastdiff's UNet under torch.compile before capture (optional, last)
  diffusers_eager     StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL) as it comes (SDPA)
  diffusers_compile   diffusers' recipe: fuse_qkv_projections, channels_last UNet and VAE, the UNet under
                      torch.compile(mode="reduce-overhead", fullgraph=True); dynamo is reset before each such
                      case, so that each compiles for its own static shape, as in a fresh process
Case kinds (one pytest case each, run in the order of CASES, skipped once FASTDIFF_E2E_DEADLINE_S is near):
  parity      final latents from one initial noise: fastdiff fast fp16 vs fastdiff reference fp32 (the models
              as written, reference ops, TF32 off) against diffusers fp16 vs diffusers fp32; the acceptance
              budget is 2x theirs
  image       ms per whole image (prompt to pixels, CUDA synchronised), images/s, first-call seconds
  unet_step   ms per UNet call at the CFG batch (fastdiff as configured by default, with SDPA self-attention
              everywhere, with Triton self-attention everywhere, with GEGLU unfused; diffusers eager and
              compiled), effective TFLOP/s from torch.utils.flop_counter (SDXL's call with its added
              conditioning); VAE decode ms
  profile     torch.profiler per-kernel table of one fastdiff UNet step (eager launch of the engine's fused
              UNet, `FastEngine.unet`: the same kernels the graph replays) and GPU time per kernel
              category; on a GPU also the timeline of one graph replay (nodes, memset nodes, busy and idle time)
  cold_start  fresh processes (this file run as a script) to the first image: fastdiff with empty Triton and
              inductor caches, then warm ones; diffusers eager; each with peak GPU memory
  memory      fresh processes at a larger batch: fastdiff and diffusers eager peak GPU memory
  new_shape   warm process: a fresh fastdiff Pipeline over the same models makes its first image at the case's
              shape, then, for each of NEW_SHAPES, its first image there; that image's seconds minus the shape's
              steady seconds per call is the new shape overhead (before other cases meet those shapes: the
              shapes preset runs it first of its added cases), after the compiles the first image handed the
              workers for other sizes are done (the wait is reported)
Results accumulate in FASTDIFF_E2E_JSON (default $TMPDIR/fastdiff_e2e_results.json) after every case, so a run cut short
keeps what it measured; `python benchmarks/bench_e2e.py --summary FILE` prints the table.

CPU (or FASTDIFF_E2E_TINY=1): tiny random models, every size an eighth (64x64 for 512x512), at most 2 steps, one
round each, compile with backend "eager": checks that the benchmark works, not how fast anything is.

    pytest benchmarks/bench_e2e.py --benchmark-only                    # every case (FASTDIFF_E2E_CASES: some)
    python benchmarks/bench_e2e.py --run [CASES]                       # CASES in one pytest process, then the table
    python benchmarks/bench_e2e.py --run shapes                        # SHAPES_CASES, the table below
    python benchmarks/bench_e2e.py --run parity                        # PARITY_CASES: fp16 error at those shapes
    python benchmarks/bench_e2e.py --run sdxl                          # SDXL_CASES: SDXL's figures

FASTDIFF_E2E_CASES: comma-separated arch:kind, arch:kind:system, arch:kind:system:batch (the architecture's own
size) or arch:kind:system:batch:HxW, e.g. sd15:image:diffusers_compile:4 or sd15:image:fastdiff:1:512x768 (height
512, width 768). The shorter forms pick from the default list; a whole case it does not hold runs too, after the
last chosen case of its architecture. --run takes the same syntax, or a preset name; without CASES it runs the
headline, HEADLINE_CASES: SD1.5 512x512 batch 1, fastdiff against diffusers + compile, whose ratio the table's
"sd15 512x512 b1" line ends with. Presets (PRESETS), fastdiff against diffusers + compile per row:
  shapes  SD1.5 at 512x512, 512x768 (height x width) and 768x768, batch 1; SD2.1-768 at 768x768, batch 1; SD1.5
          512x512 at batch 4 and 8; and sd15's new_shape.
  parity  the parity case (fp16 against fp32, both systems) at each of those shapes.
  sdxl    SDXL's headline figures in priority order: 1024x1024 batch 1, the UNet step, parity, batch 4, memory
          (batch 4), cold start, then SDXL-Turbo at 512x512 batch 1. Where a command must end within a time
          limit, FASTDIFF_E2E_DEADLINE_S a little under it makes the run skip (and record as skipped) the cases
          that would overrun; those run by name in a later command, with its own FASTDIFF_E2E_JSON (--run starts
          its results file afresh):

    FASTDIFF_E2E_DEADLINE_S=540 FASTDIFF_E2E_JSON=sdxl.json python benchmarks/bench_e2e.py --run sdxl
    FASTDIFF_E2E_JSON=sdxl_rest.json python benchmarks/bench_e2e.py --run sdxl:memory:all:4,sdxl:cold_start:all:1
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastdiff's kernels are defined (script mode too)
TINY = not ON_GPU or os.environ.get("FASTDIFF_E2E_TINY") == "1"
DEVICE = "cuda" if ON_GPU else "cpu"
DTYPE = torch.float16 if ON_GPU else torch.float32
STEPS = 2 if TINY else 25  # the most steps an image takes (TINY: 2)
GUIDANCE = 7.5
SEED = 0  # every image's generator: an ancestral sampler (sdxl_turbo's) draws the same noise in every system
PROMPT = "a photograph of an astronaut riding a horse"
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, prediction_type="epsilon")
SAMPLING = dict(sampler="dpmpp_2m", steps=STEPS, guidance=GUIDANCE)  # sampler: fastdiff's name for it
CLIP_ASSETS = Path(__file__).resolve().parent.parent / "fastdiff" / "assets" / "clip"
STARTED = time.monotonic()
DEADLINE_S = float(os.environ.get("FASTDIFF_E2E_DEADLINE_S", "inf"))  # seconds after import to stop starting cases
JSON_PATH = Path(os.environ.get("FASTDIFF_E2E_JSON", Path(tempfile.gettempdir()) / "fastdiff_e2e_results.json"))
FLOPS_NOTE = ("UNet FLOPs counted by torch.utils.flop_counter on the reference ops (CFG batch 2: SD1.5 at 512x512 "
              "1606 GFLOP, SDXL at 1024x1024 13522 GFLOP)")

# diffusers / transformers constructor settings per architecture (fastdiff reads the same names): unet; text, the
# text encoder (its projection_dim is the transformers config's, of a projection CLIPTextModel lacks); and where an
# architecture has them: text_2, SDXL's second text encoder (CLIPTextModelWithProjection); vae, settings over VAE's;
# scheduler, over SCHEDULER; sampling, over SAMPLING; size, the side of its own images in pixels (else 8 per latent
# of the UNet's sample_size); cost, a rough factor on the seconds its cases take against SD1.5's (COST_S).
ARCHS = {
    "sd15": dict(
        unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu", projection_dim=768)),
    "sd21": dict(  # SD2.1-base: OpenCLIP ViT-H text tower (23 layers used), 64-wide heads, linear projections
        unet=dict(sample_size=64, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                  use_linear_projection=True, upcast_attention=True),
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", projection_dim=512)),
}
# SD2.1-768: SD2.1-base's UNet and text tower on 96x96 latents, predicting v (the scheduler config says so, to
# diffusers and fastdiff alike)
ARCHS["sd21v"] = dict(unet=dict(ARCHS["sd21"]["unet"], sample_size=96), text=ARCHS["sd21"]["text"],
                      scheduler=dict(prediction_type="v_prediction"))
# SDXL base (stabilityai/stable-diffusion-xl-base-1.0's configs): no attention at the top level, transformer
# depth per level, 64-wide heads; the context is CLIP ViT-L's and OpenCLIP bigG's penultimate states side by
# side (768 + 1280), the added conditioning bigG's pooled projection and six size and crop ids (1280 + 6 * 256);
# the SD VAE with SDXL's scaling, decoding in float32 (force_upcast)
ARCHS["sdxl"] = dict(
    unet=dict(sample_size=128, block_out_channels=[320, 640, 1280],
              down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
              up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
              transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], use_linear_projection=True,
              cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
              projection_class_embeddings_input_dim=2816),
    text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768),
    text_2=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                hidden_act="gelu", projection_dim=1280),
    vae=dict(scaling_factor=0.13025, force_upcast=True),
    scheduler=dict(timestep_spacing="leading"),
    cost=3)
# SDXL-Turbo: SDXL's architecture distilled for few unguided steps. diffusers' SDXL Turbo docs: guidance_scale=0.0,
# timestep_spacing="trailing", 1 to 4 steps, trained at 512x512; stabilityai/sdxl-turbo's scheduler_config.json is
# an EulerAncestralDiscreteScheduler's with SDXL's betas and "trailing" spacing
ARCHS["sdxl_turbo"] = dict(ARCHS["sdxl"], scheduler=dict(timestep_spacing="trailing"),
                           sampling=dict(sampler="euler_a", steps=4, guidance=0.0), size=512)
VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, sample_size=512)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=32)


def _tiny(spec: dict) -> dict:
    """`spec` at the CPU's size, sizes an eighth: 32-wide text encoders; a UNet of 32 and 64 channels with heads of
    16 (which keeps the Triton kernels inside their limits on the interpreter), SDXL's of three levels with its block
    types, transformer depth per level and added conditioning (the second encoder's projection and six ids of 8)."""
    unet = spec["unet"]
    tiny = dict(spec, text=dict(TINY_TEXT, hidden_act=spec["text"]["hidden_act"]),
                unet=dict(sample_size=unet["sample_size"] // 8, layers_per_block=1, norm_num_groups=8,
                          use_linear_projection=unet.get("use_linear_projection", False)))
    if "text_2" in spec:
        tiny["text_2"] = dict(TINY_TEXT, hidden_act=spec["text_2"]["hidden_act"])
        tiny["unet"].update(block_out_channels=[32, 32, 64], attention_head_dim=[2, 2, 4],
                            transformer_layers_per_block=[1, 1, 2], cross_attention_dim=2 * TINY_TEXT["hidden_size"],
                            down_block_types=unet["down_block_types"], up_block_types=unet["up_block_types"],
                            addition_embed_type="text_time", addition_time_embed_dim=8,
                            projection_class_embeddings_input_dim=TINY_TEXT["projection_dim"] + 6 * 8)
    else:
        tiny["unet"].update(block_out_channels=[32, 64], attention_head_dim=2,
                            cross_attention_dim=TINY_TEXT["hidden_size"],
                            down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                            up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
    if "size" in spec:
        tiny["size"] = spec["size"] // 8
    return tiny


if TINY:
    ARCHS = {name: _tiny(spec) for name, spec in ARCHS.items()}
    VAE = dict(block_out_channels=[16, 32, 32, 32], layers_per_block=1, latent_channels=4, norm_num_groups=8,
               sample_size=64)

# (architecture, kind, system, batch[, (height, width)]) in priority order: the acceptance's figures first. Without
# a size a case runs at its architecture's own (default_size).
GPU_CASES = [
    ("sd15", "parity", "all", 1),
    ("sd15", "image", "fastdiff", 1), ("sd15", "image", "fastdiff_unfused_geglu", 1),
    ("sd15", "image", "diffusers_compile", 1), ("sd15", "image", "diffusers_eager", 1),
    ("sd15", "unet_step", "all", 1), ("sd15", "profile", "fastdiff", 1),
    ("sd15", "image", "fastdiff", 4), ("sd15", "image", "diffusers_compile", 4),
    ("sd15", "image", "diffusers_eager", 4),
    ("sd15", "image", "fastdiff", 8), ("sd15", "image", "diffusers_compile", 8),
    ("sd15", "image", "diffusers_eager", 8), ("sd15", "profile", "fastdiff", 8),
    ("sd15", "cold_start", "all", 1), ("sd15", "memory", "all", 8),
    ("sd21", "parity", "all", 1),
    ("sd21", "image", "fastdiff", 1), ("sd21", "image", "diffusers_compile", 1),
    ("sd21", "image", "diffusers_eager", 1),
    # SDXL in the `sdxl` preset's order (the UNet step right after the compiled image, whose compile it times)
    ("sdxl", "image", "fastdiff", 1), ("sdxl", "image", "diffusers_compile", 1), ("sdxl", "unet_step", "all", 1),
    ("sdxl", "parity", "all", 1), ("sdxl", "image", "diffusers_eager", 1),
    ("sdxl", "image", "fastdiff", 4), ("sdxl", "image", "diffusers_compile", 4),
    ("sdxl", "image", "diffusers_eager", 4), ("sdxl", "memory", "all", 4), ("sdxl", "cold_start", "all", 1),
    ("sdxl_turbo", "image", "fastdiff", 1), ("sdxl_turbo", "image", "diffusers_compile", 1),
    ("sdxl_turbo", "image", "diffusers_eager", 1),
    ("sd15", "image", "fastdiff_compile", 1),
]
# without fastdiff_compile: inductor's CPU compile takes a minute here
CPU_CASES = [("sd15", "parity", "all", 1), ("sd15", "image", "fastdiff", 1),
             ("sd15", "image", "fastdiff_unfused_geglu", 1),
             ("sd15", "image", "diffusers_eager", 1),
             ("sd15", "image", "diffusers_compile", 1), ("sd15", "image", "fastdiff", 2),
             ("sd15", "unet_step", "all", 1), ("sd15", "profile", "fastdiff", 1), ("sd15", "cold_start", "all", 1),
             ("sd15", "image", "fastdiff", 1, (64, 96)), ("sd15", "image", "diffusers_compile", 1, (64, 96)),
             ("sd15", "new_shape", "fastdiff", 1), ("sd21", "image", "fastdiff", 1),
             ("sd21v", "image", "fastdiff", 1),
             ("sdxl", "image", "fastdiff", 1), ("sdxl", "image", "diffusers_compile", 1),
             ("sdxl", "unet_step", "all", 1), ("sdxl", "parity", "all", 1), ("sdxl", "image", "diffusers_eager", 1),
             ("sdxl", "memory", "all", 2),
             ("sdxl_turbo", "image", "fastdiff", 1), ("sdxl_turbo", "image", "diffusers_eager", 1)]
# Rough seconds each case needs (compiles dominate) at one 512x512 image per call, to skip what cannot finish
# before the deadline; WORK_COST_S more per further 512x512 image's worth of pixels per call (batch x height x width).
COST_S = {"parity": 25, "image": 15, "unet_step": 20, "profile": 10, "cold_start": 120, "memory": 60,
          "new_shape": 25}
COMPILE_COST_S = 100
WORK_COST_S = 3
SYSTEMS = ("fastdiff", "fastdiff_unfused_geglu", "fastdiff_compile", "diffusers_eager", "diffusers_compile")
# new_shape's shapes, (batch, height, width), each first met after an image at the case's own shape
NEW_SHAPES = [(1, 512, 768), (3, 512, 512), (1, 768, 768)]
_SCALE = 8 if TINY else 1  # TINY makes every size an eighth
if TINY:
    NEW_SHAPES = [(b, h // _SCALE, w // _SCALE) for b, h, w in NEW_SHAPES]
HEADLINE_CASES = "sd15:image:fastdiff:1,sd15:image:diffusers_compile:1"  # `--run`'s default
# `--run shapes`: fastdiff and diffusers + compile per (arch, batch, height, width), and sd15's new_shape first of
# the cases the default list does not hold (before any of them meets NEW_SHAPES)
SHAPES = [("sd15", 1, 512, 512), ("sd15", 1, 512, 768), ("sd15", 1, 768, 768), ("sd21v", 1, 768, 768),
          ("sd15", 4, 512, 512), ("sd15", 8, 512, 512)]  # (arch, batch, height, width)
SHAPES_CASES = ",".join(["sd15:new_shape:fastdiff:1"] + [
    f"{arch}:image:{system}:{batch}:{h // _SCALE}x{w // _SCALE}"
    for arch, batch, h, w in SHAPES for system in ("fastdiff", "diffusers_compile")])
# `--run parity`: the fp16 error of both systems against their fp32 references at each of SHAPES
PARITY_CASES = ",".join(f"{arch}:parity:all:{batch}:{h // _SCALE}x{w // _SCALE}" for arch, batch, h, w in SHAPES)
# `--run sdxl`: SDXL's headline figures, most important first (they run in GPU_CASES' order, which is this one)
SDXL_CASES = ("sdxl:image:fastdiff:1,sdxl:image:diffusers_compile:1,sdxl:unet_step:all:1,sdxl:parity:all:1,"
              "sdxl:image:fastdiff:4,sdxl:image:diffusers_compile:4,sdxl:memory:all:4,sdxl:cold_start:all:1,"
              "sdxl_turbo:image:fastdiff:1,sdxl_turbo:image:diffusers_compile:1")
PRESETS = {"shapes": SHAPES_CASES, "parity": PARITY_CASES, "sdxl": SDXL_CASES}  # names FASTDIFF_E2E_CASES and --run take for case lists


def default_size(arch: str) -> tuple[int, int]:
    """(height, width) of the architecture's own images: its `size`, else 8 pixels per latent of its UNet's
    sample_size."""
    side = ARCHS[arch].get("size", 8 * ARCHS[arch]["unet"]["sample_size"])
    return side, side


def is_sdxl(arch: str) -> bool:
    """Whether `arch` is SDXL's (two text encoders, the UNet's added conditioning)."""
    return "text_2" in ARCHS[arch]


def scheduler_for(arch: str) -> dict:
    return dict(SCHEDULER, **ARCHS[arch].get("scheduler", {}))


def sampling_for(arch: str) -> dict:
    """{sampler, steps, guidance} of the architecture's images; at most STEPS steps."""
    sampling = dict(SAMPLING, **ARCHS[arch].get("sampling", {}))
    return dict(sampling, steps=min(sampling["steps"], STEPS))


def vae_for(arch: str) -> dict:
    return dict(VAE, **ARCHS[arch].get("vae", {}))


def parse_size(text: str) -> tuple[int, int]:
    """ "HxW" -> (H, W)."""
    height, width = text.lower().split("x")
    return int(height), int(width)


def _case(arch: str, kind: str, system: str, batch: int, size=None) -> tuple:
    return arch, kind, system, int(batch), tuple(size) if size else default_size(arch)


def _case_keys(case) -> set:
    """The FASTDIFF_E2E_CASES keys that choose `case`."""
    arch, kind, system, batch, (h, w) = case
    keys = {f"{arch}:{kind}", f"{arch}:{kind}:{system}", f"{arch}:{kind}:{system}:{batch}:{h}x{w}"}
    return keys | ({f"{arch}:{kind}:{system}:{batch}"} if (h, w) == default_size(arch) else set())


def _cases() -> list[tuple]:
    cases = [_case(*c) for c in (GPU_CASES if not TINY else CPU_CASES)]
    # e.g. "sd15:image,sd15:parity,sd15:image:diffusers_compile:4,sd15:image:fastdiff:1:512x768" (the module's
    # docstring), or a PRESETS name
    wanted = os.environ.get("FASTDIFF_E2E_CASES")
    if not wanted:
        return cases
    keys = [w.strip() for w in PRESETS.get(wanted, wanted).split(",") if w.strip()]
    chosen = [c for c in cases if _case_keys(c) & set(keys)]
    for key in keys:  # a whole case the list does not hold: after the last chosen case of its architecture
        parts = key.split(":")
        if len(parts) < 4 or any(key in _case_keys(c) for c in chosen):
            continue
        if len(parts) > 5 or parts[0] not in ARCHS or parts[1] not in KINDS or parts[2] not in SYSTEMS + ("all",):
            raise ValueError(f"FASTDIFF_E2E_CASES: {key!r} is not arch:kind:system:batch[:HxW] with arch in "
                             f"{list(ARCHS)}, kind in {list(KINDS)}, system in {SYSTEMS + ('all',)}")
        case = _case(*parts[:4], parse_size(parts[4]) if len(parts) == 5 else None)
        chosen.insert(max((i + 1 for i, c in enumerate(chosen) if c[0] == case[0]), default=len(chosen)), case)
    return chosen


def _have_diffusers() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def versions() -> dict:
    import triton

    out = {"gpu": torch.cuda.get_device_name() if ON_GPU else "cpu", "torch": torch.__version__,
           "cuda": torch.version.cuda, "triton": triton.__version__, "diffusers": None}
    if _have_diffusers():
        import diffusers

        out["diffusers"] = diffusers.__version__
    return out


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


# ---- building the models ---------------------------------------------------------------------------------

def build_diffusers(arch: str):
    """A random-weight float32 diffusers pipeline of `arch` on DEVICE (`diffusers_pipeline`)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    spec, vae = ARCHS[arch], vae_for(arch)
    ids = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        parts = dict(unet=UNet2DConditionModel(**spec["unet"]),
                     vae=AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * len(vae["block_out_channels"]),
                                       up_block_types=("UpDecoderBlock2D",) * len(vae["block_out_channels"]), **vae),
                     text_encoder=CLIPTextModel(CLIPTextConfig(**ids, **spec["text"])))
        if is_sdxl(arch):
            parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**ids, **spec["text_2"]))
    vocab, merges = str(CLIP_ASSETS / "vocab.json"), str(CLIP_ASSETS / "merges.txt")
    parts["tokenizer"] = CLIPTokenizer(vocab, merges, pad_token="<|endoftext|>", model_max_length=77)
    if is_sdxl(arch):  # OpenCLIP's tokenizer pads with "!"
        parts["tokenizer_2"] = CLIPTokenizer(vocab, merges, pad_token="!", model_max_length=77)
    return diffusers_pipeline(arch, parts)


def diffusers_pipeline(arch: str, parts: dict):
    """diffusers' pipeline of `arch` over `parts` (its models and tokenizers): StableDiffusionXLPipeline for SDXL
    (force_zeros_for_empty_prompt, as SDXL's model_index.json leaves it), else StableDiffusionPipeline; a fresh
    scheduler of the architecture's sampler (`sampling_for`: DPM++ 2M is DPMSolverMultistepScheduler's defaults); no
    safety checker or watermark, which fastdiff does not run either; no progress bar."""
    import diffusers

    from fastdiff.schedulers.config import DIFFUSERS_CLASSES

    scheduler = getattr(diffusers, DIFFUSERS_CLASSES[sampling_for(arch)["sampler"]])(**scheduler_for(arch))
    if is_sdxl(arch):
        pipe = diffusers.StableDiffusionXLPipeline(**parts, scheduler=scheduler, force_zeros_for_empty_prompt=True,
                                                   add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionPipeline(**parts, scheduler=scheduler, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_fastdiff(arch: str, oracle=None, fast=None):
    """A float32 fastdiff Pipeline of `arch` on DEVICE: the oracle's weights when given, else its own random init."""
    import fastdiff
    from fastdiff.models import (AutoencoderKL, CLIPTextConfig, CLIPTextModel, CLIPTokenizer,
                                 UNet2DConditionModel, UNetConfig, VAEConfig)

    from fastdiff.engine import prepare_engine

    prepare_engine(DEVICE, fast)  # as Pipeline.from_pretrained does before the weights this random init stands for
    spec = ARCHS[arch]
    vae_cfg = VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in vae_for(arch).items()})
    text_cfg = CLIPTextConfig(**{k: v for k, v in spec["text"].items() if k != "projection_dim"})
    torch.manual_seed(0)
    with torch.device(DEVICE):
        models = dict(unet=UNet2DConditionModel(UNetConfig(**spec["unet"])), vae=AutoencoderKL(vae_cfg),
                      text_encoder=CLIPTextModel(text_cfg))
        if is_sdxl(arch):
            models["text_encoder_2"] = CLIPTextModel(CLIPTextConfig(**spec["text_2"]))
    if oracle is not None:
        for name, model in models.items():
            model.load_state_dict(getattr(oracle, name).state_dict())
    sdxl = dict(tokenizer_2=CLIPTokenizer.default(pad_token="!"),
                options=dict(force_zeros_for_empty_prompt=True)) if is_sdxl(arch) else {}
    return fastdiff.Pipeline(tokenizer=CLIPTokenizer.default(), scheduler_config=scheduler_for(arch),
                             source=f"random {arch}", fast=fast, **models, **sdxl)


def pipeline_like(pipe, fast, unet=None):
    """A fastdiff Pipeline over `pipe`'s models, tokenizers and settings (`unet` in place of its UNet when given),
    with an engine of its own, made for `fast` on its first call."""
    import fastdiff

    return fastdiff.Pipeline(pipe.unet if unet is None else unet, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                             pipe.scheduler_config, source=pipe.source, fast=fast, text_encoder_2=pipe.text_encoder_2,
                             tokenizer_2=pipe.tokenizer_2, options=pipe.options)


def in_dtype(pipe, dtype: torch.dtype, fast):
    """`pipe`'s models moved to `dtype` in place, the VAE to the dtype the pipeline decodes in (float32 for SDXL's
    with force_upcast when `dtype` is float16, as diffusers' SDXL pipeline decodes), in a new Pipeline
    (`pipeline_like`)."""
    from fastdiff.pipeline import vae_dtype_for

    for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
        if model is not None:
            model.to(dtype)
    pipe.vae.to(vae_dtype_for(pipe.vae.config, dtype, pipe.sdxl))
    return pipeline_like(pipe, fast)


@contextlib.contextmanager
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def noise_for(arch: str, batch: int, size: tuple[int, int]) -> torch.Tensor:
    """Initial latents for `batch` images of `size` (height, width): the run functions read the size from them."""
    g = torch.Generator().manual_seed(1000 + batch)
    return torch.randn(batch, 4, size[0] // 8, size[1] // 8, generator=g)


def run_fastdiff(pipe, arch: str, noise: torch.Tensor, output_type: str = "pt") -> torch.Tensor:
    """`noise.shape[0]` images of PROMPT from `noise`, sampled as `arch`'s are (`sampling_for`), stacked."""
    sampling = sampling_for(arch)
    out = pipe([PROMPT] * noise.shape[0], sampling["steps"], guidance_scale=sampling["guidance"],
               height=8 * noise.shape[2], width=8 * noise.shape[3], latents=noise, scheduler=sampling["sampler"],
               seed=SEED, output_type=output_type, progress=False)
    sync()
    return torch.stack(out)


def run_diffusers(pipe, arch: str, noise: torch.Tensor, output_type: str = "pt") -> torch.Tensor:
    """As `run_fastdiff`, with diffusers' pipeline (whose scheduler is the architecture's sampler)."""
    sampling = sampling_for(arch)
    out = pipe([PROMPT] * noise.shape[0], num_inference_steps=sampling["steps"], guidance_scale=sampling["guidance"],
               height=8 * noise.shape[2], width=8 * noise.shape[3], latents=noise.to(DEVICE, pipe.unet.dtype),
               generator=torch.Generator().manual_seed(SEED), output_type=output_type).images
    sync()
    return out


def default_fast():
    """The Pipeline's own default on CUDA; on the CPU the fast path's fused modules without graphs, so that the CPU
    run goes through the fast path's code too."""
    from fastdiff.engine import FastConfig

    return None if ON_GPU else FastConfig(cuda_graphs=False)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm()).item()


def measure_parity(arch: str, batch: int, size: tuple[int, int], fastdiff32, oracle32) -> tuple[dict, Any, Any]:
    """The final latents of `batch` images at `size` from one initial noise: fastdiff's float32 Pipeline
    `fastdiff32` on its reference backend and diffusers' float32 pipeline `oracle32` (None without diffusers), TF32
    off; then both moved to DTYPE (fastdiff with its fast path on) and run again. Returns (the relative errors,
    the DTYPE fastdiff Pipeline, the DTYPE diffusers pipeline or None): the models are converted in place."""
    noise = noise_for(arch, batch, size)
    with no_tf32():
        from fastdiff import ops

        with ops.use_backend("reference"):
            ref32 = run_fastdiff(fastdiff32, arch, noise, "latent")
        theirs32 = run_diffusers(oracle32, arch, noise, "latent") if oracle32 is not None else None
    fastdiff16 = in_dtype(fastdiff32, DTYPE, default_fast())
    ours = run_fastdiff(fastdiff16, arch, noise, "latent")
    parity = {"fastdiff_fast_vs_fastdiff_ref32": rel(ours, ref32), "finite": bool(torch.isfinite(ours).all())}
    if oracle32 is None:
        return parity, fastdiff16, None
    diffusers16 = oracle32.to(DTYPE)  # an SDXL VAE too: diffusers' pipeline upcasts it to decode
    theirs = run_diffusers(diffusers16, arch, noise, "latent")
    parity.update(diffusers_fp16_vs_fp32=rel(theirs, theirs32), fastdiff_ref32_vs_diffusers_fp32=rel(ref32, theirs32))
    theirs_err = parity["diffusers_fp16_vs_fp32"]  # 0 on the CPU, where both run float32
    parity["ratio"] = parity["fastdiff_fast_vs_fastdiff_ref32"] / theirs_err if theirs_err else None
    return parity, fastdiff16, diffusers16


class Systems:
    """The models of one architecture, built once and kept while that architecture's cases run."""

    def __init__(self, arch: str):
        self.arch = arch
        self.oracle32 = build_diffusers(arch) if _have_diffusers() else None
        self.fastdiff = build_fastdiff(arch, self.oracle32, fast=False)  # float32 until parity has run
        self.diffusers = None  # float16 eager
        self.compiled = None  # float16 diffusers with the compile recipe, built on first use
        self.compiled_shape = None  # (batch, (height, width)) of the compiled case last made ready
        self.parity: dict = {}
        self._prepare()

    def _prepare(self) -> None:
        """Run the float32 references, then move everything to DTYPE with the fast path on."""
        self.parity, self.fastdiff, self.diffusers = measure_parity(self.arch, 1, default_size(self.arch),
                                                                     self.fastdiff, self.oracle32)
        self.oracle32 = None

    def compiled_diffusers(self, batch: int, size: tuple[int, int]):
        """diffusers' own fast recipe on a copy of the float16 pipeline (the eager one stays as it comes), ready to
        compile for (batch, size) on its next call: dynamo's caches are reset first, as in a fresh process, so that
        the UNet compiles for that static shape instead of recompiling an earlier case's with dynamic sizes."""
        torch._dynamo.reset()
        self.compiled_shape = (batch, size)
        if self.compiled is None:
            d = self.diffusers  # the text encoders and tokenizers are shared: the recipe leaves them as they are
            texts = ("text_encoder", "tokenizer") + (("text_encoder_2", "tokenizer_2") if is_sdxl(self.arch) else ())
            pipe = diffusers_pipeline(self.arch, dict({name: getattr(d, name) for name in texts},
                                                      unet=copy.deepcopy(d.unet), vae=copy.deepcopy(d.vae)))
            pipe.fuse_qkv_projections()
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead" if ON_GPU else None, fullgraph=True,
                                      backend="inductor" if ON_GPU else "eager")
            self.compiled = pipe
        return self.compiled

    def fastdiff_unfused_geglu(self):
        """fastdiff's fast path with GEGLU's gelu and mul unfused, on a copy of the float16 UNet."""
        from fastdiff.engine import FastConfig

        return pipeline_like(self.fastdiff, FastConfig(fuse_geglu=False, cuda_graphs=ON_GPU),
                             unet=copy.deepcopy(self.fastdiff.unet))

    def fastdiff_compiled(self):
        """fastdiff's fast path with its UNet under torch.compile, on a copy of the float16 UNet."""
        from fastdiff.engine import FastConfig

        # "default": max-autotune's GEMM search would take minutes of the run's budget
        config = FastConfig(compile="default", cuda_graphs=ON_GPU)
        return pipeline_like(self.fastdiff, config, unet=copy.deepcopy(self.fastdiff.unet))


_systems: dict[str, Systems] = {}


def systems_for(arch: str) -> Systems:
    if arch not in _systems:
        _systems.clear()  # one architecture's models at a time
        gc.collect()
        if ON_GPU:
            torch.cuda.empty_cache()
        _systems[arch] = Systems(arch)
    return _systems[arch]


# ---- results file --------------------------------------------------------------------------------------

_results: dict = {"versions": None, "settings": None, "cases": {}}


def record(name: str, info: dict) -> None:
    """Keep `info` under `name` and rewrite the JSON file (partial results survive a cut-short run)."""
    if _results["versions"] is None:
        _results["versions"] = versions()
        _results["settings"] = dict(steps=STEPS, guidance=GUIDANCE, scheduler=SAMPLING["sampler"],
                                    dtype=str(DTYPE), tiny=TINY, weights="random",
                                    sampling={arch: sampling_for(arch) for arch in ARCHS})
    _results["cases"][name] = info
    JSON_PATH.write_text(json.dumps(_results, indent=1, default=str))


# ---- the cases -----------------------------------------------------------------------------------------

def _case_id(case) -> str:
    arch, kind, system, batch, (h, w) = case
    return f"{arch}-{kind}-{system}-b{batch}-{h}x{w}"


def _cost_s(case) -> float:
    """Rough seconds `case` needs (COST_S, times its architecture's cost), building its architecture's models
    included."""
    arch, kind, system, batch, (h, w) = case
    base = COMPILE_COST_S if "compile" in system else COST_S[kind]
    work = WORK_COST_S * max(0.0, batch * h * w * _SCALE ** 2 / 512 ** 2 - 1)
    return ARCHS[arch].get("cost", 1) * (base + work + (0 if arch in _systems else 30))


def settle() -> bool:
    """Wait, before timing a steady state, until what a first image handed fastdiff's compile workers for other
    sizes is compiled: the threads feeding them would compete with the timed calls for the host (a warm kernel
    cache makes them the busiest). False if 300 s were not enough."""
    from fastdiff.kernels import _compile_processes

    return _compile_processes.wait_background(timeout=300)


def time_calls(fn, calls: int = 20) -> float:
    """Mean ms per call of `fn` over `calls` back-to-back calls after 3 warm-up calls (CUDA events
    around the whole run; host launch cost counts, as it does in a sampling loop), in the steady state
    (`settle`). CPU: one call."""
    if not ON_GPU:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    settle()
    for _ in range(3):
        fn()
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def unet_flops(arch: str, batch: int, size: tuple[int, int]) -> float:
    """FLOPs of one UNet call on `batch` latents of `size` pixels (SDXL's with its added conditioning: the pooled
    text embedding and the time ids), counted on the meta device with the reference ops."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastdiff import ops
    from fastdiff.models import UNet2DConditionModel, UNetConfig

    cfg = UNetConfig(**ARCHS[arch]["unet"])
    with torch.device("meta"):
        unet = UNet2DConditionModel(cfg)
        x = torch.empty(batch, 4, size[0] // 8, size[1] // 8)
        context = torch.empty(batch, 77, cfg.cross_attention_dim)
        added = {}
        if cfg.addition_embed_type is not None:
            pooled = ARCHS[arch]["text_2"]["projection_dim"]
            time_ids = (cfg.projection_class_embeddings_input_dim - pooled) // cfg.addition_time_embed_dim
            added = dict(text_embeds=torch.empty(batch, pooled), time_ids=torch.empty(batch, time_ids))
    with ops.use_backend("reference"), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor(500.0, device="meta"), context, **added)
    return float(counter.get_total_flops())


def conditioning(pipe, batch: int, size: tuple[int, int]) -> tuple[torch.Tensor, dict]:
    """What the guided UNet call takes besides its latents for `batch` images of PROMPT (negative ""), as `pipe` makes
    it: the context (2B, 77, D), and SDXL's added conditioning (else {}): text_embeds (2B, P), the pooled text
    embedding, and time_ids (2B, 6) float32, SDXL's default size ids for `size` (height, width), no crop."""
    prompts, negative = [PROMPT] * batch, [""] * batch
    if not pipe.sdxl:
        return pipe.encode_prompt(prompts, negative, 1, True), {}
    context, pooled = pipe.encode_prompt_xl(prompts, negative, 1, True)
    time_ids = torch.tensor([[*size, 0, 0, *size]] * 2 * batch, dtype=torch.float32, device=pipe.device)
    return context, dict(text_embeds=pooled, time_ids=time_ids)


def case_parity(benchmark, arch: str, system: str, batch: int, size: tuple[int, int]) -> dict:
    """The errors `Systems` measured as it was built (batch 1 at the architecture's own size), or at another
    (batch, size) those of fresh float32 models (random weights, as the others), dropped afterwards."""
    s = systems_for(arch)
    if (batch, size) == (1, default_size(arch)):
        parity = s.parity
    else:
        oracle32 = build_diffusers(arch) if _have_diffusers() else None
        parity, *_ = measure_parity(arch, batch, size, build_fastdiff(arch, oracle32, fast=False), oracle32)
        del oracle32
        gc.collect()
    noise = noise_for(arch, batch, size)
    benchmark.pedantic(lambda: run_fastdiff(s.fastdiff, arch, noise, "latent"), rounds=1, iterations=1)
    return dict(parity, budget="fastdiff_fast_vs_fastdiff_ref32 <= 2 x diffusers_fp16_vs_fp32")


def case_image(benchmark, arch: str, system: str, batch: int, size: tuple[int, int]) -> dict:
    s = systems_for(arch)
    noise = noise_for(arch, batch, size)
    if system == "fastdiff":
        pipe, run = s.fastdiff, run_fastdiff
    elif system == "fastdiff_unfused_geglu":
        pipe, run = s.fastdiff_unfused_geglu(), run_fastdiff
    elif system == "fastdiff_compile":
        pipe, run = s.fastdiff_compiled(), run_fastdiff
    elif system == "diffusers_eager":
        pipe, run = s.diffusers, run_diffusers
    else:
        pipe, run = s.compiled_diffusers(batch, size), run_diffusers
    t0 = time.perf_counter()
    run(pipe, arch, noise)  # captures graphs / compiles for this shape
    first_call_s = time.perf_counter() - t0
    settle()
    rounds = 1 if TINY else (5 if batch == 1 else 3)
    # reduce-overhead records its graphs on later calls: diffusers + compile's batch-1 image still fell from 212 to
    # 200 ms over the five rounds after two warm-up calls on an H200, so it gets five
    warmup = 0 if TINY else (5 if "compile" in system else 1)
    benchmark.pedantic(lambda: run(pipe, arch, noise), rounds=rounds, iterations=1, warmup_rounds=warmup)
    ms = statistics.median(benchmark.stats.stats.data) * 1e3
    return dict(ms=ms, images_per_s=batch * 1e3 / ms, first_call_s=first_call_s,
                ms_all=[t * 1e3 for t in benchmark.stats.stats.data])


def case_unet_step(benchmark, arch: str, system: str, batch: int, size: tuple[int, int]) -> dict:
    from fastdiff.engine import FastConfig, FastEngine

    s = systems_for(arch)
    cfg_batch = 2 * batch
    flops = unet_flops(arch, cfg_batch, size)
    context, added = conditioning(s.fastdiff, batch, size)  # (2B, 77, D), SDXL's {text_embeds, time_ids}
    x = torch.randn(batch, 4, size[0] // 8, size[1] // 8, device=DEVICE)
    # a view of a 1-D float32 tensor, as a sampler's `model_timesteps[i]`: the fast path then reads the step's
    # time features from a precomputed row, as it does while sampling, instead of computing them per call
    t = torch.tensor([601.0], device=DEVICE)[0]
    info = {"flops": flops, "cfg_batch": cfg_batch, "note": FLOPS_NOTE}
    default = s.fastdiff.engine
    if not isinstance(default, FastEngine):
        pytest.skip("the fast path is off: nothing to time per step")
    step = default.denoiser(context, True, **added)
    benchmark.pedantic(lambda: step(x, t), rounds=5, iterations=1, warmup_rounds=1)
    ms = time_calls(lambda: step(x, t))
    info["fastdiff"] = {"ms": ms, "tflops": flops / ms / 1e9}
    graphs = default.config.cuda_graphs
    # Each variant is an engine of its own over the pipeline's models (its fused modules share their parameters;
    # the pipeline's engine is left as it is), built right before it is timed: its graph is captured in
    # time_calls' warm-up.
    f = s.fastdiff
    for name, config in (("fastdiff_sdpa_self", FastConfig(self_attention="sdpa", cuda_graphs=graphs)),
                         ("fastdiff_triton_self", FastConfig(self_attention="fastdiff", cuda_graphs=graphs)),
                         ("fastdiff_unfused_geglu", FastConfig(fuse_geglu=False, cuda_graphs=graphs))):
        fn = FastEngine(f.unet, f.vae, f.text_encoder, config, f.text_encoder_2).denoiser(context, True, **added)
        ms = time_calls(lambda fn=fn: fn(x, t))  # bound now: `del fn` below frees the variant's engine and graph
        info[name] = {"ms": ms, "tflops": flops / ms / 1e9}
        del fn
        gc.collect()  # the engine and its denoiser refer to each other
    if s.diffusers is not None:
        x2 = torch.randn(cfg_batch, 4, size[0] // 8, size[1] // 8, device=DEVICE, dtype=DTYPE)
        ctx = context.to(DTYPE)
        # the SDXL pipeline's added conditioning, in the text encoders' dtype as it passes it
        added_cond = {name: t.to(DTYPE) for name, t in added.items()} if added else None
        compiled = s.compiled.unet if s.compiled_shape == (batch, size) else None
        for name, unet in (("diffusers_eager", s.diffusers.unet), ("diffusers_compile", compiled)):
            if unet is None:
                info[name] = "not compiled at this shape (its image case was skipped, or another shape compiled since)"
                continue
            # the pipeline's exact call (an int64 timestep, these keywords): anything else would fail the
            # compiled module's guards and recompile
            t_int = torch.tensor(601, device=DEVICE, dtype=torch.int64)
            with torch.no_grad():
                ms = time_calls(lambda: unet(x2, t_int, encoder_hidden_states=ctx, timestep_cond=None,
                                             cross_attention_kwargs=None, added_cond_kwargs=added_cond,
                                             return_dict=False)[0])
            info[name] = {"ms": ms, "tflops": flops / ms / 1e9}
    latents = torch.randn(batch, 4, size[0] // 8, size[1] // 8, device=DEVICE)
    with torch.no_grad():
        info["vae_decode_ms"] = {"fastdiff": time_calls(lambda: s.fastdiff.decode_latents(latents), 5)}
        if s.diffusers is not None:
            vae = s.diffusers.vae
            if is_sdxl(arch) and vae.dtype == torch.float16 and vae.config.force_upcast:
                vae = copy.deepcopy(vae).float()  # the SDXL pipeline decodes in float32
            info["vae_decode_ms"]["diffusers"] = time_calls(
                lambda: vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample, 5)
    return info


_KERNEL_CATEGORIES = (  # first match wins; lower-case substrings of kernel names
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("group_norm", ("group_norm",)),
    ("conv", ("conv", "fprop", "implicit", "dgrad", "wgrad", "nhwc", "winograd")),
    ("gemm", ("gemm", "nvjet", "cutlass", "cublas", "matmul", "sm90_xmma", "sm80_xmma",  # nvjet: cuBLASLt on Hopper
              "_linear_kernel")),  # fastdiff's linear with its epilogue
    ("layer_norm", ("layer_norm",)),
    ("copy_cat_layout", ("copy", "cat", "transpose", "permute", "contiguous", "nchwtonhwc", "nhwctonchw")),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    for category, needles in _KERNEL_CATEGORIES:
        if any(n in low for n in needles):
            return category
    return "elementwise_other"


def case_profile(benchmark, arch: str, system: str, batch: int, size: tuple[int, int]) -> dict:
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from fastdiff.engine import FastEngine

    s = systems_for(arch)
    fast = s.fastdiff.engine if isinstance(s.fastdiff.engine, FastEngine) else None
    unet = fast.unet if fast is not None else s.fastdiff.unet  # the fused modules, or the models as written
    fmt = torch.channels_last if fast is not None and fast.config.channels_last else torch.contiguous_format
    context, added = conditioning(s.fastdiff, batch, size)
    context = context.to(s.fastdiff.dtype)
    x = torch.randn(2 * batch, 4, size[0] // 8, size[1] // 8, device=DEVICE, dtype=s.fastdiff.dtype).contiguous(
        memory_format=fmt)
    t = torch.tensor(601.0, device=DEVICE)

    def step():
        with torch.no_grad():
            unet(x, t, context, **added)
        sync()

    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
    with profile(activities=activities) as prof:
        step()
    sort = "cuda_time_total" if ON_GPU else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    by_category: dict[str, float] = {}
    by_name: dict[str, list] = {}  # kernel name -> [launches, GPU ms]
    for e in kernels:
        by_category[kernel_category(e.name)] = by_category.get(kernel_category(e.name), 0.0) + e.device_time / 1e3
        entry = by_name.setdefault(e.name[:120], [0, 0.0])
        entry[0] += 1
        entry[1] += e.device_time / 1e3
    total = sum(by_category.values())
    graphed = fast is not None and fast.config.cuda_graphs and ON_GPU
    replay = replay_profile(s.fastdiff, batch, size) if graphed else None
    return {"table": table, "kernels": len(kernels), "gpu_ms_total": total,
            "gpu_ms_by_category": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
            "gpu_ms_by_kernel": dict(sorted(by_name.items(), key=lambda kv: -kv[1][1])[:60]),
            "replay": replay,
            "note": "one eager launch of the fused UNet (the kernels the CUDA graph replays), CFG batch "
                    f"{2 * batch}; GPU time summed over kernels; replay: one call of the fast path's denoiser"}


def replay_profile(pipe, batch: int, size: tuple[int, int]) -> dict:
    """The GPU timeline of one call of the fast path's captured UNet (the guided denoiser at `batch`): its nodes,
    the memset nodes among them (cuBLASLt's and cuDNN's workspace clears), the time the GPU is busy and idle
    between nodes, and how much of that idle time sits next to a memset (a memset node costs a few µs of idle
    time around it in a graph, a kernel-to-kernel edge about 0.5 µs)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    context, added = conditioning(pipe, batch, size)
    fn = pipe.engine.denoiser(context, True, **added)
    x = torch.randn(batch, 4, size[0] // 8, size[1] // 8, device=DEVICE)
    # a view of a 1-D float32 tensor, as a sampler's `model_timesteps[i]`: the fast path then reads the step's
    # time features from a precomputed row, as it does while sampling, instead of computing them per call
    t = torch.tensor([601.0], device=DEVICE)[0]
    for _ in range(2):
        fn(x, t)
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(x, t)
        sync()
    nodes = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    nodes = [e for e in nodes if not e.name.startswith("Memcpy")]  # the inputs' copies, issued before the replay
    memset = [e.name.startswith("Memset") for e in nodes]
    gaps = [max(0.0, b.time_range.start - a.time_range.end) / 1e3 for a, b in zip(nodes, nodes[1:])]
    return {"nodes": len(nodes), "memsets": sum(memset),
            "span_ms": (nodes[-1].time_range.end - nodes[0].time_range.start) / 1e3,
            "busy_ms": sum(e.time_range.end - e.time_range.start for e in nodes) / 1e3,
            "idle_ms": sum(gaps),
            "idle_next_to_memsets_ms": sum(g for i, g in enumerate(gaps) if memset[i] or memset[i + 1])}


def run_child(system: str, arch: str, batch: int, size: tuple[int, int], env: dict) -> dict:
    """Run this file as a fresh process that builds `system` and makes two images of `size`; its JSON report, plus
    the wall time the parent saw."""
    env = dict(env, FASTDIFF_E2E_SPAWNED_AT=repr(time.time()), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", system, arch, str(batch), "%dx%d" % size], env=env,
                          capture_output=True, text=True, timeout=400 * ARCHS[arch].get("cost", 1))
    wall = time.perf_counter() - t0
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": f"exit {done.returncode}: {(done.stderr or done.stdout)[-2000:]}", "wall_s": wall}
    return dict(json.loads(lines[-1]), wall_s=wall)


def case_cold_start(benchmark, arch: str, system: str, batch: int, size: tuple[int, int]) -> dict:
    caches = Path(tempfile.mkdtemp(prefix="fastdiff_caches_"))
    env = dict(os.environ, TRITON_CACHE_DIR=str(caches / "triton"), TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"))
    info = {}
    benchmark.pedantic(lambda: info.__setitem__("fastdiff_cold_cache", run_child("fastdiff", arch, batch, size,
                                                                                 env)), rounds=1, iterations=1)
    info["fastdiff_warm_cache"] = run_child("fastdiff", arch, batch, size, env)
    if _have_diffusers():
        info["diffusers_eager"] = run_child("diffusers_eager", arch, batch, size, env)
    info["note"] = ("seconds from spawning a fresh Python process to the first image (random weights built on the "
                    "device instead of read from disk); cold = empty TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR")
    return info


def case_memory(benchmark, arch: str, system: str, batch: int, size: tuple[int, int]) -> dict:
    info = {}
    env = dict(os.environ)
    benchmark.pedantic(lambda: info.__setitem__("fastdiff", run_child("fastdiff", arch, batch, size, env)),
                       rounds=1, iterations=1)
    if _have_diffusers():
        info["diffusers_eager"] = run_child("diffusers_eager", arch, batch, size, env)
    return info


def case_new_shape(benchmark, arch: str, system: str, batch: int, size: tuple[int, int]) -> dict:
    """A fresh fast-path Pipeline over the warm process's models (its own engine: no graph captured yet) makes a
    first image at (batch, size), then for each of NEW_SHAPES a first image and steady ones at that shape."""
    pipe = pipeline_like(systems_for(arch).fastdiff, default_fast())

    def seconds(noise) -> float:
        t0 = time.perf_counter()
        run_fastdiff(pipe, arch, noise)
        return time.perf_counter() - t0

    info = {}
    warm = noise_for(arch, batch, size)
    benchmark.pedantic(lambda: info.__setitem__("first_s", seconds(warm)), rounds=1, iterations=1)
    t0 = time.perf_counter()  # what the first image handed the compile workers for other sizes: done before the next
    info["background_done"] = settle()
    info["background_s"] = time.perf_counter() - t0
    info["shapes"] = {}
    for b, h, w in NEW_SHAPES:
        noise = noise_for(arch, b, (h, w))
        first = seconds(noise)
        steady = statistics.median([seconds(noise) for _ in range(1 if TINY else 3)])
        info["shapes"][f"b{b}-{h}x{w}"] = dict(first_s=first, steady_s=steady, overhead_s=first - steady)
    pipe = None
    gc.collect()  # the engine and its denoisers refer to each other
    info["note"] = (f"first_s: the fresh Pipeline's first image at b{batch} {size[0]}x{size[1]}; background_s: the "
                    f"wait, after it, for the compiles it handed the workers for other sizes; per new shape "
                    f"(batch-height x width) its first call's seconds, the median of later calls, and their difference")
    return info


KINDS = {"parity": case_parity, "image": case_image, "unet_step": case_unet_step, "profile": case_profile,
         "cold_start": case_cold_start, "memory": case_memory, "new_shape": case_new_shape}


@pytest.mark.parametrize("case", _cases(), ids=_case_id)
def test_end_to_end(benchmark, case):
    arch, kind, system, batch, size = case
    name = _case_id(case)
    if system.startswith("diffusers") and not _have_diffusers():
        pytest.skip("diffusers is not installed")
    cost = round(_cost_s(case))
    left = DEADLINE_S - (time.monotonic() - STARTED)
    if cost > left:
        record(name, {"skipped": f"~{cost} s needed, {left:.0f} s left before FASTDIFF_E2E_DEADLINE_S"})
        pytest.skip(f"{name}: about {cost} s needed, {left:.0f} s left before the deadline")
    benchmark.group = f"e2e {arch} {kind}"
    t0 = time.monotonic()
    info = KINDS[kind](benchmark, arch, system, batch, size)
    info["case_s"] = time.monotonic() - t0
    benchmark.extra_info.update(arch=arch, kind=kind, system=system, batch=batch, height=size[0], width=size[1],
                                **{k: v for k, v in info.items() if k != "table"})
    record(name, info)


# ---- script modes: a fresh-process child, and the summary table --------------------------------------------

def child_main(system: str, arch: str, batch: int, size: tuple[int, int]) -> None:
    """Build `system` from nothing, make two images of `size`, print one JSON line of timings and peak memory."""
    spawned = float(os.environ.get("FASTDIFF_E2E_SPAWNED_AT", time.time()))
    import fastdiff  # noqa: F401  (import time belongs to the cold start)

    imported = time.time() - spawned
    if system == "fastdiff":
        pipe, run = in_dtype(build_fastdiff(arch), DTYPE, default_fast()), run_fastdiff
    elif system == "diffusers_eager":
        pipe, run = build_diffusers(arch).to(DTYPE), run_diffusers
    else:
        raise ValueError(f"child system must be fastdiff or diffusers_eager, got {system!r}")
    built = time.time() - spawned
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    noise = noise_for(arch, batch, size)
    run(pipe, arch, noise)
    first = time.time() - spawned
    t0 = time.perf_counter()
    run(pipe, arch, noise)
    second_ms = (time.perf_counter() - t0) * 1e3
    mb = 2 ** 20
    report = dict(system=system, arch=arch, batch=batch, height=size[0], width=size[1], import_s=imported,
                  built_s=built, first_image_s=first, second_image_ms=second_ms,
                  max_allocated_mb=torch.cuda.max_memory_allocated() / mb if ON_GPU else None,
                  max_reserved_mb=torch.cuda.max_memory_reserved() / mb if ON_GPU else None)
    print(json.dumps(report))


def run_cases(cases: str) -> int:
    """`pytest benchmarks/bench_e2e.py --benchmark-only` with FASTDIFF_E2E_CASES=cases, in a child process (the
    cases are chosen when pytest imports this file), then the summary of the results file it wrote. Returns
    pytest's exit status."""
    JSON_PATH.unlink(missing_ok=True)  # no figure of an earlier run in the table
    env = dict(os.environ, FASTDIFF_E2E_CASES=cases, FASTDIFF_E2E_JSON=str(JSON_PATH))
    done = subprocess.run([sys.executable, "-m", "pytest", __file__, "--benchmark-only", "-q", "-s",
                           "-p", "no:cacheprovider"], env=env)
    if JSON_PATH.exists():
        print(summary(JSON_PATH))
    else:
        print(f"no results file at {JSON_PATH}: no case ran (FASTDIFF_E2E_CASES={cases!r})")
    return done.returncode


def _fmt(v, spec=".1f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else "-"


def _key_fields(key: str, settings: dict) -> tuple:
    """A results key -> (arch, kind, system, batch, "HxW"); keys of files from before sizes were named have none,
    and the settings' one size."""
    arch, kind, system, batch, *size = key.split("-")
    return arch, kind, system, int(batch[1:]), size[0] if size else f"{settings.get('size')}x{settings.get('size')}"


def summary(path: Path) -> str:
    """The human table of a results file: what RESULTS.md needs, one line per figure."""
    data = json.loads(path.read_text())
    cases, v, st = data["cases"], data["versions"] or {}, data["settings"] or {}
    fields = {k: _key_fields(k, st) for k in cases}
    by_fields = {f: cases[k] for k, f in fields.items()}
    lines = [f"{v.get('gpu')}, torch {v.get('torch')} (CUDA {v.get('cuda')}), triton {v.get('triton')}, "
             f"diffusers {v.get('diffusers')}; {st.get('steps')} steps DPM++ 2M, CFG {st.get('guidance')}, "
             f"{st.get('dtype')}, random weights; sizes height x width"]
    default = dict(sampler=st.get("scheduler"), steps=st.get("steps"), guidance=st.get("guidance"))
    for arch, sampling in (st.get("sampling") or {}).items():  # the architectures that sample otherwise
        if sampling != default and any(f[0] == arch for f in fields.values()):
            lines.append(f"{arch}: {sampling['steps']} steps {sampling['sampler']}, CFG {sampling['guidance']}")
    ratios = []
    for arch in ARCHS:
        of = {kind: [k for k, f in fields.items() if f[:2] == (arch, kind)] for kind in KINDS}
        rows = {(fields[k][3], fields[k][4]) for k in of["image"]}
        for batch, size in sorted(rows, key=lambda r: (r[0], math.prod(parse_size(r[1])), r[1])):
            row = {sys_: by_fields.get((arch, "image", sys_, batch, size), {}) for sys_ in SYSTEMS}
            ours, base = row["fastdiff"].get("ms"), row["diffusers_compile"].get("ms")
            speed = f"{base / ours:.3f}x vs diffusers+compile" if ours and base else "no ratio"
            if ours and base:
                ratios.append(f"  {arch} {size} b{batch}: {ours:.1f} vs {base:.1f} ms = {base / ours:.3f}x")
            lines.append(f"{arch} {size} b{batch} ms/image: " + ", ".join(
                f"{k} {_fmt(r.get('ms'))} ({_fmt(r.get('images_per_s'), '.2f')} img/s, "
                f"first {_fmt(r.get('first_call_s'))} s)"
                if "ms" in r else f"{k} {r.get('skipped', 'not run')}" for k, r in row.items()) + f"; {speed}")
        for key in of["parity"]:
            p = cases[key]
            if "fastdiff_fast_vs_fastdiff_ref32" in p:
                lines.append(f"{arch} {fields[key][4]} b{fields[key][3]} parity: fastdiff fast vs ref32 "
                             f"{p['fastdiff_fast_vs_fastdiff_ref32']:.2e}, diffusers fp16 vs fp32 "
                             f"{_fmt(p.get('diffusers_fp16_vs_fp32'), '.2e')}, ratio {_fmt(p.get('ratio'), '.2f')} "
                             f"(fastdiff's error over diffusers'), fastdiff ref32 vs diffusers fp32 "
                             f"{_fmt(p.get('fastdiff_ref32_vs_diffusers_fp32'), '.2e')}")
        for key in of["unet_step"]:
            u = cases[key]
            if "flops" in u:
                parts = [f"{k} {r['ms']:.2f} ms = {r['tflops']:.3g} TFLOP/s" for k, r in u.items()
                         if isinstance(r, dict) and "tflops" in r]
                lines.append(f"{arch} {fields[key][4]} UNet step (CFG batch {u['cfg_batch']}, "
                             f"{u['flops'] / 1e9:.4g} GFLOP): " + "; ".join(parts))
                lines.append(f"{arch} {fields[key][4]} VAE decode ms: {u.get('vae_decode_ms')}")
        for key in of["new_shape"]:
            r = cases[key]
            if "shapes" in r:
                lines.append(f"{key}: a fresh Pipeline's first image {_fmt(r['first_s'], '.2f')} s, its background "
                             f"compiles {_fmt(r.get('background_s'), '.2f')} s after it; new shape overhead "
                             "(first - steady s): " + ", ".join(
                                 f"{shape} {_fmt(x['overhead_s'], '.2f')} ({_fmt(x['first_s'], '.2f')} - "
                                 f"{_fmt(x['steady_s'], '.2f')})" for shape, x in r["shapes"].items()))
        for key in of["profile"]:
            pr = cases[key]
            if "gpu_ms_by_category" in pr:
                lines.append(f"{key}, GPU ms per category of one UNet step ({pr['kernels']} kernels, "
                             f"{pr['gpu_ms_total']:.2f} ms): " + ", ".join(
                                 f"{k} {ms:.2f}" for k, ms in pr["gpu_ms_by_category"].items()))
            r = pr.get("replay")
            if r:
                lines.append(f"{key} graph replay: {r['nodes']} nodes ({r['memsets']} memsets), span "
                             f"{r['span_ms']:.3f} ms = busy {r['busy_ms']:.3f} + idle {r['idle_ms']:.3f} "
                             f"(next to memsets {r['idle_next_to_memsets_ms']:.3f})")
        for kind in ("cold_start", "memory"):
            for key in of[kind]:
                for who, r in cases[key].items():
                    if isinstance(r, dict):
                        lines.append(f"{key} {who}: " + (r["error"][-300:] if "error" in r else
                                     f"first image {_fmt(r.get('first_image_s'))} s (wall {_fmt(r.get('wall_s'))} s), "
                                     f"second {_fmt(r.get('second_image_ms'))} ms, peak allocated "
                                     f"{_fmt(r.get('max_allocated_mb'), '.0f')} MB, reserved "
                                     f"{_fmt(r.get('max_reserved_mb'), '.0f')} MB"))
    if ratios:
        lines += ["fastdiff vs diffusers+compile, ms per call of batch images:"] + ratios
    skipped = [k for k, r in cases.items() if "skipped" in r]
    if skipped:
        lines.append("skipped (deadline): " + ", ".join(skipped))
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=4, metavar=("SYSTEM", "ARCH", "BATCH", "HxW"))
    parser.add_argument("--summary", type=Path, metavar="RESULTS_JSON")
    parser.add_argument("--run", nargs="?", const=HEADLINE_CASES, metavar="CASES",
                        help=f"run CASES (FASTDIFF_E2E_CASES's syntax, or a preset: {', '.join(PRESETS)}; default "
                             f"{HEADLINE_CASES}) in one pytest process, then print the table")
    args = parser.parse_args()
    if args.child:
        child_main(args.child[0], args.child[1], int(args.child[2]), parse_size(args.child[3]))
    elif args.summary:
        print(summary(args.summary))
    elif args.run:
        sys.exit(run_cases(args.run))
    else:
        parser.error("pass --run [CASES], --child SYSTEM ARCH BATCH HxW or --summary FILE")
