"""Streaming a run's gradient rows into compute buffers: what every recorded-space aggregator reads.

Two ways through the rows, both on `Run.block_plans` / `Run.fetch_block` (every byte verified,
read into reused host buffers, converted by torch into reused [chunk_rows, K] compute buffers):

- `reduce_row_blocks(run, spans, compute, commit)` (and `reduce_rows`, which adds the process
  group's share and a progress bar), for sums over rows (TracIn, self-influence,
  windowed influence without curvature): on the CPU, one worker thread per torch thread, each
  reading and computing whole blocks with a single torch thread (`SumBlock`: products convert
  the stored rows tile by tile, `BlockRows.matmul`); results are committed in block order, so
  scores do not depend on thread timing.
- `iter_row_blocks(run, span)`, for the step-by-step recursions (windowed influence with curvature,
  data value embeddings): `RowBlock`s in step order or reversed, read inline on the CPU (with all
  torch threads) or ahead on a thread for a GPU.

Why no reader thread next to multi-threaded compute on the CPU: an OpenMP operation waits at its
barrier for every one of its threads, so whenever a reader thread (or another process) holds one
of them off its core, the whole operation stalls; the per-step GEMMs of the recursions are small
enough for that to cost more than reading itself (measured: up to tens of times slower with 2
cores). Workers with one torch thread each never wait on one another inside an operation.

`SampleRows` maps sample ids to result rows.
"""

from __future__ import annotations

import itertools
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..storage.reader import RowBlock, Run
from ..storage.rowio import FetchedBlock, Stage
from ..windows import Window
from .distributed import Split, first_process

DEFAULT_CHUNK_ROWS = 4096
PREFETCH_MIN_ELEMENTS = 1 << 18  # blocks smaller than this are read inline


# ---------------------------------------------------------------------- reading
TILE_ROWS = 512  # rows converted at a time for a product: a float32 tile of k=1024 (2 MiB) stays in cache


class BlockRows:
    """A block's gradient rows for products: either converted already (`grads`), or as stored
    (`fetched`), converted tile by tile into a small reused buffer by `matmul`, so that each
    tile is multiplied while it is still in cache (on the CPU about 15% faster than converting
    the whole block first, which writes and reads it back through memory)."""

    def __init__(self, grads: torch.Tensor | None = None, fetched: FetchedBlock | None = None,
                 tile: torch.Tensor | None = None, full: torch.Tensor | None = None):
        self._grads, self._fetched, self._tile, self._full = grads, fetched, tile, full

    @property
    def like(self) -> torch.Tensor:
        """A tensor of the rows' compute dtype and device."""
        return self._grads if self._grads is not None else self._tile

    def all(self) -> torch.Tensor:
        """Every row, converted (into the worker's block buffer)."""
        if self._grads is None:
            self._grads = self._fetched.into(self._full)
        return self._grads

    def matmul(self, a: int, b: int, rhs: torch.Tensor) -> torch.Tensor:
        """rows[a:b] @ rhs: [b - a, Q] for rhs [K, Q]."""
        if self._grads is not None:
            return self._grads[a:b] @ rhs
        out = torch.empty(b - a, rhs.shape[1], dtype=self._tile.dtype, device=self._tile.device)
        for t0 in range(a, b, len(self._tile)):
            t1 = min(b, t0 + len(self._tile))
            torch.mm(self._fetched.rows_into(self._tile, t0, t1), rhs, out=out[t0 - a:t1 - a])
        return out


@dataclass
class SumBlock:
    """What reduce_row_blocks hands to compute: a RowBlock whose rows come as BlockRows."""

    steps: np.ndarray
    sample_ids: torch.Tensor
    rows: BlockRows

    @property
    def grads(self) -> torch.Tensor:
        return self.rows.all()


