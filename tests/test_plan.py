"""jaxjoint.plan: deviceless targets, compiled memory and FLOPs, the chunk search, fit verdicts.

No GPU or TPU is present: the targets are compile-only devices built by JAX's CUDA
plugin and libtpu (both in the test install). Compiles for them are slow on a
small host, so the fast tier compiles a handful of tiny programs; whole plans are
``slow``. The on-disk cache of analyses is off throughout, so every number here
comes from a compile made by the test.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxjoint import FunctionMLM
from jaxjoint.errors import UserError
from jaxjoint.flops import pair_flops, sequence_flops
from jaxjoint.joints import AG_ITERS, METHODS
from jaxjoint.models.config import EncoderConfig
from jaxjoint.models.precision import ARITHMETIC, MODES
from jaxjoint.plan import cache, fit, format_plan, largest_fitting_chunk, make_plan, planning_config, resolve_target
from jaxjoint.plan.compile import ag_pass_program, hlo_cost_analysis, kernel_bytes, local_rows, xla_cost
from jaxjoint.plan.hardware import chips
from jaxjoint.plan.models import own_model
from jaxjoint.plan.planner import AG_CONVERGED_PASSES, _ag_converged_passes, _ag_iterations
from jaxjoint.plan.report import priced_arithmetic, roofline, table_passes
from jaxjoint.sharding import make_mesh
from jaxjoint.tables import chunking
from tests.hf_fixtures import hf_config
from tests.own_model import CLS, MASK, PAD, SEP, tiny_apply, tiny_params

TINY = EncoderConfig(
    family="bert", vocab_size=1024, hidden_size=64, embedding_size=64, num_layers=1, num_heads=2,
    intermediate_size=128, max_positions=64, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu",
    pad_token_id=0)


pytestmark = pytest.mark.usefixtures("fresh_plan_cache")


# --- targets and data ----------------------------------------------------------------


def test_gpu_targets_are_compile_only_devices_of_the_named_gpu():
    one = resolve_target("h100")
    assert one.device_count == 1 and one.hosts == 1
    assert one.devices[0].device_kind == "NVIDIA H100 80GB HBM3"
    # JAX's GPU allocator takes 75% of device memory by default.
    assert one.usable_bytes_per_device == int(0.75 * 84942979072)
    eight = resolve_target("h100x8")
    assert eight.device_count == 8 and eight.hosts == 1
    sixteen = resolve_target("h200x16")
    assert sixteen.device_count == 16 and sixteen.hosts == 2
    assert sixteen.devices[0].device_kind == "NVIDIA H200 141GB HBM3e"


def test_tpu_targets_are_libtpu_topologies():
    v5e = resolve_target("v5e:2x2")
    assert v5e.device_count == 4 and v5e.devices[0].device_kind == "TPU v5 lite"
    assert v5e.usable_bytes_per_device == chips()["v5e"].usable_memory_bytes
    v4 = resolve_target("v4:2x2x1")  # megacore: one device per chip
    assert v4.device_count == 4
    single = resolve_target("v5p:1x1x1")
    assert single.device_count == 1 and single.devices[0].device_kind == "TPU v5"


@pytest.mark.parametrize("name", ["h300", "h100x3x", "h100x12", "v5e:3x7", "tpu", ""])
def test_unknown_targets_are_one_line_user_errors(name):
    with pytest.raises(UserError) as err:
        resolve_target(name)
    assert "\n" not in str(err.value)


def test_hardware_files_cite_sources_and_agree_with_the_gpu_descriptions():
    for chip in chips().values():
        assert chip.sources and all(chip.sources)
        assert chip.peak_flop_per_s and all(rate > 0 for rate in chip.peak_flop_per_s.values())
        assert chip.hbm_bandwidth_bytes_per_s > 0 and chip.memory_bytes > 0
        if chip.platform == "gpu":
            info = chip.target_config["gpu_device_info"]
            assert info["device_memory_size"] == chip.memory_bytes
            # the description's bandwidth is the device query's, within 1% of the datasheet's
            assert info["memory_bandwidth"] == pytest.approx(chip.hbm_bandwidth_bytes_per_s, rel=0.05)
        else:
            assert chip.usable_memory_bytes <= chip.memory_bytes


# Dense rates from the datasheets (TFLOP/s): NVIDIA's FP32, TF32 and BF16 tensor core
# figures (half the "with sparsity" ones); each TPU's published bfloat16 peak.
GPU_RATES = {"h100": (67, 494.7, 989.4), "h200": (67, 494.7, 989.4), "a100": (19.5, 156, 312),
             "b200": (75, 1100, 2250)}
TPU_RATES = {"v4": 275, "v5e": 197, "v5p": 459, "v6e": 918}


def test_hardware_files_carry_the_dense_rate_of_each_arithmetic():
    assert set(chips()) == set(GPU_RATES) | set(TPU_RATES)
    for key, chip in chips().items():
        rates = {name: rate / 1e12 for name, rate in chip.peak_flop_per_s.items()}
        if chip.platform == "gpu":
            f32, tf32, bf16 = GPU_RATES[key]
            assert rates == pytest.approx({"f32": f32, "tf32": tf32, "tf32_x3": tf32 / 3, "bf16": bf16}, rel=1e-6)
        else:
            bf16 = TPU_RATES[key]
            assert rates == pytest.approx({"bf16": bf16, "bf16_x3": bf16 / 3, "bf16_x6": bf16 / 6}, rel=1e-6)
        assert set(chip.peak_sources) == set(rates) and all(chip.peak_sources.values())
        # every arithmetic a mode compiles to on this platform is priced (and a GPU's
        # true float32, what the float32 mode's three TF32 passes are set against)
        compiled = {ARITHMETIC[chip.platform, mode] for mode in MODES} | {"bf16"}
        assert compiled | ({"f32"} if chip.platform == "gpu" else set()) == set(rates)


@pytest.mark.parametrize("key", ["h100", "a100", "b200", "v5e", "v5p"])
def test_the_estimate_prices_the_arithmetic_each_mode_compiles_to(key):
    """No compile: the roofline of a bert-base pair at 32 tokens (counted FLOPs) at
    each mode's rate; float32 on an H100 is three TF32 passes, 165 TFLOP/s."""
    chip = chips()[key]
    expected = ({"float32": "tf32_x3", "tensorfloat32": "tf32", "bfloat16": "bf16"} if chip.platform == "gpu" else
                {"float32": "bf16_x6", "tensorfloat32": "bf16_x3", "bfloat16": "bf16"})
    for mode in MODES:
        assert priced_arithmetic(chip.platform, "float32", mode) == expected[mode]
        assert priced_arithmetic(chip.platform, "bfloat16", mode) == "bf16"
    assert priced_arithmetic("cpu", "float32", "float32") == "f32"
    config = planning_config("bert-base-cased")[1]
    v = config.vocab_size
    executed = 2 * v * sequence_flops(config, 32) + sequence_flops(config, 32, 2)

    def estimate(arithmetic):
        return roofline(chip, arithmetic, executed_flops_per_device=executed, tables_bytes_per_device=4 * v * v,
                        table_bytes=4 * v * v, passes=table_passes(METHODS, AG_ITERS), xla_tables_seconds=None)

    faithful, fast = estimate(expected["float32"]), estimate("bf16")
    assert faithful.arithmetic == expected["float32"] and fast.arithmetic == "bf16"
    assert faithful.flop_per_s == chip.peak_flop_per_s[expected["float32"]]
    assert faithful.tables_seconds == pytest.approx(executed / faithful.flop_per_s)
    assert faithful.seconds_per_pair >= 2 * fast.seconds_per_pair
    if key == "h100":
        assert faithful.seconds_per_pair >= pair_flops(config, 32) / 165e12
    assert estimate("no_such_arithmetic") is None


