"""The index of a run directory: which finished files exist, and what each optimizer step is.

`ShardIndex.build(path, run_id, ...)` scans the directory once and reads only the small per-step
tables and attributes of the shards. It merges the ranks (the rows of one step on several ranks
form its global batch), drops rows that a resume superseded, and gives

- `table`: a `StepTable`, one row per recorded step;
- `step_rows[step]`: where that step's rows lie, as (shard, first row, end row) per rank;
- `query_index[step]`: the shard and position of the query gradients recorded at that step, and
  `query_nonfinite[step]`: which queries' gradients there hold NaN/inf;
- `param_files[kind][step]`: the parameter snapshot / checkpoint files;
- `gaps`: finished files the rank files list (or the shard numbering implies) that are not there,
  and `inconsistencies`: what the shards and the rank files disagree on.

Which rows a resume superseded comes from the shards themselves (each names its segment and the
step that segment started from), with the rank file's list of segments as a second source and the
only one for format-1 shards. Reading gradients is the reader's job (`reader.Run`); both share a
`FilePool`.
"""

from __future__ import annotations

import errno
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import CorruptShardError, RunDirectoryError, UnsafeFileError, short_list
from . import format as fmt
from .files import get_attr, open_h5
from .jsonio import read_json
from .rowio import RowFile, Stage

MAX_OPEN_FILES = 32


@dataclass(frozen=True)
class ShardFile:
    """A finished gradient shard of one rank: the `index`-th that rank wrote."""

    path: Path
    rank: int
    index: int


@dataclass(frozen=True)
class Gap:
    """A finished file of the run that is not in the directory (deleted, lost, or never copied).

    kind: 'shard', 'snapshot' or 'checkpoint'; first_step..last_step: the steps it held, where known
    (None: unknown, e.g. a shard of query gradients only)."""

    rank: int
    kind: str
    name: str
    first_step: int | None = None
    last_step: int | None = None

    def describe(self) -> str:
        if self.first_step is None:
            steps = "steps unknown"
        elif self.first_step == self.last_step:
            steps = f"step {self.first_step}"
        else:
            steps = f"steps {self.first_step}..{self.last_step}"
        return f"rank {self.rank}: {self.kind} {self.name} is missing ({steps})"


@dataclass(frozen=True)
class StepTable:
    """One entry per recorded optimizer step, sorted by step (arrays of equal length).

    steps, epochs: int64; lrs: the recorded learning rate eta_t; update_weights: w_t, the factor of
    sum_i g_t(i) in the update (1/|B_t| for a mean loss); batch_sizes: |B_t| (the global batch);
    rows: rows recorded for the step (all ranks); micro_batches; nonfinite: flagged non-finite
    gradients; skipped: the optimizer did not apply the step (AMP overflow); losses; uneven: the
    step's ranks weighted their samples differently (local batches of other sizes under DDP), and
    update_weights holds the mean weight of its rows; layer_lrs: [steps, layers] the step size
    Adam/AdamW applied to each recorded layer (NaN where unknown), None when the run has none.
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
    uneven: np.ndarray
    layer_lrs: np.ndarray | None = None

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
    have thousands of shards, and file descriptors are limited. Every file is checked to be
    self-contained (`files.open_h5`) the first time it is opened. `rows(path)` is the file's
    `rowio.RowFile`, kept while the file is open (a reader thread and the caller share the pool)."""

    def __init__(self, limit: int = MAX_OPEN_FILES):
        self.limit = limit
        self._files: dict[Path, h5py.File] = {}
        self._rows: dict[Path, RowFile] = {}
        self._checked: set[Path] = set()
        self._lock = threading.RLock()

    def get(self, path: Path) -> h5py.File:
        with self._lock:
            f = self._files.pop(path, None)
            if f is None:
                while len(self._files) >= self.limit:
                    self.drop(next(iter(self._files)))
                f = open_h5(path, checked=path in self._checked)
                self._checked.add(path)
            self._files[path] = f  # most recently used last
            return f

    def rows(self, path: Path) -> RowFile:
        """The gradient rows of the shard at `path` (a RowFile holds its own descriptor of the file,
        so a read in progress survives the file being closed here)."""
        with self._lock:
            f = self.get(path)
            rf = self._rows.get(path)
            if rf is None:
                rf = self._rows[path] = RowFile(f)
            return rf

    def drop(self, path: Path) -> None:
        with self._lock:
            self._rows.pop(path, None)
            f = self._files.pop(path, None)
            if f is not None:
                f.close()

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                try:
                    f.close()
                except Exception:  # noqa: BLE001 - closing is best effort
                    pass
            self._files.clear()
            self._rows.clear()

    def __len__(self) -> int:
        return len(self._files)


