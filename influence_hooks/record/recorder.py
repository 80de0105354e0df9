"""GradientRecorder: per-sample gradient recording for hand-written PyTorch training loops.

    rec = GradientRecorder("runs/exp1", model, projection=1024, queries=(xq, yq),
                           query_loss_fn=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]))
    for epoch in range(E):
        for ids, x, y in loader:
            rec.begin_micro_batch(ids)          # before the forward pass
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            rec.end_step(optimizer, epoch=epoch)   # after backward, BEFORE optimizer.step()
            optimizer.step(); optimizer.zero_grad()
    rec.finish()

With gradient accumulation, call begin_micro_batch once per micro-batch and end_step once per
optimizer step; each micro-batch's loss is taken to be divided by the number of micro-batches (the
usual recipe, and what Lightning does); pass loss_divided_by_micro_batches=False otherwise.
InfluenceCallback is a thin Lightning layer over this class.

The pieces: options.py (what to record), capture/ (hooks and projection), queries.py (query
gradients), params.py (snapshots and checkpoints), optim.py (what is kept of the optimizer),
host.py (asynchronous host copies), storage/writer.py (the files).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..capture.hooks import GradientCapture
from ..capture.projection import any_projected
from ..capture.select import layers_manifest, plan_layers, projection_fingerprint, select_layers
from ..errors import ConfigurationError, InfluenceHooksError, SampleIdError
from ..storage import format as fmt
from ..storage.index import read_manifest
from ..storage.jsonio import to_jsonable
from ..storage.writer import RunWriter, StepRecord, check_sample_ids
from .checks import broadcast_layers, check_first_step, warn_batch_mixing, warn_left_out, warn_tied_parameters
from .distributed import open_on_every_rank, process_position, refuse_sharded
from .host import event_after, host_copy, loss_scale, scaler_found_inf
from .ids import as_ids, concat_ids
from .optim import RecordedLearningRate, adam_step_sizes, describe_optimizer
from .options import RecordingConfig
from .params import ParameterSaver
from .queries import QueryLossFn, QuerySet
from .summary import RecordingStats, plan_summary

log = logging.getLogger("influence_hooks")


def warn_nothing_recorded(run_dir: str) -> None:
    """Training ended without a single step: say so, since an empty run directory says nothing."""
    warnings.warn(f"training finished without a single recorded step, so nothing was written to {run_dir}: the "
                  "train loader yielded no batches (an empty dataset, or limit_train_batches=0?), or end_step() "
                  "was never called.", RuntimeWarning, stacklevel=3)


class GradientRecorder:
    """Records per-sample gradients g_t(i) of selected layers of `model` into `run_dir`.

    Args:
        run_dir: directory of the run (created; must not hold another run unless overwrite).
        model: the model being trained; hooks are attached at construction.
        queries: query samples as one batch (whatever query_loss_fn takes) or a map-style Dataset;
            their gradients u_q(t) = grad f_q(w_t) are recorded on the query schedule.
        query_loss_fn: (model, query_batch) -> loss over the query batch, reduced as
            config.loss_reduction says. Must not depend on the training batch.
        query_ids: ids of the query samples (default: a Subset's indices, else 0..Q-1).
        config / **options: a RecordingConfig, or its fields as keyword arguments.
        metadata: JSON-serialisable extras stored in the manifest.
        rank / world_size: this process's place in data-parallel training (default: from an
            initialized torch.distributed, else 0 of 1). Every rank records its own micro-batches
            into its own shards; gradients are taken to be averaged over ranks, as DDP does.
        verbose: print the recording plan (layers, dims per layer, bytes per step, run path) at
            the first step; it is also logged to the "influence_hooks" logger either way.

    After the first step, `plan` holds that summary as a dict; `stats` (RecordingStats) counts
    rows, megabytes, the wait for the writer's queue and the time in the hooks.
    """

    def __init__(self, run_dir: str, model: nn.Module, *, queries: Any = None,
                 query_loss_fn: QueryLossFn | None = None, query_ids: Sequence[int] | None = None,
                 config: RecordingConfig | None = None, metadata: dict[str, Any] | None = None,
                 precision: str | None = None, rank: int | None = None, world_size: int | None = None,
                 verbose: bool = True, **options: Any):
        self.config = RecordingConfig.from_options(config, options)
        self.run_dir = str(run_dir)
        refuse_sharded(model)
        # DDP runs the module it wraps: record that one (its names, and query losses without collectives)
        self.model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.rank, self.world_size = process_position(rank, world_size)
        self.metadata = dict(metadata or {})
        self.precision = precision
        self.queries = (QuerySet(queries, query_loss_fn, query_ids, self.config.query_every_n_steps,
                                 self.config.loss_reduction) if queries is not None else None)
        selection = select_layers(self.model, self.config.layers, self.config.layer_types, self.config.exclude)
        self.layers = plan_layers(selection, self.config.projection_budget(), self.config.projection_kind,
                                  self.config.seed, self.config.projection_allocation)
        warn_tied_parameters(self.layers)
        warn_batch_mixing(self.model)
        self.capture = GradientCapture(self.layers)
        self.capture.attach()  # armed only between begin_micro_batch and end_step
        if not self.config.names_layers():  # layers the user named are never left out
            self.capture.before_first_gradient = self._leave_out_broadcast
        self.params = ParameterSaver(self.config, self.model)
        self._lr = RecordedLearningRate(self._recorded_parameters())
        self.writer: RunWriter | None = None
        self._storage_dtype: torch.dtype | None = None  # the run's, known once it is open
        self._start_kwargs: dict[str, Any] = {}
        self._warned_no_unscale = False
        self._warned_uneven = False
        self._step = 0
        self._micro_ids: list[Any] = []
        self._last_epoch: int | None = None
        self._first_step_checked = False
        self._finished = False
        self._optimizer: torch.optim.Optimizer | None = None  # the last one seen, for the final snapshot
        self.run_id: str | None = None
        self.verbose = verbose
        self.plan: dict[str, Any] | None = None
        self.stats = RecordingStats()
        self._left_out: list[str] = []  # layers left out, found at the first gradient or step

    @property
    def dim(self) -> int:
        """K: the length of a recorded gradient row."""
        return self.capture.dim

    # ------------------------------------------------------------------ lifecycle
    def plan_start(self, *, resume_run_id: str | None = None, resume_step: int | None = None,
                   extra: dict[str, Any] | None = None) -> None:
        """How the first end_step opens the run directory: resume run `resume_run_id` from
        `resume_step`, or create it with `extra` manifest entries. The directory is opened only
        after the first step has validated the layers and the queries, so the manifest lists what
        is recorded and a first step that fails leaves nothing behind. Checked now, before
        training: that the directory can be written, and that no other recording holds it."""
        self._start_kwargs = dict(resume_run_id=resume_run_id, resume_step=resume_step, extra=extra)
        if resume_run_id is None and self.rank == 0:
            RunWriter.check_new_run_dir(self.run_dir, overwrite=self.config.overwrite, rank=self.rank)
        else:
            RunWriter.check_writable(self.run_dir)
        if resume_step is not None:
            self._step = int(resume_step)

    def start(self, optimizer: torch.optim.Optimizer | None = None, *, resume_run_id: str | None = None,
              resume_step: int | None = None, extra: dict[str, Any] | None = None) -> None:
        """Create (or resume) the run directory. Called by the first end_step if not before."""
        if self.writer is not None:
            return
        opts = self.config.writer_options()
        if resume_run_id is not None and not (Path(self.run_dir) / fmt.MANIFEST).exists():
            warnings.warn(
                f"resuming run {resume_run_id} at step {int(resume_step or 0)}, but {self.run_dir} holds no run "
                f"(moved, deleted, or a different directory): a NEW run starts there at step {int(resume_step or 0)}, "
                "and steps before it are not in it. Point the recorder at the original run directory to continue "
                "that run instead.", RuntimeWarning, stacklevel=3)
            extra = {**(extra or {}), "resumed_from": {"run_id": resume_run_id, "step": int(resume_step or 0)}}
            resume_run_id = None
        if resume_run_id is not None:
            RunWriter.check_resume(self.run_dir, resume_run_id, self._manifest(optimizer, {}))
            self.writer = RunWriter.resume(self.run_dir, resume_run_id, int(resume_step or 0), rank=self.rank,
                                           options=opts)
            self._step = int(resume_step or 0)
        else:
            manifest = self._manifest(optimizer, extra or {})

            def create(run_id: str | None = None) -> RunWriter:
                return RunWriter.create(self.run_dir, {**manifest, "run_id": run_id} if run_id else manifest,
                                        rank=self.rank, overwrite=self.config.overwrite, options=opts)

            self.writer = create() if self.world_size == 1 else open_on_every_rank(self.rank, create, create)
        self.run_id = self.writer.manifest["run_id"]
        self._storage_dtype = getattr(torch, self.writer.manifest["storage_dtype"])

    def _manifest(self, optimizer: torch.optim.Optimizer | None, extra: dict[str, Any]) -> dict[str, Any]:
        layers = layers_manifest(self.layers)
        n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_recorded = sum(p.numel() for p in self._recorded_parameters() if p.requires_grad)
        # layers smaller than their share stay exact: what counts is what was planned
        projected = any_projected(l.spec for l in self.layers)
        param = next(self.model.parameters())
        return {
            "dim": self.dim, "layers": layers,
            "storage_dtype": self.config.storage_dtype or ("float16" if projected else "float32"),
            "projection_fingerprint": projection_fingerprint(layers),
            "projection": {"total": self.dim, "kind": self.config.projection_kind, "seed": self.config.seed},
            "loss_reduction": self.config.loss_reduction,
            "optimizer": describe_optimizer(optimizer),
            "precision": self.precision or str(param.dtype).replace("torch.", ""),
            "parameter_dtype": str(param.dtype).replace("torch.", ""),
            "partial_model": n_recorded < n_trainable,
            "recorded_parameters": n_recorded, "trainable_parameters": n_trainable,
            "queries": self.queries.manifest() if self.queries is not None else None,
            "config": self.config.to_manifest(), "world_size": self.world_size,
            "metadata": to_jsonable(self.metadata),
            **extra,
        }

    def close(self, *, complete: bool = False, final_step: int | None = None) -> None:
        """Flush what is queued and stop recording; hooks are removed."""
        self.capture.detach()
        if self.writer is not None:
            try:
                self.writer.close(final_step=final_step, complete=complete)
            finally:
                self.stats.writer_cpu_s = self.writer.cpu_seconds  # the final shard's included

    def abort(self) -> None:
        """Training failed: keep every finished step on disk, mark the run incomplete."""
        self.capture.detach()
        if self.writer is not None:
            try:
                self.writer.close(complete=False)
            except InfluenceHooksError:
                self.writer.abort()
            finally:
                self.stats.writer_cpu_s = self.writer.cpu_seconds

    def __enter__(self) -> "GradientRecorder":
        return self

    def __exit__(self, exc_type, *exc: Any) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._finished:
            self.close(complete=False)

    # ------------------------------------------------------------------ per step
    def begin_micro_batch(self, sample_ids: Any) -> None:
        """Announce the next forward/backward pass and its samples' ids (dataset indices), in
        batch order."""
        ids = as_ids(sample_ids)
        self._micro_ids.append(ids)
        self.capture.begin_micro_batch(len(ids))
        self.capture.set_enabled(True)

    def end_step(self, optimizer: torch.optim.Optimizer, *, step: int | None = None, epoch: int = 0,
                 epoch_end: bool = False, loss: float | torch.Tensor | None = None,
                 grad_scaler: Any = None, micro_batches: int | None = None) -> None:
        """Finish optimizer step `step` (default: the next one). Call after the backward pass(es)
        and before optimizer.step(), so query gradients and snapshots see w_t.

        micro_batches: the number each micro-batch loss was divided by (default: the number of
        begin_micro_batch calls since the last step); Lightning divides by accumulate_grad_batches
        even in an epoch's last step when fewer micro-batches are left."""
        step = self._step if step is None else int(step)
        if not self._micro_ids:
            raise SampleIdError(f"step {step}: end_step() without begin_micro_batch(sample_ids); call it "
                                "before each forward pass with the ids of the batch's samples.")
        ids = concat_ids(self._micro_ids)
        n_micro = micro_batches or len(self._micro_ids)
        sizes = [len(i) for i in self._micro_ids]
        self._micro_ids = []
        self.capture.set_enabled(False)
        ids_checked = isinstance(ids, np.ndarray)  # ids on a GPU are checked by the writer thread instead
        if ids_checked:
            check_sample_ids(ids, step, allow_repeated=self.config.allow_repeated_ids)
        if not self._first_step_checked:
            self._check_first_step(len(ids))
        # the update is -lr * sum_j sum_{i in micro-batch j} g_t(i) / (acc * |b_j|) (mean) or / acc
        # (sum); with equal micro-batch sizes that is one weight for every sample of the step
        acc = n_micro if self.config.loss_divided_by_micro_batches else 1
        # scaled and cast to the storage dtype in one pass (from the second step: the first one
        # opens the run, and with it the storage dtype, only after its rows were checked)
        grads = self.capture.collect(self._row_scales(sizes, acc, grad_scaler), dtype=self._storage_dtype)
        self._warn_uneven(step, sizes)
        first_of_epoch = self._last_epoch != epoch
        # the same on every rank: computed and written by rank 0 alone
        queries_due = self.rank == 0 and self.queries is not None and self.queries.due(step, first_of_epoch, epoch_end)
        # u_q(w_t) before the run directory is opened: queries that fail leave nothing behind
        query_grads = self.query_gradients(step) if queries_due else None
        if self.writer is None:
            self._warn_late_start(step)
            self.start(optimizer, **self._start_kwargs)
        if self.plan is None:
            self._announce(len(ids))
        self._last_epoch = epoch
        # DDP averages the ranks' gradients: each rank's samples weigh 1/world_size of its own loss
        per_rank = len(sizes) / (acc * len(ids)) if self.config.loss_reduction == "mean" else 1.0 / acc
        rec = StepRecord(
            step=step, epoch=int(epoch), lr=self._lr(optimizer),
            lr_groups=[float(g["lr"]) for g in optimizer.param_groups], batch_size=len(ids),
            update_weight=per_rank / self.world_size,
            micro_batches=n_micro, sample_ids=host_copy(ids), grads=None,
            skipped=self._found_inf(grad_scaler, optimizer), ids_checked=ids_checked,
            loss=float(loss) if loss is not None else float("nan"))
        # the same on every rank (DDP averaged .grad); computed before the event the writer waits on
        sizes = adam_step_sizes(optimizer, self.layers, self._grad_factor(grad_scaler, optimizer))
        rec.layer_lr = None if sizes is None else host_copy(sizes)  # asynchronous from a GPU, like the rows
        rec.grads, rec.finite = self._to_host(grads)
        rec.ready = event_after(grads)
        if query_grads is not None:
            self._write_query_grads(step, query_grads)
        if self.rank == 0:
            self.params.save_if_due(self.writer, step, self.layers, optimizer)
        self._optimizer = optimizer
        # read before the hand-off: from then on the record is the writer thread's (it drops the rows)
        nbytes = rec.grads.nelement() * rec.grads.element_size()
        t0 = time.perf_counter()
        self.writer.write_step(rec)
        self._count(t0, steps=1, rows=len(ids), nbytes=nbytes)
        self._step = step + 1

    def finish(self, *, final_step: int | None = None) -> None:
        """End of training: record query gradients (and a snapshot) at w_T, close the run as complete."""
        if self._finished:
            return
        self._finished = True
        final_step = self._step if final_step is None else int(final_step)
        if self.writer is None:
            warn_nothing_recorded(self.run_dir)
        elif self.rank == 0:  # the same on every rank: written once
            if self.queries is not None:
                self.write_queries(final_step)
            if self.params.snapshots:
                self.params.snapshot(self.writer, final_step, self.layers, self._optimizer)
        self.close(complete=self.writer is not None, final_step=final_step)

    @property
    def finished(self) -> bool:
        """True after finish(): the run is closed and complete."""
        return self._finished

    @property
    def step(self) -> int:
        """The step the next end_step records (without an explicit step)."""
        return self._step

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    # ------------------------------------------------------------------ queries
    def query_gradients(self, step: int | None = None) -> torch.Tensor:
        """u_q(w) for the current parameters: [Q, K], same projection as training rows.

        A failure of the query loss (a query batch of the wrong shape, say) is a ConfigurationError
        that says the queries failed, at which step, and why; the original error is its cause."""
        if self.queries is None:
            raise ConfigurationError("this recorder has no queries (pass queries= and query_loss_fn=).")
        try:
            return self.queries.gradients(self.model, self.capture, self._recorded_parameters())
        except InfluenceHooksError:
            raise
        except Exception as e:
            at = f" at step {step}" if step is not None else ""
            kept = (" Nothing was recorded yet, so the run directory can be used again as it is."
                    if self.writer is None else " Every earlier step stays recorded.")
            raise ConfigurationError(
                f"computing the query gradients{at} failed: {type(e).__name__}: {e}. The queries ({self.queries.n} "
                "samples) go through query_loss_fn(model, batch) (by default the module's training_step) as "
                "one batch: check that queries= has the shape, dtype and device of a training batch and that "
                f"the loss function accepts it.{kept}") from e

    def write_queries(self, step: int) -> None:
        self._write_query_grads(step, self.query_gradients(step))

    def _write_query_grads(self, step: int, g: torch.Tensor) -> None:
        host = self._to_host(g)[0]
        t0 = time.perf_counter()
        self.writer.write_queries(step, host, ready=event_after(g))
        self._count(t0, query_rows=len(host), nbytes=host.nelement() * host.element_size())

    # ------------------------------------------------------------------ helpers
    def _recorded_parameters(self) -> list[nn.Parameter]:
        return [p for l in self.layers for p in l.module.parameters(recurse=False)]

    def _check_first_step(self, n_rows: int) -> None:
        self._first_step_checked = True
        if self._left_out:  # re-planned at the first gradient; said here, not inside that backward pass
            warn_left_out(set(self._left_out), planned=True, stacklevel=4)
        broadcast = check_first_step(self.capture, n_rows, self.config.names_layers())
        if broadcast:
            self.capture.drop_layers(broadcast)
            self._keep(self.capture.layers, broadcast)

    def _leave_out_broadcast(self) -> None:
        """At the first gradient of the run, before anything is computed: layers whose forward pass
        saw an input shared by the whole batch (GPT-2's position embedding) cannot give per-sample
        gradients. They are left out, and the projection is shared out again among the others, as
        if they had been excluded."""
        broadcast = broadcast_layers(self.capture, self.capture.forward_mismatch, self.capture.current_rows)
        if not broadcast or self.writer is not None:  # start() was called first: its manifest stands
            return
        kept = [(l.name, l.module, l.rule) for l in self.layers if l.name not in broadcast]
        layers = plan_layers(kept, self.config.projection_budget(), self.config.projection_kind,
                             self.config.seed, self.config.projection_allocation)
        if not self._continues_the_plan(layers):
            return  # resuming a run planned with them: they are left out at end_step, as they were then
        self.capture.replace_layers(layers)
        self._keep(layers, broadcast)

    def _keep(self, layers: list, left_out: set[str]) -> None:
        """Record `layers` (the capture's now), `left_out` having been left out of them."""
        self.layers, self._left_out = layers, sorted(left_out)
        self._lr.reset(self._recorded_parameters())  # the group lookup must be redone for the kept layers

    def _continues_the_plan(self, layers: list) -> bool:
        """Whether `layers` is the projection of the run this recorder resumes, if it resumes one
        (runs recorded before the re-planning at the first gradient kept the share of the layers
        left out unused, and a resume must keep their projection)."""
        if self._start_kwargs.get("resume_run_id") is None:
            return True
        try:
            recorded = read_manifest(Path(self.run_dir), purpose="resume").get("projection_fingerprint")
        except InfluenceHooksError:
            return True  # start() says what is wrong with the directory
        return recorded == projection_fingerprint(layers_manifest(layers))

    def _announce(self, batch_size: int) -> None:
        """Say once, at the first step, what is recorded and what it costs."""
        text, self.plan = plan_summary(
            self.run_dir, type(self.model).__name__, self.layers, self._left_out,
            self.writer.manifest["storage_dtype"], batch_size, self.queries.n if self.queries else 0,
            self.config.projection_budget(), self.config.projection_allocation,
            resumed_from=self._start_kwargs.get("resume_step"))
        log.info(text)
        if self.verbose and self.rank == 0:  # one summary for a data-parallel run, not one per rank
            print(text, file=sys.stderr, flush=True)

    def _count(self, since: float, *, steps: int = 0, rows: int = 0, query_rows: int = 0, nbytes: int = 0) -> None:
        s = self.stats
        s.queue_wait_s += time.perf_counter() - since
        s.steps, s.rows, s.query_rows, s.bytes = s.steps + steps, s.rows + rows, s.query_rows + query_rows, s.bytes + nbytes
        s.hook_s = self.capture.seconds
        s.writer_cpu_s = self.writer.cpu_seconds if self.writer is not None else 0.0

    def _warn_late_start(self, step: int) -> None:
        """A new run whose first step is not 0 is usually a resume whose recording state was lost."""
        if step > 0 and self._start_kwargs.get("resume_run_id") is None:
            warnings.warn(
                f"a new run starts in {self.run_dir} at step {step}: steps 0..{step - 1} are not in it. If this "
                "continues an earlier training, resume its recording from the checkpoint (the callback does "
                "that when the checkpoint holds its state) or record into the earlier run's directory.",
                RuntimeWarning, stacklevel=4)

    def _warn_uneven(self, step: int, sizes: list[int]) -> None:
        if self.config.loss_reduction == "mean" and len(set(sizes)) > 1 and not self._warned_uneven:
            self._warned_uneven = True
            warnings.warn(
                f"step {step}: micro-batches of unequal size {sizes} under a mean loss weigh their samples "
                "differently (1/(n_micro*|b_j|)), but a step records one update weight, from their mean "
                "size; estimates for such steps are approximate (typically an epoch's short last "
                "batch with gradient accumulation; drop_last=True avoids it).", RuntimeWarning, stacklevel=3)

    def _row_scales(self, sizes: list[int], acc: int, grad_scaler: Any) -> list[Any]:
        """Factors that turn what the hooks saw into g_t(i) = grad l_i: undo the mean over each
        micro-batch, the division by `acc` (the number of micro-batches, where the loss is divided
        by it), and the AMP loss scale."""
        scales: list[Any] = [float(n * acc) if self.config.loss_reduction == "mean" else float(acc) for n in sizes]
        amp = loss_scale(grad_scaler)
        if amp is not None:
            scales = [s / amp for s in scales]
        return scales

    def _to_host(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the values as stored, in storage dtype on the host; whether they are finite). On a
        GPU the copy is asynchronous into pinned memory and finiteness a device tensor, both read
        by the writer thread after the step's event; finiteness is checked after the cast, so a
        float16 overflow is flagged too. On the CPU the writer checks the array itself."""
        t = t.detach().to(self._storage_dtype)
        if t.device.type == "cpu":
            return t, None
        return host_copy(t), torch.isfinite(t).all()

    def _grad_factor(self, grad_scaler: Any, optimizer: torch.optim.Optimizer) -> Any:
        """What turns .grad into the gradient the optimizer will apply: 1 / the AMP loss scale while
        the scaler has not unscaled it yet, else None."""
        amp = loss_scale(grad_scaler)
        if amp is None or scaler_found_inf(grad_scaler, optimizer) is not False:
            return None
        return 1.0 / amp

    def _found_inf(self, grad_scaler: Any, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """Whether an AMP GradScaler will skip this step. Known once scaler.unscale_(optimizer)
        ran: Lightning does that before on_before_optimizer_step; a hand-written loop must call it
        before end_step."""
        found = scaler_found_inf(grad_scaler, optimizer)
        if found is False:
            if not self._warned_no_unscale:
                self._warned_no_unscale = True
                warnings.warn("end_step() got a GradScaler that has not unscaled this step's gradients "
                              "yet: call scaler.unscale_(optimizer) before end_step() so that steps the "
                              "scaler skips are flagged (and left out by the aggregators).",
                              RuntimeWarning, stacklevel=3)
            return None
        return found
