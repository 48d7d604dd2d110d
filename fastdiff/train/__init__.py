"""Training the default model: the procedural shapes dataset, the analyser that judges prompt adherence, the
two training stages (VAE, then UNet + text encoder), export to a diffusers folder and evaluation.

    python -m fastdiff.train all --out runs/default        # see __main__.py and the README's recipe
"""
from .analyse import Analysis, analyse, score
from .data import Scene, ShapesDataset, make_scenes, render, sample_scenes
from .evaluate import evaluate
from .export import export_model
from .recipe import Recipe, StageConfig, get_recipe
from .unet import train_unet
from .vae import train_vae

__all__ = ["Analysis", "Recipe", "Scene", "ShapesDataset", "StageConfig", "analyse", "evaluate", "export_model",
           "get_recipe", "make_scenes", "render", "sample_scenes", "score", "train_unet", "train_vae"]
