"""Comparing influence across windows of training: does a sample matter early, late, always, never?

    from influence_hooks.report import compare_windows
    cmp = compare_windows(run, epochs="each", method="dit", corrupted="auto")
    print(cmp.summary())
    cmp.write_report("report/")          # report.md + PNG plots + CSV + HDF5

For a list of windows (chronological, e.g. one per epoch) `compare_windows` computes, with one
aggregator pass per method:

- per-sample influence in each window (`scores` [n_train, W]) on the query set's mean loss (or on
  one query, or the mean over chosen queries), and the same estimator over the whole run;
- the Spearman correlation matrix between windows (torchmetrics' spearman_corrcoef);
- each sample's time pattern (`classify_patterns`, rules in its docstring);
- the top proponents and opponents of each window;
- with a mask of known-corrupted samples: detection quality of each window and of the whole run
  (AUROC and precision at k, torchmetrics), for DIT, TracIn and self-influence scores. Corrupted
  samples should be opponents of a clean validation loss (low, negative influence) and have large
  self-influence, so the corruption score is -influence for DIT/TracIn/DVEmb and +self-influence.

Sign convention (README, "Which samples mattered, and when"): positive influence = removing the
sample raises the query loss = the sample helped (a proponent); negative = it hurt (an opponent).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .. import windows as W
from ..aggregate import InfluenceScores, dit, dvemb, self_influence, tracin
from ..errors import ConfigurationError
from ..storage.reader import Run
from .files import WHOLE_RUN, read_comparison, save_comparison, write_csv
from .patterns import PATTERNS, PatternRules, classify_patterns, normalized_scores
from .stats import detection_quality, spearman_matrix

METHODS = ("dit", "tracin", "dvemb")
DETECTION_METHODS = ("dit", "dit_removal", "dit_accrued", "tracin", "self_influence", "dvemb")


# ---------------------------------------------------------------------- the result
@dataclass
class WindowComparison:
    """What `compare_windows` found. Arrays are numpy; n = training samples, W = windows.

    train_ids [n]; windows: W (t1, t2) step windows in time order with `labels`; scores [n, W]
    per-sample influence in each window on `query` (positive = helpful); present [n, W];
    whole_run [n] / whole_run_present [n]: the same estimator over the whole run (None if not
    computed); correlation [W, W] Spearman between windows and whole_run_correlation [W];
    patterns [n] (classify_patterns with `rules`); z [n, W] the normalized scores the patterns
    were read from; top: per window {'proponents': (ids, values), 'opponents': (ids, values)};
    corrupted [n] bool or None; detection: rows {'method', 'window', 't1', 't2', 'auroc',
    'precision_at_k', 'k'} (the last row of each method is the whole run); corruption_scores:
    {method: [n, W+1]} the scores ranked for detection (higher = more suspect; column W = whole
    run) with corruption_present {method: [n, W+1]}; per_query [n, W, Q] or None.
    """

    method: str
    description: str
    query: str
    train_ids: np.ndarray
    windows: list[tuple[int, int]]
    labels: list[str]
    scores: np.ndarray
    present: np.ndarray
    whole_run: np.ndarray | None
    whole_run_present: np.ndarray | None
    correlation: np.ndarray
    whole_run_correlation: np.ndarray | None
    rules: PatternRules
    patterns: np.ndarray
    z: np.ndarray
    top: list[dict[str, tuple[np.ndarray, np.ndarray]]]
    corrupted: np.ndarray | None = None
    detection: list[dict[str, Any]] = field(default_factory=list)
    corruption_scores: dict[str, np.ndarray] = field(default_factory=dict)
    corruption_present: dict[str, np.ndarray] = field(default_factory=dict)
    per_query: np.ndarray | None = None
    query_ids: np.ndarray | None = None
    approximations: list[str] = field(default_factory=list)
    run_path: str = ""
    run_id: str = ""
    results: dict[str, list[InfluenceScores]] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ views
    @property
    def n_windows(self) -> int:
        return len(self.windows)

    def counts(self) -> dict[str, int]:
        """Number of samples per time pattern, in PATTERNS order."""
        return {p: int((self.patterns == p).sum()) for p in PATTERNS}

    def examples(self, pattern: str, n: int = 5) -> np.ndarray:
        """Up to n train ids of `pattern`, the strongest first (largest max_w |z|)."""
        if pattern not in PATTERNS:
            raise ConfigurationError(f"unknown pattern {pattern!r}; one of {PATTERNS}")
        idx = np.flatnonzero(self.patterns == pattern)
        strength = np.abs(self.z[idx]).max(1) if len(idx) else np.zeros(0)
        return self.train_ids[idx[np.argsort(-strength, kind="stable")[:n]]]

    def row(self, train_id: int) -> int:
        i = int(np.searchsorted(self.train_ids, train_id))
        if i >= len(self.train_ids) or self.train_ids[i] != train_id:
            raise KeyError(f"sample {train_id} is not in this comparison")
        return i

    def detection_table(self) -> dict[str, dict[str, dict[str, float]]]:
        """{method: {window label: {'auroc': ..., 'precision_at_k': ...}}}."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for r in self.detection:
            out.setdefault(r["method"], {})[r["window"]] = {"auroc": r["auroc"], "precision_at_k": r["precision_at_k"]}
        return out

    def early_late_correlation(self) -> float:
        """Spearman correlation between the first and the last window."""
        return float(self.correlation[0, -1]) if self.n_windows > 1 else float("nan")

    def adjacent_correlation(self) -> float:
        """Mean Spearman correlation between consecutive windows."""
        if self.n_windows < 2:
            return float("nan")
        return float(np.nanmean([self.correlation[w, w + 1] for w in range(self.n_windows - 1)]))

    def summary(self, k: int = 3) -> str:
        """A few lines: what was compared, the correlations, the patterns and detection."""
        fmt = lambda x: "  n/a" if not np.isfinite(x) else f"{x:+.2f}"  # noqa: E731
        lines = [f"{self.description}, {self.n_windows} windows: {', '.join(self.labels)}",
                 f"  Spearman first vs last window {fmt(self.early_late_correlation())}, "
                 f"consecutive windows (mean) {fmt(self.adjacent_correlation())}"]
        if self.whole_run_correlation is not None:
            lines.append("  Spearman with the whole run: " + ", ".join(
                f"{l} {fmt(r)}" for l, r in zip(self.labels, self.whole_run_correlation)))
        lines.append("  time patterns: " + ", ".join(f"{p} {c}" for p, c in self.counts().items()))
        if self.detection:
            lines.append(f"  detection of {int(self.corrupted.sum())} corrupted samples (AUROC):")
            table = self.detection_table()
            for m, rows in table.items():
                lines.append(f"    {m:<15} " + "  ".join(f"{w} {v['auroc']:.3f}" for w, v in rows.items()))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"WindowComparison({self.description}, {self.n_windows} windows, {len(self.train_ids)} samples)"

    # ------------------------------------------------------------------ files
    def to_csv(self, directory: str | os.PathLike) -> list[Path]:
        """influence_by_window.csv, correlation.csv, patterns.csv, top_samples.csv and (with a
        corrupted mask) detection.csv in `directory`; returns the paths."""
        return write_csv(self, directory)

    def full_correlation(self) -> np.ndarray:
        """[W(+1), W(+1)]: the window correlations with the whole run appended as last row/column."""
        if self.whole_run_correlation is None:
            return self.correlation
        W = self.n_windows
        out = np.eye(W + 1)
        out[:W, :W] = self.correlation
        out[W, :W] = out[:W, W] = self.whole_run_correlation
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Everything (but the raw InfluenceScores) in one HDF5 file; `WindowComparison.load` reads it."""
        save_comparison(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WindowComparison":
        return cls(**read_comparison(path))

    def write_report(self, directory: str | os.PathLike, **kwargs: Any) -> Path:
        """report.md with PNG plots, CSV and HDF5 in `directory`; returns the report.md path.
        Keyword arguments go to `influence_hooks.report.render.write_report`."""
        from .render import write_report
        return write_report(self, directory, **kwargs)


# ---------------------------------------------------------------------- computing it
def corrupted_from_run(run: Run) -> np.ndarray | None:
    """The ids of known-corrupted samples stored in the run's metadata (data.corrupted_ids, as the
    demo's data modules write them), or None."""
    meta = run.manifest.get("metadata") or {}
    for src in (meta.get("data") or {}, meta):
        if isinstance(src, dict) and src.get("corrupted_ids") is not None:
            return np.asarray(src["corrupted_ids"], np.int64)
    return None


