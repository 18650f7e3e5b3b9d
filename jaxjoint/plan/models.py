"""The model a plan is for: a shipped config, a local checkpoint's config.json, the
hub, or your own JAX model (``OwnModel``: any ``MLMProtocol``, e.g. a ``FunctionMLM``).

A plan needs only the model's sizes: parameters are abstract shapes
(``abstract_params``, ``OwnModel.abstract_params``), so no weights are read or
downloaded.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxjoint.errors import UserError
from jaxjoint.models.config import EncoderConfig, encoder_config_from_hf, shipped_hub_configs
from jaxjoint.models.families import init_params
from jaxjoint.models.protocol import ApplyFn, MLMProtocol


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


@dataclasses.dataclass(frozen=True, eq=False)
class OwnModel:
    """A model the planner knows only as an ``MLMProtocol`` (your own JAX masked LM,
    ``FunctionMLM``): its function, the shapes of its parameters and its sizes.

    Its programs are the run's own (``tables.substitution_table`` over
    ``mlm.apply_for(mesh)``), compiled like a checkpoint's; its FLOPs are XLA's
    count of them (there is no formula for a function). Its dtype and the
    arithmetic of its products are the function's own.
    """

    mlm: MLMProtocol
    name: str
    _keys: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.mlm.vocab_size

    @property
    def max_positions(self) -> int:
        """The longest sentence (``sys.maxsize`` for a model that reads any)."""
        return self.mlm.max_positions if self.mlm.max_positions is not None else sys.maxsize

    @property
    def dtype(self) -> str:
        return self.mlm.dtype

    def apply_for(self, mesh: Mesh) -> ApplyFn:
        return self.mlm.apply_for(mesh)

    @functools.cached_property
    def abstract_params(self) -> Any:
        """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, as the tables stage
        places them (``jnp.asarray``: float64 NumPy arrays become float32)."""
        def shape(leaf):
            if isinstance(leaf, jax.ShapeDtypeStruct):
                return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
            return jax.eval_shape(jnp.asarray, leaf)

        return jax.tree.map(shape, self.mlm.params)

    def cache_key(self, mesh: Mesh, length: int) -> str:
        """What identifies this model's programs for sentences of ``length`` tokens
        across processes (``plan.cache``): a digest of the function lowered for one
        such sentence (its StableHLO text: operations, shapes, constants and the
        function's name, not its address or the weights' values), with V and the
        mask id. A function that cannot be lowered here gets a key of its own, never
        reused."""
        platform = mesh.devices.flat[0].platform
        if (platform, length) not in self._keys:
            ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
            positions = jax.ShapeDtypeStruct((1, 1), jnp.int32)
            try:
                text = jax.jit(self.apply_for(mesh)).lower(self.abstract_params, ids, ids, positions).as_text()
            except Exception:  # e.g. a kernel only its own platform lowers: planned, never cached
                text = uuid.uuid4().hex
            digest = hashlib.sha256(text.encode()).hexdigest()[:32]
            self._keys[platform, length] = f"own model {digest} V={self.vocab_size} mask={self.mlm.mask_token_id}"
        return self._keys[platform, length]


# What the planner's programs are built from: a checkpoint's config, or your own model.
PlannedModel = EncoderConfig | OwnModel


def own_model(mlm: MLMProtocol) -> OwnModel:
    """``mlm`` for the planner, named after its function where it has one."""
    if not isinstance(mlm, MLMProtocol):
        raise UserError(f"cannot plan a {type(mlm).__name__}: give a model name, an EncoderConfig, or a masked LM "
                        "meeting jaxjoint.MLMProtocol (jaxjoint.FunctionMLM)")
    function = getattr(mlm, "apply_fn", None)
    name = getattr(function, "__qualname__", None) or type(mlm).__name__
    return OwnModel(mlm, f"{name} (your model)")
