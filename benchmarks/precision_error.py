"""What each matmul precision does to the paper's numbers, measured by emulation on CPU.

    python -m benchmarks.precision_error                          # embedded default, its 300 short sentences
    python -m benchmarks.precision_error --model bert-base --pairs 20

A CPU computes every float32 product in float32, so the error of the accelerators'
faster arithmetic cannot be seen by running there. Here each arithmetic is emulated
exactly (``jaxjoint.models.precision``: operands rounded as the algorithm rounds
them, multi-pass algorithms as sums of hi/lo products, float32 accumulation) and a
pair's tables, all five joints and their metrics are computed under each:

| variant | arithmetic |
|---|---|
| ``float32 (GPU)`` | three TF32 passes, what ``--matmul-precision float32`` runs on NVIDIA |
| ``float32 (TPU)`` | six bfloat16 passes (``HIGHEST``), what it runs on TPU |
| ``tensorfloat32 (GPU)`` | one TF32 pass |
| ``tensorfloat32 (TPU)`` | three bfloat16 passes (``HIGH``) |
| ``bfloat16`` | one bfloat16 pass (either backend) |
| ``--dtype bfloat16`` | bfloat16 activations and products |

against exact float32 (the CPU's own). Reported per variant: the largest change of a
logit relative to the largest logit (what the parity checks bound at 1e-4) and of a
conditional log q; per method, the largest per-pair |ΔNLL| (of ``p_nll`` and
``u_nll``), and the relative change of P-PPL, U-PPL and both mean KLs. Per-pair
results are appended to a JSON Lines file as they are computed, so an interrupted
run resumes where it stopped (``--out``).

``--model bert-base``: random weights with bert-base-cased's width (hidden 768, 12
heads, feed-forward 3072) at V = 4096, ``--layers`` deep, the head's LayerNorm gain
raised to 8 so that its conditionals are as peaked as a trained model's (random
weights alone give near-uniform ones, whose metrics hide rounding); sentences are
random token ids of 10 to 16 tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import DEFAULT_MODEL_DIR, machine, model_shape, print_table, write_json
from jaxjoint import load_mlm
from jaxjoint.data import load_sentences, make_pairs, max_tokens
from jaxjoint.joints import METHODS
from jaxjoint.metrics import aggregate
from jaxjoint.models.mlm import MaskedLM, random_params
from jaxjoint.scoring import score_tables
from jaxjoint.tables import pair_tables

# name -> (dtype, matmul_precision, platform emulated)
VARIANTS: dict[str, tuple[str, str, str | None]] = {
    "float32 (exact)": ("float32", "float32", None),
    "float32 (GPU)": ("float32", "float32", "gpu"),
    "float32 (TPU)": ("float32", "float32", "tpu"),
    "tensorfloat32 (GPU)": ("float32", "tensorfloat32", "gpu"),
    "tensorfloat32 (TPU)": ("float32", "tensorfloat32", "tpu"),
    "bfloat16": ("float32", "bfloat16", "gpu"),
    "--dtype bfloat16": ("bfloat16", "bfloat16", None),
}
REFERENCE = "float32 (exact)"
AG = {"iters": 40}


def variant_model(mlm: MaskedLM, name: str) -> MaskedLM:
    dtype, mode, platform = VARIANTS[name]
    return dataclasses.replace(mlm, dtype=dtype, matmul_precision=mode, emulate=platform)


def bert_base_model(layers: int, vocab: int, seed: int = 0) -> MaskedLM:
    """Random weights at bert-base-cased's width and ``vocab`` rows, head gain 8."""
    config = dataclasses.replace(model_shape("bert-base-cased"), vocab_size=vocab, num_layers=layers)
    params = random_params(config, seed)
    params["head_norm"]["scale"] = params["head_norm"]["scale"] * 8.0
    return MaskedLM(config=config, params=jax.tree.map(jax.numpy.asarray, params), tokenizer=None,
                    hf_config={"mask_token_id": 103})


