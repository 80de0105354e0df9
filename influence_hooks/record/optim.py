"""What the recording keeps of the optimizer: its description in the manifest, the learning rate
of the recorded layers at each step, and its per-parameter state in checkpoints."""

from __future__ import annotations

import functools
import math
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


@functools.lru_cache(maxsize=4096)
def momentum_spread(beta1: float, count: int) -> float:
    """How much of a gradient that enters Adam's first moment at step count n reaches the
    parameters over this and every later step, relative to one plain step:
    (1 - b1) sum_k b1^k / (1 - b1^(n+k)) (step n+k sees it with weight (1 - b1) b1^k, divided by
    its own bias correction). 1 once n is large; more in the first steps."""
    if beta1 == 0.0:
        return 1.0
    total, k, w = 0.0, 0, 1.0 - beta1
    while w > 1e-12 * (1.0 - beta1) and k < 100_000:
        total += w / (1.0 - beta1 ** (count + k))
        w *= beta1
        k += 1
    return total


def _step_count(step: Any) -> Any:
    """This step's count n (the state's count + 1): a float, or a float tensor where the state keeps
    it on a device (fused / capturable Adam), so that reading it never waits for the GPU."""
    if step is None:
        return 1.0
    if isinstance(step, torch.Tensor):
        return step.float() + 1 if step.device.type != "cpu" else float(step) + 1
    return float(step) + 1


def _spread(beta1: float, count: Any) -> Any:
    """momentum_spread(beta1, count) for a float count, or as tensor operations for a device one."""
    if not isinstance(count, torch.Tensor):
        return momentum_spread(beta1, int(count))
    if beta1 == 0.0:
        return torch.ones_like(count)
    terms = int(math.ceil(math.log(1e-12) / math.log(beta1))) + 1
    k = torch.arange(terms, device=count.device, dtype=count.dtype)
    return ((1 - beta1) * beta1 ** k / (1 - beta1 ** (count + k))).sum()


ADAM_SAMPLE = 1 << 16  # coordinates per parameter the step sizes are averaged over (evenly spaced)


def adam_step_sizes(optimizer: torch.optim.Optimizer, layers: list, grad_factor: Any = None) -> torch.Tensor | None:
    """Per recorded layer, the step size Adam applies to this step's gradient over its life in the
    first moment, as one number: the mean over the layer's coordinates of
    eta * momentum_spread(b1, n) / (sqrt(v / (1 - b2^n)) + eps), weighted by the squared gradient
    (v: the second moment after this step's gradient, n: the step count; L2 weight decay of Adam
    included in the gradient, AMSGrad's running maximum respected). [L] float32 on the gradients'
    device, or None when the optimizer is not Adam/AdamW. Read before optimizer.step(), with .grad
    set; grad_factor undoes a loss scale still in .grad. A parameter with more than ADAM_SAMPLE
    coordinates is averaged over ADAM_SAMPLE evenly spaced ones.

    The recorded-gradient estimators use it in place of the learning rate on an Adam run
    (aggregate/stepsize.py): a per-layer scalar commutes with the random projection, Adam's
    per-coordinate step sizes would not.
    """
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):  # AdamW subclasses Adam in newer torch
        return None
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = []
    for layer in layers:
        num = den = None
        for p in layer.module.parameters(recurse=False):
            g, group = p.grad, group_of.get(id(p))
            if g is None or group is None or g.is_sparse:
                continue
            b1, b2 = (float(b) for b in group["betas"])
            state = optimizer.state.get(p, {})
            count = _step_count(state.get("step"))
            stride = max(1, -(-g.numel() // ADAM_SAMPLE))
            g = g.detach().reshape(-1)[::stride].float()
            if grad_factor is not None:
                g = g * grad_factor
            if group["weight_decay"] and not group.get("decoupled_weight_decay", False) \
                    and not isinstance(optimizer, torch.optim.AdamW):
                g = g + group["weight_decay"] * p.detach().reshape(-1)[::stride].float()
            g2 = g * g
            v = g2 * (1 - b2)
            if "exp_avg_sq" in state:
                v = v.add_(state["exp_avg_sq"].reshape(-1)[::stride].float(), alpha=b2)
            if group.get("amsgrad") and "max_exp_avg_sq" in state:
                v = torch.maximum(state["max_exp_avg_sq"].reshape(-1)[::stride].float(), v)
            size = v.div_(1 - b2 ** count).sqrt_().add_(group["eps"]).reciprocal_()
            size = size.mul_(group["lr"]).mul_(_spread(b1, count))  # lr and count may be device tensors
            n, d = torch.dot(size, g2), g2.sum()
            num, den = (n, d) if num is None else (num + n, den + d)
        if num is None:  # no gradient this step: the layer's rows are zero anyway
            out.append(torch.zeros((), device=next(layer.module.parameters()).device))
        else:
            out.append(num / den.clamp_min(torch.finfo(den.dtype).tiny))
    return torch.stack(out)
