"""The training loss as a function of the parameters, for estimators that need the model itself.

`LossFunctions` turns (model, loss_fn) into pure functions of a parameter dict, built on
torch.func:

- l_i(w): the loss of sample i alone, `loss_fn(model, batch_of_one)`; a batch of B samples gives
  the vector l(w) [B] (vmap over samples, so no per-sample loop);
- the batch loss L_t(w) = w_t sum_{i in B_t} l_i(w), w_t the recorded update weight (1/|B_t| for a
  mean-reduced loss), so L_t is the training step's loss whatever the reduction;
- gradients of L_t (replay), per-sample gradients g(i) = grad l_i (queries, checks);
- for Q directions V at once: (H V, G V) with H the Hessian of L_t and G the per-sample gradient
  matrix [B, P] (one forward-over-reverse pass gives both, and G is never formed), or the same with
  the Gauss-Newton matrix J^T H_out J in place of H.

Parameters are split into `diff` (differentiated: the attributed parameter space) and `fixed`
(held at their values, with the buffers). Dicts are keyed by the model's parameter names. The model
runs in eval mode (dropout off, batch norm on running statistics); nothing in it is modified.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from ...errors import ConfigurationError

LossFn = Callable[[nn.Module, Any], Any]
Params = dict[str, Tensor]

_PREFIX = "model."


class _LossCall(nn.Module):
    """Holds the model as a submodule so functional_call can swap its parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        out = self.loss_fn(self.model, batch)
        if isinstance(out, dict):
            out = out["loss"]
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise ConfigurationError(
                "loss_fn(model, batch) must return the batch's scalar loss (a tensor, or a dict with "
                f"'loss'), got {type(out).__name__}{tuple(out.shape) if isinstance(out, Tensor) else ''}.")
        return out.reshape(())


