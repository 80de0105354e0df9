"""The parameters w_t along a range of steps, for estimators that need the model itself.

Two sources, chosen per call (`ParameterTrajectory.plan`):

- snapshots recorded during training (RecordingConfig.snapshot_every_n_steps / snapshot_windows),
  when one exists at every step needed: read from disk one step at a time, newest first;
- a replay of the recorded steps from the latest checkpoint at or before the range (with the
  recorded batch ids and learning rates, and the optimizer's update from `optimizers.py`). For an
  optimizer without state (plain SGD), a snapshot of the whole model is as good a starting point
  as a checkpoint.

The backward recursion visits steps newest first, a replay produces them oldest first. A replay
keeps at most `max_memory` bytes of parameter vectors (|w| bytes each): when the n steps of the range
fit, one forward replay keeps every w_t. Otherwise the range is cut into segments: a first replay
keeps the state (w, and the optimizer's state) at each segment start, then each segment, last first,
is replayed again from its start into memory and handed out newest first. With segments of
S ~ sqrt(n * state/|w|) steps the starts and one segment fit in memory together when
S + (n / S) * state/|w| <= max_memory / |w|; otherwise segments get max_memory / |w| steps and their
starts go to a temporary directory (cache_dir). Cost: one optimizer step (a forward and backward pass
over the batch) per step from the checkpoint to the range, and one, or two when in segments, per
step of the range.
"""

from __future__ import annotations

import math
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from ...errors import ConfigurationError, MissingDataError, short_list
from ...storage.reader import Run
from .optimizers import OptimizerForm

Params = dict[str, Tensor]
#: grad_fn(step, params) -> grad L_step at params, for every trainable parameter
GradFn = Callable[[int, Params], Params]


@dataclass
class State:
    """w_t and the optimizer state before step t (None where unknown or not needed). first: step t
    is the optimizer's first (its state starts fresh there)."""

    step: int
    params: Params
    opt: dict[str, Any] | None
    first: bool


@dataclass
class Plan:
    source: str                  # 'snapshots' | 'replay'
    lo: int
    hi: int
    start: int | None = None     # replay: the step of the starting point
    start_kind: str | None = None  # 'checkpoint' | 'snapshot'
    segment: int | None = None   # replay: steps per segment (None: one segment)
    held: list[str] | None = None  # snapshots: parameters not in them, held at their given values
    states_on_disk: bool = False   # replay in segments: segment starts kept in a temporary directory

    def describe(self) -> str:
        if self.source == "snapshots":
            return f"parameters w_t for steps {self.lo}..{self.hi} read from snapshots recorded in training"
        seg = (f", in segments of {self.segment} steps (2 replays; segment starts kept "
               f"{'on disk' if self.states_on_disk else 'in memory'})" if self.segment else "")
        return (f"parameters w_t for steps {self.lo}..{self.hi} replayed from the {self.start_kind} at step "
                f"{self.start} with the recorded batches and learning rates{seg}")