def _corrupted_mask(run: Run, train_ids: np.ndarray, corrupted: Any) -> np.ndarray | None:
    if corrupted is None:
        return None
    if isinstance(corrupted, str):
        if corrupted != "auto":
            raise ConfigurationError(f"corrupted= takes a mask, ids, 'auto' or None, got {corrupted!r}")
        ids = corrupted_from_run(run)
        return None if ids is None else np.isin(train_ids, ids)
    c = np.asarray(corrupted)
    if c.dtype == bool:
        if c.shape != train_ids.shape:
            raise ConfigurationError(f"a corrupted mask needs one entry per training sample of the run "
                                     f"({len(train_ids)}, sorted by id), got shape {c.shape}; or pass the ids.")
        return c
    return np.isin(train_ids, c.astype(np.int64).ravel())


def _reduce_query(res: InfluenceScores, query: Any) -> np.ndarray:
    if not res.per_query:
        return res.values.double().numpy()
    if isinstance(query, str):
        if query != "mean":
            raise ConfigurationError(f"query= takes 'mean', a query position or a list of them; got {query!r}")
        return res.mean_over_queries().values.double().numpy()
    if isinstance(query, (int, np.integer)):
        return res.column(int(query)).double().numpy()
    cols = [int(q) for q in query]
    return res.values[:, cols].double().mean(1).numpy()


