"""`fastdiff.kernels` imports from anywhere, and the repository's top-level kernels/ folder never shadows another
distribution's top-level `kernels` module (transformers imports Hugging Face's `kernels` package by that name).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path, **env: str) -> str:
    """Run code in a fresh interpreter (`python -c`, so cwd is first on sys.path) and return its stdout."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_kernels_folder_is_not_a_regular_package():
    """A kernels/__init__.py would make `import kernels` from the repository root find this folder first."""
    assert not (REPO_ROOT / "kernels" / "__init__.py").exists()
    assert not (REPO_ROOT / "kernels.py").exists()


_KERNELS_ORIGIN = ("import importlib.util; spec = importlib.util.find_spec('kernels'); "
                   "print(spec.origin if spec is not None and spec.origin else '')")


def test_import_kernels_from_the_repository_root_finds_what_it_finds_elsewhere(tmp_path):
    """Hugging Face's `kernels` where it is installed; at most a namespace package (no module file) where not."""
    origin = _python(_KERNELS_ORIGIN, REPO_ROOT)
    print("`kernels` from the repository root:", origin or "no module file")
    assert origin == _python(_KERNELS_ORIGIN, tmp_path)


def test_transformers_and_diffusers_import_from_the_repository_root():
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    assert _python("import diffusers.loaders.peft; from transformers import CLIPTextModel; print('ok')",
                   REPO_ROOT) == "ok"


_IMPORT_FASTDIFF_KERNELS = """
import sys
from fastdiff.kernels import attention, group_norm
import fastdiff.kernels.group_norm
assert callable(attention) and callable(group_norm)
print(sys.modules["fastdiff.kernels.group_norm"].__file__)
"""


def test_fastdiff_kernels_import_outside_the_repository(tmp_path):
    found = Path(_python(_IMPORT_FASTDIFF_KERNELS, tmp_path))
    assert found.resolve() == REPO_ROOT / "kernels" / "group_norm.py"


def test_built_package_holds_every_package_and_every_op_file_in_fastdiff_kernels(tmp_path):
    """What a wheel (plain `pip install .`) installs: every package of fastdiff/, and kernels/*.py in
    fastdiff/kernels/ (setup.py's build_py)."""
    build = tmp_path / "build"
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)],
                          capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    packages = sorted(str(p.parent.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "fastdiff").rglob("__init__.py"))
    assert [p for p in packages if not (build / p / "__init__.py").is_file()] == []  # every package is listed
    installed = sorted(p.name for p in (build / "fastdiff" / "kernels").glob("*.py"))
    expected = sorted(["__init__.py", *(p.name for p in (REPO_ROOT / "kernels").glob("*.py"))])
    assert installed == expected
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    found = Path(_python(_IMPORT_FASTDIFF_KERNELS, elsewhere, PYTHONPATH=str(build)))
    assert found == build / "fastdiff" / "kernels" / "group_norm.py"


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
