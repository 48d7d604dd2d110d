"""The engines (fastdiff.engine) on the CPU in float32: `Engine` runs the reference models as written, `FastEngine`
(CUDA graphs off) runs its fused modules built from them and gives the same denoiser outputs, text contexts,
latents and images; the reference models keep working, unchanged, after an engine was built from them; the
CUDA-graph parts refuse clearly without CUDA; a Pipeline with the fast engine samples the same latents as the
plain one."""
import pytest
import torch

import fastdiff
from fastdiff import ops
from fastdiff.engine import IF_REPEATED, CUDAGraphRunner, Engine, FastConfig, FastEngine, FastUNet, make_engine
from fastdiff.engine.engine import FastCLIPAttention
from fastdiff.models.clip import CLIPAttention
from tiny_models import (CLIP_CONFIGS, clip_from_transformers, make_tiny_sd, rel, tiny_text_encoder, tiny_unet,
                         tiny_vae, transformers_clip)

NO_GRAPHS = FastConfig(cuda_graphs=False)


def _models(kind: str = "sd1"):
    """A tiny reference UNet, VAE and text encoder whose context width is the UNet's."""
    unet = tiny_unet(kind)
    return unet, tiny_vae(), tiny_text_encoder(unet.config.cross_attention_dim)


def _types(*modules):
    return [[(name, type(m)) for name, m in module.named_modules()] for module in modules]


# ---- FastEngine's denoiser ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no_cfg"])
def test_fast_denoiser_matches_the_engines(cfg):
    """FastEngine.denoiser (fused modules, shared sample, time features, projected contexts) against
    Engine.denoiser (the reference UNet on [x; x]): same float32 output, (2B or B, C, h, w)."""
    unet, vae, text_encoder = _models()
    plain = Engine(unet, vae, text_encoder)
    x, t = torch.randn(2, 4, 12, 10), torch.tensor(501.0)
    context = torch.randn(4 if cfg else 2, 7, unet.config.cross_attention_dim)
    ref = plain.denoiser(context, cfg)(x, t)
    fast = FastEngine(unet, vae, text_encoder, NO_GRAPHS)
    out = fast.denoiser(context, cfg)(x, t)
    print(f"cfg={cfg}: FastEngine vs Engine denoiser rel {rel(out, ref):.2e}")
    assert out.shape == ref.shape == (context.shape[0], 4, 12, 10)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert rel(out, ref) <= 1e-5
    assert rel(fast.eager_call(x, t, context), ref) <= 1e-5  # eager_call: the same call, on the shared sample


@pytest.mark.parametrize("engine_class", [Engine, FastEngine])
def test_if_repeated_denoiser_gives_each_rows_own_output(engine_class, monkeypatch):
    """cfg="if_repeated" takes the context's 2B rows: [x; x] gives cfg=True's output for x (and FastEngine runs x
    once, shared by both halves), any other rows cfg=False's."""
    rows = []  # the rows FastEngine's UNet calls run
    call_unet = FastEngine._call_unet
    monkeypatch.setattr(FastEngine, "_call_unet", lambda self, x, *a: rows.append(x.shape[0]) or call_unet(
        self, x, *a))
    unet, vae, text_encoder = _models()
    engine = engine_class(unet, vae, text_encoder, *([NO_GRAPHS] if engine_class is FastEngine else []))
    x, y, t = torch.randn(2, 4, 12, 10), torch.randn(2, 4, 12, 10), torch.tensor(501.0)
    context = torch.randn(4, 7, unet.config.cross_attention_dim)
    model_fn = engine.denoiser(context, cfg=IF_REPEATED)
    repeated, different = model_fn(torch.cat([x, x]), t), model_fn(torch.cat([x, y]), t)
    assert rel(repeated, engine.denoiser(context, cfg=True)(x, t)) <= 1e-5
    assert rel(different, engine.denoiser(context, cfg=False)(torch.cat([x, y]), t)) <= 1e-5
    assert rows == ([2, 4, 2, 4] if engine_class is FastEngine else [])
    with pytest.raises(ValueError, match="cfg must be True, False or 'if_repeated', got 'yes'"):
        engine.denoiser(context, cfg="yes")


