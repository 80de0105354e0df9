"""nn.Linear: G_n = sum_t grad_out_t [x_t, 1]^T, i.e. L = grad_out [N, T, d_out], R = [x, 1]
(``[N, d_out]`` and ``[N, d_in + 1]`` for an input without positions)."""

from __future__ import annotations

from torch import Tensor, nn

from influence_hooks.capture.rules import (
    BilinearRule,
    affine_factor,
    compute_dtype,
    input_side_index,
    positions,
    project_rows,
    register_rule,
    split_affine,
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

    def prepare(self, module: nn.Linear, p_left, p_right):
        return p_left, split_affine(p_right, trainable(module, "weight"), trainable(module, "bias"))

    def project_factors(self, module, inputs, grad_output, p_left, p_right):
        dtype = compute_dtype(module, grad_output)
        go = positions(grad_output, module.out_features).to(dtype)
        x = positions(inputs[0], module.in_features).to(dtype)
        left = project_rows(go, p_left)
        right = affine_factor(x, trainable(module, "weight"), trainable(module, "bias"), p_right)
        return left, right
