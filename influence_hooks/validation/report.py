"""The validation report next to the run: report.md, scatter.png (each method's estimate against the
leave-one-out truth, per window), lds.png (predicted against actual loss change per subset), and
the numbers (validation.json, validation.h5). matplotlib's Agg canvas; pyplot is not touched."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .lds import pearson
from .plan import fmt_seconds
from .results import ScopeResult, Validation, method_label

READING = """\
- **Leave-one-out (P / S)**: for each window [t1, t2), random training samples were left out of the
  window's batches one at a time (the sample's term leaves the batch loss, the batch size |B_t|
  stays), the window was retrained from the run's checkpoint with the recorded batches and
  learning rates, and every query loss compared at the evaluation step. The truth is
  f_q(without) - f_q(with); each cell is the Pearson / Spearman correlation of the method's scores
  with it over the samples, averaged over the queries. 1 is perfect; a method that estimates
  another notion (dvemb: evaluated at the end of training) is shown only where its notion applies.
- **LDS** (linear datamodeling score, TRAK): random subsets keeping a fraction of the scope's
  samples were retrained (the others left out of the scope's batches); per query, the Spearman
  correlation over the subsets between the loss actually reached and the loss the scores predict
  (the sum of the left-out samples' scores). It asks whether the scores add up over many samples,
  which is how they are used to select or clean data.
- Scores are first order; the recorded-space methods also see only the projected gradients of the
  recorded layers. Windows early in training, long windows and large learning rates are where they
  drift from retraining; exact curvature follows retraining best (see the fidelity benchmark)."""


def write_report(v: Validation, directory: str | Path, *, title: str | None = None) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    v.save(d)
    scatter = plot_scatter(v, d / "scatter.png")
    ldsfig = plot_lds(v, d / "lds.png")
    L = [f"# {title or 'How far can the influence scores be trusted on this run?'}", "",
         f"Run `{v.run_path}` ({v.optimizer}, {v.dtype}). Methods scored against actual retraining of the "
         f"recorded training, on {len(v.query_ids)} of the recorded queries.", ""]
    L += ["## Reproduction", ""]
    rep = v.reproduction_error
    L.append(f"Retraining with nothing left out reproduces the recorded trajectory to a relative parameter error "
             f"of at most **{rep:.1e}**." if math.isfinite(rep) else
             "No recorded checkpoint lies inside the retrained steps; the retraining was checked against the "
             "recorded gradients only.")
    L += [""] + [f"- {c.scope}: {c.describe()}" for c in v.checks] + [""]
    L += ["## Agreement with retraining", "", v.markdown_table(), ""]
    reasons = v.missing()
    if reasons:
        L += ["Not estimated (—):", ""] + [f"- {method_label(m)} ({', '.join(names)}): {r.splitlines()[0]}"
                                             for m, r, names in reasons] + [""]
    L += ["| scope | steps | evaluated at | retrained from | samples in it | left out one at a time | LDS subsets |",
          "|---|---|---|---|---|---|---|"]
    L += [f"| {s.name} | [{s.window[0]}, {s.window[1]}) | {s.eval_step} | checkpoint {s.start} | {s.n_present} | "
          f"{len(s.sample_ids) or '—'} | "
          + (f"{len(s.subsets)}, keeping {s.kept_fraction:.0%}" if s.subsets else "—") + " |" for s in v.scopes]
    L += [""]
    if scatter:
        L += ["![estimate against retraining](scatter.png)", ""]
    if ldsfig:
        L += ["![LDS](lds.png)", ""]
    L += ["## Reading these numbers", "", READING, ""]
    if v.notes:
        L += ["## Notes", ""] + [f"- {n}" for n in v.notes] + [""]
    if any(v.approximations.values()):
        L += ["## What each method approximates", ""]
        L += [f"- {method_label(m)}: " + "; ".join(a) for m, a in v.approximations.items() if a] + [""]
    est = v.estimated_seconds
    L += ["## Cost", "",
          f"Retraining: {v.model_steps:,} model-steps (one optimizer step of one model each) in "
          f"{fmt_seconds(v.seconds.get('retraining', 0.0))} (estimated {fmt_seconds(est.get('retraining', 0.0))} "
          "before starting). Scoring: " + ", ".join(f"{method_label(m)} {v.seconds.get(m, 0.0):.1f} s"
                                                   for m in v.methods)
          + f". Total {fmt_seconds(v.seconds.get('total', 0.0))}.", "",
          "## Files", "", "- `validation.json`: the numbers above; `validation.h5`: truth, estimates, subsets",
          "- `scatter.png`, `lds.png`", ""]
    path = d / "report.md"
    path.write_text("\n".join(L))
    return path


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def _panel_grid(rows: int, cols: int) -> tuple[Figure, Any]:
    """A figure of rows x cols small panels (methods by windows or scopes)."""
    fig = Figure(figsize=(2.6 * cols + 0.6, 2.3 * rows + 0.4), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _label_edges(ax: Any, r: int, c: int, rows: int, title: str, ylabel: str, xlabel: str) -> None:
    """Titles on the top row, y labels on the first column, x labels on the bottom row."""
    if r == 0:
        ax.set_title(title, fontsize=9)
    if c == 0:
        ax.set_ylabel(ylabel, fontsize=8)
    if r == rows - 1:
        ax.set_xlabel(xlabel, fontsize=8)


def _not_estimated(ax: Any) -> None:
    ax.text(0.5, 0.5, "not estimated", ha="center", va="center", fontsize=8, transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_scatter(v: Validation, path: Path) -> Path | None:
    """Rows: methods; columns: windows. Each point a left-out sample: its truth and estimate,
    averaged over the queries (the mean query loss)."""
    wins = v.windows
    if not wins:
        return None
    fig, axes = _panel_grid(len(v.methods), len(wins))
    for r, m in enumerate(v.methods):
        for c, s in enumerate(wins):
            ax = axes[r][c]
            _scatter_panel(ax, s, m)
            _label_edges(ax, r, c, len(v.methods), f"{s.name}\n", f"{method_label(m)}\nestimate", "retraining (truth)")
    fig.suptitle("Leave-one-out: estimate vs retraining, mean over queries", fontsize=10)
    return _save(fig, path)


def _scatter_panel(ax, s: ScopeResult, m: str) -> None:
    ax.tick_params(labelsize=6)
    e = s.estimates.get(m)
    if e is None:
        _not_estimated(ax)
        return
    x, y = s.truth.mean(1), e.mean(1)
    ax.scatter(x, y, s=7, alpha=0.7, color="#2166ac")
    lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
    ax.plot([lo, hi], [lo, hi], color="#999999", lw=0.7)  # estimate = truth
    ax.axhline(0, color="#dddddd", lw=0.5)
    ax.axvline(0, color="#dddddd", lw=0.5)
    p, sp = s.agreement()[m]
    ax.text(0.03, 0.97, f"P {p:.2f}  S {sp:.2f}", transform=ax.transAxes, va="top", fontsize=7)


def plot_lds(v: Validation, path: Path) -> Path | None:
    """One panel per method and scope: per subset, the predicted against the actual change of the
    mean query loss."""
    scopes = [s for s in v.scopes if s.subset_change is not None]
    if not scopes:
        return None
    fig, axes = _panel_grid(len(v.methods), len(scopes))
    for r, m in enumerate(v.methods):
        for c, s in enumerate(scopes):
            ax = axes[r][c]
            ax.tick_params(labelsize=6)
            p = s.subset_predictions.get(m)
            _label_edges(ax, r, c, len(v.methods), s.name, f"{method_label(m)}\npredicted", "actual loss change")
            if p is None:
                _not_estimated(ax)
                continue
            x, y = s.subset_change.mean(1), p.mean(1)
            ax.scatter(x, y, s=9, alpha=0.8, color="#1b7837")
            ax.text(0.03, 0.97, f"LDS {s.lds()[m]:.2f}\n(mean loss: {pearson(x, y):.2f} P)",
                    transform=ax.transAxes, va="top", fontsize=7)
    fig.suptitle("LDS: predicted vs actual change of the mean query loss, per subset", fontsize=10)
    return _save(fig, path)
