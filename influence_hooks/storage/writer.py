"""Streaming writer of a run directory.

Training threads hand finished steps to `RunWriter`, which queues them (bounded) and lets a
background thread write HDF5 shards. Training waits on disk only when the queue is full. Each file
is built completely in memory and written under a temporary name, then renamed (`files`), so a
crash at any moment leaves every earlier shard whole and readable, and a full disk is a
StorageError, never a crash inside HDF5. A writer holds its rank's `RunLock` from creation to close.
"""

from __future__ import annotations

import errno
import os
import queue
import shutil
import threading
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .._version import __version__
from ..errors import (ConfigurationError, NonFiniteGradientError, RunDirectoryError, SampleIdError, StorageError,
                      short_list)
from . import format as fmt
from .files import (MemoryFile, all_finite, check_free_space, finite_rows, h5_image, set_attrs, to_stored,
                    writable_target, write_array, write_atomic, write_checked_rows)
from .index import finished_shards, read_manifest, rebuild_rank_state
from .jsonio import read_json, write_json_atomic
from .lock import RunLock


@dataclass
class StepRecord:
    """Everything recorded for one optimizer step of one rank.

    grads: [B, K] per-sample projected gradients g_t(i) (not divided by the batch size), on any
    device; `ready` is an optional CUDA event the writer waits on before reading them.
    update_weight: the factor w_t such that the step's update is -lr * w_t * sum_i g_t(i)
    (1/|B_t| for a mean-reduced loss, 1 for a sum). finite / skipped may be device tensors; the
    writer thread reads them after `ready`, so the training thread never waits for them.
    Once handed to `RunWriter.write_step` a record belongs to the writer thread, which moves the
    rows into its shard (grads becomes None) and normalises other fields: read nothing from it
    afterwards.
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
    layer_lr: Any = None  # [L]: Adam's step size per recorded layer (record.optim.adam_step_sizes), or None
    ids_checked: bool = False  # check_sample_ids already ran on the training thread (host ids)


@dataclass(frozen=True)
class WriterOptions:
    """How a rank's writer stores its shards (the recording options declare these once, here)."""

    steps_per_shard: int = 256
    max_shard_mb: float = 256.0
    queue_size: int = 32
    on_nonfinite: str = "warn"
    allow_repeated_ids: bool = False

    def __post_init__(self) -> None:
        if self.steps_per_shard < 1 or self.queue_size < 1 or self.max_shard_mb <= 0:
            raise ConfigurationError("steps_per_shard, queue_size and max_shard_mb must be positive")
        if self.on_nonfinite not in ("warn", "raise"):
            raise ConfigurationError(f"on_nonfinite must be 'warn' or 'raise', got {self.on_nonfinite!r}")


# Up to this many ids (a step's batch, typically), a Python set checks them faster than a sort:
# in the training step, right after the backward pass, 30 us against 110 us for 64 ids.
SMALL_ID_CHECK = 128


def check_sample_ids(ids: np.ndarray, step: int, *, allow_repeated: bool = False) -> None:
    """SampleIdError unless the ids of one step are dataset indices: >= 0 and, unless
    allow_repeated, each at most once (a repeat means the ids do not match the batch, unless the
    sampler draws with replacement)."""
    ids = np.asarray(ids)
    if not len(ids):
        return
    if ids.ndim == 1 and len(ids) <= SMALL_ID_CHECK:  # ids that fail go on below, for the details
        values = ids.tolist()
        if min(values) >= 0 and (allow_repeated or len(set(values)) == len(values)):
            return
    ordered = np.sort(ids)  # its first entry is the smallest: one pass answers both questions
    if ordered[0] < 0:
        raise SampleIdError(f"step {step}: negative sample ids {short_list(np.unique(ids[ids < 0]))}; sample ids "
                            "must be dataset indices (>= 0). Check what begin_micro_batch / sample_ids= receives.")
    if not allow_repeated and (ordered[1:] == ordered[:-1]).any():  # a sort and a compare: np.unique costs ~10x more
        uniq, counts = np.unique(ids, return_counts=True)
        raise SampleIdError(
            f"step {step}: sample ids {short_list(uniq[counts > 1])} occur more than once in one step. Either "
            "the ids do not match the batch (check begin_micro_batch / sample_ids=), or the sampler draws "
            "with replacement: then pass allow_repeated_ids=True, and each occurrence counts as a row.")


