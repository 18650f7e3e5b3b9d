"""The Flax ModernBERT and ESM against transformers' PyTorch implementations,
their loading rules, configs and errors."""

import json

import jax
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

from jaxjoint import UserError, load_mlm
from jaxjoint.models.config import (
    HUB_CONFIG_DIR,
    EsmEncoderConfig,
    ModernBertEncoderConfig,
    encoder_config_from_hf,
)
from jaxjoint.models.families import init_params
from tests.hf_fixtures import torch_logits, torch_model
from tests.modern_fixtures import (
    ESM_AMINO_ACIDS,
    ESM_TOKENS,
    MODERNBERT_SPECIALS,
    esm_config,
    make_esm_checkpoint,
    make_modernbert_checkpoint,
    modernbert_config,
    padded_batch,
)

VARIANTS = {
    # Three layers, a global one then two local ones with windows of 4 either side
    # (local_attention 8): sentences of 21 and 40 tokens overrun the window, and
    # the last layer, trimmed to the read rows, is local.
    "modernbert": (make_modernbert_checkpoint, {}),
    # Every bias switch flipped, an untied decoder, other activations, local_attention 6
    # (windows of 3) and global_every 2: layers global, local, global.
    "modernbert-biases": (make_modernbert_checkpoint, dict(
        norm_bias=True, attention_bias=True, mlp_bias=True, classifier_bias=True, decoder_bias=False,
        tie_word_embeddings=False, global_every=2, local_attention=6,
        hidden_activation="gelu_pytorch_tanh", classifier_activation="silu")),
    # ESM-2: rotary positions, token dropout, final LayerNorm, tied decoder.
    "esm2": (make_esm_checkpoint, {}),
    # ESM-1b's layout: learned padding-aware positions, a LayerNorm before the first
    # layer; here also without token dropout and with an untied decoder.
    "esm-absolute": (make_esm_checkpoint, dict(
        position_embedding_type="absolute", emb_layer_norm_before=True, token_dropout=False,
        tie_word_embeddings=False)),
}


# The two switch-flipping variants run in the full suite only (each costs a checkpoint
# and a few compiles); the default configurations of both families always run.
SLOW_VARIANTS = {"modernbert-biases", "esm-absolute"}


@pytest.fixture(scope="module", params=[
    pytest.param(name, marks=pytest.mark.slow) if name in SLOW_VARIANTS else name for name in VARIANTS])
def variant(request, tmp_path_factory):
    make, options = VARIANTS[request.param]
    directory = make(tmp_path_factory.mktemp(request.param), **options)
    return request.param, directory, load_mlm(directory), torch_model(directory)


def sentences(mlm, rng, b, length, min_len):
    """A padded batch with [MASK] at 0, 1 or 2 of each row's two read positions, so ESM's
    token-dropout ratio differs between rows. Returns ids, mask int[B, L], positions int[B, 2]."""
    c = mlm.config
    if c.family == "esm":
        tokens, first = ESM_AMINO_ACIDS, ESM_TOKENS.index("<cls>")
    else:
        tokens, first = range(c.vocab_size - len(MODERNBERT_SPECIALS)), mlm.tokenizer.cls_token_id
    ids, mask, lengths = padded_batch(rng, b, length, tokens=tokens, pad=c.pad_token_id, first=first,
                                      min_len=min_len)
    positions = np.stack([rng.choice(np.arange(1, n), size=2, replace=False) for n in lengths])
    for row in range(b):
        ids[row, positions[row, : row % 3]] = mlm.mask_token_id
    return ids, mask, positions


def rel_err(x, ref):
    return np.max(np.abs(x - ref)) / np.max(np.abs(ref))


@pytest.mark.parametrize("b, length, read", [
    (1, 6, 1),  # int[B] positions: K = 1, logits float32[B, V]
    pytest.param(3, 21, 2, marks=pytest.mark.slow),
    (4, 40, 2),  # padded rows, sentences ten times ModernBERT's window
])
def test_logits_match_pytorch(variant, b, length, read):
    _, _, mlm, reference = variant
    rng = np.random.default_rng(length)
    ids, mask, positions = sentences(mlm, rng, b, length, min_len=4)
    ref = np.take_along_axis(torch_logits(reference, ids, mask), positions[:, :, None], axis=1)
    if read == 1:
        positions, ref = positions[:, 1], ref[:, 1]
    got = np.asarray(mlm.logits_at(ids, positions, attention_mask=mask))
    assert got.shape == (*positions.shape, mlm.vocab_size) and got.dtype == np.float32
    assert rel_err(got, ref) < 1e-4


