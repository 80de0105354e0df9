"""Streaming writer of a run directory.

Training threads hand finished steps to `RunWriter`, which queues them (bounded) and lets a
background thread write HDF5 shards. Training waits on disk only when the queue is full. Each shard
is assembled in memory and written under a temporary name, then renamed, so a crash at any moment
leaves every earlier shard whole and readable.
"""

from __future__ import annotations

import errno
import os
import queue
import shutil
import threading
import time
import warnings
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .._version import __version__
from ..errors import ConfigurationError, NonFiniteGradientError, RunDirectoryError, StorageError
from . import format as fmt
from .jsonio import read_json, write_json_atomic


@dataclass
class StepRecord:
    """Everything recorded for one optimizer step of one rank.

    grads: [B, K] per-sample projected gradients g_t(i) (not divided by the batch size), on any
    device; `ready` is an optional CUDA event the writer waits on before reading them.
    update_weight: the factor w_t such that the step's update is -lr * w_t * sum_i g_t(i)
    (1/|B_t| for a mean-reduced loss, 1 for a sum). finite / skipped may be device tensors; the
    writer thread reads them after `ready`, so the training thread never waits for them.
    """

    step: int
    epoch: int
    lr: float
    lr_groups: list[float]
    batch_size: int
    update_weight: float
    micro_batches: int
    sample_ids: np.ndarray
    grads: torch.Tensor
    finite: torch.Tensor | None = None
    skipped: Any = None  # the optimizer did not apply this step (an AMP GradScaler found inf/NaN)
    loss: float = float("nan")
    ready: Any = None


@dataclass(frozen=True)
class WriterOptions:
    """How a rank's writer stores its shards (the recording options declare these once, here)."""

    steps_per_shard: int = 256
    max_shard_mb: float = 256.0
    queue_size: int = 32
    on_nonfinite: str = "warn"

    def __post_init__(self) -> None:
        if self.steps_per_shard < 1 or self.queue_size < 1 or self.max_shard_mb <= 0:
            raise ConfigurationError("steps_per_shard, queue_size and max_shard_mb must be positive")
        if self.on_nonfinite not in ("warn", "raise"):
            raise ConfigurationError(f"on_nonfinite must be 'warn' or 'raise', got {self.on_nonfinite!r}")


@dataclass
class _ShardBuffer:
    index: int
    steps: list[StepRecord] = field(default_factory=list)
    query_steps: list[int] = field(default_factory=list)
    query_grads: list[np.ndarray] = field(default_factory=list)
    nbytes: int = 0


_STOP = object()

# Steps reach the writer thread in batches: waking it for every step costs a fast training step
# (a few ms on a CPU) about 0.1 ms. A batch is handed over once it holds HANDOFF_STEPS steps or
# its first step is HANDOFF_SECONDS old (so slow steps go one by one), and before anything else.
HANDOFF_STEPS = 16
HANDOFF_SECONDS = 0.05


