"""Tiny random Hugging Face checkpoints for the tests (written by the maker of
``jaxjoint random-checkpoint``), transformers configs, and the PyTorch reference model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

from jaxjoint.tools.random_checkpoint import random_checkpoint, small_hf_config
from tests.words import WORDS, vocabulary  # noqa: F401 - vocabulary: re-exported for the tests


def hf_config(family: str, vocab_size: int = 53, hidden: int = 32, layers: int = 2,
              heads: int = 4, intermediate: int = 64, max_positions: int = 64, **extra):
    common = dict(vocab_size=vocab_size, pad_token_id=0, **extra)
    if family == "distilbert":
        return transformers.DistilBertConfig(
            dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=intermediate,
            max_position_embeddings=max_positions, **common)
    kwargs = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=intermediate, max_position_embeddings=max_positions, **common)
    if family == "bert":
        return transformers.BertConfig(**kwargs)
    if family == "roberta":
        # RoBERTa positions start at pad_token_id + 1, so it needs two spare rows.
        kwargs["max_position_embeddings"] = max_positions + 2
        return transformers.RobertaConfig(**kwargs, type_vocab_size=1)
    if family == "xlm-roberta":
        kwargs["max_position_embeddings"] = max_positions + 2
        return transformers.XLMRobertaConfig(**kwargs, type_vocab_size=1)
    if family == "electra":
        return transformers.ElectraConfig(embedding_size=hidden // 2, **kwargs)
    raise ValueError(family)


def make_checkpoint(directory: Path, family: str = "bert", seed: int = 0, head_gain: float = 1.0,
                    vocab_size: int = 53, **sizes) -> Path:
    """A random checkpoint written by jaxjoint's own maker (``random_checkpoint``: every
    weight perturbed, a WordPiece tokenizer over ``vocabulary(V)``'s specials and words)
    at ``small_hf_config``'s sizes. The tests read it with transformers as the reference."""
    hf = small_hf_config(family, vocab_size=vocab_size, **sizes)
    return random_checkpoint(directory, hf, seed=seed, head_gain=head_gain, words=WORDS)


def torch_model(directory: Path):
    """The transformers PyTorch reference model for a checkpoint directory, float32, eval mode."""
    return transformers.AutoModelForMaskedLM.from_pretrained(directory, attn_implementation="eager").eval()


def torch_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    """float32[B, L, V] logits from the PyTorch model."""
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
    mask = None if attention_mask is None else torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float().numpy()


def sharp_checkpoint(directory: Path, seed: int = 0, vocab_size: int = 53) -> Path:
    """A tiny BERT checkpoint with peaked conditionals, so the joint methods differ measurably."""
    return make_checkpoint(directory, "bert", seed=seed, vocab_size=vocab_size, head_gain=8.0)
