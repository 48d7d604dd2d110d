"""SDXL end to end on CPU in float32: fastdiff's Pipeline, loaded from diffusers folders of tiny random SDXL models
(tests/tiny_sdxl.py), against diffusers' StableDiffusionXLPipeline and StableDiffusionXLImg2ImgPipeline with the
same weights, the same initial latents and the same generator: txt2img (negative prompt, or an empty one given as
zeros), the base -> refiner hand-off, img2img, SDXL-Turbo's unguided few steps, the fast engine; the loading of
base, refiner and fp16-variant folders; the VAE's float32 decoding when the rest runs in float16; argument errors;
the CLI."""
import copy
import json
import shutil

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff import schedulers
from fastdiff.cli import main
from fastdiff.engine import Engine, FastConfig, FastEngine
from fastdiff.loading import CheckpointError, load_components
from fastdiff.pipeline import vae_dtype_for
from test_pipeline import diffusers_scheduler, psnr
from tiny_models import make_tiny_sd, rel
from tiny_sdxl import POOLED_DIM, TEXT_DIMS, sdxl_components, save_sdxl_folder

STEPS = 4
GUIDANCE = 5.0  # diffusers' SDXL default; fastdiff's is 7.5 for every model, so each call names it
PROMPTS = ["a red circle on the left", "a blue square"]
NEGATIVE = "blurry"
NO_GRAPHS = FastConfig(cuda_graphs=False)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """{"base": (fastdiff pipeline, diffusers pipeline, folder), "refiner": (...)}, built once."""
    out = {}
    for kind in ("base", "refiner"):
        oracle = sdxl_components(kind)
        folder = save_sdxl_folder(oracle, tmp_path_factory.mktemp(kind))
        out[kind] = (fastdiff.Pipeline.from_pretrained(folder, device="cpu"), oracle, folder)
    return out


