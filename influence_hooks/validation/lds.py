"""Agreement of influence scores with retraining: correlations over left-out samples, and the linear
datamodeling score (LDS) over random subsets.

Leave-one-out agreement: per query q, the Pearson and Spearman correlation over the samples i of
(estimate[i, q], truth[i, q]), truth = f_q(without i) - f_q(with i); averaged over the queries.

LDS (Park et al. 2023, TRAK, section 2): per query, the Spearman correlation over random subsets S_j
between the query loss actually reached when training keeps only S_j, f_q(S_j), and the loss the
scores predict for it. The scores here follow the library's sign, score_i ~= f_q(without i) -
f_q(with i), and are additive to first order, so dropping the complement R_j of S_j changes the loss
by about sum_{i in R_j} score_i:
    predicted_j = sum_{i in R_j} score_i[q]    ~=   f_q(S_j) - f_q(all)
and LDS = mean over q of Spearman_j(predicted_j, f_q(S_j)). (TRAK sums the attribution of the kept
samples, sum_{i in S_j} tau_i, with tau measuring a *higher* output: the same ranking, as
sum_{S_j} score = sum_all score - sum_{R_j} score.) 1 is a perfect ranking of the subsets, 0 none.

Only numpy: the statistics are a few lines, and the library does not depend on scipy.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 of a 1-D array, ties getting their average rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.ones(len(xs), bool)
    new[1:] = xs[1:] != xs[:-1]
    group = np.cumsum(new) - 1
    first = np.flatnonzero(new)
    last = np.append(first[1:], len(xs)) - 1
    out = np.empty(len(x))
    out[order] = ((first + last) / 2.0)[group]
    return out


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two 1-D arrays; NaN when either is constant or shorter than 3."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    den = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / den) if den > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(ranks(x), ranks(y))


def _mean(values: Sequence[float]) -> float:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def agreement(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(Pearson, Spearman) over the rows of estimate and truth [n, Q], per query, averaged over the
    queries where both are defined."""
    e, t = np.asarray(estimate, np.float64), np.asarray(truth, np.float64)
    if e.shape != t.shape:
        raise ValueError(f"estimate {e.shape} and truth {t.shape} differ in shape")
    return (_mean([pearson(e[:, q], t[:, q]) for q in range(t.shape[1])]),
            _mean([spearman(e[:, q], t[:, q]) for q in range(t.shape[1])]))


def subset_predictions(scores: np.ndarray, ids: np.ndarray, dropped: Sequence[np.ndarray]) -> np.ndarray:
    """[m, Q]: for each subset j, sum of scores[i] over the samples i it drops. scores [n, Q] are
    the scores of the samples `ids` [n]; a dropped id without a score counts 0."""
    scores = np.asarray(scores, np.float64)
    pos = {int(i): k for k, i in enumerate(np.asarray(ids))}
    out = np.zeros((len(dropped), scores.shape[1]))
    for j, d in enumerate(dropped):
        rows = [pos[int(i)] for i in d if int(i) in pos]
        if rows:
            out[j] = scores[rows].sum(0)
    return out


def lds(predicted: np.ndarray, actual: np.ndarray) -> float:
    """Linear datamodeling score: mean over queries of Spearman over subsets of (predicted [m, Q],
    actual [m, Q]) (see the module docstring)."""
    p, a = np.asarray(predicted, np.float64), np.asarray(actual, np.float64)
    if len(p) < 5:
        warnings.warn(f"LDS over {len(p)} subsets is too noisy to mean much", RuntimeWarning, stacklevel=2)
    return _mean([spearman(p[:, q], a[:, q]) for q in range(a.shape[1])])