def _describe_query(run: Run, query: Any) -> str:
    nq = len(run.query_ids)
    if isinstance(query, str):
        return f"the mean loss of the {nq} queries" if nq else "the mean query loss"
    if isinstance(query, (int, np.integer)):
        qid = run.query_ids[int(query)] if nq else int(query)
        return f"the loss of query {int(qid)} (position {int(query)})"
    return f"the mean loss of {len(list(query))} chosen queries"


def _end_at_query_step(run: Run, window: W.Window) -> W.Window:
    """DIT evaluates a window at its end t2, which needs query gradients recorded there. Where
    there are none (an interrupted run's last window, or queries recorded every n steps), the
    window ends at the latest recorded query step inside it instead, with a warning."""
    if not run.has_queries:
        return window
    return W.end_at(window, run.query_steps, "recorded query gradients (the run is incomplete or records "
                                            "queries every n steps)")


def compare_windows(run: Run, windows: Sequence[tuple[int, int]] | None = None, *, epochs: Any = None,
                    method: str = "dit", mode: str | None = None, curvature: str | None = None,
                    query: Any = "mean", corrupted: Any = None,
                    detection_methods: Sequence[str] = ("dit", "tracin", "self_influence"),
                    whole_run: bool = True, top_k: int = 10, precision_k: int | None = None,
                    rules: PatternRules = PatternRules(), dvemb_path: str | os.PathLike | None = None,
                    progress: bool = True, group: Any = None) -> WindowComparison:
    """Compare per-sample influence across windows of training. See the module docstring.

    windows: chronological (t1, t2) step windows; or epochs= as the aggregators take it (a list of
        epochs / (e1, e2) ranges, or 'each'); neither: one window per epoch.
    method: 'dit' (mode 'removal', the default: R(i, q; window, t2), the query evaluated at each
        window's end, or 'accrued': the part of the whole-run removal effect that builds up in the
        window; curvature 'fisher' (default), 'none', ...), 'tracin', or 'dvemb' (removal evaluated
        at the end of training). mode applies to method 'dit' only, curvature to whatever DIT
        computes (the method, or DIT detection scores); given where they would be ignored, they
        are an error.
    query: 'mean' (the query set's mean loss), a query position, or a list of positions (their mean).
    corrupted: known-corrupted samples as a bool mask over run.sample_ids, an array of their ids,
        'auto' (the ids in the run's metadata, as the demo stores them) or None (no detection).
    detection_methods: scored for detection when `corrupted` is given (the primary method too):
        'dit' (the primary mode), 'dit_removal', 'dit_accrued', 'tracin', 'self_influence', 'dvemb'.
    whole_run: also compute the estimator over the whole run (a column for correlations and
        detection). precision_k: k of precision at k, default the number of corrupted samples.
    group: a torch.distributed process group: every aggregator splits its work over it, and every
        rank gets the whole comparison (write the report from one rank).
    """
    if method not in METHODS:
        raise ConfigurationError(f"method must be one of {METHODS}, got {method!r}")
    bad = [m for m in detection_methods if m not in DETECTION_METHODS]
    if bad:
        raise ConfigurationError(f"unknown detection method(s) {bad}; choose from {DETECTION_METHODS}")
    train_ids = run.sample_ids
    mask = _corrupted_mask(run, train_ids, corrupted)
    mode, curvature = _dit_options(method, mode, curvature, detection_methods if mask is not None else ())
    wins = _chronological_windows(run, windows, epochs)
    full = (run.first_step, run.last_step + 1)
    all_wins = [_end_at_query_step(run, w) for w in wins + ([full] if whole_run else [])]
    wins = all_wins[:len(wins)]
    scorer = _Scorer(run, all_wins, curvature, dvemb_path, progress, group)
    primary = scorer(_method_name(method, mode))
    nw = len(wins)
    per_window = [_reduce_query(r, query) for r in primary]
    scores = np.stack(per_window[:nw], 1)
    present = np.stack([r.present.numpy() for r in primary[:nw]], 1)
    whole = per_window[nw] if whole_run else None
    whole_present = primary[nw].present.numpy() if whole_run else None
    corr = spearman_matrix(scores, present)
    whole_corr = None
    if whole_run:
        both = np.concatenate([scores, whole[:, None]], 1)
        bp = np.concatenate([present, whole_present[:, None]], 1)
        whole_corr = spearman_matrix(both, bp)[:nw, nw]
    labels = [W.label(run.table, w) for w in wins]
    detection, cscores, cpresent = [], {}, {}
    if mask is not None:
        methods = list(dict.fromkeys(_method_name(m, mode) for m in [method, *detection_methods]))
        detection, cscores, cpresent = _detection(scorer, methods, query, mask, labels + [WHOLE_RUN],
                                                  int(precision_k or mask.sum()))
    per_query = None
    if primary[0].per_query and primary[0].n_query * nw * len(train_ids) <= 50_000_000:
        per_query = np.stack([r.values.numpy() for r in primary[:nw]], 1)
    desc = {"dit": f"DIT {mode} influence ({curvature} curvature)",
            "tracin": "TracIn influence", "dvemb": "data value embedding influence (removal, evaluated at T)"}[method]
    return WindowComparison(
        method=_method_name(method, mode), description=f"{desc} on {_describe_query(run, query)}",
        query=json.dumps(query if isinstance(query, str) else int(query) if isinstance(query, (int, np.integer))
                         else [int(q) for q in query]), train_ids=train_ids, windows=wins, labels=labels, scores=scores,
        present=present, whole_run=whole, whole_run_present=whole_present, correlation=corr,
        whole_run_correlation=whole_corr, rules=rules, patterns=classify_patterns(scores, present, rules),
        z=normalized_scores(scores, present, rules.scale)[0], top=_top_lists(primary, per_window, top_k),
        corrupted=mask, detection=detection, corruption_scores=cscores, corruption_present=cpresent,
        per_query=per_query, query_ids=primary[0].query_ids, approximations=_notes(primary, scorer.cache),
        run_path=str(run.path), run_id=run.run_id, results=scorer.cache)


