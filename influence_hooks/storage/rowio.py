"""Reading gradient rows into reusable buffers, every byte verified.

The gradient rows are nearly all of a run's bytes, so this is the path that sets how fast an
aggregator streams a run:

- `RowFile`: the rows of one open shard. Format 3 rows (unfiltered chunks with their own sums,
  storage/checksum.py) are read with os.preadv straight into the caller's buffer, whole chunks at a
  time, and every chunk is verified before a row of it is handed out; the chunk index they come
  from is HDF5's, itself checksummed (v1.10 format). Format 2 rows go through HDF5, which checks
  their fletcher32 sums, into the same buffer (read_direct, no fresh allocation); format 1 rows had
  no checksum. pread and the numpy sums release the GIL, so a reader thread overlaps the compute.
- `plan_blocks`: which rows of which shards make up each block of whole steps, forward or backward.
- `fetch(plan, stage)`: the block's rows read and verified into a reusable `Stage` (storage
  dtype, no conversion), as a `FetchedBlock` that `into(out)` converts into any tensor (torch's
  vectorized conversion, in the caller's thread).

Shards are written once, under a temporary name, and renamed (storage.files.write_atomic), so the
bytes of an open shard never change while they are read: what was verified is what is converted.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import h5py
import numpy as np
import torch

from ..errors import CorruptShardError
from . import checksum
from . import format as fmt
from .files import from_stored, get_attr, stored_dtype

_ALIGN = 64  # bytes: each run's rows start on a cache line of the stage


class RowFile:
    """The gradient rows [n, K] of one open shard, for verified reads into caller buffers.

    OSError (a checksum does not match, the file is truncated, HDF5 fails) means damage; the
    reader names the file. Built once per open shard (storage.index.FilePool)."""

    def __init__(self, f: h5py.File):
        self._file = f
        self._sample_ids: np.ndarray | None = None
        ds = f[fmt.ROWS_GRAD]
        if ds.ndim != 2:
            raise CorruptShardError(f"{fmt.ROWS_GRAD} has shape {ds.shape}, not [rows, K]")
        self.n, self.k = (int(x) for x in ds.shape)
        self.dtype = stored_dtype(ds)
        self.np_dtype = ds.dtype
        self.row_bytes = self.k * ds.dtype.itemsize
        algo = get_attr(ds, fmt.ATTR_CHECKSUM)
        self.checked = algo is not None
        if not self.checked:
            self._ds = ds
            version = get_attr(f, "format_version")
            if (version is None or int(version) >= 2) and self.n and not ds.fletcher32:
                raise CorruptShardError(f"{fmt.ROWS_GRAD} carries no checksum, although the shard is of format "
                                        f"{version}: it was not written by influence_hooks")
            return
        if algo != checksum.NAME:
            raise CorruptShardError(f"{fmt.ROWS_GRAD} names an unknown checksum {algo!r}")
        if ds.chunks is None or ds.compression or ds.fletcher32 or ds.id.get_create_plist().get_nfilters():
            raise CorruptShardError(f"{fmt.ROWS_GRAD} is not stored as format 3 writes it (unfiltered chunks)")
        self.chunk_rows = int(ds.chunks[0])
        if self.k and ds.chunks[1] != self.k:
            raise CorruptShardError(f"{fmt.ROWS_GRAD} has chunks {ds.chunks}, not of whole rows")
        n_chunks = -(-self.n // self.chunk_rows)
        self.sums = np.ascontiguousarray(f[fmt.ROWS_GRAD_SUMS][()], np.int64)
        if self.sums.shape != (n_chunks, 2):
            raise CorruptShardError(f"{fmt.ROWS_GRAD_SUMS} has shape {self.sums.shape}, expected ({n_chunks}, 2)")
        self.offsets = np.full(n_chunks, -1, np.int64)
        if self.n and self.k:
            def note(info: Any) -> None:
                self.offsets[info.chunk_offset[0] // self.chunk_rows] = info.byte_offset

            ds.id.chunk_iter(note)
        elif n_chunks:
            self.offsets[:] = 0  # nothing to read
        if (self.offsets < 0).any():
            raise CorruptShardError(f"{fmt.ROWS_GRAD} lacks {int((self.offsets < 0).sum())} of its {n_chunks} chunks")
        # our own descriptor of the file HDF5 opened (the same inode), closed with this object
        self._fd = os.dup(f.id.get_vfd_handle())
        weakref.finalize(self, os.close, self._fd)

    def sample_ids(self, r0: int, r1: int) -> np.ndarray:
        """The sample ids of rows [r0, r1): the shard's column is read once (HDF5 checks its
        fletcher32) and kept while the shard is open (8 bytes a row), instead of a lookup per block."""
        ids = self._sample_ids
        if ids is None:
            ids = self._sample_ids = np.asarray(self._file[fmt.ROWS_SAMPLE_ID][()], np.int64)
            if len(ids) != self.n:
                raise CorruptShardError(f"{fmt.ROWS_SAMPLE_ID} has {len(ids)} rows, {fmt.ROWS_GRAD} {self.n}")
        return ids[r0:r1]

    def stage_bytes(self, r0: int, r1: int) -> int:
        """Bytes of stage that read(r0, r1, ...) needs."""
        if not self.checked:
            return (r1 - r0) * self.row_bytes
        c0, c1 = r0 // self.chunk_rows, -(-r1 // self.chunk_rows)
        return (min(c1 * self.chunk_rows, self.n) - c0 * self.chunk_rows) * self.row_bytes

    def read(self, r0: int, r1: int, stage: np.ndarray) -> np.ndarray:
        """Rows [r0, r1) as stored ([r1 - r0, K] numpy, raw bits for bfloat16), a view of `stage`
        (uint8, at least stage_bytes(r0, r1) long), verified."""
        shape = (r1 - r0, self.k)
        if r1 <= r0 or not self.row_bytes:
            return np.zeros(shape, self.np_dtype)
        if not self.checked:
            out = stage[:(r1 - r0) * self.row_bytes].view(self.np_dtype).reshape(shape)
            self._ds.read_direct(out, np.s_[r0:r1])  # HDF5 checks fletcher32 (format 2)
            return out
        R, rb = self.chunk_rows, self.row_bytes
        c0, c1 = r0 // R, -(-r1 // R)
        end = min(c1 * R, self.n) * rb  # data bytes of chunks [c0, c1), counted from row 0
        at, c = 0, c0
        while c < c1:  # runs of chunks that lie back to back in the file: one pread each
            e = c + 1
            while e < c1 and self.offsets[e] == self.offsets[e - 1] + R * rb:
                e += 1
            want = min(e * R * rb, end) - c * R * rb
            got = os.preadv(self._fd, [stage[at:at + want]], int(self.offsets[c]))
            if got != want:
                raise OSError(f"{fmt.ROWS_GRAD} is truncated (chunk {c} at byte {int(self.offsets[c])})")
            at, c = at + want, e
        bad = checksum.mismatches(stage[:at], R * rb, self.sums[c0:c1])
        if len(bad):
            c = c0 + int(bad[0])
            raise OSError(f"the checksum of {fmt.ROWS_GRAD} rows {c * R}..{min((c + 1) * R, self.n) - 1} does not match")
        skip = (r0 - c0 * R) * rb
        return stage[skip:skip + (r1 - r0) * rb].view(self.np_dtype).reshape(shape)

    def blocks(self, stage: "Stage", max_bytes: int = 64 << 20) -> Iterator[np.ndarray]:
        """Every row, verified, in blocks of whole chunks of about `max_bytes` (views of `stage`,
        valid until the next block)."""
        step = max(1, max_bytes // max(self.row_bytes, 1))
        if self.checked:
            step = max(1, step // self.chunk_rows) * self.chunk_rows
        for r0 in range(0, self.n, step):
            r1 = min(self.n, r0 + step)
            yield self.read(r0, r1, stage.reserve(self.stage_bytes(r0, r1)))

    def verify(self, stage: "Stage") -> None:
        """Read every row once, so that a damaged chunk raises OSError now rather than in the
        middle of an aggregation."""
        for _ in self.blocks(stage):
            pass


# ---------------------------------------------------------------------- blocks
@dataclass
class RowRun:
    """Rows [r0, r1) of one shard (ascending there), placed in a block by segments
    (offset in the run, rows, row in the block)."""

    shard: Any  # index.ShardFile
    r0: int
    r1: int
    segments: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass
class BlockPlan:
    """Rows of whole steps read together: steps [R] of its rows in block order; the runs."""

    steps: np.ndarray
    runs: list[RowRun]

    @property
    def n_rows(self) -> int:
        return len(self.steps)


def plan_blocks(step_rows: dict[int, list[tuple[Any, int, int]]], steps: np.ndarray, *, reverse: bool,
                max_rows: int) -> Iterator[BlockPlan]:
    """Blocks of whole steps, in step order (or reversed), each at most max_rows rows (or one step
    if bigger). Rows of one step keep their order; step_rows[step]: its (shard, r0, r1) parts."""
    pending: list[tuple[int, Any, int, int]] = []
    n = 0
    for step in (steps[::-1] if reverse else steps):
        parts = step_rows[int(step)]
        rows = sum(r1 - r0 for _, r0, r1 in parts)
        if pending and n + rows > max_rows:
            yield _plan(pending)
            pending, n = [], 0
        pending.extend((int(step), sh, r0, r1) for sh, r0, r1 in parts)
        n += rows
    if pending:
        yield _plan(pending)


def _plan(parts: list[tuple[int, Any, int, int]]) -> BlockPlan:
    # merge row ranges that are contiguous in the same shard, forward or backward, into one run
    runs: list[tuple[RowRun, list[tuple[int, int, int]]]] = []  # run, its parts (step, r0, r1) in block order
    for step, sh, r0, r1 in parts:
        if runs and runs[-1][0].shard is sh and runs[-1][0].r1 == r0:
            runs[-1][0].r1 = r1
        elif runs and runs[-1][0].shard is sh and runs[-1][0].r0 == r1 and r1 > r0:  # backward order
            runs[-1][0].r0 = r0
        else:
            runs.append((RowRun(sh, r0, r1), []))
        runs[-1][1].append((step, r0, r1))
    steps, dst = [], 0
    for run, members in runs:
        for step, r0, r1 in members:
            run.segments.append((r0 - run.r0, r1 - r0, dst))
            steps.append(np.full(r1 - r0, step, np.int64))
            dst += r1 - r0
        if len(run.segments) > 1 and all(a + n == b for (a, n, _), (b, _, _) in zip(run.segments, run.segments[1:])):
            run.segments = [(0, run.r1 - run.r0, run.segments[0][2])]  # forward: one piece
    return BlockPlan(np.concatenate(steps) if steps else np.zeros(0, np.int64), [r for r, _ in runs])


class Stage:
    """A reusable host buffer for the raw bytes of one block (grows to the largest block)."""

    def __init__(self) -> None:
        self.buf = np.empty(0, np.uint8)

    def reserve(self, nbytes: int) -> np.ndarray:
        if len(self.buf) < nbytes:
            self.buf = np.empty(nbytes, np.uint8)
        return self.buf


@dataclass
class FetchedBlock:
    """A block's rows as stored, verified, in a Stage: steps [R], sample_ids [R] (numpy, block
    order), and per run its rows (a tensor view of the stage, storage dtype) and segments."""

    steps: np.ndarray
    sample_ids: np.ndarray
    pieces: list[tuple[torch.Tensor, list[tuple[int, int, int]]]]
    dtype: torch.dtype

    @property
    def n_rows(self) -> int:
        return len(self.steps)

    def rows_into(self, out: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
        """Block rows [r0, r1) converted into out[:r1 - r0] (any dtype and device)."""
        for rows, segments in self.pieces:
            for a, n, d in segments:
                lo, hi = max(d, r0), min(d + n, r1)
                if lo < hi:
                    out[lo - r0:hi - r0].copy_(rows[a + lo - d:a + hi - d])
        return out[:r1 - r0]

    def into(self, out: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """The rows in block order, converted into out[:R] (any dtype and device; torch converts,
        vectorized); cols: keep only these columns (out then has len(cols) columns)."""
        for rows, segments in self.pieces:
            if cols is not None:
                rows = rows.index_select(1, cols)
            for a, n, d in segments:
                out[d:d + n].copy_(rows[a:a + n])
        return out[:self.n_rows]


class RowsDamaged(Exception):
    """The rows of `shard` could not be read or verified; `cause` says why."""

    def __init__(self, shard: Any, cause: BaseException):
        super().__init__(str(cause))
        self.shard, self.cause = shard, cause


def fetch(plan: BlockPlan, stage: Stage, row_file: Any, read_ids: Any) -> FetchedBlock:
    """Read and verify a block's rows into `stage`. row_file(shard) -> RowFile; read_ids(shard, r0,
    r1) -> sample ids. RowsDamaged names the shard whose rows fail."""
    def guarded(run: RowRun, f: Any) -> Any:
        try:
            return f()
        except (OSError, KeyError, ValueError, CorruptShardError) as e:
            raise RowsDamaged(run.shard, e) from e

    files = [guarded(run, lambda: row_file(run.shard)) for run in plan.runs]
    sizes = [-(-rf.stage_bytes(run.r0, run.r1) // _ALIGN) * _ALIGN for rf, run in zip(files, plan.runs)]
    buf = stage.reserve(sum(sizes))
    ids = np.empty(plan.n_rows, np.int64)
    pieces, at, dtype = [], 0, None
    for rf, run, size in zip(files, plan.runs, sizes):
        rows = guarded(run, lambda: rf.read(run.r0, run.r1, buf[at:at + size]))
        t = from_stored(rows, rf.dtype)
        dtype = t.dtype
        pieces.append((t, run.segments))
        run_ids = guarded(run, lambda: read_ids(run.shard, run.r0, run.r1))
        for a, n, d in run.segments:
            ids[d:d + n] = run_ids[a:a + n]
        at += size
    return FetchedBlock(plan.steps, ids, pieces, dtype or torch.float32)
