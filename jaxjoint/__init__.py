"""jaxjoint: exact pairwise joint distributions derived from masked language models.

The stages, in the order data flows through them:
``load_mlm`` -> ``pair_tables`` / ``iter_pair_tables`` -> ``derive_joint`` ->
``pair_metrics`` / ``mlm_unary_nll`` -> ``aggregate``. Your own JAX masked LM enters
as a ``FunctionMLM`` in place of ``load_mlm``'s ``MaskedLM`` (both are ``MLMProtocol``).
A whole evaluation run is ``jaxjoint.evaluate`` (the ``jaxjoint evaluate`` command);
``explain_pair`` is ``jaxjoint pair``.
"""

from jaxjoint.config import EvalConfig, read_config_file, resolve_config
from jaxjoint.errors import UserError
from jaxjoint.explain import explain_pair
from jaxjoint.joints import LABELS, METHODS, Joint, derive_joint
from jaxjoint.metrics import aggregate, mlm_unary_nll, pair_metrics
from jaxjoint.models.mlm import MaskedLM, load_mlm
from jaxjoint.models.protocol import FunctionMLM, MLMProtocol
from jaxjoint.run import evaluate
from jaxjoint.sharding import local_mesh, make_mesh
from jaxjoint.tables import PairTables, iter_pair_tables, pair_tables

__all__ = [
    "LABELS", "METHODS", "EvalConfig", "FunctionMLM", "Joint", "MLMProtocol", "MaskedLM", "PairTables",
    "UserError", "aggregate", "derive_joint", "evaluate", "explain_pair", "iter_pair_tables", "load_mlm",
    "local_mesh", "make_mesh",
    "mlm_unary_nll", "pair_metrics", "pair_tables", "read_config_file", "resolve_config",
]
