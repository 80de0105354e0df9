"""Curvatures H_t for the backward recursion u <- u - eta_t H_t u, by name (README, "Which
samples mattered, and when").

Every curvature `dit` accepts is registered here with `@register_curvature("name")` (Opacus'
grad-sampler registry is the model), in one of two spaces:

- recorded space (`CurvatureOperator`): H_t applied to query directions U [K, Q] from one step's
  recorded (projected) per-sample gradients alone: 'none' and 'fisher';
- full parameter space (`FullSpaceCurvature`): products with the true curvature of the batch
  loss, recomputed from the model, the loss, the samples and the parameters along the window by
  the backend in `aggregate.fullspace`: 'exact' (Hessian) and 'ggn' (Gauss-Newton).

A new curvature subclasses one of the two and registers itself, or is passed to
`dit(curvature=<instance>)` directly.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import ConfigurationError
from ..storage.reader import Run, StepBatch

CURVATURES: dict[str, type] = {}


def register_curvature(name: str) -> Callable[[type], type]:
    """Class decorator: make a CurvatureOperator or FullSpaceCurvature available as
    dit(curvature=name)."""
    def deco(cls: type) -> type:
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
        GU: [B, Q] = batch.grads @ U when the caller already has it (saves one GEMM; read only:
        the caller scores the step with it afterwards)."""
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


class FullSpaceCurvature:
    """A curvature of the full-parameter-space backend (aggregate.fullspace): `products(lf)` gives
    the function (diff, fixed, batch, weight, V) -> (H V, G V) of `fullspace.model_fn.LossFunctions`
    it uses at every step. `note` is the approximation sentence attached to results (None: exact)."""

    name: str = "custom"
    note: str | None = None

    def products(self, lf: Any) -> Callable[..., Any]:
        raise NotImplementedError


@register_curvature("exact")
class ExactHessian(FullSpaceCurvature):
    """The Hessian of the batch loss L_t at w_t (forward-over-reverse Hessian-vector products)."""

    def products(self, lf: Any) -> Callable[..., Any]:
        return lf.hvp_and_gv


@register_curvature("ggn")
class GaussNewton(FullSpaceCurvature):
    """The Gauss-Newton matrix w_t sum_i J_i^T H_out,i J_i (needs a loss_fn that calls the model once)."""

    note = "Gauss-Newton curvature w_t sum_i J_i^T H_out,i J_i in place of the Hessian of L_t"

    def products(self, lf: Any) -> Callable[..., Any]:
        return lf.ggn_and_gv


def make_curvature(curvature: Any) -> CurvatureOperator | FullSpaceCurvature:
    if isinstance(curvature, (CurvatureOperator, FullSpaceCurvature)):
        return curvature
    cls = CURVATURES.get(str(curvature))
    if cls is None:
        raise ConfigurationError(
            f"unknown curvature {curvature!r}; choose one of {sorted(CURVATURES)} or pass a "
            "CurvatureOperator (or FullSpaceCurvature) instance.")
    return cls()
