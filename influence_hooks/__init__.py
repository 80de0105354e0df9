"""influence_hooks: record per-sample gradients during real training, then ask which training
samples shaped the model, and when in training they mattered.

Recording:   InfluenceCallback (Lightning), GradientRecorder (plain PyTorch), IndexedDataset
Reading:     open_run -> Run
"""

from ._version import __version__
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
from .storage.reader import Run, open_run

__all__ = [
    "__version__",
    "InfluenceCallback", "GradientRecorder", "RecordingConfig", "IndexedDataset",
    "open_run", "Run",
    "InfluenceHooksError", "ConfigurationError", "CorruptShardError", "MissingDataError",
    "NonFiniteGradientError", "RunDirectoryError", "SampleIdError", "StorageError", "WindowError",
]
