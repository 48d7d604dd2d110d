"""The `fastdiff` console script: generate writes real images of the requested size; info runs on CPU."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import fastdiff.cli
import fastdiff.schedulers
import fastdiff.pipeline
from fastdiff.cli import main
from lora_files import random_kohya_lora
from tiny_models import make_tiny_sd


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd1")
    make_tiny_sd(folder, "sd1")
    return str(folder)


def test_generate_writes_png_of_requested_size(model, tmp_path):
    out = tmp_path / "x.png"
    assert main(["generate", "a red circle", "--out", str(out), "--model", model, "--steps", "3",
                 "--seed", "1", "--height", "64", "--width", "96", "--quiet"]) == 0
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert (im.format, im.size, im.mode) == ("PNG", (96, 64), "RGB")
        pixels = np.asarray(im).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 10, "a flat image means nothing was decoded"


def test_generate_same_seed_same_image(model, tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for p in paths:
        main(["generate", "a blue square", "--out", str(p), "--model", model, "--steps", "2", "--seed", "7",
              "--scheduler", "euler_a", "--quiet"])
    with Image.open(paths[0]) as a, Image.open(paths[1]) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_generate_several_images_get_numbered_names(model, tmp_path):
    main(["generate", "x", "--out", str(tmp_path / "m.png"), "--model", model, "--steps", "1",
          "--num-images", "2", "--quiet"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-0.png", "m-1.png"]


ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root writes into read-only folders


def _cpu_only_torch() -> bool:
    return not torch.cuda.is_available() and torch.version.cuda is None and torch.version.hip is None


# (argv after `generate PROMPT`, exit code, what stderr names, needs the model). {tmp} is an empty folder that must
# stay empty; {folder} an existing folder named like an image; {readonly} a folder nobody may write.
USER_ERRORS = [
    (["--out", "{tmp}/x.gif"], 2, "--out must end in one of .png, .jpg, .jpeg, .webp, got", False),
    (["--out", "/no/such/folder/x.png"], 2, "--out folder '/no/such/folder' does not exist", False),
    (["--out", "{folder}"], 2, "is a folder; give an image file name", False),
    (["--out", "{folder}", "--num-images", "1"], 2, "is a folder", False),
    (["--out", "{readonly}/x.png"], 2, "is not writable", False),
    (["--height", "65", "--width", "64"], 2, "--height must be a positive multiple of 8, got 65", False),
    (["--height", "64"], 2, "give --height and --width together", False),
    (["--guidance", "-1"], 2, "--guidance must be a finite number >= 0, got -1.0", False),
    (["--guidance", "nan"], 2, "--guidance must be a finite number >= 0, got nan", False),
    (["--seed", "9" * 23], 2, f"--seed: must be an integer from 0 to 2**64 - 1, got {'9' * 23}", False),
    (["--seed", "-1"], 2, "--seed: must be an integer from 0 to 2**64 - 1, got -1", False),
    (["--steps", "0"], 2, "--steps: must be a positive integer, got 0", False),
    (["--num-images", "many"], 2, "--num-images: must be a positive integer, got many", False),
    (["--scheduler", "plms"], 2, "--scheduler: invalid choice: 'plms'", False),
    (["--dtype", "float8"], 2, "--dtype: invalid choice: 'float8'", False),
    (["--device", "foo"], 2, "--device: must be cpu, cuda or cuda:N, got 'foo'", False),
    (["--device", "cuda"], 2, "--device cuda: the installed torch", False),
    (["--model", "/no/such/model"], 2, "--model '/no/such/model': no such file or folder", False),
    (["--max-memory", "-1"], 2, "--max-memory: must be a positive number of GiB, got -1", False),
    (["--lora", "/no/such/style.safetensors:0.8"], 2, "--lora '/no/such/style.safetensors': no such file", False),
    (["--embedding", "/no/such/shiny.pt"], 2, "--embedding '/no/such/shiny.pt': no such file", False),
    (["--lora", "{lora}", "--lora", "{lora}:0.5"], 2, "is given twice", False),
    (["--lora", "{lora}"], 1, "cannot be applied to this model", True),
    (["--num-images", "100000"], 1, "100000 image(s) of 128x128 need about", True),
    (["--max-memory", "0.001"], 1, "not one fits at this size; ask for fewer or smaller images, or raise", True),
]


@pytest.mark.parametrize("argv, code, message, needs_model", USER_ERRORS,
                         ids=[" ".join(row[0])[:40] for row in USER_ERRORS])
def test_user_errors_answer_in_one_line_and_leave_nothing(tmp_path, argv, code, message, needs_model):
    if "cuda" in argv and not _cpu_only_torch():
        pytest.skip("needs a CPU-only build of torch")
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "folder.png").mkdir()
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o500)
    if "{readonly}/x.png" in argv and ROOT:
        pytest.skip("root may write into any folder")
    lora = tmp_path / "sdxl-style.safetensors"  # a LoRA for another model
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4)}, lora)
    argv = [a.format(tmp=out, folder=tmp_path / "folder.png", readonly=readonly, lora=lora) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(out / "x.png")]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fastdiff", "generate", "a red circle", "--quiet", *argv],
                          capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - started
    print(argv, f"{seconds:.2f}s", done.stderr)
    assert done.returncode == code
    assert message in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, "one line"
    assert list(out.iterdir()) == [] and list(readonly.iterdir()) == []
    if not needs_model:
        assert seconds < 1.0, "answered before loading anything heavy"


def test_a_10000_word_prompt_is_read_whole_with_a_short_one_line_note(tmp_path):
    prompt = " ".join(["a red circle on the left on a blue background", *["lorem"] * 10000])
    done = subprocess.run([sys.executable, "-m", "fastdiff", "generate", prompt, "--out", str(tmp_path / "x.png"),
                           "--steps", "1", "--quiet"], capture_output=True, text=True, timeout=300)
    print(done.stderr)
    assert done.returncode == 0, done.stderr
    notes = done.stderr.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("fastdiff: ") and len(notes[0]) < 400
    assert "not known: 'lorem'" in notes[0]


PROMPT_TAG_ERRORS = [
    ("a <lora:style> circle", [], "the prompt names <lora:style...>; give --lora-dir"),
    ("a <lora:style> circle", ["--lora-dir", "/no/such/dir"], "--lora-dir '/no/such/dir': no such folder"),
    ("a <lora:other> circle", ["--lora-dir", "{dir}"], "<lora:other>: no file named other"),
    ("a <lora:style:strong> circle", ["--lora-dir", "{dir}"], "<lora:style:strong>: weight must be a number"),
]


@pytest.mark.parametrize("prompt, argv, message", PROMPT_TAG_ERRORS, ids=[row[2][:30] for row in PROMPT_TAG_ERRORS])
def test_lora_tags_in_the_prompt_are_checked_before_loading(tmp_path, capsys, monkeypatch, prompt, argv, message):
    (tmp_path / "style.safetensors").write_bytes(b"")
    monkeypatch.setattr(fastdiff.pipeline, "load_cached", lambda *a, **k: pytest.fail("loaded a model"))
    argv = [a.format(dir=tmp_path) for a in argv]
    assert main(["generate", prompt, "--out", str(tmp_path / "x.png"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_lora_tags_loras_and_embeddings_give_the_apis_image(model, tmp_path):
    pipe = fastdiff.Pipeline.from_pretrained(model, device="cpu")
    (tmp_path / "loras" / "styles").mkdir(parents=True)
    save_file(random_kohya_lora(pipe, 4, 1), tmp_path / "loras" / "styles" / "ink.safetensors")
    save_file(random_kohya_lora(pipe, 4, 2), tmp_path / "paper.safetensors")
    save_file({"<shiny>": torch.randn(pipe.text_encoder.config.hidden_size)}, tmp_path / "shiny.safetensors")
    argv = ["generate", "a <shiny> circle <lora:ink:0.6>", "--lora-dir", str(tmp_path / "loras"), "--lora",
            f"{tmp_path / 'paper.safetensors'}:0.3", "--embedding", str(tmp_path / "shiny.safetensors"), "--model",
            model, "--steps", "2", "--seed", "3", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "cli.png")]) == 0
    pipe.load_textual_inversion(tmp_path / "shiny.safetensors")
    pipe.load_lora(tmp_path / "paper.safetensors", 0.3)
    pipe.load_lora(tmp_path / "loras" / "styles" / "ink.safetensors", 0.6)
    api = pipe("a <shiny> circle ", 2, seed=3, progress=False)[0]
    plain = fastdiff.Pipeline.from_pretrained(model, device="cpu")("a <shiny> circle ", 2, seed=3, progress=False)[0]
    with Image.open(tmp_path / "cli.png") as cli:
        assert np.array_equal(np.asarray(cli), np.asarray(api))
        assert not np.array_equal(np.asarray(cli), np.asarray(plain))


def test_an_unwritable_out_folder_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    # (the table's read-only folder row is skipped for root, who may write anywhere)
    monkeypatch.setattr(fastdiff.cli.os, "access", lambda path, mode: Path(path) != tmp_path)
    monkeypatch.setattr(fastdiff.pipeline, "load_cached", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["generate", "a", "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err == f"fastdiff: --out folder {str(tmp_path)!r} is not writable\n"


def test_ctrl_c_during_sampling_exits_130_with_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastdiff.schedulers, "sample", interrupted)
    assert main(["generate", "a", "--out", str(tmp_path / "x.png"), "--quiet"]) == 130
    assert capsys.readouterr().err == "fastdiff: interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_names_the_file_and_leaves_nothing(model, tmp_path, capsys, monkeypatch):
    def full_disk(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half an image")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "x.png"
    assert main(["generate", "a", "--out", str(out), "--model", model, "--steps", "1", "--quiet"]) == 1
    assert re.fullmatch(r"fastdiff: cannot write .*x.png.*No space left on device\n", capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_info_runs_as_console_script():
    done = subprocess.run([sys.executable, "-m", "fastdiff", "info"], capture_output=True, text=True, timeout=120)
    print(done.stdout)
    assert done.returncode == 0, done.stderr
    for op in ("attention", "group_norm", "scheduler_step"):
        assert op in done.stdout
    assert "torch" in done.stdout


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["generate", "--help"],
                                  ["generate", "a", "--out", "x.gif"],
                                  ["generate", "a", "--out", "x.png", "--seed", "-1"]])
def test_help_version_and_argument_errors_answer_without_importing_torch(argv):
    code = ("import sys\n"
            "from fastdiff.cli import main\n"
            "try:\n"
            "    main(sys.argv[1:])\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    assert done.stderr.strip().splitlines()[-1] == "False", done.stderr


@pytest.mark.parametrize("argv", [["--help"], ["--version"]])
def test_help_and_version_answer_within_half_a_second(argv):
    fastest = min(_seconds([sys.executable, "-m", "fastdiff", *argv]) for _ in range(3))  # the machine's noise aside
    print(argv, f"{fastest:.3f}s")
    assert fastest < 0.5


def _seconds(command: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return time.perf_counter() - started
