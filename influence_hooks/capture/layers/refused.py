"""Module types with parameters whose per-sample gradients cannot be captured from hooks."""

from __future__ import annotations

from torch import nn

from influence_hooks.capture.rules import refuse_module

refuse_module(
    nn.modules.batchnorm._BatchNorm,
    "BatchNorm normalises with statistics of the whole batch, so every sample's output (and "
    "gradient) depends on the other samples of the batch and no per-sample gradient exists; "
    "replace it with GroupNorm or LayerNorm, or freeze it (and put it in eval mode)",
)
refuse_module(
    nn.MultiheadAttention,
    "MultiheadAttention applies its projections with functional calls on query/key/value, so "
    "their per-sample gradients cannot be recovered from its hooks; freeze it, or use an "
    "attention written with nn.Linear layers",
)
refuse_module(
    nn.RNNBase,
    "recurrent layers take and return tuples and reuse their weights across time steps, which "
    "no rule here handles; freeze them",
)
