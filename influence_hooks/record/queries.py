"""Query gradients u_q(w) = grad f_q(w) in a run's projection.

- during recording (`QuerySet`): for the query samples, on the query schedule (every n steps,
  each epoch's first and last step, the end of training);
- after training (`query_gradients`): for any new query, at the model's current parameters, with
  the run's layers and projection rebuilt from its manifest (e.g. to score it against data value
  embeddings).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..batches import as_batch, batch_len, cast_batch, training_step_loss
from ..capture.hooks import GradientCapture
from ..capture.select import layers_from_manifest, layers_manifest, projection_fingerprint
from ..errors import ConfigurationError, ProjectionMismatchError
from ..storage.reader import Run, open_run
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


def query_gradients(model: nn.Module, run: Run | str, queries: Any, loss_fn: QueryLossFn | None = None
                    ) -> torch.Tensor:
    """Gradients of new queries at the model's current parameters, in the run's projection: [Q, K].

    model: the model the run was recorded on (with the Lightning callback: the LightningModule),
        at the parameters where the queries are to be evaluated (after training: w_T).
    run: the run (or its directory); its recorded layers and projections are rebuilt on `model`
        and checked against the run's fingerprint, so the rows are comparable with the recorded
        ones (e.g. `dvemb(run).scores(query_gradients(model, run, batch, loss_fn))`).
    queries: one batch, or a map-style Dataset (collated into one batch); moved to the model's device.
    loss_fn: (model, batch) -> the loss of the batch, reduced as in training (the run's
        loss_reduction); default for a LightningModule: its training_step (logging muted).

    Row q is grad f_q(w) of query q's own loss, like the rows recorded during training, in the
    model's dtype and on its device. Computed in eval mode; .grad, the RNG state and module modes
    are left as they were.
    """
    if not isinstance(run, Run):
        with open_run(run) as opened:
            return query_gradients(model, opened, queries, loss_fn)
    if loss_fn is None:
        if not callable(getattr(model, "training_step", None)):
            raise ConfigurationError("query_gradients needs loss_fn=(model, batch) -> loss for a model "
                                     "without a training_step (a plain nn.Module).")
        loss_fn = training_step_loss
    layers = layers_from_manifest(model, run.manifest["layers"])
    fingerprint = projection_fingerprint(layers_manifest(layers))
    if run.projection_fingerprint and fingerprint != run.projection_fingerprint:
        raise ProjectionMismatchError(
            f"the layers rebuilt on this model give projection {fingerprint!r}, the run has "
            f"{run.projection_fingerprint!r}: the model differs from the one the run was recorded on.")
    params = [p for l in layers for p in l.module.parameters(recurse=False) if p.requires_grad]
    if not params:
        raise ConfigurationError("the recorded layers have no parameter with requires_grad=True; unfreeze "
                                 "them (model.requires_grad_(True)) to compute query gradients.")
    batch, ids = as_batch(queries)
    batch = cast_batch(batch, None, params[0].device)
    qs = QuerySet(batch, loss_fn, ids, None, run.manifest.get("loss_reduction", "mean"))
    capture = GradientCapture(layers)
    capture.attach()
    try:
        return qs.gradients(model, capture, params).detach()
    finally:
        capture.detach()