class ParameterTrajectory:
    """Yields the states (t, w_t, optimizer state) for t = hi, hi - 1, ..., lo.

    names: every parameter the caller needs in w_t (the model's trainable parameters for a replay).
    init: values for names no snapshot holds (the model's own) and the buffers.
    form: the optimizer update to replay (None: no replay possible). grad_fn: see GradFn.
    source: 'auto' | 'snapshots' | 'replay'. max_memory: bytes of parameter vectors kept at once.
    """

    def __init__(self, run: Run, names: list[str], init: Params, form: OptimizerForm | None, grad_fn: GradFn, *,
                 dtype: torch.dtype, device: torch.device, source: str = "auto",
                 max_memory: int = 2 << 30, cache_dir: str | None = None,
                 snapshot_names: list[str] | None = None):
        if source not in ("auto", "snapshots", "replay"):
            raise ConfigurationError(f"source must be 'auto', 'snapshots' or 'replay', got {source!r}")
        self.run, self.names, self.init, self.form, self.grad_fn = run, list(names), init, form, grad_fn
        self.dtype, self.device, self.source = dtype, device, source
        self.max_memory, self.cache_dir = int(max_memory), cache_dir
        # names that must come from snapshots for the snapshot source (others are held at init)
        self.snapshot_names = list(snapshot_names if snapshot_names is not None else names)
        self.vector_bytes = sum(init[n].numel() for n in self.names) * torch.finfo(dtype).bits // 8
        self.replay_checks: list[tuple[int, float]] = []
        self.replayed_steps = 0
        self._snap_names: dict[int, set[str]] = {}
        self._checked: set[int] = set()

    # ------------------------------------------------------------------ planning
    def _snapshot_keys(self, step: int) -> set[str]:
        if step not in self._snap_names:
            self._snap_names[step] = self.run.parameter_names(step, "snapshot")
        return self._snap_names[step]

    def _snapshots_hold_state(self, lo: int, hi: int) -> bool:
        """Whether the snapshots of [lo, hi] hold the optimizer state the recursion needs (Adam's
        moments) for the attributed parameters; always true for optimizers that need none."""
        if self.form is None or not self.form.needs_state:
            return True
        first = int(self.run.first_step)
        for t in (lo, hi):  # recorded together: the ends stand for the window
            if t != first and not set(self.snapshot_names) <= self.run.optimizer_state_names(t, "snapshot"):
                return False
        return True

    def _full_snapshot(self, step: int) -> bool:
        return set(self.names) <= self._snapshot_keys(step)

    def plan(self, lo: int, hi: int) -> Plan:
        """How w_lo..w_hi will be obtained; raises MissingDataError if they cannot be.

        Preference: snapshots holding every needed parameter; a replay; snapshots holding only the
        attributed parameters (`snapshot_names`), the others held at `init` (Plan.held says which).
        """
        snaps = set(self.run.snapshot_steps.tolist())
        covered = all(t in snaps for t in range(lo, hi + 1)) and self._snapshots_hold_state(lo, hi)
        keys = self._snapshot_keys(hi) if covered else set()
        if covered and self.source != "replay" and set(self.names) <= keys:
            return Plan("snapshots", lo, hi)
        start = self._replay_start(lo) if self.source != "snapshots" else None
        if start is not None:
            step, kind = start
            self._require_recorded(step, hi)
            n = hi - lo + 1
            budget = self.max_memory // max(self.vector_bytes, 1)  # parameter vectors
            per_state = 1 + len(self.form.slots)  # w and the optimizer's state tensors
            if n * per_state <= budget:
                return Plan("replay", lo, hi, start=step, start_kind=kind)
            seg = max(1, math.ceil(math.sqrt(n * per_state)))
            if seg + math.ceil(n / seg) * per_state <= budget:
                return Plan("replay", lo, hi, start=step, start_kind=kind, segment=seg, states_on_disk=False)
            return Plan("replay", lo, hi, start=step, start_kind=kind, segment=max(1, budget - per_state),
                        states_on_disk=True)
        if covered and self.source != "replay" and set(self.snapshot_names) <= keys:
            return Plan("snapshots", lo, hi, held=[n for n in self.names if n not in keys])
        if covered and self.source != "replay":
            missing = [n for n in self.snapshot_names if n not in keys]
            raise MissingDataError(
                f"the snapshots lack parameter(s) {missing[:5]}{'...' if len(missing) > 5 else ''}: they were "
                "recorded with snapshot_scope='layers'. Use params='recorded', or record "
                "snapshot_scope='model' (or checkpoints, to replay from).")
        if self.source == "snapshots":
            have = sorted(t for t in snaps if lo <= t <= hi)
            raise MissingDataError(
                f"source='snapshots' needs a parameter snapshot at every step {lo}..{hi}; "
                f"{(hi - lo + 1) - len(have)} of them are missing (snapshots at "
                f"{short_list(sorted(snaps))}). Record snapshot_windows=[({lo}, {hi + 1})], or let the "
                "parameters be replayed from a checkpoint (source='auto').")
        raise MissingDataError(
            f"exact curvature needs the parameters w_t at steps {lo}..{hi}, and the run has "
            f"{self._why_no_replay(lo, hi)}. Record snapshots of those steps (snapshot_windows=[({lo}, "
            f"{hi + 1})], snapshot_scope='model' when params='model') or checkpoints "
            "(checkpoint_every_n_steps=N: the parameters are then replayed from the checkpoint at or "
            "before the window).")

    def _replay_start(self, lo: int) -> tuple[int, str] | None:
        if self.form is None:
            return None
        cands = [(int(t), "checkpoint") for t in self.run.checkpoint_steps if t <= lo]
        if self.form.stateless:
            cands += [(int(t), "snapshot") for t in self.run.snapshot_steps
                      if t <= lo and self._full_snapshot(int(t))]
        if not cands:
            return None
        return max(cands, key=lambda c: (c[0], c[1] == "checkpoint"))

    def _why_no_replay(self, lo: int, hi: int) -> str:
        snaps = self.run.snapshot_steps
        parts = [f"snapshots at {short_list(snaps)}" if len(snaps) else "no parameter snapshots"]
        ck = self.run.checkpoint_steps
        if self.form is None:
            parts.append(f"its optimizer ({self.run.optimizer.get('name', 'unknown')}) cannot be replayed "
                         "(SGD, Adam and AdamW can)")
        elif self.form.needs_state and len(snaps):
            parts.append(f"{self.form.name} needs its moments along the window, which the snapshots do not "
                         "hold (they were recorded before optimizer state was saved with them)")
        elif len(ck):
            parts.append(f"no checkpoint at or before step {lo} (checkpoints at {short_list(ck)})")
        else:
            parts.append("no checkpoints")
        return ", ".join(parts)

    def _require_recorded(self, a: int, b: int) -> None:
        rec = set(self.run.steps.tolist())
        missing = [t for t in range(a, b) if t not in rec]
        if missing:
            raise MissingDataError(
                f"replaying steps {a}..{b - 1} needs the batch (sample ids) of each, but steps "
                f"{short_list(missing)} are not in the recording; record snapshots of the window instead.")

    # ------------------------------------------------------------------ iteration
    def reverse(self, plan: Plan) -> Iterator[State]:
        """The states for t = plan.hi down to plan.lo."""
        if plan.source == "snapshots":
            first = int(self.run.first_step)
            for t in range(plan.hi, plan.lo - 1, -1):
                params = self._load_snapshot(t)
                yield State(t, params, self._snapshot_state(t, params), t == first)
            return
        state = self._load_start(plan)
        if plan.segment is None:
            kept = [st for st in self._forward(state, plan.hi) if st.step >= plan.lo]
            yield from reversed(kept)
            return
        with tempfile.TemporaryDirectory(prefix="influence_hooks_replay_", dir=self.cache_dir) as tmp:
            starts = list(range(plan.lo, plan.hi + 1, plan.segment))
            kept_states: dict[int, State] = {}
            for st in self._forward(state, starts[-1]):
                if st.step in starts:
                    if plan.states_on_disk:  # a temporary cache of tensors, read with weights_only
                        torch.save({"params": st.params, "opt": st.opt, "first": st.first},
                                   Path(tmp) / f"state_{st.step}.pt")
                    else:
                        kept_states[st.step] = st
            for k in range(len(starts) - 1, -1, -1):
                if plan.states_on_disk:
                    path = Path(tmp) / f"state_{starts[k]}.pt"
                    d = torch.load(path, weights_only=True)
                    path.unlink()
                    begin = State(starts[k], d["params"], d["opt"], d["first"])
                else:
                    begin = kept_states.pop(starts[k])
                end = min(plan.hi, starts[k] + plan.segment - 1)
                yield from reversed(list(self._forward(begin, end)))

    def _load_snapshot(self, t: int) -> Params:
        snap = self.run.load_parameters(t, "snapshot")
        return {n: (snap[n] if n in snap else self.init[n]).to(device=self.device, dtype=self.dtype)
                for n in self.names}

    def _snapshot_state(self, t: int, params: Params) -> dict[str, Any] | None:
        if self.form is None or not self.form.needs_state:
            return None
        return self.form.init_state(params, self._saved_state(t, "snapshot"))

    def _saved_state(self, t: int, kind: str) -> dict[str, dict[str, Tensor]]:
        return {n: {k: v.to(device=self.device, dtype=self.dtype if v.is_floating_point() else v.dtype)
                    for k, v in st.items()}
                for n, st in self.run.load_optimizer_state(t, kind).items()}

    def _load_start(self, plan: Plan) -> State:
        vals = self.run.load_parameters(plan.start, plan.start_kind)
        missing = [n for n in self.names if n not in vals]
        if missing:
            raise MissingDataError(f"the {plan.start_kind} at step {plan.start} lacks parameter(s) "
                                   f"{missing[:5]}: the model does not match the run.")
        params = {n: vals[n].to(device=self.device, dtype=self.dtype) for n in self.names}
        saved = None
        if plan.start_kind == "checkpoint" and not self.form.stateless:
            saved = self._saved_state(plan.start, "checkpoint")
        opt = self.form.init_state(params, saved)
        return State(plan.start, params, opt, opt is None)

    def _forward(self, state: State, stop: int) -> Iterator[State]:
        """state at its step, then each following state up to step `stop`."""
        snaps = set(self.run.snapshot_steps.tolist())
        yield state
        while state.step < stop:
            state = self._step(state)
            self.replayed_steps += 1
            if state.step in snaps and state.step not in self._checked:
                self._checked.add(state.step)
                self._check_drift(state)
            yield state

    @torch.no_grad()
    def _step(self, state: State) -> State:
        t = state.step
        lr = float(self.run.lrs[self.run.step_position(t)])
        with torch.enable_grad():
            grads = self.grad_fn(t, state.params)
        params, opt = self.form.step(state.params, state.opt, grads, lr)
        return State(t + 1, params, opt, False)

    def _check_drift(self, state: State) -> None:
        snap = self.run.load_parameters(state.step, "snapshot")
        num = den = 0.0
        for n, v in state.params.items():
            if n in snap:
                s = snap[n].to(device=v.device, dtype=v.dtype)
                num += float((v - s).pow(2).sum())
                den += float(s.pow(2).sum())
        if den > 0:
            rel = math.sqrt(num / den)
            self.replay_checks.append((state.step, rel))
            if rel > 1e-3:
                warnings.warn(f"the replayed parameters differ from the snapshot at step {state.step} by "
                              f"{rel:.2e} (relative): the replay does not reproduce training exactly "
                              "(dataset, loss, precision or nondeterminism differ).", RuntimeWarning)
