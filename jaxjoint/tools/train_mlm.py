"""``jaxjoint train-mlm``: train a small BERT-style masked LM with flax and optax.

This is how the default model in ``jaxjoint/default/`` was made (its
``MODEL_CARD.md`` has the exact command). The pipeline:

1. corpus: WordNet glosses and examples, split into training lines and
   held-out sets by synset (``jaxjoint.tools.corpus``), or any ``--train-file``;
2. an uncased WordPiece vocabulary trained on the training lines only;
3. BERT masking (15% of the non-special tokens; of those 80% ``[MASK]``,
   10% a random token, 10% unchanged), redrawn each epoch;
4. AdamW, linear warm-up then linear decay to zero, gradient clipping;
5. checkpoints in Hugging Face format with PyTorch key names, loadable by
   ``transformers.AutoModelForMaskedLM`` and by ``jaxjoint.models.mlm.load_mlm``.

Everything random derives from ``--seed`` through numpy and JAX generators, so
the same command on the same machine gives the same parameters.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxjoint.errors import UserError
from jaxjoint.models import families
from jaxjoint.models.bert import MaskedLMModule
from jaxjoint.models.checkpoint import save_checkpoint
from jaxjoint.models.config import EncoderConfig
from jaxjoint.tools.heldout import heldout_report, unigram_log_probs
from jaxjoint.tools.mlm_batches import SpecialIds, epoch_batches, fixed_eval_batches, tokenize_lines

Params = Any


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Model shape and optimisation settings of one training run."""

    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 512
    max_length: int = 128
    steps: int = 6000
    batch_tokens: int = 8192  # padded tokens per step; batch rows = batch_tokens // bucket
    learning_rate: float = 1e-3
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    mask_prob: float = 0.15
    seed: int = 0

    def encoder_config(self, pad_token_id: int = 0) -> EncoderConfig:
        """The ``EncoderConfig`` of the BERT model this run trains."""
        return EncoderConfig(
            family="bert",
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            embedding_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_positions=self.max_length,
            type_vocab_size=2,
            layer_norm_eps=1e-12,
            hidden_act="gelu",
            pad_token_id=pad_token_id,
        )


def lr_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to the peak, then linear decay to 0 at the last step (as BERT)."""
    warmup = max(1, int(config.warmup_fraction * config.steps))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.learning_rate, warmup),
         optax.linear_schedule(config.learning_rate, 0.0, max(1, config.steps - warmup))],
        [warmup],
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up and linear decay to 0; no decay on biases and LayerNorm."""
    schedule = lr_schedule(config)

    def decay_mask(params: Params) -> Params:
        # As in BERT: weight decay on matrices only.
        return jax.tree_util.tree_map_with_path(
            lambda path, _: getattr(path[-1], "key", "") in ("kernel", "embedding"), params
        )

    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6,
                    weight_decay=config.weight_decay, mask=decay_mask),
    )


