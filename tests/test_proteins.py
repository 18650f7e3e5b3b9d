"""Proteins as data (FASTA), ModernBERT and ESM through the whole pipeline, and
`jaxjoint pair` on a protein: against transformers' PyTorch models and float64 NumPy."""

import json
import math
import re
import subprocess

import numpy as np
import pytest
import transformers

from jaxjoint import UserError, load_mlm, scoring
from jaxjoint.cli import main
from jaxjoint.config import resolve_config
from jaxjoint.data import MaskedPair, choose_positions, fasta_records, load_sentences, make_pairs, sentence_rng
from jaxjoint.explain import explain_text, mutants
from jaxjoint.joints import METHODS, derive_joint
from jaxjoint.run import evaluate
from jaxjoint.tables import pair_tables
from tests.hf_fixtures import torch_logits, torch_model
from tests.modern_fixtures import (
    ESM_TOKENS,
    MODERNBERT_WORDS,
    make_esm_checkpoint,
    make_modernbert_checkpoint,
)
from tests.process_fixtures import CLI, REPO, WAIT_S, finish, jaxjoint_lines, process_env, start
from tests.record_reference import (
    KL_FLOAT32,
    assert_matches_reference,
    assert_summary_matches_references,
    reference_record,
)

ESM_SPECIALS = {ESM_TOKENS.index(t) for t in ("<cls>", "<pad>", "<eos>", "<unk>", "<mask>")}

# Wrapped at different widths, lower case, a description, blank lines, spaces and CRLF.
FASTA = (
    ">sp|P1|ONE first protein, wrapped\n"
    "MKTAYIAK\n"
    "QRQISF\n"
    "\n"
    ">P2 lower case\r\n"
    "mkvlaagiv\r\n"
    "\r\n"
    "gllla\r\n"
    ">P3 one residue: no pair\n"
    "M\n"
    ">P4   spaces inside a line\n"
    "  MAE HSK  \n"
    "WTLRS\n"
)
RECORDS = [("sp|P1|ONE", "MKTAYIAKQRQISF"), ("P2", "MKVLAAGIVGLLLA"), ("P3", "M"), ("P4", "MAEHSKWTLRS")]


@pytest.fixture(scope="module")
def esm_ckpt(tmp_path_factory):
    """ESM-2's layout, tiny. The head gain sharpens the conditionals to about 1 nat of
    entropy, a trained model's (as conftest's sharp_ckpt does for BERT), so the methods differ."""
    return make_esm_checkpoint(tmp_path_factory.mktemp("esm"), head_gain=8.0)


@pytest.fixture(scope="module")
def esm(esm_ckpt):
    return load_mlm(esm_ckpt)


@pytest.fixture(scope="module")
def fasta_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fasta") / "proteins.fasta"
    path.write_bytes(FASTA.encode())
    return path


# --- FASTA files ---------------------------------------------------------------------------


def test_fasta_records(fasta_file):
    records = load_sentences(str(fasta_file))
    assert [(r.id, r.sequence) for r in records] == RECORDS
    assert [r.header_line for r in records] == [1, 5, 9, 11]
    # Where each residue of P2 is in the file: "mkvlaagiv" on line 6, "gllla" on line 8.
    assert [records[1].line_of(i) for i in (0, 8, 9, 13)] == [6, 6, 8, 8]
    assert [(r.id, r.sequence) for r in load_sentences(str(fasta_file), limit=2)] == RECORDS[:2]


@pytest.mark.parametrize("suffix", [".fa", ".faa", ".fasta", ".FASTA"])
def test_fasta_suffixes(tmp_path, suffix):
    path = tmp_path / f"p{suffix}"
    path.write_bytes(b"\xef\xbb\xbf>a\nMK\n")  # a byte-order mark before the first header
    assert [(r.id, r.sequence) for r in load_sentences(str(path))] == [("a", "MK")]


