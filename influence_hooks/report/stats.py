"""Statistics of a window comparison: rank correlations between windows and detection quality of
known-corrupted samples (torchmetrics)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics.functional import spearman_corrcoef
from torchmetrics.functional.classification import binary_auroc, binary_roc
from torchmetrics.functional.retrieval import retrieval_precision


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


def weighted_auroc(score: np.ndarray, corrupted: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of ranking by score [n] against corrupted [n] bool, with each sample counted
    weights[b, i] times (a bootstrap resample as counts): [B]. The Mann-Whitney form, ties count
    one half; NaN for a row without both classes. weights of ones give the plain AUROC."""
    s = np.asarray(score, np.float64)
    y = np.asarray(corrupted, bool)
    w = np.atleast_2d(np.asarray(weights))
    order = np.argsort(s, kind="stable")
    s, y, w = s[order], y[order], w[:, order]
    n_pos, n_neg = w[:, y].sum(1, dtype=np.float64), w[:, ~y].sum(1, dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # groups of tied scores
    if len(starts) == len(s):  # no ties: each positive beats the negatives before it
        neg_upto = np.cumsum(np.where(y, 0, w), axis=1, dtype=np.float64)
        u = (w[:, y] * neg_upto[:, y]).sum(1)
    else:
        pos = np.add.reduceat(np.where(y, w, 0), starts, axis=1).astype(np.float64)
        neg = np.add.reduceat(np.where(y, 0, w), starts, axis=1).astype(np.float64)
        u = (pos * (np.cumsum(neg, axis=1) - 0.5 * neg)).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return u / (n_pos * n_neg)


@dataclass(frozen=True)
class Difference:
    """A difference of two AUROCs on the same samples, with its bootstrap interval."""

    value: float
    low: float
    high: float
    level: float
    n_boot: int

    @property
    def verdict(self) -> str:
        """'holds' (the interval lies above 0), 'does not hold' (below 0), 'within noise' (it
        contains 0) or 'cannot be judged' (no interval)."""
        if not (np.isfinite(self.low) and np.isfinite(self.high)):
            return "cannot be judged"
        return "holds" if self.low > 0 else "does not hold" if self.high < 0 else "within noise"


def auroc_difference(score_a: np.ndarray, score_b: np.ndarray, corrupted: np.ndarray, *,
                     n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> Difference:
    """AUROC(score_a) - AUROC(score_b) on the same samples, with a paired percentile bootstrap
    interval over samples: each of n_boot resamples draws the samples with replacement and
    scores both rankings on it. score_a, score_b: [n] (higher = more suspect); corrupted [n] bool."""
    a, b = np.asarray(score_a, np.float64), np.asarray(score_b, np.float64)
    y = np.asarray(corrupted, bool)
    n = len(y)
    ones = np.ones((1, n))
    value = float(weighted_auroc(a, y, ones)[0] - weighted_auroc(b, y, ones)[0])
    if not np.isfinite(value) or n < 2:
        return Difference(value, float("nan"), float("nan"), level, n_boot)
    draws = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    counts = np.bincount((np.arange(n_boot)[:, None] * n + draws).ravel(), minlength=n_boot * n)
    counts = counts.reshape(n_boot, n).astype(np.int32)  # how often each sample is drawn
    d = weighted_auroc(a, y, counts) - weighted_auroc(b, y, counts)
    d = d[np.isfinite(d)]
    if not len(d):
        return Difference(value, float("nan"), float("nan"), level, n_boot)
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
    return Difference(value, float(lo), float(hi), level, n_boot)
