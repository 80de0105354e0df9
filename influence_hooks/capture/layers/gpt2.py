"""transformers' GPT-2 ``Conv1D``: y = x @ W + b with W ``[nx, nf]`` (Linear, transposed).

Registered by name so that transformers stays an optional dependency. Since the weight is
stored input-major, the input side is the left factor: L = [x, 1] (nx + 1), R = grad_out (nf).
"""

from __future__ import annotations

from torch import Tensor

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


@register_rule("transformers.pytorch_utils.Conv1D", "transformers.modeling_utils.Conv1D")
class GPT2Conv1DRule(BilinearRule):
    name = "gpt2_conv1d"
    grad_side = "right"

    def factor_dims(self, module) -> tuple[int, int]:
        dw = module.nx if trainable(module, "weight") else 0
        return dw + int(trainable(module, "bias")), module.nf

    def canonical_index(self, module) -> Tensor:
        return input_side_index(module, module.nf, module.nx, "left")

    def prepare(self, module, p_left, p_right):
        return split_affine(p_left, trainable(module, "weight"), trainable(module, "bias")), p_right

    def project_factors(self, module, inputs, grad_output, p_left, p_right):
        dtype = compute_dtype(module, grad_output)
        x = positions(inputs[0], module.nx).to(dtype)
        go = positions(grad_output, module.nf).to(dtype)
        left = affine_factor(x, trainable(module, "weight"), trainable(module, "bias"), p_left)
        right = project_rows(go, p_right)
        return left, right