@pytest.mark.parametrize("content,message", [
    (">a x\nMKT\n>b empty\n\n>c\nMK\n", r"bad.fasta:3: FASTA record 'b' has no sequence"),
    (">a\nMKT\n>last\n", r"bad.fasta:3: FASTA record 'last' has no sequence"),
    (">a\nMK\n>  \nMK\n", r"bad.fasta:3: FASTA header without an id"),
    ("MKT\n>a\nMK\n", r"bad.fasta:1: sequence before the first header"),
    ("\n\n", r"holds no FASTA records"),
])
def test_bad_fasta_files(tmp_path, content, message):
    path = tmp_path / "bad.fasta"
    path.write_text(content)
    with pytest.raises(UserError, match=message) as err:
        load_sentences(str(path))
    assert "\n" not in str(err.value)


def test_other_suffixes_name_fasta(tmp_path):
    with pytest.raises(UserError, match=r"\.txt, \.jsonl or FASTA \(\.fa, \.faa, \.fasta\)"):
        load_sentences(str(tmp_path / "missing.seq"))


@pytest.mark.parametrize("sequence,line,char", [
    ("MKTAY\nIAJKQ", 3, "J"),   # on the second wrapped line
    ("MKTAYIAK*", 2, "*"),      # a stop codon
    ("MKT<mask>AY", 2, "<"),   # no special tokens in a sequence
])
def test_a_character_outside_the_alphabet_is_one_line(esm, tmp_path, sequence, line, char):
    path = tmp_path / "p.fasta"
    path.write_text(f">sp|Q9 bad one\n{sequence}\n")
    with pytest.raises(UserError) as err:
        make_pairs(load_sentences(str(path)), esm.tokenizer, masking="random", seed=0, max_length=512)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: FASTA record 'sp|Q9': {char!r} is not in the model's alphabet")
    assert message.endswith("alphabet ABCDEFGHIKLMNOPQRSTUVWXYZ-.; remove or replace it "
                            "(X stands for an unknown residue)")


def test_fasta_needs_a_protein_tokenizer(fasta_file, sharp_ckpt):
    with pytest.raises(UserError, match="need a protein MLM whose tokenizer reads one residue a token"):
        make_pairs(load_sentences(str(fasta_file)), load_mlm(sharp_ckpt).tokenizer, masking="random", seed=0,
                   max_length=512)


# --- pairs of residues -----------------------------------------------------------------------


def test_fasta_pairs_keep_the_record_and_never_mask_a_special_token(esm, fasta_file):
    records = load_sentences(str(fasta_file))
    pairs, skipped = make_pairs(records, esm.tokenizer, masking="random", seed=0, max_length=512)
    assert [s.index for s in skipped] == [2] and [(p.index, p.id, p.text) for p in pairs] == [
        (i, rid, seq) for i, (rid, seq) in enumerate(RECORDS) if i != 2]
    for p in pairs:
        tokens = esm.tokenizer.convert_ids_to_tokens(list(p.input_ids))
        assert tokens == ["<cls>", *p.text, "<eos>"]
        assert p.gold == (p.input_ids[p.a], p.input_ids[p.b])
    # The special-token mask the protocol reads marks exactly ESM's specials.
    for p in pairs:
        encoded = esm.tokenizer(p.text, return_special_tokens_mask=True)
        special = [t in ESM_SPECIALS for t in encoded["input_ids"]]
        assert encoded["special_tokens_mask"] == special
    # Over many seeds, both maskings, and truncated to 8 tokens: residues only.
    for masking in ("random", "contiguous"):
        for seed in range(100):
            for p in make_pairs(records, esm.tokenizer, masking=masking, seed=seed, max_length=8)[0]:
                assert len(p.input_ids) <= 8 and p.input_ids[-1] == ESM_TOKENS.index("<eos>")
                assert not {p.input_ids[p.a], p.input_ids[p.b]} & ESM_SPECIALS
                assert 1 <= min(p.a, p.b) and max(p.a, p.b) <= len(p.input_ids) - 2


def test_positions_come_from_the_same_protocol_as_text(esm, tmp_path):
    path = tmp_path / "one.fa"
    path.write_text(">x\nMKTAYIAK\n")
    (pair,), _ = make_pairs(fasta_records(path), esm.tokenizer, masking="random", seed=3, max_length=512)
    encoded = esm.tokenizer("MKTAYIAK", return_special_tokens_mask=True)
    assert (pair.a, pair.b) == choose_positions(encoded["special_tokens_mask"], "random", sentence_rng(3, 0))