# ---------------------------------------------------------------------- manifest and rank files
def read_manifest(path: Path, *, purpose: str = "open") -> dict[str, Any]:
    """The manifest of the run in `path`, checked against format.MANIFEST_SCHEMA; RunDirectoryError
    naming the problem (and the bad key) otherwise."""
    mpath = path / fmt.MANIFEST
    if not mpath.is_file():
        if purpose == "resume":
            raise RunDirectoryError(f"cannot resume: {path} holds no run (no {fmt.MANIFEST}).")
        raise RunDirectoryError(
            f"no influence_hooks run in {path}: {fmt.MANIFEST} is missing. Pass the directory "
            "given to InfluenceCallback / GradientRecorder.")
    try:
        manifest = read_json(mpath)
    except (OSError, ValueError) as e:
        raise RunDirectoryError(f"{mpath} is unreadable ({e}); the run cannot be opened.") from e
    if not isinstance(manifest, dict) or manifest.get("format") != fmt.FORMAT_NAME:
        raise RunDirectoryError(f"{mpath} is not an influence_hooks manifest (its 'format' is not "
                                f"{fmt.FORMAT_NAME!r}).")
    version = manifest.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > fmt.FORMAT_VERSION:
        raise RunDirectoryError(
            f"{path} was written by a newer format (v{version}); upgrade influence_hooks to read it.")
    problem = fmt.manifest_problem(manifest)
    if problem:
        raise RunDirectoryError(
            f"{mpath} is damaged: {problem}. The manifest is written once, when recording starts; restore "
            "it from a copy of the run (the shards themselves are intact), or record again.")
    return manifest


def read_rank_states(path: Path) -> dict[int, dict[str, Any]]:
    """{rank: its rank-NNN.json}; an unreadable one counts as an interrupted rank that lists nothing."""
    states = {}
    for p in path.glob("rank-*.json"):
        r = fmt.parse_rank_file_name(p.name)
        if r is not None:
            try:
                state = read_json(p)
                if not isinstance(state, dict) or not isinstance(state.get("segments", []), list):
                    raise ValueError("not a rank file")
                states[r] = state
            except (OSError, ValueError):
                states[r] = {"rank": r, "segments": [], "complete": False, "unreadable": True}
    return states


def finished_shards(path: Path) -> list[ShardFile]:
    shard_dir = path / fmt.SHARD_DIR
    found = []
    for p in sorted(shard_dir.iterdir()) if shard_dir.is_dir() else []:
        parsed = fmt.parse_shard_name(p.name)
        if parsed:
            found.append(ShardFile(p, *parsed))
    return found


def _state_segments(state: dict[str, Any]) -> list[dict[str, int]]:
    """The rank file's segments, numbered (format-1 rank files number them by position)."""
    return [{"segment": int(s.get("segment", i)), "from_step": int(s["from_step"]),
             "first_shard": int(s.get("first_shard", 0))} for i, s in enumerate(state.get("segments", []))]


def _segment_of(sh: ShardFile, attrs: dict[str, Any], segments: list[dict[str, int]]) -> int:
    """The segment a shard belongs to: its own attribute, or (format 1) the last segment of the
    rank file that started at or before its index."""
    if attrs.get(fmt.SHARD_SEGMENT) is not None:
        return int(attrs[fmt.SHARD_SEGMENT])
    return max((s["segment"] for s in segments if s["first_shard"] <= sh.index), default=0)


def superseded(from_steps: dict[int, int], segment: int, step: int) -> bool:
    """A row of `step` written in `segment` is superseded when a later segment (a resume) started at
    or before that step: the resumed run recorded the step again."""
    return any(seg > segment and step >= start for seg, start in from_steps.items())