def _dit_options(method: str, mode: str | None, curvature: str | None, detection: Sequence[str]
                 ) -> tuple[str, str]:
    """(mode, curvature) with their defaults; refused where nothing would use them."""
    if mode is not None and method != "dit":
        raise ConfigurationError(
            f"mode={mode!r} applies to method='dit' only; method={method!r} has no mode (tracin sums "
            "g.u over the window; dvemb is removal evaluated at the end of training). For DIT's "
            "detection scores in a given mode, name them in detection_methods (--detection on the command "
            "line): 'dit_removal', 'dit_accrued'.")
    if curvature is not None and method != "dit" and not any(m.startswith("dit") for m in detection):
        raise ConfigurationError(
            f"curvature={curvature!r} applies to DIT, and nothing here computes DIT (method={method!r}, "
            f"detection {list(detection) or 'none'}). Leave it out, or use method='dit'.")
    return mode or "removal", curvature or "fisher"


def _chronological_windows(run: Run, windows: Any, epochs: Any) -> list[W.Window]:
    if windows is not None and epochs is not None:
        raise ConfigurationError("give windows= or epochs=, not both")
    if windows is not None:
        wins, _ = W.normalize(run.table, windows=[tuple(w) for w in windows])
    else:
        wins, _ = W.normalize(run.table, epochs="each" if epochs is None else epochs)
    if len(wins) < 2:
        raise ConfigurationError(f"comparing windows needs at least two, got {wins}")
    if any(b[0] < a[0] for a, b in zip(wins, wins[1:])):
        raise ConfigurationError(f"windows must be in time order (by start step), got {wins}")
    return wins


