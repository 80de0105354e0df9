"""What validate retrains: the windows, the samples left out one at a time, the LDS subsets, the
queries, and what that costs, cut down to the budget before anything runs.

Costs are counted in model-steps (one optimizer step of one model). A window [t1, t2) evaluated at
t_e, retrained from the checkpoint at s <= t1 with M samples and m subsets, costs
    (t1 - s) + (t_e - t1) * (1 + M + m)
(the replay up to t1 is done once, by the base model alone). Seconds come from timing steps of 1
model and of as many models as each scope retrains at once, on the run itself (batches read and
collated as in the retraining), interpolated in between, summed over the chunks of models.

Samples and subsets are drawn once, at the largest size, from a seeded generator, and a smaller
budget takes their first entries, so a smaller validation is a subset of a bigger one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from .. import windows as W
from ..errors import ConfigurationError
from ..storage.reader import Run
from ..windows import Window
from .options import ValidateOptions
from .retrain import Group

MIN_SAMPLES = 8
MIN_SUBSETS = 8


@dataclass
class Scope:
    """One retrained window: its leave-one-out samples (none for the whole-run LDS scope) and the
    LDS subsets, each given by the sample ids it drops (the complement of the subset kept)."""

    name: str
    window: Window
    eval_step: int
    start: int
    present: np.ndarray
    samples: np.ndarray
    subsets: list[np.ndarray] = field(default_factory=list)
    kept_fraction: float = 0.5
    kind: str = "window"  # or 'run': the whole-run LDS scope

    @property
    def group(self) -> Group:
        return Group(self.name, self.window, self.eval_step, [np.array([i]) for i in self.samples] + list(self.subsets))

    def model_steps(self) -> int:
        t1 = self.window[0]
        return (t1 - self.start) + (self.eval_step - t1) * (1 + len(self.samples) + len(self.subsets))

    def seconds(self, step_time: Callable[[int], float], chunk: int) -> float:
        t1 = self.window[0]
        n = 1 + len(self.samples) + len(self.subsets)
        per_step = sum(step_time(min(chunk, n - c)) for c in range(0, n, chunk))
        return (t1 - self.start) * step_time(1) + (self.eval_step - t1) * per_step

    def shrunk(self, samples: int, subsets: int) -> "Scope":
        return replace(self, samples=self.samples[:samples], subsets=self.subsets[:subsets])


@dataclass
class Plan:
    windows: list[Scope]
    run_lds: Scope | None
    qsel: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def scopes(self) -> list[Scope]:
        return [*self.windows, *([self.run_lds] if self.run_lds is not None else [])]

    def model_steps(self) -> int:
        return sum(s.model_steps() for s in self.scopes)

    def seconds(self, step_time: Callable[[int], float], chunk: int) -> float:
        return sum(s.seconds(step_time, chunk) for s in self.scopes)

    def describe(self) -> str:
        parts = [f"{len(self.windows)} window(s) ({', '.join(s.name for s in self.windows)}) x "
                 f"{len(self.windows[0].samples) if self.windows else 0} samples left out one at a time"]
        lds_w = [s for s in self.windows if s.subsets]
        if lds_w:
            parts.append(f"LDS over {len(lds_w[0].subsets)} subsets of each window")
        if self.run_lds is not None:
            parts.append(f"LDS over {len(self.run_lds.subsets)} subsets of the whole run")
        return "; ".join(parts) + f"; {len(self.qsel)} queries"


def choose_queries(n_queries: int, opts: ValidateOptions) -> np.ndarray:
    """Positions of the compared queries among the recorded ones: a seeded random subset."""
    q = n_queries if opts.n_queries is None else min(opts.n_queries, n_queries)
    rng = np.random.default_rng([opts.seed, 1])
    return np.sort(rng.choice(n_queries, size=q, replace=False)) if q < n_queries else np.arange(n_queries)


def make_plan(run: Run, opts: ValidateOptions, start_of: Callable[[int], int], qsel: np.ndarray) -> Plan:
    """The full plan before any budget (see the module docstring)."""
    rng = np.random.default_rng(opts.seed)
    T = run.final_step
    wins = choose_windows(run, opts)
    scopes = []
    for w in wins:
        te = w[1] if opts.eval_at == "window_end" else T
        present = np.unique(np.concatenate([run.step_sample_ids(int(t)) for t in run.steps_in(w, skip_nonfinite=False)]))
        samples = np.sort(rng.permutation(present)[:opts.samples]) if len(present) else present
        subsets = _subsets(rng, present, opts.lds_subsets, opts.lds_fraction) if opts.lds in ("both", "windows") else []
        scopes.append(Scope(W.label(run.table, w), w, te, start_of(w[0]), present, samples, subsets, opts.lds_fraction))
    run_lds = None
    if opts.lds in ("both", "run"):
        w = (run.first_step, run.last_step + 1)
        present = run.sample_ids
        run_lds = Scope("whole run", w, T, start_of(w[0]), present, present[:0],
                        _subsets(rng, present, opts.lds_subsets, opts.lds_fraction), opts.lds_fraction, kind="run")
    return Plan(scopes, run_lds, qsel)


def _subsets(rng: np.random.Generator, present: np.ndarray, m: int, fraction: float) -> list[np.ndarray]:
    """m random subsets keeping round(fraction * n) of the present samples: the ids each DROPS."""
    n = len(present)
    keep = max(1, min(n - 1, int(round(fraction * n))))
    return [np.sort(present[rng.permutation(n)[keep:]]) for _ in range(m)]


def choose_windows(run: Run, opts: ValidateOptions) -> list[Window]:
    if opts.epochs is not None:
        return W.normalize(run.table, epochs=opts.epochs)[0]
    if opts.windows != "auto":
        return W.normalize(run.table, windows=opts.windows)[0]
    n = opts.n_windows
    eps = W.epoch_windows(run.table)
    if len(eps) >= 2:
        pick = sorted({int(round(x)) for x in np.linspace(0, len(eps) - 1, min(n, len(eps)))})
        wins = [eps[i] for i in pick]
    else:
        a, b = run.first_step, run.last_step + 1
        L = max(1, (b - a) // (2 * n))
        starts = sorted({int(round(x)) for x in np.linspace(a, b - L, n)})
        wins = [(s, s + L) for s in starts]
    if opts.eval_at == "window_end":  # end where query gradients were recorded (dit none / fisher need them)
        qs = run.query_steps
        wins = [_end_at_query(w, qs) for w in wins]
    return wins


def _end_at_query(w: Window, qs: np.ndarray) -> Window:
    t1, t2 = w
    ok = qs[(qs > t1) & (qs <= t2)]
    return (t1, int(ok[-1])) if len(ok) else w


# ---------------------------------------------------------------------- the budget
def fit_budget(plan: Plan, cost: Callable[[Plan], float], budget: float | None, unit: str) -> Plan:
    """The plan, reduced to cost at most `budget`: fewer samples and subsets (down to MIN_SAMPLES and
    MIN_SUBSETS), then fewer windows (the last one kept), then no whole-run LDS. ConfigurationError
    when even the smallest plan does not fit."""
    if budget is None or cost(plan) <= budget:
        return plan
    full = cost(plan)
    M = max([len(s.samples) for s in plan.windows] or [0])
    m = max([len(s.subsets) for s in plan.scopes] or [0])

    def scaled(p: Plan, f: float) -> Plan:
        ms, mm = max(min(M, MIN_SAMPLES), int(M * f)), max(min(m, MIN_SUBSETS), int(m * f))
        return replace(p, windows=[s.shrunk(ms, mm) for s in p.windows],
                       run_lds=p.run_lds.shrunk(0, mm) if p.run_lds is not None else None)

    candidates = [plan]
    ws = list(plan.windows)
    while len(ws) > 1:  # drop the middle windows first, keep the first and the last longest
        ws.pop(len(ws) // 2 if len(ws) > 2 else 0)
        candidates.append(replace(plan, windows=list(ws)))
    if plan.run_lds is not None:
        candidates.append(replace(plan, windows=list(ws), run_lds=None))
    for cand in candidates:
        if cost(scaled(cand, 0.0)) > budget:
            continue
        lo, hi = 0.0, 1.0
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost(scaled(cand, mid)) <= budget else (lo, mid)
        out = scaled(cand, lo)
        out.notes = plan.notes + [_reduction_note(plan, out, full, cost(out), budget, unit)]
        return out
    smallest = cost(scaled(candidates[-1], 0.0))
    raise ConfigurationError(
        f"the budget of {budget:,.0f} {unit} is below the smallest validation ({smallest:,.0f} {unit}: one window "
        f"with {MIN_SAMPLES} samples). Raise the budget, or choose a shorter window (windows=[(t1, t2)]) that "
        "starts at a checkpoint.")


def _reduction_note(before: Plan, after: Plan, c0: float, c1: float, budget: float, unit: str) -> str:
    what = []
    if len(after.windows) < len(before.windows):
        what.append(f"windows {len(before.windows)} -> {len(after.windows)}")
    if before.windows and after.windows and len(after.windows[0].samples) < len(before.windows[0].samples):
        what.append(f"samples per window {len(before.windows[0].samples)} -> {len(after.windows[0].samples)}")
    b_sub = max([len(s.subsets) for s in before.scopes] or [0])
    a_sub = max([len(s.subsets) for s in after.scopes] or [0])
    if a_sub < b_sub:
        what.append(f"LDS subsets {b_sub} -> {a_sub}")
    if before.run_lds is not None and after.run_lds is None:
        what.append("whole-run LDS left out")
    return (f"the budget ({budget:,.0f} {unit}) reduced the plan from {c0:,.0f} to {c1:,.0f} {unit}: "
            + ", ".join(what))


def interpolated(sizes: list[int], seconds: list[float]) -> Callable[[int], float]:
    """time(k): seconds per step of k models, interpolated between the timed sizes (clamped
    outside them)."""
    xs, ys = np.asarray(sizes, np.float64), np.asarray(seconds, np.float64)
    return lambda k: float(np.interp(k, xs, ys))


def fmt_seconds(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    return f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"