def test_denoisers_of_one_shape_interleave():
    """Two prompts' denoisers of the same shape share one context buffer (the one the graphs read in place):
    each call must still see its own prompt."""
    unet, vae, text_encoder = _models()
    fast = FastEngine(unet, vae, text_encoder, NO_GRAPHS)
    x, t = torch.randn(1, 4, 12, 10), torch.tensor(501.0)
    contexts = [torch.randn(2, 7, unet.config.cross_attention_dim) for _ in range(2)]
    expected = [fast.eager_call(x, t, c) for c in contexts]
    fns = [fast.denoiser(c, cfg=True) for c in contexts]
    for i in (0, 1, 1, 0, 1):
        out = fns[i](x, t)
        print(f"prompt {i}: rel {rel(out, expected[i]):.2e}")
        assert rel(out, expected[i]) <= 1e-6


def test_time_features_come_from_the_schedules_rows_and_follow_weight_changes():
    """model_fn(x, sched.model_timesteps[i]) reads row i of time features made once for the whole tensor; the
    result equals the UNet called with the timestep. New time-path weights (or new timesteps) make new rows."""
    from fastdiff import schedulers

    unet, vae, text_encoder = _models()
    fast = FastEngine(unet, vae, text_encoder, NO_GRAPHS)
    x = torch.randn(1, 4, 12, 10)
    context = torch.randn(2, 7, unet.config.cross_attention_dim)
    timesteps = schedulers.make_schedule("dpmpp_2m", 4, {}).model_timesteps
    fn = fast.denoiser(context, cfg=True)
    # float32 rounding apart (rows of one matrix product against a row of its own): a neighbouring row, or
    # features of the old weights, would be off by orders of magnitude more
    tol = 1e-5
    for i in range(4):
        out = fn(x, timesteps[i])
        assert out.dtype == torch.float32 and out.is_contiguous()  # conv_out's bias, cast and layout in one pass
        err = rel(out, fast.eager_call(x, timesteps[i], context))
        print(f"step {i}: rel {err:.2e}")
        assert err <= tol
    assert len(fast._time_tables) == 1
    loose = timesteps[2].clone()  # not a view of a schedule: computed on its own
    assert rel(fn(x, loose), fast.eager_call(x, loose, context)) <= tol
    with torch.no_grad():
        unet.time_embedding.linear_1.weight.mul_(1.5)  # the reference's parameter, as a load_state_dict would
        timesteps.add_(3.0)
    for i in (0, 3):
        assert rel(fn(x, timesteps[i]), fast.eager_call(x, timesteps[i], context)) <= tol
    assert len(fast._time_tables) == 1
    assert rel(fn(x, timesteps[1]), fast.eager_call(x, timesteps[2], context)) > 100 * tol  # rows differ


def test_denoiser_projects_the_context_once_per_prompt(monkeypatch):
    unet, vae, text_encoder = _models()
    fast = FastEngine(unet, vae, text_encoder, NO_GRAPHS)
    projections = []
    real = FastUNet.project_context
    monkeypatch.setattr(FastUNet, "project_context", lambda self, c: projections.append(c.shape) or real(self, c))
    context = torch.randn(2, 7, unet.config.cross_attention_dim)
    fn = fast.denoiser(context, cfg=True)
    for t in (900.0, 500.0, 100.0):
        fn(torch.randn(1, 4, 8, 8), torch.tensor(t))
    assert projections == [(2, 7, unet.config.cross_attention_dim)]
    # without fused projections there is nothing to keep
    unet2, vae2, text_encoder2 = _models()
    unfused = FastEngine(unet2, vae2, text_encoder2, FastConfig(cuda_graphs=False, fuse_projections=False))
    unfused.denoiser(context, cfg=True)(torch.randn(1, 4, 8, 8), torch.tensor(900.0))
    assert len(projections) == 1


# ---- what building an engine leaves of the models ------------------------------------------------------------

