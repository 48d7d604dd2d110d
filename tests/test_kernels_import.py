"""The repository's top-level kernels/ folder imported as `kernels` is fastdiff.kernels, never a second copy.

With the repository root on sys.path (`python -m pytest` from it), transformers imports `kernels` while probing
for Hugging Face's package of that name. A second copy of the op modules re-registers the torch.library custom
ops, torch destroys the first registrations, and fastdiff.kernels then calls freed memory: torch.compile traces
failed with `vector::reserve` or segfaulted, depending on what reused the memory.
"""
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh process: a failing import would corrupt the op registry of the pytest process itself.
_IMPORT_BY_FOLDER_NAME = """
import importlib
import sys

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, {root!r})
import fastdiff.kernels
importlib.import_module("kernels")  # what transformers' is_kernels_available() does
import kernels.group_norm
from kernels.scheduler_step import StepCoeffs

copies = [name for name in sys.modules if (name == "kernels" or name.startswith("kernels."))
          and sys.modules[name] is not sys.modules["fastdiff." + name]]
assert not copies, f"second copies of fastdiff.kernels modules: {{copies}}"
assert StepCoeffs is importlib.import_module("fastdiff.kernels.scheduler_step").StepCoeffs
with FakeTensorMode():  # the path torch.compile takes through the registered op
    y = importlib.import_module("fastdiff.kernels.group_norm")._group_norm_op(torch.empty(1, 32, 4, 4), 8, None,
                                                                              None, 1e-5, "silu")
assert y.shape == (1, 32, 4, 4), y.shape
print("kernels is fastdiff.kernels")
"""


def test_importing_the_folder_as_kernels_gives_fastdiff_kernels_without_reregistering_ops():
    result = subprocess.run([sys.executable, "-c", _IMPORT_BY_FOLDER_NAME.format(root=str(REPO_ROOT))],
                            capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, result.stderr
    assert "kernels is fastdiff.kernels" in result.stdout


def test_import_fastdiff_leaves_torch_dynamo_and_inductor_unimported():
    """Registering the kernels' traceable triton_ops imports torch._inductor and torch._dynamo (4.7 s of a
    9.6 s `import fastdiff` on an H200 host): that waits for prepare_compile(), so a process that never
    compiles does not pay it."""
    code = ("import sys, fastdiff, fastdiff.kernels\n"
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter never registers them
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    print("imported by `import fastdiff`:", done.stdout.strip())
    assert done.stdout.strip() == "[]"
