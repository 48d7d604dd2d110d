"""The CUDA fast path: a loaded UNet made fast in place, and its calls replayed from CUDA graphs.

    fast = FastUNet(pipe.unet, FastConfig())            # fp16, channels_last, fused projections
    model_fn = fast.denoiser(context, cfg=True)         # (x (B, 4, h, w) float32, t) -> (2B, 4, h, w) float32
    out = model_fn(x, t)                                # first call per shape captures, later calls replay

`Pipeline` does this by itself on CUDA (`Pipeline(..., fast=None)`, the default; `fast=False` opts out).
What the preparation changes, and why:
  dtype          float16 (or bfloat16) weights and activations: tensor cores.
  channels_last  NHWC convs, cuDNN's fastest layout for half precision; the transformers' (B, C, H, W) ->
                 (B, H*W, C) token view and back become free views instead of copies.
  fused q/k/v    one matmul for self-attention's q, k, v and one for cross-attention's k, v (the same
                 parameters and state-dict keys: `Attention.fuse_projections` makes them views); one for
                 every ResNet block's time projection (`UNet2DConditionModel.fuse_time_projections`); one
                 for each text-encoder layer's q, k, v (`CLIPTextModel.fuse_projections`).
  attention      per kind, head dim and batch, fastdiff's Triton kernel (`ops.attention`) or torch SDPA,
                 whichever was measured faster: Triton for cross-attention, for large-batch self-attention
                 at head dim 40 (SD1.5's 64x64 level) and for self-attention at head dim 160, SDPA for the
                 other self-attention. The VAE's one 512-wide head: GEMM, softmax, GEMM (`matmul_attention`).
  GEGLU          the MLP's value * GELU(gate) in one Triton pass (`fuse_geglu`): 6.65 against 7.05 ms per
                 UNet step, 182.8 against 193.8 ms per image on an H200.
  epilogues      where it beat cuBLAS, one Triton matmul makes the GEGLU projection and its gate, and proj_out
                 (and the MLP's output, with fold_biases off) with the residual add (`linear_epilogues`,
                 `ops.linear`).
  biases         the attentions' to_out and proj_in matmuls run without their bias, which the LayerNorm pass
                 after them adds, and the MLP's output matmul accumulates in place onto a residual stream that
                 pass wrote with its bias (`fold_biases`, `ops.add_layer_norm`): cuBLAS's bias epilogue is slow.
  upsampling     nearest 2x + conv3x3 (UNet and VAE) as a 2x2 conv of the small image with four phases of
                 outputs, shuffled into place (`subpixel_upsample`, `fastdiff.kernels.subpixel`): 4/9 of the FLOPs.
  text context   its cross-attention K/V projections computed once per prompt, outside the UNet's graphs, in
                 a graph of their own (`denoiser`).
  GroupNorm sums the kernels that write a GroupNorm's input (residual adds, skip concatenations, bias passes)
                 also sum it for the norm, which then runs only its normalizing pass (`group_sums`).
  shared sample  with guidance the UNet gets the B latents once and the 2B [uncond; cond] contexts: the layers
                 before the first cross-attention run on B rows, not 2B (UNet2DConditionModel.forward).
  time features  the sinusoidal time embedding, its MLP and the blocks' time projections computed once per
                 sampling schedule for all its timesteps; each step's graph starts from its row
                 (`FastUNet._time_features`).
  CUDA graphs    the UNet call (with the dtype casts) captured once per input shape and
                 replayed; a new (batch, height, width) captures a new graph, nothing else is rebuilt. cuDNN's
                 memset nodes in them become kernel nodes (`memset_kernels`).
  torch.compile  optional, of fastdiff's own UNet before capture (`compile="max-autotune-no-cudagraphs"`).
The fused sampling update runs eagerly between replays (its coefficients change every step); the loop makes
no host synchronisation once a shape is captured.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastdiff import _ext, ops
from fastdiff.models.unet import Attention, UpsampleConv

ATTENTION_IMPLS = ("auto", "fastdiff", "sdpa", "matmul")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Inductor modes that capture CUDA graphs themselves: a graph cannot be captured inside another capture.
_SELF_GRAPHING_MODES = ("reduce-overhead", "max-autotune")


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """torch's scaled_dot_product_attention with `ops.attention`'s signature. q: (B, H, Sq, D); k, v:
    (B, H, Skv, D), any strides with the head dim contiguous -> (B, H, Sq, D)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


