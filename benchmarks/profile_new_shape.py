"""Where the first image of a shape spends its seconds, on a GPU: a profile to read, not a benchmark to quote.

    python benchmarks/profile_new_shape.py [--arch sd15] [--top 40] [--warmup N]

In one fresh process (start it with empty TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR to see a cold start):
1. the first SD image (25 steps, random weights, float16, the default fast path) under cProfile,
2. then, after the compiles it handed the background workers are done, in the same warm process, the first image at each of NEW_SHAPES under cProfile, with its steady time,
3. then the first and second call of torch SDPA, fastdiff's attention kernel and a cuDNN convolution at sizes not
   seen before (what a new shape pays per op for plans and compiles, outside the pipeline).
Each profile lists the functions by cumulative and by own time; the SUMMARY lines sum it up. --warmup: the eager
calls before each CUDA-graph capture (`FastConfig.warmup`; the Pipeline's default when not given).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from bench_e2e import DTYPE, build_fastdiff, default_fast, in_dtype, noise_for, run_fastdiff, settle  # noqa: E402

from fastdiff.engine import FastConfig  # noqa: E402

NEW_SHAPES = [(1, 512, 768), (3, 512, 512), (1, 768, 768)]  # (batch, height, width)


def profiled(label: str, fn, top: int) -> float:
    """Run fn under cProfile, print its top functions; the wall seconds."""
    profile = cProfile.Profile()
    began = time.perf_counter()
    profile.enable()
    fn()
    profile.disable()
    seconds = time.perf_counter() - began
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top // 2)
    print(f"==== {label}: {seconds:.2f} s\n{text.getvalue()}", flush=True)
    return seconds


def first_and_second_ms(fn) -> tuple[float, float]:
    times = []
    for _ in range(2):
        torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - began) * 1e3)
    return times[0], times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--warmup", type=int, help="FastConfig.warmup (default: the Pipeline's)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/profile_new_shape.py profiles the CUDA fast path and torch sees no GPU")
    started = time.perf_counter()
    fast = default_fast() if args.warmup is None else FastConfig(warmup=args.warmup)
    pipe = in_dtype(build_fastdiff(args.arch, fast=False), DTYPE, fast)
    print(f"SUMMARY warmup {(fast or FastConfig()).warmup}", flush=True)
    print(f"SUMMARY models built in {time.perf_counter() - started:.1f} s", flush=True)
    noise = noise_for(args.arch, 1, (512, 512))
    first = profiled("first image, 512x512 batch 1", lambda: run_fastdiff(pipe, args.arch, noise), args.top)
    steady = first_and_second_ms(lambda: run_fastdiff(pipe, args.arch, noise))[1] / 1e3
    print(f"SUMMARY first image {first:.2f} s, steady {steady:.3f} s", flush=True)
    began = time.perf_counter()
    done = settle()  # the other sizes' variants the first image handed the compile workers
    print(f"SUMMARY background compiles {'done' if done else 'NOT done'} after {time.perf_counter() - began:.1f} s",
          flush=True)
    for batch, height, width in NEW_SHAPES:
        noise = noise_for(args.arch, batch, (height, width))
        first = profiled(f"new shape, batch {batch} {height}x{width}",
                         lambda: run_fastdiff(pipe, args.arch, noise), args.top)
        steady = first_and_second_ms(lambda: run_fastdiff(pipe, args.arch, noise))[1] / 1e3
        print(f"SUMMARY new shape batch {batch} {height}x{width}: first {first:.2f} s, steady {steady:.3f} s, "
              f"beyond the image {first - steady:.2f} s", flush=True)

    from fastdiff.kernels import attention

    for tokens in (3000, 5000, 7000):
        qkv = torch.randn(2, tokens, 3, 8, 40, device="cuda", dtype=torch.float16)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        for name, fn in (("torch SDPA", F.scaled_dot_product_attention), ("fastdiff attention", attention)):
            a, b = first_and_second_ms(lambda: fn(q, k, v))
            print(f"SUMMARY {name} at {tokens} new tokens, head dim 40: first {a:.1f} ms, second {b:.2f} ms")
    weight = torch.randn(320, 320, 3, 3, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
    for height, width in ((50, 70), (30, 90)):
        x = torch.randn(2, 320, height, width, device="cuda", dtype=torch.float16).to(memory_format=torch.channels_last)
        a, b = first_and_second_ms(lambda: F.conv2d(x, weight, padding=1))
        print(f"SUMMARY cuDNN conv 3x3 320 channels at a new {height}x{width}: first {a:.1f} ms, second {b:.2f} ms")


if __name__ == "__main__":
    main()
