"""Read and write Hugging Face checkpoints: ``config.json`` + safetensors, PyTorch key names.

``parameter_keys`` is the single table from this project's Flax parameter paths
to each family's PyTorch names; reading and writing both go through it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxjoint.errors import UserError
from jaxjoint.models import rotary
from jaxjoint.models.config import EncoderConfig, EsmEncoderConfig, ModernBertEncoderConfig, encoder_config_from_hf
from jaxjoint.models.families import init_params

Params = dict[str, Any]
# Flax path -> (PyTorch key without weight/bias suffix, kind). kind: "dense" (transpose
# weight -> kernel), "norm" (weight/bias or gamma/beta), "embed", "bias" (a bare vector),
# "rotary" (ESM's rotary frequencies under the model prefix; optional). A dense or norm
# leaf the family's module does not have (a bias switched off) is not read.
KeyTable = dict[tuple[str, ...], tuple[str, str]]

_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.ckpt")


def base_prefix(config: EncoderConfig) -> str:
    """The PyTorch name of the encoder inside the ``*ForMaskedLM`` model."""
    return "model" if config.family == "modernbert" else config.family


def _layer_keys(num_layers: int, layer_prefix: str, layer_names: dict[tuple[str, ...], str]) -> KeyTable:
    """Every layer's entries: Flax ``layers_{i}/path`` -> ``{layer_prefix}.{i}.{name}``."""
    return {(f"layers_{i}", *path): (f"{layer_prefix}.{i}.{name}", "norm" if path[-1].endswith("norm") else "dense")
            for i in range(num_layers) for path, name in layer_names.items()}


def parameter_keys(config: EncoderConfig) -> KeyTable:
    """Flax parameter path -> PyTorch module name for one family."""
    if config.family == "modernbert":
        return _modernbert_keys(config)
    if config.family == "esm":
        return _esm_keys(config)
    c = config
    table: KeyTable = {}
    if c.family == "distilbert":
        emb, layer_prefix = "distilbert.embeddings", "distilbert.transformer.layer"
        layer_names = {
            ("attention", "query"): "attention.q_lin",
            ("attention", "key"): "attention.k_lin",
            ("attention", "value"): "attention.v_lin",
            ("attention", "out"): "attention.out_lin",
            ("attention_norm",): "sa_layer_norm",
            ("mlp_in",): "ffn.lin1",
            ("mlp_out",): "ffn.lin2",
            ("mlp_norm",): "output_layer_norm",
        }
        head = {"transform": "vocab_transform", "norm": "vocab_layer_norm",
                "bias": "vocab_projector.bias", "decoder": "vocab_projector"}
    else:
        base = c.family
        emb, layer_prefix = f"{base}.embeddings", f"{base}.encoder.layer"
        layer_names = {
            ("attention", "query"): "attention.self.query",
            ("attention", "key"): "attention.self.key",
            ("attention", "value"): "attention.self.value",
            ("attention", "out"): "attention.output.dense",
            ("attention_norm",): "attention.output.LayerNorm",
            ("mlp_in",): "intermediate.dense",
            ("mlp_out",): "output.dense",
            ("mlp_norm",): "output.LayerNorm",
        }
        head = {
            "bert": {"transform": "cls.predictions.transform.dense",
                     "norm": "cls.predictions.transform.LayerNorm",
                     "bias": "cls.predictions.bias", "decoder": "cls.predictions.decoder"},
            "roberta": {"transform": "lm_head.dense", "norm": "lm_head.layer_norm",
                        "bias": "lm_head.bias", "decoder": "lm_head.decoder"},
            "electra": {"transform": "generator_predictions.dense",
                        "norm": "generator_predictions.LayerNorm",
                        "bias": "generator_lm_head.bias", "decoder": "generator_lm_head"},
        }[base]
        if c.type_vocab_size:
            table[("token_type_embeddings",)] = (f"{emb}.token_type_embeddings", "embed")
        if c.embedding_size != c.hidden_size:
            table[("embeddings_project",)] = (f"{base}.embeddings_project", "dense")
    table[("word_embeddings",)] = (f"{emb}.word_embeddings", "embed")
    table[("position_embeddings",)] = (f"{emb}.position_embeddings", "embed")
    table[("embeddings_norm",)] = (f"{emb}.LayerNorm", "norm")
    table |= _layer_keys(c.num_layers, layer_prefix, layer_names)
    table[("head_transform",)] = (head["transform"], "dense")
    table[("head_norm",)] = (head["norm"], "norm")
    table[("head_bias",)] = (head["bias"], "bias")
    if not c.tie_word_embeddings:
        table[("head_decoder",)] = (f"{head['decoder']}.weight", "bias")
    return table