@pytest.mark.slow
def test_sdpa_attention_gives_the_same_logits(variant):
    """transformers' default attention (SDPA, boolean masks) against ours, on the
    longest padded batch: the eager reference is not the only one we match."""
    _, directory, mlm, _ = variant
    sdpa = transformers.AutoModelForMaskedLM.from_pretrained(directory, attn_implementation="sdpa").eval()
    ids, mask, positions = sentences(mlm, np.random.default_rng(40), 4, 40, min_len=4)
    ref = np.take_along_axis(torch_logits(sdpa, ids, mask), positions[:, :, None], axis=1)
    assert rel_err(np.asarray(mlm.logits_at(ids, positions, mask)), ref) < 1e-4


def test_bfloat16_error_is_bounded(variant):
    _, _, mlm, _ = variant
    # test_logits_match_pytorch's largest batch shape: the float32 program is compiled already.
    ids, mask, positions = sentences(mlm, np.random.default_rng(1), 4, 40, min_len=10)
    f32 = np.asarray(mlm.logits_at(ids, positions, mask))
    bf16 = np.asarray(mlm.with_dtype("bfloat16").logits_at(ids, positions, mask))
    assert bf16.dtype == np.float32 and np.isfinite(bf16).all()
    err = rel_err(bf16, f32)
    # bf16 rounds each product to 2^-9 ~ 2e-3 relative; through 2-3 layers the logits
    # must stay within a few percent, and must differ.
    assert 1e-5 < err < 3e-2, err


def test_random_params_have_the_loaded_tree(variant):
    """init_params (random weights; jax.eval_shape of it for abstract parameters)
    builds exactly the tree a checkpoint loads into: same paths, same shapes."""
    _, _, mlm, _ = variant
    abstract = jax.eval_shape(lambda: init_params(mlm.config, jax.random.PRNGKey(0)))
    shapes = lambda tree: jax.tree_util.tree_map(np.shape, tree)  # noqa: E731
    assert shapes(abstract) == shapes(mlm.params)


def test_load_properties(variant):
    name, _, mlm, _ = variant
    if name.startswith("modernbert"):
        assert isinstance(mlm.config, ModernBertEncoderConfig)
        assert (mlm.vocab_size, mlm.mask_token_id, mlm.config.pad_token_id) == (60, 59, 58)
        local = (False, True, True) if name == "modernbert" else (False, True, False)
        assert mlm.config.local_layers == local
        assert mlm.config.local_window == (4 if name == "modernbert" else 3)
        assert (mlm.config.global_rope_theta, mlm.config.local_rope_theta) == (160_000.0, 10_000.0)
        encoded = mlm.tokenizer("the cat sat")["input_ids"]
        assert mlm.tokenizer.convert_ids_to_tokens(encoded) == ["[CLS]", "the", "cat", "sat", "[SEP]"]
    else:
        assert isinstance(mlm.config, EsmEncoderConfig)
        assert (mlm.vocab_size, mlm.mask_token_id, mlm.config.pad_token_id) == (33, 32, 1)
        assert mlm.config.rotary == (name == "esm2")
        assert type(mlm.tokenizer).__name__ == "EsmTokenizer"
        encoded = mlm.tokenizer("MKTAY")["input_ids"]
        assert mlm.tokenizer.convert_ids_to_tokens(encoded) == ["<cls>", "M", "K", "T", "A", "Y", "<eos>"]
        assert mlm.tokenizer.convert_ids_to_tokens(32) == "<mask>"


# --- ESM's stored rotary frequencies ---------------------------------------------------

STAR = "esm.encoder.layer.*.attention.self.rotary_embeddings.inv_freq"