# --- AG: one compiled pass, and the passes a plan prices ---------------------------------


@pytest.mark.parametrize("target,vocab", [
    ("v5e:2x2", 2048),
    # GPU: one Pallas kernel (joints/gpu_pass.py), counted at its operands and results,
    # plus XLA's sum of its partial column sums (2/16 of a read). XLA's own two
    # reductions wrote the cells out and read them back: 3.0x.
    pytest.param("h100x8", 4096, marks=pytest.mark.slow),
])
def test_one_compiled_ag_pass_reads_the_table_about_once(target, vocab):
    """XLA's count of the bytes of one AG pass (compiled deviceless, no loop: GPU and
    TPU take the whole local table at once) against one read of the local table:
    at most issue 21's 1.3x."""
    mesh = resolve_target(target).mesh()
    cost = ag_pass_program(mesh, vocab)
    one_read = 4 * local_rows(mesh, vocab) * vocab
    assert one_read <= cost.bytes_accessed <= 1.3 * one_read
    assert cost.peak_bytes <= 1.1 * one_read  # the cells are not materialised beside the table


def test_kernel_bytes_reads_a_kernels_operands_and_results():
    """``kernel_bytes`` on an HLO module's text: a Triton custom call's operands and
    results, nothing for XLA's own instructions (its cost analysis counts those)."""
    text = """ENTRY %main (e.1: f32[64,100], u.1: f32[64]) -> (f32[64], f32[100]) {
  %e.1 = f32[64,100]{1,0} parameter(0)
  %u.1 = f32[64]{0} parameter(1)
  %k = (f32[64]{0}, f32[4,100]{1,0}) custom-call(%e.1, %u.1), custom_call_target="__gpu$xla.gpu.triton"
  %p = f32[4,100]{1,0} get-tuple-element(%k), index=1
  %s = f32[100]{0} fusion(%p), kind=kInput, calls=%fused_reduce
  %o = bf16[8]{0} custom-call(%u.1), custom_call_target="something_else"
}"""
    assert kernel_bytes(text) == 4 * (64 * 100 + 64) + 4 * (64 + 4 * 100)