def _modernbert_keys(c: EncoderConfig) -> KeyTable:
    table: KeyTable = {
        ("word_embeddings",): ("model.embeddings.tok_embeddings", "embed"),
        ("embeddings_norm",): ("model.embeddings.norm", "norm"),
        ("final_norm",): ("model.final_norm", "norm"),
        ("head_transform",): ("head.dense", "dense"),
        ("head_norm",): ("head.norm", "norm"),
        ("head_bias",): ("decoder.bias", "bias"),
    }
    if not c.tie_word_embeddings:
        table[("head_decoder",)] = ("decoder.weight", "bias")
    layer_names = {
        ("attention_norm",): "attn_norm",  # absent in layer 0 (an identity there)
        ("attention", "qkv"): "attn.Wqkv",
        ("attention", "out"): "attn.Wo",
        ("mlp_norm",): "mlp_norm",
        ("mlp_in",): "mlp.Wi",
        ("mlp_out",): "mlp.Wo",
    }
    table |= _layer_keys(c.num_layers, "model.layers", layer_names)
    return table


def _esm_keys(c: EsmEncoderConfig) -> KeyTable:
    table: KeyTable = {
        ("word_embeddings",): ("esm.embeddings.word_embeddings", "embed"),
        ("final_norm",): ("esm.encoder.emb_layer_norm_after", "norm"),
        ("head_transform",): ("lm_head.dense", "dense"),
        ("head_norm",): ("lm_head.layer_norm", "norm"),
        ("head_bias",): ("lm_head.bias", "bias"),
    }
    if c.rotary:
        table[("rotary_inv_freq",)] = ("esm", "rotary")
    else:
        table[("position_embeddings",)] = ("esm.embeddings.position_embeddings", "embed")
    if c.emb_layer_norm_before:
        table[("embeddings_norm",)] = ("esm.embeddings.layer_norm", "norm")
    if not c.tie_word_embeddings:
        table[("head_decoder",)] = ("lm_head.decoder.weight", "bias")
    layer_names = {
        ("attention_norm",): "attention.LayerNorm",
        ("attention", "query"): "attention.self.query",
        ("attention", "key"): "attention.self.key",
        ("attention", "value"): "attention.self.value",
        ("attention", "out"): "attention.output.dense",
        ("mlp_norm",): "LayerNorm",
        ("mlp_in",): "intermediate.dense",
        ("mlp_out",): "output.dense",
    }
    table |= _layer_keys(c.num_layers, "esm.encoder.layer", layer_names)
    return table


def _leaf_keys(kind: str, torch_name: str) -> Iterator[tuple[str, tuple[str, ...], bool]]:
    """(Flax leaf name, candidate PyTorch keys, transpose) for one module."""
    if kind == "dense":
        yield "kernel", (f"{torch_name}.weight",), True
        yield "bias", (f"{torch_name}.bias",), False
    elif kind == "norm":
        yield "scale", (f"{torch_name}.weight", f"{torch_name}.gamma"), False
        yield "bias", (f"{torch_name}.bias", f"{torch_name}.beta"), False
    elif kind == "embed":
        yield "embedding", (f"{torch_name}.weight",), False
    elif kind == "rotary":
        # One buffer in transformers 5; older conversions store a copy per layer
        # (transformers reads layer 0's), and transformers 5 writes those as "layer.*".
        per_layer = "attention.self.rotary_embeddings.inv_freq"
        yield "", (f"{torch_name}.rotary_embeddings.inv_freq", f"{torch_name}.encoder.layer.0.{per_layer}",
                   f"{torch_name}.encoder.layer.*.{per_layer}"), False
    else:  # a bare tensor stored under its own key
        yield "", (torch_name,), False