@dataclass
class _ShardBuffer:
    index: int
    steps: list[StepRecord] = field(default_factory=list)
    query_steps: list[int] = field(default_factory=list)
    query_grads: list[np.ndarray] = field(default_factory=list)
    query_nonfinite: list[np.ndarray] = field(default_factory=list)
    nbytes: int = 0
    n_rows: int = 0  # the steps' gradient rows are the first n_rows of the writer's row store


_STOP = object()
IMAGE_SLACK = 1 << 20  # bytes reserved for a file's HDF5 metadata beyond its arrays

# Steps reach the writer thread in batches: waking it for every step costs a fast training step
# (a few ms on a CPU) about 0.1 ms. A batch is handed over once it holds HANDOFF_STEPS steps, its
# first step is HANDOFF_SECONDS old, it completes a shard, or the step came HANDOFF_SECONDS or
# more after the one before (slow steps go one by one); and before anything else.
HANDOFF_STEPS = 16
HANDOFF_SECONDS = 0.05


class RunWriter:
    """Writes one rank's part of a run directory on a background thread.

    Create with `RunWriter.create(...)` for a new run or `RunWriter.resume(...)` to continue one;
    either takes the rank's lock on the directory, which close() and abort() release (and the
    kernel, if the process dies). Errors raised on the writer thread (a full disk, say) are
    re-raised on the training thread at the next call, as StorageError, naming what was written
    and where.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], rank: int, rank_state: dict[str, Any],
                 next_shard: int, options: WriterOptions, lock: RunLock | None = None):
        self.path = path
        self.manifest = manifest
        self.rank = rank
        self._rank_state = rank_state
        self._lock = lock
        segment = rank_state["segments"][-1]
        self._segment, self._from_step = int(segment["segment"]), int(segment["from_step"])
        storage_dtype = manifest["storage_dtype"]
        if storage_dtype not in fmt.STORAGE_DTYPES:
            raise ConfigurationError(
                f"storage dtype must be one of {fmt.STORAGE_DTYPES}, got {storage_dtype!r}")
        self._storage_dtype = storage_dtype
        self._np_dtype = np.dtype(fmt.RAW_BITS.get(storage_dtype, storage_dtype))  # what the arrays hold
        self._steps_per_shard = options.steps_per_shard
        self._max_shard_bytes = int(options.max_shard_mb * 2**20)
        self._on_nonfinite = options.on_nonfinite
        self._allow_repeated_ids = options.allow_repeated_ids
        self._query_ids = np.asarray((manifest.get("queries") or {}).get("ids", []), np.int64)
        self._warned_query_nonfinite = False
        self._buffer = _ShardBuffer(next_shard)
        # the open shard's gradient rows, and the image of the shard file being written (its
        # metadata: the rows are written from the row store): both kept from shard to shard, so
        # that only the first shard's memory is freshly allocated (a page fault per 4 KiB, which
        # was most of the CPU time of writing a shard)
        self._rows = np.empty((0, int(manifest["dim"])), self._np_dtype)
        self._image = MemoryFile()
        # what waits for the writer, the batch not yet handed over included, is bounded by
        # queue_size slots (a step, a query block or a parameter file takes one), not by the
        # queue, whose items are batches of steps
        self._queue: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(options.queue_size)
        self._handoff_steps = min(HANDOFF_STEPS, options.queue_size)
        self._pending: list[StepRecord] = []
        self._pending_since = self._last_step_at = 0.0
        # the writer's shard edges, mirrored here, so that the step that completes a shard is handed
        # over at once and the shard is written (what a crash can lose stays the open shard)
        self._edge_steps = self._edge_bytes = 0
        self._error: BaseException | None = None
        self._bytes_written = 0
        self._shards_written = 0
        self.cpu_seconds = 0.0  # CPU time of the writer thread (its own work: shards, checks, files)
        self._waited_cpu = 0.0  # CPU time spent waiting for a GPU, left out of cpu_seconds
        self.shard_cpu_seconds = 0.0  # the part of cpu_seconds spent building and writing shard files
        self._params_written = 0
        self._writing = ""  # the file being written, for error messages
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="influence-hooks-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, path: str | os.PathLike, manifest: dict[str, Any], *, rank: int = 0,
               overwrite: bool = False, options: WriterOptions = WriterOptions()) -> "RunWriter":
        """Start a new run in `path`. Refuses a directory that already holds a run with recorded
        data, or stray shards without a manifest, unless overwrite (which deletes the library's
        own files there, nothing else). A run that recorded nothing is replaced without asking."""
        path = Path(path)
        lock = RunLock.acquire(path, rank)
        try:
            mpath = path / fmt.MANIFEST
            if rank != 0:  # other ranks join the run of rank 0: same run_id, nothing is replaced
                if not manifest.get("run_id"):
                    raise ConfigurationError(f"rank {rank} joins the run of rank 0: pass its run_id in the manifest.")
                other = _safe_manifest(mpath).get("run_id") if mpath.exists() else None
                if other not in (None, manifest["run_id"]):
                    raise RunDirectoryError(f"rank {rank}: {path} holds run {other}, not {manifest['run_id']}.")
            else:
                cls._check_contents(path, overwrite=overwrite)
                _remove_run_files(path)
            manifest = dict(manifest)
            manifest.update(format=fmt.FORMAT_NAME, format_version=fmt.FORMAT_VERSION,
                            library_version=__version__, run_id=manifest.get("run_id") or uuid.uuid4().hex,
                            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            problem = fmt.manifest_problem(manifest)
            if problem:
                raise ConfigurationError(f"the manifest to record is invalid: {problem}")
            try:
                (path / fmt.SHARD_DIR).mkdir(parents=True, exist_ok=True)
                (path / fmt.PARAM_DIR).mkdir(parents=True, exist_ok=True)
                if rank == 0:
                    write_json_atomic(mpath, manifest)
                state = {"rank": rank, "segments": [{"segment": 0, "from_step": 0, "first_shard": 0}],
                         "complete": False, "last_step": None, "final_step": None, fmt.RANK_SHARDS: [],
                         fmt.RANK_PARAMS: []}
                write_json_atomic(path / fmt.rank_file_name(rank), state)
            except OSError as e:
                raise _start_error(path, e) from e
            return cls(path, manifest, rank, state, 0, options, lock)
        except BaseException:
            lock.release()
            raise

    @classmethod
    def check_new_run_dir(cls, path: str | os.PathLike, *, overwrite: bool = False, rank: int = 0) -> None:
        """Raise RunDirectoryError unless a new run may be started in `path` now: no other
        recording holds it, and it holds no recorded data (unless overwrite). Takes nothing."""
        path = Path(path)
        cls.check_writable(path)
        RunLock.check_free(path, rank)
        if rank == 0:
            cls._check_contents(path, overwrite=overwrite)

    @staticmethod
    def check_writable(path: str | os.PathLike) -> None:
        """RunDirectoryError unless `path`, or the directory it would be created in, is writable."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunDirectoryError(f"cannot record into {path}: it is a file, not a directory.")
        why = writable_target(path)
        if why:
            raise RunDirectoryError(f"cannot record into {path}: {why}. Choose a directory you can write to.")

    @staticmethod
    def _check_contents(path: Path, *, overwrite: bool) -> None:
        if overwrite or not path.exists():
            return
        mpath = path / fmt.MANIFEST
        recorded = _recorded_files(path)
        if mpath.exists():
            if not recorded:
                return  # a run that failed before finishing anything: nothing to lose
            old = _safe_manifest(mpath)
            raise RunDirectoryError(
                f"{path} already holds a run (run_id {old.get('run_id', '?')}, "
                f"{old.get('created', 'unknown date')}, {len(recorded)} finished file(s)). Choose a new "
                "directory, pass overwrite=True to replace it, or resume training from one of its checkpoints.")
        if recorded:
            names = ", ".join(p.name for p in recorded[:3])
            raise RunDirectoryError(
                f"{path} holds {len(recorded)} shard or parameter file(s) of an earlier run ({names}, ...) but no "
                f"{fmt.MANIFEST}, so they cannot be read, and a new run would mix with them. Move them out of "
                f"{path / fmt.SHARD_DIR} and {path / fmt.PARAM_DIR}, or pass overwrite=True to delete them.")
        others = [p.name for p in path.iterdir()
                  if p.name not in (fmt.SHARD_DIR, fmt.PARAM_DIR) and not fmt.is_lock_file_name(p.name)]
        if others:
            raise RunDirectoryError(
                f"{path} is not empty ({', '.join(sorted(others)[:5])}, ...) and holds no influence_hooks run. "
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

        Opens a new segment: rows of steps >= from_step in earlier segments' shards are superseded.
        The reader drops them, so a resumed run has neither duplicated nor missing steps; each shard
        names its segment and that segment's from_step, so this holds even without the rank file.
        """
        path = Path(path)
        lock = RunLock.acquire(path, rank)
        try:
            manifest = _manifest_of_run(path, run_id)
            state = rebuild_rank_state(path, rank, run_id)  # the rank file, or what the shards say
            mine = [sh.index for sh in finished_shards(path) if sh.rank == rank]
            next_shard = 1 + max(mine, default=-1)
            segment = 1 + max((int(s["segment"]) for s in state["segments"]), default=-1)
            state["segments"].append({"segment": segment, "from_step": int(from_step), "first_shard": next_shard})
            state.update(complete=False, final_step=None)
            for sub in (fmt.SHARD_DIR, fmt.PARAM_DIR):
                for tmp in (path / sub).glob(f"*{fmt.TMP_SUFFIX}"):
                    tmp.unlink()  # half-written leftovers of the crashed run
            for p in (path / fmt.PARAM_DIR).iterdir():
                parsed = fmt.parse_param_file_name(p.name)
                if parsed and parsed[1] == rank and parsed[2] >= from_step:
                    p.unlink()  # w_t of steps the resumed run records again
            state[fmt.RANK_PARAMS] = [n for n in state[fmt.RANK_PARAMS] if (path / fmt.PARAM_DIR / n).exists()]
            try:
                write_json_atomic(path / fmt.rank_file_name(rank), state)
            except OSError as e:
                raise _start_error(path, e) from e
            return cls(path, manifest, rank, state, next_shard, options, lock)
        except BaseException:
            lock.release()
            raise

    # ------------------------------------------------------------------ training-thread API
    def write_step(self, record: StepRecord) -> None:
        self._raise_pending()
        if self._closed:
            raise StorageError(f"the writer of {self.path} is closed; nothing more can be recorded.")
        self._take_slot()
        now = time.perf_counter()
        slow = now - self._last_step_at >= HANDOFF_SECONDS  # slow steps go one by one
        self._last_step_at = now
        if not self._pending:
            self._pending_since = now
        self._pending.append(record)
        self._edge_steps += 1
        self._edge_bytes += record.grads.nelement() * self._np_dtype.itemsize
        edge = self._edge_steps >= self._steps_per_shard or self._edge_bytes >= self._max_shard_bytes
        if edge:
            self._edge_steps = self._edge_bytes = 0
        if (edge or slow or len(self._pending) >= self._handoff_steps
                or now - self._pending_since >= HANDOFF_SECONDS):
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
        self._edge_steps = self._edge_bytes = 0  # the writer finishes its open shard
        self._wait_for_writer("flush")

    def drain(self) -> None:
        """Block until the writer thread has taken in everything handed to it so far (checked and
        buffered each step); the open shard stays open and unwritten (unlike `flush`)."""
        self._wait_for_writer("drain")

    def _wait_for_writer(self, kind: str) -> None:
        done = threading.Event()
        self._hand_off()
        self._put((kind, done))
        while not done.wait(0.1):
            self._raise_pending()
            if not self._thread.is_alive():
                break
        self._raise_pending()

    def close(self, *, final_step: int | None = None, complete: bool = True) -> None:
        """Flush, stop the thread, mark this rank complete (or not, after a failure) and release
        the directory."""
        if self._closed:
            return
        flushed = False
        try:
            try:
                self.flush()
            except (NonFiniteGradientError, SampleIdError, ConfigurationError):
                # the steps before the bad one are still buffered: write them, then report
                self.flush()
                raise
            flushed = True
        finally:
            self._closed = True
            self._queue.put(_STOP)
            self._thread.join()
            rpath = self.path / fmt.rank_file_name(self.rank)
            try:
                if complete and flushed:
                    self._rank_state.update(complete=True, final_step=final_step)
                    try:
                        write_json_atomic(rpath, self._rank_state)
                    except OSError as e:
                        raise self._describe(e) from e
                else:  # keep the list of finished files current; a failure here loses nothing
                    try:
                        write_json_atomic(rpath, self._rank_state)
                    except OSError:
                        pass
            finally:
                self._release()

    def abort(self) -> None:
        """Stop without finishing the open shard (used when training itself failed)."""
        if not self._closed:
            self._closed = True
            self._pending = []  # the open shard is abandoned anyway
            self._queue.put(_STOP)
            self._thread.join(timeout=60)
        self._release()

    def _release(self) -> None:
        if not self._thread.is_alive():  # the shard memory goes with the thread that used it
            self._rows = self._rows[:0].copy()
            self._image.release()
        if self._lock is not None:
            self._lock.release()

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
        if isinstance(err, (NonFiniteGradientError, StorageError, SampleIdError, ConfigurationError)):
            raise err
        raise StorageError(
            f"recording to {self.path} failed on the writer thread: {err!r}. {self._written()} stay "
            "readable there.") from err

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            cpu, waited = time.thread_time(), self._waited_cpu
            try:
                if self._error is None:  # after a failure, drop work but keep unblocking the producer
                    self._handle(item)
            except BaseException as e:  # noqa: BLE001 - re-raised on the training thread
                self._error = self._describe(e)
            finally:
                self.cpu_seconds += time.thread_time() - cpu - (self._waited_cpu - waited)
                if item[0] in ("flush", "drain"):
                    item[1].set()
                slots = len(item[1]) if item[0] == "steps" else int(item[0] not in ("flush", "drain"))
                if slots:
                    self._slots.release(slots)

    def _wait(self, event: Any) -> None:
        """Wait for a CUDA event (None on the CPU): time spent here, which a spinning wait would count
        as CPU time, is kept out of cpu_seconds."""
        if event is not None:
            cpu = time.thread_time()
            event.synchronize()
            self._waited_cpu += time.thread_time() - cpu

    def _describe(self, e: BaseException) -> BaseException:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            err = StorageError(
                f"disk full while writing {self._writing or 'to'} in {self.path} ({e.strerror or e}): "
                f"{self._written()} were written and stay readable in {self.path / fmt.SHARD_DIR} (and "
                f"{fmt.PARAM_DIR}/). Free space (or record fewer layers / a smaller projection / float16 "
                "storage) and resume from the last checkpoint.")
            err.errno = e.errno
            return err
        if isinstance(e, (PermissionError, OSError)) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return StorageError(f"cannot write to {self.path} ({e.strerror}); {self._written()} stay readable "
                                "there. Record into a directory you can write to.")
        return e

    def _written(self) -> str:
        return (f"{self._shards_written} shard(s) and {self._params_written} parameter file(s), "
                f"{self._bytes_written / 2**20:.2f} MiB,")

    def _handle(self, item: tuple) -> None:
        kind = item[0]
        if kind == "steps":
            for rec in item[1]:
                self._write_step(rec)
        elif kind == "query":
            _, step, grads, ready = item
            self._wait(ready)
            arr = to_stored(grads, self._storage_dtype)
            bad = ~finite_rows(arr, self._storage_dtype)
            if bad.any():
                self._warn_query_nonfinite(step, bad)
            self._buffer.query_steps.append(step)
            self._buffer.query_grads.append(arr)
            self._buffer.query_nonfinite.append(bad)
            self._buffer.nbytes += arr.nbytes
        elif kind == "params":
            self._write_params(*item[1:])
        elif kind == "flush":
            self._finish_shard()

    def _warn_query_nonfinite(self, step: int, bad: np.ndarray) -> None:
        if self._warned_query_nonfinite:
            return
        self._warned_query_nonfinite = True
        ids = self._query_ids[bad] if len(self._query_ids) == len(bad) else np.flatnonzero(bad)
        warnings.warn(
            f"step {step}: the query gradients of {int(bad.sum())} of {len(bad)} queries (ids {short_list(ids)}) "
            f"contain NaN/inf (or overflow {self._storage_dtype} storage). They are flagged in the run (later "
            "such steps without a further warning), and scores of those queries will be NaN; the "
            "aggregators say so. A diverged model or a query loss that is NaN for these samples is the "
            "usual cause.", RuntimeWarning)

    def _write_step(self, rec: StepRecord) -> None:
        self._wait(rec.ready)
        rec.sample_ids = np.asarray(rec.sample_ids, np.int64)
        if not rec.ids_checked:  # ids read from a GPU here, or a record built without the recorder
            check_sample_ids(rec.sample_ids, rec.step, allow_repeated=self._allow_repeated_ids)
        # in numpy from here: torch's multi-threaded kernels on this thread would compete with training's
        grads = to_stored(rec.grads, self._storage_dtype)
        width = self._rows.shape[1]
        if grads.ndim != 2 or grads.shape[1] != width or len(grads) != len(rec.sample_ids):
            raise ConfigurationError(
                f"step {rec.step}: the gradient rows have shape {list(grads.shape)}, but a step of "
                f"{len(rec.sample_ids)} sample ids needs [{len(rec.sample_ids)}, {width}] (one row of the "
                f"run's {width} dims per sample id). Nothing of this step was written; earlier steps are "
                f"kept in {self.path}.")
        finite = bool(rec.finite) if rec.finite is not None else all_finite(grads, self._storage_dtype)
        if not finite:
            if self._on_nonfinite == "raise":
                raise NonFiniteGradientError(
                    f"step {rec.step}: recorded per-sample gradients contain NaN/inf (or exceed "
                    f"the range of {self._storage_dtype} storage: float16 overflows above 65504; "
                    "storage_dtype='float32' avoids that). Every "
                    f"earlier step is saved in {self.path}. Pass on_nonfinite='warn' to record "
                    "and flag such steps instead (aggregators skip flagged steps).")
            warnings.warn(f"step {rec.step}: per-sample gradients contain NaN/inf (or overflow "
                          f"{self._storage_dtype} storage); the step is flagged in the run and skipped "
                          "by aggregators.", RuntimeWarning)
        rec.finite = torch.tensor(finite)
        rec.skipped = bool(rec.skipped) if rec.skipped is not None else False
        if isinstance(rec.layer_lr, torch.Tensor):
            rec.layer_lr = rec.layer_lr.detach().double().cpu().numpy()
        buf = self._buffer  # the rows and the step enter the shard together
        self._store_rows(buf, grads)
        rec.grads = None  # the rows are in the store now
        buf.steps.append(rec)
        buf.nbytes += grads.nbytes
        if len(buf.steps) >= self._steps_per_shard or buf.nbytes >= self._max_shard_bytes:
            self._finish_shard()

    def _store_rows(self, buf: _ShardBuffer, grads: np.ndarray) -> None:
        """Append a step's rows to the open shard's row store, growing it if they do not fit
        (the first time to a whole shard's worth: steps_per_shard steps of this many rows, at most
        max_shard_mb)."""
        end = buf.n_rows + len(grads)
        if end > len(self._rows):
            row_bytes = max(grads.shape[1] * grads.itemsize, 1)
            shard_rows = min(self._steps_per_shard * len(grads), self._max_shard_bytes // row_bytes + len(grads))
            grown = np.empty((max(end, 2 * len(self._rows), shard_rows), self._rows.shape[1]), self._np_dtype)
            grown[:buf.n_rows] = self._rows[:buf.n_rows]
            self._rows = grown
        self._rows[buf.n_rows:end] = grads
        buf.n_rows = end

    def _finish_shard(self) -> None:
        cpu = time.thread_time()
        try:
            self._write_shard()
        finally:
            self.shard_cpu_seconds += time.thread_time() - cpu

    def _write_shard(self) -> None:
        buf = self._buffer
        if not buf.steps and not buf.query_steps:
            return
        final = self.path / fmt.SHARD_DIR / fmt.shard_name(self.rank, buf.index)
        self._writing = final.name
        # the file is its rows, written to disk from the row store (placed, not copied), their
        # steps and ids, the queries, and a little HDF5 metadata: the image holds all but the rows
        queries = sum(a.nbytes for a in buf.query_grads)
        image = h5_image(lambda f: self._fill_shard(f, buf), into=self._image,
                         size_hint=queries + 16 * buf.n_rows + IMAGE_SLACK)
        try:
            self._write_file(final, image, f"shard {final.name}")
        finally:
            self._image.clear()  # drops its reference to the row store, which may be replaced
        self._shards_written += 1
        steps = [r.step for r in buf.steps]
        rows = int(sum(len(r.sample_ids) for r in buf.steps))
        entry = dict(index=buf.index, segment=self._segment, first_step=min(steps, default=None),
                     last_step=max(steps, default=None), steps=len(steps), rows=rows)
        self._rank_state[fmt.RANK_SHARDS].append([entry[c] for c in fmt.RANK_SHARD_COLUMNS])
        if steps:
            self._rank_state["last_step"] = max(max(steps), self._rank_state.get("last_step") or -1)
        self._buffer = _ShardBuffer(buf.index + 1)
        # the shard is whole on disk already: if this fails (a full disk), the shard is still read
        self._writing = fmt.rank_file_name(self.rank)
        write_json_atomic(self.path / fmt.rank_file_name(self.rank), self._rank_state)

    def _fill_shard(self, f: h5py.File, buf: _ShardBuffer) -> None:
        steps = [r.step for r in buf.steps]
        set_attrs(f, format=fmt.FORMAT_NAME, format_version=fmt.FORMAT_VERSION, run_id=self.manifest["run_id"],
                  rank=self.rank, shard_index=buf.index,
                  **{fmt.SHARD_SEGMENT: self._segment, fmt.SHARD_FROM_STEP: self._from_step})
        if steps:
            set_attrs(f, first_step=min(steps), last_step=max(steps))
        counts = np.array([len(r.sample_ids) for r in buf.steps], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(counts) else counts
        grads = self._rows[:buf.n_rows]
        n_groups = max((len(r.lr_groups) for r in buf.steps), default=1)
        lr_groups = np.full((len(buf.steps), n_groups), np.nan)
        for j, r in enumerate(buf.steps):
            lr_groups[j, :len(r.lr_groups)] = r.lr_groups
        write_checked_rows(f, fmt.ROWS_GRAD, fmt.ROWS_GRAD_SUMS, grads, self._storage_dtype, place_in=self._image)
        write_array(f, fmt.ROWS_STEP, np.repeat(np.array(steps, np.int64), counts))
        write_array(f, fmt.ROWS_SAMPLE_ID, np.concatenate([r.sample_ids for r in buf.steps]) if buf.steps
                    else np.zeros(0, np.int64))
        cols = {
            "step": np.array(steps, np.int64),
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
        f.create_group(fmt.STEPS)
        for name in fmt.STEP_COLUMNS:
            write_array(f, f"{fmt.STEPS}/{name}", cols[name])
        if any(r.layer_lr is not None for r in buf.steps):
            n_layers = len(self.manifest["layers"])
            layer_lr = np.full((len(buf.steps), n_layers), np.nan)
            for j, r in enumerate(buf.steps):
                if r.layer_lr is not None:
                    layer_lr[j] = r.layer_lr
            write_array(f, f"{fmt.STEPS}/layer_lr", layer_lr)
        write_array(f, fmt.QUERY_STEP, np.array(buf.query_steps, np.int64))
        if buf.query_grads:
            write_array(f, fmt.QUERY_GRAD, np.stack(buf.query_grads))
            if self._storage_dtype in fmt.RAW_BITS:
                set_attrs(f[fmt.QUERY_GRAD], **{fmt.ATTR_DTYPE: self._storage_dtype})
            write_array(f, fmt.QUERY_NONFINITE, np.stack(buf.query_nonfinite))

    def _write_file(self, final: Path, image: list[memoryview], what: str) -> None:
        """Write a file's image (`h5_image`'s pieces) to `final`, after checking that it fits."""
        size = sum(len(p) for p in image)
        check_free_space(final.parent, size, what)
        write_atomic(final, image)
        self._bytes_written += size

    def _write_params(self, kind: str, step: int, params: dict[str, torch.Tensor],
                      optim: dict[str, dict[str, torch.Tensor]], attrs: dict[str, Any], ready: Any) -> None:
        self._wait(ready)
        final = self.path / fmt.PARAM_DIR / fmt.param_file_name(kind, self.rank, step)

        def fill(f: h5py.File) -> None:
            set_attrs(f, format=fmt.FORMAT_NAME, format_version=fmt.FORMAT_VERSION, run_id=self.manifest["run_id"],
                      kind=kind, step=step, rank=self.rank, **attrs)
            g = f.create_group(fmt.PARAMS_GROUP)
            for name, t in params.items():
                write_array(g, name, _to_numpy(t))
            for pname, state in optim.items():
                og = f.require_group(f"{fmt.OPTIM_GROUP}/{pname}")
                for key, t in state.items():
                    write_array(og, key, _to_numpy(t))

        self._writing = final.name
        arrays = [*params.values(), *(t for state in optim.values() for t in state.values())]
        image = h5_image(fill, size_hint=sum(_to_numpy_nbytes(t) for t in arrays) + IMAGE_SLACK)
        self._write_file(final, image, f"{kind} {final.name}")
        self._params_written += 1
        # listed in the rank file with the next shard: a file on disk but not listed is not a gap
        self._rank_state[fmt.RANK_PARAMS].append(final.name)


def _snapshot(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a parameter as it is now: asynchronous into pinned memory from a GPU."""
    t = t.detach()
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host
    return t.to("cpu", copy=True)


