"""Removal tasks: what the backward passes of windowed influence compute, for both modes.

A `Task` is one window-removal estimate R(i, q; [start, end), eval_step) (README, "Which samples
mattered, and when"): the query is carried back from eval_step, and the steps [start, end) are
scored. A window is one task (mode 'removal') or the difference of two (mode 'accrued'):

    A(i, q; [t1, t2)) = R(i, q; [first, t2), t2) - R(i, q; [first, t1), t1)

`TaskPlan` plans the tasks of many windows (sharing tasks between them: consecutive accrued windows
share an end), and turns the accumulated task scores back into one result per window. The
recorded-space pass (dit.py) and the full-space pass (fullspace/) both use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigurationError, WindowError
from ..windows import Window
from .scores import ScoreAccumulator

MODES = ("removal", "accrued")


@dataclass(frozen=True, order=True)
class Task:
    """Score the steps [start, end) with the query carried back from eval_step (>= end).
    Ordered by eval_step first: the order in which a backward pass meets them."""

    eval_step: int
    start: int
    end: int


def resolve_eval_step(eval_step: int | str | None, t2: int, final_step: int) -> int:
    """The evaluation step t_e of a removal window ending at t2: t2 by default, 'final' (T) or a step."""
    if eval_step is None:
        return t2
    if isinstance(eval_step, str):
        if eval_step != "final":
            raise ConfigurationError(f"eval_step is a step number or 'final', got {eval_step!r}")
        te = final_step
    else:
        te = int(eval_step)
    if te < t2:
        raise WindowError(f"eval_step {te} lies before the window end {t2}: the query must be evaluated "
                          "at or after the last step of the window.")
    if te > final_step:
        raise WindowError(f"evaluation step {te} lies after the end of training (step {final_step}).")
    return te


@dataclass
class TaskPlan:
    mode: str
    windows: list[Window]
    first: int
    pairs: list[tuple[Task, Task | None]]  # per window: its value is a minus b
    tasks: list[Task]  # unique, sorted

    @classmethod
    def build(cls, mode: str, windows: list[Window], *, first_step: int, final_step: int,
              eval_step: int | str | None = None) -> "TaskPlan":
        """first_step: where whole-run removal starts (the run's first recorded step)."""
        if mode not in MODES:
            raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "accrued" and eval_step is not None:
            raise ConfigurationError("accrued influence is evaluated at the window's own ends (t1 and t2); "
                                     "eval_step applies to mode='removal' only.")
        pairs: list[tuple[Task, Task | None]] = []
        for t1, t2 in windows:
            if mode == "removal":
                pairs.append((Task(resolve_eval_step(eval_step, t2, final_step), t1, t2), None))
            else:
                pairs.append((Task(t2, first_step, t2), Task(t1, first_step, t1) if t1 > first_step else None))
        tasks = sorted({t for pair in pairs for t in pair if t is not None})
        return cls(mode=mode, windows=list(windows), first=first_step, pairs=pairs, tasks=tasks)

    @property
    def span(self) -> tuple[int, int]:
        """(lowest scored step, highest evaluation step): the steps a backward pass visits."""
        return min(t.start for t in self.tasks), max(t.eval_step for t in self.tasks)

    @property
    def eval_steps(self) -> list[int]:
        return sorted({t.eval_step for t in self.tasks})

    def accumulator(self, n: int, q: int, *, dtype: torch.dtype, device: torch.device) -> ScoreAccumulator:
        """One accumulator target per task, in `tasks` order."""
        return ScoreAccumulator(len(self.tasks), n, q, dtype=dtype, device=device)

    def result(self, w: int, acc: ScoreAccumulator) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, present) of window w from the task scores. For accrued influence, present means
        that the sample occurs in [first, t2)."""
        a, b = self.pairs[w]
        values, present = acc.compute(self.tasks.index(a))
        if b is not None:
            values = values - acc.compute(self.tasks.index(b))[0]
        return values, present

    def eval_step_of(self, w: int) -> int:
        return self.pairs[w][0].eval_step

    def scored_range(self, w: int) -> tuple[int, int]:
        """The steps whose data the result of window w depends on: [start, eval_step)."""
        a = self.pairs[w][0]
        return a.start, a.eval_step

    def meta(self, w: int) -> dict[str, Any]:
        if self.mode == "removal":
            return {"mode": self.mode}
        t1, t2 = self.windows[w]
        return {"mode": self.mode, "eval_steps": [t1, t2] if self.pairs[w][1] is not None else [t2],
                "present_means": f"the sample occurs in [{self.first}, {t2})"}

    def notes(self, w: int) -> list[str]:
        if self.mode == "accrued" and self.first > 0:
            return [f"the run's recording starts at step {self.first}: 'whole-run' removal starts there"]
        return []
