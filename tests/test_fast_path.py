"""The fast path's model preparation on the CPU (float32): fused projections, channels_last and the SDPA
attention choice leave the UNet's and VAE's outputs unchanged; the CUDA-graph parts refuse clearly without
CUDA; a Pipeline with the prepared modules (graphs off) samples the same latents as the plain one."""
import contextlib
import copy
import importlib

import pytest
import torch

import fastdiff
from fastdiff.fast import CUDAGraphRunner, FastConfig, FastUNet, prepare_unet, prepare_vae
from fastdiff.models import AutoencoderKL, UNet2DConditionModel, UNetConfig, VAEConfig
from fastdiff import ops
from fastdiff.models.unet import GEGLU, Attention, BasicTransformerBlock, ResnetBlock2D, Transformer2DModel
from tiny_models import make_tiny_sd

# Tiny SD1-style (conv proj_in, one head count) and SD2-style (linear proj_in, heads per level) UNets.
# Head dims 16 and 8/16: big enough for SDPA's fused kernels, small enough for two CPU cores.
TINY_UNETS = {
    "sd1": UNetConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=24,
                      attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "sd2": UNetConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=40,
                      attention_head_dim=(4, 4), use_linear_projection=True, transformer_layers_per_block=2,
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
}


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def _randomise(module: torch.nn.Module) -> None:
    """Move every parameter away from its initial value (zero biases would hide a wrong fused bias)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def _tiny_unet(kind: str) -> UNet2DConditionModel:
    unet = UNet2DConditionModel(TINY_UNETS[kind]).eval().requires_grad_(False)
    _randomise(unet)
    return unet


def _unet_inputs(cfg: UNetConfig, batch: int = 2, h: int = 12, w: int = 10):
    return (torch.randn(batch, cfg.in_channels, h, w), torch.tensor([501.0, 17.0])[:batch],
            torch.randn(batch, 7, cfg.cross_attention_dim))


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_fused_projections_match_unfused(kind):
    plain = _tiny_unet(kind)
    fused = copy.deepcopy(plain)
    for m in fused.modules():
        if isinstance(m, Attention):
            m.fuse_projections()
    x, t, ctx = _unet_inputs(plain.config)
    ref, out = plain(x, t, ctx), fused(x, t, ctx)
    err = (out - ref).abs()
    print(f"{kind}: fused q/k/v vs separate: max {err.max():.2e} mean {err.mean():.2e} rel {rel(out, ref):.2e}")
    assert rel(out, ref) <= 1e-5


def test_fused_projections_keep_state_dict_and_follow_loads():
    unet = _tiny_unet("sd1")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    prepare_unet(unet, FastConfig())
    after = unet.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    # to_q/to_k/to_v are views into the fused tensor: loading new weights reaches the matmul that runs.
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    assert attn.to_k.weight.data_ptr() == attn.fused_weight[attn.to_q.weight.shape[0]:].data_ptr()
    x, t, ctx = _unet_inputs(unet.config)
    other = _tiny_unet("sd1")
    unet.load_state_dict(other.state_dict())
    ref, out = other(x, t, ctx), unet(x, t, ctx)
    print(f"after load_state_dict: rel {rel(out, ref):.2e}")
    assert rel(out, ref) <= 1e-5


def test_fused_time_projections_match_unfused_and_follow_loads():
    plain = _tiny_unet("sd1")
    fused = copy.deepcopy(plain)
    fused.fuse_time_projections()
    assert fused.state_dict().keys() == plain.state_dict().keys()
    x, _, ctx = _unet_inputs(plain.config)
    for t in (torch.tensor(501.0), torch.tensor([501.0, 17.0])):  # one timestep for all, one per sample
        ref, out = plain(x, t, ctx), fused(x, t, ctx)
        print(f"fused time projections, t {tuple(t.shape)}: rel {rel(out, ref):.2e}")
        assert rel(out, ref) <= 1e-6
    other = _tiny_unet("sd1")  # new weights reach the fused matmul through the views
    fused.load_state_dict(other.state_dict())
    ref, out = other(x, t, ctx), fused(x, t, ctx)
    print(f"after load_state_dict: rel {rel(out, ref):.2e}")
    assert rel(out, ref) <= 1e-6


def test_projected_context_matches_and_is_what_runs():
    unet = prepare_unet(_tiny_unet("sd2"), FastConfig())
    x, t, ctx = _unet_inputs(unet.config)
    x = x.contiguous(memory_format=torch.channels_last)
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
    unet.forget_contexts()
    assert all(not m.projected for m in unet.modules() if isinstance(m, Attention))


def test_resnet_convs_go_through_the_conv2d_seam(monkeypatch):
    """FastConfig.split_k_conv sends the ResNet blocks' 3x3 convs to ops.conv2d (which picks Triton's split-K
    kernel or cuDNN per shape); off, they call F.conv2d as before. Same outputs either way on the reference."""
    plain = _tiny_unet("sd1")
    x, t, ctx = _unet_inputs(plain.config)
    x = x.contiguous(memory_format=torch.channels_last)
    calls = []
    conv2d = ops.conv2d
    monkeypatch.setattr(ops, "conv2d", lambda *args: (calls.append(args[1].shape), conv2d(*args))[1])
    off = prepare_unet(copy.deepcopy(plain), FastConfig(split_k_conv=False))(x, t, ctx)
    assert calls == []
    on = prepare_unet(plain, FastConfig())(x, t, ctx)
    resnets = [m for m in plain.modules() if isinstance(m, ResnetBlock2D)]
    assert len(calls) == 2 * len(resnets) and all(shape[2:] == (3, 3) for shape in calls)
    assert torch.equal(on, off)


def test_project_context_needs_fused_cross_attention():
    unet = _tiny_unet("sd1")
    with pytest.raises(ValueError, match="fuse_projections"):
        unet.project_context(torch.randn(2, 7, unet.config.cross_attention_dim))


def test_denoisers_of_one_shape_interleave():
    """Two prompts' denoisers of the same shape share one context buffer (the one the graphs read in place):
    each call must still see its own prompt."""
    unet = _tiny_unet("sd1")
    fast = FastUNet(unet, FastConfig(cuda_graphs=False))
    x, t, _ = _unet_inputs(unet.config, batch=1)
    contexts = [torch.randn(2, 7, unet.config.cross_attention_dim) for _ in range(2)]
    expected = [fast.eager_call(x, t[0], c) for c in contexts]
    fns = [fast.denoiser(c, cfg=True) for c in contexts]
    for i in (0, 1, 1, 0, 1):
        out = fns[i](x, t[0])
        print(f"prompt {i}: rel {rel(out, expected[i]):.2e}")
        assert rel(out, expected[i]) <= 1e-6


def test_time_features_come_from_the_schedules_rows_and_follow_weight_changes():
    """model_fn(x, sched.model_timesteps[i]) reads row i of time features made once for the whole tensor; the
    result equals the UNet called with the timestep. New time-path weights (or new timesteps) make new rows."""
    from fastdiff import schedulers

    unet = _tiny_unet("sd1")
    fast = FastUNet(unet, FastConfig(cuda_graphs=False))
    x, _, _ = _unet_inputs(unet.config, batch=1)
    context = torch.randn(2, 7, unet.config.cross_attention_dim)
    timesteps = schedulers.make_schedule("dpmpp_2m", 4, {}).model_timesteps
    fn = fast.denoiser(context, cfg=True)
    for i in range(4):
        out = fn(x, timesteps[i])
        assert out.dtype == torch.float32 and out.is_contiguous()  # conv_out's bias, cast and layout in one pass
        assert rel(out, fast.eager_call(x, timesteps[i], context)) <= 1e-6
    assert len(fast._time_tables) == 1
    loose = timesteps[2].clone()  # not a view of a schedule: computed on its own
    assert rel(fn(x, loose), fast.eager_call(x, loose, context)) <= 1e-6
    with torch.no_grad():
        unet.time_embedding.linear_1.weight.mul_(1.5)  # as a load_state_dict would, in place
        timesteps.add_(3.0)
    for i in (0, 3):
        assert rel(fn(x, timesteps[i]), fast.eager_call(x, timesteps[i], context)) <= 1e-6
    assert len(fast._time_tables) == 1


@pytest.mark.parametrize("self_attention, cross_attention", [("sdpa", "fastdiff"), ("fastdiff", "sdpa"),
                                                             ("auto", "fastdiff")])
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_prepared_unet_matches_plain(kind, self_attention, cross_attention):
    plain = _tiny_unet(kind)
    fast = prepare_unet(copy.deepcopy(plain), FastConfig(self_attention=self_attention,
                                                         cross_attention=cross_attention))
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x, t, ctx = _unet_inputs(plain.config)
    ref = plain(x, t, ctx)
    out = fast(x.contiguous(memory_format=torch.channels_last), t, ctx)
    err = (out - ref).abs()
    print(f"{kind} self={self_attention} cross={cross_attention}: max {err.max():.2e} mean {err.mean():.2e} "
          f"rel {rel(out, ref):.2e}")
    assert out.shape == ref.shape
    assert rel(out, ref) <= 1e-5


def test_auto_self_attention_is_batch_dependent_at_head_dim_40_sdpa_at_80_triton_at_160(monkeypatch):
    # SD1.5's levels at heads 8: 320 channels -> head dim 40 (Triton sums p in a spare column), 640 -> 80,
    # 1280 -> 160.
    cfg = UNetConfig(block_out_channels=(80, 160, 320), layers_per_block=1, norm_num_groups=8,
                     cross_attention_dim=24, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D",) * 3,
                     up_block_types=("CrossAttnUpBlock2D",) * 3)
    unet = prepare_unet(UNet2DConditionModel(cfg).eval(), FastConfig())
    picked = {(m.is_cross_attention, m.to_q.out_features // m.heads): m.attend
              for m in unet.modules() if isinstance(m, Attention)}
    print({key: fn.__name__ for key, fn in picked.items()})
    assert picked == {(False, 40): fastdiff.fast._spare_column_attention, (False, 80): fastdiff.fast.sdpa_attention,
                      (False, 160): ops.attention, (True, 40): ops.attention, (True, 80): ops.attention,
                      (True, 160): ops.attention}
    calls = []
    monkeypatch.setattr(fastdiff.fast, "sdpa_attention", lambda *a: calls.append("sdpa"))
    monkeypatch.setattr(fastdiff.fast.ops, "attention", lambda *a: calls.append("fastdiff"))
    q = torch.empty(4, 8, 10, 40)  # batch * heads = 32
    for minimum in (33, 32):
        monkeypatch.setattr(fastdiff.fast, "AUTO_MIN_BATCH_HEADS", minimum)
        fastdiff.fast._spare_column_attention(q, q, q)
    assert calls == ["sdpa", "fastdiff"]


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_fused_geglu_matches_unfused(kind):
    """FastConfig(fuse_geglu=True), the default, runs every GEGLU through the Triton kernel (the interpreter
    here) and changes neither the state dict nor, beyond float32 rounding, the output; preparing again with
    fuse_geglu=False turns it off."""
    plain = _tiny_unet(kind)
    fused = prepare_unet(copy.deepcopy(plain), FastConfig())
    plain = prepare_unet(plain, FastConfig(fuse_geglu=False))
    geglus = [m for m in fused.modules() if isinstance(m, GEGLU)]
    assert geglus and all(m.fused for m in geglus)
    assert not any(m.fused for m in plain.modules() if isinstance(m, GEGLU))
    assert fused.state_dict().keys() == plain.state_dict().keys()
    x, t, ctx = _unet_inputs(plain.config)
    x = x.contiguous(memory_format=torch.channels_last)
    ref = plain(x, t, ctx)
    with ops.use_backend("triton", op="geglu"):
        out = fused(x, t, ctx)
    err = (out - ref).abs()
    print(f"{kind} fused GEGLU (triton) vs eager: max {err.max():.2e} mean {err.mean():.2e} rel {rel(out, ref):.2e}")
    assert rel(out, ref) <= 1e-5
    prepare_unet(fused, FastConfig(fuse_geglu=False))
    assert not any(m.fused for m in geglus)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_linear_epilogues_match_separate_passes(kind, monkeypatch):
    """FastConfig(linear_epilogues=True), the default, runs the GEGLU projection, the MLP's output Linear and
    proj_out through ops.linear with the gate or the residual in the kernel (forced to the Triton kernel under
    the interpreter here); the output equals the separate passes' to float32 rounding."""
    plain = _tiny_unet(kind)
    # fold_biases off in both: it takes the MLP's output Linear from the epilogue (see the next test)
    fused = prepare_unet(copy.deepcopy(plain), FastConfig(fold_biases=False))
    plain = prepare_unet(plain, FastConfig(linear_epilogues=False, fold_biases=False))
    x, t, ctx = _unet_inputs(plain.config)
    x = x.contiguous(memory_format=torch.channels_last)
    calls = []
    kernel = importlib.import_module("fastdiff.kernels.linear")  # the module; the package exports the function
    real = kernel.linear
    monkeypatch.setattr(kernel, "linear", lambda *a: calls.append(a[3] is not None) or real(*a))
    monkeypatch.setattr(ops, "_impl_cache", {})
    ref = plain(x, t, ctx)
    assert not calls
    with ops.use_backend("triton", op="linear"):
        out = fused(x, t, ctx)
    # per transformer block: the GEGLU projection and the MLP output (+ residual); per transformer: proj_out
    # (+ residual) unless its input is a shared sample still to be tiled (the first one under guidance)
    blocks = sum(isinstance(m, BasicTransformerBlock) for m in fused.modules())
    assert calls.count(False) == blocks and calls.count(True) >= blocks
    print(f"{kind} linear epilogues (triton) vs separate: rel {rel(out, ref):.2e}; {len(calls)} kernel calls")
    assert rel(out, ref) <= 1e-5


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_shared_sample_parts_without_tiles_on_the_triton_kernels(kind, monkeypatch):
    """Under guidance a latent's rows part inside the first transformer block. There the LayerNorm pass writes
    its outputs once per context row block (`copies`), proj_out's residual_add reads the transformer's input once
    per row block, and the decoder's channel_cat does the same with the skips taken before the parting (so do
    their summing variants, `FastConfig.group_sums`): no torch.cat tiles. On the prepared (channels_last) UNet
    with those kernels (interpreter) the result must equal the same UNet run on the tiled sample."""
    unet = prepare_unet(_tiny_unet(kind), FastConfig())
    sample = torch.randn(1, unet.config.in_channels, 12, 10).contiguous(memory_format=torch.channels_last)
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
    print(f"{kind} shared sample vs tiled, Triton kernels: rel {rel(shared, tiled):.2e}")
    assert shared.shape == tiled.shape == (2, unet.config.out_channels, 12, 10)
    assert rel(shared, tiled) <= 1e-5


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_folded_biases_match_the_linears_own(kind, backend, monkeypatch):
    """FastConfig(fold_biases=True), the default, runs every attention's to_out and every proj_in without its
    bias and adds the bias in the LayerNorm pass after it, and carries the MLP output's bias in the stream its
    matmul accumulates onto; the output equals the plain UNet's to float32 rounding, on the reference backend
    and on the Triton kernel (interpreter)."""
    plain = _tiny_unet(kind)
    folded = prepare_unet(copy.deepcopy(plain), FastConfig(linear_epilogues=False))
    plain = prepare_unet(plain, FastConfig(linear_epilogues=False, fold_biases=False))
    biases = []
    real = ops.add_layer_norm
    monkeypatch.setattr(ops, "add_layer_norm", lambda *a: biases.append((a[5] is not None, a[6] is not None))
                        or real(*a))
    x, t, ctx = _unet_inputs(plain.config)
    ref = plain(x, t, ctx)
    assert biases and not any(any(b) for b in biases)
    biases.clear()
    with ops.use_backend(backend, op="add_layer_norm"):
        out = folded(x, t, ctx)
    blocks = sum(isinstance(m, BasicTransformerBlock) for m in folded.modules())
    transformers = sum(isinstance(m, Transformer2DModel) for m in folded.modules())
    # to_out twice per block and proj_in once per transformer (residual_bias); the MLP's output per block
    # (stream_bias, with norm3, which also takes attn2's to_out bias)
    assert biases.count((True, False)) == blocks + transformers and biases.count((True, True)) == blocks
    print(f"{kind} folded biases ({backend}) vs the linears' own: rel {rel(out, ref):.2e}")
    assert rel(out, ref) <= 1e-5