def test_ag_is_priced_at_the_passes_a_tolerance_takes():
    """No compile: the fixed count prices ag at its iterations; a tolerance at the
    assumed passes (--ag-passes; default AG_CONVERGED_PASSES), capped by max_iters;
    ag_converged likewise; AG's passes are priced at a compiled pass's bytes."""
    assert _ag_iterations({"iters": None}) == AG_ITERS and _ag_iterations({"iters": 7}, 300) == 7
    assert _ag_iterations({"tol": 1e-6, "max_iters": 10_000}) == AG_CONVERGED_PASSES
    assert _ag_iterations({"tol": 1e-6, "max_iters": 10_000}, 123) == 123
    assert _ag_iterations({"tol": 1e-6, "max_iters": 50}, 123) == 50
    assert _ag_converged_passes({"iters": 40}, ("ag",), 123) is None
    assert _ag_converged_passes({"iters": 40, "ag_converged": {"tol": 1e-6}}, ("ag", "ag_converged"), None) == (
        AG_CONVERGED_PASSES)
    assert _ag_converged_passes({"ag_converged": {"tol": 1e-6, "max_iters": 90}}, ("ag_converged",), 123) == 90
    assert table_passes(("ag_converged",), 0, 5) == table_passes(("ag",), 5) == 4 + 2 + 3 + 5 + 2

    chip = chips()["h100"]
    table = 4 * 28996**2

    def joints_seconds(**ag):
        est = roofline(chip, "bf16", executed_flops_per_device=1.0, tables_bytes_per_device=1.0, table_bytes=table,
                       passes=table_passes(("ag",), 0), xla_tables_seconds=None, **ag)
        return est.joints_seconds

    bandwidth = chip.hbm_bandwidth_bytes_per_s
    base = joints_seconds()
    assert joints_seconds(ag_passes=500) - base == pytest.approx(500 * table / bandwidth)
    assert joints_seconds(ag_passes=500, ag_pass_bytes=2 * table) - base == pytest.approx(1000 * table / bandwidth)


