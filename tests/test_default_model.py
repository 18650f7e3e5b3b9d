"""The embedded default model: loads in jaxjoint and in transformers alike, and has learned English.

Runs offline on the shipped files only, on a fixed small sample, in seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxjoint.data import load_sentences
from jaxjoint.default import MODEL_DIR, SENTENCE_FILES
from jaxjoint.models.mlm import load_mlm


@pytest.fixture(scope="module")
def mlm():
    return load_mlm(MODEL_DIR)


def test_shipped_files_and_shape():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        assert (MODEL_DIR / name).is_file(), name
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 25 * 2**20
    hf = json.loads((MODEL_DIR / "config.json").read_text())
    assert hf["model_type"] == "bert"
    assert 4000 <= hf["vocab_size"] <= 8000
    assert (MODEL_DIR.parent / "MODEL_CARD.md").is_file()
    assert (MODEL_DIR.parent / "LICENSE.WordNet").is_file()


def test_heldout_sentence_sets():
    short, news = load_sentences("default"), load_sentences("default-news")
    assert len(short) == len(news) == 300
    assert not set(short) & set(news)
    assert len(set(short)) == len(short) and len(set(news)) == len(news)
    # The news-like set is the longer one; both are plain one-line sentences.
    assert np.mean([len(s.split()) for s in news]) > np.mean([len(s.split()) for s in short]) + 5
    assert all("\t" not in s and s == s.strip() for s in short + news)
    assert set(SENTENCE_FILES) == {"short", "news"}
    assert short == SENTENCE_FILES["short"].read_text(encoding="utf-8").splitlines()


def test_tokenizer_is_bert_style(mlm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    ids = tok("The cat sat on the mat.")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    for t in ("[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]"):
        assert tok.convert_tokens_to_ids(t) < 5
    assert len(tok) == mlm.vocab_size
    assert mlm.mask_token_id == tok.mask_token_id


def test_logits_match_transformers(mlm):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForMaskedLM

    tok = mlm.tokenizer
    sentences = load_sentences("default")[:3] + load_sentences("default-news")[:3]
    enc = tok(sentences, padding=True, return_tensors="np")
    ids, attention = enc["input_ids"].copy(), enc["attention_mask"]
    lengths = attention.sum(1)
    # Two masked positions per sentence, as in a pair evaluation.
    positions = np.stack([np.array([1, n - 2]) for n in lengths]).astype(np.int32)
    np.put_along_axis(ids, positions, tok.mask_token_id, axis=1)

    hf = AutoModelForMaskedLM.from_pretrained(str(MODEL_DIR)).eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attention)).logits.numpy()
    ref = np.take_along_axis(ref, positions[:, :, None], axis=1)
    ours = np.asarray(mlm.logits_at(ids, positions, attention))
    assert ours.shape == ref.shape == (len(sentences), 2, mlm.vocab_size)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name, n", [("default", 60), ("default-news", 30)])
def test_heldout_accuracy_beats_unigram(mlm, name, n):
    from jaxjoint.tools.heldout import pseudo_likelihood
    from jaxjoint.tools.mlm_batches import SpecialIds, tokenize_lines

    # A fixed sample of about 650 tokens; the full-set numbers are in MODEL_CARD.md.
    sequences = tokenize_lines(mlm.tokenizer, load_sentences(name)[:n], mlm.config.max_positions)
    logp, correct, gold = pseudo_likelihood(mlm.module, mlm.params, sequences, SpecialIds.of(mlm.tokenizer))
    # A unigram model fitted to this very sample: stronger than any unigram
    # baseline estimated from training text, so beating it is conservative.
    counts = np.bincount(gold)
    oracle_unigram_accuracy = counts.max() / len(gold)
    freq = counts[gold] / len(gold)
    oracle_unigram_ppl = float(np.exp(-np.log(freq).mean()))
    accuracy, pppl = float(correct.mean()), float(np.exp(-logp.mean()))
    assert accuracy > 2 * oracle_unigram_accuracy and accuracy > 0.2, (accuracy, oracle_unigram_accuracy)
    assert pppl < oracle_unigram_ppl / 2, (pppl, oracle_unigram_ppl)


@pytest.mark.slow
@pytest.mark.usefixtures("optimised_compiles")
def test_converged_ag_has_lowest_kl_all_on_default_sentences(mlm):
    # AG's fixed point minimises J = sum of the 2V KLs, i.e. 2V * kl_all, over all
    # joints, so once converged no other construction can have a lower kl_all.
    from jaxjoint.data import make_pairs, max_tokens
    from jaxjoint.joints import METHODS, derive_joint
    from jaxjoint.metrics import pair_metrics
    from jaxjoint.tables import pair_tables

    # Three pairs, short and news sentences: a few seconds of forward passes each,
    # plus 330-550 AG iterations to 1e-5 (one is ~0.01 s at V = 4096 on CPU). At
    # 1e-4 the news pair is still far enough from the fixed point for MRF-L to win.
    sentences = load_sentences("default")[:2] + load_sentences("default-news")[:1]
    pairs, _ = make_pairs(sentences, mlm.tokenizer, masking="random", seed=0, max_length=max_tokens(mlm.config))
    assert len(pairs) == 3
    for pair in pairs:
        tables = pair_tables(mlm, pair.input_ids, pair.a, pair.b)
        kl_all = {}
        for method in METHODS:
            options = {"tol": 1e-5} if method == "ag" else {}
            joint = derive_joint(tables, method, **options)
            kl_all[method] = float(pair_metrics(tables, joint, pair.gold)["kl_all"])
            if method == "ag":
                assert float(joint.info["delta"]) < 1e-5
        others = {m: v for m, v in kl_all.items() if m != "ag"}
        assert kl_all["ag"] < min(others.values()), kl_all
