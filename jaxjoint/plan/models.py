"""The model a plan is for: a shipped config, a local checkpoint's config.json, or the hub.

A plan needs only the model's sizes: parameters are abstract shapes
(``abstract_params``), so no weights are read or downloaded.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxjoint.errors import UserError
from jaxjoint.models.config import EncoderConfig, encoder_config_from_hf
from jaxjoint.models.families import init_params

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
# ModernBERT and ESM-2 hub configs, kept by jaxjoint.models (named org--name.json).
HUB_CONFIG_DIR = Path(__file__).parent.parent / "models" / "hub_configs"
# Hub organisations that now own the classic model names.
_HUB_PREFIXES = ("google-bert/", "FacebookAI/", "distilbert/")


def shipped_models() -> tuple[str, ...]:
    """Names ``--model`` resolves offline."""
    names = [p.stem for p in MODEL_CONFIG_DIR.glob("*.json")]
    names += [p.stem.replace("--", "/") for p in HUB_CONFIG_DIR.glob("*.json")]
    return tuple(sorted(names))


def planning_config(source: str) -> tuple[str, EncoderConfig]:
    """(display name, ``EncoderConfig``) for ``source``: a shipped name (also with its
    hub organisation, ``google-bert/bert-base-cased``; ModernBERT and ESM-2 by hub
    id, ``answerdotai/ModernBERT-base``), ``default`` (the embedded model), a local
    directory or config.json file, or a hub name (config.json only, downloaded).
    """
    name = str(source)
    short = next((name[len(p):] for p in _HUB_PREFIXES if name.startswith(p)), name)
    shipped = MODEL_CONFIG_DIR / f"{short}.json"
    if shipped.is_file():
        return short, config_from_hf(json.loads(shipped.read_text()))
    hub_copy = HUB_CONFIG_DIR / f"{name.replace('/', '--')}.json"
    if "/" in name and hub_copy.is_file():
        return name, config_from_hf(json.loads(hub_copy.read_text()))
    if name == "default":
        from jaxjoint.default import MODEL_DIR

        return "default", config_from_hf(json.loads((MODEL_DIR / "config.json").read_text()))
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise UserError(f"{path.parent} has no config.json")
    if path.is_file():
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise UserError(f"{path} is not valid JSON ({err})") from None
        return str(source), config_from_hf(hf)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model path {name} does not exist")
    return name, config_from_hf(_hub_config(name))


def config_from_hf(hf: dict[str, Any]) -> EncoderConfig:
    """``encoder_config_from_hf``, with XLM-RoBERTa planned as the RoBERTa encoder it is."""
    if hf.get("model_type") == "xlm-roberta":
        hf = {**hf, "model_type": "roberta"}
    return encoder_config_from_hf(hf)


def _hub_config(name: str) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(name, "config.json")).read_text())
    except RepositoryNotFoundError:
        raise UserError(f"no model named {name!r}: not shipped ({', '.join(shipped_models())}), "
                        "not a local directory, not on the Hugging Face hub") from None
    except (LocalEntryNotFoundError, OSError, HfHubHTTPError) as err:
        raise UserError(
            f"cannot fetch {name!r}'s config.json from the Hugging Face hub (offline? {type(err).__name__}); "
            f"plan a shipped model ({', '.join(shipped_models())}) or pass a directory with config.json") from None


def abstract_params(config: EncoderConfig) -> Any:
    """The float32 parameter tree of ``config`` as ``jax.ShapeDtypeStruct`` leaves."""
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)  # abstract too: no backend needed
    return jax.eval_shape(functools.partial(init_params, config), key)
