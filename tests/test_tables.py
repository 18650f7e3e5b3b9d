"""The tables stage against the transformers PyTorch MLM, and across device counts."""

import jax
import numpy as np
import pytest
import torch

from jaxjoint import MLMProtocol, UserError, load_mlm, tables
from jaxjoint.plan.chunks import default_chunk_size
from jaxjoint.sharding import make_mesh, padded_size
from jaxjoint.tables import bucket_length, chunking, iter_pair_tables, pair_tables
from tests.hf_fixtures import make_checkpoint, torch_model

MASK = 4


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bert"), "bert", vocab_size=53)


@pytest.fixture(scope="module")
def mlm(bert_dir):
    return load_mlm(bert_dir)


@pytest.fixture(scope="module")
def reference(bert_dir):
    return torch_model(bert_dir)


def sentence(length, seed):
    """[CLS] w ... w [SEP]: int[length] with random word ids."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 53, size=length)
    ids[0], ids[-1] = 2, 3
    return ids


def reference_tables(model, ids, a, b):
    """float64 tables the obvious way: one PyTorch forward per substituted token."""
    vocab = model.config.vocab_size
    def substituted(read, sub):
        batch = np.tile(ids, (vocab, 1))
        batch[:, read] = MASK
        batch[:, sub] = np.arange(vocab)
        with torch.no_grad():
            out = model(input_ids=torch.as_tensor(batch)).logits.double().numpy()
        return out[:, read]  # [sub value, read value]
    logits_a = substituted(a, b).T  # [a, b]
    logits_b = substituted(b, a)  # [a, b]
    both = ids.copy()
    both[[a, b]] = MASK
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(both[None])).logits.double().numpy()[0]
    return logits_a, logits_b, out[a], out[b]


def assert_rel(got, ref, tol=1e-4):
    """Every entry within ``tol`` relative, with a floor of ``tol`` x 1e-2 of the
    largest logit for entries near zero (where relative error is unbounded)."""
    got = np.asarray(got, np.float64)
    np.testing.assert_allclose(got, ref, rtol=tol, atol=1e-2 * tol * np.max(np.abs(ref)))


@pytest.mark.parametrize(
    "length,a,b",
    [
        (7, 1, 5),    # first and last non-special positions
        (7, 5, 1),    # A after B
        (12, 4, 5),   # adjacent (contiguous masking)
        (20, 3, 16),  # random
        (33, 31, 30),  # longer than the first length bucket; last non-special position
    ],
)
def test_tables_match_pytorch(mlm, reference, length, a, b):
    ids = sentence(length, seed=length + a)
    ref_a, ref_b, ref_ma, ref_mb = reference_tables(reference, ids, a, b)
    # 53 rows padded to 56; chunk_size 12: 5 chunks of 12, the last overlapping the fourth by 4 rows
    assert chunking(56, 12) == (5, 12)
    t = pair_tables(mlm, ids, a, b, chunk_size=12)
    assert t.logits_a.shape == (56, 53) and t.vocab_size == 53
    assert_rel(t.logits_a[:53], ref_a)
    assert_rel(t.logits_b[:53], ref_b)
    assert_rel(t.both_masked_a[:53], ref_ma)
    assert_rel(t.both_masked_b, ref_mb)
    for padding in (t.logits_a[53:], t.logits_b[53:], t.both_masked_a[53:], t.log_q_a[53:], t.log_q_b[53:]):
        assert np.all(np.asarray(padding) == -np.inf)
    # log-softmax views, against float64 references
    def log_softmax(x, axis):
        x = x - x.max(axis=axis, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))
    np.testing.assert_allclose(t.log_q_a[:53], log_softmax(ref_a, 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(t.log_q_b[:53], log_softmax(ref_b, 1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(t.log_m_a[:53], log_softmax(ref_ma, 0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("devices", [1, pytest.param(7, marks=pytest.mark.slow), 8])
def test_result_does_not_depend_on_device_count(mlm, devices):
    ids = sentence(15, seed=1)
    single = pair_tables(mlm, ids, 2, 9)
    mesh = make_mesh(jax.devices()[:devices])
    sharded = pair_tables(mlm, ids, 2, 9, mesh=mesh, chunk_size=8)
    rows = sharded.logits_a.shape[0]
    assert rows == padded_size(53, mesh) == {1: 56, 7: 56, 8: 64}[devices]  # 8 rows a device at least
    assert single.logits_a.shape[0] == 56
    assert len(sharded.logits_a.sharding.device_set) == devices
    for name in ("logits_a", "logits_b", "both_masked_a"):
        got = np.asarray(getattr(sharded, name))
        np.testing.assert_allclose(got[:53], np.asarray(getattr(single, name))[:53], rtol=1e-6, atol=1e-6)
        assert np.all(got[53:] == -np.inf)
    np.testing.assert_allclose(sharded.both_masked_b, single.both_masked_b, rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(sharded.log_q_b)[53:] == -np.inf)
    np.testing.assert_allclose(np.asarray(sharded.log_q_a)[:53], single.log_q_a[:53], rtol=1e-5, atol=1e-6)


PAIRS = [(sentence(9, 0), 1, 4), (sentence(20, 1), 7, 8), (sentence(11, 2), 9, 2), (sentence(12, 3), 3, 5)]


def test_iterator_matches_single_calls(mlm):
    count = 0
    for (ids, a, b), t in zip(PAIRS, iter_pair_tables(mlm, PAIRS, prefetch=1, chunk_size=32)):
        one = pair_tables(mlm, ids, a, b, chunk_size=32)
        np.testing.assert_allclose(t.logits_a, one.logits_a, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(t.logits_b, one.logits_b, rtol=1e-6, atol=1e-6)
        count += 1
    assert count == len(PAIRS)


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_iterator_holds_prefetch_pairs_while_it_queues_one(mlm, prefetch, monkeypatch):
    """When the next pair is queued, only the ``prefetch`` pairs queued before it are
    alive, not also the one the caller's loop variable still holds: that one is
    deleted once the next is asked for (plan's memory model counts ``prefetch`` pairs)."""
    real = tables._dispatch
    alive_at_dispatch = []

    def pairs_alive():
        return sum(1 for x in jax.live_arrays() if x.shape == (56, 53)) // 2

    def dispatch(*args, **kwargs):
        alive_at_dispatch.append(pairs_alive() - before)
        return real(*args, **kwargs)

    before = pairs_alive()  # what other tests left behind
    monkeypatch.setattr(tables, "_dispatch", dispatch)
    previous = None
    for t in iter_pair_tables(mlm, PAIRS, prefetch=prefetch, chunk_size=32):
        assert not t.logits_a.is_deleted()
        if previous is not None:
            assert previous.logits_a.is_deleted() and previous.both_masked_b.is_deleted()
        previous = t
    assert alive_at_dispatch == [min(k, prefetch) for k in range(len(PAIRS))]


def test_bfloat16_tables_close_to_float32(mlm):
    ids = sentence(10, 3)
    f32 = pair_tables(mlm, ids, 2, 6)
    bf16 = pair_tables(mlm, ids, 2, 6, dtype="bfloat16")
    real_a = np.asarray(f32.logits_a)[:53]
    err = np.max(np.abs(np.asarray(bf16.logits_a)[:53] - real_a)) / np.max(np.abs(real_a))
    assert 0 < err < 3e-2


def test_buckets_and_chunk_budget(mlm):
    # Issue 15 replaced the powers of two (7 -> 16, 17 -> 32) by multiples of 8 up to 128.
    assert bucket_length(7, 512) == 8 and bucket_length(16, 512) == 16 and bucket_length(17, 512) == 24
    assert bucket_length(40, 40) == 40 and bucket_length(33, 36) == 36
    assert all(0 <= bucket_length(n, 512) - n < 8 for n in range(1, 129))
    assert all(0 <= bucket_length(n, 512) - n < 0.25 * n for n in range(129, 513))
    assert bucket_length(600, 1026) == 640 and bucket_length(1000, 1026) == 1024 and bucket_length(1025, 1026) == 1026
    assert len({bucket_length(n, 512) for n in range(1, 513)}) == 16 + 4 + 4
    with pytest.raises(UserError, match="exceeds"):
        bucket_length(513, 512)
    small = default_chunk_size(mlm.config, 32, "float32", 1 << 20)
    large = default_chunk_size(mlm.config, 32, "float32", 1 << 26)
    assert small % 8 == 0 and large > small


def test_chunks_are_few_even_and_multiples_of_8():
    for rows in range(8, 4097, 8):
        for max_chunk in (8, 64, 96, 512, 4096):
            n, chunk = chunking(rows, max_chunk)
            # the fewest chunks of at most max_chunk; their overlap recomputes under 8 rows a chunk
            assert n == -(-rows // max_chunk) and chunk <= max_chunk and n * chunk >= rows
            assert chunk % 8 == 0 and n * chunk - rows < 8 * n, (rows, max_chunk)
    assert chunking(29000 // 8 * 8, 512) == (57, 512)  # not 509 sequences a step
    assert chunking(56, 12) == (5, 12)  # a chunk_size the user chose is never exceeded


@pytest.mark.parametrize("a,b", [(3, 3), (-1, 2), (1, 99)])
def test_bad_positions(mlm, a, b):
    with pytest.raises(UserError, match="positions"):
        pair_tables(mlm, sentence(8, 0), a, b)


def test_special_positions_and_ids_refused_whatever_their_type(mlm):
    """As ``jaxjoint pair`` does: [CLS] and [SEP] are never a pair's position (issue 23)."""
    assert isinstance(mlm, MLMProtocol) and mlm.special_token_ids == {0, 2, 3}  # [PAD], [CLS], [SEP]
    ids = sentence(8, 0)
    for position, name in ((0, r"\[CLS\] \(id 2\)"), (7, r"\[SEP\] \(id 3\)")):
        with pytest.raises(UserError, match=f"position {position} is the special token {name}; choose a word"):
            pair_tables(mlm, ids, position, 1)
    for bad in (53, -1):
        with pytest.raises(UserError, match=rf"input_ids must be in \[0, 53\); got {bad}"):
            pair_tables(mlm, jax.numpy.asarray(ids).at[1].set(bad), 1, 2)
    with pytest.raises(UserError, match="positions must be integers"):
        pair_tables(mlm, ids, 1, 2.5)
    for a, b in ((jax.numpy.int32(8), 1), (np.int64(-1), 2)):
        with pytest.raises(UserError, match=r"positions must be two distinct indices in \[0, 8\)"):
            pair_tables(mlm, ids, a, b)
