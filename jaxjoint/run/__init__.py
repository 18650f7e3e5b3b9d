"""A whole evaluation run (``jaxjoint evaluate``), apart from the per-pair core.

- ``runner``: ``evaluate``, the orchestration, one process or several;
- ``rundir``: the output directory (records, resume, atomic writes);
- ``reports``: summaries as JSON, Markdown and CSV; ``plot``: NLL by distance;
- ``progress``: the progress bar; ``distributed``: the multi-process runtime.
"""

from jaxjoint.run.runner import evaluate

__all__ = ["evaluate"]