@pytest.mark.parametrize("vae_attention", ["auto", "sdpa", "matmul"])
def test_prepared_vae_matches_plain(vae_attention):
    cfg = VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8)
    plain = AutoencoderKL(cfg).eval().requires_grad_(False)
    _randomise(plain)
    fast = prepare_vae(copy.deepcopy(plain), FastConfig(vae_attention=vae_attention))
    z = torch.randn(2, cfg.latent_channels, 6, 5)
    ref, out = plain.decode(z), fast.decode(z)
    err = (out - ref).abs()
    print(f"vae decode ({vae_attention}): max {err.max():.2e} mean {err.mean():.2e} rel {rel(out, ref):.2e}")
    assert rel(out, ref) <= 1e-5


@pytest.mark.parametrize("shape", [(2, 3, 97, 77, 40), (1, 1, 64, 64, 512), (2, 1, 33, 5, 19)],
                         ids=["odd", "vae_width", "tiny_keys"])
def test_matmul_attention_matches_sdpa_across_query_blocks(shape, monkeypatch):
    """Blocks of 10 queries (the limit set low) cover full blocks and a short last one."""
    from fastdiff import fast

    B, H, Sq, Skv, D = shape
    monkeypatch.setattr(fast, "MATMUL_ATTENTION_SCORES", 10 * Skv)
    q, k, v = torch.randn(B, H, Sq, D), torch.randn(B, H, Skv, D), torch.randn(B, H, Skv, D + 3)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3)
    out = fast.matmul_attention(q, k, v, scale=0.3)
    print(f"{shape}: rel {rel(out, ref):.2e}")
    assert out.shape == (B, H, Sq, D + 3) and out.dtype == q.dtype
    assert rel(out, ref) <= 1e-6