def test_reference_models_give_the_same_outputs_after_a_fast_engine_was_built_from_them():
    """FastEngine converts the UNet and the VAE in place (channels_last, fused projections as views) and copies
    the VAE and the text encoder sharing their parameters: the reference models keep their modules and
    parameter objects and compute what they did, and the engine's stages compute the same."""
    unet, vae, text_encoder = _models()
    x, t, ctx = torch.randn(2, 4, 12, 10), torch.tensor([501.0, 17.0]), torch.randn(2, 7, 24)
    z, pixels = torch.randn(1, 4, 4, 6), torch.rand(1, 3, 8, 12) * 2 - 1
    ids = torch.randint(0, 1000, (2, 77))
    before = dict(unet=unet(x, t, ctx), decode=vae.decode(z), encode=vae.encode_distribution(pixels)[0],
                  text=text_encoder(ids))
    types = _types(unet, vae, text_encoder)
    params = [[id(p) for p in m.parameters()] for m in (unet, vae, text_encoder)]
    engine = FastEngine(unet, vae, text_encoder, NO_GRAPHS)
    after = dict(unet=unet(x, t, ctx), decode=vae.decode(z), encode=vae.encode_distribution(pixels)[0],
                 text=text_encoder(ids))
    fast = dict(unet=engine.unet(x, t, ctx), decode=engine.decode(z), encode=engine.encode_image(pixels)[0],
                text=engine.encode_text(ids))
    for name in before:
        print(f"{name}: reference after vs before rel {rel(after[name], before[name]):.2e}, engine vs before "
              f"rel {rel(fast[name], before[name]):.2e}")
        assert rel(after[name], before[name]) <= 1e-5  # channels_last: float32 rounding alone
        assert rel(fast[name], before[name]) <= 1e-5
    assert torch.equal(after["text"], before["text"])  # nothing of the text encoder changed
    assert _types(unet, vae, text_encoder) == types
    assert [[id(p) for p in m.parameters()] for m in (unet, vae, text_encoder)] == params
    assert not any(isinstance(m, FastCLIPAttention) for m in text_encoder.modules())
    for fused, reference in ((engine.unet, unet), (engine.vae, vae),
                             (engine.text_encoder, text_encoder)):
        assert set(map(id, fused.parameters())) == set(map(id, reference.parameters()))  # shared, not copied


# ---- the text encoder's fused attention ----------------------------------------------------------------------

@pytest.mark.parametrize("hidden, layers, heads, intermediate, act", CLIP_CONFIGS)
def test_fused_text_encoder_matches_transformers_and_keeps_their_keys(hidden, layers, heads, intermediate, act):
    """The FastEngine's text encoder (FastCLIPAttention: one q/k/v matmul) at every clip_skip against
    transformers; its state dict keeps the reference's keys and values, and a load into the reference
    afterwards reaches the fused matmul."""
    theirs = transformers_clip(hidden, layers, heads, intermediate, act)
    ours = clip_from_transformers(theirs)
    keys = list(ours.state_dict())
    engine = FastEngine(tiny_unet("sd1"), tiny_vae(), ours, NO_GRAPHS)
    fused = engine.text_encoder
    attentions = [m for m in fused.modules() if isinstance(m, FastCLIPAttention)]
    assert len(attentions) == layers
    assert not any(isinstance(m, FastCLIPAttention) for m in ours.modules())
    assert list(fused.state_dict()) == list(ours.state_dict()) == keys
    assert all(torch.equal(fused.state_dict()[k], v) for k, v in ours.state_dict().items())
    assert all(torch.equal(ours.state_dict()["text_model." + k], v) for k, v in theirs.state_dict().items())
    q = attentions[0].q_proj.weight
    assert q.data_ptr() == attentions[0].fused_weight.data_ptr()  # a view of the fused weight
    ids = torch.randint(0, 1000, (2, 77))
    with torch.no_grad():
        hidden_states = theirs(ids, output_hidden_states=True).hidden_states
        for clip_skip in range(layers):
            want = theirs.final_layer_norm(hidden_states[-(clip_skip + 1)])
            got = engine.encode_text(ids, clip_skip=clip_skip)
            err = rel(got, want)
            print(f"fused clip_skip={clip_skip}: rel err {err:.2e}")
            assert err <= 1e-5
        assert torch.equal(engine.encode_text(ids, clip_skip=layers), ours(ids, clip_skip=layers))  # no layer run
        fresh = transformers_clip(hidden, layers, heads, intermediate, act)
        ours.load_state_dict(fresh.state_dict())
        err = rel(engine.encode_text(ids), fresh(ids).last_hidden_state)
        print(f"fused, reloaded: rel err {err:.2e}")
        assert err <= 1e-5


