"""report.md: a WindowComparison written out for reading, with its PNG plots, CSV and HDF5.

    write_report(cmp, "report/", title="...", intro="...")  ->  report/report.md

The report states the three observations of the Dynamic Influence Tracker paper (samples follow
different time patterns; early and late influence correlate weakly; the late/convergence window
detects corrupted samples better than the whole run) and says, from the numbers, whether each
holds on this run; a difference of detection quality is judged against a bootstrap interval over
samples, so one within noise says so. `findings(cmp)` returns those verdicts for programs and tests.

Every share in the report names its base ("45% of the 140 consistently harmful samples"), and a
sample's pattern rests on a threshold on the size of its influence, not on a statistical test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .files import WHOLE_RUN
from .patterns import EARLY, LATE, NEGLIGIBLE, PATTERNS, classify_patterns
from .plots import method_name, plot_correlation, plot_detection, plot_trajectories
from .stats import auroc_difference

if TYPE_CHECKING:
    from .compare import WindowComparison

WEAK_CORRELATION = 0.3
MIN_PATTERN_SHARE = 0.05
BOOTSTRAP_RESAMPLES = 1000
VERDICTS = ("holds", "does not hold", "within noise", "cannot be judged")


@dataclass
class Finding:
    """One DIT observation on this run. verdict: 'holds', 'does not hold', 'within noise' (the
    difference it rests on is smaller than its bootstrap uncertainty) or 'cannot be judged';
    holds is True / False for the first two and None otherwise."""

    claim: str
    holds: bool | None
    evidence: str
    verdict: str = ""

    def __post_init__(self) -> None:
        if not self.verdict:
            self.verdict = {True: "holds", False: "does not hold", None: "cannot be judged"}[self.holds]
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


def findings(cmp: WindowComparison) -> list[Finding]:
    """The three DIT observations, judged on this comparison.

    1. Different time patterns: early-important and late-important samples each make at least
       MIN_PATTERN_SHARE of the non-negligible samples.
    2. Early vs late: |Spearman(first window, last window)| < WEAK_CORRELATION.
    3. Convergence-window detection (per detection method, with a corrupted mask): the last
       window's AUROC exceeds the whole run's. The difference is judged with a paired bootstrap
       over samples (BOOTSTRAP_RESAMPLES resamples, 95% percentile interval): 'holds' if the
       interval lies above 0, 'does not hold' if below, 'within noise' if it contains 0. DIT
       states it for its own scores; the other methods are judged the same way for comparison.
    """
    out = []
    counts = cmp.counts()
    n = len(cmp.patterns)
    active = sum(c for p, c in counts.items() if p != NEGLIGIBLE)
    share = {p: counts[p] / active if active else 0.0 for p in PATTERNS}
    holds = active > 0 and share[EARLY] >= MIN_PATTERN_SHARE and share[LATE] >= MIN_PATTERN_SHARE
    out.append(Finding(
        "Samples differ in when they matter (some early-important, others late-important).",
        holds if active else None,
        f"Of the {n} samples, {active} have influence above the threshold (|z| >= {cmp.rules.tau:g}) in "
        f"at least one window; of these {active}: " + ", ".join(
            f"{p} {counts[p]} ({100 * share[p]:.0f}%)" for p in PATTERNS if p != NEGLIGIBLE)
        + f". The other {counts[NEGLIGIBLE]} are negligible."))
    r = cmp.early_late_correlation()
    adj = cmp.adjacent_correlation()
    out.append(Finding(
        "Early and late influence correlate weakly.",
        None if not np.isfinite(r) else bool(abs(r) < WEAK_CORRELATION),
        f"Spearman between {cmp.labels[0]} and {cmp.labels[-1]}: {_f(r)} (weak means |r| < "
        f"{WEAK_CORRELATION}); between consecutive windows on average: {_f(adj)}."))
    if cmp.detection:
        table = cmp.detection_table()
        for m, rows in table.items():
            last, whole = rows[cmp.labels[-1]]["auroc"], rows.get(WHOLE_RUN, {}).get("auroc", np.nan)
            best = max(cmp.labels, key=lambda l: -np.inf if not np.isfinite(rows[l]["auroc"]) else rows[l]["auroc"])
            verdict, diff_text = _late_vs_whole(cmp, m)
            out.append(Finding(
                f"The late (convergence) window detects corrupted samples better than the whole run "
                f"({method_name(m)}).", {"holds": True, "does not hold": False}.get(verdict),
                f"AUROC {cmp.labels[-1]} {_f(last, 3, False)} vs whole run {_f(whole, 3, False)}{diff_text}; "
                f"best window {best} ({_f(rows[best]['auroc'], 3, False)}), first window {cmp.labels[0]} "
                f"({_f(rows[cmp.labels[0]]['auroc'], 3, False)}).", verdict))
    return out


def _late_vs_whole(cmp: WindowComparison, m: str) -> tuple[str, str]:
    """(verdict, text) for AUROC(last window) - AUROC(whole run) of method m, bootstrapped over
    the samples present in both."""
    scores, present = cmp.corruption_scores.get(m), cmp.corruption_present.get(m)
    W = cmp.n_windows
    if scores is None or scores.shape[1] <= W:
        return "cannot be judged", ""
    both = present[:, W - 1] & present[:, W]
    d = auroc_difference(scores[both, W - 1], scores[both, W], cmp.corrupted[both], n_boot=BOOTSTRAP_RESAMPLES)
    if d.verdict == "cannot be judged":
        return d.verdict, ""
    return d.verdict, (f": difference {d.value:+.3f}, {100 * d.level:.0f}% bootstrap interval "
                       f"[{d.low:+.3f}, {d.high:+.3f}] over the {int(both.sum())} samples "
                       f"({d.n_boot} resamples)")


def write_report(cmp: WindowComparison, directory: str | os.PathLike, *, title: str | None = None,
                 intro: str | None = None, extra_sections: list[tuple[str, str]] | None = None,
                 examples: int = 5) -> Path:
    """Write report.md, correlation.png, trajectories.png, detection.png (with a corrupted mask),
    the CSV tables and comparison.h5 into `directory`; returns the path of report.md.

    intro: markdown placed under the title; extra_sections: (heading, markdown) pairs appended.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cmp.save(d / "comparison.h5")
    csvs = cmp.to_csv(d)
    plot_correlation(cmp, d / "correlation.png")
    plot_trajectories(cmp, d / "trajectories.png")
    det = plot_detection(cmp, d / "detection.png")

    L: list[str] = [f"# {title or 'Influence across windows of training'}", ""]
    if intro:
        L += [intro.strip(), ""]
    L += [f"- run: `{cmp.run_path}` (id `{cmp.run_id}`)",
          f"- influence: {cmp.description}. Positive = removing the sample raises the query loss "
          "(it helped, a *proponent*); negative = it hurt (an *opponent*).",
          f"- windows ({cmp.n_windows}): " + ", ".join(f"{l} = steps [{a}, {b})" for l, (a, b) in
                                                        zip(cmp.labels, cmp.windows)),
          f"- samples: {len(cmp.train_ids)}" + (f", of which {int(cmp.corrupted.sum())} known corrupted"
                                                if cmp.corrupted is not None else ""), ""]

    L += ["## Findings", "",
          "The Dynamic Influence Tracker paper (Xu & Wu 2025) reports three observations; here is "
          "whether each holds on this run, by the rules in `influence_hooks.report.render.findings`.", ""]
    for f in findings(cmp):
        L.append(f"- {f.claim} — **{f.verdict}**. {f.evidence}")
    L.append("")

    L += ["## Do early and late windows agree?", "",
          "Spearman rank correlation of the per-sample influence between every pair of windows "
          "(over the samples present in both), and with the same estimator over the whole run "
          "(last row). Values near 1: the windows rank samples alike; near 0: unrelated rankings.", "",
          "![Spearman correlation between windows](correlation.png)", ""]
    if cmp.whole_run_correlation is not None:
        L += ["| window | " + " | ".join(cmp.labels) + " |", "|---" * (cmp.n_windows + 1) + "|",
              "| correlation with the whole run | " + " | ".join(_f(v) for v in cmp.whole_run_correlation) + " |", ""]
        wr = cmp.whole_run_correlation
        if np.isfinite(wr).any():
            j = int(np.nanargmax(wr))
            L += [f"The whole-run scores resemble {cmp.labels[j]} most (Spearman {_f(wr[j])}) and "
                  f"{cmp.labels[int(np.nanargmin(wr))]} least ({_f(np.nanmin(wr))}): a single whole-run "
                  "number hides how differently the windows rank the samples.", ""]

    counts = cmp.counts()
    r = cmp.rules
    L += ["## Time patterns", "",
          f"Each sample's influence per window is divided by "
          + ("the RMS of that window's influence over all samples" if r.scale == "window"
             else "the RMS over all windows") + f" (z). A window *counts* for a sample when |z| >= {r.tau:g}: "
          "a threshold on the size of its influence relative to the typical sample, not a statistical "
          "test. Rules, in order: **negligible**: no window above the threshold; **sign-flipping**: "
          "windows above it of both signs; **early-important** / **late-important**: at least "
          f"{100 * r.concentration:.0f}% of the sample's mass sum|z| lies in the first / last half of "
          "the windows; **consistently helpful / harmful**: the rest, by the sign of its windows above "
          "the threshold (`classify_patterns` has the precise rules).", "",
          f"| pattern | samples | share of all {len(cmp.patterns)} | "
          + ("corrupted among them | " if cmp.corrupted is not None else "")
          + "strongest examples (train ids) |",
          "|---|---:|---:|" + ("---:|" if cmp.corrupted is not None else "") + "---|"]
    for p in PATTERNS:
        ex = ", ".join(str(int(i)) for i in cmp.examples(p, examples)) or "–"
        bad = ""
        if cmp.corrupted is not None:
            sel = cmp.patterns == p
            bad = (f"{int(cmp.corrupted[sel].sum())} ({100 * cmp.corrupted[sel].mean():.0f}% of {int(sel.sum())}) | "
                   if sel.any() else "– | ")
        L.append(f"| {p} | {counts[p]} | {100 * counts[p] / len(cmp.patterns):.1f}% | {bad}{ex} |")
    if cmp.corrupted is not None and cmp.corrupted.any():
        base = cmp.corrupted.mean()
        over = [(p, int(cmp.corrupted[cmp.patterns == p].sum()), int((cmp.patterns == p).sum()))
                for p in PATTERNS if (cmp.patterns == p).any()]
        over = [(p, k, c) for p, k, c in over if k / c > 2 * base]
        if over:
            L += ["", f"Known-corrupted samples make {100 * base:.0f}% of the data ({int(cmp.corrupted.sum())} of "
                  f"{len(cmp.corrupted)}) but " + ", ".join(f"{100 * k / c:.0f}% of the {c} {p} samples ({k})"
                                                            for p, k, c in over) + "."]
    L += ["", "![Influence trajectories of example samples per pattern](trajectories.png)", "",
          f"The panels share one y scale, linear within ±{r.tau:g} (the threshold band) and logarithmic "
          "beyond, so the examples of different patterns compare directly.", ""]
    if cmp.corrupted is not None:
        L += [_pattern_robustness(cmp), ""]

    L += ["## Top proponents and opponents per window", "",
          "Train ids with their influence (largest positive: helped most; most negative: hurt most)"
          + (", `*` marks a known-corrupted sample" if cmp.corrupted is not None else "") + ".", "",
          "| window | top proponents | top opponents |", "|---|---|---|"]
    labels = list(cmp.labels) + ([WHOLE_RUN] if len(cmp.top) > cmp.n_windows else [])
    for l, t in zip(labels, cmp.top):
        L.append(f"| {l} | {_ids(cmp, *t['proponents'])} | {_ids(cmp, *t['opponents'])} |")
    L.append("")

    if cmp.detection:
        k = cmp.detection[0]["k"]
        table = cmp.detection_table()
        L += ["## Detecting the corrupted samples", "",
              f"Ranking by −influence on the clean queries (corrupted samples should be opponents) or by "
              f"self-influence (they should be fitted with large gradients). AUROC (0.5 = chance) and "
              f"precision among the top k = {k} (chance = {cmp.corrupted.mean():.2f}).", "",
              "| window | " + " | ".join(f"{method_name(m)} AUROC | P@{k}" for m in table) + " |",
              "|---" + "|---:|---:" * len(table) + "|"]
        for l in labels:
            cells = []
            for m in table:
                v = table[m].get(l)
                cells += [_f(v["auroc"], 3, False), _f(v["precision_at_k"], 2, False)] if v else ["–", "–"]
            L.append(f"| {'**' + l + '**' if l == WHOLE_RUN else l} | " + " | ".join(cells) + " |")
        L += ["", "![Detection quality per window](detection.png)" if det else "", ""]

    for heading, body in extra_sections or []:
        L += [f"## {heading}", "", body.strip(), ""]

    if cmp.approximations:
        L += ["## Approximations", ""] + [f"- {a}" for a in cmp.approximations] + [""]
    L += ["## Files", "",
          "- `comparison.h5`: everything above as arrays (`WindowComparison.load`)"]
    L += [f"- `{p.name}`" for p in csvs]
    L += ["- `correlation.png`, `trajectories.png`" + (", `detection.png`" if det else ""), ""]
    path = d / "report.md"
    path.write_text("\n".join(L))
    return path


def _pattern_robustness(cmp: WindowComparison) -> str:
    """How much the pattern counts move with tau: a sentence that keeps the reader honest."""
    parts = []
    for tau in (cmp.rules.tau / 2, cmp.rules.tau * 2):
        rules = type(cmp.rules)(tau=tau, concentration=cmp.rules.concentration, scale=cmp.rules.scale)
        pats = classify_patterns(cmp.scores, cmp.present, rules)
        parts.append(f"tau = {tau:g}: " + ", ".join(f"{p} {int((pats == p).sum())}" for p in PATTERNS))
    return ("The counts depend on the threshold; for comparison, " + "; ".join(parts) + ".")


def _ids(cmp: WindowComparison, ids: np.ndarray, vals: np.ndarray, n: int = 5) -> str:
    out = []
    for i, v in list(zip(ids, vals))[:n]:
        star = "*" if cmp.corrupted is not None and cmp.corrupted[cmp.row(int(i))] else ""
        out.append(f"{int(i)}{star} ({v:+.2e})")
    return ", ".join(out) or "–"


def _f(v: Any, digits: int = 2, sign: bool = True) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"
