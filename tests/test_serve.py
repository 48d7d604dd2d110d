"""`fastdiff serve` on the embedded default model, driven over HTTP by the AUTOMATIC1111 client library `webuiapi`
(unmodified, from PyPI): txt2img and img2img, models, samplers, options, progress and interrupt, LoRA tags, a
bounded load test with batching, a full queue, limits, and keys."""
import base64
import contextlib
import io
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image
from safetensors.torch import save_file

import fastdiff
from fastdiff.serve.app import create_app, serve_in_thread
from fastdiff.serve.service import Catalog, Service
from lora_files import random_kohya_lora

pytest.importorskip("uvicorn")
webuiapi = pytest.importorskip("webuiapi")

CAPTION = "a red circle on the left on a white background"
SMALL = dict(width=64, height=64, steps=2, sampler_name="Euler a", cfg_scale=7.5)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    pipe = fastdiff.Pipeline.from_pretrained(fastdiff.pipeline.default_model_path(), device="cpu")
    save_file(random_kohya_lora(pipe, 4, 1), folder / "ink.safetensors")
    return folder


@pytest.fixture(scope="module")
def server(loras, tiny_sd1_folder, tmp_path_factory):
    """(webuiapi client, service, port) of a server on the default model, with the tiny SD1 model to switch to."""
    models = tmp_path_factory.mktemp("models")
    (models / "tiny").symlink_to(tiny_sd1_folder, target_is_directory=True)
    service = Service(Catalog.discover(models_dir=str(models), lora_dir=str(loras)), device="cpu", max_batch=8)
    service.preload()
    with serve_in_thread(create_app(service)) as port:
        yield webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=2), service, port
    service.close()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = float(np.mean((pixels(a) - pixels(b)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def test_txt2img_same_seed_same_image_and_the_info_and_png_say_the_seed(server):
    api, _, port = server
    first = api.txt2img(prompt=CAPTION, seed=5, **SMALL)
    again = api.txt2img(prompt=CAPTION, seed=5, **SMALL)
    other = api.txt2img(prompt=CAPTION, seed=6, **SMALL)
    assert first.image.size == (64, 64) and first.info["seed"] == 5 and first.info["all_seeds"] == [5]
    assert np.array_equal(pixels(first.image), pixels(again.image))
    assert not np.array_equal(pixels(first.image), pixels(other.image))
    body = requests.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json=dict(prompt=CAPTION, seed=5, **SMALL)).json()
    png = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert "Seed: 5" in png.info["parameters"] and "Sampler: Euler a" in png.info["parameters"]


def test_txt2img_batches_get_consecutive_seeds_each_image_its_own(server):
    api, _, _ = server
    result = api.txt2img(prompt=CAPTION, seed=10, batch_size=2, n_iter=2, **SMALL)
    assert result.info["all_seeds"] == [10, 11, 12, 13] and len(result.images) == 4
    alone = api.txt2img(prompt=CAPTION, seed=12, **SMALL)
    assert psnr(result.images[2], alone.image) >= 40


def test_img2img_runs_from_an_init_image(server):
    api, _, _ = server
    init = api.txt2img(prompt=CAPTION, seed=1, **SMALL).image
    result = api.img2img(images=[init], prompt="a blue square at the top on a black background", seed=2,
                         denoising_strength=0.5, **SMALL)
    assert result.image.size == (64, 64) and result.info["seed"] == 2
    assert "Denoising strength: 0.5" in result.info["infotexts"][0]


def test_models_samplers_loras_and_options(server):
    api, service, _ = server
    assert [m["title"] for m in api.get_sd_models()] == ["default", "tiny"]
    assert {"Euler a", "DPM++ 2M", "DDIM"} <= {s["name"] for s in api.get_samplers()}
    assert [lora["name"] for lora in api.get_loras()] == ["ink"]
    assert api.get_options()["sd_model_checkpoint"] == "default"
    api.util_set_model("tiny")
    try:
        assert api.get_options()["sd_model_checkpoint"] == "tiny"
        assert api.txt2img(prompt="a cat", seed=1, **SMALL).image.size == (64, 64)
    finally:
        api.set_options({"sd_model_checkpoint": "default"})
    with pytest.raises(RuntimeError, match="is not one of the server"):
        api.txt2img(prompt="a cat", override_settings={"sd_model_checkpoint": "../../etc"}, **SMALL)


def test_lora_tags_apply_the_servers_loras(server):
    api, _, _ = server
    plain = api.txt2img(prompt=CAPTION, seed=3, **SMALL).image
    styled = api.txt2img(prompt=CAPTION + " <lora:ink:1.5>", seed=3, **SMALL)
    assert psnr(styled.image, plain) < 40
    assert np.array_equal(pixels(api.txt2img(prompt=CAPTION, seed=3, **SMALL).image), pixels(plain))
    with pytest.raises(RuntimeError, match="names no LoRA of the server"):
        api.txt2img(prompt="<lora:../secret:1>", **SMALL)


def test_progress_during_a_long_request_and_interrupt(server):
    api, service, _ = server
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(api.txt2img, prompt=CAPTION, seed=4, width=128, height=128, steps=150,
                              sampler_name="Euler")
        deadline = time.monotonic() + 60
        while (state := api.get_progress())["state"]["sampling_step"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 0 < state["progress"] < 1 and state["state"]["sampling_steps"] == 150 and state["eta_relative"] > 0
        api.interrupt()
        result = running.result(60)
    assert result.image.size == (128, 128), "the images from where sampling got to, as A1111"
    assert api.get_progress()["progress"] == 0


@pytest.mark.parametrize("field, value", [("width", 500), ("height", 0), ("steps", 0), ("steps", 1000),
                                          ("cfg_scale", -1), ("batch_size", 100), ("sampler_name", "Foo"),
                                          ("seed", -2), ("enable_hr", True)])
def test_out_of_range_fields_get_a_4xx_naming_them(server, field, value):
    _, _, port = server
    answer = requests.post(f"http://127.0.0.1:{port}/sdapi/v1/txt2img", json={"prompt": "a", **SMALL, field: value})
    assert answer.status_code == 422 and answer.json()["field"] == field, answer.text


def test_48_requests_8_at_a_time_all_answered_right_and_batched(server):
    api, service, _ = server
    seeds = list(range(100, 148))
    started = time.perf_counter()
    alone = [api.txt2img(prompt=CAPTION, seed=s, **SMALL) for s in seeds[:8]]
    one_at_a_time = 8 / (time.perf_counter() - started)
    batches_before = service.batcher.stats.batches
    started = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda s: api.txt2img(prompt=CAPTION, seed=s, **SMALL), seeds))
    concurrent = len(seeds) / (time.perf_counter() - started)
    batches = service.batcher.stats.batches - batches_before
    print(f"48 requests: {one_at_a_time:.1f} images/s one at a time, {concurrent:.1f} images/s 8 at a time "
          f"({batches} batches)")
    assert [r.info["seed"] for r in results] == seeds, "every request answered with its own seed, once"
    assert all(psnr(r.image, a.image) >= 40 for r, a in zip(results, alone)), "batched images equal lone ones"
    assert batches < len(seeds), "concurrent requests shared batches"


def test_a_full_queue_answers_503_with_retry_after():
    service = Service(Catalog.discover(), device="cpu", max_queue=1, max_batch=1)
    with serve_in_thread(create_app(service)) as port:
        url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"
        with ThreadPoolExecutor(4) as pool:
            long = pool.submit(requests.post, url, json=dict(prompt=CAPTION, width=64, height=64, steps=150))
            while service.batcher.state()["state"]["sampling_step"] < 1:
                time.sleep(0.05)
            queued = pool.submit(requests.post, url, json=dict(prompt=CAPTION, **SMALL))
            while service.batcher.state()["state"]["job_count"] < 2:
                time.sleep(0.01)
            refused = requests.post(url, json=dict(prompt=CAPTION, **SMALL))
            service.batcher.interrupt()
            assert long.result(60).status_code == 200 and queued.result(60).status_code == 200
    service.close()
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1


@pytest.mark.parametrize("key, auth", [("secret", None), (None, ("user", "pass"))], ids=["api-key", "api-auth"])
def test_with_a_key_every_endpoint_needs_it(key, auth):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(Service(Catalog.discover(), device="cpu"), api_key=key, api_auth=auth))
    routes = [("get", "/sdapi/v1/progress"), ("get", "/sdapi/v1/sd-models"), ("get", "/sdapi/v1/options"),
              ("post", "/sdapi/v1/txt2img"), ("post", "/sdapi/v1/interrupt"), ("get", "/no/such/route")]
    for method, route in routes:
        assert client.request(method, route, **({"json": {}} if method == "post" else {})).status_code == 401, route
    good = {"headers": {"Authorization": f"Bearer {key}"}} if key else {"auth": auth}
    wrong = {"headers": {"Authorization": "Bearer nope"}} if key else {"auth": ("user", "nope")}
    assert client.get("/sdapi/v1/progress", **wrong).status_code == 401
    assert client.get("/sdapi/v1/progress", **good).status_code == 200


def test_serve_binds_this_machine_only_by_default():
    from fastdiff.cli import build_parser

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/model"], "--model '/no/such/model': no such file or folder"),
    (["--lora-dir", "/no/such/dir"], "--lora-dir '/no/such/dir': no such folder"),
    (["--api-auth", "nocolon"], "--api-auth must be USER:PASSWORD"),
    (["--port", "0"], "--port: must be a positive integer, got 0"),
    (["--api-key", "a", "--api-auth", "u:p"], "not allowed with argument"),
])
def test_serve_arguments_are_checked_in_one_line_before_loading(argv, message, capsys, monkeypatch):
    from fastdiff.cli import main

    monkeypatch.setattr(Service, "preload", lambda self: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) if argv[0] in ("--port", "--api-key") else contextlib.nullcontext():
        assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
