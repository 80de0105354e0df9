"""The approximations an estimator makes, as the sentences every result carries.

`run_notes(run)` names what holds for any estimator over the run (projection, optimizer, clipping,
partial model, missing or unreadable shards); `window_notes(run, t1, t2)` what concerns the data of
the steps [t1, t2). Non-finite data never passes silently: `skipped_steps_notes` names training
steps left out as non-finite, `query_notes` query gradients flagged (or found) non-finite,
`score_notes` scores that came out NaN/inf, and `warn_nonfinite` turns those sentences into one
warning as well.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import numpy as np
import torch

from ..errors import short_list
from ..storage.index import describe_gaps
from ..storage.reader import Run


def run_notes(run: Run, step_sizes: Any = None) -> list[str]:
    """step_sizes: the estimator's stepsize.StepSizes (None: it uses no step size, or the SGD form)."""
    notes = []
    if run.projected:
        kinds = sorted({l.projection.get("kind") for l in run.layers if l.projected})
        notes.append(f"gradients randomly projected to {run.dim} dimensions ({', '.join(kinds)})")
    opt = run.optimizer
    if step_sizes is not None and step_sizes.note:
        notes.append(f"optimizer {opt.get('name') if opt else 'Adam'}: {step_sizes.note}")
    elif opt and not opt.get("is_plain_sgd", False):
        adam = opt.get("name") in ("Adam", "AdamW")
        notes.append(f"optimizer {opt.get('name')} is not plain SGD: the SGD form with the recorded "
                     "learning rate is used" + (" (under Adam it follows retraining poorly; "
                                                "dit(curvature='exact') linearizes Adam itself)" if adam else ""))
    if run.manifest.get("gradient_clipping"):
        notes.append(f"gradient clipping ({run.manifest['gradient_clipping']}) is ignored")
    if run.manifest.get("partial_model", True):
        notes.append("only the recorded layers' parameters are attributed")
    if run.gaps:
        notes.append(f"the run directory is not whole: {describe_gaps(run.gaps)}; their steps contribute nothing")
    if run.skipped_shards:
        notes.append(f"{len(run.skipped_shards)} unreadable shard(s) left out: "
                     f"{', '.join(p.name for p, _ in run.skipped_shards[:4])}")
    return notes


def window_notes(run: Run, t1: int, t2: int) -> list[str]:
    """Skipped or missing steps of [t1, t2), and an interrupted run."""
    notes = skipped_steps_notes(run, t1, t2)
    mask = (run.steps >= t1) & (run.steps < t2)
    missing = (t2 - t1) - int(mask.sum())
    if missing > 0 and t1 >= run.first_step:
        notes.append(f"{missing} step(s) of [{t1}, {t2}) are not recorded and contribute nothing")
    uneven = run.steps[mask & run.table.uneven]
    if len(uneven):
        notes.append(f"{len(uneven)} step(s) had local batches of other sizes on different ranks, so DDP weighted "
                     f"their samples differently; the mean weight of the step's rows is used: {short_list(uneven)}")
    partial = run.partial_steps()
    partial = partial[(partial >= t1) & (partial < t2)]
    if len(partial):
        notes.append(f"{len(partial)} step(s) hold rows of fewer than the run's {run.world_size} ranks (a rank "
                     f"stopped first): {short_list(partial)}")
    if not run.complete:
        notes.append("the run is incomplete (training was interrupted or is still running); "
                     f"only steps up to {run.last_step} are used")
    return notes


def skipped_steps_notes(run: Run, t1: int, t2: int) -> list[str]:
    """Steps of [t1, t2) left out because their training gradients were flagged non-finite."""
    bad = run.steps[(run.steps >= t1) & (run.steps < t2) & run.nonfinite]
    return [f"{len(bad)} step(s) with non-finite gradients skipped: {short_list(bad)}"] if len(bad) else []


def query_notes(run: Run, steps: Iterable[int], query_ids: np.ndarray | None = None,
                given: torch.Tensor | None = None) -> list[str]:
    """Query gradients that hold NaN/inf: those flagged at recording at `steps`, or, for query
    gradients `given` by the caller ([Q, K]), the rows that are not finite."""
    notes = []
    if given is not None:
        bad = ~torch.isfinite(given).all(dim=1).cpu().numpy()
        if bad.any():
            ids = query_ids[bad] if query_ids is not None and len(query_ids) == len(bad) else np.flatnonzero(bad)
            notes.append(f"the given query gradients of {int(bad.sum())} of {len(bad)} queries hold NaN/inf "
                         f"(ids {short_list(ids)}): their scores are not finite")
        return notes
    flagged = {int(s): run.query_nonfinite(int(s)) for s in steps}
    flagged = {s: f for s, f in flagged.items() if f.any()}
    if flagged:
        queries = np.any(np.stack(list(flagged.values())), axis=0)
        ids = run.query_ids[queries] if len(run.query_ids) == len(queries) else np.flatnonzero(queries)
        notes.append(f"query gradients flagged non-finite when recorded at step(s) {short_list(sorted(flagged))} "
                     f"for {int(queries.sum())} queries (ids {short_list(ids)}): their scores are not finite")
    return notes


def score_notes(values: torch.Tensor, query_ids: np.ndarray | None = None) -> list[str]:
    """A note when scores came out NaN/inf, naming how many and for which queries."""
    bad = ~torch.isfinite(values)
    if not bool(bad.any()):
        return []
    n = int(bad.sum())
    if values.dim() == 2 and query_ids is not None:
        cols = bad.any(dim=0).numpy()
        return [f"{n} of {values.numel()} scores are NaN/inf, in {int(cols.sum())} of {values.shape[1]} query "
                f"columns (ids {short_list(query_ids[cols])})"]
    return [f"{n} of {values.numel()} scores are NaN/inf"]


def warn_nonfinite(method: str, notes: list[str], stacklevel: int = 3) -> None:
    """One RuntimeWarning for the non-finite inputs or outputs of a result (nothing if none)."""
    if notes:
        warnings.warn(f"{method}: " + "; ".join(notes) + ". The result's approximations say so too.",
                      RuntimeWarning, stacklevel=stacklevel)
