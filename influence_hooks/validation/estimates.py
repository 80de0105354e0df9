"""The methods' scores for each retrained scope, computed as a user computes them (the public
aggregators, their defaults), for the queries validate compares.

Which notion each method estimates (REFERENCE.md), and so where it is compared:
- dit_none / dit_fisher / dit_ggn / dit_exact: window removal evaluated at the scope's step t_e;
- dvemb: window removal evaluated at the end of training T, so only scopes with t_e = T;
- tracin: no particular notion (a sum over the window of first-order terms); compared everywhere.
A method that cannot run on a scope (e.g. no query gradients recorded at t_e) is reported with
its reason, never left out silently.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from ..aggregate import dit, dvemb, tracin
from ..aggregate.results import InfluenceScores
from ..errors import InfluenceHooksError
from ..storage.reader import Run
from .plan import Scope
from .sources import TrainingSetup


@dataclass
class MethodScores:
    """Scores [n, Q] (float64) of the samples `ids` for one method on one scope."""

    ids: np.ndarray
    values: np.ndarray
    seconds: float
    approximations: list[str] = field(default_factory=list)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        pos = {int(i): k for k, i in enumerate(self.ids)}
        return self.values[[pos[int(i)] for i in ids]]


def score_methods(run: Run, methods: tuple[str, ...], scopes: list[Scope], setup: TrainingSetup, qsel: np.ndarray,
                  *, device: Any, progress: bool) -> dict[str, list[MethodScores | str]]:
    """{method: per scope, its MethodScores or the reason it has none}."""
    out: dict[str, list[MethodScores | str]] = {}
    emb_dir: tempfile.TemporaryDirectory | None = None
    emb = None
    try:
        for m in methods:
            out[m] = []
            for s in scopes:
                if m == "dvemb" and s.eval_step != run.final_step:
                    out[m].append(f"dvemb estimates removal evaluated at the end of training (step {run.final_step}); "
                                  f"this scope is evaluated at step {s.eval_step} (eval_at='final' compares it)")
                    continue
                if m == "dvemb" and emb is None:
                    emb_dir = tempfile.TemporaryDirectory(prefix="influence_hooks_validate_")
                    try:
                        t0 = time.perf_counter()
                        emb = dvemb(run, path=Path(emb_dir.name) / "dvemb.h5", progress=progress, device=device)
                        emb_seconds = time.perf_counter() - t0
                    except InfluenceHooksError as e:
                        out[m] += [str(e)] * (len(scopes) - len(out[m]))
                        break
                try:
                    fn = _score_fn(m, run, setup, qsel, s, device, progress, emb)
                    t0 = time.perf_counter()
                    res = fn()
                    dt = time.perf_counter() - t0 + (emb_seconds if m == "dvemb" and not out[m] else 0.0)
                except InfluenceHooksError as e:
                    out[m].append(f"{type(e).__name__}: {e}")
                    continue
                vals = res.values.to(torch.float64).cpu().numpy()
                if vals.ndim == 1:
                    vals = vals[:, None]
                if m not in ("dit_exact", "dit_ggn"):
                    vals = vals[:, qsel]  # recorded-space scores cover every recorded query
                out[m].append(MethodScores(np.asarray(res.train_ids), vals, dt, list(res.approximations)))
    finally:
        if emb is not None:
            emb.close()
        if emb_dir is not None:
            emb_dir.cleanup()
    return out


def _score_fn(m: str, run: Run, setup: TrainingSetup, qsel: np.ndarray, s: Scope, device: Any, progress: bool,
              emb: Any) -> Callable[[], InfluenceScores]:
    w, te = s.window, s.eval_step
    common: dict[str, Any] = dict(progress=progress, device=device)
    if m == "tracin":
        return lambda: tracin(run, window=w, **common)
    if m in ("dit_none", "dit_fisher"):
        return lambda: dit(run, window=w, mode="removal", curvature=m[4:], eval_step=te, **common)
    if m in ("dit_exact", "dit_ggn"):
        qsub = tree_map(lambda x: x[torch.as_tensor(qsel)] if isinstance(x, Tensor) else x, setup.queries)
        return lambda: dit(run, window=w, mode="removal", curvature=m[4:], eval_step=te, model=setup.model,
                           dataset=setup.dataset, queries=qsub, loss_fn=setup.loss_fn,
                           query_loss_fn=setup.query_loss_fn, params="model", collate_fn=setup.collate_fn,
                           query_ids=run.query_ids[qsel] if len(run.query_ids) else None, **common)
    if m == "dvemb":
        u = run.query_gradients(run.final_step)
        return lambda: emb.scores(u, window=w, **common)
    raise ValueError(m)
