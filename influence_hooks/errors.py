"""Exceptions raised by influence_hooks.

Every error says what went wrong and how to fix it. All derive from InfluenceHooksError so callers
can catch the library's errors in one place.
"""


class InfluenceHooksError(Exception):
    """Base class of every error raised by influence_hooks."""


class ConfigurationError(InfluenceHooksError, ValueError):
    """An argument or combination of arguments is invalid; raised at construction time."""


class RunDirectoryError(InfluenceHooksError):
    """The run directory is missing, holds a different run, or its manifest is unreadable."""


class CorruptShardError(InfluenceHooksError):
    """A finished run file cannot be read: truncated, damaged (a checksum does not match), or from another run."""


class UnsafeFileError(CorruptShardError):
    """A run file would make HDF5 read another file (an external link, external storage or a
    virtual dataset); influence_hooks never writes such files and refuses to read them."""

    def __init__(self, path: object, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


class SampleIdError(InfluenceHooksError):
    """The sample ids of a training batch cannot be determined, or are invalid (negative, repeated)."""


class NonFiniteGradientError(InfluenceHooksError, FloatingPointError):
    """A recorded per-sample gradient contains NaN or inf and on_nonfinite='raise'."""


class StorageError(InfluenceHooksError, OSError):
    """Writing the run failed (e.g. a full disk); finished shards stay readable."""


class WindowError(InfluenceHooksError, ValueError):
    """A window of steps is empty, reversed, or outside the recorded run."""


class MissingDataError(InfluenceHooksError):
    """The run lacks something a method needs (query gradients, parameter snapshots, ...)."""


class ProjectionMismatchError(ConfigurationError):
    """Gradients from different projections (or dimensions) were combined; they are not comparable."""



def short_list(xs, n: int = 12) -> str:
    """'[1, 2, 3, ... (40 in all)]': a list of step numbers or ids short enough for a message."""
    xs = [int(x) for x in xs]
    return "[" + ", ".join(map(str, xs[:n])) + (f", ... ({len(xs)} in all)]" if len(xs) > n else "]")
