"""Textual-inversion embeddings: the vectors a token stands for, from the files users have.

Formats (one embedding per file):
  diffusers      `learned_embeds.safetensors` / `.bin`: {token: (D,) or (n, D)}; its key is the token.
  A1111 .pt      {"string_to_param": {"*": (n, D)}, "name": ..., ...}, read with torch.load(weights_only=True).
  A1111 .safetensors  {"emb_params": (n, D)}.
A1111's files are used under their file name (the stem), as A1111 does; `token` overrides either. SDXL's pairs
({"clip_l", "clip_g"}) are refused: fastdiff runs one text encoder.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor

from .common import CheckpointError, list_keys, read_state_dict, torch_load


def read_embedding(path: Union[str, Path], token: Optional[str] = None) -> tuple[str, Tensor]:
    """(token, vectors (n, D) float32) of the textual-inversion file at `path`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        content: Mapping = read_state_dict(path)
    else:
        if not path.is_file():
            raise CheckpointError(f"missing file {path}")
        content = torch_load(path)
        if not isinstance(content, Mapping):
            raise CheckpointError(f"{path} holds a {type(content).__name__}, not a textual-inversion embedding")
    if "clip_l" in content or "clip_g" in content:
        raise CheckpointError(f"{path} is an SDXL embedding (clip_l/clip_g pair); fastdiff runs SD1.x and SD2.x models")
    if isinstance(content.get("string_to_param"), Mapping):  # A1111 .pt
        params = [v for v in content["string_to_param"].values() if isinstance(v, Tensor)]
        if len(params) != 1:
            raise CheckpointError(f"{path}: string_to_param holds {len(params)} tensors, expected one")
        vectors, default = params[0], path.stem
    elif isinstance(content.get("emb_params"), Tensor):  # A1111 .safetensors
        vectors, default = content["emb_params"], path.stem
    else:  # diffusers: {token: vectors}
        tensors = {k: v for k, v in content.items() if isinstance(v, Tensor)}
        if len(tensors) != 1:
            raise CheckpointError(f"{path} is not a textual-inversion embedding: expected one token's vectors "
                                  f"(diffusers), string_to_param or emb_params (A1111), got keys "
                                  f"{list_keys(map(str, content)) or 'none'}")
        (default, vectors), = tensors.items()
    if vectors.dim() == 1:
        vectors = vectors[None]
    if vectors.dim() != 2 or vectors.shape[0] == 0 or not vectors.is_floating_point():
        raise CheckpointError(f"{path}: expected (vectors, width) floats, got a {vectors.dtype} tensor of shape "
                              f"{tuple(vectors.shape)}")
    return token or default, vectors.to(torch.float32)
