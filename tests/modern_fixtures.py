"""Tiny random ModernBERT and ESM checkpoints (written by the maker of ``jaxjoint
random-checkpoint``, as ``hf_fixtures.make_checkpoint``) and their transformers configs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import transformers

from jaxjoint.tools.random_checkpoint import ESM_TOKENS as _ESM_TOKENS
from jaxjoint.tools.random_checkpoint import random_checkpoint, small_hf_config

# ESM-2's alphabet, in the order of its vocab.txt.
ESM_TOKENS = list(_ESM_TOKENS)
ESM_AMINO_ACIDS = range(4, 24)  # L A G ... C: the 20 standard residues
# ModernBERT's specials sit at the end of its vocabulary (ids 50280-50284 in the real one).
MODERNBERT_SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
MODERNBERT_WORDS = "the a cat dog sat on mat and ran to park river rose after storm".split()

def modernbert_config(vocab_size: int = 60, hidden: int = 32, layers: int = 3, heads: int = 4,
                      intermediate: int = 48, local_attention: int = 8, global_every: int = 3,
                      max_positions: int = 128, **extra) -> transformers.ModernBertConfig:
    """Three layers with global_every=3: layer 0 global, layers 1 and 2 local (the last
    layer, the one trimmed to the read rows, is local); windows of local_attention // 2."""
    ids = {t: vocab_size - len(MODERNBERT_SPECIALS) + i for i, t in enumerate(MODERNBERT_SPECIALS)}
    return transformers.ModernBertConfig(
        vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, local_attention=local_attention,
        global_attn_every_n_layers=global_every, max_position_embeddings=max_positions,
        pad_token_id=ids["[PAD]"], bos_token_id=ids["[CLS]"], cls_token_id=ids["[CLS]"],
        eos_token_id=ids["[SEP]"], sep_token_id=ids["[SEP]"], **extra)


def esm_config(hidden: int = 32, layers: int = 2, heads: int = 4, intermediate: int = 48,
               max_positions: int = 128, **extra) -> transformers.EsmConfig:
    """ESM-2's layout (rotary positions, token dropout, pad 1, mask 32) at a tiny size."""
    kwargs = dict(position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
                  layer_norm_eps=1e-5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    kwargs.update(extra)
    return transformers.EsmConfig(
        vocab_size=len(ESM_TOKENS), mask_token_id=ESM_TOKENS.index("<mask>"), pad_token_id=1,
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate, max_position_embeddings=max_positions, **kwargs)


def make_modernbert_checkpoint(directory: Path, seed: int = 0, head_gain: float = 1.0, vocab_size: int = 60,
                               hidden: int = 32, layers: int = 3, heads: int = 4, intermediate: int = 48,
                               local_attention: int = 8, global_every: int = 3, max_positions: int = 128,
                               **extra) -> Path:
    """A random ModernBERT checkpoint at ``modernbert_config``'s sizes, written by jaxjoint's
    maker (``random_checkpoint``), its tokenizer over ``MODERNBERT_WORDS`` ([CLS] ... [SEP]);
    ``extra``: more config.json fields (bias switches, activations)."""
    hf = small_hf_config("modernbert", vocab_size=vocab_size, hidden=hidden, layers=layers, heads=heads,
                         intermediate=intermediate, max_positions=max_positions, local_attention=local_attention,
                         global_attn_every_n_layers=global_every, **extra)
    return random_checkpoint(directory, hf, seed=seed, head_gain=head_gain, words=MODERNBERT_WORDS)


def make_esm_checkpoint(directory: Path, seed: int = 0, head_gain: float = 1.0, hidden: int = 32, layers: int = 2,
                        heads: int = 4, intermediate: int = 48, max_positions: int = 128, **extra) -> Path:
    """A random ESM-2-style checkpoint at ``esm_config``'s sizes and an ``EsmTokenizer``,
    written by jaxjoint's maker (``random_checkpoint``)."""
    hf = small_hf_config("esm", hidden=hidden, layers=layers, heads=heads, intermediate=intermediate,
                         max_positions=max_positions, **extra)
    return random_checkpoint(directory, hf, seed=seed, head_gain=head_gain)


def padded_batch(rng: np.random.Generator, b: int, length: int, *, tokens: range, pad: int, first: int,
                 min_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids int[B, L] (``first`` at 0, random ``tokens``, ``pad`` past each length), mask
    int[B, L] (zeros at the tail), lengths int[B] in [min_len, L] with lengths[0] = L."""
    lengths = rng.integers(min_len, length + 1, size=b)
    lengths[0] = length
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask > 0, rng.integers(tokens.start, tokens.stop, size=(b, length)), pad)
    ids[:, 0] = first
    return ids, mask, lengths