def test_ag_passes_is_a_plan_option():
    from jaxjoint.config import PlanOptions, resolve_options

    assert resolve_options(PlanOptions, {"target": "h100", "ag_passes": 80}).ag_passes == 80
    assert resolve_options(PlanOptions, {"target": "h100"}).ag_passes is None
    with pytest.raises(UserError):
        resolve_options(PlanOptions, {"target": "h100", "ag_passes": 0})
    with pytest.raises(UserError):
        make_plan("h100", TINY, ag_passes=0)


def test_shipped_model_configs_resolve_offline():
    name, base = planning_config("bert-base-cased")
    assert (base.vocab_size, base.hidden_size, base.num_layers, base.num_heads, base.intermediate_size) == (
        28996, 768, 12, 12, 3072)
    assert planning_config("google-bert/bert-large-cased")[1].num_layers == 24
    xlmr = planning_config("xlm-roberta-large")[1]
    assert xlmr.family == "roberta" and xlmr.vocab_size == 250002 and xlmr.padding_aware_positions
    distil = planning_config("distilbert-base-uncased")[1]
    assert distil.num_layers == 6 and distil.vocab_size == 30522
    assert planning_config("answerdotai/ModernBERT-base")[1] == planning_config("ModernBERT-base")[1]
    assert planning_config("esm2_t6_8M_UR50D")[1].family == "esm"


def test_a_local_directory_plans_from_its_config_json(tmp_path):
    hf_config("roberta", vocab_size=77, hidden=48).save_pretrained(tmp_path)
    name, config = planning_config(str(tmp_path))
    assert config.vocab_size == 77 and config.hidden_size == 48 and config.family == "roberta"
    with pytest.raises(UserError):
        planning_config(str(tmp_path / "missing"))
    for content, message in ((b"[1, 2]", "config.json must hold a JSON object, not a list"),
                             (b"\xff\xfe{", "cannot read .*config.json as JSON")):
        (tmp_path / "config.json").write_bytes(content)
        with pytest.raises(UserError, match=message):
            planning_config(str(tmp_path))


def test_unknown_model_offline_is_a_one_line_user_error():
    with pytest.raises(UserError) as err:
        planning_config("someone/no-such-model")
    assert "\n" not in str(err.value)


# --- compiled analyses -------------------------------------------------------------------


def test_hlo_cost_analysis_detour_counts_a_gpu_matmul():
    """cost_analysis() is None for the CUDA plugin's compile-only devices; the pinned
    private detour must still give a matrix product's 2 M N K FLOPs per device."""
    mesh = resolve_target("h100x2").mesh()
    rows, rep = NamedSharding(mesh, P("vocab", None)), NamedSharding(mesh, P())
    compiled = jax.jit(lambda a, b: a @ b, out_shardings=rows).lower(
        jax.ShapeDtypeStruct((512, 256), jnp.float32, sharding=rows),
        jax.ShapeDtypeStruct((256, 128), jnp.float32, sharding=rep)).compile()
    assert compiled.cost_analysis() is None
    product = 2 * 256 * 256 * 128  # 256 rows per device
    # the product, plus a few percent of elementwise work around the GEMM fusion
    assert product <= hlo_cost_analysis(compiled)["flops"] <= 1.02 * product
    assert xla_cost(compiled) == hlo_cost_analysis(compiled)


def test_hlo_cost_analysis_detour_agrees_with_cost_analysis_on_cpu():
    compiled = jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(
        jax.ShapeDtypeStruct((64, 32), jnp.float32), jax.ShapeDtypeStruct((32, 16), jnp.float32)).compile()
    direct = compiled.cost_analysis()
    direct = direct[0] if isinstance(direct, list) else direct
    assert hlo_cost_analysis(compiled)["flops"] == direct["flops"]


