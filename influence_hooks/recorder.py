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
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .capture.hooks import GradientCapture
from .capture.select import layers_manifest, plan_layers, projection_fingerprint, select_layers
from .errors import ConfigurationError, InfluenceHooksError, SampleIdError
from .storage.format import STORAGE_DTYPES
from .storage.writer import RunWriter, StepRecord

QueryLossFn = Callable[[nn.Module, Any], torch.Tensor]


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if default is dataclasses.MISSING:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class RecordingConfig:
    """What to record and how. Validated at construction, so mistakes fail before training."""

    layers: Sequence[str] | str | None = _help(
        "Module-name globs to record (e.g. ['encoder.*', 'head']); None: every supported layer.", None)
    layer_types: Sequence[type | str] | None = _help("Module classes (or class names) to record.", None)
    exclude: Sequence[str] | None = _help("Module-name globs to leave out.", None)
    projection: int | str | dict[str, int] | None = _help(
        "Total projected dimensions shared by the layers; a dict of per-layer dims by name glob; "
        "or 'none' for exact gradients.", 1024)
    projection_kind: str = _help(
        "'auto' (Kronecker for Linear/Conv/Embedding/Conv1D, Gaussian otherwise), 'kronecker', "
        "'gaussian' or 'rademacher'.", "auto")
    seed: int = _help("Seed of the random projection (with layer name and shape).", 0)
    loss_reduction: str = _help(
        "'mean' or 'sum': how the training loss combines the samples of a batch.", "mean")
    loss_divided_by_micro_batches: bool = _help(
        "With gradient accumulation, whether each micro-batch loss is divided by their number.", True)
    storage_dtype: str | None = _help(
        "float16, float32 or float64; default float16 when projected, float32 for exact gradients.", None)
    query_every_n_steps: int | None = _help(
        "Record query gradients every n steps (plus each epoch's first and last step and the end of "
        "training); None: only those.", None)
    snapshot_every_n_steps: int | None = _help(
        "Save the recorded layers' parameters w_t every n steps (for exact curvature).", None)
    snapshot_windows: Sequence[Sequence[int]] | None = _help(
        "Save parameters at every step inside these [t1, t2) windows.", None)
    snapshot_scope: str = _help("'layers' (the recorded layers) or 'model' (every parameter).", "layers")
    checkpoint_every_n_steps: int | None = _help(
        "Save the whole model and optimizer state every n steps (replay starts there).", None)
    on_nonfinite: str = _help("'warn' (flag the step) or 'raise' on NaN/inf gradients.", "warn")
    steps_per_shard: int = _help("Optimizer steps per HDF5 shard.", 256)
    queue_size: int = _help("Steps that may wait for the writer thread before training blocks.", 32)
    overwrite: bool = _help("Replace a run already in the directory.", False)

    def __post_init__(self) -> None:
        choices = {"projection_kind": ("auto", "kronecker", "gaussian", "rademacher", "none"),
                   "loss_reduction": ("mean", "sum"), "snapshot_scope": ("layers", "model"),
                   "on_nonfinite": ("warn", "raise")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigurationError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.storage_dtype is not None and self.storage_dtype not in STORAGE_DTYPES:
            raise ConfigurationError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {self.storage_dtype!r}")
        for name in ("query_every_n_steps", "snapshot_every_n_steps", "checkpoint_every_n_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigurationError(f"{name} must be a positive int or None, got {v!r}")
        if self.steps_per_shard < 1 or self.queue_size < 1:
            raise ConfigurationError("steps_per_shard and queue_size must be positive")
        for w in self.snapshot_windows or []:
            if len(w) != 2 or int(w[1]) <= int(w[0]):
                raise ConfigurationError(f"snapshot window {w!r} must be a non-empty [t1, t2) pair")
        if isinstance(self.projection, str) and self.projection != "none":
            raise ConfigurationError(f"projection must be an int, a dict or 'none', got {self.projection!r}")

    @property
    def projected(self) -> bool:
        return not (self.projection in (None, "none", 0) or self.projection_kind == "none")


class GradientRecorder:
    """Records per-sample gradients g_t(i) of selected layers of `model` into `run_dir`.

    Args:
        run_dir: directory of the run (created; must not hold another run unless overwrite).
        model: the model being trained; hooks are attached at construction.
        queries: query samples as one batch (whatever query_loss_fn takes), their gradients
            u_q(t) = grad f_q(w_t) are recorded on the query schedule.
        query_loss_fn: (model, query_batch) -> loss over the query batch, reduced as
            config.loss_reduction says. Must not depend on the training batch.
        query_ids: ids of the query samples (default 0..Q-1).
        config / **options: a RecordingConfig, or its fields as keyword arguments.
        metadata: JSON-serialisable extras stored in the manifest.
    """

    def __init__(self, run_dir: str, model: nn.Module, *, queries: Any = None,
                 query_loss_fn: QueryLossFn | None = None, query_ids: Sequence[int] | None = None,
                 config: RecordingConfig | None = None, metadata: dict[str, Any] | None = None,
                 precision: str | None = None, rank: int = 0, **options: Any):
        if config is not None and options:
            raise ConfigurationError("pass either config= or keyword options, not both")
        self.config = config or RecordingConfig(**options)
        self.run_dir = str(run_dir)
        self.model = model
        self.rank = rank
        self.metadata = dict(metadata or {})
        self.precision = precision
        if queries is not None and query_loss_fn is None:
            raise ConfigurationError("queries were given without query_loss_fn(model, batch) -> loss.")
        self.queries = queries
        self.query_loss_fn = query_loss_fn
        self._n_queries = _batch_len(queries) if queries is not None else 0
        self.query_ids = (np.arange(self._n_queries) if query_ids is None
                          else np.asarray(query_ids, np.int64))
        if queries is not None and len(self.query_ids) != self._n_queries:
            raise ConfigurationError(f"{len(self.query_ids)} query_ids for {self._n_queries} queries")
        selection = select_layers(model, self.config.layers, self.config.layer_types, self.config.exclude)
        self.layers = plan_layers(selection, self.config.projection if self.config.projected else None,
                                  self.config.projection_kind, self.config.seed)
        _warn_tied_parameters(self.layers)
        _warn_batch_mixing(model)
        self.capture = GradientCapture(self.layers)
        self.capture.attach()  # armed only between begin_micro_batch and end_step
        self.dim = self.capture.dim
        self._layer_params = {id(p) for p in self._recorded_parameters()}
        self.writer: RunWriter | None = None
        self._start_kwargs: dict[str, Any] = {}
        self._lr_groups_key: tuple[int, int] | None = None
        self._warned_no_unscale = False
        self._warned_uneven = False
        self._lr_groups: list[int] = []
        self._step = 0
        self._micro_ids: list[np.ndarray] = []
        self._last_epoch: int | None = None
        self._first_step_checked = False
        self._warned_mixed_lr = False
        self._finished = False
        self.run_id: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def plan_start(self, *, resume_run_id: str | None = None, resume_step: int | None = None,
                   extra: dict[str, Any] | None = None) -> None:
        """How the first end_step opens the run directory: resume run `resume_run_id` from
        `resume_step`, or create it with `extra` manifest entries. The directory is opened only
        after the first step has validated the layers, so the manifest lists what is recorded."""
        self._start_kwargs = dict(resume_run_id=resume_run_id, resume_step=resume_step, extra=extra)
        if resume_run_id is None:
            RunWriter.check_new_run_dir(self.run_dir, overwrite=self.config.overwrite, rank=self.rank)
        if resume_step is not None:
            self._step = int(resume_step)

    def start(self, optimizer: torch.optim.Optimizer | None = None, *, resume_run_id: str | None = None,
              resume_step: int | None = None, extra: dict[str, Any] | None = None) -> None:
        """Create (or resume) the run directory. Called by the first end_step if not before."""
        if self.writer is not None:
            return
        opts = dict(steps_per_shard=self.config.steps_per_shard, queue_size=self.config.queue_size,
                    on_nonfinite=self.config.on_nonfinite)
        if resume_run_id is not None:
            RunWriter.check_resume(self.run_dir, resume_run_id, self._manifest(optimizer, {}))
            self.writer = RunWriter.resume(self.run_dir, resume_run_id, int(resume_step or 0),
                                           rank=self.rank, **opts)
            self._step = int(resume_step or 0)
        else:
            self.writer = RunWriter.create(self.run_dir, self._manifest(optimizer, extra or {}), rank=self.rank,
                                           overwrite=self.config.overwrite, **opts)
        self.run_id = self.writer.manifest["run_id"]

    def _manifest(self, optimizer: torch.optim.Optimizer | None, extra: dict[str, Any]) -> dict[str, Any]:
        layers = layers_manifest(self.layers)
        n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        n_recorded = sum(p.numel() for p in self._recorded_parameters() if p.requires_grad)
        projected = any(l.spec.kind != "none" for l in self.layers)  # layers smaller than their share stay exact
        storage = self.config.storage_dtype or ("float16" if projected else "float32")
        param = next(self.model.parameters())
        cfg = {k: v for k, v in dataclasses.asdict(self.config).items() if k != "layer_types"}
        cfg["layer_types"] = [t if isinstance(t, str) else t.__name__ for t in self.config.layer_types or []]
        return {
            "dim": self.dim, "storage_dtype": storage, "layers": layers,
            "projection_fingerprint": projection_fingerprint(layers),
            "projection": {"total": self.dim, "kind": self.config.projection_kind, "seed": self.config.seed},
            "loss_reduction": self.config.loss_reduction,
            "optimizer": describe_optimizer(optimizer),
            "precision": self.precision or str(param.dtype).replace("torch.", ""),
            "parameter_dtype": str(param.dtype).replace("torch.", ""),
            "partial_model": n_recorded < n_trainable,
            "recorded_parameters": n_recorded, "trainable_parameters": n_trainable,
            "queries": {"n": self._n_queries, "ids": self.query_ids.tolist(),
                        "every_n_steps": self.config.query_every_n_steps} if self._n_queries else None,
            "config": _jsonable(cfg), "world_size": 1, "metadata": _jsonable(self.metadata), **extra,
        }

    def close(self, *, complete: bool = False, final_step: int | None = None) -> None:
        """Flush what is queued and stop recording; hooks are removed."""
        self.capture.detach()
        if self.writer is not None:
            self.writer.close(final_step=final_step, complete=complete)

    def abort(self) -> None:
        """Training failed: keep every finished step on disk, mark the run incomplete."""
        self.capture.detach()
        if self.writer is not None:
            try:
                self.writer.close(complete=False)
            except InfluenceHooksError:
                self.writer.abort()

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
        ids = _as_ids(sample_ids)
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
        ids = _concat_ids(self._micro_ids)
        n_micro = micro_batches or len(self._micro_ids)
        sizes = [len(i) for i in self._micro_ids]
        self._micro_ids = []
        self.capture.set_enabled(False)
        if not self._first_step_checked:
            self._check_first_step(len(ids))
        # the update is -lr * sum_j sum_{i in micro-batch j} g_t(i) / (acc * |b_j|) (mean) or / acc
        # (sum); with equal micro-batch sizes that is one weight for every sample of the step
        acc = n_micro if self.config.loss_divided_by_micro_batches else 1
        grads = self.capture.collect(self._row_scales(sizes, acc, grad_scaler))
        if self.config.loss_reduction == "mean" and len(set(sizes)) > 1 and not self._warned_uneven:
            self._warned_uneven = True
            warnings.warn(
                f"step {step}: micro-batches of unequal size {sizes} under a mean loss weigh their samples "
                "differently (1/(n_micro*|b_j|)), but a step records one update weight, from their mean "
                "size; estimates for such steps are approximate (typically an epoch's short last "
                "batch with gradient accumulation; drop_last=True avoids it).", RuntimeWarning, stacklevel=2)
        if self.writer is None:
            self.start(optimizer, **self._start_kwargs)
        first_of_epoch = self._last_epoch != epoch
        self._last_epoch = epoch
        group_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        rec = StepRecord(
            step=step, epoch=int(epoch), lr=self._recorded_lr(optimizer), lr_groups=group_lrs,
            batch_size=len(ids),
            update_weight=(len(sizes) / (acc * len(ids)) if self.config.loss_reduction == "mean"
                           else 1.0 / acc),
            micro_batches=n_micro, sample_ids=_host_copy(ids), grads=None,
            skipped=self._found_inf(grad_scaler, optimizer),
            loss=float(loss) if loss is not None else float("nan"))
        rec.grads, rec.finite = self._to_host(grads)
        rec.ready = _event_after_copy(grads)
        if self.queries is not None and self._query_due(step, first_of_epoch, epoch_end):
            self.write_queries(step)
        self._save_params_if_due(step, optimizer)
        self.writer.write_step(rec)
        self._step = step + 1

    def finish(self, *, final_step: int | None = None) -> None:
        """End of training: record query gradients (and a snapshot) at w_T, close the run as complete."""
        if self._finished:
            return
        self._finished = True
        final_step = self._step if final_step is None else int(final_step)
        if self.writer is not None:
            if self.queries is not None:
                self.write_queries(final_step)
            if self.config.snapshot_every_n_steps or self.config.snapshot_windows:
                self.writer.write_params("snapshot", final_step, self._snapshot_params(),
                                         attrs={"scope": self.config.snapshot_scope})
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
    def query_gradients(self) -> torch.Tensor:
        """u_q(w) for the current parameters: [Q, K], same projection as training rows.

        Runs in eval mode, leaves .grad, RNG state and module modes untouched."""
        modes = {m: m.training for m in self.model.modules()}
        rng = _rng_state()
        saved_current = self.capture.take_state()
        try:
            self.model.eval()
            self.capture.set_enabled(True)
            params = [p for p in self._recorded_parameters() if p.requires_grad]
            with torch.enable_grad():
                self.capture.begin_micro_batch(self._n_queries)
                loss = self.query_loss_fn(self.model, self.queries)
                if isinstance(loss, dict):
                    loss = loss["loss"]
                torch.autograd.grad(loss, params, allow_unused=True)
            scale = float(self._n_queries) if self.config.loss_reduction == "mean" else 1.0
            grads = self.capture.collect([scale])
            return grads
        finally:
            self.capture.set_enabled(False)
            self.capture.restore_state(saved_current)
            for m, mode in modes.items():
                m.training = mode
            _set_rng_state(rng)

    def write_queries(self, step: int) -> None:
        g = self.query_gradients()
        self.writer.write_queries(step, self._to_host(g)[0], ready=_event_after_copy(g))

    def _query_due(self, step: int, first_of_epoch: bool, epoch_end: bool) -> bool:
        n = self.config.query_every_n_steps
        return first_of_epoch or epoch_end or (n is not None and step % n == 0)

    # ------------------------------------------------------------------ parameters
    def _snapshot_params(self) -> dict[str, torch.Tensor]:
        if self.config.snapshot_scope == "model":
            return {n: p.detach() for n, p in self.model.named_parameters()}
        return {f"{l.name}.{n}" if l.name else n: p.detach()
                for l in self.layers for n, p in l.module.named_parameters(recurse=False)}

    def _save_params_if_due(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        c = self.config
        in_window = any(int(a) <= step < int(b) for a, b in c.snapshot_windows or [])
        if in_window or (c.snapshot_every_n_steps and step % c.snapshot_every_n_steps == 0):
            self.writer.write_params("snapshot", step, self._snapshot_params(), attrs={"scope": c.snapshot_scope})
        if c.checkpoint_every_n_steps and step % c.checkpoint_every_n_steps == 0:
            state = {k: v for k, v in self.model.state_dict().items() if isinstance(v, torch.Tensor)}
            self.writer.write_params("checkpoint", step, state, optim_state=optimizer_state_by_name(self.model, optimizer),
                                     attrs={"scope": "model"})

    # ------------------------------------------------------------------ helpers
    def _recorded_parameters(self) -> list[nn.Parameter]:
        return [p for l in self.layers for p in l.module.parameters(recurse=False)]

    def _check_first_step(self, n_rows: int) -> None:
        """Validate the layers on the first step, before anything is written: raise for layers
        that got no gradient, and leave out batch-broadcast layers (error if the user named them)."""
        self._first_step_checked = True
        cap = self.capture
        missing = [l.name for i, l in enumerate(cap.layers) if i not in cap.seen_layers]
        if missing:
            cap.discard()
            raise ConfigurationError(
                f"selected layer(s) {missing} received no gradient in the first step: they are not "
                "called as modules in the forward pass (e.g. weights used through a functional call, "
                "like nn.MultiheadAttention.out_proj) or not used at all. Exclude them "
                "(exclude=[...]) or select other layers.")
        mismatch = dict(cap.batch_mismatch)
        if not mismatch:
            return
        broadcast = {cap.layers[i].name for i, seen in mismatch.items() if seen == 1 and n_rows > 1}
        if broadcast != {cap.layers[i].name for i in mismatch} or len(broadcast) == len(cap.layers):
            return  # wrong sample ids: collect() raises with the details
        explicit = self.config.layers is not None or self.config.layer_types is not None
        if explicit:
            cap.discard()
            raise ConfigurationError(
                f"layer(s) {sorted(broadcast)} are applied to an input shared by the whole batch "
                "(batch dimension 1, e.g. position embeddings broadcast over samples), so their "
                "per-sample gradients cannot be read from hooks. Leave them out (exclude=[...]).")
        warnings.warn(f"not recording {sorted(broadcast)}: applied to an input shared by the whole "
                      "batch (e.g. position embeddings), so per-sample gradients are not available "
                      "from hooks. Pass exclude=[...] to silence this.", RuntimeWarning)
        cap.drop_layers(broadcast)
        self.layers, self.dim = cap.layers, cap.dim
        self._layer_params = {id(p) for p in self._recorded_parameters()}
        self._lr_groups_key = None  # the group lookup must be redone for the kept layers

    def _row_scales(self, sizes: list[int], acc: int, grad_scaler: Any) -> list[Any]:
        """Factors that turn what the hooks saw into g_t(i) = grad l_i: undo the mean over each
        micro-batch, the division by `acc` (the number of micro-batches, where the loss is divided
        by it), and the AMP loss scale."""
        scales: list[Any] = [float(n * acc) if self.config.loss_reduction == "mean" else float(acc) for n in sizes]
        amp = _loss_scale(grad_scaler)
        if amp is not None:
            scales = [s / amp for s in scales]
        return scales

    def _recorded_lr(self, optimizer: torch.optim.Optimizer) -> float:
        key = (id(optimizer), len(optimizer.param_groups))
        if self._lr_groups_key != key:  # which groups hold recorded layers: found once per optimizer
            self._lr_groups_key = key
            self._lr_groups = [j for j, g in enumerate(optimizer.param_groups)
                               if any(id(p) in self._layer_params for p in g["params"])]
        lrs = [float(optimizer.param_groups[j]["lr"]) for j in self._lr_groups]
        if not lrs:
            raise ConfigurationError("none of the recorded layers' parameters is in the optimizer; "
                                     "record layers that are being trained.")
        if len(set(lrs)) > 1 and not self._warned_mixed_lr:
            # one lr per step is recorded: the other groups' layers would get the wrong eta_t
            self._warned_mixed_lr = True
            warnings.warn(
                f"the recorded layers are in optimizer param groups with different learning rates "
                f"{sorted(set(lrs))}; the run records one lr per step ({lrs[0]}, the first such group), "
                "so estimates weight the other layers' gradients by the wrong learning rate. Record "
                "layers of a single param group (layers=... / exclude=...).", RuntimeWarning)
        return lrs[0]

    def _to_host(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the values as stored, in storage dtype on the host; whether they are finite). On a
        GPU the copy is asynchronous into pinned memory and finiteness a device tensor, both read
        by the writer thread after the step's event; finiteness is checked after the cast, so a
        float16 overflow is flagged too. On the CPU the writer checks the array itself."""
        dtype = getattr(torch, self.writer.manifest["storage_dtype"])
        t = t.detach().to(dtype)
        if t.device.type == "cpu":
            return t, None
        return _host_copy(t), torch.isfinite(t).all()

    def _found_inf(self, grad_scaler: Any, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """Whether an AMP GradScaler will skip this step (inf/NaN in the unscaled gradients), as a
        device tensor. Known once scaler.unscale_(optimizer) ran: Lightning does that before
        on_before_optimizer_step; a hand-written loop must call it before end_step."""
        if grad_scaler is None or not grad_scaler.is_enabled():
            return None
        state = getattr(grad_scaler, "_per_optimizer_states", {}).get(id(optimizer), {})
        found = state.get("found_inf_per_device") or {}
        if not found:
            if not self._warned_no_unscale:
                self._warned_no_unscale = True
                warnings.warn("end_step() got a GradScaler that has not unscaled this step's gradients "
                              "yet: call scaler.unscale_(optimizer) before end_step() so that steps the "
                              "scaler skips are flagged (and left out by the aggregators).",
                              RuntimeWarning, stacklevel=3)
            return None
        return sum(v.to(next(iter(found.values())).device) for v in found.values()) > 0


# ---------------------------------------------------------------------- module helpers
def _warn_batch_mixing(model: nn.Module) -> None:
    mixing = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if mixing:
        warnings.warn(
            f"the model has BatchNorm layers {mixing[:5]}: in train mode they normalise with "
            "statistics of the whole batch, so the recorded gradient of a sample also depends on the "
            "other samples of its batch (exact per-sample gradients need them in eval mode or "
            "replaced by GroupNorm/LayerNorm).", RuntimeWarning, stacklevel=3)


def _warn_tied_parameters(layers: list) -> None:
    owners: dict[int, list[str]] = {}
    for l in layers:
        for p in l.module.parameters(recurse=False):
            owners.setdefault(id(p), []).append(l.name)
    tied = [names for names in owners.values() if len(names) > 1]
    if tied:
        warnings.warn(
            f"layers {tied} share (tie) a parameter: each records its own part of that parameter's "
            "per-sample gradient in a separate block, so inner products over the run miss the cross "
            "terms between the parts. Exclude all but one of them (e.g. exclude=['lm_head']) for "
            "estimates over the others, or untie the weights.", RuntimeWarning, stacklevel=3)



def describe_optimizer(optimizer: torch.optim.Optimizer | None) -> dict[str, Any] | None:
    """The optimizer's class and hyperparameters, and whether it is plain SGD (the estimators'
    assumption): SGD without momentum and weight decay."""
    if optimizer is None:
        return None
    groups = []
    for g in optimizer.param_groups:
        groups.append({k: _jsonable(v) for k, v in g.items() if k != "params"})
    name = type(optimizer).__name__
    plain = name == "SGD" and all(float(g.get("momentum", 0) or 0) == 0 and float(g.get("weight_decay", 0) or 0) == 0
                                  for g in optimizer.param_groups)
    return {"name": name, "is_plain_sgd": plain, "param_groups": groups}


def optimizer_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in optimizer.state.items():
        if id(p) in names:
            tensors = {k: v for k, v in st.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
            if tensors:
                out[names[id(p)]] = tensors
    return out


def _loss_scale(grad_scaler: Any) -> Any:
    if grad_scaler is None or not getattr(grad_scaler, "is_enabled", lambda: True)():
        return None
    scale = getattr(grad_scaler, "_scale", None)  # a device tensor: dividing by it needs no sync
    return scale if scale is not None else grad_scaler.get_scale()


def _event_after_copy(t: torch.Tensor) -> Any:
    if t.device.type != "cuda":
        return None
    ev = torch.cuda.Event()
    ev.record()
    return ev


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _host_copy(t: Any) -> Any:
    """A GPU tensor copied asynchronously into pinned host memory (valid once the step's event
    has completed); anything else unchanged."""
    if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def _concat_ids(parts: list[Any]) -> Any:
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    dev = next(p.device for p in parts if isinstance(p, torch.Tensor))
    return torch.cat([torch.as_tensor(p, device=dev) for p in parts])


def _as_ids(sample_ids: Any) -> Any:
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


def _batch_len(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return _batch_len(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch:
        return _batch_len(batch[0])
    raise ConfigurationError("queries must be a batch: a tensor, or a tuple/list/dict of tensors with "
                             "the samples along dim 0.")


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, torch.Tensor):
        return v.tolist() if v.numel() < 64 else f"tensor{tuple(v.shape)}"
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    return repr(v)
