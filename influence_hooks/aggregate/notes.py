"""The approximations an estimator makes, as the sentences every result carries.

`run_notes(run)` names what holds for any estimator over the run (projection, optimizer, clipping,
partial model); `window_notes(run, t1, t2)` what concerns the data of the steps [t1, t2).
"""

from __future__ import annotations

from ..errors import short_list
from ..storage.reader import Run


def run_notes(run: Run) -> list[str]:
    notes = []
    if run.projected:
        kinds = sorted({l.projection.get("kind") for l in run.layers if l.projected})
        notes.append(f"gradients randomly projected to {run.dim} dimensions ({', '.join(kinds)})")
    opt = run.optimizer
    if opt and not opt.get("is_plain_sgd", False):
        adam = opt.get("name") in ("Adam", "AdamW")
        notes.append(f"optimizer {opt.get('name')} is not plain SGD: the SGD form with the recorded "
                     "learning rate is used" + (" (under Adam it follows retraining poorly; "
                                                "dit(curvature='exact') linearizes Adam itself)" if adam else ""))
    if run.manifest.get("gradient_clipping"):
        notes.append(f"gradient clipping ({run.manifest['gradient_clipping']}) is ignored")
    if run.manifest.get("partial_model", True):
        notes.append("only the recorded layers' parameters are attributed")
    return notes


def window_notes(run: Run, t1: int, t2: int) -> list[str]:
    """Skipped or missing steps of [t1, t2), and an interrupted run."""
    notes = []
    mask = (run.steps >= t1) & (run.steps < t2)
    bad = run.steps[mask & run.nonfinite]
    if len(bad):
        notes.append(f"{len(bad)} step(s) with non-finite gradients skipped: {short_list(bad)}")
    missing = (t2 - t1) - int(mask.sum())
    if missing > 0 and t1 >= run.first_step:
        notes.append(f"{missing} step(s) of [{t1}, {t2}) are not recorded and contribute nothing")
    partial = run.partial_steps()
    partial = partial[(partial >= t1) & (partial < t2)]
    if len(partial):
        notes.append(f"{len(partial)} step(s) hold rows of fewer than the run's {run.world_size} ranks (a rank "
                     f"stopped first): {short_list(partial)}")
    if not run.complete:
        notes.append("the run is incomplete (training was interrupted or is still running); "
                     f"only steps up to {run.last_step} are used")
    return notes
