"""`InfluenceScores`: the one result type every aggregator returns.

Sign convention (README, "Which samples mattered, and when"): a score is f_q(counterfactual
without sample i) - f_q(actual). Positive: removing i raises the query loss, so i helped (a
proponent). Negative: i hurt (an opponent). Self-influence is a non-negative magnitude, not a
signed effect.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from ..errors import ConfigurationError
from ..storage.files import open_h5
from ..storage.jsonio import to_jsonable

SCORES_FORMAT = "influence_hooks.scores"
SCORES_FORMAT_VERSION = 1


@dataclass
class InfluenceScores:
    """Scores of training samples (rows) for queries (columns).

    values: [n_train, n_query] float tensor on the CPU, or [n_train] for per-sample results
        (self-influence, `mean_over_queries`).
    train_ids: [n_train] int64 sample ids of the rows (by default every sample of the run, sorted,
        so results of different windows align row by row).
    present: [n_train] bool: the sample occurs in the steps the method attributes (the window, or
        [first step, t2) for accrued influence). Absent rows hold 0 and are not a measured zero.
    query_ids: [n_query] int64 ids of the columns, None for per-sample results.
    window: the half-open step range [t1, t2) attributed; eval_step: the step t_e at which the query
        is evaluated (None where the method has none); curvature: 'none', 'fisher', ... or None.
    approximations: readable sentences naming every approximation made.
    """

    values: torch.Tensor
    train_ids: np.ndarray
    present: torch.Tensor
    query_ids: np.ndarray | None
    method: str
    window: tuple[int, int] | None = None
    eval_step: int | None = None
    curvature: str | None = None
    approximations: list[str] = field(default_factory=list)
    run_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = torch.as_tensor(self.values).detach().cpu()
        self.present = torch.as_tensor(self.present, dtype=torch.bool).detach().cpu()
        self.train_ids = np.asarray(self.train_ids, np.int64)
        if self.query_ids is not None:
            self.query_ids = np.asarray(self.query_ids, np.int64)
        if self.window is not None:
            self.window = (int(self.window[0]), int(self.window[1]))
        n = len(self.train_ids)
        if self.values.dim() not in (1, 2) or self.values.shape[0] != n or self.present.shape != (n,):
            raise ConfigurationError(
                f"values {tuple(self.values.shape)}, present {tuple(self.present.shape)} and "
                f"{n} train_ids do not fit together.")
        if self.values.dim() == 2:
            if self.query_ids is None or len(self.query_ids) != self.values.shape[1]:
                raise ConfigurationError(f"values have {self.values.shape[1]} query columns but "
                                         f"query_ids is {self.query_ids!r}.")
        elif self.query_ids is not None:
            raise ConfigurationError("per-sample values ([n_train]) take query_ids=None.")

    # ------------------------------------------------------------------ shape
    @property
    def n_train(self) -> int:
        return len(self.train_ids)

    @property
    def n_query(self) -> int:
        return 0 if self.values.dim() == 1 else int(self.values.shape[1])

    @property
    def per_query(self) -> bool:
        return self.values.dim() == 2

    def to_numpy(self) -> np.ndarray:
        """values as a numpy array ([n_train, n_query] or [n_train])."""
        return self.values.numpy()

    def column(self, q: int | None = None) -> torch.Tensor:
        """[n_train] scores for query position q (per-sample results: q=None)."""
        if not self.per_query:
            if q not in (None, 0):
                raise ConfigurationError(f"{self.method} scores are per sample; there is no query {q}.")
            return self.values
        if q is None:
            if self.n_query != 1:
                raise ConfigurationError(f"give a query position q in [0, {self.n_query}).")
            q = 0
        if not -self.n_query <= int(q) < self.n_query:
            raise ConfigurationError(f"query position {q} out of range: there are {self.n_query} queries "
                                     f"(ids {self._short(self.query_ids)}).")
        return self.values[:, int(q)]

    def top_k(self, q: int | None = None, k: int = 10, *, opponents: bool = False, dataset: Any = None
              ) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, list[Any]]:
        """The k strongest proponents (largest positive scores) of query position q, or with
        opponents=True the k strongest opponents (most negative). Only present samples count.

        Returns (train ids [<=k], values [<=k]), strongest first; fewer than k when fewer samples
        have a score of that sign. For per-sample results pass q=None. Given `dataset` (the
        training dataset the run's sample ids index, as the train loader's sampler indexed it),
        returns (ids, values, samples) with samples[j] = dataset[ids[j]].
        """
        col = self.column(q)
        keep = self.present & ((col < 0) if opponents else (col > 0))
        idx = torch.nonzero(keep).flatten()
        vals = col[idx]
        order = torch.argsort(vals, descending=not opponents, stable=True)[:max(int(k), 0)]
        idx = idx[order]
        ids, values = self.train_ids[idx.numpy()], col[idx].numpy()
        if dataset is None:
            return ids, values
        return ids, values, self._samples(dataset, ids)

    def _samples(self, dataset: Any, ids: np.ndarray) -> list[Any]:
        if not hasattr(dataset, "__getitem__"):
            raise ConfigurationError(f"dataset= must be indexable by sample id (dataset[i]); got "
                                     f"{type(dataset).__name__}.")
        try:
            n = len(dataset)
        except TypeError:
            n = None
        top = int(self.train_ids.max()) if len(self.train_ids) else -1
        if n is not None and top >= n:
            raise ConfigurationError(
                f"the scores cover sample ids up to {top}, but the dataset has {n} items: pass the "
                "training dataset the run was recorded on (indexed by the ids the train loader's "
                "sampler yielded).")
        return [dataset[int(i)] for i in ids]

    def mean_over_queries(self) -> "InfluenceScores":
        """The mean score over all queries: a per-sample result [n_train]."""
        if not self.per_query:
            return self
        return replace(self, values=self.values.mean(dim=1), query_ids=None,
                       meta={**self.meta, "aggregated": f"mean over {self.n_query} queries"})

    def to_pandas(self, *, long: bool = False) -> Any:
        """The scores as a pandas DataFrame (needs `pip install "influence-hooks[pandas]"`).

        Wide (default): one row per training sample, indexed by train_id, a bool column 'present',
        then one float column per query ('query_<id>'), or a single 'value' column for per-sample
        results. long=True: one row per (train_id, query_id) pair with columns train_id,
        query_id, value, present (query_id absent for per-sample results). Either way the
        DataFrame's attrs hold method, window, eval_step, curvature and approximations.
        """
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError('InfluenceScores.to_pandas needs pandas: pip install "influence-hooks[pandas]" '
                              "(or pip install pandas).") from e
        vals = self.values.double().numpy().reshape(self.n_train, -1)
        present = self.present.numpy()
        if long:
            nq = vals.shape[1]
            cols = {"train_id": np.repeat(self.train_ids, nq)}
            if self.per_query:
                cols["query_id"] = np.tile(self.query_ids, self.n_train)
            cols.update(value=vals.ravel(), present=np.repeat(present, nq))
            df = pd.DataFrame(cols)
        else:
            names = [f"query_{q}" for q in self.query_ids] if self.per_query else ["value"]
            df = pd.DataFrame(vals, columns=names, index=pd.Index(self.train_ids, name="train_id"))
            df.insert(0, "present", present)
        df.attrs.update(method=self.method, window=self.window, eval_step=self.eval_step,
                        curvature=self.curvature, approximations=list(self.approximations))
        return df

    # ------------------------------------------------------------------ files
    def to_csv(self, path: str | os.PathLike) -> None:
        """One line per training sample: train_id, present, then one column per query
        ('query_<id>'), or a single 'value' column for per-sample results."""
        cols = ([f"query_{q}" for q in self.query_ids] if self.per_query else ["value"])
        vals = self.values.double().numpy().reshape(self.n_train, -1)
        with open(path, "w") as f:
            f.write(",".join(["train_id", "present", *cols]) + "\n")
            for i in range(self.n_train):
                f.write(f"{self.train_ids[i]},{int(self.present[i])},"
                        + ",".join(repr(float(v)) for v in vals[i]) + "\n")

    def save(self, path: str | os.PathLike) -> None:
        """Write to an HDF5 file; `InfluenceScores.load(path)` reads it back."""
        with h5py.File(path, "w") as f:
            f.attrs.update(format=SCORES_FORMAT, format_version=SCORES_FORMAT_VERSION, method=self.method,
                           curvature=self.curvature or "", run_id=self.run_id or "",
                           window=json.dumps(self.window), eval_step=json.dumps(self.eval_step),
                           approximations=json.dumps(self.approximations),
                           meta=json.dumps(to_jsonable(self.meta, max_elements=None)))
            f.create_dataset("values", data=self.values.numpy())
            f.create_dataset("train_ids", data=self.train_ids)
            f.create_dataset("present", data=self.present.numpy())
            if self.query_ids is not None:
                f.create_dataset("query_ids", data=self.query_ids)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "InfluenceScores":
        with open_h5(Path(path)) as f:  # refuses links to, and data in, other files
            if f.attrs.get("format") != SCORES_FORMAT:
                raise ConfigurationError(f"{path} is not an influence_hooks scores file.")
            window = json.loads(f.attrs["window"])
            return cls(values=torch.from_numpy(f["values"][()]), train_ids=f["train_ids"][()],
                       present=torch.from_numpy(f["present"][()]),
                       query_ids=f["query_ids"][()] if "query_ids" in f else None,
                       method=str(f.attrs["method"]), window=tuple(window) if window else None,
                       eval_step=json.loads(f.attrs["eval_step"]),
                       curvature=str(f.attrs["curvature"]) or None,
                       approximations=list(json.loads(f.attrs["approximations"])),
                       run_id=str(f.attrs["run_id"]) or None, meta=json.loads(f.attrs["meta"]))

    # ------------------------------------------------------------------ printing
    def _short(self, ids: np.ndarray | None, n: int = 6) -> str:
        if ids is None:
            return "-"
        s = ", ".join(str(int(i)) for i in ids[:n])
        return f"[{s}{', ...' if len(ids) > n else ''}]"

    def _describe(self) -> str:
        w = f"steps [{self.window[0]}, {self.window[1]})" if self.window else "whole run"
        shape = (f"{self.n_train} train x {self.n_query} queries" if self.per_query
                 else f"{self.n_train} train (per sample)")
        extra = "".join([f", eval at step {self.eval_step}" if self.eval_step is not None else "",
                         f", curvature {self.curvature}" if self.curvature else ""])
        return f"{self.method}, {w}{extra}: {shape}, {int(self.present.sum())} present"

    def __repr__(self) -> str:
        return f"InfluenceScores({self._describe()}, {len(self.approximations)} approximation notes)"

    def summary(self, k: int = 3, max_queries: int = 3) -> str:
        """A readable report: what was computed, its approximations, and for at most
        `max_queries` queries the top-k proponents and opponents."""
        lines = [f"InfluenceScores: {self._describe()}"]
        if self.run_id:
            lines.append(f"  run {self.run_id}")
        for note in self.approximations:
            lines.append(f"  approximation: {note}")
        fmt = lambda ids, vals: ", ".join(f"{int(i)} ({v:+.4g})" for i, v in zip(ids, vals)) or "none"  # noqa: E731
        if self.per_query:
            for q in range(min(self.n_query, max_queries)):
                lines.append(f"  query {int(self.query_ids[q])}:")
                lines.append(f"    proponents (removal raises its loss): {fmt(*self.top_k(q, k))}")
                lines.append(f"    opponents  (removal lowers its loss): {fmt(*self.top_k(q, k, opponents=True))}")
            if self.n_query > max_queries:
                lines.append(f"  ... {self.n_query - max_queries} more queries")
        else:
            lines.append(f"  largest: {fmt(*self.top_k(None, k))}")
            if bool((self.values[self.present] < 0).any()):
                lines.append(f"  most negative: {fmt(*self.top_k(None, k, opponents=True))}")
        return "\n".join(lines)
