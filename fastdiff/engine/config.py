"""How the fast path prepares and runs the models: one frozen dataclass, a comment per field."""
from dataclasses import dataclass
from typing import Optional

import torch

ATTENTION_PREFERENCES = ("auto", "fastdiff", "sdpa", "matmul")  # `ops.attention_impl`'s choices
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Inductor modes that capture CUDA graphs themselves: a graph cannot be captured inside another capture.
_SELF_GRAPHING_MODES = ("reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class FastConfig:
    """How the fast path prepares and runs a UNet (and the VAE's layout)."""

    dtype: Optional[torch.dtype] = None  # UNet weights/activations; None keeps the loaded dtype (float16 on
    #   CUDA by default); bfloat16 selectable; float32 allowed (slow, for checks)
    channels_last: bool = True  # NHWC memory layout for the UNet's and the VAE's convolutions
    fuse_projections: bool = True  # one matmul for q, k, v (self-attention), for k, v (cross-attention) and
    #   for all ResNet blocks' time projections
    self_attention: str = "auto"  # "sdpa", "fastdiff" (Triton), "matmul" or "auto" (`ops.attention_impl`: Triton
    #   at head dim 40, where its p @ v also sums p, for large batches, and above head dim 128; SDPA otherwise)
    cross_attention: str = "fastdiff"  # Triton's on-chip path for the 77 text keys: 1.1-1.6x SDPA
    vae_attention: str = "auto"  # the VAE's single 512-wide head, past the Triton kernel's limits: "auto" takes
    #   `matmul_attention` there (2.0x torch SDPA's memory-efficient kernel on an H200), "sdpa" torch's
    fuse_geglu: bool = True  # GEGLU's value * GELU(gate) in one Triton pass (ops.geglu) instead of eager gelu
    #   and mul: 6% faster images on an H200 (benchmarks/RESULTS.md)
    linear_epilogues: bool = True  # the transformers' GEGLU projection with its gate, and their MLP output and
    #   proj_out with the residual add, each one Triton matmul (ops.linear) where that beat cuBLAS + the
    #   separate pass (benchmarks/RESULTS.md)
    fold_biases: bool = True  # the attentions' to_out and the transformers' proj_in matmuls without their bias,
    #   added instead in the LayerNorm pass after them (ops.add_layer_norm), and the MLP output's bias carried
    #   there in the residual stream, onto which its matmul accumulates in place (cuBLAS, C = the stream): on an
    #   H200 cuBLAS's GEMM with a bias was up to 1.55x slower than without one at SD1.5's widths
    #   (benchmarks/RESULTS.md). Takes the MLP output from linear_epilogues.
    subpixel_upsample: bool = True  # the UNet's and the VAE's nearest 2x upsampling + conv3x3 as a 2x2 conv of
    #   the small image and a shuffle (fastdiff.kernels.subpixel): 4/9 of the FLOPs, no upsampled copy
    conv_bias_pass: bool = True  # the UNet's conv_in and downsampler convs without their bias, which one
    #   vectorized Triton pass adds (ops.residual_add without a residual): PyTorch's own bias add after a cuDNN
    #   conv is a broadcast that is not vectorized (conv_in at batch 1: 10.3 -> 5.4 us plus the pass)
    group_sums: bool = True  # the residual adds, skip concatenations and bias passes whose output a GroupNorm
    #   reads next also sum it for that norm (`fastdiff.engine.unet.FastUNet`), which then only
    #   normalizes: one launch that reads its input once. channels_last and without compile only
    split_k_conv: bool = True  # the UNet ResNet blocks' 3x3 convs and conv_out through ops.conv2d: Triton's
    #   split-K kernel where it beats cuDNN (few output pixels: the 8x8 level at CFG batch 2; conv_out's 4
    #   channels at CFG batch 2), cuDNN elsewhere
    cuda_graphs: bool = True  # capture the UNet call once per input shape and replay it
    memset_kernels: bool = True  # in those graphs (and the text encoder's), cuDNN's memset nodes made kernel
    #   nodes (CUDAGraphRunner): CFG-2 UNet replay 5.184 -> 5.154 ms on an H200, bitwise the same output
    compile: Optional[str] = None  # torch.compile mode for the UNet before capture, e.g. "default" or
    #   "max-autotune-no-cudagraphs"; None runs the eager kernels (no compile time at all)
    warmup: int = 1  # eager calls before a capture: the first makes cuBLAS/cuDNN plans, lazy inits (and
    #   torch.compile's compile), after a new shape's `compile_ahead` ran its ops once already; a second cost each
    #   new shape one more eager UNet call per CUDA graph and a VAE decode, for nothing (benchmarks/RESULTS.md)

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES} or None, got {self.dtype}")
        for name in ("self_attention", "cross_attention", "vae_attention"):
            if getattr(self, name) not in ATTENTION_PREFERENCES:
                raise ValueError(f"{name} must be one of {ATTENTION_PREFERENCES}, got {getattr(self, name)!r}")
        if self.compile is not None and self.cuda_graphs and self.compile in _SELF_GRAPHING_MODES:
            raise ValueError(f"compile={self.compile!r} captures CUDA graphs itself, which cannot nest in the "
                             f"fast path's own; use 'default' or 'max-autotune-no-cudagraphs', or cuda_graphs=False")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1 (autotuning must not run inside a capture), got {self.warmup}")
