"""influence_hooks: record per-sample gradients during real training, then ask which training
samples shaped the model, and when in training they mattered."""

from ._version import __version__

__all__ = ["__version__"]