def test_the_record_id_is_kept_only_for_fasta():
    metrics, unary = {"mlm": {"p_nll": 1.0}}, 2.0
    text = scoring.pair_record(MaskedPair(3, "a b", (1, 5, 6, 2), 1, 2), metrics, unary)
    assert list(text) == ["index", "text", "input_ids", "positions", "gold", "metrics", "mlm_unary_u_nll"]
    protein = scoring.pair_record(MaskedPair(3, "MK", (0, 20, 15, 2), 1, 2, id="sp|P1"), metrics, unary)
    assert list(protein) == ["index", "id", *list(text)[1:]] and protein["id"] == "sp|P1"
    assert {k: v for k, v in protein.items() if k != "id"} == text | {"text": "MK", "input_ids": [0, 20, 15, 2],
                                                                      "gold": [20, 15]}


# --- evaluate, against float64 ---------------------------------------------------------------------


def check_run(out, directory, summary, methods=METHODS):
    """Every record and summary number of a run against the float64 PyTorch reference,
    to 1e-4, small KLs to float32's measured resolution (``KL_FLOAT32``: test_evaluate's
    2e-7 is exceeded here, 2.2e-7 for AG's kl_gold on one ESM pair); returns the records."""
    reference = torch_model(directory).double()
    mask_id = load_mlm(directory).mask_token_id
    records = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    refs = [reference_record(reference, r, mask_id) for r in records]
    for record, ref in zip(records, refs):
        assert_matches_reference(record, ref, methods, kl_floor=KL_FLOAT32, floor_objective=True)
    assert_summary_matches_references(summary, refs, methods)
    return records


