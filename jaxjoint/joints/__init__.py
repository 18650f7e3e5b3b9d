"""Joint distributions over a pair of tokens, derived from a pair's conditional tables.

- ``joint``: ``Joint`` (lazy, cell by cell) and ``derive_joint``, the public API;
- ``cells``: the cell algebra of each method (DESIGN.md §1);
- ``streaming``: sharded streaming reductions over the V x V tables;
- ``ag``: the Arnold-Gokhale fixed-point solver.
"""

from jaxjoint.joints.ag import ITERS as AG_ITERS
from jaxjoint.joints.ag import MAX_ITERS as AG_MAX_ITERS
from jaxjoint.joints.ag import SOLVERS as AG_SOLVERS
from jaxjoint.joints.joint import (
    ALL_METHODS,
    CONVERGED_TOL,
    LABELS,
    METHODS,
    OPTIONS,
    Joint,
    derive_joint,
    objective,
    resolve_mesh,
)

__all__ = ["AG_ITERS", "AG_MAX_ITERS", "AG_SOLVERS", "ALL_METHODS", "CONVERGED_TOL", "LABELS", "METHODS",
           "OPTIONS", "Joint", "derive_joint", "objective", "resolve_mesh"]
