"""train-mlm: masking, a few optimisation steps, reproducibility, HF round trip.

Everything here runs on a tiny synthetic corpus and a tiny model, in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxjoint.models.bert import MaskedLMModule
from jaxjoint.tools import corpus
from jaxjoint.tools.mlm_batches import SpecialIds, mask_batch, tokenize_lines
from jaxjoint.tools.train_mlm import TrainConfig, _save, add_parser, train

NOUNS = ["cat", "dog", "bird", "child", "farmer", "teacher", "horse", "river"]
VERBS = ["sees", "likes", "follows", "finds", "feeds", "hears"]
ADJS = ["small", "old", "happy", "quiet", "brown", "young"]


def synthetic_lines(n: int, seed: int = 0) -> list[str]:
    """Sentences of a tiny grammar: predictable enough that a small model learns fast."""
    rng = np.random.default_rng(seed)
    pick = lambda xs: xs[rng.integers(len(xs))]  # noqa: E731
    return [
        f"the {pick(ADJS)} {pick(NOUNS)} {pick(VERBS)} the {pick(NOUNS)} near the {pick(NOUNS)}"
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    lines = synthetic_lines(400)
    tokenizer = corpus.train_tokenizer(lines, 120, directory)
    config = TrainConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_layers=1, num_heads=2,
        intermediate_size=64, max_length=32, steps=30, batch_tokens=1024,
        learning_rate=1e-2, warmup_fraction=0.1, seed=3,
    )
    data = tokenize_lines(tokenizer, lines, config.max_length)
    return tokenizer, config, data


def test_tokenizer_is_bert_style(tiny):
    tokenizer, _, _ = tiny
    ids = tokenizer("the cat sees the dog")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id,
            tokenizer.sep_token_id, tokenizer.mask_token_id] == [0, 1, 2, 3, 4]


def test_mask_batch_follows_bert_recipe():
    special = SpecialIds(pad=0, cls=2, sep=3, mask=4, unk=1)
    rng = np.random.default_rng(0)
    rows, length, vocab = 2000, 24, 500
    seqs = []
    for _ in range(rows):
        n = int(rng.integers(5, length - 1))
        seqs.append(np.concatenate([[2], rng.integers(5, vocab, n), [3]]).astype(np.int32))
    b = mask_batch(seqs, length, rows, rng, special, vocab, 0.15)
    live = b["weights"] > 0
    pos, labels = b["positions"][live], b["labels"][live]
    row = np.nonzero(live)[0]
    original = np.zeros((rows, length), np.int32)
    for i, s in enumerate(seqs):
        original[i, : len(s)] = s
    # Targets are real tokens, never specials, and the labels are the originals.
    assert np.all(labels >= 5)
    np.testing.assert_array_equal(labels, original[row, pos])
    # No position is a target twice in one row.
    assert all(len(set(b["positions"][i][live[i]])) == live[i].sum() for i in range(50))
    # About 15% of the real tokens are targets.
    n_real = sum(len(s) - 2 for s in seqs)
    assert abs(live.sum() / n_real - 0.15) < 0.02
    # 80% [MASK], 10% random, 10% kept.
    shown = b["input_ids"][row, pos]
    frac_mask = np.mean(shown == 4)
    frac_same = np.mean(shown == labels)
    assert abs(frac_mask - 0.8) < 0.03
    assert abs(frac_same - 0.1) < 0.03  # plus a negligible share of random hits
    # Non-targets are untouched; the attention mask covers exactly the real tokens.
    untouched = original.copy()
    untouched[row, pos] = shown
    np.testing.assert_array_equal(b["input_ids"], untouched)
    np.testing.assert_array_equal(b["attention_mask"], (original != 0).astype(np.int32))


@pytest.mark.slow
def test_training_reduces_loss(tiny):
    tokenizer, config, data = tiny
    _, history = train(config, data, SpecialIds.of(tokenizer), progress=False)
    first = np.mean([h["loss"] for h in history[:5]])
    last = np.mean([h["loss"] for h in history[-5:]])
    assert last < first - 1.0, (first, last)


def test_same_seed_same_params(tiny):
    tokenizer, config, data = tiny
    special = SpecialIds.of(tokenizer)
    p1, _ = train(config, data, special, progress=False)
    p2, _ = train(config, data, special, progress=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, p1, p2)
    p3, _ = train(dataclasses.replace(config, seed=4), data, special, progress=False)
    leaves = zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p3))
    assert any(not np.array_equal(a, b) for a, b in leaves)


def test_checkpoint_round_trips_through_transformers(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from jaxjoint.models.mlm import load_mlm

    tokenizer, config, data = tiny
    params, _ = train(config, data, SpecialIds.of(tokenizer), progress=False)
    _save(tmp_path, config, params, tokenizer)

    sentences = ["the old dog feeds the bird near the river", "the cat sees the horse"]
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    enc = hf_tok(sentences, padding=True, return_tensors="np")
    ids, attention = enc["input_ids"].copy(), enc["attention_mask"]
    ids[:, 2] = hf_tok.mask_token_id
    positions = np.array([[2, 3], [2, 1]], np.int32)

    hf = AutoModelForMaskedLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attention)).logits.numpy()
    ref = np.take_along_axis(ref, positions[:, :, None], axis=1)

    mlm = load_mlm(tmp_path)
    assert mlm.tokenizer("the cat")["input_ids"] == hf_tok("the cat")["input_ids"]
    ours = np.asarray(mlm.logits_at(ids, positions, attention))
    direct = MaskedLMModule(config.encoder_config()).apply(
        {"params": params}, jnp.asarray(ids), jnp.asarray(attention), jnp.asarray(positions))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(direct), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_cli_run_end_to_end(tmp_path, capsys):
    train_file, eval_file = tmp_path / "train.txt", tmp_path / "eval.txt"
    corpus.write_lines(train_file, synthetic_lines(300, seed=1))
    corpus.write_lines(eval_file, synthetic_lines(20, seed=2))
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "train-mlm", "--train-file", str(train_file), "--eval-file", str(eval_file),
        "--out", str(tmp_path / "out"), "--vocab-size", "100", "--hidden-size", "32",
        "--num-layers", "1", "--num-heads", "2", "--intermediate-size", "64",
        "--max-length", "32", "--steps", "4", "--batch-tokens", "512", "--eval-every", "2",
        "--save-every", "2", "--no-progress",
    ])
    assert args.func(args) == 0
    out = tmp_path / "out"
    assert (out / "model" / "model.safetensors").is_file()
    assert (out / "model" / "tokenizer.json").is_file()
    assert (out / "checkpoints" / "step-4" / "config.json").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["heldout"]["eval"]["tokens"] > 0
    assert metrics["config"]["steps"] == 4


def test_wordnet_gloss_parsing():
    definitions, examples = corpus.parse_gloss(
        'a place where things merge; a junction; "Pittsburgh is at the confluence"; '
        '"they met at the fork" - Anon'
    )
    assert definitions == ["a place where things merge", "a junction"]
    assert examples == ["Pittsburgh is at the confluence", "they met at the fork"]


def test_missing_corpus_is_a_user_error(tmp_path):
    from jaxjoint.errors import UserError

    with pytest.raises(UserError, match="apt-get download wordnet-base"):
        corpus.read_wordnet(tmp_path / "nope.deb")
    with pytest.raises(UserError, match="lacks WordNet files"):
        corpus.read_wordnet(tmp_path)