def _latents(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _scores(got, expected, what: str) -> list[float]:
    scores = [psnr(g, e) for g, e in zip(got, expected)]
    print(f"{what}: PSNR {[round(s, 1) for s in scores]} dB")
    assert len(got) == len(expected)
    return scores


# ---- txt2img ------------------------------------------------------------------------------------------------

CASES = [("euler", False), ("dpmpp_2m", False), ("dpmpp_2m", True), ("ddim", False)]


@pytest.mark.parametrize("negative", [NEGATIVE, None], ids=["negative prompt", "empty negative: zeros"])
@pytest.mark.parametrize("scheduler, karras", CASES, ids=[f"{s}{' karras' if k else ''}" for s, k in CASES])
def test_txt2img_matches_diffusers(xl, scheduler, karras, negative):
    ours, oracle, _ = xl["base"]
    oracle.scheduler = diffusers_scheduler(scheduler, karras, ours.scheduler_config)
    latents = _latents()
    expected = oracle(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, output_type="np",
                      negative_prompt=None if negative is None else [negative] * 2, latents=latents.clone(),
                      generator=torch.Generator().manual_seed(2)).images
    got = ours(PROMPTS, STEPS, guidance_scale=GUIDANCE, negative_prompt=negative, latents=latents,
               scheduler=scheduler, karras=karras, seed=torch.Generator().manual_seed(2), output_type="np",
               progress=False)
    scores = _scores(got, expected, f"{scheduler} karras={karras} negative={negative!r}")
    assert got[0].shape == (64, 64, 3)  # unet sample_size 8 x the VAE's 8
    assert min(scores) >= 40.0


@pytest.mark.parametrize("prompts, conditioning", [
    (PROMPTS, dict(prompt_2=["an oil painting", "a photo"], negative_prompt_2="dark", original_size=(96, 128),
                   crops_coords_top_left=(16, 8), target_size=(64, 64))),
    # diffusers' txt2img reads the negative sizes only when both are given (then the negative crop too), and lays
    # its time ids out as [negative, positive] * batch against the embeddings' [negatives; positives]: the
    # negative rows' own sizes reach the right rows for one prompt only
    (PROMPTS[:1], dict(negative_original_size=(4096, 64), negative_crops_coords_top_left=(0, 0),
                       negative_target_size=(32, 2048))),
], ids=["second prompts, sizes and crop", "negative sizes"])
def test_second_prompts_and_size_conditioning_match_diffusers(xl, prompts, conditioning):
    ours, oracle, _ = xl["base"]
    oracle.scheduler = diffusers_scheduler("euler", False, ours.scheduler_config)
    latents = _latents(len(prompts))
    expected = oracle(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                      negative_prompt=[NEGATIVE] * len(prompts), latents=latents.clone(), output_type="np",
                      **conditioning).images
    kw = dict(guidance_scale=GUIDANCE, negative_prompt=NEGATIVE, latents=latents, scheduler="euler", output_type="np",
              progress=False)
    got = ours(prompts, STEPS, **conditioning, **kw)
    plain = ours(prompts, STEPS, **kw)
    assert min(_scores(got, expected, f"{sorted(conditioning)}")) >= 40.0
    assert max(_scores(plain, expected, "without them (must differ)")) < 40.0  # the arguments reach the model


def test_force_zeros_for_empty_prompt_is_what_the_40_db_bar_sees(xl):
    """An empty negative prompt gives zeros (force_zeros_for_empty_prompt); encoding "" instead (the option off)
    gives diffusers' image for negative_prompt="", and an image the 40 dB bar tells apart from the zeros'."""
    ours, oracle, _ = xl["base"]
    oracle.scheduler = diffusers_scheduler("euler", False, ours.scheduler_config)
    latents = _latents()
    kw = dict(guidance_scale=GUIDANCE, output_type="np")
    encoded = oracle(PROMPTS, num_inference_steps=STEPS, negative_prompt=["", ""], latents=latents.clone(),
                     **kw).images
    unzeroed = copy.copy(ours)
    unzeroed.options = {**ours.options, "force_zeros_for_empty_prompt": False}
    got = unzeroed(PROMPTS, STEPS, latents=latents, scheduler="euler", progress=False, **kw)
    zeros = ours(PROMPTS, STEPS, latents=latents, scheduler="euler", progress=False, **kw)
    assert min(_scores(got, encoded, "option off, negative \"\" encoded")) >= 40.0
    assert max(_scores(zeros, encoded, "zeros against the encoded \"\" (must differ)")) < 40.0


def test_clip_skip_without_guidance_matches_diffusers(xl):
    """diffusers applies clip_skip to the prompt alone (its negative prompt ignores it; fastdiff's does not), so
    compare without guidance: hidden_states[-(clip_skip + 2)] of both encoders."""
    ours, oracle, _ = xl["base"]
    oracle.scheduler = diffusers_scheduler("euler", False, ours.scheduler_config)
    latents = _latents()
    expected = oracle(PROMPTS, num_inference_steps=STEPS, guidance_scale=1.0, clip_skip=1, latents=latents.clone(),
                      output_type="np").images
    got = ours(PROMPTS, STEPS, guidance_scale=1.0, clip_skip=1, latents=latents, scheduler="euler",
               output_type="np", progress=False)
    assert min(_scores(got, expected, "clip_skip=1, no guidance")) >= 40.0


def test_sdxl_turbo_unguided_few_steps_match_diffusers(xl):
    """SDXL-Turbo: guidance 0 (one UNet pass, no negative), Euler ancestral on trailing timesteps, 1 to 4 steps."""
    from diffusers import EulerAncestralDiscreteScheduler

    ours, oracle, _ = xl["base"]
    turbo = copy.copy(ours)
    turbo.scheduler_config = {**ours.scheduler_config, "timestep_spacing": "trailing"}
    turbo._schedules = {}
    oracle.scheduler = EulerAncestralDiscreteScheduler.from_config(turbo.scheduler_config)
    for steps in (1, 4):
        expected = oracle(PROMPTS, num_inference_steps=steps, guidance_scale=0.0, output_type="np",
                          generator=torch.Generator().manual_seed(5)).images
        got = turbo(PROMPTS, steps, guidance_scale=0.0, scheduler="euler_a", output_type="np", progress=False,
                    seed=torch.Generator().manual_seed(5))
        assert min(_scores(got, expected, f"turbo, {steps} step(s)")) >= 40.0


# ---- the base -> refiner hand-off, img2img --------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m", "euler_a"])
def test_base_to_refiner_hand_off_matches_diffusers(xl, scheduler):
    """The base stops after 80% of the denoising (denoising_end) and the refiner continues from its noisy latents
    (denoising_start), each one's generator passed on as in diffusers' ensemble-of-experts recipe."""
    base, base_oracle, _ = xl["base"]
    refiner, refiner_oracle, _ = xl["refiner"]
    base_oracle.scheduler = diffusers_scheduler(scheduler, False, base.scheduler_config)
    refiner_oracle.scheduler = diffusers_scheduler(scheduler, False, refiner.scheduler_config)
    steps, latents = 10, _latents()
    kw = dict(guidance_scale=GUIDANCE, negative_prompt=[NEGATIVE] * 2)
    generator = torch.Generator().manual_seed(3)
    handed = base_oracle(PROMPTS, num_inference_steps=steps, denoising_end=0.8, latents=latents.clone(),
                         output_type="latent", generator=generator, **kw).images
    expected = refiner_oracle(PROMPTS, image=handed, num_inference_steps=steps, denoising_start=0.8,
                              output_type="np", generator=generator, **kw).images
    seed = torch.Generator().manual_seed(3)
    ours = base(PROMPTS, steps, denoising_end=0.8, latents=latents, output_type="latent", scheduler=scheduler,
                seed=seed, progress=False, **kw)
    got = refiner(PROMPTS, steps, image=torch.stack(ours), denoising_start=0.8, output_type="np", scheduler=scheduler,
                  seed=seed, progress=False, **kw)
    latents_err = rel(torch.stack(ours), handed)
    print(f"{scheduler}: handed-over latents rel {latents_err:.2e}")
    assert latents_err <= 1e-4
    sched = base.schedule(scheduler, steps)
    assert schedulers.denoising_end_index(sched, 0.8) == schedulers.denoising_start_index(sched, 0.8) < steps
    assert min(_scores(got, expected, f"{scheduler} base -> refiner")) >= 40.0


def test_the_cut_follows_diffusers_rounding_and_the_samplers_stop_there(xl):
    ours, _, _ = xl["base"]
    sched = ours.schedule("euler", 5)  # leading spacing: timesteps 801, 601, 401, 201, 1
    assert sched.timesteps == (801.0, 601.0, 401.0, 201.0, 1.0)
    assert [schedulers.denoising_end_index(sched, f) for f in (0.2, 0.5, 0.8, 0.999)] == [1, 2, 4, 5]
    assert [schedulers.denoising_start_index(sched, f) for f in (0.2, 0.5, 0.8, 0.999)] == [1, 2, 4, 5]
    with pytest.raises(ValueError, match=r"a denoising fraction must be a float in \(0, 1\), got 1.0"):
        schedulers.denoising_end_index(sched, 1.0)
    steps = []
    schedulers.sample(lambda x, t: torch.zeros_like(x), torch.ones(1, 4, 2, 2), sched, start_index=1, end_index=3,
                      callback=lambda i, x, x0: steps.append(i))
    assert steps == [1, 2]
    with pytest.raises(ValueError, match=r"end_index must be in \[start_index=2, 5\], got 1"):
        schedulers.sample(lambda x, t: x, torch.ones(1), sched, start_index=2, end_index=1)


def test_img2img_matches_diffusers(xl):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    base, base_oracle, _ = xl["base"]
    refiner, refiner_oracle, _ = xl["refiner"]
    img2img = StableDiffusionXLImg2ImgPipeline(**base_oracle.components)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = diffusers_scheduler("euler", False, base.scheduler_config)
    refiner_oracle.scheduler = diffusers_scheduler("dpmpp_2m", False, refiner.scheduler_config)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    for ours, oracle, scheduler, strength, what in ((base, img2img, "euler", 0.6, "base"),
                                                     (refiner, refiner_oracle, "dpmpp_2m", 0.3, "refiner")):
        expected = oracle(PROMPTS[0], image=image, strength=strength, num_inference_steps=10, output_type="np",
                          guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(4)).images
        got = ours(PROMPTS[0], 10, image=image, strength=strength, scheduler=scheduler, guidance_scale=GUIDANCE,
                   seed=torch.Generator().manual_seed(4), output_type="np", progress=False)
        assert min(_scores(got, expected, f"{what} img2img, strength {strength}")) >= 40.0


# ---- the fast engine ----------------------------------------------------------------------------------------

def test_fast_engine_matches_diffusers(xl):
    """The fast path on CPU (fused modules, add embedding and time features once per prompt and schedule, no
    graphs): the base's txt2img and the refiner's hand-off."""
    base, base_oracle, base_folder = xl["base"]
    refiner, refiner_oracle, refiner_folder = xl["refiner"]
    fast_base = fastdiff.Pipeline.from_pretrained(base_folder, device="cpu", fast=NO_GRAPHS)
    fast_refiner = fastdiff.Pipeline.from_pretrained(refiner_folder, device="cpu", fast=NO_GRAPHS)
    base_oracle.scheduler = diffusers_scheduler("dpmpp_2m", False, base.scheduler_config)
    refiner_oracle.scheduler = diffusers_scheduler("dpmpp_2m", False, refiner.scheduler_config)
    latents, kw = _latents(), dict(guidance_scale=GUIDANCE, negative_prompt=[NEGATIVE] * 2)
    expected = base_oracle(PROMPTS, num_inference_steps=STEPS, latents=latents.clone(), output_type="np", **kw).images
    got = fast_base(PROMPTS, STEPS, latents=latents, scheduler="dpmpp_2m", output_type="np", progress=False, **kw)
    assert isinstance(fast_base.engine, FastEngine) and isinstance(fast_refiner.engine, FastEngine)
    assert min(_scores(got, expected, "fast engine, base")) >= 40.0
    handed = base_oracle(PROMPTS, num_inference_steps=10, denoising_end=0.8, latents=latents.clone(),
                         output_type="latent", **kw).images
    expected = refiner_oracle(PROMPTS, image=handed, num_inference_steps=10, denoising_start=0.8, output_type="np",
                              **kw).images
    got = fast_refiner(PROMPTS, 10, image=handed, denoising_start=0.8, scheduler="dpmpp_2m", output_type="np",
                       progress=False, **kw)
    assert min(_scores(got, expected, "fast engine, refiner")) >= 40.0


def test_fast_engine_conditioning_follows_the_prompt_and_the_add_embeddings_weights(xl):
    """FastEngine's denoiser against Engine's on the same SDXL conditioning: its time features (time embedding +
    add embedding, per conditioning row) are the schedule's rows for this prompt; another prompt's denoiser, new
    add_embedding weights (written in place, as a LoRA merge does) or weights_changed() give new ones."""
    _, _, folder = xl["base"]
    c = load_components(folder)
    plain = Engine(copy.deepcopy(c.unet), c.vae, c.text_encoder, c.text_encoder_2)
    fast = FastEngine(c.unet, c.vae, c.text_encoder, NO_GRAPHS, text_encoder_2=c.text_encoder_2)
    timesteps = schedulers.make_schedule("euler", 4, c.scheduler_config).model_timesteps
    x = torch.randn(1, 4, 8, 8)
    rows = [(torch.randn(2, 77, sum(TEXT_DIMS)), torch.randn(2, POOLED_DIM),
             torch.tensor([[64.0, 64, 0, 0, 64, 64], [128.0, 96, 8, 0, 64, 64]])) for _ in range(2)]
    fns = [(fast.denoiser(*prompt[:1], True, text_embeds=prompt[1], time_ids=prompt[2]), *prompt) for prompt in rows]
    for k in (0, 1, 0):
        fn, context, text_embeds, time_ids = fns[k]
        for i in range(4):
            err = rel(fn(x, timesteps[i]), plain.denoiser(context, True, text_embeds, time_ids)(x, timesteps[i]))
            assert err <= 1e-5, (k, i, err)
    assert len(fast._time_tables) == 2  # one per prompt
    fn, context, text_embeds, time_ids = fns[0]
    for change in ("in place", "weights_changed"):
        with torch.no_grad():
            for module in (c.unet.add_embedding, plain.unet.add_embedding):
                module.linear_2.bias.add_(0.5)
        if change == "weights_changed":
            fast.weights_changed()
        err = rel(fn(x, timesteps[2]), plain.denoiser(context, True, text_embeds, time_ids)(x, timesteps[2]))
        print(f"add embedding changed ({change}): rel {err:.2e}")
        assert err <= 1e-5
    with pytest.raises(ValueError, match=r"^text_embeds and time_ids have 1 rows, expected one per context row"):
        fast.denoiser(context, True, text_embeds=text_embeds[:1], time_ids=time_ids[:1])
    with pytest.raises(ValueError, match=r"^time_ids missing"):
        fast.denoiser(context, True, text_embeds=text_embeds)


def test_engines_encode_both_text_encoders_alike(xl):
    _, oracle, folder = xl["base"]
    c = load_components(folder)
    plain = Engine(c.unet, c.vae, c.text_encoder, c.text_encoder_2)
    fast = FastEngine(copy.deepcopy(c.unet), c.vae, c.text_encoder, NO_GRAPHS, text_encoder_2=c.text_encoder_2)
    ids = c.tokenizer_2([PROMPTS[0], ""])
    with torch.no_grad():
        theirs = oracle.text_encoder_2(ids, output_hidden_states=True)
    for engine in (plain, fast):
        hidden, pooled = engine.encode_penultimate(ids, second=True)
        first, none = engine.encode_penultimate(ids, clip_skip=1)
        assert none is None and first.shape == (2, 77, TEXT_DIMS[0])
        assert rel(hidden, theirs.hidden_states[-2]) <= 1e-5 and rel(pooled, theirs.text_embeds) <= 1e-5


# ---- loading ------------------------------------------------------------------------------------------------

def test_loading_reads_the_family_options_and_both_text_encoders(xl, tmp_path):
    base, _, base_folder = xl["base"]
    refiner, _, refiner_folder = xl["refiner"]
    assert base.sdxl and not base.refiner and refiner.refiner
    assert base.options == {"force_zeros_for_empty_prompt": True, "requires_aesthetics_score": False}
    assert refiner.options == {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}
    assert refiner.text_encoder is None and refiner.tokenizer is None
    assert base.text_encoder.text_projection is None and base.text_encoder_2.config.projection_dim == POOLED_DIM
    assert base.tokenizer.pad_id == 49407 and base.tokenizer_2.pad_id == 0  # "!" pads SDXL's second tokenizer
    assert "(SDXL, " in base.source and "(SDXL refiner, " in refiner.source
    # the fp16 variant, as published: *.fp16.safetensors files holding float16 tensors, read into float32
    variant = save_sdxl_folder(copy.deepcopy(sdxl_components("base")).to(torch.float16), tmp_path / "fp16", "fp16")
    assert (variant / "text_encoder_2" / "model.fp16.safetensors").is_file()
    c = load_components(variant, variant="fp16")
    assert "variant fp16" in c.source and c.text_encoder_2.text_projection.weight.dtype == torch.float32
    assert rel(c.text_encoder_2.text_projection.weight, base.text_encoder_2.text_projection.weight) < 1e-3
    with pytest.raises(CheckpointError, match=r"missing weights in .*unet for variant 'fp16'"):
        load_components(base_folder, variant="fp16")


def _edited_copy(folder, target, edit):
    """A copy of the diffusers folder `folder` at `target`, with edit(model_index dict, target) applied."""
    shutil.copytree(folder, target)
    index = json.loads((target / "model_index.json").read_text())
    edit(index, target)
    (target / "model_index.json").write_text(json.dumps(index))
    return target


BAD_FOLDERS = {
    "tokenizer_2 missing": (lambda index, f: index.update(tokenizer_2=[None, None]),
                            r"does not describe a Stable Diffusion 1.x/2.x/XL pipeline: text_encoder_2 is listed "
                            r"without tokenizer_2"),
    "no text encoder": (lambda index, f: index.update(text_encoder=[None, None], tokenizer=[None, None],
                                                      text_encoder_2=[None, None], tokenizer_2=[None, None]),
                        r"it lists no text encoder"),
    "text_encoder_2 folder missing": (lambda index, f: shutil.rmtree(f / "text_encoder_2"),
                                      r"missing folder .*text_encoder_2$"),
    "a base read as refiner": (lambda index, f: index.update(requires_aesthetics_score=True),
                               r"projection_class_embeddings_input_dim 88 must be text_encoder_2's projection_dim 40 "
                               r"\+ 5 time ids \* addition_time_embed_dim 8 \(requires_aesthetics_score True"),
    "option not a bool": (lambda index, f: index.update(force_zeros_for_empty_prompt="yes"),
                          r"force_zeros_for_empty_prompt is 'yes', expected true or false"),
    "without the first encoder": (lambda index, f: index.update(text_encoder=[None, None], tokenizer=[None, None]),
                                  r"cross_attention_dim is 80, but the text encoders' hidden states are 48 "
                                  r"\(text_encoder_2\) wide"),
}


@pytest.mark.parametrize("edit, message", BAD_FOLDERS.values(), ids=BAD_FOLDERS.keys())
def test_bad_sdxl_folders_raise_one_checkpoint_error_naming_the_problem(xl, tmp_path, edit, message):
    folder = _edited_copy(xl["base"][2], tmp_path / "model", edit)
    with pytest.raises(CheckpointError, match=message) as e:
        load_components(folder)
    print(e.value)
    assert "\n" not in str(e.value)


def test_an_sd_unet_with_a_second_text_encoder_is_refused(tiny_sd1_folder, xl, tmp_path):
    def add_second(index, f):
        shutil.copytree(xl["base"][2] / "text_encoder_2", f / "text_encoder_2")
        shutil.copytree(xl["base"][2] / "tokenizer_2", f / "tokenizer_2")
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"])

    folder = _edited_copy(tiny_sd1_folder, tmp_path / "model", add_second)
    with pytest.raises(CheckpointError, match=r"an SDXL UNet \(addition_embed_type 'text_time'\) needs text_encoder_2 "
                                              r".*got addition_embed_type None with text_encoder_2"):
        load_components(folder)


# ---- the VAE's precision --------------------------------------------------------------------------------------

def test_the_vae_decodes_in_float32_where_sdxl_upcasts():
    from fastdiff.models.vae import VAEConfig

    upcast, kept = VAEConfig(force_upcast=True), VAEConfig(force_upcast=False)
    assert vae_dtype_for(upcast, torch.float16, sdxl=True) == torch.float32
    assert vae_dtype_for(upcast, torch.bfloat16, sdxl=True) == torch.bfloat16  # bfloat16 has float32's range
    assert vae_dtype_for(kept, torch.float16, sdxl=True) == torch.float16  # e.g. a float16-fixed SDXL VAE
    assert vae_dtype_for(upcast, torch.float16, sdxl=False) == torch.float16  # SD1/SD2 as diffusers runs them
    assert vae_dtype_for(upcast, torch.float32, sdxl=True) == torch.float32


def test_a_float16_sdxl_pipeline_decodes_sdxl_magnitude_latents_in_float32(xl):
    """SDXL's latents reach about +-30 before scaling; a VAE whose activations pass float16's 65504 there (its
    decoder's first convolution scaled up) gives inf/NaN in float16. The float16 pipeline's UNet is float16, its
    VAE float32, and its images finite."""
    _, _, folder = xl["base"]
    pipe = fastdiff.Pipeline.from_pretrained(folder, device="cpu", dtype=torch.float16)
    assert pipe.dtype == torch.float16 and pipe.vae_dtype == torch.float32
    with torch.no_grad():
        pipe.vae.decoder.conv_in.weight.mul_(5000.0)
    raw = 30 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)  # unscaled
    scaled = raw * pipe.vae.config.scaling_factor
    with torch.no_grad():
        in_half = copy.deepcopy(pipe.vae).half().decode(raw.half())
    images = pipe.decode_latents(scaled)
    print(f"float16 decode finite: {torch.isfinite(in_half).all().item()}; pipeline decode: {images.dtype}, "
          f"[{images.min().item():.3f}, {images.max().item():.3f}]")
    assert not torch.isfinite(in_half).all()
    assert images.dtype == torch.float32 and torch.isfinite(images).all()


