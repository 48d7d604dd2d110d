"""FastUNet (fastdiff.engine.unet) on the CPU in float32, against the reference UNet it is built from and against
diffusers': every fast-path technique (fused projections and time projections, projected contexts, the conv2d
seam, the shared sample, fused GEGLU, linear epilogues, folded biases, GroupNorm sums from their producers, the
out_dtype pass, the subpixel upsampler) leaves the output unchanged to float32 rounding; building it shares the
reference's parameter objects and state-dict keys and leaves the reference a working module."""
import contextlib
import copy
import importlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdiff import ops
from fastdiff.engine import FastConfig, FastUNet
from fastdiff.engine.unet import (FastAttention, FastBasicTransformerBlock, FastFeedForward, FastResnetBlock,
                                  FastTransformer2DModel, FastUpsample, concat_as_views, copy_sharing_parameters,
                                  replace_modules)
from fastdiff.models import UNet2DConditionModel, UNetConfig
from fastdiff.models.unet import BasicTransformerBlock, ResnetBlock2D, Transformer2DModel, Upsample2D
from tiny_models import rel, tiny_unet

KINDS = ["sd1", "sd2"]


def _unet_inputs(cfg: UNetConfig, batch: int = 2, h: int = 12, w: int = 10):
    return (torch.randn(batch, cfg.in_channels, h, w), torch.tensor([501.0, 17.0])[:batch],
            torch.randn(batch, 7, cfg.cross_attention_dim))


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


# ---- building: what FastUNet shares with the reference and what it leaves of it ---------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_fast_unet_shares_the_references_parameter_objects_and_state_dict_keys(kind):
    unet = tiny_unet(kind)
    keys = list(unet.state_dict())
    values = {k: v.clone() for k, v in unet.state_dict().items()}
    params = set(map(id, unet.parameters()))
    fast = FastUNet(unet, FastConfig())
    print(f"{kind}: {len(params)} parameters, {len(list(fast.parameters()))} in the FastUNet")
    assert set(map(id, fast.parameters())) == params  # the same objects: nothing copied
    assert set(map(id, unet.parameters())) == params  # and the reference kept its own
    assert sorted(fast.state_dict()) == sorted(keys)  # (in another order) the fused buffers are not persistent
    assert list(unet.state_dict()) == keys
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in values.items())


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("kind", KINDS)
def test_reference_unet_gives_the_same_output_after_a_fast_unet_was_built_from_it(kind, channels_last):
    """Building keeps every module of the reference and its values; only the layout changes (channels_last),
    which moves float32 rounding alone."""
    unet = tiny_unet(kind)
    x, t, ctx = _unet_inputs(unet.config)
    types = [(name, type(m)) for name, m in unet.named_modules()]
    before = unet(x, t, ctx)
    fast = FastUNet(unet, FastConfig(channels_last=channels_last))
    after = unet(x, t, ctx)
    print(f"{kind}: reference after building vs before: rel {rel(after, before):.2e}; FastUNet vs before "
          f"{rel(fast(x, t, ctx), before):.2e}")
    assert [(name, type(m)) for name, m in unet.named_modules()] == types  # no module of the reference replaced
    # converted in place, as documented
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == channels_last
    if channels_last:
        assert rel(after, before) <= 1e-5
    else:
        assert torch.equal(after, before)  # the fused projections are views: the same numbers, the same kernels
    assert rel(fast(x, t, ctx), before) <= 1e-5


def test_fast_unet_converts_the_reference_to_the_configured_dtype():
    unet = tiny_unet("sd1")
    fast = FastUNet(unet, FastConfig(dtype=torch.bfloat16, channels_last=False))
    assert all(p.dtype == torch.bfloat16 for p in unet.parameters())
    assert fast.fused_time_weight.dtype == torch.bfloat16  # fused after the conversion: still views
    assert not unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    attn = fast.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.to_q.weight.data_ptr() == attn.fused_weight.data_ptr()


def test_a_second_fast_unet_from_the_same_reference_leaves_the_first_following_loads():
    unet = tiny_unet("sd1")
    first = FastUNet(unet, FastConfig())
    FastUNet(unet, FastConfig(fuse_geglu=False))  # e.g. another engine over the same loaded models
    x, t, ctx = _unet_inputs(unet.config)
    other = tiny_unet("sd1")
    unet.load_state_dict(other.state_dict())
    err = rel(first(x, t, ctx), other(x, t, ctx))
    print(f"first FastUNet after a load into the reference: rel {err:.2e}")
    assert err <= 1e-5


