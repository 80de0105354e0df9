"""What the recording keeps of the optimizer: its description in the manifest, the learning rate
of the recorded layers at each step, and its per-parameter state in checkpoints."""

from __future__ import annotations

import functools
import math
import warnings
import weakref
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


def _spread(beta1: float, count: torch.Tensor) -> torch.Tensor:
    """momentum_spread elementwise for a tensor of step counts, as tensor operations (on a device:
    no sync)."""
    if beta1 == 0.0:
        return torch.ones_like(count)
    terms = int(math.ceil(math.log(1e-12) / math.log(beta1))) + 1
    k = torch.arange(terms, device=count.device, dtype=count.dtype)
    return ((1 - beta1) * beta1 ** k / (1 - beta1 ** (count.unsqueeze(-1) + k))).sum(-1)


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
    per-coordinate step sizes would not. It runs at every step, so each param group is one set of
    vector operations over all its recorded parameters (a few dozen kernel calls in all).
    """
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):  # AdamW subclasses Adam in newer torch
        return None
    group_of = _group_index(optimizer)
    members: dict[int, list[tuple[int, nn.Parameter]]] = {}  # per param group: (layer, parameter)
    device = None
    for li, layer in enumerate(layers):
        for p in layer.module.parameters(recurse=False):
            if p.grad is None or p.grad.is_sparse or id(p) not in group_of:
                continue
            members.setdefault(group_of[id(p)], []).append((li, p))
            device = device or p.grad.device
    if device is None:
        device = next(layers[0].module.parameters()).device if layers else torch.device("cpu")
    sums = torch.zeros(2, len(layers), device=device)  # per layer: sum size * g^2, sum g^2
    with torch.no_grad():
        for j, items in members.items():  # one set of vector operations per param group, not per parameter
            _accumulate(optimizer, optimizer.param_groups[j], items, grad_factor, sums)
    num, den = sums
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)  # a layer without gradient: 0 (its rows are zero)


_GROUPS: "weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple]" = weakref.WeakKeyDictionary()


def _group_index(optimizer: torch.optim.Optimizer) -> dict[int, int]:
    """{id(parameter): its param group}, rebuilt when the groups change (add_param_group, or a
    parameter replaced in a group)."""
    key = tuple(tuple(map(id, g["params"])) for g in optimizer.param_groups)
    cached = _GROUPS.get(optimizer)
    if cached is None or cached[0] != key:
        cached = _GROUPS[optimizer] = (key, {id(p): j for j, g in enumerate(optimizer.param_groups)
                                             for p in g["params"]})
    return cached[1]


def _accumulate(optimizer: torch.optim.Optimizer, group: dict, items: list, grad_factor: Any,
                sums: torch.Tensor) -> None:
    """sums[0, layer] += sum size * g^2 and sums[1, layer] += sum g^2 over the sampled coordinates
    of a param group's recorded parameters, all of them concatenated."""
    b1, b2 = (float(b) for b in group["betas"])
    device = sums.device
    strides = [max(1, -(-p.numel() // ADAM_SAMPLE)) for _, p in items]

    def sampled(tensors: list[torch.Tensor]) -> torch.Tensor:  # a fresh float32 vector (written in place below)
        flat = torch.cat([t.reshape(-1) if k == 1 else t.reshape(-1)[::k] for t, k in zip(tensors, strides)])
        return flat if flat.dtype == torch.float32 else flat.float()

    lengths = [-(-p.numel() // k) for (_, p), k in zip(items, strides)]
    states = [optimizer.state.get(p, {}) for _, p in items]
    g = sampled([p.grad for _, p in items])
    if grad_factor is not None:
        g = g.mul_(grad_factor)
    if group["weight_decay"] and not group.get("decoupled_weight_decay", False) \
            and not isinstance(optimizer, torch.optim.AdamW):
        g = g.add_(sampled([p for _, p in items]), alpha=group["weight_decay"])
    g2 = g.square()
    if any("exp_avg_sq" in st for st in states):  # a parameter without state yet: zeros
        v = torch.addcmul(sampled([st["exp_avg_sq"] if "exp_avg_sq" in st else torch.zeros_like(p)
                                   for st, (_, p) in zip(states, items)]).mul_(b2), g, g, value=1 - b2)
    else:
        v = g2 * (1 - b2)
    if group.get("amsgrad") and all("max_exp_avg_sq" in st for st in states):
        v = torch.maximum(sampled([st["max_exp_avg_sq"] for st in states]), v)
    counts = [_step_count(st.get("step")) for st in states]
    # eta * spread / (sqrt(v / (1 - b2^n)) + eps) = eta * spread * s / (sqrt(v) + eps * s), s = sqrt(1 - b2^n)
    scalar = all(not isinstance(c, torch.Tensor) and c == counts[0] for c in counts)  # the usual case
    if scalar:
        root = math.sqrt(1 - b2 ** counts[0])
        eps, factor = group["eps"] * root, momentum_spread(b1, int(counts[0])) * root * group["lr"]
    else:  # counts differ, or live on a device (fused / capturable: no sync): per parameter
        repeat = torch.tensor(lengths, device=device)
        if any(isinstance(c, torch.Tensor) for c in counts):
            n = torch.stack([c if isinstance(c, torch.Tensor) else torch.tensor(c, device=device) for c in counts])
            spread = _spread(b1, n.float())
        else:
            n = torch.tensor(counts, device=device)
            spread = torch.tensor([momentum_spread(b1, int(c)) for c in counts], device=device)
        root = (1 - b2 ** n.float()).sqrt()
        eps = (group["eps"] * root).repeat_interleave(repeat, output_size=len(g))
        factor = (spread * root * group["lr"]).repeat_interleave(repeat, output_size=len(g))
    weighted = torch.div(g2, v.sqrt_().add_(eps))  # size * g^2, up to the scalar factor
    if not scalar:
        weighted.mul_(factor)
    # the parameters come layer by layer: one segment per layer
    width: dict[int, int] = {}  # sampled coordinates per layer, in order
    for (li, _), length in zip(items, lengths):
        width[li] = width.get(li, 0) + length
    segments = torch.tensor(list(width.values()), device=device)
    per_layer = torch.segment_reduce(torch.stack([weighted, g2], dim=1), "sum", lengths=segments).T  # [2, layers]
    if scalar:
        per_layer[0].mul_(factor)
    sums.index_add_(1, torch.tensor(list(width), device=device), per_layer)
