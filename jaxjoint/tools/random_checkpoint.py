"""``jaxjoint random-checkpoint``: a random-weight checkpoint of any supported family, offline.

Writes a directory that ``load_mlm`` and transformers' ``AutoModelForMaskedLM`` /
``AutoTokenizer`` both read: ``config.json``, ``model.safetensors`` (PyTorch key
names, through ``save_checkpoint``) and a working tokenizer. Small by default
(``small_hf_config``), or at a shipped model's shapes (``--like bert-base-cased``,
``like_hf_config``), so that ``pair``, ``evaluate`` and the benchmarks run on every
family without a download. The tests build their checkpoints with it too.

Weights: every tensor perturbed, not just initialised (``random_state``): LayerNorm
gains 1 + 0.1 N(0, 1), everything else 0.1 N(0, 1), so every weight matters;
``head_gain`` multiplies the head's LayerNorm gain, which sharpens the conditionals
(8 gives entropies of about 1 nat at the small size, like a trained model's).

Tokenizer: ESM's own 33-token alphabet (``EsmTokenizer``); for the other families a
WordPiece tokenizer (lower-cased, BERT pre-tokenisation) over the family's special
tokens ([CLS] [SEP] [PAD] [MASK] [UNK], or <s> </s> <pad> <mask> <unk> for RoBERTa and
XLM-R) at the ids the config names, then ``words`` (default: the embedded model's
WordPiece vocabulary), then filler sub-words ``##x0``, ``##x1``, ... up to V.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxjoint.errors import UserError

FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "modernbert", "esm")
# ESM-2's alphabet, in the order of its vocab.txt (V = 33).
ESM_TOKENS = ("<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO.-", "<null_1>", "<mask>")
# The head's LayerNorm gain, per family (PyTorch names): scaling it sharpens the conditionals.
HEAD_NORM = {
    "bert": "cls.predictions.transform.LayerNorm.weight",
    "roberta": "lm_head.layer_norm.weight",
    "xlm-roberta": "lm_head.layer_norm.weight",
    "distilbert": "vocab_layer_norm.weight",
    "electra": "generator_predictions.LayerNorm.weight",
    "modernbert": "head.norm.weight",
    "esm": "lm_head.layer_norm.weight",
}
SMALL_VOCAB = 512  # the small checkpoints' V (ESM: its alphabet's 33)
DEFAULT_HEAD_GAIN = 8.0


# --- config.json ------------------------------------------------------------------------------------


def small_hf_config(family: str, *, vocab_size: int = SMALL_VOCAB, hidden: int = 32, layers: int = 2,
                    heads: int = 4, intermediate: int = 64, max_positions: int = 64,
                    **extra: Any) -> dict[str, Any]:
    """A tiny ``config.json`` dict of ``family`` (``FAMILIES``): ``hidden`` wide,
    ``layers`` deep, ``max_positions`` tokens; ``extra`` overrides or adds fields.

    ModernBERT: layers alternate global and local (every third global, windows of 8
    tokens) and its five specials sit at the end of the vocabulary, as in the real
    one. ESM: ESM-2's layout (rotary positions, token dropout), V = 33 whatever
    ``vocab_size`` says.
    """
    common = dict(vocab_size=vocab_size, pad_token_id=0)
    sizes = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                 intermediate_size=intermediate, max_position_embeddings=max_positions)
    if family == "bert":
        hf = dict(model_type="bert", architectures=["BertForMaskedLM"], type_vocab_size=2, **common, **sizes)
    elif family in ("roberta", "xlm-roberta"):
        # Positions start at pad_token_id + 1: two spare rows.
        hf = dict(model_type=family, type_vocab_size=1, **common, **sizes,
                  architectures=["XLMRobertaForMaskedLM" if family == "xlm-roberta" else "RobertaForMaskedLM"])
        hf["max_position_embeddings"] = max_positions + 2
    elif family == "electra":
        hf = dict(model_type="electra", architectures=["ElectraForMaskedLM"], embedding_size=hidden // 2,
                  type_vocab_size=2, **common, **sizes)
    elif family == "distilbert":
        hf = dict(model_type="distilbert", architectures=["DistilBertForMaskedLM"], dim=hidden, n_layers=layers,
                  n_heads=heads, hidden_dim=intermediate, max_position_embeddings=max_positions, **common)
    elif family == "modernbert":
        pad = vocab_size - 2  # [UNK] [CLS] [SEP] [PAD] [MASK] are the last five ids
        hf = dict(model_type="modernbert", architectures=["ModernBertForMaskedLM"], vocab_size=vocab_size,
                  hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=intermediate, max_position_embeddings=max_positions, local_attention=8,
                  global_attn_every_n_layers=3, pad_token_id=pad, bos_token_id=pad - 2, cls_token_id=pad - 2,
                  eos_token_id=pad - 1, sep_token_id=pad - 1)
    elif family == "esm":
        hf = dict(model_type="esm", architectures=["EsmForMaskedLM"], vocab_size=len(ESM_TOKENS),
                  mask_token_id=ESM_TOKENS.index("<mask>"), pad_token_id=ESM_TOKENS.index("<pad>"), **sizes,
                  position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
                  layer_norm_eps=1e-5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    else:
        raise UserError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    return {**hf, **extra}


def like_hf_config(name: str) -> dict[str, Any]:
    """The ``config.json`` dict of a shipped hub model (by hub id or the name after
    the ``/``: ``bert-base-cased``, ``facebook/esm2_t6_8M_UR50D``) or of a local
    checkpoint directory or ``config.json`` file."""
    from jaxjoint.models.config import shipped_hub_configs

    shipped = [p for hub_id, p in shipped_hub_configs().items() if name in (hub_id, hub_id.split("/", 1)[1])]
    path = shipped[0] if len(shipped) == 1 else Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"--like {name}: not a shipped model ({', '.join(sorted(shipped_hub_configs()))}) "
                        "and no local config.json there")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path} as JSON ({err})") from None


def family_of_hf(hf: dict[str, Any]) -> str:
    """The ``FAMILIES`` entry of a ``config.json`` dict (its ``model_type``)."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise UserError(f"model_type {family!r} is not one of {', '.join(FAMILIES)}")
    return family


