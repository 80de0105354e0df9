"""The on-disk format of a run directory: every file name, dataset name and version lives here.

A run directory holds
    manifest.json                      static metadata of the run (written by rank 0)
    rank-000.json                      per-rank progress: segments (resumes), completion, final step
    shards/grads-r000-000000.h5        finished gradient shards, one rank each, a contiguous step range
    params/snapshot-r000-s000000042.h5 parameter snapshots (selected layers) at w_t, before step t
    params/checkpoint-r000-s000000042.h5  whole model (and optimizer state) at w_t
Files are written under a temporary name and renamed when complete, so a crash leaves only whole
files under the final names. Nothing in a run directory is pickled.
"""

from __future__ import annotations

import re

FORMAT_NAME = "influence_hooks.run"
FORMAT_VERSION = 1

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
PARAM_DIR = "params"
TMP_SUFFIX = ".tmp"

STORAGE_DTYPES = ("float16", "float32", "float64")

# datasets inside a gradient shard
ROWS_STEP = "rows/step"
ROWS_SAMPLE_ID = "rows/sample_id"
ROWS_GRAD = "rows/grad"
STEPS = "steps"  # group of per-step columns, see STEP_COLUMNS
STEP_COLUMNS = (
    "step", "epoch", "lr", "lr_groups", "batch_size", "update_weight", "micro_batches",
    "row_start", "row_count", "nonfinite", "skipped", "loss",
)
QUERY_STEP = "queries/step"
QUERY_GRAD = "queries/grad"

# groups inside a parameter file
PARAMS_GROUP = "params"
OPTIM_GROUP = "optim"
PARAM_KINDS = ("snapshot", "checkpoint")

_SHARD_RE = re.compile(r"^grads-r(\d{3,})-(\d{6,})\.h5$")
_PARAM_RE = re.compile(r"^(snapshot|checkpoint)-r(\d{3,})-s(\d{9,})\.h5$")
_RANK_RE = re.compile(r"^rank-(\d{3,})\.json$")


def shard_name(rank: int, index: int) -> str:
    return f"grads-r{rank:03d}-{index:06d}.h5"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    """(rank, index) of a finished shard's file name, None for anything else."""
    m = _SHARD_RE.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def param_file_name(kind: str, rank: int, step: int) -> str:
    return f"{kind}-r{rank:03d}-s{step:09d}.h5"


def parse_param_file_name(name: str) -> tuple[str, int, int] | None:
    """(kind, rank, step) of a finished parameter file's name, None otherwise."""
    m = _PARAM_RE.match(name)
    return (m.group(1), int(m.group(2)), int(m.group(3))) if m else None


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:03d}.json"


def parse_rank_file_name(name: str) -> int | None:
    m = _RANK_RE.match(name)
    return int(m.group(1)) if m else None
