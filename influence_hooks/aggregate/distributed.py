"""Aggregating with several processes: `tracin(run, ..., group=torch.distributed.group.WORLD)`.

Every aggregator takes `group=` (a torch.distributed process group, None for one process) and
splits its work over the group's ranks, the way its arithmetic allows:

- by training rows, where scores are sums over rows (tracin, self-influence, dit without
  curvature, DataValueEmbeddings.scores): each rank takes a contiguous share of the steps of every
  span, and the ScoreAccumulators are summed (`ScoreAccumulator.sync`);
- by query columns, where a recursion runs through every step (dit with curvature, in recorded or
  full space): each rank carries its share of the queries through the whole pass, and the columns
  are gathered (`Split.gather_columns`);
- by columns of M for data value embeddings (`Split.columns` of K): each rank keeps the rows of
  M it owns and computes those columns of every embedding.

Every rank returns the whole result, equal to the one-process result up to the order of float
sums. The tensors exchanged live on the aggregation device: gloo for `device='cpu'`, NCCL for
`device='cuda'`. The group must be initialized by the caller (torchrun + init_process_group);
the command line does it when it finds itself launched by torchrun.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..storage.index import StepTable
from ..windows import Window


@dataclass(frozen=True)
class Split:
    """This process's place in a group: rank of size."""

    group: Any
    rank: int
    size: int

    @classmethod
    def of(cls, group: Any) -> "Split | None":
        """A Split for `group`, or None for one process (group None, or a group of one)."""
        if group is None:
            return None
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("group= was given but torch.distributed is not initialized: call "
                               "torch.distributed.init_process_group first (torchrun sets up its environment).")
        size = dist.get_world_size(group)
        return None if size == 1 else cls(group, dist.get_rank(group), size)

    # ------------------------------------------------------------------ rows
    def spans(self, table: StepTable, spans: list[Window]) -> list[Window]:
        """This rank's contiguous share of the steps of each span, balanced by rows; steps stay
        whole. A rank may get nothing of a short span."""
        mine = []
        for t1, t2 in spans:
            mask = (table.steps >= t1) & (table.steps < t2)
            steps, rows = table.steps[mask], table.rows[mask]
            if not len(steps):
                continue
            edges = np.searchsorted(np.cumsum(rows), np.arange(1, self.size) * rows.sum() / self.size, side="left")
            cuts = [0, *[int(e) + 1 for e in edges], len(steps)]
            a, b = min(cuts[self.rank], len(steps)), min(max(cuts[self.rank + 1], cuts[self.rank]), len(steps))
            if b > a:
                mine.append((int(steps[a]), int(steps[b - 1]) + 1))
        return mine

    # ------------------------------------------------------------------ columns
    def columns(self, n: int) -> slice:
        """This rank's share of n columns (queries, or the columns of M): contiguous, in rank order."""
        per, extra = divmod(n, self.size)
        start = self.rank * per + min(self.rank, extra)
        return slice(start, start + per + (1 if self.rank < extra else 0))

    def gather_columns(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """[rows, n] from every rank's [rows, its share of n] (along dim 1), on every rank."""
        import torch.distributed as dist

        widest = -(-n // self.size)
        padded = torch.zeros(t.shape[0], widest, dtype=t.dtype, device=t.device)
        padded[:, :t.shape[1]] = t
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        cols = [parts[r][:, :_share(n, self.size, r)] for r in range(self.size)]
        return torch.cat(cols, dim=1)

    def is_first(self) -> bool:
        return self.rank == 0


def _share(n: int, size: int, rank: int) -> int:
    per, extra = divmod(n, size)
    return per + (1 if rank < extra else 0)


def first_process(split: Split | None) -> bool:
    """Whether this process should show progress and write files."""
    return split is None or split.is_first()
