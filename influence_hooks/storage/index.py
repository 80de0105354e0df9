"""The index of a run directory: which finished files exist, and what each optimizer step is.

`ShardIndex.build(path, run_id, ...)` scans the directory once and reads only the small per-step
tables of the shards. It merges the ranks (the rows of one step on several ranks form its global
batch), drops rows that a resume superseded, and gives

- `table`: a `StepTable`, one row per recorded step;
- `step_rows[step]`: where that step's rows lie, as (shard, first row, end row) per rank;
- `query_index[step]`: the shard and position of the query gradients recorded at that step;
- `param_files[kind][step]`: the parameter snapshot / checkpoint files.

Reading gradients themselves is the reader's job (`reader.Run`); both share a `FilePool`.
"""

from __future__ import annotations

import errno
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import CorruptShardError
from . import format as fmt
from .jsonio import read_json

MAX_OPEN_FILES = 32


@dataclass(frozen=True)
class ShardFile:
    """A finished gradient shard of one rank: the `index`-th that rank wrote."""

    path: Path
    rank: int
    index: int


@dataclass(frozen=True)
class StepTable:
    """One entry per recorded optimizer step, sorted by step (arrays of equal length).

    steps, epochs: int64; lrs: the recorded learning rate eta_t; update_weights: w_t, the factor of
    sum_i g_t(i) in the update (1/|B_t| for a mean loss); batch_sizes: |B_t| (the global batch);
    rows: rows recorded for the step (all ranks); micro_batches; nonfinite: flagged non-finite
    gradients; skipped: the optimizer did not apply the step (AMP overflow); losses.
    """

    steps: np.ndarray
    epochs: np.ndarray
    lrs: np.ndarray
    batch_sizes: np.ndarray
    rows: np.ndarray
    update_weights: np.ndarray
    micro_batches: np.ndarray
    nonfinite: np.ndarray
    skipped: np.ndarray
    losses: np.ndarray

    @property
    def coef(self) -> np.ndarray:
        """eta_t * w_t per step: the factor of g_t(i) in the parameter update."""
        return self.lrs * self.update_weights

    def position(self, step: int) -> int:
        """Index of `step` in the table; KeyError if it is not recorded."""
        i = int(np.searchsorted(self.steps, step))
        if i >= len(self.steps) or self.steps[i] != step:
            raise KeyError(f"step {step} is not recorded")
        return i

    def rows_between(self, t1: int, t2: int) -> int:
        """Rows of the finite recorded steps in [t1, t2): the work of one pass, for progress bars."""
        mask = (self.steps >= t1) & (self.steps < t2) & ~self.nonfinite
        return int(self.rows[mask].sum())