def test_info_says_which_precision_decodes(xl, capsys):
    _, _, folder = xl["base"]
    assert main(["info", "--model", str(folder), "--device", "cpu", "--dtype", "float16"]) == 0
    out = capsys.readouterr().out
    print(out[-300:])
    assert "family     SDXL\n" in out and "unet       float16 on cpu" in out
    assert "vae        decodes in float32 (force_upcast: SDXL's VAE overflows float16)" in out


# ---- bad arguments ----------------------------------------------------------------------------------------------

BAD = {
    "denoising_end 1": ("base", dict(denoising_end=1.0),
                        "denoising_end must be a fraction of the denoising strictly between 0 and 1, got 1.0"),
    "denoising_end 0": ("base", dict(denoising_end=0), "denoising_end must be a fraction"),
    "start after end": ("refiner", dict(image=_latents(1), denoising_start=0.9, denoising_end=0.5),
                        "denoising_start must be below denoising_end, got 0.9 and 0.5"),
    "start without image": ("refiner", dict(denoising_start=0.8), "denoising_start=0.8 continues the denoising of"),
    "start with latents": ("refiner", dict(image=_latents(1), denoising_start=0.8, latents=_latents(1)),
                           "give image, and no latents"),
    "no step left": ("base", dict(denoising_end=0.1),
                     "denoising_end=0.1 with steps=4 leaves no step to run; raise steps or change denoising_end"),
    "aesthetic score on the base": ("base", dict(aesthetic_score=7.0),
                                    "aesthetic_score: this SDXL base (requires_aesthetics_score False) takes target "
                                    "sizes instead"),
    "target size on the refiner": ("refiner", dict(target_size=(64, 64)),
                                   "target_size: this SDXL refiner (requires_aesthetics_score True) takes aesthetic "
                                   "scores instead"),
    "aesthetic score nan": ("refiner", dict(aesthetic_score=float("nan")),
                            "aesthetic_score must be a finite number, got nan"),
    "original_size one int": ("base", dict(original_size=(64,)),
                              "original_size must be (height, width), two positive ints, got (64,)"),
    "negative crop": ("base", dict(crops_coords_top_left=(-8, 0)),
                      "crops_coords_top_left must be (top, left), two ints >= 0, got (-8, 0)"),
    "prompt_2 count": ("base", dict(prompt_2=["a", "b", "c"]), "prompt_2 has 3 entries, expected 1 or 1"),
    "latents of another size": ("refiner", dict(image=torch.randn(1, 4, 8, 8), height=128, width=128),
                                "image latents stand for 64x64 (WxH), expected 128x128"),
}


