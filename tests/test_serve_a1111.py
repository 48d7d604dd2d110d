"""The AUTOMATIC1111 API formats (fastdiff.serve.a1111): requests, checks, seeds, samplers, infotexts, responses.

The A1111 client `webuiapi` drives the requests and reads the responses with its own code; no server runs.
"""
import base64
import io
import json
import math
import random

import pytest
from PIL import Image

webuiapi = pytest.importorskip("webuiapi")

from fastdiff.request import check_request  # noqa: E402
from fastdiff.schedulers.config import SCHEDULERS  # noqa: E402
from fastdiff.serve.a1111 import (  # noqa: E402
    RANDOM_SEED_BOUND, SAMPLERS, Img2ImgRequest, Limits, RequestError, Txt2ImgRequest, decode_image, infotext,
    png_with_infotext, response, sampler_list, scheduler_list, to_generation, validate)

# stable-diffusion-webui's API defaults: modules/processing.py (StableDiffusionProcessing and its Txt2Img and
# Img2Img subclasses) and the extra fields of modules/api/models.py.
A1111_COMMON = dict(
    prompt="", negative_prompt="", styles=None, seed=-1, subseed=-1, subseed_strength=0, seed_resize_from_h=-1,
    seed_resize_from_w=-1, sampler_name=None, scheduler=None, batch_size=1, n_iter=1, steps=50, cfg_scale=7.0,
    width=512, height=512, restore_faces=None, tiling=None, do_not_save_samples=False, do_not_save_grid=False,
    eta=None, s_churn=None, s_tmax=None, s_tmin=None, s_noise=None, override_settings=None,
    override_settings_restore_afterwards=True, sampler_index="Euler", script_name=None, script_args=[],
    send_images=True, save_images=False, alwayson_scripts={})
A1111_TXT2IMG = dict(
    A1111_COMMON, enable_hr=False, denoising_strength=0.75, firstphase_width=0, firstphase_height=0, hr_scale=2.0,
    hr_upscaler=None, hr_second_pass_steps=0, hr_resize_x=0, hr_resize_y=0, hr_checkpoint_name=None,
    hr_sampler_name=None, hr_scheduler=None, hr_prompt="", hr_negative_prompt="")
A1111_IMG2IMG = dict(
    A1111_COMMON, init_images=None, resize_mode=0, denoising_strength=0.75, image_cfg_scale=None, mask=None,
    mask_blur=None, inpainting_fill=0, inpaint_full_res=True, inpaint_full_res_padding=0, inpainting_mask_invert=0,
    initial_noise_multiplier=None, include_init_images=False)


@pytest.fixture
def client(monkeypatch):
    """A webuiapi client whose posts are recorded (as the JSON that goes on the wire) instead of sent."""
    monkeypatch.setattr(webuiapi.WebUIApi, "check_extensions", lambda self: None)
    api = webuiapi.WebUIApi()
    api.sent = []
    api.post_and_get_api_result = lambda url, json_, use_async: api.sent.append(json.loads(json.dumps(json_)))
    return api


class FakeResponse:
    """What webuiapi reads of a requests.Response."""

    def __init__(self, body: dict) -> None:
        self.status_code = 200
        self.text = json.dumps(body)

    def json(self) -> dict:
        return json.loads(self.text)


def parsed(body: dict):
    """`body` as webuiapi's own code reads an HTTP response."""
    return webuiapi.WebUIApi._to_api_result(object.__new__(webuiapi.WebUIApi), FakeResponse(body))


def png_b64(image: Image.Image) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def fake_images(generation) -> list:
    return [Image.new("RGB", (generation.width, generation.height), (i * 20, 0, 0))
            for i in range(len(generation.seeds))]


def txt2img(**fields) -> Txt2ImgRequest:
    return Txt2ImgRequest.model_validate({"prompt": "a cat", "width": 64, "height": 64, **fields})


def img2img(**fields) -> Img2ImgRequest:
    image = png_b64(Image.new("RGB", (32, 48), (10, 200, 30)))
    return Img2ImgRequest.model_validate({"prompt": "a cat", "width": 64, "height": 64, "init_images": [image],
                                          **fields})


