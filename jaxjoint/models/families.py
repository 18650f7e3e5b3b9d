"""Which Flax module runs which ``model_type``, and fresh parameters for any of them.

Every module has the same contract: ``__call__(input_ids int[B, L], attention_mask
int[B, L], positions int[B, K]) -> float32[B, K, V]``, plus ``encode`` and ``head``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxjoint.models.bert import MaskedLMModule
from jaxjoint.models.config import SUPPORTED_MODEL_TYPES, EncoderConfig, family_of
from jaxjoint.models.esm import EsmMaskedLM
from jaxjoint.models.modernbert import ModernBertMaskedLM
from jaxjoint.models.precision import MatmulPrecision

MODULES: dict[str, type[nn.Module]] = {
    "bert": MaskedLMModule,
    "roberta": MaskedLMModule,
    "distilbert": MaskedLMModule,
    "electra": MaskedLMModule,
    "modernbert": ModernBertMaskedLM,
    "esm": EsmMaskedLM,
}
assert set(MODULES) == {family_of(t) for t in SUPPORTED_MODEL_TYPES}


def masked_lm_module(config: EncoderConfig, dtype: Any = jnp.float32,
                     precision: MatmulPrecision | None = None) -> nn.Module:
    """The Flax module of ``config.family`` computing in ``dtype``, its matrix
    products in ``precision``'s arithmetic (default: float32 as the CPU computes it,
    which a GPU or TPU computes with its exact float32 algorithm)."""
    return MODULES[config.family](config, dtype=dtype, precision=precision or MatmulPrecision())


def init_params(config: EncoderConfig, key: jax.Array) -> Any:
    """Fresh float32 parameters of the family's module (N(0, 0.02) weights, unit
    LayerNorm gains; ESM's rotary frequencies from ``rope_theta``), a Flax parameter
    tree. Jit it, or ``jax.eval_shape`` it for shapes."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return masked_lm_module(config).init(key, ids, jnp.ones_like(ids), ids[:, :1])["params"]
