"""Data sources, sentence selection and the masking protocol (DESIGN.md §2)."""

import json

import datasets
import numpy as np
import pytest
import transformers

from jaxjoint import UserError
from jaxjoint.data import (
    SNLI_BLOCK_ROWS,
    choose_positions,
    load_sentences,
    make_pairs,
    max_tokens,
    sentence_rng,
)
from jaxjoint.models.config import encoder_config_from_hf
from tests.hf_fixtures import hf_config, vocabulary


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocabulary(53))}, do_lower_case=True)


# --- masking protocol ------------------------------------------------------------------


def test_random_masking_draws_two_distinct_free_positions_uniformly():
    special = [1, 0, 0, 0, 0, 1]  # [CLS] w w w w [SEP]
    counts = np.zeros((6, 6))
    for i in range(6000):
        a, b = choose_positions(special, "random", sentence_rng(0, i))
        counts[a, b] += 1
    assert counts[[0, 5], :].sum() == 0 and counts[:, [0, 5]].sum() == 0 and np.trace(counts) == 0
    # 12 ordered pairs, each with probability 1/12: A is the first draw, not the smaller position.
    cells = counts[1:5, 1:5][~np.eye(4, dtype=bool)]
    assert cells.min() > 6000 / 12 * 0.8 and cells.max() < 6000 / 12 * 1.2


def test_random_masking_matches_numpy_choice_without_replacement():
    special = np.array([1, 0, 0, 1, 0, 0, 0, 1], bool)  # a special token in the middle too
    got = choose_positions(special, "random", sentence_rng(3, 7))
    expect = sentence_rng(3, 7).choice(np.flatnonzero(~special), size=2, replace=False)
    assert got == tuple(int(x) for x in expect)


def test_contiguous_masking_needs_a_free_right_neighbour():
    special = [1, 0, 0, 1, 0, 1]  # candidates for A: only position 1
    for i in range(50):
        assert choose_positions(special, "contiguous", sentence_rng(0, i)) == (1, 2)
    seen = {choose_positions([1, 0, 0, 0, 0, 1], "contiguous", sentence_rng(0, i)) for i in range(200)}
    assert seen == {(1, 2), (2, 3), (3, 4)}


@pytest.mark.parametrize("masking,special", [
    ("random", [1, 0, 1]),
    ("random", [1, 1]),
    ("contiguous", [1, 0, 1]),
    ("contiguous", [1, 0, 1, 0, 1]),  # two free tokens, not adjacent
])
def test_too_few_maskable_tokens(masking, special):
    assert choose_positions(special, masking, sentence_rng(0, 0)) is None


def test_pairs_depend_only_on_seed_and_index(tokenizer):
    sentences = ["the cat sat on the mat", "a dog", "the man saw a bird in the tree", "it",
                 "the quick brown fox jumps over the lazy dog", "we ate food by the water"]
    pairs, skipped = make_pairs(sentences, tokenizer, masking="random", seed=5, max_length=512)
    assert skipped == 1 and [p.index for p in pairs] == [0, 1, 2, 4, 5]
    for p in pairs:
        assert p.input_ids[0] == tokenizer.cls_token_id and p.input_ids[-1] == tokenizer.sep_token_id
        assert 0 < p.a < len(p.input_ids) - 1 and 0 < p.b < len(p.input_ids) - 1 and p.a != p.b
        assert p.gold == (p.input_ids[p.a], p.input_ids[p.b])
    # A later subset (as when resuming) gets the same positions: the index, not the order, seeds.
    again, _ = make_pairs(sentences, tokenizer, masking="random", seed=5, max_length=512)
    assert again == pairs
    other, _ = make_pairs(sentences, tokenizer, masking="random", seed=6, max_length=512)
    assert [(p.a, p.b) for p in other] != [(p.a, p.b) for p in pairs]


def test_contiguous_pairs_and_truncation(tokenizer):
    long = " ".join(["the cat sat on the mat"] * 30)
    pairs, skipped = make_pairs([long, "a dog"], tokenizer, masking="contiguous", seed=0, max_length=20)
    assert skipped == 0
    assert len(pairs[0].input_ids) == 20 and pairs[0].input_ids[-1] == tokenizer.sep_token_id
    for p in pairs:
        assert p.b == p.a + 1 and 0 < p.a and p.b < len(p.input_ids) - 1
    assert (pairs[1].a, pairs[1].b) == (1, 2)


