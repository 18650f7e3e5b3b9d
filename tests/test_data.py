"""Data sources, sentence selection and the masking protocol (DESIGN.md §2)."""

import json

import datasets
import numpy as np
import pandas as pd
import pytest
import transformers

from jaxjoint import UserError, hub
from jaxjoint.data import (
    PARQUET_REVISION,
    SNLI_BLOCK_ROWS,
    Skipped,
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
    assert skipped == [Skipped(3, "1 maskable token, fewer than two")] and [p.index for p in pairs] == [0, 1, 2, 4, 5]
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
    assert skipped == []
    assert len(pairs[0].input_ids) == 20 and pairs[0].input_ids[-1] == tokenizer.sep_token_id
    # The cut pair keeps the whole sentence's length: [CLS], 6 words x 30, [SEP].
    assert pairs[0].truncated_from == 2 + 6 * 30 and pairs[1].truncated_from is None
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


def _fake_hub(monkeypatch, rows, *, refuse_script=False, reachable=True):
    """datasets.load_dataset serving ``rows``; with ``refuse_script``, as datasets >= 4 answers a
    script-based repository at its main revision."""
    calls = []

    def load_dataset(name, split, revision=None):
        calls.append((name, split, revision))
        if refuse_script and revision is None:
            raise RuntimeError(f"Dataset scripts are no longer supported, but found {name.split('/')[1]}.py")
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(hub, "unreachable", lambda *args, **kwargs: None if reachable else "no network")
    return calls


def test_snli_protocol(monkeypatch):
    n = 25_000
    rows = {"premise": [f"p{i}" for i in range(n)], "hypothesis": [f"h{i}" for i in range(n)],
            "label": [i % 3 for i in range(n)]}
    calls = _fake_hub(monkeypatch, rows)
    got = load_sentences("snli")
    assert calls == [("stanfordnlp/snli", "train", None)]
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
    assert calls == [("EdinburghNLP/xsum", "validation", None)]
    shuffled = datasets.Dataset.from_dict(rows).shuffle(seed=0)
    assert got == [s.strip() for s in shuffled["summary"][:40]]


def test_limit_counts_sentences_not_pairs(tokenizer, tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("the cat sat\nit\nthe dog ran\nthe man saw\n")
    sentences = load_sentences(str(path), limit=3)
    pairs, skipped = make_pairs(sentences, tokenizer, masking="random", seed=0, max_length=512)
    assert len(pairs) == 2 and len(skipped) == 1 and len(sentences) == 3


# --- the hub as served now, and local copies ---------------------------------------------------------


def snli_rows(n):
    return {"premise": [f" p{i} " for i in range(n)], "hypothesis": [f"h{i}" for i in range(n)],
            "label": [i % 3 for i in range(n)]}


def xsum_rows(n):
    return {"document": [f"doc {i}" for i in range(n)], "summary": [f" summary {i} " for i in range(n)],
            "id": [str(10_000 + i) for i in range(n)]}


def expected_snli(rows):
    """DESIGN.md §2 read independently: train shuffled with seed 0, the last 1% held out (datasets'
    unshuffled split), its first half; each block of 100 rows gives its premises, then its hypotheses."""
    shuffled = datasets.Dataset.from_dict(rows).shuffle(seed=0)
    held = shuffled.train_test_split(test_size=0.01, shuffle=False)["test"]
    part = held.train_test_split(test_size=0.5, shuffle=False)["train"]
    out = []
    for i in range(0, len(part), 100):
        block = part[i:i + 100]
        out += [s.strip() for s in block["premise"] + block["hypothesis"]]
    return out


def expected_xsum(summaries, n):
    """The validation split shuffled with seed 0 (NumPy's permutation, which datasets' shuffle uses), first n."""
    order = np.random.default_rng(0).permutation(len(summaries))
    return [summaries[i].strip() for i in order[:n]]


def test_a_script_based_repository_is_read_from_its_parquet_conversion(monkeypatch):
    rows = xsum_rows(300)
    calls = _fake_hub(monkeypatch, rows, refuse_script=True)
    got = load_sentences("xsum", limit=7)
    assert calls == [("EdinburghNLP/xsum", "validation", None), ("EdinburghNLP/xsum", "validation", PARQUET_REVISION)]
    assert got == expected_xsum(rows["summary"], 7)


@pytest.mark.parametrize("error,message", [
    (RuntimeError("Dataset scripts are no longer supported, but found xsum.py"),
     r"refuses its loading script, and its Parquet conversion \(revision refs/convert/parquet\) failed too"),
    (ConnectionError("Couldn't reach 'EdinburghNLP/xsum' on the Hub (ConnectError)"),
     r"the Hugging Face Hub did not answer \(ConnectionError: Couldn't reach"),
    (ValueError('Unknown split "validation". Should be one of [\'train\'].'), r"it has no 'validation' split"),
    (datasets.exceptions.DatasetNotFoundError("Dataset 'EdinburghNLP/xsum' doesn't exist on the Hub"),
     r"the hub has no such dataset, or it cannot be accessed"),
])
def test_hub_failures_say_what_failed(monkeypatch, error, message):
    def load_dataset(name, split, revision=None):
        if revision == PARQUET_REVISION:
            raise FileNotFoundError("no parquet files")
        raise error

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(hub, "unreachable", lambda *args, **kwargs: None)
    with pytest.raises(UserError, match=message) as err:
        load_sentences("xsum", limit=3)
    assert "\n" not in str(err.value) and "--data xsum=PATH" in str(err.value)
    assert "connect once" not in str(err.value)


def test_without_network_the_cache_is_read_at_once(monkeypatch):
    rows = xsum_rows(50)
    offline_seen = []

    def cached(name, split, revision=None):
        offline_seen.append((datasets.config.HF_HUB_OFFLINE, revision))
        if revision is None:
            raise ConnectionError("not cached under main")
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", cached)
    monkeypatch.setattr(hub, "unreachable", lambda *args, **kwargs: "https://huggingface.co does not answer")
    assert load_sentences("xsum", limit=4) == expected_xsum(rows["summary"], 4)
    assert offline_seen == [(True, None), (True, PARQUET_REVISION)]  # offline: no request, no retries

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("x")))
    with pytest.raises(UserError, match=r"the Hugging Face Hub is not reachable \(https://huggingface.co does not "
                                        r"answer\) and EdinburghNLP/xsum is not in the datasets cache"):
        load_sentences("xsum")


