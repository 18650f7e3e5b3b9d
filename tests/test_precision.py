"""Matmul precision: every float32 product of every family states its arithmetic in
the HLO, deviceless GPU and TPU programs carry the algorithm asked for, and the
emulation computes what the accelerators' arithmetic computes (checked against
float64 NumPy with NumPy's own rounding)."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxjoint import UserError
from jaxjoint.config import resolve_config, result_settings
from jaxjoint.models.config import encoder_config_from_hf
from jaxjoint.models.mlm import DTYPES
from jaxjoint.models.precision import ARITHMETIC, MODES, MatmulPrecision
from jaxjoint.plan.compile import fully_optimised, lower_tables, model_module
from jaxjoint.plan.models import abstract_params
from jaxjoint.plan.targets import quiet_stderr, resolve_target
from jaxjoint.sharding import local_mesh
from tests.hf_fixtures import hf_config
from tests.modern_fixtures import esm_config, modernbert_config

FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "modernbert", "esm")


def family_config(family: str):
    if family == "modernbert":
        hf = modernbert_config()
    elif family == "esm":
        hf = esm_config()
    else:
        hf = hf_config(family)
    return encoder_config_from_hf(hf.to_dict())


def stablehlo_dots(text: str) -> list[tuple[str, list[str]]]:
    """(line, operand element types) of every ``stablehlo.dot_general``."""
    dots = []
    for line in text.splitlines():
        if "stablehlo.dot_general" in line:
            operands = re.search(r":\s*\(([^)]*)\)\s*->", line).group(1)
            dots.append((line, re.findall(r"tensor<(?:[0-9?]+x)*([a-z]+[0-9]*)>", operands)))
    return dots


def lowered_programs(family: str, matmul_precision: str, dtype: str = "float32") -> str:
    """The StableHLO of the CPU tables program and the both-masked pass of ``family``."""
    from jaxjoint.models.mlm import mlm_logits

    config = family_config(family)
    mesh = local_mesh(1)
    tables = lower_tables(mesh, config, 16, dtype, n_chunks=2, chunk=8, matmul_precision=matmul_precision)
    module = model_module(mesh, config, dtype, matmul_precision)
    ids = jax.ShapeDtypeStruct((1, 16), jnp.int32)
    both = mlm_logits.lower(module, abstract_params(config), ids, ids, jax.ShapeDtypeStruct((1, 2), jnp.int32))
    return tables.as_text() + both.as_text()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_float32_product_states_float32(family):
    dots = stablehlo_dots(lowered_programs(family, "float32"))
    # projections, two attention products per layer, the head: none may be missed
    assert len(dots) >= 10
    for line, types in dots:
        assert types == ["f32", "f32"], line
        assert "precision = [HIGHEST, HIGHEST]" in line, line


@pytest.mark.parametrize("family", ["bert", "modernbert", "esm"])
def test_emulated_modes_round_their_operands_and_do_not_claim_float32(family):
    text = lowered_programs(family, "bfloat16")
    dots = stablehlo_dots(text)
    assert dots
    for line, _types in dots:
        assert "HIGHEST" not in line and "algorithm = <lhs_precision_type = f32" in line, line
    # TF32 keeps 10 mantissa bits, bfloat16 7: each emulation rounds to its own
    assert "format = e8m7" in text and "format = e8m10" not in text
    assert "format = e8m10" in lowered_programs(family, "tensorfloat32")


@pytest.mark.parametrize("family", ["bert", "esm"])
def test_bfloat16_dtype_has_bfloat16_operands_everywhere(family):
    dots = stablehlo_dots(lowered_programs(family, "bfloat16", dtype="bfloat16"))
    assert dots and all(types == ["bf16", "bf16"] for _, types in dots)


def compiled_text(target: str, matmul_precision: str) -> str:
    mesh = resolve_target(target).mesh()
    config = family_config("bert")
    lowered = lower_tables(mesh, config, 16, "float32", n_chunks=1, chunk=16, matmul_precision=matmul_precision)
    with quiet_stderr(), fully_optimised():
        return lowered.compile().as_text()


# What each mode must show in the programs XLA compiled: an algorithm on NVIDIA, an
# operand precision on TPU (whose compiler drops the algorithm presets).
COMPILED_MARK = {
    ("h100", "float32"): "algorithm=dot_tf32_tf32_f32_x3",
    ("h100", "tensorfloat32"): "algorithm=dot_tf32_tf32_f32",
    ("h100", "bfloat16"): "algorithm=dot_bf16_bf16_f32",
    ("v5e:2x2", "float32"): "operand_precision={highest,highest}",
    ("v5e:2x2", "tensorfloat32"): "operand_precision={high,high}",
}


@pytest.mark.parametrize("target,mode", [
    pytest.param("h100", "float32", marks=pytest.mark.slow),  # a 14 s compile: the fast tier has v5e
    ("v5e:2x2", "float32"),
    pytest.param("h100", "tensorfloat32", marks=pytest.mark.slow),
    pytest.param("h100", "bfloat16", marks=pytest.mark.slow),
    pytest.param("v5e:2x2", "tensorfloat32", marks=pytest.mark.slow),
])
def test_deviceless_programs_carry_the_algorithm_asked_for(target, mode):
    text = compiled_text(target, mode)
    products = [line for line in text.splitlines() if re.search(r"\b(dot|convolution)\(", line)]
    assert len(products) >= 6, "the compiled program lost its products"
    mark = COMPILED_MARK[target, mode]
    for line in products:
        assert re.search(re.escape(mark) + r"[,\s]", line + " "), line[:300]


def test_tpu_bfloat16_products_take_the_default_single_pass():
    text = compiled_text("v5e:2x2", "bfloat16")
    products = [line for line in text.splitlines() if re.search(r"\b(dot|convolution)\(", line)]
    assert products and not any("operand_precision" in line for line in products)


# --- the emulation against float64 NumPy ------------------------------------------------------


def round_mantissa(x: np.ndarray, bits: int) -> np.ndarray:
    """float32 ``x`` rounded to ``bits`` mantissa bits, to nearest even, by bit arithmetic."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    drop = 23 - bits
    half = (1 << (drop - 1)) - 1 + ((u >> drop) & 1)
    return (((u + half) >> drop) << drop).astype(np.uint32).view(np.float32)


