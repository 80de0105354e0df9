"""Capture: per-sample gradients of each module's own parameters, from what its hooks see."""

from influence_hooks.capture.rules import (
    BilinearRule,
    FuncRule,
    LayerRule,
    UnsupportedModuleError,
    compute_dtype,
    register_rule,
    rule_for,
)
from influence_hooks.capture import layers  # noqa: E402,F401  (registers the layer rules)

__all__ = [
    "BilinearRule",
    "FuncRule",
    "LayerRule",
    "UnsupportedModuleError",
    "compute_dtype",
    "register_rule",
    "rule_for",
]