# --- weights ------------------------------------------------------------------------------------------


def random_state(config: Any, family: str, *, seed: int = 0, head_gain: float = 1.0) -> dict[str, Any]:
    """A Flax parameter tree of ``config`` (``EncoderConfig``) with every weight drawn
    as the module docstring says, from ``numpy.random.default_rng(seed)`` in the
    order of ``checkpoint.parameter_keys``. float32 leaves, Flax layout."""
    import jax

    from jaxjoint.models.checkpoint import _leaf_keys, parameter_keys
    from jaxjoint.models.rotary import inverse_frequencies
    from jaxjoint.plan.models import abstract_params

    shapes = jax.tree_util.tree_map(lambda s: s.shape, abstract_params(config),
                                    is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    rng = np.random.default_rng(seed)
    params: dict[str, Any] = {}
    for path, (torch_name, kind) in parameter_keys(config).items():
        node = shapes
        for part in path:
            node = node.get(part) if hasattr(node, "get") else None
        if node is None:  # a module this model does not have
            continue
        if kind == "rotary":  # ESM-2's fixed frequencies, stored as transformers stores them
            if "rotary_inv_freq" in shapes:
                params["rotary_inv_freq"] = inverse_frequencies(config.head_dim, config.rope_theta)
            continue
        for leaf, candidates, _ in _leaf_keys(kind, torch_name):
            if leaf and leaf not in node:
                continue
            shape, name = node[leaf] if leaf else node, candidates[0]
            noise = rng.standard_normal(shape, dtype=np.float32)
            value = 1.0 + 0.1 * noise if name.endswith(("weight", "gamma")) and "norm" in name.lower() else 0.1 * noise
            if name == HEAD_NORM[family]:
                value = value * head_gain
            target = params
            for part in path[:-1] if not leaf else path:
                target = target.setdefault(part, {})
            target[leaf or path[-1]] = value.astype(np.float32)
    return params


# --- tokenizer ----------------------------------------------------------------------------------------


def special_tokens(family: str, hf: dict[str, Any], vocab_size: int) -> dict[str, tuple[str, int]]:
    """{role: (token, id)} of the family's five special tokens (roles pad, cls, sep,
    mask, unk), at the ids the config names; the rest at the lowest free ids
    (ModernBERT's [UNK] and [MASK]: beside [PAD], as in the real vocabulary)."""
    roberta = family in ("roberta", "xlm-roberta")
    names = dict(pad="<pad>", unk="<unk>", cls="<s>", sep="</s>", mask="<mask>") if roberta else dict(
        pad="[PAD]", unk="[UNK]", cls="[CLS]", sep="[SEP]", mask="[MASK]")
    pad = int(hf.get("pad_token_id") or 0)
    wanted = {"pad": pad, "cls": hf.get("cls_token_id", hf.get("bos_token_id")),
              "sep": hf.get("sep_token_id", hf.get("eos_token_id")), "mask": hf.get("mask_token_id")}
    if family == "modernbert":
        wanted.update(unk=pad - 3, mask=pad + 1)
    ids: dict[str, int] = {}
    for role in ("pad", "cls", "sep", "mask", "unk"):
        want = wanted.get(role)
        if want is not None and 0 <= want < vocab_size and want not in ids.values():
            ids[role] = int(want)
    free = (i for i in range(vocab_size) if i not in ids.values())
    for role in ("unk", "cls", "sep", "mask"):
        if role not in ids:
            ids[role] = next(free)
    return {role: (names[role], i) for role, i in ids.items()}


def default_words() -> list[str]:
    """The embedded model's WordPiece vocabulary, specials left out."""
    from jaxjoint.default import MODEL_DIR

    lines = (MODEL_DIR / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return [w for w in lines if w and not (w.startswith("[") and w.endswith("]"))]


def write_tokenizer(directory: Path, family: str, hf: dict[str, Any], words: Sequence[str] | None = None) -> None:
    """The tokenizer files of a ``family`` checkpoint of ``config.json`` ``hf`` in ``directory``."""
    import transformers

    vocab_size = int(hf["vocab_size"])
    if family == "esm":
        if vocab_size != len(ESM_TOKENS):
            raise UserError(f"an ESM checkpoint here has ESM-2's alphabet of {len(ESM_TOKENS)} tokens, "
                            f"not {vocab_size}")
        vocab_file = directory / "vocab.txt"
        vocab_file.write_text("\n".join(ESM_TOKENS) + "\n")
        transformers.EsmTokenizer(vocab_file=str(vocab_file)).save_pretrained(directory)
        return
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    roles = special_tokens(family, hf, vocab_size)
    entries: list[str | None] = [None] * vocab_size
    for token, i in roles.values():
        entries[i] = token
    taken = {token for token, _ in roles.values()}
    pool = iter([w for w in dict.fromkeys(default_words() if words is None else words) if w not in taken])
    filler = 0
    for i, entry in enumerate(entries):
        if entry is None:
            entries[i] = next(pool, None)
            while entries[i] is None or entries[i] in taken:  # a filler the words already hold
                entries[i] = f"##x{filler}"
                filler += 1
            taken.add(entries[i])
    vocab = {token: i for i, token in enumerate(entries)}
    cls, sep, pad, mask, unk = (roles[r][0] for r in ("cls", "sep", "pad", "mask", "unk"))
    backend = Tokenizer(models.WordPiece(vocab, unk_token=unk, continuing_subword_prefix="##"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])])
    backend.decoder = decoders.WordPiece()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=unk, cls_token=cls, sep_token=sep, pad_token=pad,
        mask_token=mask, model_max_length=int(hf.get("max_position_embeddings", 512))).save_pretrained(directory)


