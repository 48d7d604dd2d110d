"""The `fastdiff` console script: generate writes real images of the requested size; info runs on CPU."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastdiff.pipeline
from fastdiff.cli import main
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


@pytest.mark.parametrize("argv, message", [
    (["--out", "x.gif"], "--out must end in one of"),
    (["--out", "/no/such/folder/x.png"], "does not exist"),
    (["--out", "{tmp}/x.png", "--height", "65", "--width", "64"], "height must be a positive multiple of 8, got 65"),
    (["--out", "{tmp}/x.png", "--height", "64"], "give --height and --width together"),
])
def test_generate_bad_input_fails_before_writing(model, tmp_path, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as e:
        main(["generate", "a", "--model", model, "--quiet", *argv])
    assert message in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_generate_refuses_an_out_that_is_a_folder_before_loading(tmp_path):
    (tmp_path / "x.png").mkdir()
    with pytest.raises(SystemExit, match="is a folder; give an image file name"):
        main(["generate", "a", "--out", str(tmp_path / "x.png"), "--model", "/no/such/model"])  # never loaded
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


@pytest.mark.parametrize("argv, message", [
    (["--seed", "9" * 23], f"--seed: must be an integer from 0 to 2**64 - 1, got {'9' * 23}"),
    (["--seed", "-1"], "--seed: must be an integer from 0 to 2**64 - 1, got -1"),
    (["--device", "foo"], "--device: must be cpu, cuda or cuda:N, got 'foo'"),
])
def test_generate_usage_errors_exit_2_with_one_line_naming_the_value(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["generate", "a", "--out", str(tmp_path / "x.png"), *argv])
    err = capsys.readouterr().err
    print(err)
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_generate_on_cuda_without_cuda_says_so_before_loading(tmp_path):
    with pytest.raises(SystemExit, match=r"--device cuda: torch sees 0 CUDA device\(s\)"):
        main(["generate", "a", "--out", str(tmp_path / "x.png"), "--device", "cuda", "--model", "/no/such/model"])


def test_ctrl_c_exits_130_with_one_line(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastdiff.pipeline, "load_cached", interrupted)
    assert main(["generate", "a", "--out", str(tmp_path / "x.png")]) == 130
    assert capsys.readouterr().err == "fastdiff: interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_names_the_file_and_leaves_nothing(model, tmp_path, monkeypatch):
    def full_disk(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half an image")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "x.png"
    with pytest.raises(SystemExit, match="cannot write .*x.png.*No space left on device"):
        main(["generate", "a", "--out", str(out), "--model", model, "--steps", "1", "--quiet"])
    assert list(tmp_path.iterdir()) == []


def test_generate_missing_model_names_the_path(tmp_path):
    with pytest.raises(SystemExit, match="no such file or folder: /no/such/model"):
        main(["generate", "a", "--out", str(tmp_path / "x.png"), "--model", "/no/such/model"])


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
    code = ("import sys, time\n"
            "t = time.perf_counter()\n"
            "from fastdiff.cli import main\n"
            "try:\n"
            "    main(sys.argv[1:])\n"
            "except SystemExit:\n"
            "    pass\n"
            "print(f'{time.perf_counter() - t:.3f}s', 'torch' in sys.modules, file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
    last = done.stderr.strip().splitlines()[-1]
    print(argv, last)
    assert last.endswith("False"), done.stderr
