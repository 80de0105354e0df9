"""Checks of a model and its selected layers, before and at the first recorded step."""

from __future__ import annotations

import warnings

from torch import nn

from ..capture.hooks import GradientCapture
from ..errors import ConfigurationError


def warn_batch_mixing(model: nn.Module) -> None:
    mixing = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if mixing:
        warnings.warn(
            f"the model has BatchNorm layers {mixing[:5]}: in train mode they normalise with "
            "statistics of the whole batch, so the recorded gradient of a sample also depends on the "
            "other samples of its batch (exact per-sample gradients need them in eval mode or "
            "replaced by GroupNorm/LayerNorm).", RuntimeWarning, stacklevel=4)


def warn_tied_parameters(layers: list) -> None:
    """Warn once per parameter that several recorded layers share (GPT-2's wte and lm_head), with
    the layers' full module paths, which is what exclude= matches."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for l in layers:
        for pname, p in l.module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append((l.name, f"{l.name}.{pname}" if l.name else pname))
    tied = [entries for entries in owners.values() if len(entries) > 1]
    if not tied:
        return
    shared = "; ".join(" is ".join(p for _, p in entries) for entries in tied)
    drop = sorted({name for entries in tied for name, _ in entries[1:]})
    warnings.warn(
        f"recorded layers share (tie) a parameter: {shared}. Each layer records its own part of that "
        "parameter's per-sample gradient in a separate block, so inner products over the run miss the "
        f"cross terms between the parts. Record one of them only: exclude={drop} (module paths as "
        "model.named_modules() names them), or untie the weights.", RuntimeWarning, stacklevel=4)


def broadcast_layers(capture: GradientCapture, mismatch: dict[int, int], n_rows: int) -> set[str]:
    """The layers of `mismatch` ({layer index: batch size its hook saw}) applied to an input shared
    by the whole batch (batch size 1 where the micro-batch has more rows). Empty unless every
    mismatched layer is one and some layer is not: then the sample ids are wrong instead, and
    collect() says so."""
    broadcast = {capture.layers[i].name for i, seen in mismatch.items() if seen == 1 and n_rows > 1}
    if broadcast != {capture.layers[i].name for i in mismatch} or len(broadcast) == len(capture.layers):
        return set()
    return broadcast


def warn_left_out(broadcast: set[str], planned: bool, stacklevel: int) -> None:
    """planned: whether the projection was shared out again without them (at the first gradient)."""
    unused = ("" if planned else
              " Their share of the projection stays unused, since it was planned with them (gradients were "
              "taken in before they showed, start() was called before the first step, or the run resumed "
              f"was recorded that way); in a new run exclude={sorted(broadcast)} gives it to the other layers.")
    warnings.warn(f"not recording {sorted(broadcast)}: applied to an input shared by the whole "
                  "batch (e.g. position embeddings), so per-sample gradients are not available "
                  f"from hooks.{unused} Pass exclude={sorted(broadcast)} to silence this.",
                  RuntimeWarning, stacklevel=stacklevel)


def check_first_step(capture: GradientCapture, n_rows: int, explicit_selection: bool) -> set[str]:
    """Validate the layers on the first step, before anything is written. Raises for layers that got
    no gradient; returns the batch-broadcast layers to leave out (an error if the user named them)."""
    missing = [l.name for i, l in enumerate(capture.layers) if i not in capture.seen_layers]
    if missing:
        capture.discard()
        raise ConfigurationError(
            f"selected layer(s) {missing} received no gradient in the first step: they are not "
            "called as modules in the forward pass (e.g. weights used through a functional call, "
            "like nn.MultiheadAttention.out_proj) or not used at all. Exclude them "
            "(exclude=[...]) or select other layers.")
    broadcast = broadcast_layers(capture, capture.batch_mismatch, n_rows)
    if not broadcast:
        return set()
    if explicit_selection:
        capture.discard()
        raise ConfigurationError(
            f"layer(s) {sorted(broadcast)} are applied to an input shared by the whole batch "
            "(batch dimension 1, e.g. position embeddings broadcast over samples), so their "
            "per-sample gradients cannot be read from hooks. Leave them out (exclude=[...]).")
    warn_left_out(broadcast, planned=False, stacklevel=5)  # not re-planned: see _leave_out_broadcast
    return broadcast
