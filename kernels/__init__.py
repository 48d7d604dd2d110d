"""fastdiff's kernels, importable on their own by other diffusion code.

    from fastdiff.kernels import attention, group_norm

Each op lives in one file beside its plain-PyTorch twin `<op>_ref`. The Triton versions run on CUDA
tensors, or on the CPU when TRITON_INTERPRET=1 is set before this package is imported.
"""
from .attention import attention, attention_ref
from .group_norm import group_norm, group_norm_ref
from .scheduler_step import StepCoeffs, scheduler_step, scheduler_step_ref

__all__ = ["attention", "attention_ref", "group_norm", "group_norm_ref", "scheduler_step", "scheduler_step_ref",
           "StepCoeffs"]
