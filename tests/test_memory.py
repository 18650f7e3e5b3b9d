"""What the run's programs hold on a device, by XLA's memory analysis of the compiled
programs on the 8-device CPU mesh (the numbers ``jaxjoint.plan`` composes).

Each test bounds the temporaries of a program by a fraction of one table, where the
program once copied whole tables: XLA's partitioner gathered a row-sharded table
onto every device to read one row or cell of it (8 to 24 local tables of
temporaries for the joints and metrics programs at V = 4096 on 8 devices), the
assembly copied both tables it was given, and the tables stage copied its output
when the chunks did not tile the rows.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxjoint import sharding, tables
from jaxjoint.errors import UserError
from jaxjoint.joints.streaming import sharded_take
from jaxjoint.models.config import EncoderConfig
from jaxjoint.models.mlm import load_mlm
from jaxjoint.plan import chunks as chunk_policy
from jaxjoint.plan import fit
from jaxjoint.plan.compile import analyse, assemble_program, derive_program, metrics_program, unary_program
from jaxjoint.sharding import make_mesh, padded_size, replicated, row_sharding
from jaxjoint.tables import chunking, pair_tables

V = 4096  # one local table: 512 rows x 4096 on 8 devices, 8 MiB; streaming blocks are 1 MiB


pytestmark = pytest.mark.usefixtures("fresh_plan_cache")


def local_table_bytes(mesh, vocab: int = V) -> int:
    return 4 * padded_size(vocab, mesh) // mesh.size * vocab


# --- reading rows and cells of a row-sharded table -------------------------------------------


@pytest.mark.parametrize("devices", [1, 8])
def test_sharded_take_is_numpy_indexing(devices):
    """Rows, cells and broadcast index arrays, as jnp indexes: padding rows, negative
    indices from the end, out-of-range ones clamped."""
    mesh = make_mesh(jax.devices()[:devices])
    rng = np.random.default_rng(0)
    table = rng.normal(size=(64, 37)).astype(np.float32)
    table[37:] = -np.inf  # padding rows
    table[5, 3] = np.nan  # a bad logit shows where it is read, nowhere else
    sharded = jax.device_put(table, row_sharding(mesh))
    take = jax.jit(lambda t, a, b=None: sharded_take(mesh, t, a, b))
    for a in (0, 7, 36, 40, 63, -1, -64, 99, -99):
        np.testing.assert_array_equal(take(sharded, a), np.asarray(jnp.asarray(table)[a]))
    a, b = np.arange(64)[:, None] % 9 * 7, np.arange(37)[None, :]
    np.testing.assert_array_equal(take(sharded, a, b), table[a, b])
    np.testing.assert_array_equal(take(sharded, np.array([3, 40, -2]), np.array([36, 0, 5])),
                                  table[[3, 40, -2], [36, 0, 5]])
    np.testing.assert_array_equal(take(sharded, 5, np.arange(37)), table[5])
    assert np.isnan(take(sharded, 5)[3]) and np.isfinite(np.delete(np.asarray(take(sharded, 5)), 3)).all()


def test_reading_a_row_or_a_cell_copies_no_table():
    mesh = make_mesh()
    table = jax.ShapeDtypeStruct((V, V), jnp.float32, sharding=row_sharding(mesh))
    index = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated(mesh))
    row = analyse("row", lambda: jax.jit(lambda t, i: sharded_take(mesh, t, i)).lower(table, index))
    cell = analyse("cell", lambda: jax.jit(lambda t, i: sharded_take(mesh, t, i, i)).lower(table, index))
    # a row's worth of temporaries (V floats), not the table (V x V) or a device's share of it
    assert row.temp_bytes <= 4 * 4 * V < local_table_bytes(mesh)
    assert cell.temp_bytes <= 4 * 4 * V


@pytest.mark.parametrize("method", ["hcb", "mrf", "ag"])
def test_joint_and_metrics_programs_hold_no_extra_table(method):
    """derive_joint reads HCB's pivot row; the metrics read the gold row, a column
    and a cell of every joint. Their temporaries stay below one local table: the
    streaming passes' blocks and a few V-vectors."""
    mesh = make_mesh()
    local = local_table_bytes(mesh)
    joint_cost, joint = derive_program(mesh, V, method, {})
    metrics_cost = metrics_program(mesh, joint)
    if method == "ag":
        # AG holds its loop-invariant qA + qB table on purpose: one local table of
        # temporaries for the GPU targets, two as XLA's CPU compiler schedules it
        assert joint_cost.temp_bytes < 2.5 * local
    else:
        assert joint_cost.temp_bytes < 0.5 * local
    assert metrics_cost.temp_bytes < 0.5 * local
    assert unary_program(mesh, V).temp_bytes < 0.05 * local