def random_pairs(count: int, vocab: int, seed: int = 0) -> list[tuple[int, list[int], int, int, tuple[int, int]]]:
    """(index, ids, a, b, gold): [CLS] + 8..14 random non-special ids + [SEP]."""
    rng = np.random.default_rng(seed)
    pairs = []
    for index in range(count):
        body = rng.integers(1000, vocab, rng.integers(8, 15)).tolist()
        ids = [101, *body, 102]
        a, b = sorted(rng.choice(np.arange(1, len(ids) - 1), 2, replace=False).tolist())
        pairs.append((index, ids, a, b, (ids[a], ids[b])))
    return pairs


def text_pairs(data: str, count: int, mlm: MaskedLM) -> list[tuple[int, list[int], int, int, tuple[int, int]]]:
    pairs, _ = make_pairs(load_sentences(data, count), mlm.tokenizer, masking="random", seed=0,
                          max_length=max_tokens(mlm.config))
    return [(p.index, list(p.input_ids), p.a, p.b, tuple(p.gold)) for p in pairs]


def conditionals(tables) -> tuple[jax.Array, jax.Array]:
    """The two V x V logit tables and their log-softmaxes log qA(a|b), log qB(b|a)."""
    v = tables.vocab_size
    fa, fb = tables.logits_a[:v], tables.logits_b[:v]
    return jnp.stack([fa, fb]), jnp.stack([jax.nn.log_softmax(fa, axis=0), jax.nn.log_softmax(fb, axis=1)])


def score(mlm: MaskedLM, ids: list[int], a: int, b: int, gold: tuple[int, int],
          reference: tuple[jax.Array, jax.Array] | None) -> tuple[dict[str, Any], Any]:
    """A pair's record under ``mlm``, and its tables' (logits, log q). With the
    reference's (logits, log q): the largest |Δ logit| relative to the largest
    |logit| (what the parity checks bound at 1e-4), and the largest |Δ log q|."""
    tables = pair_tables(mlm, np.asarray(ids), a, b)
    logits, log_q = conditionals(tables)
    metrics, unary = score_tables(tables, gold, METHODS, AG, None)
    record = {"metrics": metrics, "mlm_unary_u_nll": unary}
    if reference is not None:
        record["rel_dlogit"] = float(jnp.max(jnp.abs(logits - reference[0])) / jnp.max(jnp.abs(reference[0])))
        record["max_abs_dlogq"] = float(jnp.max(jnp.abs(log_q - reference[1])))
    return record, (logits, log_q)


def logits_vs_float64(mlm: MaskedLM, pairs: list, directory: Path, variants: list[str],
                      count: int = 64) -> list[dict[str, Any]]:
    """Each variant's logits at A against transformers' PyTorch model in float64, for
    ``count`` sentences of ``pairs`` (A masked): max |Δ| / max |logit| (the parity
    checks' 1e-4) and the RMS of Δ / RMS of the logits. Exact float32 is in the list,
    so each arithmetic's error stands beside float32's own."""
    import torch
    import transformers

    from jaxjoint.models.checkpoint import save_checkpoint

    if not (directory / "config.json").is_file():
        save_checkpoint(directory, mlm.config, jax.device_get(mlm.params), mask_token_id=mlm.mask_token_id)
    model = transformers.AutoModelForMaskedLM.from_pretrained(directory, attn_implementation="eager").double().eval()
    rows = []
    chosen = pairs[:count]
    width = max(len(ids) for _, ids, *_ in chosen)
    ids = np.full((len(chosen), width), mlm.config.pad_token_id, np.int32)
    mask = np.zeros_like(ids)
    for i, (_, sentence, a, _, _) in enumerate(chosen):
        ids[i, :len(sentence)], mask[i, :len(sentence)] = sentence, 1
        ids[i, a] = mlm.mask_token_id
    positions = np.array([a for _, _, a, _, _ in chosen])
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    reference = out[np.arange(len(chosen)), positions]
    for name in variants:
        got = np.asarray(variant_model(mlm, name).logits_at(ids, positions, mask), np.float64)
        delta = got - reference
        rows.append({"variant": name, "sentences": len(chosen),
                     "rel_max": float(np.abs(delta).max() / np.abs(reference).max()),
                     "rel_rms": float(np.sqrt(np.mean(delta**2) / np.mean(reference**2)))})
    return rows


