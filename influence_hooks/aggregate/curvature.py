"""Curvature operators H_t for the backward recursion u <- u - eta_t H_t u (REFERENCE.md item 5).

An operator applies H_t to a batch of query directions U [K, Q] given one step's recorded batch.
'none' and 'fisher' are built from the recording alone and registered here; another backend
(an exact Hessian-vector product, say) subclasses `CurvatureOperator`, registers itself with
`@register_curvature("name")` or is passed to `dit(curvature=<instance>)` directly.

Whole-estimator backends that need more than the recording (the model, the loss, the samples and
the parameters along the window) live in `influence_hooks.aggregate.exact`; `dit` hands
curvature='exact' / 'ggn' to its `exact_dit(...)` (see dit.py).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import ConfigurationError
from ..storage.reader import Run, StepBatch

CURVATURES: dict[str, type["CurvatureOperator"]] = {}


def register_curvature(name: str) -> Callable[[type["CurvatureOperator"]], type["CurvatureOperator"]]:
    """Class decorator: make an operator available as dit(curvature=name)."""
    def deco(cls: type["CurvatureOperator"]) -> type["CurvatureOperator"]:
        cls.name = name
        CURVATURES[name] = cls
        return cls
    return deco


class CurvatureOperator:
    """Applies H_t, the curvature of the batch loss L_t at w_t, in the recorded gradient space.

    propagates=False declares H_t = 0 (u stays u_q(t_e)), which lets the recursion skip per-step
    work. `note` is the approximation sentence attached to results.
    """

    name: str = "custom"
    propagates: bool = True
    note: str | None = None

    def prepare(self, run: Run, span: tuple[int, int]) -> None:
        """Called once before the backward pass over steps [t1, t_e) of `run`."""

    def apply(self, batch: StepBatch, U: torch.Tensor, *, GU: torch.Tensor | None = None) -> torch.Tensor:
        """H_t U: [K, Q] for U [K, Q]. batch.grads: [B, K] g_t(z) of the step's samples;
        GU: [B, Q] = batch.grads @ U when the caller already has it (saves one GEMM)."""
        raise NotImplementedError

    def propagate(self, batch: StepBatch, U: torch.Tensor, lr: float, *, GU: torch.Tensor | None = None) -> None:
        """U <- U - lr H_t U in place (one step of the backward recursion). Override to fuse."""
        U.sub_(self.apply(batch, U, GU=GU), alpha=lr)


@register_curvature("none")
class NoCurvature(CurvatureOperator):
    propagates = False
    note = "curvature ignored: the query gradient u_q(t_e) is carried back unchanged (H_t = 0)"

    def apply(self, batch: StepBatch, U: torch.Tensor, *, GU: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros_like(U)


@register_curvature("fisher")
class FisherCurvature(CurvatureOperator):
    """Empirical Fisher of the batch: H_t ~= w_t sum_{z in B_t} g_t(z) g_t(z)^T
    (= (1/|B_t|) sum g g^T for a mean loss), applied as w_t G^T (G U), never formed as K x K."""

    note = ("empirical-Fisher curvature H_t ~= w_t sum_z g_t(z) g_t(z)^T from the recorded "
            "(projected) per-sample gradients")

    def apply(self, batch: StepBatch, U: torch.Tensor, *, GU: torch.Tensor | None = None) -> torch.Tensor:
        G = batch.grads
        if GU is None:
            GU = G @ U
        return (G.T @ GU).mul_(batch.update_weight)

    def propagate(self, batch: StepBatch, U: torch.Tensor, lr: float, *, GU: torch.Tensor | None = None) -> None:
        G = batch.grads
        U.addmm_(G.T, G @ U if GU is None else GU, alpha=-lr * batch.update_weight)


def make_curvature(curvature: str | CurvatureOperator) -> CurvatureOperator:
    if isinstance(curvature, CurvatureOperator):
        return curvature
    cls = CURVATURES.get(str(curvature))
    if cls is None:
        raise ConfigurationError(
            f"unknown curvature {curvature!r}; choose one of {sorted(CURVATURES) + ['exact', 'ggn']} "
            "or pass a CurvatureOperator instance.")
    return cls()
