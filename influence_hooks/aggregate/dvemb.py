"""Data value embeddings (Wang et al. 2024; README, "Which samples mattered, and when").

    emb_t(i) = (eta_t w_t) (I - M_t) g_t(i),  M = 0 after the last step,
    after step t: M_{t-1} = M_t + sum_{z in B_t} emb_t(z) g_t(z)^T
    R(i, q; W, T) ~= u_q(T) . sum_{t in W} emb_t(i)

This equals dit(mode='removal', curvature='fisher', eval_step='final') for every window at once,
with the query left open: the embeddings are computed once, in one backward pass over the shards
(M changes after every step, so the pass goes step by step, each step one batched GEMM), and
written per row to an HDF5 file, so any window and any query are scored later by dot products.
M is K x K, or one block per recorded layer (block-diagonal) to bound memory.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .. import windows as W
from ..errors import ConfigurationError, RunDirectoryError, WindowError
from ..storage.files import check_free_space, open_h5, writable_target
from ..storage.format import MANIFEST
from ..storage.reader import Run, open_run
from .curvature import FisherCurvature
from .distributed import Split, first_process
from .notes import query_notes, run_notes, score_notes, skipped_steps_notes, warn_nonfinite, window_notes
from .queries import check_query_grads, query_ids_of
from .results import InfluenceScores
from .rows import DEFAULT_CHUNK_ROWS, SampleRows, iter_row_blocks, progress_bar, resolve_device, step_segments
from .scores import ScoreAccumulator
from .stepsize import step_size_form

EMB_FORMAT = "influence_hooks.dvemb"
EMB_FORMAT_VERSION = 1
DEFAULT_FILE = "dvemb.h5"


def layer_blocks(run: Run) -> list[tuple[int, int]]:
    """Column ranges [a, b) of the recorded layers, covering [0, K) (gaps become their own block)."""
    spans = sorted((l.offset, l.offset + l.dim) for l in run.layers if l.dim > 0)
    out, at = [], 0
    for a, b in spans:
        if a > at:
            out.append((at, a))
        out.append((a, b))
        at = max(at, b)
    if at < run.dim:
        out.append((at, run.dim))
    return out or [(0, run.dim)]


def dvemb(run: Run, *, path: str | os.PathLike | None = None, window: Any = None, epochs: Any = None,
          block_diagonal: bool | None = None, memory_budget_mb: float = 1024.0,
          storage_dtype: str | None = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
          dtype: torch.dtype = torch.float32, device: Any = None, progress: bool = True,
          group: Any = None, step_size: str = "auto") -> "DataValueEmbeddings":
    """Compute data value embeddings of every row and write them to `path` (default <run>/dvemb.h5).

    window / epochs: store only the embeddings of these steps (the backward pass still starts at the
    end of training, since M accumulates every later step). block_diagonal: True keeps one M per
    layer, False one full K x K M, None chooses full when it fits in memory_budget_mb; M must fit
    the budget in every case (ConfigurationError otherwise).
    storage_dtype: 'float16' | 'float32' | 'float64' for the stored embeddings; default float32
    (float64 when the run stores float64, float32 for bfloat16). float16 halves the file, but the embeddings carry the
    factor lr/|B| (often ~1e-3 or less), so most entries fall into float16's subnormal range
    (below 6e-5) and scores lose up to ~1e-2 relative precision; choose it only when that is fine.
    group: a torch.distributed process group: each rank keeps its share of the rows of M and
        computes those columns of every embedding; rank 0 writes the file, every rank returns it.
    step_size: 'auto' (the SGD form: the learning rate), 'adam' (on a run trained with Adam/AdamW,
        the per-layer step sizes Adam applied, recorded in training: emb = w_t (I - M) A_t g) or
        'sgd' (aggregate/stepsize.py).
    Returns a DataValueEmbeddings; `.scores(u_q(T))` gives removal influence at the end of training.
    """
    split = Split.of(group)
    wins, many = W.normalize(run.table, window, epochs, None)
    if many:
        raise WindowError("dvemb stores one range of steps; score many windows later with "
                          "DataValueEmbeddings.scores(..., windows=[...]).")
    s1, s2 = wins[0]
    dev = resolve_device(device)
    K = run.dim
    elem = torch.empty(0, dtype=dtype).element_size()
    full_mb = K * K * elem / 2**20
    blocks = layer_blocks(run)
    if block_diagonal is None:
        block_diagonal = full_mb > memory_budget_mb and len(blocks) > 1
    if not block_diagonal:
        blocks = [(0, K)]
    need_mb = sum((b - a) ** 2 for a, b in blocks) * elem / 2**20
    if need_mb > memory_budget_mb:
        what = (f"block-diagonal M ({len(blocks)} blocks, the largest {max(b - a for a, b in blocks)} columns)"
                if len(blocks) > 1 else f"M ({K} x {K})")
        fixes = "block_diagonal=True (one M per layer), " if len(layer_blocks(run)) > 1 and not block_diagonal else ""
        raise ConfigurationError(
            f"dvemb: {what} needs {need_mb:.1f} MB > memory_budget_mb={memory_budget_mb}. Use {fixes}a larger "
            "memory_budget_mb=, record with a smaller projection, or record fewer layers.")
    run_dtype = run.manifest.get("storage_dtype") or "float32"
    sdtype = (np.dtype(storage_dtype) if storage_dtype
              else np.promote_types(np.float32, "float32" if run_dtype == "bfloat16" else run_dtype))
    if sdtype.name not in ("float16", "float32", "float64"):
        raise ConfigurationError(f"storage_dtype must be float16, float32 or float64, got {storage_dtype!r}")

    path = Path(path) if path is not None else run.path / DEFAULT_FILE
    tmp = path.with_name(path.name + ".tmp")
    T = run.final_step
    lo, hi = s1, run.last_step + 1
    store = run.steps_in((s1, s2))[::-1]  # descending, the order the pass produces rows
    counts = run.batch_sizes_recorded[np.searchsorted(run.steps, store)]
    n_rows = int(counts.sum())
    own = slice(0, K) if split is None else split.columns(K)  # the rows of M (columns of E) kept here
    parts = [(ca, cb, max(ca, own.start), min(cb, own.stop)) for ca, cb in blocks]
    parts = [(ca, cb, xa, xb, torch.zeros(xb - xa, cb - ca, dtype=dtype, device=dev))
             for ca, cb, xa, xb in parts if xb > xa]
    writes = first_process(split)

    sizes = step_size_form(run, step_size, curvature=True)
    notes = run_notes(run, sizes) + [FisherCurvature.note, "the query is evaluated at the end of training (u_q(T))"]
    if block_diagonal and len(blocks) > 1:
        notes.append(f"M kept block-diagonal: {len(blocks)} per-layer blocks, cross-layer curvature ignored")
    notes += window_notes(run, lo, hi)

    unwritable = writable_target(path) if writes else None
    if unwritable:
        raise RunDirectoryError(f"cannot write the data value embeddings to {path}: {unwritable}. Pass path= "
                                "a file in a directory you can write to.")
    # the file is streamed to disk by HDF5, which can crash the process on a full disk: refuse first
    if writes:
        check_free_space(path.parent, n_rows * K * sdtype.itemsize + (n_rows + 3 * len(store)) * 8 + (1 << 20),
                         f"the data value embeddings {path.name}")
    bar = progress_bar(run.table.rows_between(lo, hi), "dvemb", progress and writes)
    try:
        with (h5py.File(tmp, "w") if writes else contextlib.nullcontext(None)) as f, bar:
            if writes:
                f.attrs.update(format=EMB_FORMAT, format_version=EMB_FORMAT_VERSION, run_id=run.run_id,
                               run_path=str(run.path.resolve()), dim=K, final_step=T, window=json.dumps([s1, s2]),
                               projection_fingerprint=run.projection_fingerprint, block_diagonal=bool(block_diagonal),
                               blocks=json.dumps(blocks), approximations=json.dumps(notes), step_size=sizes.form,
                               complete=False)
                chunk = max(1, min(max(n_rows, 1), (1 << 20) // max(K * sdtype.itemsize, 1)))
                emb_ds = f.create_dataset("rows/emb", shape=(n_rows, K), dtype=sdtype, chunks=(chunk, K))
                sid_ds = f.create_dataset("rows/sample_id", shape=(n_rows,), dtype=np.int64)
                f.create_dataset("steps/step", data=store.astype(np.int64))
                f.create_dataset("steps/row_count", data=counts.astype(np.int64))
                f.create_dataset("steps/row_start", data=(np.cumsum(counts) - counts).astype(np.int64))
            at = 0
            E_buf = None
            for blk in iter_row_blocks(run, (lo, hi), reverse=True, chunk_rows=chunk_rows, dtype=dtype, device=dev):
                st = blk.steps
                if E_buf is None or E_buf.shape[0] < len(st):
                    E_buf = torch.empty_like(blk.grads)
                E = E_buf[:len(st)]
                coef = sizes.row_coef_np(st)
                for a, b in step_segments(st):
                    c = float(coef[a])
                    scale = sizes.column_scale(int(st[a]), blk.grads)
                    for ca, cb, xa, xb, M in parts:  # M: rows [xa, xb) of the block's M
                        G = blk.grads[a:b, ca:cb]
                        Gs = G if scale is None else G * scale[ca:cb]  # A_t g in the Adam form
                        # c (I - M) A_t g, as rows, straight into the embeddings; then M += emb g^T
                        Eb = torch.addmm(Gs[:, xa - ca:xb - ca], Gs, M.T, beta=c, alpha=-c, out=E[a:b, xa:xb])
                        M.addmm_(Eb.T, G)
                sl = W.rows_slice(st, (s1, s2))
                if sl is not None:
                    rows = E[sl, own] if split is None else split.gather_columns(E[sl, own], K)
                    if writes:
                        r = sl.stop - sl.start
                        # torch converts to float16 many times faster than numpy does
                        emb_ds[at:at + r] = rows.to(dtype=getattr(torch, sdtype.name)).cpu().numpy()
                        sid_ds[at:at + r] = blk.sample_ids[sl].cpu().numpy()
                        at += r
                bar.update(len(st))
            if writes:
                f.attrs["complete"] = True
        if writes:
            os.replace(tmp, path)
    except BaseException:
        if writes:
            tmp.unlink(missing_ok=True)
        raise
    if split is not None:
        import torch.distributed as dist

        dist.barrier(group=split.group)  # the file is complete before any rank opens it
    return DataValueEmbeddings(path, run=run)


class DataValueEmbeddings:
    """Per-row data value embeddings emb_t(i) [K] in an HDF5 file, rows in descending step order.

    `scores(u_q(T), window)` = u_q(T) . sum_{t in window} emb_t(i) for every training sample:
    the first-order change of f_q at the end of training when i is dropped from the window's steps.
    """

    def __init__(self, path: str | os.PathLike, run: Run | None = None):
        self.path = Path(path)
        self._f = open_h5(self.path)  # refuses links to, and data in, other files
        a = self._f.attrs
        if a.get("format") != EMB_FORMAT:
            self._f.close()
            raise ConfigurationError(f"{self.path} is not a data value embedding file.")
        if not a.get("complete", False):
            self._f.close()
            raise ConfigurationError(f"{self.path} is incomplete (its computation was interrupted); rerun dvemb.")
        self.run_id = str(a["run_id"])
        self.dim = int(a["dim"])
        self.final_step = int(a["final_step"])
        self.window = tuple(json.loads(a["window"]))
        self.block_diagonal = bool(a["block_diagonal"])
        self.blocks = [tuple(b) for b in json.loads(a["blocks"])]
        self.projection_fingerprint = str(a["projection_fingerprint"])
        self.approximations = list(json.loads(a["approximations"]))
        self.step_size = str(a.get("step_size", "sgd"))  # the form of the step size (stepsize.py)
        self.steps = self._f["steps/step"][()]
        self._row_start = self._f["steps/row_start"][()]
        self._row_count = self._f["steps/row_count"][()]
        try:
            self.run = run if run is not None else self._open_run(str(a["run_path"]))
        except BaseException:
            self._f.close()
            raise
        if self.run.run_id != self.run_id:
            self._f.close()
            raise RunDirectoryError(f"{self.path} belongs to run {self.run_id}, not {self.run.run_id}.")

    @classmethod
    def load(cls, path: str | os.PathLike, run: Run | None = None) -> "DataValueEmbeddings":
        """Reopen embeddings written by `dvemb`. The run is `run`, or else the directory the file
        lies in (where dvemb writes it by default); the path recorded inside the file is never
        opened on the file's word, since a file can name any directory: pass run= to confirm it."""
        return cls(path, run)

    def _open_run(self, recorded: str) -> Run:
        own = self.path.resolve().parent
        if (own / MANIFEST).is_file():
            run = open_run(own)
            if run.run_id == self.run_id:
                return run
            run.close()
        raise RunDirectoryError(
            f"{self.path} holds embeddings of run {self.run_id}, and its own directory holds no such run. The "
            f"file says the run was at {recorded}; influence_hooks does not open a directory because a file "
            f"names it. If that is right, pass it yourself: DataValueEmbeddings.load(path, run=open_run({recorded!r})).")

    # ------------------------------------------------------------------ queries
    def _windows(self, window: Any, epochs: Any, windows: Any) -> tuple[list[tuple[int, int]], bool]:
        if window is None and epochs is None and windows is None:
            return [self.window], False
        wins, many = W.normalize(self.run.table, window, epochs, windows)
        for t1, t2 in wins:
            if t1 < self.window[0] or t2 > self.window[1]:
                raise WindowError(f"window [{t1}, {t2}) reaches outside the steps with stored embeddings "
                                  f"[{self.window[0]}, {self.window[1]}); recompute dvemb with that window.")
        return wins, many

    def _row_span(self, t1: int, t2: int) -> tuple[int, int]:
        """Rows of steps [t1, t2): contiguous, as steps are stored descending."""
        sl = W.rows_slice(self.steps, (t1, t2))
        if sl is None:
            return 0, 0
        return int(self._row_start[sl.start]), int(self._row_start[sl.stop - 1] + self._row_count[sl.stop - 1])

    def _iter_rows(self, r0: int, r1: int, chunk_rows: int, dtype: torch.dtype, dev: torch.device):
        emb, sid = self._f["rows/emb"], self._f["rows/sample_id"]
        buf = torch.empty(min(chunk_rows, max(r1 - r0, 0)), self.dim, dtype=dtype, device=dev)
        for a in range(r0, r1, chunk_rows):
            b = min(r1, a + chunk_rows)
            E = buf[:b - a]
            E.copy_(torch.from_numpy(emb[a:b]))  # into a reused buffer: see rows.iter_row_blocks
            # each row's step: the last step whose first row is at or before it (steps with no rows skipped)
            step_of_row = self.steps[np.searchsorted(self._row_start, np.arange(a, b), side="right") - 1]
            yield step_of_row, torch.from_numpy(sid[a:b]).to(dev), E

    def scores(self, query_grads: Any, window: Any = None, *, epochs: Any = None, windows: Any = None,
               query_ids: Any = None, projection_fingerprint: str | None = None, train_ids: Any = None,
               chunk_rows: int = DEFAULT_CHUNK_ROWS, dtype: torch.dtype = torch.float32,
               device: Any = None, progress: bool = True, group: Any = None) -> InfluenceScores | list[InfluenceScores]:
        """Removal influence at T of the window's occurrences of each sample: [n_train, Q].

        query_grads: [Q, K] u_q(T) in the run's projection (e.g. run.query_gradients(run.final_step)).
        window=None: all stored steps. Many windows (windows=/epochs= lists) are one pass.
        group: a torch.distributed process group to split the rows over.
        """
        U = check_query_grads(self.run, query_grads, projection_fingerprint)
        dev = resolve_device(device)
        U = U.to(device=dev, dtype=dtype)
        qids = query_ids_of(self.run, U.shape[0], query_ids)
        wins, many = self._windows(window, epochs, windows)
        rows_of = SampleRows(self.run, train_ids, dev)
        acc = ScoreAccumulator(len(wins), rows_of.n, U.shape[0], dtype=dtype, device=dev)
        spans = [self._row_span(*w) for w in W.merge(wins)]
        split = Split.of(group)
        if split is not None:  # an even share of each span's rows
            spans = [(a + (b - a) * split.rank // split.size, a + (b - a) * (split.rank + 1) // split.size)
                     for a, b in spans]
        bar = progress_bar(sum(b - a for a, b in spans), "dvemb scores", progress and first_process(split))
        with bar:
            for r0, r1 in spans:
                for st, sid, E in self._iter_rows(r0, r1, chunk_rows, dtype, dev):
                    rows, keep = rows_of.rows(sid)
                    acc.update_windows(wins, st, rows, keep, E @ U.T)
                    bar.update(len(st))
        if split is not None:
            acc.sync(split.group)
        curvature = "fisher (block-diagonal)" if self.block_diagonal and len(self.blocks) > 1 else "fisher"
        bad_inputs = query_notes(self.run, (), qids, given=U)
        results, nonfinite = [], list(bad_inputs)
        for w, (t1, t2) in enumerate(wins):
            values, present = acc.compute(w)
            bad_outputs = score_notes(values, qids)
            nonfinite += [n for n in skipped_steps_notes(self.run, t1, t2) + bad_outputs if n not in nonfinite]
            results.append(InfluenceScores(
                values=values, train_ids=rows_of.ids, present=present, query_ids=qids, method="dvemb",
                window=(t1, t2), eval_step=self.final_step, curvature=curvature,
                approximations=list(self.approximations) + bad_inputs + bad_outputs, run_id=self.run_id,
                meta={"embeddings": str(self.path)}))
        warn_nonfinite("DataValueEmbeddings.scores", nonfinite)
        return results if many else results[0]

    def embeddings(self, window: Any = None, *, epochs: Any = None, train_ids: Any = None,
                   chunk_rows: int = DEFAULT_CHUNK_ROWS, dtype: torch.dtype = torch.float32,
                   device: Any = None) -> tuple[np.ndarray, torch.Tensor]:
        """(ids [n], sum_{t in window} emb_t(i) [n, K]) for the n samples that occur in the window."""
        wins, _ = self._windows(window, epochs, None)
        dev = resolve_device(device)
        rows_of = SampleRows(self.run, train_ids, dev)
        acc = ScoreAccumulator(1, rows_of.n, self.dim, dtype=dtype, device=dev)
        r0, r1 = self._row_span(*wins[0])
        for st, sid, E in self._iter_rows(r0, r1, chunk_rows, dtype, dev):
            rows, keep = rows_of.rows(sid)
            acc.update_windows(wins[:1], st, rows, keep, E)
        values, present = acc.compute(0)
        return rows_of.ids[present.numpy()], values[present]

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "DataValueEmbeddings":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = f"block-diagonal M ({len(self.blocks)} blocks)" if self.block_diagonal else "full M"
        return (f"DataValueEmbeddings({str(self.path)!r}, steps [{self.window[0]}, {self.window[1]}), "
                f"{int(self._row_count.sum())} rows x {self.dim}, {kind}, T={self.final_step})")
