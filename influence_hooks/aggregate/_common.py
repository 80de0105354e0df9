"""Pieces every aggregator shares: windows, sample-id rows, query checks, progress, notes."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import MissingDataError, ProjectionMismatchError, WindowError
from ..storage.reader import Run

DEFAULT_CHUNK_ROWS = 4096
PREFETCH_MIN_ELEMENTS = 1 << 18  # blocks smaller than this are read inline
Window = tuple[int, int]


# ---------------------------------------------------------------------- windows
def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_pair(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(_is_int(v) for v in x)


def normalize_windows(run: Run, window: Any = None, epochs: Any = None,
                      windows: Any = None) -> tuple[list[Window], bool]:
    """Turn the window arguments of an aggregator into checked half-open step windows.

    window=(t1, t2): one window; epochs=(e1, e2) (epochs e1..e2-1) or epochs=e: one window;
    windows=[(t1, t2), ...] or epochs=[e or (e1, e2), ...] or epochs='each': many windows.
    Nothing given: the whole run. Returns (windows, many): many says whether to return a list.
    """
    if sum(x is not None for x in (window, epochs, windows)) > 1:
        raise WindowError("give one of window=(t1, t2), epochs=..., windows=[...], not several.")
    if windows is not None:
        if isinstance(windows, (str, bytes)) or not isinstance(windows, Iterable):
            raise WindowError(f"windows= takes a list of (t1, t2) pairs, got {windows!r}")
        windows = list(windows)
        if not windows:
            raise WindowError("windows= is an empty list: give at least one (t1, t2) window.")
        return [run.resolve_window(tuple(w) if isinstance(w, list) else w) for w in windows], True
    if epochs is not None:
        if isinstance(epochs, str):
            if epochs != "each":
                raise WindowError(f"epochs= takes (e1, e2), an epoch, a list of them or 'each'; got {epochs!r}")
            return run.epoch_windows(), True
        if _is_int(epochs):
            return [run.epoch_window(int(epochs))], False
        if isinstance(epochs, tuple) and _is_pair(epochs):
            return [run.resolve_window(epochs=(int(epochs[0]), int(epochs[1])))], False
        if isinstance(epochs, (list, tuple)):
            if not epochs:
                raise WindowError("epochs= is an empty list: give at least one epoch.")
            out = []
            for e in epochs:
                if _is_int(e):
                    out.append(run.epoch_window(int(e)))
                elif _is_pair(e):
                    out.append(run.resolve_window(epochs=(int(e[0]), int(e[1]))))
                else:
                    raise WindowError(f"an epoch range is e or (e1, e2), got {e!r}")
            return out, True
        raise WindowError(f"epochs= takes (e1, e2), an epoch, a list of them or 'each'; got {epochs!r}")
    if isinstance(window, (list, tuple)) and window and all(isinstance(w, (list, tuple)) for w in window):
        raise WindowError(f"window= takes one (t1, t2) pair; for several windows in one pass use "
                          f"windows={list(window)!r}.")
    return [run.resolve_window(window)], False


def merge_windows(windows: Sequence[Window]) -> list[Window]:
    """The union of windows as disjoint sorted step ranges (each one pass over the shards)."""
    out: list[list[int]] = []
    for t1, t2 in sorted(windows):
        if out and t1 <= out[-1][1]:
            out[-1][1] = max(out[-1][1], t2)
        else:
            out.append([t1, t2])
    return [(a, b) for a, b in out]


def rows_between(run: Run, t1: int, t2: int) -> int:
    """Rows of the finite recorded steps in [t1, t2): the work of one pass, for progress bars."""
    mask = (run.steps >= t1) & (run.steps < t2) & ~run.nonfinite
    return int(run.batch_sizes_recorded[mask].sum())


def window_notes(run: Run, t1: int, t2: int) -> list[str]:
    """Approximation notes about the data of steps [t1, t2): skipped or missing steps."""
    notes = []
    mask = (run.steps >= t1) & (run.steps < t2)
    bad = run.steps[mask & run.nonfinite]
    if len(bad):
        notes.append(f"{len(bad)} step(s) with non-finite gradients skipped: {short_list(bad)}")
    missing = (t2 - t1) - int(mask.sum())
    if missing > 0 and t1 >= run.first_step:
        notes.append(f"{missing} step(s) of [{t1}, {t2}) are not recorded and contribute nothing")
    if not run.complete:
        notes.append("the run is incomplete (training was interrupted or is still running); "
                     f"only steps up to {run.last_step} are used")
    return notes


def short_list(xs: Sequence[int] | np.ndarray, n: int = 12) -> str:
    xs = [int(x) for x in xs]
    return "[" + ", ".join(map(str, xs[:n])) + (f", ... ({len(xs)} in all)]" if len(xs) > n else "]")


# ---------------------------------------------------------------------- reading
@dataclass
class Block:
    """Rows of whole steps, ready to compute on: grads [R, K] (dtype, device; a view into a buffer
    reused by the next block), coef [R] (eta_t w_t, from the run's float64 step table), sample_ids
    [R] on the device, steps [R] as a numpy array (host-side bookkeeping without device syncs)."""

    steps: np.ndarray
    sample_ids: torch.Tensor
    coef: torch.Tensor
    coef_np: np.ndarray
    grads: torch.Tensor


def iter_row_blocks(run: Run, span: Window, *, reverse: bool = False, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                    dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu"),
                    prefetch: bool | None = None) -> Iterator[Block]:
    """run.iter_blocks(span) converted into reused [chunk_rows, K] buffers of `dtype` on `device`.

    The shards are read in their storage dtype (no conversion there) and converted by copy_ into
    the buffers: converting into freshly allocated memory costs several times more (page faults),
    and moving float16 to a GPU moves half the bytes. With prefetch, a background thread reads and
    converts the next block while the caller computes on this one (reading overlaps the GEMMs).
    A block's grads stay valid until the caller asks for the block after the next one.
    prefetch=None: only when there are several blocks big enough to be worth a thread hand-off.
    """
    if prefetch is None:
        prefetch = chunk_rows * run.dim >= PREFETCH_MIN_ELEMENTS and rows_between(run, *span) > chunk_rows
    storage = getattr(torch, str(run.manifest.get("storage_dtype") or "float32"))
    n_bufs = 3 if prefetch else 1  # the caller's block, one queued, one being filled
    bufs: list[torch.Tensor | None] = [None] * n_bufs

    def produce() -> Iterator[Block]:
        for i, blk in enumerate(run.iter_blocks(span, reverse=reverse, max_rows=chunk_rows, dtype=storage,
                                                device="cpu")):
            R = blk.grads.shape[0]
            buf = bufs[i % n_bufs]
            if buf is None or buf.shape[0] < R:
                buf = bufs[i % n_bufs] = torch.empty(max(R, chunk_rows), run.dim, dtype=dtype, device=device)
            G = buf[:R]
            G.copy_(blk.grads)
            coef = blk.coef.numpy()  # float64 from the reader, whatever the storage dtype
            yield Block(steps=blk.steps.numpy(), sample_ids=blk.sample_ids.to(device), grads=G, coef_np=coef,
                        coef=blk.coef.to(device=device, dtype=dtype))

    if not prefetch:
        yield from produce()
        return
    yield from _background(produce(), depth=n_bufs - 2)


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


class WindowAccumulator:
    """Scores of several windows filled from one stream of row blocks.

    out[w]: [n_train, Q] (or [n_train] for Q=None) sums of the contributions of rows whose step
    lies in window w; present[w]: [n_train] bool, the sample had such a row.
    """

    def __init__(self, windows: Sequence[Window], n: int, q: int | None, dtype: torch.dtype,
                 device: torch.device):
        self.windows = list(windows)
        shape = (n,) if q is None else (n, q)
        self.out = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.windows]
        self.present = [torch.zeros(n, dtype=torch.bool, device=device) for _ in self.windows]

    def add(self, steps: np.ndarray, rows: torch.Tensor, keep: torch.Tensor | None,
            contrib: torch.Tensor) -> None:
        """steps: [R] sorted (ascending or descending); rows: [R]; contrib: [R, Q] or [R]."""
        for w, (t1, t2) in enumerate(self.windows):
            sl = row_range(steps, t1, t2)
            if sl is None:
                continue
            r, c = rows[sl], contrib[sl]
            if keep is not None:
                k = keep[sl]
                r, c = r[k], c[k]
            self.out[w].index_add_(0, r, c)
            self.present[w][r] = True


def row_range(steps: np.ndarray, t1: int, t2: int) -> slice | None:
    """The slice of rows with t1 <= step < t2 in a sorted step column (None: no such row)."""
    if len(steps) == 0:
        return None
    if steps[0] <= steps[-1]:
        a, b = np.searchsorted(steps, t1, "left"), np.searchsorted(steps, t2, "left")
    else:
        neg = -steps
        a, b = np.searchsorted(neg, -t2 + 1, "left"), np.searchsorted(neg, -t1 + 1, "left")
    return slice(int(a), int(b)) if b > a else None


def step_segments(steps: np.ndarray) -> list[tuple[int, int]]:
    """[(a, b), ...]: the row ranges of each step in a block whose steps are kept whole."""
    cuts = np.flatnonzero(np.diff(steps)) + 1
    edges = np.concatenate([[0], cuts, [len(steps)]])
    return [(int(edges[i]), int(edges[i + 1])) for i in range(len(edges) - 1)]


# ---------------------------------------------------------------------- queries
def require_queries(run: Run, method: str) -> None:
    if not run.has_queries:
        raise MissingDataError(
            f"{method} needs query gradients, and {run.path} has none. Record them during training "
            "(queries=... and query_every_n_steps on InfluenceCallback / GradientRecorder), or use "
            "dvemb(run) and score any query later, or self_influence(run), which need no queries.")


def query_ids_of(run: Run, q: int) -> np.ndarray:
    ids = run.query_ids
    return ids if len(ids) == q else np.arange(q, dtype=np.int64)


def check_query_grads(run: Run, grads: Any, fingerprint: str | None, what: str = "query gradients"
                      ) -> torch.Tensor:
    """Check user-given query gradients [Q, K] against the run's projection."""
    g = torch.as_tensor(grads)
    if g.dim() == 1:
        g = g[None]
    if g.dim() != 2 or g.shape[1] != run.dim:
        raise ProjectionMismatchError(
            f"{what} have shape {tuple(torch.as_tensor(grads).shape)}, but the run's projected gradients "
            f"have {run.dim} dimensions: expected [Q, {run.dim}]. Project the query gradients with the "
            "run's projection (same layers, same seed and k).")
    if fingerprint is not None and run.projection_fingerprint and fingerprint != run.projection_fingerprint:
        raise ProjectionMismatchError(
            f"{what} come from projection {fingerprint!r}, the run from {run.projection_fingerprint!r}; "
            "dot products between different projections are meaningless. Recompute the query gradients "
            "with the run's projection.")
    return g


# ---------------------------------------------------------------------- devices and progress
def resolve_device(device: Any) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def progress_bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="row", unit_scale=True, disable=not progress, leave=False,
                dynamic_ncols=True)


def finish(many: bool, results: list) -> Any:
    return results if many else results[0]
