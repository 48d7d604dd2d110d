"""fastdiff.integrations.diffusers.accelerate: a diffusers Stable Diffusion pipeline on fastdiff's FastEngine,
against the same pipeline unaccelerated (CPU, float32, FastConfig(cuda_graphs=False))."""
import math

import numpy as np
import pytest
import torch

from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline)
from diffusers.models.attention_processor import AttnProcessor2_0

from fastdiff.engine import FastConfig, FastEngine
from fastdiff.integrations.diffusers import accelerate, deaccelerate, is_accelerated
from tiny_models import make_tiny_sd

PROMPT = "a red circle on a white background"
PARTS = ("unet", "vae", "text_encoder")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1")
    make_tiny_sd(folder, "sd1")
    return folder


def load(folder) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(folder):
    return load(folder)


def generate(pipe, steps: int = 3, **kwargs) -> np.ndarray:
    return pipe([PROMPT, "a blue square"], num_inference_steps=steps, guidance_scale=7.5, height=64, width=64,
                negative_prompt=["blurry", ""], generator=torch.Generator().manual_seed(0), output_type="np",
                **kwargs).images


def state(pipe, storage: bool = True) -> dict:
    """What accelerate could change: the modules, their instance attributes, each parameter's layout (and with
    `storage` its address)."""
    return {part: (getattr(pipe, part), sorted(getattr(pipe, part).__dict__),
                   [(name, p.stride(), p.requires_grad, p.data_ptr() if storage else None)
                    for name, p in getattr(pipe, part).named_parameters()]) for part in PARTS}


def unaccelerated_and_accelerated(pipe, run) -> tuple:
    """run()'s result on the pipeline as it is, then accelerated (and deaccelerated after)."""
    expected = run()
    accelerate(pipe, FastConfig(cuda_graphs=False))
    try:
        return expected, run()
    finally:
        deaccelerate(pipe)


class EngineCalls:
    """Counts the FastEngine calls the accelerated pipeline makes."""

    def __init__(self, monkeypatch):
        self.calls = {"denoiser": 0, "decode": 0, "encode_text": 0}
        for name in self.calls:
            monkeypatch.setattr(FastEngine, name, self._counted(name, getattr(FastEngine, name)))

    def _counted(self, name, method):
        def wrapper(engine, *args, **kwargs):
            self.calls[name] += 1
            return method(engine, *args, **kwargs)
        return wrapper


@pytest.mark.parametrize("scheduler", [DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                                       EulerAncestralDiscreteScheduler, DDIMScheduler])
def test_accelerated_matches_diffusers_and_deaccelerate_restores_it_exactly(pipe, scheduler, monkeypatch):
    pipe.scheduler = scheduler.from_config(pipe.scheduler.config)
    before = state(pipe, storage=False)
    expected = generate(pipe)
    steps_seen = []

    def on_step_end(p, i, t, kwargs):
        steps_seen.append(i)
        return kwargs

    accelerate(pipe, FastConfig(cuda_graphs=False))
    try:
        assert is_accelerated(pipe)
        engine = EngineCalls(monkeypatch)
        got = generate(pipe, callback_on_step_end=on_step_end)
        # the time features of the whole schedule computed once, from the timesteps diffusers steps through
        assert len(getattr(pipe, "_fastdiff_acceleration").engine._time_tables) == 1
    finally:
        deaccelerate(pipe)
    restored = generate(pipe)
    print(f"{scheduler.__name__}: PSNR accelerated vs diffusers {psnr(got, expected):.1f} dB; {engine.calls}")
    assert psnr(got, expected) >= 40
    assert engine.calls == {"denoiser": 1, "decode": 1, "encode_text": 2}  # one context for all steps
    assert steps_seen == [0, 1, 2]
    assert not is_accelerated(pipe)
    assert np.array_equal(restored, expected)
    assert state(pipe, storage=False) == before, "the same modules, their parameters laid out as before"


