"""AG's pass as kernels, against float64 NumPy: the compiled CPU kernel
(``jaxjoint/joints/cpu_pass.cc``) and its build (cached, rebuilt for a changed
source, replaced by XLA's pass with a warning where it cannot be built), and the GPU
kernel (``jaxjoint/joints/gpu_pass.py``) in Pallas's interpreter."""

from __future__ import annotations

import ctypes
import functools
import platform
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxjoint.joints import ag, cpu_pass, gpu_pass
from jaxjoint.joints.streaming import REPLICATED, ROWS, shard
from jaxjoint.sharding import VOCAB_AXIS, make_mesh


def inputs(n: int, v: int, seed: int = 0):
    """e float32[n, V] in [0, 1) with exact zeros (padding-like rows and cells),
    u float32[n] spread over 1/V..10 and inf (a padding row), w float32[V] >= 1,
    weight float32[n] in [0, 1]."""
    rng = np.random.default_rng(seed)
    e = rng.random((n, v)).astype(np.float32)
    e[rng.random((n, v)) < 0.05] = 0.0
    u = np.exp(rng.uniform(-np.log(v), np.log(10), n)).astype(np.float32)
    w = np.exp(rng.uniform(0, 3, v)).astype(np.float32)
    weight = rng.random(n).astype(np.float32)
    if n > 2:
        u[-1], weight[-1], e[-1] = np.inf, 0.0, 0.0
    return e, u, w, weight


def float64_sums(e, u, w, weight):
    x = e.astype(np.float64) / (u.astype(np.float64)[:, None] + w.astype(np.float64)[None, :])
    return x.sum(axis=1), (weight.astype(np.float64)[:, None] * x).sum(axis=0)


@pytest.mark.parametrize("n, v", [(1, 5), (64, 16), (65, 1040), (200, 2100)])
def test_kernel_sums_equal_float64(n, v):
    """Shapes across the kernel's structure: one row, a whole chunk of 64 rows and
    one 16-wide lane group, a chunk plus one row with a segment plus a tail of
    columns, several chunks and segments with a column tail."""
    assert cpu_pass.available()
    args = inputs(n, v, seed=n + v)
    row, col = jax.jit(cpu_pass.pass_sums)(*args)
    row64, col64 = float64_sums(*args)
    np.testing.assert_allclose(np.asarray(row), row64, rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.asarray(col), col64, rtol=1e-6, atol=0)


