"""Loader for the compiled extension `fastdiff._C` (csrc/). A missing or broken build never breaks
`import fastdiff`: it only makes the `cuda` backend unavailable, with the reason kept for `fastdiff info`."""
from typing import Optional

try:
    from fastdiff import _C
    _load_error: Optional[str] = None
except Exception as e:  # ImportError, or an ABI mismatch surfacing as OSError/RuntimeError
    _C = None
    _load_error = f"{type(e).__name__}: {e}"


def availability(device_type: str) -> tuple[bool, str]:
    if _C is None:
        return False, f"fastdiff._C not built or failed to load ({_load_error})"
    return False, "fastdiff._C has no scheduler_step yet"


def scheduler_step(x, model_output, coeffs, guidance_scale=None, prev_x0=None, noise=None):
    raise RuntimeError("fastdiff._C scheduler_step is not available: " + availability(x.device.type)[1])
