"""Whole images with this GPU's tuning table against the built-in rules, alternating in one process.

    python benchmarks/bench_tuning.py [--arch sd15] [--size 512x512] [--rounds 3]

Two fastdiff Pipelines over the same float16 models (random weights), each with its own engine and CUDA graphs:
one captured while `fastdiff.tuning` reads the committed table for this GPU (fastdiff/assets/tuning), one while
it finds none (the built-in rules of `fastdiff.ops`). Each round times both, batch 1, 25 steps of DPM++ 2M,
CFG 7.5 (bench_e2e.time_calls: mean ms of 20 images after warm-up). Needs a CUDA GPU with a table.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_e2e import (DTYPE, build_diffusers, build_fastdiff, in_dtype, noise_for, parse_size,  # noqa: E402
                       pipeline_like, run_fastdiff, time_calls)

from fastdiff import tuning  # noqa: E402


def use_tables(tables: Path) -> None:
    tuning.TABLES = tables
    for cached in (tuning.read_tables, tuning.device_table, tuning._attention_choice):
        cached.cache_clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--size", type=parse_size, default=(512, 512), help="HxW")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/bench_tuning.py times a GPU and torch sees none")
    print(f"{args.arch} {args.size[0]}x{args.size[1]}, {torch.cuda.get_device_name()}: {tuning.describe(0)}")
    if tuning.device_table(0) is None:
        raise SystemExit("no tuning table for this GPU: run benchmarks/tune.py first")
    noise = noise_for(args.arch, 1, args.size)
    models = in_dtype(build_fastdiff(args.arch, build_diffusers(args.arch)), DTYPE, None)
    committed = tuning.TABLES
    pipes = {}
    for name, tables in (("table", committed), ("built-in rules", Path(os.devnull))):
        use_tables(tables)  # the choices are made as the first image captures its graphs
        pipes[name] = pipeline_like(models, None)
        run_fastdiff(pipes[name], args.arch, noise)
    use_tables(committed)
    for r in range(args.rounds):
        print(f"round {r}: " + ", ".join(f"{name} {time_calls(lambda p=p: run_fastdiff(p, args.arch, noise)):.2f} ms"
                                         for name, p in pipes.items()), flush=True)


if __name__ == "__main__":
    main()
