"""The three matmul precisions on this machine's accelerator: parity of ``float32``
with transformers, and the tables stage timed in every mode (``benchmarks/run_gpu.sh``).

    python -m benchmarks.matmul_modes parity --json parity.json
    python -m benchmarks.matmul_modes timing --shape bert-base-cased --length 32 --rows 8192 --json modes.json

``parity``: for each family, a random checkpoint made on the fly by transformers' own
classes (every weight perturbed, as the tests make them), its logits from jaxjoint in
each mode (``--matmul-precision`` float32, tensorfloat32, bfloat16, and ``--dtype
bfloat16``) against transformers' PyTorch model on the same kind of device (CUDA
when there is one, TF32 off) and in float64 on the CPU, as ``max |x - ref| /
max |ref|`` (``tests/test_models.py``). ``float32`` must agree with PyTorch within
1e-4; the other modes are reported, and must differ from ``float32`` (the mode reached
the device). The JSON is rewritten after each family; exit status 1 when a check fails.

``timing``: the tables stage (``jaxjoint.tables.substitution_table``) of a random-weight
model shape on one device, ``--rows`` substitutions of one sentence, in every mode on
the same shapes, beside the same device's measured rate of a large product in that
mode's arithmetic and the plan's roofline estimate (the executed FLOPs at the
published rate of that arithmetic, ``jaxjoint/plan/hardware``). The JSON is rewritten
after each mode, so a run cut short keeps what it finished.

``parity --tiny``: the test fixtures' sizes, for the suite's smoke test of run_gpu.sh.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import machine, model_shape, print_table, time_call, write_json
from jaxjoint import load_mlm
from jaxjoint.flops import sequence_flops
from jaxjoint.models.families import masked_lm_module
from jaxjoint.models.mlm import DTYPES, ModuleApply, random_params
from jaxjoint.models.precision import MatmulPrecision, platform_of
from jaxjoint.plan.hardware import chip_for_device_kind
from jaxjoint.plan.report import priced_arithmetic
from jaxjoint.sharding import make_mesh, padded_size, replicated
from jaxjoint.tables import bucket_length, chunking, substitution_table

# (dtype, matmul precision): the three modes, then bfloat16 compute.
VARIANTS = (("float32", "float32"), ("float32", "tensorfloat32"), ("float32", "bfloat16"),
            ("bfloat16", "bfloat16"))
FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "modernbert", "esm")
PARITY_RTOL = 1e-4
# Checkpoint sizes: big enough on a GPU that a TF32 or bfloat16 product shows in the
# logits; the test fixtures' own on the CPU.
GPU_SIZES = {"vocab_size": 2048, "hidden": 256, "layers": 4, "heads": 4, "intermediate": 1024,
             "max_positions": 128}
GPU_BATCH = (8, 64)  # sentences, tokens


def rel_err(x: np.ndarray, ref: np.ndarray) -> float:
    """max |x - ref| / max |ref|, as tests/test_models.py compares logits."""
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def _checkpoint(family: str, directory: Path, tiny: bool) -> Path:
    from tests.hf_fixtures import make_checkpoint
    from tests.modern_fixtures import make_esm_checkpoint, make_modernbert_checkpoint

    sizes = {} if tiny else dict(GPU_SIZES)
    if family == "modernbert":
        if sizes:
            sizes = {"vocab_size": sizes["vocab_size"], "hidden": 256, "layers": 3, "heads": 4,
                     "intermediate": 384, "local_attention": 16}
        return make_modernbert_checkpoint(directory, **sizes)
    if family == "esm":
        if sizes:
            sizes = {"hidden": 256, "layers": 4, "heads": 4, "intermediate": 1024}
        return make_esm_checkpoint(directory, **sizes)
    return make_checkpoint(directory, family, **sizes)


def _batch(mlm, rng: np.random.Generator, b: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, mask int[B, L] (padded rows) and positions int[B, 3] among each row's tokens."""
    from tests.modern_fixtures import ESM_AMINO_ACIDS, ESM_TOKENS, MODERNBERT_SPECIALS, padded_batch

    c = mlm.config
    if c.family == "esm":
        tokens, first = ESM_AMINO_ACIDS, ESM_TOKENS.index("<cls>")
    elif c.family == "modernbert":
        tokens, first = range(c.vocab_size - len(MODERNBERT_SPECIALS)), mlm.tokenizer.cls_token_id
    else:
        tokens, first = range(5, c.vocab_size), 2
    ids, mask, lengths = padded_batch(rng, b, length, tokens=tokens, pad=c.pad_token_id, first=first,
                                      min_len=max(3, length // 2))
    positions = np.stack([rng.integers(0, n, size=3) for n in lengths])
    return ids, mask, positions


def _torch_logits(model, ids: np.ndarray, mask: np.ndarray, device: str, dtype) -> np.ndarray:
    import torch

    model = model.to(device=device, dtype=dtype)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(ids, device=device), attention_mask=torch.as_tensor(mask, device=device))
    return out.logits.double().cpu().numpy()


def parity(args: argparse.Namespace) -> int:
    import torch
    import transformers

    # PyTorch's float32 reference computes float32 products, not TF32 ones.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    platform = platform_of(jax.devices()[0])
    b, length = (3, 17) if args.tiny else GPU_BATCH
    rows, checks = [], []
    for family in args.families:
        with tempfile.TemporaryDirectory(prefix="jaxjoint-parity-") as tmp:
            directory = _checkpoint(family, Path(tmp), args.tiny)
            base = load_mlm(directory)
            ids, mask, positions = _batch(base, np.random.default_rng(0), b, length)
            model = transformers.AutoModelForMaskedLM.from_pretrained(directory, attn_implementation="eager").eval()
            at = positions[:, :, None]
            ref = np.take_along_axis(_torch_logits(model, ids, mask, device, torch.float32), at, axis=1)
            ref64 = np.take_along_axis(_torch_logits(model, ids, mask, "cpu", torch.float64), at, axis=1)
            errors = {}
            for dtype, mode in VARIANTS:
                mlm = base.with_dtype(dtype).with_matmul_precision(mode)
                got = np.asarray(mlm.logits_at(ids, positions, attention_mask=mask), np.float64)
                errors[dtype, mode] = rel_err(got, ref)
                rows.append({
                    "family": family, "dtype": dtype, "matmul_precision": mode,
                    "arithmetic": priced_arithmetic(platform, dtype, mode), "V": base.vocab_size,
                    "hidden": base.config.hidden_size, "layers": base.config.num_layers, "batch": b, "length": length,
                    "rel_err_vs_torch": errors[dtype, mode], "rel_err_vs_float64": rel_err(got, ref64),
                    "torch_rel_err_vs_float64": rel_err(ref, ref64), "torch_device": device,
                })
        f32, bf16 = errors["float32", "float32"], errors["float32", "bfloat16"]
        checks += [{"family": family, "check": f"float32 within {PARITY_RTOL:g} of PyTorch", "value": f32,
                    "passed": f32 < PARITY_RTOL},
                   {"family": family, "check": "bfloat16 products differ from float32 ones", "value": bf16,
                    "passed": bf16 > f32}]
        passed = all(c["passed"] for c in checks)
        # after each family: a run cut short keeps the families it finished
        write_json(args.json, {"machine": machine(), "platform": platform, "torch_device": device,
                               "torch": torch.__version__, "transformers": transformers.__version__,
                               "families_done": len(checks) // 2, "passed": passed, "checks": checks,
                               "results": rows})
    print_table(rows, ["family", "dtype", "matmul_precision", "arithmetic", "rel_err_vs_torch",
                       "rel_err_vs_float64", "torch_rel_err_vs_float64"])
    print_table(checks, ["family", "check", "value", "passed"])
    return 0 if passed else 1


def _matmul_rate(precision: MatmulPrecision, dtype: str, n: int) -> float:
    """FLOP/s of an n x n x n product of random operands in ``precision``'s arithmetic."""
    key_a, key_b = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(key_a, (n, n), DTYPES[dtype])
    y = jax.random.normal(key_b, (n, n), DTYPES[dtype])
    product = jax.jit(lambda p, q: precision.einsum("ik,kj->ij", p, q, preferred_element_type=jnp.float32))
    return 2 * n**3 / time_call(lambda: product(x, y), repeats=10)


def timing(args: argparse.Namespace) -> int:
    config = model_shape(args.shape)
    if args.vocab:
        config = dataclasses.replace(config, vocab_size=args.vocab,
                                     pad_token_id=min(config.pad_token_id, args.vocab - 1))
    device = jax.devices()[0]
    platform = platform_of(device)
    chip = chip_for_device_kind(device.device_kind)
    mesh = make_mesh(jax.devices()[:1])
    params = jax.device_put(random_params(config), replicated(mesh))
    v = config.vocab_size
    rows = padded_size(min(args.rows or v, v), mesh)
    n_chunks, chunk = chunking(rows, args.chunk)
    bucket = bucket_length(args.length, config.max_positions)
    rng = np.random.default_rng(0)
    ids = np.full(bucket, config.pad_token_id, np.int32)
    ids[: args.length] = rng.integers(min(1000, v // 2), v, size=args.length)
    mask = (np.arange(bucket) < args.length).astype(np.int32)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    a, b, mask_id = jnp.int32(1), jnp.int32(args.length - 2), jnp.int32(min(4, v - 1))
    per_sequence = sequence_flops(config, bucket)
    executed_per_sequence = per_sequence * n_chunks * chunk / rows  # padded rows of the last chunk included
    n = args.matmul_size or (256 if platform == "cpu" else 8192)
    results = []
    for dtype, mode in VARIANTS:
        precision = MatmulPrecision(mode, platform)
        arithmetic = priced_arithmetic(platform, dtype, mode)
        module = masked_lm_module(config, DTYPES[dtype], precision)
        table = functools.partial(substitution_table, ModuleApply(module), params, ids, mask, a, b, mask_id,
                                  vocab=v, mesh=mesh, n_chunks=n_chunks, chunk=chunk, rows=rows)
        seconds = time_call(table, repeats=args.repeats)
        matmul = _matmul_rate(precision, dtype, n)
        seqs = rows / seconds
        published = chip.peak_flop_per_s.get(arithmetic) if chip else None
        row = {
            "shape": args.shape, "V": v, "length": args.length, "bucket": bucket, "dtype": dtype,
            "matmul_precision": mode, "arithmetic": arithmetic, "rows": rows, "chunk": chunk,
            "seconds": seconds, "sequences_per_s": seqs, "seconds_per_pair": 2 * v / seqs,
            "tables_flop_per_s": seqs * per_sequence, "matmul_flop_per_s": matmul, "matmul_size": n,
            "fraction_of_matmul": seqs * per_sequence / matmul,
            "published_flop_per_s": published,
            # the plan's roofline for this stage: executed FLOPs at the published rate (a floor)
            "est_seconds_per_pair": None if not published else 2 * v * executed_per_sequence / published,
        }
        row["measured_over_estimated"] = (None if row["est_seconds_per_pair"] is None else
                                          row["seconds_per_pair"] / row["est_seconds_per_pair"])
        results.append(row)
        for r in results:
            r["speed_vs_float32"] = results[0]["seconds"] / r["seconds"]
        write_json(args.json, {"machine": machine(), "platform": platform, "chip": chip and chip.name,
                               "kind": "measured (tables stage, one device)", "results": results})
    print_table(results, ["dtype", "matmul_precision", "arithmetic", "seconds_per_pair", "tables_flop_per_s",
                          "matmul_flop_per_s", "fraction_of_matmul", "est_seconds_per_pair",
                          "measured_over_estimated", "speed_vs_float32"])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    pa = sub.add_parser("parity", help="float32 mode against transformers on this device")
    pa.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ti = sub.add_parser("timing", help="the tables stage in every mode")
    ti.add_argument("--shape", default="bert-base-cased")
    ti.add_argument("--vocab", type=int, default=None, help="override V of the shape")
    ti.add_argument("--length", type=int, default=32)
    ti.add_argument("--rows", type=int, default=8192, help="substitutions timed (at most V)")
    ti.add_argument("--chunk", type=int, default=1024)
    ti.add_argument("--repeats", type=int, default=3)
    ti.add_argument("--matmul-size", type=int, default=None, help="n of the n x n x n product (CPU 256, else 8192)")
    pa.add_argument("--tiny", action="store_true", help="the test fixtures' sizes (the suite's smoke test)")
    for p in (pa, ti):
        p.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    return parity(args) if args.step == "parity" else timing(args)


if __name__ == "__main__":
    sys.exit(main())
