"""`RunLock`: one rank's exclusive claim on a run directory for the whole of its recording.

Two trainings pointed at one directory would otherwise interleave their manifests, rank files and
shards. The lock is `flock` on `rank-NNN.lock` in the run directory: the kernel releases it when
the holding process exits or dies (kill -9 included), so a crash never leaves a stale lock behind.
The file holds the holder's pid and host, to name it in the error a second writer gets; it is never
deleted (a process that removed it could let two others lock two different files of one name).
flock works between processes of one machine; on network file systems it may not.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from ..errors import RunDirectoryError
from . import format as fmt

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: no locking
    fcntl = None  # type: ignore[assignment]


def writable_dir(path: Path) -> None:
    """Create `path` (and its parents); RunDirectoryError naming the problem if that is impossible."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirectoryError(f"cannot create the run directory {path}: {e.strerror or e}. Choose a "
                                "directory you can write to.") from e
    if not os.access(path, os.W_OK):
        raise RunDirectoryError(f"the run directory {path} is not writable (or on a read-only file system). "
                                "Choose a directory you can write to.")


class RunLock:
    """An exclusive lock on rank `rank`'s part of the run directory `path`."""

    def __init__(self, path: Path, rank: int, fd: int | None):
        self.path, self.rank, self._fd = path, rank, fd

    @classmethod
    def acquire(cls, path: str | os.PathLike, rank: int = 0) -> "RunLock":
        """Take the lock (creating the directory); RunDirectoryError naming the holder if another
        recording, in this process or another, holds it."""
        path = Path(path)
        writable_dir(path)
        if fcntl is None:
            return cls(path, rank, None)
        lock_path = path / fmt.lock_file_name(rank)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirectoryError(f"cannot create the lock file {lock_path}: {e.strerror or e}. Choose a "
                                    "directory you can write to.") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirectoryError(_busy_message(path, rank, holder)) from None
            raise RunDirectoryError(f"cannot lock {lock_path}: {e.strerror or e}.") from e
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} host {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass  # the lock holds without the note (a full disk, say)
        return cls(path, rank, fd)

    @staticmethod
    def check_free(path: str | os.PathLike, rank: int = 0) -> None:
        """RunDirectoryError if another recording holds rank `rank`'s lock on `path` now; takes
        nothing (for checks before training starts)."""
        lock_path = Path(path) / fmt.lock_file_name(rank)
        if fcntl is None or not lock_path.is_file():
            return
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunDirectoryError(_busy_message(Path(path), rank, _read_holder(fd))) from None
        finally:
            os.close(fd)  # closing releases a lock taken here

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __del__(self) -> None:  # a recorder dropped without close(): free the directory
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def _read_holder(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""


def _busy_message(path: Path, rank: int, holder: str) -> str:
    who = holder or "another process"
    own = (f" (that is this process: an earlier GradientRecorder / InfluenceCallback of {path} was never "
           "finished or closed; call its abort() or finish(), or restart Python)"
           if holder.startswith(f"pid {os.getpid()} ") else "")
    return (f"{path} is being recorded by {who}{own}: rank {rank}'s lock {fmt.lock_file_name(rank)} is held. "
            "Two recordings in one directory would mix their files. Wait for it to finish, stop it, or "
            "record into another directory.")
