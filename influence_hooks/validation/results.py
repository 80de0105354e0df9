"""`Validation`: what validate measured, as numbers (per scope: the retrained truth, each method's
estimates, their agreement and LDS), saved as JSON and HDF5 (no pickle) and printed as a table."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..windows import Window
from .lds import agreement, lds
from .retrain import Check

METHOD_LABELS = {"tracin": "tracin", "dit_none": "dit none", "dit_fisher": "dit fisher", "dit_ggn": "dit ggn",
                 "dit_exact": "dit exact", "dvemb": "dvemb"}


def method_label(m: str) -> str:
    return METHOD_LABELS.get(m, m)


@dataclass
class ScopeResult:
    """One retrained scope (a window, or the whole run for LDS).

    sample_ids [M]; truth [M, Q] = f_q(without i) - f_q(with i) at eval_step; estimates {method: [M, Q]};
    subsets: per LDS subset the ids it dropped; subset_change [m, Q] = f_q(subset) - f_q(all);
    subset_predictions {method: [m, Q]}; reasons {method: why it has no estimate here}.
    """

    name: str
    kind: str                # 'window' | 'run'
    window: Window
    eval_step: int
    start: int
    sample_ids: np.ndarray
    truth: np.ndarray
    estimates: dict[str, np.ndarray] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    subsets: list[np.ndarray] = field(default_factory=list)
    kept_fraction: float = 0.5
    n_present: int = 0
    subset_change: np.ndarray | None = None
    subset_predictions: dict[str, np.ndarray] = field(default_factory=dict)

    def agreement(self) -> dict[str, tuple[float, float]]:
        """{method: (Pearson, Spearman)} against the leave-one-out truth, averaged over queries."""
        if not len(self.sample_ids):
            return {}
        return {m: agreement(e, self.truth) for m, e in self.estimates.items()}

    def lds(self) -> dict[str, float]:
        if self.subset_change is None:
            return {}
        return {m: lds(p, self.subset_change) for m, p in self.subset_predictions.items()}


@dataclass
class Validation:
    """The result of `validate` (see influence_hooks.validation)."""

    run_path: str
    run_id: str
    methods: tuple[str, ...]
    query_ids: np.ndarray
    scopes: list[ScopeResult]
    checks: list[Check]
    optimizer: str
    dtype: str
    notes: list[str] = field(default_factory=list)
    approximations: dict[str, list[str]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    estimated_seconds: dict[str, float] = field(default_factory=dict)
    model_steps: int = 0

    @property
    def windows(self) -> list[ScopeResult]:
        return [s for s in self.scopes if s.kind == "window"]

    @property
    def run_scope(self) -> ScopeResult | None:
        return next((s for s in self.scopes if s.kind == "run"), None)

    @property
    def reproduction_error(self) -> float:
        """The largest relative parameter error of the retrained run against the recorded
        checkpoints and snapshots (NaN when none was passed)."""
        errs = [c.relative_error for c in self.checks if c.what.startswith("parameters")]
        return max(errs) if errs else float("nan")

    @property
    def reproduced(self) -> bool:
        return all(c.ok for c in self.checks)

    def missing(self) -> list[tuple[str, str, list[str]]]:
        """(method, a reason, the scopes it applies to) for every method without an estimate
        somewhere, one entry per distinct reason."""
        out: dict[tuple[str, str], list[str]] = {}
        for s in self.scopes:
            for m, r in s.reasons.items():
                out.setdefault((m, r), []).append(s.name)
        return [(m, r, names) for (m, r), names in out.items()]

    # ------------------------------------------------------------------ tables
    def agreement_table(self) -> list[dict[str, Any]]:
        """One row per method: per window (Pearson, Spearman) and per scope LDS."""
        rows = []
        for m in self.methods:
            row: dict[str, Any] = {"method": m}
            for s in self.windows:
                a = s.agreement().get(m)
                row[f"loo {s.name}"] = a if a is not None else s.reasons.get(m, "n/a")
            for s in self.scopes:
                if s.subset_change is not None:
                    v = s.lds().get(m)
                    row[f"lds {s.name}"] = v if v is not None else s.reasons.get(m, "n/a")
            row["seconds"] = self.seconds.get(m, float("nan"))
            rows.append(row)
        return rows

    def markdown_table(self) -> str:
        heads = ([f"{s.name} [{s.window[0]}, {s.window[1]}) P / S" for s in self.windows]
                 + [f"LDS {s.name}" for s in self.scopes if s.subset_change is not None])
        lines = ["| method | " + " | ".join(heads) + " | time (s) |", "|---" * (len(heads) + 2) + "|"]
        for row in self.agreement_table():
            cells = []
            for k, v in row.items():
                if k in ("method", "seconds"):
                    continue
                if isinstance(v, tuple):
                    cells.append(f"{_f(v[0])} / {_f(v[1])}")
                elif isinstance(v, float):
                    cells.append(_f(v))
                else:
                    cells.append("—")
            lines.append(f"| {method_label(row['method'])} | " + " | ".join(cells) + f" | {row['seconds']:.1f} |")
        return "\n".join(lines)

    def summary(self) -> str:
        """The printed result: reproduction, the agreement table, the cost."""
        rep = self.reproduction_error
        lines = [f"Retraining with nothing left out reproduces the recorded run: largest relative parameter error "
                 f"{rep:.1e} at {len({c.step for c in self.checks if c.what.startswith('parameters')})} recorded "
                 "checkpoint(s)"
                 if math.isfinite(rep) else
                 "Retraining with nothing left out: no checkpoint inside the retrained steps to compare with; "
                 "checked against the recorded gradients (and losses, if recorded) only",
                 "",
                 "Pearson / Spearman of each method against leave-one-out retraining (per window, averaged over "
                 f"{len(self.query_ids)} queries), and LDS over random subsets:", "",
                 self.markdown_table(), ""]
        for m, r, names in self.missing():
            lines.append(f"  — {method_label(m)} ({', '.join(names)}): {r.splitlines()[0][:300]}")
        lines.append(f"Retraining: {self.model_steps:,} model-steps in {self.seconds.get('retraining', 0):.1f} s "
                     f"(estimated {self.estimated_seconds.get('retraining', float('nan')):.1f} s); total "
                     f"{self.seconds.get('total', 0):.1f} s.")
        return "\n".join(lines)

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run_path, "run_id": self.run_id, "methods": list(self.methods),
            "query_ids": [int(q) for q in self.query_ids], "optimizer": self.optimizer, "dtype": self.dtype,
            "reproduction": {"max_parameter_error": _j(self.reproduction_error), "reproduced": self.reproduced,
                             "checks": [{"scope": c.scope, "step": c.step, "what": c.what, "relative_error": _j(c.relative_error),
                                         "tolerance": c.tolerance, "ok": c.ok} for c in self.checks]},
            "scopes": [{"name": s.name, "kind": s.kind, "window": list(s.window), "eval_step": s.eval_step,
                        "start": s.start, "samples": len(s.sample_ids), "samples_in_scope": s.n_present, "subsets": len(s.subsets),
                        "kept_fraction": s.kept_fraction,
                        "agreement": {m: {"pearson": _j(p), "spearman": _j(r)} for m, (p, r) in s.agreement().items()},
                        "lds": {m: _j(v) for m, v in s.lds().items()}, "not_estimated": dict(s.reasons)}
                       for s in self.scopes],
            "notes": list(self.notes), "approximations": self.approximations,
            "seconds": {k: _j(v) for k, v in self.seconds.items()},
            "estimated_seconds": {k: _j(v) for k, v in self.estimated_seconds.items()},
            "model_steps": self.model_steps,
        }

    def save(self, directory: str | Path) -> tuple[Path, Path]:
        """validation.json (the numbers) and validation.h5 (the arrays) in `directory`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        jpath = d / "validation.json"
        jpath.write_text(json.dumps(self.to_dict(), indent=1))
        hpath = d / "validation.h5"
        with h5py.File(hpath, "w") as f:
            f.attrs["run_id"] = self.run_id
            f.create_dataset("query_ids", data=np.asarray(self.query_ids, np.int64))
            for k, s in enumerate(self.scopes):
                g = f.create_group(f"scope_{k}")
                g.attrs.update(name=s.name, kind=s.kind, window=list(s.window), eval_step=s.eval_step,
                               start=s.start, kept_fraction=s.kept_fraction)
                g.create_dataset("sample_ids", data=np.asarray(s.sample_ids, np.int64))
                g.create_dataset("truth", data=np.asarray(s.truth, np.float64))
                for m, e in s.estimates.items():
                    g.create_dataset(f"estimates/{m}", data=e)
                if s.subset_change is not None:
                    dropped = np.zeros((len(s.subsets), int(max([d.max() for d in s.subsets if len(d)] or [0])) + 1), bool)
                    for j, dd in enumerate(s.subsets):
                        dropped[j, dd] = True
                    g.create_dataset("subset_dropped", data=dropped, compression="gzip")
                    g.create_dataset("subset_change", data=s.subset_change)
                    for m, p in s.subset_predictions.items():
                        g.create_dataset(f"subset_predictions/{m}", data=p)
        return jpath, hpath


def _f(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "nan"


def _j(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