@contextlib.contextmanager
def _forward_replaced(model: nn.Module, fn: Callable[..., Any]) -> Iterator[None]:
    """Temporarily route model(...) to fn (an instance attribute shadows the class's forward)."""
    had = "forward" in model.__dict__
    old = model.__dict__.get("forward")
    object.__setattr__(model, "forward", fn)
    try:
        yield
    finally:
        if had:
            object.__setattr__(model, "forward", old)
        else:
            del model.__dict__["forward"]


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """{other name: the name named_parameters() gives} for parameters shared by several modules
    (tied weights, e.g. GPT-2's lm_head.weight, which is transformer.wte.weight)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _one(s: Any) -> Any:
    return tree_map(lambda x: x.unsqueeze(0), s)


class LossFunctions:
    """Pure functions of the parameters of `model` for the loss `loss_fn(model, batch) -> scalar`.

    sample_chunk / query_chunk: vmap chunk sizes over samples / query directions (None: all at
    once), trading speed for peak memory.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, query_loss_fn: LossFn | None = None, *,
                 sample_chunk: int | None = None, query_chunk: int | None = None):
        self.model = model
        self.train_call = _LossCall(model, loss_fn)
        self.query_call = _LossCall(model, query_loss_fn or loss_fn)
        self.sample_chunk = sample_chunk
        self.query_chunk = query_chunk

    # ------------------------------------------------------------------ losses
    @staticmethod
    def _call(call: _LossCall, params: Params, batch: Any, *, tie_weights: bool = True) -> Tensor:
        # the math attention kernel: the fused ones (flash, memory-efficient) have no forward-mode AD
        with sdpa_kernel([SDPBackend.MATH]):
            return functional_call(call, {_PREFIX + k: v for k, v in params.items()}, (batch,),
                                   tie_weights=tie_weights, strict=False)

    def sample_losses(self, diff: Params, fixed: Params, batch: Any, *, query: bool = False) -> Tensor:
        """l(w) [B]: each sample's own loss (loss_fn on a batch of one)."""
        call = self.query_call if query else self.train_call

        def one(d: Params, s: Any) -> Tensor:
            return self._call(call, {**fixed, **d}, _one(s))

        return vmap(one, in_dims=(None, 0), chunk_size=self.sample_chunk)(diff, batch)

    def batch_loss(self, diff: Params, fixed: Params, batch: Any, weight: float) -> Tensor:
        """L_t(w) = weight * sum_i l_i(w)."""
        return self.sample_losses(diff, fixed, batch).sum() * weight

    def batch_grad(self, diff: Params, fixed: Params, batch: Any, weight: float) -> Params:
        """grad L_t at w, over `diff`."""
        return grad(self.batch_loss)(diff, fixed, batch, weight)

    def per_sample_grads(self, diff: Params, fixed: Params, batch: Any, *, query: bool = False,
                         untied: bool = False) -> Params:
        """g(i) = grad l_i for every sample of `batch`: {name: [B, *shape]}. untied: a parameter
        shared by several modules (tied weights) may be given under each module's name, and each
        name gets that module's own part of the gradient."""
        call = self.query_call if query else self.train_call

        def one(d: Params, s: Any) -> Tensor:
            return self._call(call, {**fixed, **d}, _one(s), tie_weights=not untied)

        return vmap(grad(one), in_dims=(None, 0), chunk_size=self.sample_chunk)(diff, batch)

    # ------------------------------------------------------------------ curvature products
    def hvp_and_gv(self, diff: Params, fixed: Params, batch: Any, weight: float, V: Params
                   ) -> tuple[Params, Tensor]:
        """(H V {name: [Q, *shape]}, G V [Q, B]) for directions V {name: [Q, *shape]}.

        H: the Hessian of L_t at w; (G V)[q, i] = g(i) . v_q. Forward-over-reverse: the tangent of
        (grad L_t, l) along v is (H v, G v).
        """
        def grad_and_losses(d: Params) -> tuple[Params, Tensor]:
            def L(d: Params) -> tuple[Tensor, Tensor]:
                ls = self.sample_losses(d, fixed, batch)
                return ls.sum() * weight, ls
            return grad(L, has_aux=True)(d)

        def along(v: Params) -> tuple[Params, Tensor]:
            return jvp(grad_and_losses, (diff,), (v,))[1]

        return vmap(along, chunk_size=self.query_chunk)(V)

    def ggn_and_gv(self, diff: Params, fixed: Params, batch: Any, weight: float, V: Params
                   ) -> tuple[Params, Tensor]:
        """As hvp_and_gv with the Gauss-Newton matrix weight * sum_i J_i^T H_i J_i in place of H:
        J_i the Jacobian of the model's output for sample i, H_i the Hessian of its loss in the
        output. Needs a loss_fn that calls the model once and uses its single tensor output."""
        model = self.model

        def out_one(d: Params, s: Any) -> Tensor:
            seen: list[Any] = []
            orig = model.forward

            def record(*a: Any, **k: Any) -> Any:
                out = orig(*a, **k)
                seen.append(out)
                return out

            with _forward_replaced(model, record):
                self._call(self.train_call, {**fixed, **d}, _one(s))
            if len(seen) != 1 or not isinstance(seen[0], Tensor):
                raise ConfigurationError(
                    "curvature='ggn' needs a loss_fn that calls the model exactly once and computes the "
                    f"loss from its single tensor output; the model was called {len(seen)} time(s)"
                    + ("" if len(seen) != 1 else f" and returned {type(seen[0]).__name__}") + ". Use "
                    "curvature='exact'.")
            return seen[0].squeeze(0)

        def loss_of_output(z: Tensor, s: Any) -> Tensor:
            with _forward_replaced(model, lambda *a, **k: z.unsqueeze(0)):
                return self.train_call(_one(s))

        def outputs(d: Params) -> Tensor:
            return vmap(out_one, in_dims=(None, 0), chunk_size=self.sample_chunk)(d, batch)

        z, pull = vjp(outputs, diff)                                          # z [B, *o]
        zdot = vmap(lambda v: jvp(outputs, (diff,), (v,))[1], chunk_size=self.query_chunk)(V)  # [Q, B, *o]
        dl_dz = grad(loss_of_output)
        gz = vmap(dl_dz)(z, batch)                                            # [B, *o]
        hz = vmap(vmap(lambda zi, si, ti: jvp(lambda y: dl_dz(y, si), (zi,), (ti,))[1]),
                  in_dims=(None, None, 0))(z, batch, zdot)                    # [Q, B, *o]
        gv = (gz.unsqueeze(0) * zdot).flatten(2).sum(-1)                      # [Q, B]
        jt = vmap(lambda c: pull(c)[0], chunk_size=self.query_chunk)(hz * weight)
        return jt, gv
