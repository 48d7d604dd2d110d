"""fastdiff's kernels, importable on their own by other diffusion code.

    from fastdiff.kernels import attention, group_norm

Each op lives in one file beside its plain-PyTorch twin `<op>_ref`. The Triton versions run on CUDA
tensors, or on the CPU when TRITON_INTERPRET=1 is set before this package is imported. `compiling_ahead()`
compiles, in parallel, the kernels a block of code would launch (a cold start's compiles at once).
"""
import importlib
import sys

if __name__ != "fastdiff.kernels":
    # This folder is the repository's top-level `kernels/`, so wherever the repository root is on sys.path
    # (`python -m pytest` or `python -m fastdiff` run from it) `import kernels` finds it too, and transformers
    # does import it: it probes for Hugging Face's `kernels` package by that name. A second copy of these
    # modules would register the torch.library custom ops again, and torch then destroys the first
    # registrations, which fastdiff.kernels still calls: freed memory, so a torch.compile trace fails with
    # `vector::reserve` or segfaults. Under any other name this package and its modules are therefore
    # fastdiff.kernels' own (`import kernels.group_norm` included).
    sys.modules[__name__] = importlib.import_module("fastdiff.kernels")
    for name, module in list(sys.modules.items()):
        if name.startswith("fastdiff.kernels."):
            sys.modules[__name__ + name[len("fastdiff.kernels"):]] = module
else:
    from ._triton import compiling_ahead, prepare_compile
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
               "scheduler_step_ref",
               "StepCoeffs", "subpixel_shuffle", "subpixel_shuffle_ref", "subpixel_weight"]
