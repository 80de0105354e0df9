"""Finding the dataset indices (sample ids) of each training batch.

The reliable automatic way tracks what the loader's batch sampler yields: batches come out of a
DataLoader in the order their index lists were drawn (also with worker processes), so a FIFO of
index lists, restarted whenever the sampler starts a new pass, pairs each batch with its ids.
Where there is no sampler (an IterableDataset), use IndexedDataset or a `sample_ids` callable.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..errors import SampleIdError


class IndexedDataset(Dataset):
    """Wraps a map-style dataset so that item i is (i, dataset[i]).

    The training step then unpacks `ids, batch = batch`; the callback reads the ids from batch[0].
    """

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class TrackedBatchSampler:
    """A batch sampler that remembers the index lists it yielded, for `pop()` in batch order."""

    def __init__(self, batch_sampler: Any):
        self.inner = batch_sampler
        self.pending: deque[list[int]] = deque()

    def __iter__(self) -> Iterator[list[int]]:
        self.pending.clear()  # a new pass: index lists prefetched by the last one are stale
        for indices in self.inner:
            self.pending.append(list(indices))
            yield indices

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def pop(self) -> list[int]:
        if not self.pending:
            raise SampleIdError("a training batch arrived whose indices the sampler never yielded; pass "
                                "sample_ids=... to InfluenceCallback to give them explicitly.")
        return self.pending.popleft()


def track_loader(loader: Any) -> TrackedBatchSampler | None:
    """Install a TrackedBatchSampler on `loader` (a DataLoader); None where that is impossible."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    if isinstance(loader.dataset, IndexedDataset) or loader.batch_sampler is None:
        return None
    if isinstance(loader.batch_sampler, TrackedBatchSampler):
        return loader.batch_sampler
    tracked = TrackedBatchSampler(loader.batch_sampler)
    # DataLoader forbids re-assigning batch_sampler after construction through __setattr__; its
    # iterators read it only when created, which happens after this point.
    object.__setattr__(loader, "batch_sampler", tracked)
    return tracked


def ids_from_indexed_batch(batch: Any) -> Any:
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0]
    raise SampleIdError("the training dataset is an IndexedDataset, but the batch is not an (ids, "
                        "sample) pair; collate must keep the pair (the default collate does).")


NO_IDS_HELP = (
    "influence_hooks cannot tell which dataset samples are in each training batch: {why}. Pass "
    "`sample_ids=lambda batch, batch_idx: ...` returning the batch's sample ids (e.g. batch['idx'], "
    "which an IterableDataset must then yield) to InfluenceCallback, or, for a map-style dataset, "
    "wrap it in `IndexedDataset(dataset)` (items become (index, sample) and the training_step "
    "unpacks `ids, batch = batch`).")


def as_ids(sample_ids: Any) -> Any:
    """Sample ids as an int64 numpy array, or as a 1-D integer tensor left on its GPU (reading
    it here would synchronise with the device every step)."""
    if isinstance(sample_ids, torch.Tensor) and sample_ids.device.type != "cpu":
        if sample_ids.dim() != 1 or sample_ids.is_floating_point() or sample_ids.is_complex():
            raise SampleIdError(f"sample ids must be a 1-D tensor of integers (dataset indices), got "
                                f"{sample_ids.dtype} of shape {tuple(sample_ids.shape)}.")
        return sample_ids.to(torch.int64)
    if isinstance(sample_ids, torch.Tensor):
        sample_ids = sample_ids.detach().numpy()
    ids = np.asarray(sample_ids)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer)):
        raise SampleIdError(f"sample ids must be a 1-D sequence of integers (dataset indices), got "
                            f"{ids.dtype} array of shape {ids.shape}.")
    return ids.astype(np.int64)


def concat_ids(parts: list[Any]) -> Any:
    """The ids of a step's micro-batches, in order (a device tensor if any part is one)."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    dev = next(p.device for p in parts if isinstance(p, torch.Tensor))
    return torch.cat([torch.as_tensor(p, device=dev) for p in parts])
