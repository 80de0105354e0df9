"""nn.Conv1d / nn.Conv2d: a Linear applied to every input patch.

L = grad_out per output position ``[N, T, C_out]``, R = [unfolded input patch, 1]
``[N, T, C_in * prod(kernel) + 1]``. The projected input factor ``R P_R^T`` is itself a
convolution of the input with ``P_R`` reshaped as a ``[kR, C_in, *kernel]`` kernel (bias column
as conv bias), so projection never unfolds the input. Padding of any kind ('same', 'valid',
non-'zeros' padding_mode) is applied up front with ``F.pad`` exactly as the module's forward
does, after which every conv here runs with padding 0.

Grouped convs (groups > 1) are not bilinear in one pair of factors; their exact gradient is
computed per group and projected densely.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from influence_hooks.capture.rules import (
    BilinearRule,
    compute_dtype,
    input_side_index,
    register_rule,
    trainable,
)


class _ConvRule(BilinearRule):
    ndim: int

    def is_bilinear(self, module: nn.Module) -> bool:
        return module.groups == 1

    def _patch_dim(self, module) -> int:
        return module.in_channels // module.groups * math.prod(module.kernel_size)

    def factor_dims(self, module) -> tuple[int, int]:
        dw = self._patch_dim(module) if trainable(module, "weight") else 0
        return module.out_channels, dw + int(trainable(module, "bias"))

    def canonical_index(self, module) -> Tensor:
        return input_side_index(module, module.out_channels, self._patch_dim(module), "right")

    @staticmethod
    def _padded(module, x: Tensor) -> Tensor:
        pad = module._reversed_padding_repeated_twice
        if not any(pad):
            return x
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return F.pad(x, pad, mode=mode)

    def _unfold(self, module, x: Tensor) -> Tensor:
        """Padded input patches ``[N, C_in * prod(kernel), T]`` (channel-major, like the weight)."""
        x = self._padded(module, x)
        k, s, d = module.kernel_size, module.stride, module.dilation
        if self.ndim == 1:  # F.unfold is 2-D only: treat the sequence as a 1 x L image
            x, k, s, d = x.unsqueeze(2), (1, *k), (1, *s), (1, *d)
        return F.unfold(x, k, dilation=d, padding=0, stride=s)

    def exact(self, module, inputs, output, grad_output):
        dtype = compute_dtype(module, grad_output)
        n, g = grad_output.shape[0], module.groups
        go = grad_output.to(dtype).flatten(2)  # [N, C_out, T]
        grads = {}
        if trainable(module, "weight"):
            cols = self._unfold(module, inputs[0].to(dtype))  # [N, C_in * K, T]
            cols = cols.reshape(n, g, -1, cols.shape[-1])
            w = torch.einsum("ngot,ngit->ngoi", go.reshape(n, g, -1, go.shape[-1]), cols)
            grads["weight"] = w.reshape(n, module.out_channels, -1)
        if trainable(module, "bias"):
            grads["bias"] = go.sum(2)
        return self._pack(module, grads)

    def bind(self, module, p_left, p_right, dtype):
        use_w, use_b = trainable(module, "weight"), trainable(module, "bias")
        conv = F.conv1d if self.ndim == 1 else F.conv2d
        if p_right is not None and use_w:  # R P_R^T is a convolution with P_R as its kernel
            dw = self._patch_dim(module)
            kernel = p_right[:, :dw].reshape(-1, module.in_channels, *module.kernel_size)
            bias = p_right[:, dw] if use_b else None
            own_padding = module.padding_mode == "zeros"  # let the conv pad: no padded copy of x

        def factors(inputs, grad_output):
            go = grad_output.to(dtype).flatten(2)  # [N, C_out, T], as laid out in memory
            # P_L @ go keeps the contiguous [N, kL, T] layout; transposing first would copy go
            left = (go if p_left is None else p_left @ go).transpose(1, 2)  # [N, T, kL] view
            x = inputs[0].to(dtype)
            if p_right is None:
                parts = [self._unfold(module, x).transpose(1, 2)] if use_w else []
                if use_b:
                    parts.append(go.new_ones(go.shape[0], go.shape[2], 1))
                return left, torch.cat(parts, dim=-1)
            if not use_w:  # only the bias column: R = 1 at every position
                return left, p_right[:, 0].expand(go.shape[0], go.shape[2], p_right.shape[0])
            if own_padding:
                right = conv(x, kernel, bias, module.stride, module.padding, module.dilation)
            else:
                right = conv(self._padded(module, x), kernel, bias, module.stride, 0, module.dilation)
            return left, right.flatten(2).transpose(1, 2)

        return factors


@register_rule(nn.Conv1d)
class Conv1dRule(_ConvRule):
    name = "conv1d"
    ndim = 1


@register_rule(nn.Conv2d)
class Conv2dRule(_ConvRule):
    name = "conv2d"
    ndim = 2