class _TensorSource:
    """Tensors by name from one safetensors file or a sharded set with an index."""

    def __init__(self, directory: Path):
        single = directory / "model.safetensors"
        index = directory / "model.safetensors.index.json"
        if single.is_file():
            self._files = {None: single}
            self._where: dict[str, Path] | None = None
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise UserError(f"{index}: not a valid safetensors index ({err})") from None
            self._where = {k: directory / f for k, f in weight_map.items()}
        else:
            pickles = [n for n in _PICKLE_FILES if (directory / n).is_file()]
            if pickles:
                raise UserError(
                    f"{directory} holds only a pickled checkpoint ({pickles[0]}), which runs "
                    "code when loaded; convert it to safetensors or pass allow_pickle=True"
                )
            raise UserError(f"{directory} has no model.safetensors (or sharded index)")
        self._handles: dict[Path, Any] = {}

    def _open(self, path: Path):
        if path not in self._handles:
            if not path.is_file():
                raise UserError(f"missing safetensors shard {path}")
            try:
                self._handles[path] = safe_open(str(path), framework="numpy")
            except (SafetensorError, OSError, ValueError) as err:
                raise UserError(f"{path}: corrupt or truncated safetensors file ({err})") from None
        return self._handles[path]

    def keys(self) -> set[str]:
        if self._where is not None:
            return set(self._where)
        return set(self._open(self._files[None]).keys())

    def get(self, key: str) -> np.ndarray:
        path = self._where[key] if self._where is not None else self._files[None]
        try:
            return self._open(path).get_tensor(key)
        except (SafetensorError, OSError, ValueError) as err:
            raise UserError(f"{path}: corrupt or truncated safetensors file ({err})") from None


def params_from_state_dict(
    config: EncoderConfig, get: Any, available: set[str]
) -> Params:
    """Build the Flax parameter tree from PyTorch-named tensors.

    ``get(key) -> np.ndarray`` fetches one tensor; ``available`` is the set of keys
    present. A checkpoint saved from the bare encoder (no ``bert.`` prefix) is
    accepted too. Every tensor must have the shape ``config`` gives it.
    """
    prefix = f"{base_prefix(config)}."
    shapes = _parameter_shapes(config)
    params: Params = {}
    for path, (torch_name, kind) in parameter_keys(config).items():
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        for leaf, candidates, transpose in _leaf_keys(kind, torch_name):
            want = shapes.get((*path, leaf) if leaf else path)
            if want is None:  # a leaf this family's module does not have
                continue
            found = next((k for k in candidates if k in available), None)
            if found is None:  # bare-encoder checkpoints drop the family prefix
                found = next(
                    (k[len(prefix):] for k in candidates
                     if k.startswith(prefix) and k[len(prefix):] in available), None)
            if found is None and kind == "rotary":  # not stored: transformers computes it too
                value = rotary.inverse_frequencies(config.head_dim, config.rope_theta)
            elif found is None:
                raise UserError(f"checkpoint lacks the tensor {candidates[0]}")
            else:
                value = np.asarray(get(found), dtype=np.float32)
                want = want[::-1] if transpose else want  # as PyTorch stores it
                if value.shape != want:
                    raise UserError(f"tensor {found} has shape {list(value.shape)}, but config.json implies "
                                    f"{list(want)}; the config does not match the weights")
                value = value.T if transpose else value
            if leaf:
                node.setdefault(path[-1], {})[leaf] = value
            else:
                node[path[-1]] = value
    return params


