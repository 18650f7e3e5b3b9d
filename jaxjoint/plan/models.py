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
from jaxjoint.models.config import EncoderConfig, encoder_config_from_hf, shipped_hub_configs
from jaxjoint.models.families import init_params


def shipped_models() -> tuple[str, ...]:
    """Hub ids ``--model`` resolves offline (also by the name after the ``/``)."""
    return tuple(shipped_hub_configs())


def planning_config(source: str) -> tuple[str, EncoderConfig]:
    """(display name, ``EncoderConfig``) for ``source``: a shipped model by hub id
    (``google-bert/bert-base-cased``, ``answerdotai/ModernBERT-base``) or by the name
    after the ``/`` (``bert-base-cased``), ``default`` (the embedded model), a local
    directory or config.json file, or a hub name (config.json only, downloaded).
    """
    name = str(source)
    shipped = {hub_id: path for hub_id, path in shipped_hub_configs().items()
               if name in (hub_id, hub_id.split("/", 1)[1])}
    if len(shipped) == 1:
        (path,) = shipped.values()
        return name, encoder_config_from_hf(json.loads(path.read_text()))
    if name == "default":
        from jaxjoint.default import MODEL_DIR

        return "default", encoder_config_from_hf(json.loads((MODEL_DIR / "config.json").read_text()))
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise UserError(f"{path.parent} has no config.json")
    if path.is_file():
        try:
            hf = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"cannot read {path} as JSON ({err})") from None
        return str(source), encoder_config_from_hf(hf)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model path {name} does not exist")
    return name, encoder_config_from_hf(_hub_config(name))


def _hub_config(name: str) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    from jaxjoint import hub

    why = hub.unreachable()  # then the local cache only: one line at once instead of ~25 s of retries
    try:
        with hub.quiet():
            return json.loads(Path(hf_hub_download(name, "config.json", local_files_only=why is not None)).read_text())
    except RepositoryNotFoundError:
        raise UserError(f"no model named {name!r}: not shipped ({', '.join(shipped_models())}), "
                        "not a local directory, not on the Hugging Face hub") from None
    except (LocalEntryNotFoundError, OSError, HfHubHTTPError) as err:
        reason = f"{why}; not in the local cache" if why else type(err).__name__
        raise UserError(
            f"cannot fetch the config.json of {name!r} from the Hugging Face hub ({reason}); "
            f"plan a shipped model ({', '.join(shipped_models())}) or pass a directory with config.json") from None


def abstract_params(config: EncoderConfig) -> Any:
    """The float32 parameter tree of ``config`` as ``jax.ShapeDtypeStruct`` leaves."""
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)  # abstract too: no backend needed
    return jax.eval_shape(functools.partial(init_params, config), key)
