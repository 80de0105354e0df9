"""TracIn and self-influence over windows of steps (Pruthi et al. 2020; README, "Which samples
mattered, and when").

    TI(i, q; W) = sum_{t in W, i in B_t} (eta_t w_t) g_t(i) . u_q(t)
    SI(i; W)    = sum_{t in W, i in B_t} (eta_t w_t) |g_t(i)|^2

Both are sums over rows, so one forward pass over the shards serves any number of windows: per
block of rows, contributions are one GEMM (G @ U^T scaled by coef) scattered into result rows by
sample id. Blocks are computed in parallel and scattered in order (rows.reduce_row_blocks).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import windows as W
from ..errors import ConfigurationError, MissingDataError, short_list
from ..storage.reader import Run
from .distributed import Split
from .notes import query_notes, run_notes, score_notes, skipped_steps_notes, warn_nonfinite, window_notes
from .queries import QueryCache, query_ids_of, require_queries
from .results import InfluenceScores
from .rows import DEFAULT_CHUNK_ROWS, SampleRows, SumBlock, reduce_rows, resolve_device, step_segments
from .scores import ScoreAccumulator
from .stepsize import step_size_form


def tracin(run: Run, window: Any = None, *, epochs: Any = None, windows: Any = None,
           train_ids: Any = None, before_first_query: str = "error",
           chunk_rows: int = DEFAULT_CHUNK_ROWS, dtype: torch.dtype = torch.float32,
           device: Any = None, progress: bool = True, group: Any = None,
           step_size: str = "auto") -> InfluenceScores | list[InfluenceScores]:
    """TracIn scores [n_train, n_query] of the run's recorded queries over a window of steps.

    Each step t uses u_q(t) recorded at w_t; where queries were recorded only every n steps, the
    latest earlier recorded step stands in (TracInCP) and the result notes it. Steps before the
    first recorded query step raise MissingDataError, or with before_first_query='use_first' use
    the first recorded query step (noted).

    window=(t1, t2) | epochs=(e1, e2) | windows=[...] | epochs=[...]: see `influence_hooks.windows.normalize`;
    a list of windows is computed in one pass and returns a list of results.
    group: a torch.distributed process group to split the rows over (aggregate/distributed.py).
    step_size: 'auto' (on a run trained with Adam/AdamW, the step sizes Adam applied per layer,
    recorded in training; else the learning rate), 'adam' or 'sgd': see aggregate/stepsize.py.
    Positive score: removing i would raise the query loss (i helped).
    """
    if before_first_query not in ("error", "use_first"):
        raise ConfigurationError(f"before_first_query must be 'error' or 'use_first', got {before_first_query!r}")
    wins, many = W.normalize(run.table, window, epochs, windows)
    require_queries(run, "tracin")
    dev = resolve_device(device)
    rows_of = SampleRows(run, train_ids, dev)
    sizes = step_size_form(run, step_size)
    qsteps = run.query_steps
    spans = W.merge(wins)

    steps = np.concatenate([run.steps_in(s) for s in spans])
    qpos = np.searchsorted(qsteps, steps, side="right") - 1
    early = steps[qpos < 0]
    if len(early) and before_first_query == "error":
        raise MissingDataError(
            f"tracin: steps {short_list(early)} come before the first recorded query step "
            f"{int(qsteps[0])}, so no query gradient at or before them exists. Start the window at "
            f"{int(qsteps[0])} or later, or pass before_first_query='use_first'.")

    def qstep_of(st: np.ndarray) -> np.ndarray:
        return qsteps[np.maximum(np.searchsorted(qsteps, st, side="right") - 1, 0)]

    q0 = run.query_gradients(int(qsteps[0]))
    acc = ScoreAccumulator(len(wins), rows_of.n, q0.shape[0], dtype=dtype, device=dev)
    query = QueryCache(run, dtype, dev)

    def compute(blk: SumBlock) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, int, torch.Tensor]]]:
        rows, keep = rows_of.rows(blk.sample_ids)
        coef = sizes.row_coef(blk.steps, blk.rows.like)
        qs = qstep_of(blk.steps)
        # one product per query step (per step in the Adam form: each step its own column scale)
        return rows, keep, [(a, b, sizes.products(blk.rows, blk.steps, a, b, query(int(qs[a]))).mul_(coef[a:b, None]))
                            for a, b in step_segments(qs)]

    def commit(blk: SumBlock, out: Any) -> None:
        rows, keep, parts = out
        for a, b, contrib in parts:
            acc.update_windows(wins, blk.steps[a:b], rows[a:b], None if keep is None else keep[a:b], contrib)

    split = Split.of(group)
    reduce_rows(run, spans, compute, commit, desc="tracin", progress=progress, split=split, chunk_rows=chunk_rows,
                dtype=dtype, device=dev)
    if split is not None:
        acc.sync(split.group)

    base = run_notes(run, sizes)
    results, nonfinite = [], []
    for w, (t1, t2) in enumerate(wins):
        notes = list(base)
        ws = run.steps_in((t1, t2))
        used = qstep_of(ws)
        values, present = acc.compute(w)
        bad = query_notes(run, sorted(set(used.tolist()))) + score_notes(values, query_ids_of(run, q0.shape[0]))
        nonfinite += [n for n in skipped_steps_notes(run, t1, t2) + bad if n not in nonfinite]
        n_cp = int(((used != ws) & (ws >= qsteps[0])).sum())  # steps before the first query: below
        if n_cp:
            notes.append(f"TracInCP: {n_cp} of {len(ws)} steps use the query gradients of the latest "
                         "earlier recorded query step instead of their own")
        n_early = int((ws < qsteps[0]).sum())
        if n_early:
            notes.append(f"{n_early} step(s) before the first recorded query step {int(qsteps[0])} use "
                         "its query gradients")
        notes += window_notes(run, t1, t2) + bad
        results.append(InfluenceScores(
            values=values, train_ids=rows_of.ids, present=present,
            query_ids=query_ids_of(run, q0.shape[0]),
            method="tracin", window=(t1, t2), eval_step=None, curvature=None,
            approximations=notes, run_id=run.run_id,
            meta={"tracincp": bool((used != ws).any()), "query_steps_used": sorted(set(used.tolist())),
                  "steps": int(len(ws)), "step_size": sizes.form}))
    warn_nonfinite("tracin", nonfinite)
    return results if many else results[0]


def self_influence(run: Run, window: Any = None, *, epochs: Any = None, windows: Any = None,
                   train_ids: Any = None, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                   dtype: torch.dtype = torch.float32, device: Any = None,
                   progress: bool = True, group: Any = None,
                   step_size: str = "auto") -> InfluenceScores | list[InfluenceScores]:
    """TracIn self-influence SI(i; W) = sum_t (eta_t w_t) |g_t(i)|^2 per sample: [n_train].

    Large values flag samples the model fits with large gradients, e.g. mislabelled ones.
    Needs no queries. Windows and step_size as in `tracin` (Adam form: sum_t w_t g . A_t g).
    """
    wins, many = W.normalize(run.table, window, epochs, windows)
    dev = resolve_device(device)
    rows_of = SampleRows(run, train_ids, dev)
    spans = W.merge(wins)
    acc = ScoreAccumulator(len(wins), rows_of.n, None, dtype=dtype, device=dev)
    sizes = step_size_form(run, step_size)
    split = Split.of(group)

    def compute(blk: SumBlock) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        rows, keep = rows_of.rows(blk.sample_ids)
        scaled = sizes.scaled_rows(blk.steps, blk.grads)
        return rows, keep, torch.linalg.vecdot(blk.grads, scaled).mul_(sizes.row_coef(blk.steps, blk.grads))

    def commit(blk: SumBlock, out: Any) -> None:
        acc.update_windows(wins, blk.steps, *out)

    reduce_rows(run, spans, compute, commit, desc="self-influence", progress=progress, split=split,
                chunk_rows=chunk_rows, dtype=dtype, device=dev)
    if split is not None:
        acc.sync(split.group)
    base = run_notes(run, sizes)
    results = []
    for w, (t1, t2) in enumerate(wins):
        values, present = acc.compute(w)
        results.append(InfluenceScores(values=values, train_ids=rows_of.ids, present=present, query_ids=None,
                                       method="self_influence", window=(t1, t2),
                                       approximations=base + window_notes(run, t1, t2), run_id=run.run_id))
    return results if many else results[0]
