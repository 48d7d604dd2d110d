"""The Stable Diffusion model stack with diffusers'/transformers' parameter names."""
from .clip import CLIPTextConfig, CLIPTextModel
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel, UNetConfig
from .vae import AutoencoderKL, VAEConfig

__all__ = ["AutoencoderKL", "CLIPTextConfig", "CLIPTextModel", "CLIPTokenizer", "UNet2DConditionModel",
           "UNetConfig", "VAEConfig"]