@pytest.mark.parametrize("layout", ["transformers 5 (layer.*)", "per layer (hub)", "one buffer", "absent"])
def test_esm_rotary_frequencies_are_read_as_transformers_reads_them(tmp_path, layout):
    """A checkpoint's stored frequencies win over rope_theta (transformers keeps them,
    they may have been saved in half precision); absent, they come from rope_theta.
    The stored ones are scaled by 1.05 here so the two cannot be confused."""
    directory = make_esm_checkpoint(tmp_path / "esm", layers=2)
    tensors = load_file(str(directory / "model.safetensors"))
    scaled = tensors.pop("esm.rotary_embeddings.inv_freq") * np.float32(1.05)  # as save_checkpoint stores them
    if layout == "transformers 5 (layer.*)":
        tensors[STAR] = scaled
    elif layout == "per layer (hub)":
        for i in range(2):
            tensors[f"esm.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq"] = scaled
    elif layout == "one buffer":
        tensors["esm.rotary_embeddings.inv_freq"] = scaled
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    reference = torch_model(directory)
    mlm = load_mlm(directory)
    np.testing.assert_array_equal(np.asarray(mlm.params["rotary_inv_freq"]),
                                  reference.esm.rotary_embeddings.inv_freq.numpy())
    if layout == "per layer (hub)":
        ids, mask, positions = sentences(mlm, np.random.default_rng(3), 3, 21, min_len=8)
        ref = np.take_along_axis(torch_logits(reference, ids, mask), positions[:, :, None], axis=1)
        assert rel_err(np.asarray(mlm.logits_at(ids, positions, mask)), ref) < 1e-4


# --- configs ------------------------------------------------------------------------

# Parameter counts as published: ModernBERT's paper (149 M, 395 M); ESM-2's names; the
# BERT (110 M, 340 M, uncased vocabulary), RoBERTa (125 M, 355 M) and DistilBERT (66 M)
# papers; XLM-R's hub pages (279 M, 561 M; its paper rounds to 270 M and 550 M).
# Counted here: the MLM (no pooler), decoder tied.
PUBLISHED_SIZES = {
    "google-bert--bert-base-cased": (110e6, 0.03),
    "google-bert--bert-large-cased": (340e6, 0.03),
    "FacebookAI--roberta-base": (125e6, 0.01),
    "FacebookAI--roberta-large": (355e6, 0.01),
    "FacebookAI--xlm-roberta-base": (279e6, 0.01),
    "FacebookAI--xlm-roberta-large": (561e6, 0.01),
    "distilbert--distilbert-base-cased": (66e6, 0.02),
    "distilbert--distilbert-base-uncased": (66e6, 0.02),
    "answerdotai--ModernBERT-base": (149e6, 0.01),
    "answerdotai--ModernBERT-large": (395e6, 0.01),
    "facebook--esm2_t6_8M_UR50D": (8e6, 0.07),
    "facebook--esm2_t12_35M_UR50D": (35e6, 0.05),
    "facebook--esm2_t30_150M_UR50D": (150e6, 0.02),
    "facebook--esm2_t33_650M_UR50D": (650e6, 0.01),
    "facebook--esm2_t36_3B_UR50D": (3e9, 0.06),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_SIZES))
def test_hub_configs_load_and_have_the_published_size(name):
    config = encoder_config_from_hf(json.loads((HUB_CONFIG_DIR / f"{name}.json").read_text()))
    tree = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree))
    size, tolerance = PUBLISHED_SIZES[name]
    assert abs(count / size - 1) < tolerance, count
    if config.family == "modernbert":
        assert config.local_layers[:4] == (False, True, True, False) and config.local_window == 64
        assert (config.vocab_size, config.max_positions, config.pad_token_id) == (50368, 8192, 50283)
    elif config.family == "esm":
        assert config.rotary and config.token_dropout and config.mask_token_id == 32
        assert (config.vocab_size, config.max_positions, config.pad_token_id) == (33, 1026, 1)


def test_hub_config_files_are_the_listed_ones():
    assert sorted(p.stem for p in HUB_CONFIG_DIR.glob("*.json")) == sorted(PUBLISHED_SIZES)


def test_transformers_5_and_hub_spellings_of_modernbert_agree():
    """transformers 5 writes layer_types and rope_parameters; hub configs carry
    global_attn_every_n_layers and global/local_rope_theta. Both read the same."""
    saved = modernbert_config(global_every=2, layers=5).to_dict()
    assert "layer_types" in saved and "rope_parameters" in saved
    hub = {k: v for k, v in saved.items() if k not in ("layer_types", "rope_parameters")}
    hub.update(global_attn_every_n_layers=2, global_rope_theta=160000.0, local_rope_theta=10000.0)
    assert encoder_config_from_hf(saved) == encoder_config_from_hf(hub)
    assert encoder_config_from_hf(hub).local_layers == (False, True, False, True, False)


