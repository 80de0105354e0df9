"""Choosing which layers to record, and how many projected dimensions each one gets."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import warnings
from typing import Any, Sequence

from torch import nn

from ..errors import ConfigurationError
from .projection import LayerProjector, plan_projection
from .hooks import CapturedLayer
from .rules import FuncRule, LayerRule, UnsupportedModuleError, own_trainable, refusal_reason, rule_for


def _type_matches(module: nn.Module, types: Sequence[type | str]) -> bool:
    for t in types:
        if isinstance(t, str):
            if any(c.__name__ == t or f"{c.__module__}.{c.__name__}" == t for c in type(module).__mro__):
                return True
        elif isinstance(module, t):
            return True
    return False


def select_layers(model: nn.Module, layers: Sequence[str] | str | None = None,
                  layer_types: Sequence[type | str] | None = None,
                  exclude: Sequence[str] | None = None) -> list[tuple[str, nn.Module, LayerRule]]:
    """The modules to record, as (name, module, rule), in the model's module order.

    layers: name globs (fnmatch). A module matching a glob is recorded; one without trainable
    parameters of its own is expanded into its supported descendants. layer_types: module classes
    (or class names) to record. Neither given: every module with an exact rule (modules that only
    the torch.func fallback handles are recorded when named). Expanding never enters a refused
    module (MultiheadAttention, RNNs, BatchNorm). A glob or type that selects nothing, or a
    selected module no rule can handle, is an error.
    """
    if isinstance(layers, str):
        layers = [layers]
    named = [(n, m) for n, m in model.named_modules()]
    chosen: dict[str, nn.Module] = {}

    def add_supported_descendants(prefix: str, module: nn.Module) -> int:
        count = 0
        refused: list[str] = []  # inside a refused module (e.g. MultiheadAttention's out_proj,
        # which it calls functionally) no layer's hooks see its computation
        for sub_name, sub in module.named_modules(prefix=prefix):
            if any(sub_name.startswith(r + ".") for r in refused):
                continue
            if refusal_reason(sub) is not None:
                refused.append(sub_name)
                continue
            if own_trainable(sub):
                try:
                    rule = rule_for(sub)
                except UnsupportedModuleError:
                    continue
                if rule.name != FuncRule.name:
                    chosen.setdefault(sub_name, sub)
                    count += 1
        return count

    if layers is None and layer_types is None:
        add_supported_descendants("", model)
    for pattern in layers or []:
        hits = [(n, m) for n, m in named if n and fnmatch.fnmatchcase(n, pattern)]
        found = 0
        for n, m in hits:
            if own_trainable(m):
                chosen.setdefault(n, m)
                found += 1
            else:
                found += add_supported_descendants(n, m)
        if not found:
            candidates = [n for n, m in named if n and own_trainable(m)]
            raise ConfigurationError(
                f"layer pattern {pattern!r} matches no module with trainable parameters. Layers with "
                f"parameters in this model: {candidates[:20]}{' ...' if len(candidates) > 20 else ''}")
    for t in layer_types or []:
        hits = [(n, m) for n, m in named if _type_matches(m, [t]) and own_trainable(m)]
        if not hits:
            raise ConfigurationError(f"layer type {t!r} selects no module with trainable parameters.")
        for n, m in hits:
            chosen.setdefault(n, m)
    for pattern in exclude or []:
        # a pattern naming a container excludes everything inside it, as layers= includes it
        hits = [n for n in chosen if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, pattern + ".*")]
        if not hits:
            warnings.warn(f"exclude pattern {pattern!r} matches no selected layer (selected: "
                          f"{list(chosen)[:20]}); it has no effect.", RuntimeWarning, stacklevel=3)
        for n in hits:
            del chosen[n]
    if not chosen:
        raise ConfigurationError("no layer selected: the model has no supported layer with trainable "
                                 "parameters, or `exclude` removed them all.")
    order = {n: i for i, (n, _) in enumerate(named)}
    out = []
    for n in sorted(chosen, key=order.__getitem__):
        try:
            out.append((n, chosen[n], rule_for(chosen[n])))
        except UnsupportedModuleError as e:
            raise UnsupportedModuleError(f"layer {n!r}: {e}") from e
    return out


def split_dims(grad_dims: list[int], total: int) -> list[int]:
    """Share `total` projected dimensions among layers: equal shares, never more than a layer's own
    gradient dimension, with what small layers leave over going to the larger ones."""
    if total < len(grad_dims):
        raise ConfigurationError(f"projection={total} is less than one dimension per layer "
                                 f"({len(grad_dims)} layers); raise it or select fewer layers.")
    dims = [0] * len(grad_dims)
    left, remaining = total, sorted(range(len(grad_dims)), key=grad_dims.__getitem__)
    while remaining:
        share = left // len(remaining)
        i = remaining.pop(0)
        dims[i] = min(grad_dims[i], max(share, 1))
        left -= dims[i]
    return dims


def plan_layers(selection: list[tuple[str, nn.Module, LayerRule]],
                projection: int | dict[str, Any] | None, kind: str = "auto",
                seed: int = 0) -> list[CapturedLayer]:
    """Projection specs for the selected layers and their column offsets in a gradient row.

    projection: total dimensions shared among layers (int), per-layer dimensions by name glob
    (dict; every layer must match a key; 'none' keeps that layer exact), or None for exact
    gradients (RecordingConfig.projection_budget() gives this form).
    """
    grad_dims = [rule.grad_dim(m) for _, m, rule in selection]
    if projection is None:
        ks: list[int | None] = [None] * len(selection)
    elif isinstance(projection, dict):
        ks = []
        for name, _, _ in selection:
            key = next((p for p in projection if fnmatch.fnmatchcase(name, p)), None)
            if key is None:
                raise ConfigurationError(
                    f"layer {name!r} matches no key of projection={projection}; add a key for it "
                    "(e.g. '*' for every other layer).")
            ks.append(None if projection[key] == "none" else int(projection[key]))
    elif isinstance(projection, int) and projection > 0:
        ks = list(split_dims(grad_dims, projection))
    else:
        raise ConfigurationError(f"projection must be a positive int, a dict of per-layer dims, or "
                                 f"'none'; got {projection!r}")
    out, offset = [], 0
    for (name, module, rule), k in zip(selection, ks):
        spec = plan_projection(name, module, rule, k, kind=kind if k else "none", seed=seed)
        out.append(CapturedLayer(name, module, rule, spec, LayerProjector(name, module, rule, spec), offset))
        offset += spec.out_dim
    return out


def layers_manifest(layers: list[CapturedLayer]) -> list[dict]:
    return [{"name": l.name, "rule": l.rule.name, "module_type": type(l.module).__name__,
             "offset": l.offset, "dim": l.spec.out_dim, "grad_dim": l.rule.grad_dim(l.module),
             "param_shapes": [[k, list(v)] for k, v in l.rule.param_shapes(l.module).items()],
             "projection": l.spec.to_dict()} for l in layers]


def projection_fingerprint(layers_meta: list[dict]) -> str:
    """A short hash of everything that determines the projection (layer specs, shapes, seed)."""
    key = [(l["name"], l["param_shapes"], l["projection"]) for l in layers_meta]
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
