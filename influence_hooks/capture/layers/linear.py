"""nn.Linear: G_n = sum_t grad_out_t [x_t, 1]^T, i.e. L = grad_out [N, T, d_out], R = [x, 1]."""

from __future__ import annotations

from torch import Tensor, nn

from influence_hooks.capture.rules import (
    BilinearRule,
    affine_factor,
    compute_dtype,
    input_side_index,
    register_rule,
    trainable,
)


@register_rule(nn.Linear)
class LinearRule(BilinearRule):
    """Any number of leading dims: ``x [N, ..., d_in]``, positions summed."""

    name = "linear"

    def factor_dims(self, module: nn.Linear) -> tuple[int, int]:
        dw = module.in_features if trainable(module, "weight") else 0
        return module.out_features, dw + int(trainable(module, "bias"))

    def canonical_index(self, module: nn.Linear) -> Tensor:
        return input_side_index(module, module.out_features, module.in_features, "right")

    def project_factors(self, module, inputs, grad_output, p_left, p_right):
        dtype = compute_dtype(module, grad_output)
        n = grad_output.shape[0]
        go = grad_output.reshape(n, -1, module.out_features).to(dtype)
        x = inputs[0].reshape(n, -1, module.in_features).to(dtype)
        left = go if p_left is None else go @ p_left.T
        right = affine_factor(x, trainable(module, "weight"), trainable(module, "bias"), p_right)
        return left, right