@pytest.mark.parametrize("family, change, message", [
    ("modernbert", dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0},
                                         "sliding_attention": {"rope_type": "default"}}),
     "rotary scaling 'linear' is not supported"),
    ("modernbert", dict(hidden_size=30, num_attention_heads=6), "even attention head size"),
    ("modernbert", dict(hidden_activation="gelu_10"), "hidden_activation 'gelu_10' is not supported"),
    ("modernbert", dict(layer_types=["full_attention"] * 2), "layer_types lists 2 layers"),
    ("modernbert", dict(pad_token_id=60), "pad_token_id 60 is outside the vocabulary"),
    ("esm", dict(is_folding_model=True), "ESMFold"),
    ("esm", dict(is_decoder=True), "is_decoder=true"),
    ("esm", dict(position_embedding_type="relative_key"), "position_embedding_type 'relative_key'"),
    ("esm", dict(mask_token_id=None), "token_dropout=true but no mask_token_id"),
])
def test_configs_jaxjoint_cannot_run_are_one_line_errors(family, change, message):
    hf = (modernbert_config() if family == "modernbert" else esm_config()).to_dict()
    hf.update(change)
    with pytest.raises(UserError, match=message) as error:
        encoder_config_from_hf(hf)
    assert "\n" not in str(error.value)


def test_unsupported_model_type_lists_every_family():
    with pytest.raises(UserError) as error:
        encoder_config_from_hf({"model_type": "deberta-v2"})
    assert str(error.value) == ("unsupported model_type 'deberta-v2' in config.json; "
                                "jaxjoint supports bert, roberta, xlm-roberta, distilbert, electra, modernbert, esm")


@pytest.mark.parametrize("make, tensor", [
    (make_modernbert_checkpoint,
     r"model\.layers\.0\.mlp\.Wi\.weight has shape \[96, 32\], but config.json implies \[80, 32\]"),
    (make_esm_checkpoint,
     r"esm\.encoder\.layer\.0\.intermediate\.dense\.weight has shape \[48, 32\], but config.json implies \[40, 32\]"),
], ids=["modernbert", "esm"])
def test_config_that_does_not_match_the_weights(tmp_path, make, tensor):
    directory = make(tmp_path / "m", layers=2)
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 40
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=tensor + "; the config does not match the weights") as error:
        load_mlm(directory)
    assert "\n" not in str(error.value)


def test_a_bias_the_config_promises_but_the_checkpoint_lacks(tmp_path):
    directory = make_modernbert_checkpoint(tmp_path / "m", layers=2)
    config = json.loads((directory / "config.json").read_text())
    config["mlp_bias"] = True
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"^checkpoint lacks the tensor model\.layers\.0\.mlp\.Wi\.bias$"):
        load_mlm(directory)


# --- through the tables stage ------------------------------------------------------------

def substitution_reference(reference, ids, a, b, mask_id):
    """The four conditional tables of DESIGN.md §1 from the PyTorch model, float64:
    logits_a[x, y], logits_b[x, y] (x at A, y at B), both-masked logits at A and at B."""
    vocab = reference.config.vocab_size
    def logits_at(position, fixed, substituted):
        batch = np.tile(ids, (vocab, 1))
        batch[:, fixed] = mask_id
        batch[:, substituted] = np.arange(vocab)
        return torch_logits(reference, batch)[:, fixed].astype(np.float64)  # [substituted value, V]
    both = ids.copy()
    both[[a, b]] = mask_id
    both_logits = torch_logits(reference, both[None])[0].astype(np.float64)
    return logits_at(a, a, b).T, logits_at(b, b, a), both_logits[a], both_logits[b]


@pytest.mark.slow
@pytest.mark.parametrize("make", [make_esm_checkpoint, make_modernbert_checkpoint])
def test_pair_tables_match_pytorch(tmp_path, make):
    """The tables stage runs these families unchanged: it pads the sentence to its
    length bucket with pad_token_id and a zero attention mask (ESM's token-dropout
    ratio must ignore that padding, ModernBERT's window must not see it)."""
    from jaxjoint import pair_tables

    directory = make(tmp_path / "m", layers=2)
    mlm, reference = load_mlm(directory), torch_model(directory)
    ids, _, _ = sentences(mlm, np.random.default_rng(5), 1, 13, min_len=13)
    ids = ids[0]
    ids[-1] = mlm.tokenizer.eos_token_id if mlm.config.family == "esm" else mlm.tokenizer.sep_token_id
    a, b = 3, 9
    tables = pair_tables(mlm, ids, a, b)
    expected = substitution_reference(reference, ids, a, b, mlm.mask_token_id)
    got = (tables.logits_a, tables.logits_b, tables.both_masked_a, tables.both_masked_b)
    vocab = mlm.vocab_size
    for table, ref in zip(got, expected):
        assert rel_err(np.asarray(table)[:vocab], ref) < 1e-4
