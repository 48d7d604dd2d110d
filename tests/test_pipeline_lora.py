"""LoRAs through the Pipeline against diffusers' `load_lora_weights` + `set_adapters` with the same files (a peft
adapter on the UNet and the text encoder, in diffusers' and in kohya's format), CPU float32; unloading returns the
base image bit for bit; a file that cannot be applied changes nothing; and the fast path's fused modules see the
merged weights."""
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fastdiff
from fastdiff.engine import FastConfig
from fastdiff.loading.lora import LoraError
from lora_files import save_lora_files
from tiny_models import make_tiny_sd

STEPS = 4
PROMPT = "a red circle on the left"


def model_with_loras(folder, kind: str):
    """(a tiny model's folder, its LoRA files)."""
    make_tiny_sd(folder / "model", kind)
    source = make_tiny_sd(folder / "source", kind)  # the same weights, to train (here: draw) the adapter on
    return folder / "model", save_lora_files(source, folder)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return model_with_loras(tmp_path_factory.mktemp("sd1"), "sd1")


def latents() -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def ours(pipe) -> np.ndarray:
    return pipe(PROMPT, STEPS, negative_prompt="blurry", latents=latents(), scheduler="ddim", output_type="np",
                progress=False)[0]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.mark.parametrize("kind, file_format, weight", [("sd1", "diffusers", 1.0), ("sd1", "diffusers", 0.7),
                                                       ("sd1", "kohya", 1.0), ("sd1", "kohya", 0.7),
                                                       ("sd2", "diffusers", 0.7)])
def test_lora_images_match_diffusers_and_unloading_restores_the_base(model, tmp_path, kind, file_format, weight):
    from diffusers import StableDiffusionPipeline

    folder, files = model if kind == "sd1" else model_with_loras(tmp_path, kind)
    oracle = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    oracle.set_progress_bar_config(disable=True)
    oracle.load_lora_weights(files[file_format], adapter_name="style")
    oracle.set_adapters(["style"], adapter_weights=[weight])
    want = oracle(PROMPT, num_inference_steps=STEPS, guidance_scale=7.5, negative_prompt="blurry",
                  latents=latents(), output_type="np").images[0]  # make_tiny_sd's scheduler: DDIM

    pipe = fastdiff.Pipeline.from_pretrained(folder, device="cpu")
    base = ours(pipe)
    assert pipe.load_lora(files[file_format], weight) == files[file_format].stem
    got = ours(pipe)
    pipe.unload_loras()
    print(f"{kind} {file_format} at {weight}: PSNR {psnr(got, want):.1f} dB against diffusers, {psnr(got, base):.1f} dB "
          f"against the base image")
    assert psnr(got, want) >= 40
    assert psnr(got, base) < 40, "the LoRA changes the image"
    assert np.array_equal(ours(pipe), base)


def test_reweighting_and_switching_equal_loading_at_that_weight(model):
    folder, files = model
    pipe = fastdiff.Pipeline.from_pretrained(folder, device="cpu")
    pipe.load_lora(files["diffusers"], 0.7)
    at_07 = ours(pipe)
    pipe.load_lora(files["kohya"], 0.0)
    pipe.set_lora_weights({"pytorch_lora_weights": 0.0, "kohya": 0.7})
    switched = ours(pipe)
    pipe.set_lora_weights({"pytorch_lora_weights": 0.7, "kohya": 0.0})
    assert pipe.loras == {"pytorch_lora_weights": 0.7, "kohya": 0.0}
    assert psnr(switched, at_07) >= 40  # the same adapter in two formats
    assert np.array_equal(ours(pipe), at_07)
    with pytest.raises(ValueError, match="no LoRA named 'other' is loaded"):
        pipe.set_lora_weights({"other": 1.0})
    with pytest.raises(ValueError, match="weight must be a finite number"):
        pipe.set_lora_weights({"kohya": float("nan")})
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora(files["kohya"])


@pytest.mark.parametrize("engine_first", [True, False], ids=["engine-built-first", "lora-first"])
def test_the_fast_paths_fused_modules_see_the_merged_weights(model, engine_first):
    folder, files = model
    plain = fastdiff.Pipeline.from_pretrained(folder, device="cpu")
    fast = fastdiff.Pipeline.from_pretrained(folder, device="cpu", fast=FastConfig(cuda_graphs=False))
    base = ours(plain)
    if engine_first:
        assert psnr(ours(fast), base) >= 60  # projections fused, time features kept, before the LoRA comes
    for pipe in (plain, fast):
        pipe.load_lora(files["kohya"], 0.7)
    assert psnr(ours(fast), ours(plain)) >= 60
    fast.unload_loras()
    plain.unload_loras()
    assert np.array_equal(ours(plain), base)
    assert psnr(ours(fast), base) >= 60


def _lora_for_another_model(path):
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
               torch.zeros(4, 768),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight":
               torch.zeros(32, 4)}, path)


def _corrupt(path):
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")


def _unknown_keys(path):
    save_file({"lora_unet_no_such_layer.lora_down.weight": torch.zeros(4, 32),
               "lora_unet_no_such_layer.lora_up.weight": torch.zeros(32, 4)}, path)


def _pickle_that_runs_code(path):
    class Payload:
        def __reduce__(self):
            import os
            return os.system, (f"touch {path.parent / 'ran'}",)

    torch.save({"lora_unet_x.lora_down.weight": Payload()}, path.with_suffix(".pt"))


@pytest.mark.parametrize("write, message", [(_lora_for_another_model, "do not fit"),
                                            (_corrupt, "not a readable LoRA file"),
                                            (_unknown_keys, "name no Linear or Conv2d"),
                                            (_pickle_that_runs_code, "weights_only")])
def test_a_file_that_cannot_be_applied_is_named_and_changes_nothing(model, tmp_path, write, message):
    folder, files = model
    pipe = fastdiff.Pipeline.from_pretrained(folder, device="cpu")
    pipe.load_lora(files["kohya"], 0.5)
    before = {k: v.clone() for k, v in [*pipe.unet.state_dict().items(), *pipe.text_encoder.state_dict().items()]}
    path = tmp_path / "bad.safetensors"
    write(path)
    path = path if path.exists() else path.with_suffix(".pt")
    with pytest.raises(LoraError, match=message) as e:
        pipe.load_lora(path)
    after = {**pipe.unet.state_dict(), **pipe.text_encoder.state_dict()}
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert pipe.loras == {"kohya": 0.5} and not (tmp_path / "ran").exists()
