"""Parameter files during recording: snapshots of w_t (the recorded layers, or the whole model)
and checkpoints (the whole model), each with the optimizer's state of the parameters it holds
(momentum buffers, Adam's moments and step counts: what an exact linearization of the optimizer
needs at w_t), on their schedules."""

from __future__ import annotations

import torch
from torch import nn

from ..storage.writer import RunWriter
from .options import RecordingConfig
from .optim import optimizer_state_by_name


class ParameterSaver:
    """Writes w_t to the run when the config's snapshot or checkpoint schedule says so."""

    def __init__(self, config: RecordingConfig, model: nn.Module):
        self.config, self.model = config, model

    @property
    def snapshots(self) -> bool:
        return bool(self.config.snapshot_every_n_steps or self.config.snapshot_windows)

    def _snapshot_due(self, step: int) -> bool:
        c = self.config
        in_window = any(int(a) <= step < int(b) for a, b in c.snapshot_windows or [])
        return in_window or bool(c.snapshot_every_n_steps and step % c.snapshot_every_n_steps == 0)

    def save_if_due(self, writer: RunWriter, step: int, layers: list, optimizer: torch.optim.Optimizer) -> None:
        if self._snapshot_due(step):
            self.snapshot(writer, step, layers, optimizer)
        c = self.config
        if c.checkpoint_every_n_steps and step % c.checkpoint_every_n_steps == 0:
            state = {k: v for k, v in self.model.state_dict().items() if isinstance(v, torch.Tensor)}
            writer.write_params("checkpoint", step, state, optim_state=optimizer_state_by_name(self.model, optimizer),
                                attrs={"scope": "model"})

    def snapshot(self, writer: RunWriter, step: int, layers: list, optimizer: torch.optim.Optimizer | None) -> None:
        params = self._snapshot_params(layers)
        optim = optimizer_state_by_name(self.model, optimizer, set(params)) if optimizer is not None else None
        writer.write_params("snapshot", step, params, optim_state=optim, attrs={"scope": self.config.snapshot_scope})

    def _snapshot_params(self, layers: list) -> dict[str, torch.Tensor]:
        if self.config.snapshot_scope == "model":
            return {n: p.detach() for n, p in self.model.named_parameters()}
        # under the model's own names: a tied weight once, as named_parameters() names it
        name = {id(p): n for n, p in self.model.named_parameters()}
        return {name.get(id(p), f"{l.name}.{n}" if l.name else n): p.detach()
                for l in layers for n, p in l.module.named_parameters(recurse=False)}
