"""What a batch is, for every part of the library that handles one: the recorder's queries, the
callback, and the estimators that recompute losses from the model (exact curvature, validation).

- `as_batch(x)`: queries (or any samples) given as a map-style Dataset (e.g. a Subset of the
  validation set) or as one batch become one batch, with their ids (Subset indices when there
  are any);
- `batch_len`, `batch_size_of`: the number of samples along dim 0;
- `cast_batch`: floating tensors to a dtype, every tensor to a device;
- `training_step_loss`: a LightningModule's own training_step as a loss function (logging muted).

Nothing here imports Lightning.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import Dataset, Subset, default_collate

from .errors import ConfigurationError

BATCH_FORMS = ("a batch: a tensor, or a tuple/list/dict of tensors that all hold the samples along dim 0; "
               "or a map-style Dataset of samples (e.g. a Subset of the validation set)")


def as_batch(samples: Any, collate_fn: Any = None) -> tuple[Any, np.ndarray | None]:
    """(one batch, ids or None) from a Dataset or a batch; ids are a Subset's indices, else
    0..n-1 for a Dataset and None for a batch given as such."""
    if samples is None:
        return None, None
    if isinstance(samples, Dataset):
        try:
            n = len(samples)  # type: ignore[arg-type]
        except TypeError:
            raise ConfigurationError(f"queries are an iterable Dataset without a length; give {BATCH_FORMS}.") from None
        if n == 0:
            raise ConfigurationError("queries is an empty dataset.")
        items = [samples[i] for i in range(n)]
        ids = np.asarray(samples.indices, np.int64) if isinstance(samples, Subset) else np.arange(n)
        return (collate_fn or default_collate)(items), ids
    batch_len(samples)  # check the form now, not at the first step
    return samples, None


def batch_len(batch: Any) -> int:
    """Samples in a batch (the first tensor's dim 0)."""
    if isinstance(batch, Tensor):
        if batch.dim() == 0:
            raise ConfigurationError(f"a batch cannot be a scalar tensor; give {BATCH_FORMS}.")
        return batch.shape[0]
    if isinstance(batch, dict) and batch:
        return batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch:
        return batch_len(batch[0])
    raise ConfigurationError(f"got {type(batch).__name__}; give {BATCH_FORMS}.")


def batch_size_of(batch: Any) -> int:
    """Samples in a batch whose every leaf is a tensor holding the samples along dim 0 (a batch
    that can be split per sample); ConfigurationError otherwise."""
    leaves, _ = tree_flatten(batch)
    sizes = {int(x.shape[0]) for x in leaves if isinstance(x, Tensor) and x.dim() > 0}
    if not leaves or any(not isinstance(x, Tensor) or x.dim() == 0 for x in leaves) or len(sizes) != 1:
        raise ConfigurationError(
            "a batch must be a tensor or a tuple/list/dict of tensors that all hold the samples along "
            f"dim 0 (non-tensor items cannot be split per sample); got leaves "
            f"{[type(x).__name__ if not isinstance(x, Tensor) else tuple(x.shape) for x in leaves]}.")
    return sizes.pop()


def cast_batch(batch: Any, dtype: torch.dtype | None, device: torch.device | str | None) -> Any:
    """Floating tensors to dtype (None: unchanged), every tensor to device."""
    def f(x: Any) -> Any:
        if isinstance(x, Tensor):
            return x.to(device=device, dtype=dtype if (dtype is not None and x.is_floating_point()) else x.dtype)
        return x
    return tree_map(f, batch)


def training_step_loss(module: nn.Module, batch: Any) -> Tensor:
    """The loss of `batch` by the module's own training_step (a LightningModule), logging muted."""
    mute = lambda *a, **k: None  # noqa: E731
    module.log, module.log_dict = mute, mute  # instance attributes shadow the methods
    try:
        out = module.training_step(batch, 0)
    finally:
        del module.log, module.log_dict
    if isinstance(out, dict):
        out = out["loss"]
    if not isinstance(out, Tensor):
        raise ConfigurationError("training_step returned no loss tensor for the batch; pass "
                                 "query_loss_fn=(module, batch) -> loss (or loss_fn=...).")
    return out
