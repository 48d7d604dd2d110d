"""A diffusers StableDiffusionPipeline accelerated onto fastdiff's engine, against the same pipeline under diffusers'
own compile recipe, side by side in one process.

    cd benchmarks && python bench_accelerate.py [--arch sd15] [--batch 1] [--size 512x512]

Systems, all float16 on CUDA, DPM++ 2M, 25 steps, guidance 7.5, the same initial latents:
  diffusers_eager       the pipeline as it comes (the baseline for the memory column)
  diffusers_compile     bench_e2e's recipe: fuse_qkv_projections, channels_last UNet and VAE, the UNet under
                        torch.compile(mode="reduce-overhead", fullgraph=True), on copies of the UNet and VAE
  diffusers_accelerate  the eager pipeline after `fastdiff.integrations.diffusers.accelerate(pipe)`: still called
                        as `pipe(...)`, its UNet, VAE decoder and text encoder on FastEngine (CUDA graphs)
The accelerated pipeline is timed twice: before the compiled pipeline is made (then deaccelerated: the compile
recipe copies the pipeline's modules) and after it, in the order bench_e2e times fastdiff and diffusers and in the
other. Each line gives the mean ms per image (bench_e2e.time_calls), the peak memory allocated during a call above
what was allocated before it, and the difference to the eager image. The last line: compile ms / accelerate ms.

CPU: bench_e2e's tiny random models and 2 steps, compile with the "eager" backend, one call each: checks that the
benchmark runs end to end, not how fast anything is.
"""
from __future__ import annotations

import argparse
import time

import torch

from bench_e2e import (DTYPE, ON_GPU, STEPS, Systems, build_diffusers, default_size, noise_for, parse_size, rel,
                       run_diffusers, settle, sync, time_calls)
from fastdiff.integrations.diffusers import accelerate, deaccelerate


class DiffusersSystems(Systems):
    """bench_e2e's Systems with only diffusers' float16 pipeline (no fastdiff Pipeline, no float32 parity run):
    `diffusers` is the eager pipeline, `compiled_diffusers` makes the compile recipe's copy of it."""

    def __init__(self, arch: str):
        self.arch = arch
        self.diffusers = build_diffusers(arch).to(DTYPE)
        self.compiled = None
        self.compiled_shape = None


def measure(name: str, pipe, arch: str, noise: torch.Tensor, reference: torch.Tensor | None) -> dict:
    """One image (which also compiles / captures what its first call needs), then the timed calls: ms per image,
    peak MiB allocated above the resident memory during one call, relative difference to `reference`."""
    image = run_diffusers(pipe, arch, noise)
    peak_mib = None
    if ON_GPU:
        sync()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        image = run_diffusers(pipe, arch, noise)
        peak_mib = (torch.cuda.max_memory_allocated() - resident) / 2 ** 20
    t0 = time.perf_counter()
    settle()  # time_calls would wait for the background compiles too: here the wait is reported
    waited = time.perf_counter() - t0
    ms = time_calls(lambda: run_diffusers(pipe, arch, noise), calls=5)
    diff = None if reference is None else rel(image, reference)
    print(f"{name:26s} {ms:10.1f} ms/image   peak over resident "
          f"{'n/a' if peak_mib is None else f'{peak_mib:8.1f} MiB'}   rel. diff to eager "
          f"{'-' if diff is None else f'{diff:.2e}'}   background compiles waited for {waited:.1f} s", flush=True)
    return {"ms": ms, "peak_mib": peak_mib, "image": image}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=parse_size, default=None, help="HxW (default: the architecture's own)")
    args = parser.parse_args()
    size = args.size or default_size(args.arch)
    noise = noise_for(args.arch, args.batch, size)
    print(f"{args.arch} {size[0]}x{size[1]} batch {args.batch}, {STEPS} steps DPM++ 2M, {DTYPE}, "
          f"{torch.cuda.get_device_name() if ON_GPU else 'CPU (tiny models)'}", flush=True)

    systems = DiffusersSystems(args.arch)
    eager = measure("diffusers_eager", systems.diffusers, args.arch, noise, None)
    # accelerated before the compiled pipeline exists in the process, and again after it
    before = measure("diffusers_accelerate_first", accelerate(systems.diffusers), args.arch, noise, eager["image"])
    deaccelerate(systems.diffusers)  # the compile recipe copies the pipeline's own modules
    compiled = measure("diffusers_compile", systems.compiled_diffusers(args.batch, size), args.arch, noise,
                       eager["image"])
    accelerated = measure("diffusers_accelerate", accelerate(systems.diffusers), args.arch, noise, eager["image"])
    print(f"diffusers_compile / diffusers_accelerate: {compiled['ms'] / accelerated['ms']:.2f}x "
          f"({compiled['ms'] / before['ms']:.2f}x with the accelerated image timed first)", flush=True)
    if ON_GPU:
        print(f"peak memory over resident vs eager: compile {compiled['peak_mib'] / eager['peak_mib']:.2f}x, "
              f"accelerate {accelerated['peak_mib'] / eager['peak_mib']:.2f}x")


if __name__ == "__main__":
    main()
