"""What retraining needs besides the run: the model, the training samples, the loss and the queries.

Three ways to give them, all ending in one `TrainingSetup`:

- a plain model: `model=` (an nn.Module), `dataset=` (dataset[i] is the item the train loader
  collated for recorded sample id i), `loss_fn=(model, batch) -> scalar` and `queries=`;
- a LightningModule and its DataModule: the dataset and collate function come from
  `datamodule.train_dataloader()`, the loss is the module's own training_step, and the queries from
  `queries=` or `queries_from=` (a method of the data module, as InfluenceCallback takes it);
- the LightningCLI config the run was trained with (`setup_from_config`, for the command line).

The model's parameter values play no part: retraining starts from the run's checkpoints.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import nn
from torch.utils.data import default_collate

from ..batches import as_batch, batch_size_of, training_step_loss
from ..errors import ConfigurationError
from ..storage.reader import Run

LossFn = Callable[[nn.Module, Any], Any]


@dataclass
class TrainingSetup:
    model: nn.Module
    dataset: Any
    collate_fn: Callable[[list], Any]
    loss_fn: LossFn
    query_loss_fn: LossFn | None
    queries: Any          # one batch of every recorded query, in the run's query order
    n_queries: int

    @classmethod
    def resolve(cls, run: Run, *, model: Any, dataset: Any = None, datamodule: Any = None, queries: Any = None,
                queries_from: str | None = None, loss_fn: LossFn | None = None,
                query_loss_fn: LossFn | None = None, collate_fn: Callable[[list], Any] | None = None
                ) -> "TrainingSetup":
        if not isinstance(model, nn.Module):
            raise ConfigurationError(
                "validate retrains the model, so it needs model= (the nn.Module or LightningModule that was "
                f"trained; its architecture, the weights come from the run's checkpoints), got "
                f"{type(model).__name__}.")
        if dataset is None and datamodule is not None:
            dataset, loader_collate = _from_datamodule(datamodule)
            collate_fn = collate_fn or loader_collate
        if dataset is None or not hasattr(dataset, "__getitem__"):
            raise ConfigurationError(
                "validate rebuilds every recorded batch from its sample ids: pass dataset= (the training "
                "dataset, dataset[i] for recorded id i) or datamodule= (its train_dataloader's dataset).")
        if loss_fn is None:
            if not hasattr(model, "training_step"):
                raise ConfigurationError("pass loss_fn=(model, batch) -> the training loss of the batch (the "
                                         "loss the run minimized); a LightningModule's training_step is the default.")
            loss_fn = training_step_loss
        if queries is None and queries_from is not None:
            queries = _queries_from(queries_from, datamodule, model)
        if queries is None:
            raise ConfigurationError(
                f"validate compares the query losses after retraining: pass queries= (the {len(run.query_ids)} "
                "samples the run recorded as queries, a Dataset or one batch) or queries_from= (a method of "
                "the data module returning them, as InfluenceCallback(queries_from=...) takes it).")
        qbatch, qids = as_batch(queries)
        n = batch_size_of(qbatch)
        recorded = run.query_ids
        if len(recorded) and n != len(recorded):
            raise ConfigurationError(f"queries hold {n} samples but the run recorded {len(recorded)} queries; "
                                     "pass the queries given to the recording callback / recorder.")
        if qids is not None and len(recorded) and not np.array_equal(np.asarray(qids), recorded):
            raise ConfigurationError(
                f"the queries' ids {qids[:5].tolist()}... are not the recorded query ids "
                f"{recorded[:5].tolist()}...; pass the queries the run recorded.")
        return cls(model=model, dataset=dataset, collate_fn=collate_fn or default_collate, loss_fn=loss_fn,
                   query_loss_fn=query_loss_fn, queries=qbatch, n_queries=n)


def _from_datamodule(dm: Any) -> tuple[Any, Callable[[list], Any] | None]:
    if hasattr(dm, "setup"):
        dm.setup("fit")
    loader = dm.train_dataloader()
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__getitem__"):
        raise ConfigurationError(
            f"the data module's train_dataloader() gives {type(loader).__name__} without a map-style dataset; "
            "pass dataset= (indexed by the recorded sample ids).")
    return dataset, getattr(loader, "collate_fn", None)


def _queries_from(name: str, datamodule: Any, model: Any) -> Any:
    holder = next((h for h in (datamodule, model) if h is not None and hasattr(h, name)), None)
    if holder is None:
        raise ConfigurationError(f"queries_from={name!r}: neither the data module nor the model has it.")
    source = getattr(holder, name)
    return source() if callable(source) else source


def setup_from_config(config: str | Path, run_dir: str | Path | None = None) -> tuple[Run, dict[str, Any]]:
    """(the run, validate's keyword arguments) from the LightningCLI config the run was trained with:
    the model and data module it names, and the InfluenceCallback's run directory (unless run_dir
    is given), queries and query loss."""
    from lightning.pytorch.cli import LightningCLI

    from ..record.callback import InfluenceCallback
    from ..storage.reader import open_run

    path = Path(config)
    if not path.is_file():
        raise ConfigurationError(f"config {path} does not exist")
    saved, sys.argv = sys.argv, [sys.argv[0], "--config", str(path)]  # LightningCLI reads sys.argv
    try:
        cli = LightningCLI(run=False, save_config_callback=None)
    finally:
        sys.argv = saved
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, InfluenceCallback)]
    if run_dir is None:
        if not callbacks:
            raise ConfigurationError(f"{path} has no InfluenceCallback under trainer.callbacks; pass the run "
                                     "directory (influence-hooks validate RUN --config ...).")
        run_dir = callbacks[0].run_dir
    kwargs: dict[str, Any] = {"model": cli.model, "datamodule": cli.datamodule}
    if callbacks:
        cb = callbacks[0]
        if cb.query_batch is not None:
            kwargs["queries"] = cb.query_batch
        elif cb.queries_from is not None:
            kwargs["queries_from"] = cb.queries_from
        if cb.query_loss_fn is not None:
            kwargs["query_loss_fn"] = cb.query_loss_fn
    return open_run(run_dir), kwargs
