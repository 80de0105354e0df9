"""The recorded optimizer's update, forward (to replay w_t) and linearized backward (the adjoint).

Each supported optimizer is one `OptimizerForm`, the single place that knows its update rule:

- `init_state` / `step`: the update w_t -> w_{t+1} with its state (replay from a checkpoint);
- `direction` / `pull_back`: one step of the adjoint recursion. With the adjoint A of the state
  after step t (A['w'] for the parameters, plus one entry per state tensor), `direction` gives
  p = df/dg_t, the adjoint of the step's gradient; the full-space pass then computes H_t p and
  every g_t(i) . p, scores sample i with -w_t p . g_t(i) (removing i adds -w_t g_t(i) to g_t), and
  `pull_back` gives the adjoint of the state before step t.

Plain SGD is the recursion of dit's backward pass: p = -eta u, u <- u + H p.
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

    def direction(self, A: Adjoint, *, state: dict[str, Any] | None, grad: Params | None, params: Params,
                  lr: float, first: bool) -> tuple[Params, Any]:
        """(p, ctx for pull_back). state: the optimizer state before the step and grad: the step's
        batch gradient at params = w_t (both only when needs_state); first: the optimizer's first step."""
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

    def direction(self, A: Adjoint, *, state: dict[str, Any] | None, grad: Params | None, params: Params,
                  lr: float, first: bool) -> tuple[Params, Any]:
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


