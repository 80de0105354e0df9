"""Reading a run directory: `open_run(path)` returns a `Run`.

The reader needs nothing but the directory. `storage.index.ShardIndex` indexes the per-step tables
of every finished shard (small), merges ranks and drops rows superseded by a resume; `Run` is the
narrow read interface the aggregators use:

- metadata: `manifest`, `layers`, `dim`, `run_id`, `complete`, `final_step`, `optimizer`;
- the step table: `table` (and its columns as `steps`, `lrs`, ... for convenience);
- gradients, streamed in bounded memory, forward or backward in step order, for any window:
  `iter_steps` (one step at a time) and `iter_blocks` (`RowBlock`s of whole steps), both on
  `block_plans` and `fetch_block` (storage.rowio: verified reads into reusable buffers);
- query gradients `query_gradients(step)`, parameters `load_parameters(step)`;
- what is missing or damaged: `gaps` (finished files that are not there; open_run warns about
  them), `inconsistencies`, `skipped_shards`; reading a damaged chunk raises CorruptShardError.

Windows are checked by `influence_hooks.windows`; how estimators describe their approximations is
the aggregators' business (`aggregate.notes`), not the reader's.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np
import torch

from .. import windows as W
from ..errors import CorruptShardError, MissingDataError
from . import format as fmt
from .files import from_stored, open_h5, stored_dtype
from .index import FilePool, Gap, ShardFile, ShardIndex, StepTable, describe_gaps, read_manifest
from .rowio import BlockPlan, FetchedBlock, RowFile, RowsDamaged, Stage, fetch, plan_blocks


@dataclass(frozen=True)
class LayerInfo:
    """A recorded layer: its columns are [offset, offset + dim) of every gradient row."""

    name: str
    rule: str
    module_type: str
    offset: int
    dim: int
    grad_dim: int
    param_shapes: dict[str, tuple[int, ...]]  # in the order of the row's columns
    projection: dict[str, Any]

    @property
    def projected(self) -> bool:
        return self.projection.get("kind", "none") != "none"


@dataclass
class StepBatch:
    """One optimizer step: grads [B, K] are g_t(i) for the B samples of batch B_t."""

    step: int
    epoch: int
    lr: float
    update_weight: float
    batch_size: int
    sample_ids: torch.Tensor
    grads: torch.Tensor

    @property
    def coef(self) -> float:
        """eta_t * w_t: the factor of g_t(i) in the parameter update (eta_t/|B_t| for mean loss)."""
        return self.lr * self.update_weight


@dataclass
class RowBlock:
    """Consecutive rows of whole steps, for GEMM-shaped work.

    steps [R] (numpy int64, host-side bookkeeping without device syncs); sample_ids [R] (a tensor
    on the compute device); coef [R] (numpy float64: eta_t * w_t of each row's step); grads [R, K].
    Rows are in ascending step order, or descending when read backward.
    """

    steps: np.ndarray
    sample_ids: torch.Tensor
    coef: np.ndarray
    grads: torch.Tensor

    def coef_like(self, t: torch.Tensor) -> torch.Tensor:
        """coef as a tensor of t's dtype and device."""
        return torch.from_numpy(self.coef).to(device=t.device, dtype=t.dtype)


def _ordered_shapes(entry: Any) -> dict[str, tuple[int, ...]]:
    """A layer's parameter shapes in row-column order: stored as [[name, shape], ...] because
    JSON objects lose their key order when the manifest is written with sorted keys."""
    pairs = entry.items() if isinstance(entry, dict) else entry
    return {str(name): tuple(shape) for name, shape in pairs}


def open_run(path: str | os.PathLike, *, on_corrupt: str = "raise") -> "Run":
    """Open the run recorded in `path`.

    on_corrupt: 'raise' (default) stops at a shard that cannot be read, naming it (damage inside its
    gradient rows is found when they are read, by an aggregator); 'skip' first reads every shard
    whole, checking its checksums (the time of one pass over the run), and leaves out with a
    warning each shard that cannot be read, so that the rest of the run stays usable: the shards
    left out are `Run.skipped_shards`, and every result's notes name them.
    Finished files that are missing (`Run.gaps`) and disagreements between the shards and the rank
    files (`Run.inconsistencies`) give a RuntimeWarning; the manifest is checked against its schema.
    """
    return Run(path, on_corrupt=on_corrupt)


class Run:
    """A recorded run. See the module docstring; all step numbers are optimizer steps."""

    def __init__(self, path: str | os.PathLike, *, on_corrupt: str = "raise", read_whole: bool = True):
        """See `open_run`. read_whole=False (with on_corrupt='skip') leaves out only the shards whose
        step tables cannot be read, without reading every shard first: for `verify_run`, which
        reads everything itself."""
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        self.on_corrupt = on_corrupt
        self.path = Path(path)
        self.manifest: dict[str, Any] = read_manifest(self.path)
        self.run_id: str = self.manifest["run_id"]
        self.dim: int = int(self.manifest["dim"])
        self.layers: list[LayerInfo] = [
            LayerInfo(name=l["name"], rule=l["rule"], module_type=l["module_type"], offset=int(l["offset"]),
                      dim=int(l["dim"]), grad_dim=int(l["grad_dim"]),
                      param_shapes=_ordered_shapes(l["param_shapes"]),
                      projection=dict(l["projection"]))
            for l in self.manifest["layers"]]
        self._pool = FilePool()
        self._index = ShardIndex.build(self.path, self.run_id, self._pool, dim=self.dim, on_corrupt=on_corrupt,
                                       read_whole=read_whole)
        self.table: StepTable = self._index.table
        self._sample_ids: np.ndarray | None = None
        if self.gaps:
            warnings.warn(f"{self.path}: {describe_gaps(self.gaps)}. Their steps contribute nothing to any "
                          f"estimate; `influence-hooks verify {self.path}` lists every problem.",
                          RuntimeWarning, stacklevel=3)
        for problem in self.inconsistencies:
            warnings.warn(f"{self.path}: {problem}", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ the step table
    @property
    def steps(self) -> np.ndarray:
        return self.table.steps

    @property
    def epochs(self) -> np.ndarray:
        return self.table.epochs

    @property
    def lrs(self) -> np.ndarray:
        return self.table.lrs

    @property
    def update_weights(self) -> np.ndarray:
        return self.table.update_weights

    @property
    def batch_sizes(self) -> np.ndarray:
        return self.table.batch_sizes

    @property
    def batch_sizes_recorded(self) -> np.ndarray:
        return self.table.rows

    @property
    def nonfinite(self) -> np.ndarray:
        return self.table.nonfinite

    @property
    def skipped(self) -> np.ndarray:
        """Steps the optimizer did not apply (an AMP GradScaler found inf/NaN)."""
        return self.table.skipped

    @property
    def losses(self) -> np.ndarray:
        return self.table.losses

    @property
    def micro_batches(self) -> np.ndarray:
        return self.table.micro_batches

    def step_position(self, step: int) -> int:
        return self.table.position(step)

    def steps_in(self, window: Any = None, *, skip_nonfinite: bool = True) -> np.ndarray:
        """The recorded steps of a window (see influence_hooks.windows), flagged steps left out."""
        return W.steps_in(self.table, window, skip_nonfinite=skip_nonfinite)

    # ------------------------------------------------------------------ metadata
    @property
    def skipped_shards(self) -> list[tuple[Path, str]]:
        """Shards left out as unreadable (open_run(..., on_corrupt='skip')): (path, why)."""
        return self._index.skipped_shards

    @property
    def rank_states(self) -> dict[int, dict[str, Any]]:
        return self._index.rank_states

    @property
    def gaps(self) -> list[Gap]:
        """Finished files of the run that are not in the directory: shards and parameter files the
        rank files list, holes in a rank's shard numbering, steps after a rank's last shard."""
        return list(self._index.gaps)

    @property
    def inconsistencies(self) -> list[str]:
        """What the shards and the rank files disagree on (a lost rank file, a segment the rank
        file lacks, a step held twice); how the reader resolved each is part of the sentence."""
        return list(self._index.inconsistencies)

    @property
    def complete(self) -> bool:
        """True when every rank finished training and closed its recording."""
        states = self._index.rank_states
        return bool(states) and all(s.get("complete") for s in states.values())

    @property
    def world_size(self) -> int:
        """The number of processes that recorded the run (data-parallel ranks)."""
        return int(self.manifest.get("world_size") or 1)

    def rank_progress(self) -> list[dict[str, Any]]:
        """Per rank: whether it finished, the last step of its finished shards, how many it wrote."""
        shards: dict[int, int] = {}
        for sh in self._index.shards:
            shards[sh.rank] = shards.get(sh.rank, 0) + 1
        return [{"rank": r, "complete": bool(st.get("complete")), "last_step": st.get("last_step"),
                 "final_step": st.get("final_step"), "shards": shards.get(r, 0)}
                for r, st in sorted(self._index.rank_states.items())]

    def partial_steps(self) -> np.ndarray:
        """Steps whose rows come from fewer ranks than recorded the run: a rank stopped before it
        finished them, so they hold only part of their global batch."""
        if self.world_size == 1:
            return np.zeros(0, np.int64)
        return np.array(sorted(s for s, parts in self._index.step_rows.items()
                               if len({sh.rank for sh, _, _ in parts}) < self.world_size), np.int64)

    @property
    def first_step(self) -> int:
        self._require_steps()
        return int(self.steps[0])

    @property
    def last_step(self) -> int:
        self._require_steps()
        return int(self.steps[-1])

    @property
    def final_step(self) -> int:
        """T: the step count at the end of training (parameters w_T after the last update)."""
        finals = [s.get("final_step") for s in self._index.rank_states.values() if s.get("final_step") is not None]
        return int(max(finals)) if finals else self.last_step + 1

    @property
    def sample_ids(self) -> np.ndarray:
        """Sorted unique ids of every training sample recorded."""
        if self._sample_ids is None:
            ids = [self._read(sh, fmt.ROWS_SAMPLE_ID, slice(None)) for sh in self._index.shards]
            self._sample_ids = np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)
        return self._sample_ids

    @property
    def n_rows(self) -> int:
        return int(self.table.rows.sum())

    @property
    def n_shards(self) -> int:
        return len(self._index.shards)

    @property
    def query_ids(self) -> np.ndarray:
        q = self.manifest.get("queries") or {}
        return np.asarray(q.get("ids", []), np.int64)

    @property
    def optimizer(self) -> dict[str, Any]:
        return dict(self.manifest.get("optimizer") or {})

    @property
    def projection_fingerprint(self) -> str:
        """Identifies the projection; gradients with different fingerprints are not comparable."""
        return str(self.manifest.get("projection_fingerprint", ""))

    @property
    def projected(self) -> bool:
        """Whether any recorded layer is randomly projected."""
        return any(l.projected for l in self.layers)

    def layer(self, name: str) -> LayerInfo:
        for l in self.layers:
            if l.name == name:
                return l
        raise KeyError(f"layer {name!r} is not recorded; recorded layers: {[l.name for l in self.layers]}")

    def columns(self, layers: Sequence[str] | None) -> np.ndarray | None:
        """Column indices of `layers` in a gradient row (None: all columns)."""
        if layers is None:
            return None
        return np.concatenate([np.arange(self.layer(n).offset, self.layer(n).offset + self.layer(n).dim)
                               for n in layers])

    def info(self) -> dict[str, Any]:
        """A summary: steps, samples, layers, dimensions, size on disk, completeness."""
        size = sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())
        return {
            "path": str(self.path), "run_id": self.run_id, "complete": self.complete,
            "steps": len(self.steps),
            "step_range": [int(self.steps[0]), int(self.steps[-1])] if len(self.steps) else None,
            "epochs": sorted({int(e) for e in self.epochs}),
            "samples": int(len(self.sample_ids)), "rows": self.n_rows, "dim": self.dim,
            "layers": [{"name": l.name, "rule": l.rule, "grad_dim": l.grad_dim, "dim": l.dim,
                        "projection": l.projection.get("kind")} for l in self.layers],
            "storage_dtype": self.manifest.get("storage_dtype"),
            "queries": int(len(self.query_ids)), "query_steps": len(self.query_steps),
            "snapshots": len(self.snapshot_steps), "checkpoints": len(self.checkpoint_steps),
            "nonfinite_steps": [int(s) for s in self.steps[self.nonfinite]],
            "skipped_steps": [int(s) for s in self.steps[self.skipped]],
            "optimizer": self.optimizer.get("name"), "precision": self.manifest.get("precision"),
            "nonfinite_query_steps": self.nonfinite_query_steps.tolist(),
            "shards": self.n_shards, "skipped_shards": [str(p) for p, _ in self.skipped_shards],
            "gaps": [g.describe() for g in self.gaps], "inconsistencies": self.inconsistencies,
            "size_bytes": size,
        }

    # ------------------------------------------------------------------ gradients
    def step_sample_ids(self, step: int) -> np.ndarray:
        """The sample ids of step `step`'s batch, in batch order, without reading gradients."""
        if int(step) not in self._index.step_rows:
            raise KeyError(f"step {step} is not recorded")
        return np.concatenate([self._read(sh, fmt.ROWS_SAMPLE_ID, slice(r0, r1))
                               for sh, r0, r1 in self._index.step_rows[int(step)]])

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype the gradients are stored in."""
        return getattr(torch, self.manifest.get("storage_dtype") or "float32")

    def iter_steps(self, window: Any = None, *, reverse: bool = False,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   layers: Sequence[str] | None = None, skip_nonfinite: bool = True) -> Iterator[StepBatch]:
        """Yield one StepBatch per recorded step of the window, in step order (or reversed)."""
        cols = self._columns_tensor(layers)
        steps = self.steps_in(window, skip_nonfinite=skip_nonfinite)
        stage = Stage()
        for step in (steps[::-1] if reverse else steps):
            i = self.step_position(int(step))
            fetched = self.fetch_block(next(plan_blocks(self._index.step_rows, np.array([step]), reverse=False,
                                                        max_rows=1)), stage)
            grads = fetched.into(torch.empty(fetched.n_rows, self.dim if cols is None else len(cols), dtype=dtype),
                                 cols)
            yield StepBatch(step=int(step), epoch=int(self.epochs[i]), lr=float(self.lrs[i]),
                            update_weight=float(self.update_weights[i]), batch_size=int(self.batch_sizes[i]),
                            sample_ids=torch.from_numpy(fetched.sample_ids).to(device), grads=grads.to(device))

    def iter_blocks(self, window: Any = None, *, reverse: bool = False, max_rows: int = 65536,
                    dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    layers: Sequence[str] | None = None, skip_nonfinite: bool = True) -> Iterator[RowBlock]:
        """Yield RowBlocks of whole steps, each at most max_rows rows (or one step if bigger).

        Memory is bounded by max_rows * K, whatever the size of the run. dtype None: the storage
        dtype (no conversion). Each block's grads are a new tensor; aggregators stream through
        reused buffers instead (aggregate.rows.iter_row_blocks, on block_plans and fetch_block).
        """
        cols = self._columns_tensor(layers)
        stage = Stage()
        for plan in self.block_plans(window, reverse=reverse, max_rows=max_rows, skip_nonfinite=skip_nonfinite):
            fetched = self.fetch_block(plan, stage)
            width = self.dim if cols is None else len(cols)
            grads = fetched.into(torch.empty(fetched.n_rows, width, dtype=dtype or fetched.dtype), cols)
            yield RowBlock(steps=fetched.steps, sample_ids=torch.from_numpy(fetched.sample_ids).to(device),
                           coef=self.coef_of(fetched.steps), grads=grads.to(device))

    def block_plans(self, window: Any = None, *, reverse: bool = False, max_rows: int = 65536,
                    skip_nonfinite: bool = True) -> Iterator[BlockPlan]:
        """The blocks of whole steps of a window, each at most max_rows rows (or one step if
        bigger), in step order or reversed: which rows of which shards each one reads."""
        steps = self.steps_in(window, skip_nonfinite=skip_nonfinite)
        return plan_blocks(self._index.step_rows, steps, reverse=reverse, max_rows=max_rows)

    def fetch_block(self, plan: BlockPlan, stage: Stage) -> FetchedBlock:
        """A planned block's gradient rows read into `stage` as stored, every byte verified, and
        its sample ids; `.into(tensor)` converts the rows. A checksum that does not match (or any
        damage) is a CorruptShardError naming the file. Safe to call from a reader thread."""
        try:
            return fetch(plan, stage, lambda sh: self._pool.rows(sh.path),
                         lambda sh, r0, r1: self._pool.rows(sh.path).sample_ids(r0, r1))
        except RowsDamaged as e:
            raise self._damaged(e.shard.path, fmt.ROWS_GRAD, e.cause, shard=True) from e.cause

    def coef_of(self, steps: np.ndarray) -> np.ndarray:
        """eta_t * w_t of each row's step (steps [R] of recorded steps): float64 [R]."""
        return self.table.coef[np.searchsorted(self.steps, steps)]

    def _columns_tensor(self, layers: Sequence[str] | None) -> torch.Tensor | None:
        cols = self.columns(layers)
        return None if cols is None else torch.from_numpy(cols)

    # ------------------------------------------------------------------ queries
    @property
    def query_steps(self) -> np.ndarray:
        return np.array(sorted(self._index.query_index), np.int64)

    @property
    def has_queries(self) -> bool:
        return len(self._index.query_index) > 0

    def query_gradients(self, step: int, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu",
                        layers: Sequence[str] | None = None) -> torch.Tensor:
        """u_q(step) for every query: [Q, K], at parameters w_step (w_T for step = final_step)."""
        if not self.has_queries:
            raise MissingDataError(
                f"{self.path} has no query gradients. Record them by passing queries=... (and "
                "query_every_n_steps) to InfluenceCallback / GradientRecorder.")
        if int(step) not in self._index.query_index:
            qs = self.query_steps
            raise MissingDataError(
                f"no query gradients recorded at step {step}; recorded at {len(qs)} steps, "
                f"e.g. {qs[:5].tolist()}... Use query_step_at_or_before(step).")
        sh, j = self._index.query_index[int(step)]
        g = self._read(sh, fmt.QUERY_GRAD, j)
        cols = self.columns(layers)
        if cols is not None:
            g = g[:, cols]
        g = from_stored(np.ascontiguousarray(g), stored_dtype(self._dataset(sh, fmt.QUERY_GRAD)))
        return g.to(device=device, dtype=dtype)

    def query_gradients_near(self, step: int, *, dtype: torch.dtype = torch.float32,
                             device: str | torch.device = "cpu") -> dict[int, torch.Tensor]:
        """{s: u_q(s)} for every query step s stored in the same shard as `step` (one read of the
        shard's query dataset, which HDF5 verifies whole anyway): what a pass in step order needs next."""
        if int(step) not in self._index.query_index:  # query_gradients says what is missing
            return {int(step): self.query_gradients(step, dtype=dtype, device=device)}
        sh, _ = self._index.query_index[int(step)]
        mine = [(s, j) for s, (other, j) in self._index.query_index.items() if other.path == sh.path]
        lo, hi = min(j for _, j in mine), max(j for _, j in mine)
        block = self._read(sh, fmt.QUERY_GRAD, slice(lo, hi + 1))
        g = from_stored(np.ascontiguousarray(block), stored_dtype(self._dataset(sh, fmt.QUERY_GRAD)))
        g = g.to(device=device, dtype=dtype)
        return {int(s): g[j - lo] for s, j in mine}

    def query_nonfinite(self, step: int) -> np.ndarray:
        """[Q] bool: which queries' gradients u_q(step) hold NaN/inf, as flagged when recorded
        (format-1 runs carry no flags: all False)."""
        flags = self._index.query_nonfinite.get(int(step))
        return np.asarray(flags, bool) if flags is not None else np.zeros(len(self.query_ids), bool)

    @property
    def nonfinite_query_steps(self) -> np.ndarray:
        """Query steps at which some query gradient was flagged non-finite when recorded."""
        return np.array(sorted(s for s, f in self._index.query_nonfinite.items() if np.any(f)), np.int64)

    def query_step_at_or_before(self, step: int) -> int | None:
        """The latest step <= `step` with recorded query gradients, or None."""
        qs = self.query_steps
        i = int(np.searchsorted(qs, step, side="right")) - 1
        return int(qs[i]) if i >= 0 else None

    # ------------------------------------------------------------------ parameters
    @property
    def snapshot_steps(self) -> np.ndarray:
        return np.array(sorted(self._index.param_files["snapshot"]), np.int64)

    @property
    def checkpoint_steps(self) -> np.ndarray:
        return np.array(sorted(self._index.param_files["checkpoint"]), np.int64)

    def parameter_names(self, step: int, kind: str | None = None) -> set[str]:
        """Names of the parameters in the snapshot (or checkpoint) of `step`, without loading them."""
        with self._param_h5(step, kind) as f:
            return set(f[fmt.PARAMS_GROUP].keys())

    def optimizer_state_names(self, step: int, kind: str | None = None) -> set[str]:
        """Names of the parameters whose optimizer state is saved with the parameters of `step`."""
        with h5py.File(self.param_file(step, kind), "r") as f:
            return set(f[fmt.OPTIM_GROUP].keys()) if fmt.OPTIM_GROUP in f else set()

    def load_parameters(self, step: int, kind: str | None = None, *,
                        device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Parameters w_step from a snapshot or checkpoint file: {name: tensor}."""
        with self._param_h5(step, kind) as f:
            try:
                return {name: torch.from_numpy(np.asarray(ds[()])).to(device)
                        for name, ds in f[fmt.PARAMS_GROUP].items()}
            except (OSError, KeyError, ValueError) as e:
                raise self._damaged(f.filename, "its parameters", e) from e

    def load_optimizer_state(self, step: int, kind: str = "checkpoint") -> dict[str, dict[str, torch.Tensor]]:
        """Optimizer state saved with the parameters of `step`: {param name: {key: tensor}}."""
        with self._param_h5(step, kind) as f:
            if fmt.OPTIM_GROUP not in f:
                return {}
            try:
                return {p: {k: torch.from_numpy(np.asarray(v[()])) for k, v in g.items()}
                        for p, g in f[fmt.OPTIM_GROUP].items()}
            except (OSError, KeyError, ValueError) as e:
                raise self._damaged(f.filename, "its optimizer state", e) from e

    def param_file(self, step: int, kind: str | None = None) -> Path:
        """The snapshot (or checkpoint) file of `step`; MissingDataError naming how to record it."""
        kinds = [kind] if kind else ["snapshot", "checkpoint"]
        for k in kinds:
            if int(step) in self._index.param_files[k]:
                return self._index.param_files[k][int(step)]
        raise MissingDataError(
            f"no parameter {'/'.join(kinds)} recorded at step {step} in {self.path}. Record snapshots "
            "(snapshot_every_n_steps / snapshot_windows) or checkpoints (checkpoint_every_n_steps).")

    def param_files(self) -> dict[str, dict[int, Path]]:
        """{'snapshot': {step: path}, 'checkpoint': {step: path}}."""
        return {k: dict(v) for k, v in self._index.param_files.items()}

    # ------------------------------------------------------------------ verification
    def verify(self, *, require_complete: bool = True) -> list[str]:
        """Read every shard and parameter file in full; return a list of problems (empty: all good).
        An interrupted run counts as a problem unless require_complete=False."""
        from .verify import verify_run

        return verify_run(self, require_complete=require_complete)

    def shard_files(self) -> list[ShardFile]:
        return list(self._index.shards)

    def open_rows(self, shard: ShardFile) -> RowFile:
        """The gradient rows of a shard, for verified reads (storage.rowio.RowFile)."""
        return self._pool.rows(shard.path)

    def open_shard(self, shard: ShardFile) -> h5py.File:
        return self._pool.get(shard.path)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        n = len(self.steps)
        span = f"steps {self.steps[0]}..{self.steps[-1]}" if n else "no steps"
        return (f"Run({str(self.path)!r}, {span}, {len(self.layers)} layers, dim {self.dim}, "
                f"{'complete' if self.complete else 'INCOMPLETE'})")

    # ------------------------------------------------------------------ internals
    def _dataset(self, shard: ShardFile, name: str) -> h5py.Dataset:
        return self._pool.get(shard.path)[name]

    def _read(self, shard: ShardFile, name: str, sel: Any) -> np.ndarray:
        """dataset[sel] of a shard; a checksum that does not match (or any damage) is a
        CorruptShardError naming the file, never other numbers."""
        try:
            return self._pool.get(shard.path)[name][sel]
        except (OSError, KeyError, ValueError) as e:
            raise self._damaged(shard.path, name, e, shard=True) from e

    def _damaged(self, path: Any, what: str, e: BaseException, *, shard: bool = False) -> CorruptShardError:
        if shard and self.on_corrupt != "skip":
            rest = ("open_run(path, on_corrupt='skip') (`--skip-corrupt` on the command line) leaves the damaged "
                    "shards out and uses the rest (their steps are then left out, and the results say so).")
        else:  # a parameter file, or a shard that changed after the run was opened and read whole
            rest = "move this file out of the run directory to use the rest (its steps are then reported as missing)."
        return CorruptShardError(
            f"{path}: {what} cannot be read ({e}); the file is damaged (a checksum does not match, or it "
            f"was truncated). `influence-hooks verify {self.path}` lists every damaged file; {rest}")

    def _param_h5(self, step: int, kind: str | None) -> h5py.File:
        path = self.param_file(step, kind)
        try:
            return open_h5(path)
        except CorruptShardError:
            raise
        except (OSError, KeyError, ValueError) as e:
            raise self._damaged(path, "the file", e) from e

    def _require_steps(self) -> None:
        if len(self.steps) == 0:
            raise MissingDataError(
                f"{self.path} holds no finished steps yet (complete={self.complete}). If training was "
                "interrupted before the first shard was written, nothing was recorded.")

