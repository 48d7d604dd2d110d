"""Which Triton kernels the first SD1.5 image compiles, and how long compiling them takes, measured on the CPU.

    python benchmarks/cold_start_compiles.py

A fast-path image with an empty kernel cache spends much of its cold start compiling Triton kernels
(benchmarks/RESULTS.md, "cold start"). Compiling is CPU work, and Triton compiles for a GPU it does not see, so
this script measures that cost here, for the attention and GroupNorm kernels only: the first image also compiles
LayerNorm, GEGLU, residual_add and (without the extension) scheduler-step variants, which it does not count
(39 variants in all, counted from an H200's kernel cache with an earlier version of the fast path; this script
counts 20 on the engine's fused modules):
1. It runs the SD1.5 UNet (CFG batch 2, 64x64 latents) and the VAE decoder on the meta device, as the fast
   path's fused modules (`fastdiff.engine.FastUNet`, `fast_vae`), and records every call of the Triton-backed ops
   (their shapes, layouts and dtypes). The ops return empty tensors, so no real work is done; the producers
   that sum for a GroupNorm (`ops.residual_add_sums`, `ops.channel_cat_sums`) hand it their sums where the
   Triton path on a GPU would (channels_last maps where summing pays), so that the norm records the variant
   the GPU launches.
2. It replays each call through the kernel's own launch function with the kernels replaced by recorders.
   That gives each compiled variant: the constexprs (the attention config its caller names, or the default), and
   the integer arguments Triton specialises on (== 1, divisible by 16).
3. It compiles every distinct variant for sm_90 with a fresh cache and prints the count and the seconds per
   kernel.
"""
import importlib
import tempfile
import time

import torch

from fastdiff import ops
from fastdiff.engine import FastConfig, FastUNet, fast_vae
from fastdiff.models import UNet2DConditionModel, UNetConfig
from fastdiff.models.vae import AutoencoderKL, VAEConfig

import triton  # noqa: E402  (after fastdiff: the kernels are defined on import)
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

attention_module = importlib.import_module("fastdiff.kernels.attention")
group_norm_module = importlib.import_module("fastdiff.kernels.group_norm")
triton_module = importlib.import_module("fastdiff.kernels._triton")
jit_function = triton_module.jit_function
TARGET = GPUTarget("cuda", 90, 32)
SM_COUNT = 132  # an H200's: the launch functions size their grids with it
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
GROUP_NORM_KERNELS = ("_group_norm_stats_kernel", "_group_norm_apply_kernel", "_group_norm_single_kernel",
                      "_group_norm_single_cl_kernel")


def heuristics_of(kernel) -> dict:
    """The @triton.heuristics rules wrapped around a kernel (name -> function of the arguments)."""
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        if isinstance(kernel, triton.runtime.autotuner.Heuristics):
            return kernel.values
        kernel = kernel.fn
    return {}


def record_op_calls() -> dict[str, list]:
    """The arguments of every attention / group_norm call of one SD1.5 UNet step and one VAE decode."""
    calls = {"attention": [], "group_norm": []}

    def attention(q, k, v, scale=None):
        calls["attention"].append((q, k, scale))
        return torch.empty_like(q)

    def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, activation=None, offset=None, sums=None):
        calls["group_norm"].append((x, num_groups, weight, bias, eps, activation, offset, sums))
        return torch.empty_like(x)

    # Under `auto` on a GPU a producer sums only where the Triton path takes its inputs and summing pays; the meta
    # device resolves to the reference path, which always would: decide as the GPU does.
    def residual_add_sums(x, y, bias=None, x_bias=None, num_groups=32):
        if ops._triton_sums_pay(y, x, y):
            return saved_sums[0](x, y, bias, x_bias, num_groups)
        return ops.residual_add(x, y, bias, x_bias=x_bias), None

    def channel_cat_sums(x, skip, num_groups=32):
        if ops._triton_sums_pay(x, x, skip):
            return saved_sums[1](x, skip, num_groups)
        return ops.channel_cat(x, skip), None

    # Patched before the fused modules are built: each attention module takes its function then
    # (`ops.attention_impl`), and "fastdiff" (and "auto" at head dim 40) is `ops.attention`.
    saved = ops.attention, ops.group_norm
    saved_sums = ops.residual_add_sums, ops.channel_cat_sums
    ops.attention, ops.group_norm = attention, group_norm
    ops.residual_add_sums, ops.channel_cat_sums = residual_add_sums, channel_cat_sums
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel(UNetConfig(sample_size=64, cross_attention_dim=768, attention_head_dim=8))
            vae = AutoencoderKL(VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                          latent_channels=4, sample_size=512))
        config = FastConfig()
        fast_unet = FastUNet(unet.half(), config)
        fast_decoder = fast_vae(vae.half(), config)
        latents = torch.empty(2, 4, 64, 64, device="meta", dtype=torch.float16).to(memory_format=torch.channels_last)
        context = torch.empty(2, 77, 768, device="meta", dtype=torch.float16)
        with torch.no_grad():
            fast_unet(latents, torch.tensor(500.0, device="meta"), context)
            fast_decoder.decode(latents[:1])
    finally:
        ops.attention, ops.group_norm = saved
        ops.residual_add_sums, ops.channel_cat_sums = saved_sums
    return calls


