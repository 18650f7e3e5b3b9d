"""Map a Hugging Face ``config.json`` onto the encoder shapes jaxjoint runs.

BERT, RoBERTa, DistilBERT and the ELECTRA generator are the same post-LN
Transformer encoder with an MLM head; they differ in key names, position ids
and a few sizes, all held by ``EncoderConfig``. ModernBERT and ESM are pre-LN
encoders with rotary positions; their configs are ``EncoderConfig`` subclasses
(``ModernBertEncoderConfig``, ``EsmEncoderConfig``) that add only the switches
their family has, so a BERT config holds exactly what it always held and every
caller that reads the shared sizes reads them the same way for every family.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxjoint.errors import UserError
from jaxjoint.models.layers import ACTIVATIONS

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "modernbert", "esm")
# model_type -> the family whose module and checkpoint keys it uses: XLM-RoBERTa is
# RoBERTa's architecture (and its PyTorch keys) with a 250,002-token vocabulary.
_FAMILY_OF = {"xlm-roberta": "roberta"}


# config.json copies of the hub models users ask for, named org--name.json (README there).
HUB_CONFIG_DIR = Path(__file__).parent / "hub_configs"


def shipped_hub_configs() -> dict[str, Path]:
    """Hub id (``google-bert/bert-base-cased``) -> the config.json copy shipped for it."""
    return {p.stem.replace("--", "/"): p for p in sorted(HUB_CONFIG_DIR.glob("*--*.json"))}


def family_of(model_type: str) -> str:
    """The family (``EncoderConfig.family``) a supported ``model_type`` is read as."""
    return _FAMILY_OF.get(model_type, model_type)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Sizes and conventions of a BERT-family masked language model."""

    family: str  # the module and checkpoint keys: a SUPPORTED_MODEL_TYPES entry, xlm-roberta as roberta
    vocab_size: int
    hidden_size: int
    embedding_size: int  # differs from hidden_size only for ELECTRA
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int  # 0: no token-type embedding (DistilBERT, ModernBERT, ESM)
    layer_norm_eps: float
    hidden_act: str
    pad_token_id: int
    # RoBERTa (and ESM-1b) count positions from pad_token_id + 1 and skip padding.
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModernBertEncoderConfig(EncoderConfig):
    """ModernBERT: pre-LN layers (none before layer 0's attention), fused QKV,
    rotary positions, GeGLU feed-forward (``intermediate_size`` is the width of
    each of its two halves), alternating global and sliding-window attention."""

    global_rope_theta: float
    local_rope_theta: float
    # A local layer's query at position i sees the keys j with |i - j| <= local_window
    # (transformers' local_attention // 2).
    local_window: int
    local_layers: tuple[bool, ...]  # per layer: True where attention is local
    head_act: str  # classifier_activation, the head's activation
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    head_transform_bias: bool = False  # classifier_bias: the bias of the head's dense layer
    decoder_bias: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_rotary(self)
        _check_pad_token(self)
        if len(self.local_layers) != self.num_layers:
            raise UserError(f"layer_types lists {len(self.local_layers)} layers, but num_hidden_layers "
                            f"is {self.num_layers}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EsmEncoderConfig(EncoderConfig):
    """ESM: pre-LN layers, a final LayerNorm, rotary positions (ESM-2) or learned
    padding-aware ones (ESM-1b), and token dropout: at inference the embeddings
    of [MASK] tokens are zeroed and the rest rescaled by the training mask rate
    over the observed one."""

    rope_theta: float  # 0 for learned absolute positions
    token_dropout: bool
    mask_token_id: int
    emb_layer_norm_before: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_pad_token(self)
        if self.rope_theta:
            _check_rotary(self)

    @property
    def rotary(self) -> bool:
        return self.rope_theta > 0


def _check_pad_token(config: EncoderConfig) -> None:
    if not 0 <= config.pad_token_id < config.vocab_size:
        raise UserError(f"config.json: pad_token_id {config.pad_token_id} is outside the vocabulary "
                        f"[0, {config.vocab_size})")


def _check_rotary(config: EncoderConfig) -> None:
    if config.head_dim % 2:
        raise UserError(f"rotary positions need an even attention head size, got "
                        f"{config.hidden_size} / {config.num_heads} = {config.head_dim}")


def encoder_config_from_hf(hf: dict[str, Any]) -> EncoderConfig:
    """Build an ``EncoderConfig`` from a parsed HF ``config.json`` dict."""
    if not isinstance(hf, dict):
        raise UserError(f"config.json must hold a JSON object, not a {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(
            f"unsupported model_type {model_type!r} in config.json; "
            f"jaxjoint supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        if model_type == "modernbert":
            return _modernbert_config(hf)
        if model_type == "esm":
            return _esm_config(hf)
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
        family = family_of(model_type)
        return EncoderConfig(
            family=family,
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
            padding_aware_positions=family == "roberta",
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
        )
    except KeyError as missing:
        raise UserError(
            f"config.json for model_type {model_type!r} lacks the field {missing}"
        ) from None


def _activation(hf: dict[str, Any], key: str, default: str) -> str:
    name = hf.get(key, default)
    if name not in ACTIVATIONS:
        raise UserError(f"config.json: {key} {name!r} is not supported; jaxjoint knows {', '.join(ACTIVATIONS)}")
    return name


def _modernbert_rope_thetas(hf: dict[str, Any]) -> tuple[float, float]:
    """(global, local) rotary bases: transformers 5's ``rope_parameters`` per layer
    type, or the hub configs' ``global_rope_theta`` / ``local_rope_theta``."""
    global_theta = hf.get("global_rope_theta", 160_000.0)
    local_theta = hf.get("local_rope_theta", 10_000.0)
    # transformers 4 read local_rope_theta=None as "local layers use the global base".
    local_theta = global_theta if local_theta is None else local_theta
    rope = hf.get("rope_parameters") or {}
    for layer_type in ("full_attention", "sliding_attention"):
        params = rope.get(layer_type) or {}
        if params.get("rope_type", "default") != "default":
            raise UserError(f"config.json: rotary scaling {params['rope_type']!r} is not supported; "
                            "jaxjoint runs ModernBERT's default rotary positions")
    global_theta = (rope.get("full_attention") or {}).get("rope_theta", global_theta)
    local_theta = (rope.get("sliding_attention") or {}).get("rope_theta", local_theta)
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        raise UserError("config.json: rope_scaling is not supported; "
                        "jaxjoint runs ModernBERT's default rotary positions")
    return float(global_theta), float(local_theta)


def _modernbert_config(hf: dict[str, Any]) -> ModernBertEncoderConfig:
    layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if layer_types is None:
        every = hf.get("global_attn_every_n_layers", 3)
        local_layers = tuple(bool(i % every) for i in range(layers))
    else:
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise UserError(f"config.json: unknown ModernBERT layer_types {sorted(unknown)}")
        local_layers = tuple(t == "sliding_attention" for t in layer_types)
    global_theta, local_theta = _modernbert_rope_thetas(hf)
    hidden = hf["hidden_size"]
    return ModernBertEncoderConfig(
        family="modernbert",
        vocab_size=hf["vocab_size"],
        hidden_size=hidden,
        embedding_size=hidden,
        num_layers=layers,
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_positions=hf.get("max_position_embeddings", 8192),
        type_vocab_size=0,
        layer_norm_eps=hf.get("norm_eps", 1e-5),
        hidden_act=_activation(hf, "hidden_activation", "gelu"),
        pad_token_id=_token_id(hf, "pad_token_id", 50283),
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        global_rope_theta=global_theta,
        local_rope_theta=local_theta,
        local_window=hf.get("local_attention", 128) // 2,
        local_layers=local_layers,
        head_act=_activation(hf, "classifier_activation", "gelu"),
        norm_bias=hf.get("norm_bias", False),
        attention_bias=hf.get("attention_bias", False),
        mlp_bias=hf.get("mlp_bias", False),
        head_transform_bias=hf.get("classifier_bias", False),
        decoder_bias=hf.get("decoder_bias", True),
    )


def _esm_config(hf: dict[str, Any]) -> EsmEncoderConfig:
    if hf.get("is_folding_model"):
        raise UserError("config.json describes ESMFold (is_folding_model=true), not a masked LM; "
                        "give an EsmForMaskedLM checkpoint such as facebook/esm2_t33_650M_UR50D")
    if hf.get("is_decoder"):
        raise UserError("config.json sets is_decoder=true (causal attention); jaxjoint reads "
                        "bidirectional masked LMs only")
    position_type = hf.get("position_embedding_type", "absolute")
    if position_type not in ("rotary", "absolute"):
        raise UserError(f"config.json: ESM position_embedding_type {position_type!r} is not supported; "
                        "jaxjoint reads 'rotary' (ESM-2) and 'absolute' (ESM-1b)")
    token_dropout = bool(hf.get("token_dropout", False))
    mask_token_id = hf.get("mask_token_id")
    if token_dropout and mask_token_id is None:
        raise UserError("config.json sets token_dropout=true but no mask_token_id; add the id of <mask>")
    return EsmEncoderConfig(
        family="esm",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        embedding_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_positions=hf.get("max_position_embeddings", 1026),
        type_vocab_size=0,
        layer_norm_eps=hf.get("layer_norm_eps") or 1e-12,
        hidden_act="gelu",  # ESM's feed-forward and head hard-code exact GELU
        pad_token_id=_token_id(hf, "pad_token_id", 1),
        padding_aware_positions=position_type == "absolute",
        tie_word_embeddings=hf.get("tie_word_embeddings", True),
        rope_theta=float(hf.get("rope_theta", 10_000.0)) if position_type == "rotary" else 0.0,
        token_dropout=token_dropout,
        mask_token_id=-1 if mask_token_id is None else int(mask_token_id),
        emb_layer_norm_before=bool(hf.get("emb_layer_norm_before") or False),
    )


def _token_id(hf: dict[str, Any], key: str, default: int) -> int:
    """The id under ``key`` (transformers' ``default`` when absent). An explicit null
    becomes 0: padding rows only need some valid id, their attention mask is zero."""
    value = hf.get(key, default)
    return 0 if value is None else int(value)
