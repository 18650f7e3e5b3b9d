"""AG's pass on CPU as a compiled kernel (``cpu_pass.cc``, an XLA FFI custom call).

XLA:CPU compiles the pass's cells into a buffer that it then reduces twice, and its
loops over them are not vectorised tightly enough to keep up with memory
(benchmarks/RESULTS.md, "one AG pass against the memory bandwidth"). The kernel
reads the table once and keeps each cell in registers. It is built with the
machine's C++ compiler on first use (a few seconds) into
``$JAXJOINT_KERNEL_CACHE`` (default ``~/.cache/jaxjoint/kernels``), keyed by its
source, jaxlib's FFI headers, the compiler and the CPU, and loaded from there
afterwards. Without a compiler, or with ``JAXJOINT_CPU_KERNEL=off``, the pass is
XLA's own (``ag.iteration_sums``' blocked branch), with a one-line warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

SOURCE = Path(__file__).with_name("cpu_pass.cc")
TARGET = "jaxjoint_ag_pass"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def cache_dir() -> Path:
    """Where built kernels are kept: ``$JAXJOINT_KERNEL_CACHE`` or ``~/.cache/jaxjoint/kernels``."""
    raw = os.environ.get("JAXJOINT_KERNEL_CACHE")
    return Path(raw) if raw else Path.home() / ".cache" / "jaxjoint" / "kernels"


def _cpu_identity() -> str:
    """The CPU's model and feature flags (``-march=native`` compiles for them)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(keep))


def _build(compiler: str, flags: tuple[str, ...] = _FLAGS) -> Path:
    """The kernel's shared library, compiled now unless a build for this source,
    compiler, flags and CPU is already cached. Raises ``RuntimeError`` with the
    compiler's message when the build fails."""
    include = jax.ffi.include_dir()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), Path(include, "xla/ffi/api/ffi.h").read_bytes(),
                 Path(include, "xla/ffi/api/c_api.h").read_bytes(), version.encode(),
                 " ".join(flags).encode(), _cpu_identity().encode()):
        key.update(hashlib.sha256(part).digest())
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        directory = Path(tempfile.gettempdir()) / "jaxjoint-kernels"
        directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"ag_pass-{key.hexdigest()[:20]}.so"
    if library.exists():
        return library
    # A private name, then an atomic rename: processes building at once never load
    # each other's half-written file.
    partial = library.with_suffix(f".{os.getpid()}.tmp")
    result = subprocess.run([compiler, *flags, f"-I{include}", str(SOURCE), "-o", str(partial)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        message = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise RuntimeError(f"{compiler} failed to build {SOURCE.name}: {message}")
    os.replace(partial, library)
    return library


_LOCK = threading.Lock()
_LOADED: list[bool] = []  # the outcome of the one attempt to build and register it


def available() -> bool:
    """Whether the kernel is built and registered with XLA:CPU (once per process).

    False, with a warning that says why, when ``JAXJOINT_CPU_KERNEL=off``, when no
    C++ compiler is found (``$CXX``, ``c++``, ``g++``, ``clang++``) or when its build
    fails; AG then runs XLA's own pass, with the same results, more slowly.
    """
    if os.environ.get("JAXJOINT_CPU_KERNEL", "").lower() in ("0", "off", "false", "no"):
        return False
    with _LOCK:  # threads tracing at once build and register the kernel once
        if not _LOADED:
            _LOADED.append(_load())
        return _LOADED[0]


def _load() -> bool:
    """Build (or find) the kernel and register it with XLA:CPU; False with a warning
    where that fails."""
    candidates = [os.environ.get("CXX"), "c++", "g++", "clang++"]
    compiler = next((found for c in candidates if c and (found := shutil.which(c))), None)
    if compiler is None:
        warnings.warn("jaxjoint: no C++ compiler found (set CXX); AG's CPU pass falls back to XLA's, "
                      "which is slower", RuntimeWarning, stacklevel=2)
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(_build(compiler)))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as error:
        warnings.warn(f"jaxjoint: AG's CPU kernel is unavailable ({error}); AG's CPU pass falls back to XLA's, "
                      "which is slower", RuntimeWarning, stacklevel=2)
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.JaxjointAgPass), platform="cpu")
    return True


def pass_sums(e: jax.Array, u: jax.Array, w: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(row sums float32[n], weighted column sums float32[V]) of the cells
    ``x[a, b] = e[a, b] / (u[a] + w[b])``: ``x.sum(1)`` and ``(weight[:, None] * x).sum(0)``,
    in one read of e. e: float32[n, V]; u, weight: float32[n]; w: float32[V].
    On CPU; raises ``RuntimeError`` where the kernel is not ``available()``.
    """
    if not available():  # (also what builds and registers it, on a first call)
        raise RuntimeError("jaxjoint's AG CPU kernel is not available (JAXJOINT_CPU_KERNEL=off, or no build)")
    n, v = e.shape
    # Results typed like e (under shard_map: varying over the devices, as e is). ffi_call
    # takes e's own type; pallas_call wants a ShapeDtypeStruct instead (gpu_pass._typed_like).
    cells = jax.typeof(e)
    out = (cells.update(shape=(n,), dtype=jnp.float32), cells.update(shape=(v,), dtype=jnp.float32))
    return jax.ffi.ffi_call(TARGET, out)(e, u, w, weight)
