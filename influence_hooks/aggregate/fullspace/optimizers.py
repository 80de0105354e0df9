"""The recorded optimizer's update, forward (to replay w_t) and linearized backward (the adjoint).

Each supported optimizer is one `OptimizerForm`, the single place that knows its update rule:

- `init_state` / `step`: the update w_t -> w_{t+1} with its state (replay from a checkpoint);
- `direction` / `pull_back`: one step of the adjoint recursion. With the adjoint A of the state
  after step t (A['w'] for the parameters, plus one entry per state tensor), `direction` gives
  p = df/dg_t, the adjoint of the step's gradient; the full-space pass then computes H_t p and
  every g_t(i) . p, scores sample i with -w_t p . g_t(i) (removing i adds -w_t g_t(i) to g_t), and
  `pull_back` gives the adjoint of the state before step t.

Plain SGD is REFERENCE.md's recursion: p = -eta u, u <- u + H p.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import ConfigurationError
from ...storage.reader import Run

Params = dict[str, Tensor]
#: the adjoint of the optimizer state after a step: {'w': {name: [C, *shape]}, <state slot>: {...}}
Adjoint = dict[str, Params]

_SGD_KEYS = ("momentum", "dampening", "weight_decay", "nesterov", "maximize")


class OptimizerForm:
    """Interface; see the module docstring. `slots`: the adjoint's entries besides 'w'."""

    name = "optimizer"
    slots: tuple[str, ...] = ()
    #: whether `direction` needs the optimizer state and the batch gradient of each step
    needs_state: bool = False

    @property
    def plain(self) -> bool:
        return False

    @property
    def stateless(self) -> bool:
        return not self.slots

    def describe(self) -> str:
        return self.name

    def init_state(self, params: Params, saved: dict[str, dict[str, Tensor]] | None) -> dict[str, Any] | None:
        """The state before the first replayed step from a checkpoint's optimizer state (None: fresh)."""
        return None

    def step(self, params: Params, state: dict[str, Any] | None, grads: Params, lr: float
             ) -> tuple[Params, dict[str, Any] | None]:
        raise NotImplementedError

    def direction(self, A: Adjoint, state: dict[str, Any] | None, grad: Params | None, lr: float,
                  first: bool) -> tuple[Params, Any]:
        """(p, ctx for pull_back). state: the optimizer state before the step (when needs_state),
        grad: the step's batch gradient (when needs_state), first: the optimizer's first step."""
        raise NotImplementedError

    def pull_back(self, A: Adjoint, P: Params, HP: Params, ctx: Any) -> Adjoint:
        raise NotImplementedError

    def new_columns(self, u: Params) -> Adjoint:
        """The adjoint of a task that starts here: the query gradient on w, zero elsewhere."""
        return {"w": u, **{s: {n: torch.zeros_like(v) for n, v in u.items()} for s in self.slots}}