@pytest.mark.parametrize("target", [pytest.param("h100", marks=pytest.mark.slow), "v5e:2x2"])
def test_tables_program_flops_agree_with_jaxjoint_flops(target):
    """XLA's count of one chunk (lax.map's body, counted once) over the chunk is the
    counted FLOPs of a sequence, plus elementwise work (a few percent at this width).
    Products in one pass (matmul precision bfloat16): XLA's cost analysis counts the
    operand splits of float32's three TF32 passes on NVIDIA as elementwise work too
    (1.17 times the count here), which is the algorithm's, not the model's."""
    mesh = resolve_target(target).mesh()
    cost = fit.tables_cost(mesh, TINY, 16, "float32", 64, matmul_precision="bfloat16")
    n_chunks, chunk = chunking(local_rows(mesh, TINY.vocab_size), 64)
    ours = sequence_flops(TINY, 16)
    assert ours <= cost.flops / chunk <= 1.1 * ours
    # the table this call writes: its rows of float32[Vp, V] on one device, which a
    # TPU lays out in tiles of 8 x 128
    rows, v = local_rows(mesh, TINY.vocab_size), TINY.vocab_size
    assert 4 * rows * v <= cost.output_bytes <= 4 * (-(-rows // 8) * 8) * (-(-v // 128) * 128)
    assert cost.peak_bytes >= cost.output_bytes + cost.argument_bytes


@pytest.mark.slow  # about 6 compiles, 12 s
def test_chunk_found_by_compiling_is_the_largest_that_fits():
    """Budget between what 8 and what every row at once need: the search must land
    on a chunk that fits whose next size up (compiled afresh) does not."""
    mesh = make_mesh(jax.devices()[:1])
    config = EncoderConfig(**{**TINY.__dict__, "vocab_size": 2000})
    small = fit.tables_cost(mesh, config, 16, "float32", 8)
    large = fit.tables_cost(mesh, config, 16, "float32", 2000)
    need_small = small.peak_bytes + small.output_bytes
    need_large = large.peak_bytes + large.output_bytes
    assert need_large > need_small
    budget = need_small + (need_large - need_small) // 3
    choice = largest_fitting_chunk(mesh, config, 16, "float32", budget_bytes=budget)
    assert choice is not None and choice.chunk_size % 8 == 0 and 8 < choice.chunk_size < 2000
    cache.clear_memory()
    assert fit.tables_fit(fit.tables_cost(mesh, config, 16, "float32", choice.chunk_size), budget)
    assert not fit.tables_fit(fit.tables_cost(mesh, config, 16, "float32", choice.chunk_size + 8), budget)
    assert choice.compiles <= 6, choice.compiles
    assert largest_fitting_chunk(mesh, config, 16, "float32", budget_bytes=need_small - 1) is None


# --- whole plans (slow: a dozen compiles each) -----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("target", ["v5e:2x2", "h100"])
def test_small_model_plan_fits(target, tmp_path):
    report = make_plan(target, TINY, lengths=[16], dtype="bfloat16", methods=("mrf", "ag"))
    assert report.fits and report.reason is None
    data = report.to_json()
    assert data["peak_bytes_per_device"] <= data["hbm_bytes_per_device"]
    assert data["peak_bytes_per_device"] <= report.usable_bytes_per_device
    assert data["flops_per_pair"] == pair_flops(TINY, 16)
    # XLA also counts elementwise work (GELU, softmax, LayerNorm, bfloat16 casts):
    # about 10% of a pass at width 64, under 1% at bert-base's 768.
    assert pair_flops(TINY, 16) <= data["xla_flops_per_pair"] <= 1.15 * pair_flops(TINY, 16)
    # no faster than every chip at its bfloat16 rate allows
    assert data["arithmetic"] == "bf16" and data["priced_flop_per_s"] == report.chip.peak_flop_per_s["bf16"]
    floor = pair_flops(TINY, 16) / (report.devices * report.chip.peak_flop_per_s["bf16"])
    assert data["estimated_seconds_per_pair"] >= floor
    for key in ("target", "devices", "fits", "reason", "chunk_size", "peak_bytes_per_device",
                "hbm_bytes_per_device", "flops_per_pair", "estimated_seconds_per_pair"):
        assert key in data
    json.dumps(data)
    text = format_plan(report)
    assert "estimated" in text and "compiled, not run" in text


# The TPU's pricing (bf16_x6 at a sixth of the bf16 peak) is checked without compiling
# by the fast tests above; one compiled plan through the command is enough for the CI budget.
@pytest.mark.slow
@pytest.mark.parametrize("target,arithmetic", [("h100", "tf32_x3")])
def test_plan_command_prices_each_precision_at_its_rate(target, arithmetic, tmp_path, capsys):
    """``jaxjoint plan`` of a small model: the default float32 is priced at the rate of
    the arithmetic it compiles to (three TF32 passes on an H100, six bfloat16 passes on
    a TPU), --dtype bfloat16 at the bfloat16 rate, and the report says which."""
    from jaxjoint.cli import main

    # wide enough that the tables stage is compute-bound even at the bfloat16 rate
    hf_config("bert", vocab_size=1024, hidden=256, layers=2, heads=4, intermediate=512).save_pretrained(tmp_path)
    plans = {}
    for name, flags in (("float32", []), ("bfloat16", ["--dtype", "bfloat16"])):
        out = tmp_path / f"{name}.json"
        main(["plan", "--target", target, "--model", str(tmp_path), "--length", "16", "--methods", "mrf",
              "--json", str(out), *flags])
        plans[name] = json.loads(out.read_text())
        text = capsys.readouterr().out
        expected = arithmetic if name == "float32" else "bf16"
        assert f"compiles to {expected}" in text and "TFLOP/s" in text
    chip = resolve_target(target).chip
    for name, expected in (("float32", arithmetic), ("bfloat16", "bf16")):
        data = plans[name]
        assert data["matmul_precision"] == name and data["arithmetic"] == expected
        assert data["priced_flop_per_s"] == chip.peak_flop_per_s[expected]
        (bucket,) = data["buckets"]
        assert bucket["priced_arithmetic"] == expected
        # compute-bound: the tables stage is the executed FLOPs at that rate
        per_device = bucket["executed_flops_per_pair"] / data["devices"]
        assert bucket["estimated_tables_seconds"] == pytest.approx(per_device / chip.peak_flop_per_s[expected])
    ratio = chip.peak_flop_per_s["bf16"] / chip.peak_flop_per_s[arithmetic]
    tables = [plans[name]["buckets"][0]["estimated_tables_seconds"] for name in ("float32", "bfloat16")]
    assert tables[0] == pytest.approx(ratio * tables[1], rel=0.05)  # chunks may differ by padding


@pytest.mark.slow
def test_a_model_that_cannot_fit_says_why_in_one_line():
    """A 250,002-token vocabulary: one pair's tables are 500 GB, past one H100."""
    config = EncoderConfig(**{**TINY.__dict__, "vocab_size": 250002})
    report = make_plan("h100", config, lengths=[16], methods=("mrf",), suggest=False)
    assert not report.fits
    assert report.reason and "\n" not in report.reason
    assert "500.0 GB" in report.reason and "H100" in report.reason
    assert report.to_json()["peak_bytes_per_device"] > report.usable_bytes_per_device


@pytest.mark.slow
def test_reason_names_the_device_count_that_fits():
    """V = 100,000: one pair's tables are 80 GB, past one H100 or two but not four
    (a queued pair and the assembly's three tables: 2.5 pairs a device), and the
    suggestion is compiled on the four before it is named."""
    config = EncoderConfig(**{**TINY.__dict__, "vocab_size": 100_000})
    report = make_plan("h100", config, lengths=[16], methods=())
    assert not report.fits
    assert "\n" not in report.reason
    assert "fits on 4 devices (h100x4)" in report.reason
    assert make_plan("h100x4", config, lengths=[16], methods=()).fits
    assert not make_plan("h100x2", config, lengths=[16], methods=(), suggest=False).fits


def test_cpu_only_start_keeps_stderr_clean_with_the_plugins_installed():
    """With the CUDA plugin and libtpu installed and JAX_PLATFORMS unset, JAX probes for
    both at start-up (a cuDNN traceback, libtpu warnings); on a machine showing neither
    device, use_cpu_when_no_accelerator starts the CPU backend alone, silently."""
    import os
    import subprocess
    import sys

    from jax._src import hardware_utils

    if hardware_utils.has_visible_nvidia_gpu() or hardware_utils.num_available_tpu_chips_and_device_id()[0]:
        pytest.skip("an accelerator is visible: JAX should probe for it")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = ("from jaxjoint.sharding import use_cpu_when_no_accelerator as f; f(); "
            "import jax; print(jax.devices()[0].platform)")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "cpu"
    assert run.stderr == ""


@pytest.mark.slow
def test_local_plan_compiles_for_this_process_devices():
    report = make_plan("local", TINY, lengths=[16], methods=("mrf",))
    assert report.target == "local" and report.devices == jax.local_device_count()
    assert report.fits and report.worst.peak_bytes <= report.usable_bytes_per_device
    assert report.worst.flops_per_pair == pair_flops(TINY, 16)


# --- your own model (a FunctionMLM: plain JAX, no HF files) -------------------------------------------


def own_mlm(seed: int = 0, *, vocab: int = 1024, hidden: int = 64, apply_fn=tiny_apply, **options) -> FunctionMLM:
    return FunctionMLM(apply_fn, tiny_params(seed, vocab=vocab, hidden=hidden, max_len=32), vocab_size=vocab,
                       mask_token_id=MASK, special_token_ids={CLS, SEP, PAD}, max_positions=32, **options)


def own_sequence_flops(vocab: int, hidden: int, length: int, positions: int = 1) -> int:
    """tiny_apply's matrix products on one sequence, counted by hand: Q, K, V and the
    tanh block at every position, scores and weighted values, the head at ``positions``."""
    return 4 * 2 * length * hidden * hidden + 2 * 2 * length * length * hidden + 2 * positions * hidden * vocab


def test_own_model_programs_are_keyed_by_what_they_compute():
    """The plan cache (on disk, across processes) keys your own model by its lowered
    function: equal for other weights of the same shapes or abstract parameters,
    different for another function, width or length."""
    mesh = make_mesh(jax.devices()[:1])
    key = own_model(own_mlm()).cache_key(mesh, 16)
    assert own_model(own_mlm(seed=1)).cache_key(mesh, 16) == key
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), own_mlm().params)
    assert own_model(FunctionMLM(tiny_apply, abstract, vocab_size=1024, mask_token_id=MASK)).cache_key(mesh, 16) == key
    doubled = lambda p, i, m, k: 2.0 * tiny_apply(p, i, m, k)
    others = [own_model(own_mlm(hidden=32)).cache_key(mesh, 16), own_model(own_mlm()).cache_key(mesh, 24),
              own_model(own_mlm(apply_fn=doubled)).cache_key(mesh, 16)]
    assert len({key, *others}) == 4


