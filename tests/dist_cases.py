"""The aggregations test_distributed.py runs with one process and with a process group of two."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from influence_hooks import compare_windows, dit, dvemb, open_run, self_influence, tracin

F64 = dict(dtype=torch.float64, progress=False)
WINDOWS = [(0, 8), (8, 16), (16, 24)]


def cases(run_dir: str, exact_dir: str, *, group: Any, dvemb_dir: Path) -> dict[str, torch.Tensor]:
    from test_exact import loss_fn, make_data, make_model

    out: dict[str, torch.Tensor] = {}
    run = open_run(run_dir)
    kw = dict(group=group, **F64)
    for w, r in enumerate(tracin(run, windows=WINDOWS, **kw)):
        out[f"tracin/{w}"] = r.values
    out["self_influence"] = self_influence(run, **kw).values
    for curvature in ("none", "fisher"):
        for mode in ("removal", "accrued"):
            for w, r in enumerate(dit(run, windows=WINDOWS, mode=mode, curvature=curvature, **kw)):
                out[f"dit_{curvature}_{mode}/{w}"] = r.values
    for block_diagonal in (False, True):
        # with a group, rank 0 writes the one file every rank then reads
        path = Path(dvemb_dir) / f"dvemb-{block_diagonal}-{'group' if group is not None else 'one'}.h5"
        emb = dvemb(run, path=path, block_diagonal=block_diagonal, **kw)
        out[f"dvemb_{block_diagonal}/embeddings"] = emb.embeddings(dtype=torch.float64)[1]
        for w, r in enumerate(emb.scores(run.query_gradients(run.final_step), windows=WINDOWS, **kw)):
            out[f"dvemb_{block_diagonal}/{w}"] = r.values
        emb.close()
    cmp = compare_windows(run, windows=WINDOWS, corrupted=[1, 4, 7], detection_methods=("tracin", "self_influence"),
                          group=group, progress=False)
    out["compare/scores"] = torch.from_numpy(cmp.scores)
    out["compare/whole_run"] = torch.from_numpy(cmp.whole_run)
    out["compare/correlation"] = torch.from_numpy(cmp.correlation)

    exact_run = open_run(exact_dir)
    ds, q = make_data()
    for mode in ("removal", "accrued"):
        r = dit(exact_run, window=(2, 6), mode=mode, curvature="exact", model=make_model(), dataset=ds, queries=q,
                loss_fn=loss_fn, **kw)
        out[f"exact_{mode}"] = r.values
    return out
