"""CLIP text encoder: token ids (B, 77) -> the context (B, 77, D) that the UNet cross-attends to.

A pre-LayerNorm transformer with causal self-attention (OpenAI CLIP's text tower): SD1 uses OpenAI
CLIP ViT-L/14's (D 768, 12 layers, quick_gelu), SD2 OpenCLIP ViT-H/14's minus its last layer (D 1024,
23 layers, gelu). Parameter names are transformers' `CLIPTextModel` keys
(`text_model.encoder.layers.N.self_attn.q_proj.weight`, ...), so checkpoints load unchanged.

SDXL reads two encoders differently (`encode_penultimate`): the context is the PENULTIMATE layer's output, before
final_layer_norm, of CLIP ViT-L/14 (768) and of OpenCLIP ViT-bigG/14 (1280, 32 layers, gelu) side by side (2048
wide), and the UNet also takes bigG's pooled output: the final hidden state at the end-of-text token through
`text_projection`, a Linear without bias (transformers' `CLIPTextModelWithProjection`, whose keys this module
then has: `text_projection.weight`).

Attention is PyTorch's `scaled_dot_product_attention(is_causal=True)`.
"""
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._config import read_settings

_ACTIVATIONS = ("quick_gelu", "gelu")
WITH_PROJECTION = ["CLIPTextModelWithProjection"]  # the `architectures` of a config whose model has text_projection
# Settings of a transformers text_encoder/config.json that fastdiff does not implement, with the values that
# leave it a CLIPTextModel (with or without the projection).
_FIXED_SETTINGS: dict[str, tuple] = {
    "model_type": ("clip_text_model",),
    "architectures": (["CLIPTextModel"], WITH_PROJECTION, None),
    "pruned_heads": ({},),
}
# Keys that do not change the outputs: token ids the tokenizer uses, training-only dropout and initialisation,
# and bookkeeping. (projection_dim joins them where `architectures` says the model has no projection.)
_IGNORED_KEYS = frozenset({
    "bos_token_id", "pad_token_id", "attention_dropout", "dropout",
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
    projection_dim: Optional[int] = None  # width of text_projection, which projects the pooled output: set for
    #   transformers' CLIPTextModelWithProjection (SDXL's OpenCLIP bigG: 1280), None for a CLIPTextModel (whose
    #   config.json still names a projection_dim, of a projection its checkpoint lacks)
    eos_token_id: int = field(default=2, compare=False)  # the end-of-text token, where `pool` reads: 2 (what
    #   every published SD text encoder config says, written before transformers fixed the id) means the position
    #   of the highest id, any other value the first position of that id. Not compared: it does not shape the
    #   network, and a single-file checkpoint, which has no token ids, loads the network of its folder twin

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {_ACTIVATIONS}, got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size must be a multiple of num_attention_heads ({self.num_attention_heads}), "
                             f"got {self.hidden_size}")
        if self.projection_dim is not None and not (isinstance(self.projection_dim, int) and self.projection_dim >= 1):
            raise ValueError(f"projection_dim must be a positive int or None, got {self.projection_dim!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPTextConfig":
        """Read a transformers text_encoder/config.json dict. The shape fields must be present (transformers
        writes them all), projection_dim too where `architectures` is ["CLIPTextModelWithProjection"] (it is not
        read otherwise); eos_token_id is 2 where absent. Every `_FIXED_SETTINGS` key must keep a neutral value
        (ValueError otherwise); keys in `_IGNORED_KEYS` or starting with "_" are skipped, any other key is ignored
        with a warning."""
        architectures = d.get("architectures")
        projected = architectures is not None and list(architectures) == WITH_PROJECTION
        required = [k for k in cls.__dataclass_fields__ if k not in ("projection_dim", "eos_token_id")]
        required += ["projection_dim"] if projected else []
        ignored = _IGNORED_KEYS if projected else _IGNORED_KEYS | {"projection_dim"}
        settings = read_settings(d, {*required, "eos_token_id"}, _FIXED_SETTINGS, "text encoder", ignored)
        missing = [k for k in required if settings.get(k) is None]
        if missing:
            raise ValueError(f"text encoder config lacks {missing}")
        return cls(**settings)

    def to_dict(self) -> dict[str, Any]:
        """The transformers-style config.json dict (transformers' CLIPTextConfig(**d) accepts it; projection_dim is
        None for a model without the projection)."""
        architectures = WITH_PROJECTION if self.projection_dim is not None else ["CLIPTextModel"]
        return {"architectures": architectures, "model_type": "clip_text_model",
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
    """The CLIP text encoder with transformers' `CLIPTextModel` state-dict keys; with config.projection_dim, its
    `CLIPTextModelWithProjection`'s (the same plus `text_projection.weight`).

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
        self.text_projection = None if config.projection_dim is None else nn.Linear(
            config.hidden_size, config.projection_dim, bias=False)  # of the pooled output (`pool`)
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

    def encode_penultimate(self, x: Tensor, input_ids: Optional[Tensor] = None, clip_skip: Optional[int] = None
                           ) -> tuple[Tensor, Optional[Tensor]]:
        """SDXL's reading of the transformer, in one pass: `embed`'s output (B, T, D) -> (the penultimate layer's
        output, WITHOUT final_layer_norm (diffusers' hidden_states[-2]), (B, T, D); with input_ids (B, T) the pooled
        output of the final hidden states (`pool`), else None, and the last layer does not run).

        clip_skip=k takes hidden_states[-(k + 2)] instead (diffusers' SDXL rule); the pooled output always comes
        from every layer.
        """
        layers = self.text_model.encoder.layers
        skip = clip_skip or 0
        if not 0 <= skip < len(layers):
            raise ValueError(f"clip_skip must be in [0, {len(layers) - 1}] (the layers before the last one), "
                             f"got {clip_skip}")
        stop = len(layers) - 1 - skip
        for layer in layers[:stop]:
            x = layer(x)
        if input_ids is None:
            return x, None
        hidden = x
        for layer in layers[stop:]:
            x = layer(x)
        return hidden, self.pool(self.text_model.final_layer_norm(x), input_ids)

    def pool(self, hidden: Tensor, input_ids: Tensor) -> Tensor:
        """transformers' pooled output: the final hidden states (B, T, D), after final_layer_norm, at each row's
        end-of-text token, through text_projection where the model has one -> (B, projection_dim), the `text_embeds`
        of CLIPTextModelWithProjection; else (B, D), CLIPTextModel's `pooler_output`. input_ids: (B, T).

        The position follows transformers: with config.eos_token_id 2 (configs written before transformers fixed
        the id) that of the highest id in the row, which is the end-of-text token 49407 unless tokens were added
        after it; otherwise the first position holding eos_token_id (the padding may repeat it)."""
        eos = self.config.eos_token_id
        ids = input_ids.to(hidden.device)
        # (B,) positions; argmax returns the first of equal maxima
        positions = ids.argmax(dim=-1) if eos == 2 else (ids == eos).int().argmax(dim=-1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), positions]  # (B, D)
        return pooled if self.text_projection is None else self.text_projection(pooled)


def _accept_transformers_layouts(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook of CLIPTextModel: rewrite the other transformers layouts in place."""
    state_dict.pop(prefix + "text_model.embeddings.position_ids", None)
    state_dict.pop(prefix + "embeddings.position_ids", None)
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        if rest.split(".", 1)[0] in ("embeddings", "encoder", "final_layer_norm"):
            state_dict[prefix + "text_model." + rest] = state_dict.pop(key)