def test_own_model_plan_errors_are_one_line():
    with pytest.raises(UserError, match="computes in float32"):
        make_plan("h100", own_mlm(), dtype="bfloat16")
    with pytest.raises(UserError, match="cannot plan a dict"):
        make_plan("h100", {"vocab_size": 1024})


@pytest.mark.slow  # about 12 s (h100) and 25 s (v5e) of compiles
@pytest.mark.parametrize("target", ["h100", "v5e:2x2"])
def test_own_model_plans_for_a_gpu_and_a_tpu(target):
    """Planned from abstract parameters (no weights), as the README says it may be."""
    mlm = own_mlm()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), mlm.params)
    report = make_plan(target, dataclasses.replace(mlm, params=abstract), lengths=[16], methods=("mrf",))
    assert report.fits and report.reason is None and report.own_model and "tiny_apply" in report.model
    bucket = report.worst
    assert bucket.peak_bytes <= report.usable_bytes_per_device
    assert report.params_bytes == sum(a.nbytes for a in jax.tree.leaves(mlm.params))
    # FLOPs: XLA's count of the compiled programs, against a count by hand of the
    # model's products (XLA adds softmax, tanh and the bias: a few percent here)
    hand = 2 * 1024 * own_sequence_flops(1024, 64, 16) + own_sequence_flops(1024, 64, 16, 2)
    assert bucket.flops_counted_by == "XLA" and bucket.flops_per_pair == bucket.xla_flops_per_pair
    assert hand <= bucket.flops_per_pair <= 1.1 * hand
    assert bucket.estimate is not None and bucket.estimate.seconds_per_pair > 0
    text = format_plan(report)
    assert "FLOPs counted by XLA" in text and "as your model's function asks" in text
    json.dumps(report.to_json())
    # The compiled tables program holds more for more sequences a step; its table does not change.
    mesh, own = resolve_target(target).mesh(), own_model(mlm)
    small, large = (fit.tables_cost(mesh, own, 16, "float32", c) for c in (8, 64))
    assert small.peak_bytes < large.peak_bytes and small.output_bytes == large.output_bytes
    assert own_sequence_flops(1024, 64, 16) <= large.flops / 64 <= 1.1 * own_sequence_flops(1024, 64, 16)


