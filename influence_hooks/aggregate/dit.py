"""Window-removal and accrued influence (REFERENCE.md estimators 2 and 3, Dynamic Influence Tracker).

Removal, R(i, q; [t1, t2), t_e): one backward pass from the evaluation step,
    U <- [u_q(t_e)]  (all queries at once: U is [K, Q])
    for t = t_e - 1 down to t1:
        if t < t2: score[i] += (eta_t w_t) g_t(i) . U   for every i in B_t
        U <- U - eta_t H_t U                             (H_t from a CurvatureOperator)
Accrued, A(i, q; [t1, t2)) = R(i, q; [first, t2), t2) - R(i, q; [first, t1), t1).

Many windows share one backward pass: each needs one or two "tasks" (a scored range and an
evaluation step); the query directions of all tasks live side by side in one [K, tasks * Q] matrix
and every step updates the columns of the tasks it lies in with one GEMM.

Exact curvature ('exact', 'ggn') needs the model, the loss, the batches and parameter snapshots,
not just the recording: `dit` hands it to `influence_hooks.aggregate.exact.exact_dit(run, window,
mode, curvature, eval_step, **kwargs)` when that module exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigurationError, MissingDataError, WindowError
from ..storage.reader import Run, StepBatch
from . import _common as C
from .curvature import CurvatureOperator, make_curvature
from .results import InfluenceScores

MODES = ("removal", "accrued")
EXACT_CURVATURES = ("exact", "ggn")


@dataclass(frozen=True)
class _Task:
    """Score steps [start, score_end) with the query carried back from eval_step (>= score_end)."""

    start: int
    score_end: int
    eval_step: int


def dit(run: Run, window: Any = None, *, epochs: Any = None, windows: Any = None, mode: str = "removal",
        curvature: str | CurvatureOperator = "fisher", eval_step: int | str | None = None,
        query_grads: Any = None, query_ids: Any = None, projection_fingerprint: str | None = None,
        train_ids: Any = None, chunk_rows: int = C.DEFAULT_CHUNK_ROWS, dtype: torch.dtype | None = None,
        device: Any = None, progress: bool = True, **kwargs: Any) -> InfluenceScores | list[InfluenceScores]:
    """Dynamic-influence scores [n_train, n_query] over a window of steps.

    mode='removal': R(i, q; [t1, t2), t_e), the first-order change of f_q at step t_e when sample i
        is dropped from every step of the window. eval_step: t_e, default the window end t2; an int
        >= t2 or 'final' (T, the end of training). u_q(t_e) must be recorded there, unless
        query_grads ([Q, K], the run's projection) supplies it.
    mode='accrued': A(i, q; [t1, t2)) = R([first, t2), t2) - R([first, t1), t1); needs query
        gradients recorded at t1 (unless t1 is the first step) and t2.
    curvature: 'none', 'fisher' (empirical Fisher from the recording), a CurvatureOperator, or
        'exact' / 'ggn' (dispatched to influence_hooks.aggregate.exact.exact_dit; extra keyword
        arguments such as model=, loss_fn=, dataset= go there).
    dtype: of the computation and the scores; default float32 for 'none'/'fisher', the model's
        own dtype for 'exact'/'ggn'.
    Positive score: removing i raises the query loss (i helped). Windows as in `tracin`.
    """
    if mode not in MODES:
        raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}")
    wins, many = C.normalize_windows(run, window, epochs, windows)
    if isinstance(curvature, str) and curvature in EXACT_CURVATURES:
        return _dispatch_exact(run, wins if many else wins[0], mode, curvature, eval_step,
                               query_grads=query_grads, query_ids=query_ids,
                               projection_fingerprint=projection_fingerprint, train_ids=train_ids,
                               chunk_rows=chunk_rows, dtype=dtype, device=device, progress=progress, **kwargs)
    if kwargs:
        raise ConfigurationError(
            f"dit got unexpected argument(s) {sorted(kwargs)}; they are only for curvature='exact'/'ggn'.")
    dtype = dtype or torch.float32
    op = make_curvature(curvature)
    dev = C.resolve_device(device)

    # ------------------------------------------------------------------ tasks and their query gradients
    if mode == "accrued":
        if eval_step is not None:
            raise ConfigurationError("accrued influence is evaluated at the window's own ends (t1 and t2); "
                                     "eval_step applies to mode='removal' only.")
        if query_grads is not None:
            raise ConfigurationError("accrued influence needs u_q at t1 and t2, taken from the run; "
                                     "query_grads= applies to mode='removal' only.")
    first = run.first_step
    per_window: list[tuple[_Task, _Task | None]] = []
    for t1, t2 in wins:
        if mode == "removal":
            per_window.append((_Task(t1, t2, _resolve_eval_step(run, eval_step, t2)), None))
        else:
            per_window.append((_Task(first, t2, t2), _Task(first, t1, t1) if t1 > first else None))
    tasks = sorted({t for pair in per_window for t in pair if t is not None},
                   key=lambda t: (t.eval_step, t.start, t.score_end))

    if query_grads is not None:
        fixed = C.check_query_grads(run, query_grads, projection_fingerprint).to(device=dev, dtype=dtype)
        qids = (np.arange(fixed.shape[0], dtype=np.int64) if query_ids is None
                else np.asarray(query_ids, np.int64))
        if len(qids) != fixed.shape[0]:
            raise ConfigurationError(f"{len(qids)} query_ids for {fixed.shape[0]} query gradients.")
        u0 = {t.eval_step: fixed for t in tasks}
    else:
        C.require_queries(run, f"dit(mode={mode!r})")
        for t in tasks:
            _require_query_step(run, t.eval_step, mode)
        u0 = {t.eval_step: run.query_gradients(t.eval_step, dtype=dtype, device=dev) for t in tasks}
        qids = C.query_ids_of(run, next(iter(u0.values())).shape[0])

    scores, present = _backward_pass(run, tasks, u0, op, train_ids, chunk_rows, dtype, dev, progress)

    # ------------------------------------------------------------------ results
    base = run.approximations() + ([op.note] if op.note else [])
    ids = C.SampleRows(run, train_ids, torch.device("cpu")).ids
    results = []
    for (t1, t2), (a, b) in zip(wins, per_window):
        ja = tasks.index(a)
        notes = list(base)
        if query_grads is not None:
            notes.append(f"query gradients supplied by the caller stand in for u_q({a.eval_step})")
        if mode == "removal":
            values, pres, te = scores[ja], present[ja], a.eval_step
            notes += C.window_notes(run, t1, te)
            meta = {"mode": mode}
        else:
            values, pres, te = scores[ja], present[ja], t2
            if b is not None:
                values = values - scores[tasks.index(b)]
            notes += C.window_notes(run, first, t2)
            if first > 0:
                notes.append(f"the run's recording starts at step {first}: 'whole-run' removal starts there")
            meta = {"mode": mode, "eval_steps": [t1, t2] if b is not None else [t2],
                    "present_means": f"the sample occurs in [{first}, {t2})"}
        results.append(InfluenceScores(
            values=values, train_ids=ids, present=pres, query_ids=qids, method=f"dit_{mode}",
            window=(t1, t2), eval_step=te, curvature=op.name, approximations=notes, run_id=run.run_id,
            meta=meta))
    return C.finish(many, results)


def _resolve_eval_step(run: Run, eval_step: int | str | None, t2: int) -> int:
    if eval_step is None:
        return t2
    if isinstance(eval_step, str):
        if eval_step != "final":
            raise ConfigurationError(f"eval_step is a step number or 'final', got {eval_step!r}")
        te = run.final_step
    else:
        te = int(eval_step)
    if te < t2:
        raise WindowError(f"eval_step {te} lies before the window end {t2}: the query must be evaluated "
                          "at or after the last step of the window.")
    return te


def _require_query_step(run: Run, step: int, mode: str) -> None:
    if step in set(run.query_steps.tolist()):
        return
    later = run.query_steps[run.query_steps >= step]
    hint = (f"the nearest later one is {int(later[0])} (pass eval_step={int(later[0])})"
            if len(later) and mode == "removal" else "choose a window whose ends are recorded query steps")
    raise MissingDataError(
        f"dit(mode={mode!r}) needs the query gradients u_q({step}), but queries were recorded only at "
        f"steps {C.short_list(run.query_steps, 20)}; {hint}, or pass query_grads=.")


def _backward_pass(run: Run, tasks: list[_Task], u0: dict[int, torch.Tensor], op: CurvatureOperator,
                   train_ids: Any, chunk_rows: int, dtype: torch.dtype, dev: torch.device, progress: bool
                   ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Scores [n_train, Q] and present masks [n_train] of every task, from one backward pass."""
    rows_of = C.SampleRows(run, train_ids, dev)
    Q = next(iter(u0.values())).shape[0]
    nt = len(tasks)
    starts = np.array([t.start for t in tasks])
    ends = np.array([t.score_end for t in tasks])
    evals = np.array([t.eval_step for t in tasks])
    U = torch.cat([u0[t.eval_step].T for t in tasks], dim=1).contiguous()  # [K, nt * Q]
    scores = [torch.zeros(rows_of.n, Q, dtype=dtype, device=dev) for _ in tasks]
    present = [torch.zeros(rows_of.n, dtype=torch.bool, device=dev) for _ in tasks]
    lo = int(starts.min())
    # without curvature nothing after the scored ranges matters
    hi = int(evals.max()) if op.propagates else int(ends.max())
    op.prepare(run, (lo, hi))
    pos = {int(s): i for i, s in enumerate(run.steps)}
    layouts: dict[bytes, tuple[torch.Tensor | None, dict[int, int]]] = {}

    def layout(active: np.ndarray) -> tuple[torch.Tensor | None, dict[int, int]]:
        key = active.tobytes()
        if key not in layouts:
            js = np.flatnonzero(active)
            cols = None if len(js) == nt else torch.from_numpy(
                np.concatenate([np.arange(j * Q, (j + 1) * Q) for j in js])).to(dev)
            layouts[key] = (cols, {int(j): k * Q for k, j in enumerate(js)})
        return layouts[key]

    def add_scores(j: int, rows: torch.Tensor, keep: torch.Tensor | None, src: torch.Tensor, coef) -> None:
        if keep is not None:
            rows, src = rows[keep], src[keep]
        scores[j].index_add_(0, rows, src, alpha=coef)
        present[j][rows] = True

    bar = C.progress_bar(C.rows_between(run, lo, hi), f"dit ({op.name})", progress)
    with bar:
        for blk in C.iter_row_blocks(run, (lo, hi), reverse=True, chunk_rows=chunk_rows, dtype=dtype, device=dev):
            st = blk.steps
            rows, keep = rows_of.rows(blk.sample_ids)
            if not op.propagates:
                # U never changes: one GEMM for the whole block, then each task takes its rows
                contrib = (blk.grads @ U).mul_(blk.coef[:, None])
                for j, t in enumerate(tasks):
                    sl = C.row_range(st, t.start, t.score_end)
                    if sl is not None:
                        add_scores(j, rows[sl], None if keep is None else keep[sl],
                                   contrib[sl, j * Q:(j + 1) * Q], 1.0)
                bar.update(len(st))
                continue
            for a, b in C.step_segments(st):
                t = int(st[a])
                active = (starts <= t) & (t < evals)
                if not active.any():
                    continue
                cols, offset = layout(active)
                i = pos[t]
                lr, uw = float(run.lrs[i]), float(run.update_weights[i])
                G = blk.grads[a:b]
                Ua = U if cols is None else U.index_select(1, cols)
                GU = G @ Ua  # [B, active * Q]
                k = None if keep is None else keep[a:b]
                for j in np.flatnonzero(active & (t < ends)):
                    o = offset[int(j)]
                    add_scores(int(j), rows[a:b], k, GU[:, o:o + Q], lr * uw)
                batch = StepBatch(step=t, epoch=int(run.epochs[i]), lr=lr, update_weight=uw,
                                  batch_size=int(run.batch_sizes[i]), sample_ids=blk.sample_ids[a:b], grads=G)
                op.propagate(batch, Ua, lr, GU=GU)  # Ua is U itself, or a copy of its active columns
                if cols is not None:
                    U.index_copy_(1, cols, Ua)
            bar.update(len(st))
    return ([s.cpu() for s in scores], [p.cpu() for p in present])


def _dispatch_exact(run: Run, window: Any, mode: str, curvature: str, eval_step: Any, **kwargs: Any) -> Any:
    """Hand exact / Gauss-Newton curvature to influence_hooks.aggregate.exact.exact_dit."""
    if kwargs.get("model") is None or kwargs.get("dataset") is None:
        raise ConfigurationError(
            f"curvature={curvature!r} needs Hessian-vector products of each step's batch loss at the "
            "recorded parameters, so besides the run it needs model= (the trained model or "
            "LightningModule), dataset= (the training samples, indexed by the recorded sample ids), "
            "queries= (and loss_fn= unless the model is a LightningModule), and parameter snapshots "
            "or checkpoints along the window (snapshot_windows / checkpoint_every_n_steps when "
            "recording). Without them use curvature='fisher' or 'none'.")
    from .exact import exact_dit

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return exact_dit(run, window, mode, curvature, eval_step, **kwargs)
