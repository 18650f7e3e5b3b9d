"""``MaskedLM``: a loaded checkpoint (module, parameters, tokenizer) and ``load_mlm``."""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxjoint.errors import UserError
from jaxjoint.models.checkpoint import Params, load_checkpoint
from jaxjoint.models.config import EncoderConfig
from jaxjoint.models.families import init_params, masked_lm_module
from jaxjoint.models.precision import MatmulPrecision, check_mode, platform_of

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class MaskedLM:
    """A masked LM ready to run.

    ``config``: the ``EncoderConfig`` (a family's subclass for ModernBERT and ESM);
    ``params``: the Flax parameter tree (float32);
    ``tokenizer``: the checkpoint's ``transformers`` tokenizer (or None);
    ``dtype``: compute dtype name, ``"float32"`` or ``"bfloat16"``;
    ``matmul_precision``: the arithmetic of float32 matrix products on the backend
    they run on, ``"float32"``, ``"tensorfloat32"`` or ``"bfloat16"``
    (``jaxjoint.models.precision``);
    ``emulate``: a platform (``gpu``, ``tpu``) whose arithmetic for ``matmul_precision``
    to compute by emulation wherever the model runs (error measurements), or None.
    """

    config: EncoderConfig
    params: Params
    tokenizer: Any
    dtype: str = "float32"
    matmul_precision: str = "float32"
    emulate: str | None = None
    hf_config: dict = dataclasses.field(default_factory=dict)
    _placed: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def module(self) -> nn.Module:
        """``module_for`` the default backend's platform."""
        return self.module_for(platform_of(jax.devices()[0]))

    def module_for(self, platform: str) -> nn.Module:
        """The family's Flax module computing in ``dtype``, its products in
        ``matmul_precision``'s arithmetic on ``platform`` (``cpu``, ``gpu``, ``tpu``):
        ``__call__(input_ids int[B, L], attention_mask int[B, L], positions int[B, K])
        -> float32[B, K, V]``."""
        if self.emulate is not None:
            return masked_lm_module(self.config, DTYPES[self.dtype],
                                    MatmulPrecision(self.matmul_precision, self.emulate, emulate=True))
        return masked_lm_module(self.config, DTYPES[self.dtype], MatmulPrecision(self.matmul_precision, platform))

    @property
    def vocab_size(self) -> int:
        """V: rows of the embedding matrix, special tokens included."""
        return self.config.vocab_size

    @property
    def mask_token_id(self) -> int:
        if self.tokenizer is not None and self.tokenizer.mask_token_id is not None:
            return int(self.tokenizer.mask_token_id)
        if "mask_token_id" in self.hf_config:
            return int(self.hf_config["mask_token_id"])
        raise UserError("the checkpoint's tokenizer defines no [MASK] token")

    def apply_for(self, mesh: jax.sharding.Mesh) -> ModuleApply:
        """``MLMProtocol.apply_for``: ``module_for`` the platform of ``mesh``'s devices as
        a function ``(params, input_ids, attention_mask, positions) -> float32[B, K, V]``
        (equal for equal modules, so compiled programs are reused)."""
        return ModuleApply(self.module_for(platform_of(mesh.devices.flat[0])))

    @property
    def pad_token_id(self) -> int:
        return self.config.pad_token_id

    @property
    def max_positions(self) -> int:
        return self.config.max_positions

    @property
    def special_token_ids(self) -> frozenset[int]:
        """The ids of [CLS], [SEP], BOS, EOS and padding (never a pair's position):
        the tokenizer's, else those ``config.json`` names; [MASK] is not one."""
        names = ("cls_token_id", "sep_token_id", "bos_token_id", "eos_token_id", "pad_token_id")
        if self.tokenizer is not None:
            found = [getattr(self.tokenizer, n, None) for n in names]
        else:
            found = [self.hf_config.get(n) for n in names]
        return frozenset(int(i) for i in found if i is not None) - {self.mask_token_id}

    def planned_chunk(self, mesh: jax.sharding.Mesh, length: int, prefetch: int) -> int:
        """``plan.chunks.planned_chunk_size`` for this model: compiled to fit on GPUs
        and TPUs, an activation budget on CPU."""
        # The chunk policy compiles the tables programs, which run this model: imported when asked.
        from jaxjoint.plan.chunks import planned_chunk_size

        return planned_chunk_size(mesh, self.config, length, self.dtype, prefetch=prefetch,
                                  matmul_precision=self.matmul_precision)

    def params_on(self, sharding: jax.sharding.Sharding) -> Params:
        """The parameters placed with ``sharding`` (copied once per sharding, then cached)."""
        if sharding not in self._placed:
            self._placed[sharding] = jax.device_put(self.params, sharding)
        return self._placed[sharding]

    def with_dtype(self, dtype: str) -> MaskedLM:
        """The same model computing in ``dtype`` (parameters are shared, not copied)."""
        _check_dtype(dtype)
        return dataclasses.replace(self, dtype=dtype, _placed=self._placed)

    def with_matmul_precision(self, matmul_precision: str) -> MaskedLM:
        """The same model with its products in ``matmul_precision`` (parameters shared)."""
        check_mode(matmul_precision)
        return dataclasses.replace(self, matmul_precision=matmul_precision, _placed=self._placed)

    def logits_at(
        self,
        input_ids: Any,
        positions: Any,
        attention_mask: Any | None = None,
    ) -> jax.Array:
        """MLM logits at chosen positions.

        input_ids: int[B, L]; positions: int[B] -> float32[B, V], or int[B, K] ->
        float32[B, K, V]; attention_mask: int[B, L] (default: all ones).
        The head, and the last layer's queries and feed-forward block, run only at
        ``positions``; no [B, L, V] tensor is formed.
        """
        input_ids = jnp.asarray(input_ids, jnp.int32)
        positions = jnp.asarray(positions, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        squeeze = positions.ndim == 1
        if squeeze:
            positions = positions[:, None]
        logits = mlm_logits(self.module, self.params, input_ids, jnp.asarray(attention_mask, jnp.int32), positions)
        return logits[:, 0] if squeeze else logits


@dataclasses.dataclass(frozen=True)
class ModuleApply:
    """A Flax masked-LM module as a function of ``(params, input_ids, attention_mask,
    positions)``: ``MLMProtocol.apply_for``'s function for checkpoints. Hashable, equal for equal
    modules, so compiled programs are reused across calls."""

    module: nn.Module

    def __call__(self, params: Params, input_ids: jax.Array, attention_mask: jax.Array,
                 positions: jax.Array) -> jax.Array:
        return self.module.apply({"params": params}, input_ids, attention_mask, positions)


@functools.partial(jax.jit, static_argnums=0)
def mlm_logits(
    module: nn.Module, params: Params, input_ids: jax.Array, attention_mask: jax.Array, positions: jax.Array
) -> jax.Array:
    """Jitted core of ``MaskedLM.logits_at``: int[B, L], int[B, L], int[B, K] -> float32[B, K, V]."""
    return module.apply({"params": params}, input_ids, attention_mask, positions)


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")


def _resolve_source(source: str | os.PathLike, *, allow_pickle: bool) -> Path:
    """A local directory, or the snapshot directory of a hub model (downloaded if
    needed; its pickled ``*.bin`` weights only with ``allow_pickle``)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"model path {path} is a file; give the checkpoint directory")
        return path
    name = str(source)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model path {name} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    from jaxjoint import hub

    # Unreachable: the local cache only, so a model fetched before loads and anything else fails at once.
    why = hub.unreachable()
    patterns = ["*.json", "*.safetensors", "*.txt", "*.model"]
    try:
        with hub.quiet():
            path = Path(snapshot_download(name, allow_patterns=patterns, local_files_only=why is not None))
            if allow_pickle and not any(path.glob("*.safetensors")):  # pickles only where needed
                path = Path(snapshot_download(name, allow_patterns=[*patterns, "*.bin"],
                                              local_files_only=why is not None))
        return path
    except RepositoryNotFoundError:
        raise UserError(f"no model named {name!r} on the Hugging Face hub, and no such local directory") from None
    except (LocalEntryNotFoundError, OSError, HfHubHTTPError) as err:
        reason = f"{why}; not in the local cache" if why else type(err).__name__
        raise UserError(
            f"cannot fetch {name!r} from the Hugging Face hub ({reason}); "
            "download it elsewhere and pass its local directory instead"
        ) from None


def load_mlm(source: str | os.PathLike, *, dtype: str = "float32", matmul_precision: str = "float32",
             allow_pickle: bool = False) -> MaskedLM:
    """Load a masked LM (``SUPPORTED_MODEL_TYPES``) from a local HF checkpoint directory or a hub name.

    ``source``: a directory with ``config.json``, ``model.safetensors`` (or a sharded
    index) and tokenizer files, or a hub name such as ``"bert-base-cased"``.
    ``dtype``: compute dtype, ``"float32"`` (default) or ``"bfloat16"``; parameters
    stay float32. ``matmul_precision``: the arithmetic of float32 products,
    ``"float32"`` (default: the paper's float32 on every backend), ``"tensorfloat32"``
    or ``"bfloat16"`` (README, Precision). ``allow_pickle``: accept
    ``pytorch_model.bin`` (runs code on load).
    """
    _check_dtype(dtype)
    check_mode(matmul_precision)
    directory = _resolve_source(source, allow_pickle=allow_pickle)
    config, params, hf = load_checkpoint(directory, allow_pickle=allow_pickle)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    return MaskedLM(config=config, params=params, tokenizer=_load_tokenizer(directory), dtype=dtype,
                    matmul_precision=matmul_precision, hf_config=hf)


def _load_tokenizer(directory: Path) -> Any:
    names = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json")
    if not any((directory / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer in {directory} ({err})") from None


def random_params(config: EncoderConfig, seed: int = 0) -> Params:
    """Randomly initialised float32 parameters of ``config``'s family (N(0, 0.02) weights)."""
    return jax.tree_util.tree_map(np.asarray, _jitted_init(config, jax.random.PRNGKey(seed)))


# Jitted: run eagerly, Flax's initialisers dispatch op by op (about 6 s of CPU for a
# 2-layer model, a third of that compiled as one program).
_jitted_init = jax.jit(init_params, static_argnums=0)
