"""Windows of training: half-open ranges of optimizer steps [t1, t2), and every way to name one.

This module is the one home of the window concept. Everything that takes a window (the reader,
every aggregator, the reports and both command lines) goes through it:

- the command-line grammar: ``T1:T2`` step windows and ``E``, ``E1:E2`` or ``each`` epochs;
- the Python forms: ``window=(t1, t2)``, ``epochs=(e1, e2)`` / ``epochs=e`` / ``epochs=[...]`` /
  ``epochs='each'``, ``windows=[(t1, t2), ...]``, or nothing (the whole run);
- checking them against the steps a run recorded, clipping them to those steps (with a warning,
  so a result always names the window it really covers), merging many windows into disjoint
  spans for one pass over the shards, and labelling them ('epoch 3', 'steps 40-80').

The functions take a *step table*: anything with the sorted int arrays ``steps`` and ``epochs``
and the bool arrays ``nonfinite`` and ``skipped`` (``storage.index.StepTable``). Only numpy is
imported here, so the command line can use the grammar without loading torch.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from .errors import ConfigurationError, WindowError

Window = tuple[int, int]

WINDOW_FORMS = "half-open step windows T1:T2, comma-separated (e.g. 0:100 or 0:100,100:200)"
EPOCH_FORMS = ("'each' alone, or epochs E and epoch ranges E1:E2 (epochs E1..E2-1), comma-separated "
               "(e.g. 3 or 0:2 or 0,2:4)")


class StepTableLike(Protocol):
    steps: np.ndarray
    epochs: np.ndarray
    nonfinite: np.ndarray
    skipped: np.ndarray


# ---------------------------------------------------------------------- text grammar
def _items(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _pair(text: str) -> tuple[int, int]:
    a, b = text.split(":")  # ValueError unless exactly one ':'
    return int(a), int(b)


def parse_windows_text(text: str) -> list[Window]:
    """'T1:T2,...' -> [(t1, t2), ...]; WindowError naming the accepted forms otherwise."""
    try:
        wins = [_pair(item) for item in _items(text)]
    except ValueError:
        wins = []
    if not wins:
        raise WindowError(f"{text!r}: expected {WINDOW_FORMS}")
    return wins


def parse_epochs_text(text: str) -> str | list[int | tuple[int, int]]:
    """'each' | 'E,E1:E2,...' -> 'each' | [e or (e1, e2), ...], the aggregators' epochs=."""
    items = _items(text)
    if items == ["each"]:
        return "each"
    try:
        eps: list[int | tuple[int, int]] = [_pair(item) if ":" in item else int(item) for item in items]
    except ValueError:
        eps = []
    if not eps:
        raise WindowError(f"{text!r}: expected {EPOCH_FORMS}")
    return eps


def window_kwargs(windows: Sequence[Sequence[Window]] | None = None,
                  epochs: Sequence[Any] | None = None) -> dict[str, Any]:
    """Keyword arguments of an aggregator from repeated command-line options: `windows` is a list
    of parse_windows_text results, `epochs` a list of parse_epochs_text results."""
    if windows and epochs:
        raise ConfigurationError("give --window or --epochs, not both")
    if windows:
        wins = [w for item in windows for w in item]
        return {"windows": wins} if len(wins) > 1 else {"window": wins[0]}
    if epochs:
        if "each" in epochs:
            if len(epochs) > 1:
                raise ConfigurationError(f"--epochs: expected {EPOCH_FORMS}")
            return {"epochs": "each"}
        eps = [e for item in epochs for e in item]
        return {"epochs": eps} if len(eps) > 1 else {"epochs": eps[0]}
    return {}


# ---------------------------------------------------------------------- against a run's steps
def _require_steps(table: StepTableLike) -> None:
    if len(table.steps) == 0:
        raise WindowError("the run holds no finished steps, so no window can be chosen in it.")


