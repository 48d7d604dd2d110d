"""Run diffusers' Stable Diffusion models on fastdiff's kernels.

    from fastdiff.integrations.diffusers import patch, unpatch

    pipe = StableDiffusionPipeline.from_pretrained(...)
    patch(pipe)      # pipe.unet and pipe.vae now run attention and GroupNorm+SiLU on fastdiff's kernels
    unpatch(pipe)    # the original processors and forwards again, bit for bit

What `patch` changes in a UNet2DConditionModel or AutoencoderKL (in a pipeline: its `unet` and `vae`):
  Attention      its processor becomes a `FastdiffAttnProcessor`, which computes self- and cross-attention
                 with `fastdiff.ops.attention` and otherwise follows diffusers' AttnProcessor2_0 step for step;
  ResnetBlock2D  its forward becomes one that runs norm1 -> SiLU and norm2 -> SiLU as one fused
                 `fastdiff.ops.group_norm(..., activation="silu")` each.
Nothing else changes: the projections (and the LoRA layers PEFT wraps around to_q / to_k / to_v / to_out
and the convolutions) are still called as modules, the text encoder and scheduler are untouched. The ops
seam picks the implementation: the Triton kernels on CUDA, the plain-PyTorch reference on the CPU and for
shapes a kernel does not cover (the SD VAE's 512-wide attention head).

`patch` inspects everything first and raises ValueError, naming each module it cannot handle, before it
changes anything: a model is never left half patched. Patch before `torch.compile` (the ops are
`torch.library.triton_op`s: inductor traces into them and launches the Triton kernels from its own code) and
before enabling CPU offload.

diffusers is imported only when `patch` or `unpatch` runs.
"""
import types
from typing import Optional

import torch
from torch import Tensor, nn

from fastdiff import ops


class FastdiffAttnProcessor:
    """A diffusers attention processor computing softmax(q k^T * attn.scale) v with `fastdiff.ops.attention`.

    Handles what diffusers' AttnProcessor2_0 handles for Stable Diffusion models: (B, S, C) and (B, C, H, W)
    hidden states (the VAE's mid-block attention), spatial_norm, group_norm, norm_cross, residual_connection
    and rescale_output_factor. Scores and softmax accumulate in float32, which covers upcast_attention and
    upcast_softmax. A call with an attention mask goes to `original`, the processor this one replaced:
    the kernels take no mask.
    """

    def __init__(self, original):
        self.original = original

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None) -> Tensor:
        if attention_mask is not None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # (B, HW, C)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # (B, Sq, H * D)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)  # (B, Skv, H * D)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # (B, S, H, D) buffers seen as (B, H, S, D): the kernel takes any strides and writes its output in
        # q's layout, so no copy is made on the way in or out.
        q = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        k = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        v = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        hidden_states = ops.attention(q, k, v, attn.scale)  # (B, H, Sq, D)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _group_norm_silu(norm: nn.GroupNorm, x: Tensor) -> Tensor:
    """SiLU(norm(x)) in one fused op; x: (N, C, H, W)."""
    return ops.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, activation="silu")


def _fused_resnet_forward(self, input_tensor: Tensor, temb: Optional[Tensor], *args, **kwargs) -> Tensor:
    """diffusers' ResnetBlock2D.forward with each GroupNorm -> SiLU pair fused. Installed on the instance
    (`block.forward`); `unpatch` deletes it, which brings back the class's forward."""
    if args or kwargs:  # the deprecated `scale` argument: let diffusers warn about it as it always does
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    hidden_states = _group_norm_silu(self.norm1, input_tensor)
    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:  # as diffusers: upsample_nearest_nhwc fails on large batches
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)
    hidden_states = self.conv1(hidden_states)

    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = self.nonlinearity(temb)
        temb = self.time_emb_proj(temb)[:, :, None, None]  # (N, C or 2C, 1, 1)
    if self.time_embedding_norm == "scale_shift":  # the affine sits between norm and SiLU: nothing to fuse
        if temb is None:
            raise ValueError(f"temb must be given when time_embedding_norm is {self.time_embedding_norm!r}")
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        hidden_states = self.norm2(hidden_states) * (1 + time_scale) + time_shift
        hidden_states = self.nonlinearity(hidden_states)
    else:  # "default", or the VAE's "group" (no time embedding)
        if self.time_embedding_norm == "default" and temb is not None:
            hidden_states = hidden_states + temb
        hidden_states = _group_norm_silu(self.norm2, hidden_states)

    hidden_states = self.dropout(hidden_states)
    hidden_states = self.conv2(hidden_states)
    if self.conv_shortcut is not None:
        if self.training:  # as diffusers: avoids DDP's gradient stride warning
            input_tensor = input_tensor.contiguous()
        input_tensor = self.conv_shortcut(input_tensor)
    return (input_tensor + hidden_states) / self.output_scale_factor


def _is_fused(block: nn.Module) -> bool:
    forward = block.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _fused_resnet_forward


