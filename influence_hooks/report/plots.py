"""PNG figures of a WindowComparison (matplotlib, Agg canvas; pyplot's global state is not touched).

    plot_correlation(cmp, "correlation.png")     # Spearman heatmap between windows (+ whole run)
    plot_trajectories(cmp, "trajectories.png")   # influence over time of example samples per pattern
    plot_detection(cmp, "detection.png")         # AUROC / precision@k per window, ROC curves

Readability rules: every panel that shows methods has its legend; markers of different methods at
the same window are set side by side, so equal values stay visible; panels that compare samples
share one y scale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from .files import WHOLE_RUN
from .patterns import PATTERNS
from .stats import roc_curve

if TYPE_CHECKING:
    from .compare import WindowComparison

PATTERN_COLORS = {
    "consistently helpful": "#1b7837", "consistently harmful": "#b2182b", "early-important": "#2166ac",
    "late-important": "#e08214", "sign-flipping": "#762a83", "negligible": "#878787",
}
METHOD_STYLE = {  # colour, marker
    "dit_removal": ("#2166ac", "o"), "dit_accrued": ("#4393c3", "s"), "tracin": ("#e08214", "^"),
    "self_influence": ("#762a83", "D"), "dvemb": ("#1b7837", "v"),
}
METHOD_NAMES = {
    "dit_removal": "DIT removal", "dit_accrued": "DIT accrued", "tracin": "TracIn",
    "self_influence": "self-influence", "dvemb": "data value emb.",
}


def method_name(m: str) -> str:
    return METHOD_NAMES.get(m, m)


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def _axis_labels(labels: Sequence[str]) -> tuple[list[str], str]:
    """Short tick labels and an axis title: epochs become '0', '1', ... under 'epoch'."""
    if all(l.startswith("epoch ") for l in labels):
        return [l[len("epoch "):] for l in labels], "epoch (window)"
    return list(labels), "window"


def plot_correlation(cmp: WindowComparison, path: str | os.PathLike) -> Path:
    """Heatmap of the Spearman correlations between windows, the whole run as the last row/column."""
    corr = cmp.full_correlation()
    labels = list(cmp.labels) + ([WHOLE_RUN] if cmp.whole_run_correlation is not None else [])
    n = len(labels)
    size = min(max(4.8, 0.62 * n + 2.4), 11.0)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(n), labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels)
    if n <= 16:
        for i in range(n):
            for j in range(n):
                v = corr[i, j]
                ax.text(j, i, "–" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="center",
                        fontsize=8 if n > 10 else 9, color="white" if np.isfinite(v) and abs(v) > 0.6 else "black")
    if cmp.whole_run_correlation is not None:
        ax.axhline(n - 1.5, color="black", lw=1.2)
        ax.axvline(n - 1.5, color="black", lw=1.2)
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label("Spearman rank correlation")
    ax.set_title(f"Do windows agree on which samples matter?\n{_short(cmp.description)}", fontsize=10)
    return _save(fig, path)


def plot_trajectories(cmp: WindowComparison, path: str | os.PathLike, per_pattern: int = 4) -> Path:
    """trajectories_figure(cmp) saved as a PNG."""
    return _save(trajectories_figure(cmp, per_pattern), path)


def trajectories_figure(cmp: WindowComparison, per_pattern: int = 4) -> Figure:
    """One panel per time pattern: the influence of its strongest example samples in each window,
    in units of the window's RMS (the scale the patterns are read in), with the ±tau band. All
    panels share one y axis, linear within ±tau and logarithmic beyond (symlog), so a sample at
    ±1 and one at ±20 are both readable and panels compare directly."""
    ticks, xlabel = _axis_labels(cmp.labels)
    x = np.arange(cmp.n_windows)
    counts = cmp.counts()
    fig = Figure(figsize=(13, 7.6), layout="constrained")
    axes = fig.subplots(2, 3, sharex=True, sharey=True)
    tau = cmp.rules.tau
    unit = "window RMS" if cmp.rules.scale == "window" else "RMS"
    shown = np.concatenate([cmp.z[[cmp.row(int(t)) for t in cmp.examples(p, per_pattern)]].ravel()
                            for p in PATTERNS] + [np.array([tau])])
    top = 1.15 * max(float(np.abs(shown).max()), tau)
    for n_ax, (ax, pat) in enumerate(zip(axes.flat, PATTERNS)):
        ids = cmp.examples(pat, per_pattern)
        ax.set_yscale("symlog", linthresh=tau, linscale=1.0)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_ylim(-top, top)
        ax.axhspan(-tau, tau, color="#dddddd", alpha=0.6, lw=0,
                   label=f"|z| < {tau:g}: below the threshold" if n_ax == 0 else "_nolegend_")
        ax.axhline(0, color="black", lw=0.8)
        for k, tid in enumerate(ids):
            i = cmp.row(int(tid))
            bad = cmp.corrupted is not None and bool(cmp.corrupted[i])
            ax.plot(x, cmp.z[i], marker="x" if bad else "o", ms=5, lw=1.6, alpha=0.9,
                    color=_shade(PATTERN_COLORS[pat], k, len(ids)),
                    label=f"sample {int(tid)}" + (" (flipped label)" if bad else ""))
        total = len(cmp.patterns)
        ax.set_title(f"{pat}: {counts[pat]} samples ({100 * counts[pat] / max(total, 1):.0f}% of all {total})",
                     color=PATTERN_COLORS[pat], fontsize=10, fontweight="bold")
        ax.grid(alpha=0.3)
        if len(ids):
            ax.legend(fontsize=7, loc="best", framealpha=0.7)
        else:
            ax.text(0.5, 0.75, "no sample has this pattern", transform=ax.transAxes, ha="center", va="center",
                    color="gray", bbox=dict(facecolor="white", edgecolor="none"))
    for ax in axes[1]:
        ax.set_xticks(x, ticks, rotation=0 if xlabel.startswith("epoch") else 45)
        ax.set_xlabel(xlabel)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"influence / {unit} (z)\n(+ helped, − hurt)")
    fig.suptitle(f"How the influence of example samples changes over training — {_short(cmp.description)}\n"
                 f"(one y scale for every panel: linear within ±{tau:g}, logarithmic beyond)", fontsize=11)
    return fig


def plot_detection(cmp: WindowComparison, path: str | os.PathLike) -> Path | None:
    """detection_figure(cmp) saved as a PNG; None when there is no corrupted mask."""
    fig = detection_figure(cmp)
    return None if fig is None else _save(fig, path)


def detection_figure(cmp: WindowComparison) -> Figure | None:
    """AUROC and precision@k of corrupted-sample detection per window and method (whole run as a
    dashed line), and ROC curves of the primary method. None when there is no corrupted mask."""
    if not cmp.detection:
        return None
    table = cmp.detection_table()
    ticks, xlabel = _axis_labels(cmp.labels)
    x = np.arange(cmp.n_windows)
    k = cmp.detection[0]["k"]
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    ax_auc, ax_prec, ax_roc = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.25, 1.25, 1]})
    base_rate = float(cmp.corrupted.mean())
    n_methods = len(table)
    for ax, key, chance, title in (
            (ax_auc, "auroc", 0.5, "AUROC per window"),
            (ax_prec, "precision_at_k", base_rate, f"precision at k = {k} per window")):
        whole_x = x[-1] + 1.5 + 0.1 * n_methods
        for j, (m, rows) in enumerate(table.items()):
            color, marker = METHOD_STYLE.get(m, ("black", "o"))
            vals = [rows[l][key] for l in cmp.labels]
            dodge = j - (n_methods - 1) / 2  # side by side, so equal values stay visible
            ax.plot(x + 0.14 * dodge, vals, marker=marker, color=color, lw=1.6, ms=5.5,
                    markeredgecolor="white", markeredgewidth=0.6, label=method_name(m))
            if WHOLE_RUN in rows:
                ax.plot([whole_x + 0.3 * dodge], [rows[WHOLE_RUN][key]], marker=marker, color=color, ms=8,
                        markeredgecolor="black", ls="none")
        ax.axhline(chance, color="gray", ls=":", lw=1.2)
        ax.text(x[0], chance, "chance ", va="bottom", ha="left", color="gray", fontsize=8)
        ax.axvline(x[-1] + 0.75, color="gray", lw=1)
        has_whole = any(WHOLE_RUN in rows for rows in table.values())
        ax.set_xticks(list(x) + ([whole_x] if has_whole else []),
                      list(ticks) + (["whole\nrun"] if has_whole else []),
                      rotation=0 if xlabel.startswith("epoch") else 45)
        ax.set_xlim(x[0] - 0.5, (whole_x + 0.3 * (n_methods - 1) / 2 if has_whole else x[-1]) + 0.5)
        ax.set_xlabel(xlabel)
        ax.set_ylim(0, 1.02)
        ax.set_title(title + ("\n(right of the line: the same score over the whole run)" if has_whole else ""),
                     fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best", framealpha=0.85)
    ax_auc.set_ylabel("AUROC (1 = perfect, 0.5 = chance)")
    ax_prec.set_ylabel(f"share of flagged top {k} that are corrupted")

    m = cmp.method
    W = cmp.n_windows
    scores, present = cmp.corruption_scores[m], cmp.corruption_present[m]
    rows = table[m]
    best = int(np.nanargmax([rows[l]["auroc"] for l in cmp.labels]))
    picks = list(dict.fromkeys([0, best, W - 1]))
    colors = ["#92c5de", "#f4a582", "#2166ac", "#b2182b"]
    for c, w in zip(colors, picks):
        p = present[:, w]
        fpr, tpr = roc_curve(scores[p, w], cmp.corrupted[p])
        tag = " (best)" if w == best else ""
        ax_roc.plot(fpr, tpr, color=c, lw=1.8, label=f"{cmp.labels[w]}{tag}: AUROC {rows[cmp.labels[w]]['auroc']:.2f}")
    if scores.shape[1] > W:
        p = present[:, W]
        fpr, tpr = roc_curve(scores[p, W], cmp.corrupted[p])
        ax_roc.plot(fpr, tpr, color="black", ls="--", lw=1.6, label=f"whole run: AUROC {rows[WHOLE_RUN]['auroc']:.2f}")
    ax_roc.plot([0, 1], [0, 1], color="gray", ls=":", lw=1.2)
    ax_roc.set_xlabel("false positive rate (clean samples flagged)")
    ax_roc.set_ylabel("true positive rate (corrupted found)")
    ax_roc.set_title(f"ROC curves, {method_name(m)}", fontsize=10)
    ax_roc.set_aspect("equal")
    ax_roc.legend(fontsize=8, loc="lower right", framealpha=0.85)
    n_bad = int(cmp.corrupted.sum())
    fig.suptitle(f"Detecting the {n_bad} corrupted samples of {len(cmp.corrupted)}: "
                 "rank by −influence on the clean queries (DIT, TracIn) or by self-influence", fontsize=11)
    return fig


def _short(text: str, n: int = 90) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _shade(hex_color: str, k: int, n: int) -> tuple[float, float, float]:
    """The k-th of n shades of a colour, from the colour itself towards a darker tone."""
    rgb = np.array([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    f = 0.55 * k / max(n - 1, 1)
    return tuple(rgb * (1 - f))