TIME_TABLES_KEPT = 16  # timestep tensors whose time features a FastUNet keeps (`FastUNet._time_features`)
# matmul_attention's float32 scores per block: 16 MB, 1024 queries x 4096 keys (the VAE's 64x64 map). On an H200
# (CUDA-graph replays, 1x1x4096x512 fp16) 1024 rows took 168 us, 2048 rows 146 us with 24 MB more scores alive.
# A batch-1 image peaked at 2717 MB with either (diffusers eager: 2725 MB): the smaller block keeps the VAE's
# attention well under that peak for 0.02 ms per image.
MATMUL_ATTENTION_SCORES = 1024 * 4096


@functools.cache
def _gemm_writes_float32() -> bool:
    """Whether this torch has baddbmm's `out_dtype` overload (half inputs, float32 output; recent versions)."""
    return "dtype_out" in torch.ops.aten.baddbmm.overloads()


def matmul_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """Attention as a GEMM into float32 scores, a softmax in place and a GEMM, per (batch, head) and block of
    queries (at most MATMUL_ATTENTION_SCORES scores); `ops.attention`'s signature, any head dim. For heads past the
    flash kernels' widths, the VAE's one head of 512, where torch SDPA takes its memory-efficient kernel: at
    1x1x4096x512 fp16 on an H200, 168 against 334 us, and 1337 against 2005 us at batch 8, with the same error
    against a float64 reference (4.6e-4 against SDPA's 4.55e-4, 1.00e-3 against 0.99e-3 at larger logits).
    The probabilities are rounded to v's dtype for the second GEMM, as the flash kernels do."""
    B, H, Sq, D = q.shape
    Skv, Dv = k.shape[2], v.shape[3]
    scale = D ** -0.5 if scale is None else scale
    q3, k3, v3 = q.reshape(B * H, Sq, D), k.reshape(B * H, Skv, D), v.reshape(B * H, Skv, Dv)
    out = q.new_empty(B * H, Sq, Dv)
    rows = max(1, min(Sq, MATMUL_ATTENTION_SCORES // Skv))
    scores = torch.empty(1, rows, Skv, device=q.device, dtype=torch.float32)  # reused by every block
    # cuBLAS writes float32 scores from half inputs; elsewhere (the CPU, an older torch) the inputs are upcast
    half_scores = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _gemm_writes_float32()
    for b in range(B * H):
        kt = k3[b:b + 1].transpose(1, 2)
        for i in range(0, Sq, rows):
            qi = q3[b:b + 1, i:i + rows]
            s = scores[:, :qi.shape[1]]
            if half_scores:
                torch.baddbmm(s, qi, kt, beta=0, alpha=scale, out_dtype=torch.float32, out=s)
            else:
                torch.baddbmm(s, qi.float(), kt.float(), beta=0, alpha=scale, out=s)
            torch.softmax(s, -1, out=s)
            torch.bmm(s.to(v.dtype), v3[b:b + 1], out=out[b:b + 1, i:i + rows])
    return out.view(B, H, Sq, Dv)


# "auto" at head dim 40: fastdiff's kernel from this many (batch * heads) on, SDPA below. On an H200 the SD1.5
# UNet step with fastdiff's kernel at the 64x64 level was 1.3% faster at CFG batch 16 (8 x 8 heads = 128) and
# 0.8% slower at CFG batch 2 (16) than with SDPA there.
AUTO_MIN_BATCH_HEADS = 64


def _spare_column_attention(q: Tensor, k: Tensor, v: Tensor, scale: Optional[float] = None) -> Tensor:
    """"auto" self-attention at a head dim with a spare padding column (40): fastdiff's kernel, which sums p
    on the tensor cores there, from AUTO_MIN_BATCH_HEADS batch * heads on; SDPA for fewer."""
    if q.shape[0] * q.shape[1] >= AUTO_MIN_BATCH_HEADS:
        return ops.attention(q, k, v, scale)
    return sdpa_attention(q, k, v, scale)


_ATTEND = {"fastdiff": ops.attention, "sdpa": sdpa_attention, "matmul": matmul_attention,
           "spare_column": _spare_column_attention}
# "auto" above this head dim: fastdiff's kernel. At SD1.5's head dim 160 (the 16x16 and 8x8 levels, 256 and 64
# tokens) it took 7.4 us against SDPA's 10.5 (cuDNN's kernel) at 2x8x256x160 on an H200, and the UNet step 5.869
# against 5.887 ms at CFG batch 2 (no change at 8 and 16). At head dim 80 SDPA is faster (18.3 vs 19.7 us).
AUTO_TRITON_ABOVE_HEAD_DIM = 128


def _pick_attention(impl: str, head_dim: int) -> str:
    """"auto" resolved for one attention module, by what measured faster on an H200: at head dim 40, where
    fastdiff's streaming kernel sums p in a spare padding column, the choice by batch above; fastdiff's kernel
    above AUTO_TRITON_ABOVE_HEAD_DIM; `matmul_attention` past the kernel's widest head; SDPA elsewhere."""
    from fastdiff.kernels.attention import MAX_HEAD_DIM, has_spare_column

    if impl != "auto":
        return impl
    if head_dim > MAX_HEAD_DIM:
        return "matmul"
    if has_spare_column(head_dim):
        return "spare_column"
    return "fastdiff" if head_dim > AUTO_TRITON_ABOVE_HEAD_DIM else "sdpa"


@dataclass(frozen=True)
class FastConfig:
    """How the fast path prepares and runs a UNet (and the VAE's layout)."""

    dtype: Optional[torch.dtype] = None  # UNet weights/activations; None keeps the loaded dtype (float16 on
    #   CUDA by default); bfloat16 selectable; float32 allowed (slow, for checks)
    channels_last: bool = True  # NHWC memory layout for the UNet's and the VAE's convolutions
    fuse_projections: bool = True  # one matmul for q, k, v (self-attention), for k, v (cross-attention) and
    #   for all ResNet blocks' time projections
    self_attention: str = "auto"  # "sdpa", "fastdiff" (Triton) or "auto": Triton at head dim 40, where its
    #   p @ v also sums p, for large batches (AUTO_MIN_BATCH_HEADS), and above head dim 128; SDPA otherwise;
    #   benchmarks/RESULTS.md
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
    #   reads next also sum it for that norm (UNet2DConditionModel.sum_for_group_norms), which then only
    #   normalizes: one launch that reads its input once. channels_last and without compile only
    split_k_conv: bool = True  # the UNet ResNet blocks' 3x3 convs and conv_out through ops.conv2d: Triton's
    #   split-K kernel where it beats cuDNN (few output pixels: the 8x8 level at CFG batch 2; conv_out's 4
    #   channels at CFG batch 2), cuDNN elsewhere
    cuda_graphs: bool = True  # capture the UNet call once per input shape and replay it
    memset_kernels: bool = True  # in those graphs (and the text encoder's), cuDNN's memset nodes made kernel
    #   nodes (CUDAGraphRunner): CFG-2 UNet replay 5.184 -> 5.154 ms on an H200, bitwise the same output
    compile: Optional[str] = None  # torch.compile mode for the UNet before capture, e.g. "default" or
    #   "max-autotune-no-cudagraphs"; None runs the eager kernels (no compile time at all)
    warmup: int = 2  # eager calls before a capture (autotuning, cuBLAS/cuDNN plans, lazy inits)

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES} or None, got {self.dtype}")
        for name in ("self_attention", "cross_attention", "vae_attention"):
            if getattr(self, name) not in ATTENTION_IMPLS:
                raise ValueError(f"{name} must be one of {ATTENTION_IMPLS}, got {getattr(self, name)!r}")
        if self.compile is not None and self.cuda_graphs and self.compile in _SELF_GRAPHING_MODES:
            raise ValueError(f"compile={self.compile!r} captures CUDA graphs itself, which cannot nest in the "
                             f"fast path's own; use 'default' or 'max-autotune-no-cudagraphs', or cuda_graphs=False")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1 (autotuning must not run inside a capture), got {self.warmup}")


def prepare_unet(unet: nn.Module, config: FastConfig) -> nn.Module:
    """Make a fastdiff UNet2DConditionModel fast in place (see the module docstring) and return it.
    State-dict keys and values are unchanged (up to the dtype); calling it twice is harmless."""
    from fastdiff.models.unet import (GEGLU, BasicTransformerBlock, Downsample2D, FeedForward, ResnetBlock2D,
                                      Transformer2DModel)

    if config.dtype is not None:
        unet.to(config.dtype)
    if config.channels_last:
        unet.to(memory_format=torch.channels_last)  # 4-D weights only: the convolutions
    if config.fuse_projections:
        unet.fuse_time_projections()
    for module in unet.modules():
        if isinstance(module, Attention):
            if config.fuse_projections and module.fused_weight is None:
                module.fuse_projections()
            impl = config.cross_attention if module.is_cross_attention else config.self_attention
            module.attend = _ATTEND[_pick_attention(impl, module.to_q.out_features // module.heads)]
        elif isinstance(module, GEGLU):
            module.fused = config.fuse_geglu
            module.linear_epilogue = config.linear_epilogues
        elif isinstance(module, FeedForward):
            module.linear_epilogue = config.linear_epilogues
        elif isinstance(module, Transformer2DModel):
            module.linear_epilogue = config.linear_epilogues
            module.fold_biases = config.fold_biases
        elif isinstance(module, BasicTransformerBlock):
            module.fold_biases = config.fold_biases
        elif isinstance(module, UpsampleConv):
            module.subpixel = config.subpixel_upsample
        elif isinstance(module, ResnetBlock2D):
            module.conv1.split_k = module.conv2.split_k = config.split_k_conv
        elif isinstance(module, Downsample2D):
            module.conv.bias_pass = config.conv_bias_pass
    unet.conv_in.bias_pass = config.conv_bias_pass
    unet.sum_for_group_norms(config.group_sums and config.channels_last and config.compile is None)
    unet.conv_out.split_k = config.split_k_conv  # its 4 output channels: `prefers_split_k`'s narrow case
    return unet


def prepare_vae(vae: nn.Module, config: FastConfig) -> nn.Module:
    """The VAE's part of the fast path, in place: channels_last convolutions and its attention choice."""
    from fastdiff.models.vae import Attention

    if config.channels_last:
        vae.to(memory_format=torch.channels_last)
    for module in vae.modules():
        if isinstance(module, Attention):
            module.attend = _ATTEND[_pick_attention(config.vae_attention, module.to_q.out_features)]  # one head
        elif isinstance(module, UpsampleConv):
            module.subpixel = config.subpixel_upsample
    return vae


def prepare_text_encoder(text_encoder: nn.Module, config: FastConfig) -> nn.Module:
    """The text encoder's part of the fast path, in place: with fuse_projections, one q/k/v matmul per layer
    (`CLIPTextModel.fuse_projections`)."""
    if config.fuse_projections:
        text_encoder.fuse_projections()
    return text_encoder


class _Captured(NamedTuple):
    graph: "torch.cuda.CUDAGraph"
    inputs: tuple[Tensor, ...]  # static input buffers, copied into before each replay
    output: Tensor  # static output buffer, rewritten by each replay
    memsets_replaced: int  # memset nodes made kernel nodes (`memset_kernels`)


class CUDAGraphRunner:
    """Calls `fn(*inputs) -> Tensor` through CUDA graphs: one capture per input signature (shapes, dtypes,
    strides, device), then copy the inputs into that graph's static buffers and replay.

    The returned tensor is the graph's static output: the next call of the same signature overwrites it, so
    read it (or clone it) before calling again. Inputs at the positions in `by_reference` are not copied: the
    graph reads the caller's tensor itself, so their address is part of the signature (another tensor
    captures another graph) and the caller keeps them alive and writes new values into them in place (the
    fast path's text context, constant over a sampling loop, whose projections are computed outside it).
    Graphs share one memory pool (they never run concurrently), so a second resolution costs only what it
    needs beyond the first. `fn` must have no host
    synchronisation and no branch on tensor values; it may allocate (from the graph's pool).

    memset_kernels: before instantiating a graph, make its small memset nodes (cuDNN's 4-byte workspace counters)
    kernel nodes that write the same bytes (`fastdiff._ext.graph_memsets_to_kernels`), where fastdiff._C has its
    CUDA part: a memset node idles the GPU for microseconds around it. Outputs are bitwise the same.
    """

    def __init__(self, fn: Callable[..., Tensor], warmup: int = 2, by_reference: tuple[int, ...] = (),
                 memset_kernels: bool = True):
        if not torch.cuda.is_available():
            raise RuntimeError("CUDAGraphRunner needs a CUDA device and torch sees none; call the model directly "
                               "on the CPU (Pipeline does so when fast=None)")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (autotuning must not run inside a capture), got {warmup}")
        self.fn = fn
        self.warmup = warmup
        self.by_reference = frozenset(by_reference)
        self.memset_kernels = memset_kernels
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None

    def signature(self, inputs: tuple[Tensor, ...]) -> tuple:
        return tuple((tuple(t.shape), t.stride(), t.dtype, t.device, t.data_ptr() if i in self.by_reference else None)
                     for i, t in enumerate(inputs))

    @property
    def captured(self) -> int:
        """How many graphs (input signatures) are held."""
        return len(self._graphs)

    @property
    def memsets_replaced(self) -> int:
        """Memset nodes made kernel nodes, over the graphs held."""
        return sum(entry.memsets_replaced for entry in self._graphs.values())

    def __call__(self, *inputs: Tensor) -> Tensor:
        for i, t in enumerate(inputs):
            if not isinstance(t, Tensor) or t.device.type != "cuda":
                raise ValueError(f"input {i} must be a CUDA tensor, got "
                                 f"{t.device if isinstance(t, Tensor) else type(t).__name__}")
        key = self.signature(inputs)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(inputs)
        for static, t in zip(entry.inputs, inputs):
            if static.data_ptr() != t.data_ptr():
                static.copy_(t)
        entry.graph.replay()
        return entry.output

    def _capture(self, inputs: tuple[Tensor, ...]) -> _Captured:
        static = tuple(t if i in self.by_reference else
                       torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
                       for i, t in enumerate(inputs))
        # Warm up on a side stream, as torch.cuda.graphs' own make_graphed_callables does: lazy cuBLAS/cuDNN
        # state and Triton autotuning (which synchronises) happen here, never inside the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        surgery = self.memset_kernels and _ext.availability("cuda", "graph")[0]
        graph = torch.cuda.CUDAGraph(keep_graph=True) if surgery else torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.fn(*static)
        if not isinstance(output, Tensor):
            raise TypeError(f"the captured function must return one tensor, got {type(output).__name__}")
        replaced = 0
        if surgery:
            replaced = _ext.graph_memsets_to_kernels(graph)
            graph.instantiate()
        return _Captured(graph, static, output, replaced)

    def clear(self) -> None:
        """Drop every graph and its memory pool."""
        self._graphs.clear()
        self._pool = None


class FastUNet:
    """A UNet prepared for CUDA (`prepare_unet`), optionally compiled, whose calls replay CUDA graphs.

    `denoiser(context, cfg)` gives the sampling loop's model_fn: (x (B, C, h, w) float32, t 0-d float32)
    -> model output float32, (2B, C, h, w) = [uncond; cond] when cfg, else (B, C, h, w), contiguous.
    """

    def __init__(self, unet: nn.Module, config: Optional[FastConfig] = None):
        self.config = config or FastConfig()
        device = next(unet.parameters()).device
        if self.config.cuda_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need the UNet on a CUDA device, it is on {device}; move it there, or "
                             f"pass FastConfig(cuda_graphs=False) to run the prepared modules without graphs")
        self.unet = prepare_unet(unet, self.config)
        self.dtype = next(self.unet.parameters()).dtype
        forward = self.unet
        if self.config.compile is not None:
            ops.preload()  # the first call of an op imports it, which would break the compiled graph there
            forward = torch.compile(self.unet, mode=self.config.compile, dynamic=False)
        self._forward = forward
        graphs = self.config.cuda_graphs
        # With fused projections the context's K/V projections are computed once per prompt (`denoiser`), so
        # the graphs read the context buffer they belong to in place (input 2, by reference). Not under
        # torch.compile, which would guard on the projections' lookup.
        self._projects = self.config.fuse_projections and self.config.compile is None
        by_reference = (2,) if self._projects else ()
        memset_kernels = self.config.memset_kernels
        self._guided = CUDAGraphRunner(self._call_guided, self.config.warmup, by_reference, memset_kernels) \
            if graphs else self._call_guided
        self._plain = CUDAGraphRunner(self._call_plain, self.config.warmup, by_reference, memset_kernels) \
            if graphs else self._call_plain
        self._contexts: dict[tuple, Tensor] = {}  # one context buffer per shape, rewritten for each prompt
        # the K/V projections of a rewritten buffer, replayed: 16 small matmuls (SD1.5) cost 0.5 ms of launches
        self._projector = CUDAGraphRunner(self._project, self.config.warmup, (0,), memset_kernels) \
            if graphs and self._projects else self._project
        # found once: walking the UNet's ~700 modules took 0.5 ms of host time on a 2-core dev CPU, in every
        # image's prologue
        self._cross_attentions = [m for m in self.unet.modules() if isinstance(m, Attention) and m.is_cross_attention]
        self._upsamplers = [m for m in self.unet.modules() if isinstance(m, UpsampleConv) and m.subpixel]
        self._holders: dict[tuple, Callable] = {}  # the model_fn whose context each buffer holds
        # `_time_features`: the timestep tensors a sampler steps through, each with its rows of time features
        self._time_tables: dict[int, tuple[Tensor, tuple[int, ...], Tensor]] = {}
        self._time_inputs = [*self.unet.time_embedding.parameters(), *(
            t for t in (self.unet.fused_time_weight, self.unet.fused_time_bias, self.unet.fused_conv1_bias)
            if t is not None)]

    def _input(self, x: Tensor) -> Tensor:
        fmt = torch.channels_last if self.config.channels_last else torch.contiguous_format
        return x.to(self.dtype, memory_format=fmt)

    @torch.no_grad()  # inference only: a graph's output is a static buffer
    def _call_guided(self, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        # x is shared by both halves of context: (2B, C, h, w) = [uncond; cond], the layers before the first
        # cross-attention run on B rows (the UNet's forward, "shared sample")
        return self._forward(self._input(x), None, context, temb=temb, out_dtype=torch.float32)

    @torch.no_grad()
    def _call_plain(self, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        return self._forward(self._input(x), None, context, temb=temb, out_dtype=torch.float32)

    def _time_features(self, t: Tensor) -> Tensor:
        """The UNet's `time_features` of a 0-d timestep shared by the batch, a (1, width) row. A sampler passes
        `sched.model_timesteps[i]`, a view of a 1-D tensor: the rows of all its timesteps are then computed at
        once, kept with that tensor (until it or the time path's weights change: their version counters), and
        t's row is found by its offset in it, host metadata only. So the graphs start from the row, not from
        the timestep: the sinusoidal embedding and the time MLP, 15 small ops, left every step. Any other
        t is computed now."""
        base = t._base
        if not (t.dim() == 0 and base is not None and base.dim() == 1 and base.is_contiguous()
                and base.dtype == torch.float32 and base.device == t.device):
            return self.unet.time_features(t.reshape(()).to(torch.float32), 1, t.device, self.dtype)
        version = (base._version, *(p._version for p in self._time_inputs))
        entry = self._time_tables.get(id(base))
        if entry is None or entry[0] is not base or entry[1] != version:
            while len(self._time_tables) >= TIME_TABLES_KEPT:
                del self._time_tables[next(iter(self._time_tables))]
            rows = self.unet.time_features(base, base.shape[0], base.device, self.dtype)
            entry = self._time_tables[id(base)] = (base, version, rows)
        i = t.storage_offset() - base.storage_offset()
        return entry[2][i:i + 1]

    def _project(self, buffer: Tensor) -> Tensor:
        for module in self._cross_attentions:  # UNet2DConditionModel.project_context, module by module
            module.project_context(buffer)
        return buffer

    def eager_call(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """One call of the prepared UNet as `denoiser` makes it, but eager: no graph, no torch.compile; with
        guidance context has 2B rows and x is shared by both halves, as in `_call_guided`. (`Pipeline` runs it
        inside `fastdiff.kernels.compiling_ahead` to compile a new shape's kernels.)"""
        return self.unet(self._input(x), t.reshape(()).to(torch.float32), context.to(self.dtype))

    def denoiser(self, context: Tensor, cfg: bool) -> Callable[[Tensor, Tensor], Tensor]:
        """model_fn for `fastdiff.schedulers.sample`. context: (2B, T, D) = [uncond; cond] with cfg, else
        (B, T, D). The returned output is a static buffer when CUDA graphs are on: the loop consumes it
        (the fused step reads it) before the next call rewrites it.

        The context is constant over the loop, so with fused projections (and no torch.compile) its
        cross-attention K/V projections are computed here, once, not in every step
        (`UNet2DConditionModel.project_context`). They and the context live in one buffer per context shape,
        which the graphs read in place; a model_fn whose context is not the one held there (another denoiser of
        the same shape was made since) writes its own back and projects it again before its call."""
        call = self._guided if cfg else self._plain
        context = context.to(self.dtype)
        for module in self._upsamplers:  # weights loaded since the graphs were captured reach them
            module.subpixel_weight()
        if not self._projects:
            return lambda x, t: call(x, self._time_features(t), context)
        key = (tuple(context.shape), context.device)

        def held_context() -> Tensor:
            buffer = self._contexts.get(key)
            if buffer is None:  # its first projections allocate what they keep: eager, outside any graph
                buffer = self._contexts[key] = torch.empty_like(context, memory_format=torch.contiguous_format)
                self._project(buffer.copy_(context))
            elif self._holders.get(key) is not model_fn:
                self._projector(buffer.copy_(context))  # into the kept projections, in place
            self._holders[key] = model_fn
            return buffer

        def model_fn(x: Tensor, t: Tensor) -> Tensor:
            return call(x, self._time_features(t), held_context())

        held_context()  # project now, not inside the first step
        return model_fn

    @property
    def graphs_captured(self) -> int:
        """UNet CUDA graphs held (one per input shape and guidance mode)."""
        return sum(r.captured for r in (self._guided, self._plain) if isinstance(r, CUDAGraphRunner))
