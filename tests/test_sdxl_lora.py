"""SDXL LoRAs through the Pipeline against diffusers' `load_lora_weights` + `set_adapters` with the same files (a peft
adapter on the tiny SDXL UNet and both text encoders, saved by diffusers' `save_lora_weights` and in sd-scripts'
kohya layout with SGM block names), CPU float32; unloading returns the base image bit for bit; an SDXL LoRA on an
SD1 pipeline and an SD1 LoRA on an SDXL pipeline are refused as such, changing nothing."""
import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.loading.lora import LoraError, read_lora
from lora_files import peft_layers, save_lora_files, save_sdxl_lora_files
from test_pipeline import diffusers_scheduler, psnr
from tiny_models import make_tiny_sd
from tiny_sdxl import sdxl_components, save_sdxl_folder

STEPS = 4
GUIDANCE = 5.0
PROMPT = "a red circle on the left"
NEGATIVE = "blurry"


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """(the tiny SDXL base's folder, its LoRA files, peft's deltas of the adapter)."""
    folder = tmp_path_factory.mktemp("sdxl")
    save_sdxl_folder(sdxl_components("base"), folder / "model")
    source = sdxl_components("base")  # the same weights, to draw the adapter on
    files = save_sdxl_lora_files(source, folder)
    return folder / "model", files, peft_layers(source)


def _latents() -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def _ours(pipe) -> np.ndarray:
    return pipe(PROMPT, STEPS, guidance_scale=GUIDANCE, negative_prompt=NEGATIVE, latents=_latents(),
                scheduler="euler", output_type="np", progress=False)[0]


@pytest.mark.parametrize("file_format", ["diffusers", "kohya"])
def test_layers_are_peft_s_own(xl, file_format):
    """Every layer peft wrapped, on the UNet and both text encoders, with peft's delta; nothing else."""
    folder, files, expected = xl
    pipe = fastdiff.Pipeline.from_pretrained(folder, device="cpu")
    layers = read_lora(files[file_format], pipe._loras.models)
    assert set(layers) == set(expected)
    assert {target.partition(".")[0] for target in layers} == {"unet", "text_encoder", "text_encoder_2"}
    for target, layer in layers.items():
        want = expected[target][0].reshape(layer.delta().shape)
        assert float((layer.delta() - want).norm() / want.norm()) < 1e-5, target


@pytest.mark.parametrize("file_format, weight", [("diffusers", 1.0), ("diffusers", 0.7), ("kohya", 0.7)])
def test_sdxl_lora_images_match_diffusers_and_unloading_restores_the_base(xl, file_format, weight):
    from diffusers import StableDiffusionXLPipeline

    folder, files, _ = xl
    pipe = fastdiff.Pipeline.from_pretrained(folder, device="cpu")
    oracle = StableDiffusionXLPipeline.from_pretrained(folder)
    oracle.set_progress_bar_config(disable=True)
    oracle.scheduler = diffusers_scheduler("euler", False, pipe.scheduler_config)
    oracle.load_lora_weights(files[file_format], adapter_name="style")
    oracle.set_adapters(["style"], adapter_weights=[weight])
    want = oracle(PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE, negative_prompt=NEGATIVE,
                  latents=_latents(), output_type="np").images[0]

    base = _ours(pipe)
    assert pipe.load_lora(files[file_format], weight) == files[file_format].stem
    got = _ours(pipe)
    pipe.set_lora_weights({files[file_format].stem: 0.0})
    off = _ours(pipe)
    pipe.set_lora_weights({files[file_format].stem: weight})
    again = _ours(pipe)
    pipe.unload_loras()
    print(f"SDXL {file_format} at {weight}: PSNR {psnr(got, want):.1f} dB against diffusers, "
          f"{psnr(got, base):.1f} dB against the base image")
    assert psnr(got, want) >= 40
    assert psnr(got, base) < 40, "the LoRA changes the image"
    assert np.array_equal(off, base) and np.array_equal(again, got)
    assert np.array_equal(_ours(pipe), base)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1")
    make_tiny_sd(folder / "model", "sd1")
    return folder / "model", save_lora_files(make_tiny_sd(folder / "source", "sd1"), folder)


def _refused(pipe, path, family: str) -> str:
    models = list(pipe._loras.models.values())
    before = [{k: v.clone() for k, v in model.state_dict().items()} for model in models]
    with pytest.raises(LoraError, match=f"it is an {family} LoRA") as e:
        pipe.load_lora(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert all(torch.equal(model.state_dict()[k], v) for model, b in zip(models, before) for k, v in b.items())
    assert pipe.loras == {}
    return str(e.value)


@pytest.mark.parametrize("file_format", ["diffusers", "kohya"])
def test_an_sdxl_lora_on_sd1_is_refused(xl, sd1, file_format):
    message = _refused(fastdiff.Pipeline.from_pretrained(sd1[0], device="cpu"), xl[1][file_format], "SDXL")
    assert "this model is SD1/SD2" in message
    assert ("lora_te2_" if file_format == "kohya" else "text_encoder_2.") in message


def test_an_sd1_lora_on_sdxl_is_refused(xl, sd1, tmp_path):
    from safetensors.torch import load_file, save_file

    pipe = fastdiff.Pipeline.from_pretrained(xl[0], device="cpu")
    # SD1 kohya files from sd-scripts name their text encoder lora_te_ (diffusers' converter writes lora_te1_)
    state = {k.replace("lora_te1_", "lora_te_"): v for k, v in load_file(sd1[1]["kohya"]).items()}
    save_file(state, tmp_path / "sd1.safetensors")
    message = _refused(pipe, tmp_path / "sd1.safetensors", "SD1/SD2")
    assert "this model is SDXL" in message and "lora_te_" in message
    # diffusers' format does not tell the family by its names: the layers do not fit SDXL's
    with pytest.raises(LoraError, match="do not fit|name no Linear or Conv2d"):
        pipe.load_lora(sd1[1]["diffusers"])