def test_fast_clip_attention_matches_the_reference_attention():
    attention = tiny_text_encoder(32).text_model.encoder.layers[0].self_attn
    assert isinstance(attention, CLIPAttention)
    x = torch.randn(2, 13, 32)
    ref = attention(x)
    fast = FastCLIPAttention(attention)
    assert fast.q_proj is attention.q_proj and fast.fused_weight.shape == (96, 32) and fast.fused_bias.shape == (96,)
    out = fast(x)
    print(f"FastCLIPAttention vs CLIPAttention: rel {rel(out, ref):.2e}")
    assert rel(out, ref) <= 1e-6
    assert rel(attention(x), ref) <= 1e-6  # the reference still computes with the fused weight's rows


def test_text_encoder_attention_is_not_fused_without_fused_projections():
    unet, vae, text_encoder = _models()
    engine = FastEngine(unet, vae, text_encoder, FastConfig(cuda_graphs=False, fuse_projections=False))
    assert not any(isinstance(m, FastCLIPAttention) for m in engine.text_encoder.modules())
    ids = torch.randint(0, 1000, (1, 77))
    assert torch.equal(engine.encode_text(ids, clip_skip=1), text_encoder(ids, clip_skip=1))


# ---- Engine, make_engine, the configuration and the refusals ---------------------------------------------------

def test_engine_runs_the_reference_models_as_written():
    unet, vae, text_encoder = _models()
    engine = Engine(unet, vae, text_encoder)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor(300.0)
    context = torch.randn(2, 7, unet.config.cross_attention_dim)
    ids, z = torch.randint(0, 1000, (1, 77)), torch.randn(1, 4, 4, 4)
    assert torch.equal(engine.denoiser(context, cfg=True)(x, t), unet(torch.cat([x, x]), t, context))
    assert torch.equal(engine.denoiser(context[:1], cfg=False)(x, t), unet(x, t, context[:1]))
    assert torch.equal(engine.encode_text(ids, 1), text_encoder(ids, clip_skip=1))
    assert torch.equal(engine.decode(z), vae.decode(z))
    assert engine.graphs_captured == 0
    engine.compile_ahead((), x, context, lambda: pytest.fail("Engine compiles nothing ahead"))


def test_make_engine_follows_the_fast_setting():
    models = _models()
    assert type(make_engine(*models, fast=None)) is Engine  # auto: off on the CPU
    assert type(make_engine(*models, fast=False)) is Engine
    fast = make_engine(*models, fast=NO_GRAPHS)
    assert isinstance(fast, FastEngine) and fast.config is NO_GRAPHS
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA graphs need the UNet on a CUDA device, it is on cpu"):
            make_engine(*_models(), fast=True)  # the default FastConfig captures graphs


def test_fast_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="self_attention must be one of"):
        FastConfig(self_attention="flash")
    with pytest.raises(ValueError, match="vae_attention must be one of"):
        FastConfig(vae_attention="fastest")
    with pytest.raises(ValueError, match="reduce-overhead.*captures CUDA graphs itself"):
        FastConfig(compile="reduce-overhead")
    with pytest.raises(ValueError, match="dtype must be one of"):
        FastConfig(dtype=torch.int8)
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        FastConfig(warmup=0)
    FastConfig(compile="reduce-overhead", cuda_graphs=False)  # inductor's own graphs alone are fine


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_graph_parts_refuse_without_cuda():
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        CUDAGraphRunner(lambda x: x)
    with pytest.raises(ValueError, match="CUDA graphs need the UNet on a CUDA device, it is on cpu"):
        FastEngine(*_models())


def test_compile_ahead_runs_the_rest_once_per_shape(monkeypatch):
    """FastEngine.compile_ahead runs the UNet eagerly and `rest` inside compiling_ahead, once per key (on the
    CPU the Triton launches it would defer do not occur: the reference backend runs)."""
    unet, vae, text_encoder = _models()
    engine = FastEngine(unet, vae, text_encoder, NO_GRAPHS)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(2, 7, unet.config.cross_attention_dim)
    calls = []
    for _ in range(2):
        engine.compile_ahead(("key",), x, context, lambda: calls.append("rest"))
    engine.compile_ahead(("other",), x, context, lambda: calls.append("other"))
    assert calls == ["rest", "other"]