def numpy_arithmetic(x: np.ndarray, y: np.ndarray, arithmetic: str) -> np.ndarray:
    """x @ y as ``arithmetic`` computes it, products and sums in float64."""
    bits = {"tf32": 10, "tf32_x3": 10, "bf16": 7, "bf16_x3": 7, "bf16_x6": 7}[arithmetic]

    def parts(a):
        hi = round_mantissa(a, bits)
        mid = round_mantissa(a - hi, bits)
        return hi.astype(np.float64), mid.astype(np.float64), round_mantissa(a - hi - mid, bits).astype(np.float64)

    (xh, xm, xl), (yh, ym, yl) = parts(x), parts(y)
    terms = {"tf32": [(xh, yh)], "bf16": [(xh, yh)],
             "tf32_x3": [(xh, yh), (xh, ym), (xm, yh)], "bf16_x3": [(xh, yh), (xh, ym), (xm, yh)],
             "bf16_x6": [(xh, yh), (xh, ym), (xm, yh), (xh, yl), (xl, yh), (xm, ym)]}[arithmetic]
    return sum(a @ b for a, b in terms)


@pytest.fixture(scope="module")
def operands():
    rng = np.random.default_rng(0)
    return rng.standard_normal((64, 256)).astype(np.float32), rng.standard_normal((256, 48)).astype(np.float32)


@pytest.mark.parametrize("platform,mode", [(p, m) for p, m in ARITHMETIC if p != "cpu" or m != "float32"])
def test_emulation_computes_the_accelerator_arithmetic(operands, platform, mode):
    x, y = operands
    precision = MatmulPrecision(mode, platform, emulate=True)
    got = np.asarray(precision.dot(jnp.asarray(x), jnp.asarray(y)), np.float64)
    want = numpy_arithmetic(x, y, precision.arithmetic)
    # what remains is float32 accumulation: a few ulp of the sum of |x||y|
    scale = np.abs(x).astype(np.float64) @ np.abs(y).astype(np.float64)
    assert np.max(np.abs(got - want) / scale) < 4e-7


def test_the_arithmetics_err_as_their_bits_say(operands):
    """Against the exact float64 product: the three-pass TF32 and six-pass bfloat16
    algorithms are float32-accurate, three bfloat16 passes are not, one pass is far off."""
    x, y = operands
    exact = x.astype(np.float64) @ y.astype(np.float64)
    scale = np.abs(x).astype(np.float64) @ np.abs(y).astype(np.float64)

    def error(platform, mode):
        got = MatmulPrecision(mode, platform, emulate=True).dot(jnp.asarray(x), jnp.asarray(y))
        return np.max(np.abs(np.asarray(got, np.float64) - exact) / scale)

    f32 = error("cpu", "float32")
    assert f32 < 1e-6
    assert error("gpu", "float32") < 2 * f32  # tf32_x3
    assert error("tpu", "float32") < 2 * f32  # bf16_x6
    assert 4 * f32 < error("tpu", "tensorfloat32") < 1e-5  # bf16_x3: about 16 bits
    assert 5e-5 < error("gpu", "tensorfloat32") < 1e-3  # tf32: 10 bits
    assert error("gpu", "bfloat16") > 4 * error("gpu", "tensorfloat32")  # bf16: 7 bits