def test_concat_as_views_keeps_the_parameter_objects_and_loads_reach_the_fused_tensor():
    layers = nn.Sequential(nn.Linear(4, 3), nn.Linear(4, 5))
    params = [layer.weight for layer in layers]
    values = [p.detach().clone() for p in params]
    fused = concat_as_views(list(layers), "weight")
    assert fused.shape == (8, 4) and torch.equal(fused, torch.cat(values))
    assert all(layer.weight is p and isinstance(p, nn.Parameter) for layer, p in zip(layers, params))
    assert params[0].data_ptr() == fused.data_ptr() and params[1].data_ptr() == fused[3:].data_ptr()
    assert list(layers.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    new = {k: torch.randn_like(v) for k, v in layers.state_dict().items()}
    layers.load_state_dict(new)  # copies into the parameters' data: the views
    assert torch.equal(fused, torch.cat([new["0.weight"], new["1.weight"]]))
    with torch.no_grad():
        fused[3:].mul_(2.0)  # and the other way: the layers compute with the fused tensor's rows
    x = torch.randn(2, 4)
    torch.testing.assert_close(layers[1](x), F.linear(x, 2.0 * new["1.weight"], new["1.bias"]))


def test_copy_sharing_parameters_shares_tensors_and_lets_the_copy_replace_modules():
    original = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.BatchNorm1d(4))
    clone = copy_sharing_parameters(original)
    assert all(a is b for a, b in zip(original.parameters(), clone.parameters()))
    assert all(a is b for a, b in zip(original.buffers(), clone.buffers()))
    replace_modules(clone, {nn.ReLU: lambda m: nn.GELU()})
    assert isinstance(clone[1], nn.GELU) and isinstance(original[1], nn.ReLU)


# ---- fused projections -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_fused_projections_match_unfused(kind):
    plain = tiny_unet(kind)
    x, t, ctx = _unet_inputs(plain.config)
    ref = plain(x, t, ctx)
    fused = FastUNet(copy.deepcopy(plain), FastConfig())
    unfused = FastUNet(copy.deepcopy(plain), FastConfig(fuse_projections=False))
    assert all(m.fused_weight is not None for m in fused.modules() if isinstance(m, FastAttention))
    assert all(m.fused_weight is None for m in unfused.modules() if isinstance(m, FastAttention))
    assert unfused.fused_time_weight is None
    out, separate = fused(x, t, ctx), unfused(x, t, ctx)
    err = (out - separate).abs()
    print(f"{kind}: fused q/k/v vs separate: max {err.max():.2e} mean {err.mean():.2e} rel {rel(out, separate):.2e}; "
          f"vs reference {rel(out, ref):.2e}")
    assert rel(out, separate) <= 1e-5
    assert rel(out, ref) <= 1e-5 and rel(separate, ref) <= 1e-5


def test_fused_projections_keep_state_dict_and_follow_loads():
    unet = tiny_unet("sd1")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    fast = FastUNet(unet, FastConfig())
    after = fast.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    # to_q/to_k/to_v are views into the fused tensor: loading new weights reaches the matmul that runs.
    attn = fast.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.to_k.weight.data_ptr() == attn.fused_weight[attn.to_q.weight.shape[0]:].data_ptr()
    x, t, ctx = _unet_inputs(unet.config)
    for load in (unet.load_state_dict, fast.load_state_dict):  # through the reference or the FastUNet
        other = tiny_unet("sd1")
        load(other.state_dict())
        ref, out = other(x, t, ctx), fast(x, t, ctx)
        print(f"after load_state_dict: rel {rel(out, ref):.2e}")
        assert rel(out, ref) <= 1e-5


def test_fused_time_projections_match_unfused_and_follow_loads():
    plain = tiny_unet("sd1")
    fused = FastUNet(copy.deepcopy(plain), FastConfig())
    assert fused.state_dict().keys() == plain.state_dict().keys()
    x, _, ctx = _unet_inputs(plain.config)
    for t in (torch.tensor(501.0), torch.tensor([501.0, 17.0])):  # one timestep for all, one per sample
        ref, out = plain(x, t, ctx), fused(x, t, ctx)
        print(f"fused time projections, t {tuple(t.shape)}: rel {rel(out, ref):.2e}")
        assert rel(out, ref) <= 1e-5
    other = tiny_unet("sd1")  # new weights reach the fused matmul through the views
    fused.load_state_dict(other.state_dict())
    ref, out = other(x, t, ctx), fused(x, t, ctx)
    print(f"after load_state_dict: rel {rel(out, ref):.2e}")
    assert rel(out, ref) <= 1e-5


