"""`ValidateOptions`: what `validate` checks and how much it may spend, validated at construction
(Kronfluence's typed arguments are the model): a misconfiguration fails before any retraining."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..arguments import options_from_kwargs
from ..errors import ConfigurationError

#: every method validate can score, by the name the report uses
METHODS = ("tracin", "dit_none", "dit_fisher", "dit_ggn", "dit_exact", "dvemb")
DEFAULT_METHODS = ("tracin", "dit_none", "dit_fisher", "dit_exact", "dvemb")
LDS_SCOPES = ("both", "run", "windows", "none")
EVAL_AT = ("window_end", "final")


def _help(text: str, default: Any) -> Any:
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ValidateOptions:
    methods: Sequence[str] = _help(
        f"Methods scored against retraining, among {METHODS}. 'dit_exact' / 'dit_ggn' need the model "
        "(they recompute curvature in full parameter space); the others read the recording only.",
        DEFAULT_METHODS)
    windows: Any = _help(
        "'auto' (an early, a middle and a late epoch, or thirds of a one-epoch run), or a list of "
        "half-open step windows [(t1, t2), ...].", "auto")
    epochs: Any = _help("Instead of windows: epochs as the aggregators take them (e, (e1, e2), a list, "
                        "or 'each').", None)
    n_windows: int = _help("How many windows 'auto' picks.", 3)
    samples: int = _help("Training samples left out, one at a time, per window (drawn at random among "
                         "the samples the window trains on).", 64)
    eval_at: str = _help(
        "Where the query losses are compared: 'window_end' (step t2, the notion of dit removal) or "
        "'final' (the end of training T, the notion of dvemb; retraining then runs on to T).",
        "window_end")
    lds: str = _help(
        "Linear datamodeling score over random subsets: 'run' (subsets of all training samples, the "
        "whole run retrained), 'windows' (subsets of each window's samples, the window retrained), "
        "'both' or 'none'.", "both")
    lds_subsets: int = _help("Random subsets per LDS scope (TRAK uses 50 to 100).", 50)
    lds_fraction: float = _help("Fraction of the scope's samples each LDS subset keeps.", 0.5)
    n_queries: int | None = _help(
        "Queries compared (a random subset of the recorded ones; None: all). The exact methods' cost "
        "grows with it.", 32)
    budget_steps: int | None = _help(
        "Most retraining steps to spend (one optimizer step of one model counts 1): samples and "
        "subsets are reduced, then windows dropped, to fit. None: no limit.", None)
    budget_seconds: float | None = _help(
        "Most seconds of retraining to spend, from a timing of a few steps before it starts; "
        "reduced like budget_steps. None: no limit.", None)
    seed: int = _help("Seeds the choice of samples, subsets and queries.", 0)
    check: str = _help(
        "'raise' | 'warn': what to do when retraining with nothing left out does not reproduce the "
        "recorded run (parameters at checkpoints, recorded gradients).", "raise")
    tolerance: float | None = _help(
        "Largest relative parameter error accepted where a checkpoint or snapshot is recorded "
        "(None: 1000 x the machine epsilon of the training dtype, 1.2e-4 for float32).", None)
    model_chunk: int | None = _help("Models retrained at once (vmap); None: as many as fit in 1 GiB.", None)
    device: Any = _help("Where to retrain and score (e.g. 'cuda'); None: the model's device.", None)
    progress: bool = _help("Progress bars.", True)
    verbose: bool = _help("Print the plan, the time estimate and the summary.", True)

    def __post_init__(self) -> None:
        if isinstance(self.methods, str):
            self.methods = (self.methods,)
        self.methods = tuple(_method_name(m) for m in self.methods)
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ConfigurationError(f"methods: {bad or 'none given'}; choose among {METHODS}")
        choices = {"eval_at": EVAL_AT, "lds": LDS_SCOPES, "check": ("raise", "warn")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigurationError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.windows != "auto" and self.epochs is not None:
            raise ConfigurationError("give windows= or epochs=, not both")
        if isinstance(self.windows, str) and self.windows != "auto":
            raise ConfigurationError(f"windows must be 'auto' or a list of (t1, t2), got {self.windows!r}")
        for name, low in (("n_windows", 1), ("samples", 2), ("lds_subsets", 3)):
            v = getattr(self, name)
            if not _is_int(v) or v < low:
                raise ConfigurationError(f"{name} must be an int >= {low}, got {v!r}")
        for name in ("n_queries", "budget_steps", "model_chunk"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ConfigurationError(f"{name} must be a positive int or None, got {v!r}")
        if not 0.0 < float(self.lds_fraction) < 1.0:
            raise ConfigurationError(f"lds_fraction must be in (0, 1), got {self.lds_fraction!r}")
        if self.budget_seconds is not None and not float(self.budget_seconds) > 0:
            raise ConfigurationError(f"budget_seconds must be positive, got {self.budget_seconds!r}")
        if self.budget_steps is not None and self.budget_seconds is not None:
            raise ConfigurationError("give budget_steps or budget_seconds, not both")
        if self.tolerance is not None and not float(self.tolerance) > 0:
            raise ConfigurationError(f"tolerance must be positive, got {self.tolerance!r}")

    @property
    def needs_model_methods(self) -> list[str]:
        return [m for m in self.methods if m in ("dit_exact", "dit_ggn")]

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> "ValidateOptions":
        return options_from_kwargs(cls, kwargs, what="validate", besides="model=, dataset=, datamodule=, "
                                   "queries=, queries_from=, loss_fn=, query_loss_fn=, collate_fn=")


def _method_name(m: Any) -> str:
    """'dit fisher', 'dit-fisher' and 'dit_fisher' name the same method."""
    return str(m).strip().lower().replace(" ", "_").replace("-", "_")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)
