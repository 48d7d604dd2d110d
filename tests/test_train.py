"""Training on the CPU with the tiny recipe: the loss goes down, checkpoints resume bit for bit, the export is
a diffusers folder fastdiff loads and samples from, and the evaluator scores it."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fastdiff
from fastdiff.loading import load_components
from fastdiff.models import AutoencoderKL, CLIPTextModel, CLIPTokenizer, UNet2DConditionModel
from fastdiff.models.tokenizer import UnknownWordsWarning
from fastdiff.train.__main__ import EXIT_INCOMPLETE, main
from fastdiff.train.data import CAPTION_WORDS, ShapesDataset
from fastdiff.train.loop import load_checkpoint, step_generator
from fastdiff.train.recipe import get_recipe
from fastdiff.train.unet import prepare_tokenizer, train_unet, unet_loss
from fastdiff.train.vae import load_vae_folder, train_vae, vae_loss
from fastdiff.train.vocab import write_tokenizer

CPU = torch.device("cpu")
HELD_OUT = 10**9  # step numbers far beyond training: batches and noise the run never saw


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Models this small run several times faster on one thread when other processes load the CPU (two
    threads then wait on each other at every op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run through the command line: vae, unet, export to run/model."""
    out = tmp_path_factory.mktemp("run")
    assert main(["all", "--out", str(out), "--config", "tiny", "--quiet"]) == 0
    return out


def _held_out_loss(loss_fn, stage: str) -> float:
    with torch.no_grad():
        return float(np.mean([loss_fn(HELD_OUT + k, step_generator(0, stage, HELD_OUT + k)).item() for k in range(4)]))


def test_vae_steps_reduce_the_loss(run):
    recipe = get_recipe("tiny")
    torch.manual_seed(recipe.seed)  # train_vae's initial weights
    vae = AutoencoderKL(recipe.vae)
    loss_fn = vae_loss(vae, ShapesDataset(recipe.seed, recipe.image_size), recipe, CPU)
    before = _held_out_loss(loss_fn, "vae")
    vae.load_state_dict(load_checkpoint(run / "vae.pt", CPU)["models"]["vae"])
    after = _held_out_loss(loss_fn, "vae")
    print(f"VAE held-out loss {before:.4f} -> {after:.4f} after {recipe.vae_stage.steps} steps")
    assert after < 0.8 * before


def test_unet_steps_reduce_the_loss(run):
    recipe = get_recipe("tiny")
    torch.manual_seed(recipe.seed + 1)  # train_unet's initial weights
    unet, text_encoder = UNet2DConditionModel(recipe.unet), CLIPTextModel(recipe.text_encoder)
    loss_fn = unet_loss(unet, text_encoder, load_vae_folder(run / "vae", CPU), prepare_tokenizer(run, recipe),
                        ShapesDataset(recipe.seed, recipe.image_size), recipe, CPU)
    before = _held_out_loss(loss_fn, "unet")
    state = load_checkpoint(run / "unet.pt", CPU)
    unet.load_state_dict(state["models"]["unet"])
    text_encoder.load_state_dict(state["models"]["text_encoder"])
    after = _held_out_loss(loss_fn, "unet")
    print(f"UNet held-out loss {before:.4f} -> {after:.4f} after {recipe.unet_stage.steps} steps")
    assert after < 0.9 * before