def test_guidance_runs_the_repeated_latents_once_and_other_batches_whole(pipe, monkeypatch):
    rows = []
    call_unet = FastEngine._call_unet

    def recording(engine, x, *args):
        rows.append(x.shape[0])
        return call_unet(engine, x, *args)

    monkeypatch.setattr(FastEngine, "_call_unet", recording)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    for guidance in (7.5, 1.0):  # [x; x] against [uncond; cond] contexts, then two different latents
        def run():
            return pipe([PROMPT, "a blue square"], num_inference_steps=2, guidance_scale=guidance, height=64,
                        width=64, latents=latents, output_type="np").images

        expected, got = unaccelerated_and_accelerated(pipe, run)
        print(f"guidance {guidance}: PSNR accelerated vs diffusers {psnr(got, expected):.1f} dB, UNet rows {rows}")
        assert psnr(got, expected) >= 40
        assert rows == [2, 2], "the engine's rows: each latent once"
        rows.clear()


def test_img2img(pipe):
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    img2img.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))  # in [0, 1]

    def run():
        return img2img(PROMPT, image=image, strength=0.7, num_inference_steps=4, guidance_scale=7.5,
                       generator=torch.Generator().manual_seed(0), output_type="np").images

    expected, got = unaccelerated_and_accelerated(img2img, run)
    print(f"img2img: PSNR accelerated vs diffusers {psnr(got, expected):.1f} dB")
    assert psnr(got, expected) >= 40
    assert np.array_equal(run(), expected)


def test_weights_are_shared_not_copied(pipe):
    accelerate(pipe, FastConfig(cuda_graphs=False))
    try:
        engine = getattr(pipe, "_fastdiff_acceleration").engine
        engine_storages = {p.untyped_storage().data_ptr() for p in engine.unet.parameters()}
        fused_qkv = [m for m in engine.unet.modules() if hasattr(m, "fused_qkv_weight")]
        for name, p in pipe.unet.named_parameters():
            assert p.untyped_storage().data_ptr() in engine_storages, name
        # the fused projections' parameters are views of one tensor, seen as such by diffusers too
        to_q, to_k = (pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight,
                      pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k.weight)
        assert to_q.untyped_storage().data_ptr() == to_k.untyped_storage().data_ptr()
        assert fused_qkv or engine.unet.fused_time_weight is not None
        for part in ("vae", "text_encoder"):
            fast = {"vae": engine.vae, "text_encoder": engine.text_encoder}[part]
            ids = {id(p) for p in fast.parameters()}
            assert all(id(p) in ids for p in getattr(pipe, part).parameters()), part
    finally:
        deaccelerate(pipe)


@pytest.fixture(scope="module")
def lora_file(folder, tmp_path_factory):
    from lora_files import save_lora_files

    pytest.importorskip("peft")
    return save_lora_files(load(folder), tmp_path_factory.mktemp("lora"))["diffusers"]


def test_fused_lora_before_and_after_accelerate(folder, lora_file):
    fused = load(folder)
    fused.load_lora_weights(lora_file)
    fused.fuse_lora()
    want, base = generate(fused), generate(pipe := load(folder))

    pipe.load_lora_weights(lora_file)
    pipe.fuse_lora()
    accelerate(pipe, FastConfig(cuda_graphs=False))
    before = generate(pipe)

    after = load(folder)
    accelerate(after, FastConfig(cuda_graphs=False))
    after.load_lora_weights(lora_file)
    with pytest.raises(ValueError, match="not fused"):
        generate(after)
    after.fuse_lora()
    got = generate(after)
    print(f"fused LoRA: PSNR before accelerate {psnr(before, want):.1f} dB, after {psnr(got, want):.1f} dB, "
          f"without the LoRA {psnr(base, want):.1f} dB")
    assert psnr(before, want) >= 40 and psnr(got, want) >= 40
    assert psnr(base, want) < 40, "the LoRA changes the image"


def test_unfused_lora_is_refused_before_any_change(folder, lora_file):
    pipe = load(folder)
    pipe.load_lora_weights(lora_file)
    before = state(pipe)
    with pytest.raises(ValueError, match="fuse_lora"):
        accelerate(pipe, FastConfig(cuda_graphs=False))
    assert state(pipe) == before and not is_accelerated(pipe)


