"""fastdiff: a custom-kernel Stable Diffusion inference engine.

    import fastdiff
    images = fastdiff.generate("a red circle on the left on a white background")  # the embedded default model
    images = fastdiff.generate("an astronaut riding a horse", steps=25, model="path/to/checkpoint")
"""
__version__ = "0.1.0"

from . import ops  # noqa: E402
from .pipeline import Pipeline, generate  # noqa: E402

__all__ = ["Pipeline", "generate", "ops", "__version__"]