def _assert_same_state(a, b, where="state"):
    """Recursive bitwise equality of checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("stage", ["vae", "unet"])
def test_resume_continues_bit_identically(run, tmp_path, stage):
    train = {"vae": train_vae, "unet": train_unet}[stage]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for folder in (straight, resumed):
        shutil.copytree(run / "vae", folder / "vae")  # the unet stage trains on it
    assert train(get_recipe("tiny", **{f"{stage}_steps": 6}), straight, CPU, progress=False).steps_done == 6
    first = train(get_recipe("tiny", **{f"{stage}_steps": 3}), resumed, CPU, progress=False)
    assert first.steps_done == 3
    half = load_checkpoint(resumed / f"{stage}.pt", CPU)
    assert half["step"] == 3 and half["optimizer"]["state"], "the checkpoint holds the optimiser's moments"
    assert train(get_recipe("tiny", **{f"{stage}_steps": 6}), resumed, CPU, progress=False).steps_done == 6
    a, b = load_checkpoint(straight / f"{stage}.pt", CPU), load_checkpoint(resumed / f"{stage}.pt", CPU)
    assert a["step"] == b["step"] == 6
    if stage == "unet":
        assert a["ema"] is not None, "the tiny unet stage keeps an EMA"
    _assert_same_state(a, b)


def test_resume_refuses_a_different_recipe(run, tmp_path):
    shutil.copy(run / "vae.pt", tmp_path / "vae.pt")
    with pytest.raises(ValueError, match="different recipe"):
        train_vae(get_recipe("tiny", vae_lr=1e-4), tmp_path, CPU, progress=False)


def test_time_limit_stops_with_a_checkpoint_and_the_rerun_finishes(run, tmp_path):
    shutil.copytree(run / "vae", tmp_path / "vae")
    args = ["unet", "--out", str(tmp_path), "--config", "tiny", "--steps", "4", "--quiet"]
    assert main(args + ["--time-limit", "0"]) == EXIT_INCOMPLETE
    assert load_checkpoint(tmp_path / "unet.pt", CPU)["step"] == 1
    assert main(args) == 0
    assert load_checkpoint(tmp_path / "unet.pt", CPU)["step"] == 4


def test_tokenizer_spells_each_caption_word_as_one_token(tmp_path):
    from transformers import CLIPTokenizer as Oracle

    size = write_tokenizer(tmp_path, CAPTION_WORDS)
    ours = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(ours.vocab) == size == get_recipe("tiny").text_encoder.vocab_size
    for word in CAPTION_WORDS:
        assert len(ours.encode(word)) == 1, word
    oracle = Oracle(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), pad_token="<|endoftext|>")
    prompts = ["a large purple triangle at the bottom on a gray background", "", "Unknown words, still tokens!"]
    expected = torch.tensor(oracle(prompts, padding="max_length", max_length=77).input_ids)
    with pytest.warns(UnknownWordsWarning, match="not known: 'unknown', 'words', 'still', 'tokens'"):
        assert torch.equal(ours(prompts), expected)
    assert ours(prompts[0])[0, 12].item() == ours.eos_id  # <bos>, 11 words of one token each, <eos>


def test_export_is_a_diffusers_folder_that_loads_and_generates(run):
    model = run / "model"
    index = json.loads((model / "model_index.json").read_text())
    recipe = get_recipe("tiny")
    assert index["_fastdiff_training"]["unet_steps"] == recipe.unet_stage.steps
    c = load_components(model)
    assert isinstance(c.tokenizer, CLIPTokenizer) and len(c.tokenizer.vocab) == recipe.text_encoder.vocab_size
    assert c.vae.config.scaling_factor != 0.18215, "the measured latent scale replaces SD's"
    vae_info = json.loads((model / "vae" / "config.json").read_text())["_fastdiff_train"]
    assert set(vae_info["reconstruction"]) == {"color", "shape", "position", "size", "background", "l1"}
    # Shipped weights: float16 of the EMA average.
    shipped = load_file(model / "unet" / "diffusion_pytorch_model.safetensors")
    ema = load_checkpoint(run / "unet.pt", CPU)["ema"]["shadow"]["unet"]
    key = "conv_in.weight"
    assert shipped[key].dtype == torch.float16 and torch.equal(shipped[key], ema[key].half())

    pipe = fastdiff.Pipeline.from_pretrained(model, device="cpu")
    images = pipe("a red circle on the left on a white background", steps=3, seed=0, progress=False)
    assert images[0].size == (recipe.image_size, recipe.image_size)
    latents = pipe(["a blue square at the top on a black background"] * 2, steps=2, seed=0, output_type="latent",
                   progress=False)
    assert latents[0].shape == (4, recipe.image_size // 8, recipe.image_size // 8)


def test_eval_command_scores_every_attribute(run, tmp_path, capsys):
    report, grid = tmp_path / "eval.json", tmp_path / "grid.png"
    assert main(["eval", "--model", str(run / "model"), "--n", "4", "--steps", "2", "--guidance", "1,3",
                 "--batch", "3", "--device", "cpu", "--json", str(report), "--grid", str(grid)]) == 0
    printed = capsys.readouterr().out
    print(printed)
    results = json.loads(report.read_text())["accuracy"]
    assert set(results) == {"1.0", "3.0"}
    for accuracy in results.values():
        assert set(accuracy) == {"color", "shape", "position", "size", "background", "all"}
        assert all(0.0 <= v <= 1.0 for v in accuracy.values())
    assert "confusion at guidance" in printed and grid.is_file()


def test_default_recipe_fits_the_size_budget():
    recipe = get_recipe("default")
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in cls(cfg).parameters()) for name, cls, cfg in (
            ("unet", UNet2DConditionModel, recipe.unet), ("vae", AutoencoderKL, recipe.vae),
            ("text_encoder", CLIPTextModel, recipe.text_encoder))}
    megabytes = 2 * sum(counts.values()) / 1e6
    print({k: f"{v / 1e6:.2f} M" for k, v in counts.items()}, f"{megabytes:.1f} MB in float16")
    assert megabytes <= 29.0  # the 30 MB, less the configs and the tokenizer
    assert recipe.unet.cross_attention_dim == recipe.text_encoder.hidden_size
    assert recipe.unet.sample_size * recipe.vae.downsample_factor == recipe.image_size == 128
