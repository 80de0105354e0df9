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

Sign convention (REFERENCE.md): positive influence = removing the sample raises the query loss =
the sample helped (a proponent); negative = it hurt (an opponent).
"""

from __future__ import annotations

import json
import warnings
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch
from torchmetrics.functional import spearman_corrcoef
from torchmetrics.functional.classification import binary_auroc, binary_roc
from torchmetrics.functional.retrieval import retrieval_precision

from ..aggregate import InfluenceScores, dit, dvemb, self_influence, tracin
from ..aggregate._common import normalize_windows
from ..errors import ConfigurationError, MissingDataError
from ..storage.reader import Run

METHODS = ("dit", "tracin", "dvemb")
DETECTION_METHODS = ("dit", "dit_removal", "dit_accrued", "tracin", "self_influence", "dvemb")
HELPFUL, HARMFUL = "consistently helpful", "consistently harmful"
EARLY, LATE = "early-important", "late-important"
FLIPPING, NEGLIGIBLE = "sign-flipping", "negligible"
PATTERNS = (HELPFUL, HARMFUL, EARLY, LATE, FLIPPING, NEGLIGIBLE)
WHOLE_RUN = "whole run"
COMPARISON_FORMAT = "influence_hooks.window_comparison"


# ---------------------------------------------------------------------- patterns
@dataclass(frozen=True)
class PatternRules:
    """Thresholds of `classify_patterns`, relative to the score scale.

    tau: a window is significant for a sample when |score| >= tau * scale.
    concentration: share of a sample's influence mass (sum of |z| over windows) that must lie in the
        early (or late) half of the windows for it to be early- (late-) important.
    scale: 'window' divides each window's scores by that window's RMS over present samples, so a
        pattern says how a sample compares with the typical sample of the same window (gradients
        shrink as training converges; without this almost every sample would look early-important);
        'global' divides everything by the RMS over all windows, keeping the raw time profile.
    """

    tau: float = 1.0
    concentration: float = 0.7
    scale: str = "window"

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise ConfigurationError(f"tau must be positive, got {self.tau}")
        if not 0.5 < self.concentration <= 1.0:
            raise ConfigurationError(f"concentration must be in (0.5, 1], got {self.concentration}")
        if self.scale not in ("window", "global"):
            raise ConfigurationError(f"scale must be 'window' or 'global', got {self.scale!r}")


def normalized_scores(scores: np.ndarray, present: np.ndarray | None = None, scale: str = "window"
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(z [n, W], scales [W]): scores divided by the RMS of the present scores of each window
    (scale='window') or of all windows together (scale='global'). Absent entries become 0."""
    s = np.asarray(scores, np.float64)
    p = np.ones(s.shape, bool) if present is None else np.asarray(present, bool)
    s = np.where(p, s, 0.0)
    if scale == "window":
        cnt = np.maximum(p.sum(0), 1)
        rms = np.sqrt((s ** 2).sum(0) / cnt)
    else:
        rms = np.full(s.shape[1], np.sqrt((s ** 2).sum() / max(p.sum(), 1)))
    rms = np.where(rms > 0, rms, 1.0)
    return s / rms, rms