def test_refusals_at_accelerate_time_change_nothing(pipe):
    class CustomProcessor(AttnProcessor2_0):
        pass

    before = state(pipe)
    with pytest.raises(ValueError, match="dtype"):
        accelerate(pipe, FastConfig(dtype=torch.bfloat16, cuda_graphs=False))
    with pytest.raises(ValueError, match="cuda_graphs"):
        accelerate(pipe, FastConfig())
    with pytest.raises(ValueError, match="StableDiffusionPipeline"):
        accelerate(pipe.unet)
    processor = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.processor
    pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.set_processor(CustomProcessor())
    try:
        with pytest.raises(ValueError, match=r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn2.*Custom"):
            accelerate(pipe, FastConfig(cuda_graphs=False))
    finally:
        pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.set_processor(processor)
    assert state(pipe) == before and not is_accelerated(pipe)
    accelerate(pipe, FastConfig(cuda_graphs=False))
    try:
        with pytest.raises(ValueError, match="already accelerated"):
            accelerate(pipe, FastConfig(cuda_graphs=False))
    finally:
        deaccelerate(pipe)


def test_unsupported_call_arguments_are_refused(pipe):
    accelerate(pipe, FastConfig(cuda_graphs=False))
    try:
        with pytest.raises(ValueError, match="cross_attention_kwargs"):
            generate(pipe, steps=1, cross_attention_kwargs={"scale": 0.5})
        sample, context = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
        with pytest.raises(ValueError, match="attention_mask"):
            pipe.unet(sample, 10, context, attention_mask=torch.ones(2, 64))
        assert pipe.unet(sample, 10, context).sample.shape == (2, 4, 8, 8)
    finally:
        deaccelerate(pipe)


def test_sd2_v_prediction(tmp_path):
    pipe = make_tiny_sd(tmp_path, "sd2")  # linear proj_in, per-level heads, upcast_attention, v-prediction
    expected = generate(pipe)
    accelerate(pipe, FastConfig(cuda_graphs=False))
    try:
        got = generate(pipe)
    finally:
        deaccelerate(pipe)
    print(f"sd2: PSNR accelerated vs diffusers {psnr(got, expected):.1f} dB")
    assert psnr(got, expected) >= 40
    assert np.array_equal(generate(pipe), expected)


def test_text_encoder_calls_beyond_the_final_states_run_transformers_forward(pipe, monkeypatch):
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(3))
    expected = pipe.text_encoder(ids, output_hidden_states=True)
    accelerate(pipe, FastConfig(cuda_graphs=False))
    try:
        engine = EngineCalls(monkeypatch)
        fast = pipe.text_encoder(ids)
        assert engine.calls["encode_text"] == 1
        delegated = pipe.text_encoder(ids, output_hidden_states=True)
        assert engine.calls["encode_text"] == 1
    finally:
        deaccelerate(pipe)
    torch.testing.assert_close(fast.last_hidden_state, expected.last_hidden_state)
    torch.testing.assert_close(fast.pooler_output, expected.pooler_output)
    for got, want in zip(delegated.hidden_states, expected.hidden_states):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
def test_cuda_graph_path_in_fp16_matches_the_unaccelerated_pipeline(folder):
    """On the GPU: fp16, CUDA graphs (the default there); replays give the first image again; deaccelerate gives
    diffusers' own image back."""
    pipe = load(folder).to("cuda", torch.float16)
    want = generate(pipe, steps=6)
    accelerate(pipe)
    got, again = generate(pipe, steps=6), generate(pipe, steps=6)
    deaccelerate(pipe)
    back = generate(pipe, steps=6)
    print(f"fp16 on the GPU: accelerated vs diffusers {min(psnr(g, w) for g, w in zip(got, want)):.1f} dB")
    assert min(psnr(g, w) for g, w in zip(got, want)) >= 40
    assert np.array_equal(got, again)
    assert min(psnr(b, w) for b, w in zip(back, want)) >= 60
