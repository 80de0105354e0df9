"""InfluenceCallback: record per-sample gradients during `Trainer.fit`, with no change to the
LightningModule. A thin layer over GradientRecorder."""

from __future__ import annotations

import os
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import move_data_to_device

from ..batches import as_batch, training_step_loss
from ..errors import ConfigurationError, SampleIdError
from .distributed import refuse_sharded
from .ids import NO_IDS_HELP, IndexedDataset, TrackedBatchSampler, ids_from_indexed_batch, track_loader
from .options import RecordingConfig
from .recorder import GradientRecorder, warn_nothing_recorded


class InfluenceCallback(pl.Callback):
    """Records g_t(i) of selected layers at every optimizer step of `Trainer.fit` into `run_dir`.

    Sample ids are found by tracking the train loader's batch sampler; for other loaders pass
    `sample_ids=lambda batch, batch_idx: ids` or wrap the dataset in IndexedDataset.
    Queries (a Dataset, e.g. a Subset of the validation set, or one batch) get their loss gradients
    recorded at w_t on the query schedule and at the end of training, computed with
    `query_loss_fn(pl_module, batch)` or, by default, the module's own training_step (logging muted).
    In a YAML / LightningCLI config, where no Dataset can be passed, `queries_from="query_dataset"`
    names a method (or attribute) of the trainer's DataModule, or else of the LightningModule,
    that returns the queries; it is read at the start of training. If that DataModule has
    `influence_metadata()`, its dict is stored in the run's metadata under "data" (the demo
    stores the ids of its flipped labels there).
    Resuming from a Lightning checkpoint continues the same run directory.
    At the first step the recording plan (layers, dims per layer, bytes per step, run path) is
    printed (verbose=False: only logged to the "influence_hooks" logger) and logged as
    hyperparameters "influence_hooks/..." to the trainer's loggers; at every optimizer step the
    loggers write (every `log_every_n_steps`) the recording's own figures (RecordingStats:
    influence/rows, influence/mb_written, influence/queue_wait_s, influence/hook_s, ...) go through
    `pl_module.log`, and their final values to the loggers at the end of training.
    Every recording option (layers=, projection=, snapshot_windows=, ...) is a field of
    RecordingConfig, given as a keyword argument or all together as config=RecordingConfig(...).
    """

    def __init__(
        self,
        run_dir: str,
        *,
        queries: Any = None,
        queries_from: str | None = None,
        query_loss_fn: Callable[[pl.LightningModule, Any], torch.Tensor] | None = None,
        sample_ids: Callable[[Any, int], Any] | None = None,
        metadata: dict[str, Any] | None = None,
        verbose: bool = True,
        log_stats: bool = True,
        config: RecordingConfig | None = None,
        **options: Any,
    ):
        super().__init__()
        self.run_dir = str(run_dir)
        if config is not None and options:
            raise ConfigurationError(f"pass either config= or recording options ({sorted(options)}), not both")
        # RecordingConfig(**options) written out, so LightningCLI (jsonargparse) sees every field
        self.config = config if config is not None else RecordingConfig(**options)
        if queries is not None and queries_from is not None:
            raise ConfigurationError("pass queries= or queries_from=, not both.")
        self.query_batch, self.query_ids = as_batch(queries)
        self.queries_from = queries_from
        self.query_loss_fn = query_loss_fn
        self.sample_ids = sample_ids
        self.metadata = metadata
        self.verbose = verbose
        self.log_stats = log_stats
        self._plan_logged = False
        self.recorder: GradientRecorder | None = None
        self._trackers: dict[int, TrackedBatchSampler] = {}
        self._orig_process_dataloader = None
        self._resume_state: dict[str, Any] | None = None
        self._last_batch_of_epoch = False
        self._state_key: tuple[str, str] | None = None  # (run_dir, its key)

    @property
    def state_key(self) -> str:
        # the resolved directory: a resume finds its recording state however the path is spelled.
        # Lightning asks for it at every callback hook call (6 a step), and resolving the path
        # costs about 0.1 ms of system calls, so it is resolved once per run_dir
        if self._state_key is None or self._state_key[0] != self.run_dir:
            key = self._generate_state_key(run_dir=os.path.realpath(self.run_dir))
            self._state_key = (self.run_dir, key)
        return self._state_key[1]

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._install_loader_tracking(trainer)

    def _install_loader_tracking(self, trainer: pl.Trainer) -> None:
        # Lightning creates the train loader's iterator (and draws the first indices) before any
        # training hook runs; strategy.process_dataloader is the last point that sees the loader
        # before that, so the batch sampler is wrapped there.
        if self._orig_process_dataloader is not None or self.sample_ids is not None:
            return
        strategy = trainer.strategy
        orig = strategy.process_dataloader

        def process_dataloader(dataloader: Any) -> Any:
            dataloader = orig(dataloader)
            if trainer.training and not trainer.sanity_checking:
                tracker = track_loader(dataloader)
                if tracker is not None:
                    self._trackers[id(dataloader)] = tracker
            return dataloader

        self._orig_process_dataloader = orig
        strategy.process_dataloader = process_dataloader

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._orig_process_dataloader is not None:
            trainer.strategy.process_dataloader = self._orig_process_dataloader
            self._orig_process_dataloader = None
        if self.recorder is not None:
            self.recorder.capture.detach()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise ConfigurationError(
                "InfluenceCallback needs automatic optimization (one optimizer step per "
                "training_step cycle). With manual optimization use GradientRecorder in the "
                "training_step.")
        refuse_sharded(trainer.strategy)
        if len(trainer.optimizers) != 1:
            raise ConfigurationError(f"InfluenceCallback supports one optimizer, found {len(trainer.optimizers)}.")
        if self.queries_from is not None and self.query_batch is None:
            self._fetch_queries(trainer, pl_module)
        queries = None
        if self.query_batch is not None:
            queries = move_data_to_device(self.query_batch, pl_module.device)
        self.recorder = GradientRecorder(
            self.run_dir, pl_module, queries=queries,
            query_loss_fn=(self.query_loss_fn or training_step_loss) if queries is not None else None,
            query_ids=self.query_ids, config=self.config, metadata=self.metadata,
            precision=str(trainer.precision), rank=trainer.global_rank, world_size=trainer.world_size,
            verbose=self.verbose)
        extra = {
            "gradient_clipping": ({"value": trainer.gradient_clip_val,
                                   "algorithm": str(trainer.gradient_clip_algorithm or "norm")}
                                  if trainer.gradient_clip_val else None),
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "world_size": trainer.world_size,
            "trainer": {"max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps},
        }
        if self._resume_state is not None:
            self.recorder.plan_start(resume_run_id=self._resume_state["run_id"], resume_step=trainer.global_step)
        else:
            self.recorder.plan_start(extra=extra)

    def _fetch_queries(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        holder = next((h for h in (dm, pl_module) if h is not None and hasattr(h, self.queries_from)), None)
        if holder is None:
            raise ConfigurationError(
                f"queries_from={self.queries_from!r}: neither the data module "
                f"({type(dm).__name__ if dm is not None else 'none'}) nor {type(pl_module).__name__} "
                "has it. Give the data module a method of that name returning a Dataset (e.g. a "
                "Subset of the validation set) or one batch, or pass queries= in Python.")
        source = getattr(holder, self.queries_from)
        self.query_batch, self.query_ids = as_batch(source() if callable(source) else source)
        describe = getattr(dm, "influence_metadata", None)
        if callable(describe):
            self.metadata = {**(self.metadata or {}), "data": describe()}

    # ------------------------------------------------------------------ per batch
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.recorder.begin_micro_batch(self._ids_for(trainer, batch, batch_idx))
        n = trainer.num_training_batches
        self._last_batch_of_epoch = isinstance(n, int) and batch_idx + 1 >= n

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        last = self._last_batch_of_epoch or (trainer.max_steps > 0 and trainer.global_step + 1 >= trainer.max_steps)
        # Lightning divides every micro-batch loss by accumulate_grad_batches, also in an epoch's
        # last step when fewer micro-batches are left
        self.recorder.end_step(optimizer, step=trainer.global_step, epoch=trainer.current_epoch,
                               epoch_end=last, grad_scaler=getattr(trainer.precision_plugin, "scaler", None),
                               micro_batches=trainer.accumulate_grad_batches)
        if not self._plan_logged and self.recorder.plan is not None:
            self._plan_logged = True
            for logger in trainer.loggers:
                logger.log_hyperparams({f"influence_hooks/{k}": v for k, v in self.recorder.plan.items()})
        if self.log_stats and trainer.loggers and _logs_this_step(trainer):
            pl_module.log_dict(self.recorder.stats.metrics(), on_step=True, on_epoch=False, batch_size=1)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.recorder.finish(final_step=trainer.global_step)
        if self.log_stats:  # the end-of-training queries included; pl_module.log is closed here
            for logger in trainer.loggers:
                logger.log_metrics(self.recorder.stats.metrics(), step=trainer.global_step)
                logger.save()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.recorder is None:  # Lightning skips training (and on_train_start) for an empty loader
            warn_nothing_recorded(self.run_dir)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.recorder is not None:
            self.recorder.abort()

    def _ids_for(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> Any:
        if self.sample_ids is not None:
            return self.sample_ids(batch, batch_idx)
        loader = trainer.train_dataloader
        if getattr(loader, "dataset", None) is not None and isinstance(loader.dataset, IndexedDataset):
            return ids_from_indexed_batch(batch)
        tracker = self._trackers.get(id(loader))
        if tracker is None:
            why = ("the train loader is not a torch DataLoader over a map-style dataset"
                   if not hasattr(loader, "batch_sampler") or getattr(loader, "batch_sampler", None) is None
                   else "its batch sampler could not be tracked")
            raise SampleIdError(NO_IDS_HELP.format(why=why))
        return tracker.pop()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        if self.recorder is None or self.recorder.run_id is None:
            return {}
        if not self.recorder.finished:
            self.recorder.flush()  # every step up to this checkpoint is in a finished shard
        return {"run_id": self.recorder.run_id, "run_dir": self.run_dir, "step": self.recorder.step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_state = dict(state_dict) if state_dict.get("run_id") else None


def _logs_this_step(trainer: pl.Trainer) -> bool:
    """Whether the trainer's loggers write this step's metrics (every `log_every_n_steps`).

    The figures are running totals, so logging them only then loses nothing, and `log_dict` costs
    Lightning about a millisecond per metric: more than recording a small model's step. Lightning's
    own LearningRateMonitor asks the same question the same way."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))
