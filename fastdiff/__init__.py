"""fastdiff: a custom-kernel Stable Diffusion inference engine."""
__version__ = "0.1.0"

from . import ops  # noqa: E402
