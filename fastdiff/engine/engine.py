"""How the pipeline's models run: `Engine` runs them as written, `FastEngine` on the CUDA fast path.

    engine = make_engine(unet, vae, text_encoder, fast=None)   # FastEngine on CUDA, Engine elsewhere
    context = engine.encode_text(ids, clip_skip=None)          # (B', 77, D)
    model_fn = engine.denoiser(context, cfg=True)              # (x (B, 4, h, w) float32, t) -> float32 output
    images = engine.decode(latents)                            # unscaled latents -> (B, 3, H, W) in [-1, 1]

The pipeline holds one engine and never asks which one it is. FastEngine builds its fused modules from the loaded
ones (`FastUNet`, `fast_vae`, `fast_text_encoder`), sharing their parameters, and runs those; captures
the UNet call once per input shape as a CUDA graph and replays it; replays the text encoder from a graph too;
computes the context's cross-attention K/V projections once per prompt and the time features once per sampling
schedule; and compiles every Triton kernel a new shape needs at once before its first image (`compile_ahead`).
The fused sampling update (`ops.scheduler_step`) runs eagerly between replays (its coefficients change every
step); the loop makes no host synchronisation once a shape is captured.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fastdiff import ops
from fastdiff.kernels import compiling_ahead
from fastdiff.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
from fastdiff.models.clip import CLIPAttention

from .config import FastConfig
from .graphs import CUDAGraphRunner
from .unet import FastUNet, concat_as_views, copy_sharing_parameters, replace_modules
from .vae import fast_vae

ModelFn = Callable[[Tensor, Tensor], Tensor]
TIME_TABLES_KEPT = 16  # timestep tensors whose time features a FastEngine keeps (`FastEngine._time_features`)


class Engine:
    """The models as written, in plain PyTorch: the CPU path (and any device with fast=False). `unet`, `vae` and
    `text_encoder` are the modules an engine runs (FastEngine's are its fused ones)."""

    def __init__(self, unet: nn.Module, vae: AutoencoderKL, text_encoder: CLIPTextModel):
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder

    graphs_captured = 0  # UNet CUDA graphs held

    def encode_text(self, ids: Tensor, clip_skip: Optional[int] = None) -> Tensor:
        """Token ids (B', 77) -> the text encoder's hidden states (B', 77, D)."""
        return self.text_encoder(ids, clip_skip=clip_skip)

    def denoiser(self, context: Tensor, cfg: bool) -> ModelFn:
        """model_fn for `fastdiff.schedulers.sample`: (x (B, C, h, w) float32, t) -> the UNet's output float32,
        (2B, C, h, w) = [uncond; cond] rows when cfg (context then holds 2B rows), else (B, C, h, w)."""
        unet, dtype = self.unet, next(self.unet.parameters()).dtype

        def model_fn(x: Tensor, t: Tensor) -> Tensor:
            x = torch.cat([x, x]) if cfg else x  # (2B, ...) = [uncond; cond]
            return unet(x.to(dtype), t, context).float()

        return model_fn

    def encode_image(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, 3, H, W) in [-1, 1], in the VAE's dtype -> the posterior's (mean, logvar), unscaled."""
        return self.vae.encode_distribution(pixels)

    def decode(self, latents: Tensor) -> Tensor:
        """Unscaled latents (B, 4, h, w) in the VAE's dtype -> images (B, 3, H, W), nominally in [-1, 1]."""
        return self.vae.decode(latents)

    def compile_ahead(self, key: tuple, x: Tensor, context: Tensor, rest: Callable[[], None]) -> None:
        """Before the first image of a new shape (`key`): compile what it will launch. Nothing to compile here."""

    def weights_changed(self) -> None:
        """The models' weights were written in place (LoRAs merged or removed): drop what was derived from them.
        Nothing is derived here."""


class FastCLIPAttention(nn.Module):
    """The text encoder's CLIPAttention with q, k and v in one matmul (`fused_weight`, `fused_bias`, of which the
    projections' parameters are views): two kernels fewer per layer."""

    def __init__(self, attention: CLIPAttention):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = attention.q_proj, attention.k_proj, attention.v_proj
        self.out_proj, self.num_heads = attention.out_proj, attention.num_heads
        parts = [self.q_proj, self.k_proj, self.v_proj]
        self.register_buffer("fused_weight", concat_as_views(parts, "weight"), persistent=False)  # (3D, D)
        self.register_buffer("fused_bias", concat_as_views(parts, "bias"), persistent=False)  # (3D,)

    def forward(self, x: Tensor) -> Tensor:
        """Causal self-attention, as CLIPAttention: x (B, T, D) -> (B, T, D)."""
        b, t, d = x.shape
        qkv = F.linear(x, self.fused_weight, self.fused_bias).view(b, t, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, T, head_dim) views of one matmul's output
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


def fast_text_encoder(text_encoder: CLIPTextModel, config: FastConfig) -> CLIPTextModel:
    """The fast path's text encoder: a copy of `text_encoder` sharing its parameters, with fused q/k/v attention
    (config.fuse_projections)."""
    fast = copy_sharing_parameters(text_encoder)
    if config.fuse_projections:
        replace_modules(fast, {CLIPAttention: FastCLIPAttention})
    return fast


class FastEngine(Engine):
    """The CUDA fast path (`FastConfig` says what it does). With cuda_graphs=False it runs its fused modules
    eagerly, on any device (the CPU tests run it so)."""

    unet: FastUNet

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 config: Optional[FastConfig] = None):
        self.config = config = config or FastConfig()
        device = next(unet.parameters()).device
        if config.cuda_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need the UNet on a CUDA device, it is on {device}; move it there, or "
                             f"pass FastConfig(cuda_graphs=False) to run the fused modules without graphs")
        super().__init__(FastUNet(unet, config), fast_vae(vae, config), fast_text_encoder(text_encoder, config))
        self.dtype = next(unet.parameters()).dtype
        self._forward = self.unet
        if config.compile is not None:
            ops.preload()  # the first call of an op imports it, which would break the compiled graph there
            self._forward = torch.compile(self.unet, mode=config.compile, dynamic=False)
        # With fused projections the context's K/V projections are computed once per prompt (`denoiser`), so
        # the graphs read the context buffer they belong to in place (input 2, by reference). Not under
        # torch.compile, which would guard on the projections' lookup.
        self._projects = config.fuse_projections and config.compile is None
        self._unet_calls = self._graphed(self._call_unet, (2,) if self._projects else ())
        self._projector = self._graphed(self._project, (0,)) if self._projects else None
        self._text_calls: dict[Optional[int], Callable[[Tensor], Tensor]] = {}  # per clip_skip
        self._contexts: dict[tuple, Tensor] = {}  # one context buffer per shape, rewritten for each prompt
        self._holders: dict[tuple, ModelFn] = {}  # the model_fn whose context each buffer holds
        # `_time_features`: the timestep tensors a sampler steps through, each with its rows of time features
        self._time_tables: dict[int, tuple[Tensor, tuple[int, ...], Tensor]] = {}
        fused_time = (self.unet.fused_time_weight, self.unet.fused_time_bias,
                      self.unet.fused_conv1_bias)
        self._time_inputs = [*self.unet.time_embedding.parameters(), *(t for t in fused_time if t is not None)]
        self._compiled_for: set[tuple] = set()  # shapes whose Triton kernels `compile_ahead` compiled

    def _graphed(self, fn: Callable[..., Tensor], by_reference: tuple[int, ...] = ()) -> Callable[..., Tensor]:
        """fn replayed from CUDA graphs (one per input signature), or fn itself with cuda_graphs off."""
        if not self.config.cuda_graphs:
            return fn
        return CUDAGraphRunner(fn, self.config.warmup, by_reference, self.config.memset_kernels)

    @property
    def graphs_captured(self) -> int:
        """UNet CUDA graphs held (one per input shape and guidance mode)."""
        return self._unet_calls.captured if isinstance(self._unet_calls, CUDAGraphRunner) else 0

    # ---- the text encoder ------------------------------------------------------------------------------------

    def encode_text(self, ids: Tensor, clip_skip: Optional[int] = None) -> Tensor:
        """The fused text encoder; with CUDA graphs its transformer is replayed from one graph per (ids shape,
        clip_skip): its ~170 small kernels cost 4.5 ms of launches per image on an H200 when run eagerly. The
        embedding lookup runs before the graph, so the token table may grow (textual inversion) under it."""
        call = self._text_calls.get(clip_skip)
        if call is None:
            encoder = self.text_encoder
            call = self._text_calls[clip_skip] = self._graphed(lambda x: encoder.encode(x, clip_skip))
        return call(self.text_encoder.embed(ids)).clone()  # a graph's output buffer is rewritten by the next call

    # ---- the UNet --------------------------------------------------------------------------------------------

    def _input(self, x: Tensor) -> Tensor:
        fmt = torch.channels_last if self.config.channels_last else torch.contiguous_format
        return x.to(self.dtype, memory_format=fmt)

    @torch.no_grad()  # inference only: a graph's output is a static buffer
    def _call_unet(self, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        # With guidance x is shared by both halves of context: (2B, C, h, w) = [uncond; cond] comes out, and the
        # layers before the first cross-attention run on B rows (FastUNet.forward, "shared sample").
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

    def weights_changed(self) -> None:
        """Drop the time features computed from the old weights (`_time_features`) and the contexts' K/V
        projections (`denoiser`); both are computed again, into the buffers the graphs read, before the next
        step. The graphs themselves read the weights in place and stay valid."""
        self._time_tables.clear()
        self._holders.clear()

    def _project(self, buffer: Tensor) -> Tensor:
        self.unet.project_context(buffer)
        return buffer

    def eager_call(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """One call of the fused UNet as `denoiser` makes it, but eager: no graph, no torch.compile; with guidance
        context has 2B rows and x is shared by both halves."""
        return self.unet(self._input(x), t.reshape(()).to(torch.float32), context.to(self.dtype))

    def denoiser(self, context: Tensor, cfg: bool) -> ModelFn:
        """As Engine.denoiser. The returned output is a static buffer when CUDA graphs are on: the loop consumes
        it (the fused step reads it) before the next call rewrites it.

        The context is constant over the loop, so with fused projections (and no torch.compile) its
        cross-attention K/V projections are computed here, once, not in every step. They and the context live
        in one buffer per context shape, which the graphs read in place; a model_fn whose context is not the one
        held there (another denoiser of the same shape was made since) writes its own back and projects it again
        before its call."""
        context = context.to(self.dtype)
        for module in self.unet.subpixel_upsamplers:  # weights loaded since the graphs were captured
            module.subpixel_weight()
        if not self._projects:
            return lambda x, t: self._unet_calls(x, self._time_features(t), context)
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
            return self._unet_calls(x, self._time_features(t), held_context())

        held_context()  # project now, not inside the first step
        return model_fn

    # ---- the first image of a shape ------------------------------------------------------------------------

    def compile_ahead(self, key: tuple, x: Tensor, context: Tensor, rest: Callable[[], None]) -> None:
        """Before the first image of a new shape (`key`): compile, all at once, every Triton kernel that sampling
        and decoding it will launch. The UNet runs eagerly, then `rest` (the sampling loop on a stand-in model,
        the decoder), inside `fastdiff.kernels.compiling_ahead`: their Triton launches do not run but hand their
        compiles to a thread pool, which the block waits for. With an empty kernel cache the first image then
        waits for about the slowest compile instead of the sum. Skipped under torch.compile (inductor compiles
        its own kernels)."""
        if self.config.compile is not None or key in self._compiled_for:
            return
        with compiling_ahead():
            self.eager_call(x, torch.zeros((), device=x.device), context)  # outputs unwritten: dropped
            rest()
        self._compiled_for.add(key)


def make_engine(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                fast: Union[None, bool, FastConfig] = None) -> Engine:
    """The engine for a pipeline's `fast` setting: None takes the fast path when the models are on a CUDA
    device; True or a FastConfig take it anyway; False runs the models as written."""
    on_cuda = next(unet.parameters()).device.type == "cuda"
    if fast is False or (fast is None and not on_cuda):
        return Engine(unet, vae, text_encoder)
    return FastEngine(unet, vae, text_encoder, fast if isinstance(fast, FastConfig) else None)
