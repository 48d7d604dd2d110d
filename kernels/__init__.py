"""fastdiff's kernels, importable on their own by other diffusion code.

    from fastdiff.kernels import attention, group_norm

Each op lives in one file beside its plain-PyTorch twin `<op>_ref`.
"""
from .attention import attention_ref
from .group_norm import group_norm_ref
from .scheduler_step import StepCoeffs, scheduler_step_ref

__all__ = ["attention_ref", "group_norm_ref", "scheduler_step_ref", "StepCoeffs"]