def flat(records: list[dict]) -> list[dict]:
    """``metrics.aggregate``'s input: one row per pair and method."""
    return [{"method": m, **values} for r in records for m, values in r["metrics"].items()]


def summarise(records: dict[str, dict[int, dict]]) -> list[dict[str, Any]]:
    """Per variant and method: max |ΔNLL| and relative changes of the aggregates,
    over the pairs every variant has."""
    common = sorted(set.intersection(*(set(r) for r in records.values())))
    ref = [records[REFERENCE][i] for i in common]
    ref_summary = aggregate(flat(ref))
    rows = []
    for name in records:
        if name == REFERENCE:
            continue
        mine = [records[name][i] for i in common]
        summary = aggregate(flat(mine))
        for method in METHODS:
            dnll = max(max(abs(x["metrics"][method][k] - y["metrics"][method][k]) for k in ("p_nll", "u_nll"))
                       for x, y in zip(mine, ref))
            rel = {key: abs(summary[method][key] / ref_summary[method][key] - 1)
                   for key in ("p_ppl", "u_ppl", "kl_gold", "kl_all")}
            rows.append({"variant": name, "method": method, "pairs": len(common),
                         "rel_dlogit": max(r["rel_dlogit"] for r in mine),
                         "max_abs_dlogq": max(r["max_abs_dlogq"] for r in mine), "max_abs_dnll": dnll,
                         **{f"rel_{k}": v for k, v in rel.items()}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", choices=("default", "bert-base"))
    parser.add_argument("--data", default="default", help="the default model's sentence set")
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--layers", type=int, default=12, help="bert-base's depth (12 is the real one)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--out", default=None, help="JSON Lines of per-pair results (resumed)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",")]
    if REFERENCE not in variants:
        variants.insert(0, REFERENCE)

    if args.model == "default":
        mlm = load_mlm(DEFAULT_MODEL_DIR)
        pairs = text_pairs(args.data, args.pairs, mlm)
        label = f"default on {args.data}"
    else:
        mlm = bert_base_model(args.layers, args.vocab)
        pairs = random_pairs(args.pairs, args.vocab)
        label = f"bert-base width, {args.layers} layers, V = {args.vocab}"
    out = Path(args.out or f"benchmarks/results/cpu/precision_error_{args.model}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[int, dict]] = {v: {} for v in variants}
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            if r["variant"] in records:
                records[r["variant"]][r["index"]] = r
    models = {v: variant_model(mlm, v) for v in variants}
    start = time.perf_counter()
    with out.open("a") as sink:
        for index, ids, a, b, gold in pairs:  # every variant of a pair before the next pair
            if all(index in records[v] for v in variants):
                continue
            reference = None
            for v in variants:  # the reference first: the others are compared with its tables
                result, computed = score(models[v], ids, a, b, gold, reference)
                reference = reference or computed
                if index in records[v]:
                    continue
                records[v][index] = record = {"variant": v, "index": index, **result}
                sink.write(json.dumps(record) + "\n")
                sink.flush()
            print(f"pair {index}: {time.perf_counter() - start:.0f} s", flush=True)
    rows = summarise({v: records[v] for v in variants})
    checkpoint_dir = out.with_suffix(".checkpoint") if args.model == "bert-base" else DEFAULT_MODEL_DIR
    float64 = logits_vs_float64(mlm, pairs, checkpoint_dir, variants)
    print(f"\nlogits at A against transformers in float64 ({float64[0]['sentences']} sentences)")
    print_table(float64, ["variant", "sentences", "rel_max", "rel_rms"])
    print(f"\n{label}")
    print_table(rows, ["variant", "method", "pairs", "rel_dlogit", "max_abs_dlogq", "max_abs_dnll", "rel_p_ppl",
                       "rel_u_ppl", "rel_kl_gold", "rel_kl_all"])
    write_json(args.json or f"benchmarks/results/cpu/precision_error_{args.model}.json",
               {"machine": machine(), "model": label, "ag": AG, "rows": rows, "logits_vs_float64": float64})


if __name__ == "__main__":
    main()
