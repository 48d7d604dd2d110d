"""LoRAs on the CUDA fast path: merged into the weights in place, under the captured graphs. Switching between two
rank-32 LoRAs on SD1.5's shapes captures no graph, compiles no kernel, takes at most 30 ms, and leaves the next
image as fast as the base model's; the merged fast path matches the eager models with the same LoRA. Run on the
device: `pytest -m gpu tests/test_gpu_lora.py -s` (prints the figures RESULTS.md quotes)."""
import statistics
import time

import pytest
import torch
from safetensors.torch import save_file

import fastdiff
from cuda_graphs import all_kernel_modules, compiled_kernel_variants, counting_graph_captures
from lora_files import random_kohya_lora
from fastdiff.models import (AutoencoderKL, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, UNet2DConditionModel,
                             UNetConfig, VAEConfig)

pytestmark = pytest.mark.gpu

PROMPT = "a photograph of an astronaut riding a horse"
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, prediction_type="epsilon")


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def sd15_pipeline() -> fastdiff.Pipeline:
    """SD1.5's architecture with random weights, float16 on the GPU, on the default fast path."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet2DConditionModel(UNetConfig(sample_size=64, cross_attention_dim=768, attention_head_dim=8))
        vae = AutoencoderKL(VAEConfig(block_out_channels=(128, 256, 512, 512), layers_per_block=2))
        text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                    num_attention_heads=12, hidden_act="quick_gelu"))
    for model in (unet, vae, text_encoder):
        model.half()
    return fastdiff.Pipeline(unet, vae, text_encoder, CLIPTokenizer.default(), SCHEDULER, source="random sd15")


def timed_ms(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


@torch.no_grad()
def test_switching_loras_captures_nothing_and_costs_no_image_time(tmp_path):
    pipe = sd15_pipeline()
    noise = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))

    def image() -> torch.Tensor:
        return torch.stack(pipe(PROMPT, 25, latents=noise, output_type="pt", progress=False))

    paths = []
    for name, seed in (("style_a", 1), ("style_b", 2)):
        paths.append(tmp_path / f"{name}.safetensors")
        lora = random_kohya_lora(pipe, 32, seed)
        save_file(lora, paths[-1])
    base_weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    base_image = image()  # the first image of the shape: compiles, captures
    base_ms = [timed_ms(image) for _ in range(7)]

    modules = all_kernel_modules()
    compiled = compiled_kernel_variants(modules)
    with counting_graph_captures() as captures:
        load_ms = [timed_ms(lambda: pipe.load_lora(paths[0], 1.0)), timed_ms(lambda: pipe.load_lora(paths[1], 0.0))]
        image_a = image()
        switch_ms, lora_ms = [], []
        for i in range(8):
            weights = {"style_a": 0.0, "style_b": 1.0} if i % 2 == 0 else {"style_a": 1.0, "style_b": 0.0}
            switch_ms.append(timed_ms(lambda: pipe.set_lora_weights(weights)))
            lora_ms.append(timed_ms(image))
        image_a_again = image()
        pipe.set_lora_weights({"style_a": 0.0, "style_b": 1.0})
        image_b = image()
        unload_ms = timed_ms(pipe.unload_loras)
        after_unload = image()
    new_compiles = compiled_kernel_variants(modules) - compiled

    spread = statistics.pstdev(base_ms) / statistics.median(base_ms)
    slower = statistics.median(lora_ms) / statistics.median(base_ms) - 1
    print(f"\nSD1.5 512x512 fp16, 25 steps, two rank-32 LoRAs ({len(lora) // 3} layers each), "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n"
          f"  load: {load_ms[0]:.1f} ms, {load_ms[1]:.1f} ms; switch: median {statistics.median(switch_ms):.1f} ms, "
          f"max {max(switch_ms):.1f} ms; unload {unload_ms:.1f} ms\n"
          f"  image: base {statistics.median(base_ms):.1f} ms (spread {100 * spread:.1f}%), right after a switch "
          f"{statistics.median(lora_ms):.1f} ms ({100 * slower:+.1f}%)\n"
          f"  graphs captured {captures[0]}, kernels compiled {new_compiles}; image rel. change: "
          f"A {rel(image_a, base_image):.3f}, B {rel(image_b, base_image):.3f}; A again vs A "
          f"{rel(image_a_again, image_a):.1e}")
    assert captures[0] == 0 and new_compiles == 0
    assert max(switch_ms) <= 30.0
    assert abs(slower) <= max(0.02, 3 * spread)
    assert rel(image_a, base_image) > 1e-2 and rel(image_b, image_a) > 1e-2, "the LoRAs change the image"
    assert rel(image_a_again, image_a) <= 1e-3, "switching back gives the same image"
    assert all(torch.equal(v, base_weights[k]) for k, v in pipe.unet.state_dict().items()), "unloaded bit for bit"
    assert rel(after_unload, base_image) <= 1e-3


@torch.no_grad()
def test_merged_fast_path_matches_the_eager_models_with_the_same_lora(tiny_sd1_folder, tmp_path):
    kw = dict(steps=6, seed=5, output_type="latent", progress=False)
    got, want = [], []
    for fast, out in ((None, got), (False, want)):
        pipe = fastdiff.Pipeline.from_pretrained(tiny_sd1_folder, device="cuda", fast=fast)
        path = tmp_path / "lora.safetensors"
        save_file(random_kohya_lora(pipe, 4, 3), path)
        out.append(torch.stack(pipe("a red circle", **kw)))
        pipe.load_lora(path, 0.7)
        out.append(torch.stack(pipe("a red circle", **kw)))
    print(f"fast vs eager, fp16: base {rel(got[0], want[0]):.2e}, with the LoRA {rel(got[1], want[1]):.2e}")
    assert rel(got[1], got[0]) > 1e-2
    assert rel(got[1], want[1]) <= 1e-2
