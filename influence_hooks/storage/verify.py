"""`verify_run(run)`: read every finished file of a run in full and list what is wrong with it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import h5py
import numpy as np

from . import format as fmt

if TYPE_CHECKING:
    from .reader import Run

_CHUNK_ROWS = 65536


def verify_run(run: "Run", *, require_complete: bool = True) -> list[str]:
    """Problems found (empty: all good). An interrupted run counts as a problem unless
    require_complete=False."""
    problems = [f"{p}: {why}" for p, why in run.skipped_shards]
    for sh in run.shard_files():
        try:
            f = run.open_shard(sh)
            g = f[fmt.ROWS_GRAD]
            for r in range(0, g.shape[0], _CHUNK_ROWS):
                if not np.isfinite(np.asarray(g[r:r + _CHUNK_ROWS], np.float64)).all():
                    problems.append(f"{sh.path}: non-finite gradient values (flagged steps: "
                                    f"{int(run.nonfinite.sum())})")
                    break
            if fmt.QUERY_GRAD in f:
                f[fmt.QUERY_GRAD][()]
        except Exception as e:  # noqa: BLE001 - verification reports everything it finds
            problems.append(f"{sh.path}: unreadable ({e})")
    for kind, files in run.param_files().items():
        for _step, p in files.items():
            try:
                with h5py.File(p, "r") as f:
                    for ds in f[fmt.PARAMS_GROUP].values():
                        ds[()]
            except Exception as e:  # noqa: BLE001
                problems.append(f"{p}: unreadable {kind} ({e})")
    if require_complete and not run.complete:
        span = f"{run.first_step}..{run.last_step}" if len(run.steps) else "-"
        problems.append(f"run is incomplete: training did not finish or was interrupted (recorded steps {span})")
    return problems
