"""Shared pieces of the benchmarks: model shapes, timing, the device's measured ceilings, output."""

from __future__ import annotations

import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxjoint.default import MODEL_DIR as DEFAULT_MODEL_DIR
from jaxjoint.models.config import EncoderConfig, encoder_config_from_hf, shipped_hub_configs
from jaxjoint.run.rundir import write_atomic
from jaxjoint.sharding import use_cpu_when_no_accelerator

# With the plan extra installed, JAX would otherwise probe for CUDA and TPUs here and
# print a cuDNN traceback and libtpu warnings before every CPU benchmark.
use_cpu_when_no_accelerator()

# Every model shipped in jaxjoint/models/hub_configs (the paper's BERTs, RoBERTa,
# XLM-R, DistilBERT, ModernBERT, ESM-2), named without its hub organisation:
# "bert-base-cased", "ModernBERT-base", "esm2_t33_650M_UR50D". Random weights with the
# real config are enough to time them.
SHAPES: dict[str, dict[str, Any]] = {hub_id.split("/", 1)[1]: json.loads(path.read_text())
                                     for hub_id, path in shipped_hub_configs().items()}


def model_shape(name: str) -> EncoderConfig:
    """A name of ``SHAPES`` (``bert-base-cased``, ``ModernBERT-base``, ``esm2_t33_650M_UR50D``, ...),
    or ``default`` (the embedded model's config)."""
    if name == "default":
        return encoder_config_from_hf(json.loads((DEFAULT_MODEL_DIR / "config.json").read_text()))
    return encoder_config_from_hf(SHAPES[name])


def time_call(fn: Callable[[], Any], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` after ``warmup`` calls, waiting for the device each time."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measured_matmul_peak(dtype: str, size: int | None = None) -> float:
    """FLOP/s of a large square matrix product in ``dtype`` on the default device."""
    on_cpu = jax.default_backend() == "cpu"
    n = size or (1024 if on_cpu else 8192)
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(key_a, (n, n), jnp.dtype(dtype))
    y = jax.random.normal(key_b, (n, n), jnp.dtype(dtype))
    matmul = jax.jit(lambda p, q: jnp.dot(p, q, preferred_element_type=jnp.float32))
    return 2 * n**3 / time_call(lambda: matmul(x, y), repeats=5 if on_cpu else 20)


def measured_bandwidth(size_bytes: int | None = None, repeats: int | None = None) -> float:
    """Bytes/s (read + written) of ``x * 1.0001`` over a large float32 array.

    The input buffer is donated and the output fed back in, so every call reuses the
    same memory: a fresh output each call measures page faults on CPU, not memory.
    """
    on_cpu = jax.default_backend() == "cpu"
    size_bytes = size_bytes or (1 << 28 if on_cpu else 1 << 32)
    scale = jax.jit(lambda x: x * 1.0001, donate_argnums=0)
    x = scale(jnp.ones(size_bytes // 4, jnp.float32))
    times = []
    for _ in range(repeats or (7 if on_cpu else 20)):
        start = time.perf_counter()
        x = scale(x)
        x.block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size_bytes / statistics.median(times)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import flax
    return {
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "device_count": jax.device_count(),
        "cpu": cpu,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A fixed-width table of ``rows`` on stdout."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)
    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(path: str | Path, payload: dict[str, Any], *, quiet: bool = False) -> None:
    """Replace ``path`` by ``payload`` as JSON (atomically: an interrupted benchmark that
    rewrites its report as it goes leaves the last whole one); says so unless ``quiet``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(payload, indent=2) + "\n")
    if not quiet:
        print(f"wrote {path}")