# ---- requests ---------------------------------------------------------------------------------------------------

def test_defaults_equal_a1111s_for_the_fields_webuiapi_sends(client):
    client.txt2img(prompt="a cat")
    client.img2img(images=[Image.new("RGB", (8, 8))], mask_image=Image.new("L", (8, 8)))
    txt2img_sent, img2img_sent = client.sent
    for model, a1111, sent in ((Txt2ImgRequest, A1111_TXT2IMG, txt2img_sent),
                               (Img2ImgRequest, A1111_IMG2IMG, img2img_sent)):
        assert set(sent) <= set(a1111), set(sent) - set(a1111)
        defaults = model()
        for name in sent:
            assert getattr(defaults, name) == a1111[name], name


def test_webuiapis_default_requests_are_accepted(client):
    client.txt2img(prompt="a cat", width=64, height=64)
    client.img2img(images=[Image.new("RGB", (8, 8))], prompt="a cat", width=64, height=64)
    txt2img_gen = to_generation(Txt2ImgRequest.model_validate(client.sent[0]))
    img2img_gen = to_generation(Img2ImgRequest.model_validate(client.sent[1]))
    assert (txt2img_gen.scheduler, txt2img_gen.karras, txt2img_gen.eta) == ("euler_a", False, 0.0)
    assert img2img_gen.is_img2img and img2img_gen.strength == 0.75


def test_unknown_fields_are_ignored():
    request = txt2img(sampler_index="Euler a", controlnet_units=[{"x": 1}], some_extension_field={"a": 1})
    assert not hasattr(request, "controlnet_units")
    assert "some_extension_field" not in request.model_dump()


def test_null_takes_the_default():
    request = Txt2ImgRequest.model_validate({"seed": None, "steps": None, "styles": None, "sampler_name": None})
    assert (request.seed, request.steps, request.styles, request.sampler_name) == (-1, 50, None, None)


@pytest.mark.parametrize("fields, field", [
    (dict(width=500), "width"),
    (dict(width=4096), "width"),
    (dict(height=0), "height"),
    (dict(steps=0), "steps"),
    (dict(steps=1000), "steps"),
    (dict(cfg_scale=math.nan), "cfg_scale"),
    (dict(cfg_scale=math.inf), "cfg_scale"),
    (dict(cfg_scale=0.5), "cfg_scale"),
    (dict(batch_size=0), "batch_size"),
    (dict(batch_size=17), "batch_size"),
    (dict(batch_size=4, n_iter=5), "n_iter"),
    (dict(denoising_strength=2), "denoising_strength"),
    (dict(sampler_name="Foo"), "sampler_name"),
    (dict(scheduler="Uniform"), "scheduler"),
    (dict(sampler_name="DDIM", scheduler="Karras"), "scheduler"),
    (dict(seed=-2), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(seed=2**64 - 1, batch_size=2), "seed"),
    (dict(sampler_name="Euler a", eta=0.5), "eta"),
    (dict(sampler_name="DDIM", eta=-1), "eta"),
    (dict(prompt="x" * 20001), "prompt"),
    (dict(negative_prompt="x" * 20001), "negative_prompt"),
    (dict(override_settings={"CLIP_stop_at_last_layers": 0}), "override_settings"),
])
def test_out_of_range_fields_raise_request_error_naming_them(fields, field):
    with pytest.raises(RequestError) as info:
        to_generation(txt2img(**fields))
    assert info.value.field == field
    assert isinstance(info.value, ValueError) and str(info.value).startswith(f"{field}: ")


