"""Test-only modules shared by the rule and projection tests."""

import torch
from torch import nn


class ScaleShift(nn.Module):
    """A custom layer no rule is registered for (served by the generic torch.func rule):
    y = tanh(x * exp(log_scale)) + shift."""

    def __init__(self, d: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.randn(d) * 0.3)
        self.shift = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.tanh(x * self.log_scale.exp()) + self.shift


def frozen(module: nn.Module, name: str) -> nn.Module:
    getattr(module, name).requires_grad_(False)
    return module
