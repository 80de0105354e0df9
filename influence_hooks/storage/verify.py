"""`verify_run(run)`: read every finished file of a run in full and list what is wrong with it.

Reading every chunk checks every checksum (fletcher32, and from format 3 the gradient rows' own
sums, storage/checksum.py); on top of that each shard's
tables must agree with each other and with the manifest, and the run must be whole: no finished
file the rank files list may be missing, and the shards and rank files must agree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h5py
import numpy as np
import torch

from . import format as fmt
from .files import from_stored, open_h5, stored_dtype
from .rowio import Stage

if TYPE_CHECKING:
    from .index import ShardFile
    from .reader import Run


def verify_run(run: "Run", *, require_complete: bool = True) -> list[str]:
    """Problems found (empty: all good). An interrupted run counts as a problem unless
    require_complete=False."""
    problems = [f"{p}: {why}" for p, why in run.skipped_shards]
    problems += [g.describe() for g in run.gaps]
    problems += run.inconsistencies
    for sh in run.shard_files():
        try:
            problems += [f"{sh.path}: {p}" for p in _check_shard(run, run.open_shard(sh), sh)]
        except Exception as e:  # noqa: BLE001 - verification reports everything it finds
            problems.append(f"{sh.path}: unreadable ({type(e).__name__}: {e}); the file is damaged")
    for kind, files in run.param_files().items():
        for _step, p in files.items():
            try:
                with open_h5(p) as f:
                    f.visititems(lambda _name, obj: obj[()] if isinstance(obj, h5py.Dataset) else None)
            except Exception as e:  # noqa: BLE001
                problems.append(f"{p}: unreadable {kind} ({type(e).__name__}: {e}); the file is damaged")
    if require_complete and not run.complete:
        span = f"{run.first_step}..{run.last_step}" if len(run.steps) else "-"
        problems.append(f"run is incomplete: training did not finish or was interrupted (recorded steps {span})")
    return problems


def _check_shard(run: "Run", f: h5py.File, sh: "ShardFile") -> list[str]:
    """Read every dataset of one shard in full; what does not add up."""
    out = []
    cols = {name: f[fmt.STEPS][name][()] for name in fmt.STEP_COLUMNS}
    steps, counts, starts = cols["step"], cols["row_count"], cols["row_start"]
    n_rows = int(counts.sum())
    if len(steps) and (np.any(np.diff(steps) <= 0) or starts[0] != 0
                       or np.any(starts[1:] != np.cumsum(counts)[:-1])):
        out.append("its per-step table is inconsistent (steps not ascending, or row ranges that do not tile the rows)")
    row_step = f[fmt.ROWS_STEP][()]
    if len(row_step) != n_rows or not np.array_equal(row_step, np.repeat(steps, counts)):
        out.append(f"rows/step does not match the per-step table ({len(row_step)} rows, the table says {n_rows})")
    ids = f[fmt.ROWS_SAMPLE_ID][()]
    if len(ids) != n_rows:
        out.append(f"it holds {len(ids)} sample ids for {n_rows} rows")
    elif len(ids) and ids.min() < 0:
        out.append(f"it holds negative sample ids ({int((ids < 0).sum())} rows)")
    g = f[fmt.ROWS_GRAD]
    if g.shape != (n_rows, run.dim) and not (n_rows == 0 and g.shape[0] == 0):
        out.append(f"rows/grad has shape {g.shape}, expected ({n_rows}, {run.dim})")
    nonfinite_rows = 0
    rows = run.open_rows(sh)  # every chunk verified as it is read (fletcher32 by HDF5 in format 2)
    for stored in rows.blocks(Stage()):
        block = from_stored(stored, rows.dtype)
        nonfinite_rows += int((~torch.isfinite(block)).any(dim=1).sum()) if block.ndim == 2 else 0
    if nonfinite_rows:
        flagged = int(counts[cols["nonfinite"].astype(bool)].sum())
        if nonfinite_rows > flagged:
            out.append(f"{nonfinite_rows} rows hold non-finite gradient values, but only steps with {flagged} rows "
                       "are flagged")
    qsteps = f[fmt.QUERY_STEP][()]
    if len(qsteps):
        qt = from_stored(f[fmt.QUERY_GRAD][()], stored_dtype(f[fmt.QUERY_GRAD]))
        q = (qt.float() if qt.dtype == torch.bfloat16 else qt).numpy()  # numpy has no bfloat16
        if q.ndim != 3 or q.shape[0] != len(qsteps) or q.shape[2] != run.dim:
            out.append(f"queries/grad has shape {q.shape}, expected ({len(qsteps)}, Q, {run.dim})")
        if fmt.QUERY_NONFINITE in f:
            flags = f[fmt.QUERY_NONFINITE][()]
            actual = ~np.isfinite(q).all(axis=2) if q.ndim == 3 else None
            if actual is not None and flags.shape == actual.shape and np.any(actual & ~flags):
                out.append("query gradients hold non-finite values that are not flagged")
    return out