@pytest.mark.parametrize("fields, field", [
    (dict(enable_hr=True), "enable_hr"),
    (dict(firstphase_width=256), "firstphase_width"),
    (dict(restore_faces=True), "restore_faces"),
    (dict(tiling=True), "tiling"),
    (dict(subseed_strength=0.5), "subseed_strength"),
    (dict(seed_resize_from_w=128, seed_resize_from_h=128), "seed_resize_from_w"),
    (dict(styles=["my style"]), "styles"),
    (dict(script_name="x/y/z plot"), "script_name"),
    (dict(alwayson_scripts={"ControlNet": {"args": [{"enabled": True}]}}), "alwayson_scripts"),
    (dict(refiner_checkpoint="refiner.safetensors"), "refiner_checkpoint"),
    (dict(infotext="a cat\nSteps: 20"), "infotext"),
    (dict(override_settings={"sd_vae": "other.vae.pt"}), "override_settings"),
    (dict(s_churn=1.0), "s_churn"),
    (dict(s_noise=0.9), "s_noise"),
    (dict(s_min_uncond=0.5), "s_min_uncond"),
])
def test_unsupported_txt2img_features_are_refused_naming_the_field(fields, field):
    with pytest.raises(RequestError) as info:
        validate(txt2img(**fields))
    assert info.value.field == field


@pytest.mark.parametrize("fields, field", [
    (dict(mask=png_b64(Image.new("L", (8, 8)))), "mask"),
    (dict(resize_mode=2), "resize_mode"),
    (dict(initial_noise_multiplier=0.5), "initial_noise_multiplier"),
    (dict(denoising_strength=0.01, steps=20), "denoising_strength"),
    (dict(init_images=[]), "init_images"),
    (dict(batch_size=3, init_images=[png_b64(Image.new("RGB", (8, 8)))] * 2), "init_images"),
])
def test_unsupported_img2img_features_are_refused_naming_the_field(fields, field):
    with pytest.raises(RequestError) as info:
        validate(img2img(**fields))
    assert info.value.field == field


def test_disk_and_unused_fields_are_accepted():
    request = txt2img(save_images=True, do_not_save_samples=True, hr_scale=4, hr_upscaler="Latent", subseed=3,
                      seed_resize_from_w=64, seed_resize_from_h=64, s_tmin=0.5, script_args=[1, 2])
    assert to_generation(request).width == 64


# ---- samplers -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, scheduler, karras, a1111_name", [
    ("Euler a", "euler_a", False, "Euler a"),
    ("k_euler_a", "euler_a", False, "Euler a"),
    ("k_euler_ancestral", "euler_a", False, "Euler a"),
    ("euler A", "euler_a", False, "Euler a"),
    ("Euler", "euler", False, "Euler"),
    ("Heun", "heun", False, "Heun"),
    ("DPM++ 2M", "dpmpp_2m", True, "DPM++ 2M"),  # A1111 1.9+: Automatic is Karras for DPM++ 2M
    ("k_dpmpp_2m", "dpmpp_2m", True, "DPM++ 2M"),
    ("DPM++ 2M Karras", "dpmpp_2m", True, "DPM++ 2M"),
    ("k_dpmpp_2m_ka", "dpmpp_2m", True, "DPM++ 2M"),
    ("DPM++ 2M SDE", "dpmpp_2m_sde", False, "DPM++ 2M SDE"),
    ("DPM++ 2M SDE Karras", "dpmpp_2m_sde", True, "DPM++ 2M SDE"),
    ("DDIM", "ddim", False, "DDIM"),
    ("UniPC", "unipc", False, "UniPC"),
    ("LCM", "lcm", False, "LCM"),
    ("DDPM", "ddpm", False, "DDPM"),
])
def test_sampler_names_and_aliases_map_to_fastdiff_schedulers(name, scheduler, karras, a1111_name):
    generation = to_generation(txt2img(sampler_name=name, steps=4))
    assert (generation.scheduler, generation.karras, generation.sampler_name) == (scheduler, karras, a1111_name)


@pytest.mark.parametrize("schedule, karras", [(None, False), ("automatic", False), ("Automatic", False),
                                              ("karras", True), ("Karras", True)])
def test_schedule_type_karras_sets_karras_sigmas(schedule, karras):
    generation = to_generation(txt2img(sampler_name="Euler", scheduler=schedule))
    assert generation.karras is karras
    assert generation.schedule_type == ("Karras" if karras else "Automatic")


def test_sampler_index_is_read_when_sampler_name_is_null():
    assert to_generation(txt2img()).scheduler == "euler"  # A1111's sampler_index default, "Euler"
    assert to_generation(txt2img(sampler_index="Heun")).scheduler == "heun"
    assert to_generation(txt2img(sampler_index="Heun", sampler_name="DDIM")).scheduler == "ddim"


