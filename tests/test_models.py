"""The Flax MLM against the transformers PyTorch implementation, and checkpoint errors."""

import json

import numpy as np
import pytest

from jaxjoint import UserError, load_mlm
from jaxjoint.models.checkpoint import save_checkpoint
from tests.hf_fixtures import make_checkpoint, torch_logits, torch_model

FAMILIES = ["bert", "roberta", "xlm-roberta", "distilbert", "electra"]


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp(request.param), request.param)


def batch(rng, vocab, b, length, min_len):
    """Padded batch: ids int[B, L] (pad 0) and mask int[B, L] with lengths in [min_len, L]."""
    lengths = rng.integers(min_len, length + 1, size=b)
    lengths[0] = length
    ids = rng.integers(5, vocab, size=(b, length))
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask > 0, ids, 0)
    ids[:, 0] = 2  # [CLS]
    return ids, mask, lengths


def rel_err(x, ref):
    return np.max(np.abs(x - ref)) / np.max(np.abs(ref))


@pytest.mark.parametrize("b,length", [(1, 5), (3, 17), pytest.param(4, 40, marks=pytest.mark.slow)])
def test_logits_match_pytorch(checkpoint, b, length):
    mlm = load_mlm(checkpoint)
    ref_model = torch_model(checkpoint)
    rng = np.random.default_rng(length)
    ids, mask, lengths = batch(rng, mlm.vocab_size, b, length, min_len=3)
    positions = np.stack([rng.integers(0, n, size=3) for n in lengths])  # int[B, 3], real tokens only
    ref = torch_logits(ref_model, ids, mask)
    ref_at = np.take_along_axis(ref, positions[:, :, None], axis=1)

    got = np.asarray(mlm.logits_at(ids, positions, attention_mask=mask))
    assert got.shape == (b, 3, mlm.vocab_size) and got.dtype == np.float32
    assert rel_err(got, ref_at) < 1e-4
    # int[B] positions give float32[B, V]
    one = np.asarray(mlm.logits_at(ids, positions[:, 0], attention_mask=mask))
    np.testing.assert_allclose(one, got[:, 0], rtol=1e-5, atol=1e-6)


def test_bfloat16_error_is_bounded(checkpoint):
    mlm = load_mlm(checkpoint)
    rng = np.random.default_rng(1)
    ids, mask, lengths = batch(rng, mlm.vocab_size, 4, 24, min_len=10)
    positions = np.stack([rng.integers(0, n, size=4) for n in lengths])
    f32 = np.asarray(mlm.logits_at(ids, positions, mask))
    bf16 = np.asarray(mlm.with_dtype("bfloat16").logits_at(ids, positions, mask))
    assert bf16.dtype == np.float32 and np.isfinite(bf16).all()
    err = rel_err(bf16, f32)
    # bf16 has an 8-bit mantissa (relative rounding 2^-9 ~ 2e-3) per operation;
    # through 2 layers the logits must stay within a few percent, and must differ.
    assert 1e-5 < err < 3e-2, err


def test_load_properties(checkpoint):
    mlm = load_mlm(checkpoint)
    assert mlm.vocab_size == 53
    assert mlm.mask_token_id == 4
    # Each family's own special tokens (RoBERTa and XLM-R: <s> </s> <pad> <mask> <unk>).
    roberta = mlm.config.family == "roberta"
    assert mlm.tokenizer.convert_ids_to_tokens(4) == ("<mask>" if roberta else "[MASK]")
    assert mlm.tokenizer("the cat")["input_ids"] == [2, 5, 7, 3]  # cls, the, cat, sep


def test_save_checkpoint_round_trips_through_transformers(tmp_path):
    source = make_checkpoint(tmp_path / "src", "bert", seed=3)
    mlm = load_mlm(source)
    save_checkpoint(tmp_path / "copy", mlm.config, mlm.params)
    ids = np.array([[2, 7, 4, 9, 11, 3]])
    ref = torch_logits(torch_model(tmp_path / "copy"), ids)[:, 2]
    np.testing.assert_allclose(np.asarray(mlm.logits_at(ids, np.array([2]))), ref, rtol=1e-4, atol=1e-4)


