"""Where an accelerated diffusers pipeline spends the time fastdiff's own Pipeline does not: a profile to read.

    cd benchmarks && python profile_accelerate.py

On one CUDA GPU, SD1.5's architecture with random weights, float16, 512x512, batch 1, 25 steps of DPM++ 2M, CFG 7.5,
in one process: fastdiff's Pipeline and the same weights in diffusers' StableDiffusionPipeline after
`accelerate(pipe)`, each as whole images and without the decode ("latent"); the accelerated pipeline with its
prompt embeddings given (no text encoding); diffusers' encode_prompt alone; the engine's 25 UNet calls at CFG
batch 2: one latent shared by both halves, the latent repeated ([x; x]) and run whole, [x; x] and [x; y] with
cfg="if_repeated" (the accelerated UNet's: a graph whose conditional nodes run equal halves once). Then one image
of each under torch.profiler: wall time against the GPU's busy time (the rest is the GPU waiting on the host),
kernel counts, and the ops by host time and by GPU time.
"""
from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

import fastdiff.integrations.diffusers as integration
from fastdiff.engine import IF_REPEATED
from bench_e2e import (DTYPE, PROMPT, build_diffusers, build_fastdiff, in_dtype, noise_for, run_diffusers,
                       run_fastdiff, sync, time_calls)

ARCH = "sd15"


def report(name: str, fn) -> None:
    print(f"{name:34s} {time_calls(fn, 10):8.1f} ms", flush=True)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/profile_accelerate.py profiles a GPU and torch sees none")
    noise = noise_for(ARCH, 1, (512, 512))
    pipe = build_diffusers(ARCH).to(DTYPE)
    ours = in_dtype(build_fastdiff(ARCH, pipe), DTYPE, None)
    report("fastdiff Pipeline", lambda: run_fastdiff(ours, ARCH, noise))
    report("fastdiff Pipeline, latent", lambda: run_fastdiff(ours, ARCH, noise, "latent"))
    integration.accelerate(pipe)
    report("accelerated diffusers", lambda: run_diffusers(pipe, ARCH, noise))
    report("accelerated diffusers, latent", lambda: run_diffusers(pipe, ARCH, noise, "latent"))
    cond, uncond = pipe.encode_prompt(PROMPT, "cuda", 1, True, "")

    def from_embeddings():
        pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=25, guidance_scale=7.5,
             latents=noise.to("cuda", DTYPE), output_type="latent")
        sync()

    report("accelerated, latent, embeddings given", from_embeddings)
    report("diffusers encode_prompt", lambda: (pipe.encode_prompt(PROMPT, "cuda", 1, True, ""), sync()))
    engine = getattr(pipe, "_fastdiff_acceleration").engine
    timesteps = torch.linspace(999, 0, 25, device="cuda")
    x, repeated = noise.cuda(), torch.cat([noise, noise]).cuda()
    for label, cfg, x in (("one latent, shared", False, x), ("[x; x] run whole", False, repeated),
                          ("[x; x], if_repeated", IF_REPEATED, repeated),
                          ("[x; y], if_repeated", IF_REPEATED, torch.cat([x, x + 1]))):
        model_fn = engine.denoiser(torch.cat([uncond, cond]), cfg=cfg)

        def steps(model_fn=model_fn, x=x):
            for i in range(25):
                model_fn(x, timesteps[i])
            sync()

        report(f"engine: 25 UNet calls, {label}", steps)
    for name, fn in (("accelerated", lambda: run_diffusers(pipe, ARCH, noise)),
                     ("fastdiff", lambda: run_fastdiff(ours, ARCH, noise))):
        fn()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            began = time.perf_counter()
            fn()
            wall = (time.perf_counter() - began) * 1e3
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        print(f"== {name}: wall {wall:.1f} ms under the profiler, {len(kernels)} kernels and copies, GPU busy "
              f"{sum(e.device_time for e in kernels) / 1e3:.1f} ms")
        table = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
        print(table.table(sort_by="device_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