@dataclass(frozen=True)
class SGDForm(OptimizerForm):
    """torch.optim.SGD (one parameter group): d = grad + weight_decay * w; b = d at the first step,
    else momentum * b + (1 - dampening) * d; w <- w - eta * s with s = d + momentum * b (Nesterov),
    b (momentum), d (no momentum).

    Adjoint (a: the adjoint of the momentum buffer b):
        gb = a - eta u            (Nesterov: a - eta mu u)
        p  = (1 - tau) gb         (Nesterov: (1 - tau) gb - eta u; tau -> 0 at the first step)
        u <- u + (H_t + lambda I) p;   a <- mu gb (0 at the first step)
    which reduces to p = -eta u for mu = lambda = 0.
    """

    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    name = "SGD"

    @property
    def slots(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("b",) if self.momentum else ()

    @property
    def plain(self) -> bool:
        return self.momentum == 0.0 and self.weight_decay == 0.0

    def describe(self) -> str:
        if self.plain:
            return "plain SGD"
        parts = [f"momentum {self.momentum:g}" + (" (Nesterov)" if self.nesterov else "")
                 + (f", dampening {self.dampening:g}" if self.dampening else "")] if self.momentum else []
        if self.weight_decay:
            parts.append(f"weight decay {self.weight_decay:g}")
        return "SGD with " + ", ".join(parts)

    def init_state(self, params: Params, saved: dict[str, dict[str, Tensor]] | None) -> dict[str, Any] | None:
        if not self.momentum or not saved:
            return None
        return {"b": {n: (saved[n]["momentum_buffer"].to(v) if n in saved and "momentum_buffer" in saved[n]
                          else torch.zeros_like(v)) for n, v in params.items()}}

    @torch.no_grad()
    def step(self, params: Params, state: dict[str, Any] | None, grads: Params, lr: float
             ) -> tuple[Params, dict[str, Any] | None]:
        new_p, new_b = {}, {}
        for n, w in params.items():
            d = grads[n]
            if self.weight_decay:
                d = d + self.weight_decay * w
            if self.momentum:
                b = d.clone() if state is None else state["b"][n] * self.momentum + d * (1 - self.dampening)
                new_b[n] = b
                d = d + self.momentum * b if self.nesterov else b
            new_p[n] = w - lr * d
        return new_p, ({"b": new_b} if self.momentum else None)

    def direction(self, A: Adjoint, state: dict[str, Any] | None, grad: Params | None, lr: float,
                  first: bool) -> tuple[Params, Any]:
        AW = A["w"]
        if not self.momentum:
            return {n: -lr * v for n, v in AW.items()}, None
        mu, tau = self.momentum, 0.0 if first else self.dampening
        if self.nesterov:
            GB = {n: A["b"][n] - (lr * mu) * AW[n] for n in AW}
            return {n: (1 - tau) * GB[n] - lr * AW[n] for n in AW}, (GB, first)
        GB = {n: A["b"][n] - lr * AW[n] for n in AW}
        return {n: (1 - tau) * GB[n] for n in AW}, (GB, first)

    def pull_back(self, A: Adjoint, P: Params, HP: Params, ctx: Any) -> Adjoint:
        wd = self.weight_decay
        out = {"w": {n: A["w"][n] + HP[n] + (wd * P[n] if wd else 0) for n in A["w"]}}
        if self.momentum:
            GB, first = ctx
            out["b"] = ({n: torch.zeros_like(v) for n, v in A["w"].items()} if first
                        else {n: self.momentum * GB[n] for n in GB})
        return out


def sgd_form(run: Run) -> SGDForm | None:
    """The run's optimizer as an SGDForm, or None when it is not torch.optim.SGD (or unknown)."""
    opt = run.optimizer
    if not opt or opt.get("name") != "SGD":
        return None
    groups = opt.get("param_groups") or [{}]
    keys = [tuple(g.get(k) for k in _SGD_KEYS) for g in groups]
    lrs = {g.get("initial_lr", g.get("lr")) for g in groups}
    if len(set(keys)) > 1 or len(lrs) > 1:
        raise ConfigurationError(
            f"the run's SGD has {len(groups)} parameter groups with different hyperparameters "
            f"({[dict(zip(('lr',) + _SGD_KEYS, (g.get('lr'),) + k)) for g, k in zip(groups, keys)]}); the "
            "recording does not say which parameter is in which group, so the update cannot be replayed. "
            "Record snapshots at every step of the window (snapshot_windows=[(t1, t_e + 1)]).")
    g = groups[0]
    if g.get("maximize"):
        raise ConfigurationError("the run's SGD maximizes (maximize=True); exact curvature assumes a "
                                 "minimized loss.")
    return SGDForm(momentum=float(g.get("momentum") or 0.0), dampening=float(g.get("dampening") or 0.0),
                   weight_decay=float(g.get("weight_decay") or 0.0), nesterov=bool(g.get("nesterov")))


def optimizer_form(run: Run) -> tuple[OptimizerForm | None, str | None]:
    """(the run's optimizer form, or None with the reason it cannot be linearized exactly)."""
    try:
        return sgd_form(run), None
    except ConfigurationError as e:
        return None, str(e)