def resolve(table: StepTableLike, window: Any = None, *, epochs: tuple[int, int] | None = None) -> Window:
    """Check one window and return it as (t1, t2), clipped to the recorded steps (with a warning).

    window=None and epochs=None: the whole run. epochs=(e1, e2): the steps of epochs e1..e2-1.
    """
    _require_steps(table)
    if window is not None and epochs is not None:
        raise WindowError("give either window=(t1, t2) or epochs=(e1, e2), not both.")
    if epochs is not None:
        return epoch_window(table, *epochs)
    first, last = int(table.steps[0]), int(table.steps[-1])
    if window is None:
        return first, last + 1
    try:
        t1, t2 = (int(window[0]), int(window[1]))
        if len(window) != 2:
            raise ValueError
    except (TypeError, ValueError, IndexError):
        raise WindowError(f"a window is a pair of steps (t1, t2), got {window!r}") from None
    if t2 <= t1:
        raise WindowError(f"window [{t1}, {t2}) is empty: t2 must be greater than t1.")
    if t2 <= first or t1 > last:
        raise WindowError(f"window [{t1}, {t2}) lies outside the recorded steps [{first}, {last + 1}).")
    if not ((table.steps >= t1) & (table.steps < t2)).any():
        raise WindowError(f"no recorded step falls in window [{t1}, {t2}).")
    c1, c2 = max(t1, first), min(t2, last + 1)
    if (c1, c2) != (t1, t2):  # results name the window they really cover
        warnings.warn(f"window [{t1}, {t2}) reaches beyond the recorded steps [{first}, {last + 1}); "
                      f"using [{c1}, {c2}).", RuntimeWarning, stacklevel=3)
    return c1, c2


def epoch_window(table: StepTableLike, e1: int, e2: int | None = None) -> Window:
    """Steps of epochs [e1, e2) (e2 = e1 + 1 by default) as a half-open window."""
    _require_steps(table)
    e2 = e1 + 1 if e2 is None else e2
    mask = (table.epochs >= e1) & (table.epochs < e2)
    recorded = sorted({int(e) for e in table.epochs})
    if e2 <= e1 or not mask.any():
        raise WindowError(f"no recorded step in epochs [{e1}, {e2}); recorded epochs: {recorded}")
    if e1 < recorded[0] or e2 > recorded[-1] + 1:
        warnings.warn(f"epochs [{e1}, {e2}) reach beyond the recorded epochs {recorded[0]}..{recorded[-1]}; "
                      "using the recorded ones.", RuntimeWarning, stacklevel=3)
    sel = table.steps[mask]
    return int(sel.min()), int(sel.max()) + 1


