"""LayerNorm and RMSNorm: elementwise affine maps of the normalised input ``x_hat``.

weight grad = sum over positions of ``grad_out * x_hat``, bias grad = sum of ``grad_out``. Not
bilinear (dims are small), so projections of these are dense. BatchNorm mixes samples and is
refused in ``refused.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from influence_hooks.capture.rules import LayerRule, compute_dtype, register_rule, trainable


class _AffineNormRule(LayerRule):
    def _normalised(self, module, x):
        raise NotImplementedError

    def exact(self, module, inputs, output, grad_output):
        dtype = compute_dtype(module, grad_output)
        x, go = inputs[0].to(dtype), grad_output.to(dtype)
        positions = tuple(range(1, x.dim() - len(module.normalized_shape)))

        def sum_positions(t):  # t.sum(()) would reduce every dim, the batch included
            return t.sum(positions) if positions else t

        grads = {}
        if trainable(module, "weight"):
            grads["weight"] = sum_positions(go * self._normalised(module, x))
        if trainable(module, "bias"):
            grads["bias"] = sum_positions(go)
        return self._pack(module, grads)


@register_rule(nn.LayerNorm)
class LayerNormRule(_AffineNormRule):
    name = "layernorm"

    def _normalised(self, module, x):
        # with a weight of ones the CPU kernel takes its vectorised path, about 1.8x faster than
        # without one, and x * 1 is exact
        return F.layer_norm(x, module.normalized_shape, _ones(module.normalized_shape, x), None, module.eps)


_ONES: dict[tuple, torch.Tensor] = {}


def _ones(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    key = (tuple(shape), like.dtype, like.device)
    ones = _ONES.get(key)
    if ones is None:
        ones = _ONES[key] = torch.ones(shape, dtype=like.dtype, device=like.device)
    return ones


if hasattr(nn, "RMSNorm"):  # torch >= 2.4

    @register_rule(nn.RMSNorm)
    class RMSNormRule(_AffineNormRule):
        name = "rmsnorm"
        param_names = ("weight",)

        def _normalised(self, module, x):
            return F.rms_norm(x, module.normalized_shape, None, module.eps)