def test_auto_attention_takes_matmul_past_the_kernels_widest_head():
    from fastdiff.fast import _pick_attention
    from fastdiff.kernels.attention import MAX_HEAD_DIM

    assert _pick_attention("auto", 512) == "matmul"  # SD's VAE: one head of 512
    assert _pick_attention("auto", MAX_HEAD_DIM + 1) == "matmul"
    assert _pick_attention("auto", MAX_HEAD_DIM) != "matmul"
    assert _pick_attention("sdpa", 512) == "sdpa"


def test_fast_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="self_attention must be one of"):
        FastConfig(self_attention="flash")
    with pytest.raises(ValueError, match="reduce-overhead.*captures CUDA graphs itself"):
        FastConfig(compile="reduce-overhead")
    with pytest.raises(ValueError, match="dtype must be one of"):
        FastConfig(dtype=torch.int8)
    FastConfig(compile="reduce-overhead", cuda_graphs=False)  # inductor's own graphs alone are fine


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_graph_parts_refuse_without_cuda():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        CUDAGraphRunner(lambda x: x)
    with pytest.raises(ValueError, match="CUDA graphs need the UNet on a CUDA device, it is on cpu"):
        FastUNet(_tiny_unet("sd1"))


@pytest.fixture(scope="module")
def tiny_pipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1")
    make_tiny_sd(folder, "sd1")
    return folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults")
