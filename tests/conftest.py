import os

import pytest
import torch

# Triton kernels run on CPU only in interpreter mode, which must be chosen before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_sd1_folder(tmp_path_factory):
    """A tiny random SD1 model saved as a diffusers folder (`tiny_models.make_tiny_sd`), shared by the tests that
    only load it."""
    pytest.importorskip("diffusers")
    from tiny_models import make_tiny_sd

    folder = tmp_path_factory.mktemp("tiny_sd1")
    make_tiny_sd(folder, "sd1")
    return folder