def test_max_tokens_follows_the_model():
    bert = encoder_config_from_hf(hf_config("bert", max_positions=64).to_dict())
    assert max_tokens(bert) == 64
    # RoBERTa numbers positions from pad_token_id + 1: 514 rows and pad 1 give 512 tokens.
    roberta = encoder_config_from_hf({**hf_config("roberta", max_positions=512).to_dict(), "pad_token_id": 1})
    assert max_tokens(roberta) == 512
    big = encoder_config_from_hf(hf_config("bert", max_positions=4096).to_dict())
    assert max_tokens(big) == 512


# --- sources ------------------------------------------------------------------------------


def test_txt_and_jsonl(tmp_path):
    txt = tmp_path / "s.txt"
    txt.write_text("  the cat sat \n\nthe dog ran\n   \n")
    assert load_sentences(str(txt)) == ["the cat sat", "the dog ran"]
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text(json.dumps({"text": "one", "id": 3}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_sentences(str(jsonl)) == ["one", "two"]
    assert load_sentences(str(jsonl), limit=1) == ["one"]


@pytest.mark.parametrize("name,content,message", [
    ("empty.txt", "\n \n", "holds no sentences"),
    ("bad.jsonl", '{"text": "ok"}\n{"txt": "no"}\n', r"bad.jsonl:2: expected a JSON object with a 'text' field"),
    ("notjson.jsonl", "plain text\n", "notjson.jsonl:1"),
    ("nums.jsonl", '{"text": 3}\n', "must be a string"),
    ("data.csv", "a,b\n", r"must end in \.txt"),
])
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_sentences(str(path))


def test_unknown_name_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="unknown data 'snlii'.*default, default-news, snli, xsum"):
        load_sentences("snlii")
    with pytest.raises(UserError, match="does not exist"):
        load_sentences(str(tmp_path / "missing.txt"))


def test_hub_set_offline_is_one_clear_line():
    # conftest sets HF_DATASETS_OFFLINE=1 and nothing is cached under this name here
    with pytest.raises(UserError, match="cannot load 'xsum'") as err:
        load_sentences("xsum", limit=3)
    assert "\n" not in str(err.value)


def _fake_hub(monkeypatch, rows):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_snli_protocol(monkeypatch):
    n = 25_000
    rows = {"premise": [f"p{i}" for i in range(n)], "hypothesis": [f"h{i}" for i in range(n)],
            "label": [i % 3 for i in range(n)]}
    calls = _fake_hub(monkeypatch, rows)
    got = load_sentences("snli")
    assert calls == [("stanfordnlp/snli", "train")]
    # The paper's recipe, written with datasets' own splitting.
    shuffled = datasets.Dataset.from_dict(rows).shuffle(seed=0)
    held = shuffled.train_test_split(test_size=0.01, shuffle=False)["test"]
    part = held.train_test_split(test_size=0.5, shuffle=False)["train"]
    expect = []
    for i in range(0, len(part), SNLI_BLOCK_ROWS):
        block = part[i:i + SNLI_BLOCK_ROWS]
        expect += block["premise"] + block["hypothesis"]
    assert len(part) == 125 and got == expect
    assert load_sentences("snli", limit=150) == expect[:150]


def test_xsum_protocol(monkeypatch):
    rows = {"document": ["d"] * 300, "summary": [f" s{i} " for i in range(300)], "id": list(map(str, range(300)))}
    calls = _fake_hub(monkeypatch, rows)
    got = load_sentences("xsum", limit=40)
    assert calls == [("EdinburghNLP/xsum", "validation")]
    shuffled = datasets.Dataset.from_dict(rows).shuffle(seed=0)
    assert got == [s.strip() for s in shuffled["summary"][:40]]


def test_limit_counts_sentences_not_pairs(tokenizer, tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("the cat sat\nit\nthe dog ran\nthe man saw\n")
    sentences = load_sentences(str(path), limit=3)
    pairs, skipped = make_pairs(sentences, tokenizer, masking="random", seed=0, max_length=512)
    assert len(pairs) == 2 and skipped == 1 and len(sentences) == 3
