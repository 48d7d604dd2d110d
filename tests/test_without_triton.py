"""fastdiff where triton is not installed (a CPU-only install: triton is no dependency of fastdiff, only of CUDA
builds of torch and of the test extra). Each check runs in a fresh interpreter whose import system finds no
`triton`, exactly as where it is absent: `import triton` raises ModuleNotFoundError and
importlib.util.find_spec("triton") is None. TRITON_INTERPRET=1 is set there, so that nothing picks the Triton
kernels for CPU tensors merely because the interpreter is asked for.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Run first in the child: the path finder no longer finds triton or any of its submodules.
_WITHOUT_TRITON = """
import sys
from importlib.machinery import PathFinder

class _PathFinderWithoutTriton(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.partition(".")[0] == "triton" else super().find_spec(name, path, target)

assert not any(name.partition(".")[0] == "triton" for name in sys.modules)
sys.meta_path[:] = [_PathFinderWithoutTriton if finder is PathFinder else finder for finder in sys.meta_path]
"""

# Ends by checking that triton stayed unimported, so a child that found it some other way fails.
_TRITON_STAYED_OUT = """
import importlib.util
assert importlib.util.find_spec("triton") is None
assert [name for name in sys.modules if name.partition(".")[0] == "triton" and sys.modules[name]] == []
"""


def _run_without_triton(code: str, cwd: Path) -> str:
    """Run code in a fresh interpreter without triton; its stdout. Fails the test on a non-zero exit."""
    done = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON + code + _TRITON_STAYED_OUT], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


_KERNELS_AND_OPS = """
import json
try:
    import triton
except ModuleNotFoundError:
    pass
else:
    raise AssertionError("triton imported")

import torch

import fastdiff.kernels
from fastdiff import ops
from fastdiff.kernels import attention, attention_ref, compiling_ahead, group_norm, group_norm_ref, prepare_compile

q, k, v = torch.randn(3, 1, 2, 8, 16).unbind(0)
x = torch.randn(1, 8, 4, 4)
weight, bias = torch.randn(8), torch.randn(8)
out = {"triton": ops.availability("triton", "cpu"), "resolved": {op: ops.resolve(op, "cpu") for op in ops.OPS}}
with compiling_ahead():  # nothing to compile without triton
    prepare_compile()
    out["attention"] = (ops.attention(q, k, v) - attention_ref(q, k, v)).abs().max().item()
    out["group_norm"] = (ops.group_norm(x, 2, weight, bias) - group_norm_ref(x, 2, weight, bias)).abs().max().item()
for name, call in [("attention_kernel", lambda: attention(q, k, v)),
                   ("group_norm_kernel", lambda: group_norm(x, 2, weight, bias))]:
    try:
        call()
        out[name] = "ran"
    except RuntimeError as e:
        out[name] = str(e)
with ops.use_backend("triton", op="attention"):
    try:
        ops.attention(q, k, v)
        out["forced"] = "ran"
    except RuntimeError as e:
        out["forced"] = str(e)
print(json.dumps(out))
"""


def test_kernels_and_ops_without_triton(tmp_path):
    out = json.loads(_run_without_triton(_KERNELS_AND_OPS, tmp_path).splitlines()[-1])
    available, why = out["triton"]
    assert not available and "triton" in why
    assert "triton" not in out["resolved"].values()
    assert out["attention"] < 1e-6 and out["group_norm"] < 1e-6  # the dispatch ran the reference twins
    for name in ("attention_kernel", "group_norm_kernel"):  # a Triton kernel's call says what is missing
        assert "\n" not in out[name] and "No module named 'triton'" in out[name], out[name]
        assert "pip install triton" in out[name], out[name]
    assert "forced for attention" in out["forced"] and "triton" in out["forced"], out["forced"]


_GENERATE = """
import numpy as np

import fastdiff
from fastdiff.cli import main

images = fastdiff.generate("a red circle", steps=2, seed=0, output_type="np")
assert len(images) == 1 and images[0].ndim == 3 and np.isfinite(images[0]).all(), images
assert main(["info"]) == 0
assert main(["generate", "a red circle", "--out", "x.png", "--steps", "2", "--quiet"]) == 0
"""


def test_generate_and_cli_without_triton(tmp_path):
    printed = _run_without_triton(_GENERATE, tmp_path)
    assert "triton does not import" in printed  # fastdiff info's backend table
    assert (tmp_path / "x.png").stat().st_size > 0


def test_triton_is_a_test_dependency_only():
    """CPU-only installs must not fetch triton: it comes with CUDA builds of torch, and with the test extra for
    the kernels' tests under the interpreter."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return [re.match(r"[A-Za-z0-9_.-]+", r.strip()).group().lower() for r in requirements]

    assert "triton" not in names(project["dependencies"])
    assert "triton" in names(project["optional-dependencies"]["test"])
