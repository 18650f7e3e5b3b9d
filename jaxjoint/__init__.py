"""jaxjoint: exact pairwise joint distributions derived from masked language models.

The stages, in the order data flows through them:
``load_mlm`` -> ``pair_tables`` / ``iter_pair_tables`` -> ``derive_joint`` ->
``pair_metrics`` / ``mlm_unary_nll`` -> ``aggregate``. The whole evaluation run is
``jaxjoint.evaluate.evaluate`` (the ``jaxjoint evaluate`` command).
"""

from jaxjoint.config import EvalConfig, read_config_file, resolve_config
from jaxjoint.errors import UserError
from jaxjoint.evaluate import explain_pair
from jaxjoint.joints import METHODS, Joint, derive_joint
from jaxjoint.metrics import aggregate, mlm_unary_nll, pair_metrics
from jaxjoint.models.mlm import MaskedLM, load_mlm
from jaxjoint.sharding import make_mesh
from jaxjoint.tables import PairTables, iter_pair_tables, pair_tables

__all__ = [
    "METHODS", "EvalConfig", "Joint", "MaskedLM", "PairTables", "UserError", "aggregate",
    "derive_joint", "explain_pair", "iter_pair_tables", "load_mlm", "make_mesh",
    "mlm_unary_nll", "pair_metrics", "pair_tables", "read_config_file", "resolve_config",
]