# ---- the pipeline on the fast engine ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pipes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1")
    make_tiny_sd(folder, "sd1")
    return folder


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU defaults")
def test_pipeline_fast_modes_on_cpu(tiny_pipes):
    with pytest.raises(ValueError, match="captures CUDA graphs, which needs the models on a CUDA device"):
        fastdiff.Pipeline.from_pretrained(tiny_pipes, device="cpu", fast=True)
    with pytest.raises(ValueError, match="fast must be None, True, False or a fastdiff.engine.FastConfig"):
        fastdiff.Pipeline.from_pretrained(tiny_pipes, device="cpu", fast="yes")
    pipe = fastdiff.Pipeline.from_pretrained(tiny_pipes, device="cpu")
    assert pipe._engine is None  # built on first use
    assert type(pipe.engine) is Engine and pipe.engine is pipe.engine  # auto: off on CPU, built once


@pytest.mark.parametrize("guidance_scale, guidance_rescale", [(7.5, 0.0), (7.5, 0.7), (1.0, 0.0)])
def test_pipeline_fast_engine_samples_the_same_latents(tiny_pipes, guidance_scale, guidance_rescale):
    plain = fastdiff.Pipeline.from_pretrained(tiny_pipes, device="cpu", fast=False)
    fast = fastdiff.Pipeline.from_pretrained(tiny_pipes, device="cpu", fast=NO_GRAPHS)
    kw = dict(steps=4, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale, seed=3,
              output_type="latent", progress=False)
    ref = torch.stack(plain(["a red circle", "a blue square"], **kw))
    out = torch.stack(fast(["a red circle", "a blue square"], **kw))
    assert isinstance(fast.engine, FastEngine) and fast.engine.graphs_captured == 0
    assert type(plain.engine) is Engine
    err = (out - ref).abs()
    print(f"cfg {guidance_scale} rescale {guidance_rescale}: max {err.max():.2e} mean {err.mean():.2e} "
          f"rel {rel(out, ref):.2e}")
    assert rel(out, ref) <= 1e-5


def test_pipeline_fast_engine_decodes_and_encodes_the_same_images(tiny_pipes):
    plain = fastdiff.Pipeline.from_pretrained(tiny_pipes, device="cpu", fast=False)
    fast = fastdiff.Pipeline.from_pretrained(tiny_pipes, device="cpu", fast=NO_GRAPHS)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    kw = dict(steps=3, image=image, strength=0.7, seed=5, output_type="pt", progress=False, scheduler="euler_a")
    ref, out = plain("a red circle", **kw)[0], fast("a red circle", **kw)[0]
    print(f"img2img through the fast VAE: max abs err {(out - ref).abs().max():.2e}, rel {rel(out, ref):.2e}")
    assert rel(out, ref) <= 1e-5


def test_ops_attention_impl_is_what_the_engines_attentions_take():
    unet, vae, text_encoder = _models("sd2")  # head dim 8 everywhere
    engine = FastEngine(unet, vae, text_encoder, FastConfig(cuda_graphs=False, self_attention="matmul",
                                                            cross_attention="sdpa", vae_attention="sdpa"))
    attends = {m.attend for m in engine.unet.modules() if hasattr(m, "attend")}
    assert attends == {ops.matmul_attention, ops.sdpa_attention}
    assert {m.attend for m in engine.vae.modules() if hasattr(m, "attend")} == {ops.sdpa_attention}


@pytest.mark.parametrize("device, fast, starts", [
    ("cuda", None, True), ("cuda:1", True, True), ("cuda", FastConfig(cuda_graphs=False), True),
    ("cuda", False, False), ("cuda", FastConfig(compile="max-autotune-no-cudagraphs"), False), ("cpu", None, False),
])
def test_prepare_engine_starts_the_compile_workers_only_for_the_fast_path_on_cuda_without_torch_compile(
        monkeypatch, device, fast, starts):
    import fastdiff.engine.engine as engine_module

    started = []
    monkeypatch.setattr(engine_module, "start_compile_processes", lambda: started.append(True))
    engine_module.prepare_engine(device, fast)
    assert bool(started) == starts