def masked_lm_loss(
    module: MaskedLMModule, params: Params, batch: dict[str, jax.Array]
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Mean cross-entropy over real targets; aux = (correct top-1 count, target count)."""
    logits = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                          batch["positions"])  # [B, K, V]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["labels"][..., None], axis=-1)[..., 0]
    w = batch["weights"]
    n = jnp.maximum(w.sum(), 1.0)
    correct = ((jnp.argmax(logits, -1) == batch["labels"]) * w).sum()
    return (nll * w).sum() / n, (correct, w.sum())


def make_train_step(module: MaskedLMModule, optimizer: optax.GradientTransformation):
    """Jitted ``step(params, opt_state, batch) -> (params, opt_state, loss, accuracy)``."""

    @jax.jit
    def step(params, opt_state, batch):
        (loss, (correct, n)), grads = jax.value_and_grad(
            lambda p: masked_lm_loss(module, p, batch), has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, correct / jnp.maximum(n, 1.0)

    return step


def make_eval_fn(module: MaskedLMModule):
    """Jitted ``eval(params, batch) -> (summed nll, correct count, target count)``."""

    @jax.jit
    def evaluate(params, batch):
        loss, (correct, n) = masked_lm_loss(module, params, batch)
        return loss * jnp.maximum(n, 1.0), correct, n

    return evaluate


@functools.lru_cache(maxsize=8)
def _compiled(config: TrainConfig, pad_token_id: int):
    """Module, optimizer, train step and eval function, shared by runs that differ only in seed.

    Jitted functions are cached per Python function object, so building them
    once per configuration saves a recompilation per ``train`` call.
    """
    module = MaskedLMModule(config.encoder_config(pad_token_id))
    optimizer = make_optimizer(config)
    return module, optimizer, make_train_step(module, optimizer), make_eval_fn(module)


@functools.lru_cache(maxsize=8)
def _init_fn(encoder: EncoderConfig):
    return jax.jit(functools.partial(families.init_params, encoder))


def init_params(config: TrainConfig, pad_token_id: int = 0) -> Params:
    """Fresh parameters from ``config.seed`` (BERT's N(0, 0.02) initialiser)."""
    return _init_fn(config.encoder_config(pad_token_id))(jax.random.PRNGKey(config.seed))


def train(
    config: TrainConfig,
    data: Sequence[np.ndarray],
    special: SpecialIds,
    *,
    eval_data: Sequence[np.ndarray] = (),
    eval_every: int = 0,
    on_checkpoint: Any = None,
    checkpoint_every: int = 0,
    progress: bool = True,
) -> tuple[Params, list[dict]]:
    """Train from scratch for ``config.steps`` steps over token-id sequences ``data``.

    ``data``: list of int32[n_i] (``[CLS] ... [SEP]``). Returns the final parameters
    (numpy float32 tree) and a history of dicts (step, loss, accuracy, lr, and at
    evaluation steps eval_loss / eval_accuracy). ``on_checkpoint(step, params)``
    is called every ``checkpoint_every`` steps.
    """
    from tqdm.auto import tqdm

    if not data:
        raise UserError("the training corpus is empty")
    module, optimizer, step_fn, eval_fn = _compiled(dataclasses.replace(config, seed=0), special.pad)
    params = init_params(config, special.pad)
    opt_state = optimizer.init(params)
    eval_batches = fixed_eval_batches(eval_data, config, special) if eval_data else []
    rng = np.random.default_rng(config.seed)
    schedule_lr = lr_schedule(config)

    def run_eval(p) -> dict:
        tot = np.zeros(3)
        for b in eval_batches:
            tot += np.asarray([float(x) for x in eval_fn(p, b)])
        return {"eval_loss": tot[0] / max(tot[2], 1), "eval_accuracy": tot[1] / max(tot[2], 1)}

    history: list[dict] = []
    bar = tqdm(total=config.steps, file=sys.stderr, disable=not progress, unit="step",
               dynamic_ncols=True, mininterval=1.0)
    step, epoch, start = 0, 0, time.perf_counter()
    smooth = None
    while step < config.steps:
        for batch in epoch_batches(data, config, rng, special):
            params, opt_state, loss, acc = step_fn(params, opt_state, batch)
            step += 1
            loss, acc = float(loss), float(acc)
            smooth = loss if smooth is None else 0.98 * smooth + 0.02 * loss
            record = {"step": step, "epoch": epoch, "loss": loss, "accuracy": acc,
                      "lr": float(schedule_lr(step - 1)), "seconds": time.perf_counter() - start}
            if eval_batches and eval_every and (step % eval_every == 0 or step == config.steps):
                record.update(run_eval(params))
                bar.write(f"step {step}: train loss {smooth:.3f}, held-out loss "
                          f"{record['eval_loss']:.3f}, held-out accuracy {record['eval_accuracy']:.3f}",
                          file=sys.stderr)
            history.append(record)
            bar.set_postfix(loss=f"{smooth:.3f}", epoch=epoch, refresh=False)
            bar.update(1)
            if on_checkpoint is not None and checkpoint_every and step % checkpoint_every == 0:
                on_checkpoint(step, params)
            if step >= config.steps:
                break
        epoch += 1
    bar.close()
    return jax.tree_util.tree_map(np.asarray, params), history


def _save(directory: Path, config: TrainConfig, params: Params, tokenizer: Any) -> None:
    save_checkpoint(directory, config.encoder_config(tokenizer.pad_token_id), params)
    tokenizer.save_pretrained(str(directory))


def add_parser(subparsers: Any, help: str | None = None) -> argparse.ArgumentParser:
    """Register ``train-mlm`` on an argparse subparsers object (sets ``func=run``)."""
    d = TrainConfig()
    p = subparsers.add_parser(
        "train-mlm",
        help=help,
        description="Train a WordPiece vocabulary and a BERT-style masked LM from scratch. "
        "Fetch the default corpus with `apt-get download wordnet-base` and pass the .deb "
        "to --corpus, or give your own text with --train-file.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--corpus", "--corpus-dir", dest="corpus", metavar="DEB_OR_DIR",
                     help="wordnet-base .deb, or a directory containing WordNet's data.noun etc.")
    src.add_argument("--train-file", metavar="TXT", help="plain text, one training sentence per line")
    p.add_argument("--eval-file", metavar="TXT", help="held-out lines for validation (with --train-file)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output: model/ (HF checkpoint + tokenizer), held-out sets, metrics.json")
    for name, kind, helptext in [
        ("vocab_size", int, "WordPiece vocabulary size V"),
        ("hidden_size", int, "hidden width"),
        ("num_layers", int, "encoder layers"),
        ("num_heads", int, "attention heads"),
        ("intermediate_size", int, "feed-forward width"),
        ("max_length", int, "longest sequence in tokens (also max positions)"),
        ("steps", int, "optimizer steps"),
        ("batch_tokens", int, "padded tokens per batch"),
        ("learning_rate", float, "peak learning rate"),
        ("warmup_fraction", float, "fraction of steps spent warming up"),
        ("weight_decay", float, "AdamW weight decay"),
        ("seed", int, "seed of initialisation, shuffling and masking"),
    ]:
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(d, name),
                       help=f"{helptext} (default {getattr(d, name)})")
    p.add_argument("--eval-every", type=int, default=500, help="validate every N steps (0: never)")
    p.add_argument("--save-every", type=int, default=0, help="write checkpoints/step-N every N steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Build the corpus, train the tokenizer and the model, write everything under ``--out``."""
    from jaxjoint.tools import corpus as corpus_mod

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                            if f.name not in ("clip_norm", "mask_prob")})
    heldout_sets: dict[str, list[str]] = {}
    if args.corpus:
        splits = corpus_mod.build_corpus(args.corpus)
        train_lines, stats = splits.train, splits.stats
    else:
        train_lines = corpus_mod.read_lines(args.train_file)
        eval_lines = corpus_mod.read_lines(args.eval_file) if args.eval_file else []
        stats = {"source": str(args.train_file), "train_lines": len(train_lines)}
        if eval_lines:
            heldout_sets = {"eval": eval_lines}

    model_dir = out / "model"
    t0 = time.perf_counter()
    tokenizer = corpus_mod.train_tokenizer(train_lines, config.vocab_size, model_dir)
    if args.corpus:
        corpus_mod.select_heldout(splits, lambda t: len(tokenizer(t)["input_ids"]))
        corpus_mod.write_splits(splits, out / "corpus")
        corpus_mod.write_lines(out / "heldout_short.txt", splits.heldout_short)
        corpus_mod.write_lines(out / "heldout_news.txt", splits.heldout_news)
        eval_lines = splits.heldout_rest
        heldout_sets = {"heldout_short": splits.heldout_short, "heldout_news": splits.heldout_news}
    print(f"corpus: {json.dumps(stats)}", file=sys.stderr)
    if len(tokenizer) != config.vocab_size:
        # The vocabulary can come out smaller on a small corpus; the model follows it.
        config = dataclasses.replace(config, vocab_size=len(tokenizer))
    special = SpecialIds.of(tokenizer)
    data = tokenize_lines(tokenizer, train_lines, config.max_length)
    eval_data = tokenize_lines(tokenizer, eval_lines[:2000], config.max_length) if eval_lines else []
    print(f"tokenizer: V={len(tokenizer)}, {sum(len(s) for s in data)} training tokens "
          f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr)

    def checkpoint(step: int, params: Params) -> None:
        _save(out / "checkpoints" / f"step-{step}", config, jax.tree_util.tree_map(np.asarray, params), tokenizer)

    t1 = time.perf_counter()
    params, history = train(config, data, special, eval_data=eval_data, eval_every=args.eval_every,
                            on_checkpoint=checkpoint, checkpoint_every=args.save_every,
                            progress=not args.no_progress)
    train_seconds = time.perf_counter() - t1
    _save(model_dir, config, params, tokenizer)

    module = MaskedLMModule(config.encoder_config(special.pad))
    unigram = unigram_log_probs(data, config.vocab_size, special)
    report = heldout_report(module, params, tokenizer, heldout_sets, unigram, config.max_length)
    n_params = int(sum(np.size(x) for x in jax.tree_util.tree_leaves(params)))
    metrics = {
        "command": " ".join(sys.argv),
        "config": dataclasses.asdict(config),
        "corpus": stats,
        "parameters": n_params,
        "training_tokens": int(sum(len(s) for s in data)),
        "train_seconds": train_seconds,
        "final_train_loss": float(np.mean([h["loss"] for h in history[-50:]])),
        "heldout": report,
        "jax_version": jax.__version__,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(history) + "\n")
    for name, r in report.items():
        print(f"{name}: accuracy {r['masked_token_accuracy']:.3f} (unigram {r['unigram_accuracy']:.3f}), "
              f"pseudo-perplexity {r['pseudo_perplexity']:.1f} (unigram {r['unigram_perplexity']:.1f})",
              file=sys.stderr)
    print(f"wrote {model_dir} ({n_params} parameters, trained {train_seconds / 60:.1f} min)", file=sys.stderr)
    return 0