@pytest.mark.slow  # 2·V + 1 passes in three arithmetics (about 15 s)
def test_emulated_float32_on_a_gpu_matches_float32_where_tf32_does_not(sharp_ckpt):
    """The tables of a real (tiny) checkpoint: GPU float32 (three TF32 passes,
    emulated) stays within float32's rounding of CPU float32; one TF32 pass does not."""
    from jaxjoint import load_mlm
    from jaxjoint.tables import pair_tables

    mlm = load_mlm(sharp_ckpt)
    ids = mlm.tokenizer("the cat sat on the mat")["input_ids"]

    def tables(**kw):
        model = mlm
        for key, value in kw.items():
            model = __import__("dataclasses").replace(model, **{key: value})
        t = pair_tables(model, ids, 2, 4)
        return np.asarray(t.logits_a[: t.vocab_size]), np.asarray(t.logits_b[: t.vocab_size])

    reference = tables()
    x3 = tables(emulate="gpu")
    tf32 = tables(emulate="gpu", matmul_precision="tensorfloat32")
    diff = lambda a, b: max(np.max(np.abs(p - q)) for p, q in zip(a, b))
    assert diff(x3, reference) < 2e-5 < 10 * diff(x3, reference) < diff(tf32, reference)


# --- the option ---------------------------------------------------------------------------------


def test_matmul_precision_follows_the_dtype_unless_given():
    assert resolve_config({}).matmul_precision == "float32"
    assert resolve_config({"dtype": "bfloat16"}).matmul_precision == "bfloat16"
    assert resolve_config({"matmul_precision": "tensorfloat32"}).matmul_precision == "tensorfloat32"
    with pytest.raises(UserError, match="matmul precision float32 needs dtype float32"):
        resolve_config({"dtype": "bfloat16", "matmul_precision": "float32"})
    with pytest.raises(UserError, match="unknown matmul_precision 'tf32'"):
        resolve_config({"matmul_precision": "tf32"})
    # a config.yaml from before the key existed is the float32 (or bfloat16) it computed
    assert result_settings({"dtype": "float32"})["matmul_precision"] == "float32"
    assert result_settings({"dtype": "bfloat16"})["matmul_precision"] == "bfloat16"


def test_modes_and_dtypes_are_the_documented_ones():
    assert MODES == ("float32", "tensorfloat32", "bfloat16") and set(DTYPES) == {"float32", "bfloat16"}
    for platform in ("cpu", "gpu", "tpu"):
        assert {m for p, m in ARITHMETIC if p == platform} == set(MODES)


# --- the error benchmark's plumbing -------------------------------------------------------------


@pytest.mark.slow
def test_precision_error_benchmark_reports_every_variant_and_resumes(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pairs, out = tmp_path / "pairs.jsonl", tmp_path / "error.json"
    variants = "float32 (GPU),bfloat16,--dtype bfloat16"
    command = [sys.executable, "-m", "benchmarks.precision_error", "--model", "bert-base", "--layers", "1",
               "--vocab", "1040", "--pairs", "1", "--variants", variants, "--out", str(pairs), "--json", str(out)]
    # The second run (a resume) compiles what the first did: a persistent compilation
    # cache shared by the two processes, as in test_distributed.
    env = dict(os.environ, XLA_FLAGS="", JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    run = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["variant"], r["method"]) for r in rows} == {
        (v, m) for v in variants.split(",") for m in ("mlm", "mrf", "mrf_logit", "hcb", "ag")}
    by = {(r["variant"], r["method"]): r for r in rows}
    # one bfloat16 pass moves the logits far more than three TF32 passes do
    assert by["float32 (GPU)", "ag"]["rel_dlogit"] < 1e-5 < by["bfloat16", "ag"]["rel_dlogit"]
    assert all(r["pairs"] == 1 for r in rows)
    lines = pairs.read_text()
    again = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and pairs.read_text() == lines  # resumed: nothing recomputed
