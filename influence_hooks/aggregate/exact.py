"""Window-removal and accrued influence with exact curvature (REFERENCE.md estimators 2, 3, item 5).

`dit(run, ..., curvature='exact' | 'ggn', model=, dataset=, queries=, loss_fn=)` lands here. The
recording alone is not enough: the recursion needs the Hessian of each step's batch loss at the
parameters the run actually went through. So this backend recomputes, in full parameter space
(the recorded gradient projection plays no part):

- w_t for every step of the backward pass, from snapshots or a replay from a checkpoint
  (`replay.ParameterTrajectory`);
- the batch B_t from the recorded sample ids (dataset[i]) and the recorded update weight w_t and
  learning rate eta_t;
- u_q(t_e) = grad f_q(w_{t_e}) from the query samples;
- per step, for all query directions at once (vmap), one forward-over-reverse pass that gives
  both H_t p (Hessian-vector products of L_t at w_t) and g_t(i) . p for every i in B_t
  (`model_fn.LossFunctions`), so neither H_t nor the per-sample gradients are ever formed.

The recursion is the linearization of the recorded optimizer. For plain SGD it is REFERENCE.md's:
    u <- u_q(t_e); for t = t_e - 1 down to t1:
        if t < t2: score[i] += (eta_t w_t) u . g_t(i)  for i in B_t
        u <- u - eta_t H_t u
For torch.optim.SGD with momentum mu, dampening tau, weight decay lambda (and Nesterov) it is the
exact adjoint of that update, carrying a second vector a (the adjoint of the momentum buffer):
    gb = a - eta u            (Nesterov: a - eta mu u)
    p  = (1 - tau) gb         (Nesterov: (1 - tau) gb - eta u; tau -> 0 at the first step)
    score[i] += -w_t p . g_t(i);   u <- u + (H_t + lambda I) p;   a <- mu gb (0 at the first step)
which reduces to the plain form for mu = lambda = 0 (p = -eta u). Other optimizers: the plain SGD
form with the recorded learning rate, on exact parameters from snapshots (noted in the result).

Sign (REFERENCE.md): a score is f_q(without i) - f_q(actual); positive = i helped.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import default_collate
from tqdm.auto import tqdm

from ..errors import ConfigurationError, MissingDataError, WindowError
from ..storage.reader import Run
from . import _common as C
from .dit import EXACT_CURVATURES, MODES, _resolve_eval_step
from .model_fn import LossFunctions, Params, batch_size_of, cast_batch
from .replay import ParameterTrajectory, Plan, SGDForm, sgd_form
from .results import InfluenceScores

PARAMS = ("recorded", "model")
CHECK_TOLERANCE = 2e-2


@dataclass(frozen=True)
class _Track:
    """Score steps [lo, score_end) with the query carried back from `start` (t_e)."""

    start: int
    lo: int
    score_end: int


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
def exact_dit(run: Run, window: Any = None, mode: str = "removal", curvature: str = "exact",
              eval_step: int | str | None = None, *, model: nn.Module, dataset: Any,
              queries: Any = None, loss_fn: Callable[[nn.Module, Any], Any] | None = None,
              query_loss_fn: Callable[[nn.Module, Any], Any] | None = None, query_ids: Any = None,
              query_grads: Any = None, params: str | Sequence[str] = "recorded", train_ids: Any = None,
              collate_fn: Callable[[list], Any] | None = None, source: str = "auto",
              optimizer_form: str = "auto", compute_dtype: torch.dtype | None = None,
              dtype: torch.dtype | None = None, device: Any = None, query_chunk: int | None = None,
              sample_chunk: int | None = None, max_memory: int | float = 2 << 30,
              cache_dir: str | None = None, check: str = "raise", progress: bool = True,
              epochs: Any = None, windows: Any = None, projection_fingerprint: str | None = None,
              chunk_rows: int | None = None) -> InfluenceScores | list[InfluenceScores]:
    """Window-removal or accrued influence [n_train, n_query] with exact (or Gauss-Newton) curvature.

    Usually called as `dit(run, window, mode=..., curvature='exact', model=..., dataset=...,
    queries=..., loss_fn=...)`.

    run: the recorded run. window: (t1, t2), a list of them (one backward pass, a list of results)
        or None (the whole run). mode: 'removal' (R(i, q; [t1, t2), t_e), t_e = eval_step, default t2,
        or 'final') or 'accrued' (A = R([first, t2), t2) - R([first, t1), t1)).
    curvature: 'exact' (Hessian of L_t at w_t) or 'ggn' (Gauss-Newton J^T H_out J: loss_fn must call
        the model once and compute the loss from its single tensor output).
    model: the trained nn.Module / LightningModule (its architecture; its values are only used for
        parameters no snapshot or checkpoint holds, and for buffers).
    dataset: the training dataset indexed by the recorded sample ids: dataset[i] is the item the
        train loader collated for sample i. collate_fn: default torch's default_collate.
    loss_fn: (model, batch) -> the training step's scalar loss; default the LightningModule's
        training_step. A sample's own loss l_i is loss_fn on a batch of that sample alone, and the
        step loss L_t = w_t sum_i l_i (w_t the recorded update weight, 1/|B_t| for a mean loss).
    queries: the query samples as one batch; query_loss_fn (default loss_fn) gives f_q the same way.
        u_q(t_e) is computed exactly at w_{t_e}. query_grads: instead of queries, full-parameter-space
        query gradients [Q, P] (removal only; P the attributed parameters in model order).
    params: 'recorded' (the recorded layers' parameters; the others are held fixed in the
        counterfactual, and the result says so), 'model' (every trainable parameter), or a list of
        parameter names.
    source: 'auto' | 'snapshots' | 'replay': where w_t comes from (see replay.py); max_memory:
        bytes of parameter vectors a replay keeps in memory (beyond, it works in segments and keeps
        segment starts in a temporary directory under cache_dir).
    optimizer_form: 'auto' (the exact linearization of the recorded SGD, momentum and weight decay
        included; the plain SGD form for other optimizers, noted) or 'sgd' (always the plain form).
    compute_dtype: default the model's parameter dtype; dtype: dtype of the returned values
        (default compute_dtype). device: where to compute.
    query_chunk / sample_chunk: vmap chunk sizes (query directions / samples) to bound memory.
    check: 'raise' | 'warn' | 'off': at the first step, compare recomputed per-sample gradients with
        the recorded ones (projected like the run) to catch a dataset, loss or model that does not
        match the recording.

    Positive score: removing i raises the query loss (i helped). Returns InfluenceScores with
    method 'dit_removal' / 'dit_accrued' and curvature 'exact' / 'ggn'.
    """
    t_start = time.perf_counter()
    if mode not in MODES:
        raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}")
    if curvature not in EXACT_CURVATURES:
        raise ConfigurationError(f"exact_dit takes curvature 'exact' or 'ggn', got {curvature!r}")
    if check not in ("raise", "warn", "off"):
        raise ConfigurationError(f"check must be 'raise', 'warn' or 'off', got {check!r}")
    if optimizer_form not in ("auto", "sgd"):
        raise ConfigurationError(f"optimizer_form must be 'auto' or 'sgd', got {optimizer_form!r}")
    del chunk_rows  # dit's block size for recorded rows; nothing here reads them in blocks
    if projection_fingerprint is not None:
        raise ConfigurationError("exact curvature works in full parameter space; projection_fingerprint "
                                 "does not apply (query_grads= must be full-space gradients [Q, P]).")
    if not isinstance(model, nn.Module):
        raise ConfigurationError(f"model= must be the trained nn.Module (or LightningModule), got "
                                 f"{type(model).__name__}.")
    wins, many = _windows(run, window, epochs, windows)
    loss_fn = loss_fn or _default_loss(model)
    first = int(run.first_step)

    # ------------------------------------------------------------------ model, parameters, data
    _check_model(run, model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    diff_names = _diff_names(run, model, params)
    cdtype = compute_dtype or next(iter(dict(model.named_parameters()).values())).dtype
    out_dtype = dtype or cdtype
    dev = C.resolve_device(device) if device is not None else next(model.parameters()).device
    init = {n: p.detach().to(device=dev, dtype=cdtype if p.is_floating_point() else p.dtype)
            for n, p in model.named_parameters()}
    buffers = {n: b.detach().to(device=dev, dtype=cdtype if b.is_floating_point() else b.dtype)
               for n, b in model.named_buffers()}
    _check_dataset(run, dataset)
    collate = collate_fn or default_collate

    def batch_of(ids: np.ndarray) -> Any:
        return cast_batch(collate([dataset[int(i)] for i in ids]), cdtype, dev)

    qbatch, Q, fixed_u = None, None, None
    if query_grads is not None:
        if mode != "removal":
            raise ConfigurationError("accrued influence needs u_q at t1 and t2: pass queries= (the query "
                                     "samples), not query_grads=.")
        fixed_u = _full_space_queries(query_grads, diff_names, init)
        Q = next(iter(fixed_u.values())).shape[0]
    elif queries is None:
        raise ConfigurationError(
            "exact curvature computes u_q(t_e) = grad f_q(w_{t_e}) itself, in full parameter space (the "
            "recorded projected query gradients cannot be used): pass queries= (the query samples as one "
            "batch) and, if their loss differs from the training loss, query_loss_fn=(model, batch) -> loss.")
    else:
        qbatch = cast_batch(queries, cdtype, dev)
        Q = batch_size_of(qbatch)
    qids = _query_ids(run, query_ids, Q)

    # ------------------------------------------------------------------ tracks
    # removal: one track per window; accrued: R([first, t2), t2) minus R([first, t1), t1). Windows
    # share tracks (consecutive accrued windows share an end), and all run in one backward pass.
    per_window: list[tuple[_Track, _Track | None]] = []
    for t1, t2 in wins:
        if mode == "removal":
            per_window.append((_Track(_resolve_eval_step(run, eval_step, t2), t1, t2), None))
        else:
            if eval_step is not None:
                raise ConfigurationError("accrued influence is evaluated at the window's own ends (t1 and "
                                         "t2); eval_step applies to mode='removal' only.")
            per_window.append((_Track(t2, first, t2), _Track(t1, first, t1) if t1 > first else None))
    tracks = sorted({t for pair in per_window for t in pair if t is not None},
                    key=lambda t: (t.start, t.lo, t.score_end))
    lo, hi = min(t.lo for t in tracks), max(t.start for t in tracks)
    if hi > run.final_step:
        raise WindowError(f"evaluation step {hi} lies after the end of training (step {run.final_step}).")

    # ------------------------------------------------------------------ optimizer and trajectory
    sgd, sgd_note = None, None
    try:
        sgd = sgd_form(run)
    except ConfigurationError as e:
        sgd_note = str(e)
    lf = LossFunctions(model, loss_fn, query_loss_fn, sample_chunk=sample_chunk, query_chunk=query_chunk)
    held_fixed = [n for n in trainable if n not in set(diff_names)]

    def replay_grad(t: int, w: Params) -> Params:
        i = run.step_position(t)
        fixed = {**buffers, **{n: v for n, v in init.items() if n not in w}}
        return lf.batch_grad(w, fixed, batch_of(run.step_sample_ids(t)), float(run.update_weights[i]))

    traj = ParameterTrajectory(run, trainable, init, sgd, replay_grad, dtype=cdtype, device=dev, source=source,
                               max_memory=int(max_memory), cache_dir=cache_dir, snapshot_names=diff_names)
    plan = traj.plan(lo, hi)
    if plan.source == "replay" and plan.start_kind == "checkpoint":
        ck = run.load_parameters(plan.start, "checkpoint")
        buffers.update({n: ck[n].to(device=dev, dtype=buffers[n].dtype) for n in buffers if n in ck})
    form = _recursion_form(sgd, optimizer_form)

    # ------------------------------------------------------------------ backward pass
    rows_of = C.SampleRows(run, train_ids, dev)
    state = _Pass(run_=run, model=model, lf=lf, tracks=tracks, form=form, diff_names=diff_names, buffers=buffers,
                  init=init, batch_of=batch_of, rows_of=rows_of, Q=Q, dtype=cdtype, device=dev, check=check,
                  qbatch=qbatch, fixed_u=fixed_u)
    scores, present, check_info = state.run(traj, plan, curvature, progress, mode)

    # ------------------------------------------------------------------ results
    notes = _notes(run, model, plan, sgd, sgd_note, form, optimizer_form, curvature, params, held_fixed,
                   query_grads is not None)
    n_diff = sum(init[n].numel() for n in diff_names)
    meta_base = {
        "mode": mode, "params": params if isinstance(params, str) else list(params),
        "parameters": n_diff, "parameter_names": list(diff_names), "trajectory": plan.describe(),
        "replayed_steps": traj.replayed_steps,
        "replay_checks": [(int(s), float(r)) for s, r in traj.replay_checks],
        "recording_check": check_info, "optimizer_form": form.describe(),
        "compute_dtype": str(cdtype).replace("torch.", ""), "seconds": time.perf_counter() - t_start,
    }
    results = []
    for (t1, t2), (a, b) in zip(wins, per_window):
        ka = tracks.index(a)
        values, pres = scores[ka], present[ka]
        meta = dict(meta_base)
        if b is not None:
            values = values - scores[tracks.index(b)]
        wnotes = list(notes) + C.window_notes(run, a.lo, a.start)
        if mode == "accrued":
            meta.update(eval_steps=[t1, t2] if b is not None else [t2],
                        present_means=f"the sample occurs in [{first}, {t2})")
            if first > 0:
                wnotes.append(f"the run's recording starts at step {first}: 'whole-run' removal starts there")
        results.append(InfluenceScores(
            values=values.to(out_dtype).cpu(), train_ids=rows_of.ids, present=pres.cpu(), query_ids=qids,
            method=f"dit_{mode}", window=(t1, t2), eval_step=a.start, curvature=curvature,
            approximations=wnotes, run_id=run.run_id, meta=meta))
    return C.finish(many, results)


@dataclass
class _Pass:
    """The backward pass over steps hi-1 .. lo shared by all tracks (see the module docstring).

    Columns of the adjoint AW (and AB, momentum) are the Q query directions of each active track,
    side by side: [n_active * Q, *shape] per parameter. A track becomes active at its start t_e
    (with u_q(t_e)), and is dropped after its lowest step.
    """

    run_: Run
    model: nn.Module
    lf: LossFunctions
    tracks: list[_Track]
    form: SGDForm
    diff_names: list[str]
    buffers: Params
    init: Params
    batch_of: Callable[[np.ndarray], Any]
    rows_of: C.SampleRows
    Q: int
    dtype: torch.dtype
    device: torch.device
    check: str
    qbatch: Any
    fixed_u: Params | None

    def run(self, traj: ParameterTrajectory, plan: Plan, curvature: str, progress: bool, mode: str
            ) -> tuple[list[Tensor], list[Tensor], dict[str, Any]]:
        run, tracks, Q, form, dev = self.run_, self.tracks, self.Q, self.form, self.device
        scores = [torch.zeros(self.rows_of.n, Q, dtype=self.dtype, device=dev) for _ in tracks]
        present = [torch.zeros(self.rows_of.n, dtype=torch.bool, device=dev) for _ in tracks]
        active: list[int] = []          # track indices, in column order
        AW: Params | None = None         # adjoint of w
        AB: Params | None = None         # adjoint of the momentum buffer (momentum only)
        recorded = set(run.steps.tolist())
        check_info: dict[str, Any] = {}
        hi = plan.hi
        op = self.lf.hvp_and_gv if curvature == "exact" else self.lf.ggn_and_gv
        bar = tqdm(total=plan.hi - plan.lo, desc=f"dit {mode} ({curvature})", unit="step", disable=not progress,
                   leave=False)
        with bar:
            for t, w, first_sgd_step in traj.reverse(plan):
                diff = {n: w[n] for n in self.diff_names}
                fixed = {**self.buffers, **{n: v for n, v in self.init.items() if n not in w},
                         **{n: v for n, v in w.items() if n not in diff}}
                if t < hi:
                    bar.update(1)
                if t < hi and active:
                    if t not in recorded:
                        raise MissingDataError(f"step {t} is not in the recording: its batch is unknown.")
                    i = run.step_position(t)
                    lr, uw = float(run.lrs[i]), float(run.update_weights[i])
                    ids = run.step_sample_ids(t)
                    batch = self.batch_of(ids)
                    if self.check != "off" and "step" not in check_info:
                        check_info |= _check_recording(run, self.model, self.lf, diff, fixed, batch, ids, t,
                                                       self.check)
                    P, GB = _direction(form, AW, AB, lr, first_sgd_step)
                    HP, GP = op(diff, fixed, batch, uw, P)                  # [A*Q, ...], [A*Q, B]
                    rows, keep = self.rows_of.rows(torch.as_tensor(ids, device=dev))
                    r = rows if keep is None else rows[keep]
                    for c, k in enumerate(active):
                        if t < tracks[k].score_end:
                            # removing i adds e_t = -w_t g_t(i) to the step's gradient: df = p . e_t
                            contrib = GP[c * Q:(c + 1) * Q].T * (-uw)       # [B, Q]
                            scores[k].index_add_(0, r, contrib if keep is None else contrib[keep])
                            present[k][r] = True
                    AW = {n: AW[n] + HP[n] + (form.weight_decay * P[n] if form.weight_decay else 0) for n in AW}
                    if form.momentum:
                        AB = ({n: torch.zeros_like(v) for n, v in AW.items()} if first_sgd_step
                              else {n: form.momentum * GB[n] for n in GB})
                    done = [c for c, k in enumerate(active) if tracks[k].lo == t]
                    if done:
                        AW, AB, active = _drop_columns(AW, AB, active, done, Q)
                starting = [k for k, tr in enumerate(tracks) if tr.start == t]
                if starting:
                    u = self._query_grads(diff, fixed, t, check_info)
                    new = {n: u[n].repeat(len(starting), *([1] * (u[n].dim() - 1))) for n in self.diff_names}
                    AW = new if AW is None else {n: torch.cat([AW[n], new[n]]) for n in self.diff_names}
                    if form.momentum:
                        zeros = {n: torch.zeros_like(v) for n, v in new.items()}
                        AB = zeros if AB is None else {n: torch.cat([AB[n], zeros[n]]) for n in self.diff_names}
                    active += starting
        return scores, present, check_info

    def _query_grads(self, diff: Params, fixed: Params, t: int, check_info: dict[str, Any]) -> Params:
        """u_q(t) = grad f_q(w_t): {name: [Q, *shape]}."""
        if self.qbatch is None:
            return self.fixed_u
        u = {n: v.detach() for n, v in self.lf.per_sample_grads(diff, fixed, self.qbatch, query=True).items()}
        if self.check != "off":
            _check_queries(self.run_, self.model, u, t, check_info)
        return u


# ---------------------------------------------------------------------- the recursion
def _recursion_form(sgd: SGDForm | None, optimizer_form: str) -> SGDForm:
    if sgd is None or optimizer_form == "sgd":
        return SGDForm()
    return sgd


def _direction(form: SGDForm, AW: Params, AB: Params | None, lr: float, first: bool
               ) -> tuple[Params, Params | None]:
    """p = df/dd_t (the adjoint of the step's gradient) and gb (the adjoint of b_t)."""
    if not form.momentum:
        return {n: -lr * v for n, v in AW.items()}, None
    mu, tau = form.momentum, 0.0 if first else form.dampening
    if form.nesterov:
        GB = {n: AB[n] - (lr * mu) * AW[n] for n in AW}
        return {n: (1 - tau) * GB[n] - lr * AW[n] for n in AW}, GB
    GB = {n: AB[n] - lr * AW[n] for n in AW}
    return {n: (1 - tau) * GB[n] for n in AW}, GB


def _drop_columns(AW: Params, AB: Params | None, active: list[int], done: list[int], Q: int
                  ) -> tuple[Params | None, Params | None, list[int]]:
    keep_c = [c for c in range(len(active)) if c not in done]
    if not keep_c:
        return None, None, []
    idx = torch.cat([torch.arange(c * Q, (c + 1) * Q) for c in keep_c]).to(next(iter(AW.values())).device)
    AW = {n: v.index_select(0, idx) for n, v in AW.items()}
    AB = None if AB is None else {n: v.index_select(0, idx) for n, v in AB.items()}
    return AW, AB, [active[c] for c in keep_c]


# ---------------------------------------------------------------------- arguments
def _windows(run: Run, window: Any, epochs: Any, windows: Any) -> tuple[list[tuple[int, int]], bool]:
    if (isinstance(window, list) and window and all(isinstance(w, (list, tuple)) for w in window)):
        return C.normalize_windows(run, None, None, window)
    return C.normalize_windows(run, window, epochs, windows)


def _default_loss(model: nn.Module) -> Callable[[nn.Module, Any], Any]:
    if hasattr(model, "training_step"):
        from ..callback import _training_step_loss
        return _training_step_loss
    raise ConfigurationError("exact curvature needs the training loss: pass loss_fn=(model, batch) -> "
                             "scalar loss (the same loss the training step minimized).")


def _layer_param_names(run: Run) -> list[str]:
    return [f"{l.name}.{p}" if l.name else p for l in run.layers for p in l.param_shapes]


def _check_model(run: Run, model: nn.Module) -> None:
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


def _diff_names(run: Run, model: nn.Module, params: str | Sequence[str]) -> list[str]:
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(params, str):
        if params not in PARAMS:
            raise ConfigurationError(f"params must be one of {PARAMS} or a list of parameter names, got {params!r}")
        if params == "model":
            return trainable
        wanted = set(_layer_param_names(run))
        return [n for n in trainable if n in wanted]
    names = list(params)
    bad = [n for n in names if n not in trainable]
    if bad or not names:
        raise ConfigurationError(f"params: {bad or names} are not trainable parameters of the model; "
                                 f"choose among {trainable[:10]}{'...' if len(trainable) > 10 else ''}")
    return [n for n in trainable if n in set(names)]


def _check_dataset(run: Run, dataset: Any) -> None:
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


def _query_ids(run: Run, query_ids: Any, Q: int) -> np.ndarray:
    if query_ids is not None:
        ids = np.asarray(query_ids, np.int64).ravel()
        if len(ids) != Q:
            raise ConfigurationError(f"{len(ids)} query_ids for {Q} queries.")
        return ids
    return C.query_ids_of(run, Q)


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


# ---------------------------------------------------------------------- checks against the recording
def _project_like_run(run: Run, model: nn.Module, grads: Params, n: int) -> tuple[Tensor, Tensor]:
    """Per-sample gradients {name: [n, *shape]} of the recorded layers -> ([n, K] rows projected
    like the run's, [K] bool mask of the columns filled)."""
    from ..capture.rules import rule_for
    from ..projection import LayerProjector, ProjectionSpec

    dtype = torch.float64
    out = torch.zeros(n, run.dim, dtype=dtype)
    mask = torch.zeros(run.dim, dtype=torch.bool)
    modules = dict(model.named_modules())
    for l in run.layers:
        module = modules[l.name]
        rule = rule_for(module)
        # the canonical layout follows the module's parameter order (the manifest's dict is sorted)
        names = [f"{l.name}.{p}" if l.name else p for p in rule.param_shapes(module)]
        if any(nm not in grads for nm in names):
            continue
        flat = torch.cat([grads[nm].reshape(n, -1).to("cpu", dtype) for nm in names], 1)
        spec = ProjectionSpec.from_dict(l.projection)
        if spec.kind == "none":
            proj = flat
        else:
            projector = LayerProjector(l.name, module, rule, spec)
            if spec.kind == "kronecker":
                pl, pr = projector.kronecker_factors(dtype)
                g = torch.zeros(n, spec.left_dim * spec.right_dim, dtype=dtype)
                g[:, rule.canonical_index(module)] = flat
                g = g.view(n, spec.left_dim, spec.right_dim)
                proj = (pl @ g @ pr.T).reshape(n, -1)
            elif spec.out_dim * spec.grad_dim <= 50_000_000:
                proj = flat @ projector.dense_matrix(dtype).T
            else:
                continue
        out[:, l.offset:l.offset + l.dim] = proj
        mask[l.offset:l.offset + l.dim] = True
    return out, mask


def _report(check: str, msg: str) -> None:
    if check == "raise":
        raise ConfigurationError(msg)
    import warnings
    warnings.warn(msg, RuntimeWarning)


def _check_recording(run: Run, model: nn.Module, lf: LossFunctions, diff: Params, fixed: Params, batch: Any,
                     ids: np.ndarray, t: int, check: str, n_max: int = 8) -> dict[str, Any]:
    """Recompute a few per-sample gradients of step t and compare them with the recorded rows."""
    pnames = {n for n, _ in model.named_parameters()}
    allp = {**diff, **{k: v for k, v in fixed.items() if k in pnames}}
    layer_names = [n for n in _layer_param_names(run) if n in allp]
    n = min(n_max, len(ids))
    sub = torch.utils._pytree.tree_map(lambda x: x[:n], batch)
    d = {k: allp[k] for k in layer_names}
    rest = {k: v for k, v in {**fixed, **diff}.items() if k not in d}
    g = lf.per_sample_grads(d, rest, sub)
    ours, mask = _project_like_run(run, model, g, n)
    if not bool(mask.any()):
        return {"step": t, "skipped": "no recorded layer could be projected"}
    rec = next(run.iter_steps((t, t + 1), dtype=torch.float64, skip_nonfinite=False))
    rec_ids = rec.sample_ids.numpy()
    pos = {int(s): j for j, s in enumerate(rec_ids)}
    take = [pos[int(s)] for s in ids[:n]]
    theirs = rec.grads[take][:, mask]
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


def _check_queries(run: Run, model: nn.Module, u: Params, t: int, info: dict[str, Any]) -> None:
    """Warn when u_q(t) differs from the recorded query gradients of the same step (if recorded)."""
    if not run.has_queries or t not in set(run.query_steps.tolist()):
        return
    rec = run.query_gradients(t, dtype=torch.float64)
    Q = next(iter(u.values())).shape[0]
    if rec.shape[0] != Q:
        return
    ours, mask = _project_like_run(run, model, u, Q)
    if not bool(mask.any()):
        return
    err = float((ours[:, mask] - rec[:, mask]).norm() / rec[:, mask].norm().clamp_min(1e-300))
    info["query_relative_error"] = err
    if not err <= CHECK_TOLERANCE:
        import warnings
        warnings.warn(f"the query gradients at step {t} differ from the recorded ones by {err:.3g} (relative); "
                      "fine if queries= are other samples than the recorded queries, otherwise check "
                      "query_loss_fn.", RuntimeWarning)


# ---------------------------------------------------------------------- notes
def _notes(run: Run, model: nn.Module, plan: Plan, sgd: SGDForm | None, sgd_note: str | None, form: SGDForm,
           optimizer_form: str, curvature: str, params: Any, held_fixed: list[str], given_u: bool) -> list[str]:
    notes = []
    if curvature == "ggn":
        notes.append("Gauss-Newton curvature w_t sum_i J_i^T H_out,i J_i in place of the Hessian of L_t")
    if held_fixed:
        notes.append(f"only {'the recorded layers' if params == 'recorded' else 'the chosen'} parameters are "
                     f"attributed; {len(held_fixed)} other trainable parameter tensor(s) are held fixed in the "
                     "counterfactual (the recursion uses that block of the Hessian)")
    if plan.held:
        notes.append(f"{len(plan.held)} parameter tensor(s) outside the snapshots ({plan.held[:3]}...) are held at "
                     "the given model's values at every step, not their values during training")
    name = (run.optimizer or {}).get("name", "unknown")
    if sgd is None:
        notes.append(f"optimizer {name} is not replayable SGD: the plain SGD form with the recorded learning "
                     "rate is used on the recorded parameters" + (f" ({sgd_note})" if sgd_note else ""))
    elif optimizer_form == "sgd" and not sgd.plain:
        notes.append(f"the recorded {sgd.describe()} is linearized in the plain SGD form (optimizer_form='sgd')")
    if run.manifest.get("gradient_clipping"):
        notes.append(f"gradient clipping ({run.manifest['gradient_clipping']}) is ignored")
    if any(isinstance(m, (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)) for m in model.modules()):
        notes.append("the model is evaluated in eval mode (no dropout, batch norm on fixed statistics), unlike "
                     "training")
    if given_u:
        notes.append("query gradients supplied by the caller stand in for u_q(t_e)")
    return notes
