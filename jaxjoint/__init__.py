"""jaxjoint: exact pairwise joint distributions derived from masked language models."""

from jaxjoint.errors import UserError
from jaxjoint.models.mlm import MaskedLM, load_mlm

__all__ = ["MaskedLM", "UserError", "load_mlm"]