def test_every_fastdiff_scheduler_has_an_a1111_sampler():
    assert {scheduler for scheduler, _ in SAMPLERS.values()} == set(SCHEDULERS)


def test_known_samplers_restrict_the_accepted_names():
    known = {"Euler a": SAMPLERS["Euler a"]}
    assert to_generation(txt2img(sampler_name="euler a"), known_samplers=known).scheduler == "euler_a"
    with pytest.raises(RequestError, match="Euler a") as info:
        to_generation(txt2img(sampler_name="DDIM"), known_samplers=known)
    assert info.value.field == "sampler_name"
    assert [s["name"] for s in sampler_list(known)] == ["Euler a"]


def test_eta_goes_to_ddim_and_is_ignored_where_a1111_ignores_it():
    assert to_generation(txt2img(sampler_name="DDIM", eta=0.3)).eta == 0.3
    assert to_generation(txt2img(sampler_name="DDIM")).eta == 0.0  # A1111's eta_ddim default
    assert to_generation(txt2img(sampler_name="Euler", eta=0.3)).eta == 0.0  # Euler has no eta
    assert to_generation(txt2img(sampler_name="Euler a", eta=1.0)).eta == 0.0  # always eta 1: fastdiff's default


def test_sampler_and_scheduler_lists_have_a1111s_shapes():
    samplers = sampler_list()
    assert all(set(item) == {"name", "aliases", "options"} for item in samplers)
    names = [item["name"] for item in samplers]
    assert names[:3] == ["DPM++ 2M", "DPM++ 2M SDE", "Euler a"] and "DPM++ 2M Karras" not in names
    assert next(item for item in samplers if item["name"] == "Euler a")["aliases"] == ["k_euler_a",
                                                                                       "k_euler_ancestral"]
    assert next(item for item in samplers if item["name"] == "DPM++ 2M")["options"] == {"scheduler": "karras"}
    schedulers = scheduler_list()
    assert all(set(item) == {"name", "label", "aliases", "default_rho", "need_inner_model"} for item in schedulers)
    assert [(s["name"], s["label"]) for s in schedulers] == [("automatic", "Automatic"), ("karras", "Karras")]


# ---- seeds and the generation -------------------------------------------------------------------------------------

def test_image_i_gets_seed_plus_i():
    generation = to_generation(txt2img(seed=5, batch_size=2, n_iter=2))
    assert generation.seeds == (5, 6, 7, 8)
    assert generation.prompts == ("a cat",) * 4 and generation.negative_prompts == ("",) * 4


def test_seed_minus_one_draws_a_random_base_seed():
    first = to_generation(txt2img(seed=-1, batch_size=3), rng=random.Random(1)).seeds
    assert 0 <= first[0] < RANDOM_SEED_BOUND and first == (first[0], first[0] + 1, first[0] + 2)
    assert to_generation(txt2img(seed=-1, batch_size=3), rng=random.Random(1)).seeds == first
    assert len({to_generation(txt2img()).seeds[0] for _ in range(4)}) > 1  # the system's random source


def test_seeds_up_to_2_64_are_accepted():
    assert to_generation(txt2img(seed=2**64 - 2, batch_size=2)).seeds == (2**64 - 2, 2**64 - 1)


def test_pipeline_kwargs_pass_the_pipelines_own_checks():
    generation = to_generation(txt2img(seed=1, batch_size=2, negative_prompt="blurry", sampler_name="DPM++ 2M",
                                       override_settings={"CLIP_stop_at_last_layers": 2}))
    kwargs = generation.pipeline_kwargs()
    request = check_request(**kwargs)
    assert (request.batch, request.width, request.karras) == (2, 64, True)
    assert kwargs["seed"] == [1, 2] and kwargs["clip_skip"] == 1 and "image" not in kwargs
    img2img_kwargs = to_generation(img2img()).pipeline_kwargs()
    check_request(**{k: v for k, v in img2img_kwargs.items() if k != "image"})
    assert img2img_kwargs["strength"] == 0.75 and len(img2img_kwargs["image"]) == 1