@pytest.fixture(scope="module")
def esm_run(esm_ckpt, fasta_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("esm_run") / "run"
    config = resolve_config({"model": str(esm_ckpt), "data": str(fasta_file), "out": str(out), "devices": 1})
    return out, evaluate(config, quiet=True)


def test_esm_evaluate_from_fasta_matches_float64(esm_run, esm_ckpt):
    out, summary = esm_run
    records = check_run(out, esm_ckpt, summary)
    assert [(r["index"], r["id"], r["text"]) for r in records] == [
        (i, rid, seq) for i, (rid, seq) in enumerate(RECORDS) if i != 2]
    assert summary["n_pairs"] == 3 and summary["n_skipped"] == 1 and summary["unit"] == "sequence"
    assert "1 sequence skipped (2: " in (out / "summary.md").read_text()


@pytest.mark.slow
def test_esm_fasta_run_resumes(esm_run, esm_ckpt, fasta_file, tmp_path):
    """A run cut after two records resumes to the same lines (ids included)."""
    out = tmp_path / "run"
    values = {"model": str(esm_ckpt), "data": str(fasta_file), "out": str(out), "devices": 1}
    evaluate(resolve_config({**values, "max_sentences": 2}), quiet=True)
    evaluate(resolve_config(values), quiet=True)
    assert (out / "pairs.jsonl").read_text() == (esm_run[0] / "pairs.jsonl").read_text()


# ModernBERT's tiny checkpoint attends locally within 4 tokens either side in layers 1
# and 2: sentences of 12 to 18 words overrun that window.
LONG_SENTENCES = [
    "the cat sat on the mat and the dog ran to the park after the storm",
    "a river rose after the storm and the cat ran to a park",
    "the dog sat on a mat and a cat sat on the mat after the storm and ran",
]


@pytest.mark.slow
def test_modernbert_evaluate_with_sentences_longer_than_the_window(tmp_path):
    directory = make_modernbert_checkpoint(tmp_path / "mb", head_gain=8.0)  # about 1 nat, as esm_ckpt
    assert set(" ".join(LONG_SENTENCES).split()) <= set(MODERNBERT_WORDS)
    data = tmp_path / "long.txt"
    data.write_text("\n".join(LONG_SENTENCES) + "\n")
    out = tmp_path / "run"
    config = resolve_config({"model": str(directory), "data": str(data), "out": str(out), "devices": 1})
    summary = evaluate(config, quiet=True)
    records = check_run(out, directory, summary)
    window = load_mlm(directory).config.local_window
    assert all(len(r["input_ids"]) > 2 * window + 1 for r in records) and "id" not in records[0]


# --- jaxjoint pair on a protein ----------------------------------------------------------------

# Sixteen tokens, as the FASTA records above: the programs esm_run compiled serve here too.
SEQUENCE = "MKTAYIAKQRQISF"


def test_mutants_read_the_dense_joint(esm):
    ids = np.array(esm.tokenizer(SEQUENCE)["input_ids"])
    a, b = 5, 12
    tables = pair_tables(esm, ids, a, b)
    residues = esm.tokenizer.convert_tokens_to_ids(list("ACDEFGHIKLMNPQRSTVWY"))
    for method in METHODS:
        joint = derive_joint(tables, method)
        p = np.exp(np.asarray(joint.to_dense(), np.float64))
        a0, b0 = ids[a], ids[b]
        top, mass = mutants(joint, residues, (a0, b0), 7)
        # By hand: every double mutant over the 20 amino acids, ranked.
        cells = sorted(((p[x, y], x, y) for x in residues for y in residues if x != a0 and y != b0), reverse=True)
        assert [(x, y) for _, x, y in cells[:7]] == [(x, y) for x, y, _ in top]
        np.testing.assert_allclose([q for q, *_ in cells[:7]], [q for *_, q in top], rtol=1e-12)
        single = sum(p[x, b0] for x in residues if x != a0) + sum(p[a0, y] for y in residues if y != b0)
        double = sum(q for q, *_ in cells)
        assert math.isclose(mass["wild_type"], p[a0, b0], rel_tol=1e-12)
        assert math.isclose(mass["single"], single, rel_tol=1e-9)
        assert math.isclose(mass["double"], double, rel_tol=1e-9)
        assert math.isclose(sum(mass.values()), 1.0, rel_tol=1e-5)
        # Masked input: no wild type, every pair of amino acids.
        top, mass = mutants(joint, residues, None, 3)
        assert mass is None and top[0][2] == max(p[x, y] for x in residues for y in residues)


def test_pair_on_a_protein_prints_double_mutants(esm_ckpt, esm, capsys):
    args = ["--model", str(esm_ckpt), "--devices", "1", "--top-k", "4"]
    # Residue numbers, from 1: lower case and spaces as in a pasted sequence.
    assert main(["pair", "mktayiak qrqisf", "--positions", "5", "12", *args]) == 0
    out = capsys.readouterr().out
    assert f"protein: {SEQUENCE}\n14 residues (residue r is token r)\nA = 5 (wild type Y), B = 12 (wild type I)" in out
    result = explain_text(esm, SEQUENCE, (5, 12), methods=METHODS, top_k=4, mesh=None)
    assert result["gold"] == (esm.tokenizer.convert_tokens_to_ids("Y"), esm.tokenizer.convert_tokens_to_ids("I"))
    name = esm.tokenizer.convert_ids_to_tokens
    for method, top in result["top"].items():
        assert len(top) == 4
        for x, y, p in top:
            assert x != result["gold"][0] and y != result["gold"][1]
            assert f"Y5{name(x)} I12{name(y)}  {p:.3g}" in out
        row = re.search(rf"\n{re.escape(dict(zip(METHODS, ('MLM', 'MRF', 'MRF-L', 'HCB', 'AG')))[method])} +"
                        r"(\S+) +(\S+) +(\S+) +(\S+)\n", out.split("where each joint puts its mass")[1])
        assert [float(v) for v in row.groups()] == pytest.approx(
            [result["mass"][method][k] for k in ("wild_type", "single", "double", "other")], rel=5e-3, abs=1e-12)
    assert "wild type Y5 I12" in out and "kl_all" in out and "MLM conditionals" in out


def test_pair_on_a_masked_protein(esm_ckpt, capsys):
    assert main(["pair", "MKTAY<mask>AKQRQ<mask>SF", "--model", str(esm_ckpt), "--devices", "1",
                 "--top-k", "2", "--methods", "mrf"]) == 0
    out = capsys.readouterr().out
    assert "A = 6, B = 12 (masked: no wild type)" in out and "kl_all" not in out
    assert re.search(r"\n1 +6[A-Z] 12[A-Z]  ", out)


@pytest.mark.parametrize("args,message", [
    (["MKTAY", "--positions", "0", "2"], r"residue 0 is outside the protein's residues 1\.\.5"),
    (["MKTAY", "--positions", "2", "6"], r"residue 6 is outside the protein's residues 1\.\.5"),
    (["MKTAY", "--positions", "2", "2"], "must differ"),
    (["MKTJY", "--positions", "1", "2"], r"TEXT, residue 4: 'J' is not in the model's alphabet"),
    (["MKTAY"], r"TEXT has 0 <mask> tokens; write exactly two, or give --positions I J \(residue numbers"),
])
def test_pair_errors_on_a_protein(esm_ckpt, capsys, args, message):
    assert main(["pair", *args, "--model", str(esm_ckpt), "--devices", "1"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1


# --- several processes ------------------------------------------------------------------------------


@pytest.mark.slow
def test_pairs_mode_on_esm_writes_what_one_process_writes(esm_ckpt, fasta_file, tmp_path):
    env = process_env(tmp_path / "jax_cache")
    setup = (esm_ckpt, fasta_file, env)
    single = tmp_path / "single"
    args = ["evaluate", "--model", str(esm_ckpt), "--data", str(fasta_file), "--ag-iters", "5", "--quiet"]
    proc = subprocess.run([*CLI, *args, "--out", str(single), "--devices", "2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "two"
    for code, stderr in finish(start(setup, out, "pairs")):
        assert code == 0 and not jaxjoint_lines(stderr), stderr
    assert (out / "pairs.jsonl").read_text() == (single / "pairs.jsonl").read_text()
    assert [json.loads(line)["id"] for line in (out / "pairs.jsonl").read_text().splitlines()] == [
        "sp|P1|ONE", "P2", "P4"]


# --- benchmark shapes and the checkpoint writer ------------------------------------------------------


@pytest.mark.parametrize("make", [make_modernbert_checkpoint, make_esm_checkpoint])
def test_save_checkpoint_writes_what_transformers_reads(tmp_path, make):
    """ModernBERT (layer 0 has no attention norm, layers local and global) and ESM
    (rotary, token dropout) written by save_checkpoint: transformers' PyTorch model
    loads the copy and gives the logits the original gives."""
    from jaxjoint.models.checkpoint import save_checkpoint

    original = make(tmp_path / "original", layers=3)
    mlm = load_mlm(original)
    save_checkpoint(tmp_path / "copy", mlm.config, mlm.params)
    assert load_mlm(tmp_path / "copy").config == mlm.config
    copy, reference = torch_model(tmp_path / "copy"), torch_model(original)
    ids = np.array([mlm.tokenizer(" ".join(MODERNBERT_WORDS[:12]) if mlm.config.family == "modernbert"
                                  else "MKTAYIAKQRQISF")["input_ids"]])
    ids[0, 3] = mlm.mask_token_id
    want = torch_logits(reference, ids)
    np.testing.assert_array_equal(torch_logits(copy, ids), want)


@pytest.mark.slow
def test_benchmark_shapes_include_the_hub_configs(tmp_path):
    """Every shipped hub config is a benchmark shape; the end-to-end benchmark's
    checkpoint of ESM-2 8M (real size, random weights) runs in jaxjoint as in PyTorch."""
    from benchmarks.common import SHAPES, model_shape
    from benchmarks.end_to_end import checkpoint, sentence
    from jaxjoint.models.config import HUB_CONFIG_DIR

    assert {p.stem.split("--")[1] for p in HUB_CONFIG_DIR.glob("*--*.json")} <= set(SHAPES)
    assert model_shape("ModernBERT-base").num_layers == 22 and model_shape("esm2_t33_650M_UR50D").hidden_size == 1280
    directory = checkpoint("esm2_t6_8M_UR50D", None, tmp_path / "esm")
    mlm = load_mlm(directory)
    ids = sentence(mlm.config, 24)
    assert ids[0] == 0 and ids[-1] == 2 and set(ids[1:-1]) <= set(range(4, 24))
    ids[5] = mlm.mask_token_id
    reference = transformers.AutoModelForMaskedLM.from_pretrained(directory, attn_implementation="eager").eval()
    want = torch_logits(reference, ids[None])[0, [5, 9]]
    got = np.asarray(mlm.logits_at(ids[None], np.array([[5, 9]])))[0]
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) < 1e-4
