"""Window-removal and accrued influence, after the Dynamic Influence Tracker (README, "Which
samples mattered, and when").

Removal, R(i, q; [t1, t2), t_e): one backward pass from the evaluation step,
    U <- [u_q(t_e)]  (all queries at once: U is [K, Q])
    for t = t_e - 1 down to t1:
        if t < t2: score[i] += (eta_t w_t) g_t(i) . U   for every i in B_t
        U <- U - eta_t H_t U                             (H_t from the curvature)
Accrued, A(i, q; [t1, t2)) = R(i, q; [first, t2), t2) - R(i, q; [first, t1), t1).

Many windows share one backward pass: `tasks.TaskPlan` turns them into removal tasks (a scored
range and an evaluation step); the query directions of all tasks live side by side in one
[K, tasks * Q] matrix and every step updates the columns of the tasks it lies in with one GEMM.

Curvatures are looked up by name in `curvature.CURVATURES`. The recorded-space ones ('none',
'fisher') run here on the recording alone; the full-space ones ('exact', 'ggn') need the model,
the loss, the batches and the parameters along the window, and run in `aggregate.fullspace`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import windows as W
from ..errors import ConfigurationError
from ..storage.reader import Run, StepBatch
from .curvature import CurvatureOperator, FullSpaceCurvature, make_curvature
from .distributed import Split, first_process
from .notes import query_notes, run_notes, score_notes, skipped_steps_notes, warn_nonfinite, window_notes
from .queries import check_query_grads, query_ids_of, require_queries, require_query_step
from .results import InfluenceScores
from .rows import (DEFAULT_CHUNK_ROWS, SampleRows, SumBlock, iter_row_blocks, progress_bar, reduce_rows, resolve_device,
                   step_segments)
from .scores import ScoreAccumulator
from .stepsize import StepSizes, step_size_form
from .tasks import MODES, Task, TaskPlan


def dit(run: Run, window: Any = None, *, epochs: Any = None, windows: Any = None, mode: str = "removal",
        curvature: str | CurvatureOperator | FullSpaceCurvature = "fisher", eval_step: int | str | None = None,
        query_grads: Any = None, query_ids: Any = None, projection_fingerprint: str | None = None,
        train_ids: Any = None, chunk_rows: int = DEFAULT_CHUNK_ROWS, dtype: torch.dtype | None = None,
        device: Any = None, progress: bool = True, group: Any = None, step_size: str = "auto",
        **kwargs: Any) -> InfluenceScores | list[InfluenceScores]:
    """Dynamic-influence scores [n_train, n_query] over a window of steps.

    mode='removal': R(i, q; [t1, t2), t_e), the first-order change of f_q at step t_e when sample i
        is dropped from every step of the window. eval_step: t_e, default the window end t2; an int
        >= t2 or 'final' (T, the end of training). u_q(t_e) must be recorded there, unless
        query_grads ([Q, K], the run's projection) supplies it.
    mode='accrued': A(i, q; [t1, t2)) = R([first, t2), t2) - R([first, t1), t1); needs query
        gradients recorded at t1 (unless t1 is the first step) and t2.
    curvature: 'none', 'fisher' (empirical Fisher from the recording), 'exact' / 'ggn' (full
        parameter space: extra keyword arguments such as model=, loss_fn=, dataset=, queries= go to
        `aggregate.fullspace.exact_dit`), or a curvature instance.
    dtype: of the computation and the scores; default float32 for 'none'/'fisher', the model's
        own dtype for 'exact'/'ggn'.
    group: a torch.distributed process group to split the work over: by rows without curvature, by
        queries with it (aggregate/distributed.py).
    step_size: for 'none'/'fisher': 'auto', 'adam' (the per-layer step sizes Adam applied, recorded
        in training on a run trained with Adam/AdamW) or 'sgd' (the learning rate); 'auto' is the
        Adam form for 'none' and the SGD form for 'fisher' (aggregate/stepsize.py). 'exact'/'ggn'
        follow the optimizer itself.
    Positive score: removing i raises the query loss (i helped). Windows as in `tracin`.
    """
    if mode not in MODES:
        raise ConfigurationError(f"mode must be one of {MODES}, got {mode!r}")
    wins, many = W.normalize(run.table, window, epochs, windows)
    op = make_curvature(curvature)
    plan = TaskPlan.build(mode, wins, first_step=run.first_step, final_step=run.final_step, eval_step=eval_step)
    if mode == "accrued" and query_grads is not None:
        raise ConfigurationError("accrued influence needs u_q at t1 and t2, taken from the run (or, with exact "
                                 "curvature, computed from queries=); query_grads= applies to mode='removal' only.")
    common = dict(query_grads=query_grads, query_ids=query_ids, train_ids=train_ids, dtype=dtype, device=device,
                  progress=progress, split=Split.of(group))
    if isinstance(op, FullSpaceCurvature):
        from .fullspace import exact_dit

        if step_size not in (None, "auto"):
            raise ConfigurationError(f"step_size={step_size!r} applies to curvature 'none'/'fisher'; the full-space "
                                     "curvatures linearize the run's own optimizer (SGD or Adam) instead.")
        if projection_fingerprint is not None:
            raise ConfigurationError("full-space curvature works in full parameter space; projection_fingerprint "
                                     "does not apply (query_grads= must be full-space gradients [Q, P]).")
        results = exact_dit(run, plan, op, **common, **kwargs)
    else:
        if kwargs:
            raise ConfigurationError(f"dit got unexpected argument(s) {sorted(kwargs)}; they are only for "
                                     "curvature='exact'/'ggn' (the full-space curvatures).")
        results = _recorded_space(run, plan, op, projection_fingerprint=projection_fingerprint,
                                  chunk_rows=chunk_rows, sizes=step_size_form(run, step_size, curvature=op.propagates),
                                  **common)
    return results if many else results[0]


def _recorded_space(run: Run, plan: TaskPlan, op: CurvatureOperator, *, query_grads: Any, query_ids: Any,
                    projection_fingerprint: str | None, train_ids: Any, chunk_rows: int,
                    dtype: torch.dtype | None, device: Any, progress: bool, split: Split | None,
                    sizes: StepSizes) -> list[InfluenceScores]:
    dtype = dtype or torch.float32
    dev = resolve_device(device)
    if query_grads is not None:
        fixed = check_query_grads(run, query_grads, projection_fingerprint).to(device=dev, dtype=dtype)
        u0 = {e: fixed for e in plan.eval_steps}
    else:
        require_queries(run, f"dit(mode={plan.mode!r})")
        for e in plan.eval_steps:
            require_query_step(run, e, f"dit(mode={plan.mode!r})", suggest_later=plan.mode == "removal")
        u0 = {e: run.query_gradients(e, dtype=dtype, device=dev) for e in plan.eval_steps}
    Q = next(iter(u0.values())).shape[0]
    # the run's query ids name the run's own query gradients only
    qids = query_ids_of(run, Q, query_ids if query_ids is not None or query_grads is None else np.arange(Q))
    rows_of = SampleRows(run, train_ids, dev)
    if not op.propagates:  # sums over rows: split the rows
        acc = plan.accumulator(rows_of.n, Q, dtype=dtype, device=dev)
        _fixed_query_pass(run, plan, u0, sizes, rows_of, acc, chunk_rows, dtype, dev, progress, split, op.name)
        if split is not None:
            acc.sync(split.group)
    else:  # a recursion through every step: split the queries
        cols = slice(0, Q) if split is None else split.columns(Q)
        acc = plan.accumulator(rows_of.n, cols.stop - cols.start, dtype=dtype, device=dev)
        _propagating_pass(run, plan, {e: u[cols] for e, u in u0.items()}, op, sizes, rows_of, acc, chunk_rows, dtype,
                          dev, progress and first_process(split))
        if split is not None:
            acc.gather_columns(split, Q)

    base = run_notes(run, sizes) + ([op.note] if op.note else [])
    results, nonfinite = [], []
    for w, (t1, t2) in enumerate(plan.windows):
        values, present = plan.result(w, acc)
        te = plan.eval_step_of(w)
        notes = list(base)
        if query_grads is not None:
            notes.append(f"query gradients supplied by the caller stand in for u_q({te})")
            bad_inputs = query_notes(run, (), qids, given=fixed)
        else:
            bad_inputs = query_notes(run, plan.meta(w).get("eval_steps", [te]))
        bad_outputs = score_notes(values, qids)
        notes += window_notes(run, *plan.scored_range(w)) + plan.notes(w) + bad_inputs + bad_outputs
        nonfinite += [n for n in skipped_steps_notes(run, *plan.scored_range(w)) + bad_inputs + bad_outputs
                      if n not in nonfinite]
        results.append(InfluenceScores(
            values=values, train_ids=rows_of.ids, present=present, query_ids=qids, method=f"dit_{plan.mode}",
            window=(t1, t2), eval_step=te, curvature=op.name, approximations=notes, run_id=run.run_id,
            meta={**plan.meta(w), "step_size": sizes.form}))
    warn_nonfinite(f"dit(mode={plan.mode!r})", nonfinite, stacklevel=4)
    return results


def _fixed_query_pass(run: Run, plan: TaskPlan, u0: dict[int, torch.Tensor], sizes: StepSizes,
                      rows_of: SampleRows, acc: ScoreAccumulator, chunk_rows: int, dtype: torch.dtype,
                      dev: torch.device, progress: bool, split: Split | None, name: str) -> None:
    """H_t = 0: u stays u_q(t_e), so each task is a sum over its own rows. Per block and evaluation
    step, one GEMM over the rows of the tasks evaluated there (blocks in parallel, scattered in
    order: rows.reduce_row_blocks)."""
    by_eval: dict[int, list[int]] = {}
    for j, t in enumerate(plan.tasks):
        by_eval.setdefault(t.eval_step, []).append(j)
    spans = W.merge([(t.start, t.end) for t in plan.tasks])

    def compute(blk: SumBlock) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[list[int], slice, torch.Tensor]]]:
        st = blk.steps
        rows, keep = rows_of.rows(blk.sample_ids)
        coef = sizes.row_coef(st, blk.rows.like)
        parts = []
        for e, js in by_eval.items():
            cover = W.rows_slice(st, (min(plan.tasks[j].start for j in js), max(plan.tasks[j].end for j in js)))
            if cover is None:
                continue
            contrib = sizes.products(blk.rows, st, cover.start, cover.stop, u0[e])  # w_t g . (A_t u) in the Adam form
            parts.append((js, cover, contrib.mul_(coef[cover, None])))
        return rows, keep, parts

    def commit(blk: SumBlock, out: Any) -> None:
        rows, keep, parts = out
        for js, cover, contrib in parts:
            for j in js:
                t = plan.tasks[j]
                sl = W.rows_slice(blk.steps[cover], (t.start, t.end))
                if sl is not None:
                    acc.update(j, rows[cover][sl], None if keep is None else keep[cover][sl], contrib[sl])

    reduce_rows(run, spans, compute, commit, desc=f"dit ({name})", progress=progress, split=split,
                chunk_rows=chunk_rows, dtype=dtype, device=dev)


def _apply(op: CurvatureOperator, batch: StepBatch, AU: torch.Tensor, GU: torch.Tensor) -> torch.Tensor:
    """H_t (A_t U) for the Adam form, which needs the operator's apply(), not only its propagate()."""
    try:
        return op.apply(batch, AU, GU=GU)
    except NotImplementedError:
        raise ConfigurationError(
            f"curvature {op.name!r} defines propagate() only; the Adam form (step_size='adam') needs its "
            "apply(batch, U) = H_t U. Define apply(), or pass step_size='sgd'.") from None


def _propagating_pass(run: Run, plan: TaskPlan, u0: dict[int, torch.Tensor], op: CurvatureOperator,
                      sizes: StepSizes, rows_of: SampleRows, acc: ScoreAccumulator, chunk_rows: int,
                      dtype: torch.dtype, dev: torch.device, progress: bool) -> None:
    """The backward recursion over [lo, hi) with the query directions of every task side by side.

    Per step only what the recursion needs: GU = G_t U (written into a block buffer) and the
    curvature's update of U <- U - eta_t H_t U. Scores are scattered once per block: GU scaled by
    each row's eta_t w_t, per task over the rows of the steps it scores. In the Adam form
    (stepsize.py) GU = G_t A_t U, the update U <- U - H_t A_t U and the row factor w_t."""
    tasks: list[Task] = plan.tasks
    Q = next(iter(u0.values())).shape[0]
    nt = len(tasks)
    starts = np.array([t.start for t in tasks])
    ends = np.array([t.end for t in tasks])
    evals = np.array([t.eval_step for t in tasks])
    U = torch.cat([u0[t.eval_step].T for t in tasks], dim=1).contiguous()  # [K, nt * Q]
    lo, hi = plan.span
    op.prepare(run, (lo, hi))
    layouts: dict[bytes, tuple[torch.Tensor | None, dict[int, int]]] = {}

    def layout(active: np.ndarray) -> tuple[torch.Tensor | None, dict[int, int]]:
        """(the columns of U of the active tasks, or None for all; each one's offset in them)."""
        key = active.tobytes()
        if key not in layouts:
            js = np.flatnonzero(active)
            cols = None if len(js) == nt else torch.from_numpy(
                np.concatenate([np.arange(j * Q, (j + 1) * Q) for j in js])).to(dev)
            layouts[key] = (cols, {int(j): k * Q for k, j in enumerate(js)})
        return layouts[key]

    GU_block: torch.Tensor | None = None  # [rows, nt * Q]: G_t U of each row's step, the tasks side by side
    bar = progress_bar(run.table.rows_between(lo, hi), f"dit ({op.name})", progress)
    with bar:
        for blk in iter_row_blocks(run, (lo, hi), reverse=True, chunk_rows=chunk_rows, dtype=dtype, device=dev):
            st = blk.steps
            R = len(st)
            if GU_block is None or GU_block.shape[0] < R:
                GU_block = torch.empty(max(R, chunk_rows), nt * Q, dtype=dtype, device=dev)
            segments = step_segments(st)
            seg_steps = st[[a for a, _ in segments]]
            pos = np.searchsorted(run.steps, seg_steps)
            lrs, uws = run.lrs[pos], run.update_weights[pos]
            active = (starts <= seg_steps[:, None]) & (seg_steps[:, None] < evals)  # [steps, tasks]
            scored = active & (seg_steps[:, None] < ends)
            for s, (a, b) in enumerate(segments):
                if not active[s].any():
                    continue
                cols, offset = layout(active[s])
                lr, uw = float(lrs[s]), float(uws[s])
                G = blk.grads[a:b]
                batch = StepBatch(step=int(seg_steps[s]), epoch=int(run.epochs[pos[s]]), lr=lr, update_weight=uw,
                                  batch_size=int(run.batch_sizes[pos[s]]), sample_ids=blk.sample_ids[a:b], grads=G)
                scale = sizes.column_scale(batch.step, U)
                Ua = U if cols is None else U.index_select(1, cols)  # a copy of U's active columns
                AU = Ua if scale is None else Ua * scale[:, None]
                if cols is None:
                    GU = torch.mm(G, AU, out=GU_block[a:b])
                else:
                    GU = G @ AU  # [B, active * Q]
                    for j in np.flatnonzero(scored[s]):
                        GU_block[a:b, j * Q:(j + 1) * Q] = GU[:, offset[int(j)]:offset[int(j)] + Q]
                if scale is None:
                    op.propagate(batch, Ua, lr, GU=GU)
                else:
                    Ua.sub_(_apply(op, batch, AU, GU))
                if cols is not None:
                    U.index_copy_(1, cols, Ua)
            # the scores: (eta_t w_t) g_t(i) . U_t, per task over the rows of the steps it scores
            rows, keep = rows_of.rows(blk.sample_ids)
            GU_rows = GU_block[:R].mul_(sizes.row_coef(st, GU_block)[:, None])
            counts = np.array([b - a for a, b in segments])
            for j in range(nt):
                if scored[:, j].all():
                    acc.update(j, rows, keep, GU_rows[:, j * Q:(j + 1) * Q])
                elif scored[:, j].any():
                    m = torch.from_numpy(np.repeat(scored[:, j], counts)).to(dev)
                    acc.update(j, rows[m], None if keep is None else keep[m], GU_rows[m, j * Q:(j + 1) * Q])
            bar.update(R)