def epoch_windows(table: StepTableLike) -> list[Window]:
    """One window per recorded epoch, in order."""
    return [epoch_window(table, int(e)) for e in np.unique(table.epochs)]


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_pair(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(_is_int(v) for v in x)


def normalize(table: StepTableLike, window: Any = None, epochs: Any = None,
              windows: Any = None) -> tuple[list[Window], bool]:
    """The window arguments of an aggregator as checked windows, and whether a list was asked for.

    window=(t1, t2): one window; epochs=(e1, e2) (epochs e1..e2-1) or epochs=e: one window;
    windows=[(t1, t2), ...] or epochs=[e or (e1, e2), ...] or epochs='each': many windows.
    Nothing given: the whole run.
    """
    if sum(x is not None for x in (window, epochs, windows)) > 1:
        raise WindowError("give one of window=(t1, t2), epochs=..., windows=[...], not several.")
    if windows is not None:
        if isinstance(windows, (str, bytes)) or not isinstance(windows, Iterable):
            raise WindowError(f"windows= takes a list of (t1, t2) pairs, got {windows!r}")
        windows = list(windows)
        if not windows:
            raise WindowError("windows= is an empty list: give at least one (t1, t2) window.")
        return [resolve(table, w) for w in windows], True
    if epochs is not None:
        return _normalize_epochs(table, epochs)
    if isinstance(window, (list, tuple)) and window and all(isinstance(w, (list, tuple)) for w in window):
        raise WindowError(f"window= takes one (t1, t2) pair; for several windows in one pass use "
                          f"windows={list(window)!r}.")
    return [resolve(table, window)], False


def _normalize_epochs(table: StepTableLike, epochs: Any) -> tuple[list[Window], bool]:
    what = f"epochs= takes (e1, e2), an epoch, a list of them or 'each'; got {epochs!r}"
    if isinstance(epochs, str):
        if epochs != "each":
            raise WindowError(what)
        return epoch_windows(table), True
    if _is_int(epochs):
        return [epoch_window(table, int(epochs))], False
    if isinstance(epochs, tuple) and _is_pair(epochs):
        return [epoch_window(table, int(epochs[0]), int(epochs[1]))], False
    if not isinstance(epochs, (list, tuple)):
        raise WindowError(what)
    if not epochs:
        raise WindowError("epochs= is an empty list: give at least one epoch.")
    out = []
    for e in epochs:
        if _is_int(e):
            out.append(epoch_window(table, int(e)))
        elif _is_pair(e):
            out.append(epoch_window(table, int(e[0]), int(e[1])))
        else:
            raise WindowError(f"an epoch range is e or (e1, e2), got {e!r}")
    return out, True


def merge(windows: Sequence[Window]) -> list[Window]:
    """The union of windows as disjoint sorted step ranges (each one pass over the shards)."""
    out: list[list[int]] = []
    for t1, t2 in sorted(windows):
        if out and t1 <= out[-1][1]:
            out[-1][1] = max(out[-1][1], t2)
        else:
            out.append([t1, t2])
    return [(a, b) for a, b in out]


def step_mask(table: StepTableLike, window: Window, *, skip_nonfinite: bool = True) -> np.ndarray:
    """Bool mask over table.steps of the steps in [t1, t2); without the flagged steps (non-finite
    gradients, or not applied by the optimizer) when skip_nonfinite."""
    t1, t2 = window
    mask = (table.steps >= t1) & (table.steps < t2)
    if skip_nonfinite:
        mask &= ~(table.nonfinite | table.skipped)
    return mask


def steps_in(table: StepTableLike, window: Any = None, *, skip_nonfinite: bool = True) -> np.ndarray:
    """The recorded steps of a window (checked and clipped like `resolve`)."""
    return table.steps[step_mask(table, resolve(table, window), skip_nonfinite=skip_nonfinite)]


def rows_slice(steps: np.ndarray, window: Window) -> slice | None:
    """The slice of rows with t1 <= step < t2 in a sorted step column, ascending or descending
    (None: no such row)."""
    t1, t2 = window
    if len(steps) == 0:
        return None
    if steps[0] <= steps[-1]:
        a, b = np.searchsorted(steps, t1, "left"), np.searchsorted(steps, t2, "left")
    else:
        neg = -steps
        a, b = np.searchsorted(neg, -t2 + 1, "left"), np.searchsorted(neg, -t1 + 1, "left")
    return slice(int(a), int(b)) if b > a else None


def end_at(window: Window, available: np.ndarray, what: str) -> Window:
    """The window ending at its end t2 if t2 is among the `available` steps (sorted), otherwise at
    the latest available step inside it, with a warning; WindowError if there is none."""
    t1, t2 = window
    if t2 in set(available.tolist()):
        return window
    i = int(np.searchsorted(available, t2, side="right")) - 1
    if i < 0 or int(available[i]) <= t1:
        raise WindowError(f"window [{t1}, {t2}) has no {what} at or before its end (recorded at "
                          f"{available[:8].tolist()}...); record them more often or choose windows "
                          "that end where they were recorded.")
    q = int(available[i])
    warnings.warn(f"window [{t1}, {t2}) ends at step {q} instead, the latest step with {what}.",
                  RuntimeWarning, stacklevel=3)
    return t1, q


def label(table: StepTableLike, window: Window) -> str:
    """'epoch 3', 'epochs 3-5' when the window is exactly whole epochs, else 'steps t1-t2'."""
    t1, t2 = window
    mask = (table.steps >= t1) & (table.steps < t2)
    eps = np.unique(table.epochs[mask])
    if len(eps) and eps[-1] - eps[0] + 1 == len(eps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            whole = epoch_window(table, int(eps[0]), int(eps[-1]) + 1) == (t1, t2)
        if whole:
            return f"epoch {eps[0]}" if len(eps) == 1 else f"epochs {eps[0]}-{eps[-1]}"
    return f"steps {t1}-{t2}"