def test_sharded_safetensors(tmp_path):
    source = make_checkpoint(tmp_path / "src", "bert")
    ref_model = torch_model(source)
    ref_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    mlm = load_mlm(tmp_path / "sharded")
    ids = np.array([[2, 9, 4, 12, 3]])
    np.testing.assert_allclose(
        np.asarray(mlm.logits_at(ids, np.array([2]))), torch_logits(ref_model, ids)[:, 2], rtol=1e-4, atol=1e-4)


def test_gamma_beta_layernorm_names(tmp_path):
    """Old BERT checkpoints name LayerNorm parameters gamma/beta."""
    from safetensors.numpy import load_file, save_file

    source = make_checkpoint(tmp_path / "src", "bert")
    tensors = load_file(str(source / "model.safetensors"))
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in tensors.items()}
    save_file(renamed, str(source / "model.safetensors"), metadata={"format": "pt"})
    ids = np.array([[2, 9, 4, 12, 3]])
    got = np.asarray(load_mlm(source).logits_at(ids, np.array([2])))
    ref = torch_logits(torch_model(tmp_path / "src"), ids)[:, 2]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


# --- errors a user can cause -------------------------------------------------

def test_truncated_safetensors(tmp_path):
    source = make_checkpoint(tmp_path / "m", "bert")
    data = (source / "model.safetensors").read_bytes()
    (source / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_mlm(source)


def test_garbage_safetensors(tmp_path):
    source = make_checkpoint(tmp_path / "m", "bert")
    (source / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_mlm(source)


def test_missing_config(tmp_path):
    source = make_checkpoint(tmp_path / "m", "bert")
    (source / "config.json").unlink()
    with pytest.raises(UserError, match="no config.json"):
        load_mlm(source)


def test_unsupported_model_type(tmp_path):
    source = make_checkpoint(tmp_path / "m", "bert")
    config = json.loads((source / "config.json").read_text())
    config["model_type"] = "gpt2"
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="unsupported model_type 'gpt2'"):
        load_mlm(source)


@pytest.mark.parametrize("key, value, tensor", [
    ("vocab_size", 60, r"tensor bert.embeddings.word_embeddings.weight has shape \[\d+, 32\], "
                       r"but config.json implies \[60, 32\]"),
    ("intermediate_size", 40, r"tensor bert.encoder.layer.0.intermediate.dense.weight has shape \[\d+, 32\], "
                              r"but config.json implies \[40, 32\]"),
])
def test_config_that_does_not_match_the_weights(tmp_path, key, value, tensor):
    source = make_checkpoint(tmp_path / "m", "bert")
    config = json.loads((source / "config.json").read_text())
    config[key] = value
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=tensor + "; the config does not match the weights"):
        load_mlm(source)


@pytest.mark.parametrize("key, value, message", [
    ("num_hidden_layers", 0, "at least one layer"),
    ("num_attention_heads", 5, "does not split into 5 attention heads"),
])
def test_impossible_shapes(tmp_path, key, value, message):
    source = make_checkpoint(tmp_path / "m", "bert")
    config = json.loads((source / "config.json").read_text())
    config[key] = value
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        load_mlm(source)


def test_pickle_only_checkpoint_is_refused_unless_allowed(tmp_path):
    import torch

    source = make_checkpoint(tmp_path / "m", "bert")
    model = torch_model(source)
    torch.save(model.state_dict(), source / "pytorch_model.bin")
    (source / "model.safetensors").unlink()
    with pytest.raises(UserError, match="pickled checkpoint.*allow_pickle=True"):
        load_mlm(source)
    ids = np.array([[2, 9, 4, 12, 3]])
    got = np.asarray(load_mlm(source, allow_pickle=True).logits_at(ids, np.array([2])))
    np.testing.assert_allclose(got, torch_logits(model, ids)[:, 2], rtol=1e-4, atol=1e-4)


def test_missing_path():
    with pytest.raises(UserError, match="does not exist"):
        load_mlm("./no/such/dir")


def test_hub_name_offline_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot fetch 'bert-base-cased'.*local directory"):
        load_mlm("bert-base-cased")


def test_unknown_dtype(tmp_path):
    with pytest.raises(UserError, match="unknown dtype"):
        load_mlm(tmp_path, dtype="float16")
