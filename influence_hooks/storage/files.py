"""How the files of a run reach the disk, and how they are opened again.

Writing. HDF5 can crash the whole process (SIGSEGV) when a write hits a full disk and the file is
closed afterwards, so no file of a run is written through HDF5 onto the disk: `h5_image(fill)`
builds the complete HDF5 file in memory (nothing touches the disk) and
`write_atomic(path, data)` writes its bytes with plain os.write under a temporary name, fsyncs and
renames. A full disk is then an OSError raised in Python, before the rename, the temporary file is
removed, and nothing already written is touched. `check_free_space` refuses up front, with the
numbers, when the bytes cannot fit. The image lives in a `MemoryFile` (HDF5 writes it through
h5py's file-object driver); a writer that makes many files, like the shards of a run, keeps one
and reuses its memory: freshly allocated memory costs a page fault per 4 KiB on first touch,
which was most of the CPU time of writing a shard. A shard's gradient rows are not copied into
the image at all: HDF5 allocates their chunks, back to back, when the dataset is created, and
the rows are *placed* there (`MemoryFile.place`), written to disk straight from the writer's row
store between the image's bytes before and after them. A parameter file's arrays are copied, so
its bytes are held twice while it is written.

Integrity. `write_array` chunks every dataset and adds HDF5's fletcher32 checksum to each chunk;
scalars are compact (stored inside their object header). The gradient rows, the bulk of a shard,
are written by `write_checked_rows` instead: unfiltered chunks whose sums (storage/checksum.py)
sit in a dataset of their own, which `rowio` verifies on every read at memory speed. With the v1.10 file format
(format.H5_LIBVER) the superblock, every object header and every chunk index carry checksums too.
String attributes are stored with a fixed length (`set_attrs`), inside the checksummed object
header: variable-length strings would live in the global heap, which has no checksum. A flipped
byte in a run file therefore makes reading fail instead of returning other numbers.

Reading. `open_h5(path)` opens a run file read-only and refuses anything that would make HDF5 read
another file: external links, external raw-data storage, virtual datasets.

Dtypes. bfloat16 values are stored as their raw 16 bits (numpy has no bfloat16): `to_stored` turns
a tensor into the array to write, `stored_dtype` reads a dataset's real dtype back and
`from_stored` views stored values as a tensor of it, without a copy.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np
import torch

from ..errors import StorageError, UnsafeFileError
from . import checksum
from . import format as fmt


# ---------------------------------------------------------------------- writing
class MemoryFile:
    """A growable in-memory binary file for h5py's file-object driver, whose memory is kept when
    it is emptied (`clear`) and filled again: only growth beyond the largest file so far
    allocates.

    One region of the file may be *placed* (`place`): its bytes are an array that the caller
    keeps, written to disk from there (`pieces`) and never copied into the image. The gradient
    rows of a shard, nearly all of its bytes, take this way (`write_checked_rows`), so building a
    shard copies only its metadata. Offsets seen by HDF5 are the file's; the memory holds the
    bytes before and after the placed region. Should HDF5 ever read, write or cut into the placed
    region, it is first copied in and the file goes on as an ordinary one (nothing is raised:
    an exception inside h5py's driver callbacks can crash the process)."""

    def __init__(self) -> None:
        self._mem = np.empty(0, np.uint8)
        self._size = 0  # the file's size, the placed region included
        self._pos = 0
        self._placed: tuple[int, int, np.ndarray] | None = None  # (start, length, bytes)

    def clear(self) -> None:
        self._size = self._pos = 0
        self._placed = None

    def release(self) -> None:
        """Give the memory back."""
        self._mem = np.empty(0, np.uint8)
        self.clear()

    @property
    def size(self) -> int:
        """The file's size in bytes, the placed region included."""
        return self._size

    @property
    def placed(self) -> bool:
        return self._placed is not None

    def _stored(self, size: int | None = None) -> int:
        """Bytes in memory for a file of `size` bytes (default: its size): all but the placed region."""
        size = self._size if size is None else size
        if self._placed is None:
            return size
        start, length, _ = self._placed
        return size - length if size >= start + length else min(size, start)

    def _at(self, pos: int, n: int) -> int:
        """Where the file's bytes [pos, pos + n) are in memory; a placed region they touch is
        copied in first."""
        if self._placed is not None:
            start, length, _ = self._placed
            if pos >= start + length:
                return pos - length
            if pos + n > start and n:
                self._copy_in()
        return pos

    def _copy_in(self) -> None:
        """Turn the placed region into ordinary bytes in memory."""
        start, length, raw = self._placed
        stored = self._stored()
        mem = np.empty(max(self._size, len(self._mem)), np.uint8)
        mem[:start] = self._mem[:start]
        mem[start:start + len(raw)] = raw
        mem[start + len(raw):start + length] = 0
        mem[start + length:self._size] = self._mem[start:stored]
        self._mem, self._placed = mem, None

    def place(self, data: np.ndarray, start: int, length: int) -> bool:
        """Make the file's bytes [start, start + length) be `data`'s bytes followed by zeros,
        without copying them: `data` must stay unchanged until the file is written. Refused
        (False) if a region is placed already, or anything was written at or after `start`."""
        raw = np.frombuffer(memoryview(np.ascontiguousarray(data)).cast("B"), np.uint8)
        if self._placed is not None or self._size > start or len(raw) > length:
            return False
        self._extend(start)
        self._placed = (start, length, raw)
        self._size = start + length
        return True

    def view(self) -> memoryview:
        """The file's bytes, without a copy (valid until it is next written); a placed region
        is copied in first (`pieces` does without)."""
        if self._placed is not None:
            self._copy_in()
        return memoryview(self._mem[:self._size])

    def pieces(self) -> list[memoryview]:
        """The file's bytes in order, as buffers to write one after another, without a copy."""
        if self._placed is None:
            return [self.view()]
        start, length, raw = self._placed
        pad = np.zeros(length - len(raw), np.uint8)
        parts = (self._mem[:start], raw, pad, self._mem[start:self._stored()])
        return [memoryview(a) for a in parts if len(a)]

    # the file protocol, as h5py uses it
    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        bases = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}
        if whence not in bases:
            raise ValueError(f"invalid whence ({whence})")
        self._pos = bases[whence] + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def reserve(self, size: int, *, doubling: bool = False) -> None:
        """Room for `size` bytes in memory (the contents kept). Exactly that much, so that a file
        of about known size is built without copying it as it grows; `doubling` (while it is
        written): at least twice the room it had."""
        if size > len(self._mem):
            grown = np.empty(max(size, 2 * len(self._mem), 1 << 20) if doubling else size, np.uint8)
            stored = self._stored()
            grown[:stored] = self._mem[:stored]
            self._mem = grown

    def _extend(self, end: int) -> None:
        """Grow the file to `end` bytes, zeros after its old end, as a write past the end does."""
        if end > self._size:
            old, new = self._stored(), self._stored(end)
            self.reserve(new, doubling=True)
            self._mem[old:new] = 0
            self._size = end

    def write(self, data) -> int:
        data = np.frombuffer(data, np.uint8)
        at = self._at(self._pos, len(data))
        end = self._pos + len(data)
        self._extend(end)  # a write past the end leaves zeros in the gap, as in a file
        self._mem[at:at + len(data)] = data
        self._pos = end
        return len(data)

    def readinto(self, buffer) -> int:
        out = np.frombuffer(buffer, np.uint8)
        n = max(0, min(len(out), self._size - self._pos))
        at = self._at(self._pos, n)
        out[:n] = self._mem[at:at + n]
        self._pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        left = max(0, self._size - self._pos)  # nothing past the end, and the position stays
        n = left if n is None or n < 0 else min(n, left)
        out = bytearray(n)
        self.readinto(out)
        return bytes(out)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        if self._placed is not None and size < self._placed[0] + self._placed[1]:
            self._copy_in()
        self._extend(size)
        self._size = size
        return size

    def flush(self) -> None:
        pass


