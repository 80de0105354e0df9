"""How far can the influence scores be trusted on this run? Scores against actual retraining.

    from influence_hooks import validate
    v = validate("runs/exp1", model=model, datamodule=dm, queries_from="query_dataset")
    v.windows[0].agreement()      # {method: (Pearson, Spearman)} against leave-one-out retraining
    v.run_scope.lds()             # {method: LDS} over random subsets of the whole run

The pieces follow the work: `sources.py` (model, data, loss and queries, from objects or a
LightningCLI config), `plan.py` (windows, samples, subsets, cost, budget), `retrain.py` (the ground
truth: many counterfactual models retrained at once from the checkpoints, and the reproduction
checks), `estimates.py` (the methods' scores), `lds.py` (correlations and the linear datamodeling
score), `results.py` (`Validation`) and `report.py` (report.md and plots next to the run), `api.py`
(`validate`).

(The package is named `validation` because a subpackage named `validate` would replace the
function `influence_hooks.validate` with itself as soon as it is imported.)
"""

from .api import validate
from .options import ValidateOptions
from .results import ScopeResult, Validation
from .retrain import ReproductionError

__all__ = ["validate", "ValidateOptions", "Validation", "ScopeResult", "ReproductionError"]