def rebuild_rank_state(path: Path, rank: int, run_id: str) -> dict[str, Any]:
    """Rank `rank`'s progress for a resume: its rank file, completed from the shards on disk where
    it is missing, unreadable or of format 1 (no list of finished files)."""
    rpath = path / fmt.rank_file_name(rank)
    state = read_rank_states(path).get(rank) if rpath.exists() else None
    if state is not None and not state.get("unreadable") and fmt.RANK_SHARDS in state:
        state["segments"] = _state_segments(state)
        state.setdefault(fmt.RANK_PARAMS, [])
        return state
    segments = _state_segments(state or {})
    rows, last = [], None
    pool = FilePool()
    try:
        for sh in finished_shards(path):
            if sh.rank != rank:
                continue
            try:
                f = pool.get(sh.path)
                attrs = _shard_attrs(f)
                steps = f[fmt.STEPS]["step"][()]
            except Exception:  # noqa: BLE001 - an unreadable shard lists nothing
                continue
            finally:
                pool.drop(sh.path)
            seg = _segment_of(sh, attrs, segments)
            if attrs.get(fmt.SHARD_FROM_STEP) is not None and seg not in {s["segment"] for s in segments}:
                segments.append({"segment": seg, "from_step": int(attrs[fmt.SHARD_FROM_STEP]), "first_shard": sh.index})
            rows.append([sh.index, seg, int(steps.min()) if len(steps) else None,
                         int(steps.max()) if len(steps) else None, int(len(steps)), None])
            if len(steps):
                last = max(int(steps.max()), last if last is not None else -1)
    finally:
        pool.close()
    segments = sorted(segments, key=lambda s: s["segment"]) or [{"segment": 0, "from_step": 0, "first_shard": 0}]
    params = [p.name for p in sorted((path / fmt.PARAM_DIR).glob("*.h5"))
              if (parsed := fmt.parse_param_file_name(p.name)) and parsed[1] == rank]
    return {"rank": rank, "segments": segments, "complete": False, "last_step": last, "final_step": None,
            fmt.RANK_SHARDS: rows, fmt.RANK_PARAMS: params, "rebuilt_from_shards": True}


