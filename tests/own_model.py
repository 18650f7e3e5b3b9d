"""A small masked LM written in plain JAX (no HF files): the "your own model" of the
library tests (test_library_api.py) and the planner's tests (test_plan.py)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST

# V = 33 rows pad to 40 on one device, as ESM-2's.
V, H, MAX_LEN = 33, 16, 16
CLS, SEP, MASK, PAD = 1, 2, 3, 0


def tiny_params(seed: int = 0, *, vocab: int = V, hidden: int = H, max_len: int = MAX_LEN) -> dict[str, np.ndarray]:
    """float32 parameters of ``tiny_apply``: embed [vocab, hidden], pos [max_len, hidden],
    wq, wk, wv, w1 [hidden, hidden], bias [vocab]."""
    rng = np.random.default_rng(seed)
    draw = lambda *shape, scale=0.5: (scale * rng.normal(size=shape)).astype(np.float32)  # noqa: E731
    return {"embed": draw(vocab, hidden), "pos": draw(max_len, hidden), "wq": draw(hidden, hidden),
            "wk": draw(hidden, hidden), "wv": draw(hidden, hidden), "w1": draw(hidden, hidden),
            "bias": draw(vocab, scale=0.1)}


def tiny_apply(params, input_ids, attention_mask, positions):
    """One attention layer, a tanh block and a tied head read at ``positions``:
    int[B, L], int[B, L], int[B, K] -> float32[B, K, V]."""
    x = params["embed"][input_ids] + params["pos"][: input_ids.shape[1]]
    q, k, v = (jnp.einsum("blh,hg->blg", x, params[w], precision=HIGHEST) for w in ("wq", "wk", "wv"))
    scores = jnp.einsum("bqh,bkh->bqk", q, k, precision=HIGHEST) / math.sqrt(x.shape[-1])
    scores = jnp.where(attention_mask[:, None, :] > 0, scores, -1e9)
    x = x + jnp.einsum("bqk,bkh->bqh", jax.nn.softmax(scores, axis=-1), v, precision=HIGHEST)
    x = jnp.tanh(jnp.einsum("blh,hg->blg", x, params["w1"], precision=HIGHEST))
    read = jnp.take_along_axis(x, positions[..., None], axis=1)
    return jnp.einsum("bkh,vh->bkv", read, params["embed"], precision=HIGHEST) + params["bias"]
