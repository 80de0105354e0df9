"""Window-removal and accrued influence with full-space curvature (README, "Exact curvature").

`dit(run, ..., curvature='exact' | 'ggn', model=, dataset=, queries=, loss_fn=)` lands here. The
recording alone is not enough: the recursion needs the curvature of each step's batch loss at the
parameters the run actually went through. So this backend recomputes, in full parameter space
(the recorded gradient projection plays no part):

- w_t (and the optimizer state) for every step of the backward pass, from snapshots or a replay
  from a checkpoint (`trajectory.ParameterTrajectory`);
- the batch B_t from the recorded sample ids (dataset[i]) and the recorded update weight w_t and
  learning rate eta_t;
- u_q(t_e) = grad f_q(w_{t_e}) from the query samples;
- per step, for all query directions at once (vmap), one forward-over-reverse pass that gives
  both H_t p and g_t(i) . p for every i in B_t (`model_fn.LossFunctions`), so neither H_t nor the
  per-sample gradients are ever formed.

The recursion is the adjoint of the recorded optimizer's linearized update (`optimizers.py`); for
plain SGD it is:
    u <- u_q(t_e); for t = t_e - 1 down to t1:
        if t < t2: score[i] += (eta_t w_t) u . g_t(i)  for i in B_t
        u <- u - eta_t H_t u
Optimizers without an exact form use the plain SGD form with the recorded learning rate, on exact
parameters from snapshots (noted in the result).

Sign (README, "Which samples mattered, and when"): a score is f_q(without i) - f_q(actual);
positive = i helped.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_map
from torch.utils.data import default_collate

from ...batches import as_batch, batch_size_of, cast_batch, training_step_loss
from ...errors import ConfigurationError
from ...storage.reader import Run
from ..curvature import FullSpaceCurvature
from ..distributed import Split, first_process
from ..notes import window_notes
from ..queries import query_ids_of
from ..results import InfluenceScores
from ..rows import SampleRows, resolve_device
from ..tasks import TaskPlan
from .backward import FullSpacePass
from .checks import check_dataset, check_model, layer_param_names
from .model_fn import LossFunctions, Params
from .optimizers import OptimizerForm, SGDForm, optimizer_form
from .options import ExactOptions
from .trajectory import ParameterTrajectory, Plan


def _in_eval_mode(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run fn with kwargs['model'] in eval mode (deterministic, vmap-able), restoring every module's mode."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            return fn(*args, **kwargs)
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            return fn(*args, **kwargs)
        finally:
            for m, mode in modes.items():
                m.training = mode
    return wrapper


@_in_eval_mode
def exact_dit(run: Run, tasks: TaskPlan, curvature: FullSpaceCurvature, *, model: nn.Module | None = None,
              dataset: Any = None, queries: Any = None, loss_fn: Callable[[nn.Module, Any], Any] | None = None,
              query_loss_fn: Callable[[nn.Module, Any], Any] | None = None, query_ids: Any = None,
              query_grads: Any = None, train_ids: Any = None, dtype: torch.dtype | None = None,
              device: Any = None, progress: bool = True, split: Split | None = None,
              **options: Any) -> list[InfluenceScores]:
    """Window-removal or accrued influence [n_train, n_query] of the windows of `tasks` with
    full-space curvature; one result per window. Called by `dit(..., curvature='exact' | 'ggn')`.

    model: the trained nn.Module / LightningModule (its architecture; its values are only used for
        parameters no snapshot or checkpoint holds, and for buffers).
    dataset: the training dataset indexed by the recorded sample ids: dataset[i] is the item the
        train loader collated for sample i.
    loss_fn: (model, batch) -> the training step's scalar loss; default the LightningModule's
        training_step. A sample's own loss l_i is loss_fn on a batch of that sample alone, and the
        step loss L_t = w_t sum_i l_i (w_t the recorded update weight, 1/|B_t| for a mean loss).
    queries: the query samples, as one batch or a Dataset (as the recording callback takes them);
        query_loss_fn (default loss_fn) gives f_q the same way. u_q(t_e) is computed exactly at
        w_{t_e}. query_grads: instead of queries, full-parameter-space query gradients [Q, P]
        (removal only; P the attributed parameters in model order) or {name: [Q, *shape]}.
    dtype: dtype of the returned values (default the compute dtype); device: where to compute.
    split: this process's share of a group (aggregate/distributed.py): it carries its share of the
        query directions through the pass, and every rank gets all the columns.
    options: the fields of ExactOptions (params, source, optimizer_form, compute_dtype, query_chunk,
        sample_chunk, max_memory, cache_dir, check, collate_fn).

    Positive score: removing i raises the query loss (i helped).
    """
    t_start = time.perf_counter()
    opts = ExactOptions.from_kwargs(options)
    if model is None or dataset is None:
        raise ConfigurationError(
            f"curvature={curvature.name!r} needs Hessian-vector products of each step's batch loss at the "
            "recorded parameters, so besides the run it needs model= (the trained model or "
            "LightningModule), dataset= (the training samples, indexed by the recorded sample ids), "
            "queries= (and loss_fn= unless the model is a LightningModule), and parameter snapshots "
            "or checkpoints along the window (snapshot_windows / checkpoint_every_n_steps when "
            "recording). Without them use curvature='fisher' or 'none'.")
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"model= must be the trained nn.Module (or LightningModule), got "
                                 f"{type(model).__name__}.")
    loss_fn = loss_fn or _default_loss(model)

    # ------------------------------------------------------------------ model, parameters, data
    check_model(run, model)
    check_dataset(run, dataset)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    diff_names = _diff_names(run, model, trainable, opts.params)
    cdtype = opts.compute_dtype or next(iter(dict(model.named_parameters()).values())).dtype
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    init = {n: p.detach().to(device=dev, dtype=cdtype if p.is_floating_point() else p.dtype)
            for n, p in model.named_parameters()}
    buffers = {n: b.detach().to(device=dev, dtype=cdtype if b.is_floating_point() else b.dtype)
               for n, b in model.named_buffers()}
    collate = opts.collate_fn or default_collate

    def batch_of(ids: np.ndarray) -> Any:
        return cast_batch(collate([dataset[int(i)] for i in ids]), cdtype, dev)

    qbatch, fixed_u = None, None
    if query_grads is not None:
        fixed_u = _full_space_queries(query_grads, diff_names, init)
        Q = next(iter(fixed_u.values())).shape[0]
    elif queries is None:
        raise ConfigurationError(
            "exact curvature computes u_q(t_e) = grad f_q(w_{t_e}) itself, in full parameter space (the "
            "recorded projected query gradients cannot be used): pass queries= (the query samples, as one "
            "batch or a Dataset) and, if their loss differs from the training loss, "
            "query_loss_fn=(model, batch) -> loss.")
    else:
        qbatch, found_ids = as_batch(queries, opts.collate_fn)
        qbatch = cast_batch(qbatch, cdtype, dev)
        Q = batch_size_of(qbatch)
        query_ids = found_ids if query_ids is None else query_ids
    qids = query_ids_of(run, Q, query_ids)
    if split is not None:  # this rank's query directions
        if Q < split.size:
            raise ConfigurationError(f"{Q} queries cannot be shared among {split.size} processes; use fewer "
                                     "processes (or more queries).")
        cols = split.columns(Q)
        if qbatch is not None:
            qbatch = tree_map(lambda x: x[cols] if isinstance(x, torch.Tensor) else x, qbatch)
        else:
            fixed_u = {n: u[cols] for n, u in fixed_u.items()}

    # ------------------------------------------------------------------ optimizer and trajectory
    form, form_note = optimizer_form(run)
    lf = LossFunctions(model, loss_fn, query_loss_fn, sample_chunk=opts.sample_chunk, query_chunk=opts.query_chunk)
    held_fixed = [n for n in trainable if n not in set(diff_names)]

    def replay_grad(t: int, w: Params) -> Params:
        i = run.step_position(t)
        fixed = {**buffers, **{n: v for n, v in init.items() if n not in w}}
        return lf.batch_grad(w, fixed, batch_of(run.step_sample_ids(t)), float(run.update_weights[i]))

    lo, hi = tasks.span
    traj = ParameterTrajectory(run, trainable, init, form, replay_grad, dtype=cdtype, device=dev,
                               source=opts.source, max_memory=int(opts.max_memory), cache_dir=opts.cache_dir,
                               snapshot_names=diff_names)
    plan = traj.plan(lo, hi)
    if plan.source == "replay" and plan.start_kind == "checkpoint":
        ck = run.load_parameters(plan.start, "checkpoint")
        buffers.update({n: ck[n].to(device=dev, dtype=buffers[n].dtype) for n in buffers if n in ck})
    recursion = form if (form is not None and opts.optimizer_form == "auto") else SGDForm()

    # ------------------------------------------------------------------ backward pass
    rows_of = SampleRows(run, train_ids, dev)
    state = FullSpacePass(run=run, model=model, lf=lf, tasks=tasks, form=recursion,
                          products=curvature.products(lf), diff_names=diff_names, buffers=buffers, init=init,
                          batch_of=batch_of, rows_of=rows_of, Q=Q if split is None else cols.stop - cols.start,
                          dtype=cdtype, device=dev, check=opts.check, qbatch=qbatch, fixed_u=fixed_u)
    acc, check_info = state.run_pass(traj, plan, f"dit {tasks.mode} ({curvature.name})",
                                     progress and first_process(split))
    if split is not None:
        acc.gather_columns(split, Q)

    # ------------------------------------------------------------------ results
    notes = _notes(run, model, plan, form, form_note, recursion, opts, curvature, held_fixed, query_grads is not None)
    meta_base = {
        "params": opts.params if isinstance(opts.params, str) else list(opts.params),
        "parameters": sum(init[n].numel() for n in diff_names), "parameter_names": list(diff_names),
        "trajectory": plan.describe(), "replayed_steps": traj.replayed_steps,
        "replay_checks": [(int(s), float(r)) for s, r in traj.replay_checks],
        "recording_check": check_info, "optimizer_form": recursion.describe(),
        "compute_dtype": str(cdtype).replace("torch.", ""), "seconds": time.perf_counter() - t_start,
    }
    results = []
    for w, window in enumerate(tasks.windows):
        values, present = tasks.result(w, acc)
        results.append(InfluenceScores(
            values=values.to(dtype or cdtype), train_ids=rows_of.ids, present=present, query_ids=qids,
            method=f"dit_{tasks.mode}", window=window, eval_step=tasks.eval_step_of(w), curvature=curvature.name,
            approximations=notes + window_notes(run, *tasks.scored_range(w)) + tasks.notes(w),
            run_id=run.run_id, meta={**tasks.meta(w), **meta_base}))
    return results


# ---------------------------------------------------------------------- arguments
def _default_loss(model: nn.Module) -> Callable[[nn.Module, Any], Any]:
    if hasattr(model, "training_step"):
        return training_step_loss
    raise ConfigurationError("exact curvature needs the training loss: pass loss_fn=(model, batch) -> "
                             "scalar loss (the same loss the training step minimized).")


def _diff_names(run: Run, model: nn.Module, trainable: list[str], params: Any) -> list[str]:
    if isinstance(params, str):
        if params == "model":
            return trainable
        wanted = set(layer_param_names(run, model))
        return [n for n in trainable if n in wanted]
    names = list(params)
    bad = [n for n in names if n not in trainable]
    if bad or not names:
        raise ConfigurationError(f"params: {bad or names} are not trainable parameters of the model; "
                                 f"choose among {trainable[:10]}{'...' if len(trainable) > 10 else ''}")
    return [n for n in trainable if n in set(names)]


def _full_space_queries(query_grads: Any, names: list[str], init: Params) -> Params:
    if isinstance(query_grads, dict):
        if set(query_grads) != set(names):
            raise ConfigurationError(f"query_grads has parameters {sorted(query_grads)[:5]}..., expected "
                                     f"the attributed parameters {names[:5]}...")
        return {n: torch.as_tensor(query_grads[n]).to(init[n]) for n in names}
    g = torch.as_tensor(query_grads)
    g = g[None] if g.dim() == 1 else g
    sizes = [init[n].numel() for n in names]
    if g.dim() != 2 or g.shape[1] != sum(sizes):
        raise ConfigurationError(
            f"query_grads has shape {tuple(g.shape)}; exact curvature needs full-parameter-space gradients "
            f"[Q, {sum(sizes)}] over {names[:4]}{'...' if len(names) > 4 else ''} (not the run's projected ones). "
            "Pass queries= instead to have them computed.")
    parts = torch.split(g, sizes, dim=1)
    return {n: p.reshape(g.shape[0], *init[n].shape).to(init[n]) for n, p in zip(names, parts)}


# ---------------------------------------------------------------------- notes
def _notes(run: Run, model: nn.Module, plan: Plan, form: OptimizerForm | None, form_note: str | None,
           recursion: OptimizerForm, opts: ExactOptions, curvature: FullSpaceCurvature, held_fixed: list[str],
           given_u: bool) -> list[str]:
    notes = [curvature.note] if curvature.note else []
    if held_fixed:
        notes.append(f"only {'the recorded layers' if opts.params == 'recorded' else 'the chosen'} parameters are "
                     f"attributed; {len(held_fixed)} other trainable parameter tensor(s) are held fixed in the "
                     "counterfactual (the recursion uses that block of the Hessian)")
    if plan.held:
        notes.append(f"{len(plan.held)} parameter tensor(s) outside the snapshots ({plan.held[:3]}...) are held at "
                     "the given model's values at every step, not their values during training")
    name = (run.optimizer or {}).get("name", "unknown")
    if form is None:
        notes.append(f"optimizer {name} is not replayable SGD: the plain SGD form with the recorded learning "
                     "rate is used on the recorded parameters" + (f" ({form_note})" if form_note else ""))
    elif recursion is not form and not form.plain:
        notes.append(f"the recorded {form.describe()} is linearized in the plain SGD form (optimizer_form='sgd')")
    if run.manifest.get("gradient_clipping"):
        notes.append(f"gradient clipping ({run.manifest['gradient_clipping']}) is ignored")
    if any(isinstance(m, (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)) for m in model.modules()):
        notes.append("the model is evaluated in eval mode (no dropout, batch norm on fixed statistics), unlike "
                     "training")
    if given_u:
        notes.append("query gradients supplied by the caller stand in for u_q(t_e)")
    return notes
