"""`ScoreAccumulator`: the state every aggregator fills, after torchmetrics' Metric.

One accumulator holds, for each of several *targets* (a window, or a removal task), a score sum
[n_train, Q] (or [n_train] for per-sample scores) and a presence mask [n_train]. `update` adds the
contributions of some rows, `compute` returns the result of one target, and `sync` sums the state
over the processes of a torch.distributed group (scores add, presence ORs), so work split over
ranks by rows gives every rank the one-process result.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from ..windows import Window, rows_slice


class ScoreAccumulator:
    """Sums of row contributions per target. n: result rows (training samples); q: score columns
    (queries), or None for per-sample scores."""

    def __init__(self, n_targets: int, n: int, q: int | None, *, dtype: torch.dtype, device: torch.device):
        shape = (n,) if q is None else (n, q)
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_targets)]
        self.present = [torch.zeros(n, dtype=torch.bool, device=device) for _ in range(n_targets)]

    def update(self, target: int, rows: torch.Tensor, keep: torch.Tensor | None, contrib: torch.Tensor,
               alpha: float = 1.0) -> None:
        """values[target][rows] += alpha * contrib (rows [R], contrib [R, Q] or [R]); keep: [R]
        bool mask of the rows to use (None: all)."""
        if keep is not None:
            rows, contrib = rows[keep], contrib[keep]
        values = self.values[target]
        # a loss computed in another precision (transformers upcasts logits) gives other dtypes
        self.values[target].index_add_(0, rows, contrib.to(values.dtype), alpha=alpha)
        self.present[target][rows] = True

    def update_windows(self, windows: Sequence[Window], steps: np.ndarray, rows: torch.Tensor,
                       keep: torch.Tensor | None, contrib: torch.Tensor) -> None:
        """Target w gets the rows whose step lies in windows[w] (steps [R] sorted, either way)."""
        for w, window in enumerate(windows):
            sl = rows_slice(steps, window)
            if sl is not None:
                self.update(w, rows[sl], None if keep is None else keep[sl], contrib[sl])

    def sync(self, group: Any = None) -> None:
        """Sum the state over the processes of a torch.distributed group (all of them get it)."""
        import torch.distributed as dist

        for v, p in zip(self.values, self.present):
            dist.all_reduce(v, group=group)
            counts = p.to(torch.int32)
            dist.all_reduce(counts, group=group)
            p.copy_(counts > 0)

    def gather_columns(self, split: Any, n: int) -> None:
        """Each rank held its share of the n score columns (Split.columns): make every rank hold all
        of them, in order. Presence is the same on every rank (each saw every row)."""
        self.values = [split.gather_columns(v, n) for v in self.values]

    def compute(self, target: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, present) of one target, on the CPU."""
        return self.values[target].cpu(), self.present[target].cpu()