@pytest.mark.slow
def test_portable_loop_equals_float64(tmp_path, monkeypatch):
    """The kernel's loop for CPUs without AVX-512 (built here for x86-64-v3, AVX2: the
    same source's other branch), registered under its own name."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only: elsewhere the portable loop is the one every test above runs")
    monkeypatch.setenv("JAXJOINT_KERNEL_CACHE", str(tmp_path))
    flags = tuple("-march=x86-64-v3" if f == "-march=native" else f for f in cpu_pass._FLAGS)
    library = ctypes.cdll.LoadLibrary(str(cpu_pass._build(shutil.which("c++") or shutil.which("g++"), flags)))
    jax.ffi.register_ffi_target("jaxjoint_ag_pass_portable", jax.ffi.pycapsule(library.JaxjointAgPass),
                                platform="cpu")
    args = inputs(130, 1100, seed=4)
    out = (jax.ShapeDtypeStruct((130,), jnp.float32), jax.ShapeDtypeStruct((1100,), jnp.float32))
    row, col = jax.jit(jax.ffi.ffi_call("jaxjoint_ag_pass_portable", out))(*args)
    row64, col64 = float64_sums(*args)
    np.testing.assert_allclose(np.asarray(row), row64, rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.asarray(col), col64, rtol=1e-6, atol=0)


def test_kernel_is_deterministic_and_matches_xlas_pass():
    """Its summation order does not depend on which of XLA's threads ran which rows:
    repeated calls agree bit for bit. XLA's blocked pass (what runs without a
    compiler) agrees with it to float32 rounding."""
    args = inputs(300, 777, seed=3)
    fn = jax.jit(cpu_pass.pass_sums)
    first = [np.asarray(x) for x in fn(*args)]
    for _ in range(4):
        again = fn(*args)
        for a, b in zip(first, again):
            assert np.array_equal(a, np.asarray(b))

    e, u, w, weight = (jnp.asarray(x) for x in args)
    x = e / (u[:, None] + w[None, :])
    for kernel, xla in zip(first, (x.sum(axis=1), (x * weight[:, None]).sum(axis=0))):
        np.testing.assert_allclose(kernel, np.asarray(xla), rtol=1e-6)


def test_ag_loop_on_cpu_runs_the_kernel():
    """The program AG's loop compiles on CPU calls the kernel (and XLA's row blocks
    only where it is unavailable)."""
    mesh = make_mesh(jax.devices()[:1])
    v = 40
    rng = np.random.default_rng(1)
    fa, fb = (jnp.asarray(rng.normal(size=(v, v)), jnp.float32) for _ in range(2))
    log_p = jnp.full((v,), -np.log(v), jnp.float32)

    def one_pass(e, log_pa, log_pb):
        s = jnp.zeros(e.shape[0], jnp.float32)
        return ag.iteration_sums((e, s), log_pa, log_pb, lambda: (log_pa, log_pb),
                                 ag.pass_block_rows(mesh, v))

    program = jax.jit(shard(mesh, one_pass, (ROWS, ROWS, REPLICATED), (ROWS, REPLICATED)))
    assert cpu_pass.TARGET in program.lower(jnp.exp(fa - fb), log_p, log_p).as_text()


def test_without_a_compiler_xlas_pass_runs_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXJOINT_CPU_KERNEL", "off")
    assert not cpu_pass.available()
    monkeypatch.delenv("JAXJOINT_CPU_KERNEL")
    assert cpu_pass.available()  # (built and registered once; what follows tries again)
    monkeypatch.setenv("JAXJOINT_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", shutil.which("false"))
    with pytest.warns(RuntimeWarning, match="AG's CPU kernel is unavailable"):
        assert not cpu_pass._load()
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler at all
    monkeypatch.delenv("CXX")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found"):
        assert not cpu_pass._load()


@pytest.mark.slow
def test_build_is_cached_and_keyed_by_its_source(monkeypatch, tmp_path):
    compiler = shutil.which("c++") or shutil.which("g++")
    monkeypatch.setenv("JAXJOINT_KERNEL_CACHE", str(tmp_path / "cache"))
    built = cpu_pass._build(compiler)
    assert built.parent == tmp_path / "cache" and built.exists()
    stamp = built.stat().st_mtime_ns
    assert cpu_pass._build(compiler) == built and built.stat().st_mtime_ns == stamp
    assert not list(built.parent.glob("*.tmp"))

    changed = tmp_path / "cpu_pass.cc"
    changed.write_text(cpu_pass.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(cpu_pass, "SOURCE", changed)
    rebuilt = cpu_pass._build(compiler)
    assert rebuilt != built and rebuilt.exists()

    changed.write_text("this is not C++\n")
    with pytest.raises(RuntimeError, match="failed to build"):
        cpu_pass._build(compiler)
    assert len(list(built.parent.glob("*.so"))) == 2 and not list(built.parent.glob("*.tmp"))


@pytest.mark.parametrize("n, v", [(1, 5), (16, 256), (17, 300), (40, 700)])
def test_gpu_kernel_sums_equal_float64(n, v):
    """In Pallas's interpreter: one row; one block of 16 rows and one 256-wide tile;
    a row and a column past whole blocks and tiles; several of each."""
    args = inputs(n, v, seed=n * v)
    row, col = jax.jit(functools.partial(gpu_pass.pass_sums, interpret=True))(*args)
    row64, col64 = float64_sums(*args)
    np.testing.assert_allclose(np.asarray(row), row64, rtol=1e-6, atol=0)
    np.testing.assert_allclose(np.asarray(col), col64, rtol=1e-6, atol=0)


def test_gpu_kernel_on_sharded_rows():
    """Under shard_map over 8 devices (each its own rows, the columns summed over the
    devices), as AG's loop calls it on a multi-GPU mesh. (Pallas's interpreter does
    not follow shard_map's varying-axes types: ``check_vma`` off here; the typed
    program is compiled for ``h100x8`` in tests/test_plan.py.)"""
    mesh = make_mesh()
    assert mesh.size == 8
    e, u, w, weight = inputs(64, 100, seed=5)

    def local(e, u, w, weight):
        row, col = gpu_pass.pass_sums(e, u, w, weight, interpret=True)
        return row, jax.lax.psum(col, VOCAB_AXIS)

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(ROWS, ROWS, REPLICATED, ROWS),
                               out_specs=(ROWS, REPLICATED), check_vma=False))
    row, col = fn(e, u, w, weight)
    row64, col64 = float64_sums(e, u, w, weight)
    np.testing.assert_allclose(np.asarray(row), row64, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(col), col64, rtol=1e-6)
