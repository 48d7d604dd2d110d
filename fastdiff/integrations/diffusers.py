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

The whole fast path, for StableDiffusionPipeline and StableDiffusionImg2ImgPipeline:

    from fastdiff.integrations.diffusers import accelerate, deaccelerate

    accelerate(pipe)     # pipe(...) as before; its UNet, VAE decoder and text encoder run on fastdiff's FastEngine
    deaccelerate(pipe)   # diffusers' own modules again, bit for bit

`accelerate` builds fastdiff's models over the pipeline's own Parameter objects (one copy of the weights) and
replaces the modules' forward (the VAE's decode) on the instance; see its docstring for what it refuses.

diffusers is imported only when `patch`, `unpatch`, `accelerate` or `deaccelerate` runs.
"""
import types
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor, nn

from fastdiff import ops
from fastdiff.engine import IF_REPEATED, FastConfig, FastEngine
from fastdiff import models as reference


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


# ---- the whole fast path: accelerate / deaccelerate ----------------------------------------------------------------

_ACCELERATION = "_fastdiff_acceleration"  # the pipeline attribute holding an `_Acceleration`
_PARTS = ("unet", "vae", "text_encoder")


@dataclass
class _Acceleration:
    """What `accelerate` did to a pipeline, for the forwards it installed and for `deaccelerate`.

    engine:  the FastEngine running the pipeline's models;
    models:  the pipeline's own diffusers / transformers modules, by part name;
    strides: every parameter of those modules with the strides its data had before (the engine may have made it
             channels_last, or a view into a fused projection), so `deaccelerate` can give it its own storage back.
    """

    engine: FastEngine
    models: dict[str, nn.Module]
    strides: list[tuple[nn.Parameter, tuple[int, ...]]] = field(default_factory=list)


def _unmerged_lora_layers(model: nn.Module) -> list[str]:
    """Names of the PEFT adapter layers in `model` whose active adapters are not merged into the base weights."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft, diffusers cannot have added adapter layers
        return []
    return [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer) and not m.disable_adapters
            and set(m.active_adapters) - set(m.merged_adapters)]


def _fastdiff_configs(models: dict[str, nn.Module]) -> dict:
    """fastdiff's model configs read from the diffusers / transformers configs, as fastdiff's loaders read a
    diffusers folder's config.json files; ValueError naming the model when one cannot be expressed."""
    readers = {"unet": (reference.UNetConfig, lambda m: dict(m.config)),
               "vae": (reference.VAEConfig, lambda m: dict(m.config)),
               "text_encoder": (reference.CLIPTextConfig, lambda m: m.config.to_dict())}
    configs = {}
    for part, (config_cls, settings) in readers.items():
        try:
            configs[part] = config_cls.from_dict(settings(models[part]))
        except (ValueError, TypeError) as e:
            raise ValueError(f"cannot accelerate: the {part} ({type(models[part]).__name__}) has a config fastdiff's "
                             f"models cannot express: {e}") from e
    return configs


def _check_acceleratable(pipe, config: FastConfig) -> dict[str, nn.Module]:
    """The pipeline's unet, vae and text encoder, after checking everything `accelerate` needs; ValueError naming
    the first problem otherwise. Changes nothing."""
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
    from diffusers import UNet2DConditionModel as DiffusersUNet
    from diffusers.models.attention_processor import Attention as DiffusersAttention
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from transformers import CLIPTextModel as TransformersCLIP

    if type(pipe) not in (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline):
        raise ValueError(f"cannot accelerate a {type(pipe).__module__}.{type(pipe).__name__}: only diffusers' "
                         "StableDiffusionPipeline and StableDiffusionImg2ImgPipeline are supported")
    if is_accelerated(pipe):
        raise ValueError(f"{type(pipe).__name__} is already accelerated (call deaccelerate first)")
    expected = {"unet": DiffusersUNet, "vae": DiffusersVAE, "text_encoder": TransformersCLIP}
    models = {part: getattr(pipe, part, None) for part in _PARTS}
    for part, cls in expected.items():
        if type(models[part]) is not cls:
            raise ValueError(f"cannot accelerate: {type(pipe).__name__}.{part} is a {type(models[part]).__name__}, "
                             f"expected {cls.__module__}.{cls.__name__} (not compiled, not wrapped)")
        if "forward" in models[part].__dict__ or hasattr(models[part], "_hf_hook"):
            raise ValueError(f"cannot accelerate: {type(pipe).__name__}.{part} has a hook or a replaced forward "
                             "(e.g. CPU offload): accelerate before enabling offload")
    if is_patched(pipe):
        raise ValueError(f"cannot accelerate: {type(pipe).__name__} is patched (call unpatch first)")
    for part in ("unet", "vae"):
        for name, attn in _modules_of(models[part], DiffusersAttention):
            if type(attn.processor) not in (AttnProcessor, AttnProcessor2_0):
                raise ValueError(f"cannot accelerate: {part}.{name} has processor {type(attn.processor).__name__}; "
                                 "only diffusers' default AttnProcessor2_0 / AttnProcessor run on fastdiff "
                                 "(IP-Adapter, fused-QKV and custom processors do not)")
    for part in ("unet", "text_encoder"):
        unmerged = _unmerged_lora_layers(models[part])
        if unmerged:
            raise ValueError(f"cannot accelerate: {part} has LoRA adapter layers that are not fused ({unmerged[0]}"
                             f"{f' and {len(unmerged) - 1} more' if len(unmerged) > 1 else ''}): call "
                             "pipe.fuse_lora() first, or unload them (pipe.unload_lora_weights())")
    dtype, device = models["unet"].dtype, models["unet"].device
    if config.dtype is not None and config.dtype != dtype:
        raise ValueError(f"cannot accelerate: FastConfig(dtype={config.dtype}) differs from the pipeline's dtype "
                         f"{dtype}; convert the pipeline (pipe.to({config.dtype})) instead")
    for part in ("vae", "text_encoder"):
        if models[part].device != device:
            raise ValueError(f"cannot accelerate: the {part} is on {models[part].device}, the unet on {device}")
    if config.cuda_graphs and device.type != "cuda":
        raise ValueError(f"cannot accelerate with FastConfig(cuda_graphs=True): the unet is on {device}; pass "
                         "cuda_graphs=False or move the pipeline to a CUDA device")
    return models


