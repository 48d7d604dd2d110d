"""A/B the kernels' tuning knobs on a GPU in one process (the knobs are module constants):

    python benchmarks/tune_kernels.py

Prints ms per call (CUDA graph, rotating inputs, as in the benchmarks) for each setting, and the copy
ceilings by method. Not part of the test or benchmark suites; used to choose the constants' values.
"""
import importlib
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import copy_ms, input_sets  # noqa: E402
from timing import graph_ms  # noqa: E402

attention_module = importlib.import_module("fastdiff.kernels.attention")
gn_module = importlib.import_module("fastdiff.kernels.group_norm")


def timed(fn, sets):
    return graph_ms([(lambda s=sets[i % len(sets)]: fn(*s)) for i in range(max(20, len(sets)))])[0]


def main():
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for nbytes in (2**31, 21 * 2**20, 134 * 2**20):
        ms = copy_ms(nbytes, input_sets(nbytes // 2), 20)
        rates = ", ".join(f"{k} {nbytes / v / 1e6:5.0f} GB/s" for k, v in ms.items())
        print(f"copy {nbytes / 2**20:7.0f} MiB: {rates}")
    for shape, layout in itertools.product([(2, 320, 64, 64), (2, 1280, 16, 16), (1, 128, 512, 512)],
                                           ["contiguous", "channels_last"]):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        nbytes = 2 * torch.Size(shape).numel() * 2
        sets = [(torch.randn(shape, device="cuda", dtype=torch.float16).to(memory_format=fmt), 32,
                 torch.randn(shape[1], device="cuda", dtype=torch.float16),
                 torch.randn(shape[1], device="cuda", dtype=torch.float16), 1e-5, "silu")
                for _ in range(input_sets(nbytes // 2))]
        row = []
        for stages, per_sm in itertools.product((1, 3), (2, 4, 8)):
            gn_module.STAGES, gn_module.PROGRAMS_PER_SM = stages, per_sm
            ms = timed(gn_module.group_norm, sets)
            row.append(f"s{stages}/p{per_sm} {ms * 1e3:6.1f}us {nbytes / ms / 1e6:5.0f}GB/s")
        print(f"group_norm {'x'.join(map(str, shape)):14} {layout:13} " + " | ".join(row))
    gn_module.STAGES, gn_module.PROGRAMS_PER_SM = 3, 4
    for b, h, sq, skv, d in [(2, 8, 4096, 77, 40), (2, 8, 1024, 77, 80), (2, 10, 4096, 77, 64)]:
        nbytes = 2 * b * h * (sq + skv) * d * 2
        sets = [tuple(torch.randn(b, h, s, d, device="cuda", dtype=torch.float16) for s in (sq, skv, skv))
                for _ in range(input_sets(nbytes))]
        row = []
        for per_sm in (1, 2, 4, 8, 16):
            attention_module.ONCHIP_PROGRAMS_PER_SM = per_sm
            ms = timed(attention_module.attention, sets)
            row.append(f"p{per_sm} {ms * 1e3:5.1f}us {nbytes / ms / 1e6:5.0f}GB/s")
        print(f"attention {sq}x{skv} D{d}: " + " | ".join(row))


if __name__ == "__main__":
    main()