@pytest.mark.parametrize("kind, bad, message", BAD.values(), ids=BAD.keys())
def test_bad_arguments_fail_in_one_line_before_any_model_work(xl, kind, bad, message, monkeypatch):
    ours = xl[kind][0]
    monkeypatch.setattr(ours, "encode_prompt_xl", lambda *a, **k: pytest.fail("started work"))
    with pytest.raises(ValueError) as e:
        ours("a prompt", STEPS, guidance_scale=GUIDANCE, progress=False, **bad)
    print(e.value)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sdxl_arguments_on_an_sd1_model_are_refused(tiny_sd1_folder):
    pipe = fastdiff.Pipeline.from_pretrained(tiny_sd1_folder, device="cpu")
    assert not pipe.sdxl and not pipe.refiner and pipe.options == {}
    with pytest.raises(ValueError, match=r"^prompt_2, denoising_end: SDXL arguments, and this is an SD1/SD2 model"):
        pipe("a", 2, prompt_2="b", denoising_end=0.5, progress=False)


def test_generate_checks_sdxl_arguments_before_loading(tmp_path, monkeypatch):
    from fastdiff import pipeline

    monkeypatch.setattr(pipeline.Pipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match=r"denoising_end must be a fraction .* got 2"):
        fastdiff.generate("a", 2, model=str(tmp_path), denoising_end=2)