# --- the checkpoint ------------------------------------------------------------------------------------


def random_checkpoint(directory: str | Path, hf: dict[str, Any], *, seed: int = 0,
                      head_gain: float = DEFAULT_HEAD_GAIN, words: Sequence[str] | None = None) -> Path:
    """Write a random-weight checkpoint of ``config.json`` dict ``hf`` (``small_hf_config``,
    ``like_hf_config``) with its tokenizer (``write_tokenizer``) into ``directory``;
    returns it. Raises ``UserError`` for a config jaxjoint cannot read."""
    from jaxjoint.models.checkpoint import save_checkpoint
    from jaxjoint.models.config import encoder_config_from_hf

    family = family_of_hf(hf)
    config = encoder_config_from_hf(hf)
    directory = Path(directory)
    params = random_state(config, family, seed=seed, head_gain=head_gain)
    save_checkpoint(directory, config, params, **hf)
    write_tokenizer(directory, family, hf, words)
    return directory


# --- the command ----------------------------------------------------------------------------------------


def add_parser(subparsers: Any, help: str | None = None) -> argparse.ArgumentParser:
    """Register ``random-checkpoint`` on ``subparsers``."""
    parser = subparsers.add_parser(
        "random-checkpoint", help=help, description="Write a random-weight checkpoint in Hugging Face layout "
        "(config.json, model.safetensors, a working tokenizer) for any supported family, small or at a shipped "
        "model's shapes: pair, evaluate and the benchmarks then run without a download.")
    parser.add_argument("--family", choices=FAMILIES, metavar="FAMILY",
                        help=f"{', '.join(FAMILIES)} (with --like: taken from that model)")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write (must be empty or new)")
    parser.add_argument("--like", metavar="HUB-NAME", help="a shipped model's shapes (bert-base-cased, "
                        "facebook/esm2_t6_8M_UR50D, ...; see `jaxjoint plan --help`) or a config.json")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights (default 0)")
    parser.add_argument("--head-gain", type=float, default=DEFAULT_HEAD_GAIN, metavar="G",
                        help=f"multiplies the head's LayerNorm gain: larger, sharper conditionals "
                        f"(default {DEFAULT_HEAD_GAIN:g})")
    return parser


def run(args: argparse.Namespace) -> int:
    """``jaxjoint random-checkpoint``: print what was written."""
    if args.like is not None:
        hf = like_hf_config(args.like)
        if args.family is not None and args.family != hf.get("model_type"):
            raise UserError(f"--like {args.like} is a {hf.get('model_type')} model, not {args.family}")
    elif args.family is None:
        raise UserError("give --family FAMILY (or --like HUB-NAME)")
    else:
        hf = small_hf_config(args.family)
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty directory")
    try:
        random_checkpoint(out, hf, seed=args.seed, head_gain=args.head_gain)
    except OSError as err:
        raise UserError(f"cannot write {out} ({err.strerror})") from None
    print(f"wrote a random {hf['model_type']} checkpoint (V = {hf['vocab_size']}) to {out}")
    return 0
