"""Reading a run directory: `open_run(path)` returns a `Run`.

The reader needs nothing but the directory. It indexes the per-step tables of every finished shard
(small), merges ranks, drops rows superseded by a resume, and streams gradients in bounded memory,
forward or backward in step order, for any window [t1, t2).
"""

from __future__ import annotations

import errno
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import h5py
import numpy as np
import torch

from ..errors import CorruptShardError, MissingDataError, RunDirectoryError, WindowError
from . import format as fmt
from .jsonio import read_json


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

    steps, sample_ids, coef: [R]; grads: [R, K]. coef = eta_t * w_t of each row's step, always
    float64 (grads may be float16). Rows are in ascending step order, or descending backward.
    """

    steps: torch.Tensor
    sample_ids: torch.Tensor
    coef: torch.Tensor
    grads: torch.Tensor


@dataclass
class _Shard:
    path: Path
    rank: int
    index: int


_MAX_OPEN_FILES = 32


def _superseded(segments: list[dict[str, int]], shard: "_Shard", step: int) -> bool:
    """A resume at from_step, writing from shard first_shard on, replaces the steps >= from_step
    that earlier shards of the same rank hold."""
    return any(seg["first_shard"] > shard.index and step >= seg["from_step"] for seg in segments)


def _ordered_shapes(entry: Any) -> dict[str, tuple[int, ...]]:
    """A layer's parameter shapes in row-column order: stored as [[name, shape], ...] because
    JSON objects lose their key order when the manifest is written with sorted keys."""
    pairs = entry.items() if isinstance(entry, dict) else entry
    return {str(name): tuple(shape) for name, shape in pairs}


def open_run(path: str | os.PathLike, *, on_corrupt: str = "raise") -> "Run":
    """Open the run recorded in `path`.

    on_corrupt: 'raise' (default) stops at a shard that cannot be read, naming it; 'skip' leaves
    such shards out with a warning, so the rest of the run stays usable.
    """
    return Run(path, on_corrupt=on_corrupt)


class Run:
    """A recorded run. See the module docstring; all step numbers are optimizer steps."""

    def __init__(self, path: str | os.PathLike, *, on_corrupt: str = "raise"):
        if on_corrupt not in ("raise", "skip"):
            raise ValueError(f"on_corrupt must be 'raise' or 'skip', got {on_corrupt!r}")
        self.path = Path(path)
        mpath = self.path / fmt.MANIFEST
        if not mpath.is_file():
            raise RunDirectoryError(
                f"no influence_hooks run in {self.path}: {fmt.MANIFEST} is missing. Pass the directory "
                "given to InfluenceCallback / GradientRecorder.")
        try:
            self.manifest: dict[str, Any] = read_json(mpath)
        except (OSError, ValueError) as e:
            raise RunDirectoryError(f"{mpath} is unreadable ({e}); the run cannot be opened.") from e
        if self.manifest.get("format") != fmt.FORMAT_NAME:
            raise RunDirectoryError(f"{mpath} is not an influence_hooks manifest.")
        if int(self.manifest.get("format_version", 0)) > fmt.FORMAT_VERSION:
            raise RunDirectoryError(
                f"{self.path} was written by a newer format (v{self.manifest['format_version']}); "
                "upgrade influence_hooks to read it.")
        self.run_id: str = self.manifest["run_id"]
        self.dim: int = int(self.manifest["dim"])
        self.layers: list[LayerInfo] = [
            LayerInfo(name=l["name"], rule=l["rule"], module_type=l["module_type"], offset=int(l["offset"]),
                      dim=int(l["dim"]), grad_dim=int(l["grad_dim"]),
                      param_shapes=_ordered_shapes(l["param_shapes"]),
                      projection=dict(l["projection"]))
            for l in self.manifest["layers"]]
        self.skipped_shards: list[tuple[Path, str]] = []
        self._on_corrupt = on_corrupt
        self._files: dict[Path, h5py.File] = {}
        self._rank_states = self._read_rank_states()
        self._index_shards()
        self._index_params()

    # ------------------------------------------------------------------ metadata
    @property
    def complete(self) -> bool:
        """True when every rank finished training and closed its recording."""
        return bool(self._rank_states) and all(s.get("complete") for s in self._rank_states.values())

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
        finals = [s.get("final_step") for s in self._rank_states.values() if s.get("final_step") is not None]
        return int(max(finals)) if finals else self.last_step + 1

    @property
    def sample_ids(self) -> np.ndarray:
        """Sorted unique ids of every training sample recorded."""
        if self._sample_ids is None:
            ids = [self._dataset(sh, fmt.ROWS_SAMPLE_ID)[:] for sh in self._shards]
            self._sample_ids = np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)
        return self._sample_ids

    @property
    def n_rows(self) -> int:
        return int(self.batch_sizes_recorded.sum())

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

    def approximations(self) -> list[str]:
        """The approximations any estimator over this run makes, as readable sentences."""
        notes = []
        if any(l.projection.get("kind") != "none" for l in self.layers):
            notes.append(f"gradients randomly projected to {self.dim} dimensions "
                         f"({', '.join(sorted({l.projection.get('kind') for l in self.layers}))})")
        opt = self.optimizer
        if opt and not opt.get("is_plain_sgd", False):
            notes.append(f"optimizer {opt.get('name')} is not plain SGD: the SGD form with the recorded "
                         "learning rate is used")
        if self.manifest.get("gradient_clipping"):
            notes.append(f"gradient clipping ({self.manifest['gradient_clipping']}) is ignored")
        if self.manifest.get("partial_model", True):
            notes.append("only the recorded layers' parameters are attributed")
        return notes

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
            "shards": len(self._shards), "skipped_shards": [str(p) for p, _ in self.skipped_shards],
            "size_bytes": size,
        }

    # ------------------------------------------------------------------ windows
    def resolve_window(self, window: tuple[int, int] | None = None,
                       epochs: tuple[int, int] | None = None) -> tuple[int, int]:
        """Check a window and return it as (t1, t2), the half-open step range [t1, t2).

        window=None and epochs=None: the whole run. epochs=(e1, e2): epochs e1..e2-1.
        """
        self._require_steps()
        if window is not None and epochs is not None:
            raise WindowError("give either window=(t1, t2) or epochs=(e1, e2), not both.")
        if epochs is not None:
            return self.epoch_window(*epochs)
        if window is None:
            return self.first_step, self.last_step + 1
        try:
            t1, t2 = (int(window[0]), int(window[1]))
        except (TypeError, ValueError, IndexError):
            raise WindowError(f"a window is a pair of steps (t1, t2), got {window!r}") from None
        if t2 <= t1:
            raise WindowError(f"window [{t1}, {t2}) is empty: t2 must be greater than t1.")
        if t2 <= self.first_step or t1 > self.last_step:
            raise WindowError(f"window [{t1}, {t2}) lies outside the recorded steps "
                              f"[{self.first_step}, {self.last_step + 1}).")
        if not ((self.steps >= t1) & (self.steps < t2)).any():
            raise WindowError(f"no recorded step falls in window [{t1}, {t2}).")
        c1, c2 = max(t1, self.first_step), min(t2, self.last_step + 1)
        if (c1, c2) != (t1, t2):  # results name the window they really cover
            warnings.warn(f"window [{t1}, {t2}) reaches beyond the recorded steps [{self.first_step}, "
                          f"{self.last_step + 1}); using [{c1}, {c2}).", RuntimeWarning, stacklevel=2)
        return c1, c2

    def epoch_window(self, e1: int, e2: int | None = None) -> tuple[int, int]:
        """Steps of epochs [e1, e2) (e2 = e1 + 1 by default) as a half-open window."""
        e2 = e1 + 1 if e2 is None else e2
        mask = (self.epochs >= e1) & (self.epochs < e2)
        recorded = sorted({int(e) for e in self.epochs})
        if e2 <= e1 or not mask.any():
            raise WindowError(f"no recorded step in epochs [{e1}, {e2}); recorded epochs: {recorded}")
        if e1 < recorded[0] or e2 > recorded[-1] + 1:
            warnings.warn(f"epochs [{e1}, {e2}) reach beyond the recorded epochs {recorded[0]}.."
                          f"{recorded[-1]}; using the recorded ones.", RuntimeWarning, stacklevel=2)
        sel = self.steps[mask]
        return int(sel.min()), int(sel.max()) + 1

    def epoch_windows(self) -> list[tuple[int, int]]:
        """One window per recorded epoch, in order."""
        return [self.epoch_window(int(e)) for e in np.unique(self.epochs)]

    def steps_in(self, window: tuple[int, int] | None = None, *, skip_nonfinite: bool = True) -> np.ndarray:
        t1, t2 = self.resolve_window(window)
        mask = (self.steps >= t1) & (self.steps < t2)
        if skip_nonfinite:  # flagged steps, and steps the optimizer never applied
            mask &= ~(self.nonfinite | self.skipped)
        return self.steps[mask]

    def step_position(self, step: int) -> int:
        i = int(np.searchsorted(self.steps, step))
        if i >= len(self.steps) or self.steps[i] != step:
            raise KeyError(f"step {step} is not recorded")
        return i

    # ------------------------------------------------------------------ gradients
    def step_sample_ids(self, step: int) -> np.ndarray:
        """The sample ids of step `step`'s batch, in batch order, without reading gradients."""
        if int(step) not in self._step_rows:
            raise KeyError(f"step {step} is not recorded")
        return np.concatenate([self._dataset(sh, fmt.ROWS_SAMPLE_ID)[r0:r1]
                               for sh, r0, r1 in self._step_rows[int(step)]])

    def iter_steps(self, window: tuple[int, int] | None = None, *, reverse: bool = False,
                   dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                   layers: Sequence[str] | None = None, skip_nonfinite: bool = True) -> Iterator[StepBatch]:
        """Yield one StepBatch per recorded step of the window, in step order (or reversed)."""
        cols = self.columns(layers)
        for step in (self.steps_in(window, skip_nonfinite=skip_nonfinite)[::-1] if reverse
                     else self.steps_in(window, skip_nonfinite=skip_nonfinite)):
            i = self.step_position(int(step))
            ids, grads = [], []
            for shard, r0, r1 in self._step_rows[int(step)]:
                ids.append(self._dataset(shard, fmt.ROWS_SAMPLE_ID)[r0:r1])
                g = self._dataset(shard, fmt.ROWS_GRAD)[r0:r1]
                grads.append(g if cols is None else g[:, cols])
            yield StepBatch(step=int(step), epoch=int(self.epochs[i]), lr=float(self.lrs[i]),
                            update_weight=float(self.update_weights[i]), batch_size=int(self.batch_sizes[i]),
                            sample_ids=torch.from_numpy(np.concatenate(ids)).to(device),
                            grads=torch.from_numpy(np.concatenate(grads)).to(device=device, dtype=dtype))

    def iter_blocks(self, window: tuple[int, int] | None = None, *, reverse: bool = False,
                    max_rows: int = 65536, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu", layers: Sequence[str] | None = None,
                    skip_nonfinite: bool = True) -> Iterator[RowBlock]:
        """Yield RowBlocks of whole steps, each at most max_rows rows (or one step if bigger).

        Memory is bounded by max_rows * K, whatever the size of the run.
        """
        cols = self.columns(layers)
        steps = self.steps_in(window, skip_nonfinite=skip_nonfinite)
        pending: list[tuple[int, _Shard, int, int]] = []
        n = 0
        for step in (steps[::-1] if reverse else steps):
            parts = self._step_rows[int(step)]
            rows = sum(r1 - r0 for _, r0, r1 in parts)
            if pending and n + rows > max_rows:
                yield self._read_block(pending, cols, dtype, device)
                pending, n = [], 0
            pending.extend((int(step), sh, r0, r1) for sh, r0, r1 in parts)
            n += rows
        if pending:
            yield self._read_block(pending, cols, dtype, device)

    def _read_block(self, parts, cols, dtype, device) -> RowBlock:
        # merge row ranges that are contiguous in the same shard into one read
        runs: list[list] = []
        for step, sh, r0, r1 in parts:
            if runs and runs[-1][0] is sh and runs[-1][2] == r0:
                runs[-1][2] = r1
                runs[-1][3].append((step, r1 - r0))
            elif runs and runs[-1][0] is sh and runs[-1][1] == r1:  # backward order
                runs[-1][1] = r0
                runs[-1][3].insert(0, (step, r1 - r0))
                runs[-1][4] = True
            else:
                runs.append([sh, r0, r1, [(step, r1 - r0)], False])
        grads, ids, steps = [], [], []
        for sh, r0, r1, members, backward in runs:
            g = self._dataset(sh, fmt.ROWS_GRAD)[r0:r1]
            s_ids = self._dataset(sh, fmt.ROWS_SAMPLE_ID)[r0:r1]
            if cols is not None:
                g = g[:, cols]
            st = np.concatenate([np.full(c, s, np.int64) for s, c in members])
            if backward:  # rows were read ascending; restore descending step order, steps kept whole
                order = np.argsort(-st, kind="stable")
                g, s_ids, st = g[order], s_ids[order], st[order]
            grads.append(g)
            ids.append(s_ids)
            steps.append(st)
        st = np.concatenate(steps)
        pos = np.searchsorted(self.steps, st)
        coef = self.lrs[pos] * self.update_weights[pos]
        return RowBlock(steps=torch.from_numpy(st).to(device),
                        sample_ids=torch.from_numpy(np.concatenate(ids)).to(device),
                        coef=torch.from_numpy(coef).to(device),
                        grads=torch.from_numpy(np.concatenate(grads)).to(device=device, dtype=dtype))

    # ------------------------------------------------------------------ queries
    @property
    def has_queries(self) -> bool:
        return len(self.query_steps) > 0

    def query_gradients(self, step: int, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu",
                        layers: Sequence[str] | None = None) -> torch.Tensor:
        """u_q(step) for every query: [Q, K], at parameters w_step (w_T for step = final_step)."""
        if not self.has_queries:
            raise MissingDataError(
                f"{self.path} has no query gradients. Record them by passing queries=... (and "
                "query_every_n_steps) to InfluenceCallback / GradientRecorder.")
        if int(step) not in self._query_index:
            raise MissingDataError(
                f"no query gradients recorded at step {step}; recorded at {len(self.query_steps)} steps, "
                f"e.g. {self.query_steps[:5].tolist()}... Use query_step_at_or_before(step).")
        sh, j = self._query_index[int(step)]
        g = self._dataset(sh, fmt.QUERY_GRAD)[j]
        cols = self.columns(layers)
        if cols is not None:
            g = g[:, cols]
        return torch.from_numpy(np.ascontiguousarray(g)).to(device=device, dtype=dtype)

    def query_step_at_or_before(self, step: int) -> int | None:
        """The latest step <= `step` with recorded query gradients, or None."""
        i = int(np.searchsorted(self.query_steps, step, side="right")) - 1
        return int(self.query_steps[i]) if i >= 0 else None

    # ------------------------------------------------------------------ parameters
    @property
    def snapshot_steps(self) -> np.ndarray:
        return np.array(sorted(self._param_files["snapshot"]), np.int64)

    @property
    def checkpoint_steps(self) -> np.ndarray:
        return np.array(sorted(self._param_files["checkpoint"]), np.int64)

    def load_parameters(self, step: int, kind: str | None = None, *,
                        device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Parameters w_step from a snapshot or checkpoint file: {name: tensor}."""
        path = self._param_path(step, kind)
        with h5py.File(path, "r") as f:
            return {name: torch.from_numpy(ds[()]).to(device) for name, ds in f[fmt.PARAMS_GROUP].items()}

    def load_optimizer_state(self, step: int) -> dict[str, dict[str, torch.Tensor]]:
        """Optimizer state saved with the checkpoint at `step`: {param name: {key: tensor}}."""
        path = self._param_path(step, "checkpoint")
        with h5py.File(path, "r") as f:
            if fmt.OPTIM_GROUP not in f:
                return {}
            return {p: {k: torch.from_numpy(v[()]) for k, v in g.items()} for p, g in f[fmt.OPTIM_GROUP].items()}

    def _param_path(self, step: int, kind: str | None) -> Path:
        kinds = [kind] if kind else ["snapshot", "checkpoint"]
        for k in kinds:
            if int(step) in self._param_files[k]:
                return self._param_files[k][int(step)]
        raise MissingDataError(
            f"no parameter {'/'.join(kinds)} recorded at step {step} in {self.path}. Record snapshots "
            "(snapshot_every_n_steps / snapshot_windows) or checkpoints (checkpoint_every_n_steps).")

    # ------------------------------------------------------------------ verification
    def verify(self, *, require_complete: bool = True) -> list[str]:
        """Read every shard and parameter file in full; return a list of problems (empty: all good).
        An interrupted run counts as a problem unless require_complete=False."""
        problems = [f"{p}: {why}" for p, why in self.skipped_shards]
        for sh in self._shards:
            try:
                f = self._file(sh.path)
                g = f[fmt.ROWS_GRAD]
                for r in range(0, g.shape[0], 65536):
                    if not np.isfinite(np.asarray(g[r:r + 65536], np.float64)).all():
                        problems.append(f"{sh.path}: non-finite gradient values (flagged steps: "
                                        f"{int(self.nonfinite.sum())})")
                        break
                if fmt.QUERY_GRAD in f:
                    f[fmt.QUERY_GRAD][()]
            except Exception as e:  # noqa: BLE001 - verification reports everything it finds
                problems.append(f"{sh.path}: unreadable ({e})")
        for kind, files in self._param_files.items():
            for step, p in files.items():
                try:
                    with h5py.File(p, "r") as f:
                        for ds in f[fmt.PARAMS_GROUP].values():
                            ds[()]
                except Exception as e:  # noqa: BLE001
                    problems.append(f"{p}: unreadable {kind} ({e})")
        if require_complete and not self.complete:
            problems.append("run is incomplete: training did not finish or was interrupted "
                            f"(recorded steps {self.first_step if len(self.steps) else '-'}.."
                            f"{self.last_step if len(self.steps) else '-'})")
        return problems

    def close(self) -> None:
        for f in self._files.values():
            try:
                f.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self._files.clear()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        n = len(self.steps)
        span = f"steps {self.steps[0]}..{self.steps[-1]}" if n else "no steps"
        return (f"Run({str(self.path)!r}, {span}, {len(self.layers)} layers, dim {self.dim}, "
                f"{'complete' if self.complete else 'INCOMPLETE'})")

    # ------------------------------------------------------------------ indexing
    def _read_rank_states(self) -> dict[int, dict[str, Any]]:
        states = {}
        for p in self.path.glob("rank-*.json"):
            r = fmt.parse_rank_file_name(p.name)
            if r is not None:
                try:
                    states[r] = read_json(p)
                except (OSError, ValueError):
                    states[r] = {"rank": r, "segments": [{"from_step": 0, "first_shard": 0}], "complete": False}
        return states

    def _file(self, path: Path) -> h5py.File:
        """An open shard, from a small pool: a run may have thousands of shards, and file
        descriptors are limited."""
        f = self._files.pop(path, None)
        if f is None:
            while len(self._files) >= _MAX_OPEN_FILES:
                self._files.pop(next(iter(self._files))).close()  # least recently used
            f = h5py.File(path, "r")
        self._files[path] = f  # most recently used last
        return f

    def _dataset(self, shard: _Shard, name: str) -> h5py.Dataset:
        return self._file(shard.path)[name]

    def _index_shards(self) -> None:
        shard_dir = self.path / fmt.SHARD_DIR
        found = []
        for p in sorted(shard_dir.iterdir()) if shard_dir.is_dir() else []:
            parsed = fmt.parse_shard_name(p.name)
            if parsed:
                found.append(_Shard(p, *parsed))
        self._shards: list[_Shard] = []
        tables: list[tuple[_Shard, dict[str, np.ndarray]]] = []
        self._query_index: dict[int, tuple[_Shard, int]] = {}
        for sh in found:
            try:
                f = self._file(sh.path)
                if f.attrs.get("run_id") != self.run_id:
                    raise CorruptShardError(f"{sh.path} belongs to run {f.attrs.get('run_id')}, "
                                            f"not {self.run_id}; remove it from the run directory.")
                cols = {name: f[fmt.STEPS][name][()] for name in fmt.STEP_COLUMNS}
                qsteps = f[fmt.QUERY_STEP][()]
                if len(qsteps):
                    f[fmt.QUERY_GRAD].shape  # noqa: B018 - touch it, so a broken dataset fails here
                f[fmt.ROWS_GRAD].shape  # noqa: B018
            except Exception as e:  # noqa: BLE001 - any failure to read means a broken shard
                f = self._files.pop(sh.path, None)
                if f is not None:
                    f.close()
                if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
                    raise  # out of file descriptors: not a problem of the shard
                why = str(e) if isinstance(e, CorruptShardError) else f"cannot be read ({type(e).__name__}: {e})"
                if self._on_corrupt == "raise":
                    raise CorruptShardError(
                        f"shard {sh.path} {why}. Nothing else is lost: open_run(path, on_corrupt='skip') "
                        "(`influence-hooks info RUN --skip-corrupt`) reads the other shards, and "
                        "`influence-hooks verify RUN` lists every problem.") from e
                warnings.warn(f"skipping unreadable shard {sh.path}: {why}", RuntimeWarning)
                self.skipped_shards.append((sh.path, why))
                continue
            self._shards.append(sh)
            tables.append((sh, cols))
            for j, qs in enumerate(qsteps):
                self._query_index[int(qs)] = (sh, j)
        # a resume supersedes the rows of steps >= from_step in shards written before it
        cutoffs = {r: s.get("segments", []) for r, s in self._rank_states.items()}
        per_step: dict[int, dict[str, Any]] = {}
        self._step_rows: dict[int, list[tuple[_Shard, int, int]]] = {}
        for sh, cols in tables:
            segs = cutoffs.get(sh.rank, [])
            for j, step in enumerate(cols["step"]):
                step = int(step)
                if _superseded(segs, sh, step):
                    continue
                r0 = int(cols["row_start"][j])
                self._step_rows.setdefault(step, []).append((sh, r0, r0 + int(cols["row_count"][j])))
                row = {name: cols[name][j] for name in fmt.STEP_COLUMNS}
                if step in per_step:  # another rank's part of the same step: a global batch
                    per_step[step]["rows_total"] += int(cols["row_count"][j])
                    per_step[step]["batch_size"] += int(cols["batch_size"][j])
                    per_step[step]["nonfinite"] |= bool(cols["nonfinite"][j])
                    per_step[step]["skipped"] |= bool(cols["skipped"][j])
                else:
                    per_step[step] = {**row, "rows_total": int(cols["row_count"][j])}
        for step, (sh, j) in list(self._query_index.items()):
            segs = cutoffs.get(sh.rank, [])
            if _superseded(segs, sh, step):
                if self._query_index.get(step) == (sh, j):
                    del self._query_index[step]
        order = sorted(per_step)
        self.steps = np.array(order, np.int64)
        col = lambda name, dt: np.array([per_step[s][name] for s in order], dt)  # noqa: E731
        self.epochs = col("epoch", np.int64)
        self.lrs = col("lr", np.float64)
        self.batch_sizes = col("batch_size", np.int64)
        self.batch_sizes_recorded = col("rows_total", np.int64)
        self.update_weights = col("update_weight", np.float64)
        self.micro_batches = col("micro_batches", np.int64)
        self.nonfinite = col("nonfinite", bool)
        self.skipped = col("skipped", bool)  # not applied by the optimizer (AMP overflow)
        self.losses = col("loss", np.float64)
        self.query_steps = np.array(sorted(self._query_index), np.int64)
        self._sample_ids: np.ndarray | None = None

    def _index_params(self) -> None:
        self._param_files: dict[str, dict[int, Path]] = {k: {} for k in fmt.PARAM_KINDS}
        pdir = self.path / fmt.PARAM_DIR
        for p in sorted(pdir.iterdir()) if pdir.is_dir() else []:
            parsed = fmt.parse_param_file_name(p.name)
            if parsed:
                kind, _rank, step = parsed
                self._param_files[kind][step] = p

    def _require_steps(self) -> None:
        if len(self.steps) == 0:
            raise MissingDataError(
                f"{self.path} holds no finished steps yet (complete={self.complete}). If training was "
                "interrupted before the first shard was written, nothing was recorded.")
