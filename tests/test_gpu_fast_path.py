"""The CUDA fast path (`fastdiff.engine.FastEngine`) on a GPU: CUDA-graph replay equals the engine's fused modules
called eagerly, two resolutions hold two graphs that both stay right, the fast UNet in float16 is as close to a
float32 reference as the reference UNet in float16, and the sampling loop makes no host synchronisation. Run on
the device: `pytest -m gpu`."""
import contextlib
import copy

import numpy as np

import pytest
import torch

import fastdiff
from cuda_graphs import KERNEL_MODULES, compiled_kernel_variants, fast_engine, kernel_jits
from fastdiff import _ext
from fastdiff.engine import IF_REPEATED, CUDAGraphRunner, FastConfig
from fastdiff.engine.graphs import EqualHalvesGraphRunner
from fastdiff.models import UNet2DConditionModel, UNetConfig

pytestmark = pytest.mark.gpu

SD15 = UNetConfig(cross_attention_dim=768, attention_head_dim=8)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture(scope="module")
def sd15_fp32():
    """The SD1.5 UNet with random weights, float32, on the GPU."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        return UNet2DConditionModel(SD15).eval().requires_grad_(False)


def _inputs(batch: int, h: int, w: int):
    g = torch.Generator("cuda").manual_seed(batch * 1000 + h + w)
    x = torch.randn(batch, 4, h, w, device="cuda", generator=g)
    context = torch.randn(2 * batch, 77, 768, device="cuda", generator=g, dtype=torch.float16)
    return x, torch.tensor(601.0, device="cuda"), context


@torch.no_grad()
def test_graph_replay_matches_eager_and_fp16_budget(sd15_fp32):
    x, t, context = _inputs(1, 64, 64)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ref = sd15_fp32(torch.cat([x, x]), t, context.float())  # the reference modules: plain PyTorch
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    plain16 = copy.deepcopy(sd15_fp32).half()
    theirs = plain16(torch.cat([x, x]).half(), t, context).float()
    fast = fast_engine(plain16, config=FastConfig())  # converts plain16 in place: run it as written first
    replayed = fast.denoiser(context, cfg=True)(x, t).clone()
    eager = fast.eager_call(x, t, context).float()  # the call the graph captured, run eagerly
    print(f"graph vs eager fused modules: rel {rel(replayed, eager):.2e}; fast fp16 vs fp32 "
          f"{rel(replayed, ref):.2e}, reference fp16 vs fp32 {rel(theirs, ref):.2e}")
    assert fast.graphs_captured == 1
    assert torch.isfinite(replayed).all()
    assert rel(replayed, eager) <= 1e-3
    assert rel(replayed, ref) <= 2 * rel(theirs, ref) + 1e-3


@torch.no_grad()
def test_two_resolutions_keep_two_graphs(sd15_fp32):
    fast = fast_engine(copy.deepcopy(sd15_fp32).half(), config=FastConfig())
    cases = [_inputs(1, 64, 64), _inputs(2, 48, 80)]
    eager = [fast.eager_call(x, t, c).float() for x, t, c in cases]
    for round_ in range(2):  # the second round replays the first graph after the second was captured
        for (x, t, c), expected in zip(cases, eager):
            out = fast.denoiser(c, cfg=True)(x, t)
            print(f"round {round_} {tuple(x.shape)}: rel {rel(out, expected):.2e}")
            assert out.shape == (2 * x.shape[0], 4, *x.shape[2:])
            assert rel(out, expected) <= 1e-3
    assert fast.graphs_captured == 2


@torch.no_grad()
def test_graphs_read_the_projected_context_in_place(sd15_fp32):
    """The graph reads its context buffer and the K/V projections computed from it outside the graph (eagerly for
    the first prompt, then in a graph of their own): a second prompt of the same shape replays the same graph
    with its own projections, and interleaved denoisers each get their own prompt."""
    fast = fast_engine(copy.deepcopy(sd15_fp32).half(), config=FastConfig())
    x, t, first = _inputs(1, 64, 64)
    second = torch.randn_like(first)
    expected = [fast.eager_call(x, t, c).float() for c in (first, second)]
    fns = [fast.denoiser(c, cfg=True) for c in (first, second)]
    for i in (1, 0, 0, 1):
        out = fns[i](x, t)
        print(f"prompt {i}: rel {rel(out, expected[i]):.2e} (vs the other prompt {rel(out, expected[1 - i]):.2e})")
        assert rel(out, expected[i]) <= 1e-3
    assert fast.graphs_captured == 1
    assert fast._projector.captured == 1  # the second prompt's projections on, replayed in place


@torch.no_grad()
def test_one_graph_runs_repeated_rows_once_and_other_rows_whole_without_host_sync(sd15_fp32):
    """cfg="if_repeated" (the diffusers integration's UNet): [x; x] and [x; y] replay one graph (made of two), which
    compares the halves on the GPU; each output equals the eager call of its own rows: x shared by both halves, or
    all rows."""
    if not EqualHalvesGraphRunner.available():
        pytest.skip("fastdiff._C: " + _ext.availability("cuda", "choice")[1])
    fast = fast_engine(copy.deepcopy(sd15_fp32).half(), config=FastConfig())
    x, t, context = _inputs(1, 64, 64)
    y = torch.randn_like(x)
    model_fn = fast.denoiser(context, cfg=IF_REPEATED)
    cases = {"[x; x]": (torch.cat([x, x]), fast.eager_call(x, t, context).float()),
             "[x; y]": (torch.cat([x, y]), fast.eager_call(torch.cat([x, y]), t, context).float())}
    model_fn(cases["[x; x]"][0], t)  # captures
    order = ["[x; y]", "[x; x]", "[x; y]"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [model_fn(cases[name][0], t).clone() for name in order]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for name, out in zip(order, outs):
        print(f"{name}: rel {rel(out, cases[name][1]):.2e}")
        assert rel(out, cases[name][1]) <= 1e-3
    assert rel(cases["[x; x]"][1], cases["[x; y]"][1]) > 1e-2, "the two cases must differ for the check to bite"
    assert fast.graphs_captured == 1


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "euler_a"])
def test_sampling_loop_has_no_host_sync(tiny_sd1_folder, scheduler, monkeypatch):
    pipe = fastdiff.Pipeline.from_pretrained(tiny_sd1_folder, device="cuda")  # fast=None: on by default on CUDA
    kw = dict(steps=6, scheduler=scheduler, seed=5, output_type="latent", progress=False)
    first = torch.stack(pipe(["a red circle", "a blue square"], **kw))  # captures, autotunes: may sync
    sample = fastdiff.schedulers.sample

    def strict_sample(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return sample(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(fastdiff.schedulers, "sample", strict_sample)
    second = torch.stack(pipe(["a red circle", "a blue square"], **kw))
    plain = fastdiff.Pipeline.from_pretrained(tiny_sd1_folder, device="cuda", fast=False)
    monkeypatch.setattr(fastdiff.schedulers, "sample", sample)
    unfused = torch.stack(plain(["a red circle", "a blue square"], **kw))
    print(f"{scheduler}: replay vs first {rel(second, first):.2e}, fast vs plain fp16 {rel(second, unfused):.2e}")
    assert pipe.engine.graphs_captured == 1
    assert rel(second, first) <= 1e-6
    assert rel(second, unfused) <= 1e-2


def test_text_encoder_replays_one_graph_per_clip_skip(tiny_sd1_folder):
    pipe = fastdiff.Pipeline.from_pretrained(tiny_sd1_folder, device="cuda")
    plain = fastdiff.Pipeline.from_pretrained(tiny_sd1_folder, device="cuda", fast=False)
    got = {}
    for clip_skip in (None, 1, None):
        got[clip_skip] = pipe.encode_prompt(["a red circle"], [""], 1, True, clip_skip)
        want = plain.encode_prompt(["a red circle"], [""], 1, True, clip_skip)
        print(f"clip_skip {clip_skip}: graph vs eager rel {rel(got[clip_skip], want):.2e}")
        assert rel(got[clip_skip], want) <= 1e-6
    graphs = pipe.engine._text_calls  # per clip_skip
    assert set(graphs) == {None, 1}
    assert all(isinstance(g, CUDAGraphRunner) and g.captured == 1 for g in graphs.values())
    first = got[None].clone()
    pipe.encode_prompt(["a blue square"], [""], 1, True)  # replays into the graph's buffer: earlier results stay
    assert torch.equal(got[None], first)


def test_bfloat16_fast_path(tiny_sd1_folder):
    ref = fastdiff.Pipeline.from_pretrained(tiny_sd1_folder, device="cuda", dtype=torch.float32, fast=False)
    pipe = fastdiff.Pipeline.from_pretrained(tiny_sd1_folder, device="cuda", fast=FastConfig(dtype=torch.bfloat16))
    kw = dict(steps=6, seed=5, output_type="latent", progress=False)
    expected, got = torch.stack(ref("a red circle", **kw)), torch.stack(pipe("a red circle", **kw))
    print(f"bf16 fast path vs fp32 plain: rel {rel(got, expected):.2e}")
    assert pipe.dtype == torch.bfloat16
    assert rel(got, expected) <= 5e-2


def _forget_compiled_kernels(monkeypatch) -> None:
    """Until the test ends, fastdiff's kernels start over as in a fresh process: no compiled variant in memory
    (Triton's disk cache stays) and no recorded launch, whatever other tests in this process compiled."""
    import importlib

    from fastdiff.kernels import _triton

    device = torch.cuda.current_device()
    for jit in kernel_jits():
        monkeypatch.delitem(jit.device_caches, device, raising=False)
    for name in KERNEL_MODULES:
        for value in vars(importlib.import_module(f"fastdiff.kernels.{name}")).values():
            for launcher in value if isinstance(value, tuple) else (value,):
                if isinstance(launcher, _triton.Launcher):
                    monkeypatch.setattr(launcher, "_launches", {})


@pytest.mark.parametrize("scheduler", ["dpmpp_2m", "euler_a"])
def test_first_image_compiles_its_kernels_ahead_all_at_once(tiny_sd1_folder, scheduler, monkeypatch):
    """Every Triton kernel the first image of a new shape compiles, it compiles inside compiling_ahead(); the
    image itself then compiles nothing more."""
    import fastdiff.engine.engine as engine_module  # where FastEngine.compile_ahead finds compiling_ahead

    counts = []
    real = engine_module.compiling_ahead

    @contextlib.contextmanager
    def counting():
        with real():
            yield
        counts.append(compiled_kernel_variants())

    monkeypatch.setattr(engine_module, "compiling_ahead", counting)
    _forget_compiled_kernels(monkeypatch)  # what other tests in this process compiled must not count
    pipe = fastdiff.Pipeline.from_pretrained(tiny_sd1_folder, device="cuda")
    before = compiled_kernel_variants()
    # 72x56 pixels: 9x7 latents
    kw = dict(steps=3, seed=5, height=72, width=56, output_type="np", progress=False, scheduler=scheduler)
    images = pipe(["a red circle", "a blue square"], **kw)
    after = compiled_kernel_variants()
    again = pipe(["a red circle", "a blue square"], **kw)  # the same shape: no second compile-ahead pass
    print(f"{scheduler}: kernel variants {before} before, {counts} after compiling ahead, {after} after the image")
    assert len(counts) == 1 and counts[0] > before
    assert after == counts[0], "the image compiled kernels that compiling ahead did not"
    assert all(np.isfinite(image).all() for image in images + again)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch, logit_std", [(1, 1.0), (2, 8.0)])
def test_matmul_attention_error_within_twice_sdpas_at_the_vae_width(dtype, batch, logit_std):
    """SD's VAE attention: one head of 512 over the 64x64 latent's 4096 tokens. Error against a float64
    reference, next to torch SDPA's at the same precision."""
    import torch.nn.functional as F

    from fastdiff.ops import matmul_attention

    g = torch.Generator("cuda").manual_seed(batch)
    q, k, v = (torch.randn(batch, 1, 4096, 512, device="cuda", generator=g) for _ in range(3))
    q = q * logit_std
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    ours = matmul_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    theirs = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    print(f"{dtype} b{batch} logits std {logit_std}: matmul {rel(ours, ref):.2e}, sdpa {rel(theirs, ref):.2e}")
    assert ours.dtype == dtype
    assert rel(ours, ref) <= 2 * rel(theirs, ref)
