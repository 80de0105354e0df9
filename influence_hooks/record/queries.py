"""Query gradients during recording: u_q(w_t) = grad f_q(w_t) on the run's projection, for the
query samples, on the query schedule (every n steps, each epoch's first and last step, the end)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..batches import as_batch, batch_len
from ..capture.hooks import GradientCapture
from ..errors import ConfigurationError
from .host import rng_state, set_rng_state

QueryLossFn = Callable[[nn.Module, Any], torch.Tensor]


class QuerySet:
    """The queries of a recording: one batch, its loss function and ids, and the schedule."""

    def __init__(self, queries: Any, loss_fn: QueryLossFn | None, ids: Sequence[int] | None,
                 every_n_steps: int | None, loss_reduction: str):
        if loss_fn is None:
            raise ConfigurationError("queries were given without query_loss_fn(model, batch) -> loss.")
        self.batch, found_ids = as_batch(queries)
        self.n = batch_len(self.batch)
        if ids is None:
            ids = found_ids
        self.ids = np.arange(self.n) if ids is None else np.asarray(ids, np.int64)
        if len(self.ids) != self.n:
            raise ConfigurationError(f"{len(self.ids)} query_ids for {self.n} queries")
        self.loss_fn = loss_fn
        self.every_n_steps = every_n_steps
        self.loss_reduction = loss_reduction

    def manifest(self) -> dict[str, Any]:
        return {"n": self.n, "ids": self.ids.tolist(), "every_n_steps": self.every_n_steps}

    def due(self, step: int, first_of_epoch: bool, epoch_end: bool) -> bool:
        n = self.every_n_steps
        return first_of_epoch or epoch_end or (n is not None and step % n == 0)

    def gradients(self, model: nn.Module, capture: GradientCapture, params: list[nn.Parameter]) -> torch.Tensor:
        """u_q(w) for the current parameters: [Q, K], captured by the same hooks and projection as
        the training rows. Runs in eval mode and leaves .grad, the RNG state, module modes and
        what the capture collected so far untouched."""
        modes = {m: m.training for m in model.modules()}
        rng = rng_state()
        saved = capture.take_state()
        try:
            model.eval()
            capture.set_enabled(True)
            with torch.enable_grad():
                capture.begin_micro_batch(self.n)
                loss = self.loss_fn(model, self.batch)
                if isinstance(loss, dict):
                    loss = loss["loss"]
                torch.autograd.grad(loss, [p for p in params if p.requires_grad], allow_unused=True)
            scale = float(self.n) if self.loss_reduction == "mean" else 1.0
            return capture.collect([scale])
        finally:
            capture.set_enabled(False)
            capture.restore_state(saved)
            for m, mode in modes.items():
                m.training = mode
            set_rng_state(rng)
