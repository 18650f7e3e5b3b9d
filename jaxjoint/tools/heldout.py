"""Held-out quality of a masked LM: pseudo-perplexity and masked-token accuracy, beside a unigram baseline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxjoint.models.bert import MaskedLMModule
from jaxjoint.tools.mlm_batches import SpecialIds, tokenize_lines

Params = Any


def pseudo_likelihood(
    module: MaskedLMModule,
    params: Params,
    sequences: Sequence[np.ndarray],
    special: SpecialIds,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask every non-special token of every sequence, one at a time.

    Returns (log-probabilities float64[T], top-1 correct bool[T], gold ids int[T])
    over all T non-special tokens: the ingredients of pseudo-perplexity
    ``exp(-mean log p)`` and masked-token accuracy.
    """
    length = max(len(s) for s in sequences)
    rows, pos, gold = [], [], []
    for s in sequences:
        for i, t in enumerate(s):
            if t in special.all():
                continue
            x = np.full(length, special.pad, np.int32)
            x[: len(s)] = s
            x[i] = special.mask
            rows.append(x), pos.append(i), gold.append(t)
    ids, pos, gold = np.stack(rows), np.asarray(pos, np.int32), np.asarray(gold, np.int32)
    fn = jax.jit(lambda p, x, q: jax.nn.log_softmax(
        module.apply({"params": p}, x, (x != special.pad).astype(jnp.int32), q[:, None])[:, 0], -1))
    logps, correct = [], []
    for j in range(0, len(ids), batch_size):
        x, q, g = ids[j : j + batch_size], pos[j : j + batch_size], gold[j : j + batch_size]
        n = len(x)
        if n < batch_size:  # keep one compiled shape
            x = np.concatenate([x, np.repeat(x[:1], batch_size - n, 0)])
            q = np.concatenate([q, np.repeat(q[:1], batch_size - n)])
        lp = np.asarray(fn(params, x, q))[:n]
        logps.append(lp[np.arange(n), g])
        correct.append(lp.argmax(-1) == g)
    return np.concatenate(logps).astype(np.float64), np.concatenate(correct), gold


def unigram_log_probs(data: Sequence[np.ndarray], vocab_size: int, special: SpecialIds) -> np.ndarray:
    """float64[V]: add-one smoothed unigram log-probabilities of non-special training tokens."""
    counts = np.bincount(np.concatenate(list(data)), minlength=vocab_size).astype(np.float64) + 1.0
    counts[list(special.all())] = 0.0
    with np.errstate(divide="ignore"):  # specials get log 0 = -inf on purpose
        return np.log(counts / counts.sum())


def heldout_report(
    module: MaskedLMModule,
    params: Params,
    tokenizer: Any,
    sets: dict[str, Sequence[str]],
    unigram: np.ndarray,
    max_length: int,
) -> dict[str, dict]:
    """Per held-out set: tokens, masked-token accuracy and pseudo-perplexity, and the unigram baseline's."""
    special = SpecialIds.of(tokenizer)
    report = {}
    for name, lines in sets.items():
        seqs = tokenize_lines(tokenizer, lines, max_length)
        lp, correct, gold = pseudo_likelihood(module, params, seqs, special)
        report[name] = {
            "sentences": len(seqs),
            "tokens": int(len(gold)),
            "mean_length_with_specials": float(np.mean([len(s) for s in seqs])),
            "masked_token_accuracy": float(correct.mean()),
            "pseudo_perplexity": float(np.exp(-lp.mean())),
            "unigram_accuracy": float((gold == int(np.argmax(unigram))).mean()),
            "unigram_perplexity": float(np.exp(-unigram[gold].mean())),
        }
    return report