def argument_type(value, specialize: bool = True) -> tuple:
    """How Triton's launcher types (and specialises, unless the kernel lists it in do_not_specialize) one
    argument."""
    if isinstance(value, torch.Tensor):
        return ("*" + TRITON_TYPES[value.dtype],)
    if isinstance(value, bool):
        return ("i1",)
    if isinstance(value, int) and not specialize:
        return ("i32",)
    if isinstance(value, int):
        return ("constexpr", 1) if value == 1 else ("i32", value % 16 == 0)
    if isinstance(value, float):
        return ("fp32",)
    if value is None:
        return ("constexpr", None)
    raise TypeError(f"unexpected kernel argument {value!r}")


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **meta)` records the variants that call would compile."""

    def __init__(self, kernel, variants: set):
        self.fn, self.variants, self.heuristics = jit_function(kernel), variants, heuristics_of(kernel)
        self.unspecialized = {p.name for p in self.fn.params if p.do_not_specialize}

    def __getitem__(self, grid):
        def launch(*args, **meta):
            names = [n for n in self.fn.arg_names if n not in meta]
            named = dict(zip(names, args), **meta)
            types = tuple((n, argument_type(a, n not in self.unspecialized)) for n, a in zip(names, args))
            options = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
            constants = dict(meta)
            for name, rule in self.heuristics.items():
                constants[name] = rule({**named, **constants})
            self.variants.add((self.fn.__name__, types, tuple(sorted(constants.items())),
                               tuple(sorted(options.items()))))
        return launch


def kernel_variants(calls: dict[str, list]) -> set:
    """Replay the recorded calls through the launch functions with recorder kernels."""
    variants: set = set()
    attention = Recorder(attention_module._attention_kernel, variants)
    group_norm = group_norm_module._Kernels(*(Recorder(getattr(group_norm_module, name), variants)
                                              for name in GROUP_NORM_KERNELS))
    saved_sm_count, triton_module._sm_count = triton_module._sm_count, lambda device: SM_COUNT
    try:
        for q, k, scale in calls["attention"]:
            if ops._triton_attention_fits(q):
                attention_module._attention_run(attention, q, k, k, scale, None)
        for args in calls["group_norm"]:
            group_norm_module._group_norm_run(group_norm, *args)
    finally:
        triton_module._sm_count = saved_sm_count
    return variants


def compile_seconds(variants: set) -> dict[str, tuple[int, float]]:
    """Compile every variant for sm_90 into an empty cache: kernel name -> (variants, seconds)."""
    kernels = {jit_function(k).__name__: jit_function(k) for k in (
        attention_module._attention_kernel, *(getattr(group_norm_module, name) for name in GROUP_NORM_KERNELS))}
    totals: dict[str, tuple[int, float]] = {}
    for name, types, constants, options in sorted(variants, key=str):
        fn = kernels[name]
        signature = {n: t[0] for n, t in types} | {n: "constexpr" for n, _ in constants}
        constexprs = {(fn.arg_names.index(n),): t[1] for n, t in types if t[0] == "constexpr"}
        constexprs |= {(fn.arg_names.index(n),): v for n, v in constants}
        began = time.perf_counter()
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET,
                       options=dict(options))
        count, seconds = totals.get(name, (0, 0.0))
        totals[name] = (count + 1, seconds + time.perf_counter() - began)
    return totals


def main():
    calls = record_op_calls()
    print(f"op calls: {len(calls['attention'])} attention (SDPA calls not counted), "
          f"{len(calls['group_norm'])} group_norm")
    variants = kernel_variants(calls)
    with tempfile.TemporaryDirectory() as cache:
        triton.knobs.cache.dir = cache
        totals = compile_seconds(variants)
    for name, (count, seconds) in totals.items():
        print(f"{name:<28} {count:3d} variants  {seconds:6.1f} s")
    print(f"{'total':<28} {sum(c for c, _ in totals.values()):3d} variants  "
          f"{sum(s for _, s in totals.values()):6.1f} s (sequential, this CPU)")


if __name__ == "__main__":
    main()