class FilePool:
    """Open HDF5 files, at most MAX_OPEN_FILES at once (least recently used closed first): a run may
    have thousands of shards, and file descriptors are limited."""

    def __init__(self, limit: int = MAX_OPEN_FILES):
        self.limit = limit
        self._files: dict[Path, h5py.File] = {}

    def get(self, path: Path) -> h5py.File:
        f = self._files.pop(path, None)
        if f is None:
            while len(self._files) >= self.limit:
                self._files.pop(next(iter(self._files))).close()
            f = h5py.File(path, "r")
        self._files[path] = f  # most recently used last
        return f

    def drop(self, path: Path) -> None:
        f = self._files.pop(path, None)
        if f is not None:
            f.close()

    def close(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self._files.clear()

    def __len__(self) -> int:
        return len(self._files)


def superseded(segments: list[dict[str, int]], shard: ShardFile, step: int) -> bool:
    """A resume at from_step, writing from shard first_shard on, replaces the steps >= from_step
    that earlier shards of the same rank hold."""
    return any(seg["first_shard"] > shard.index and step >= seg["from_step"] for seg in segments)


def read_rank_states(path: Path) -> dict[int, dict[str, Any]]:
    """{rank: its rank-NNN.json}; an unreadable one counts as an interrupted rank."""
    states = {}
    for p in path.glob("rank-*.json"):
        r = fmt.parse_rank_file_name(p.name)
        if r is not None:
            try:
                states[r] = read_json(p)
            except (OSError, ValueError):
                states[r] = {"rank": r, "segments": [{"from_step": 0, "first_shard": 0}], "complete": False}
    return states


@dataclass
class ShardIndex:
    shards: list[ShardFile]
    skipped_shards: list[tuple[Path, str]]
    table: StepTable
    step_rows: dict[int, list[tuple[ShardFile, int, int]]]
    query_index: dict[int, tuple[ShardFile, int]]
    param_files: dict[str, dict[int, Path]]
    rank_states: dict[int, dict[str, Any]]

    @classmethod
    def build(cls, path: Path, run_id: str, pool: FilePool, *, on_corrupt: str = "raise") -> "ShardIndex":
        """Index the finished files of run `run_id` in `path`. on_corrupt: 'raise' stops at an
        unreadable shard, naming it; 'skip' leaves it out with a warning."""
        rank_states = read_rank_states(path)
        shards, skipped, tables, query_index = [], [], [], {}
        for sh in _finished_shards(path):
            try:
                cols, qsteps = _read_step_columns(pool.get(sh.path), sh, run_id)
            except Exception as e:  # noqa: BLE001 - any failure to read means a broken shard
                pool.drop(sh.path)
                if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
                    raise  # out of file descriptors: not a problem of the shard
                why = str(e) if isinstance(e, CorruptShardError) else f"cannot be read ({type(e).__name__}: {e})"
                if on_corrupt == "raise":
                    raise CorruptShardError(
                        f"shard {sh.path} {why}. Nothing else is lost: open_run(path, on_corrupt='skip') "
                        "(`influence-hooks info RUN --skip-corrupt`) reads the other shards, and "
                        "`influence-hooks verify RUN` lists every problem.") from e
                warnings.warn(f"skipping unreadable shard {sh.path}: {why}", RuntimeWarning)
                skipped.append((sh.path, why))
                continue
            shards.append(sh)
            tables.append((sh, cols))
            for j, qs in enumerate(qsteps):
                query_index[int(qs)] = (sh, j)
        table, step_rows = _merge_steps(tables, rank_states)
        for step, (sh, _) in list(query_index.items()):
            if superseded(rank_states.get(sh.rank, {}).get("segments", []), sh, step):
                del query_index[step]
        return cls(shards=shards, skipped_shards=skipped, table=table, step_rows=step_rows,
                   query_index=query_index, param_files=_param_files(path), rank_states=rank_states)


def _finished_shards(path: Path) -> list[ShardFile]:
    shard_dir = path / fmt.SHARD_DIR
    found = []
    for p in sorted(shard_dir.iterdir()) if shard_dir.is_dir() else []:
        parsed = fmt.parse_shard_name(p.name)
        if parsed:
            found.append(ShardFile(p, *parsed))
    return found


def _read_step_columns(f: h5py.File, sh: ShardFile, run_id: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    if f.attrs.get("run_id") != run_id:
        raise CorruptShardError(f"belongs to run {f.attrs.get('run_id')}, not {run_id}; remove it from "
                                "the run directory.")
    cols = {name: f[fmt.STEPS][name][()] for name in fmt.STEP_COLUMNS}
    qsteps = f[fmt.QUERY_STEP][()]
    if len(qsteps):
        f[fmt.QUERY_GRAD].shape  # noqa: B018 - touch it, so a broken dataset fails here
    f[fmt.ROWS_GRAD].shape  # noqa: B018
    return cols, qsteps


def _merge_steps(tables: list[tuple[ShardFile, dict[str, np.ndarray]]], rank_states: dict[int, dict[str, Any]]
                 ) -> tuple[StepTable, dict[int, list[tuple[ShardFile, int, int]]]]:
    """One entry per step over every rank's shards; a step's parts on several ranks form its
    global batch. Rows superseded by a resume are left out."""
    per_step: dict[int, dict[str, Any]] = {}
    step_rows: dict[int, list[tuple[ShardFile, int, int]]] = {}
    for sh, cols in tables:
        segs = rank_states.get(sh.rank, {}).get("segments", [])
        for j, step in enumerate(cols["step"]):
            step = int(step)
            if superseded(segs, sh, step):
                continue
            r0, n = int(cols["row_start"][j]), int(cols["row_count"][j])
            step_rows.setdefault(step, []).append((sh, r0, r0 + n))
            entry = per_step.get(step)
            if entry is None:
                per_step[step] = {**{name: cols[name][j] for name in fmt.STEP_COLUMNS}, "rows": n}
            else:  # another rank's part of the same step
                entry["rows"] += n
                entry["batch_size"] += int(cols["batch_size"][j])
                entry["nonfinite"] |= bool(cols["nonfinite"][j])
                entry["skipped"] |= bool(cols["skipped"][j])
    order = sorted(per_step)

    def col(name: str, dt: Any) -> np.ndarray:
        return np.array([per_step[s][name] for s in order], dt)

    table = StepTable(
        steps=np.array(order, np.int64), epochs=col("epoch", np.int64), lrs=col("lr", np.float64),
        batch_sizes=col("batch_size", np.int64), rows=col("rows", np.int64),
        update_weights=col("update_weight", np.float64), micro_batches=col("micro_batches", np.int64),
        nonfinite=col("nonfinite", bool), skipped=col("skipped", bool), losses=col("loss", np.float64))
    return table, step_rows


def _param_files(path: Path) -> dict[str, dict[int, Path]]:
    files: dict[str, dict[int, Path]] = {k: {} for k in fmt.PARAM_KINDS}
    pdir = path / fmt.PARAM_DIR
    for p in sorted(pdir.iterdir()) if pdir.is_dir() else []:
        parsed = fmt.parse_param_file_name(p.name)
        if parsed:
            kind, _rank, step = parsed
            files[kind][step] = p
    return files