def _base_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """model.state_dict(keep_vars=True) (the Parameter objects themselves) without PEFT's adapter layers: a layer
    PEFT wrapped (LoRAs fused into it) contributes its base layer's parameters under the layer's own keys."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return model.state_dict(keep_vars=True)
    wrapped = [name + "." for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    state = {}
    for key, value in model.state_dict(keep_vars=True).items():
        prefix = next((p for p in wrapped if key.startswith(p)), None)
        if prefix is None:
            state[key] = value
        elif key.startswith(prefix + "base_layer."):
            state[prefix + key[len(prefix + "base_layer."):]] = value
    return state


def _sharing_model(cls: type, config, model: nn.Module) -> nn.Module:
    """fastdiff's `cls(config)` whose parameters are `model`'s own Parameter objects (built on the meta device,
    then assigned): no second copy, and anything done to a parameter later is seen by both. ValueError when the
    state-dict keys or shapes do not match."""
    with torch.device("meta"):
        fast = cls(config).eval()
    state = _base_state_dict(model)
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    try:
        fast.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        message = str(e) if len(str(e)) <= 1000 else str(e)[:1000] + " ..."
        raise ValueError(f"cannot accelerate: the {type(model).__name__}'s weights do not fit fastdiff's "
                         f"{cls.__name__}: {message}") from e
    finally:  # assign=True gives each Parameter the meta module's requires_grad: put the model's back
        for p in model.parameters():
            p.requires_grad_(requires_grad[id(p)])
    return fast


def _restore_parameters(strides: list[tuple[nn.Parameter, tuple[int, ...]]]) -> None:
    """Give every parameter whose data the engine re-laid out (channels_last) or made a view of a fused tensor
    back a storage of its own, in its former strides. Values are untouched."""
    with torch.no_grad():
        for p, stride in strides:
            data = p.data
            own = data.untyped_storage().nbytes() == data.numel() * data.element_size()
            if data.stride() != stride or not own:
                p.data = torch.empty_strided(data.shape, stride, dtype=data.dtype, device=data.device).copy_(data)


class _UNetForward:
    """diffusers' UNet2DConditionModel.forward, computed by a FastEngine. Installed on the UNet instance
    (`unet.forward`), so the pipeline, its config reads and LoRA loading keep the real UNet object.

    One model_fn (`FastEngine.denoiser`) serves every step while encoder_hidden_states is the same tensor
    (same object, unchanged since), so the context's cross-attention K/V projections are computed once per
    prompt. With guidance the latents diffusers passes twice, [x; x], are run once (the engine's cfg="if_repeated":
    inside a CUDA graph the GPU itself sees that the halves are equal)."""

    def __init__(self, engine: FastEngine, unet: nn.Module):
        self.engine, self.unet = engine, unet
        self._context: Optional[tuple[Tensor, int, tuple[int, ...]]] = None  # (tensor, _version, shape) held
        self._model_fn = None
        self._schedule: Optional[tuple[Tensor, int, Tensor]] = None  # (timesteps, _version, their float32 copy)

    def _timestep(self, t: Tensor) -> Tensor:
        """t, or where it is a 0-d view of a 1-D non-float32 schedule (diffusers' `for t in timesteps` over integer
        timesteps) the same value as a view of a float32 copy of that schedule: FastEngine then computes the time
        features of the whole schedule at once instead of every step's."""
        base = t._base
        if t.dim() != 0 or base is None or base.dim() != 1 or not base.is_contiguous() or base.dtype == torch.float32:
            return t
        if self._schedule is None or self._schedule[0] is not base or self._schedule[1] != base._version:
            self._schedule = (base, base._version, base.to(torch.float32))
        return self._schedule[2][t.storage_offset() - base.storage_offset()]

    def _denoiser(self, context: Tensor):
        key = (context._version, tuple(context.shape))
        if self._context is None or self._context[0] is not context or self._context[1:] != key:
            unmerged = _unmerged_lora_layers(self.unet)
            if unmerged:
                raise ValueError(f"the accelerated unet has LoRA adapter layers that are not fused ({unmerged[0]}): "
                                 "call pipe.fuse_lora() (its weights are shared with fastdiff's), or deaccelerate")
            self._model_fn = self.engine.denoiser(context, cfg=IF_REPEATED)
            self._context = (context, *key)
        return self._model_fn

    def __call__(self, sample: Tensor, timestep: Union[Tensor, float, int], encoder_hidden_states: Tensor,
                 class_labels: Optional[Tensor] = None, timestep_cond: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, cross_attention_kwargs: Optional[dict] = None,
                 added_cond_kwargs: Optional[dict] = None,
                 down_block_additional_residuals: Optional[tuple[Tensor, ...]] = None,
                 mid_block_additional_residual: Optional[Tensor] = None,
                 down_intrablock_additional_residuals: Optional[tuple[Tensor, ...]] = None,
                 encoder_attention_mask: Optional[Tensor] = None, return_dict: bool = True):
        """As diffusers' forward: sample (B, C, h, w), one timestep for the batch, encoder_hidden_states (B, T, D)
        -> UNet2DConditionOutput(sample) or (sample,), in sample's dtype. Arguments fastdiff's UNet does not take
        raise ValueError rather than being ignored."""
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        unsupported = {"class_labels": class_labels, "timestep_cond": timestep_cond, "attention_mask": attention_mask,
                       "cross_attention_kwargs": cross_attention_kwargs, "added_cond_kwargs": added_cond_kwargs,
                       "down_block_additional_residuals": down_block_additional_residuals,
                       "mid_block_additional_residual": mid_block_additional_residual,
                       "down_intrablock_additional_residuals": down_intrablock_additional_residuals,
                       "encoder_attention_mask": encoder_attention_mask}
        given = [name for name, value in unsupported.items() if value is not None]
        if given:
            raise ValueError(f"the accelerated unet does not take {', '.join(given)} (fastdiff's UNet has no such "
                             "input); deaccelerate the pipeline to use it")
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(float(timestep), device=sample.device)
        elif timestep.dim() > 0:
            if timestep.numel() != 1:
                raise ValueError(f"the accelerated unet takes one timestep for the batch, got shape "
                                 f"{tuple(timestep.shape)}")
            timestep = timestep.reshape(())
        model_fn, t = self._denoiser(encoder_hidden_states), self._timestep(timestep)
        out = model_fn(sample, t)
        # with CUDA graphs `out` is a static buffer, rewritten by the next step: hand out a copy
        out = out.to(sample.dtype, copy=self.engine.config.cuda_graphs)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class _VAEDecode:
    """diffusers' AutoencoderKL.decode on the FastEngine's fused decoder, installed on the VAE instance
    (`vae.decode`). With slicing or tiling enabled diffusers' own decode runs (on the same weights)."""

    def __init__(self, engine: FastEngine, vae: nn.Module):
        self.engine, self.vae = engine, vae

    def __call__(self, z: Tensor, return_dict: bool = True, generator: Optional[torch.Generator] = None):
        """Scaled-back latents (B, 4, h, w) -> DecoderOutput(sample) or (sample,), images (B, 3, H, W)."""
        from diffusers.models.autoencoders.vae import DecoderOutput

        if self.vae.use_slicing or self.vae.use_tiling:
            return type(self.vae).decode(self.vae, z, return_dict=return_dict, generator=generator)
        images = self.engine.decode(z.to(self.vae.dtype)).contiguous()
        return DecoderOutput(sample=images) if return_dict else (images,)


