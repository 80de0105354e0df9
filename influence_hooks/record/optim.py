"""What the recording keeps of the optimizer: its description in the manifest, the learning rate
of the recorded layers at each step, and its per-parameter state in checkpoints."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..errors import ConfigurationError
from ..storage.jsonio import to_jsonable


def describe_optimizer(optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
    """The optimizer's class and hyperparameters, and whether it is plain SGD (the estimators'
    assumption): SGD without momentum and weight decay."""
    if optimizer is None:
        return None
    groups = [{k: to_jsonable(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    name = type(optimizer).__name__
    plain = name == "SGD" and all(float(g.get("momentum", 0) or 0) == 0 and float(g.get("weight_decay", 0) or 0) == 0
                                  for g in optimizer.param_groups)
    return {"name": name, "is_plain_sgd": plain, "param_groups": groups}


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer,
                            names: set[str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer's per-parameter state tensors (momentum buffers, Adam moments and step
    counts) keyed by parameter name; only `names` if given."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in optimizer.state.items():
        name = by_id.get(id(p))
        if name is None or (names is not None and name not in names):
            continue
        tensors = {k: v for k, v in st.items() if isinstance(v, torch.Tensor)}
        if tensors:
            out[name] = tensors
    return out


class RecordedLearningRate:
    """The learning rate eta_t of the recorded layers' parameter group(s), read at every step."""

    def __init__(self, recorded_params: list[nn.Parameter]):
        self._ids = {id(p) for p in recorded_params}
        self._key: tuple[int, int] | None = None
        self._groups: list[int] = []
        self._warned = False

    def reset(self, recorded_params: list[nn.Parameter]) -> None:
        """The recorded layers changed: find their groups again at the next step."""
        self.__init__(recorded_params)

    def __call__(self, optimizer: torch.optim.Optimizer) -> float:
        key = (id(optimizer), len(optimizer.param_groups))
        if self._key != key:  # which groups hold recorded layers: found once per optimizer
            self._key = key
            self._groups = [j for j, g in enumerate(optimizer.param_groups)
                            if any(id(p) in self._ids for p in g["params"])]
        lrs = [float(optimizer.param_groups[j]["lr"]) for j in self._groups]
        if not lrs:
            raise ConfigurationError("none of the recorded layers' parameters is in the optimizer; "
                                     "record layers that are being trained.")
        if len(set(lrs)) > 1 and not self._warned:
            # one lr per step is recorded: the other groups' layers would get the wrong eta_t
            self._warned = True
            warnings.warn(
                f"the recorded layers are in optimizer param groups with different learning rates "
                f"{sorted(set(lrs))}; the run records one lr per step ({lrs[0]}, the first such group), "
                "so estimates weight the other layers' gradients by the wrong learning rate. Record "
                "layers of a single param group (layers=... / exclude=...).", RuntimeWarning, stacklevel=3)
        return lrs[0]
