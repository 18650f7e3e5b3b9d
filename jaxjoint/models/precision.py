"""How every matrix product of a model is computed: the ``matmul_precision`` modes.

JAX's default precision for a float32 product is one bfloat16 pass on TPU and TF32
on NVIDIA GPUs since Ampere, and XLA's CPU backend computes float32 whatever is
asked. So no product here is left to the default: each names an *arithmetic*, and
``MatmulPrecision.einsum`` asks the backend for exactly that arithmetic.

| mode | CPU | NVIDIA GPU | TPU |
|---|---|---|---|
| ``float32`` | float32 | ``tf32_x3`` (3 TF32 passes) | ``bf16_x6`` (6 bfloat16 passes, ``HIGHEST``) |
| ``tensorfloat32`` | ``tf32``, emulated | ``tf32`` (one TF32 pass) | ``bf16_x3`` (3 bfloat16 passes, ``HIGH``) |
| ``bfloat16`` | ``bf16``, emulated | ``bf16`` (one bfloat16 pass) | ``bf16`` (one bfloat16 pass) |

``float32`` on a GPU is three TF32 passes rather than the CUDA cores' true float32
because its error, measured by emulation on the paper's metrics, stays more than
100 times inside the 1e-4 the parity checks hold to, at 2.5 times the CUDA cores'
rate (``benchmarks/precision_error.py``, RESULTS.md). On TPU the algorithm presets
(``BF16_BF16_F32_X6`` ...) compile to the same program as the default one pass
(libtpu 0.0.42): only ``operand_precision`` is honoured there, so TPU products carry
``HIGHEST`` / ``HIGH`` / ``DEFAULT``.

Emulation computes in float32 what an accelerator's arithmetic computes: operands
rounded to the algorithm's mantissa (``lax.reduce_precision``: TF32 keeps 10 bits,
bfloat16 7), multi-pass algorithms as sums of products of hi/lo splits, every
product and sum in float32. It is what a CPU run does for ``tensorfloat32`` and
``bfloat16`` (the CPU cannot run TF32 and ignores the bfloat16 algorithms), and how
each accelerator's error is measured here.

Products whose operands are already bfloat16 (``--dtype bfloat16``) take one
bfloat16 pass with float32 accumulation on every backend; nothing finer exists.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jaxjoint.errors import UserError

MODES = ("float32", "tensorfloat32", "bfloat16")
PLATFORMS = ("cpu", "gpu", "tpu")

# The arithmetic each mode asks of each backend.
ARITHMETIC = {
    ("cpu", "float32"): "f32",
    ("cpu", "tensorfloat32"): "tf32",
    ("cpu", "bfloat16"): "bf16",
    ("gpu", "float32"): "tf32_x3",
    ("gpu", "tensorfloat32"): "tf32",
    ("gpu", "bfloat16"): "bf16",
    ("tpu", "float32"): "bf16_x6",
    ("tpu", "tensorfloat32"): "bf16_x3",
    ("tpu", "bfloat16"): "bf16",
}

# How to ask a backend for an arithmetic (None: it cannot, so it is emulated).
_REQUEST = {
    "cpu": {"f32": lax.Precision.HIGHEST},
    "gpu": {
        "f32": lax.DotAlgorithmPreset.F32_F32_F32,
        "tf32_x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
        "tf32": lax.DotAlgorithmPreset.TF32_TF32_F32,
        "bf16": lax.DotAlgorithmPreset.BF16_BF16_F32,
    },
    "tpu": {
        "bf16_x6": lax.Precision.HIGHEST,
        "bf16_x3": lax.Precision.HIGH,
        "bf16": lax.Precision.DEFAULT,
    },
}

# Mantissa bits kept by each arithmetic's operands, and which products of the
# hi/mid/lo splits it sums (XLA's multi-pass algorithms: the small terms first).
_MANTISSA = {"f32": 23, "tf32": 10, "tf32_x3": 10, "bf16": 7, "bf16_x3": 7, "bf16_x6": 7}
_SPLIT_PRODUCTS = {
    "f32": ((0, 0),),
    "tf32": ((0, 0),),
    "bf16": ((0, 0),),
    "tf32_x3": ((1, 0), (0, 1), (0, 0)),
    "bf16_x3": ((1, 0), (0, 1), (0, 0)),
    "bf16_x6": ((1, 1), (2, 0), (0, 2), (1, 0), (0, 1), (0, 0)),
}


def platform_of(device: jax.Device) -> str:
    """``cpu``, ``gpu`` or ``tpu``: whose arithmetic programs for ``device`` use."""
    platform = device.platform.lower()
    if platform in ("gpu", "cuda", "rocm"):
        return "gpu"
    if platform == "tpu":
        return "tpu"
    return "cpu"


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UserError(f"unknown matmul precision {mode!r}; choose one of {', '.join(MODES)}")


@dataclasses.dataclass(frozen=True)
class MatmulPrecision:
    """The arithmetic of a model's matrix products: ``mode`` (``MODES``) on
    ``platform`` (``PLATFORMS``, the backend the program is compiled for).

    ``emulate``: compute on the CPU, by operand rounding, what ``platform``'s
    arithmetic computes (a CPU run of a mode the CPU cannot run emulates it anyway).
    Hashable, so a Flax module can hold it as a static attribute.
    """

    mode: str = "float32"
    platform: str = "cpu"
    emulate: bool = False

    def __post_init__(self) -> None:
        check_mode(self.mode)
        if self.platform not in PLATFORMS:
            raise ValueError(f"platform must be one of {PLATFORMS}, got {self.platform!r}")

    @property
    def arithmetic(self) -> str:
        """What a float32 product computes: ``f32``, ``tf32``, ``tf32_x3``, ``bf16``,
        ``bf16_x3`` or ``bf16_x6``."""
        return ARITHMETIC[self.platform, self.mode]

    @property
    def emulated(self) -> bool:
        """Whether float32 products are computed by emulation rather than asked of the backend."""
        return self.emulate or self.arithmetic not in _REQUEST[self.platform]

    def einsum(self, subscripts: str, x: jax.Array, y: jax.Array, *,
               preferred_element_type: jnp.dtype | None = None) -> jax.Array:
        """``jnp.einsum(subscripts, x, y)`` in this arithmetic. The result has
        ``preferred_element_type``, else the operands' (common) dtype."""
        out = preferred_element_type
        if x.dtype == jnp.bfloat16 and y.dtype == jnp.bfloat16:
            # One bfloat16 pass, float32 accumulation, on every backend.
            precision = lax.DotAlgorithmPreset.BF16_BF16_F32 if self.platform == "gpu" else lax.Precision.DEFAULT
            return jnp.einsum(subscripts, x, y, precision=precision, preferred_element_type=out)
        if not self.emulated:
            precision = _REQUEST[self.platform][self.arithmetic]
            return jnp.einsum(subscripts, x, y, precision=precision, preferred_element_type=out)
        return _emulated_einsum(subscripts, x, y, self.arithmetic, out)

    def dot(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """``x @ y`` for x: [..., K], y: [K, N] -> [..., N], in this arithmetic."""
        return self.einsum("...k,kn->...n", x, y)


def _splits(x: jax.Array, bits: int, parts: int) -> list[jax.Array]:
    """x as the sum of ``parts`` terms of ``bits``-bit mantissa (the last holding what rounds away)."""
    terms, rest = [], x.astype(jnp.float32)
    for _ in range(parts):
        term = lax.reduce_precision(rest, exponent_bits=8, mantissa_bits=bits)
        terms.append(term)
        rest = rest - term
    return terms


def _emulated_einsum(subscripts: str, x: jax.Array, y: jax.Array, arithmetic: str,
                     out: jnp.dtype | None) -> jax.Array:
    products = _SPLIT_PRODUCTS[arithmetic]
    parts = 1 + max(max(p) for p in products)
    xs, ys = _splits(x, _MANTISSA[arithmetic], parts), _splits(y, _MANTISSA[arithmetic], parts)
    total = None
    for i, j in products:
        # F32_F32_F32: the rounded operands' exact float32 product, on any backend (and
        # marked apart from the float32 mode's HIGHEST in the HLO).
        term = jnp.einsum(subscripts, xs[i], ys[j], precision=lax.DotAlgorithmPreset.F32_F32_F32,
                          preferred_element_type=jnp.float32)
        total = term if total is None else total + term
    return total.astype(out or jnp.result_type(x.dtype, y.dtype))