def h5_image(fill: Callable[[h5py.File], None], into: MemoryFile | None = None,
             size_hint: int = 0) -> list[memoryview]:
    """The bytes of an HDF5 file that `fill(f)` populates, built entirely in memory, as pieces to
    write one after another (`write_atomic`): in `into` (emptied first; the bytes are valid until
    it is next used, and placed arrays as long as they are unchanged), or in a file of their own.
    `size_hint`: the bytes the image holds in memory (a file's arrays and a little more, less
    what is placed), reserved up front so that the image is not copied as it grows."""
    into = MemoryFile() if into is None else into
    into.clear()
    into.reserve(size_hint)
    with h5py.File(into, "w", libver=fmt.H5_LIBVER) as f:
        fill(f)
    return into.pieces()


def write_atomic(path: Path, data: bytes | memoryview | list[memoryview]) -> None:
    """Write `data` (bytes, or pieces of it in order) to `path` as a whole: under a temporary
    name, fsync'ed, then renamed over `path`. On any failure (ENOSPC included) the temporary
    file is removed and `path` is unchanged."""
    tmp = path.with_name(path.name + fmt.TMP_SUFFIX)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for piece in (data if isinstance(data, list) else [data]):
                view = memoryview(piece).cast("B")
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


def check_free_space(directory: Path, nbytes: int, what: str) -> None:
    """StorageError (errno ENOSPC) unless `directory`'s file system has room for `nbytes`."""
    free = shutil.disk_usage(directory).free
    if free < nbytes:
        raise StorageError(errno.ENOSPC, f"no space left for {what}: it needs {nbytes / 1024:.1f} KiB, "
                                         f"{free / 1024:.1f} KiB are free in {directory}")