def _parameter_shapes(config: EncoderConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax parameter path -> the shape the module gives it under ``config``."""
    tree = jax.eval_shape(functools.partial(init_params, config), jax.random.PRNGKey(0))
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(tree).items()}


def read_hf_config(directory: Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory."""
    path = directory / "config.json"
    if not path.is_file():
        raise UserError(f"{directory} has no config.json; is it a Hugging Face checkpoint directory?")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None


def load_checkpoint(directory: str | Path, *, allow_pickle: bool = False) -> tuple[EncoderConfig, Params, dict]:
    """Read a local HF checkpoint directory.

    Returns the ``EncoderConfig``, the Flax parameter tree (float32 numpy arrays)
    and the raw ``config.json`` dict. Pickled weights are refused unless
    ``allow_pickle`` (they execute code when loaded; PyTorch must be installed).
    """
    directory = Path(directory)
    hf = read_hf_config(directory)
    config = encoder_config_from_hf(hf)
    try:
        source = _TensorSource(directory)
    except UserError:
        if not allow_pickle or not (directory / "pytorch_model.bin").is_file():
            raise
        state = _load_pickled(directory / "pytorch_model.bin")
        return config, params_from_state_dict(config, state.__getitem__, set(state)), hf
    return config, params_from_state_dict(config, source.get, source.keys()), hf


def _load_pickled(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise UserError("allow_pickle=True needs PyTorch installed to read pytorch_model.bin") from None
    state = torch.load(path, map_location="cpu", weights_only=False)
    return {k: v.float().numpy() for k, v in state.items()}


def hf_config_from_encoder(config: EncoderConfig, **extra: Any) -> dict[str, Any]:
    """A ``config.json`` dict for ``config`` (``family`` bert, roberta, modernbert or esm)."""
    if isinstance(config, ModernBertEncoderConfig):
        return {**_modernbert_hf_config(config), **extra}
    if isinstance(config, EsmEncoderConfig):
        return {**_esm_hf_config(config), **extra}
    if config.family == "distilbert":
        return {"architectures": ["DistilBertForMaskedLM"], "model_type": "distilbert",
                "vocab_size": config.vocab_size, "dim": config.hidden_size, "n_layers": config.num_layers,
                "n_heads": config.num_heads, "hidden_dim": config.intermediate_size,
                "max_position_embeddings": config.max_positions, "activation": config.hidden_act,
                "pad_token_id": config.pad_token_id, "tie_word_embeddings": config.tie_word_embeddings, **extra}
    if config.family not in ("bert", "roberta", "electra"):
        raise ValueError(f"writing {config.family} configs is not supported")
    arch = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM", "electra": "ElectraForMaskedLM"}[config.family]
    if config.family == "electra":
        extra = {"embedding_size": config.embedding_size, **extra}
    return {
        "architectures": [arch],
        "model_type": config.family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size,
        "max_position_embeddings": config.max_positions,
        "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.layer_norm_eps,
        "hidden_act": config.hidden_act,
        "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": config.tie_word_embeddings,
        **extra,
    }


def _modernbert_hf_config(c: ModernBertEncoderConfig) -> dict[str, Any]:
    return {
        "architectures": ["ModernBertForMaskedLM"],
        "model_type": "modernbert",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_positions,
        "norm_eps": c.layer_norm_eps,
        "hidden_activation": c.hidden_act,
        "classifier_activation": c.head_act,
        "pad_token_id": c.pad_token_id,
        "tie_word_embeddings": c.tie_word_embeddings,
        "global_rope_theta": c.global_rope_theta,
        "local_rope_theta": c.local_rope_theta,
        "local_attention": 2 * c.local_window,
        "layer_types": ["sliding_attention" if local else "full_attention" for local in c.local_layers],
        "norm_bias": c.norm_bias,
        "attention_bias": c.attention_bias,
        "mlp_bias": c.mlp_bias,
        "classifier_bias": c.head_transform_bias,
        "decoder_bias": c.decoder_bias,
    }


def _esm_hf_config(c: EsmEncoderConfig) -> dict[str, Any]:
    hf: dict[str, Any] = {
        "architectures": ["EsmForMaskedLM"],
        "model_type": "esm",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_positions,
        "layer_norm_eps": c.layer_norm_eps,
        "hidden_act": c.hidden_act,
        "pad_token_id": c.pad_token_id,
        "tie_word_embeddings": c.tie_word_embeddings,
        "position_embedding_type": "rotary" if c.rotary else "absolute",
        "token_dropout": c.token_dropout,
        "emb_layer_norm_before": c.emb_layer_norm_before,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    if c.rotary:
        hf["rope_theta"] = c.rope_theta
    if c.mask_token_id >= 0:
        hf["mask_token_id"] = c.mask_token_id
    return hf


def save_checkpoint(directory: str | Path, config: EncoderConfig, params: Params, **hf_extra: Any) -> None:
    """Write ``config.json`` + ``model.safetensors`` with PyTorch key names.

    The result loads with ``transformers.AutoModelForMaskedLM.from_pretrained``.
    ``hf_extra`` adds fields to ``config.json`` (e.g. token ids).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for path, (torch_name, kind) in parameter_keys(config).items():
        node = params
        for part in path:
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is None:  # a module this model does not have (ModernBERT's first attention norm)
            continue
        for leaf, candidates, transpose in _leaf_keys(kind, torch_name):
            if leaf and leaf not in node:  # a bias the family switches off
                continue
            value = np.asarray(node[leaf] if leaf else node, dtype=np.float32)
            tensors[candidates[0]] = np.ascontiguousarray(value.T if transpose else value)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(
        json.dumps(hf_config_from_encoder(config, **hf_extra), indent=2) + "\n"
    )
