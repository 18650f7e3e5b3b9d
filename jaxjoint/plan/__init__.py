"""``jaxjoint plan``: will a run fit an accelerator, with which chunk, and how fast?

Compiles, without the hardware, the programs a run executes (the tables stage per
length bucket, the joints, the metrics) for a GPU or TPU target described from
published facts (``hardware/``), reads XLA's memory and cost analyses, and
reports per device: peak memory against the usable memory, the largest chunk that
fits (found by compiling), FLOPs per pair, and a roofline estimate of the time
per pair, labelled as an estimate.

- ``make_plan(target, model, ...) -> PlanReport``; ``format_plan(report)``;
  ``report.to_json()``; ``model`` a name, a config, a ``MaskedLM`` or your own JAX
  model (any ``MLMProtocol``, e.g. ``FunctionMLM``: ``models.OwnModel``);
- ``largest_fitting_chunk(mesh, config, length, dtype, budget_bytes=...)``: the
  cached chunk search, on real or compile-only devices; ``fit.run_chunk``: that
  search for a run beside its queued pairs (what ``evaluate`` and ``pair_tables``
  take on a GPU or TPU); ``chunks.planned_chunk_size``: the chunk ``chunk_size=None``
  takes;
- ``resolve_target``, ``planning_config``: TARGET strings and model names;
  ``target_for_devices(mesh.devices.flat)``: a run's own devices as a target.
"""

from jaxjoint.plan.fit import MAX_CHUNK, ChunkChoice, largest_fitting_chunk
from jaxjoint.plan.models import planning_config, shipped_models
from jaxjoint.plan.planner import DEFAULT_LENGTHS, make_plan
from jaxjoint.plan.report import PlanReport, format_plan, write_json
from jaxjoint.plan.targets import Target, resolve_target, target_for_devices
from jaxjoint.sharding import use_cpu_when_no_accelerator, use_only_cpu_backend

__all__ = [
    "DEFAULT_LENGTHS", "MAX_CHUNK", "ChunkChoice", "PlanReport", "Target", "format_plan",
    "largest_fitting_chunk", "make_plan", "planning_config", "resolve_target", "shipped_models",
    "target_for_devices", "use_cpu_when_no_accelerator", "use_only_cpu_backend", "write_json",
]
