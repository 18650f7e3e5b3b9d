"""jaxjoint: exact pairwise joint distributions derived from masked language models."""

from jaxjoint.errors import UserError
from jaxjoint.models.mlm import MaskedLM, load_mlm

__all__ = ["MaskedLM", "UserError", "load_mlm"]

from jaxjoint.config import EvalConfig, read_config_file, resolve_config  # noqa: E402
# The run itself is jaxjoint.evaluate.evaluate: a package attribute named
# "evaluate" would hide the module of the same name.
from jaxjoint.evaluate import explain_pair  # noqa: E402

__all__ += ["EvalConfig", "explain_pair", "read_config_file", "resolve_config"]