def test_batch_key_groups_the_generations_one_unet_batch_can_run():
    key = to_generation(txt2img(seed=1, prompt="a dog", negative_prompt="ugly")).batch_key()
    assert to_generation(txt2img(seed=2, batch_size=3)).batch_key() == key
    hash(key)
    for fields in (dict(width=128), dict(steps=20), dict(cfg_scale=5), dict(sampler_name="Heun"),
                   dict(scheduler="Karras"), dict(override_settings={"sd_model_checkpoint": "other"}),
                   dict(override_settings={"CLIP_stop_at_last_layers": 2})):
        assert to_generation(txt2img(**fields)).batch_key() != key, fields
    assert to_generation(img2img(sampler_name="Euler")).batch_key() != key


def test_override_settings_give_the_model_and_clip_skip():
    generation = to_generation(txt2img(override_settings={"sd_model_checkpoint": "v1-5.safetensors",
                                                          "CLIP_stop_at_last_layers": 2}))
    assert (generation.model, generation.clip_skip) == ("v1-5.safetensors", 1)
    assert to_generation(txt2img(override_settings={"CLIP_stop_at_last_layers": 1})).clip_skip is None


# ---- init images --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "data:image/png;base64,"])
def test_init_image_base64_with_or_without_a_data_url_prefix(prefix):
    source = Image.new("RGB", (32, 48), (10, 200, 30))
    generation = to_generation(img2img(init_images=[prefix + png_b64(source)], batch_size=2))
    assert len(generation.init_images) == 2
    assert all(image.mode == "RGB" and image.size == (64, 64) for image in generation.init_images)
    assert generation.init_images[0].getpixel((32, 32)) == (10, 200, 30)


def test_webuiapis_img2img_request_decodes(client):
    client.img2img(images=[Image.new("RGB", (16, 16), (1, 2, 3))], width=64, height=64, seed=9)
    generation = to_generation(Img2ImgRequest.model_validate(client.sent[0]))
    assert generation.init_images[0].getpixel((0, 0)) == (1, 2, 3) and generation.seeds == (9,)


def test_one_init_image_per_batch_image_is_reused_every_iteration():
    images = [png_b64(Image.new("RGB", (8, 8), color)) for color in ((255, 0, 0), (0, 0, 255))]
    generation = to_generation(img2img(init_images=images, batch_size=2, n_iter=2))
    colours = [image.getpixel((0, 0)) for image in generation.init_images]
    assert colours == [(255, 0, 0), (0, 0, 255), (255, 0, 0), (0, 0, 255)]


def test_transparency_is_flattened_onto_white():
    image = decode_image(png_b64(Image.new("RGBA", (8, 8), (0, 0, 0, 0))), Limits(), "init_images")
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)


def test_crop_and_resize_covers_the_size_and_keeps_the_centre():
    source = Image.new("RGB", (64, 32), (0, 0, 0))
    source.paste((255, 255, 255), (16, 0, 48, 32))  # a white middle half
    generation = to_generation(img2img(init_images=[png_b64(source)], resize_mode=1, width=32, height=32))
    image = generation.init_images[0]
    assert image.size == (32, 32) and image.getpixel((16, 16)) == (255, 255, 255)
    assert image.getpixel((1, 16))[0] > 200  # cropped at the sides: no black left


@pytest.mark.parametrize("text", [
    "not base64 at all!",
    base64.b64encode(b"hello, not an image").decode(),
    png_b64(Image.new("RGB", (8, 8)))[:60],  # a truncated PNG
    "data:image/png,iVBORw0KGgo=",  # a data URL that is not base64
    "https://example.com/cat.png",
])
def test_a_corrupt_init_image_raises_request_error_naming_init_images(text):
    with pytest.raises(RequestError) as info:
        to_generation(img2img(init_images=[text]))
    assert info.value.field == "init_images"


