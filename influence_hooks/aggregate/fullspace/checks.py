"""Checks that what the full-space backend is given matches the recorded run: the model, the
dataset, and (at the first step processed) the recomputed gradients against the recorded ones."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ...capture.projection import LayerProjector, ProjectionSpec
from ...capture.rules import rule_for
from ...errors import ConfigurationError
from ...storage.reader import Run
from .model_fn import LossFunctions, Params, tied_aliases

CHECK_TOLERANCE = 2e-2


def layer_param_names(run: Run, model: nn.Module | None = None) -> list[str]:
    """The model parameter names of the recorded layers; with `model`, a tied weight under the name
    named_parameters() gives it (GPT-2's lm_head.weight is transformer.wte.weight)."""
    names = [f"{l.name}.{p}" if l.name else p for l in run.layers for p in l.param_shapes]
    if model is None:
        return names
    aliases = tied_aliases(model)
    return list(dict.fromkeys(aliases.get(n, n) for n in names))


def check_model(run: Run, model: nn.Module) -> None:
    """Every recorded layer exists in `model` with the recorded trainable parameter shapes."""
    modules = dict(model.named_modules())
    problems = []
    for l in run.layers:
        m = modules.get(l.name)
        if m is None:
            problems.append(f"layer {l.name!r} ({l.module_type}) is missing")
            continue
        if type(m).__name__ != l.module_type:
            problems.append(f"layer {l.name!r} is a {type(m).__name__}, the run recorded a {l.module_type}")
        own = {n: tuple(p.shape) for n, p in m.named_parameters(recurse=False) if p.requires_grad}
        if own != {k: tuple(v) for k, v in l.param_shapes.items()}:
            problems.append(f"layer {l.name!r} has trainable parameters {own}, the run recorded "
                            f"{dict(l.param_shapes)}")
    if problems:
        raise ConfigurationError(
            "the model does not match the run: " + "; ".join(problems[:5])
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            + ". Pass the model that was trained (same architecture, same trainable parameters).")


def check_dataset(run: Run, dataset: Any) -> None:
    if dataset is None or not hasattr(dataset, "__getitem__"):
        raise ConfigurationError("exact curvature recomputes each step's batch: pass dataset= (the training "
                                 "dataset, indexed by the recorded sample ids).")
    try:
        n = len(dataset)
    except TypeError:
        raise ConfigurationError("dataset= must be a map-style dataset with a length (dataset[i] for the "
                                 "recorded sample id i).") from None
    ids = run.sample_ids
    if len(ids) and (int(ids.max()) >= n or int(ids.min()) < 0):
        raise ConfigurationError(
            f"the run's sample ids range over [{int(ids.min())}, {int(ids.max())}], but the dataset has {n} "
            "items: it is not the dataset the run was recorded on (pass the training dataset itself, "
            "indexed as the train loader's sampler indexed it).")


def project_like_run(run: Run, model: nn.Module, grads: Params, n: int) -> tuple[Tensor, Tensor]:
    """Per-sample gradients {name: [n, *shape]} of the recorded layers -> ([n, K] rows projected
    like the run's, [K] bool mask of the columns filled)."""
    out = torch.zeros(n, run.dim, dtype=torch.float64)
    mask = torch.zeros(run.dim, dtype=torch.bool)
    modules = dict(model.named_modules())
    for l in run.layers:
        module = modules[l.name]
        rule = rule_for(module)
        # the canonical layout follows the module's parameter order (the manifest's dict is sorted)
        names = [f"{l.name}.{p}" if l.name else p for p in rule.param_shapes(module)]
        if any(nm not in grads for nm in names):
            continue
        flat = torch.cat([grads[nm].reshape(n, -1).to("cpu", torch.float64) for nm in names], 1)
        projector = LayerProjector(l.name, module, rule, ProjectionSpec.from_dict(l.projection))
        out[:, l.offset:l.offset + l.dim] = projector.project_exact(flat)
        mask[l.offset:l.offset + l.dim] = True
    return out, mask


def _report(check: str, msg: str) -> None:
    if check == "raise":
        raise ConfigurationError(msg)
    warnings.warn(msg, RuntimeWarning)


def _recorded_layer_grads(run: Run, model: nn.Module, lf: LossFunctions, diff: Params, fixed: Params, batch: Any,
                          *, query: bool = False) -> Params:
    """Per-sample gradients of the recorded layers' parameters, each module's own part: a tied
    weight (one tensor, several modules) is given under each module's name, untied, as the hooks
    recorded it."""
    pnames = {n for n, _ in model.named_parameters()}
    allp = {**diff, **{k: v for k, v in fixed.items() if k in pnames}}
    aliases = tied_aliases(model)
    allp.update({alias: allp[name] for alias, name in aliases.items() if name in allp})
    d = {k: allp[k] for k in layer_param_names(run) if k in allp}
    rest = {k: v for k, v in {**fixed, **diff}.items() if k not in d}
    tied = any(k in aliases or k in aliases.values() for k in d)
    return lf.per_sample_grads(d, rest, batch, query=query, untied=tied)


def check_recording(run: Run, model: nn.Module, lf: LossFunctions, diff: Params, fixed: Params, batch: Any,
                    ids: np.ndarray, t: int, check: str, n_max: int = 8) -> dict[str, Any]:
    """Recompute a few per-sample gradients of step t and compare them with the recorded rows."""
    n = min(n_max, len(ids))
    sub = torch.utils._pytree.tree_map(lambda x: x[:n], batch)
    g = _recorded_layer_grads(run, model, lf, diff, fixed, sub)
    ours, mask = project_like_run(run, model, g, n)
    if not bool(mask.any()):
        return {"step": t, "skipped": "no recorded layer could be projected"}
    rec = next(run.iter_steps((t, t + 1), dtype=torch.float64, skip_nonfinite=False))
    pos = {int(s): j for j, s in enumerate(rec.sample_ids.numpy())}
    theirs = rec.grads[[pos[int(s)] for s in ids[:n]]][:, mask]
    ours = ours[:, mask]
    err = float((ours - theirs).norm() / theirs.norm().clamp_min(1e-300))
    info = {"step": t, "samples": int(n), "relative_error": err}
    if not err <= CHECK_TOLERANCE:
        _report(check, (
            f"recomputed per-sample gradients at step {t} (samples {ids[:n].tolist()}) differ from the recorded "
            f"ones by {err:.3g} (relative): the dataset (its order or transforms), loss_fn, the model or the "
            "parameters do not match the training run. dataset[i] must be the item the train loader "
            "collated for sample id i, and loss_fn the training loss; dropout or batch norm in train "
            "mode also break this (pass check='warn' to go on)."))
    return info


def check_queries(run: Run, model: nn.Module, lf: LossFunctions, diff: Params, fixed: Params, qbatch: Any, Q: int,
                  t: int, info: dict[str, Any]) -> None:
    """Warn when u_q(t) differs from the recorded query gradients of the same step (if recorded)."""
    if not run.has_queries or t not in set(run.query_steps.tolist()):
        return
    rec = run.query_gradients(t, dtype=torch.float64)
    if rec.shape[0] != Q:
        return
    u = _recorded_layer_grads(run, model, lf, diff, fixed, qbatch, query=True)
    ours, mask = project_like_run(run, model, u, Q)
    if not bool(mask.any()):
        return
    err = float((ours[:, mask] - rec[:, mask]).norm() / rec[:, mask].norm().clamp_min(1e-300))
    info["query_relative_error"] = err
    if not err <= CHECK_TOLERANCE:
        warnings.warn(f"the query gradients at step {t} differ from the recorded ones by {err:.3g} (relative); "
                      "fine if queries= are other samples than the recorded queries, otherwise check "
                      "query_loss_fn.", RuntimeWarning)