# ---------------------------------------------------------------------- the index
@dataclass
class ShardIndex:
    shards: list[ShardFile]
    skipped_shards: list[tuple[Path, str]]
    table: StepTable
    step_rows: dict[int, list[tuple[ShardFile, int, int]]]
    query_index: dict[int, tuple[ShardFile, int]]
    query_nonfinite: dict[int, np.ndarray]
    param_files: dict[str, dict[int, Path]]
    rank_states: dict[int, dict[str, Any]]
    gaps: list[Gap]
    inconsistencies: list[str]

    @classmethod
    def build(cls, path: Path, run_id: str, pool: FilePool, *, dim: int | None = None,
              on_corrupt: str = "raise", read_whole: bool = True) -> "ShardIndex":
        """Index the finished files of run `run_id` in `path`. on_corrupt: 'raise' stops at an
        unreadable shard, naming it; 'skip' leaves out, with a warning, each shard that cannot be
        read, and with `read_whole` first reads every dataset of every shard once, checking their
        checksums (damage found later would stop an aggregation half way)."""
        rank_states = read_rank_states(path)
        shards, skipped, read = [], [], []
        stage = Stage() if on_corrupt == "skip" and read_whole else None
        for sh in finished_shards(path):
            try:
                f = pool.get(sh.path)
                columns = _read_step_columns(f, sh, run_id, dim)
                if stage is not None:
                    _read_whole(f, pool.rows(sh.path), stage)
                read.append((sh, *columns))
            except Exception as e:  # noqa: BLE001 - any failure to read means a broken shard
                pool.drop(sh.path)
                if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
                    raise  # out of file descriptors: not a problem of the shard
                why = (e.reason if isinstance(e, UnsafeFileError) else str(e) if isinstance(e, CorruptShardError)
                       else f"cannot be read ({type(e).__name__}: {e})")
                if on_corrupt == "raise":
                    rest = ("Nothing else is lost: open_run(path, on_corrupt='skip') (`influence-hooks info RUN "
                            "--skip-corrupt`) reads the other shards, and `influence-hooks verify RUN` lists "
                            "every problem.")
                    if isinstance(e, UnsafeFileError):
                        raise UnsafeFileError(sh.path, f"{why} {rest}") from e
                    raise CorruptShardError(f"shard {sh.path}: {why} {rest}") from e
                warnings.warn(f"skipping unreadable shard {sh.path}: {why}", RuntimeWarning)
                skipped.append((sh.path, why))
                continue
            shards.append(sh)

        inconsistencies: list[str] = []
        segments = {r: _state_segments(s) for r, s in rank_states.items()}
        from_steps: dict[int, dict[int, int]] = {r: {s["segment"]: s["from_step"] for s in segs}
                                                 for r, segs in segments.items()}
        seg_of: dict[Path, int] = {}
        for sh, _cols, _q, attrs in read:
            seg = seg_of[sh.path] = _segment_of(sh, attrs, segments.get(sh.rank, []))
            start = attrs.get(fmt.SHARD_FROM_STEP)
            if start is None:
                continue
            known = from_steps.setdefault(sh.rank, {})
            if seg not in known:
                if sh.rank in rank_states:
                    inconsistencies.append(
                        f"rank {sh.rank}: shard {sh.path.name} belongs to segment {seg} (resumed at step {start}), "
                        f"which {fmt.rank_file_name(sh.rank)} does not list; the shards' segments are used")
                known[seg] = int(start)
            elif known[seg] != int(start):
                inconsistencies.append(
                    f"rank {sh.rank}: shard {sh.path.name} says segment {seg} started at step {start}, "
                    f"{fmt.rank_file_name(sh.rank)} says {known[seg]}; the shard's value is used")
                known[seg] = int(start)
        for r in sorted({sh.rank for sh in shards} - set(rank_states)):
            inconsistencies.append(
                f"rank {r}: its shards are here but its rank file {fmt.rank_file_name(r)} is missing, so whether "
                "it finished is unknown and missing shards at its end cannot be detected")

        table, step_rows, dupes = _merge_steps(read, seg_of, from_steps)
        inconsistencies += dupes
        query_index: dict[int, tuple[ShardFile, int]] = {}
        query_nonfinite: dict[int, np.ndarray] = {}
        for sh, _cols, (qsteps, qbad), _attrs in read:
            for j, qs in enumerate(qsteps):
                if superseded(from_steps.get(sh.rank, {}), seg_of[sh.path], int(qs)):
                    continue
                query_index[int(qs)] = (sh, j)
                if qbad is not None:
                    query_nonfinite[int(qs)] = qbad[j]
        param_files = _param_files(path)
        gaps = _gaps(path, rank_states, read, skipped, seg_of, from_steps, param_files)
        return cls(shards=shards, skipped_shards=skipped, table=table, step_rows=step_rows,
                   query_index=query_index, query_nonfinite=query_nonfinite, param_files=param_files,
                   rank_states=rank_states, gaps=gaps, inconsistencies=inconsistencies)


def _read_whole(f: h5py.File, rows: RowFile, stage: Stage) -> None:
    """Read every dataset of a shard once (the gradient rows verified against their sums, the rest
    by HDF5's checksums): a damaged one raises here."""
    rows.verify(stage)

    def read(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and name != fmt.ROWS_GRAD:
            obj[()]

    f.visititems(read)


def _shard_attrs(f: h5py.File) -> dict[str, Any]:
    return {k: get_attr(f, k) for k in ("run_id", "rank", "shard_index", fmt.SHARD_SEGMENT, fmt.SHARD_FROM_STEP)}


def _read_step_columns(f: h5py.File, sh: ShardFile, run_id: str, dim: int | None
                       ) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray | None], dict[str, Any]]:
    attrs = _shard_attrs(f)
    owner = attrs["run_id"]
    if not owner:
        raise CorruptShardError(
            "has no readable run_id attribute: its metadata is damaged, or it was not written by "
            "influence_hooks. Its rows cannot be trusted; move it out of the run directory.")
    if owner != run_id:
        raise CorruptShardError(
            f"belongs to run {owner}, not to this directory's run {run_id}: a file of another recording. "
            "Move it out of the run directory (or back to its own run).")
    if attrs["rank"] is not None and (attrs["rank"], attrs["shard_index"]) != (sh.rank, sh.index):
        raise CorruptShardError(
            f"says it is shard {attrs['shard_index']} of rank {attrs['rank']}, but its name says shard {sh.index} of "
            f"rank {sh.rank}: it was renamed. Give it back its own name ({fmt.shard_name(attrs['rank'], attrs['shard_index'])}).")
    cols = {name: f[fmt.STEPS][name][()] for name in fmt.STEP_COLUMNS}
    for name in fmt.OPTIONAL_STEP_COLUMNS:
        if name in f[fmt.STEPS]:
            cols[name] = f[fmt.STEPS][name][()]
    qsteps = f[fmt.QUERY_STEP][()]
    qbad = None
    if len(qsteps):
        f[fmt.QUERY_GRAD].shape  # noqa: B018 - touch it, so a broken dataset fails here
        if fmt.QUERY_NONFINITE in f:
            qbad = f[fmt.QUERY_NONFINITE][()]
    shape = f[fmt.ROWS_GRAD].shape
    if dim is not None and len(shape) == 2 and shape[0] and shape[1] != dim:
        raise CorruptShardError(f"its gradient rows have {shape[1]} columns, but the run records {dim}.")
    return cols, (qsteps, qbad), attrs


