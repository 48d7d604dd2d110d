"""CLIP text encoder: token ids (B, 77) -> the context (B, 77, D) that the UNet cross-attends to.

A pre-LayerNorm transformer with causal self-attention (OpenAI CLIP's text tower): SD1 uses OpenAI
CLIP ViT-L/14's (D 768, 12 layers, quick_gelu), SD2 OpenCLIP ViT-H/14's minus its last layer (D 1024,
23 layers, gelu). Parameter names are transformers' `CLIPTextModel` keys
(`text_model.encoder.layers.N.self_attn.q_proj.weight`, ...), so checkpoints load unchanged.

Attention is PyTorch's `scaled_dot_product_attention(is_causal=True)`.
"""
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._config import read_settings

_ACTIVATIONS = ("quick_gelu", "gelu")
# Settings of a transformers text_encoder/config.json that fastdiff does not implement, with the values that
# leave it a plain CLIPTextModel.
_FIXED_SETTINGS: dict[str, tuple] = {
    "model_type": ("clip_text_model",),
    "architectures": (["CLIPTextModel"], None),
    "pruned_heads": ({},),
}
# Keys that do not change the forward pass: token ids (used by transformers' pooled output and the
# tokenizer), training-only dropout and initialisation, the projection of CLIPTextModelWithProjection, and
# bookkeeping.
_IGNORED_KEYS = frozenset({
    "bos_token_id", "eos_token_id", "pad_token_id", "projection_dim", "attention_dropout", "dropout",
    "initializer_range", "initializer_factor", "torch_dtype", "dtype", "transformers_version",
    # PretrainedConfig's generic settings (output switches, generation defaults), which transformers 4.x
    # wrote into every config.json and 5.x partly still does.
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
    "id2label", "label2id", "problem_type", "tie_word_embeddings", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "is_decoder", "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "finetuning_task", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params",
})


@dataclass
class CLIPTextConfig:
    """The text encoder's shape; the defaults are SD1's (OpenAI CLIP ViT-L/14)."""

    vocab_size: int = 49408  # BPE vocabulary size: 256 bytes, 256 bytes + "</w>", 48894 merges, 2 specials
    hidden_size: int = 768  # width D of the residual stream and of the context (SD1: 768, SD2: 1024)
    intermediate_size: int = 3072  # MLP inner width (4 * hidden_size in SD1 and SD2)
    num_hidden_layers: int = 12  # transformer layers (SD1: 12, SD2: 23)
    num_attention_heads: int = 12  # heads; head_dim = hidden_size / heads = 64 in SD1 and SD2
    max_position_embeddings: int = 77  # learned positions = the tokenizer's max_length
    hidden_act: str = "quick_gelu"  # MLP activation: "quick_gelu" (OpenAI CLIP, SD1) or "gelu" (OpenCLIP, SD2)
    layer_norm_eps: float = 1e-5  # epsilon of every LayerNorm

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {_ACTIVATIONS}, got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size must be a multiple of num_attention_heads ({self.num_attention_heads}), "
                             f"got {self.hidden_size}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPTextConfig":
        """Read a transformers text_encoder/config.json dict. Every field above must be present (transformers
        writes them all); every `_FIXED_SETTINGS` key must keep a neutral value (ValueError otherwise); keys
        in `_IGNORED_KEYS` or starting with "_" are skipped, any other key is ignored with a warning."""
        settings = read_settings(d, cls.__dataclass_fields__, _FIXED_SETTINGS, "text encoder", _IGNORED_KEYS)
        missing = [k for k in cls.__dataclass_fields__ if k not in settings]
        if missing:
            raise ValueError(f"text encoder config lacks {missing}")
        return cls(**settings)

    def to_dict(self) -> dict[str, Any]:
        """The transformers-style config.json dict (transformers' CLIPTextConfig(**d) accepts it)."""
        return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                **{k: getattr(self, k) for k in self.__dataclass_fields__}}


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, T) -> (B, T, D): token embedding + the learned embedding of positions 0..T-1."""
        return self.token_embedding(input_ids) + self.position_embedding.weight[: input_ids.shape[1]]


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        """Causal self-attention: token t sees tokens 0..t. x (B, T, D) -> (B, T, D)."""
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.num_heads, -1).transpose(1, 2)  # (B, H, T, head_dim)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(head_dim), as CLIP
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.quick_gelu = config.hidden_act == "quick_gelu"

    def forward(self, x: Tensor) -> Tensor:
        x = self.fc1(x)
        # quick_gelu is OpenAI's sigmoid approximation x * sigmoid(1.702 x); gelu is the exact erf form.
        x = x * torch.sigmoid(1.702 * x) if self.quick_gelu else F.gelu(x)
        return self.fc2(x)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class CLIPTextModel(nn.Module):
    """The CLIP text encoder with transformers' `CLIPTextModel` state-dict keys.

    `load_state_dict` accepts all three layouts transformers has written: keys under `text_model.`
    (transformers 4, every SD checkpoint), the same plus `text_model.embeddings.position_ids`
    (transformers < 4.31 saved that buffer; positions are always 0..T-1, so it is dropped), and keys
    without the `text_model.` prefix (transformers 5's in-memory layout, and what its `save_pretrained`
    writes for a model it did not load from an older file).
    """

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.register_load_state_dict_pre_hook(_accept_transformers_layouts)

    def forward(self, input_ids: Tensor, clip_skip: Optional[int] = None) -> Tensor:
        """Final hidden states. input_ids: (B, T) long, T <= max_position_embeddings -> (B, T, hidden_size).

        clip_skip=k stops k layers before the last and applies final_layer_norm to that output
        (diffusers' rule: hidden_states[-(k + 1)], then final_layer_norm); None or 0 runs every layer.
        """
        return self.encode(self.embed(input_ids), clip_skip)

    def embed(self, input_ids: Tensor) -> Tensor:
        """The embedding layer: token ids (B, T) -> token + position embeddings (B, T, hidden_size)."""
        if input_ids.dim() != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"input_ids must be (batch, tokens) with at most {self.config.max_position_embeddings} "
                             f"tokens, got shape {tuple(input_ids.shape)}")
        return self.text_model.embeddings(input_ids)

    def encode(self, x: Tensor, clip_skip: Optional[int] = None) -> Tensor:
        """The transformer after the embedding layer: `embed`'s output (B, T, D) -> final hidden states (B, T, D)."""
        layers = self.text_model.encoder.layers
        skip = clip_skip or 0
        if not 0 <= skip <= len(layers):
            raise ValueError(f"clip_skip must be in [0, {len(layers)}] (the number of layers), got {clip_skip}")
        for layer in layers[: len(layers) - skip]:
            x = layer(x)
        return self.text_model.final_layer_norm(x)


def _accept_transformers_layouts(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook of CLIPTextModel: rewrite the other transformers layouts in place."""
    state_dict.pop(prefix + "text_model.embeddings.position_ids", None)
    state_dict.pop(prefix + "embeddings.position_ids", None)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if rest.split(".", 1)[0] in ("embeddings", "encoder", "final_layer_norm"):
            state_dict[prefix + "text_model." + rest] = state_dict.pop(key)
