"""Map a Hugging Face ``config.json`` onto the one encoder shape jaxjoint runs.

BERT, RoBERTa, DistilBERT and the ELECTRA generator are the same post-LN
Transformer encoder with an MLM head; they differ in key names, position ids
and a few sizes. ``EncoderConfig`` holds what the Flax model needs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxjoint.errors import UserError

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "distilbert", "electra")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Sizes and conventions of a BERT-family masked language model."""

    family: str  # one of SUPPORTED_MODEL_TYPES
    vocab_size: int
    hidden_size: int
    embedding_size: int  # differs from hidden_size only for ELECTRA
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int  # 0: no token-type embedding (DistilBERT)
    layer_norm_eps: float
    hidden_act: str
    pad_token_id: int
    # RoBERTa counts positions from pad_token_id + 1 and skips padding.
    padding_aware_positions: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise UserError(f"an encoder needs at least one layer, got num_layers={self.num_layers}")
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise UserError(f"hidden size {self.hidden_size} does not split into {self.num_heads} attention heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def encoder_config_from_hf(hf: dict[str, Any]) -> EncoderConfig:
    """Build an ``EncoderConfig`` from a parsed HF ``config.json`` dict."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"unsupported model_type {model_type!r} in config.json; "
            f"jaxjoint supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        if model_type == "distilbert":
            if hf.get("sinusoidal_pos_embds", False):
                raise UserError(
                    "DistilBERT with sinusoidal_pos_embds=true is not supported"
                )
            return EncoderConfig(
                family="distilbert",
                vocab_size=hf["vocab_size"],
                hidden_size=hf["dim"],
                embedding_size=hf["dim"],
                num_layers=hf["n_layers"],
                num_heads=hf["n_heads"],
                intermediate_size=hf["hidden_dim"],
                max_positions=hf["max_position_embeddings"],
                type_vocab_size=0,
                layer_norm_eps=1e-12,
                hidden_act=hf.get("activation", "gelu"),
                pad_token_id=hf.get("pad_token_id", 0),
                tie_word_embeddings=hf.get("tie_word_embeddings", True),
            )
        hidden = hf["hidden_size"]
        return EncoderConfig(
            family=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            embedding_size=hf.get("embedding_size", hidden),
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_positions=hf["max_position_embeddings"],
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=hf.get("hidden_act", "gelu"),
            pad_token_id=hf.get("pad_token_id", 0) or 0,
            padding_aware_positions=model_type == "roberta",
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
        )
    except KeyError as missing:
        raise UserError(
            f"config.json for model_type {model_type!r} lacks the field {missing}"
        ) from None
