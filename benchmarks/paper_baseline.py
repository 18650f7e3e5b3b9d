"""The published approach, rebuilt from its description in DESIGN.md for side-by-side timing.

PyTorch transformers model, the MLM head at every position ([chunk, L, V] logits),
a fixed chunk of 256 substitutions, a host copy of every chunk's result, the tables
assembled on the host, and the Arnold-Gokhale joint materialised as a V x V tensor in
every iteration. Written here, not copied: it is the baseline the benchmarks compare
against, in the same run, on the same device.
"""

from __future__ import annotations

import numpy as np
import torch

CHUNK = 256


def tables(model: torch.nn.Module, input_ids: np.ndarray, a: int, b: int, mask_id: int,
           device: str = "cpu", chunk: int = CHUNK, rows: int | None = None) -> dict[str, np.ndarray]:
    """Host float32 logits: ``logits_a``, ``logits_b`` [rows, V] and both-masked [V] twice.

    ``rows`` limits the substitutions (default all V), for timing a slice on slow devices;
    ``logits_a`` is then indexed [b, a] for the computed b (no transpose is done on a slice).
    """
    vocab = model.config.vocab_size
    rows = vocab if rows is None else rows

    def substituted(read: int, sub: int) -> np.ndarray:
        out = np.empty((rows, vocab), np.float32)
        for start in range(0, rows, chunk):
            values = np.arange(start, min(rows, start + chunk))
            batch = np.tile(input_ids, (len(values), 1))
            batch[:, read] = mask_id
            batch[:, sub] = values
            with torch.no_grad():
                logits = model(input_ids=torch.as_tensor(batch, device=device)).logits
            out[values] = logits[:, read].float().cpu().numpy()  # one host copy per chunk
        return out

    rows_b = substituted(a, b)
    logits_b = substituted(b, a)
    both = input_ids.copy()
    both[[a, b]] = mask_id
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(both[None], device=device)).logits[0].float().cpu().numpy()
    logits_a = rows_b.T.copy() if rows == vocab else rows_b
    return {"logits_a": logits_a, "logits_b": logits_b, "both_a": out[a], "both_b": out[b]}


def joints(t: dict[str, np.ndarray], device: str = "cpu", ag_iters: int = 40) -> dict[str, torch.Tensor]:
    """All five joints as dense V x V log-probability tensors (float32, on ``device``)."""
    fa = torch.as_tensor(t["logits_a"], device=device)
    fb = torch.as_tensor(t["logits_b"], device=device)
    lqa, lqb = fa.log_softmax(0), fb.log_softmax(1)
    ma, mb = torch.as_tensor(t["both_a"], device=device).log_softmax(0), torch.as_tensor(
        t["both_b"], device=device).log_softmax(0)

    def normalise(score: torch.Tensor) -> torch.Tensor:
        return score - score.flatten().logsumexp(0)

    pivot = int(ma.argmax())
    out = {
        "mlm": ma[:, None] + mb[None, :],
        "mrf": normalise(lqa + lqb),
        "mrf_logit": normalise(fa + fb),
        "hcb": normalise(lqa - lqa[pivot][None, :] + lqb[pivot][None, :]),
    }
    qa, qb = lqa.exp(), lqb.exp()
    v = fa.shape[0]
    joint = torch.full((v, v), 1.0 / (v * v), device=device)
    for _ in range(ag_iters):  # the joint is materialised every iteration
        pa, pb = joint.sum(1), joint.sum(0)
        joint = (qa + qb) / (1.0 / pa[:, None] + 1.0 / pb[None, :])
        joint = joint / joint.sum()
    out["ag"] = joint.log()
    return out


def metrics(t: dict[str, np.ndarray], log_joint: torch.Tensor, gold: tuple[int, int]) -> dict[str, float]:
    """The four per-pair metrics from a dense joint (DESIGN.md §1)."""
    a0, b0 = gold
    device = log_joint.device
    lqa = torch.as_tensor(t["logits_a"], device=device).log_softmax(0)
    lqb = torch.as_tensor(t["logits_b"], device=device).log_softmax(1)
    cond_a = log_joint - log_joint.logsumexp(0, keepdim=True)  # log p(a|b)
    cond_b = log_joint - log_joint.logsumexp(1, keepdim=True)  # log p(b|a)
    kl_a = (lqa.exp() * (lqa - cond_a)).nan_to_num().sum(0)  # per b
    kl_b = (lqb.exp() * (lqb - cond_b)).nan_to_num().sum(1)  # per a
    return {
        "p_nll": float(-0.5 * log_joint[a0, b0]),
        "u_nll": float(-0.5 * (cond_a[a0, b0] + cond_b[a0, b0])),
        "kl_gold": float(0.5 * (kl_a[b0] + kl_b[a0])),
        "kl_all": float(torch.cat([kl_a, kl_b]).mean()),
    }
