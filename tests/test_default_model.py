"""The embedded default model (fastdiff/assets/default): shipped, loadable, and following its prompts end to end.

The analyser (fastdiff/train/analyse.py) reads colour, shape, position, size and background from the pixels
of images generated exactly as a user would get them: `fastdiff.generate` and the `fastdiff generate` CLI
with their defaults (25 steps of DPM++ 2M, guidance 7.5), no model argument, no network.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fastdiff
from fastdiff import cli
from fastdiff.pipeline import default_model_path
from fastdiff.schedulers import SCHEDULERS
from fastdiff.train.analyse import analyse
from fastdiff.train.data import IMAGE_SIZE

MAX_BYTES = 30 * 2**20  # the shipped folder stays within 30 MB

# (caption, seed, expected (color, shape, position, size, background)): together they use every colour,
# shape, position, size and background at least once.
CASES = [
    ("a red circle on the left on a white background", 0, ("red", "circle", "on the left", "medium", "white")),
    ("a small green square at the top on a black background", 1, ("green", "square", "at the top", "small", "black")),
    ("a large blue triangle in the center on a gray background", 2,
     ("blue", "triangle", "in the center", "large", "gray")),
    ("a yellow square on the right on a gray background", 3, ("yellow", "square", "on the right", "medium", "gray")),
    ("a small purple circle at the bottom on a white background", 4,
     ("purple", "circle", "at the bottom", "small", "white")),
    ("a large orange triangle on the left on a black background", 5,
     ("orange", "triangle", "on the left", "large", "black")),
]


def read(image: Image.Image) -> tuple:
    a = analyse(np.asarray(image.convert("RGB")))
    return a.color, a.shape, a.position, a.size, a.background


def test_default_model_is_a_diffusers_folder_within_30_mb():
    folder = Path(default_model_path())
    files = [p for p in folder.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    print(f"{folder}: {len(files)} files, {total / 2**20:.1f} MiB")
    assert total <= MAX_BYTES
    for part in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "tokenizer/vocab.json", "scheduler/scheduler_config.json"):
        assert (folder / part).is_file(), part


@pytest.mark.parametrize("caption,seed,expected", CASES, ids=[c[0] for c in CASES])
def test_generate_with_default_model_follows_the_prompt(caption, seed, expected):
    image = fastdiff.generate(caption, seed=seed, progress=False)[0]  # no model: the embedded default
    got = read(image)
    print(f"{caption!r} seed {seed}: read {got}")
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert got == expected


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_cli_generate_follows_the_prompt_with_every_scheduler(scheduler, tmp_path):
    """Every sampler the README lists draws the prompted image with the default model's own scheduler config
    (DDPM and DDIM among them: the config says not to clip x0 to [-1, 1], which latents are not in)."""
    for caption, seed, expected in CASES[:3]:
        out = tmp_path / f"{scheduler}-{seed}.png"
        assert cli.main(["generate", caption, "--scheduler", scheduler, "--seed", str(seed), "--out", str(out),
                         "--quiet"]) == 0
        got = read(Image.open(out))
        print(f"{scheduler}: {caption!r} seed {seed}: read {got}")
        assert got == expected


def test_cli_generate_without_model_writes_the_prompted_image(tmp_path):
    out = tmp_path / "x.png"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "fastdiff.cli", "generate",
                             "a red circle on the left on a white background", "--out", str(out), "--seed", "0",
                             "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    print(f"fastdiff generate: exit {result.returncode} in {time.monotonic() - began:.1f} s (start-up included)")
    print(result.stdout, result.stderr)
    assert result.returncode == 0
    assert read(Image.open(out)) == ("red", "circle", "on the left", "medium", "white")


def test_eval_default_reports_adherence_against_the_targets(capsys):
    from fastdiff.cli import main

    assert main(["eval-default", "--n", "3", "--batch", "3"]) == 0
    out = capsys.readouterr().out
    print(out)
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}
    assert rows["guidance"][:4] == ["color", "shape", "position", "size"]
    assert rows["7.50"][:4] == ["100.0%"] * 4  # the first 3 evaluation captions, all read right
    assert rows["target"] == ["95%", "85%", "90%", "85%"]


@pytest.mark.gpu
def test_default_model_on_cuda_fast_path_follows_the_prompts():
    # On CUDA the pipeline takes its fast path (fp16, channels_last, fused projections, CUDA graphs).
    from fastdiff.engine import FastEngine
    from fastdiff.pipeline import load_cached

    pipe = load_cached(None, device="cuda")
    got = [read(pipe(caption, 25, guidance_scale=7.5, seed=seed, progress=False)[0]) for caption, seed, _ in CASES]
    for (caption, seed, expected), read_back in zip(CASES, got):
        print(f"{caption!r} seed {seed}: read {read_back}")
    assert isinstance(pipe.engine, FastEngine) and pipe.engine.graphs_captured == 1  # one shape, one graph
    assert got == [c[2] for c in CASES]