def test_pipeline_fast_modes_on_cpu(tiny_pipes):
    with pytest.raises(ValueError, match="captures CUDA graphs, which needs the models on a CUDA device"):
        fastdiff.Pipeline.from_pretrained(tiny_pipes, device="cpu", fast=True)
    with pytest.raises(ValueError, match="fast must be None, True, False or a fastdiff.fast.FastConfig"):
        fastdiff.Pipeline.from_pretrained(tiny_pipes, device="cpu", fast="yes")
    assert fastdiff.Pipeline.from_pretrained(tiny_pipes, device="cpu").fast_unet() is None  # auto: off on CPU


@pytest.mark.parametrize("guidance_scale, guidance_rescale", [(7.5, 0.0), (7.5, 0.7), (1.0, 0.0)])
def test_pipeline_prepared_modules_sample_the_same_latents(tiny_pipes, guidance_scale, guidance_rescale):
    plain = fastdiff.Pipeline.from_pretrained(tiny_pipes, device="cpu", fast=False)
    fast = fastdiff.Pipeline.from_pretrained(tiny_pipes, device="cpu", fast=FastConfig(cuda_graphs=False))
    kw = dict(steps=4, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, seed=3,
              output_type="latent", progress=False)
    ref = torch.stack(plain(["a red circle", "a blue square"], **kw))
    out = torch.stack(fast(["a red circle", "a blue square"], **kw))
    assert fast.fast_unet() is not None and fast.fast_unet().graphs_captured == 0
    err = (out - ref).abs()
    print(f"cfg {guidance_scale} rescale {guidance_rescale}: max {err.max():.2e} mean {err.mean():.2e} "
          f"rel {rel(out, ref):.2e}")
    assert rel(out, ref) <= 1e-5


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_group_sums_from_the_producers_leave_the_output_unchanged(kind, monkeypatch):
    """FastConfig(group_sums=True), the default, has the kernels that write a GroupNorm's input sum it for the
    norm (UNet2DConditionModel.sum_for_group_norms). On the Triton kernels (interpreter), with a shared sample,
    the output equals the same UNet's without the sums, and every producer's sums reach a norm."""
    plain = _tiny_unet(kind)
    without = prepare_unet(copy.deepcopy(plain), FastConfig(group_sums=False))
    summing = prepare_unet(plain, FastConfig())
    sample = torch.randn(1, plain.config.in_channels, 12, 10).contiguous(memory_format=torch.channels_last)
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


def test_group_norm_ignores_sums_of_a_tensor_changed_since():
    from fastdiff.models.unet import _group_norm, _summed

    norm = torch.nn.GroupNorm(4, 8)
    x = torch.randn(2, 8, 3, 3)
    seen = []
    real = ops.group_norm
    try:
        ops.group_norm = lambda *a, **k: seen.append(k["sums"]) or real(*a, **k)
        _summed(x, ops.residual_add_sums(None, x, torch.zeros(8), None, 4)[1])
        _group_norm(norm, x)
        x.add_(1.0)
        out = _group_norm(norm, x)
    finally:
        ops.group_norm = real
    assert seen[0] is not None and seen[1] is None
    torch.testing.assert_close(out, norm(x))
