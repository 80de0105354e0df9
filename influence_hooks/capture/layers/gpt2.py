"""transformers' GPT-2 ``Conv1D``: y = x @ W + b with W ``[nx, nf]`` (Linear, transposed).

Registered by name so that transformers stays an optional dependency. Since the weight is
stored input-major, the input side is the left factor: L = [x, 1] (nx + 1), R = grad_out (nf).
"""

from __future__ import annotations

from torch import Tensor

from influence_hooks.capture.rules import (
    BilinearRule,
    affine_projector,
    input_side_index,
    row_projector,
    register_rule,
    trainable,
)


@register_rule("transformers.pytorch_utils.Conv1D", "transformers.modeling_utils.Conv1D")
class GPT2Conv1DRule(BilinearRule):
    name = "gpt2_conv1d"
    grad_side = "right"

    def factor_dims(self, module) -> tuple[int, int]:
        dw = module.nx if trainable(module, "weight") else 0
        return dw + int(trainable(module, "bias")), module.nf

    def canonical_index(self, module) -> Tensor:
        return input_side_index(module, module.nf, module.nx, "left")

    def bind(self, module, p_left, p_right, dtype):
        nx, nf = module.nx, module.nf
        left = affine_projector(p_left, trainable(module, "weight"), trainable(module, "bias"))
        right = row_projector(p_right)

        def factors(inputs, grad_output):
            x, go = inputs[0], grad_output
            if go.dim() > 3:  # all positions in one dim
                x, go = x.reshape(x.shape[0], -1, nx), go.reshape(go.shape[0], -1, nf)
            return left(x.to(dtype)), right(go.to(dtype))

        return factors