@pytest.mark.parametrize("timestep", [torch.tensor(501.0), torch.tensor([501.0, 17.0]), 250],
                         ids=["0-d", "(B,)", "int"])
def test_time_features_are_silu_of_the_time_embedding_or_every_blocks_norm2_offset(timestep):
    """time_features without fused projections is SiLU of the reference's time_embed; with them, every ResNet
    block's time_emb_proj of it plus its conv1 bias, side by side in the blocks' order (`time_offsets`)."""
    unet = tiny_unet("sd1")
    temb = unet.time_embed(timestep, 2, torch.device("cpu"), torch.float32)  # (B or 1, 4 * C0)
    resnets = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    expected = torch.cat([r.time_emb_proj(F.silu(temb)) + r.conv1.bias for r in resnets], dim=1)
    plain = FastUNet(copy.deepcopy(unet), FastConfig(fuse_projections=False))
    fused = FastUNet(unet, FastConfig())
    silu = plain.time_features(timestep, 2, torch.device("cpu"), torch.float32)
    offsets = fused.time_features(timestep, 2, torch.device("cpu"), torch.float32)
    print(f"time features {tuple(offsets.shape)}: rel {rel(offsets, expected):.2e}")
    assert torch.equal(silu, F.silu(temb))
    assert offsets.shape == (temb.shape[0], sum(r.conv1.out_channels for r in resnets))
    assert rel(offsets, expected) <= 1e-6
    slices = [block.time_offsets for block in fused.resnet_blocks]
    assert [s.stop - s.start for s in slices] == [r.conv1.out_channels for r in resnets]
    assert all(a.stop == b.start for a, b in zip(slices, slices[1:]))


def test_time_features_computed_ahead_stand_for_the_timestep():
    """forward(sample, None, context, temb=time_features(...)) is forward(sample, timestep, context); a temb of
    the wrong batch is refused."""
    unet = tiny_unet("sd1")
    fast = FastUNet(unet, FastConfig())
    x, t, ctx = _unet_inputs(unet.config)
    temb = fast.time_features(t, 2, x.device, x.dtype)
    assert torch.equal(fast(x, None, ctx, temb=temb), fast(x, t, ctx))
    with pytest.raises(ValueError, match=r"temb must be \(1, width\) or \(2, width\)"):
        fast(x, None, ctx, temb=torch.cat([temb, temb]))


# ---- projected contexts --------------------------------------------------------------------------------------

def test_projected_context_matches_and_is_what_runs():
    unet = FastUNet(tiny_unet("sd2"), FastConfig())
    x, t, ctx = _unet_inputs(unet.config)
    x = _cl(x)
    ref = unet(x, t, ctx)
    unet.project_context(ctx)
    out = unet(x, t, ctx)
    print(f"projected context vs projected in the forward: rel {rel(out, ref):.2e}")
    assert torch.equal(out, ref)
    # The kept projections are what the forward reads: values written into the context after projecting are
    # not seen until it is projected again, and an equal copy of the context is projected in the forward.
    new = torch.randn_like(ctx)
    expected = unet(x, t, new.clone())
    ctx.copy_(new)
    assert torch.equal(unet(x, t, ctx), ref)
    unet.project_context(ctx)
    assert torch.equal(unet(x, t, ctx), expected)
    assert all(m.projected for m in unet.cross_attentions)
    unet.forget_contexts()
    assert all(not m.projected for m in unet.modules() if isinstance(m, FastAttention))


def test_project_context_needs_fused_cross_attention():
    unet = FastUNet(tiny_unet("sd1"), FastConfig(fuse_projections=False))
    with pytest.raises(ValueError, match="fuse_projections"):
        unet.project_context(torch.randn(2, 7, unet.config.cross_attention_dim))


# ---- the conv2d seam and the ops seam --------------------------------------------------------------------------

def test_resnet_convs_go_through_the_conv2d_seam(monkeypatch):
    """FastConfig.split_k_conv sends the ResNet blocks' 3x3 convs to ops.conv2d (which picks Triton's split-K
    kernel or cuDNN per shape); off, they call F.conv2d. Same outputs either way on the reference backend."""
    plain = tiny_unet("sd1")
    x, t, ctx = _unet_inputs(plain.config)
    x = _cl(x)
    ref = plain(x, t, ctx)
    calls = []
    conv2d = ops.conv2d
    monkeypatch.setattr(ops, "conv2d", lambda *args: (calls.append(args[1].shape), conv2d(*args))[1])
    off = FastUNet(copy.deepcopy(plain), FastConfig(split_k_conv=False))(x, t, ctx)
    assert calls == []
    on = FastUNet(plain, FastConfig())(x, t, ctx)
    resnets = [m for m in plain.modules() if isinstance(m, ResnetBlock2D)]
    assert len(calls) == 2 * len(resnets) and all(shape[2:] == (3, 3) for shape in calls)
    print(f"split_k_conv on vs off: rel {rel(on, off):.2e}; vs reference {rel(on, ref):.2e}")
    assert torch.equal(on, off)
    assert rel(on, ref) <= 1e-5


