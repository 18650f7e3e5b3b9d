"""Training batches for ``train-mlm``: tokenized lines, BERT masking, length buckets."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxjoint.tables import bucket_length

if TYPE_CHECKING:
    from jaxjoint.tools.train_mlm import TrainConfig


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Token ids the masking needs."""

    pad: int
    cls: int
    sep: int
    mask: int
    unk: int

    @classmethod
    def of(cls, tokenizer: Any) -> SpecialIds:
        return cls(tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
                   tokenizer.mask_token_id, tokenizer.unk_token_id)

    def all(self) -> tuple[int, ...]:
        return (self.pad, self.cls, self.sep, self.mask, self.unk)


def tokenize_lines(tokenizer: Any, lines: Sequence[str], max_length: int) -> list[np.ndarray]:
    """Token ids ``[CLS] ... [SEP]`` of each line, truncated to ``max_length``: list of int32[n_i]."""
    enc = tokenizer(list(lines), add_special_tokens=True, truncation=True, max_length=max_length)
    return [np.asarray(ids, np.int32) for ids in enc["input_ids"]]


def max_masked(bucket: int, mask_prob: float) -> int:
    """K: masked slots per row for sequences of at most ``bucket`` tokens."""
    return max(1, math.ceil(mask_prob * (bucket - 2)))


def mask_batch(
    seqs: Sequence[np.ndarray],
    length: int,
    rows: int,
    rng: np.random.Generator,
    special: SpecialIds,
    vocab_size: int,
    mask_prob: float,
) -> dict[str, np.ndarray]:
    """Pad ``seqs`` into one batch and apply BERT masking.

    Returns input_ids, attention_mask: int32[rows, length]; positions, labels:
    int32[rows, K]; weights: float32[rows, K] (1 for a real target, 0 for a
    padded slot or a padded row). Each sequence gets ``round(mask_prob * n)``
    targets (at least one) among its n non-special tokens.
    """
    k = max_masked(length, mask_prob)
    ids = np.full((rows, length), special.pad, np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    attention = (ids != special.pad).astype(np.int32)
    candidate = np.isin(ids, special.all(), invert=True)
    n_real = candidate.sum(1)
    n_mask = np.where(n_real > 0, np.maximum(1, np.rint(mask_prob * n_real)), 0).astype(np.int64)
    n_mask = np.minimum(n_mask, k)
    # A uniform random order of the candidates, specials pushed to the end.
    keys = np.where(candidate, rng.random(ids.shape), np.inf)
    positions = np.argsort(keys, axis=1, kind="stable")[:, :k].astype(np.int32)
    weights = (np.arange(k)[None, :] < n_mask[:, None]).astype(np.float32)
    positions = np.where(weights > 0, positions, 0)
    labels = np.take_along_axis(ids, positions, axis=1)
    action = rng.random(positions.shape)
    random_tokens = rng.integers(len(special.all()), vocab_size, positions.shape, dtype=np.int32)
    row = np.arange(rows)[:, None]
    replaced = np.where(action < 0.8, special.mask, np.where(action < 0.9, random_tokens, labels))
    corrupted = ids.copy()
    live = weights > 0
    corrupted[row.repeat(k, 1)[live], positions[live]] = replaced[live]
    return dict(input_ids=corrupted, attention_mask=attention, positions=positions,
                labels=labels, weights=weights)


def epoch_batches(
    data: Sequence[np.ndarray],
    config: TrainConfig,
    rng: np.random.Generator,
    special: SpecialIds,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over ``data`` in length-bucketed, shuffled, freshly masked batches.

    Every batch of a bucket has the same shape (the last one padded with empty
    rows of weight 0), so the train step compiles once per bucket.
    """
    by_bucket: dict[int, list[int]] = {}
    for i, s in enumerate(data):
        by_bucket.setdefault(bucket_length(len(s), config.max_length), []).append(i)
    plan = []
    for bucket in sorted(by_bucket):
        idx = np.asarray(by_bucket[bucket])
        rng.shuffle(idx)
        rows = max(1, config.batch_tokens // bucket)
        plan += [(bucket, rows, idx[j : j + rows]) for j in range(0, len(idx), rows)]
    for o in rng.permutation(len(plan)):
        bucket, rows, idx = plan[o]
        yield mask_batch([data[i] for i in idx], bucket, rows, rng, special,
                         config.vocab_size, config.mask_prob)


def fixed_eval_batches(
    data: Sequence[np.ndarray], config: TrainConfig, special: SpecialIds, seed: int = 1234
) -> list[dict[str, np.ndarray]]:
    """Validation batches with one fixed masking, so numbers compare across steps."""
    rng = np.random.default_rng(seed)
    return list(epoch_batches(data, dataclasses.replace(config, seed=seed), rng, special))
