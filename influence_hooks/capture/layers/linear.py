"""nn.Linear: G_n = sum_t grad_out_t [x_t, 1]^T, i.e. L = grad_out [N, T, d_out], R = [x, 1]
(``[N, d_out]`` and ``[N, d_in + 1]`` for an input without positions)."""

from __future__ import annotations

from torch import Tensor, nn

from influence_hooks.capture.rules import (
    BilinearRule,
    affine_projector,
    input_side_index,
    row_projector,
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

    def bind(self, module: nn.Linear, p_left, p_right, dtype):
        d_out, d_in = module.out_features, module.in_features
        left = row_projector(p_left)
        right = affine_projector(p_right, trainable(module, "weight"), trainable(module, "bias"))

        def factors(inputs, grad_output):
            go, x = grad_output, inputs[0]
            if go.dim() > 3:  # all positions in one dim
                go, x = go.reshape(go.shape[0], -1, d_out), x.reshape(x.shape[0], -1, d_in)
            return left(go.to(dtype)), right(x.to(dtype))

        return factors