def _targets(obj) -> list[tuple[str, nn.Module]]:
    """(name, model) for each model `patch` and `unpatch` work on; ValueError for anything else."""
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel

    supported = (UNet2DConditionModel, AutoencoderKL)
    if isinstance(obj, torch._dynamo.eval_frame.OptimizedModule):
        raise ValueError(f"got a torch.compile'd {type(obj._orig_mod).__name__}: patch the model first and "
                         "compile it after (`patch(model); model = torch.compile(model)`)")
    if isinstance(obj, supported):
        return [(type(obj).__name__, obj)]
    if not isinstance(obj, DiffusionPipeline):
        raise ValueError("expected a diffusers pipeline, UNet2DConditionModel or AutoencoderKL, "
                         f"got {type(obj).__module__}.{type(obj).__name__}")
    targets = []
    for name, expected in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL)):
        model = getattr(obj, name, None)
        if model is None:
            continue
        if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
            raise ValueError(f"{type(obj).__name__}.{name} is torch.compile'd: patch the pipeline first and "
                             f"compile after (`patch(pipe); pipe.{name} = torch.compile(pipe.{name})`)")
        if not isinstance(model, expected):
            raise ValueError(f"{type(obj).__name__}.{name} is a {type(model).__name__}, expected "
                             f"{expected.__name__}")
        targets.append((name, model))
    if not targets:
        raise ValueError(f"{type(obj).__name__} has no `unet` or `vae` to patch "
                         f"(its components: {sorted(getattr(obj, 'components', {}))})")
    return targets


def _attention_problem(attn) -> Optional[str]:
    """Why FastdiffAttnProcessor cannot stand in for this Attention's processor, or None."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processor = attn.processor
    if isinstance(processor, FastdiffAttnProcessor):
        return "is already patched (call unpatch first)"
    if type(processor) not in (AttnProcessor, AttnProcessor2_0):
        return (f"has processor {type(processor).__name__}; only diffusers' default AttnProcessor2_0 / "
                "AttnProcessor can be replaced (IP-Adapter, sliced, fused-QKV, xformers and custom "
                "processors are not)")
    features = {"added_kv_proj_dim": getattr(attn, "added_kv_proj_dim", None) is not None,
                "qk_norm": getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None,
                "kv_heads": getattr(attn, "inner_kv_dim", attn.inner_dim) != attn.inner_dim,
                "pre_only": getattr(attn, "to_out", None) is None,
                "is_causal": getattr(attn, "is_causal", False)}
    unhandled = [name for name, used in features.items() if used]
    if unhandled:
        return f"uses {', '.join(unhandled)}, which FastdiffAttnProcessor does not handle"
    return None


def _resnet_problem(block) -> Optional[str]:
    """Why the fused forward cannot stand in for this ResnetBlock2D's forward, or None."""
    from diffusers.models.resnet import ResnetBlock2D

    if _is_fused(block):
        return "is already patched (call unpatch first)"
    if "forward" in block.__dict__:
        return ("has its forward replaced on the instance (a hook, e.g. accelerate's CPU offload): patch "
                "before enabling offload")
    if type(block).forward is not ResnetBlock2D.forward:
        return f"is a {type(block).__name__}, which overrides ResnetBlock2D.forward"
    for name in ("norm1", "norm2"):
        norm = getattr(block, name)
        if type(norm) is not nn.GroupNorm:
            return f"has {name} of type {type(norm).__name__}, expected torch.nn.GroupNorm"
        if hasattr(norm, "_hf_hook"):
            return f"has an accelerate hook on {name} (sequential CPU offload): patch before enabling offload"
    if type(block.nonlinearity) is not nn.SiLU:
        return f"has nonlinearity {type(block.nonlinearity).__name__}; the fused kernel computes SiLU"
    return None


def _modules_of(model: nn.Module, cls) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, cls)]


def patch(obj, attention: bool = True, group_norm: bool = True):
    """Run a diffusers pipeline's (or one model's) attention and GroupNorm+SiLU on fastdiff's kernels.

    obj: a DiffusionPipeline (its `unet` and `vae` are patched), a UNet2DConditionModel or an AutoencoderKL.
    attention: replace every Attention's processor with a FastdiffAttnProcessor.
    group_norm: fuse GroupNorm -> SiLU in every ResnetBlock2D.
    Raises ValueError, before changing anything, naming every module that cannot be patched (unsupported
    processor or block, already patched, compiled or hooked models). Returns obj.
    """
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    if not attention and not group_norm:
        raise ValueError("nothing to patch: attention and group_norm are both False")
    attentions, resnets, problems = [], [], []
    for prefix, model in _targets(obj):
        if attention:
            for name, attn in _modules_of(model, Attention):
                problem = _attention_problem(attn)
                if problem:
                    problems.append(f"{prefix}.{name} {problem}")
                attentions.append(attn)
        if group_norm:
            for name, block in _modules_of(model, ResnetBlock2D):
                problem = _resnet_problem(block)
                if problem:
                    problems.append(f"{prefix}.{name} {problem}")
                resnets.append(block)
    if problems:
        shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(f"cannot patch {type(obj).__name__}, nothing was changed:\n  {shown}")
    for op in ("attention", "group_norm"):  # a first call imports the op, which torch.compile cannot trace
        ops.preload(op)
    for attn in attentions:
        attn.set_processor(FastdiffAttnProcessor(attn.processor))
    for block in resnets:
        block.forward = types.MethodType(_fused_resnet_forward, block)
    return obj


def unpatch(obj):
    """Undo `patch`: every FastdiffAttnProcessor gives way to the processor it replaced, every fused
    ResnetBlock2D gets its class's forward back. Modules `patch` did not change are left alone. Returns obj."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    for _, model in _targets(obj):
        for _, attn in _modules_of(model, Attention):
            if isinstance(attn.processor, FastdiffAttnProcessor):
                attn.set_processor(attn.processor.original)
        for _, block in _modules_of(model, ResnetBlock2D):
            if _is_fused(block):
                del block.forward
    return obj


def is_patched(obj) -> bool:
    """Whether any Attention or ResnetBlock2D of obj's models runs on fastdiff's kernels."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    for _, model in _targets(obj):
        if any(isinstance(attn.processor, FastdiffAttnProcessor) for _, attn in _modules_of(model, Attention)):
            return True
        if any(_is_fused(block) for _, block in _modules_of(model, ResnetBlock2D)):
            return True
    return False
