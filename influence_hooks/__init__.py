"""influence_hooks: record per-sample gradients during real training, then ask which training
samples shaped the model, and when in training they mattered.

Recording:   InfluenceCallback (Lightning), GradientRecorder (plain PyTorch), IndexedDataset
Reading:     open_run -> Run; query_gradients (new queries in a run's projection)
Influence:   tracin, dit, dvemb, self_influence -> InfluenceScores / DataValueEmbeddings
Comparing:   compare_windows -> WindowComparison (report.md with plots)
Validating:  validate -> Validation (each method against actual retraining; report.md with plots)
Sign convention: positive influence = removing the training sample raises the query loss (it
helped, a proponent); negative = it hurt (an opponent).

Names are imported on first use, so `from influence_hooks import GradientRecorder` loads neither
Lightning nor matplotlib.
"""

from importlib import import_module
from typing import Any

from ._version import __version__
from .errors import (
    ConfigurationError,
    CorruptShardError,
    InfluenceHooksError,
    MissingDataError,
    NonFiniteGradientError,
    RunDirectoryError,
    SampleIdError,
    StorageError,
    UnsafeFileError,
    WindowError,
)

_EXPORTS = {
    "InfluenceCallback": ".record.callback", "GradientRecorder": ".record.recorder",
    "RecordingConfig": ".record.options", "IndexedDataset": ".record.ids",
    "open_run": ".storage.reader", "Run": ".storage.reader", "query_gradients": ".record.queries",
    "tracin": ".aggregate.tracin", "self_influence": ".aggregate.tracin", "dit": ".aggregate.dit",
    "dvemb": ".aggregate.dvemb", "DataValueEmbeddings": ".aggregate.dvemb",
    "InfluenceScores": ".aggregate.results",
    "compare_windows": ".report.compare", "WindowComparison": ".report.compare",
    "validate": ".validation", "Validation": ".validation", "ReproductionError": ".validation",
}

__all__ = [
    "__version__", *_EXPORTS,
    "InfluenceHooksError", "ConfigurationError", "CorruptShardError", "MissingDataError",
    "NonFiniteGradientError", "RunDirectoryError", "SampleIdError", "StorageError", "UnsafeFileError",
    "WindowError",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