def _diffusers_twin(unet: UNet2DConditionModel):
    """diffusers' UNet2DConditionModel of the same config, loaded strictly with the reference's weights."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    theirs = DiffusersUNet(**{k: v for k, v in unet.config.to_dict().items() if not k.startswith("_")}).eval()
    theirs.load_state_dict(unet.state_dict(), strict=True)
    return theirs


@pytest.mark.parametrize("kind", KINDS)
def test_fast_unets_attention_and_group_norm_go_through_the_ops_seam(kind, monkeypatch):
    """Every attention and GroupNorm call of the FastUNet must reach the backend fastdiff.ops picks: count the
    calls that reach the reference backend and compare with the number of such layers in the model (the
    reference's, whose blocks are diffusers' one for one); the output is diffusers'."""
    unet = tiny_unet(kind)
    theirs = _diffusers_twin(unet)
    fast = FastUNet(unet, FastConfig(self_attention="fastdiff", cross_attention="fastdiff"))  # ops.attention
    calls = {"attention": 0, "group_norm": 0, "group_norm+silu": 0}
    attention_ref, group_norm_ref = ops._load("attention", "reference"), ops._load("group_norm", "reference")

    def counting_attention(*args):
        calls["attention"] += 1
        return attention_ref(*args)

    def counting_group_norm(*args):
        calls["group_norm+silu" if args[5] == "silu" else "group_norm"] += 1  # args[5]: the activation
        return group_norm_ref(*args)

    monkeypatch.setitem(ops._impl_cache, ("attention", "reference"), counting_attention)
    monkeypatch.setitem(ops._impl_cache, ("group_norm", "reference"), counting_group_norm)
    x, _, ctx = _unet_inputs(unet.config)
    with ops.use_backend("reference"), torch.no_grad():
        got = fast(_cl(x), 10, ctx)
    count = {cls: sum(isinstance(m, cls) for m in unet.modules())
             for cls in (BasicTransformerBlock, ResnetBlock2D, Transformer2DModel)}
    print(calls, {cls.__name__: n for cls, n in count.items()})
    assert calls["attention"] == 2 * count[BasicTransformerBlock]  # self- and cross-attention
    assert calls["group_norm+silu"] == 2 * count[ResnetBlock2D] + 1  # norm1, norm2; conv_norm_out
    assert calls["group_norm"] == count[Transformer2DModel]  # the transformers' input norm, no activation
    with torch.no_grad():
        expected = theirs(x, 10, ctx).sample
    print(f"{kind} FastUNet vs diffusers: rel {rel(got, expected):.2e}")
    assert rel(got, expected) <= 1e-5


# ---- against the reference, per setting ----------------------------------------------------------------------

@pytest.mark.parametrize("self_attention, cross_attention", [("sdpa", "fastdiff"), ("fastdiff", "sdpa"),
                                                             ("auto", "fastdiff"), ("matmul", "matmul")])
@pytest.mark.parametrize("kind", KINDS)
def test_fast_unet_matches_reference(kind, self_attention, cross_attention):
    plain = tiny_unet(kind)
    fast = FastUNet(copy.deepcopy(plain), FastConfig(self_attention=self_attention,
                                                     cross_attention=cross_attention))
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x, t, ctx = _unet_inputs(plain.config)
    ref = plain(x, t, ctx)
    out = fast(_cl(x), t, ctx)
    err = (out - ref).abs()
    print(f"{kind} self={self_attention} cross={cross_attention}: max {err.max():.2e} mean {err.mean():.2e} "
          f"rel {rel(out, ref):.2e}")
    assert out.shape == ref.shape
    assert rel(out, ref) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_fast_unet_with_every_technique_off_matches_reference_in_contiguous_memory(kind):
    plain = tiny_unet(kind)
    off = FastConfig(channels_last=False, fuse_projections=False, fuse_geglu=False, linear_epilogues=False,
                     fold_biases=False, subpixel_upsample=False, conv_bias_pass=False, group_sums=False,
                     split_k_conv=False)
    fast = FastUNet(copy.deepcopy(plain), off)
    x, t, ctx = _unet_inputs(plain.config)
    ref, out = plain(x, t, ctx), fast(x, t, ctx)
    print(f"{kind} every technique off: rel {rel(out, ref):.2e}")
    assert out.is_contiguous()
    assert rel(out, ref) <= 1e-5