def writable_target(path: Path) -> str | None:
    """Why `path` (a file or directory to create, or one that exists) cannot be written, or None:
    checked on the nearest existing directory, before any work is done."""
    at = path
    while not at.exists() and at != at.parent:
        at = at.parent
    if not at.is_dir():
        at = at.parent
    if os.access(at, os.W_OK):
        return None
    try:
        read_only = bool(os.statvfs(at).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        read_only = False
    return f"{at} {'is on a read-only file system' if read_only else 'is not writable'}"


def chunk_rows(shape: tuple[int, ...]) -> int:
    """Rows (first-axis entries) per chunk: about format.CHUNK_ELEMENTS elements, at least one row."""
    row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    return max(1, min(max(shape[0], 1), fmt.CHUNK_ELEMENTS // max(row, 1)))


def write_array(group: h5py.Group, name: str, data: np.ndarray, *, rows_per_chunk: int | None = None) -> None:
    """A dataset with a fletcher32 checksum per chunk (chunks of whole rows); a scalar is stored
    compact, inside its checksummed object header, since HDF5 cannot filter scalars."""
    data = np.asarray(data)
    if data.ndim == 0:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.COMPACT)
        parent = group.require_group(name.rsplit("/", 1)[0]) if "/" in name else group
        dsid = h5py.h5d.create(parent.id, name.rsplit("/", 1)[-1].encode(), h5py.h5t.py_create(data.dtype),
                               h5py.h5s.create(h5py.h5s.SCALAR), dcpl=dcpl)
        dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, np.ascontiguousarray(data))
        return
    rows = rows_per_chunk or chunk_rows(data.shape)
    chunks = (max(1, rows),) + tuple(max(1, d) for d in data.shape[1:])
    # an empty dataset can only be chunked when it may grow
    maxshape = tuple(None for _ in data.shape) if 0 in data.shape else None
    group.create_dataset(name, data=data, chunks=chunks, maxshape=maxshape, fletcher32=True)


def row_chunk_rows(n_rows: int, row_bytes: int) -> int:
    """Rows per chunk of checked rows: about format.ROW_CHUNK_BYTES, a multiple of 4 rows where
    that fits (so that a chunk of 16-bit values is a whole number of 64-bit words), at most n_rows."""
    rows = max(1, fmt.ROW_CHUNK_BYTES // max(row_bytes, 1))
    if rows >= 4:
        rows -= rows % 4
    return max(1, min(rows, n_rows))


def write_checked_rows(group: h5py.Group, name: str, sums_name: str, data: np.ndarray,
                       storage_dtype: str | None = None, place_in: MemoryFile | None = None) -> None:
    """A [rows, K] dataset checked by storage.checksum (format 3): unfiltered chunks of whole rows,
    their sums in the fletcher32-checked dataset `sums_name`, the algorithm named in its attribute
    format.ATTR_CHECKSUM. storage_dtype names the values' dtype when they are raw bits (bfloat16).

    `place_in`: the MemoryFile the group's file is built in. The chunks are then allocated in one
    run when the dataset is created and `data` is placed there (`MemoryFile.place`) instead of
    being copied into the image through HDF5; `data` must stay unchanged until the file is
    written. Where HDF5 did not lay the chunks out back to back, the rows go through HDF5."""
    data = np.ascontiguousarray(data)
    n, k = data.shape
    rows = row_chunk_rows(n, k * data.dtype.itemsize)
    if 0 in data.shape:  # an empty dataset can only be chunked when it may grow
        ds = group.create_dataset(name, data=data, chunks=(rows, max(k, 1)), maxshape=(None, None))
    elif place_in is not None and not place_in.placed:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((rows, k))
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # every chunk now, where place() can find them
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)  # and no fill values written over them
        ds = group.create_dataset(name, shape=data.shape, dtype=data.dtype, dcpl=dcpl)
        span = _chunk_span(ds, rows * k * data.dtype.itemsize)
        if span is None or not place_in.place(data, *span):
            # whole chunks, the last padded with zeros: HDF5 writing a partial chunk of a dataset
            # that is never filled would pad it with whatever its chunk buffer held
            for r0 in range(0, n, rows):
                chunk = data[r0:r0 + rows]
                if len(chunk) < rows:
                    chunk = np.concatenate([chunk, np.zeros((rows - len(chunk), k), data.dtype)])
                ds.id.write_direct_chunk((r0, 0), np.ascontiguousarray(chunk))
    else:
        ds = group.create_dataset(name, data=data, chunks=(rows, k))
    write_array(group, sums_name, checksum.as_stored(checksum.chunk_sums(data, rows * k * data.dtype.itemsize)))
    set_attrs(ds, **{fmt.ATTR_CHECKSUM: checksum.NAME})
    if storage_dtype in fmt.RAW_BITS:
        set_attrs(ds, **{fmt.ATTR_DTYPE: storage_dtype})


def _chunk_span(ds: h5py.Dataset, chunk_bytes: int) -> tuple[int, int] | None:
    """(file offset, length) of a 2-D dataset's allocated chunks, one chunk of whole rows after
    another in row order, unfiltered and back to back; None if they are not laid out so."""
    found: list[tuple[int, int, int, int]] = []  # (first row, byte offset, size, filter mask)
    if hasattr(ds.id, "chunk_iter"):  # HDF5 >= 1.14: one pass
        ds.id.chunk_iter(lambda c: found.append((c.chunk_offset[0], c.byte_offset, c.size, c.filter_mask)))
    else:
        for i in range(ds.id.get_num_chunks()):
            c = ds.id.get_chunk_info(i)
            found.append((c.chunk_offset[0], c.byte_offset, c.size, c.filter_mask))
    found.sort()
    expected = -(-ds.shape[0] // ds.chunks[0])
    if len(found) != expected or any(size != chunk_bytes or mask for _, _, size, mask in found):
        return None
    start = found[0][1]
    if any(offset != start + i * chunk_bytes for i, (_, offset, _, _) in enumerate(found)):
        return None
    return start, expected * chunk_bytes


def to_stored(t: torch.Tensor, storage_dtype: str) -> np.ndarray:
    """t (any dtype, any device) as the host array a dataset of `storage_dtype` stores."""
    t = t.detach().to(getattr(torch, storage_dtype)).cpu()
    raw = fmt.RAW_BITS.get(storage_dtype)
    return t.view(getattr(torch, raw)).numpy() if raw else t.numpy()


# float16 / bfloat16 bits with every exponent bit set (inf or NaN), sign bit cleared
_NONFINITE_BITS = {"float16": 0x7C00, "bfloat16": 0x7F80}


def finite_rows(a: np.ndarray, storage_dtype: str) -> np.ndarray:
    """Whether each row of the stored values `a` (as `to_stored` returns them) is finite.

    16-bit values are tested on their bits (the exponent all ones is inf or NaN), in numpy: this
    runs on the writer thread, where a multi-threaded torch kernel would compete with training's
    own threads, and float16 arithmetic in numpy is slow."""
    if a.size == 0:
        return np.ones(len(a), bool)
    a = a.reshape(len(a), -1)
    bits = _NONFINITE_BITS.get(storage_dtype)
    if bits is None:
        return np.isfinite(a).all(axis=1)
    return (np.bitwise_and(a.view(np.uint16), 0x7FFF) < bits).all(axis=1)


def all_finite(a: np.ndarray, storage_dtype: str) -> bool:
    """Whether every stored value in `a` is finite: one vectorised single-threaded pass (the largest
    magnitude's bits for 16-bit values; a sum for wider ones, which only a NaN or inf, or an
    overflow of the sum alone, makes non-finite; then the values are checked one by one)."""
    if a.size == 0:
        return True
    bits = _NONFINITE_BITS.get(storage_dtype)
    if bits is not None:
        return int(np.bitwise_and(a.view(np.uint16), 0x7FFF).max()) < bits
    with np.errstate(over="ignore", invalid="ignore"):  # inf - inf or an overflowing sum: checked below
        total = a.sum(dtype=np.float64)
    return bool(np.isfinite(total)) or bool(np.isfinite(a).all())


def stored_dtype(ds: h5py.Dataset) -> str:
    """The dtype of a dataset's values: its ATTR_DTYPE for raw bits (bfloat16), else its own."""
    name = get_attr(ds, fmt.ATTR_DTYPE)
    return name if name in fmt.RAW_BITS else ds.dtype.name


def from_stored(a: np.ndarray, storage_dtype: str) -> torch.Tensor:
    """Stored values as a tensor of their real dtype (a view of `a`: bfloat16 from its raw bits)."""
    t = torch.from_numpy(a)
    return t.view(getattr(torch, storage_dtype)) if storage_dtype in fmt.RAW_BITS else t


def set_attrs(obj: h5py.HLObject, **attrs: Any) -> None:
    """Attributes inside the checksummed object header: strings as fixed-length UTF-8."""
    for key, v in attrs.items():
        if isinstance(v, str):
            b = v.encode()
            obj.attrs.create(key, np.array(b, dtype=f"S{max(len(b), 1)}"))
        else:
            obj.attrs[key] = v


def get_attr(obj: h5py.HLObject, key: str, default: Any = None) -> Any:
    """An attribute as written by set_attrs (or by plain h5py): fixed-length strings decoded."""
    if key not in obj.attrs:
        return default
    v = obj.attrs[key]
    if isinstance(v, (bytes, np.bytes_)):
        return bytes(v).decode("utf-8", errors="replace")
    if isinstance(v, np.generic):
        return v.item()
    return v


# ---------------------------------------------------------------------- reading
def open_h5(path: Path, *, checked: bool = False) -> h5py.File:
    """Open a run file read-only; UnsafeFileError if it would make HDF5 read any other file.
    checked=True skips that check, for a file this process has checked before."""
    f = h5py.File(path, "r")
    if checked:
        return f
    try:
        check_self_contained(f, path)
    except BaseException:
        f.close()
        raise
    return f


def check_self_contained(f: h5py.File, path: Path) -> None:
    """Refuse external links, user-defined links, external raw-data storage and virtual datasets.
    Links are listed without being followed (HDF5 resolves an external link only when it is
    traversed); datasets are inspected only after every link is known to stay inside the file.
    Low-level calls: about a millisecond for a shard, against ~15 through h5py's high-level objects."""
    links: list[tuple[bytes, int]] = []
    f.id.links.visit(lambda name, info: links.append((name, info.type)), info=True)
    refuse = ("influence_hooks never writes such a file and reads only self-contained ones: it was crafted "
              "or altered; remove it from the run directory.")
    for name, kind in links:
        if kind == h5py.h5l.TYPE_EXTERNAL:
            target = f.get(name.decode(), getlink=True)
            raise UnsafeFileError(path, f"'{name.decode()}' is an external link to {target.filename}:{target.path}. "
                                        f"{refuse}")
        if kind not in (h5py.h5l.TYPE_HARD, h5py.h5l.TYPE_SOFT):
            raise UnsafeFileError(path, f"'{name.decode()}' is a user-defined link (type {kind}). {refuse}")
    for name, kind in links:
        if kind != h5py.h5l.TYPE_HARD:
            continue
        oid = h5py.h5o.open(f.id, name)
        if not isinstance(oid, h5py.h5d.DatasetID):
            continue
        plist = oid.get_create_plist()
        if plist.get_layout() == h5py.h5d.VIRTUAL:
            sources = sorted({m.file_name for m in f[name.decode()].virtual_sources()})
            raise UnsafeFileError(path, f"dataset '{name.decode()}' is a virtual dataset reading {sources}. {refuse}")
        if plist.get_external_count():
            files = sorted({str(e[0]) for e in f[name.decode()].external})
            raise UnsafeFileError(path, f"dataset '{name.decode()}' keeps its data in external file(s) {files}. "
                                        f"{refuse}")
