"""fastdiff: a custom-kernel Stable Diffusion inference engine.

    import fastdiff
    images = fastdiff.generate("a red circle on the left on a white background")  # the embedded default model
    images = fastdiff.generate("an astronaut riding a horse", steps=25, model="path/to/checkpoint")

`import fastdiff` itself does not import torch: `Pipeline`, `generate` and the subpackages load on first use, so
the console script answers `--help`, `--version` and argument errors at once.
"""
import importlib

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("Pipeline", "generate"):
        return getattr(importlib.import_module("fastdiff.pipeline"), name)
    try:
        return importlib.import_module(f"{__name__}.{name}")  # fastdiff.ops, fastdiff.engine, ...
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


__all__ = ["Pipeline", "generate", "ops", "__version__"]
