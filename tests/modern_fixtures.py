"""Tiny random ModernBERT and ESM checkpoints, built and saved by transformers' own
PyTorch classes, every weight perturbed (as ``hf_fixtures.make_checkpoint`` does)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from tests.hf_fixtures import perturbed_model

# ESM-2's alphabet, in the order of its vocab.txt.
ESM_TOKENS = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>"]
ESM_AMINO_ACIDS = range(4, 24)  # L A G ... C: the 20 standard residues
# ModernBERT's specials sit at the end of its vocabulary (ids 50280-50284 in the real one).
MODERNBERT_SPECIALS = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
MODERNBERT_WORDS = "the a cat dog sat on mat and ran to park river rose after storm".split()

def modernbert_vocabulary(size: int) -> list[str]:
    """``size`` word-level entries: words, filler words, then the five specials."""
    words = MODERNBERT_WORDS + [f"w{i}" for i in range(size)]
    return words[: size - len(MODERNBERT_SPECIALS)] + MODERNBERT_SPECIALS


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


def make_modernbert_checkpoint(directory: Path, seed: int = 0, head_gain: float = 1.0, **sizes) -> Path:
    """Save a random ``ModernBertForMaskedLM`` and a word-level fast tokenizer
    (``tokenizer.json``, [CLS] ... [SEP]) into ``directory``."""
    config = modernbert_config(**sizes)
    model = perturbed_model(config, "modernbert", seed, head_gain)
    directory = Path(directory)
    model.save_pretrained(directory)
    vocab = {token: i for i, token in enumerate(modernbert_vocabulary(config.vocab_size))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        pad_token="[PAD]", mask_token="[MASK]").save_pretrained(directory)
    return directory


def make_esm_checkpoint(directory: Path, seed: int = 0, head_gain: float = 1.0, **sizes) -> Path:
    """Save a random ``EsmForMaskedLM`` and an ``EsmTokenizer`` (vocab.txt) into ``directory``."""
    config = esm_config(**sizes)
    model = perturbed_model(config, "esm", seed, head_gain)
    directory = Path(directory)
    model.save_pretrained(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(ESM_TOKENS) + "\n")
    transformers.EsmTokenizer(vocab_file=str(vocab_file)).save_pretrained(directory)
    return directory


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
