"""Streaming a run's gradient rows into compute buffers: what every recorded-space aggregator reads.

`iter_row_blocks(run, span)` yields `RowBlock`s (storage.reader) of whole steps whose gradients sit
in reused [chunk_rows, K] buffers of the compute dtype on the compute device, read and verified
ahead on a thread; `SampleRows` maps sample ids to result rows.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..storage.reader import RowBlock, Run
from ..storage.rowio import FetchedBlock, Stage
from ..windows import Window

DEFAULT_CHUNK_ROWS = 4096
PREFETCH_MIN_ELEMENTS = 1 << 18  # blocks smaller than this are read inline


# ---------------------------------------------------------------------- reading
def iter_row_blocks(run: Run, span: Window, *, reverse: bool = False, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                    dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu"),
                    prefetch: bool | None = None) -> Iterator[RowBlock]:
    """The rows of a window's steps in blocks of whole steps, converted into reused [chunk_rows, K]
    buffers of `dtype` on `device`.

    The shards are read as stored, every byte verified, into reused host buffers
    (`Run.fetch_block`); torch converts them into the compute buffers (vectorized, multi-threaded,
    and moving float16 to a GPU moves half the bytes). Converting into freshly allocated memory
    costs several times more (page faults). With prefetch, a thread reads and verifies the next
    blocks (pread and numpy release the GIL) while the caller computes on this one.
    A block's grads stay valid until the caller asks for the block after the next one (with
    prefetch; without, until the next one); its sample_ids are on `device`, its steps and coef
    (float64) stay numpy arrays on the host.
    prefetch=None: only when there are several blocks big enough to be worth a thread hand-off.
    """
    if prefetch is None:
        prefetch = chunk_rows * run.dim >= PREFETCH_MIN_ELEMENTS and run.table.rows_between(*span) > chunk_rows
    plans = run.block_plans(span, reverse=reverse, max_rows=chunk_rows)
    # raw buffers: the block being converted, one queued, one being read; compute buffers: the
    # caller's block and the one before it
    stages = [Stage() for _ in range(3 if prefetch else 1)]
    bufs: list[torch.Tensor | None] = [None] * (2 if prefetch else 1)

    def fetched() -> Iterator[FetchedBlock]:
        for i, plan in enumerate(plans):
            yield run.fetch_block(plan, stages[i % len(stages)])

    source = _background(fetched(), depth=1) if prefetch else fetched()
    for i, blk in enumerate(source):
        R = blk.n_rows
        buf = bufs[i % len(bufs)]
        if buf is None or buf.shape[0] < R:
            buf = bufs[i % len(bufs)] = torch.empty(max(R, chunk_rows), run.dim, dtype=dtype, device=device)
        yield RowBlock(steps=blk.steps, sample_ids=torch.from_numpy(blk.sample_ids).to(device),
                       coef=run.coef_of(blk.steps), grads=blk.into(buf))


_END = object()


def _background(it: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run iterator `it` on a thread, at most `depth` items ahead; errors re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for x in it:
                while not stop.is_set():
                    try:
                        q.put(x, timeout=0.1)
                        break
                    except queue.Full:
                        pass
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    th = threading.Thread(target=work, name="influence-hooks-prefetch", daemon=True)
    th.start()
    try:
        while True:
            x = q.get()
            if x is _END:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        while th.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass
        th.join()


def step_segments(steps: np.ndarray) -> list[tuple[int, int]]:
    """[(a, b), ...]: the row ranges of each step in a block whose steps are kept whole."""
    cuts = np.flatnonzero(np.diff(steps)) + 1
    edges = np.concatenate([[0], cuts, [len(steps)]])
    return [(int(edges[i]), int(edges[i + 1])) for i in range(len(edges) - 1)]


# ---------------------------------------------------------------------- samples
class SampleRows:
    """Maps sample ids to result rows: train_ids (sorted unique, default every sample of the run)."""

    def __init__(self, run: Run, train_ids: Any, device: torch.device):
        self.subset = train_ids is not None
        self.ids = (run.sample_ids if train_ids is None
                    else np.unique(np.asarray(train_ids, np.int64).ravel()))
        self._ids = torch.from_numpy(np.ascontiguousarray(self.ids)).to(device)
        self.n = len(self.ids)

    def rows(self, sample_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(row of each id, keep mask or None when every id has a row)."""
        pos = torch.searchsorted(self._ids, sample_ids)
        if not self.subset:
            return pos, None
        pos = pos.clamp_(max=max(self.n - 1, 0))
        keep = self._ids[pos] == sample_ids if self.n else torch.zeros_like(sample_ids, dtype=torch.bool)
        return pos, keep


# ---------------------------------------------------------------------- devices and progress
def resolve_device(device: Any) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def progress_bar(total: int, desc: str, progress: bool, unit: str = "row") -> tqdm:
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not progress, leave=False,
                dynamic_ncols=True)
