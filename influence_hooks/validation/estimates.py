"""The methods' scores for each retrained scope, computed as a user computes them (the public
aggregators, their defaults), for the queries validate compares.

Which notion each method estimates (README, "Which samples mattered, and when"), and so where it is compared:
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
    with _Embeddings(run, device, progress) as emb:
        for m in methods:
            out[m] = []
            for s in scopes:
                if m == "dvemb" and s.eval_step != run.final_step:
                    out[m].append(f"dvemb estimates removal evaluated at the end of training (step {run.final_step}); "
                                  "these scopes are evaluated earlier, at their window's end (eval_at='final' "
                                  "compares them)")
                    continue
                try:
                    t0 = time.perf_counter()
                    res = _score_fn(m, run, setup, qsel, s, device, progress, emb)()
                    dt = time.perf_counter() - t0
                except InfluenceHooksError as e:
                    out[m].append(f"{type(e).__name__}: {e}")
                    continue
                vals = res.values.to(torch.float64).cpu().numpy()
                if vals.ndim == 1:
                    vals = vals[:, None]
                if m not in ("dit_exact", "dit_ggn"):
                    vals = vals[:, qsel]  # recorded-space scores cover every recorded query
                out[m].append(MethodScores(np.asarray(res.train_ids), vals, dt, list(res.approximations)))
    return out


class _Embeddings:
    """dvemb's embeddings of the run, computed on first use into a temporary file (the first
    scope scored with them pays for it)."""

    def __init__(self, run: Run, device: Any, progress: bool):
        self.run, self.device, self.progress = run, device, progress
        self._dir: tempfile.TemporaryDirectory | None = None
        self._emb: Any = None

    def get(self) -> Any:
        if self._emb is None:
            self._dir = tempfile.TemporaryDirectory(prefix="influence_hooks_validate_")
            self._emb = dvemb(self.run, path=Path(self._dir.name) / "dvemb.h5", progress=self.progress,
                              device=self.device)
        return self._emb

    def __enter__(self) -> "_Embeddings":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._emb is not None:
            self._emb.close()
        if self._dir is not None:
            self._dir.cleanup()


def _score_fn(m: str, run: Run, setup: TrainingSetup, qsel: np.ndarray, s: Scope, device: Any, progress: bool,
              emb: _Embeddings) -> Callable[[], InfluenceScores]:
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
        return lambda: emb.get().scores(run.query_gradients(run.final_step), window=w, **common)
    raise ValueError(m)