class _Scorer:
    """Each estimator's results over all the windows, computed once (one pass per method)."""

    def __init__(self, run: Run, windows: list[W.Window], curvature: str, dvemb_path: Any, progress: bool,
                 group: Any):
        self.run, self.windows, self.curvature = run, windows, curvature
        self.dvemb_path, self.progress, self.group = dvemb_path, progress, group
        self.cache: dict[str, list[InfluenceScores]] = {}
        self._emb: Any = None

    def __call__(self, m: str) -> list[InfluenceScores]:
        if m not in self.cache:
            self.cache[m] = list(self._compute(m))
        return self.cache[m]

    def _compute(self, m: str) -> list[InfluenceScores]:
        run, wins = self.run, self.windows
        common = dict(progress=self.progress, group=self.group)
        if m.startswith("dit_"):
            return dit(run, windows=wins, mode=m[len("dit_"):], curvature=self.curvature, **common)
        if m == "tracin":
            return tracin(run, windows=wins, before_first_query="use_first", **common)
        if m == "self_influence":
            return self_influence(run, windows=wins, **common)
        if self._emb is None:
            self._emb = dvemb(run, path=self.dvemb_path, **common)
        return self._emb.scores(run.query_gradients(run.final_step), windows=wins, **common)


def _top_lists(primary: list[InfluenceScores], per_window: list[np.ndarray], k: int) -> list[dict[str, Any]]:
    top = []
    for r, vals in zip(primary, per_window):
        per_sample = InfluenceScores(values=torch.from_numpy(vals), train_ids=r.train_ids, present=r.present,
                                     query_ids=None, method=r.method, window=r.window)
        top.append({"proponents": per_sample.top_k(None, k), "opponents": per_sample.top_k(None, k, opponents=True)})
    return top


def _detection(scorer: _Scorer, methods: list[str], query: Any, mask: np.ndarray, labels: list[str], k: int
               ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Detection quality of each method in each window. Corrupted samples should be opponents of a
    clean query (-influence) and have large self-influence (+self-influence)."""
    detection, cscores, cpresent = [], {}, {}
    for m in methods:
        cols, pres = [], []
        for w, r in enumerate(scorer(m)):
            v = _reduce_query(r, query) if r.per_query else r.values.double().numpy()
            c = v if m == "self_influence" else -v
            p = r.present.numpy()
            cols.append(c)
            pres.append(p)
            auroc, prec = detection_quality(c[p], mask[p], k)
            detection.append({"method": m, "window": labels[w], "t1": int(r.window[0]), "t2": int(r.window[1]),
                              "auroc": auroc, "precision_at_k": prec, "k": k})
        cscores[m] = np.stack(cols, 1)
        cpresent[m] = np.stack(pres, 1)
    return detection, cscores, cpresent


def _notes(primary: list[InfluenceScores], cache: dict[str, list[InfluenceScores]]) -> list[str]:
    notes = list(dict.fromkeys(n for r in primary for n in r.approximations))
    for m, res in cache.items():  # the other methods' own approximations, from their widest window
        widest = max(res, key=lambda r: r.window[1] - r.window[0])
        notes += [f"{m}: {n}" for n in widest.approximations if n not in notes]
    return notes


def _method_name(m: str, mode: str) -> str:
    """'dit' means the primary DIT mode; every other name is already specific."""
    return f"dit_{mode}" if m == "dit" else m
