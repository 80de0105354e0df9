"""Choosing which layers to record, and how many projected dimensions each one gets."""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import json
import math
import warnings
from typing import Any, Sequence

from torch import nn

from ..errors import ConfigurationError
from .projection import LayerProjector, ProjectionSpec, plan_projection
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
    module (MultiheadAttention, RNNs, BatchNorm). exclude: name globs to leave out (a container
    leaves out its contents). A glob or type that selects nothing, an exclude glob that matches no
    module with trainable parameters, or a selected module no rule can handle, is an error (naming
    the modules there are); an exclude glob that matches only modules not recorded anyway is a
    warning.
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
            raise ConfigurationError(
                f"layer pattern {pattern!r} matches no module with trainable parameters. "
                + _name_help(pattern, named))
    for t in layer_types or []:
        hits = [(n, m) for n, m in named if _type_matches(m, [t]) and own_trainable(m)]
        if not hits:
            present = sorted({type(m).__name__ for _, m in named if own_trainable(m)})
            raise ConfigurationError(
                f"layer type {t!r} selects no module with trainable parameters. The model's modules with "
                f"trainable parameters of their own are of types {present}; give one of these names (or "
                "the class itself).")
        for n, m in hits:
            chosen.setdefault(n, m)
    if isinstance(exclude, str):
        exclude = [exclude]
    for pattern in exclude or []:
        # a pattern naming a container excludes everything inside it, as layers= includes it
        hits = [n for n in chosen if _matches(n, pattern)]
        if not hits:
            in_model = [n for n, m in named if n and _matches(n, pattern) and _has_trainable(m)]
            if not in_model:  # as for layers=: a pattern that names nothing is a mistake
                raise ConfigurationError(
                    f"exclude pattern {pattern!r} matches no module with trainable parameters. "
                    + _name_help(pattern, named))
            warnings.warn(f"exclude pattern {pattern!r} matches {_short(in_model)}, but none of them is "
                          f"recorded anyway (recorded: {_short(list(chosen))}); it has no effect.",
                          RuntimeWarning, stacklevel=3)
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


def _matches(name: str, pattern: str) -> bool:
    """A module matches a pattern that names it or a container above it."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def _has_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _short(names: list[str], n: int = 12) -> str:
    return f"{names[:n]}{f' (+{len(names) - n} more)' if len(names) > n else ''}"


def _name_help(pattern: str, named: list[tuple[str, nn.Module]]) -> str:
    """What to write instead: module names are full paths from the model given to the recorder
    (with the Lightning callback, from the LightningModule: 'model.lm_head', not 'lm_head')."""
    with_params = [n for n, m in named if n and _has_trainable(m)]
    close = [n for n in with_params if fnmatch.fnmatchcase(n, "*." + pattern)]
    close = close or difflib.get_close_matches(pattern, with_params, n=3, cutoff=0.6)
    hint = f"Did you mean {close[:5]}? " if close else ""
    return (f"{hint}Patterns match full module names (model.named_modules(), from the module passed to "
            f"the recorder or trained by Lightning). Modules with parameters: {_short(with_params, 20)}")


ALLOCATIONS = ("equal", "sqrt", "linear")


def split_dims(grad_dims: list[int], total: int, allocation: str = "equal") -> list[int]:
    """Share `total` projected dimensions among layers, in proportion to a weight per layer:
    1 ('equal'), sqrt(grad_dim) ('sqrt') or grad_dim ('linear'). A layer never gets more than its
    own gradient dimension, nor less than 1; what capped layers leave over goes to the others."""
    if allocation not in ALLOCATIONS:
        raise ConfigurationError(f"projection allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    if total < len(grad_dims):
        raise ConfigurationError(f"projection={total} is less than one dimension per layer "
                                 f"({len(grad_dims)} layers); raise it or select fewer layers.")
    weight = [1.0 if allocation == "equal" else math.sqrt(g) if allocation == "sqrt" else float(g)
              for g in grad_dims]
    dims = [0] * len(grad_dims)
    # the layers whose cap binds first (smallest grad_dim per unit of weight) are settled first
    left, remaining = total, sorted(range(len(grad_dims)), key=lambda i: (grad_dims[i] / weight[i], i))
    while remaining:
        w_left = sum(weight[j] for j in remaining)
        i = remaining.pop(0)
        share = int(left * weight[i] / w_left) if remaining else left
        dims[i] = min(grad_dims[i], max(share, 1))
        left -= dims[i]
    return dims


def plan_layers(selection: list[tuple[str, nn.Module, LayerRule]],
                projection: int | dict[str, Any] | None, kind: str = "auto",
                seed: int = 0, allocation: str = "equal") -> list[CapturedLayer]:
    """Projection specs for the selected layers and their column offsets in a gradient row.

    projection: total dimensions shared among layers (int), per-layer dimensions by name glob
    (dict; every layer must match a key; 'none' keeps that layer exact), or None for exact
    gradients (RecordingConfig.projection_budget() gives this form). allocation: how an int
    budget is shared (split_dims).
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
        ks = list(split_dims(grad_dims, projection, allocation))
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


def layers_from_manifest(model: nn.Module, layers_meta: list[dict]) -> list[CapturedLayer]:
    """The recorded layers of a run rebuilt on `model` (its manifest's "layers"), with the run's
    own projections and column offsets, so new gradients land in the run's space. Raises when the
    model lacks a recorded module or one differs from what was recorded (type, rule, shapes)."""
    modules = dict(model.named_modules())
    out = []
    for meta in layers_meta:
        name = meta["name"]
        module = modules.get(name)
        if module is None:
            raise ConfigurationError(
                f"the run recorded layer {name!r}, but the model has no module of that name. Pass the model "
                "that was trained (with the Lightning callback: the LightningModule itself, whose module "
                f"names start at its attributes). {_name_help(name.rsplit('.', 1)[-1], list(modules.items()))}")
        rule = rule_for(module)
        shapes = [[k, list(v)] for k, v in rule.param_shapes(module).items()]
        if (type(module).__name__, rule.name, shapes) != (meta["module_type"], meta["rule"], meta["param_shapes"]):
            raise ConfigurationError(
                f"layer {name!r} is a {type(module).__name__} with trainable parameters {shapes} (rule "
                f"{rule.name!r}), but the run recorded a {meta['module_type']} with {meta['param_shapes']} "
                f"(rule {meta['rule']!r}): this is not the model the run was recorded on (or parameters were "
                "frozen or unfrozen since).")
        spec = ProjectionSpec.from_dict(meta["projection"])
        out.append(CapturedLayer(name, module, rule, spec, LayerProjector(name, module, rule, spec),
                                 int(meta["offset"])))
    return out