# --- the tables stage --------------------------------------------------------------------------


@pytest.mark.parametrize("devices", [1, 8])
def test_assembly_reuses_the_tables_it_is_given(devices):
    """Both tables are donated: logits_b is passed through in place, and only the
    transpose of the first table needs a buffer of its own: three tables at the peak
    on one device (four when it copied both), and the all-to-all's buffers beside
    them on a mesh."""
    mesh = make_mesh(jax.devices()[:devices])
    cost = assemble_program(mesh, V)
    local = local_table_bytes(mesh)
    assert cost.alias_bytes >= 2 * local  # both outputs' tables are inputs' buffers
    limit = 3 if devices == 1 else 4
    assert cost.peak_bytes < (limit + 0.01) * local


TINY = EncoderConfig(
    family="bert", vocab_size=2000, hidden_size=16, embedding_size=16, num_layers=1, num_heads=2,
    intermediate_size=32, max_positions=16, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu",
    pad_token_id=0)


def test_tables_stage_writes_chunks_in_place_when_they_do_not_tile_the_rows():
    """2000 rows in chunks of at most 96: 21 chunks of 96 cover 2016 rows. The last
    chunk overlaps the one before it, so the table is written in place: temporaries
    are a chunk's activations and logits, not a padded copy of the table."""
    mesh = make_mesh(jax.devices()[:1])
    assert chunking(padded_size(2000, mesh), 96) == (21, 96)
    cost = fit.tables_cost(mesh, TINY, 8, "float32", 96)
    table = 4 * 2000 * 2000
    assert cost.output_bytes == table
    assert cost.temp_bytes < table / 8


# --- memory-planned runs -----------------------------------------------------------------------
#
# CPU devices report no memory limit, so these tests give them one
# (``sharding.device_memory_limit``, which GPUs and TPUs answer from memory_stats).
# V = 1024 and wide layers: one pair's tables are 8 MiB on one device, a chunk of
# 1024 sequences needs 12 MiB of activations; the runs below fit 26 MiB with one
# pair queued at a memory-bound chunk, 16 MiB only without a queued pair, 12 MiB not
# on one device at all.

MiB = 1 << 20


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    from tests.hf_fixtures import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("wide"), "bert", vocab_size=1024, hidden=64, layers=1, heads=2,
                           intermediate=256)


@pytest.fixture(scope="module")
def wide_mlm(wide_ckpt):
    return load_mlm(wide_ckpt)


def give_memory(monkeypatch, limit: int | None) -> None:
    monkeypatch.setattr(sharding, "device_memory_limit", lambda device: limit)