@pytest.mark.slow  # about 6 compiles
def test_own_model_chunk_fits_the_memory_limit():
    """A usable memory between what 8 sequences and what every row at once need: the
    plan's chunk fits beside the queued pair, the next size up does not, and the
    plan's peak is within the limit."""
    own = own_model(own_mlm())
    target = resolve_target("h100")
    mesh = target.mesh()
    pair = fit.assemble_cost(mesh, 1024).output_bytes
    need = {c: fit.tables_cost(mesh, own, 16, "float32", c) for c in (8, 1024)}
    need = {c: cost.peak_bytes + cost.output_bytes for c, cost in need.items()}
    budget = need[8] + (need[1024] - need[8]) // 3
    small = dataclasses.replace(target, usable_bytes_per_device=pair + budget)
    report = make_plan(small, own_mlm(), lengths=[16], methods=("mrf",))
    bucket = report.worst
    assert report.fits and 8 < bucket.chunk_size < 1024, bucket.chunk_size
    assert bucket.peak_bytes <= small.usable_bytes_per_device
    assert fit.tables_fit(fit.tables_cost(mesh, own, 16, "float32", bucket.chunk_size), budget)
    assert not fit.tables_fit(fit.tables_cost(mesh, own, 16, "float32", bucket.chunk_size + 8), budget)


@pytest.mark.slow  # a checkpoint's tables programs for this host's 8 CPU devices: about 5 s
def test_a_loaded_checkpoint_plans_as_its_config(sharp_ckpt):
    from jaxjoint import load_mlm

    mlm = load_mlm(sharp_ckpt)
    report = make_plan("local", mlm, lengths=[10], methods=())
    assert not report.own_model and report.worst.flops_counted_by == "jaxjoint.flops"
    assert report.worst.flops_per_pair == pair_flops(mlm.config, report.worst.bucket)
    assert report.to_json() | {"model": None, "compile_seconds": None} == make_plan(
        "local", mlm.config, lengths=[10], methods=()).to_json() | {"model": None, "compile_seconds": None}