def test_fast_attention_picks_the_implementation_for_its_head_dim():
    # SD1.5's levels at heads 8: 320 channels -> head dim 40, 640 -> 80, 1280 -> 160 (here with 2 heads).
    cfg = UNetConfig(block_out_channels=(80, 160, 320), layers_per_block=1, norm_num_groups=8,
                     cross_attention_dim=24, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D",) * 3,
                     up_block_types=("CrossAttnUpBlock2D",) * 3)
    unet = FastUNet(UNet2DConditionModel(cfg).eval(), FastConfig())
    picked = {(m.is_cross_attention, m.to_q.out_features // m.heads): m.attend
              for m in unet.modules() if isinstance(m, FastAttention)}
    print({key: fn.__name__ for key, fn in picked.items()})
    assert picked == {(False, 40): ops._auto_attention, (False, 80): ops._auto_attention,
                      (False, 160): ops._auto_attention, (True, 40): ops.attention, (True, 80): ops.attention,
                      (True, 160): ops.attention}


@pytest.mark.parametrize("kind", KINDS)
def test_fused_geglu_matches_unfused(kind, monkeypatch):
    """FastConfig(fuse_geglu=True), the default, runs every GEGLU's value * GELU(gate) through ops.geglu (the
    Triton kernel under the interpreter here; linear_epilogues off, which would take the gate into the
    projection's matmul) and changes neither the state dict nor, beyond float32 rounding, the output; with
    fuse_geglu=False the reference GEGLU module runs."""
    plain = tiny_unet(kind)
    fused = FastUNet(copy.deepcopy(plain), FastConfig(linear_epilogues=False))
    unfused = FastUNet(copy.deepcopy(plain), FastConfig(linear_epilogues=False, fuse_geglu=False))
    feedforwards = [m for m in fused.modules() if isinstance(m, FastFeedForward)]
    assert feedforwards and all(m.fuse_geglu for m in feedforwards)
    assert not any(m.fuse_geglu for m in unfused.modules() if isinstance(m, FastFeedForward))
    assert fused.state_dict().keys() == unfused.state_dict().keys() == plain.state_dict().keys()
    calls = []
    geglu = ops.geglu
    monkeypatch.setattr(ops, "geglu", lambda h: calls.append(h.shape) or geglu(h))
    x, t, ctx = _unet_inputs(plain.config)
    x = _cl(x)
    ref = unfused(x, t, ctx)
    assert calls == []
    with ops.use_backend("triton", op="geglu"):
        out = fused(x, t, ctx)
    assert len(calls) == len(feedforwards)
    err = (out - ref).abs()
    print(f"{kind} fused GEGLU (triton) vs eager: max {err.max():.2e} mean {err.mean():.2e} rel {rel(out, ref):.2e}")
    assert rel(out, ref) <= 1e-5
    assert rel(out, plain(x, t, ctx)) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_linear_epilogues_match_separate_passes(kind, monkeypatch):
    """FastConfig(linear_epilogues=True), the default, runs the GEGLU projection, the MLP's output Linear and
    proj_out through ops.linear with the gate or the residual in the kernel (forced to the Triton kernel under
    the interpreter here); the output equals the separate passes' to float32 rounding."""
    plain = tiny_unet(kind)
    # fold_biases off in both: it takes the MLP's output Linear from the epilogue (see the next test)
    fused = FastUNet(copy.deepcopy(plain), FastConfig(fold_biases=False))
    separate = FastUNet(copy.deepcopy(plain), FastConfig(linear_epilogues=False, fold_biases=False))
    x, t, ctx = _unet_inputs(plain.config)
    x = _cl(x)
    calls = []
    kernel = importlib.import_module("fastdiff.kernels.linear")  # the module; the package exports the function
    real = kernel.linear
    monkeypatch.setattr(kernel, "linear", lambda *a: calls.append(a[3] is not None) or real(*a))
    monkeypatch.setattr(ops, "_impl_cache", {})
    ref = separate(x, t, ctx)
    assert not calls
    with ops.use_backend("triton", op="linear"):
        out = fused(x, t, ctx)
    # per transformer block: the GEGLU projection and the MLP output (+ residual); per transformer: proj_out
    # (+ residual) unless its input is a shared sample still to be tiled (the first one under guidance)
    blocks = sum(isinstance(m, FastBasicTransformerBlock) for m in fused.modules())
    assert calls.count(False) == blocks and calls.count(True) >= blocks
    print(f"{kind} linear epilogues (triton) vs separate: rel {rel(out, ref):.2e}; {len(calls)} kernel calls")
    assert rel(out, ref) <= 1e-5
    assert rel(out, plain(x, t, ctx)) <= 1e-5


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kind", KINDS)
def test_folded_biases_match_the_linears_own(kind, backend, monkeypatch):
    """FastConfig(fold_biases=True), the default, runs every attention's to_out and every proj_in without its
    bias and adds the bias in the LayerNorm pass after it, and carries the MLP output's bias in the stream its
    matmul accumulates onto; the output equals the unfolded FastUNet's (and the reference's) to float32
    rounding, on the reference backend and on the Triton kernel (interpreter)."""
    plain = tiny_unet(kind)
    folded = FastUNet(copy.deepcopy(plain), FastConfig(linear_epilogues=False))
    unfolded = FastUNet(copy.deepcopy(plain), FastConfig(linear_epilogues=False, fold_biases=False))
    biases = []
    real = ops.add_layer_norm
    monkeypatch.setattr(ops, "add_layer_norm", lambda *a: biases.append((a[5] is not None, a[6] is not None))
                        or real(*a))
    x, t, ctx = _unet_inputs(plain.config)
    ref = unfolded(x, t, ctx)
    assert biases and not any(any(b) for b in biases)
    biases.clear()
    with ops.use_backend(backend, op="add_layer_norm"):
        out = folded(x, t, ctx)
    blocks = sum(isinstance(m, FastBasicTransformerBlock) for m in folded.modules())
    transformers = sum(isinstance(m, FastTransformer2DModel) for m in folded.modules())
    # to_out twice per block and proj_in once per transformer (residual_bias); the MLP's output per block
    # (stream_bias, with norm3, which also takes attn2's to_out bias)
    assert biases.count((True, False)) == blocks + transformers and biases.count((True, True)) == blocks
    print(f"{kind} folded biases ({backend}) vs the linears' own: rel {rel(out, ref):.2e}")
    assert rel(out, ref) <= 1e-5
    assert rel(out, plain(x, t, ctx)) <= 1e-5


# ---- the shared sample ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_shared_sample_matches_the_tiled_sample(kind):
    # classifier-free guidance: one latent per image, [uncond; cond] contexts; the layers before the first
    # cross-attention run on the latents once, the rows part there
    plain = tiny_unet(kind)
    fast = FastUNet(copy.deepcopy(plain), FastConfig())
    batch = 2
    sample = torch.randn(batch, 4, 8, 12)
    context = torch.randn(2 * batch, 7, plain.config.cross_attention_dim)
    block = fast.down_blocks[0].attentions[0].transformer_blocks[0]
    rows = []
    for attn in (block.attn1, block.attn2):
        attn.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    with torch.no_grad():
        shared = fast(sample, torch.tensor(420), context)
        tiled = fast(torch.cat([sample, sample]), torch.tensor(420), context)
        expected = plain(torch.cat([sample, sample]), torch.tensor(420), context)
    assert rows == [batch, 2 * batch, 2 * batch, 2 * batch]  # the first self-attention ran once per latent
    assert shared.shape == tiled.shape == (2 * batch, 4, 8, 12)
    print(f"{kind} shared vs tiled: rel {rel(shared, tiled):.2e}; vs the reference on the tiled sample "
          f"{rel(shared, expected):.2e}")
    assert rel(shared, tiled) <= 1e-5
    assert rel(shared, expected) <= 1e-5


def test_shared_sample_needs_whole_multiples_and_one_timestep():
    fast = FastUNet(tiny_unet("sd1"), FastConfig())
    sample = torch.randn(2, 4, 8, 8)
    dim = fast.config.cross_attention_dim
    with pytest.raises(ValueError, match=r"context has 3 rows, expected a multiple of sample's batch 2"):
        fast(sample, 10, torch.randn(3, 7, dim))
    with pytest.raises(ValueError, match=r"needs one timestep for the batch, got shape \(2,\)"):
        fast(sample, torch.tensor([10, 20]), torch.randn(4, 7, dim))
    temb = fast.time_features(torch.tensor([10, 20]), 2, sample.device, sample.dtype)
    with pytest.raises(ValueError, match=r"temb must be \(1, width\) for 2 samples and 4 contexts"):
        fast(sample, None, torch.randn(4, 7, dim), temb=temb)


@pytest.mark.parametrize("kind", KINDS)
def test_shared_sample_parts_without_tiles_on_the_triton_kernels(kind, monkeypatch):
    """Under guidance a latent's rows part inside the first transformer block. There the LayerNorm pass writes
    its outputs once per context row block (`copies`), proj_out's residual_add reads the transformer's input once
    per row block, and the decoder's channel_cat does the same with the skips taken before the parting (so do
    their summing variants, `FastConfig.group_sums`): no torch.cat tiles. On the (channels_last) FastUNet with
    those kernels (interpreter) the result must equal the same UNet run on the tiled sample."""
    plain = tiny_unet(kind)
    unet = FastUNet(copy.deepcopy(plain), FastConfig())
    sample = _cl(torch.randn(1, unet.config.in_channels, 12, 10))
    context = torch.randn(2, 7, unet.config.cross_attention_dim)
    tiles, cat = [], torch.cat  # a tile is a cat of one tensor with itself
    monkeypatch.setattr(torch, "cat", lambda ts, *a, **k: tiles.append(len({id(t) for t in ts}) < len(ts)) or cat(
        ts, *a, **k))
    monkeypatch.setattr(ops, "_impl_cache", {})
    with contextlib.ExitStack() as stack:
        for op in ("add_layer_norm", "residual_add", "channel_cat", "residual_add_sums", "channel_cat_sums"):
            stack.enter_context(ops.use_backend("triton", op=op))
        shared = unet(sample, 420, context)
    monkeypatch.undo()
    assert tiles and not any(tiles)
    tiled = unet(torch.cat([sample, sample]), 420, context)
    expected = plain(torch.cat([sample, sample]), 420, context)
    print(f"{kind} shared sample vs tiled, Triton kernels: rel {rel(shared, tiled):.2e}; vs reference "
          f"{rel(shared, expected):.2e}")
    assert shared.shape == tiled.shape == (2, unet.config.out_channels, 12, 10)
    assert rel(shared, tiled) <= 1e-5
    assert rel(shared, expected) <= 1e-5


# ---- GroupNorm sums -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_group_sums_from_the_producers_leave_the_output_unchanged(kind, monkeypatch):
    """FastConfig(group_sums=True), the default, has the kernels that write a GroupNorm's input sum it for the
    norm, the sums passed on as return values. On the Triton kernels (interpreter), with a shared sample, the
    output equals the same UNet's without the sums, and every producer's sums reach a norm."""
    plain = tiny_unet(kind)
    without = FastUNet(copy.deepcopy(plain), FastConfig(group_sums=False))
    summing = FastUNet(copy.deepcopy(plain), FastConfig())
    sample = _cl(torch.randn(1, plain.config.in_channels, 12, 10))
    context = torch.randn(2, 7, plain.config.cross_attention_dim)
    norms, producers = [], []
    real_norm, real_add, real_cat = ops.group_norm, ops.residual_add_sums, ops.channel_cat_sums
    monkeypatch.setattr(ops, "group_norm", lambda *a, **k: norms.append(k["sums"] is not None) or real_norm(*a, **k))
    monkeypatch.setattr(ops, "residual_add_sums", lambda *a: producers.append("add") or real_add(*a))
    monkeypatch.setattr(ops, "channel_cat_sums", lambda *a: producers.append("cat") or real_cat(*a))
    with contextlib.ExitStack() as stack:
        for op in ("group_norm", "residual_add", "channel_cat", "residual_add_sums", "channel_cat_sums"):
            stack.enter_context(ops.use_backend("triton", op=op))
        ref = without(sample, 420, context)
        assert not producers and not any(norms)
        out = summing(sample, 420, context)
    ups = sum(len(block.resnets) for block in summing.up_blocks)
    print(f"{kind} group sums vs none: rel {rel(out, ref):.2e}; {sum(norms)} of {len(norms)} norms took sums")
    assert producers.count("cat") == ups and sum(norms) == len(producers) > ups
    assert rel(out, ref) <= 1e-5
    assert rel(out, plain(torch.cat([sample, sample]), 420, context)) <= 1e-5


def test_group_sums_are_off_without_channels_last():
    fast = FastUNet(tiny_unet("sd1"), FastConfig(channels_last=False))
    assert fast.conv_in_sum_groups is None
    assert all(r.sum_groups is None for r in fast.resnet_blocks)
    assert not any(block.sum_concats for block in fast.up_blocks)


# ---- out_dtype -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grad", [False, True])
def test_out_dtype_gives_a_contiguous_output_of_that_dtype(grad):
    """forward(..., out_dtype=) adds conv_out's bias in the pass that casts and lays the output out; with
    autograd recording (out= has no gradient) it falls back to conv_out and a copy. Same values either way."""
    plain = tiny_unet("sd1").requires_grad_(grad)
    fast = FastUNet(copy.deepcopy(plain), FastConfig())
    x = _cl(torch.randn(2, 4, 8, 8))
    t, context = torch.tensor([3.0, 500.0]), torch.randn(2, 5, plain.config.cross_attention_dim)
    with torch.set_grad_enabled(grad):
        ref = fast(x, t, context)
        out = fast(x, t, context, out_dtype=torch.float64)
    assert out.dtype == torch.float64 and out.is_contiguous() and out.requires_grad == grad
    torch.testing.assert_close(out, ref.double(), rtol=1e-6, atol=1e-6)
    assert rel(out, plain(x, t, context)) <= 1e-5
    if grad:
        out.square().mean().backward()
        assert all(p.grad is not None for p in fast.conv_out.parameters())


# ---- the subpixel upsampler ----------------------------------------------------------------------------------

def test_fast_upsample_takes_the_two_by_two_form_and_follows_loaded_weights(monkeypatch):
    """FastUpsample(subpixel=True) runs a 2x upsampling of channels_last x as a 2x2 conv and ops.subpixel_shuffle,
    odd target sizes and contiguous x as the reference (interpolate + conv3x3); a load into the reference's conv
    re-derives the 2x2 weights into the same memory (CUDA graphs read it)."""
    from fastdiff.kernels.subpixel import subpixel_shuffle_ref

    reference = Upsample2D(6).double().to(memory_format=torch.channels_last)
    module = FastUpsample(reference, subpixel=True)
    assert module.conv is reference.conv
    x = _cl(torch.randn(2, 6, 5, 3, dtype=torch.float64))
    direct = reference(x, (10, 6))
    calls = []
    monkeypatch.setattr(ops, "subpixel_shuffle", lambda y, b: (calls.append(y.shape), subpixel_shuffle_ref(y, b))[1])
    out = module(x, (10, 6))
    assert calls == [(2, 24, 6, 4)]
    assert (out - direct).abs().max() <= 1e-12
    assert (module(x, (9, 6)) - reference(x, (9, 6))).abs().max() <= 1e-12  # an odd target size: the direct form
    module(x.contiguous(), (10, 6))  # so does contiguous x
    assert len(calls) == 1
    derived = module.subpixel_weight()
    with torch.no_grad():
        reference.load_state_dict({"conv.weight": torch.randn(6, 6, 3, 3), "conv.bias": torch.randn(6)})
    out = module(x, (10, 6))
    assert module.subpixel_weight() is derived  # re-derived into the same memory
    assert (out - reference(x, (10, 6))).abs().max() <= 1e-12
    assert not FastUpsample(reference, subpixel=False).subpixel


@pytest.mark.parametrize("kind", KINDS)
def test_subpixel_upsamplers_match_the_direct_form_in_the_unet(kind, monkeypatch):
    plain = tiny_unet(kind)
    fast = FastUNet(copy.deepcopy(plain), FastConfig())
    direct = FastUNet(copy.deepcopy(plain), FastConfig(subpixel_upsample=False))
    calls = []
    real = ops.subpixel_shuffle
    monkeypatch.setattr(ops, "subpixel_shuffle", lambda *a: calls.append(a[0].shape) or real(*a))
    x, t, ctx = _unet_inputs(plain.config)
    x = _cl(x)
    ref = direct(x, t, ctx)
    assert calls == [] and direct.subpixel_upsamplers == []
    out = fast(x, t, ctx)
    assert len(calls) == len(fast.subpixel_upsamplers) == sum(b.upsamplers is not None for b in plain.up_blocks)
    print(f"{kind} subpixel upsampling vs direct: rel {rel(out, ref):.2e}")
    assert rel(out, ref) <= 1e-5
    assert rel(out, plain(x, t, ctx)) <= 1e-5


def test_fast_resnet_blocks_use_the_references_layers():
    unet = tiny_unet("sd1")
    resnets = [m for m in unet.modules() if isinstance(m, ResnetBlock2D)]
    fast = FastUNet(unet, FastConfig())
    assert len(fast.resnet_blocks) == len(resnets)
    for ours, theirs in zip(fast.resnet_blocks, resnets):
        assert isinstance(ours, FastResnetBlock)
        assert ours.conv1 is theirs.conv1 and ours.norm2 is theirs.norm2 and ours.time_emb_proj is theirs.time_emb_proj
        assert ours.conv_shortcut is theirs.conv_shortcut