@dataclass(frozen=True)
class AdamForm(OptimizerForm):
    """torch.optim.Adam and AdamW (README, "Exact curvature"). Per parameter, with the step
    count n (after its increment), g the batch gradient and lambda the weight decay:

        g^ = g + lambda w (Adam's L2; AdamW: g^ = g and w is first scaled by a = 1 - eta lambda)
        m' = b1 m + (1 - b1) g^;   v' = b2 v + (1 - b2) g^ * g^   (AMSGrad: v'' = max(vmax, v'))
        s = sqrt(v' / (1 - b2^n));  w' = a w - (eta / (1 - b1^n)) m' / (s + eps)

    Linearized, with A = (eta / (1 - b1^n)) / (s + eps) and
    B = (eta / (1 - b1^n)) m' / (2 (1 - b2^n) s (s + eps)^2) (0 where s = 0, a coordinate that never
    had a gradient): dw' = a dw - A dm' + B dv'. Its adjoint, from the adjoints (u, mu', nu') of
    (w', m', v'):
        mu = mu' - A u;   nu = nu' + B u
        p  = (1 - b1) mu + 2 (1 - b2) g^ nu          (the adjoint of the step's gradient)
        u <- a u + (H_t + lambda_L2) p;   mu' <- b1 mu;   nu' <- b2 nu
    A sample enters through m (factor 1 - b1) and through v (factor 2 (1 - b2) g^), both in p.
    With AMSGrad the max passes the adjoint to whichever of v' and vmax is larger.
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False
    amsgrad: bool = False
    needs_state = True

    @property
    def name(self) -> str:  # type: ignore[override]
        return "AdamW" if self.decoupled else "Adam"

    @property
    def slots(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("m", "v", "vmax") if self.amsgrad else ("m", "v")

    def describe(self) -> str:
        wd = f", {'decoupled ' if self.decoupled else 'L2 '}weight decay {self.weight_decay:g}" if self.weight_decay else ""
        return (f"{self.name} (betas ({self.beta1:g}, {self.beta2:g}), eps {self.eps:g}{wd}"
                f"{', AMSGrad' if self.amsgrad else ''})")

    _KEYS = {"m": "exp_avg", "v": "exp_avg_sq", "vmax": "max_exp_avg_sq"}

    def init_state(self, params: Params, saved: dict[str, dict[str, Tensor]] | None) -> dict[str, Any] | None:
        if not saved or not any(n in saved and "exp_avg" in saved[n] for n in params):
            return None  # before the optimizer's first step: no state yet
        state: dict[str, Any] = {"step": {}}
        for slot in self.slots:
            state[slot] = {}
        for n, w in params.items():
            st = saved.get(n, {})
            for slot in self.slots:
                t = st.get(self._KEYS[slot])
                state[slot][n] = torch.zeros_like(w) if t is None else t.to(w)
            state["step"][n] = float(st["step"]) if "step" in st else 0.0
        return state

    def _fresh(self, params: Params) -> dict[str, Any]:
        return {"step": {n: 0.0 for n in params}, **{s: {n: torch.zeros_like(w) for n, w in params.items()}
                                                     for s in self.slots}}

    def _forward(self, w: Tensor, g: Tensor, st: dict[str, Any], n: str, lr: float) -> dict[str, Any]:
        """The quantities of one parameter's update: g^, m', v', the denominator's s and the rest."""
        count = st["step"][n] + 1.0
        if self.weight_decay and not self.decoupled:
            g = g + self.weight_decay * w
        m1 = st["m"][n].lerp(g, 1 - self.beta1)
        v1 = st["v"][n] * self.beta2 + (1 - self.beta2) * g * g
        vmax1 = torch.maximum(st["vmax"][n], v1) if self.amsgrad else None
        bc1, bc2 = 1 - self.beta1 ** count, 1 - self.beta2 ** count
        s = (v1 if vmax1 is None else vmax1).sqrt() / bc2 ** 0.5
        return {"g": g, "m": m1, "v": v1, "vmax": vmax1, "s": s, "bc1": bc1, "bc2": bc2, "count": count}

    @torch.no_grad()
    def step(self, params: Params, state: dict[str, Any] | None, grads: Params, lr: float
             ) -> tuple[Params, dict[str, Any] | None]:
        st = state if state is not None else self._fresh(params)
        new_p: Params = {}
        new_st: dict[str, Any] = {"step": {}, **{s: {} for s in self.slots}}
        for n, w in params.items():
            f = self._forward(w, grads[n], st, n, lr)
            a = 1 - lr * self.weight_decay if self.decoupled else 1.0
            new_p[n] = w * a - (lr / f["bc1"]) * f["m"] / (f["s"] + self.eps)
            new_st["step"][n] = f["count"]
            for slot in self.slots:
                new_st[slot][n] = f[slot]
        return new_p, new_st

    def direction(self, A: Adjoint, *, state: dict[str, Any] | None, grad: Params | None, params: Params,
                  lr: float, first: bool) -> tuple[Params, Any]:
        if state is None and not first:
            raise ConfigurationError("the Adam moments before this step are unknown (snapshots without "
                                     "optimizer state); record checkpoints or snapshots of the window.")
        st = state if state is not None else self._fresh(grad)
        P, ctx = {}, {}
        for n, u in A["w"].items():
            f = self._forward(params[n], grad[n], st, n, lr)
            D = f["s"] + self.eps
            coef_a = (lr / f["bc1"]) / D
            safe = torch.where(f["s"] > 0, f["s"], torch.ones_like(f["s"]))
            coef_b = torch.where(f["s"] > 0, (lr / f["bc1"]) * f["m"] / (2 * f["bc2"] * safe * D * D),
                                 torch.zeros_like(D))
            mu = A["m"][n] - coef_a * u
            kappa = coef_b * u  # the adjoint the update passes to its second moment
            if self.amsgrad:
                from_v = f["v"] >= st["vmax"][n]
                nu = A["v"][n] + torch.where(from_v, A["vmax"][n] + kappa, torch.zeros_like(kappa))
                to_vmax = torch.where(from_v, torch.zeros_like(kappa), A["vmax"][n] + kappa)
            else:
                nu, to_vmax = A["v"][n] + kappa, None
            P[n] = (1 - self.beta1) * mu + (2 * (1 - self.beta2)) * f["g"] * nu
            ctx[n] = (mu, nu, to_vmax)
        return P, (1 - lr * self.weight_decay if self.decoupled else 1.0, ctx)

    def pull_back(self, A: Adjoint, P: Params, HP: Params, ctx: Any) -> Adjoint:
        a, per = ctx
        l2 = self.weight_decay if not self.decoupled else 0.0
        out: Adjoint = {"w": {}, "m": {}, "v": {}, **({"vmax": {}} if self.amsgrad else {})}
        for n, u in A["w"].items():
            mu, nu, to_vmax = per[n]
            out["w"][n] = a * u + HP[n] + (l2 * P[n] if l2 else 0)
            out["m"][n] = self.beta1 * mu
            out["v"][n] = self.beta2 * nu
            if self.amsgrad:
                out["vmax"][n] = to_vmax
        return out


def _single_group(opt: dict[str, Any], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """The optimizer's parameter groups, refused unless they share their hyperparameters."""
    groups = opt.get("param_groups") or [{}]
    values = [tuple(_hashable(g.get(k)) for k in keys) for g in groups]
    lrs = {g.get("initial_lr", g.get("lr")) for g in groups}
    if len(set(values)) > 1 or len(lrs) > 1:
        raise ConfigurationError(
            f"the run's {opt.get('name')} has {len(groups)} parameter groups with different hyperparameters "
            f"({[dict(zip(('lr',) + keys, (g.get('lr'),) + v)) for g, v in zip(groups, values)]}); the "
            "recording does not say which parameter is in which group, so the update cannot be linearized. "
            "Train with one parameter group (or the same hyperparameters in every group).")
    return groups


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def sgd_form(run: Run) -> SGDForm | None:
    """The run's optimizer as an SGDForm, or None when it is not torch.optim.SGD (or unknown)."""
    opt = run.optimizer
    if not opt or opt.get("name") != "SGD":
        return None
    g = _single_group(opt, _SGD_KEYS)[0]
    if g.get("maximize"):
        raise ConfigurationError("the run's SGD maximizes (maximize=True); exact curvature assumes a "
                                 "minimized loss.")
    return SGDForm(momentum=float(g.get("momentum") or 0.0), dampening=float(g.get("dampening") or 0.0),
                   weight_decay=float(g.get("weight_decay") or 0.0), nesterov=bool(g.get("nesterov")))