def test_pipeline_refuses_parts_that_do_not_make_one_family(xl):
    base, _, _ = xl["base"]
    parts = (base.unet, base.vae, base.text_encoder, base.tokenizer, base.scheduler_config)
    with pytest.raises(ValueError, match=r"an SDXL pipeline takes text_encoder_2 and options among"):
        fastdiff.Pipeline(*parts)
    with pytest.raises(ValueError, match=r"the UNet's add embedding reads 88 values, expected text_encoder_2's "
                                         r"projection \(40\) and 5 time ids of 8"):
        fastdiff.Pipeline(*parts, text_encoder_2=base.text_encoder_2, tokenizer_2=base.tokenizer_2,
                          options={"requires_aesthetics_score": True})
    with pytest.raises(ValueError, match=r"text_encoder_2 and its tokenizer come together"):
        fastdiff.Pipeline(*parts, text_encoder_2=base.text_encoder_2)


# ---- long prompts, the CLI --------------------------------------------------------------------------------------

def test_long_prompts_give_both_encoders_the_same_chunks(xl):
    """A prompt past 75 tokens on one encoder makes every text two chunks on both: the context is 154 tokens of
    32 + 48 features; the pooled output is the first chunk's."""
    ours, _, _ = xl["base"]
    long = ", ".join(["a red circle"] * 30)
    context, pooled = ours.encode_prompt_xl(["a"], [""], 1, True, prompts_2=[long], negative_2=[""])
    short, short_pooled = ours.encode_prompt_xl(["a"], [""], 1, True)
    assert context.shape == (2, 154, sum(TEXT_DIMS)) and pooled.shape == (2, POOLED_DIM)
    assert short.shape == (2, 77, sum(TEXT_DIMS))
    assert torch.equal(context[0], torch.zeros_like(context[0]))  # the empty negative: zeros
    assert torch.allclose(context[1, :77, :TEXT_DIMS[0]], short[1, :, :TEXT_DIMS[0]], atol=1e-6)