def _merge_steps(read: list, seg_of: dict[Path, int], from_steps: dict[int, dict[int, int]]
                 ) -> tuple[StepTable, dict[int, list[tuple[ShardFile, int, int]]], list[str]]:
    """One entry per step over every rank's shards; a step's parts on several ranks form its
    global batch. Rows superseded by a resume are left out; a step that one rank holds twice
    without a resume between (which only damaged metadata can cause) keeps its later shard's rows."""
    own: dict[tuple[int, int], tuple[ShardFile, int]] = {}  # (rank, step) -> (shard, position)
    problems = []
    for sh, cols, _q, _attrs in read:
        for j, step in enumerate(cols["step"]):
            step = int(step)
            if superseded(from_steps.get(sh.rank, {}), seg_of[sh.path], step):
                continue
            prev = own.get((sh.rank, step))
            if prev is not None:
                problems.append(f"rank {sh.rank}: step {step} is recorded in both {prev[0].path.name} and "
                                f"{sh.path.name} with no resume between them; the rows of {sh.path.name} are used")
            if prev is None or prev[0].index < sh.index:
                own[(sh.rank, step)] = (sh, j)
    cols_of = {id(sh): cols for sh, cols, _q, _a in read}
    per_step: dict[int, dict[str, Any]] = {}
    step_rows: dict[int, list[tuple[ShardFile, int, int]]] = {}
    for (_rank, step), (sh, j) in sorted(own.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cols = cols_of[id(sh)]
        r0, n = int(cols["row_start"][j]), int(cols["row_count"][j])
        step_rows.setdefault(step, []).append((sh, r0, r0 + n))
        entry = per_step.get(step)
        if entry is None:
            per_step[step] = {**{name: cols[name][j] for name in fmt.STEP_COLUMNS}, "rows": n, "uneven": False,
                              "layer_lr": cols["layer_lr"][j] if "layer_lr" in cols else None,
                              "weighted": n * float(cols["update_weight"][j])}
        else:  # another rank's part of the same step
            entry["uneven"] |= float(cols["update_weight"][j]) != float(entry["update_weight"])
            entry["rows"] += n
            entry["weighted"] += n * float(cols["update_weight"][j])
            entry["batch_size"] += int(cols["batch_size"][j])
            entry["nonfinite"] |= bool(cols["nonfinite"][j])
            entry["skipped"] |= bool(cols["skipped"][j])
    for entry in per_step.values():  # ranks with local batches of other sizes: their rows' mean weight
        if entry["uneven"]:
            entry["update_weight"] = entry["weighted"] / entry["rows"]
    order = sorted(per_step)

    def col(name: str, dt: Any) -> np.ndarray:
        return np.array([per_step[s][name] for s in order], dt)

    table = StepTable(
        steps=np.array(order, np.int64), epochs=col("epoch", np.int64), lrs=col("lr", np.float64),
        batch_sizes=col("batch_size", np.int64), rows=col("rows", np.int64),
        update_weights=col("update_weight", np.float64), micro_batches=col("micro_batches", np.int64),
        nonfinite=col("nonfinite", bool), skipped=col("skipped", bool), losses=col("loss", np.float64),
        uneven=col("uneven", bool), layer_lrs=_layer_lrs([per_step[s]["layer_lr"] for s in order]))
    return table, step_rows, problems


def _layer_lrs(per_step: list[Any]) -> np.ndarray | None:
    """[steps, layers]: Adam's per-layer step sizes (NaN for steps without them), None if no step has them
    (every rank computes the same ones from the same averaged gradients: the first rank's are used)."""
    known = [v for v in per_step if v is not None]
    if not known:
        return None
    out = np.full((len(per_step), len(known[0])), np.nan)
    for i, v in enumerate(per_step):
        if v is not None and len(v) == out.shape[1]:
            out[i] = v
    return out


def _gaps(path: Path, rank_states: dict[int, dict[str, Any]], read: list, skipped: list[tuple[Path, str]],
          seg_of: dict[Path, int], from_steps: dict[int, dict[int, int]],
          param_files: dict[str, dict[int, Path]]) -> list[Gap]:
    """Finished files that are not there: those a rank file lists, or (without a list: format 1,
    or a lost rank file) holes in a rank's shard numbering and steps after its last shard."""
    present = {(sh.rank, sh.index) for sh, *_ in read}
    present |= {p for p in (fmt.parse_shard_name(q.name) for q, _ in skipped) if p}  # reported as unreadable
    spans: dict[tuple[int, int], tuple[int | None, int | None]] = {}
    for sh, cols, _q, _a in read:
        st = cols["step"]
        spans[(sh.rank, sh.index)] = (int(st.min()), int(st.max())) if len(st) else (None, None)
    gaps = []
    ranks = set(rank_states) | {r for r, _ in present}
    for r in sorted(ranks):
        state = rank_states.get(r, {})
        listed = state.get(fmt.RANK_SHARDS)
        if listed is not None:
            for row in listed:
                entry = dict(zip(fmt.RANK_SHARD_COLUMNS, row))
                index, first, last = int(entry["index"]), entry["first_step"], entry["last_step"]
                if (r, index) in present:
                    continue
                if first is not None and superseded(from_steps.get(r, {}), int(entry["segment"]), int(first)):
                    continue  # a resume recorded these steps again
                gaps.append(Gap(r, "shard", fmt.shard_name(r, index), first, last))
        else:
            mine = sorted(i for rr, i in present if rr == r)
            for index in range(max(mine, default=-1) + 1):
                if index in mine:
                    continue
                before = [spans.get((r, i), (None, None))[1] for i in mine if i < index]
                after = [spans.get((r, i), (None, None))[0] for i in mine if i > index]
                lo = max((s for s in before if s is not None), default=None)
                hi = min((s for s in after if s is not None), default=None)
                gaps.append(Gap(r, "shard", fmt.shard_name(r, index), None if lo is None else lo + 1,
                                None if hi is None else hi - 1))
            last = state.get("last_step")
            recorded = [s[1] for (rr, _i), s in spans.items() if rr == r and s[1] is not None]
            if last is not None and (not recorded or int(last) > max(recorded)):
                after = max(recorded, default=-1) + 1
                gaps.append(Gap(r, "shard", f"after {fmt.shard_name(r, max(mine, default=-1))}", after, int(last)))
        on_disk = {p.name for files in param_files.values() for p in files.values()}
        for name in state.get(fmt.RANK_PARAMS, []):
            if name not in on_disk:
                parsed = fmt.parse_param_file_name(name)
                if parsed:
                    gaps.append(Gap(r, parsed[0], name, parsed[2], parsed[2]))
    return gaps


def describe_gaps(gaps: list[Gap]) -> str:
    """One sentence for a list of gaps (for warnings and notes)."""
    shards = [g for g in gaps if g.kind == "shard"]
    params = [g for g in gaps if g.kind != "shard"]
    parts = []
    if shards:
        steps = sorted({s for g in shards if g.first_step is not None
                        for s in range(g.first_step, (g.last_step if g.last_step is not None else g.first_step) + 1)})
        parts.append(f"{len(shards)} finished shard(s) are missing ({', '.join(g.name for g in shards[:4])}"
                     f"{', ...' if len(shards) > 4 else ''}; steps {short_list(steps) if steps else 'unknown'})")
    if params:
        parts.append(f"{len(params)} parameter file(s) are missing (steps {short_list([g.first_step for g in params])})")
    return " and ".join(parts)


def _param_files(path: Path) -> dict[str, dict[int, Path]]:
    files: dict[str, dict[int, Path]] = {k: {} for k in fmt.PARAM_KINDS}
    pdir = path / fmt.PARAM_DIR
    for p in sorted(pdir.iterdir()) if pdir.is_dir() else []:
        parsed = fmt.parse_param_file_name(p.name)
        if parsed:
            kind, _rank, step = parsed
            files[kind][step] = p
    return files
