"""Tiny random Hugging Face checkpoints, built and saved by the tests themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

from tests.words import vocabulary


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


# The head's LayerNorm gain, per family: scaling it sharpens the conditionals.
HEAD_NORM = {
    "bert": "cls.predictions.transform.LayerNorm.weight",
    "roberta": "lm_head.layer_norm.weight",
    "xlm-roberta": "lm_head.layer_norm.weight",
    "distilbert": "vocab_layer_norm.weight",
    "electra": "generator_predictions.LayerNorm.weight",
    "modernbert": "head.norm.weight",
    "esm": "lm_head.layer_norm.weight",
}


def perturbed_model(config, family: str, seed: int = 0, head_gain: float = 1.0):
    """A transformers ``*ForMaskedLM`` of ``config`` with every weight perturbed, not
    just initialised: LayerNorm gains near 1, everything else O(0.1), so all weights
    matter. Random weights give nearly uniform conditionals; ``head_gain`` multiplies
    the head's LayerNorm gain (8 gives entropies of about 1 nat, like a trained model's)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForMaskedLM.from_config(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name.lower() and name.endswith("weight")
                    else 0.1 * noise)
        model.get_parameter(HEAD_NORM[family]).mul_(head_gain)
    return model


def make_checkpoint(directory: Path, family: str = "bert", seed: int = 0, head_gain: float = 1.0,
                    **sizes) -> Path:
    """Save a random ``*ForMaskedLM`` (``perturbed_model``) and a BERT WordPiece
    tokenizer over ``vocabulary(V)`` into ``directory``."""
    config = hf_config(family, **sizes)
    model = perturbed_model(config, family, seed, head_gain)
    directory = Path(directory)
    model.save_pretrained(directory)
    # transformers 5 ignores vocab_file=; the vocabulary must be passed as a dict.
    vocab = {token: i for i, token in enumerate(vocabulary(config.vocab_size))}
    transformers.BertTokenizerFast(vocab=vocab, do_lower_case=True).save_pretrained(directory)
    return directory


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