def classify_patterns(scores: np.ndarray, present: np.ndarray | None = None,
                      rules: PatternRules = PatternRules()) -> np.ndarray:
    """The time pattern of each sample's influence over chronological windows: [n] strings.

    scores: [n, W] influence per window (positive = helpful), windows in time order; present:
    [n, W] whether the sample occurs in the window (absent entries count as 0).
    With z = scores / scale (see PatternRules.scale) and a window *significant* when
    |z| >= tau, the rules, applied in this order:

    1. negligible: no significant window.
    2. sign-flipping: a significant positive window and a significant negative one.
    3. early-important: at least `concentration` of the sample's mass sum_w |z_w| lies in the early
       half of the windows (w < floor(W/2)).
    4. late-important: at least `concentration` of the mass lies in the late half
       (w >= ceil(W/2); with an odd W the middle window belongs to neither half).
    5. consistently helpful / consistently harmful: the rest, by the sign of its significant
       windows (all the same after rule 2): influence of one sign spread over early and late.

    Early- and late-important samples may be helpful or harmful; the sign is in their scores.
    """
    z, _ = normalized_scores(scores, present, rules.scale)
    n, W = z.shape
    sig = np.abs(z) >= rules.tau
    pos = (sig & (z > 0)).any(1)
    neg = (sig & (z < 0)).any(1)
    mass = np.abs(z)
    total = np.maximum(mass.sum(1), np.finfo(float).tiny)
    early = mass[:, :W // 2].sum(1) / total
    late = mass[:, (W + 1) // 2:].sum(1) / total
    out = np.where(np.where(sig, z, 0.0).sum(1) >= 0, HELPFUL, HARMFUL).astype(object)
    out[late >= rules.concentration] = LATE
    out[early >= rules.concentration] = EARLY
    out[pos & neg] = FLIPPING
    out[~sig.any(1)] = NEGLIGIBLE
    return out.astype(str)


# ---------------------------------------------------------------------- statistics
def spearman_matrix(scores: np.ndarray, present: np.ndarray | None = None) -> np.ndarray:
    """[W, W] Spearman rank correlations between the columns of scores [n, W], each pair over the
    samples present in both windows (torchmetrics' spearman_corrcoef; ties get average ranks).
    NaN where fewer than 3 samples are shared or a column is constant."""
    s = torch.as_tensor(np.asarray(scores, np.float64))
    p = np.ones(s.shape, bool) if present is None else np.asarray(present, bool)
    W = s.shape[1]
    out = np.eye(W)
    for a in range(W):
        for b in range(a + 1, W):
            both = torch.from_numpy(p[:, a] & p[:, b])
            x, y = s[both, a], s[both, b]
            if len(x) < 3 or bool((x == x[0]).all()) or bool((y == y[0]).all()):
                r = float("nan")
            else:
                r = float(spearman_corrcoef(x, y))
            out[a, b] = out[b, a] = r
    return out


def _as_unit_interval(x: torch.Tensor) -> torch.Tensor:
    """Average ranks scaled into [0, 1]: the same order and ties as x, as probabilities, so
    torchmetrics does not take the scores for logits (a sigmoid would merge large values)."""
    order = torch.argsort(x, stable=True)
    xs = x[order]
    ranks = torch.empty_like(x, dtype=torch.float64)
    new = torch.ones(len(xs), dtype=torch.bool)
    new[1:] = xs[1:] != xs[:-1]
    group = torch.cumsum(new, 0) - 1
    first = torch.nonzero(new).flatten()
    last = torch.cat([first[1:], torch.tensor([len(xs)])]) - 1
    avg = (first + last).double() / 2
    ranks[order] = avg[group]
    return ranks / max(len(x) - 1, 1)


def detection_quality(corruption_score: np.ndarray, corrupted: np.ndarray, k: int) -> tuple[float, float]:
    """(AUROC, precision at k) of ranking samples by corruption_score [n] (higher = more suspect)
    against the known mask corrupted [n] bool. NaN where a class is missing."""
    c = np.asarray(corrupted, bool)
    if c.all() or not c.any():
        return float("nan"), float("nan")
    preds = _as_unit_interval(torch.as_tensor(np.asarray(corruption_score, np.float64)))
    target = torch.from_numpy(c.astype(np.int64))
    auroc = float(binary_auroc(preds, target))
    prec = float(retrieval_precision(preds, target.bool(), top_k=int(min(k, len(c)))))
    return auroc, prec


def roc_curve(corruption_score: np.ndarray, corrupted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) of the ROC curve (torchmetrics' binary_roc)."""
    preds = _as_unit_interval(torch.as_tensor(np.asarray(corruption_score, np.float64)))
    fpr, tpr, _ = binary_roc(preds, torch.from_numpy(np.asarray(corrupted, bool).astype(np.int64)))
    return fpr.numpy(), tpr.numpy()


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
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        paths = []
        p = d / "influence_by_window.csv"
        cols = ["train_id", "pattern"] + (["corrupted"] if self.corrupted is not None else [])
        cols += [f"{l} [{a},{b})" for l, (a, b) in zip(self.labels, self.windows)]
        cols += [WHOLE_RUN] if self.whole_run is not None else []
        with open(p, "w") as f:
            f.write(",".join(_csv(c) for c in cols) + "\n")
            for i, tid in enumerate(self.train_ids):
                vals = [str(int(tid)), self.patterns[i]]
                if self.corrupted is not None:
                    vals.append(str(int(self.corrupted[i])))
                vals += [repr(float(v)) if self.present[i, w] else "" for w, v in enumerate(self.scores[i])]
                if self.whole_run is not None:
                    vals.append(repr(float(self.whole_run[i])))
                f.write(",".join(vals) + "\n")
        paths.append(p)
        p = d / "correlation.csv"
        labels = list(self.labels) + ([WHOLE_RUN] if self.whole_run_correlation is not None else [])
        full = self.full_correlation()
        with open(p, "w") as f:
            f.write(",".join(["window", *map(_csv, labels)]) + "\n")
            for l, r in zip(labels, full):
                f.write(",".join([_csv(l), *(f"{v:.6f}" for v in r)]) + "\n")
        paths.append(p)
        p = d / "patterns.csv"
        with open(p, "w") as f:
            f.write("pattern,count,examples\n")
            for pat, c in self.counts().items():
                f.write(f"{pat},{c},{' '.join(str(int(i)) for i in self.examples(pat, 10))}\n")
        paths.append(p)
        p = d / "top_samples.csv"
        with open(p, "w") as f:
            f.write("window,kind,rank,train_id,influence\n")
            for l, t in zip(labels, self.top):
                for kind in ("proponents", "opponents"):
                    for r, (i, v) in enumerate(zip(*t[kind])):
                        f.write(f"{_csv(l)},{kind},{r + 1},{int(i)},{float(v)!r}\n")
        paths.append(p)
        if self.detection:
            p = d / "detection.csv"
            with open(p, "w") as f:
                f.write("method,window,t1,t2,auroc,precision_at_k,k\n")
                for r in self.detection:
                    f.write(f"{r['method']},{_csv(r['window'])},{r['t1']},{r['t2']},{r['auroc']:.6f},"
                            f"{r['precision_at_k']:.6f},{r['k']}\n")
            paths.append(p)
        return paths

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
        with h5py.File(path, "w") as f:
            f.attrs.update(format=COMPARISON_FORMAT, format_version=1, method=self.method,
                           description=self.description, query=self.query, run_path=self.run_path,
                           run_id=self.run_id, labels=json.dumps(self.labels),
                           rules=json.dumps(self.rules.__dict__), approximations=json.dumps(self.approximations),
                           detection=json.dumps(self.detection),
                           top=json.dumps([{k: [v[0].tolist(), v[1].tolist()] for k, v in t.items()}
                                           for t in self.top]))
            f["train_ids"] = self.train_ids
            f["windows"] = np.asarray(self.windows, np.int64).reshape(-1, 2)
            f["scores"] = self.scores
            f["present"] = self.present
            f["correlation"] = self.correlation
            f["z"] = self.z
            f.create_dataset("patterns", data=np.asarray(self.patterns, dtype=object),
                             dtype=h5py.string_dtype())
            for name in ("whole_run", "whole_run_present", "whole_run_correlation", "corrupted",
                         "per_query", "query_ids"):
                v = getattr(self, name)
                if v is not None:
                    f[name] = v
            for m, v in self.corruption_scores.items():
                f[f"corruption_scores/{m}"] = v
                f[f"corruption_present/{m}"] = self.corruption_present[m]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WindowComparison":
        with h5py.File(path, "r") as f:
            a = f.attrs
            if a.get("format") != COMPARISON_FORMAT:
                raise ConfigurationError(f"{path} is not a window comparison file.")
            get = lambda n: f[n][()] if n in f else None  # noqa: E731
            top = [{k: (np.asarray(v[0], np.int64), np.asarray(v[1], np.float64)) for k, v in t.items()}
                   for t in json.loads(a["top"])]
            return cls(
                method=str(a["method"]), description=str(a["description"]), query=str(a["query"]),
                train_ids=f["train_ids"][()], windows=[tuple(map(int, w)) for w in f["windows"][()]],
                labels=json.loads(a["labels"]), scores=f["scores"][()], present=f["present"][()],
                whole_run=get("whole_run"), whole_run_present=get("whole_run_present"),
                correlation=f["correlation"][()], whole_run_correlation=get("whole_run_correlation"),
                rules=PatternRules(**json.loads(a["rules"])),
                patterns=np.asarray([p.decode() if isinstance(p, bytes) else p for p in f["patterns"][()]]),
                z=f["z"][()], top=top, corrupted=get("corrupted"), detection=json.loads(a["detection"]),
                corruption_scores={m: v[()] for m, v in f["corruption_scores"].items()} if "corruption_scores" in f else {},
                corruption_present={m: v[()] for m, v in f["corruption_present"].items()} if "corruption_present" in f else {},
                per_query=get("per_query"), query_ids=get("query_ids"),
                approximations=json.loads(a["approximations"]), run_path=str(a["run_path"]), run_id=str(a["run_id"]))

    def write_report(self, directory: str | os.PathLike, **kwargs: Any) -> Path:
        """report.md with PNG plots, CSV and HDF5 in `directory`; returns the report.md path.
        Keyword arguments go to `influence_hooks.report.render.write_report`."""
        from .render import write_report
        return write_report(self, directory, **kwargs)


def _csv(s: str) -> str:
    return f'"{s}"' if ("," in s or '"' in s) else s


# ---------------------------------------------------------------------- computing it
def window_label(run: Run, window: tuple[int, int]) -> str:
    """'epoch 3', 'epochs 3-5' when the window is exactly whole epochs, else 'steps t1-t2'."""
    t1, t2 = window
    mask = (run.steps >= t1) & (run.steps < t2)
    eps = np.unique(run.epochs[mask])
    if len(eps) and eps[-1] - eps[0] + 1 == len(eps) and run.epoch_window(int(eps[0]), int(eps[-1]) + 1) == (t1, t2):
        return f"epoch {eps[0]}" if len(eps) == 1 else f"epochs {eps[0]}-{eps[-1]}"
    return f"steps {t1}-{t2}"


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


def _end_at_query_step(run: Run, window: tuple[int, int]) -> tuple[int, int]:
    """DIT evaluates a window at its end t2, which needs query gradients recorded there. Where
    there are none (an interrupted run's last window, or queries recorded every n steps), the
    window ends at the latest recorded query step inside it instead, with a warning."""
    t1, t2 = window
    if not run.has_queries or t2 in set(run.query_steps.tolist()):
        return window
    q = run.query_step_at_or_before(t2)
    if q is None or q <= t1:
        raise MissingDataError(
            f"window [{t1}, {t2}) has no recorded query gradients at or before its end; record "
            "queries more often (query_every_n_steps) or choose windows that end at query steps "
            f"(recorded at {run.query_steps[:8].tolist()}...).")
    warnings.warn(f"window [{t1}, {t2}) ends at step {q} instead, the latest step with recorded "
                  "query gradients (the run is incomplete or records queries every n steps).",
                  RuntimeWarning, stacklevel=3)
    return t1, q


def compare_windows(run: Run, windows: Sequence[tuple[int, int]] | None = None, *, epochs: Any = None,
                    method: str = "dit", mode: str = "removal", curvature: str = "fisher",
                    query: Any = "mean", corrupted: Any = None,
                    detection_methods: Sequence[str] = ("dit", "tracin", "self_influence"),
                    whole_run: bool = True, top_k: int = 10, precision_k: int | None = None,
                    rules: PatternRules = PatternRules(), dvemb_path: str | os.PathLike | None = None,
                    progress: bool = True) -> WindowComparison:
    """Compare per-sample influence across windows of training. See the module docstring.

    windows: chronological (t1, t2) step windows; or epochs= as the aggregators take it (a list of
        epochs / (e1, e2) ranges, or 'each'); neither: one window per epoch.
    method: 'dit' (mode 'removal': R(i, q; window, t2), the query evaluated at each window's end,
        or 'accrued': the part of the whole-run removal effect that builds up in the window;
        curvature 'fisher', 'none', ...), 'tracin', or 'dvemb' (removal evaluated at the end of
        training).
    query: 'mean' (the query set's mean loss), a query position, or a list of positions (their mean).
    corrupted: known-corrupted samples as a bool mask over run.sample_ids, an array of their ids,
        'auto' (the ids in the run's metadata, as the demo stores them) or None (no detection).
    detection_methods: scored for detection when `corrupted` is given (the primary method too):
        'dit' (the primary mode), 'dit_removal', 'dit_accrued', 'tracin', 'self_influence', 'dvemb'.
    whole_run: also compute the estimator over the whole run (a column for correlations and
        detection). precision_k: k of precision at k, default the number of corrupted samples.
    """
    if method not in METHODS:
        raise ConfigurationError(f"method must be one of {METHODS}, got {method!r}")
    bad = [m for m in detection_methods if m not in DETECTION_METHODS]
    if bad:
        raise ConfigurationError(f"unknown detection method(s) {bad}; choose from {DETECTION_METHODS}")
    if windows is not None and epochs is not None:
        raise ConfigurationError("give windows= or epochs=, not both")
    if windows is not None:
        wins = [run.resolve_window(tuple(w)) for w in windows]
    else:
        wins, _ = normalize_windows(run, None, "each" if epochs is None else epochs, None)
    if len(wins) < 2:
        raise ConfigurationError(f"comparing windows needs at least two, got {wins}")
    if any(b[0] < a[0] for a, b in zip(wins, wins[1:])):
        raise ConfigurationError(f"windows must be in time order (by start step), got {wins}")
    full = (run.first_step, run.last_step + 1)
    all_wins = [_end_at_query_step(run, w) for w in wins + ([full] if whole_run else [])]
    wins = all_wins[:len(wins)]
    train_ids = run.sample_ids
    mask = _corrupted_mask(run, train_ids, corrupted)

    cache: dict[str, list[InfluenceScores]] = {}
    emb_holder: dict[str, Any] = {}

    def compute(m: str) -> list[InfluenceScores]:
        if m in cache:
            return cache[m]
        if m.startswith("dit_"):
            out = dit(run, windows=all_wins, mode=m[len("dit_"):], curvature=curvature, progress=progress)
        elif m == "tracin":
            out = tracin(run, windows=all_wins, before_first_query="use_first", progress=progress)
        elif m == "self_influence":
            out = self_influence(run, windows=all_wins, progress=progress)
        else:
            if "e" not in emb_holder:
                emb_holder["e"] = dvemb(run, path=dvemb_path, progress=progress)
            out = emb_holder["e"].scores(run.query_gradients(run.final_step), windows=all_wins, progress=progress)
        cache[m] = list(out)
        return cache[m]

    primary = compute(_method_name(method, mode))
    W = len(wins)
    per_window = [_reduce_query(r, query) for r in primary]
    scores = np.stack(per_window[:W], 1)
    present = np.stack([r.present.numpy() for r in primary[:W]], 1)
    whole = per_window[W] if whole_run else None
    whole_present = primary[W].present.numpy() if whole_run else None
    corr = spearman_matrix(scores, present)
    whole_corr = None
    if whole_run:
        both = np.concatenate([scores, whole[:, None]], 1)
        bp = np.concatenate([present, whole_present[:, None]], 1)
        whole_corr = spearman_matrix(both, bp)[:W, W]
    patterns = classify_patterns(scores, present, rules)
    z, _ = normalized_scores(scores, present, rules.scale)

    top = []
    for r, vals in zip(primary, per_window):
        per_sample = InfluenceScores(values=torch.from_numpy(vals), train_ids=r.train_ids, present=r.present,
                                     query_ids=None, method=r.method, window=r.window)
        top.append({"proponents": per_sample.top_k(None, top_k),
                    "opponents": per_sample.top_k(None, top_k, opponents=True)})

    labels = [window_label(run, w) for w in wins]
    detection, cscores, cpresent = [], {}, {}
    if mask is not None:
        k = int(precision_k or mask.sum())
        methods = list(dict.fromkeys(_method_name(m, mode) for m in [method, *detection_methods]))
        for m in methods:
            res = compute(m)
            cols, pres = [], []
            for w, r in enumerate(res):
                v = _reduce_query(r, query) if r.per_query else r.values.double().numpy()
                c = v if m == "self_influence" else -v  # opponents of a clean query / large self-influence
                p = r.present.numpy()
                cols.append(c)
                pres.append(p)
                auroc, prec = detection_quality(c[p], mask[p], k)
                detection.append({"method": m, "window": (labels + [WHOLE_RUN])[w],
                                  "t1": int(r.window[0]), "t2": int(r.window[1]), "auroc": auroc,
                                  "precision_at_k": prec, "k": k})
            cscores[m] = np.stack(cols, 1)
            cpresent[m] = np.stack(pres, 1)

    per_query = None
    if primary[0].per_query and primary[0].n_query * W * len(train_ids) <= 50_000_000:
        per_query = np.stack([r.values.numpy() for r in primary[:W]], 1)
    notes = list(dict.fromkeys(n for r in primary for n in r.approximations))
    for m, res in cache.items():  # the other methods' own approximations, from their widest window
        widest = max(res, key=lambda r: r.window[1] - r.window[0])
        notes += [f"{m}: {n}" for n in widest.approximations if n not in notes]
    desc = {"dit": f"DIT {mode} influence ({curvature} curvature)",
            "tracin": "TracIn influence", "dvemb": "data value embedding influence (removal, evaluated at T)"}[method]
    return WindowComparison(
        method=_method_name(method, mode), description=f"{desc} on {_describe_query(run, query)}",
        query=json.dumps(query if isinstance(query, str) else int(query) if isinstance(query, (int, np.integer))
                         else [int(q) for q in query]), train_ids=train_ids, windows=wins, labels=labels, scores=scores,
        present=present, whole_run=whole, whole_run_present=whole_present, correlation=corr,
        whole_run_correlation=whole_corr, rules=rules, patterns=patterns, z=z, top=top, corrupted=mask,
        detection=detection, corruption_scores=cscores, corruption_present=cpresent, per_query=per_query,
        query_ids=primary[0].query_ids, approximations=notes, run_path=str(run.path), run_id=run.run_id,
        results=cache)


def _method_name(m: str, mode: str) -> str:
    """'dit' means the primary DIT mode; every other name is already specific."""
    return f"dit_{mode}" if m == "dit" else m