@pytest.mark.slow
@pytest.mark.parametrize("endpoint", ["refused", "no such host"])
def test_hub_unreachable_fails_fast_in_one_line_without_retries(tmp_path, endpoint):
    """Without network the run stops within 5 s with one line; datasets alone retries for
    about 25 s, printing a line per retry."""
    import os
    import socket
    import subprocess
    import sys

    if endpoint == "refused":
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
        closed.close()  # nothing listens there now: connections are refused
    else:
        url = "https://no-such-host.invalid"  # .invalid never resolves (RFC 2606)
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy")}
    env.update(HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf"))
    script = ("import time, datasets\nfrom jaxjoint.data import load_sentences\nfrom jaxjoint import UserError\n"
              "start = time.monotonic()\ntry:\n    load_sentences('xsum', 3)\nexcept UserError as err:\n"
              "    print(f'{time.monotonic() - start:.2f}'); print(err)\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    seconds, message = done.stdout.splitlines()
    assert float(seconds) < 5.0, done.stderr
    assert "the Hugging Face Hub is not reachable" in message and "--data xsum=PATH" in message
    assert "Retry" not in done.stderr + done.stdout


def test_local_xsum_parquet_is_read_by_the_protocol(tmp_path):
    rows = xsum_rows(120)
    path = tmp_path / "xsum_validation.parquet"
    pd.DataFrame(rows).to_parquet(path)
    got = load_sentences(f"xsum={path}", limit=5)
    assert got == expected_xsum(rows["summary"], 5)
    shuffled = datasets.Dataset.from_pandas(pd.read_parquet(path)).shuffle(seed=0)
    assert got == [s.strip() for s in shuffled["summary"][:5]]  # "after datasets' shuffle(seed=0)"
    assert load_sentences(f"xsum={path}") == expected_xsum(rows["summary"], 120)


def test_local_snli_jsonl_and_saved_directory(tmp_path):
    rows = snli_rows(20_000)
    expect = expected_snli(rows)
    assert len(expect) == 200
    jsonl = tmp_path / "snli_train.jsonl"
    jsonl.write_text("".join(json.dumps(dict(zip(rows, values))) + "\n" for values in zip(*rows.values())))
    assert load_sentences(f"snli={jsonl}") == expect
    saved = tmp_path / "snli_saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict(snli_rows(10))}).save_to_disk(str(saved))
    assert load_sentences(f"snli={saved}", limit=120) == expect[:120]
    one = tmp_path / "snli_one"
    datasets.Dataset.from_dict(rows).save_to_disk(str(one))
    assert load_sentences(f"snli={one}") == expect


def test_local_copies_refuse_what_is_not_the_hub_layout(tmp_path):
    path = tmp_path / "x.parquet"
    pd.DataFrame({"document": ["d"], "highlights": ["h"]}).to_parquet(path)
    with pytest.raises(UserError, match=r"no 'summary' column \(it has document, highlights\); a copy of "
                                        r"EdinburghNLP/xsum has the hub's columns: summary"):
        load_sentences(f"xsum={path}")
    saved = tmp_path / "dd"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(xsum_rows(3))}).save_to_disk(str(saved))
    with pytest.raises(UserError, match=r"the saved dataset has no 'validation' split \(it has test\)"):
        load_sentences(f"xsum={saved}")
    with pytest.raises(UserError, match=r"does not exist"):
        load_sentences(f"xsum={tmp_path / 'missing.parquet'}")
    csv_file = tmp_path / "x.csv"
    csv_file.write_text("summary\nx\n")
    with pytest.raises(UserError, match=r"give a .parquet file, a .jsonl file or a directory saved by datasets"):
        load_sentences(f"xsum={csv_file}")
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text(json.dumps({"premise": "a b", "hypothesis": "c d"}) + "\n" + json.dumps({"premise": "e"}) + "\n")
    with pytest.raises(UserError, match=r"x.jsonl:2: no 'hypothesis' field"):
        load_sentences(f"snli={jsonl}")
    broken = tmp_path / "broken.parquet"
    broken.write_text("not parquet")
    with pytest.raises(UserError, match=r"cannot read it \(") as err:
        load_sentences(f"snli={broken}")
    assert "\n" not in str(err.value)