class RunWriter:
    """Writes one rank's part of a run directory on a background thread.

    Create with `RunWriter.create(...)` for a new run or `RunWriter.resume(...)` to continue one.
    Errors raised on the writer thread (a full disk, say) are re-raised on the training thread at
    the next call, as StorageError, naming what was written and where.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], rank: int, rank_state: dict[str, Any],
                 next_shard: int, options: WriterOptions):
        self.path = path
        self.manifest = manifest
        self.rank = rank
        self._rank_state = rank_state
        storage_dtype = manifest["storage_dtype"]
        if storage_dtype not in fmt.STORAGE_DTYPES:
            raise ConfigurationError(
                f"storage dtype must be one of {fmt.STORAGE_DTYPES}, got {storage_dtype!r}")
        self._np_dtype = np.dtype(storage_dtype)
        self._torch_dtype = getattr(torch, storage_dtype)
        self._steps_per_shard = options.steps_per_shard
        self._max_shard_bytes = int(options.max_shard_mb * 2**20)
        self._on_nonfinite = options.on_nonfinite
        self._buffer = _ShardBuffer(next_shard)
        # what waits for the writer, the batch not yet handed over included, is bounded by
        # queue_size slots (a step, a query block or a parameter file takes one), not by the
        # queue, whose items are batches of steps
        self._queue: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(options.queue_size)
        self._handoff_steps = min(HANDOFF_STEPS, options.queue_size)
        self._pending: list[StepRecord] = []
        self._pending_since = 0.0
        self._error: BaseException | None = None
        self._bytes_written = 0
        self._shards_written = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="influence-hooks-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, path: str | os.PathLike, manifest: dict[str, Any], *, rank: int = 0,
               overwrite: bool = False, options: WriterOptions = WriterOptions()) -> "RunWriter":
        """Start a new run in `path`. Refuses a directory that already holds a run unless overwrite."""
        path = Path(path)
        mpath = path / fmt.MANIFEST
        if rank != 0:  # other ranks join the run of rank 0: same run_id, nothing is replaced
            if not manifest.get("run_id"):
                raise ConfigurationError(f"rank {rank} joins the run of rank 0: pass its run_id in the manifest.")
            other = _safe_manifest(mpath).get("run_id") if mpath.exists() else None
            if other not in (None, manifest["run_id"]):
                raise RunDirectoryError(f"rank {rank}: {path} holds run {other}, not {manifest['run_id']}.")
        else:
            cls.check_new_run_dir(path, overwrite=overwrite, rank=rank)
        if mpath.exists() and rank == 0:
            for sub in (fmt.SHARD_DIR, fmt.PARAM_DIR):
                shutil.rmtree(path / sub, ignore_errors=True)
            for f in path.glob("rank-*.json"):
                f.unlink()
            mpath.unlink()
        (path / fmt.SHARD_DIR).mkdir(parents=True, exist_ok=True)
        (path / fmt.PARAM_DIR).mkdir(parents=True, exist_ok=True)
        manifest = dict(manifest)
        manifest.update(format=fmt.FORMAT_NAME, format_version=fmt.FORMAT_VERSION,
                        library_version=__version__, run_id=manifest.get("run_id") or uuid.uuid4().hex,
                        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        if rank == 0:
            write_json_atomic(mpath, manifest)
        state = {"rank": rank, "segments": [{"from_step": 0, "first_shard": 0}], "complete": False,
                 "last_step": None, "final_step": None}
        write_json_atomic(path / fmt.rank_file_name(rank), state)
        return cls(path, manifest, rank, state, 0, options)

    @staticmethod
    def check_new_run_dir(path: str | os.PathLike, *, overwrite: bool = False, rank: int = 0) -> None:
        """Raise RunDirectoryError unless a new run may be started in `path`."""
        path = Path(path)
        mpath = path / fmt.MANIFEST
        if overwrite:
            return
        if mpath.exists():
            old = _safe_manifest(mpath)
            raise RunDirectoryError(
                f"{path} already holds a run (run_id {old.get('run_id', '?')}, "
                f"{old.get('created', 'unknown date')}). Choose a new directory, pass "
                "overwrite=True to replace it, or resume training from one of its checkpoints.")
        if path.exists() and rank == 0 and any(p.name not in ("shards", "params") for p in path.iterdir()):
            stray = sorted(p.name for p in path.iterdir())[:5]
            raise RunDirectoryError(
                f"{path} is not empty ({', '.join(stray)}, ...) and holds no influence_hooks run. "
                "Pick an empty or new directory, or pass overwrite=True.")

    @staticmethod
    def check_resume(path: str | os.PathLike, run_id: str, manifest: dict[str, Any]) -> None:
        """Raise unless `manifest` (what would be recorded now) continues run `run_id` in `path`:
        same layers, projection, dimension, storage dtype and loss reduction. Changes nothing."""
        old = _manifest_of_run(Path(path), run_id)
        keys = ("dim", "projection_fingerprint", "storage_dtype", "loss_reduction", "world_size")
        changed = [k for k in keys if old.get(k) != manifest.get(k)]
        if changed:
            diff = ", ".join(f"{k}: recorded {old.get(k)!r}, now {manifest.get(k)!r}" for k in changed)
            raise ConfigurationError(
                f"cannot resume run {run_id} in {path}: the recording settings changed ({diff}). "
                "Resume with the same layers, projection, seed, storage_dtype, loss_reduction and number of "
                "processes (world_size), or record into a new directory.")

    @classmethod
    def resume(cls, path: str | os.PathLike, run_id: str, from_step: int, *, rank: int = 0,
               options: WriterOptions = WriterOptions()) -> "RunWriter":
        """Continue run `run_id` in `path` from optimizer step `from_step` (a checkpoint's step).

        Rows of steps >= from_step in earlier shards are superseded: the reader drops them, so a
        resumed run has neither duplicated nor missing steps.
        """
        path = Path(path)
        manifest = _manifest_of_run(path, run_id)
        existing = [fmt.parse_shard_name(p.name) for p in (path / fmt.SHARD_DIR).iterdir()]
        next_shard = 1 + max((i for r, i in filter(None, existing) if r == rank), default=-1)
        rpath = path / fmt.rank_file_name(rank)
        state = read_json(rpath) if rpath.exists() else {"rank": rank, "segments": []}
        state["segments"].append({"from_step": int(from_step), "first_shard": next_shard})
        state.update(complete=False, final_step=None)
        write_json_atomic(rpath, state)
        for sub in (fmt.SHARD_DIR, fmt.PARAM_DIR):
            for tmp in (path / sub).glob(f"*{fmt.TMP_SUFFIX}"):
                tmp.unlink()  # half-written leftovers of the crashed run
        for p in (path / fmt.PARAM_DIR).iterdir():
            parsed = fmt.parse_param_file_name(p.name)
            if parsed and parsed[1] == rank and parsed[2] >= from_step:
                p.unlink()  # w_t of steps the resumed run records again
        return cls(path, manifest, rank, state, next_shard, options)

    # ------------------------------------------------------------------ training-thread API
    def write_step(self, record: StepRecord) -> None:
        self._raise_pending()
        if self._closed:
            raise StorageError(f"the writer of {self.path} is closed; nothing more can be recorded.")
        self._take_slot()
        if not self._pending:
            self._pending_since = time.perf_counter()
        self._pending.append(record)
        if (len(self._pending) >= self._handoff_steps
                or time.perf_counter() - self._pending_since >= HANDOFF_SECONDS):
            self._hand_off()

    def write_queries(self, step: int, grads: torch.Tensor, ready: Any = None) -> None:
        """Query gradients u_q(step), [Q, K], at the parameters w_step (before the update)."""
        self._hand_off()
        self._take_slot()
        self._put(("query", int(step), grads, ready))

    def write_params(self, kind: str, step: int, params: dict[str, torch.Tensor],
                     optim_state: dict[str, dict[str, torch.Tensor]] | None = None,
                     attrs: dict[str, Any] | None = None) -> None:
        """A parameter file of `kind` ('snapshot' or 'checkpoint') holding w_step."""
        if kind not in fmt.PARAM_KINDS:
            raise ConfigurationError(f"parameter file kind must be one of {fmt.PARAM_KINDS}, got {kind!r}")
        params = {k: _snapshot(v) for k, v in params.items()}
        optim = {p: {k: _snapshot(v) for k, v in st.items()} for p, st in (optim_state or {}).items()}
        ready = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # the copies were queued before the optimizer's update on the same stream, so they
            # read w_t; the writer waits for them instead of the training thread
            ready = torch.cuda.Event()
            ready.record()
        self._hand_off()
        self._take_slot()
        self._put(("params", kind, int(step), params, optim, dict(attrs or {}), ready))

    def flush(self) -> None:
        """Block until everything queued is on disk as finished shards."""
        done = threading.Event()
        self._hand_off()
        self._put(("flush", done))
        while not done.wait(0.1):
            self._raise_pending()
            if not self._thread.is_alive():
                break
        self._raise_pending()

    def close(self, *, final_step: int | None = None, complete: bool = True) -> None:
        """Flush, stop the thread and mark this rank complete (or not, after a failure)."""
        if self._closed:
            return
        try:
            try:
                self.flush()
            except NonFiniteGradientError:
                # the steps before the bad one are still buffered: write them, then report
                self.flush()
                raise
        finally:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
        if complete:
            self._rank_state.update(complete=True, final_step=final_step)
            write_json_atomic(self.path / fmt.rank_file_name(self.rank), self._rank_state)

    def abort(self) -> None:
        """Stop without finishing the open shard (used when training itself failed)."""
        if not self._closed:
            self._closed = True
            self._pending = []  # the open shard is abandoned anyway
            self._queue.put(_STOP)
            self._thread.join(timeout=60)

    # ------------------------------------------------------------------ internals
    def _put(self, item: Any) -> None:
        self._raise_pending()
        if self._closed:
            raise StorageError(f"the writer of {self.path} is closed; nothing more can be recorded.")
        self._queue.put(item)

    def _take_slot(self) -> None:
        """Wait until fewer than queue_size things wait for the writer (handing over the pending
        batch first, so that the writer can free slots)."""
        if self._slots.acquire(blocking=False):
            return
        self._hand_off()
        while not self._slots.acquire(timeout=0.5):
            self._raise_pending()

    def _hand_off(self) -> None:
        if self._pending:
            batch, self._pending = self._pending, []
            self._queue.put(("steps", batch))

    def _raise_pending(self) -> None:
        err = self._error
        if err is None:
            return
        self._error = None
        if isinstance(err, (NonFiniteGradientError, StorageError)):
            raise err
        raise StorageError(
            f"recording to {self.path} failed on the writer thread: {err!r}. "
            f"{self._shards_written} finished shard(s), {self._bytes_written / 2**20:.1f} MiB, stay "
            "readable there.") from err

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                if self._error is None:  # after a failure, drop work but keep unblocking the producer
                    self._handle(item)
            except BaseException as e:  # noqa: BLE001 - re-raised on the training thread
                self._error = self._describe(e)
            finally:
                if item[0] == "flush":
                    item[1].set()
                slots = len(item[1]) if item[0] == "steps" else int(item[0] != "flush")
                if slots:
                    self._slots.release(slots)

    def _describe(self, e: BaseException) -> BaseException:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return StorageError(
                f"disk full while writing {self.path}: {self._shards_written} shard(s), "
                f"{self._bytes_written / 2**20:.1f} MiB were written and stay readable in "
                f"{self.path / fmt.SHARD_DIR}. Free space (or record fewer layers / a smaller "
                "projection / float16 storage) and resume from the last checkpoint.")
        return e

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "steps":
            for rec in item[1]:
                self._write_step(rec)
        elif kind == "query":
            _, step, grads, ready = item
            _wait(ready)
            arr = grads.to(self._torch_dtype).cpu().numpy()
            self._buffer.query_steps.append(step)
            self._buffer.query_grads.append(arr)
            self._buffer.nbytes += arr.nbytes
        elif kind == "params":
            self._write_params(*item[1:])
        elif kind == "flush":
            self._finish_shard()
            item[1].set()

    def _write_step(self, rec: StepRecord) -> None:
        _wait(rec.ready)
        host = rec.grads.to(self._torch_dtype).cpu()
        finite = bool(rec.finite) if rec.finite is not None else _all_finite(host)
        grads = host.numpy()
        if not finite:
            if self._on_nonfinite == "raise":
                raise NonFiniteGradientError(
                    f"step {rec.step}: recorded per-sample gradients contain NaN/inf (or exceed "
                    f"the range of {self._np_dtype} storage: float16 overflows above 65504; "
                    "storage_dtype='float32' avoids that). Every "
                    f"earlier step is saved in {self.path}. Pass on_nonfinite='warn' to record "
                    "and flag such steps instead (aggregators skip flagged steps).")
            warnings.warn(f"step {rec.step}: per-sample gradients contain NaN/inf (or overflow "
                          f"{self._np_dtype} storage); the step is flagged in the run and skipped "
                          "by aggregators.", RuntimeWarning)
        rec.grads, rec.finite = grads, torch.tensor(finite)
        rec.skipped = bool(rec.skipped) if rec.skipped is not None else False
        rec.sample_ids = np.asarray(rec.sample_ids, np.int64)
        buf = self._buffer
        buf.steps.append(rec)
        buf.nbytes += grads.nbytes
        if len(buf.steps) >= self._steps_per_shard or buf.nbytes >= self._max_shard_bytes:
            self._finish_shard()

    def _finish_shard(self) -> None:
        buf = self._buffer
        if not buf.steps and not buf.query_steps:
            return
        final = self.path / fmt.SHARD_DIR / fmt.shard_name(self.rank, buf.index)
        tmp = final.with_name(final.name + fmt.TMP_SUFFIX)
        try:
            with h5py.File(tmp, "w") as f:
                self._fill_shard(f, buf)
            _fsync(tmp)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._bytes_written += final.stat().st_size
        self._shards_written += 1
        last = max((r.step for r in buf.steps), default=None)
        if last is not None:
            self._rank_state["last_step"] = max(last, self._rank_state.get("last_step") or -1)
        write_json_atomic(self.path / fmt.rank_file_name(self.rank), self._rank_state)
        self._buffer = _ShardBuffer(buf.index + 1)

    def _fill_shard(self, f: h5py.File, buf: _ShardBuffer) -> None:
        f.attrs.update(format=fmt.FORMAT_NAME, format_version=fmt.FORMAT_VERSION,
                       run_id=self.manifest["run_id"], rank=self.rank, shard_index=buf.index)
        k = int(self.manifest["dim"])
        counts = np.array([len(r.sample_ids) for r in buf.steps], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(counts) else counts
        grads = (np.concatenate([r.grads for r in buf.steps]) if buf.steps
                 else np.zeros((0, k), self._np_dtype))
        n_groups = max((len(r.lr_groups) for r in buf.steps), default=1)
        lr_groups = np.full((len(buf.steps), n_groups), np.nan)
        for j, r in enumerate(buf.steps):
            lr_groups[j, :len(r.lr_groups)] = r.lr_groups
        f.create_dataset(fmt.ROWS_GRAD, data=grads, chunks=(max(1, min(len(grads), 4096 * 64 // max(k, 1))), k)
                         if len(grads) else None)
        f.create_dataset(fmt.ROWS_STEP, data=np.repeat([r.step for r in buf.steps], counts).astype(np.int64))
        f.create_dataset(fmt.ROWS_SAMPLE_ID, data=np.concatenate(
            [np.asarray(r.sample_ids, np.int64) for r in buf.steps]) if buf.steps else np.zeros(0, np.int64))
        cols = {
            "step": np.array([r.step for r in buf.steps], np.int64),
            "epoch": np.array([r.epoch for r in buf.steps], np.int64),
            "lr": np.array([r.lr for r in buf.steps], np.float64),
            "lr_groups": lr_groups,
            "batch_size": np.array([r.batch_size for r in buf.steps], np.int64),
            "update_weight": np.array([r.update_weight for r in buf.steps], np.float64),
            "micro_batches": np.array([r.micro_batches for r in buf.steps], np.int64),
            "row_start": starts,
            "row_count": counts,
            "nonfinite": np.array([not bool(r.finite) for r in buf.steps], bool),
            "skipped": np.array([r.skipped for r in buf.steps], bool),
            "loss": np.array([r.loss for r in buf.steps], np.float64),
        }
        g = f.create_group(fmt.STEPS)
        for name in fmt.STEP_COLUMNS:
            g.create_dataset(name, data=cols[name])
        qsteps = np.array(buf.query_steps, np.int64)
        f.create_dataset(fmt.QUERY_STEP, data=qsteps)
        if buf.query_grads:
            f.create_dataset(fmt.QUERY_GRAD, data=np.stack(buf.query_grads))

    def _write_params(self, kind: str, step: int, params: dict[str, torch.Tensor],
                      optim: dict[str, dict[str, torch.Tensor]], attrs: dict[str, Any], ready: Any) -> None:
        _wait(ready)
        final = self.path / fmt.PARAM_DIR / fmt.param_file_name(kind, self.rank, step)
        tmp = final.with_name(final.name + fmt.TMP_SUFFIX)
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs.update(format=fmt.FORMAT_NAME, run_id=self.manifest["run_id"], kind=kind,
                               step=step, rank=self.rank, **attrs)
                g = f.create_group(fmt.PARAMS_GROUP)
                for name, t in params.items():
                    g.create_dataset(name, data=_to_numpy(t))
                for pname, state in optim.items():
                    og = f.require_group(f"{fmt.OPTIM_GROUP}/{pname}")
                    for key, t in state.items():
                        og.create_dataset(key, data=_to_numpy(t))
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self._bytes_written += final.stat().st_size


def _snapshot(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a parameter as it is now: asynchronous into pinned memory from a GPU."""
    t = t.detach()
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host
    return t.to("cpu", copy=True)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        t = t.float()  # numpy has no bfloat16; the loader casts back to the model's dtype
    return t.numpy()


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value of `t` is finite. A NaN or inf makes the sum non-finite, so a finite sum
    settles it in one vectorised pass (several times cheaper than an element-wise test); only a
    non-finite sum, which might be an overflow of the sum alone, is checked element by element."""
    acc = torch.float32 if t.element_size() <= 2 else torch.float64  # float16 rows cannot overflow it
    return bool(torch.isfinite(t.sum(dtype=acc))) or bool(torch.isfinite(t).all())


def _wait(event: Any) -> None:
    if event is not None:
        event.synchronize()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _manifest_of_run(path: Path, run_id: str) -> dict[str, Any]:
    """The manifest of run `run_id` in `path`; RunDirectoryError if the directory holds another."""
    mpath = path / fmt.MANIFEST
    if not mpath.exists():
        raise RunDirectoryError(f"cannot resume: {path} holds no run (no {fmt.MANIFEST}).")
    manifest = read_json(mpath)
    if manifest.get("run_id") != run_id:
        raise RunDirectoryError(
            f"cannot resume: {path} holds run {manifest.get('run_id')}, but the checkpoint belongs to "
            f"run {run_id}. Point the callback at the checkpoint's run directory.")
    return manifest


def _safe_manifest(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return {}
