"""`validate(run, model=..., ...)`: how far the influence scores can be trusted on this run, measured
against actual retraining of the recorded training.

1. Checks that the run can be retrained exactly (the optimizer has an update rule, no AMP, no
   gradient clipping) and that the model, dataset and queries match the recording.
2. Plans the windows, samples, LDS subsets and queries (`plan.py`), times a few steps on the run
   itself, cuts the plan to the budget and prints the estimate before anything runs.
3. Retrains (`retrain.py`): every window from its checkpoint, its samples left out one at a time
   and its LDS subsets, all models of a window at once; nothing-left-out reproduces the recording
   or it stops (ReproductionError).
4. Scores every method on the same windows (`estimates.py`), compares (`lds.py`) and writes the
   report next to the run (`report.py`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from ..aggregate.fullspace.checks import check_dataset, check_model
from ..aggregate.fullspace.optimizers import optimizer_form
from ..errors import ConfigurationError
from ..storage.reader import Run, open_run
from .estimates import MethodScores, score_methods
from .lds import subset_predictions
from .options import ValidateOptions
from .plan import Plan, choose_queries, fit_budget, fmt_seconds, interpolated, make_plan
from .report import write_report
from .results import ScopeResult, Validation
from .retrain import GroupResult, Retrainer
from .sources import TrainingSetup

DEFAULT_DIR = "validate"


def report_dir(run_path: Path, out: str | os.PathLike) -> Path:
    """Where `validate(..., out=out)` writes its report: `out` itself if absolute, else inside the run."""
    d = Path(out)
    return d if d.is_absolute() else Path(run_path) / d


def validate(run: Run | str | os.PathLike, *, model: Any = None, dataset: Any = None, datamodule: Any = None,
             queries: Any = None, queries_from: str | None = None, loss_fn: Callable | None = None,
             query_loss_fn: Callable | None = None, collate_fn: Callable | None = None,
             out: str | os.PathLike | None = DEFAULT_DIR, **options: Any) -> Validation:
    """Score influence methods against retraining on a recorded run with checkpoints.

    run: a Run or its directory; it needs checkpoints (checkpoint_every_n_steps when recording).
    model: the trained nn.Module or LightningModule (its architecture; weights come from the run).
    dataset: the training dataset indexed by the recorded sample ids, or datamodule= (its
        train_dataloader's dataset and collate function). loss_fn: (model, batch) -> the training
        loss; default a LightningModule's training_step. queries: the recorded queries (a Dataset or
        one batch), or queries_from= (a method of the data module, as InfluenceCallback takes it);
        query_loss_fn as recorded (default loss_fn).
    out: the report directory, relative to the run directory ('validate': RUN/validate/), absolute,
        or None for no files.
    options: the fields of ValidateOptions (methods, windows, epochs, n_windows, samples, eval_at,
        lds, lds_subsets, lds_fraction, n_queries, budget_steps, budget_seconds, seed, check,
        tolerance, model_chunk, device, progress, verbose).

    Returns a Validation: per window each method's Pearson / Spearman against leave-one-out
    retraining, the LDS per scope, the reproduction checks and the cost.
    """
    opts = ValidateOptions.from_kwargs(options)
    t_start = time.perf_counter()
    say = print if opts.verbose else (lambda *a, **k: None)
    if not isinstance(run, Run):
        with open_run(run) as opened:
            return validate(opened, model=model, dataset=dataset, datamodule=datamodule, queries=queries,
                            queries_from=queries_from, loss_fn=loss_fn, query_loss_fn=query_loss_fn,
                            collate_fn=collate_fn, out=out, **options)
    form = _replayable(run)
    setup = TrainingSetup.resolve(run, model=model, dataset=dataset, datamodule=datamodule, queries=queries,
                                  queries_from=queries_from, loss_fn=loss_fn, query_loss_fn=query_loss_fn,
                                  collate_fn=collate_fn)
    check_model(run, setup.model)
    check_dataset(run, setup.dataset)
    qsel = choose_queries(setup.n_queries, opts)
    rt = Retrainer(run, setup, form, qsel=qsel, device=opts.device, model_chunk=opts.model_chunk,
                   tolerance=opts.tolerance, check=opts.check)

    # ------------------------------------------------------------------ plan, timing, budget
    plan = make_plan(run, opts, lambda t: rt.start_of(t)[0], qsel)
    t0 = plan.scopes[0].window[0]
    sizes = sorted({1} | {min(rt.model_chunk, len(s.samples) + len(s.subsets) + 1) for s in plan.scopes})
    rt.time_steps(t0, sizes[-1], repeats=1)  # warm-up: the first steps of a process are slower
    step_time = interpolated(sizes, [rt.time_steps(t0, k) for k in sizes])
    seconds_of = lambda p: p.seconds(step_time, rt.model_chunk)  # noqa: E731
    if opts.budget_steps is not None:
        plan = fit_budget(plan, Plan.model_steps, opts.budget_steps, "model-steps")
    elif opts.budget_seconds is not None:
        plan = fit_budget(plan, seconds_of, opts.budget_seconds, "s of retraining")
    estimate = {"retraining": seconds_of(plan)}
    exact = [m for m in opts.methods if m in ("dit_exact", "dit_ggn")]
    if exact:
        hvp = rt.time_hvp(t0, len(qsel))
        # a replay step from the checkpoint to t_e, then a Hessian-vector product per step of [t1, t_e)
        for m in exact:
            estimate[m] = sum((s.eval_step - s.start) * step_time(1) + (s.eval_step - s.window[0]) * hvp
                              for s in plan.scopes)
    say(f"validate {run.path}: {plan.describe()}.")
    for n in plan.notes:
        say(f"  {n}")
    say(f"  retraining {plan.model_steps():,} model-steps: about {fmt_seconds(estimate['retraining'])}"
        + "".join(f"; {m.replace('_', ' ')}: about {fmt_seconds(estimate[m])}" for m in exact)
        + "; the recorded-space methods: a pass over the recording each.")

    # ------------------------------------------------------------------ retraining
    t1 = time.perf_counter()
    with tqdm(total=plan.model_steps(), desc="validate: retraining", unit="model-step", unit_scale=True,
              disable=not opts.progress, leave=False, dynamic_ncols=True) as bar:
        rt.bar = bar
        results = [rt.run_group(s.group) for s in plan.scopes]
        for s, r in zip(plan.scopes, results):
            for c in r.checks:
                c.scope = s.name
        rt.bar = None
    seconds = {"retraining": time.perf_counter() - t1}

    # ------------------------------------------------------------------ scores and comparison
    scores = score_methods(run, opts.methods, plan.scopes, setup, qsel, device=opts.device, progress=opts.progress)
    for m, per_scope in scores.items():
        seconds[m] = sum(x.seconds for x in per_scope if isinstance(x, MethodScores))
    v = Validation(
        run_path=str(run.path), run_id=run.run_id, methods=opts.methods,
        query_ids=run.query_ids[qsel] if len(run.query_ids) else qsel,
        scopes=[_scope_result(s, r, {m: scores[m][j] for m in opts.methods}) for j, (s, r) in
                enumerate(zip(plan.scopes, results))],
        checks=[c for r in results for c in r.checks], optimizer=form.describe(),
        dtype=str(rt.dtype).replace("torch.", ""), notes=list(plan.notes),
        approximations={m: next((x.approximations for x in scores[m] if isinstance(x, MethodScores)), [])
                        for m in opts.methods},
        seconds=seconds, estimated_seconds=estimate, model_steps=rt.model_steps)
    v.seconds["total"] = time.perf_counter() - t_start
    if out is not None:
        path = write_report(v, report_dir(run.path, out))
        v.notes.append(f"report: {path}")
        say(f"Report: {path}")
    say(v.summary())
    return v


def _scope_result(s: Any, r: GroupResult, scores: dict[str, MethodScores | str]) -> ScopeResult:
    M = len(s.samples)
    out = ScopeResult(name=s.name, kind=s.kind, window=s.window,
                      eval_step=s.eval_step, start=r.start, sample_ids=np.asarray(s.samples),
                      truth=r.members[:M] - r.base[None], subsets=list(s.subsets), kept_fraction=s.kept_fraction,
                      subset_change=(r.members[M:] - r.base[None]) if s.subsets else None,
                      n_present=len(s.present))
    for m, x in scores.items():
        if isinstance(x, str):
            out.reasons[m] = x
            continue
        if M:
            out.estimates[m] = x.rows(s.samples)
        if s.subsets:
            out.subset_predictions[m] = subset_predictions(x.values, x.ids, s.subsets)
    return out


def _replayable(run: Run) -> Any:
    """The run's optimizer form, or ConfigurationError saying why the run cannot be retrained exactly."""
    precision = str(run.manifest.get("precision") or "")
    if "16" in precision or "mixed" in precision or bool(run.skipped.any()):
        raise ConfigurationError(
            f"the run trained with precision {precision!r}"
            + (f" and {int(run.skipped.sum())} step(s) skipped by a GradScaler" if run.skipped.any() else "")
            + ": AMP and half precision round differently in a retraining (other kernels, per-sample "
            "losses, a different loss scale), so retraining cannot reproduce the recorded trajectory and no "
            "ground truth can be claimed. Validate a run trained in float32 or float64 (e.g. a shorter "
            "copy of the run with precision='32-true').")
    clip = run.manifest.get("gradient_clipping")
    if clip:
        raise ConfigurationError(
            f"the run clipped gradients ({clip}); validate's retraining does not replay clipping, so it "
            "cannot reproduce the recorded trajectory. Validate a run trained without gradient clipping.")
    form, why = optimizer_form(run)
    if form is None:
        name = run.optimizer.get("name", "unknown")
        raise ConfigurationError(
            f"validate retrains with the recorded optimizer's update rule, and there is none for this run's "
            f"optimizer ({name})" + (f": {why}" if why else "") + ". The supported optimizers are those with an "
            "OptimizerForm in influence_hooks/aggregate/fullspace/optimizers.py (e.g. torch.optim.SGD with "
            "momentum, dampening, Nesterov and weight decay).")
    return form

