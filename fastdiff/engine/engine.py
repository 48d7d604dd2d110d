"""How the pipeline's models run: `Engine` runs them as written, `FastEngine` on the CUDA fast path.

    engine = make_engine(unet, vae, text_encoder, fast=None)   # FastEngine on CUDA, Engine elsewhere
    context = engine.encode_text(ids, clip_skip=None)          # (B', 77, D)
    model_fn = engine.denoiser(context, cfg=True)              # (x (B, 4, h, w) float32, t) -> float32 output
    model_fn = engine.denoiser(context, cfg="if_repeated")     # x (2B, ...), often [x; x] (diffusers' guidance)
    images = engine.decode(latents)                            # unscaled latents -> (B, 3, H, W) in [-1, 1]

SDXL (`make_engine(..., text_encoder_2=...)`; the refiner has no first text encoder): each encoder's penultimate
hidden states, the second's also pooled and projected, make the context and `text_embeds`; the denoiser takes
them with the size and crop conditioning `time_ids`:

    hidden_1, _ = engine.encode_penultimate(ids, clip_skip=None)                   # (B', 77, 768)
    hidden_2, pooled = engine.encode_penultimate(ids_2, clip_skip=None, second=True)  # (B', 77, 1280), (B', 1280)
    model_fn = engine.denoiser(cat([hidden_1, hidden_2], -1), cfg=True, text_embeds=pooled, time_ids=time_ids)

The pipeline holds one engine and never asks which one it is. FastEngine builds its fused modules from the loaded
ones (`FastUNet`, `fast_vae`, `fast_text_encoder`), sharing their parameters, and runs those; captures
the UNet call once per input shape as a CUDA graph and replays it; replays the text encoder from a graph too;
computes the context's cross-attention K/V projections once per prompt and the time features once per sampling
schedule (and, with SDXL's added conditioning, per prompt); and compiles every Triton kernel a new shape needs at
once before its first image (`compile_ahead`).
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
from fastdiff.kernels import compiling_ahead, start_compile_processes
from fastdiff.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel
from fastdiff.models.clip import CLIPAttention

from .config import FastConfig
from .graphs import CUDAGraphRunner, EqualHalvesGraphRunner
from .unet import FastUNet, concat_as_views, copy_sharing_parameters, replace_modules
from .vae import fast_vae

ModelFn = Callable[[Tensor, Tensor], Tensor]
IF_REPEATED = "if_repeated"  # `denoiser`'s cfg for rows that may be one latent twice
TIME_TABLES_KEPT = 16  # timestep tensors whose time features a FastEngine keeps (`FastEngine._time_features`)


def check_cfg(cfg) -> None:
    if not (isinstance(cfg, bool) or cfg == IF_REPEATED):
        raise ValueError(f"cfg must be True, False or {IF_REPEATED!r}, got {cfg!r}")


class Engine:
    """The models as written, in plain PyTorch: the CPU path (and any device with fast=False). `unet`, `vae`,
    `text_encoder` and SDXL's `text_encoder_2` are the modules an engine runs (FastEngine's are its fused ones);
    the SDXL refiner has no `text_encoder`."""

    def __init__(self, unet: nn.Module, vae: AutoencoderKL, text_encoder: Optional[CLIPTextModel],
                 text_encoder_2: Optional[CLIPTextModel] = None):
        self.unet, self.vae, self.text_encoder, self.text_encoder_2 = unet, vae, text_encoder, text_encoder_2

    graphs_captured = 0  # UNet CUDA graphs held

    def encode_text(self, ids: Tensor, clip_skip: Optional[int] = None) -> Tensor:
        """Token ids (B', 77) -> the text encoder's hidden states (B', 77, D)."""
        return self.text_encoder(ids, clip_skip=clip_skip)

    def encode_penultimate(self, ids: Tensor, clip_skip: Optional[int] = None, second: bool = False
                           ) -> tuple[Tensor, Optional[Tensor]]:
        """SDXL's reading of a text encoder (`CLIPTextModel.encode_penultimate`), the first or, with `second`, the
        second: token ids (B', 77) -> (penultimate hidden states (B', 77, D), and for the second encoder its
        pooled, projected output (B', P), else None)."""
        encoder = self._encoder(second)
        return encoder.encode_penultimate(encoder.embed(ids), ids if second else None, clip_skip)

    def _encoder(self, second: bool) -> CLIPTextModel:
        encoder = self.text_encoder_2 if second else self.text_encoder
        if encoder is None:
            raise ValueError(f"this engine has no {'second' if second else 'first'} text encoder")
        return encoder

    def denoiser(self, context: Tensor, cfg: Union[bool, str], text_embeds: Optional[Tensor] = None,
                 time_ids: Optional[Tensor] = None) -> ModelFn:
        """model_fn for `fastdiff.schedulers.sample`: (x (B, C, h, w) float32, t) -> the UNet's output float32,
        (2B, C, h, w) = [uncond; cond] rows when cfg (context then holds 2B rows), else (B, C, h, w).
        cfg="if_repeated": x has the context's 2B rows, which are often [x; x] (diffusers' guidance); a fast
        engine then runs them as cfg=True does, once. text_embeds (R, P) and time_ids (R, N), one row per context
        row: SDXL's added conditioning."""
        check_cfg(cfg)
        cfg = cfg is True
        unet, dtype = self.unet, next(self.unet.parameters()).dtype
        added = {} if text_embeds is None and time_ids is None else dict(text_embeds=text_embeds, time_ids=time_ids)

        def model_fn(x: Tensor, t: Tensor) -> Tensor:
            x = torch.cat([x, x]) if cfg else x  # (2B, ...) = [uncond; cond]
            return unet(x.to(dtype), t, context, **added).float()

        return model_fn

    def encode_image(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, 3, H, W) in [-1, 1], in the VAE's dtype -> the posterior's (mean, logvar), unscaled."""
        return self.vae.encode_distribution(pixels)

    def decode(self, latents: Tensor) -> Tensor:
        """Unscaled latents (B, 4, h, w) in the VAE's dtype -> images (B, 3, H, W), nominally in [-1, 1]."""
        return self.vae.decode(latents)

    def compile_ahead(self, key: tuple, x: Tensor, context: Tensor, rest: Callable[[], None],
                      text_embeds: Optional[Tensor] = None, time_ids: Optional[Tensor] = None) -> None:
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

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: Optional[CLIPTextModel],
                 config: Optional[FastConfig] = None, text_encoder_2: Optional[CLIPTextModel] = None):
        self.config = config = config or FastConfig()
        device = next(unet.parameters()).device
        if config.cuda_graphs and device.type != "cuda":
            raise ValueError(f"CUDA graphs need the UNet on a CUDA device, it is on {device}; move it there, or "
                             f"pass FastConfig(cuda_graphs=False) to run the fused modules without graphs")
        encoders = [None if e is None else fast_text_encoder(e, config) for e in (text_encoder, text_encoder_2)]
        super().__init__(FastUNet(unet, config), fast_vae(vae, config), *encoders)
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
        self._choice_calls = None  # `_unet_calls_if_repeated`'s graphs, which choose on the GPU
        if config.cuda_graphs and EqualHalvesGraphRunner.available():
            self._choice_calls = EqualHalvesGraphRunner(self._call_unet, config.warmup, (2,) if self._projects else (),
                                                        config.memset_kernels)
        self._projector = self._graphed(self._project, (0,)) if self._projects else None
        self._text_calls: dict[Optional[int], Callable[[Tensor], Tensor]] = {}  # per clip_skip
        self._penultimate_calls: dict[tuple[bool, Optional[int]], Callable[..., Tensor]] = {}  # per (second, clip_skip)
        self._contexts: dict[tuple, Tensor] = {}  # one context buffer per shape, rewritten for each prompt
        self._holders: dict[tuple, ModelFn] = {}  # the model_fn whose context each buffer holds
        # `_time_features`: the timestep tensors a sampler steps through (with SDXL's conditioning), each with its
        # rows of time features
        self._time_tables: dict[tuple, tuple[tuple, tuple[int, ...], Tensor]] = {}
        fused_time = (self.unet.fused_time_weight, self.unet.fused_time_bias,
                      self.unet.fused_conv1_bias)
        add_embedding = [] if self.unet.add_embedding is None else list(self.unet.add_embedding.parameters())
        self._time_inputs = [*self.unet.time_embedding.parameters(), *add_embedding,
                             *(t for t in fused_time if t is not None)]
        self._compiled_for: set[tuple] = set()  # shapes whose Triton kernels `compile_ahead` compiled
        prepare_engine(device, config)

    def _graphed(self, fn: Callable[..., Tensor], by_reference: tuple[int, ...] = ()) -> Callable[..., Tensor]:
        """fn replayed from CUDA graphs (one per input signature), or fn itself with cuda_graphs off."""
        if not self.config.cuda_graphs:
            return fn
        return CUDAGraphRunner(fn, self.config.warmup, by_reference, self.config.memset_kernels)

    @property
    def graphs_captured(self) -> int:
        """UNet CUDA graphs held (one per input shape and guidance mode)."""
        return sum(calls.captured for calls in (self._unet_calls, self._choice_calls)
                   if isinstance(calls, CUDAGraphRunner))

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

    def encode_penultimate(self, ids: Tensor, clip_skip: Optional[int] = None, second: bool = False
                           ) -> tuple[Tensor, Optional[Tensor]]:
        """As Engine.encode_penultimate, on the fused encoders, replayed from graphs as `encode_text`. A graph has
        one output: the second encoder's hidden states and pooled output leave it side by side in one row per
        prompt, (B', T * D + P), and are split here."""
        encoder = self._encoder(second)
        call = self._penultimate_calls.get((second, clip_skip))
        if call is None:
            def run(x: Tensor, *ids: Tensor) -> Tensor:
                hidden, pooled = encoder.encode_penultimate(x, *ids, clip_skip=clip_skip)
                return hidden if pooled is None else torch.cat([hidden.flatten(1), pooled], dim=1)

            call = self._penultimate_calls[(second, clip_skip)] = self._graphed(run)
        x = encoder.embed(ids)  # (B', T, D)
        if not second:
            return call(x).clone(), None
        out = call(x, ids)
        b, t, d = x.shape
        return out[:, :t * d].reshape(b, t, d).clone(), out[:, t * d:].clone()

    # ---- the UNet --------------------------------------------------------------------------------------------

    def _input(self, x: Tensor) -> Tensor:
        fmt = torch.channels_last if self.config.channels_last else torch.contiguous_format
        return x.to(self.dtype, memory_format=fmt)

    @torch.no_grad()  # inference only: a graph's output is a static buffer
    def _call_unet(self, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        # With guidance x is shared by both halves of context: (2B, C, h, w) = [uncond; cond] comes out, and the
        # layers before the first cross-attention run on B rows (FastUNet.forward, "shared sample").
        return self._forward(self._input(x), None, context, temb=temb, out_dtype=torch.float32)

    def _unet_calls_if_repeated(self, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        """`_unet_calls` of 2B rows against context's 2B, where x is often one latent twice ([x; x], diffusers'
        guidance): equal halves run once, shared by both halves of the context as with cfg=True; the output is the
        same either way. With CUDA graphs the GPU compares the halves and the graph itself takes one way or the
        other (`EqualHalvesGraphRunner`); elsewhere the host compares them, which waits for the GPU."""
        half = x.shape[0] // 2
        if x.shape[0] % 2 or x.shape[0] != context.shape[0]:
            return self._unet_calls(x, temb, context)
        if self._choice_calls is not None and EqualHalvesGraphRunner.takes(x):
            return self._choice_calls(x, temb, context)
        return self._unet_calls(x[:half] if torch.equal(x[:half], x[half:]) else x, temb, context)

    def _time_features(self, t: Tensor, added: tuple[Tensor, ...] = ()) -> Tensor:
        """The UNet's `time_features` of a 0-d timestep shared by the batch: a (1, width) row, or with SDXL's
        added conditioning `added` = (text_embeds (R, P), time_ids (R, N)) one row per conditioning row, (R, width).
        A sampler passes `sched.model_timesteps[i]`, a view of a 1-D tensor: the rows of all its timesteps are
        then computed at once, kept with that tensor and the conditioning (until one of them or the time path's
        weights change: their version counters), and t's rows are found by its offset in it, host metadata only.
        So the graphs start from the rows, not from the timestep: the sinusoidal embedding and the time MLP, 15
        small ops, left every step (and SDXL's add embedding, computed with them once per prompt). Any other t is
        computed now."""
        base = t._base
        if not (t.dim() == 0 and base is not None and base.dim() == 1 and base.is_contiguous()
                and base.dtype == torch.float32 and base.device == t.device):
            return self.unet.time_features(t.reshape(()).to(torch.float32), 1, t.device, self.dtype,
                                           self.unet.add_embed(*added) if added else None)
        inputs = (base, *added)
        version = tuple(x._version for x in (*inputs, *self._time_inputs))
        key = tuple(id(x) for x in inputs)
        entry = self._time_tables.get(key)
        if entry is None or any(a is not b for a, b in zip(entry[0], inputs)) or entry[1] != version:
            while len(self._time_tables) >= TIME_TABLES_KEPT:
                del self._time_tables[next(iter(self._time_tables))]
            n = base.shape[0]
            if added:  # every timestep with every conditioning row: (n * R, width), timestep-major
                add_embeds = self.unet.add_embed(*added)  # (R, 4 * C0)
                rows = add_embeds.shape[0]
                table = self.unet.time_features(base.repeat_interleave(rows), n * rows, base.device, self.dtype,
                                                add_embeds.repeat(n, 1)).view(n, rows, -1)
            else:
                table = self.unet.time_features(base, n, base.device, self.dtype)[:, None]  # (n, 1, width)
            entry = self._time_tables[key] = (inputs, version, table)
        return entry[2][t.storage_offset() - base.storage_offset()]

    def weights_changed(self) -> None:
        """Drop the time features computed from the old weights (`_time_features`, with SDXL's add embedding) and
        the contexts' K/V projections (`denoiser`); both are computed again, into the buffers the graphs read,
        before the next step. The graphs themselves read the weights in place and stay valid."""
        self._time_tables.clear()
        self._holders.clear()

    def _project(self, buffer: Tensor) -> Tensor:
        self.unet.project_context(buffer)
        return buffer

    def eager_call(self, x: Tensor, t: Tensor, context: Tensor, text_embeds: Optional[Tensor] = None,
                   time_ids: Optional[Tensor] = None) -> Tensor:
        """One call of the fused UNet as `denoiser` makes it, but eager: no graph, no torch.compile; with guidance
        context has 2B rows and x is shared by both halves."""
        return self.unet(self._input(x), t.reshape(()).to(torch.float32), context.to(self.dtype),
                         text_embeds=text_embeds, time_ids=time_ids, out_dtype=torch.float32)

    def denoiser(self, context: Tensor, cfg: Union[bool, str], text_embeds: Optional[Tensor] = None,
                 time_ids: Optional[Tensor] = None) -> ModelFn:
        """As Engine.denoiser (cfg="if_repeated": `_unet_calls_if_repeated`). The returned output is a static buffer
        when CUDA graphs are on: the loop consumes it (the fused step reads it) before the next call rewrites it.

        The context is constant over the loop, so with fused projections (and no torch.compile) its
        cross-attention K/V projections are computed here, once, not in every step. They and the context live
        in one buffer per context shape, which the graphs read in place; a model_fn whose context is not the one
        held there (another denoiser of the same shape was made since) writes its own back and projects it again
        before its call. SDXL's added conditioning is constant too: it joins the time features, computed once
        per schedule and prompt (`_time_features`), so each step's graph takes that prompt's rows of them."""
        check_cfg(cfg)
        context = context.to(self.dtype)
        for module in self.unet.subpixel_upsamplers:  # weights loaded since the graphs were captured
            module.subpixel_weight()
        added = self._added_conditioning(context, text_embeds, time_ids)
        calls = self._unet_calls_if_repeated if cfg == IF_REPEATED else self._unet_calls
        if not self._projects:
            return lambda x, t: calls(x, self._time_features(t, added), context)
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
            return calls(x, self._time_features(t, added), held_context())

        held_context()  # project now, not inside the first step
        return model_fn

    def _added_conditioning(self, context: Tensor, text_embeds: Optional[Tensor], time_ids: Optional[Tensor]
                            ) -> tuple[Tensor, ...]:
        """(text_embeds, time_ids) on the UNet's device, checked now against the UNet and the context's rows
        (`FastUNet.add_embed` says what is missing or misshapen), or () for a UNet without an add embedding."""
        self.unet.add_embed(text_embeds, time_ids)  # raises for a missing, unexpected or misshapen input
        if self.unet.add_embedding is None:
            return ()
        if text_embeds.shape[0] != context.shape[0]:
            raise ValueError(f"text_embeds and time_ids have {text_embeds.shape[0]} rows, expected one per context "
                             f"row ({context.shape[0]})")
        return text_embeds.to(context.device), time_ids.to(context.device, torch.float32)

    # ---- the first image of a shape ------------------------------------------------------------------------

    def compile_ahead(self, key: tuple, x: Tensor, context: Tensor, rest: Callable[[], None],
                      text_embeds: Optional[Tensor] = None, time_ids: Optional[Tensor] = None) -> None:
        """Before the first image of a new shape (`key`): compile, all at once, every Triton kernel that sampling
        and decoding it will launch. The UNet runs eagerly, then `rest` (the sampling loop on a stand-in model,
        the decoder), inside `fastdiff.kernels.compiling_ahead`: their Triton launches do not run but hand their
        compiles to a thread pool, which the block waits for. With an empty kernel cache the first image then
        waits for about the slowest compile instead of the sum. Skipped under torch.compile (inductor compiles
        its own kernels)."""
        if self.config.compile is not None or key in self._compiled_for:
            return
        with compiling_ahead():
            self.eager_call(x, torch.zeros((), device=x.device), context, text_embeds, time_ids)  # outputs dropped
            rest()
        self._compiled_for.add(key)


def prepare_engine(device: Union[str, torch.device], fast: Union[None, bool, FastConfig] = None) -> None:
    """Get ready, ahead of the first image, what the engine `make_engine(..., fast)` builds for models on `device`
    needs seconds to start: on the fast path without torch.compile, the worker processes that compile its Triton
    kernels (`fastdiff.kernels.start_compile_processes`; each imports torch and Triton). A pipeline calls it
    before loading the weights. Idempotent; nothing for models off CUDA or `fast=False`."""
    config = fast if isinstance(fast, FastConfig) else FastConfig()
    if fast is not False and torch.device(device).type == "cuda" and config.compile is None:
        start_compile_processes()


def make_engine(unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: Optional[CLIPTextModel],
                fast: Union[None, bool, FastConfig] = None, text_encoder_2: Optional[CLIPTextModel] = None) -> Engine:
    """The engine for a pipeline's `fast` setting: None takes the fast path when the models are on a CUDA
    device; True or a FastConfig take it anyway; False runs the models as written. text_encoder_2: SDXL's second
    text encoder (the refiner's only one: text_encoder None)."""
    on_cuda = next(unet.parameters()).device.type == "cuda"
    if fast is False or (fast is None and not on_cuda):
        return Engine(unet, vae, text_encoder, text_encoder_2)
    return FastEngine(unet, vae, text_encoder, fast if isinstance(fast, FastConfig) else None, text_encoder_2)
