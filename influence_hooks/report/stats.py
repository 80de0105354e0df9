"""Statistics of a window comparison: rank correlations between windows and detection quality of
known-corrupted samples (torchmetrics)."""

from __future__ import annotations

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
