"""Prompts as AUTOMATIC1111 reads them, end to end through the Pipeline (`fastdiff.prompts`): long prompts in 75-token
chunks, emphasis, malformed emphasis; plain prompts exactly as before. And textual-inversion embeddings against
diffusers' `load_textual_inversion`."""
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fastdiff
from fastdiff.loading.common import CheckpointError
from fastdiff.models import CLIPTokenizer
from tiny_models import make_tiny_sd

STEPS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, fastdiff pipeline, diffusers pipeline): a tiny SD1 model."""
    folder = tmp_path_factory.mktemp("sd1")
    oracle = make_tiny_sd(folder, "sd1")
    return folder, fastdiff.Pipeline.from_pretrained(folder, device="cpu"), oracle


def image(pipe, prompt, scheduler="euler") -> np.ndarray:
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    return pipe(prompt, STEPS, latents=latents, scheduler=scheduler, output_type="np", progress=False)[0]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def words(n: int, offset: int = 0) -> str:
    """n distinct one-token words."""
    vocabulary = ["red", "blue", "green", "circle", "square", "cat", "dog", "house", "tree", "river", "sky", "sun"]
    return " ".join(vocabulary[(i + offset) % len(vocabulary)] for i in range(n))


def test_plain_prompts_give_exactly_the_tokenizers_context(tiny):
    _, pipe, _ = tiny
    prompts, negative = ["a red circle on the left", words(75)], ["blurry", ""]
    want = pipe.engine.encode_text(pipe.tokenizer(negative + prompts))
    assert torch.equal(pipe.encode_prompt(prompts, negative, 1, True), want)


def test_a_200_token_prompt_is_read_to_its_end(tiny):
    _, pipe, _ = tiny
    long, changed = words(200), words(150) + " " + words(50, offset=5)
    context = pipe.encode_prompt([long], [""], 1, True)
    assert context.shape == (2, 3 * 77, pipe.text_encoder.config.hidden_size), "three chunks; the negative padded"
    assert psnr(image(pipe, long), image(pipe, changed)) < 60, "its last 50 tokens change the image"


def test_emphasis_of_one_equals_the_plain_word_and_other_weights_change_the_image(tiny):
    _, pipe, _ = tiny
    plain = image(pipe, "a red circle")
    assert np.array_equal(image(pipe, "a (red:1.0) circle"), plain)
    assert psnr(image(pipe, "a (red:1.5) circle"), plain) < 60
    assert psnr(image(pipe, "a [red] circle"), plain) < 60


def test_malformed_emphasis_reads_as_a1111_reads_it(tiny):
    _, pipe, _ = tiny
    # A1111: brackets left open weigh the rest of the prompt; a stray closer is text
    assert np.array_equal(image(pipe, "a ((red circle"), image(pipe, "a (red circle:1.21)"))
    assert np.array_equal(image(pipe, "a red) circle"), image(pipe, "a red ) circle"))
    image(pipe, "(((]]][[:")  # no exception


def test_textual_inversion_matches_diffusers(tiny, tmp_path):
    folder, _, _ = tiny
    pipe = fastdiff.Pipeline.from_pretrained(folder, device="cpu")  # its own: the embeddings stay loaded
    oracle = make_tiny_sd(tmp_path / "oracle", "sd1")
    width = pipe.text_encoder.config.hidden_size
    g = torch.Generator().manual_seed(3)
    single = tmp_path / "learned_embeds.safetensors"  # diffusers: {token: vector}
    save_file({"<shiny>": torch.randn(width, generator=g)}, single)
    double = tmp_path / "two-vectors.pt"  # A1111: string_to_param, two vectors
    torch.save({"string_to_param": {"*": torch.randn(2, width, generator=g)}, "name": "two-vectors", "step": 100},
               double)
    assert pipe.load_textual_inversion(single) == "<shiny>"
    assert pipe.load_textual_inversion(double) == "two-vectors"  # A1111 uses the file's name
    oracle.load_textual_inversion(str(single))
    oracle.load_textual_inversion(str(double), token="two-vectors")
    prompt = "a <shiny> circle in two-vectors style"
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    want = oracle(prompt, num_inference_steps=STEPS, guidance_scale=7.5, latents=latents,
                  output_type="np").images[0]  # make_tiny_sd's scheduler: DDIM
    got = image(pipe, prompt, "ddim")
    print(f"textual inversion: PSNR {psnr(got, want):.1f} dB")
    assert psnr(got, want) >= 40
    assert psnr(got, image(fastdiff.Pipeline.from_pretrained(folder, device="cpu"), prompt, "ddim")) < 60


@pytest.mark.parametrize("content, message", [
    ({"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 64)}, "SDXL embedding"),
    ({"<a>": torch.zeros(1, 16)}, "vectors are 16 wide, this model's text encoder takes 32"),
    ({"<a>": torch.zeros(1, 32), "<b>": torch.zeros(1, 32)}, "is not a textual-inversion embedding"),
])
def test_a_bad_embedding_is_refused_naming_the_file_and_nothing_changes(tiny, tmp_path, content, message):
    folder, _, _ = tiny
    pipe = fastdiff.Pipeline.from_pretrained(folder, device="cpu")
    path = tmp_path / "bad.safetensors"
    save_file(content, path)
    table = pipe.text_encoder.text_model.embeddings.token_embedding.weight.clone()
    with pytest.raises((ValueError, CheckpointError), match=message) as e:
        pipe.load_textual_inversion(path)
    assert str(path) in str(e.value)
    assert torch.equal(pipe.text_encoder.text_model.embeddings.token_embedding.weight, table)
    assert pipe.tokenizer.encode("<a>") == CLIPTokenizer.default().encode("<a>"), "no token added"


def test_an_embedding_pickle_that_would_run_code_is_refused(tiny, tmp_path):
    folder, _, _ = tiny
    pipe = fastdiff.Pipeline.from_pretrained(folder, device="cpu")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            import os
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": Payload()}}, path)
    with pytest.raises(CheckpointError, match="weights_only") as e:
        pipe.load_textual_inversion(path)
    assert str(path) in str(e.value) and not marker.exists()
