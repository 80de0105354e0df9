"""`ExactOptions`: how the full-space backend computes, validated at construction.

`dit(run, ..., curvature='exact', model=..., dataset=..., sample_chunk=8)` passes these as keyword
arguments; `exact_dit` builds the dataclass from them (Kronfluence's typed arguments are the model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ...arguments import options_from_kwargs
from ...errors import ConfigurationError

PARAMS = ("recorded", "model")


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class ExactOptions:
    params: str | Sequence[str] = _help(
        "'recorded' (the recorded layers' parameters; the others are held fixed in the counterfactual, "
        "and the result says so), 'model' (every trainable parameter), or a list of parameter names.",
        "recorded")
    source: str = _help("'auto' | 'snapshots' | 'replay': where w_t comes from (trajectory.py).", "auto")
    optimizer_form: str = _help(
        "'auto' (the exact linearization of the recorded optimizer) or 'sgd' (always the plain SGD "
        "form with the recorded learning rate).", "auto")
    compute_dtype: torch.dtype | None = _help("Computation dtype; default the model's parameter dtype.", None)
    query_chunk: int | None = _help("vmap chunk size over query directions (bounds memory).", None)
    sample_chunk: int | None = _help("vmap chunk size over the samples of a batch (bounds memory).", None)
    max_memory: int | float = _help(
        "Bytes of parameter vectors a replay keeps in memory; beyond, it works in segments.", 2 << 30)
    cache_dir: str | None = _help("Where a segmented replay keeps segment starts that do not fit.", None)
    check: str = _help(
        "'raise' | 'warn' | 'off': at the first step processed, compare recomputed per-sample gradients "
        "with the recorded ones (projected like the run), to catch a dataset, loss or model that does "
        "not match the recording.", "raise")
    collate_fn: Callable[[list], Any] | None = _help("Collates dataset items into a batch (default "
                                                     "torch's default_collate).", None)

    def __post_init__(self) -> None:
        choices = {"source": ("auto", "snapshots", "replay"), "optimizer_form": ("auto", "sgd"),
                   "check": ("raise", "warn", "off")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigurationError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if isinstance(self.params, str) and self.params not in PARAMS:
            raise ConfigurationError(f"params must be one of {PARAMS} or a list of parameter names, "
                                     f"got {self.params!r}")
        for name in ("query_chunk", "sample_chunk"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigurationError(f"{name} must be a positive int or None, got {v!r}")
        if self.max_memory <= 0:
            raise ConfigurationError(f"max_memory must be positive, got {self.max_memory!r}")

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> "ExactOptions":
        return options_from_kwargs(cls, kwargs, what="dit with curvature 'exact'/'ggn'",
                                   besides="model=, dataset=, queries=, loss_fn=, query_loss_fn=")
