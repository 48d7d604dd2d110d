"""How the models run fast: fused modules built from the loaded ones, CUDA graphs, compile-ahead.

    engine/engine.py   Engine (the models as written) and FastEngine (the CUDA fast path): what the pipeline holds
    engine/unet.py     FastUNet: the UNet's fused modules, and the building blocks the VAE's reuse
    engine/vae.py      fast_vae: the VAE with fused modules swapped into a copy sharing its parameters
    engine/graphs.py   CUDAGraphRunner: a call captured once per input shape and replayed; EqualHalvesGraphRunner,
                       two such captures the GPU chooses between
    engine/config.py   FastConfig: what the fast path does, one switch per technique

Which kernel implementation runs each op is decided in one place, `fastdiff.ops`.
"""
from .config import FastConfig
from .engine import IF_REPEATED, Engine, FastEngine, make_engine, prepare_engine
from .graphs import CUDAGraphRunner
from .unet import FastUNet
from .vae import fast_vae

__all__ = ["CUDAGraphRunner", "Engine", "IF_REPEATED", "FastConfig", "FastEngine", "FastUNet", "fast_vae",
           "make_engine", "prepare_engine"]