class _TextEncoderForward:
    """transformers' CLIPTextModel.forward on the FastEngine's fused text encoder when it is asked only for the
    final hidden states (input_ids alone, as StableDiffusionPipeline asks without clip_skip); any other call
    (attention_mask, position_ids, output_hidden_states, ...) runs transformers' own forward on the same weights."""

    def __init__(self, engine: FastEngine, text_encoder: nn.Module):
        self.engine, self.text_encoder = engine, text_encoder

    def __call__(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                 position_ids: Optional[Tensor] = None, **kwargs):
        """input_ids (B, T) -> BaseModelOutputWithPooling(last_hidden_state (B, T, D), pooler_output (B, D))."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if input_ids is None or attention_mask is not None or position_ids is not None or any(kwargs.values()):
            return type(self.text_encoder).forward(self.text_encoder, input_ids, attention_mask, position_ids,
                                                   **kwargs)
        if _unmerged_lora_layers(self.text_encoder):
            raise ValueError("the accelerated text encoder has LoRA adapter layers that are not fused: call "
                             "pipe.fuse_lora() (its weights are shared with fastdiff's), or deaccelerate")
        hidden = self.engine.encode_text(input_ids)  # (B, T, D)
        # transformers' pooled output: the hidden state at the first end-of-text token (the highest id for
        # configs that predate its eos_token_id fix, which have eos_token_id 2)
        eos = self.text_encoder.config.eos_token_id
        ids = input_ids.to(dtype=torch.int, device=hidden.device)
        positions = ids.argmax(dim=-1) if eos == 2 else (ids == eos).int().argmax(dim=-1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)


_FORWARDS = {"unet": ("forward", _UNetForward), "vae": ("decode", _VAEDecode),
             "text_encoder": ("forward", _TextEncoderForward)}


def accelerate(pipe, config: Optional[FastConfig] = None):
    """Run a diffusers StableDiffusionPipeline or StableDiffusionImg2ImgPipeline (SD1.x/SD2.x) on fastdiff's
    FastEngine, while it is still called as before: `pipe(prompt, ...)` with diffusers' arguments, schedulers
    and callbacks.

    The UNet, the VAE's decoder and the text encoder (when asked for the final hidden states only) run on the
    engine; the VAE's encoder (img2img) and everything else stay diffusers'. The pipeline keeps its module
    objects: their forward (the VAE's decode) is replaced on the instance. fastdiff's models hold the very
    Parameter objects of the pipeline's modules, so there is one copy of the weights, laid out as the engine
    wants it (channels_last convolutions, fused projections whose parameters are views), and weights changed in
    place later (`pipe.fuse_lora()`) are seen by both.

    config: the engine's FastConfig; default FastConfig(cuda_graphs=<the pipeline is on CUDA>). Its dtype must be
    None or the pipeline's. Raises ValueError, before changing anything, for another pipeline class, models or
    configs fastdiff cannot express, non-default attention processors, LoRA adapters not fused, a pipeline
    already accelerated, patched or hooked (CPU offload). Move the pipeline (pipe.to) before, not after.
    Returns pipe.
    """
    on_cuda = getattr(getattr(pipe, "unet", None), "device", torch.device("cpu")).type == "cuda"
    config = config if config is not None else FastConfig(cuda_graphs=on_cuda)
    models = _check_acceleratable(pipe, config)
    configs = _fastdiff_configs(models)
    classes = {"unet": reference.UNet2DConditionModel, "vae": reference.AutoencoderKL,
               "text_encoder": reference.CLIPTextModel}
    fast = {part: _sharing_model(classes[part], configs[part], models[part]) for part in _PARTS}
    strides = [(p, p.stride()) for part in _PARTS for p in models[part].parameters()]
    try:
        engine = FastEngine(fast["unet"], fast["vae"], fast["text_encoder"], config)
    except BaseException:
        _restore_parameters(strides)
        raise
    acceleration = _Acceleration(engine, models, strides)
    for part, (attribute, forward) in _FORWARDS.items():
        setattr(models[part], attribute, forward(engine, models[part]))
    setattr(pipe, _ACCELERATION, acceleration)
    return pipe


def deaccelerate(pipe):
    """Undo `accelerate`: the modules' own forward (and decode) again, every parameter with a storage of its own
    in its former layout, so the pipeline computes bit for bit what it did before. Returns pipe."""
    acceleration: Optional[_Acceleration] = getattr(pipe, _ACCELERATION, None)
    if acceleration is None:
        raise ValueError(f"{type(pipe).__name__} is not accelerated")
    for part, (attribute, _) in _FORWARDS.items():
        acceleration.models[part].__dict__.pop(attribute, None)
    _restore_parameters(acceleration.strides)
    delattr(pipe, _ACCELERATION)
    return pipe


def is_accelerated(pipe) -> bool:
    """Whether `accelerate` put this pipeline on fastdiff's engine (and `deaccelerate` has not undone it)."""
    return getattr(pipe, _ACCELERATION, None) is not None