def test_cli_generates_with_an_sdxl_model_and_hands_off_to_the_refiner(xl, tmp_path, capsys):
    from PIL import Image

    base_folder, refiner_folder = str(xl["base"][2]), str(xl["refiner"][2])
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--model", base_folder, "--out", str(out), "--steps", "2", "--seed", "1",
                 "--quiet"]) == 0
    with Image.open(out) as im:
        assert im.size == (64, 64)  # the SDXL UNet's sample_size x 8
    refined = tmp_path / "r.png"
    assert main(["generate", "a red circle", "--model", base_folder, "--refiner", refiner_folder, "--out",
                 str(refined), "--steps", "8", "--seed", "1", "--quiet"]) == 0
    with Image.open(refined) as im:
        assert im.size == (64, 64)
        assert not np.array_equal(np.asarray(im), np.asarray(Image.open(out)))
    assert main(["generate", "a", "--model", base_folder, "--refiner", refiner_folder, "--out", str(refined),
                 "--steps", "4", "--quiet"]) == 1
    assert "--steps 4 with --denoising-end 0.8 leaves the refiner no step" in capsys.readouterr().err


def test_cli_refiner_needs_sdxl_models(tiny_sd1_folder, xl, tmp_path, capsys):
    assert main(["generate", "a", "--model", str(tiny_sd1_folder), "--refiner", str(xl["refiner"][2]), "--out",
                 str(tmp_path / "x.png"), "--steps", "8", "--quiet"]) == 1
    assert "--refiner hands off between SDXL models; --model" in capsys.readouterr().err
    assert main(["generate", "a", "--model", str(xl["base"][2]), "--denoising-end", "0.7", "--out",
                 str(tmp_path / "x.png")]) == 2
    assert "--denoising-end is where the base hands off to --refiner; give --refiner" in capsys.readouterr().err