def adam_form(run: Run) -> AdamForm | None:
    """The run's optimizer as an AdamForm, or None when it is not torch.optim.Adam / AdamW."""
    opt = run.optimizer
    if not opt or opt.get("name") not in ("Adam", "AdamW"):
        return None
    groups = _single_group(opt, _ADAM_KEYS)
    g = groups[0]
    if g.get("maximize"):
        raise ConfigurationError("the run's Adam maximizes (maximize=True); exact curvature assumes a "
                                 "minimized loss.")
    betas = g.get("betas") or (0.9, 0.999)
    decoupled = bool(g.get("decoupled_weight_decay", opt.get("name") == "AdamW"))
    return AdamForm(beta1=float(betas[0]), beta2=float(betas[1]), eps=float(g.get("eps", 1e-8)),
                    weight_decay=float(g.get("weight_decay") or 0.0), decoupled=decoupled,
                    amsgrad=bool(g.get("amsgrad")))


_ADAM_KEYS = ("betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay")
FORMS = {"SGD": sgd_form, "Adam": adam_form, "AdamW": adam_form}


def optimizer_form(run: Run) -> tuple[OptimizerForm | None, str | None]:
    """(the run's optimizer form, or None with the reason it cannot be linearized exactly)."""
    name = (run.optimizer or {}).get("name")
    parse = FORMS.get(name)
    if parse is None:
        return None, (f"optimizer {name or 'unknown'} has no exact form here (supported: "
                      f"{', '.join(sorted(FORMS))})")
    try:
        return parse(run), None
    except ConfigurationError as e:
        return None, str(e)
