"""CUDA-graph helpers for the GPU tests: `capture`, for the tests that check an op replays correctly, and
`fast_engine`, for the tests of the fast path's graph-replayed model calls; counters of compiled Triton kernels
and captured graphs."""
import contextlib
from pathlib import Path
from typing import Iterator

import torch


def capture(fn, warm: bool = True):
    """Capture fn() into a new CUDA graph; return (graph, what fn returned during the capture), the static
    outputs a replay rewrites. warm: call fn once first, on a side stream as capture requires, so that compiles,
    autotuning and lazy initialisation happen outside the capture (False when the caller has just called it)."""
    if warm:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def fast_engine(unet=None, *, vae=None, text_encoder=None, config=None):
    """A `fastdiff.engine.FastEngine` over the given fastdiff models (on the GPU; the engine converts them in place),
    for the tests of one of its parts: the UNet's calls (`denoiser`, `eager_call`, their graphs) or the text
    encoder's (`encode_text`). The engine takes all three models: tiny random stand-ins, in the given ones' dtype
    and device, for those not given, which such a test never calls."""
    from fastdiff.engine import FastEngine
    from fastdiff.models import (AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, UNetConfig,
                                 VAEConfig)

    given = next(m for m in (unet, vae, text_encoder) if m is not None)
    weight = next(given.parameters())
    with torch.device(weight.device):
        if unet is None:
            unet = UNet2DConditionModel(UNetConfig(
                block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))).to(weight.dtype).eval().requires_grad_(False)
        if vae is None:
            vae = AutoencoderKL(VAEConfig(block_out_channels=(32,), norm_num_groups=8)).to(weight.dtype).eval()
        if text_encoder is None:
            text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=1, num_attention_heads=2))
            text_encoder = text_encoder.to(weight.dtype).eval()
    return FastEngine(unet, vae.requires_grad_(False), text_encoder.requires_grad_(False), config)


# The kernel modules whose compiles the first-image test counts (the ones a tiny SD1 image launches).
KERNEL_MODULES = ["attention", "geglu", "group_norm", "layer_norm", "linear", "residual_add", "scheduler_step"]


def all_kernel_modules() -> list[str]:
    """Every kernel module of fastdiff.kernels (the op files, not the shared `_triton`)."""
    import fastdiff.kernels

    return sorted(p.stem for folder in fastdiff.kernels.__path__ for p in Path(folder).glob("[!_]*.py"))


def kernel_jits(modules: list[str] = KERNEL_MODULES) -> list:
    """The @triton.jit functions under the kernels of `modules` (the module globals named *_kernel)."""
    import importlib

    from fastdiff.kernels import _triton

    kernels = [value for name in modules
               for key, value in vars(importlib.import_module(f"fastdiff.kernels.{name}")).items()
               if key.endswith("_kernel")]
    return [_triton.jit_function(kernel) for kernel in kernels]


def compiled_kernel_variants(modules: list[str] = KERNEL_MODULES) -> int:
    """Triton kernel variants compiled in this process for the kernels of `modules`."""
    device = torch.cuda.current_device()
    return sum(len(jit.device_caches[device][0]) for jit in kernel_jits(modules) if device in jit.device_caches)


@contextlib.contextmanager
def counting_graph_captures() -> Iterator[list[int]]:
    """A list holding the number of CUDA graphs captured (anywhere) while the block runs."""
    counts = [0]
    real = torch.cuda.CUDAGraph.capture_begin

    def capture_begin(self, *args, **kwargs):
        counts[0] += 1
        return real(self, *args, **kwargs)

    torch.cuda.CUDAGraph.capture_begin = capture_begin
    try:
        yield counts
    finally:
        torch.cuda.CUDAGraph.capture_begin = real