def test_sd1_folder_still_loads_as_before(tmp_path):
    make_tiny_sd(tmp_path / "sd1", "sd1")
    c = load_components(tmp_path / "sd1")
    assert c.text_encoder_2 is None and c.tokenizer_2 is None and c.options == {}
    assert c.source.startswith(f"diffusers folder {tmp_path / 'sd1'} (.safetensors weights")


# ---- the CUDA fast path -------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_graphs_replay_sdxl_per_prompt_conditioning_without_host_syncs(xl):
    """On CUDA the engine captures the SDXL UNet once per shape and replays it with each prompt's rows of time
    features (time + add embedding): two prompt sets of one shape, interleaved, each give the CPU's latents (float32,
    TF32 aside), the loop makes no host synchronisation, the hand-off to the refiner holds; in float16 the VAE
    decodes in float32 and the images stay close to the CPU's."""
    base_cpu, _, base_folder = xl["base"]
    refiner_cpu, _, refiner_folder = xl["refiner"]
    base = fastdiff.Pipeline.from_pretrained(base_folder, device="cuda", dtype=torch.float32)
    refiner = fastdiff.Pipeline.from_pretrained(refiner_folder, device="cuda", dtype=torch.float32)
    kw = dict(guidance_scale=GUIDANCE, scheduler="euler_a", output_type="latent", progress=False)

    def strict(i, x, x0):
        if i == 0:
            torch.cuda.set_sync_debug_mode("error")  # from now on any host sync raises

    for prompts, seed in ((PROMPTS, 5), (["a green triangle", "a grey sky"], 6), (PROMPTS, 7)):
        try:
            on_gpu = base(prompts, STEPS, negative_prompt=NEGATIVE, seed=seed, callback=strict, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        on_cpu = base_cpu(prompts, STEPS, negative_prompt=NEGATIVE, seed=seed, **kw)
        err = rel(torch.stack(on_gpu).cpu(), torch.stack(on_cpu))
        print(f"{prompts}: GPU (CUDA graphs) vs CPU latents rel {err:.2e}")
        assert err < 1e-2  # TF32 convolutions and kernel reduction order, not another prompt's conditioning
    assert base.engine.graphs_captured == 1
    handed = [base(PROMPTS, 10, denoising_end=0.8, seed=3, **kw), base_cpu(PROMPTS, 10, denoising_end=0.8, seed=3, **kw)]
    refined = [pipe(PROMPTS, 10, image=torch.stack(latents), denoising_start=0.8, seed=3, **kw)
               for pipe, latents in zip((refiner, refiner_cpu), handed)]
    err = rel(torch.stack(refined[0]).cpu(), torch.stack(refined[1]))
    print(f"base -> refiner on the GPU vs the CPU: latents rel {err:.2e}")
    assert err < 1e-2
    half = fastdiff.Pipeline.from_pretrained(base_folder, device="cuda", dtype=torch.float16)
    assert half.dtype == torch.float16 and half.vae_dtype == torch.float32
    images = half(PROMPTS, STEPS, negative_prompt=NEGATIVE, seed=5, guidance_scale=GUIDANCE, output_type="np",
                  progress=False)
    expected = base_cpu(PROMPTS, STEPS, negative_prompt=NEGATIVE, seed=5, guidance_scale=GUIDANCE, output_type="np",
                        progress=False)
    scores = _scores(images, expected, "float16 on the GPU vs float32 on the CPU")
    assert all(np.isfinite(image).all() for image in images) and min(scores) >= 30.0
