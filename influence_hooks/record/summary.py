"""What a recording records and costs: said once when it starts, counted while it runs.

- `plan_summary(...)`: at the first step, the layers, the dimensions each one gets, the bytes
  per step and the run path; as text (the recorder prints it) and as a flat dict (the Lightning
  callback logs it as hyperparameters).
- `RecordingStats`: the recording's own running figures (steps, rows, megabytes handed to the
  writer, time the training thread waited for the writer's queue, time spent in the capture
  hooks); the callback logs them through `pl_module.log`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..storage.format import storage_itemsize

METRIC_PREFIX = "influence/"
MAX_LISTED_LAYERS = 40


@dataclass
class RecordingStats:
    """Running totals of a recording, from its first step.

    rows / query_rows: gradient rows written (one per sample per step) and query-gradient rows;
    bytes: their size as stored (storage dtype; files add a little HDF5 overhead); queue_wait_s:
    seconds the training thread spent handing rows to the background writer (it blocks only when
    the writer's queue is full); hook_s: seconds spent inside the capture hooks (forward and
    backward, queries included; on a GPU, the time to launch that work); writer_cpu_s: CPU seconds
    of the background writer thread (checks, shard files), which compete with training for CPU
    cores where training uses them all.
    """

    steps: int = 0
    rows: int = 0
    query_rows: int = 0
    bytes: int = 0
    queue_wait_s: float = 0.0
    hook_s: float = 0.0
    writer_cpu_s: float = 0.0

    def metrics(self, prefix: str = METRIC_PREFIX) -> dict[str, float]:
        """The figures as a flat dict of floats, names prefixed (for a logger)."""
        return {f"{prefix}steps": float(self.steps), f"{prefix}rows": float(self.rows),
                f"{prefix}query_rows": float(self.query_rows), f"{prefix}mb_written": self.bytes / 2**20,
                f"{prefix}queue_wait_s": float(self.queue_wait_s), f"{prefix}hook_s": float(self.hook_s),
                f"{prefix}writer_cpu_s": float(self.writer_cpu_s)}


def _kib(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def _projection_text(spec: Any) -> str:
    if spec.kind == "none":
        return "exact"
    if spec.kind == "kronecker":
        return f"kronecker {spec.k_left} x {spec.k_right}"
    return spec.kind


def plan_summary(run_dir: str, model_name: str, layers: Sequence[Any], left_out: Sequence[str],
                 storage_dtype: str, batch_size: int, n_queries: int, projection: Any, allocation: str,
                 resumed_from: int | None = None) -> tuple[str, dict[str, Any]]:
    """(text, dict) describing a recording: `layers` are the CapturedLayers kept after the first
    step's checks, `left_out` the layers dropped there, `projection` the budget (int, dict or
    None) and `allocation` how an int budget was shared."""
    itemsize = storage_itemsize(storage_dtype)
    dim = sum(l.spec.out_dim for l in layers)
    per_step = batch_size * dim * itemsize
    per_query_step = n_queries * dim * itemsize
    verb = f"resuming at step {resumed_from}" if resumed_from is not None else "recording"
    lines = [f"influence_hooks: {verb} {len(layers)} layers of {model_name} into {run_dir} "
             f"({dim:,} dims per sample, {storage_dtype})"]
    width = max([len(l.name) for l in layers] + [5])
    lines.append(f"  {'layer':<{width}}  {'type':<12} {'gradient':>10} {'recorded':>9}  projection")
    shown = list(layers)
    if len(shown) > MAX_LISTED_LAYERS:
        shown = shown[:MAX_LISTED_LAYERS - 5] + [None] + shown[-5:]
    for l in shown:
        if l is None:
            lines.append(f"  ... {len(layers) - MAX_LISTED_LAYERS + 5} more layers (manifest.json lists all)")
            continue
        lines.append(f"  {l.name:<{width}}  {type(l.module).__name__[:12]:<12} {l.spec.grad_dim:>10,} "
                     f"{l.spec.out_dim:>9,}  {_projection_text(l.spec)}")
    for name in left_out:
        lines.append(f"  left out: {name} (applied to an input shared by the whole batch)")
    if isinstance(projection, int) and any(l.spec.kind != "none" for l in layers):
        how = {"equal": "equally", "sqrt": "in proportion to the square root of each layer's gradient size",
               "linear": "in proportion to each layer's gradient size"}[allocation]
        hint = "; projection_allocation='sqrt' gives large layers more" if allocation == "equal" else ""
        lines.append(f"  projection={projection} is shared {how} among the layers (never more than a layer's "
                     f"own gradient; Kronecker factors round down). projection={{glob: dims}} chooses per "
                     f"layer{hint}.")
    cost = f"  per step: {batch_size} samples x {dim:,} dims x {itemsize} bytes = {_kib(per_step)}"
    if n_queries:
        cost += f"; per query step: {n_queries} queries x {dim:,} dims = {_kib(per_query_step)}"
    lines.append(cost)
    info = {"run_dir": run_dir, "layers": [l.name for l in layers], "dims": [l.spec.out_dim for l in layers],
            "dim": dim, "storage_dtype": storage_dtype, "bytes_per_step": per_step,
            "bytes_per_query_step": per_query_step, "left_out": list(left_out)}
    return "\n".join(lines), info
