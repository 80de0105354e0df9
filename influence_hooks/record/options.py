"""`RecordingConfig`: every recording option, declared once.

GradientRecorder and InfluenceCallback take it whole (`config=`) or its fields as keyword
arguments; both routes build the same dataclass, which validates everything at construction, so a
mistake fails before training starts (Kronfluence's typed arguments are the model).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..capture.select import ALLOCATIONS
from ..errors import ConfigurationError
from ..storage.format import STORAGE_DTYPES
from ..storage.jsonio import to_jsonable
from ..storage.writer import WriterOptions

_W = WriterOptions()


def _help(text: str, default: Any = dataclasses.MISSING) -> Any:
    if default is dataclasses.MISSING:
        return field(metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class RecordingConfig:
    """What to record and how. Validated at construction, so mistakes fail before training."""

    layers: Sequence[str] | str | None = _help(
        "Module-name globs to record (e.g. ['encoder.*', 'head']); None: every supported layer.", None)
    layer_types: Sequence[type | str] | None = _help("Module classes (or class names) to record.", None)
    exclude: Sequence[str] | None = _help("Module-name globs to leave out.", None)
    projection: int | str | dict[str, int] | None = _help(
        "Total projected dimensions shared by the layers (a positive int); a dict of per-layer dims "
        "by name glob; or 'none' (or None) for exact gradients.", 1024)
    projection_allocation: str = _help(
        "How an int projection is shared among layers: 'equal' shares, or in proportion to 'sqrt' "
        "(square root of a layer's gradient size) or 'linear' (its size); each capped at the layer's "
        "size (benchmarks/results/allocation.md compares them).", "equal")
    projection_kind: str = _help(
        "'auto' (Kronecker for Linear/Conv/Embedding/Conv1D, Gaussian otherwise), 'kronecker', "
        "'gaussian' or 'rademacher'.", "auto")
    seed: int = _help("Seed of the random projection (with layer name and shape).", 0)
    loss_reduction: str = _help(
        "'mean' or 'sum': how the training loss combines the samples of a batch.", "mean")
    loss_divided_by_micro_batches: bool = _help(
        "With gradient accumulation, whether each micro-batch loss is divided by their number.", True)
    storage_dtype: str | None = _help(
        "float16, bfloat16, float32 or float64; default float16 when projected, float32 for exact gradients. "
        "bfloat16 has float32's range (no overflow above 65504) with 8 bits of precision against float16's 11.",
        None)
    query_every_n_steps: int | None = _help(
        "Record query gradients every n steps (plus each epoch's first and last step and the end of "
        "training); None: only those.", None)
    snapshot_every_n_steps: int | None = _help(
        "Save the recorded layers' parameters w_t every n steps (for exact curvature).", None)
    snapshot_windows: Sequence[Sequence[int]] | None = _help(
        "Save parameters at every step inside these [t1, t2) windows.", None)
    snapshot_scope: str = _help("'layers' (the recorded layers) or 'model' (every parameter).", "layers")
    checkpoint_every_n_steps: int | None = _help(
        "Save the whole model and optimizer state every n steps (replay starts there).", None)
    on_nonfinite: str = _help("'warn' (flag the step) or 'raise' on NaN/inf gradients.", _W.on_nonfinite)
    steps_per_shard: int = _help(
        "Optimizer steps per HDF5 shard. The writer keeps about one shard's size of memory for the "
        "whole run (the open shard's rows, written to disk from there), reused from shard to shard.",
        _W.steps_per_shard)
    queue_size: int = _help("Steps that may wait for the writer thread before training blocks.", _W.queue_size)
    allow_repeated_ids: bool = _help(
        "Accept a sample id more than once in one step (a sampler drawing with replacement); by default "
        "a repeat is a SampleIdError, since it usually means the ids do not match the batch.",
        _W.allow_repeated_ids)
    overwrite: bool = _help("Replace a run already in the directory.", False)

    def __post_init__(self) -> None:
        choices = {"projection_kind": ("auto", "kronecker", "gaussian", "rademacher", "none"),
                   "loss_reduction": ("mean", "sum"), "snapshot_scope": ("layers", "model"),
                   "projection_allocation": ALLOCATIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigurationError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.storage_dtype is not None and self.storage_dtype not in STORAGE_DTYPES:
            raise ConfigurationError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {self.storage_dtype!r}")
        for name in ("query_every_n_steps", "snapshot_every_n_steps", "checkpoint_every_n_steps"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ConfigurationError(f"{name} must be a positive int or None, got {v!r}")
        for w in self.snapshot_windows or []:
            if len(w) != 2 or int(w[1]) <= int(w[0]):
                raise ConfigurationError(f"snapshot window {w!r} must be a non-empty [t1, t2) pair")
        self._check_projection()
        self.writer_options()  # validates steps_per_shard, queue_size, on_nonfinite

    def _check_projection(self) -> None:
        p = self.projection
        if p is None or p == "none":
            return
        if isinstance(p, str) or isinstance(p, bool):
            raise ConfigurationError(f"projection must be a positive int, a dict or 'none', got {p!r}")
        if isinstance(p, dict):
            bad = {k: v for k, v in p.items() if not (v == "none" or (_is_int(v) and v > 0))}
            if bad:
                raise ConfigurationError(f"projection dims must be positive ints or 'none', got {bad}")
            return
        if not _is_int(p) or p < 1:
            raise ConfigurationError(
                f"projection must be a positive number of dimensions (e.g. 1024), a dict of per-layer dims, "
                f"or 'none' for exact gradients; got {p!r}")

    def projection_budget(self) -> int | dict[str, Any] | None:
        """The projection as the layer planner takes it: an int budget, a per-layer dict, or None
        for exact gradients (projection 'none' / None, or projection_kind 'none')."""
        if self.projection in (None, "none") or self.projection_kind == "none":
            return None
        return self.projection

    def names_layers(self) -> bool:
        """Whether the layers were chosen by name or type (layers= / layer_types=): such layers are
        never left out silently."""
        return self.layers is not None or self.layer_types is not None

    def writer_options(self) -> WriterOptions:
        return WriterOptions(steps_per_shard=self.steps_per_shard, queue_size=self.queue_size,
                             on_nonfinite=self.on_nonfinite, allow_repeated_ids=bool(self.allow_repeated_ids))

    def to_manifest(self) -> dict[str, Any]:
        """The options as JSON (layer types by class name), stored in the run's manifest."""
        cfg = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "layer_types"}
        cfg["layer_types"] = [t if isinstance(t, str) else t.__name__ for t in self.layer_types or []]
        return to_jsonable(cfg)

    @classmethod
    def from_options(cls, config: "RecordingConfig | None", options: dict[str, Any]) -> "RecordingConfig":
        """`config` itself, or a config built from keyword options; not both."""
        if config is not None and options:
            raise ConfigurationError(f"pass either config= or recording options ({sorted(options)}), not both")
        if config is not None and not isinstance(config, cls):
            raise ConfigurationError(f"config= takes a RecordingConfig, got {type(config).__name__}")
        return config if config is not None else cls(**options)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)