# numpy has no bfloat16: such tensors are stored as float32, and the loader casts them back to the
# model's dtype
_NUMPY_STAND_IN = {torch.bfloat16: torch.float32}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.to(_NUMPY_STAND_IN.get(t.dtype, t.dtype)).numpy()


def _to_numpy_nbytes(t: torch.Tensor) -> int:
    """The size of `_to_numpy(t)` in bytes."""
    return t.numel() * _NUMPY_STAND_IN.get(t.dtype, t.dtype).itemsize


def _start_error(path: Path, e: OSError) -> Exception:
    """What a failure to write a run's first files means, as the library's own error."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"disk full: cannot start recording in {path} ({e.strerror or e}). Free space "
                            "or choose another directory.")
    return RunDirectoryError(f"cannot write the run's files in {path} ({e.strerror or e}). Choose a "
                             "directory you can write to.")


def _recorded_files(path: Path) -> list[Path]:
    """The finished shard and parameter files in `path` (what a new run must not overwrite)."""
    found = []
    for sub, parse in ((fmt.SHARD_DIR, fmt.parse_shard_name), (fmt.PARAM_DIR, fmt.parse_param_file_name)):
        d = path / sub
        if d.is_dir():
            found += sorted(p for p in d.iterdir() if parse(p.name))
    return found


def _remove_run_files(path: Path) -> None:
    """Delete the library's own files of an earlier run in `path`; anything else stays."""
    for sub in (fmt.SHARD_DIR, fmt.PARAM_DIR):
        shutil.rmtree(path / sub, ignore_errors=True)
    for f in path.glob("rank-*.json*"):
        f.unlink()
    for name in (fmt.MANIFEST, fmt.MANIFEST + fmt.TMP_SUFFIX):
        (path / name).unlink(missing_ok=True)


def _manifest_of_run(path: Path, run_id: str) -> dict[str, Any]:
    """The manifest of run `run_id` in `path`; RunDirectoryError if the directory holds another."""
    manifest = read_manifest(path, purpose="resume")
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