def test_an_oversized_init_image_raises_request_error_naming_init_images():
    big = png_b64(Image.effect_noise((64, 64), 100).convert("RGB"))  # noise: PNG cannot compress it
    limits = Limits(max_image_bytes=4000)
    with pytest.raises(RequestError, match="4000") as info:
        to_generation(img2img(init_images=[big]), limits)
    assert info.value.field == "init_images"
    with pytest.raises(RequestError) as info:  # a small file of many pixels
        decode_image(png_b64(Image.new("RGB", (40, 40))), limits, "init_images")
    assert info.value.field == "init_images" and "40x40" in info.value.message


# ---- responses ------------------------------------------------------------------------------------------------------

def test_png_infotext_round_trip():
    text = "a cat, (masterpiece:1.2)\nNegative prompt: 猫\nSteps: 20, Sampler: Euler a, Seed: 1"
    png = png_with_infotext(Image.new("RGB", (8, 8)), text)
    assert Image.open(io.BytesIO(png)).info["parameters"] == text


def test_infotext_has_a1111s_format():
    generation = to_generation(txt2img(prompt="a cat", negative_prompt="blurry", seed=1, steps=20,
                                       sampler_name="DPM++ 2M", override_settings={"CLIP_stop_at_last_layers": 2}))
    assert infotext(generation, 0, "v1-5, pruned", "cc6cb27103") == (
        "a cat\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, "
        "Seed: 1, Size: 64x64, Model hash: cc6cb27103, Model: \"v1-5, pruned\", Clip skip: 2, Version: fastdiff 0.1.0")
    img2img_gen = to_generation(img2img(seed=3, steps=20, sampler_name="DDIM", eta=0.5))
    assert infotext(img2img_gen, 0) == (
        "a cat\nSteps: 20, Sampler: DDIM, Schedule type: Automatic, CFG scale: 7.0, Seed: 3, Size: 64x64, "
        "Denoising strength: 0.75, Eta DDIM: 0.5, Version: fastdiff 0.1.0")


def test_response_parsed_by_webuiapi_gives_images_and_seed(client):
    client.txt2img(prompt="a cat", seed=5, batch_size=2, width=64, height=64)
    request = Txt2ImgRequest.model_validate(client.sent[0])
    generation = to_generation(request)
    body = response(request, generation, fake_images(generation), "v1-5", "cc6cb27103")
    result = parsed(body)
    assert [image.size for image in result.images] == [(64, 64), (64, 64)]
    assert result.images[1].getpixel((0, 0)) == (20, 0, 0)
    assert result.info["seed"] == 5 and result.info["all_seeds"] == [5, 6]
    assert result.info["infotexts"][1] == result.images[1].info["parameters"] == infotext(generation, 1, "v1-5",
                                                                                          "cc6cb27103")
    assert result.info["sampler_name"] == "Euler a" and result.info["sd_model_hash"] == "cc6cb27103"
    assert result.parameters["prompt"] == "a cat" and result.parameters["seed"] == 5


def test_info_has_the_keys_of_a1111s_processed_js():
    generation = to_generation(txt2img(seed=2))
    info = json.loads(response(txt2img(seed=2), generation, fake_images(generation))["info"])
    assert list(info) == [
        "prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
        "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps", "batch_size",
        "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash", "sd_vae_name", "sd_vae_hash",
        "seed_resize_from_w", "seed_resize_from_h", "denoising_strength", "extra_generation_params",
        "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip",
        "is_using_inpainting_conditioning", "version"]


def test_send_images_false_returns_no_images():
    request = txt2img(send_images=False)
    generation = to_generation(request)
    body = response(request, generation, fake_images(generation))
    assert body["images"] == [] and json.loads(body["info"])["all_seeds"] == list(generation.seeds)


def test_img2img_parameters_leave_out_the_init_images_unless_asked():
    request = img2img()
    generation = to_generation(request)
    assert response(request, generation, fake_images(generation))["parameters"]["init_images"] is None
    request = img2img(include_init_images=True)
    parameters = response(request, generation, fake_images(generation))["parameters"]
    assert parameters["init_images"] == request.init_images and "include_init_images" not in parameters


def test_response_wants_one_image_per_seed():
    generation = to_generation(txt2img(batch_size=2))
    with pytest.raises(ValueError, match="expected 2 images"):
        response(txt2img(batch_size=2), generation, fake_images(generation)[:1])
