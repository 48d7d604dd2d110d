"""fastdiff's kernels, importable on their own by other diffusion code.

    from fastdiff.kernels import attention, group_norm

Each op lives in one file beside its plain-PyTorch twin `<op>_ref`. The Triton versions run on CUDA
tensors, or on the CPU when TRITON_INTERPRET=1 is set before this package is imported. `compiling_ahead()`
compiles, in parallel, the kernels a block of code would launch (a cold start's compiles at once), in worker
processes that `start_compile_processes()` starts ahead.

The op files live in the repository's top-level kernels/ folder, which has no __init__.py on purpose: a package
there would be what `import kernels` finds from the repository root, ahead of Hugging Face's `kernels`
distribution, which transformers imports. A built wheel installs them here, beside this file (setup.py's
build_py); in a source checkout (an editable install, or the repository root on sys.path) this package's
__path__ reaches them there.
"""
from pathlib import Path

if not Path(__file__).with_name("_triton.py").is_file():
    __path__.append(str(Path(__file__).resolve().parents[2] / "kernels"))

from ._triton import compiling_ahead, prepare_compile, start_compile_processes
from .attention import attention, attention_ref
from .channel_cat import channel_cat, channel_cat_ref
from .conv2d import conv2d, conv2d_ref
from .geglu import geglu, geglu_ref
from .group_norm import group_norm, group_norm_ref, group_sums_ref
from .group_sums import channel_cat_sums, channel_cat_sums_ref, residual_add_sums, residual_add_sums_ref
from .layer_norm import add_layer_norm, add_layer_norm_ref, layer_norm, layer_norm_ref
from .linear import linear, linear_ref
from .matmul import matmul_ref
from .residual_add import residual_add, residual_add_ref
from .scheduler_step import StepCoeffs, scheduler_step, scheduler_step_ref
from .subpixel import subpixel_shuffle, subpixel_shuffle_ref, subpixel_weight

__all__ = ["add_layer_norm", "add_layer_norm_ref", "attention", "attention_ref", "channel_cat", "channel_cat_ref",
           "channel_cat_sums", "channel_cat_sums_ref", "compiling_ahead", "conv2d",
           "conv2d_ref", "geglu", "geglu_ref", "group_norm", "group_norm_ref", "group_sums_ref", "layer_norm",
           "layer_norm_ref", "linear", "linear_ref", "matmul_ref",
           "prepare_compile", "residual_add", "residual_add_ref", "residual_add_sums", "residual_add_sums_ref",
           "scheduler_step",
           "scheduler_step_ref", "start_compile_processes",
           "StepCoeffs", "subpixel_shuffle", "subpixel_shuffle_ref", "subpixel_weight"]
