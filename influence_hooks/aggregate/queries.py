"""Query gradients for the recorded-space estimators: the run's own, or given by the caller."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from ..errors import ConfigurationError, MissingDataError, ProjectionMismatchError, short_list
from ..storage.reader import Run


def require_queries(run: Run, method: str) -> None:
    if not run.has_queries:
        raise MissingDataError(
            f"{method} needs query gradients, and {run.path} has none. Record them during training "
            "(queries=... and query_every_n_steps on InfluenceCallback / GradientRecorder), or use "
            "dvemb(run) and score any query later, or self_influence(run), which need no queries.")


def require_query_step(run: Run, step: int, what: str, *, suggest_later: bool) -> None:
    """MissingDataError unless query gradients were recorded at `step`."""
    if step in set(run.query_steps.tolist()):
        return
    # worded for the Python API and the command line alike: no argument only one of them has
    later = run.query_steps[run.query_steps >= step]
    hint = (f"the nearest later one is {int(later[0])}: evaluate there with eval_step={int(later[0])} "
            f"(--eval-step {int(later[0])} on the command line)"
            if len(later) and suggest_later else "choose a window whose ends are recorded query steps")
    raise MissingDataError(
        f"{what} needs the query gradients u_q({step}), but queries were recorded only at "
        f"steps {short_list(run.query_steps, 20)}; {hint}.")


def query_ids_of(run: Run, q: int, given: Any = None) -> np.ndarray:
    """The ids of q query columns: `given`, else the run's recorded query ids, else 0..q-1."""
    if given is not None:
        ids = np.asarray(given, np.int64).ravel()
        if len(ids) != q:
            raise ConfigurationError(f"{len(ids)} query_ids for {q} queries.")
        return ids
    ids = run.query_ids
    return ids if len(ids) == q else np.arange(q, dtype=np.int64)


def check_query_grads(run: Run, grads: Any, fingerprint: str | None, what: str = "query gradients"
                      ) -> torch.Tensor:
    """Check user-given query gradients [Q, K] against the run's projection."""
    g = torch.as_tensor(grads)
    if g.dim() == 1:
        g = g[None]
    if g.dim() != 2 or g.shape[1] != run.dim:
        raise ProjectionMismatchError(
            f"{what} have shape {tuple(torch.as_tensor(grads).shape)}, but the run's projected gradients "
            f"have {run.dim} dimensions: expected [Q, {run.dim}]. Project the query gradients with the "
            "run's projection (same layers, same seed and k).")
    if fingerprint is not None and run.projection_fingerprint and fingerprint != run.projection_fingerprint:
        raise ProjectionMismatchError(
            f"{what} come from projection {fingerprint!r}, the run from {run.projection_fingerprint!r}; "
            "dot products between different projections are meaningless. Recompute the query gradients "
            "with the run's projection.")
    return g


class QueryCache:
    """run.query_gradients(step) in the compute dtype and device, the latest few kept: blocks are
    computed in step order, a few at a time (rows.reduce_row_blocks), and each needs the query
    steps of its own rows. Safe to share between threads."""

    def __init__(self, run: Run, dtype: torch.dtype, device: torch.device, keep: int = 8):
        self.run, self.dtype, self.device, self.keep = run, dtype, device, keep
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, step: int) -> torch.Tensor:
        with self._lock:
            u = self._cache.get(step)
            if u is None:  # the query steps of its shard come in one read
                near = self.run.query_gradients_near(step, dtype=self.dtype, device=self.device)
                self._cache.update(near)
                u = near[step]
                while len(self._cache) > max(self.keep, len(near)):
                    self._cache.popitem(last=False)
            return u
