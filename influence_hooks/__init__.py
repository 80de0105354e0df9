"""influence_hooks: record per-sample gradients during real training, then ask which training
samples shaped the model, and when in training they mattered.

Recording:   InfluenceCallback (Lightning), GradientRecorder (plain PyTorch), IndexedDataset
Reading:     open_run -> Run
Influence:   tracin, dit, dvemb, self_influence -> InfluenceScores / DataValueEmbeddings
Comparing:   compare_windows -> WindowComparison (report.md with plots)
Sign convention: positive influence = removing the training sample raises the query loss (it
helped, a proponent); negative = it hurt (an opponent).
"""

from ._version import __version__
from .aggregate import DataValueEmbeddings, InfluenceScores, dit, dvemb, self_influence, tracin
from .callback import InfluenceCallback
from .errors import (
    ConfigurationError,
    CorruptShardError,
    InfluenceHooksError,
    MissingDataError,
    NonFiniteGradientError,
    RunDirectoryError,
    SampleIdError,
    StorageError,
    WindowError,
)
from .ids import IndexedDataset
from .recorder import GradientRecorder, RecordingConfig
from .report import WindowComparison, compare_windows
from .storage.reader import Run, open_run

__all__ = [
    "__version__",
    "InfluenceCallback", "GradientRecorder", "RecordingConfig", "IndexedDataset",
    "open_run", "Run",
    "tracin", "dit", "dvemb", "self_influence", "InfluenceScores", "DataValueEmbeddings",
    "compare_windows", "WindowComparison",
    "InfluenceHooksError", "ConfigurationError", "CorruptShardError", "MissingDataError",
    "NonFiniteGradientError", "RunDirectoryError", "SampleIdError", "StorageError", "WindowError",
]