def test_local_copy_path_is_made_absolute(tmp_path, monkeypatch):
    from jaxjoint.config import resolve_config

    monkeypatch.chdir(tmp_path)
    config = resolve_config({"data": "xsum=copies/val.parquet"})
    assert config.data == f"xsum={tmp_path / 'copies' / 'val.parquet'}" and config.max_sentences is None
    assert config.out == str(tmp_path / "runs" / "default_xsum-val_random")


@pytest.mark.slow
def test_evaluate_a_local_xsum_copy_scores_the_first_summaries_and_accounts_for_each(sharp_ckpt, tmp_path, capsys):
    """The issue's check: --data xsum=FILE --max-sentences 5 scores the first 5 summaries after
    shuffle(seed=0); the run says which were skipped and why, and which were cut to the model's maximum."""
    from jaxjoint.cli import main
    from jaxjoint.models.mlm import load_mlm

    n = 30
    order = np.random.default_rng(0).permutation(n)
    long = " ".join(["the cat sat on the mat"] * 15)  # 92 tokens with [CLS] and [SEP]: more than the 64 positions
    summaries = [f"the dog number {i} ran to the park" for i in range(n)]
    summaries[order[1]], summaries[order[3]] = long, "it"
    path = tmp_path / "xsum_validation.parquet"
    pd.DataFrame({"document": ["d"] * n, "summary": summaries, "id": [str(i) for i in range(n)]}).to_parquet(path)
    out = tmp_path / "run"
    assert main(["evaluate", "--model", str(sharp_ckpt), "--data", f"xsum={path}", "--max-sentences", "5",
                 "--methods", "mlm", "--devices", "1", "--out", str(out), "--quiet"]) == 0
    records = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    first5 = expected_xsum(summaries, 5)
    assert [(r["index"], r["text"]) for r in records] == [(i, first5[i]) for i in (0, 1, 2, 4)]
    tokenizer = load_mlm(sharp_ckpt).tokenizer
    assert records[1]["truncated_from"] == len(tokenizer(long)["input_ids"]) == 92
    assert len(records[1]["input_ids"]) == 64 and all("truncated_from" not in r for r in records if r["index"] != 1)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_skipped"] == 1
    assert summary["skipped"] == [{"index": 3, "reason": "1 maskable token, fewer than two"}]
    assert summary["n_truncated"] == 1 and summary["truncated"] == [{"index": 1, "tokens": 92}]
    assert summary["max_tokens"] == 64 and summary["unit"] == "sentence"
    assert ("1 sentence skipped (3: 1 maskable token, fewer than two); 1 sentence cut to the model's maximum of "
            "64 tokens (1: 92 tokens).") in (out / "summary.md").read_text()


def test_summary_accounts_for_every_sentence_and_says_sequences_for_proteins():
    from jaxjoint.config import resolve_config
    from jaxjoint.run.reports import summarize, summary_markdown

    config = resolve_config({"methods": "mlm", "out": "/tmp/unused"})
    records = [{"index": i, "metrics": {"mlm": {"p_nll": 1.0, "u_nll": 1.0, "kl_gold": 0.0, "kl_all": 0.0}},
                "mlm_unary_u_nll": 1.0, **({"truncated_from": 600 + i} if i in (2, 5) else {})} for i in range(14)]
    skipped = [Skipped(20 + k, "no two adjacent maskable tokens (1 maskable)") for k in range(12)]
    summary = summarize(config, records, skipped, unit="sequence", max_length=512)
    assert summary["n_skipped"] == 12 and summary["skipped"][0] == {"index": 20, "reason": skipped[0].reason}
    assert summary["truncated"] == [{"index": 2, "tokens": 602}, {"index": 5, "tokens": 605}]
    text = summary_markdown(summary)
    assert ("12 sequences skipped (20: no two adjacent maskable tokens (1 maskable); " in text
            and "29: no two adjacent maskable tokens (1 maskable); 2 more in summary.json); 2 sequences cut to the "
            "model's maximum of 512 tokens (2: 602 tokens; 5: 605 tokens)." in text)
    assert "sentence" not in text
    plain = summary_markdown(summarize(config, records[:1], [], max_length=128))
    assert "No sentence skipped; none cut to the model's maximum of 128 tokens." in plain