def record_chunks(monkeypatch) -> list[tuple[int, int]]:
    """(n_chunks, chunk) of every tables program the run executes."""
    real, seen = tables.substitution_table, []

    def spy(*args, **kwargs):
        seen.append((kwargs["n_chunks"], kwargs["chunk"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(tables, "substitution_table", spy)
    return seen


@pytest.mark.slow  # a wide checkpoint and a chunk search: 8 s
def test_pair_tables_takes_the_compiled_chunk_where_devices_report_memory(wide_mlm, monkeypatch):
    ids = np.array([2, 7, 12, 9, 30, 8, 21, 40, 11, 5, 17, 3])  # 12 tokens: bucket 16
    expected = pair_tables(wide_mlm, ids, 2, 4)  # CPU: the activation budget, one chunk of all 1024 rows
    give_memory(monkeypatch, 26 * MiB)
    chunks = record_chunks(monkeypatch)
    mesh = make_mesh(jax.devices()[:1])
    choice = fit.run_chunk(mesh, wide_mlm.config, 16, "float32", usable_bytes=26 * MiB, prefetch=tables.PREFETCH)
    assert choice is not None and choice.next_up is not None  # bound by memory, not by the rows
    assert 8 < choice.chunk < 1024
    got = pair_tables(wide_mlm, ids, 2, 4)
    assert chunks == [chunking(1024, choice.chunk_size)] * 2 == [(choice.n_chunks, choice.chunk)] * 2
    np.testing.assert_allclose(got.logits_a, expected.logits_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.logits_b, expected.logits_b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # a chunk search over your own model's programs: about 10 s
def test_your_own_model_takes_the_compiled_chunk_where_devices_report_memory(monkeypatch):
    """A FunctionMLM with no chunk_size: 64 sequences a step on CPU, nothing compiled;
    where devices report memory, the largest chunk whose compiled programs of its own
    function fit beside the queued pair, as for a checkpoint."""
    from jaxjoint import FunctionMLM
    from jaxjoint.plan import compile as plan_compile
    from jaxjoint.plan.models import own_model
    from tests.own_model import CLS, MASK, PAD, SEP, tiny_apply, tiny_params

    def refuse(*args, **kwargs):
        raise AssertionError("a program was compiled to plan memory on a CPU run")

    mlm = FunctionMLM(tiny_apply, tiny_params(vocab=1024, hidden=64, max_len=32), vocab_size=1024,
                      mask_token_id=MASK, special_token_ids={CLS, SEP, PAD})
    ids = np.array([CLS, 7, 12, 9, 30, 8, 21, 40, 11, 5, 17, SEP])  # 12 tokens: bucket 16
    chunks = record_chunks(monkeypatch)
    with monkeypatch.context() as patch:
        patch.setattr(plan_compile, "compile_program", refuse)
        expected = pair_tables(mlm, ids, 2, 4)
    assert chunks == [chunking(1024, chunk_policy.OWN_MODEL_CPU_CHUNK)] * 2
    mesh = make_mesh(jax.devices()[:1])
    own = own_model(mlm)
    need = [fit.tables_cost(mesh, own, 16, "float32", c) for c in (8, 1024)]
    need = [c.peak_bytes + c.output_bytes for c in need]
    limit = fit.assemble_cost(mesh, 1024).output_bytes + need[0] + (need[1] - need[0]) // 3
    give_memory(monkeypatch, limit)
    choice = fit.run_chunk(mesh, own, 16, "float32", usable_bytes=limit, prefetch=tables.PREFETCH)
    assert choice is not None and choice.next_up is not None and 8 < choice.chunk < 1024
    chunks.clear()
    got = pair_tables(mlm, ids, 2, 4)
    assert chunks == [chunking(1024, choice.chunk_size)] * 2 == [(choice.n_chunks, choice.chunk)] * 2
    np.testing.assert_allclose(got.logits_a, expected.logits_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.logits_b, expected.logits_b, rtol=1e-5, atol=1e-5)


def evaluate_wide(wide_ckpt, sentences, out, quiet=True, **overrides):
    from jaxjoint.config import resolve_config
    from jaxjoint.run import evaluate

    values = {"model": str(wide_ckpt), "data": str(sentences), "out": str(out), "devices": 1, "methods": "mrf",
              "max_sentences": 2, **overrides}
    return evaluate(resolve_config(values), quiet=quiet)


@pytest.mark.slow  # a plan's dozen compiles and two pairs at V = 1024: 10 s
def test_a_run_that_fits_uses_the_compiled_chunk_per_bucket(wide_ckpt, wide_mlm, sentences, tmp_path, monkeypatch,
                                                            capsys):
    expected = evaluate_wide(wide_ckpt, sentences, tmp_path / "cpu")  # no memory limit: nothing planned
    give_memory(monkeypatch, 26 * MiB)
    chunks = record_chunks(monkeypatch)
    got = evaluate_wide(wide_ckpt, sentences, tmp_path / "planned")
    mesh = make_mesh(jax.devices()[:1])
    buckets = {tables.bucket_length(len(r["input_ids"]), 64)
               for r in map(json.loads, (tmp_path / "planned" / "pairs.jsonl").read_text().splitlines())}
    planned = {fit.run_chunk(mesh, wide_mlm.config, b, "float32", usable_bytes=26 * MiB, prefetch=1)
               for b in buckets}
    assert sorted(set(chunks)) == sorted((c.n_chunks, c.chunk) for c in planned)
    assert any(c.next_up is not None for c in planned)  # a chunk bound by memory
    assert capsys.readouterr().err == ""  # prefetching as usual: no note
    for key in ("p_ppl", "u_ppl", "kl_gold", "kl_all"):
        assert got["methods"]["mrf"][key] == pytest.approx(expected["methods"]["mrf"][key], rel=1e-5)


@pytest.mark.slow
def test_a_run_that_fits_only_without_prefetching_drops_it(wide_ckpt, sentences, tmp_path, monkeypatch, capsys):
    from jaxjoint.run import runner

    give_memory(monkeypatch, 16 * MiB)
    real, prefetches = runner.iter_pair_tables, []

    def spy(*args, **kwargs):
        prefetches.append(kwargs["prefetch"])
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "iter_pair_tables", spy)
    summary = evaluate_wide(wide_ckpt, sentences, tmp_path / "run", quiet=False, max_sentences=1)
    assert prefetches == [0] and summary["n_pairs"] == 1
    notes = [line for line in capsys.readouterr().err.splitlines() if "prefetching" in line]
    assert notes == ["note: the next pair's tables do not fit beside this one's on cpu: scoring without prefetching"]


@pytest.mark.slow
def test_a_run_that_cannot_fit_stops_before_any_pair_naming_what_would(wide_ckpt, wide_mlm, sentences, tmp_path,
                                                                      monkeypatch):
    from jaxjoint.plan import make_plan, target_for_devices

    give_memory(monkeypatch, 12 * MiB)
    chunks = record_chunks(monkeypatch)
    out = tmp_path / "run"
    with pytest.raises(UserError) as err:
        evaluate_wide(wide_ckpt, sentences, out)
    message = str(err.value)
    assert "\n" not in message and chunks == []
    assert not (out / "pairs.jsonl").exists() or (out / "pairs.jsonl").read_text() == ""
    assert "needs more than the 12.0 MiB usable on each of 1 x cpu" in message
    assert "fits on 2 of this host's 8 devices (--devices 2)" in message, message
    # what it names is compiled, and fits
    two = target_for_devices(jax.devices()[:2], usable_bytes=12 * MiB)
    assert make_plan(two, wide_mlm.config, lengths=[16], methods=("mrf",), prefetch=0).fits


def test_runs_on_devices_without_a_memory_limit_compile_nothing_to_plan(sharp_ckpt, sentences, tmp_path,
                                                                          monkeypatch):
    """CPU devices report no limit: the chunk comes from the activation budget, and
    neither evaluate nor pair_tables compiles a program to analyse it."""
    from jaxjoint.plan import compile as plan_compile

    def refuse(*args, **kwargs):
        raise AssertionError("a program was compiled to plan memory on a CPU run")

    monkeypatch.setattr(plan_compile, "compile_program", refuse)
    monkeypatch.setattr(plan_compile, "analyse", refuse)
    assert sharding.mesh_memory_limit(make_mesh(jax.devices()[:1])) is None
    chunks = record_chunks(monkeypatch)
    summary = evaluate_wide(sharp_ckpt, sentences, tmp_path / "run", max_sentences=1)
    assert summary["n_pairs"] == 1
    config = load_mlm(sharp_ckpt).config
    (record,) = map(json.loads, (tmp_path / "run" / "pairs.jsonl").read_text().splitlines())
    bucket = tables.bucket_length(len(record["input_ids"]), config.max_positions)
    size = chunk_policy.default_chunk_size(config, bucket, "float32", chunk_policy.DEFAULT_CPU_BUDGET_BYTES)
    assert chunks == [chunking(56, size)] * 2


@pytest.mark.slow
def test_a_chunk_size_given_is_checked_before_any_pair(wide_ckpt, sentences, tmp_path, monkeypatch):
    give_memory(monkeypatch, 26 * MiB)
    chunks = record_chunks(monkeypatch)
    with pytest.raises(UserError, match=r"^--chunk-size 1024 does not fit 16-token sentences on cpu \(compiled\); "
                                        r"\d+ does, or leave the chunk to the run$"):
        evaluate_wide(wide_ckpt, sentences, tmp_path / "big", chunk_size=1024)
    assert chunks == []
    evaluate_wide(wide_ckpt, sentences, tmp_path / "small", chunk_size=64, max_sentences=1)
    assert set(chunks) == {chunking(1024, 64)}