def reduce_row_blocks(run: Run, spans: Sequence[Window], compute: Callable[[SumBlock], Any],
                      commit: Callable[[SumBlock, Any], None], *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                      dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu"),
                      workers: int | None = None) -> None:
    """compute(blk) for every block of whole steps of the spans' rows, then commit(blk, result),
    one commit at a time and in block order (forward step order).

    compute may run on several threads at once and gets a block whose grads live in its worker's
    buffer until it returns; commit gets the block's steps and sample_ids (its grads may be
    reused by then) and the result. On the CPU: `workers` threads (default torch.get_num_threads()),
    each with a single torch thread. Elsewhere: one thread computes while another reads ahead.
    """
    plans = itertools.chain.from_iterable(run.block_plans(s, max_rows=chunk_rows) for s in spans)
    n = workers or torch.get_num_threads()
    if device.type != "cpu" or n <= 1 or sum(run.table.rows_between(*s) for s in spans) <= chunk_rows:
        for blk in _row_blocks(run, plans, chunk_rows, dtype, device, prefetch=device.type != "cpu"):
            sb = SumBlock(blk.steps, blk.sample_ids, BlockRows(grads=blk.grads))
            commit(sb, compute(sb))
        return

    cond = threading.Condition()
    ready: dict[int, tuple[SumBlock, Any]] = {}
    state = {"taken": 0, "committed": 0, "error": None}
    ahead = 2 * n  # blocks computed but not committed yet, at most

    def take() -> tuple[int, Any] | None:
        with cond:
            while state["error"] is None and state["taken"] - state["committed"] >= ahead:
                cond.wait(0.1)
            if state["error"] is not None:
                return None
            plan = next(plans, None)
            if plan is None:
                return None
            state["taken"] += 1
            return state["taken"] - 1, plan

    def deliver(i: int, blk: SumBlock, result: Any) -> None:
        with cond:
            ready[i] = (blk, result)
            while state["committed"] in ready and state["error"] is None:
                commit(*ready.pop(state["committed"]))
                state["committed"] += 1
            cond.notify_all()

    def work() -> None:
        torch.set_num_threads(1)  # this thread's own OpenMP/MKL setting
        stage, buf = Stage(), None
        tile = torch.empty(TILE_ROWS, run.dim, dtype=dtype)
        try:
            while (job := take()) is not None:
                i, plan = job
                fetched = run.fetch_block(plan, stage)
                if buf is None or buf.shape[0] < fetched.n_rows:
                    buf = torch.empty(max(fetched.n_rows, chunk_rows), run.dim, dtype=dtype)
                blk = SumBlock(fetched.steps, torch.from_numpy(fetched.sample_ids),
                               BlockRows(fetched=fetched, tile=tile, full=buf))
                deliver(i, blk, compute(blk))
        except BaseException as e:  # noqa: BLE001 - re-raised by the calling thread
            with cond:
                state["error"] = state["error"] or e
                cond.notify_all()

    threads_before = torch.get_num_threads()
    pool = [threading.Thread(target=work, name=f"influence-hooks-rows-{k}", daemon=True) for k in range(n)]
    try:
        for th in pool:
            th.start()
        for th in pool:
            while th.is_alive():
                th.join(0.1)
    except BaseException as e:  # an interrupt: stop the workers, then let it through
        with cond:
            state["error"] = state["error"] or e
            cond.notify_all()
        for th in pool:
            th.join()
        raise
    finally:
        torch.set_num_threads(threads_before)  # new threads take their default from the last call
    if state["error"] is not None:
        raise state["error"]


