"""Recording: per-sample gradients captured during the real training run, written to a run directory.

    GradientRecorder   hand-written loops (plain PyTorch; importing it does not load Lightning)
    InfluenceCallback  Lightning's Trainer (loaded on first use)
    RecordingConfig    every recording option, declared once
    IndexedDataset     items (index, sample), where the loader's sampler cannot be tracked
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "GradientRecorder": ".recorder", "RecordingConfig": ".options", "IndexedDataset": ".ids",
    "InfluenceCallback": ".callback",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