def iter_row_blocks(run: Run, span: Window, *, reverse: bool = False, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                    dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu"),
                    prefetch: bool | None = None) -> Iterator[RowBlock]:
    """The rows of a window's steps in blocks of whole steps, converted into reused [chunk_rows, K]
    buffers of `dtype` on `device`, in step order or reversed.

    The shards are read as stored, every byte verified, into reused host buffers
    (`Run.fetch_block`); torch converts them into the compute buffers (vectorized, multi-threaded;
    moving float16 to a GPU moves half the bytes). Converting into freshly allocated memory costs
    several times more (page faults). With prefetch, a thread reads and verifies the next blocks
    (pread and numpy release the GIL) while the caller computes on this one.
    A block's grads stay valid until the caller asks for the block after the next one (with
    prefetch; without, until the next one); its sample_ids are on `device`, its steps and coef
    (float64) stay numpy arrays on the host.
    prefetch=None: for a GPU, when there are several blocks big enough to be worth a thread
    hand-off; never on the CPU (see the module docstring).
    """
    if prefetch is None:
        prefetch = (device.type != "cpu" and chunk_rows * run.dim >= PREFETCH_MIN_ELEMENTS
                    and run.table.rows_between(*span) > chunk_rows)
    yield from _row_blocks(run, run.block_plans(span, reverse=reverse, max_rows=chunk_rows), chunk_rows, dtype,
                           device, prefetch)


def _row_blocks(run: Run, plans: Iterator[Any], chunk_rows: int, dtype: torch.dtype, device: torch.device,
                prefetch: bool) -> Iterator[RowBlock]:
    # raw buffers: the block being converted, one queued, one being read; compute buffers: the
    # caller's block and the one before it
    stages = [Stage() for _ in range(3 if prefetch else 1)]
    bufs: list[torch.Tensor | None] = [None] * (2 if prefetch else 1)

    def fetched() -> Iterator[FetchedBlock]:
        for i, plan in enumerate(plans):
            yield run.fetch_block(plan, stages[i % len(stages)])

    source = _background(fetched(), depth=1) if prefetch else fetched()
    for i, blk in enumerate(source):
        buf = bufs[i % len(bufs)]
        if buf is None or buf.shape[0] < blk.n_rows:
            buf = bufs[i % len(bufs)] = torch.empty(max(blk.n_rows, chunk_rows), run.dim, dtype=dtype, device=device)
        yield _as_block(run, blk, buf, device)


def _as_block(run: Run, fetched: FetchedBlock, buf: torch.Tensor, device: torch.device) -> RowBlock:
    return RowBlock(steps=fetched.steps, sample_ids=torch.from_numpy(fetched.sample_ids).to(device),
                    coef=run.coef_of(fetched.steps), grads=fetched.into(buf))


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


def reduce_rows(run: Run, spans: list[Window], compute: Callable[[RowBlock], Any],
                commit: Callable[[RowBlock, Any], None], *, desc: str, progress: bool, split: Split | None = None,
                chunk_rows: int = DEFAULT_CHUNK_ROWS, dtype: torch.dtype = torch.float32,
                device: torch.device = torch.device("cpu")) -> None:
    """reduce_row_blocks over this process's share of the spans (all of them without a process
    group), with a progress bar counted in rows (shown by the first process only)."""
    mine = spans if split is None else split.spans(run.table, spans)
    with progress_bar(sum(run.table.rows_between(*s) for s in mine), desc, progress and first_process(split)) as bar:
        def counted(blk: RowBlock, out: Any) -> None:
            commit(blk, out)
            bar.update(len(blk.steps))

        reduce_row_blocks(run, mine, compute, counted, chunk_rows=chunk_rows, dtype=dtype, device=device)


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
        # dense ids (dataset indices usually are): a lookup table, several times faster than a search
        self._lut = None
        if self.n and 0 <= int(self.ids[0]) and int(self.ids[-1]) < 4 * self.n + 4096:
            lut = torch.full((int(self.ids[-1]) + 2,), -1, dtype=torch.int64)  # the last entry: ids beyond
            lut[torch.from_numpy(np.ascontiguousarray(self.ids))] = torch.arange(self.n)
            self._lut = lut.to(device)

    def rows(self, sample_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(row of each id, keep mask or None when every id has a row)."""
        if self._lut is not None:
            last = len(self._lut) - 1  # the sentinel (-1): ids beyond the table, and negative ones
            pos = self._lut[torch.where(sample_ids < 0, last, sample_ids.clamp(max=last))]
            if not self.subset:
                return pos, None
            keep = pos >= 0
            return pos.clamp_(min=0), keep
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
